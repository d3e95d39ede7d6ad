//! How application I/O reaches the engine. The loop-over-FUSE frontend is the one every
//! Linux kernel here has; others (an NBD export, ublk) implement [`Frontend`] the same way.

pub mod fuse;
pub mod loopdev;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tandem_replicator::Volume;
use tracing::{info, warn};

/// A running frontend exposing the primary's volume as a block device.
pub trait Frontend: Send + Sync {
    /// The block device path applications use.
    fn device(&self) -> &str;
    /// Whether the device is open (e.g. mounted).
    fn in_use(&self) -> bool;
    /// Removes the device and stops serving. Refuses while the device is in use. On
    /// return no request is in flight from this frontend.
    fn stop(self: Box<Self>) -> Result<(), (Box<Self>, anyhow::Error)>;
}

/// Threads reading FUSE requests.
const FUSE_THREADS: usize = 8;

/// FUSE file + loop device.
pub struct FuseLoop {
    session: Option<::fuser::BackgroundSession>,
    mountpoint: PathBuf,
    device: String,
}

fn is_mountpoint(p: &Path) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let Some(want) = p.to_str() else { return false };
    info.lines().any(|l| l.split(' ').nth(4) == Some(want))
}

/// Removes what a killed agent left at `mountpoint`: loop devices on its image, then the
/// dead FUSE mount itself (lazily, so a filesystem still mounted on such a loop device does
/// not block us; that filesystem gets I/O errors until the admin unmounts it).
pub fn clean_stale(mountpoint: &Path) -> Result<()> {
    let image = mountpoint.join(fuse::IMAGE_NAME);
    if !is_mountpoint(mountpoint) {
        return Ok(());
    }
    for dev in loopdev::attached_to(&image) {
        warn!(device = %dev, "detaching loop device left by a previous agent");
        let _ = std::process::Command::new("losetup").args(["-d", &dev]).status();
    }
    warn!(mountpoint = %mountpoint.display(), "removing FUSE mount left by a previous agent");
    nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH)
        .with_context(|| format!("cannot unmount stale {}", mountpoint.display()))?;
    Ok(())
}

impl FuseLoop {
    pub fn start(volume: Arc<Volume>, mountpoint: &Path) -> Result<Self> {
        std::fs::create_dir_all(mountpoint)
            .with_context(|| format!("cannot create {}", mountpoint.display()))?;
        clean_stale(mountpoint)?;
        let mut cfg = ::fuser::Config::default();
        cfg.mount_options = vec![
            ::fuser::MountOption::FSName("tandem".into()),
            ::fuser::MountOption::Subtype("tandem".into()),
            ::fuser::MountOption::NoExec,
            ::fuser::MountOption::NoSuid,
            ::fuser::MountOption::NoDev,
        ];
        // Each thread performs its request's local I/O itself, so enough threads are needed
        // to keep a deep queue busy; idle ones cost nothing but a stack.
        cfg.n_threads = Some(FUSE_THREADS);
        cfg.clone_fd = true;
        let fs = fuse::ImageFs::new(volume);
        let session = ::fuser::spawn_mount(fs, mountpoint, &cfg).with_context(|| {
            format!("cannot mount FUSE at {} (is /dev/fuse available?)", mountpoint.display())
        })?;
        let image = mountpoint.join(fuse::IMAGE_NAME);
        let device = match loopdev::attach(&image) {
            Ok(d) => d,
            Err(e) => {
                let _ = session.umount_and_join();
                return Err(e);
            }
        };
        info!(device = %device, "frontend up");
        Ok(Self { session: Some(session), mountpoint: mountpoint.to_path_buf(), device })
    }
}

impl Frontend for FuseLoop {
    fn device(&self) -> &str {
        &self.device
    }

    fn in_use(&self) -> bool {
        loopdev::in_use(&self.device)
    }

    fn stop(mut self: Box<Self>) -> Result<(), (Box<Self>, anyhow::Error)> {
        if let Err(e) = loopdev::detach(&self.device) {
            return Err((self, e));
        }
        // The loop driver lets go of the FUSE file asynchronously: wait for that, then
        // unmount; if it still will not go, detach lazily rather than hang.
        let image = self.mountpoint.join(fuse::IMAGE_NAME);
        for _ in 0..100 {
            if loopdev::attached_to(&image).is_empty() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let session = self.session.take().expect("session present until stop");
        if let Err(e) = session.umount_and_join() {
            warn!("FUSE unmount of {} failed ({e}); detaching lazily", self.mountpoint.display());
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
        }
        info!(device = %self.device, "frontend down");
        Ok(())
    }
}

impl Drop for FuseLoop {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            // Dropped without stop(): best effort, never leave a mount behind.
            let _ = loopdev::detach(&self.device);
            let _ = s.umount_and_join();
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
