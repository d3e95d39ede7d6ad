//! A volume group as one store: the images of a resource's volumes laid end to end in one
//! address space, so the engine replicates all of them in one ordered change stream and a
//! flush is a barrier across every volume. That is what keeps a standby's volumes
//! consistent *with each other* (a message moved from the queue volume to the store volume
//! is in one of them at every barrier), which separate replication streams cannot promise.

use std::io;
use std::sync::Arc;

use bytes::Bytes;
use tandem_replicator::{BlockStore, WriteDone};

/// One volume's place in the group's address space.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeLayout {
    pub name: String,
    pub offset: u64,
    pub size: u64,
}

/// The volumes' images as one [`BlockStore`]. I/O crossing a boundary (a resync run) is
/// split; each part goes to its image.
pub struct VolumeSet {
    parts: Vec<(VolumeLayout, Arc<dyn BlockStore>)>,
    size: u64,
}

impl VolumeSet {
    pub fn new(parts: Vec<(VolumeLayout, Arc<dyn BlockStore>)>) -> Self {
        let size = parts.last().map_or(0, |(l, _)| l.offset + l.size);
        debug_assert!(parts.windows(2).all(|w| w[0].0.offset + w[0].0.size == w[1].0.offset));
        Self { parts, size }
    }

    /// Calls `f(store, offset in it, range in the request)` for each part of the range.
    fn split(
        &self,
        offset: u64,
        len: u64,
        mut f: impl FnMut(&dyn BlockStore, u64, std::ops::Range<usize>) -> io::Result<()>,
    ) -> io::Result<()> {
        let end = offset.checked_add(len).filter(|e| *e <= self.size).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("[{offset}, +{len}) outside the volume group"),
            )
        })?;
        for (l, store) in &self.parts {
            let (a, b) = (offset.max(l.offset), end.min(l.offset + l.size));
            if a < b {
                f(store.as_ref(), a - l.offset, (a - offset) as usize..(b - offset) as usize)?;
            }
        }
        Ok(())
    }
}

impl BlockStore for VolumeSet {
    fn size(&self) -> u64 {
        self.size
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.split(offset, data.len() as u64, |s, at, r| s.write_at(at, &data[r]))
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let len = buf.len() as u64;
        self.split(offset, len, |s, at, r| s.read_at(at, &mut buf[r]))
    }

    fn flush(&self) -> io::Result<()> {
        for (_, s) in &self.parts {
            s.flush()?;
        }
        Ok(())
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.split(offset, len, |s, at, r| s.discard(at, (r.end - r.start) as u64))
    }

    fn submits_writes(&self) -> bool {
        self.parts.iter().all(|(_, s)| s.submits_writes())
    }

    /// A write inside one volume goes to its image's writer; one crossing a boundary (never
    /// from the loop device's requests, which stay inside a volume's device) is written here.
    fn submit_write(&self, offset: u64, data: Bytes, done: WriteDone) {
        let end = offset.saturating_add(data.len() as u64);
        match self.parts.iter().find(|(l, _)| offset >= l.offset && end <= l.offset + l.size) {
            Some((l, s)) => s.submit_write(offset - l.offset, data, done),
            None => done(self.write_at(offset, &data)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tandem_replicator::MemStore;

    #[test]
    fn io_across_a_boundary_lands_in_both_images() {
        let a = Arc::new(MemStore::new(8192));
        let b = Arc::new(MemStore::new(16384));
        let set = VolumeSet::new(vec![
            (VolumeLayout { name: "queue".into(), offset: 0, size: 8192 }, a.clone()),
            (VolumeLayout { name: "store".into(), offset: 8192, size: 16384 }, b.clone()),
        ]);
        assert_eq!(set.size(), 24576);
        let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        set.write_at(4096, &data).unwrap();
        assert_eq!(&a.snapshot()[4096..], &data[..4096]);
        assert_eq!(&b.snapshot()[..4096], &data[4096..]);
        let mut back = vec![0u8; 8192];
        set.read_at(4096, &mut back).unwrap();
        assert_eq!(back, data);
        set.discard(0, 12288).unwrap();
        assert!(a.snapshot().iter().all(|x| *x == 0));
        assert!(b.snapshot()[..4096].iter().all(|x| *x == 0));
        assert!(set.write_at(20480, &data).is_err(), "past the end");
    }
}
