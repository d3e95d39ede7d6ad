//! The resource's snapshots (the backup target): taking one at a barrier of the change
//! stream, listing, deleting, exposing as read-only devices, restoring, the schedule and
//! its retention, and the snapshot a copy takes before it becomes a resync target.
//!
//! Snapshots are taken on a secondary: there, the replication stream's barriers mark the
//! instants at which the copy is exactly the primary's state after a flush (see
//! `tandem_replicator::barrier`). A snapshot waits for the next barrier at most
//! [`BARRIER_WAIT`]; the stream never waits for a snapshot.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tandem_replicator::generation::BLANK;
use tandem_replicator::relation::Phase;
use tracing::{error, info, warn};

use super::Resource;
use crate::config::SnapshotTier;
use crate::events::{Kind, Object, Record};
use crate::frontend::snapshot_fs::SnapshotExport;
use crate::meta::DiskState;
use crate::snapshot::{SnapshotKind, SnapshotRecord, SnapshotState};
use crate::status::SnapshotSummary;

/// How long a snapshot waits for the next barrier of the replication stream.
pub const BARRIER_WAIT: Duration = Duration::from_secs(30);
/// How long a snapshot waits for the application's next flush before it asks the primary
/// for a barrier of its own.
pub const APPLICATION_BARRIER_WAIT: Duration = Duration::from_secs(2);
/// ... and the snapshot before a resync, which holds the resync up meanwhile.
pub const BEFORE_RESYNC_WAIT: Duration = Duration::from_secs(5);

