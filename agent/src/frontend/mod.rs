//! How application I/O reaches the engine. The loop-over-FUSE frontend is the one every
//! Linux kernel here has; others (an NBD export, ublk) implement [`Frontend`] the same way.

pub mod fuse;
pub mod fuse_kernel;
pub mod loopdev;
pub mod snapshot_fs;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tandem_replicator::{LatencyHistogram, Volume};

use crate::holder::keeper::Keeper;
use crate::volume_set::VolumeLayout;
use tracing::{error, info, warn};

/// A running frontend exposing the primary's volume as block devices. Used as a trait
/// object (`Box<dyn Frontend>`), so a resource can be exported by other frontends (an NBD
/// export, a snapshot's read-only device) without the resource knowing which.
pub trait Frontend: Send + Sync {
    /// The block device of each volume, by volume name (one unnamed volume unless the
    /// resource is a volume group).
    fn devices(&self) -> &[(String, String)];
    /// The first volume's device.
    fn device(&self) -> &str {
        &self.devices()[0].1
    }
    /// Whether any device is open (e.g. mounted).
    fn in_use(&self) -> bool;
    /// Removes the devices and stops serving. Refuses while a device is in use, leaving
    /// the frontend as it was (still serving). On `Ok` no request is in flight from this
    /// frontend and it serves nothing more.
    fn stop(&mut self) -> Result<()>;
    /// The agent is going away (a restart, or a stop while the device is in use): if the
    /// descriptor holder keeps this frontend's connection, leave everything in place for
    /// the next agent — dropping the frontend then tears nothing down — and say so.
    /// Requests not answered before this process ends are resent to the next agent.
    fn leave_for_takeover(&mut self) -> bool {
        false
    }
    /// Whether the descriptor holder keeps this frontend's connection (so the device
    /// survives this agent).
    fn held(&self) -> bool {
        false
    }
    /// The agent hands the connection to its successor (a planned restart): from now on
    /// I/O requests are left unanswered for it (the kernel resends them), so the engine
    /// can drain. Only for a held frontend; returns whether it did.
    fn begin_handover(&self) -> bool {
        false
    }
    /// After [`Frontend::begin_handover`]: no request is still on its way into the engine.
    fn handover_drained(&self) -> bool {
        true
    }
}

/// What the holder keeps beside a live frontend's connection, for the agent that takes it
/// over: the INIT parameters (INIT comes once per connection) and the loop devices.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HeldFrontend {
    /// Bumped when a field changes meaning; an agent refuses a state of another format.
    pub format: u32,
    pub params: fuse_kernel::InitParams,
    /// (volume name, loop device), as [`Frontend::devices`].
    pub devices: Vec<(String, String)>,
}

impl HeldFrontend {
    pub const FORMAT: u32 = 1;
}

/// How long the application's requests take, as the frontend sees them: from the request
/// reaching the frontend to its reply (local I/O and every ack the peers' modes need).
/// Kept by the resource across promotions; the metrics export it.
#[derive(Debug, Default)]
pub struct RequestLatency {
    pub write: LatencyHistogram,
    pub flush: LatencyHistogram,
}

/// Threads reading FUSE requests.
const FUSE_THREADS: usize = 8;

/// FUSE files + loop devices.
pub struct FuseLoop {
    session: Option<fuse_kernel::Session>,
    mountpoint: PathBuf,
    /// (volume name, loop device)
    devices: Vec<(String, String)>,
    /// Keeps the connection while no agent runs, if the node has a holder.
    keeper: Option<Arc<Keeper>>,
    /// Left to the holder for the next agent: nothing is torn down.
    left: bool,
    /// Closed for a planned restart (see [`fuse::HandoverGate`]).
    gate: Arc<fuse::HandoverGate>,
}

fn is_mountpoint(p: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let Some(want) = p.to_str() else { return false };
    info.lines().any(|l| l.split(' ').nth(4) == Some(want))
}

/// Removes what a killed agent left at `mountpoint`: loop devices on its files, then the
/// dead FUSE mount itself (lazily, so a filesystem still mounted on such a loop device does
/// not block us; that filesystem gets I/O errors until the admin unmounts it).
pub fn clean_stale(mountpoint: &Path) -> Result<()> {
    if !is_mountpoint(mountpoint) {
        return Ok(());
    }
    for dev in loopdev::attached_under(mountpoint) {
        warn!(device = %dev, "detaching loop device left by a previous agent");
        let _ = std::process::Command::new("losetup").args(["-d", &dev]).status();
    }
    warn!(mountpoint = %mountpoint.display(), "removing FUSE mount left by a previous agent");
    nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH)
        .with_context(|| format!("cannot unmount stale {}", mountpoint.display()))?;
    Ok(())
}

