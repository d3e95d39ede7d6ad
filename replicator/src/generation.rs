//! Data generation identifiers and the decision they drive when two nodes connect.
//!
//! Like DRBD's UUIDs: `current` names the data a node holds. A primary that goes on without
//! a peer starts a new generation; the one it leaves becomes its *bitmap ID* for that peer —
//! "the data the peer has, plus what my bitmap records" — and moves into the history. When
//! two nodes meet, comparing these IDs tells whether their data is the same, which one is
//! newer and whether a bitmap suffices, whether both moved on independently (split brain),
//! or whether they hold unrelated data.

use tandem_protocol::{AfterSplitBrain, DiskState, Generation};

use crate::split_brain::{resolve, Resolution, SplitBrainView};

/// Generation of a brand-new, all-zero image: any two of them hold the same data.
pub const BLANK: u64 = 1;
/// Generation of data nobody vouches for (an image found without metadata).
pub const UNKNOWN: u64 = 0;
/// History entries kept.
pub const HISTORY: usize = 8;

/// One side's inputs to [`decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SideView {
    pub node: String,
    pub generation: Generation,
    /// This side's bitmap ID for the other side (0 = none).
    pub bitmap_uuid: u64,
    /// This side has bits set for the other side.
    pub dirty: bool,
    pub disk: DiskState,
    pub primary: bool,
    pub crashed_primary: bool,
    /// Bytes this side has marked out of sync for the other (its changes since they parted).
    pub changes: u64,
    /// When this side's current generation began (ms since the Unix epoch; 0 = unknown).
    pub generation_started_ms: u64,
    /// `resolve --discard-local` was run on this side.
    pub discard_local: bool,
    pub policy: AfterSplitBrain,
}

impl SideView {
    fn split_brain_view(&self) -> SplitBrainView {
        SplitBrainView {
            node: self.node.clone(),
            changes: self.changes,
            generation_started_ms: self.generation_started_ms,
            primary: self.primary,
            discard_local: self.discard_local,
            policy: self.policy,
        }
    }
}

/// [`decide`], with a split brain settled by command or policy where one applies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: SyncDecision,
    /// Set when the pair is in split brain: how it was (or was not) resolved.
    pub split_brain: Option<Resolution>,
}

