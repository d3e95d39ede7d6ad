//! Taking over a primary's device from the previous agent.
//!
//! The previous agent was primary and is gone (killed, crashed, restarted, upgraded); the
//! descriptor holder kept its FUSE connection, so the loop device and the filesystem
//! mounted on it are still there, their requests waiting. This agent serves them again as
//! the same primary:
//!
//! - It recovered from the activity log as after any crash (`Resource::open` marked the
//!   log's extents out of sync for every peer and recorded `crashed_primary`), so the
//!   peers get exactly those extents back in a delta resync, whatever the dead agent had
//!   or had not sent.
//! - It keeps the data generation: the writes it serves continue the generation the peers
//!   hold. A takeover is not a new primary — no generation rotation, no fencing, no split
//!   brain; with the same generation and `crashed_primary`, the relation makes this side
//!   the resync source for the marked extents.
//! - Requests the dead agent had read and not answered come back from the kernel
//!   (FUSE_NOTIFY_RESEND) and are admitted again, in the order the kernel first issued
//!   them, before any new request (`fuse_kernel::Session::resume`). None of them had been
//!   acknowledged, so writing one again is allowed; the activity log covers its range.
//!
//! If the connection cannot be served (the mount is gone, the state does not parse, a
//! loop device was detached), it is released: its requests fail as they would have without
//! a holder, the stale mount is cleaned up, and the resource stays secondary.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use tandem_replicator::relation::Event;
use tracing::{error, info};

use super::{Resource, RoleState};
use crate::frontend::{Frontend, FuseLoop};
use crate::meta::DiskState;
use crate::status::TakeoverStatus;

impl Resource {
    /// Whether the holder kept this resource's connection from a previous agent that was
    /// primary (then [`Resource::take_over`] is due).
    pub fn has_held_device(&self) -> bool {
        self.held_at_start.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Serves the held device again, as the same primary (see the module docs).
    pub async fn take_over(self: &Arc<Self>) -> Result<TakeoverStatus> {
        self.held_at_start.store(false, std::sync::atomic::Ordering::SeqCst);
        let keeper = self.keeper.clone().context("no descriptor holder")?;
        let key = self.mountpoint.display().to_string();
        match self.serve_held(keeper.clone(), &key).await {
            Ok(t) => Ok(t),
            Err(e) => {
                error!(resource = %self.name, "cannot take the device over: {e:#}; releasing it (its requests fail)");
                if let Err(e) = keeper.forget(&key) {
                    error!(resource = %self.name, "{e:#}");
                }
                let mp = self.mountpoint.clone();
                let cleaned =
                    tokio::task::spawn_blocking(move || crate::frontend::prepare_mountpoint(&mp)).await?;
                if let Err(c) = cleaned {
                    error!(resource = %self.name, "{c:#}");
                }
                Err(e)
            }
        }
    }

    async fn serve_held(
        self: &Arc<Self>,
        keeper: Arc<crate::holder::keeper::Keeper>,
        key: &str,
    ) -> Result<TakeoverStatus> {
        let mut role = self.role.lock().await;
        if matches!(*role, RoleState::Primary { .. }) {
            bail!("{} is already primary here", self.name);
        }
        let disk = self.disk();
        if disk != DiskState::UpToDate {
            bail!("the local disk is {}, not up to date", disk.as_str());
        }
        // The same generation, still marked as a crashed primary until the peers have the
        // activity log's extents.
        self.update_meta(|m| m.primary = true)?;
        let volume = self.new_volume();
        let (v, mp, volumes, latency, k, key_owned) = (
            volume.clone(),
            self.mountpoint.clone(),
            self.cfg.volumes.clone(),
            self.request_latency.clone(),
            keeper.clone(),
            key.to_string(),
        );
        let started = tokio::task::spawn_blocking(move || {
            let taken = k.take(&key_owned)?;
            // No agent until the holder saw this one attach, then this agent's start-up
            // and the takeover itself.
            let agentless = taken.agentless;
            let attached_at = k.attached_at();
            let (frontend, replayed) = FuseLoop::resume(v, &mp, &volumes, latency, k, taken)?;
            Ok::<_, anyhow::Error>((frontend, replayed, agentless + attached_at.elapsed()))
        })
        .await?;
        let (frontend, replayed, paused) = match started {
            Ok(s) => s,
            Err(e) => {
                self.update_meta(|m| m.primary = false)?;
                return Err(e);
            }
        };
        let frontend: Box<dyn Frontend> = Box::new(frontend);
        let device = self.become_primary(&mut role, volume, frontend);
        let status = TakeoverStatus {
            paused_ms: paused.as_millis() as u64,
            resent: replayed.resent as u64,
            waited: replayed.pending as u64,
            at_ms: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64),
        };
        *self.takeover.lock().unwrap() = Some(status);
        drop(role);
        self.publish();
        info!(resource = %self.name, device = %device, paused_ms = status.paused_ms, resent = status.resent,
              waited = status.waited, "took the primary's device over from the previous agent");
        self.emit(|r| crate::events::Record::takeover(r, &device, status));
        for p in self.peer_names() {
            self.handle(&p, Event::Promoted);
        }
        self.start_al_cooling();
        Ok(status)
    }

    /// Whether this resource is primary here on a device the descriptor holder keeps.
    pub async fn device_held(&self) -> bool {
        match &*self.role.lock().await {
            RoleState::Primary { frontend, .. } => frontend.held(),
            RoleState::Secondary => false,
        }
    }

    /// The takeover this agent made, if any.
    pub fn takeover_status(&self) -> Option<TakeoverStatus> {
        *self.takeover.lock().unwrap()
    }
}
