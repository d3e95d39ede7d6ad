//! What to do about a split brain: both nodes wrote as primary while apart, so each holds
//! changes the other lacks and one side's changes must be thrown away to reconnect.
//!
//! Nothing is ever discarded without either an explicit command on the losing node
//! (`resolve --discard-local`) or a policy both nodes are configured with. The function is
//! pure and symmetric, so both nodes reach the same verdict from the same two views.

pub use tandem_protocol::AfterSplitBrain;

/// One side's inputs to [`resolve`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SplitBrainView {
    pub node: String,
    /// Bytes this side changed since the split (its bitmap for the other side).
    pub changes: u64,
    /// When this side's current generation began (ms since the Unix epoch; 0 = unknown).
    pub generation_started_ms: u64,
    pub primary: bool,
    /// The administrator told this side to give up its changes.
    pub discard_local: bool,
    pub policy: AfterSplitBrain,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// This side's changes are discarded: it becomes the sync target.
    LocalLoses,
    /// The other side's changes are discarded: this side becomes the sync source.
    RemoteLoses,
    /// Stay disconnected; the reason says what the administrator can do.
    Disconnect(String),
}

impl Resolution {
    /// The verdict without its explanation (which is worded from one side's view).
    pub fn kind(&self) -> &'static str {
        match self {
            Resolution::LocalLoses => "local loses",
            Resolution::RemoteLoses => "remote loses",
            Resolution::Disconnect(_) => "disconnect",
        }
    }

    pub fn mirrored(self) -> Self {
        match self {
            Resolution::LocalLoses => Resolution::RemoteLoses,
            Resolution::RemoteLoses => Resolution::LocalLoses,
            d => d,
        }
    }
}

/// Decides, from `local`'s point of view, which side of a split brain gives up its changes.
pub fn resolve(local: &SplitBrainView, remote: &SplitBrainView) -> Resolution {
    use Resolution::*;
    let loser = match (local.discard_local, remote.discard_local) {
        (true, false) => Some(true),
        (false, true) => Some(false),
        (true, true) => {
            return Disconnect(format!(
                "both {} and {} were told to discard their changes; resolve on one node only",
                local.node, remote.node
            ))
        }
        (false, false) => {
            if local.policy != remote.policy {
                return Disconnect(format!(
                    "the nodes disagree on after_split_brain ({:?} on {}, {:?} on {}); resolve by hand",
                    local.policy, local.node, remote.policy, remote.node
                ));
            }
            by_policy(local, remote)
        }
    };
    let Some(local_loses) = loser else {
        return Disconnect(format!(
            "after_split_brain = {} does not pick a side ({} changed {} bytes, {} changed {} bytes); \
             run `tandem resolve RESOURCE --discard-local` on the node whose changes are to be thrown away",
            policy_name(local.policy),
            local.node,
            local.changes,
            remote.node,
            remote.changes
        ));
    };
    // A primary's data is in use: it is never thrown away under a mounted filesystem.
    let (l, w) = if local_loses { (local, remote) } else { (remote, local) };
    if l.primary {
        return Disconnect(format!(
            "{} should discard its changes but is primary; demote it (its changes will then be replaced by {}'s)",
            l.node, w.node
        ));
    }
    if local_loses {
        LocalLoses
    } else {
        RemoteLoses
    }
}

/// `Some(true)` if the policy says `local` loses, `Some(false)` if `remote` does.
fn by_policy(local: &SplitBrainView, remote: &SplitBrainView) -> Option<bool> {
    match local.policy {
        AfterSplitBrain::Disconnect => None,
        AfterSplitBrain::DiscardZeroChanges => match (local.changes == 0, remote.changes == 0) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            // Neither changed anything: nothing is lost whichever way it goes.
            (true, true) => Some(younger(local, remote)),
            (false, false) => None,
        },
        AfterSplitBrain::DiscardYoungerPrimary => Some(younger(local, remote)),
        AfterSplitBrain::DiscardLeastChanges => match local.changes.cmp(&remote.changes) {
            std::cmp::Ordering::Less => Some(true),
            std::cmp::Ordering::Greater => Some(false),
            std::cmp::Ordering::Equal => Some(younger(local, remote)),
        },
    }
}

/// Whether `local` became primary after `remote` (ties broken by name, so both sides agree).
fn younger(local: &SplitBrainView, remote: &SplitBrainView) -> bool {
    (local.generation_started_ms, &local.node) > (remote.generation_started_ms, &remote.node)
}

pub fn policy_name(p: AfterSplitBrain) -> &'static str {
    match p {
        AfterSplitBrain::Disconnect => "disconnect",
        AfterSplitBrain::DiscardZeroChanges => "discard-zero-changes",
        AfterSplitBrain::DiscardYoungerPrimary => "discard-younger-primary",
        AfterSplitBrain::DiscardLeastChanges => "discard-least-changes",
    }
}