impl FuseLoop {
    /// Mounts the FUSE files of `volumes` at `mountpoint` and attaches a loop device to each;
    /// then, with a `keeper`, has the holder keep the connection.
    pub fn start(
        volume: Arc<Volume>,
        mountpoint: &Path,
        volumes: &[VolumeLayout],
        latency: Arc<RequestLatency>,
        keeper: Option<Arc<Keeper>>,
    ) -> Result<Self> {
        std::fs::create_dir_all(mountpoint)
            .with_context(|| format!("cannot create {}", mountpoint.display()))?;
        clean_stale(mountpoint)?;
        let opts = fuse_kernel::mount::MountOptions {
            fsname: "tandem".into(),
            subtype: Some("tandem".into()),
            read_only: false,
        };
        let gate = Arc::new(fuse::HandoverGate::default());
        let fs = fuse::ImageFs::new(volume, volumes.to_vec(), latency, gate.clone());
        // Each thread performs its request's local I/O itself, so enough threads are needed
        // to keep a deep queue busy; idle ones cost nothing but a stack.
        let session = serve(mountpoint, &opts, &fuse::ImageFs::init_wanted(), fs, FUSE_THREADS, "fuse")?;
        let mut me = Self {
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
            devices: Vec::new(),
            keeper: None,
            left: false,
            gate,
        };
        for v in volumes {
            // On an error `me` is dropped: the devices attached so far are detached and the
            // FUSE mount removed.
            let dev = loopdev::attach(&mountpoint.join(fuse::file_name(v)))?;
            info!(device = %dev, volume = %v.name, "frontend up");
            me.devices.push((v.name.clone(), dev));
        }
        if let Some(k) = keeper {
            // Without the holder the device works; only a takeover is impossible.
            match me.hold(&k) {
                Ok(()) => me.keeper = Some(k),
                Err(e) => error!(
                    mountpoint = %mountpoint.display(),
                    "{e:#}: the device will fail if this agent stops while it is in use"
                ),
            }
        }
        Ok(me)
    }

    fn key(&self) -> String {
        self.mountpoint.display().to_string()
    }

    fn hold(&self, keeper: &Keeper) -> Result<()> {
        let session = self.session.as_ref().context("no FUSE session")?;
        let state = HeldFrontend {
            format: HeldFrontend::FORMAT,
            params: *session.params(),
            devices: self.devices.clone(),
        };
        let fds: Vec<_> = session.devices().iter().map(|d| std::os::fd::AsFd::as_fd(&**d)).collect();
        keeper.hold(&self.key(), &fds, &serde_json::to_vec(&state)?)
    }

    /// Serves the connection a previous agent left with the holder (`taken`), on the same
    /// mount and loop devices: answers what waits (see [`fuse_kernel::Session::resume`]) and
    /// starts the workers. On an error the connection is not served; the caller releases it.
    pub fn resume(
        volume: Arc<Volume>,
        mountpoint: &Path,
        volumes: &[VolumeLayout],
        latency: Arc<RequestLatency>,
        keeper: Arc<Keeper>,
        taken: crate::holder::client::Taken,
    ) -> Result<(Self, fuse_kernel::session::Replayed)> {
        let held: HeldFrontend = serde_json::from_slice(&taken.state)
            .context("the state held beside the FUSE connection does not parse")?;
        if held.format != HeldFrontend::FORMAT {
            bail!(
                "the FUSE connection was held in format {} by another version of tandem; this one reads {}",
                held.format,
                HeldFrontend::FORMAT
            );
        }
        let want: Vec<&str> = volumes.iter().map(|v| v.name.as_str()).collect();
        let have: Vec<&str> = held.devices.iter().map(|(v, _)| v.as_str()).collect();
        if want != have {
            bail!("the held connection serves volumes {have:?}, the configuration {want:?}");
        }
        // Not `losetup -j` (it stats the FUSE file, which nobody serves yet): the loop
        // driver's own record of its backing files.
        let attached = loopdev::attached_under(mountpoint);
        if let Some((_, d)) = held.devices.iter().find(|(_, d)| !attached.contains(d)) {
            bail!("loop device {d} is no longer attached to {}", mountpoint.display());
        }
        let devices = taken.fds.into_iter().map(fuse_kernel::connection::Device::new).collect();
        let gate = Arc::new(fuse::HandoverGate::default());
        let fs = fuse::ImageFs::new(volume, volumes.to_vec(), latency, gate.clone());
        let (session, replayed) = fuse_kernel::Session::resume(devices, held.params, mountpoint, fs, "fuse")
            .with_context(|| format!("cannot take over the FUSE connection at {}", mountpoint.display()))?;
        for (v, d) in &held.devices {
            info!(device = %d, volume = %v, resent = replayed.resent, "frontend taken over");
        }
        let me = Self {
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
            devices: held.devices,
            keeper: Some(keeper),
            left: false,
            gate,
        };
        Ok((me, replayed))
    }

