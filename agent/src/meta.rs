//! Per-resource, per-node metadata file: identity, disk state, role, peer state.
//!
//! Two 4 KiB slots hold alternate copies. An update writes the slot not holding the newest
//! copy, with a higher counter and a CRC, then fdatasyncs; so a torn or failed write can
//! only damage the copy being replaced. Loading picks the valid copy with the highest
//! counter and says so when it had to fall back; if neither copy is valid the agent refuses
//! to start rather than run on garbage.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use bincode::{Decode, Encode};
use serde::Serialize;
use tracing::warn;

const MAGIC: &[u8; 8] = b"TNDMETA\0";
const FORMAT: u32 = 1;
const SLOT: usize = 4096;
/// magic, format, counter, body length, crc
const SLOT_HEAD: usize = 8 + 4 + 8 + 4 + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskState {
    UpToDate,
    Outdated,
    Inconsistent,
}

impl DiskState {
    pub fn as_str(self) -> &'static str {
        match self {
            DiskState::UpToDate => "up_to_date",
            DiskState::Outdated => "outdated",
            DiskState::Inconsistent => "inconsistent",
        }
    }

    pub fn to_wire(self) -> tandem_protocol::DiskState {
        match self {
            DiskState::UpToDate => tandem_protocol::DiskState::UpToDate,
            DiskState::Outdated => tandem_protocol::DiskState::Outdated,
            DiskState::Inconsistent => tandem_protocol::DiskState::Inconsistent,
        }
    }

    pub fn from_wire(d: tandem_protocol::DiskState) -> Self {
        match d {
            tandem_protocol::DiskState::UpToDate => DiskState::UpToDate,
            tandem_protocol::DiskState::Outdated => DiskState::Outdated,
            tandem_protocol::DiskState::Inconsistent => DiskState::Inconsistent,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct PeerMeta {
    pub name: String,
    /// This node (as primary) went on without the peer: the peer is missing writes. Without a
    /// persisted bitmap, a peer marked here needs a full resync.
    pub out_of_sync: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct MetaRecord {
    pub cluster: String,
    pub resource: String,
    pub node: String,
    pub size: u64,
    pub bitmap_granularity: u64,
    pub disk: DiskState,
    pub primary: bool,
    /// The next position in the resource's change stream.
    pub next_seq: u64,
    pub peers: Vec<PeerMeta>,
}

impl MetaRecord {
    pub fn peer_mut(&mut self, name: &str) -> &mut PeerMeta {
        if let Some(i) = self.peers.iter().position(|p| p.name == name) {
            return &mut self.peers[i];
        }
        self.peers.push(PeerMeta { name: name.to_string(), out_of_sync: false });
        self.peers.last_mut().expect("just pushed")
    }
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_little_endian().with_limit::<{ SLOT - SLOT_HEAD }>()
}

pub struct MetaFile {
    path: PathBuf,
    file: File,
    counter: u64,
    record: MetaRecord,
}

fn encode_slot(counter: u64, rec: &MetaRecord) -> Result<Vec<u8>> {
    let body = bincode::encode_to_vec(rec, bincode_config()).context("metadata too large for its slot")?;
    let mut slot = vec![0u8; SLOT];
    slot[0..8].copy_from_slice(MAGIC);
    slot[8..12].copy_from_slice(&FORMAT.to_le_bytes());
    slot[12..20].copy_from_slice(&counter.to_le_bytes());
    slot[20..24].copy_from_slice(&(body.len() as u32).to_le_bytes());
    slot[SLOT_HEAD..SLOT_HEAD + body.len()].copy_from_slice(&body);
    let crc = crc32fast::hash(&slot[8..20]) ^ crc32fast::hash(&slot[SLOT_HEAD..SLOT_HEAD + body.len()]);
    slot[24..28].copy_from_slice(&crc.to_le_bytes());
    Ok(slot)
}

fn decode_slot(slot: &[u8]) -> Result<(u64, MetaRecord), String> {
    if slot.len() < SLOT || &slot[0..8] != MAGIC {
        return Err("no metadata magic".into());
    }
    let format = u32::from_le_bytes(slot[8..12].try_into().expect("4 bytes"));
    if format != FORMAT {
        return Err(format!("metadata format {format}, this build understands {FORMAT}"));
    }
    let counter = u64::from_le_bytes(slot[12..20].try_into().expect("8 bytes"));
    let len = u32::from_le_bytes(slot[20..24].try_into().expect("4 bytes")) as usize;
    if len > SLOT - SLOT_HEAD {
        return Err(format!("body length {len} exceeds the slot"));
    }
    let stored = u32::from_le_bytes(slot[24..28].try_into().expect("4 bytes"));
    let crc = crc32fast::hash(&slot[8..20]) ^ crc32fast::hash(&slot[SLOT_HEAD..SLOT_HEAD + len]);
    if crc != stored {
        return Err(format!("checksum mismatch (stored {stored:08x}, computed {crc:08x})"));
    }
    let (rec, used) = bincode::decode_from_slice(&slot[SLOT_HEAD..SLOT_HEAD + len], bincode_config())
        .map_err(|e| format!("undecodable body: {e}"))?;
    if used != len {
        return Err("trailing bytes in body".into());
    }
    Ok((counter, rec))
}

impl MetaFile {
    /// Creates a new metadata file holding `record`. Fails if the file exists.
    pub fn create(path: &Path, record: MetaRecord) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("cannot create metadata {}", path.display()))?;
        file.set_len(2 * SLOT as u64)?;
        let mut m = Self { path: path.to_path_buf(), file, counter: 0, record };
        // Both slots valid from the start.
        m.store()?;
        m.store()?;
        Ok(m)
    }

    pub fn open(path: &Path) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .with_context(|| format!("cannot open metadata {}", path.display()))?;
        let mut buf = vec![0u8; 2 * SLOT];
        let n = read_up_to(&file, &mut buf)?;
        let a = decode_slot(&buf[..n.min(SLOT)]);
        let b = if n > SLOT { decode_slot(&buf[SLOT..n]) } else { Err("file too short".into()) };
        let (counter, record) = match (a, b) {
            (Ok(x), Ok(y)) => {
                if x.0 >= y.0 {
                    x
                } else {
                    y
                }
            }
            (Ok(x), Err(e)) | (Err(e), Ok(x)) => {
                warn!(meta = %path.display(), "one metadata copy is damaged ({e}); using the other, update {}", x.0);
                x
            }
            (Err(ea), Err(eb)) => {
                return Err(anyhow!(
                    "metadata {} is corrupt: copy A: {ea}; copy B: {eb}. Refusing to start on it. \
                     If this node's data is expendable, move the file away and let the agent \
                     create new metadata (the disk will be inconsistent until resynced).",
                    path.display()
                ))
            }
        };
        Ok(Self { path: path.to_path_buf(), file, counter, record })
    }

    pub fn record(&self) -> &MetaRecord {
        &self.record
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Applies `f` to the record and stores it durably.
    pub fn update(&mut self, f: impl FnOnce(&mut MetaRecord)) -> Result<()> {
        let mut next = self.record.clone();
        f(&mut next);
        if next == self.record {
            return Ok(());
        }
        let prev = std::mem::replace(&mut self.record, next);
        if let Err(e) = self.store() {
            self.record = prev;
            return Err(e);
        }
        Ok(())
    }

    fn store(&mut self) -> Result<()> {
        let counter = self.counter + 1;
        let slot = encode_slot(counter, &self.record)?;
        let at = (counter % 2) * SLOT as u64;
        self.file
            .write_all_at(&slot, at)
            .and_then(|_| self.file.sync_data())
            .with_context(|| format!("cannot write metadata {}", self.path.display()))?;
        self.counter = counter;
        Ok(())
    }
}

fn read_up_to(f: &File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read_at(&mut buf[n..], n as u64)?;
        if r == 0 {
            break;
        }
        n += r;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec() -> MetaRecord {
        MetaRecord {
            cluster: "mail".into(),
            resource: "r".into(),
            node: "alpha".into(),
            size: 1 << 20,
            bitmap_granularity: 4096,
            disk: DiskState::UpToDate,
            primary: false,
            next_seq: 1,
            peers: vec![],
        }
    }

    #[test]
    fn update_survives_reopen_and_torn_slot_falls_back() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m");
        let mut m = MetaFile::create(&p, rec()).unwrap();
        m.update(|r| r.disk = DiskState::Outdated).unwrap();
        let newest_slot = (m.counter % 2) as usize;
        drop(m);
        assert_eq!(MetaFile::open(&p).unwrap().record().disk, DiskState::Outdated);
        // Tear the newest copy: the previous one (UpToDate) is used.
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[newest_slot * SLOT + SLOT_HEAD + 3] ^= 0xff;
        std::fs::write(&p, &bytes).unwrap();
        assert_eq!(MetaFile::open(&p).unwrap().record().disk, DiskState::UpToDate);
        // Both damaged: refuse.
        bytes[(1 - newest_slot) * SLOT + 13] ^= 0xff;
        std::fs::write(&p, &bytes).unwrap();
        let e = MetaFile::open(&p).err().unwrap().to_string();
        assert!(e.contains("is corrupt") && e.contains("Refusing"), "{e}");
    }

    #[test]
    fn random_garbage_never_panics() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m");
        for seed in 0..200u32 {
            let bytes: Vec<u8> =
                (0..2 * SLOT as u32).map(|i| (i.wrapping_mul(2654435761) ^ seed) as u8).collect();
            std::fs::write(&p, &bytes).unwrap();
            assert!(MetaFile::open(&p).is_err());
        }
    }
}
