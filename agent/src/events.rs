//! What `tandem events` reports: one record per line, the current state of every object
//! first (`exists`), then a marker (`exists -`), then one record per change as it happens
//! (see docs/operations.md, "Events"). Shared by the daemon (which produces the records) and
//! the CLI (which prints them).
//!
//! The format is an interface, like `status --json`: kinds, objects and fields are added,
//! never renamed or removed. The JSON form is the wire form on the control socket; the text
//! form ([`Record::render`]) is derived from it, one `TIME KIND OBJECT key:value ...` line.
//!
//! In a `change` record, a field that is absent did not change. A field whose value can be
//! unknown or missing (a peer's role, a volume's device) is `null` in JSON and `-` in text;
//! that is why such fields are `Option<Option<T>>` here.

use std::fmt::Write as _;
use std::time::SystemTime;

use serde::{Deserialize, Deserializer, Serialize};

use crate::daemon::hooks::HookEvent;
use crate::meta::DiskState;
use crate::status::{ConnectionState, ReplicationState, Role};

/// What a record says about its object.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// The object's state when the stream started (every field present); `exists -` ends
    /// the initial dump.
    Exists,
    /// Some of the object's fields changed (only those are present).
    #[default]
    Change,
    /// A resync with the peer started (this node as `sync_role`).
    ResyncStarted,
    /// A running resync's progress (the source side), at most once a second per peer.
    ResyncProgress,
    /// A resync with the peer ended (`result`).
    ResyncFinished,
    /// A split brain with the peer was detected, with its `resolution`.
    SplitBrain,
    /// An event handler started.
    Call,
    /// An event handler ended (`outcome`, and `exit_code` when it exited).
    Response,
    /// A snapshot of the copy was taken (`snapshot`, `seq`).
    SnapshotTaken,
    /// A snapshot was deleted (by an administrator, retention, or after its resync).
    SnapshotDeleted,
    /// A snapshot could not preserve a block (`reason`) and no longer shows one instant.
    SnapshotInvalid,
    /// This agent took the primary's device over from the previous agent (`device`,
    /// `paused-ms`, `resent`).
    TakenOver,
    /// The reader fell behind by `lost` records; the stream ends after this record.
    Lost,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Exists => "exists",
            Kind::Change => "change",
            Kind::ResyncStarted => "resync-started",
            Kind::ResyncProgress => "resync-progress",
            Kind::ResyncFinished => "resync-finished",
            Kind::SplitBrain => "split-brain",
            Kind::Call => "call",
            Kind::Response => "response",
            Kind::SnapshotTaken => "snapshot-taken",
            Kind::SnapshotDeleted => "snapshot-deleted",
            Kind::SnapshotInvalid => "snapshot-invalid",
            Kind::TakenOver => "taken-over",
            Kind::Lost => "lost",
        }
    }
}

/// What a record is about.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Object {
    /// A resource on this node (`name`).
    Resource,
    /// One volume of a resource (`name`, `volume`).
    Volume,
    /// A resource's relation with one peer (`name`, `peer`).
    Peer,
    /// An event handler of a resource (`name`, `handler`, `peer` if about one).
    Handler,
    /// A snapshot of this node's copy of a resource (`name`, `snapshot`).
    Snapshot,
    /// No object: the end of the initial dump, or a `lost` record.
    #[serde(rename = "-")]
    #[default]
    None,
}

impl Object {
    pub fn as_str(self) -> &'static str {
        match self {
            Object::Resource => "resource",
            Object::Volume => "volume",
            Object::Peer => "peer",
            Object::Handler => "handler",
            Object::Snapshot => "snapshot",
            Object::None => "-",
        }
    }
}

/// Which side of a resync this node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncRole {
    Source,
    Target,
}

/// How a resync ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResyncResult {
    /// Every block is on the target (as target: this copy is up to date).
    Done,
    /// The target holds every block from this source, but another source still resyncs it.
    DoneWaitingForOthers,
    /// Stopped before the end (connection lost, stream failed); it resumes from the bitmap.
    Interrupted,
}

/// What became of a split brain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SplitBrainResolution {
    /// Not resolved automatically: the two stay apart until an administrator runs
    /// `tandem resolve --discard-local` on one of them.
    WaitsForAdministrator,
    /// Resolved automatically (policy or an earlier `resolve`): `loser` discards its changes.
    Resolved,
}

