//! How the engine's dirty tracking reaches the metadata file: the activity log's
//! transactions and the bitmap pages of an extent leaving it.

use std::collections::BTreeMap;
use std::io;
use std::sync::{Arc, Mutex};

use tandem_replicator::{ActivityLogStore, DirtyBitmap};

use crate::meta::MetaFile;

pub struct MetaAl {
    pub meta: Arc<Mutex<MetaFile>>,
    pub bitmaps: BTreeMap<String, Arc<Mutex<DirtyBitmap>>>,
    pub extent_size: u64,
    pub granularity: u64,
}

impl ActivityLogStore for MetaAl {
    fn write_hot_set(&self, extents: &[u32]) -> io::Result<()> {
        self.meta.lock().unwrap().store_al(extents)
    }

    fn persist_extent(&self, extent: u32) -> io::Result<()> {
        let first = extent as u64 * self.extent_size / self.granularity;
        let end = first + self.extent_size / self.granularity;
        let mut meta = self.meta.lock().unwrap();
        // Lock order everywhere: metadata, then bitmap.
        for (peer, bm) in &self.bitmaps {
            meta.store_bitmap_pages(peer, &bm.lock().unwrap(), Some((first, end)))?;
        }
        meta.sync()
    }
}

/// Writes every peer's bitmap in full and syncs.
pub fn persist_all_bitmaps(
    meta: &Mutex<MetaFile>,
    bitmaps: &BTreeMap<String, Arc<Mutex<DirtyBitmap>>>,
) -> io::Result<()> {
    let mut meta = meta.lock().unwrap();
    for (peer, bm) in bitmaps {
        meta.store_bitmap_pages(peer, &bm.lock().unwrap(), None)?;
    }
    meta.sync()
}
