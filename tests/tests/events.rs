//! `tandem events` against real agents, loop devices and FUSE.
//!
//! - `events_show_each_change_in_order_and_end_when_the_agent_dies`: a reader started
//!   before anything happens gets the current state (`exists` records, then `exists -`),
//!   then, for a scripted promote, disconnect, writes, connect (a resync of exactly what
//!   was written) and demote, the records of those changes in the order they happened.
//!   A text reader of one resource ends with exit 0 on Ctrl-C; the JSON reader exits
//!   non-zero with a message when the agent is killed with SIGKILL.
//! - `events_report_a_split_brain_and_the_handlers_it_runs`: two primaries apart (network
//!   namespaces, the link cut) meet again: the reader on one of them gets `split-brain`
//!   (waiting for an administrator) and the `call`/`response` records of the handlers,
//!   with their exit codes, each after the change or event it is about.
//! - `events_of_an_unknown_resource_is_an_error`: exit 2, naming the resources there are.

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tandem_agent::control::Request;
use tandem_agent::daemon::hooks::HookEvent;
use tandem_agent::events::{
    HandlerOutcome, Kind, Object, Record, ResyncResult, SplitBrainResolution, SyncRole,
};
use tandem_agent::status::{ConnectionState, ReplicationState, Role};
use tandem_tests::lab::{Lab, LabOptions};
use tandem_tests::*;

const MIB: u64 = 1 << 20;

/// A running `tandem events` and the lines of its stdout; killed when dropped.
struct Reader {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Reader {
    fn start(lab: &Lab, node: &str, args: &[&str]) -> Self {
        let mut child = Command::new(lab.exe())
            .arg("--config")
            .arg(&lab.config)
            .args(["--node", node, "events"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run tandem events");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { return };
                if tx.send(l).is_err() {
                    return;
                }
            }
        });
        Self { child, lines, seen: Vec::new() }
    }

    /// The next line (60 s at most: a missing record fails the test, a slow one does not).
    fn next(&mut self) -> String {
        match self.lines.recv_timeout(secs(60)) {
            Ok(l) => {
                self.seen.push(l.clone());
                l
            }
            Err(e) => panic!("no further event ({e}); so far:\n{}", self.seen.join("\n")),
        }
    }

    fn next_record(&mut self) -> Record {
        let l = self.next();
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("not a record ({e}): {l}"))
    }

    /// Reads records until one satisfies `pred`; returns every record read.
    fn until(&mut self, what: &str, pred: impl Fn(&Record) -> bool) -> Vec<Record> {
        let mut got = Vec::new();
        loop {
            let r = self.next_record();
            let done = pred(&r);
            got.push(r);
            if done {
                return got;
            }
            assert!(got.len() < 100_000, "{what}: never seen");
        }
    }

    /// Waits for the process to end (60 s at most); its status and stderr.
    fn wait(&mut self) -> (std::process::ExitStatus, String) {
        let deadline = Instant::now() + secs(60);
        let st = loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                break st;
            }
            assert!(Instant::now() < deadline, "tandem events did not end");
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut err = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        (st, err)
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ok(lab: &Lab, node: &str, req: Request) -> String {
    let r = lab.request(node, &req).unwrap();
    assert!(r.ok, "{node}: {req:?}: {r:?}");
    r.message.unwrap_or_default()
}

fn is_change(r: &Record, object: Object) -> bool {
    r.kind == Kind::Change && r.object == object && r.name.as_deref() == Some("mail")
}

/// The index of the first record at or after `from` that satisfies `pred`.
fn find(records: &[Record], from: usize, what: &str, pred: impl Fn(&Record) -> bool) -> usize {
    match records.iter().enumerate().skip(from).find(|(_, r)| pred(r)) {
        Some((i, _)) => i,
        None => panic!(
            "no record {what} from #{from} on; records:\n{}",
            records
                .iter()
                .enumerate()
                .map(|(i, r)| format!("#{i} {}", r.render()))
                .collect::<Vec<_>>()
                .join("\n")
        ),
    }
}

