//! A snapshot as block devices: one FUSE file per volume serving the snapshot's view, and
//! a loop device on each (for fsck, a read-only mount, a backup tool). Replication goes on
//! while they are read: reads take the snapshot chain's reader path, which never blocks
//! the live copy for longer than one read.
//!
//! A snapshot is crash-consistent, so the filesystem on it usually still has a journal to
//! replay, which takes writes. By default the devices are read-only; with an overlay, writes
//! go to a throwaway sparse file (unlinked, gone at unexpose) and reads see them first — so
//! `mount -o ro` can replay the journal and show every file acknowledged before the
//! snapshot — while the snapshot itself never changes.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use nix::errno::Errno;
use tracing::{info, warn};

use super::fuse::{file_name, VolumeFiles};
use super::fuse_kernel::abi::{self, open_flags, FsyncIn, OpenIn, ReadIn, WriteIn};
use super::fuse_kernel::{mount, Handler, InitWanted, Reply, Session};
use super::{clean_stale, drop_serving, loopdev, stop_serving};
use crate::snapshot::SnapshotStore;
use crate::volume_set::VolumeLayout;

struct SnapshotFs {
    store: Arc<SnapshotStore>,
    name: String,
    files: VolumeFiles,
    overlay: Option<Overlay>,
}

/// Private writes over the snapshot's view, by 4 KiB block of the resource's address space.
struct Overlay {
    file: std::fs::File,
    written: std::sync::Mutex<std::collections::HashSet<u64>>,
}

const BLOCK: u64 = crate::snapshot::cow::BLOCK;

/// Threads serving an exposed snapshot (fsck, a backup: not the hot path).
const SNAPSHOT_THREADS: usize = 2;

/// INIT for an exposed snapshot: large requests, the kernel's default queue depth.
const SNAPSHOT_INIT: InitWanted = InitWanted {
    flags: abi::init_flags::ASYNC_READ
        | abi::init_flags::BIG_WRITES
        | abi::init_flags::MAX_PAGES
        | abi::init_flags::PARALLEL_DIROPS,
    max_write: 1 << 20,
    max_background: 16,
    congestion_threshold: 12,
};

impl SnapshotFs {
    /// `[at, +buf.len())` of the address space: the overlay's blocks, else the snapshot's.
    fn read_view(&self, at: u64, buf: &mut [u8]) -> Result<(), String> {
        self.store.read(&self.name, at, buf).map_err(|e| e.to_string())?;
        let Some(o) = &self.overlay else { return Ok(()) };
        let written = o.written.lock().unwrap();
        let end = at + buf.len() as u64;
        for b in at / BLOCK..end.div_ceil(BLOCK) {
            if !written.contains(&b) {
                continue;
            }
            let (from, to) = ((b * BLOCK).max(at), ((b + 1) * BLOCK).min(end));
            use std::os::unix::fs::FileExt;
            o.file
                .read_exact_at(&mut buf[(from - at) as usize..(to - at) as usize], from)
                .map_err(|e| format!("overlay read: {e}"))?;
        }
        Ok(())
    }

    fn write_overlay(&self, o: &Overlay, at: u64, data: &[u8]) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        let mut written = o.written.lock().unwrap();
        let end = at + data.len() as u64;
        // Blocks only partly written here start from what the device shows now.
        let mut block = vec![0u8; BLOCK as usize];
        for b in [at / BLOCK, (end - 1) / BLOCK] {
            let partial = (b * BLOCK < at || (b + 1) * BLOCK > end) && !written.contains(&b);
            if partial {
                self.store.read(&self.name, b * BLOCK, &mut block).map_err(|e| e.to_string())?;
                o.file.write_all_at(&block, b * BLOCK).map_err(|e| format!("overlay write: {e}"))?;
                written.insert(b);
            }
        }
        o.file.write_all_at(data, at).map_err(|e| format!("overlay write: {e}"))?;
        written.extend(at / BLOCK..end.div_ceil(BLOCK));
        Ok(())
    }
}

impl SnapshotFs {
    fn file(&self, ino: u64) -> Option<&VolumeLayout> {
        self.files.file(ino)
    }
}

impl Handler for SnapshotFs {
    fn lookup(&self, parent: u64, name: &OsStr, reply: Reply) {
        self.files.lookup(parent, name, reply)
    }

    fn getattr(&self, ino: u64, reply: Reply) {
        self.files.getattr(ino, reply)
    }

