//! Mounting a FUSE filesystem ourselves: open `/dev/fuse`, `mount(2)` with the fd in the
//! options (what fusermount does for unprivileged users; the agent is root, so no helper),
//! and unmount with `umount2`, lazily if the mount is busy.
//!
//! The mount belongs to root (`user_id=0,group_id=0`) and no `allow_other` is needed: the
//! loop driver reaches the files with the credentials of the root `losetup` that opened
//! them and of its kernel workers, which pass FUSE's owner check.

use std::fs::OpenOptions;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

/// Why a mount or unmount failed.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error("cannot open /dev/fuse: {0} (is the fuse module loaded? modprobe fuse)")]
    OpenDevice(std::io::Error),
    #[error("mount of FUSE at {mountpoint} failed: {errno} (is the agent root, and the directory not a mount already?)")]
    Mount { mountpoint: PathBuf, errno: nix::errno::Errno },
    #[error("unmount of {mountpoint} failed: {errno}")]
    Unmount { mountpoint: PathBuf, errno: nix::errno::Errno },
}

/// What to mount.
#[derive(Clone, Debug)]
pub struct MountOptions {
    /// Shown as the mount's source (`/proc/mounts` first column).
    pub fsname: String,
    /// The filesystem type becomes `fuse.<subtype>`.
    pub subtype: Option<String>,
    pub read_only: bool,
}

/// Opens `/dev/fuse` and mounts it at `mountpoint`; the returned fd is the connection's
/// first device (requests are read from it, INIT first).
pub fn mount(mountpoint: &Path, opts: &MountOptions) -> Result<OwnedFd, MountError> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")
        .map_err(MountError::OpenDevice)?;
    let fd = OwnedFd::from(dev);
    let data = format!("fd={},rootmode=40000,user_id=0,group_id=0", fd.as_raw_fd());
    let fstype = match &opts.subtype {
        Some(s) => format!("fuse.{s}"),
        None => "fuse".to_string(),
    };
    let mut flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    if opts.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(
        Some(opts.fsname.as_str()),
        mountpoint,
        Some(fstype.as_str()),
        flags,
        Some(data.as_str()),
    )
    .map_err(|errno| MountError::Mount { mountpoint: mountpoint.to_path_buf(), errno })?;
    Ok(fd)
}

/// How an unmount went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unmounted {
    /// Gone; the connection ends (reads return ENODEV).
    Fully,
    /// Busy, so detached lazily: the connection lives until the last user lets go.
    Lazily,
}

/// Unmounts `mountpoint`: plainly, or lazily when the mount is busy.
pub fn unmount(mountpoint: &Path) -> Result<Unmounted, MountError> {
    match nix::mount::umount2(mountpoint, MntFlags::empty()) {
        Ok(()) => Ok(Unmounted::Fully),
        Err(nix::errno::Errno::EBUSY) => {
            nix::mount::umount2(mountpoint, MntFlags::MNT_DETACH)
                .map_err(|errno| MountError::Unmount { mountpoint: mountpoint.to_path_buf(), errno })?;
            Ok(Unmounted::Lazily)
        }
        Err(errno) => Err(MountError::Unmount { mountpoint: mountpoint.to_path_buf(), errno }),
    }
}

/// Where the FUSE control filesystem shows each connection (`N/abort`, `N/waiting`).
pub const FUSECTL: &str = "/sys/fs/fuse/connections";

/// Mounts the FUSE control filesystem at [`FUSECTL`] if nothing is mounted there (init
/// systems mount it at boot; a bare container may not have). Best effort.
pub fn ensure_fusectl() {
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .is_ok_and(|info| info.lines().any(|l| l.split(' ').nth(4) == Some(FUSECTL)));
    if !mounted {
        let _ = nix::mount::mount(Some("fusectl"), FUSECTL, Some("fusectl"), MsFlags::empty(), None::<&str>);
    }
}

/// Aborts FUSE connection `id` (its number in [`FUSECTL`], the mount's device minor): every
/// request waiting fails, the server's reads return.
pub fn abort_connection(id: u64) -> std::io::Result<()> {
    ensure_fusectl();
    std::fs::write(format!("{FUSECTL}/{id}/abort"), "1")
}
