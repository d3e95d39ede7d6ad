//! The event bus behind `tandem events` (records: `crate::events`).
//!
//! One bounded broadcast channel per agent. Sending never waits: a reader that falls more
//! than [`CAPACITY`] records behind loses the oldest ones, is told so by one `lost` record
//! and its stream ends (the control server does that); the agent and the data path never
//! wait for a reader.
//!
//! Each resource publishes through its [`ResourceEvents`]: after every place that changes
//! its observable state (the relation's `handle`, promotion, demotion, the disk state,
//! down/up, ...) it publishes the difference between `Resource::status()` now and the
//! state it published last, and it emits explicit records for what are events rather than
//! states (resync started/finished, split brain, handler call/response), which a diff of
//! states could miss when they pass within milliseconds. Both go through one lock per
//! resource, the one that holds the last published state, so a resource's records are in
//! the order its changes happened and the diffs are never computed against a state a
//! reader has not been sent.
//!
//! Lock order: a resource's event lock is taken before the resource's other locks (the
//! status reads them), so nothing may publish while holding one of those.
//!
//! While nobody listens nothing is computed; a new reader first has every resource
//! publish what changed meanwhile (to the readers already there), then subscribes and
//! gets the current state as `exists` records, all under the event locks: every record it
//! receives afterwards is a change after what it was shown.

use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::events::{Kind, Object, Record};
use crate::status::{PeerStatus, ResourceStatus};

/// How many records a reader may fall behind before it loses some.
pub const CAPACITY: usize = 4096;

/// The agent's event bus.
pub struct EventBus {
    tx: broadcast::Sender<Arc<Record>>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self { tx: broadcast::channel(CAPACITY).0 }
    }
}

impl EventBus {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn listening(&self) -> bool {
        self.tx.receiver_count() > 0
    }

    fn send(&self, r: Record) {
        // No receiver: nobody to tell (an error only in that sense).
        let _ = self.tx.send(Arc::new(r));
    }

    /// A new reader of `resources` (each one's events and a way to read its state now):
    /// the receiver and what to send it first, the `exists` records of the resources
    /// `only` selects (all if `None`) and the end-of-dump marker.
    pub fn subscribe<'a, F: FnOnce() -> ResourceStatus>(
        &self,
        resources: impl IntoIterator<Item = (&'a ResourceEvents, F)>,
        only: Option<&str>,
    ) -> (broadcast::Receiver<Arc<Record>>, Vec<Record>) {
        // What changed since the last publication goes to the readers already there; every
        // lock stays held until the new reader is subscribed.
        let mut states = Vec::new();
        for (ev, now) in resources {
            let mut last = ev.last.lock().unwrap();
            ev.send_diff(&mut last, now());
            states.push((last, ev));
        }
        let rx = self.tx.subscribe();
        let mut dump = Vec::new();
        for (last, ev) in &states {
            if only.is_some_and(|o| o != ev.name) {
                continue;
            }
            if let Some(s) = last.as_ref() {
                dump.extend(exists(s));
            }
        }
        drop(states);
        dump.push(Record::end_of_dump());
        (rx, dump)
    }
}

/// One resource's way onto the bus, and the lock that orders its records.
pub struct ResourceEvents {
    name: String,
    bus: Arc<EventBus>,
    /// The state last published.
    last: Mutex<Option<ResourceStatus>>,
}

impl ResourceEvents {
    pub fn new(name: &str, bus: Arc<EventBus>) -> Arc<Self> {
        Arc::new(Self { name: name.to_string(), bus, last: Mutex::new(None) })
    }

    /// Whether anyone reads events now (if not, nothing needs computing).
    pub fn listening(&self) -> bool {
        self.bus.listening()
    }

    /// A record that is an event, not a state, in order with the state changes.
    pub fn emit(&self, record: impl FnOnce(&str) -> Record) {
        if !self.listening() {
            return;
        }
        let _order = self.last.lock().unwrap();
        self.bus.send(record(&self.name));
    }

    /// Publishes what changed in the state `now()` reads since the state published last.
    /// `now` runs under the event lock (see the lock order in the module docs).
    pub fn publish(&self, now: impl FnOnce() -> ResourceStatus) {
        if !self.listening() {
            return;
        }
        let mut last = self.last.lock().unwrap();
        self.send_diff(&mut last, now());
    }

