//! Online verify: compare every block with a peer while the application keeps writing.
//!
//! Each 1 MiB range is compared as of one point in the change stream (see
//! `Volume::verify_range`): both nodes hash exactly the same version of it, so a write
//! racing the comparison can never show up as a difference — there are no false positives
//! to re-check. Blocks that differ are marked out of sync; `tandem resync` (or
//! `verify --repair`) copies them.

use std::sync::Arc;

use anyhow::{bail, Result};
use tracing::{info, warn};

use super::Resource;
pub use crate::status::VerifyReport;
use tandem_replicator::relation::{Event, Phase};

/// Ranges compared concurrently.
const WINDOW: usize = 8;
const RANGE: u64 = 1 << 20;

impl Resource {
    pub async fn verify(self: &Arc<Self>, repair: bool) -> Result<Vec<VerifyReport>> {
        let Some(volume) = self.volume() else {
            bail!("verify {} on the primary: it compares the primary's data with each peer's", self.name);
        };
        let peers: Vec<String> = self
            .peers
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p)| p.session.is_some() && p.rel.phase == Phase::InSync)
            .map(|(n, _)| n.clone())
            .collect();
        if peers.is_empty() {
            bail!("{}: no connected, in-sync peer to verify against", self.name);
        }
        let size = self.cfg.size;
        let mut reports = Vec::new();
        for peer in peers {
            info!(resource = %self.name, peer = %peer, "online verify started");
            let mut ranges: Vec<(u64, u64)> = Vec::new();
            let mut js = tokio::task::JoinSet::new();
            let mut at = 0u64;
            loop {
                while js.len() < WINDOW && at < size {
                    let (v, p, off, len) = (volume.clone(), peer.clone(), at, RANGE.min(size - at));
                    js.spawn(async move { v.verify_range(&p, off, len).await });
                    at += RANGE;
                }
                match js.join_next().await {
                    Some(r) => {
                        let found =
                            r.map_err(|e| anyhow::anyhow!(e.to_string()))?.map_err(|e| anyhow::anyhow!(e))?;
                        ranges.extend(found);
                    }
                    None => break,
                }
            }
            ranges.sort_unstable();
            let differing: u64 = ranges.iter().map(|r| r.1).sum();
            {
                let mut bm = self.bitmaps[&peer].lock().unwrap();
                for (off, len) in &ranges {
                    bm.set_range(*off, *len);
                }
            }
            if differing > 0 {
                warn!(resource = %self.name, peer = %peer, differing_bytes = differing, ranges = ranges.len(),
                      "online verify found differences; marked out of sync");
                self.persist_bitmaps();
            } else {
                info!(resource = %self.name, peer = %peer, "online verify found no differences");
            }
            if repair && differing > 0 {
                // The same path as `tandem resync`: the target starts tracking replicated
                // writes before the resync may send anything (starting the source here
                // directly let an older resync block overwrite a newer write).
                self.handle(&peer, Event::ResyncRequested);
            }
            reports.push(VerifyReport { peer, checked_bytes: size, differing_bytes: differing, ranges });
        }
        Ok(reports)
    }
}