#[test]
fn events_show_each_change_in_order_and_end_when_the_agent_dies() {
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions { size: 32 * MIB, ..LabOptions::default() });
    lab.start("alpha").unwrap();
    lab.start("beta").unwrap();
    wait_until(&lab, "alpha", "connected, peer known", secs(60), |r| {
        r.peers.iter().all(|p| p.connection == "connected" && p.peer_role.is_some())
    });

    let mut events = Reader::start(&lab, "alpha", &["--json"]);
    // The initial dump: the resource, its volume, its peer, then the marker.
    let dump = events.until("the end of the dump", |r| r.object == Object::None);
    let (marker, dump) = dump.split_last().unwrap();
    assert_eq!(marker.kind, Kind::Exists, "{marker:?}");
    assert!(dump.iter().all(|r| r.kind == Kind::Exists && r.name.as_deref() == Some("mail")), "{dump:?}");
    let res = dump.iter().find(|r| r.object == Object::Resource).expect("a resource record");
    assert_eq!((res.role, res.down), (Some(Role::Secondary), Some(false)), "{res:?}");
    let vol = dump.iter().find(|r| r.object == Object::Volume).expect("a volume record");
    assert_eq!((vol.size, vol.device.clone()), (Some(32 * MIB), Some(None)), "{vol:?}");
    let peer = dump.iter().find(|r| r.object == Object::Peer).expect("a peer record");
    assert_eq!(peer.peer.as_deref(), Some("beta"));
    assert_eq!(peer.connection, Some(ConnectionState::Connected), "{peer:?}");
    assert_eq!(peer.peer_role, Some(Some(Role::Secondary)), "{peer:?}");

    // A text reader of the one resource: the same dump as lines, and Ctrl-C ends it with 0.
    let mut text = Reader::start(&lab, "alpha", &["mail"]);
    let first = text.next();
    assert!(first.contains(" exists resource name:mail role:secondary disk:up_to_date down:no"), "{first}");
    while !text.next().ends_with(" exists -") {}
    kill(Pid::from_raw(text.child.id() as i32), Signal::SIGINT).unwrap();
    let (st, err) = text.wait();
    assert_eq!(st.code(), Some(0), "Ctrl-C ends tandem events with 0: {st:?} {err}");

    // The script.
    ok(&lab, "alpha", Request::Promote { resource: "mail".into(), force: false });
    let dev = wait_until(&lab, "alpha", "primary", secs(60), |r| r.device.is_some() && all_caught_up(r))
        .device
        .unwrap();
    ok(&lab, "alpha", Request::Disconnect { resource: "mail".into() });
    wait_until(&lab, "alpha", "disconnected", secs(60), |r| {
        r.peers.iter().all(|p| p.connection != "connected")
    });
    let mut w = BlockWriter::open(&dev, 7, true);
    for i in 0..64u64 {
        w.write(i * 2 * BLOCK as u64).unwrap();
    }
    drop(w);
    let owed = status_of(&lab, "alpha", "mail").peers[0].out_of_sync_bytes;
    assert_eq!(owed, 64 * BLOCK as u64, "alpha tracks what beta misses");
    ok(&lab, "alpha", Request::Connect { resource: "mail".into() });
    wait_until(&lab, "alpha", "resynced", secs(60), all_caught_up);
    ok(&lab, "alpha", Request::Demote { resource: "mail".into() });

    let got =
        events.until("role secondary", |r| is_change(r, Object::Resource) && r.role == Some(Role::Secondary));
    for r in &got {
        println!("{}", r.render());
    }
    let peer_change = |r: &Record| is_change(r, Object::Peer) && r.peer.as_deref() == Some("beta");
    let promoted =
        find(&got, 0, "role:primary", |r| is_change(r, Object::Resource) && r.role == Some(Role::Primary));
    let device = find(&got, promoted, "a device", |r| {
        is_change(r, Object::Volume) && r.device == Some(Some(dev.clone()))
    });
    let apart = find(&got, promoted + 1, "connection lost", |r| {
        peer_change(r) && r.connection.is_some_and(|c| c != ConnectionState::Connected)
    });
    let behind = find(&got, apart, "out of sync", |r| peer_change(r) && r.out_of_sync == Some(owed));
    let reconnected = find(&got, apart + 1, "connected", |r| {
        peer_change(r) && r.connection == Some(ConnectionState::Connected)
    });
    let started = find(&got, reconnected + 1, "resync-started", |r| {
        r.kind == Kind::ResyncStarted && r.peer.as_deref() == Some("beta")
    });
    assert_eq!(
        (got[started].sync_role, got[started].total),
        (Some(SyncRole::Source), Some(owed)),
        "{:?}",
        got[started]
    );
    assert!(behind < started, "out-of-sync ({behind}) is reported before the resync starts ({started})");
    let finished = find(&got, started + 1, "resync-finished", |r| {
        r.kind == Kind::ResyncFinished && r.peer.as_deref() == Some("beta")
    });
    assert_eq!(got[finished].result, Some(ResyncResult::Done), "{:?}", got[finished]);
    let established = find(&got, finished + 1, "replication established", |r| {
        peer_change(r) && r.replication == Some(ReplicationState::Established)
    });
    let in_sync = find(&got, started + 1, "out-of-sync 0", |r| peer_change(r) && r.out_of_sync == Some(0));
    let demoted = got.len() - 1;
    assert!(established < demoted && in_sync < demoted && device < apart, "{got:#?}");
    // Every record carries a millisecond RFC 3339 time, and times never go back.
    for w in got.windows(2) {
        assert!(w[0].time <= w[1].time, "{} then {}", w[0].render(), w[1].render());
    }
    assert!(got.iter().all(|r| r.time.len() == "2026-01-01T00:00:00.000Z".len() && r.time.ends_with('Z')));

    // The agent dies: the reader says so and exits non-zero.
    lab.kill9("alpha").unwrap();
    let (st, err) = events.wait();
    assert_eq!(st.code(), Some(3), "tandem events after the agent died: {st:?} {err}");
    assert!(err.contains("stopped"), "{err}");
    lab.stop("beta", secs(20)).unwrap();
}