    /// Each resync progress record `progress` makes from the state now, after publishing
    /// what changed (the once-a-second tick).
    pub fn tick(&self, now: impl FnOnce() -> ResourceStatus) {
        if !self.listening() {
            return;
        }
        let mut last = self.last.lock().unwrap();
        let now = now();
        let progress: Vec<Record> = now.peers.iter().filter_map(|p| progress(&now.name, p)).collect();
        self.send_diff(&mut last, now);
        for r in progress {
            self.bus.send(r);
        }
    }

    fn send_diff(&self, last: &mut Option<ResourceStatus>, now: ResourceStatus) {
        if let Some(prev) = last.as_ref() {
            for r in changes(prev, &now) {
                self.bus.send(r);
            }
        }
        *last = Some(now);
    }
}

/// A resource's volumes as (volume, size, device): a volume group's by name, a plain
/// resource's one volume as "0".
fn volumes(s: &ResourceStatus) -> Vec<(String, u64, Option<String>)> {
    if s.volumes.is_empty() {
        vec![("0".to_string(), s.size, s.device.clone())]
    } else {
        s.volumes.iter().map(|v| (v.name.clone(), v.size, v.device.clone())).collect()
    }
}

fn peer_record(kind: Kind, name: &str, p: &PeerStatus) -> Record {
    Record { peer: Some(p.node.clone()), ..Record::new(kind, Object::Peer, name) }
}

/// The `exists` records of a resource's state: the resource, its volumes, its peers.
pub fn exists(s: &ResourceStatus) -> Vec<Record> {
    let mut out = vec![Record {
        role: Some(s.role),
        disk: Some(s.disk),
        down: Some(s.down),
        recovery_point: Some(recovery_point(s)),
        ..Record::new(Kind::Exists, Object::Resource, &s.name)
    }];
    for (volume, size, device) in volumes(s) {
        out.push(Record {
            volume: Some(volume),
            size: Some(size),
            device: Some(device),
            ..Record::new(Kind::Exists, Object::Volume, &s.name)
        });
    }
    for p in &s.peers {
        out.push(Record {
            connection: Some(p.connection),
            replication: Some(p.replication),
            peer_role: Some(p.peer_role),
            peer_disk: Some(p.peer_disk),
            out_of_sync: Some(p.out_of_sync_bytes),
            ..peer_record(Kind::Exists, &s.name, p)
        });
    }
    out
}

/// The newest valid snapshot's creation time (RFC 3339, milliseconds), if any.
fn recovery_point(s: &ResourceStatus) -> Option<String> {
    s.snapshots.newest_valid_ms.map(|ms| {
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
            .to_string()
    })
}

/// `Some(new)` if it differs from `old`.
fn changed<T: PartialEq + Clone>(old: &T, new: &T) -> Option<T> {
    (old != new).then(|| new.clone())
}

/// The `change` records from state `a` to state `b` of one resource: one per object with
/// a field that changed, holding the fields that did.
pub fn changes(a: &ResourceStatus, b: &ResourceStatus) -> Vec<Record> {
    let mut out = Vec::new();
    let r = Record {
        role: changed(&a.role, &b.role),
        disk: changed(&a.disk, &b.disk),
        down: changed(&a.down, &b.down),
        recovery_point: changed(&recovery_point(a), &recovery_point(b)),
        ..Record::new(Kind::Change, Object::Resource, &b.name)
    };
    if r.has_fields() {
        out.push(r);
    }
    let before = volumes(a);
    for (volume, size, device) in volumes(b) {
        let old = before.iter().find(|v| v.0 == volume);
        let r = Record {
            size: old.map_or(Some(size), |o| changed(&o.1, &size)),
            device: old.map_or(Some(device.clone()), |o| changed(&o.2, &device)),
            volume: Some(volume),
            ..Record::new(Kind::Change, Object::Volume, &b.name)
        };
        if r.has_fields() {
            out.push(r);
        }
    }
    for p in &b.peers {
        let Some(o) = a.peers.iter().find(|o| o.node == p.node) else { continue };
        let r = Record {
            connection: changed(&o.connection, &p.connection),
            replication: changed(&o.replication, &p.replication),
            peer_role: changed(&o.peer_role, &p.peer_role),
            peer_disk: changed(&o.peer_disk, &p.peer_disk),
            out_of_sync: changed(&o.out_of_sync_bytes, &p.out_of_sync_bytes),
            ..peer_record(Kind::Change, &b.name, p)
        };
        if r.has_fields() {
            out.push(r);
        }
    }
    out
}

