//! One snapshot's own blocks: the old contents of blocks the live copy overwrote while this
//! snapshot was the newest, appended to one file.
//!
//! The file is a header and fixed-size records `[magic][crc32][block][data]`, each standing
//! alone: reopening reads every record and keeps those whose checksum holds, so a record
//! torn by a crash, or never written because the disk was full, is simply absent. A block
//! counts as held ([`CowFile::get`]) only once its record is durable — the caller overwrites
//! the live block after [`CowFile::append`] returns, never before — so after any crash a
//! block is either in the file or still unchanged in the live copy.
//!
//! Appends from several threads share their `fdatasync`s (group commit): a thread that finds
//! its record already covered by a sync that started after its write returns without one.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// The granularity of copy-on-write: the volume's logical block.
pub const BLOCK: u64 = 4096;

const MAGIC_FILE: &[u8; 8] = b"TNDMCOW1";
const HEADER: u64 = 4096;
const MAGIC_RECORD: u32 = 0x4b4c_4231; // "1BLK"
const RECORD_HEAD: u64 = 16;
const RECORD: u64 = RECORD_HEAD + BLOCK;

pub struct CowFile {
    path: PathBuf,
    file: File,
    /// Block -> record number, for durable records only.
    index: Mutex<HashMap<u64, u64>>,
    /// Records reserved so far (the next record's number).
    reserved: Mutex<u64>,
    /// Group commit: tickets are taken after a record's write completes; a sync covers every
    /// ticket taken before it started.
    tickets: AtomicU64,
    synced: Mutex<u64>,
    /// Tests: every append fails as on a full disk.
    #[cfg(test)]
    full: std::sync::atomic::AtomicBool,
}

fn crc(block: u64, data: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&block.to_le_bytes());
    h.update(data);
    h.finalize()
}

impl CowFile {
    /// Creates an empty file at `path` (which must not exist), durable with its directory.
    pub fn create(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        let mut head = vec![0u8; HEADER as usize];
        head[..8].copy_from_slice(MAGIC_FILE);
        file.write_all_at(&head, 0)?;
        file.sync_all()?;
        sync_dir(path)?;
        Ok(Self::with(path, file, HashMap::new(), 0))
    }

