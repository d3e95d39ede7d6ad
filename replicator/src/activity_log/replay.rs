//! Replaying the activity log of a primary that crashed: its hot extents become out of sync
//! for every peer.
//!
//! Invariant, after the replay: every block that may differ between this node and a peer is
//! marked in that peer's bitmap. The log's invariant (see the parent module) puts every such
//! block in a persisted bitmap bit or a persisted hot extent; the replay turns the second
//! into the first, so the resync that follows covers them all.
//!
//! Two rules keep it so:
//! - Extents are numbered in the size the log was written with, not the size configured now
//!   (the configuration may have changed while the node was down), and the same size locates
//!   them: one extent size for counting and for marking.
//! - A log that cannot be read says nothing about where the writes were: the whole volume is
//!   marked. So is a log whose extent size is unusable (zero).

/// Marks the hot extents of a crashed primary's activity log in every peer's bitmap and
/// returns how many bytes of the volume that covers.
///
/// `recorded`: the hot extents read from the metadata, `None` if the log is damaged.
/// `extent_size`: the extent size the log was written with. The last extent of a volume
/// whose size is not a multiple of it is clipped to the volume; extents past the end mark
/// nothing.
pub fn replay_activity_log<'a>(
    recorded: Option<&[u32]>,
    extent_size: u64,
    volume_size: u64,
    bitmaps: impl IntoIterator<Item = &'a mut crate::DirtyBitmap>,
) -> u64 {
    let ranges = hot_ranges(recorded, extent_size, volume_size);
    for bm in bitmaps {
        for (offset, len) in &ranges {
            bm.set_range(*offset, *len);
        }
    }
    ranges.iter().map(|(_, len)| len).sum()
}

/// The byte ranges `(offset, len)` of the volume the log covers, sorted, without overlaps.
fn hot_ranges(recorded: Option<&[u32]>, extent_size: u64, volume_size: u64) -> Vec<(u64, u64)> {
    let Some(extents) = recorded.filter(|_| extent_size > 0) else {
        return if volume_size > 0 { vec![(0, volume_size)] } else { Vec::new() };
    };
    let mut extents = extents.to_vec();
    extents.sort_unstable();
    extents.dedup();
    extents
        .into_iter()
        .filter_map(|e| {
            let offset = u64::from(e).checked_mul(extent_size).filter(|o| *o < volume_size)?;
            Some((offset, extent_size.min(volume_size - offset)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::DirtyBitmap;

    const MIB: u64 = 1 << 20;

    #[test]
    fn recorded_extents_are_marked_exactly_for_every_peer() {
        let mut beta = DirtyBitmap::new(64 * MIB, 4096);
        let mut gamma = DirtyBitmap::new(64 * MIB, 4096);
        gamma.set_range(40 * MIB, 4096); // already out of sync: stays so
        let marked = replay_activity_log(Some(&[5, 1, 5]), 4 * MIB, 64 * MIB, [&mut beta, &mut gamma]);
        assert_eq!(marked, 8 * MIB, "a duplicate extent counts once");
        assert_eq!(beta.dirty_runs(), vec![(4 * MIB, 4 * MIB), (20 * MIB, 4 * MIB)]);
        assert_eq!(gamma.dirty_runs(), vec![(4 * MIB, 4 * MIB), (20 * MIB, 4 * MIB), (40 * MIB, 4096)]);
    }

    #[test]
    fn a_damaged_log_marks_everything_even_when_extents_do_not_divide_the_volume() {
        // 36 MiB in 8 MiB extents: four and a half. Counting extents in one size and marking
        // them in another (the bug this module replaced) left part of such a volume unmarked.
        for extent_size in [4 * MIB, 8 * MIB, 64 * MIB] {
            let mut bm = DirtyBitmap::new(36 * MIB + 4096, 4096);
            let marked = replay_activity_log(None, extent_size, 36 * MIB + 4096, [&mut bm]);
            assert_eq!(marked, 36 * MIB + 4096);
            assert_eq!(bm.count(), bm.bit_count(), "extent size {extent_size}");
        }
    }

    #[test]
    fn an_unusable_extent_size_marks_everything() {
        let mut bm = DirtyBitmap::new(8 * MIB, 4096);
        assert_eq!(replay_activity_log(Some(&[0]), 0, 8 * MIB, [&mut bm]), 8 * MIB);
        assert_eq!(bm.count(), bm.bit_count());
    }

    #[test]
    fn the_last_partial_extent_is_clipped_and_extents_past_the_end_mark_nothing() {
        let size = 10 * MIB + 8192;
        let mut bm = DirtyBitmap::new(size, 4096);
        // Extent 2 of 4 MiB is [8 MiB, 12 MiB): only [8 MiB, size) exists. Extents 3 and
        // u32::MAX start past the end.
        let marked = replay_activity_log(Some(&[2, 3, u32::MAX]), 4 * MIB, size, [&mut bm]);
        assert_eq!(marked, 2 * MIB + 8192);
        assert_eq!(bm.dirty_runs(), vec![(8 * MIB, 2 * MIB + 8192)]);
        let huge = replay_activity_log(Some(&[u32::MAX]), 1 << 40, size, [&mut bm]);
        assert_eq!(huge, 0, "an extent whose offset overflows lies past the end");
    }

    #[test]
    fn an_empty_log_marks_nothing() {
        let mut bm = DirtyBitmap::new(8 * MIB, 4096);
        assert_eq!(replay_activity_log(Some(&[]), 4 * MIB, 8 * MIB, [&mut bm]), 0);
        assert_eq!(bm.count(), 0);
    }
}