#[test]
fn events_report_a_split_brain_and_the_handlers_it_runs() {
    let opts = LabOptions {
        size: 16 * MIB,
        netns: true,
        resource_extra: "[resource.handlers]\nrole_change = \"exit 0\"\nsplit_brain = \"exit 5\"\n".into(),
        ..LabOptions::default()
    };
    let mut lab = new_lab(&["alpha", "beta"], &opts);
    lab.start("alpha").unwrap();
    lab.start("beta").unwrap();
    lab.wait_connected("alpha", secs(60)).unwrap();
    ok(&lab, "alpha", Request::Promote { resource: "mail".into(), force: false });
    let dev_a = wait_until(&lab, "alpha", "primary", secs(60), |r| r.device.is_some()).device.unwrap();
    lab.partition("alpha").unwrap();
    for n in ["alpha", "beta"] {
        wait_until(&lab, n, "peer lost", secs(60), |r| r.peers[0].connection != "connected");
    }
    let mut events = Reader::start(&lab, "beta", &["--json", "mail"]);
    events.until("the end of the dump", |r| r.object == Object::None);
    ok(&lab, "beta", Request::Promote { resource: "mail".into(), force: true });
    let dev_b = wait_until(&lab, "beta", "primary", secs(60), |r| r.device.is_some()).device.unwrap();
    for (dev, run) in [(&dev_a, 1), (&dev_b, 2)] {
        let mut w = BlockWriter::open(dev, run, true);
        for i in 0..8u64 {
            w.write(i * BLOCK as u64).unwrap();
        }
    }
    lab.heal("alpha").unwrap();

    let handler = |r: &Record, kind: Kind, h: HookEvent| r.kind == kind && r.handler == Some(h);
    let got = events
        .until("the split-brain handler's response", |r| handler(r, Kind::Response, HookEvent::SplitBrain));
    for r in &got {
        println!("{}", r.render());
    }
    let promoted =
        find(&got, 0, "role:primary", |r| is_change(r, Object::Resource) && r.role == Some(Role::Primary));
    let call =
        find(&got, promoted + 1, "role-change call", |r| handler(r, Kind::Call, HookEvent::RoleChange));
    let resp =
        find(&got, call + 1, "role-change response", |r| handler(r, Kind::Response, HookEvent::RoleChange));
    assert_eq!(
        (got[resp].outcome, got[resp].exit_code),
        (Some(HandlerOutcome::Exited), Some(0)),
        "{:?}",
        got[resp]
    );
    let split = find(&got, resp + 1, "split-brain", |r| r.kind == Kind::SplitBrain);
    assert_eq!(got[split].peer.as_deref(), Some("alpha"));
    assert_eq!(got[split].resolution, Some(SplitBrainResolution::WaitsForAdministrator), "{:?}", got[split]);
    assert!(got[split].reason.is_some(), "a split brain says why: {:?}", got[split]);
    let call = find(&got, split + 1, "split-brain call", |r| handler(r, Kind::Call, HookEvent::SplitBrain));
    let resp = got.len() - 1;
    assert!(call < resp);
    assert_eq!(
        (got[resp].outcome, got[resp].exit_code),
        (Some(HandlerOutcome::Exited), Some(5)),
        "{:?}",
        got[resp]
    );
    assert_eq!(got[resp].peer.as_deref(), Some("alpha"));
    // The peer's replication state says so too, after the event.
    find(&got, split + 1, "replication:split_brain", |r| {
        is_change(r, Object::Peer) && r.replication == Some(ReplicationState::SplitBrain)
    });
    drop(events);
    // Counted for the metrics: one split brain; one role-change run (beta's promotion)
    // that succeeded, one split-brain run that failed (exit 5).
    let st = status_of(&lab, "beta", "mail");
    assert_eq!(st.stats.split_brains, 1, "{:?}", st.stats);
    let runs: Vec<(&str, u64, u64)> = st
        .stats
        .handlers
        .iter()
        .filter(|h| h.runs > 0)
        .map(|h| (h.handler.as_str(), h.runs, h.failures))
        .collect();
    assert_eq!(runs, [("split-brain", 1, 1), ("role-change", 1, 0)], "{:?}", st.stats);
    assert_eq!(st.stats.handlers.len(), HookEvent::ALL.len(), "every kind is counted, zero if it never ran");
    lab.stop_all();
}

#[test]
fn events_of_an_unknown_resource_is_an_error() {
    let mut lab = new_lab(&["alpha", "beta"], &LabOptions { size: 16 * MIB, ..LabOptions::default() });
    lab.start("alpha").unwrap();
    let out = tandem_cli(&lab, "alpha", &["events", "nosuch"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(err.contains("no resource \"nosuch\"") && err.contains("mail"), "{err}");
    assert!(out.stdout.is_empty(), "no records for an unknown resource: {out:?}");
    lab.stop("alpha", secs(20)).unwrap();
}