/// Decides as [`decide`] does; a split brain that `resolve --discard-local` or the
/// `after_split_brain` policy settles becomes a resync towards the losing side.
pub fn decide_with_policy(local: &SideView, remote: &SideView) -> Verdict {
    let decision = decide(local, remote);
    if decision != SyncDecision::SplitBrain {
        return Verdict { decision, split_brain: None };
    }
    // Both sides' bitmaps record everything each wrote since the generation they share: their
    // union is what differs. Without a shared bitmap ID only a full copy is safe.
    let bitmaps_cover = local.bitmap_uuid != 0 && local.bitmap_uuid == remote.bitmap_uuid;
    let resolution = resolve(&local.split_brain_view(), &remote.split_brain_view());
    let decision = match resolution {
        Resolution::LocalLoses => SyncDecision::Target { full: !bitmaps_cover },
        Resolution::RemoteLoses => SyncDecision::Source { full: !bitmaps_cover },
        Resolution::Disconnect(_) => SyncDecision::SplitBrain,
    };
    Verdict { decision, split_brain: Some(resolution) }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncDecision {
    /// Same data: nothing to copy.
    InSync,
    /// This node's data is newer: it sends. `full`: every block, else the bitmaps' union.
    Source { full: bool },
    /// The peer's data is newer: this node receives.
    Target { full: bool },
    /// Both wrote independently since they last agreed.
    SplitBrain,
    /// No common ancestry: never sync automatically.
    Unrelated,
    /// Neither side has usable data.
    BothInconsistent,
}

impl SyncDecision {
    /// The same decision seen from the other side.
    pub fn mirrored(self) -> Self {
        match self {
            SyncDecision::Source { full } => SyncDecision::Target { full },
            SyncDecision::Target { full } => SyncDecision::Source { full },
            other => other,
        }
    }
}

/// Decides, from `local`'s point of view, what happens between `local` and `remote`.
/// Symmetric: `decide(a, b) == decide(b, a).mirrored()`.
pub fn decide(local: &SideView, remote: &SideView) -> SyncDecision {
    use SyncDecision::*;
    let (l, r) = (&local.generation, &remote.generation);
    let l_bad = local.disk == DiskState::Inconsistent;
    let r_bad = remote.disk == DiskState::Inconsistent;
    if l_bad && r_bad {
        return BothInconsistent;
    }
    // An inconsistent copy (never synced, or a resync was interrupted) is always the target.
    // A bitmap resync suffices if the other side's bitmap ID names our generation.
    if l_bad {
        let bitmap_ok = l.current != UNKNOWN && (remote.bitmap_uuid == l.current || r.current == l.current);
        return Target { full: !bitmap_ok };
    }
    if r_bad {
        let bitmap_ok = r.current != UNKNOWN && (local.bitmap_uuid == r.current || l.current == r.current);
        return Source { full: !bitmap_ok };
    }
    if l.current == r.current {
        if !local.dirty && !remote.dirty && !local.crashed_primary && !remote.crashed_primary {
            return InSync;
        }
        // Same generation but blocks may differ (a primary crashed with writes in flight):
        // the crashed primary, else the side with marks, else the primary, sends.
        let local_sends = match (local.crashed_primary, remote.crashed_primary) {
            (true, false) => true,
            (false, true) => false,
            _ => match (local.dirty, remote.dirty) {
                (true, false) => true,
                (false, true) => false,
                _ => match (local.primary, remote.primary) {
                    (true, false) => true,
                    (false, true) => false,
                    _ => local.node < remote.node,
                },
            },
        };
        return if local_sends { Source { full: false } } else { Target { full: false } };
    }
    let l_ahead = local.bitmap_uuid != 0 && local.bitmap_uuid == r.current;
    let r_ahead = remote.bitmap_uuid != 0 && remote.bitmap_uuid == l.current;
    match (l_ahead, r_ahead) {
        (true, false) => return Source { full: false },
        (false, true) => return Target { full: false },
        _ => {}
    }
    // Both moved on from the same generation while apart.
    if local.bitmap_uuid != 0 && local.bitmap_uuid == remote.bitmap_uuid {
        return SplitBrain;
    }
    let l_descends = r.current != UNKNOWN && l.history.contains(&r.current);
    let r_descends = l.current != UNKNOWN && r.history.contains(&l.current);
    match (l_descends, r_descends) {
        (true, false) => return Source { full: true },
        (false, true) => return Target { full: true },
        (true, true) => return Unrelated,
        _ => {}
    }
    // Both descend from a common generation but neither is the other's ancestor.
    if l.history.iter().any(|g| r.history.contains(g) && *g != UNKNOWN) {
        return SplitBrain;
    }
    Unrelated
}

/// Starts a new generation: the old one goes into the history.
pub fn rotate(g: &mut Generation, new: u64) -> u64 {
    let old = g.current;
    g.history.insert(0, old);
    g.history.truncate(HISTORY);
    g.current = new;
    old
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use SyncDecision::*;

    fn side(node: &str, current: u64, history: &[u64], bitmap_uuid: u64) -> SideView {
        SideView {
            node: node.into(),
            generation: Generation { current, history: history.to_vec() },
            bitmap_uuid,
            dirty: bitmap_uuid != 0,
            disk: DiskState::UpToDate,
            primary: false,
            crashed_primary: false,
            changes: if bitmap_uuid != 0 { 4096 } else { 0 },
            generation_started_ms: 0,
            discard_local: false,
            policy: AfterSplitBrain::Disconnect,
        }
    }

    #[test]
    fn decision_table() {
        // (local, remote, expected) — the DRBD table plus Tandem's inconsistent/crash rows.
        let g = 100;
        let cases: Vec<(SideView, SideView, SyncDecision)> = vec![
            // two new images
            (side("a", BLANK, &[], 0), side("b", BLANK, &[], 0), InSync),
            // connected pair, nothing happened
            (side("a", g, &[BLANK], 0), side("b", g, &[BLANK], 0), InSync),
            // a went on without b: bitmap resync a -> b
            (side("a", 200, &[g], g), side("b", g, &[BLANK], 0), Source { full: false }),
            (side("b", g, &[BLANK], 0), side("a", 200, &[g], g), Target { full: false }),
            // failover: b promoted while a was away; a wrote nothing new (crashed before noticing)
            (
                SideView { crashed_primary: true, dirty: true, ..side("a", g, &[BLANK], 0) },
                side("b", 300, &[g], g),
                Target { full: false },
            ),
            // both moved on from g: split brain
            (side("a", 200, &[g], g), side("b", 300, &[g], g), SplitBrain),
            // b is an ancestor but a has no bitmap for it: full sync
            (side("a", 400, &[200, g], 0), side("b", g, &[BLANK], 0), Source { full: true }),
            // nothing in common
            (side("a", 500, &[], 0), side("b", 600, &[], 0), Unrelated),
            // crashed primary, same generation: its activity log is resynced from it
            (
                SideView { crashed_primary: true, dirty: true, ..side("a", g, &[], 0) },
                side("b", g, &[], 0),
                Source { full: false },
            ),
            // an inconsistent node is the target; full when nothing names its data
            (
                SideView { disk: DiskState::Inconsistent, ..side("a", UNKNOWN, &[], 0) },
                side("b", g, &[], 0),
                Target { full: true },
            ),
            // an interrupted bitmap resync resumes as a bitmap resync
            (
                SideView { disk: DiskState::Inconsistent, ..side("a", g, &[], 0) },
                side("b", 200, &[g], g),
                Target { full: false },
            ),
            (
                SideView { disk: DiskState::Inconsistent, ..side("a", g, &[], 0) },
                SideView { disk: DiskState::Inconsistent, ..side("b", g, &[], 0) },
                BothInconsistent,
            ),
        ];
        for (i, (l, r, want)) in cases.iter().enumerate() {
            assert_eq!(decide(l, r), *want, "case {i}: {l:?} vs {r:?}");
            assert_eq!(decide(r, l), want.mirrored(), "case {i} mirrored");
        }
    }

    fn arb_side(node: &'static str) -> impl Strategy<Value = SideView> {
        let ids = prop_oneof![Just(UNKNOWN), Just(BLANK), 100u64..104];
        (
            ids.clone(),
            proptest::collection::vec(ids.clone(), 0..3),
            prop_oneof![Just(0u64), ids],
            any::<bool>(),
            prop_oneof![Just(DiskState::UpToDate), Just(DiskState::Outdated), Just(DiskState::Inconsistent)],
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(
                move |(current, history, bitmap_uuid, dirty, disk, primary, crashed_primary)| SideView {
                    node: node.into(),
                    generation: Generation { current, history },
                    bitmap_uuid,
                    dirty,
                    disk,
                    primary,
                    crashed_primary,
                    changes: if dirty { 4096 } else { 0 },
                    generation_started_ms: 0,
                    discard_local: false,
                    policy: AfterSplitBrain::Disconnect,
                },
            )
    }

    #[test]
    fn split_brain_is_settled_only_by_command_or_policy() {
        let g = 100;
        let a = side("a", 200, &[g], g);
        let b = side("b", 300, &[g], g);
        let v = decide_with_policy(&a, &b);
        assert_eq!(v.decision, SplitBrain);
        assert!(matches!(v.split_brain, Some(Resolution::Disconnect(_))));
        // The administrator discards a's changes: a receives the union of both bitmaps.
        let a_discards = SideView { discard_local: true, ..a.clone() };
        assert_eq!(decide_with_policy(&a_discards, &b).decision, Target { full: false });
        assert_eq!(decide_with_policy(&b, &a_discards).decision, Source { full: false });
        // Policy: b changed nothing since the split.
        let pol = AfterSplitBrain::DiscardZeroChanges;
        let a2 = SideView { policy: pol, changes: 8192, ..a.clone() };
        let b2 = SideView { policy: pol, changes: 0, ..b.clone() };
        assert_eq!(decide_with_policy(&a2, &b2).decision, Source { full: false });
        // Split brain found through the history only: the bitmaps do not cover it.
        let a3 = SideView { discard_local: true, ..side("a", 400, &[200, g], 0) };
        let b3 = side("b", 300, &[g], 0);
        assert_eq!(decide(&a3, &b3), SplitBrain);
        assert_eq!(decide_with_policy(&a3, &b3).decision, Target { full: true });
        // Not a split brain: policies change nothing.
        let c = side("c", g, &[BLANK], 0);
        let a4 = SideView { policy: AfterSplitBrain::DiscardYoungerPrimary, ..side("a", 200, &[g], g) };
        assert_eq!(
            decide_with_policy(&a4, &c),
            Verdict { decision: Source { full: false }, split_brain: None }
        );
    }

    proptest! {
        /// Both nodes always reach the same conclusion about the pair.
        #[test]
        fn decision_is_symmetric(a in arb_side("a"), b in arb_side("b")) {
            prop_assert_eq!(decide(&a, &b), decide(&b, &a).mirrored());
        }

        /// Policies keep the verdict symmetric.
        #[test]
        fn verdict_is_symmetric(a in arb_side("a"), b in arb_side("b"), pa in 0u8..4, discard in any::<bool>()) {
            let policy = [AfterSplitBrain::Disconnect, AfterSplitBrain::DiscardZeroChanges,
                          AfterSplitBrain::DiscardYoungerPrimary, AfterSplitBrain::DiscardLeastChanges][pa as usize];
            let a = SideView { policy, discard_local: discard, ..a };
            let b = SideView { policy, ..b };
            let (l, r) = (decide_with_policy(&a, &b), decide_with_policy(&b, &a));
            prop_assert_eq!(l.decision, r.decision.mirrored());
            prop_assert_eq!(l.split_brain.map(|x| x.mirrored().kind()), r.split_brain.map(|x| x.kind()));
        }

        /// An inconsistent copy is never chosen as the source of a resync.
        #[test]
        fn inconsistent_never_sends(a in arb_side("a"), b in arb_side("b")) {
            if let SyncDecision::Source { .. } = decide(&a, &b) {
                prop_assert!(a.disk != DiskState::Inconsistent);
            }
        }
    }
}
