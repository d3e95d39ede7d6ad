//! What is known about one snapshot, kept beside its block file (`NAME.snap`).
//!
//! The file is two fixed 4 KiB slots written in turn, each a checksummed JSON record with a
//! sequence number; reading takes the intact slot with the higher number. Both slots are
//! allocated when the snapshot is created, so updating the record later — above all marking
//! the snapshot invalid because its block file could not grow on a full disk — overwrites
//! blocks the file already owns and needs no free space.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const SLOT: u64 = 4096;
const MAGIC: &[u8; 8] = b"TNDMSNAP";

/// Why a snapshot exists; retention prunes only scheduled ones, each tier on its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SnapshotKind {
    /// `tandem snapshot create`: kept until deleted.
    Manual,
    /// Taken by the schedule `tier` (its `every`, e.g. "15m").
    Scheduled { tier: String },
    /// Taken before this copy became a resync target; deleted when the resync ends.
    BeforeResync { peer: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum SnapshotState {
    Valid,
    /// Some block could not be preserved (e.g. no space for the copy): the snapshot no
    /// longer shows one instant and can be neither exposed nor restored.
    Invalid {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotRecord {
    pub name: String,
    /// Creation order in the chain (older snapshots read through newer ones).
    pub order: u64,
    /// Unix time of creation, in milliseconds.
    pub created_ms: u64,
    /// The change stream's position it holds: every request up to this sequence number,
    /// none after (0 when the copy had no stream yet).
    pub seq: u64,
    /// Whether it was taken at a barrier of the stream (always, unless no replication
    /// stream was running: then the copy's state as the last session left it).
    pub at_barrier: bool,
    /// The data generation of the copy when it was taken (hex).
    pub generation: String,
    pub kind: SnapshotKind,
    pub state: SnapshotState,
    /// Being deleted: its blocks are being handed to the next older snapshot. A restart
    /// finishes the deletion.
    #[serde(default)]
    pub deleting: bool,
}

/// The record file of a snapshot.
pub struct RecordFile {
    path: PathBuf,
    file: File,
    seq: u64,
}

#[derive(Serialize, Deserialize)]
struct Slot {
    seq: u64,
    record: SnapshotRecord,
}

fn encode(seq: u64, record: &SnapshotRecord) -> io::Result<Vec<u8>> {
    let json = serde_json::to_vec(&Slot { seq, record: record.clone() }).map_err(io::Error::other)?;
    let body = 8 + 4 + 4;
    if json.len() as u64 + body > SLOT {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "snapshot record larger than its slot"));
    }
    let mut out = vec![0u8; SLOT as usize];
    out[..8].copy_from_slice(MAGIC);
    out[8..12].copy_from_slice(&(json.len() as u32).to_le_bytes());
    out[12..16].copy_from_slice(&crc32fast::hash(&json).to_le_bytes());
    out[16..16 + json.len()].copy_from_slice(&json);
    Ok(out)
}

fn decode(buf: &[u8]) -> Option<Slot> {
    if &buf[..8] != MAGIC {
        return None;
    }
    let len = u32::from_le_bytes(buf[8..12].try_into().ok()?) as usize;
    let sum = u32::from_le_bytes(buf[12..16].try_into().ok()?);
    let json = buf.get(16..16 + len)?;
    (crc32fast::hash(json) == sum).then(|| serde_json::from_slice(json).ok())?
}

impl RecordFile {
    /// Creates the file with both slots allocated and `record` (sequence 1) in slot 1;
    /// sequence `n` always goes to slot `n % 2`.
    pub fn create(path: &Path, record: &SnapshotRecord) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(true).create_new(true).open(path)?;
        let mut both = vec![0u8; SLOT as usize];
        both.extend(encode(1, record)?);
        file.write_all_at(&both, 0)?;
        file.sync_all()?;
        super::cow::sync_dir(path)?;
        Ok(Self { path: path.to_path_buf(), file, seq: 1 })
    }

    pub fn open(path: &Path) -> io::Result<(Self, SnapshotRecord)> {
        let file = OpenOptions::new().read(true).write(true).open(path)?;
        let mut buf = vec![0u8; 2 * SLOT as usize];
        let n = file.read_at(&mut buf, 0)?;
        buf.truncate(n);
        let best = buf
            .chunks(SLOT as usize)
            .filter(|c| c.len() == SLOT as usize)
            .filter_map(decode)
            .max_by_key(|s| s.seq)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: no intact snapshot record", path.display()),
                )
            })?;
        Ok((Self { path: path.to_path_buf(), file, seq: best.seq }, best.record))
    }

    /// Replaces the record durably (in the slot not holding the current one).
    pub fn update(&mut self, record: &SnapshotRecord) -> io::Result<()> {
        let seq = self.seq + 1;
        let slot = seq % 2;
        self.file.write_all_at(&encode(seq, record)?, slot * SLOT)?;
        self.file.sync_data()?;
        self.seq = seq;
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(name: &str) -> SnapshotRecord {
        SnapshotRecord {
            name: name.into(),
            order: 3,
            created_ms: 1,
            seq: 42,
            at_barrier: true,
            generation: "00ff".into(),
            kind: SnapshotKind::Scheduled { tier: "15m".into() },
            state: SnapshotState::Valid,
            deleting: false,
        }
    }

    #[test]
    fn the_newest_intact_slot_wins() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.snap");
        let mut f = RecordFile::create(&p, &record("a")).unwrap();
        let mut r = record("a");
        r.state = SnapshotState::Invalid { reason: "no space".into() };
        f.update(&r).unwrap();
        assert_eq!(RecordFile::open(&p).unwrap().1, r);
        // The newer slot torn: the older one is read.
        let raw = OpenOptions::new().write(true).open(&p).unwrap();
        raw.write_all_at(&[0u8; 64], 20).unwrap(); // slot 0 holds seq 2
        assert_eq!(RecordFile::open(&p).unwrap().1, record("a"));
    }

    #[test]
    fn updates_need_no_new_space() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.snap");
        let mut f = RecordFile::create(&p, &record("a")).unwrap();
        let len = std::fs::metadata(&p).unwrap().len();
        for _ in 0..5 {
            f.update(&record("a")).unwrap();
        }
        assert_eq!(std::fs::metadata(&p).unwrap().len(), len);
    }
}