/// How a handler run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HandlerOutcome {
    /// It exited with `exit_code`.
    Exited,
    /// It ran longer than `hook_timeout` and was killed.
    TimedOut,
    /// It was killed by a signal.
    Killed,
    /// It could not be started, or waiting for it failed (`error`).
    Failed,
}

/// A field that is present in a change only when it changed, and whose value may be
/// unknown (`null`): `None` = absent, `Some(None)` = null.
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// One event record. Which fields are present depends on the kind and the object; see
/// docs/operations.md.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// RFC 3339 with milliseconds, UTC.
    pub time: String,
    pub kind: Kind,
    pub object: Object,
    /// The resource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handler: Option<HookEvent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    // -- resource
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<DiskState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub down: Option<bool>,
    /// The creation time (RFC 3339) of the newest valid snapshot, `null` if none: the
    /// recovery point a restore can go back to.
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub recovery_point: Option<Option<String>>,
    // -- volume
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub device: Option<Option<String>>,
    // -- peer
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection: Option<ConnectionState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<ReplicationState>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub peer_role: Option<Option<Role>>,
    #[serde(default, deserialize_with = "present", skip_serializing_if = "Option::is_none")]
    pub peer_disk: Option<Option<DiskState>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub out_of_sync: Option<u64>,
    // -- resync
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync_role: Option<SyncRole>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<ResyncResult>,
    // -- snapshot
    /// The change stream's position a snapshot holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    // -- takeover
    /// How long the device had no agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_ms: Option<u64>,
    /// Requests the previous agent had read and not answered, queued again by the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resent: Option<u64>,
    // -- split brain
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<SplitBrainResolution>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loser: Option<String>,
    // -- handler
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<HandlerOutcome>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    // -- any
    /// Why (a split brain's cause, a resync's interruption, a handler's failure).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `lost`: how many records the reader missed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost: Option<u64>,
}

/// Now, as a record's time.
pub fn now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

impl Record {
    /// A record of `kind` about `object` of resource `name`, stamped now, without fields.
    pub fn new(kind: Kind, object: Object, name: &str) -> Self {
        Self { time: now(), kind, object, name: Some(name.to_string()), ..Default::default() }
    }

    /// `exists -`: the initial dump is complete.
    pub fn end_of_dump() -> Self {
        Self { time: now(), kind: Kind::Exists, object: Object::None, ..Default::default() }
    }

    /// `taken-over`: resource `name`'s device was taken over from the previous agent.
    pub fn takeover(name: &str, device: &str, t: crate::status::TakeoverStatus) -> Self {
        Self {
            device: Some(Some(device.to_string())),
            paused_ms: Some(t.paused_ms),
            resent: Some(t.resent),
            ..Self::new(Kind::TakenOver, Object::Resource, name)
        }
    }

    /// `lost`: the reader missed `n` records; its stream ends.
    pub fn lost(n: u64) -> Self {
        Self { time: now(), kind: Kind::Lost, object: Object::None, lost: Some(n), ..Default::default() }
    }