    fn open(&self, ino: u64, arg: &OpenIn, reply: Reply) {
        if self.file(ino).is_none() {
            return reply.error(Errno::EISDIR);
        }
        if arg.flags as i32 & libc::O_ACCMODE != libc::O_RDONLY && self.overlay.is_none() {
            return reply.error(Errno::EROFS);
        }
        reply.opened(1, open_flags::DIRECT_IO);
    }

    fn read(&self, ino: u64, arg: &ReadIn, reply: Reply) {
        let Some(f) = self.file(ino) else { return reply.error(Errno::ENOENT) };
        let len = u64::from(arg.size).min(f.size.saturating_sub(arg.offset)) as usize;
        let mut buf = vec![0u8; len];
        match self.read_view(f.offset + arg.offset, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(e) => {
                warn!(snapshot = %self.name, "read of exposed snapshot failed: {e}");
                reply.error(Errno::EIO)
            }
        }
    }

    fn write(&self, ino: u64, arg: &WriteIn, data: &[u8], reply: Reply) {
        let Some(o) = &self.overlay else { return reply.error(Errno::EROFS) };
        let Some(f) = self.file(ino) else { return reply.error(Errno::ENOENT) };
        if data.is_empty() || arg.offset.checked_add(data.len() as u64).is_none_or(|e| e > f.size) {
            return reply.error(Errno::EINVAL);
        }
        match self.write_overlay(o, f.offset + arg.offset, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => {
                warn!(snapshot = %self.name, "write to the overlay of an exposed snapshot failed: {e}");
                reply.error(Errno::EIO)
            }
        }
    }

    fn fsync(&self, _ino: u64, _arg: &FsyncIn, reply: Reply) {
        // The overlay is thrown away at unexpose: nothing to make durable.
        reply.ok();
    }

    fn readdir(&self, ino: u64, arg: &ReadIn, reply: Reply) {
        self.files.readdir(ino, arg, reply)
    }
}

/// An exposed snapshot: its FUSE files and read-only loop devices.
pub struct SnapshotExport {
    session: Option<Session>,
    mountpoint: PathBuf,
    /// (volume name, loop device)
    pub devices: Vec<(String, String)>,
}

impl SnapshotExport {
    /// Exposes snapshot `name`: read-only devices, or with `overlay_dir` devices whose
    /// writes go to a throwaway file created (and at once unlinked) there.
    pub fn start(
        store: Arc<SnapshotStore>,
        name: &str,
        mountpoint: &Path,
        volumes: &[VolumeLayout],
        overlay_dir: Option<&Path>,
    ) -> Result<Self> {
        std::fs::create_dir_all(mountpoint)
            .with_context(|| format!("cannot create {}", mountpoint.display()))?;
        clean_stale(mountpoint)?;
        let overlay = match overlay_dir {
            Some(dir) => Some(Overlay {
                file: tempfile::tempfile_in(dir)
                    .with_context(|| format!("cannot create the overlay file in {}", dir.display()))?,
                written: Default::default(),
            }),
            None => None,
        };
        let writable = overlay.is_some();
        let fs = SnapshotFs {
            store,
            name: name.to_string(),
            files: VolumeFiles::new(volumes.to_vec(), writable),
            overlay,
        };
        let opts = mount::MountOptions {
            fsname: "tandem-snapshot".into(),
            subtype: None,
            read_only: overlay_dir.is_none(),
        };
        let session = super::serve(mountpoint, &opts, &SNAPSHOT_INIT, fs, SNAPSHOT_THREADS, "fuse-snapshot")?;
        let mut me =
            Self { session: Some(session), mountpoint: mountpoint.to_path_buf(), devices: Vec::new() };
        for v in volumes {
            let file = mountpoint.join(file_name(v));
            let dev = if writable { loopdev::attach(&file)? } else { loopdev::attach_read_only(&file)? };
            info!(device = %dev, snapshot = name, volume = %v.name, "snapshot exposed");
            me.devices.push((v.name.clone(), dev));
        }
        Ok(me)
    }

    pub fn in_use(&self) -> bool {
        self.devices.iter().any(|(_, d)| loopdev::in_use(d))
    }

    /// Removes the devices; refuses while one is open (mounted).
    pub fn stop(&mut self) -> Result<()> {
        stop_serving(&mut self.devices, &mut self.session, &self.mountpoint)?;
        let _ = std::fs::remove_dir(&self.mountpoint);
        Ok(())
    }
}

impl Drop for SnapshotExport {
    fn drop(&mut self) {
        drop_serving(&self.devices, &mut self.session);
    }
}
