//! Per-resource, per-node metadata file: identity, generation IDs, disk state, the activity
//! log and one dirty bitmap per peer.
//!
//! ```text
//! 0      4 KiB   superblock, copy A      } alternate copies: an update rewrites the older
//! 4 KiB  4 KiB   superblock, copy B      } one with a higher counter and a CRC
//! 8 KiB  4 KiB   activity log, copy A    } same scheme: the full hot set per transaction
//! 12 KiB 4 KiB   activity log, copy B    }
//! 16 KiB ...     bitmap slots, one per peer: 4 KiB pages, each with its own CRC
//! ```
//!
//! Every structure detects damage: a torn superblock or activity-log write leaves the other
//! copy, which is used (and said so); a bitmap page that fails its CRC is treated as all
//! dirty — it can only cost resync work, never hide a difference. With no valid superblock
//! the agent refuses to start rather than run on garbage.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use bincode::{Decode, Encode};
use serde::{Deserialize, Serialize};
use tandem_replicator::DirtyBitmap;
use tracing::warn;

const MAGIC: &[u8; 8] = b"TNDMETA\0";
const AL_MAGIC: &[u8; 8] = b"TNDACTL\0";
const FORMAT: u32 = 3;
const SLOT: usize = 4096;
/// magic, format, counter, body length, crc
const SLOT_HEAD: usize = 8 + 4 + 8 + 4 + 4;
const AL_OFFSET: u64 = 2 * SLOT as u64;
/// magic, transaction, count, crc
const AL_HEAD: usize = 8 + 8 + 4 + 4;
/// Most extents one activity-log transaction can hold.
pub const AL_MAX_EXTENTS: usize = (SLOT - AL_HEAD) / 4;
const BITMAP_OFFSET: u64 = 4 * SLOT as u64;
/// crc, page index, peer slot, reserved
const PAGE_HEAD: usize = 16;
/// Bitmap words per page: 510 words = 4080 bytes = 32640 bits.
pub const PAGE_WORDS: usize = (SLOT - PAGE_HEAD) / 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Encode, Decode, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskState {
    UpToDate,
    Outdated,
    Inconsistent,
}

impl PartialEq<&str> for DiskState {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl std::fmt::Display for DiskState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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
    /// Index of this peer's bitmap slot in the file.
    pub slot: u32,
    /// Generation this node had when it last was in sync with the peer and then went on
    /// writing without it (0 = none).
    pub bitmap_uuid: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode, Serialize)]
pub struct MetaRecord {
    pub cluster: String,
    pub resource: String,
    pub node: String,
    pub size: u64,
    pub bitmap_granularity: u64,
    pub al_extent_size: u64,
    pub disk: DiskState,
    /// Primary and not cleanly stopped: after a crash the activity log must be replayed.
    pub primary: bool,
    /// Recovered from a crash while primary; cleared once every region it may have written
    /// alone has been resynced.
    pub crashed_primary: bool,
    /// The next position in the resource's change stream.
    pub next_seq: u64,
    pub current_generation: u64,
    pub history: Vec<u64>,
    /// When the current generation began (ms since the Unix epoch): decides
    /// `discard-younger-primary`.
    pub generation_started_ms: u64,
    pub peers: Vec<PeerMeta>,
    /// `tandem invalidate --checksum` asked for the next full resync to compare checksums.
    pub checksum_resync_requested: bool,
}

impl MetaRecord {
    pub fn peer(&self, name: &str) -> Option<&PeerMeta> {
        self.peers.iter().find(|p| p.name == name)
    }

    /// The peer's entry, created with the next free bitmap slot if missing.
    pub fn peer_mut(&mut self, name: &str) -> &mut PeerMeta {
        if let Some(i) = self.peers.iter().position(|p| p.name == name) {
            return &mut self.peers[i];
        }
        let slot = self.peers.iter().map(|p| p.slot + 1).max().unwrap_or(0);
        self.peers.push(PeerMeta { name: name.to_string(), slot, bitmap_uuid: 0 });
        self.peers.last_mut().expect("just pushed")
    }

