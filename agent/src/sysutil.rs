//! Process settings a daemon serving a block device under a mounted filesystem needs.

use tracing::warn;

/// PR_SET_IO_FLUSHER (Linux 5.6+); libc only defines it for Android.
const PR_SET_IO_FLUSHER: libc::c_int = 57;

/// Avoids the reclaim deadlock of a userspace block device: when the kernel needs memory it
/// may write dirty pages to our device, which needs us to make progress. IO_FLUSHER makes our
/// allocations avoid recursing into I/O; mlockall keeps our own pages from being paged out.
/// Must run before any thread is spawned (the flag is per thread and inherited).
pub fn harden_for_block_io() {
    // SAFETY: plain prctl/mlockall syscalls with constant arguments.
    unsafe {
        if libc::prctl(PR_SET_IO_FLUSHER, 1, 0, 0, 0) != 0 {
            warn!(
                "prctl(PR_SET_IO_FLUSHER) failed ({}): needs CAP_SYS_RESOURCE; under memory pressure \
                 writeback to the device could stall on this daemon",
                std::io::Error::last_os_error()
            );
        }
        if libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) != 0 {
            warn!("mlockall failed: {}", std::io::Error::last_os_error());
        }
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no failure modes.
    unsafe { libc::geteuid() == 0 }
}