/// What `tandem snapshot list` shows of one snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SnapshotStatus {
    pub name: String,
    /// RFC 3339.
    pub created: String,
    pub created_ms: u64,
    /// The change stream's position it holds (every request up to this sequence number).
    pub seq: u64,
    pub at_barrier: bool,
    pub generation: String,
    /// "manual", "scheduled" (with `tier`) or "before_resync" (with `peer`).
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// "valid" or "invalid".
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invalid_reason: Option<String>,
    /// Blocks it holds itself, and the bytes its files take.
    pub blocks: u64,
    pub bytes_used: u64,
    /// The read-only devices while exposed (volume name, device).
    #[serde(default)]
    pub exposed: Vec<(String, String)>,
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(SystemTime::UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// `PREFIX-20261201T191500Z`.
fn stamped(prefix: &str) -> String {
    let t = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    format!("{prefix}-{}", t.replace(['-', ':'], ""))
}

impl Resource {
    /// [`stamped`], with `-2`, `-3`... if a snapshot of that name exists (two in a second).
    fn unused_name(&self, prefix: &str) -> String {
        let base = stamped(prefix);
        let taken = |n: &str| self.snapshots.get(n).is_ok();
        if !taken(&base) {
            return base;
        }
        (2..).map(|i| format!("{base}-{i}")).find(|n| !taken(n)).unwrap_or(base)
    }
}

impl Resource {
    /// `tandem snapshot create`: a snapshot at the next barrier of the change stream (at
    /// once if the stream is between epochs or not running).
    pub async fn snapshot_create(self: &Arc<Self>, name: Option<String>) -> Result<SnapshotRecord> {
        let name = name.unwrap_or_else(|| self.unused_name("manual"));
        self.take_snapshot(&name, SnapshotKind::Manual, BARRIER_WAIT).await
    }

    /// Asks the primary this copy replicates from for a barrier (`BarrierRequest`).
    fn request_barrier(&self) {
        let primary = self.peers.lock().unwrap().iter().find_map(|(n, p)| {
            (p.applying || p.rel.remote_primary()).then(|| p.conn.clone()).flatten().map(|c| (n.clone(), c))
        });
        if let Some((peer, conn)) = primary {
            tracing::debug!(resource = %self.name, peer = %peer, "asking the primary for a barrier");
            conn.send_control(tandem_protocol::ControlMsg::BarrierRequest { resource: self.name.clone() });
        }
    }

    /// Primary: a secondary taking a snapshot asks for a barrier. A flush through the
    /// volume puts one in the change stream of every peer.
    pub fn on_barrier_request(self: &Arc<Self>, peer: &str) {
        let Some(volume) = self.volume() else {
            tracing::debug!(resource = %self.name, peer, "barrier requested, but not primary here: ignored");
            return;
        };
        let flush = volume.submit_flush();
        let name = self.name.clone();
        let peer = peer.to_string();
        tokio::spawn(async move {
            if let Err(e) = flush.await {
                warn!(resource = %name, peer = %peer, "the barrier a snapshot asked for failed: {e}");
            }
        });
    }

    /// Whether this copy, about to become a resync target, should keep a snapshot of
    /// itself first: it holds data, is consistent, and has none from before a resync.
    fn before_resync_wanted(&self) -> bool {
        self.cfg.snapshot_before_resync
            && self.record().current_generation != BLANK
            && self.disk() != DiskState::Inconsistent
            && !self.snapshots.list().iter().any(|i| {
                matches!(i.record.kind, SnapshotKind::BeforeResync { .. })
                    && i.record.state == SnapshotState::Valid
            })
    }

    /// The snapshot before a resync, taken where the relation decides this copy becomes a
    /// target (before it asks the source for anything): at once if the copy is at a barrier
    /// (no stream applying), else left to [`snapshot_before_resync`] when the replication
    /// stream is accepted. Blocking, and short: two small files.
    pub(super) fn snapshot_before_resync_now(self: &Arc<Self>, peer: &str) {
        if !self.before_resync_wanted() {
            return;
        }
        let name = self.unused_name(&format!("before-resync-{peer}"));
        let (tx, rx) = std::sync::mpsc::channel();
        let (store, generation, seq_now) = self.snapshot_inputs();
        let (n, kind) = (name.clone(), SnapshotKind::BeforeResync { peer: peer.to_string() });
        let ticket = self.target.barriers.at_barrier(true, move |point| {
            let seq = if point.seq > 0 { point.seq } else { seq_now };
            let _ = tx.send(store.create(&n, kind, seq, point.at_barrier, generation));
        });
        if let Some(t) = ticket {
            if self.target.barriers.cancel(t) {
                info!(resource = %self.name, peer,
                      "a stream is applying: the snapshot before the resync is taken when the next replication stream starts");
                return;
            }
        }
        match rx.recv() {
            Ok(Ok(record)) => {
                let _ = self.snapshot_taken(record);
            }
            Ok(Err(e)) => error!(resource = %self.name, peer, "no snapshot before the resync: {e}"),
            Err(_) => error!(resource = %self.name, peer, "no snapshot before the resync: dropped"),
        }
    }

    fn snapshot_inputs(&self) -> (Arc<crate::snapshot::SnapshotStore>, String, u64) {
        (
            self.snapshots.clone(),
            format!("{:016x}", self.record().current_generation),
            self.seq.load(std::sync::atomic::Ordering::SeqCst).saturating_sub(1),
        )
    }

    async fn take_snapshot(
        self: &Arc<Self>,
        name: &str,
        kind: SnapshotKind,
        wait: Duration,
    ) -> Result<SnapshotRecord> {
        crate::snapshot::valid_name(name)?;
        if self.is_primary() {
            bail!(
                "{} is primary on {}: snapshots are taken on a secondary, where the replication stream's \
                 barriers give exactly the primary's state after a flush — run this on a standby",
                self.name,
                self.me
            );
        }
        let disk = self.disk();
        let before_resync = matches!(kind, SnapshotKind::BeforeResync { .. });
        if !before_resync && (disk == DiskState::Inconsistent || self.target.resyncing()) {
            bail!(
                "{} on {} is {} (a resync into it has not finished): a snapshot now would not show one \
                 instant{}",
                self.name,
                self.me,
                if disk == DiskState::Inconsistent { "inconsistent" } else { "being resynced" },
                if self.cfg.snapshot_before_resync {
                    "; the before-resync snapshot holds its last consistent state"
                } else {
                    ""
                }
            );
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (store, generation, seq_now) = self.snapshot_inputs();
        let (n, k) = (name.to_string(), kind.clone());
        let me = self.clone();
        let ticket = tokio::task::spawn_blocking(move || {
            me.target.barriers.at_barrier(me.target.resyncing(), move |point| {
                let r = if point.resyncing && !before_resync {
                    Err(anyhow!("a resync into this copy started: a snapshot now would not show one instant"))
                } else {
                    let seq = if point.seq > 0 { point.seq } else { seq_now };
                    store.create(&n, k, seq, point.at_barrier, generation).map_err(anyhow::Error::from)
                };
                let _ = tx.send(r);
            })
        })
        .await?;
        let mut rx = rx;
        if ticket.is_some() {
            // Between barriers: the application's next flush, or, if it does not flush soon,
            // one asked of the primary (its change stream then holds every write completed
            // before it and none after: a crash-consistent instant, not an application's).
            if let Ok(r) = tokio::time::timeout(APPLICATION_BARRIER_WAIT, &mut rx).await {
                return self.snapshot_taken(r.map_err(|_| anyhow!("the snapshot was dropped"))??);
            }
            self.request_barrier();
        }
        let record = match tokio::time::timeout(wait, rx).await {
            Ok(r) => r.map_err(|_| anyhow!("the snapshot was dropped"))??,
            Err(_) => {
                let taken_back = ticket.is_some_and(|t| self.target.barriers.cancel(t));
                if taken_back {
                    bail!(
                        "no barrier in the change stream from the primary within {wait:?}: no snapshot \
                         taken (is the primary's agent answering?)"
                    );
                }
                bail!("the snapshot did not complete within {wait:?}");
            }
        };
        self.snapshot_taken(record)
    }

    fn snapshot_taken(&self, record: SnapshotRecord) -> Result<SnapshotRecord> {
        info!(resource = %self.name, snapshot = %record.name, seq = record.seq, kind = ?record.kind, "snapshot taken");
        self.emit(|r| Record {
            snapshot: Some(record.name.clone()),
            seq: Some(record.seq),
            ..Record::new(Kind::SnapshotTaken, Object::Snapshot, r)
        });
        self.snapshot_changed();
        Ok(record)
    }

    pub fn snapshot_list(&self) -> Vec<SnapshotStatus> {
        let exposed = self.exposed.lock().unwrap();
        self.snapshots
            .list()
            .into_iter()
            .map(|i| {
                let r = i.record;
                let (kind, tier, peer) = match &r.kind {
                    SnapshotKind::Manual => ("manual", None, None),
                    SnapshotKind::Scheduled { tier } => ("scheduled", Some(tier.clone()), None),
                    SnapshotKind::BeforeResync { peer } => ("before_resync", None, Some(peer.clone())),
                };
                let (state, invalid_reason) = match &r.state {
                    SnapshotState::Valid => ("valid", None),
                    SnapshotState::Invalid { reason } => ("invalid", Some(reason.clone())),
                };
                SnapshotStatus {
                    created: rfc3339(r.created_ms),
                    created_ms: r.created_ms,
                    seq: r.seq,
                    at_barrier: r.at_barrier,
                    generation: r.generation.clone(),
                    kind: kind.to_string(),
                    tier,
                    peer,
                    state: state.to_string(),
                    invalid_reason,
                    blocks: i.blocks,
                    bytes_used: i.bytes_used,
                    exposed: exposed.get(&r.name).map(|e| e.devices.clone()).unwrap_or_default(),
                    name: r.name,
                }
            })
            .collect()
    }

    pub fn snapshot_summary(&self) -> SnapshotSummary {
        let list = self.snapshots.list();
        SnapshotSummary {
            count: list.len() as u64,
            valid: list.iter().filter(|i| i.record.state == SnapshotState::Valid).count() as u64,
            bytes_used: list.iter().map(|i| i.bytes_used).sum(),
            newest_valid_ms: list
                .iter()
                .filter(|i| i.record.state == SnapshotState::Valid)
                .map(|i| i.record.created_ms)
                .max(),
        }
    }

    pub async fn snapshot_delete(self: &Arc<Self>, name: &str) -> Result<String> {
        if self.exposed.lock().unwrap().contains_key(name) {
            bail!(
                "snapshot {name:?} of {} is exposed: `tandem snapshot unexpose {} {name}` first",
                self.name,
                self.name
            );
        }
        let store = self.snapshots.clone();
        let n = name.to_string();
        tokio::task::spawn_blocking(move || store.delete(&n)).await??;
        info!(resource = %self.name, snapshot = name, "snapshot deleted");
        self.emit(|r| Record {
            snapshot: Some(name.to_string()),
            ..Record::new(Kind::SnapshotDeleted, Object::Snapshot, r)
        });
        self.snapshot_changed();
        Ok(format!("deleted snapshot {name} of {}", self.name))
    }

    /// Where snapshot `name` is mounted while exposed.
    fn exposure_mountpoint(&self, name: &str) -> std::path::PathBuf {
        self.mountpoint.with_file_name(format!("{}.snapshot.{name}", self.name))
    }

    /// Exposure mountpoints of this resource's snapshots that exist now (at start: left by a
    /// killed agent).
    pub(super) fn stale_exposures(&self) -> Vec<std::path::PathBuf> {
        let prefix = format!("{}.snapshot.", self.name);
        let Some(dir) = self.mountpoint.parent() else { return Vec::new() };
        std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                    .map(|e| e.path())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `tandem snapshot expose`: block devices of the snapshot, read-only — or, with
    /// `overlay`, taking writes into a throwaway overlay (to replay a filesystem journal).
    pub async fn snapshot_expose(
        self: &Arc<Self>,
        name: &str,
        overlay: bool,
    ) -> Result<Vec<(String, String)>> {
        let rec = self.snapshots.get(name)?;
        if let SnapshotState::Invalid { reason } = rec.state {
            bail!("snapshot {name:?} is invalid ({reason}): it does not show one instant");
        }
        if self.exposed.lock().unwrap().contains_key(name) {
            bail!(
                "snapshot {name:?} of {} is exposed already (see `tandem snapshot list {}`)",
                self.name,
                self.name
            );
        }
        let mountpoint = self.exposure_mountpoint(name);
        let (store, n, volumes) = (self.snapshots.clone(), name.to_string(), self.cfg.volumes.clone());
        let overlay_dir = overlay.then(|| self.snapshots.dir().to_path_buf());
        let export = tokio::task::spawn_blocking(move || {
            SnapshotExport::start(store, &n, &mountpoint, &volumes, overlay_dir.as_deref())
        })
        .await??;
        let devices = export.devices.clone();
        self.exposed.lock().unwrap().insert(name.to_string(), export);
        Ok(devices)
    }

    pub async fn snapshot_unexpose(self: &Arc<Self>, name: &str) -> Result<String> {
        let Some(mut export) = self.exposed.lock().unwrap().remove(name) else {
            bail!("snapshot {name:?} of {} is not exposed", self.name);
        };
        let (r, export) = tokio::task::spawn_blocking(move || {
            let r = export.stop();
            (r, export)
        })
        .await?;
        if let Err(e) = r {
            self.exposed.lock().unwrap().insert(name.to_string(), export);
            return Err(e);
        }
        Ok(format!("snapshot {name} of {} no longer exposed", self.name))
    }

    /// `tandem snapshot restore`: this copy becomes the snapshot's state. It ends the
    /// sessions with every peer, writes back the blocks changed since the snapshot, marks
    /// them out of sync for every peer, starts a new data generation (the restored data is
    /// the newest), and offers the sessions again: peers resync only those blocks.
    pub async fn snapshot_restore(self: &Arc<Self>, name: &str) -> Result<String> {
        if self.is_primary() {
            bail!(
                "{} is primary on {}: demote it first (restore rolls back a secondary)",
                self.name,
                self.me
            );
        }
        let rec = self.snapshots.get(name)?;
        if let SnapshotState::Invalid { reason } = rec.state {
            bail!("snapshot {name:?} is invalid ({reason}): it cannot be restored");
        }
        let primary =
            self.peers.lock().unwrap().iter().find_map(|(n, p)| p.rel.remote_primary().then(|| n.clone()));
        if let Some(p) = primary {
            bail!(
                "{p} is primary for {}: demote it first (its writes would go on replacing the restored data)",
                self.name
            );
        }
        self.admin_disconnect();
        // Every stream of the sessions has ended (applying and resyncing).
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let busy = self.peers.lock().unwrap().values().any(|p| p.applying)
                || !self.resyncing_from.lock().unwrap().is_empty();
            if !busy {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                self.admin_connect();
                bail!("the streams of {} did not stop within 10s; nothing restored", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let store = self.snapshots.clone();
        let n = name.to_string();
        let restored = tokio::task::spawn_blocking(move || store.restore(&n)).await?;
        let blocks = match restored {
            Ok(b) => b,
            Err(e) => {
                self.admin_connect();
                return Err(e).context(format!("restore of {name} failed; the copy may be partly restored"));
            }
        };
        let bytes = blocks.len() as u64 * crate::snapshot::cow::BLOCK;
        for bm in self.bitmaps.values() {
            let mut bm = bm.lock().unwrap();
            for b in &blocks {
                bm.set_range(b * crate::snapshot::cow::BLOCK, crate::snapshot::cow::BLOCK);
            }
        }
        self.persist_bitmaps();
        let peers: Vec<String> = self.bitmaps.keys().cloned().collect();
        self.update_meta(|m| {
            let old = super::sync::rotate_generation(m);
            for p in &peers {
                let pm = m.peer_mut(p);
                if pm.bitmap_uuid == 0 {
                    pm.bitmap_uuid = old;
                }
            }
            m.disk = DiskState::UpToDate;
            m.crashed_primary = false;
        })?;
        warn!(resource = %self.name, snapshot = name, restored_bytes = bytes,
              "restored from snapshot: this copy is the newest data now; peers resync the restored blocks");
        let connect = self.admin_connect();
        self.snapshot_changed();
        Ok(format!(
            "restored {} to snapshot {name} ({bytes} bytes written back); new data generation; {connect}",
            self.name
        ))
    }

    /// Before the first write of a session that makes this copy a resync target: a
    /// snapshot of it as it is, kept until the resync ends — unless it holds no data yet,
    /// is already inconsistent (the snapshot from before the interrupted resync is kept),
    /// or one exists. Called with no write of the session applied yet.
    pub(super) async fn snapshot_before_resync(self: &Arc<Self>, peer: &str) {
        let target =
            self.peers.lock().unwrap().get(peer).is_some_and(|p| matches!(p.rel.phase, Phase::Target(_)));
        if !target || !self.before_resync_wanted() {
            return;
        }
        let name = self.unused_name(&format!("before-resync-{peer}"));
        match self
            .take_snapshot(&name, SnapshotKind::BeforeResync { peer: peer.to_string() }, BEFORE_RESYNC_WAIT)
            .await
        {
            Ok(_) => info!(resource = %self.name, peer, snapshot = %name, "snapshot before resync taken"),
            Err(e) => error!(resource = %self.name, peer, "no snapshot before the resync: {e:#}"),
        }
    }

    /// The resync into this copy ended with it up to date: the snapshots taken before it go.
    pub(super) async fn resync_target_done(self: &Arc<Self>) {
        let before: Vec<String> = self
            .snapshots
            .list()
            .into_iter()
            .filter(|i| matches!(i.record.kind, SnapshotKind::BeforeResync { .. }))
            .map(|i| i.record.name)
            .collect();
        for name in before {
            if let Err(e) = self.snapshot_delete(&name).await {
                error!(resource = %self.name, snapshot = %name, "cannot delete the snapshot taken before the resync: {e:#}");
            }
        }
    }

    /// One round of the snapshot schedule: a snapshot for each tier whose newest is at
    /// least its period old, then each tier pruned to its `keep`.
    pub async fn snapshot_schedule_tick(self: &Arc<Self>, tiers: &[SnapshotTier]) {
        if tiers.is_empty() || self.is_primary() || self.is_down() || self.disk() == DiskState::Inconsistent {
            return;
        }
        for t in tiers {
            let tier = t.name();
            let of_tier = || -> Vec<SnapshotRecord> {
                self.snapshots
                    .list()
                    .into_iter()
                    .map(|i| i.record)
                    .filter(|r| matches!(&r.kind, SnapshotKind::Scheduled { tier: x } if *x == tier))
                    .collect()
            };
            let mine = of_tier();
            // An invalid snapshot is no recovery point: the next one is due as if it were not there.
            let newest = mine.iter().filter(|r| r.state == SnapshotState::Valid).map(|r| r.created_ms).max();
            if newest.is_none_or(|ms| now_ms().saturating_sub(ms) >= t.every.as_millis() as u64) {
                let name = self.unused_name(&format!("auto-{tier}"));
                match self
                    .take_snapshot(&name, SnapshotKind::Scheduled { tier: tier.clone() }, BARRIER_WAIT)
                    .await
                {
                    Ok(_) => {}
                    Err(e) => {
                        warn!(resource = %self.name, tier = %tier, "scheduled snapshot not taken: {e:#}")
                    }
                }
            }
            let mut mine = of_tier();
            mine.sort_by_key(|r| r.order);
            let excess = mine.len().saturating_sub(t.keep as usize);
            for r in mine.into_iter().take(excess) {
                if self.exposed.lock().unwrap().contains_key(&r.name) {
                    continue;
                }
                match self.snapshot_delete(&r.name).await {
                    Ok(_) => {
                        info!(resource = %self.name, snapshot = %r.name, tier = %tier, "retention: deleted")
                    }
                    Err(e) => warn!(resource = %self.name, snapshot = %r.name, "retention: {e:#}"),
                }
            }
        }
    }

    /// Unexposes every snapshot (agent shutdown); a mounted one is left to a lazy unmount.
    pub fn snapshot_shutdown(&self) {
        let exposed: BTreeMap<String, SnapshotExport> = std::mem::take(&mut *self.exposed.lock().unwrap());
        for (name, mut e) in exposed {
            if let Err(err) = e.stop() {
                warn!(resource = %self.name, snapshot = %name, "{err:#}");
            }
        }
    }

    /// Something about the snapshots changed: snapshots that became invalid since the last
    /// look get a record, and the recovery point its `change`.
    fn snapshot_changed(&self) {
        let invalid: Vec<(String, String)> = self
            .snapshots
            .list()
            .into_iter()
            .filter_map(|i| match i.record.state {
                SnapshotState::Invalid { reason } => Some((i.record.name, reason)),
                SnapshotState::Valid => None,
            })
            .collect();
        let fresh: Vec<(String, String)> = {
            let mut seen = self.invalid_seen.lock().unwrap();
            let fresh = invalid.iter().filter(|(n, _)| !seen.contains(n)).cloned().collect();
            *seen = invalid.into_iter().map(|(n, _)| n).collect();
            fresh
        };
        for (name, reason) in fresh {
            self.emit(|r| Record {
                snapshot: Some(name.clone()),
                reason: Some(reason.clone()),
                ..Record::new(Kind::SnapshotInvalid, Object::Snapshot, r)
            });
        }
        self.publish();
    }

    /// The once-a-second look at the snapshots (a write may have invalidated one).
    pub(crate) fn snapshot_tick(&self) {
        if self.snapshots.list().iter().any(|i| i.record.state != SnapshotState::Valid) {
            self.snapshot_changed();
        }
    }
}