    pub fn generation(&self) -> tandem_protocol::Generation {
        tandem_protocol::Generation { current: self.current_generation, history: self.history.clone() }
    }
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_little_endian().with_limit::<{ SLOT - SLOT_HEAD }>()
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes(b[..4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

fn encode_slot(counter: u64, rec: &MetaRecord) -> Result<Vec<u8>> {
    let body = bincode::encode_to_vec(rec, bincode_config()).context("metadata too large for its slot")?;
    let mut slot = vec![0u8; SLOT];
    slot[0..8].copy_from_slice(MAGIC);
    slot[8..12].copy_from_slice(&FORMAT.to_le_bytes());
    slot[12..20].copy_from_slice(&counter.to_le_bytes());
    slot[20..24].copy_from_slice(&(body.len() as u32).to_le_bytes());
    slot[SLOT_HEAD..SLOT_HEAD + body.len()].copy_from_slice(&body);
    let crc = crc32fast::hash(&slot[8..24]) ^ crc32fast::hash(&slot[SLOT_HEAD..SLOT_HEAD + body.len()]);
    slot[24..28].copy_from_slice(&crc.to_le_bytes());
    Ok(slot)
}

fn decode_slot(slot: &[u8]) -> Result<(u64, MetaRecord), String> {
    if slot.len() < SLOT || &slot[0..8] != MAGIC {
        return Err("no metadata magic".into());
    }
    let format = le32(&slot[8..]);
    if format != FORMAT {
        return Err(format!("metadata format {format}, this build understands {FORMAT}"));
    }
    let counter = le64(&slot[12..]);
    let len = le32(&slot[20..]) as usize;
    if len > SLOT - SLOT_HEAD {
        return Err(format!("body length {len} exceeds the slot"));
    }
    let stored = le32(&slot[24..]);
    let crc = crc32fast::hash(&slot[8..24]) ^ crc32fast::hash(&slot[SLOT_HEAD..SLOT_HEAD + len]);
    if crc != stored {
        return Err(format!("checksum mismatch (stored {stored:08x}, computed {crc:08x})"));
    }
    let (rec, used): (MetaRecord, usize) =
        bincode::decode_from_slice(&slot[SLOT_HEAD..SLOT_HEAD + len], bincode_config())
            .map_err(|e| format!("undecodable body: {e}"))?;
    if used != len {
        return Err("trailing bytes in body".into());
    }
    Ok((counter, rec))
}

fn encode_al(tr: u64, extents: &[u32]) -> Vec<u8> {
    let mut b = vec![0u8; SLOT];
    b[0..8].copy_from_slice(AL_MAGIC);
    b[8..16].copy_from_slice(&tr.to_le_bytes());
    b[16..20].copy_from_slice(&(extents.len() as u32).to_le_bytes());
    for (i, e) in extents.iter().enumerate() {
        b[AL_HEAD + i * 4..AL_HEAD + i * 4 + 4].copy_from_slice(&e.to_le_bytes());
    }
    let crc = crc32fast::hash(&b[8..20]) ^ crc32fast::hash(&b[AL_HEAD..AL_HEAD + extents.len() * 4]);
    b[20..24].copy_from_slice(&crc.to_le_bytes());
    b
}

fn decode_al(b: &[u8]) -> Option<(u64, Vec<u32>)> {
    if b.len() < SLOT || &b[0..8] != AL_MAGIC {
        return None;
    }
    let tr = le64(&b[8..]);
    let n = le32(&b[16..]) as usize;
    if n > AL_MAX_EXTENTS {
        return None;
    }
    let crc = crc32fast::hash(&b[8..20]) ^ crc32fast::hash(&b[AL_HEAD..AL_HEAD + n * 4]);
    if crc != le32(&b[20..]) {
        return None;
    }
    Some((tr, (0..n).map(|i| le32(&b[AL_HEAD + i * 4..])).collect()))
}

/// Pages a bitmap of `bits` bits occupies.
pub fn bitmap_pages(bits: u64) -> u64 {
    bits.div_ceil(64).div_ceil(PAGE_WORDS as u64).max(1)
}

pub struct MetaFile {
    path: PathBuf,
    file: File,
    counter: u64,
    record: MetaRecord,
    al_tr: u64,
}

impl MetaFile {
    /// Creates a new metadata file holding `record`, an empty activity log and clean
    /// bitmaps. Fails if the file exists.
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
        let mut m = Self { path: path.to_path_buf(), file, counter: 0, record, al_tr: 0 };
        // Both copies of everything valid from the start.
        m.store()?;
        m.store()?;
        m.store_al(&[])?;
        m.store_al(&[])?;
        Ok(m)
    }

    pub fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, true)
    }

