//! The snapshots of one copy, as a chain in front of its live store.
//!
//! Every write to the live copy (replicated, resynced, restored, or the application's on a
//! primary) first preserves the old contents of the blocks it overwrites in the **newest**
//! snapshot that does not hold them yet, then overwrites them. A snapshot's view of a block
//! is its own copy if it has one, otherwise the view of the next newer snapshot, and past the
//! newest, the live block: a block a snapshot does not hold was not written between its
//! creation and the next snapshot's, so the next one (or the live copy) still shows it. A
//! write thus costs one copy however many snapshots exist.
//!
//! Invariants:
//! - A block is overwritten in the live store only after its old contents are durable in
//!   the newest snapshot ([`CowFile::append`] returns) or that snapshot, and every older one
//!   that read the block through it, is recorded invalid.
//! - Snapshots are created only while no write is in flight (the replication stream's
//!   barrier gate, see `tandem_replicator::TargetState::at_barrier`), so a snapshot holds
//!   exactly the state at that instant.
//! - A reader that falls through to the live store registers its range first; a writer that
//!   just preserved blocks waits for such readers before overwriting them.
//! - Deleting a snapshot first hands the blocks it holds, and the next older one lacks, to
//!   that older one: the older views never change. A deletion survives a crash half done
//!   (the record says `deleting`) and is finished at the next open.

use std::collections::BTreeSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};

use tandem_replicator::BlockStore;
use thiserror::Error;
use tracing::{error, warn};

use super::cow::{CowFile, BLOCK};
use super::record::{RecordFile, SnapshotKind, SnapshotRecord, SnapshotState};

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("no snapshot {name:?} (snapshots: {known})")]
    Unknown { name: String, known: String },
    #[error("a snapshot {0:?} exists already")]
    Exists(String),
    #[error(
        "{0:?} is not a snapshot name: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
    )]
    BadName(String),
    #[error("snapshot {name:?} is invalid ({reason}): it does not show one instant")]
    Invalid { name: String, reason: String },
    #[error("snapshot {name:?}: {op}: {source}")]
    Io { name: String, op: &'static str, source: io::Error },
    #[error("snapshot directory {dir}: {source}")]
    Dir { dir: PathBuf, source: io::Error },
}

/// One snapshot in the chain.
pub struct Snapshot {
    record: Mutex<SnapshotRecord>,
    file: Mutex<RecordFile>,
    cow: CowFile,
}

impl Snapshot {
    pub fn record(&self) -> SnapshotRecord {
        self.record.lock().unwrap().clone()
    }

    fn name(&self) -> String {
        self.record.lock().unwrap().name.clone()
    }

    fn set(&self, f: impl FnOnce(&mut SnapshotRecord)) -> io::Result<()> {
        let mut r = self.record.lock().unwrap();
        f(&mut r);
        self.file.lock().unwrap().update(&r)
    }

    fn is_valid(&self) -> bool {
        self.record.lock().unwrap().state == SnapshotState::Valid
    }
}

/// What `snapshot list` shows of a snapshot.
#[derive(Debug, Clone)]
pub struct SnapshotInfo {
    pub record: SnapshotRecord,
    /// Blocks it holds itself (overwritten in the live copy since, while it was the newest).
    pub blocks: u64,
    /// Bytes its files take on disk.
    pub bytes_used: u64,
}

/// Blocks handed to the next older snapshot per durable append when one is deleted.
const HAND_OVER_BATCH: usize = 256;

pub struct SnapshotStore {
    live: Arc<dyn BlockStore>,
    dir: PathBuf,
    /// Oldest first.
    chain: RwLock<Vec<Arc<Snapshot>>>,
    /// Ranges (block numbers, end exclusive) that readers are reading from the live store.
    readers: Mutex<Vec<(u64, u64)>>,
    reader_done: Condvar,
    next_order: AtomicU64,
}

pub fn valid_name(name: &str) -> Result<(), SnapshotError> {
    let ok = (1..=64).contains(&name.len())
        && !name.starts_with(['.', '-'])
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::BadName(name.to_string()))
    }
}

fn blocks_of(offset: u64, len: u64) -> std::ops::Range<u64> {
    offset / BLOCK..(offset + len).div_ceil(BLOCK)
}