    /// Opens an existing file, keeping every intact record (see the module docs).
    pub fn open(path: &Path) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut head = [0u8; 8];
        file.read_exact_at(&mut head, 0)?;
        if &head != MAGIC_FILE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a snapshot block file", path.display()),
            ));
        }
        let len = file.metadata()?.len();
        let records = len.saturating_sub(HEADER) / RECORD;
        let mut index = HashMap::new();
        let mut buf = vec![0u8; RECORD as usize];
        for r in 0..records {
            file.read_exact_at(&mut buf, HEADER + r * RECORD)?;
            let magic = u32::from_le_bytes(buf[0..4].try_into().unwrap());
            let sum = u32::from_le_bytes(buf[4..8].try_into().unwrap());
            let block = u64::from_le_bytes(buf[8..16].try_into().unwrap());
            if magic == MAGIC_RECORD && sum == crc(block, &buf[RECORD_HEAD as usize..]) {
                // A later record of the same block (a merge that was redone) holds the same data.
                index.entry(block).or_insert(r);
            }
        }
        Ok(Self::with(path, file, index, records))
    }

    fn with(path: &Path, file: File, index: HashMap<u64, u64>, reserved: u64) -> Self {
        Self {
            path: path.to_path_buf(),
            file,
            index: Mutex::new(index),
            reserved: Mutex::new(reserved),
            tickets: AtomicU64::new(0),
            synced: Mutex::new(0),
            #[cfg(test)]
            full: Default::default(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains(&self, block: u64) -> bool {
        self.index.lock().unwrap().contains_key(&block)
    }

    pub fn len(&self) -> usize {
        self.index.lock().unwrap().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The blocks held.
    pub fn blocks(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self.index.lock().unwrap().keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Bytes the file takes on disk.
    pub fn bytes_used(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.file.metadata().map_or(0, |m| m.blocks() * 512)
    }

    /// Reads `block` into `buf` (`BLOCK` bytes) if held.
    pub fn get(&self, block: u64, buf: &mut [u8]) -> io::Result<bool> {
        let Some(r) = self.index.lock().unwrap().get(&block).copied() else { return Ok(false) };
        self.file.read_exact_at(buf, HEADER + r * RECORD + RECORD_HEAD)?;
        Ok(true)
    }

    /// Appends `blocks` (number, `BLOCK` bytes each) durably; only then are they held.
    /// Blocks already held are skipped.
    pub fn append(&self, blocks: &[(u64, &[u8])]) -> io::Result<()> {
        let todo: Vec<&(u64, &[u8])> = {
            let idx = self.index.lock().unwrap();
            blocks.iter().filter(|(b, _)| !idx.contains_key(b)).collect()
        };
        if todo.is_empty() {
            return Ok(());
        }
        #[cfg(test)]
        if self.full.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let first = {
            let mut r = self.reserved.lock().unwrap();
            let f = *r;
            *r += todo.len() as u64;
            f
        };
        let mut out = Vec::with_capacity(todo.len() * RECORD as usize);
        for (block, data) in &todo {
            debug_assert_eq!(data.len() as u64, BLOCK);
            out.extend_from_slice(&MAGIC_RECORD.to_le_bytes());
            out.extend_from_slice(&crc(*block, data).to_le_bytes());
            out.extend_from_slice(&block.to_le_bytes());
            out.extend_from_slice(data);
        }
        self.file.write_all_at(&out, HEADER + first * RECORD)?;
        self.sync()?;
        let mut idx = self.index.lock().unwrap();
        for (i, (block, _)) in todo.iter().enumerate() {
            idx.entry(*block).or_insert(first + i as u64);
        }
        Ok(())
    }

    #[cfg(test)]
    pub(crate) fn fail_appends(&self) {
        self.full.store(true, Ordering::SeqCst);
    }

    /// Makes every completed write durable, sharing the sync with concurrent callers.
    fn sync(&self) -> io::Result<()> {
        let ticket = self.tickets.fetch_add(1, Ordering::SeqCst) + 1;
        let mut synced = self.synced.lock().unwrap();
        if *synced >= ticket {
            return Ok(());
        }
        let upto = self.tickets.load(Ordering::SeqCst);
        self.file.sync_data()?;
        *synced = upto;
        Ok(())
    }
}

/// Makes a created or renamed entry of `path`'s directory durable.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(d) => File::open(d)?.sync_all(),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(n: u8) -> Vec<u8> {
        vec![n; BLOCK as usize]
    }

    #[test]
    fn blocks_survive_reopening_and_a_torn_record_is_absent() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.cow");
        let c = CowFile::create(&p).unwrap();
        c.append(&[(7, &block(1)), (9, &block(2))]).unwrap();
        c.append(&[(7, &block(3))]).unwrap(); // already held: kept as first copied
        drop(c);
        // A crash in the middle of a third record: half of it on disk.
        let f = OpenOptions::new().append(true).open(&p).unwrap();
        f.write_all_at(&[0xAB; 100], HEADER + 2 * RECORD).unwrap();
        let c = CowFile::open(&p).unwrap();
        assert_eq!(c.blocks(), vec![7, 9]);
        let mut buf = block(0);
        assert!(c.get(7, &mut buf).unwrap());
        assert_eq!(buf, block(1));
        assert!(!c.get(8, &mut buf).unwrap());
        // The next append takes the torn record's place; reopening finds all.
        c.append(&[(11, &block(4))]).unwrap();
        let c = CowFile::open(&p).unwrap();
        assert_eq!(c.blocks(), vec![7, 9, 11]);
    }

    #[test]
    fn a_corrupted_record_is_ignored_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s.cow");
        let c = CowFile::create(&p).unwrap();
        c.append(&[(1, &block(1)), (2, &block(2))]).unwrap();
        drop(c);
        let f = OpenOptions::new().write(true).open(&p).unwrap();
        f.write_all_at(&[0xFF], HEADER + RECORD_HEAD + 10).unwrap();
        assert_eq!(CowFile::open(&p).unwrap().blocks(), vec![2]);
    }

    #[test]
    fn concurrent_appends_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let c = std::sync::Arc::new(CowFile::create(&dir.path().join("s.cow")).unwrap());
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let c = c.clone();
                std::thread::spawn(move || {
                    for i in 0..50u64 {
                        c.append(&[(t * 1000 + i, &block(t as u8))]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.len(), 200);
        assert_eq!(CowFile::open(c.path()).unwrap().len(), 200);
    }
}