    /// Opens for inspection only (`tandem dump-md` while the agent runs).
    pub fn open_readonly(path: &Path) -> Result<Self> {
        Self::open_with(path, false)
    }

    fn open_with(path: &Path, write: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .with_context(|| format!("cannot open metadata {}", path.display()))?;
        let mut buf = vec![0u8; 4 * SLOT];
        let n = read_up_to(&file, &mut buf, 0)?;
        let slot = |i: usize| -> &[u8] {
            if n >= (i + 1) * SLOT {
                &buf[i * SLOT..(i + 1) * SLOT]
            } else {
                &[]
            }
        };
        let a = decode_slot(slot(0));
        let b = decode_slot(slot(1));
        let (counter, record) = match (a, b) {
            (Ok(x), Ok(y)) => {
                if x.0 >= y.0 {
                    x
                } else {
                    y
                }
            }
            (Ok(x), Err(e)) | (Err(e), Ok(x)) => {
                warn!(meta = %path.display(), "one superblock copy is damaged ({e}); using the other, update {}", x.0);
                x
            }
            (Err(ea), Err(eb)) => {
                bail!(
                    "metadata {} is corrupt: copy A: {ea}; copy B: {eb}. Refusing to start on it. \
                     If this node's data is expendable, move the file away and let the agent \
                     create new metadata (the disk will be inconsistent until resynced).",
                    path.display()
                )
            }
        };
        let al_tr =
            [decode_al(slot(2)), decode_al(slot(3))].into_iter().flatten().map(|(t, _)| t).max().unwrap_or(0);
        Ok(Self { path: path.to_path_buf(), file, counter, record, al_tr })
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

    /// The activity log's hot extents as last stored (the newest valid copy).
    pub fn load_al(&self) -> Result<Vec<u32>> {
        let mut buf = vec![0u8; 2 * SLOT];
        let n = read_up_to(&self.file, &mut buf, AL_OFFSET)?;
        let copies: Vec<(u64, Vec<u32>)> = [0, 1]
            .iter()
            .filter(|i| n >= (*i + 1) * SLOT)
            .filter_map(|i| decode_al(&buf[i * SLOT..(i + 1) * SLOT]))
            .collect();
        match copies.into_iter().max_by_key(|(t, _)| *t) {
            Some((_, e)) => Ok(e),
            None => Err(anyhow!("activity log in {} is damaged in both copies", self.path.display())),
        }
    }

    /// Durably replaces the activity log's hot set.
    pub fn store_al(&mut self, extents: &[u32]) -> std::io::Result<()> {
        if extents.len() > AL_MAX_EXTENTS {
            return Err(std::io::Error::other(format!(
                "{} hot extents exceed the log's {AL_MAX_EXTENTS}",
                extents.len()
            )));
        }
        let tr = self.al_tr + 1;
        let at = AL_OFFSET + (tr % 2) * SLOT as u64;
        self.file.write_all_at(&encode_al(tr, extents), at)?;
        self.file.sync_data()?;
        self.al_tr = tr;
        Ok(())
    }

    fn slot_offset(&self, slot: u32) -> u64 {
        let bits = self.record.size.div_ceil(self.record.bitmap_granularity);
        BITMAP_OFFSET + slot as u64 * bitmap_pages(bits) * SLOT as u64
    }

    /// Reads a peer's bitmap. Pages never written read as clean; a damaged page reads as
    /// all dirty (and is reported).
    pub fn load_bitmap(&self, peer: &str) -> Result<DirtyBitmap> {
        let mut bm = DirtyBitmap::new(self.record.size, self.record.bitmap_granularity);
        let Some(p) = self.record.peer(peer) else { return Ok(bm) };
        let pages = bitmap_pages(bm.bit_count());
        let base = self.slot_offset(p.slot);
        let mut buf = vec![0u8; SLOT];
        let mut damaged = 0;
        for page in 0..pages {
            let n = read_up_to(&self.file, &mut buf, base + page * SLOT as u64)?;
            if n == 0 || buf.iter().all(|b| *b == 0) {
                continue;
            }
            let ok = n == SLOT
                && le32(&buf[4..]) as u64 == page
                && le32(&buf[8..]) == p.slot
                && crc32fast::hash(&buf[4..]) == le32(&buf[0..]);
            let first_word = page as usize * PAGE_WORDS;
            if ok {
                let words: Vec<u64> = buf[PAGE_HEAD..].chunks(8).map(le64).collect();
                bm.load_words(first_word, &words);
            } else {
                damaged += 1;
                bm.load_words(first_word, &vec![u64::MAX; PAGE_WORDS]);
            }
        }
        if damaged > 0 {
            warn!(meta = %self.path.display(), peer, damaged, "damaged bitmap pages: their blocks are treated as out of sync");
        }
        Ok(bm)
    }

    /// Writes the pages of a peer's bitmap holding bits `[first_bit, end_bit)` (all pages if
    /// `None`); the caller syncs with [`MetaFile::sync`].
    pub fn store_bitmap_pages(
        &mut self,
        peer: &str,
        bm: &DirtyBitmap,
        bits: Option<(u64, u64)>,
    ) -> std::io::Result<()> {
        let slot = self.record.peer(peer).map(|p| p.slot);
        let Some(slot) = slot else {
            return Err(std::io::Error::other(format!("no bitmap slot for peer {peer}")));
        };
        let total_pages = bitmap_pages(bm.bit_count());
        let per_page = (PAGE_WORDS * 64) as u64;
        let (first, last) = match bits {
            Some((a, b)) => (a / per_page, (b.max(a + 1) - 1) / per_page),
            None => (0, total_pages - 1),
        };
        let base = self.slot_offset(slot);
        let words = bm.words();
        for page in first..=last.min(total_pages - 1) {
            let mut buf = vec![0u8; SLOT];
            buf[4..8].copy_from_slice(&(page as u32).to_le_bytes());
            buf[8..12].copy_from_slice(&slot.to_le_bytes());
            let w0 = page as usize * PAGE_WORDS;
            for (i, w) in words.iter().skip(w0).take(PAGE_WORDS).enumerate() {
                buf[PAGE_HEAD + i * 8..PAGE_HEAD + i * 8 + 8].copy_from_slice(&w.to_le_bytes());
            }
            let crc = crc32fast::hash(&buf[4..]);
            buf[0..4].copy_from_slice(&crc.to_le_bytes());
            self.file.write_all_at(&buf, base + page * SLOT as u64)?;
        }
        Ok(())
    }

    pub fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

/// What `tandem dump-md` shows.
#[derive(Debug, Clone, Serialize)]
pub struct MetaDump {
    pub path: PathBuf,
    pub record: MetaRecord,
    pub activity_log: Vec<u32>,
    /// Per peer: bytes marked out of sync in the persisted bitmap.
    pub out_of_sync_bytes: Vec<(String, u64)>,
}

impl MetaDump {
    pub fn render(&self) -> String {
        let r = &self.record;
        let mut s = format!(
            "metadata {}
  cluster {}  resource {}  node {}
  size {}  bitmap granularity {}  activity-log extent {}
  disk {}  primary {}  crashed primary {}  next seq {}
  generation {:016x} (began at {} ms)  history {}
",
            self.path.display(),
            r.cluster,
            r.resource,
            r.node,
            r.size,
            r.bitmap_granularity,
            r.al_extent_size,
            r.disk.as_str(),
            r.primary,
            r.crashed_primary,
            r.next_seq,
            r.current_generation,
            r.generation_started_ms,
            r.history.iter().map(|g| format!("{g:016x}")).collect::<Vec<_>>().join(" "),
        );
        s += &format!(
            "  activity log: {} hot extents {:?}
",
            self.activity_log.len(),
            self.activity_log
        );
        for p in &r.peers {
            let oos = self.out_of_sync_bytes.iter().find(|(n, _)| *n == p.name).map_or(0, |x| x.1);
            s += &format!(
                "  peer {}: bitmap slot {}  bitmap generation {:016x}  out of sync {oos} bytes\n",
                p.name, p.slot, p.bitmap_uuid
            );
        }
        s
    }
}

/// Reads a metadata file for display, without modifying it.
pub fn dump(path: &Path) -> Result<MetaDump> {
    let m = MetaFile::open_readonly(path)?;
    let activity_log = m.load_al().unwrap_or_default();
    let mut out_of_sync_bytes = Vec::new();
    for p in &m.record().peers {
        out_of_sync_bytes.push((p.name.clone(), m.load_bitmap(&p.name)?.dirty_bytes()));
    }
    Ok(MetaDump { path: path.to_path_buf(), record: m.record().clone(), activity_log, out_of_sync_bytes })
}

fn read_up_to(f: &File, buf: &mut [u8], at: u64) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let r = f.read_at(&mut buf[n..], at + n as u64)?;
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
            size: 1 << 30,
            bitmap_granularity: 4096,
            al_extent_size: 4 << 20,
            disk: DiskState::UpToDate,
            primary: false,
            crashed_primary: false,
            next_seq: 1,
            current_generation: 1,
            history: vec![],
            generation_started_ms: 0,
            peers: vec![],
            checksum_resync_requested: false,
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
                (0..4 * SLOT as u32).map(|i| (i.wrapping_mul(2654435761) ^ seed) as u8).collect();
            std::fs::write(&p, &bytes).unwrap();
            assert!(MetaFile::open(&p).is_err());
        }
    }

    #[test]
    fn activity_log_and_bitmaps_round_trip_and_damage_is_conservative() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m");
        let mut m = MetaFile::create(&p, rec()).unwrap();
        m.update(|r| {
            r.peer_mut("beta");
            r.peer_mut("gamma");
        })
        .unwrap();
        m.store_al(&[3, 7, 9]).unwrap();
        let mut bm = DirtyBitmap::new(1 << 30, 4096);
        bm.set_range(12345 * 4096, 3 * 4096);
        bm.set_range(200_000 * 4096, 4096);
        m.store_bitmap_pages("beta", &bm, None).unwrap();
        m.sync().unwrap();
        drop(m);
        let m = MetaFile::open(&p).unwrap();
        assert_eq!(m.load_al().unwrap(), vec![3, 7, 9]);
        let mut loaded = m.load_bitmap("beta").unwrap();
        assert_eq!(loaded.count(), 4);
        assert!(loaded.is_set(12345) && loaded.is_set(200_000));
        assert_eq!(m.load_bitmap("gamma").unwrap().count(), 0);
        // Damage the page holding bit 200000: every bit of that page counts as dirty.
        let page = 200_000 / (PAGE_WORDS as u64 * 64);
        let off = m.slot_offset(0) + page * SLOT as u64 + 100;
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[off as usize] ^= 1;
        std::fs::write(&p, &bytes).unwrap();
        let m = MetaFile::open(&p).unwrap();
        loaded = m.load_bitmap("beta").unwrap();
        assert!(loaded.is_set(12345));
        assert!(loaded.count() >= PAGE_WORDS as u64 * 64, "a damaged page must read as all dirty");
    }
}