/// A resync progress record for peer `p`, if this node resyncs it now (as source).
fn progress(name: &str, p: &PeerStatus) -> Option<Record> {
    let rs = p.resync.as_ref().filter(|r| r.active)?;
    Some(Record {
        sync_role: Some(crate::events::SyncRole::Source),
        done: Some(rs.done_bytes),
        total: Some(rs.total_bytes),
        percent: Some((rs.percent() * 10.0).round() / 10.0),
        ..peer_record(Kind::ResyncProgress, name, p)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::HandlerOutcome;
    use crate::meta::DiskState;
    use crate::status::{ConnectionState, ReplicationState, ResourceStats, Role};
    use tokio::sync::broadcast::error::TryRecvError;

    #[test]
    fn a_new_recovery_point_is_a_change_of_the_resource() {
        let a = state(Role::Secondary, ConnectionState::Connected, 0);
        let mut b = a.clone();
        b.snapshots.newest_valid_ms = Some(1_796_150_000_000);
        let c = changes(&a, &b);
        assert_eq!(c.len(), 1, "{c:?}");
        assert_eq!(c[0].object, Object::Resource);
        assert!(c[0].render().contains("recovery-point:2026-"), "{}", c[0].render());
        let mut d = b.clone();
        d.snapshots.newest_valid_ms = None;
        assert_eq!(changes(&b, &d)[0].recovery_point, Some(None), "the last snapshot went: null");
        assert_eq!(exists(&a)[0].recovery_point, Some(None));
    }

    fn state(role: Role, connection: ConnectionState, out_of_sync: u64) -> ResourceStatus {
        ResourceStatus {
            name: "r0".into(),
            role,
            disk: DiskState::UpToDate,
            device: (role == Role::Primary).then(|| "/dev/loop7".to_string()),
            volumes: Vec::new(),
            size: 1 << 20,
            generation: "0".into(),
            down: false,
            snapshots: Default::default(),
            takeover: None,
            peers: vec![PeerStatus {
                node: "beta".into(),
                connection,
                replication: ReplicationState::Off,
                mode: "sync".into(),
                out_of_sync_bytes: out_of_sync,
                peer_role: (connection == ConnectionState::Connected).then_some(Role::Secondary),
                peer_disk: (connection == ConnectionState::Connected).then_some(DiskState::UpToDate),
                pending_requests: 0,
                lag_bytes: 0,
                lag_secs: 0.0,
                sent_data_bytes: 0,
                sent_wire_bytes: 0,
                received_wire_bytes: 0,
                ack_latency: Default::default(),
                resync: None,
                last_error: None,
            }],
            stats: ResourceStats::default(),
        }
    }

    fn drain(rx: &mut broadcast::Receiver<Arc<Record>>) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(r) = rx.try_recv() {
            out.push(r.render().split_once(' ').unwrap().1.to_string());
        }
        out
    }

    /// A reader gets the state at subscription, then each change relative to what it was
    /// sent, in order, with events in between; a second reader starts from the latest state.
    #[test]
    fn events_bus_dumps_then_sends_changes_in_order() {
        let bus = EventBus::new();
        let ev = ResourceEvents::new("r0", bus.clone());
        ev.publish(|| panic!("nobody listens: the state is not even read"));
        let s0 = state(Role::Secondary, ConnectionState::Connected, 0);
        let (mut rx, dump) = bus.subscribe([(&*ev, || s0.clone())], None);
        let dump: Vec<String> =
            dump.iter().map(|r| r.render().split_once(' ').unwrap().1.to_string()).collect();
        assert_eq!(
            dump,
            [
                "exists resource name:r0 role:secondary disk:up_to_date down:no recovery-point:-",
                "exists volume name:r0 volume:0 size:1048576 device:-",
                "exists peer name:r0 peer:beta connection:connected replication:off peer-role:secondary peer-disk:up_to_date out-of-sync:0",
                "exists -",
            ]
        );
        ev.publish(|| state(Role::Primary, ConnectionState::Connected, 0));
        ev.publish(|| state(Role::Primary, ConnectionState::Connected, 0));
        ev.emit(|name| Record {
            handler: Some(crate::daemon::hooks::HookEvent::RoleChange),
            outcome: Some(HandlerOutcome::Exited),
            exit_code: Some(0),
            ..Record::new(Kind::Response, Object::Handler, name)
        });
        ev.publish(|| state(Role::Primary, ConnectionState::StandAlone, 4096));
        ev.publish(|| state(Role::Secondary, ConnectionState::StandAlone, 4096));
        assert_eq!(
            drain(&mut rx),
            [
                "change resource name:r0 role:primary",
                "change volume name:r0 volume:0 device:/dev/loop7",
                "response handler name:r0 handler:role-change outcome:exited exit-code:0",
                "change peer name:r0 peer:beta connection:standalone peer-role:- peer-disk:- out-of-sync:4096",
                "change resource name:r0 role:secondary",
                "change volume name:r0 volume:0 device:-",
            ]
        );
        // A second reader: the first gets what changed since (nothing), the second the
        // state now; filtered to another resource it gets the marker only.
        let s1 = state(Role::Secondary, ConnectionState::StandAlone, 4096);
        let (_rx2, dump2) = bus.subscribe([(&*ev, || s1.clone())], None);
        assert!(dump2[0]
            .render()
            .ends_with("exists resource name:r0 role:secondary disk:up_to_date down:no recovery-point:-"));
        assert!(dump2[2].render().contains("connection:standalone"), "{:?}", dump2[2]);
        let (_rx3, dump3) = bus.subscribe([(&*ev, || s1.clone())], Some("other"));
        assert_eq!(dump3.len(), 1);
        assert!(drain(&mut rx).is_empty());
    }

    /// The tick reports unannounced changes, and each running resync's progress.
    #[test]
    fn events_tick_reports_resync_progress() {
        let bus = EventBus::new();
        let ev = ResourceEvents::new("r0", bus.clone());
        let s0 = state(Role::Primary, ConnectionState::Connected, 3 << 20);
        let (mut rx, _) = bus.subscribe([(&*ev, || s0.clone())], None);
        let resyncing = |done: u64| {
            let mut s = state(Role::Primary, ConnectionState::Connected, (3 << 20) - done);
            s.peers[0].replication = ReplicationState::SyncSource;
            s.peers[0].resync = Some(crate::status::ResyncStatus {
                active: true,
                total_bytes: 3 << 20,
                done_bytes: done,
                ..Default::default()
            });
            s
        };
        ev.tick(|| resyncing(1 << 20));
        ev.tick(|| resyncing(1 << 20));
        let mut done = resyncing(3 << 20);
        done.peers[0].resync.as_mut().unwrap().active = false;
        done.peers[0].replication = ReplicationState::Established;
        ev.tick(|| done);
        assert_eq!(
            drain(&mut rx),
            [
                "change peer name:r0 peer:beta replication:sync_source out-of-sync:2097152",
                "resync-progress peer name:r0 peer:beta sync-role:source done:1048576 total:3145728 percent:33.3",
                "resync-progress peer name:r0 peer:beta sync-role:source done:1048576 total:3145728 percent:33.3",
                "change peer name:r0 peer:beta replication:established out-of-sync:0",
            ]
        );
    }

    /// Sending never waits for a reader: one that reads nothing loses the oldest records
    /// and learns how many.
    #[test]
    fn events_reader_that_falls_behind_is_told_and_never_blocks_the_sender() {
        let bus = EventBus::new();
        let ev = ResourceEvents::new("r0", bus.clone());
        let s0 = state(Role::Secondary, ConnectionState::Connected, 0);
        let (mut rx, _) = bus.subscribe([(&*ev, || s0.clone())], None);
        let extra = 10;
        for i in 0..(CAPACITY + extra) as u64 {
            ev.publish(|| state(Role::Secondary, ConnectionState::Connected, i + 1));
        }
        assert_eq!(rx.try_recv().unwrap_err(), TryRecvError::Lagged(extra as u64));
        let next = rx.try_recv().unwrap();
        assert_eq!(next.out_of_sync, Some(extra as u64 + 1), "the oldest are the ones lost");
    }
}