impl SnapshotStore {
    /// Opens the snapshots kept in `dir` (created if missing) in front of `live`, finishing
    /// any deletion a crash interrupted. A snapshot whose files cannot be read is skipped
    /// with a warning (returned): its name stays taken until its files are removed.
    pub fn open(live: Arc<dyn BlockStore>, dir: &Path) -> Result<(Arc<Self>, Vec<String>), SnapshotError> {
        let dir_err = |source| SnapshotError::Dir { dir: dir.to_path_buf(), source };
        std::fs::create_dir_all(dir).map_err(dir_err)?;
        let mut warnings = Vec::new();
        let mut chain = Vec::new();
        for e in std::fs::read_dir(dir).map_err(dir_err)? {
            let path = e.map_err(dir_err)?.path();
            if path.extension().is_none_or(|x| x != "snap") {
                continue;
            }
            let opened = RecordFile::open(&path).and_then(|(file, record)| {
                let cow = CowFile::open(&path.with_extension("cow"))?;
                Ok(Snapshot { record: Mutex::new(record), file: Mutex::new(file), cow })
            });
            match opened {
                Ok(s) => chain.push(Arc::new(s)),
                Err(e) => warnings.push(format!("{}: {e}; ignored", path.display())),
            }
        }
        chain.sort_by_key(|s| s.record().order);
        let next = chain.last().map_or(1, |s| s.record().order + 1);
        let store = Arc::new(Self {
            live,
            dir: dir.to_path_buf(),
            chain: RwLock::new(chain),
            readers: Mutex::new(Vec::new()),
            reader_done: Condvar::new(),
            next_order: AtomicU64::new(next),
        });
        let interrupted: Vec<String> =
            store.chain.read().unwrap().iter().filter(|s| s.record().deleting).map(|s| s.name()).collect();
        for name in interrupted {
            warnings.push(format!("finishing the deletion of snapshot {name:?} a crash interrupted"));
            store.delete(&name)?;
        }
        Ok((store, warnings))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn live(&self) -> &Arc<dyn BlockStore> {
        &self.live
    }

    fn find(&self, chain: &[Arc<Snapshot>], name: &str) -> Result<usize, SnapshotError> {
        chain.iter().position(|s| s.record.lock().unwrap().name == name).ok_or_else(|| {
            SnapshotError::Unknown {
                name: name.to_string(),
                known: if chain.is_empty() {
                    "none".to_string()
                } else {
                    chain.iter().map(|s| s.name()).collect::<Vec<_>>().join(", ")
                },
            }
        })
    }

    /// Adds a snapshot of the live store as it is now. The caller guarantees no write is
    /// in flight (see the module docs).
    pub fn create(
        &self,
        name: &str,
        kind: SnapshotKind,
        seq: u64,
        at_barrier: bool,
        generation: String,
    ) -> Result<SnapshotRecord, SnapshotError> {
        valid_name(name)?;
        let mut chain = self.chain.write().unwrap();
        if self.find(&chain, name).is_ok() || self.dir.join(format!("{name}.snap")).exists() {
            return Err(SnapshotError::Exists(name.to_string()));
        }
        let record = SnapshotRecord {
            name: name.to_string(),
            order: self.next_order.fetch_add(1, Ordering::SeqCst),
            created_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            seq,
            at_barrier,
            generation,
            kind,
            state: SnapshotState::Valid,
            deleting: false,
        };
        let io = |op| move |source| SnapshotError::Io { name: name.to_string(), op, source };
        // The block file first: a record without one is skipped at open, never trusted.
        let cow_path = self.dir.join(format!("{name}.cow"));
        let cow = CowFile::create(&cow_path).map_err(io("create its block file"))?;
        let file = match RecordFile::create(&self.dir.join(format!("{name}.snap")), &record) {
            Ok(f) => f,
            Err(e) => {
                let _ = std::fs::remove_file(&cow_path);
                return Err(io("create its record")(e));
            }
        };
        chain.push(Arc::new(Snapshot { record: Mutex::new(record.clone()), file: Mutex::new(file), cow }));
        Ok(record)
    }

    pub fn list(&self) -> Vec<SnapshotInfo> {
        self.chain
            .read()
            .unwrap()
            .iter()
            .map(|s| SnapshotInfo {
                record: s.record(),
                blocks: s.cow.len() as u64,
                bytes_used: s.cow.bytes_used() + 8192,
            })
            .collect()
    }

    pub fn get(&self, name: &str) -> Result<SnapshotRecord, SnapshotError> {
        let chain = self.chain.read().unwrap();
        Ok(chain[self.find(&chain, name)?].record())
    }

    /// Deletes `name`, handing its blocks to the next older snapshot first.
    pub fn delete(&self, name: &str) -> Result<(), SnapshotError> {
        let (older, victim) = {
            let chain = self.chain.read().unwrap();
            let i = self.find(&chain, name)?;
            (i.checked_sub(1).map(|j| chain[j].clone()), chain[i].clone())
        };
        let io = |op| move |source| SnapshotError::Io { name: name.to_string(), op, source };
        victim.set(|r| r.deleting = true).map_err(io("mark it deleting"))?;
        // In batches of HAND_OVER_BATCH blocks, one durable append (one fdatasync) each:
        // a block at a time would cost a sync per 4 KiB.
        let hand_over = |older: &Snapshot| -> io::Result<()> {
            let todo: Vec<u64> =
                victim.cow.blocks().into_iter().filter(|b| !older.cow.contains(*b)).collect();
            let mut data = vec![0u8; HAND_OVER_BATCH * BLOCK as usize];
            let bs = BLOCK as usize;
            for batch in todo.chunks(HAND_OVER_BATCH) {
                let mut held = Vec::with_capacity(batch.len());
                for &b in batch {
                    let n = held.len();
                    if victim.cow.get(b, &mut data[n * bs..(n + 1) * bs])? {
                        held.push(b);
                    }
                }
                let pairs: Vec<(u64, &[u8])> = held.iter().copied().zip(data.chunks(bs)).collect();
                older.cow.append(&pairs)?;
            }
            Ok(())
        };
        if let Some(older) = &older {
            // Most blocks while writes go on; the rest with writes held (they may be adding
            // blocks to the victim if it is the newest).
            if let Err(e) = hand_over(older) {
                let _ = victim.set(|r| r.deleting = false);
                return Err(SnapshotError::Io {
                    name: name.to_string(),
                    op: "hand its blocks to the next older snapshot (delete the oldest snapshots first: they go without copying)",
                    source: e,
                });
            }
        }
        let mut chain = self.chain.write().unwrap();
        if let Some(older) = &older {
            if let Err(e) = hand_over(older) {
                drop(chain);
                let _ = victim.set(|r| r.deleting = false);
                return Err(io("hand its blocks to the next older snapshot")(e));
            }
        }
        chain.retain(|s| !Arc::ptr_eq(s, &victim));
        drop(chain);
        for ext in ["snap", "cow"] {
            let p = self.dir.join(format!("{name}.{ext}"));
            if let Err(e) = std::fs::remove_file(&p) {
                warn!(path = %p.display(), "cannot remove a deleted snapshot's file: {e}");
            }
        }
        Ok(())
    }

    /// Reads `[offset, +buf.len())` as snapshot `name` shows it.
    pub fn read(&self, name: &str, offset: u64, buf: &mut [u8]) -> Result<(), SnapshotError> {
        let chain = self.chain.read().unwrap();
        let i = self.find(&chain, name)?;
        let s = &chain[i];
        if let SnapshotState::Invalid { reason } = &s.record().state {
            return Err(SnapshotError::Invalid { name: name.to_string(), reason: reason.clone() });
        }
        let io = |source| SnapshotError::Io { name: name.to_string(), op: "read", source };
        let range = blocks_of(offset, buf.len() as u64);
        // Registered before the snapshots are consulted: see the module docs.
        self.readers.lock().unwrap().push((range.start, range.end));
        let r = (|| {
            let mut block = vec![0u8; BLOCK as usize];
            for b in range.clone() {
                let start = b * BLOCK;
                let from = offset.max(start);
                let to = (offset + buf.len() as u64).min(start + BLOCK);
                let dst = &mut buf[(from - offset) as usize..(to - offset) as usize];
                if !self.view(&chain[i..], b, &mut block)? {
                    self.live.read_at(start, &mut block)?;
                }
                dst.copy_from_slice(&block[(from - start) as usize..(to - start) as usize]);
            }
            Ok(())
        })();
        let mut readers = self.readers.lock().unwrap();
        if let Some(p) = readers.iter().position(|r| *r == (range.start, range.end)) {
            readers.swap_remove(p);
        }
        drop(readers);
        self.reader_done.notify_all();
        r.map_err(io)
    }

    /// The block as the first snapshot of `newer` shows it, if some snapshot holds it.
    fn view(&self, newer: &[Arc<Snapshot>], block: u64, buf: &mut [u8]) -> io::Result<bool> {
        for s in newer {
            if s.cow.get(block, buf)? {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The blocks that differ between snapshot `name` and the live copy (at most these).
    pub fn changed_since(&self, name: &str) -> Result<Vec<u64>, SnapshotError> {
        let chain = self.chain.read().unwrap();
        let i = self.find(&chain, name)?;
        let set: BTreeSet<u64> = chain[i..].iter().flat_map(|s| s.cow.blocks()).collect();
        Ok(set.into_iter().collect())
    }

    /// Makes the live copy show what snapshot `name` shows; returns the blocks written
    /// (the only ones that can differ from before). Newer snapshots keep their views: the
    /// restore's writes are preserved in the newest like any other. The caller makes sure
    /// nothing else writes meanwhile.
    pub fn restore(&self, name: &str) -> Result<Vec<u64>, SnapshotError> {
        let rec = self.get(name)?;
        if let SnapshotState::Invalid { reason } = rec.state {
            return Err(SnapshotError::Invalid { name: name.to_string(), reason });
        }
        let blocks = self.changed_since(name)?;
        let io = |op| move |source| SnapshotError::Io { name: name.to_string(), op, source };
        let mut buf = vec![0u8; BLOCK as usize];
        for &b in &blocks {
            self.read(name, b * BLOCK, &mut buf)?;
            self.write_at(b * BLOCK, &buf).map_err(io("write the restored block"))?;
        }
        self.live.flush().map_err(io("flush the restored copy"))?;
        Ok(blocks)
    }

    /// Before the live blocks of `[offset, +len)` are overwritten: their old contents into
    /// the newest snapshot. Fails only if the old contents cannot be read.
    fn preserve(&self, offset: u64, len: u64) -> io::Result<()> {
        let range = blocks_of(offset, len);
        {
            let chain = self.chain.read().unwrap();
            let Some(newest) = chain.last() else { return Ok(()) };
            let need: Vec<u64> = range.clone().filter(|b| !newest.cow.contains(*b)).collect();
            if need.is_empty() {
                return Ok(());
            }
            // Old contents, read in contiguous runs.
            let mut old = vec![0u8; need.len() * BLOCK as usize];
            let mut i = 0;
            while i < need.len() {
                let mut j = i + 1;
                while j < need.len() && need[j] == need[j - 1] + 1 {
                    j += 1;
                }
                self.live.read_at(need[i] * BLOCK, &mut old[i * BLOCK as usize..j * BLOCK as usize])?;
                i = j;
            }
            let pairs: Vec<(u64, &[u8])> =
                need.iter().zip(old.chunks(BLOCK as usize)).map(|(b, d)| (*b, d)).collect();
            if let Err(e) = newest.cow.append(&pairs) {
                self.invalidate(&chain, &need, &format!("could not preserve a block: {e}"));
            }
        }
        // Readers that looked before the blocks were preserved may be reading them live.
        let mut readers = self.readers.lock().unwrap();
        while readers.iter().any(|(s, e)| *s < range.end && range.start < *e) {
            readers = self.reader_done.wait(readers).unwrap();
        }
        Ok(())
    }

    /// The newest snapshot could not keep `blocks`: it, and every older one that saw them
    /// through it, no longer show one instant.
    fn invalidate(&self, chain: &[Arc<Snapshot>], blocks: &[u64], reason: &str) {
        let mut missing: Vec<u64> = blocks.to_vec();
        for s in chain.iter().rev() {
            missing.retain(|b| !s.cow.contains(*b));
            if missing.is_empty() {
                break;
            }
            if s.is_valid() {
                let name = s.name();
                error!(snapshot = %name, "snapshot invalid: {reason}");
                if let Err(e) = s.set(|r| r.state = SnapshotState::Invalid { reason: reason.to_string() }) {
                    error!(snapshot = %name, "cannot record that the snapshot is invalid: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
impl SnapshotStore {
    /// Makes the newest snapshot's block file fail every append with ENOSPC.
    pub(crate) fn newest_fails_to_grow(&self) {
        if let Some(s) = self.chain.read().unwrap().last() {
            s.cow.fail_appends();
        }
    }
}

impl BlockStore for SnapshotStore {
    fn size(&self) -> u64 {
        self.live.size()
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.preserve(offset, data.len() as u64)?;
        self.live.write_at(offset, data)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.live.read_at(offset, buf)
    }

    fn flush(&self) -> io::Result<()> {
        self.live.flush()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.preserve(offset, len)?;
        self.live.discard(offset, len)
    }

    fn submits_writes(&self) -> bool {
        self.live.submits_writes()
    }

    /// Preserves the old contents for the newest snapshot first, on the caller's thread, as
    /// [`BlockStore::write_at`] does; then the live image takes the write.
    fn submit_write(&self, offset: u64, data: bytes::Bytes, done: tandem_replicator::WriteDone) {
        match self.preserve(offset, data.len() as u64) {
            Ok(()) => self.live.submit_write(offset, data, done),
            Err(e) => done(Err(e)),
        }
    }
}