    /// The holder no longer needs to keep this connection (it was unmounted).
    fn release(&mut self) {
        if let Some(k) = self.keeper.take() {
            if let Err(e) = k.forget(&self.key()) {
                warn!("{e:#}");
            }
        }
    }
}

impl Frontend for FuseLoop {
    fn devices(&self) -> &[(String, String)] {
        &self.devices
    }

    fn in_use(&self) -> bool {
        self.devices.iter().any(|(_, d)| loopdev::in_use(d))
    }

    fn stop(&mut self) -> Result<()> {
        stop_serving(&mut self.devices, &mut self.session, &self.mountpoint)?;
        self.release();
        info!(mountpoint = %self.mountpoint.display(), "frontend down");
        Ok(())
    }

    fn held(&self) -> bool {
        self.keeper.is_some() && self.session.is_some()
    }

    fn begin_handover(&self) -> bool {
        if self.held() {
            self.gate.close();
        }
        self.held()
    }

    fn handover_drained(&self) -> bool {
        self.gate.drained()
    }

    fn leave_for_takeover(&mut self) -> bool {
        if self.held() {
            self.left = true;
            info!(mountpoint = %self.mountpoint.display(), "frontend left to the descriptor holder for the next agent");
        }
        self.left
    }
}

impl Drop for FuseLoop {
    fn drop(&mut self) {
        if self.left {
            // The workers go on until the process ends; the holder keeps the connection.
            if let Some(s) = self.session.take() {
                std::mem::forget(s);
            }
            return;
        }
        drop_serving(&self.devices, &mut self.session);
        self.release();
    }
}

/// Detaches `devices` (loop devices over the FUSE files at `mountpoint`) and unmounts
/// `session`: refused, leaving everything as it was, while a device is in use. The loop
/// driver lets go of the FUSE files asynchronously: wait for that, then unmount; if it
/// still will not go, detach lazily rather than hang.
pub(crate) fn stop_serving(
    devices: &mut Vec<(String, String)>,
    session: &mut Option<fuse_kernel::Session>,
    mountpoint: &Path,
) -> Result<()> {
    if let Some((_, d)) = devices.iter().find(|(_, d)| loopdev::in_use(d)) {
        bail!("device {d} is in use (mounted or open); unmount it first");
    }
    while let Some((v, d)) = devices.pop() {
        if let Err(e) = loopdev::detach(&d) {
            devices.push((v, d));
            return Err(e);
        }
    }
    for _ in 0..100 {
        if loopdev::attached_under(mountpoint).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(mut session) = session.take() {
        match session.unmount_and_join() {
            Ok(fuse_kernel::mount::Unmounted::Fully) => {}
            Ok(fuse_kernel::mount::Unmounted::Lazily) => {
                warn!("FUSE mount {} was busy; detached lazily", mountpoint.display())
            }
            Err(e) => {
                warn!("{e}; detaching lazily");
                let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
            }
        }
    }
    Ok(())
}

/// Dropped without a stop: best effort, never leave a mount behind.
pub(crate) fn drop_serving(devices: &[(String, String)], session: &mut Option<fuse_kernel::Session>) {
    if let Some(mut s) = session.take() {
        for (_, d) in devices {
            let _ = loopdev::detach(d);
        }
        let _ = s.unmount_and_join();
    }
}

/// Mounts FUSE at `mountpoint`, answers its INIT with `wanted` and serves it with
/// `threads` workers. On an error after the mount, the mount is removed again.
pub(crate) fn serve<H: fuse_kernel::Handler>(
    mountpoint: &Path,
    opts: &fuse_kernel::mount::MountOptions,
    wanted: &fuse_kernel::InitWanted,
    handler: H,
    threads: usize,
    name: &str,
) -> Result<fuse_kernel::Session> {
    let fd = fuse_kernel::mount::mount(mountpoint, opts)?;
    let started = fuse_kernel::Connection::negotiate(fd, wanted)
        .and_then(|conn| fuse_kernel::Session::spawn(conn, mountpoint, handler, threads, name));
    match started {
        Ok(s) => Ok(s),
        Err(e) => {
            let _ = nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH);
            Err(anyhow::Error::new(e).context(format!("cannot serve FUSE at {}", mountpoint.display())))
        }
    }
}

/// Ensure the mountpoint is not a leftover; used when the agent starts.
pub fn prepare_mountpoint(p: &Path) -> Result<()> {
    if is_mountpoint(p) {
        clean_stale(p)?;
    }
    if is_mountpoint(p) {
        bail!("{} is still mounted", p.display());
    }
    Ok(())
}