pub fn parse_policy(s: &str) -> Result<AfterSplitBrain, String> {
    Ok(match s {
        "disconnect" => AfterSplitBrain::Disconnect,
        "discard-zero-changes" => AfterSplitBrain::DiscardZeroChanges,
        "discard-younger-primary" => AfterSplitBrain::DiscardYoungerPrimary,
        "discard-least-changes" => AfterSplitBrain::DiscardLeastChanges,
        other => {
            return Err(format!(
                "{other:?} is not a split-brain policy (disconnect, discard-zero-changes, \
                 discard-younger-primary, discard-least-changes)"
            ))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use AfterSplitBrain::*;
    use Resolution::LocalLoses;

    fn v(node: &str, changes: u64, started: u64, policy: AfterSplitBrain) -> SplitBrainView {
        SplitBrainView {
            node: node.into(),
            changes,
            generation_started_ms: started,
            primary: false,
            discard_local: false,
            policy,
        }
    }

    fn verdict(l: &SplitBrainView, r: &SplitBrainView) -> &'static str {
        resolve(l, r).kind()
    }

    #[test]
    fn policy_table() {
        let cases = [
            (v("a", 10, 1, Disconnect), v("b", 0, 2, Disconnect), "disconnect"),
            (v("a", 0, 1, DiscardZeroChanges), v("b", 5, 2, DiscardZeroChanges), "local loses"),
            (v("a", 5, 1, DiscardZeroChanges), v("b", 0, 2, DiscardZeroChanges), "remote loses"),
            (v("a", 5, 1, DiscardZeroChanges), v("b", 7, 2, DiscardZeroChanges), "disconnect"),
            (v("a", 0, 1, DiscardZeroChanges), v("b", 0, 2, DiscardZeroChanges), "remote loses"),
            (v("a", 99, 3, DiscardYoungerPrimary), v("b", 1, 2, DiscardYoungerPrimary), "local loses"),
            (v("a", 1, 2, DiscardYoungerPrimary), v("b", 99, 3, DiscardYoungerPrimary), "remote loses"),
            (v("a", 1, 2, DiscardYoungerPrimary), v("b", 99, 2, DiscardYoungerPrimary), "remote loses"),
            (v("a", 1, 9, DiscardLeastChanges), v("b", 2, 1, DiscardLeastChanges), "local loses"),
            (v("a", 3, 1, DiscardLeastChanges), v("b", 2, 9, DiscardLeastChanges), "remote loses"),
            (v("a", 2, 1, DiscardLeastChanges), v("b", 2, 9, DiscardLeastChanges), "remote loses"),
            // Policies that differ: nobody decides.
            (v("a", 0, 1, DiscardZeroChanges), v("b", 5, 2, DiscardLeastChanges), "disconnect"),
            // The command beats the policy, in both directions.
            (
                SplitBrainView { discard_local: true, ..v("a", 50, 1, Disconnect) },
                v("b", 0, 2, Disconnect),
                "local loses",
            ),
            (
                v("a", 0, 1, DiscardZeroChanges),
                SplitBrainView { discard_local: true, ..v("b", 50, 2, DiscardZeroChanges) },
                "remote loses",
            ),
            (
                SplitBrainView { discard_local: true, ..v("a", 0, 1, Disconnect) },
                SplitBrainView { discard_local: true, ..v("b", 0, 2, Disconnect) },
                "disconnect",
            ),
            // A primary never loses automatically.
            (
                SplitBrainView { primary: true, ..v("a", 0, 1, DiscardZeroChanges) },
                v("b", 5, 2, DiscardZeroChanges),
                "disconnect",
            ),
        ];
        for (i, (l, r, want)) in cases.iter().enumerate() {
            assert_eq!(verdict(l, r), *want, "case {i}: {l:?} vs {r:?}");
            assert_eq!(resolve(r, l).kind(), resolve(l, r).mirrored().kind(), "case {i} mirrored");
        }
    }

    #[test]
    fn policy_names_round_trip() {
        for p in [Disconnect, DiscardZeroChanges, DiscardYoungerPrimary, DiscardLeastChanges] {
            assert_eq!(parse_policy(policy_name(p)), Ok(p));
        }
        assert!(parse_policy("discard-everything").unwrap_err().contains("not a split-brain policy"));
    }

    fn arb_view(node: &'static str) -> impl Strategy<Value = SplitBrainView> {
        let policy = prop_oneof![
            Just(Disconnect),
            Just(DiscardZeroChanges),
            Just(DiscardYoungerPrimary),
            Just(DiscardLeastChanges)
        ];
        (0u64..3, 0u64..3, any::<bool>(), prop::bool::weighted(0.2), policy).prop_map(
            move |(changes, started, primary, discard_local, policy)| SplitBrainView {
                node: node.into(),
                changes: changes * 4096,
                generation_started_ms: started,
                primary,
                discard_local,
                policy,
            },
        )
    }

    proptest! {
        /// Both nodes reach the same verdict; at most one side loses.
        #[test]
        fn verdict_is_symmetric(a in arb_view("a"), b in arb_view("b")) {
            prop_assert_eq!(resolve(&a, &b).kind(), resolve(&b, &a).mirrored().kind());
        }

        /// A primary, or a side whose changes no policy or command gives up, never loses.
        #[test]
        fn nothing_is_discarded_without_a_reason(a in arb_view("a"), b in arb_view("b")) {
            if resolve(&a, &b) == LocalLoses {
                prop_assert!(!a.primary);
                prop_assert!(a.discard_local || (a.policy == b.policy && a.policy != Disconnect));
                if a.policy == DiscardZeroChanges && !a.discard_local {
                    prop_assert!(a.changes == 0);
                }
                if a.policy == DiscardLeastChanges && !a.discard_local {
                    prop_assert!(a.changes <= b.changes);
                }
            }
        }
    }
}