    /// The resource the record is about, if any.
    pub fn resource(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// Whether the record has nothing to say beyond its object (an empty change).
    pub fn has_fields(&self) -> bool {
        self.fields().next().is_some()
    }

    /// The record's fields after the object's identity, in their documented order, as
    /// (key, text value).
    fn fields(&self) -> impl Iterator<Item = (&'static str, String)> + '_ {
        fn word<T: Serialize>(v: &T) -> String {
            match serde_json::to_value(v) {
                Ok(serde_json::Value::String(s)) => s,
                Ok(serde_json::Value::Null) => "-".into(),
                Ok(other) => other.to_string(),
                Err(_) => "?".into(),
            }
        }
        let opt = |k: &'static str, v: Option<String>| v.map(|v| (k, v));
        [
            opt("role", self.role.map(|v| word(&v))),
            opt("disk", self.disk.map(|v| word(&v))),
            opt("down", self.down.map(|v| if v { "yes" } else { "no" }.to_string())),
            opt(
                "recovery-point",
                self.recovery_point.as_ref().map(|v| v.clone().unwrap_or_else(|| "-".into())),
            ),
            opt("seq", self.seq.map(|v| v.to_string())),
            opt("size", self.size.map(|v| v.to_string())),
            opt("device", self.device.as_ref().map(|v| v.clone().unwrap_or_else(|| "-".into()))),
            opt("connection", self.connection.map(|v| word(&v))),
            opt("replication", self.replication.map(|v| word(&v))),
            opt("peer-role", self.peer_role.map(|v| word(&v))),
            opt("peer-disk", self.peer_disk.map(|v| word(&v))),
            opt("out-of-sync", self.out_of_sync.map(|v| v.to_string())),
            opt("sync-role", self.sync_role.map(|v| word(&v))),
            opt("done", self.done.map(|v| v.to_string())),
            opt("total", self.total.map(|v| v.to_string())),
            opt("percent", self.percent.map(|v| format!("{v:.1}"))),
            opt("result", self.result.map(|v| word(&v))),
            opt("paused-ms", self.paused_ms.map(|v| v.to_string())),
            opt("resent", self.resent.map(|v| v.to_string())),
            opt("resolution", self.resolution.map(|v| word(&v))),
            opt("loser", self.loser.clone()),
            opt("outcome", self.outcome.map(|v| word(&v))),
            opt("exit-code", self.exit_code.map(|v| v.to_string())),
            opt("lost", self.lost.map(|v| v.to_string())),
            opt("reason", self.reason.clone()),
        ]
        .into_iter()
        .flatten()
    }

    /// The text form: `TIME KIND OBJECT name:R [volume:V] [peer:P] [handler:H] key:value ...`.
    /// Values with spaces or quotes (a reason) are quoted as JSON strings.
    pub fn render(&self) -> String {
        let mut out = format!("{} {} {}", self.time, self.kind.as_str(), self.object.as_str());
        let ident = [
            ("name", self.name.clone()),
            ("volume", self.volume.clone()),
            ("peer", self.peer.clone()),
            ("handler", self.handler.map(|h| h.as_str().to_string())),
            ("snapshot", self.snapshot.clone()),
        ];
        for (k, v) in ident.into_iter().filter_map(|(k, v)| v.map(|v| (k, v))).chain(self.fields()) {
            let v = if v.is_empty() || v.contains([' ', '"', '\\']) || v.chars().any(char::is_control) {
                serde_json::Value::String(v).to_string()
            } else {
                v
            };
            let _ = write!(out, " {k}:{v}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = "2026-12-01T18:00:00.123Z";

    fn rec(kind: Kind, object: Object) -> Record {
        Record { time: T.into(), ..Record::new(kind, object, "r0") }
    }

    /// Every kind of record renders as documented, and its JSON form reads back the same.
    #[test]
    fn events_render_every_record_kind() {
        let mut cases: Vec<(Record, &str)> = Vec::new();
        let mut r = rec(Kind::Exists, Object::Resource);
        (r.role, r.disk, r.down) = (Some(Role::Secondary), Some(DiskState::UpToDate), Some(false));
        cases.push((r, "exists resource name:r0 role:secondary disk:up_to_date down:no"));
        let mut r = rec(Kind::Exists, Object::Volume);
        (r.volume, r.size, r.device) = (Some("0".into()), Some(4096), Some(None));
        cases.push((r, "exists volume name:r0 volume:0 size:4096 device:-"));
        let mut r = rec(Kind::Exists, Object::Peer);
        r.peer = Some("beta".into());
        (r.connection, r.replication) =
            (Some(ConnectionState::Connected), Some(ReplicationState::Established));
        (r.peer_role, r.peer_disk, r.out_of_sync) = (Some(Some(Role::Primary)), Some(None), Some(8192));
        cases.push((
            r,
            "exists peer name:r0 peer:beta connection:connected replication:established peer-role:primary peer-disk:- out-of-sync:8192",
        ));
        cases.push((Record { time: T.into(), ..Record::end_of_dump() }, "exists -"));
        let mut r = rec(Kind::Change, Object::Resource);
        r.role = Some(Role::Primary);
        cases.push((r, "change resource name:r0 role:primary"));
        let mut r = rec(Kind::Change, Object::Volume);
        (r.volume, r.device) = (Some("0".into()), Some(Some("/dev/loop3".into())));
        cases.push((r, "change volume name:r0 volume:0 device:/dev/loop3"));
        let mut r = rec(Kind::Change, Object::Peer);
        (r.peer, r.connection) = (Some("beta".into()), Some(ConnectionState::StandAlone));
        cases.push((r, "change peer name:r0 peer:beta connection:standalone"));
        let mut r = rec(Kind::ResyncStarted, Object::Peer);
        (r.peer, r.sync_role, r.total) = (Some("beta".into()), Some(SyncRole::Source), Some(1 << 20));
        cases.push((r, "resync-started peer name:r0 peer:beta sync-role:source total:1048576"));
        let mut r = rec(Kind::ResyncProgress, Object::Peer);
        (r.peer, r.sync_role, r.done, r.total, r.percent) =
            (Some("beta".into()), Some(SyncRole::Source), Some(1 << 19), Some(1 << 20), Some(50.0));
        cases.push((
            r,
            "resync-progress peer name:r0 peer:beta sync-role:source done:524288 total:1048576 percent:50.0",
        ));
        let mut r = rec(Kind::ResyncFinished, Object::Peer);
        (r.peer, r.sync_role, r.result) =
            (Some("beta".into()), Some(SyncRole::Target), Some(ResyncResult::Interrupted));
        r.reason = Some("connection lost".into());
        cases.push((
            r,
            "resync-finished peer name:r0 peer:beta sync-role:target result:interrupted reason:\"connection lost\"",
        ));
        let mut r = rec(Kind::SplitBrain, Object::Peer);
        (r.peer, r.resolution) = (Some("beta".into()), Some(SplitBrainResolution::WaitsForAdministrator));
        cases.push((r, "split-brain peer name:r0 peer:beta resolution:waits_for_administrator"));
        let mut r = rec(Kind::SplitBrain, Object::Peer);
        (r.peer, r.resolution, r.loser) =
            (Some("beta".into()), Some(SplitBrainResolution::Resolved), Some("alpha".into()));
        cases.push((r, "split-brain peer name:r0 peer:beta resolution:resolved loser:alpha"));
        let mut r = rec(Kind::Call, Object::Handler);
        (r.handler, r.peer) = (Some(HookEvent::FencePeer), Some("beta".into()));
        cases.push((r, "call handler name:r0 peer:beta handler:fence-peer"));
        let mut r = rec(Kind::Response, Object::Handler);
        (r.handler, r.outcome, r.exit_code) =
            (Some(HookEvent::RoleChange), Some(HandlerOutcome::Exited), Some(3));
        cases.push((r, "response handler name:r0 handler:role-change outcome:exited exit-code:3"));
        let mut r = rec(Kind::Response, Object::Handler);
        (r.handler, r.outcome) = (Some(HookEvent::SyncDone), Some(HandlerOutcome::TimedOut));
        cases.push((r, "response handler name:r0 handler:sync-done outcome:timed_out"));
        let mut r = rec(Kind::Response, Object::Handler);
        (r.handler, r.outcome, r.reason) =
            (Some(HookEvent::SplitBrain), Some(HandlerOutcome::Failed), Some("No such file".into()));
        cases
            .push((r, "response handler name:r0 handler:split-brain outcome:failed reason:\"No such file\""));
        let lost = Record { time: T.into(), ..Record::lost(17) };
        cases.push((lost, "lost - lost:17"));

        for (r, text) in &cases {
            assert_eq!(r.render(), format!("{T} {text}"));
            let json = serde_json::to_string(r).unwrap();
            let back: Record = serde_json::from_str(&json).unwrap();
            assert_eq!(&back, r, "{json}");
        }
        // Every kind and every object is covered above.
        for k in [
            Kind::Exists,
            Kind::Change,
            Kind::ResyncStarted,
            Kind::ResyncProgress,
            Kind::ResyncFinished,
            Kind::SplitBrain,
            Kind::Call,
            Kind::Response,
            Kind::Lost,
        ] {
            assert!(cases.iter().any(|(r, _)| r.kind == k), "{k:?} not rendered");
        }
    }

    #[test]
    fn events_json_keeps_null_apart_from_absent() {
        let j = r#"{"time":"t","kind":"change","object":"peer","name":"r0","peer":"b","peer_role":null}"#;
        let r: Record = serde_json::from_str(j).unwrap();
        assert_eq!(r.peer_role, Some(None));
        assert_eq!(r.peer_disk, None);
        assert_eq!(serde_json::to_string(&r).unwrap(), j);
        let j = r#"{"time":"t","kind":"resync-started","object":"peer","name":"r0"}"#;
        assert_eq!(serde_json::from_str::<Record>(j).unwrap().kind, Kind::ResyncStarted);
    }
}
