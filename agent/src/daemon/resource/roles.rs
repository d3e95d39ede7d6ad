//! Promotion and demotion.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Result};
use tandem_replicator::{PeerConfig, PeerHandle, Volume};
use tracing::{error, info, warn};

use super::sync::rotate_generation;
use super::{device_links, Resource, RoleState};
use crate::daemon::hooks::HookEvent;
use tandem_replicator::relation::{Event, Phase};

/// How long a planned restart waits for the requests already admitted to complete.
const HANDOVER_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// How often idle extents leave the activity log while primary.
const AL_COOL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);
use crate::frontend::{Frontend, FuseLoop};
use crate::meta::DiskState;

impl Resource {
    pub async fn promote(self: &Arc<Self>, force: bool) -> Result<String> {
        let mut role = self.role.lock().await;
        if matches!(*role, RoleState::Primary { .. }) {
            return Ok(format!("{} is already primary here", self.name));
        }
        if self.is_down() {
            bail!(
                "refusing to promote {}: it is down on {} (`tandem up {}` first)",
                self.name,
                self.me,
                self.name
            );
        }
        let primary_peer =
            self.peers.lock().unwrap().iter().find_map(|(n, p)| p.rel.remote_primary().then(|| n.clone()));
        if let Some(n) = primary_peer {
            bail!("refusing to promote {}: peer {n} is primary (demote it first)", self.name);
        }
        let disk = self.disk();
        if disk != DiskState::UpToDate && !force {
            bail!(
                "refusing to promote {}: the local disk is {} (it may lack writes the last primary made); \
                 use --force only if you know this copy is the one to keep",
                self.name,
                disk.as_str()
            );
        }
        self.fence_unreachable_peers().await?;
        if disk != DiskState::UpToDate {
            warn!(resource = %self.name, "forced promotion of a {} disk: every peer will need a full resync", disk.as_str());
            for bm in self.bitmaps.values() {
                bm.lock().unwrap().set_all();
            }
            self.persist_bitmaps();
        }
        // A new generation for the data we are about to write. Peers connected and in sync
        // follow it; for the others the old one becomes their bitmap ID.
        let in_sync: Vec<String> = self
            .peers
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p)| p.rel.is_up() && p.rel.phase == Phase::InSync)
            .map(|(n, _)| n.clone())
            .collect();
        let peers: Vec<String> = self.bitmaps.keys().cloned().collect();
        self.update_meta(|m| {
            let old = rotate_generation(m);
            for p in peers.iter().filter(|p| !in_sync.contains(p)) {
                let pm = m.peer_mut(p);
                // A forced promotion of a copy that is not up to date has marked everything
                // for every peer: it names no generation the peers could share.
                if pm.bitmap_uuid == 0 && disk == DiskState::UpToDate {
                    pm.bitmap_uuid = old;
                }
            }
            m.primary = true;
            m.disk = DiskState::UpToDate;
        })?;
        let volume = self.new_volume();
        let (v, mp) = (volume.clone(), self.mountpoint.clone());
        let volumes = self.cfg.volumes.clone();
        let latency = self.request_latency.clone();
        let keeper = self.keeper.clone();
        let frontend: Box<dyn Frontend> =
            match tokio::task::spawn_blocking(move || FuseLoop::start(v, &mp, &volumes, latency, keeper))
                .await?
            {
                Ok(f) => Box::new(f),
                Err(e) => {
                    self.update_meta(|m| m.primary = false)?;
                    return Err(e.context(format!("cannot start the device for {}", self.name)));
                }
            };
        let device = self.become_primary(&mut role, volume, frontend);
        drop(role);
        self.publish();
        info!(resource = %self.name, device = %device, "promoted to primary");
        let mut ctx = self.hook_ctx(None);
        ctx.extra.push(("TANDEM_DEVICE", device.clone()));
        self.hooks.fire(HookEvent::RoleChange, ctx);
        // Peers in session learn the new role; those in sync get the replication stream.
        for p in self.peer_names() {
            self.handle(&p, Event::Promoted);
        }
        self.start_al_cooling();
        let devices = self.devices.lock().unwrap().clone();
        Ok(if devices.len() == 1 {
            format!("{} is primary on {}; device {device}", self.name, self.me)
        } else {
            let list: Vec<String> = devices.iter().map(|(v, d)| format!("{v} {d}")).collect();
            format!("{} is primary on {}; devices: {}", self.name, self.me, list.join(", "))
        })
    }

    /// The engine's volume for a primary: every peer's mode, bitmap and backlog, the
    /// activity log, and the change stream continuing from where it stands.
    pub(super) fn new_volume(&self) -> Arc<Volume> {
        let peer_cfgs = self
            .bitmaps
            .iter()
            .map(|(n, bm)| {
                let link = self.cfg.link_to(n);
                PeerConfig {
                    name: n.clone(),
                    mode: link.mode,
                    bitmap: bm.clone(),
                    backlog: link.backlog,
                    ack_latency: self.ack_latency[n].clone(),
                }
            })
            .collect();
        Volume::with_activity_log(
            self.store.clone(),
            peer_cfgs,
            self.seq.load(Ordering::SeqCst),
            self.cfg.timeout,
            (!self.bitmaps.is_empty()).then(|| self.al.clone()),
            self.volume_stats.clone(),
        )
    }

    /// Records the role as primary on `frontend`'s devices; returns the first device.
    pub(super) fn become_primary(
        &self,
        role: &mut RoleState,
        volume: Arc<Volume>,
        frontend: Box<dyn Frontend>,
    ) -> String {
        let device = frontend.device().to_string();
        *self.devices.lock().unwrap() = frontend.devices().to_vec();
        self.link_devices(frontend.devices());
        *self.current.lock().unwrap() = Some((volume.clone(), device.clone()));
        *role = RoleState::Primary { volume, frontend };
        device
    }

    /// While primary: every [`AL_COOL_INTERVAL`], extents idle for a whole interval leave
    /// the activity log, so a crash resyncs the recent working set only.
    pub(super) fn start_al_cooling(self: &Arc<Self>) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(AL_COOL_INTERVAL).await;
                let Some(r) = me.upgrade() else { return };
                if !r.is_primary() {
                    return;
                }
                let al = r.al.clone();
                match tokio::task::spawn_blocking(move || al.cool()).await {
                    Ok(Ok(n)) if n > 0 => {
                        tracing::debug!(resource = %r.name, extents = n, "idle extents left the activity log")
                    }
                    Ok(Err(e)) => warn!(resource = %r.name, "cannot update the activity log: {e}"),
                    _ => {}
                }
            }
        });
    }

    /// Runs the `fence-peer` handler for every peer that is not connected: it must make sure
    /// that peer is not (and will not become) primary — power it off, cut it from storage,
    /// or confirm it is down. A non-zero exit, or a handler that cannot run, refuses the
    /// promotion. Without a handler, promotion relies on the disk-state rules alone.
    async fn fence_unreachable_peers(&self) -> Result<()> {
        if !self.hooks.configured(HookEvent::FencePeer) {
            return Ok(());
        }
        let unreachable: Vec<String> = self
            .peers
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, p)| !p.rel.is_up())
            .map(|(n, _)| n.clone())
            .collect();
        for peer in unreachable {
            info!(resource = %self.name, peer = %peer, "peer unreachable: running the fence-peer handler before promotion");
            match self.hooks.run(HookEvent::FencePeer, &self.hook_ctx(Some(&peer))).await {
                Ok(Some(0)) | Ok(None) => {
                    info!(resource = %self.name, peer = %peer, "fence-peer handler succeeded")
                }
                Ok(Some(code)) => bail!(
                    "refusing to promote {}: the fence-peer handler for {peer} exited with {code} \
                     (the peer could not be fenced; it may still be primary)",
                    self.name
                ),
                Err(e) => bail!("refusing to promote {}: {e:#}", self.name),
            }
        }
        Ok(())
    }

    pub async fn demote(self: &Arc<Self>) -> Result<String> {
        let mut role = self.role.lock().await;
        let RoleState::Primary { volume, frontend } = std::mem::replace(&mut *role, RoleState::Secondary)
        else {
            return Ok(format!("{} is already secondary here", self.name));
        };
        let device = frontend.device().to_string();
        self.unlink_devices();
        let (frontend, stopped) = tokio::task::spawn_blocking(move || {
            let mut frontend = frontend;
            let r = frontend.stop();
            (frontend, r)
        })
        .await?;
        if let Err(e) = stopped {
            // Still primary: the stable paths stay what they were.
            self.link_devices(frontend.devices());
            *role = RoleState::Primary { volume, frontend };
            return Err(e.context(format!("cannot demote {}", self.name)));
        }
        self.release_primary(&volume).await;
        drop(role);
        self.publish();
        info!(resource = %self.name, device = %device, "demoted to secondary");
        for p in self.peer_names() {
            self.handle(&p, Event::Demoted);
        }
        self.fire(HookEvent::RoleChange, None);
        Ok(format!("{} is secondary on {}; device {device} removed", self.name, self.me))
    }

    /// After the device is gone: a last barrier so every peer holds everything, the
    /// sessions closed, and the metadata saying we are no longer primary.
    async fn release_primary(&self, volume: &Arc<Volume>) {
        self.unlink_devices();
        *self.current.lock().unwrap() = None;
        self.devices.lock().unwrap().clear();
        if let Err(e) = volume.submit_flush().await {
            warn!(resource = %self.name, "final flush failed: {e}");
        }
        let next_seq = self.end_sessions(volume, "primary demoted").await;
        if let Err(e) = self.update_meta(|m| {
            m.primary = false;
            m.next_seq = next_seq;
        }) {
            error!(resource = %self.name, "cannot record the demotion: {e:#}");
        }
    }

    /// Closes every replication session of `volume` (what a peer did not acknowledge is
    /// marked in its bitmap), records where the change stream stands and persists the
    /// bitmaps; returns the stream's next sequence number.
    async fn end_sessions(&self, volume: &Arc<Volume>, reason: &str) -> u64 {
        let sessions: Vec<PeerHandle> =
            self.peers.lock().unwrap().values_mut().filter_map(|p| p.session.take()).collect();
        for s in &sessions {
            s.close(reason);
        }
        for s in &sessions {
            s.closed().await;
        }
        let next_seq = volume.next_seq();
        self.seq.store(next_seq, Ordering::SeqCst);
        self.persist_bitmaps();
        next_seq
    }

    /// The stable device paths (`device_links`) for `devices`. A failure is logged, not
    /// fatal: the device itself is up, only its stable name is missing.
    fn link_devices(&self, devices: &[(String, String)]) {
        if let Err(e) = device_links::create(&self.device_dir, &self.name, devices) {
            error!(resource = %self.name, "cannot create the stable device path: {e:#}");
        }
    }

    fn unlink_devices(&self) {
        if let Err(e) = device_links::remove(&self.device_dir, &self.name) {
            error!(resource = %self.name, "cannot remove the stable device path: {e:#}");
        }
    }

    /// `tandem down`: takes the resource out of service on this node — demoted if primary
    /// (refused while its device is in use), no replication with any peer, no promotion —
    /// until [`Resource::up`]. The connections stay: other resources go on using them.
    /// What a primary peer writes meanwhile is tracked in its bitmap, so `up` resyncs the
    /// difference only.
    ///
    /// The relations see the same `AdminDisconnect` as `tandem disconnect`: towards a peer
    /// the two are the same (this node withdraws the resource and offers it no more). What
    /// `down` adds is local: the demotion first, and the refusal of promotion after.
    pub async fn down(self: &Arc<Self>) -> Result<String> {
        // Set first, so no promotion slips in between the demotion and the disconnect.
        let was_down = self.down.swap(true, Ordering::SeqCst);
        self.publish();
        if self.is_primary() {
            if let Err(e) = self.demote().await {
                self.down.store(was_down, Ordering::SeqCst);
                self.publish();
                return Err(e.context(format!("{} stays up on {}", self.name, self.me)));
            }
        }
        for peer in self.peer_names() {
            self.handle(&peer, Event::AdminDisconnect);
        }
        self.persist_bitmaps();
        info!(resource = %self.name, "down: out of service on this node");
        Ok(format!("{} is down on {}; `tandem up {}` resumes", self.name, self.me, self.name))
    }

    /// `tandem up`: back in service after `down` (or `disconnect`): secondary, offering the
    /// resource to every peer again.
    pub fn up(self: &Arc<Self>) -> String {
        self.down.store(false, Ordering::SeqCst);
        self.publish();
        for peer in self.peer_names() {
            self.handle(&peer, Event::AdminConnect);
        }
        info!(resource = %self.name, "up: in service on this node");
        format!("{} is up on {} (secondary) and connects to its peers", self.name, self.me)
    }

    /// Agent shutdown. For a restart, a primary whose connection the holder keeps is handed
    /// over to the next agent ([`Resource::hand_over`]). For a stop: demote if possible; if
    /// the device is in use, hand it over if the holder keeps it (the next agent takes it
    /// over within the grace time), else tear it down anyway (the filesystem on it will see
    /// I/O errors) after making peers durable.
    pub async fn shutdown(self: &Arc<Self>, restarting: bool) {
        if restarting && self.hand_over().await {
            return;
        }
        if self.is_primary() {
            match self.demote().await {
                Err(e) if self.hand_over().await => {
                    warn!(resource = %self.name, "stopping while primary and in use ({e:#}): the device waits for the next agent");
                }
                Ok(m) => info!("{m}"),
                Err(e) => {
                    error!(resource = %self.name, "shutting down while primary and in use: {e:#}");
                    let mut role = self.role.lock().await;
                    if let RoleState::Primary { volume, frontend } =
                        std::mem::replace(&mut *role, RoleState::Secondary)
                    {
                        // Detaches the loop device (lazily if open) and unmounts FUSE.
                        drop(frontend);
                        self.release_primary(&volume).await;
                    }
                    drop(role);
                    self.publish();
                }
            }
        }
        let me = self.clone();
        let _ = tokio::task::spawn_blocking(move || me.snapshot_shutdown()).await;
        self.persist_bitmaps();
    }

    /// A planned restart of a primary on a held device: new requests are left for the next
    /// agent, what was admitted drains, a last barrier makes every peer durable (what a
    /// peer lacks is in its bitmap once its session is closed), and the activity log is
    /// recorded empty — so the next agent takes the device over with nothing to resync.
    /// If the drain does not finish, the device is left as after a crash (the next agent
    /// replays the activity log). Returns whether the device was left to the holder.
    async fn hand_over(&self) -> bool {
        let mut role = self.role.lock().await;
        let RoleState::Primary { volume, frontend } = &mut *role else { return false };
        if !frontend.begin_handover() {
            return false;
        }
        let volume = volume.clone();
        let deadline = std::time::Instant::now() + HANDOVER_DRAIN;
        let drained = |f: &dyn Frontend| f.handover_drained() && volume.inflight() == 0;
        while !drained(frontend.as_ref()) && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        let mut clean = drained(frontend.as_ref());
        if clean {
            if let Err(e) = volume.submit_flush().await {
                warn!(resource = %self.name, "last barrier before the restart failed: {e}");
                clean = false;
            }
        } else {
            warn!(resource = %self.name, in_flight = volume.inflight(), "requests still in flight after {HANDOVER_DRAIN:?}: the next agent recovers from the activity log");
        }
        let next_seq = self.end_sessions(&volume, "agent restarting").await;
        if clean {
            let emptied = self.meta.lock().unwrap().store_al(&[]);
            let recorded = emptied
                .map_err(anyhow::Error::from)
                .and_then(|()| self.update_meta(|m| m.next_seq = next_seq));
            if let Err(e) = recorded {
                error!(resource = %self.name, "cannot record the clean handover: {e:#}");
            }
        }
        frontend.leave_for_takeover();
        info!(resource = %self.name, clean, "device handed over to the next agent");
        true
    }
}
