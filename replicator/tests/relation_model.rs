//! Two nodes' relation state machines driven by random event sequences, against a model of
//! both disks: writes on the primary, the replication stream, the resync stream (chunks
//! read at a point in the change stream, cleared from the bitmap only when acknowledged
//! and unchanged), online verify marking blocks, `verify --repair`, cut links, reconnects
//! and failed streams, each delivered in a random interleaving.
//!
//! Checked on every step and at the end:
//! - a resync block is never applied over a newer replicated write;
//! - once everything in flight has been delivered, a target the machines call in sync and
//!   up to date holds exactly the primary's data.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};

use proptest::prelude::*;
use tandem_protocol::{AfterSplitBrain, DiskState, Generation, ResourceHello, Role};
use tandem_replicator::relation::{step, Action, Event, Facts, Phase, Relation, Session};

const BLOCKS: usize = 4;
const BLOCK: u64 = 4096;
const SIZE: u64 = BLOCKS as u64 * BLOCK;

#[derive(Debug, Clone)]
enum Msg {
    Offer(ResourceHello, bool),
    Withdraw { reason: String, declines_offer: bool },
    State(ResourceHello),
    Bitmap(Vec<usize>),
    Invalidate { checksum: bool },
    ResyncStart(Generation),
    ResyncDone(Generation),
}

/// A resync chunk read from the source: block, the change-stream position it was read at,
/// its data, and the bitmap mark count of the block when read.
#[derive(Debug, Clone)]
struct Chunk {
    block: usize,
    seq: u64,
    version: u64,
    marks: u64,
}

struct Node {
    name: &'static str,
    primary: bool,
    disk: DiskState,
    generation: Generation,
    bitmap_uuid: u64,
    /// Version (= the seq of the write that produced it) per block, and the change-stream
    /// position of the operation that last wrote it here.
    data: Vec<u64>,
    written_at: Vec<u64>,
    bitmap: BTreeSet<usize>,
    /// Times each block was marked (a chunk clears its bit only if no mark came since).
    marks: Vec<u64>,
    tracking: Option<HashMap<usize, u64>>,
    replicating: bool,
    rotate_on_write: bool,
    resync: Option<Vec<Chunk>>,
    retry_due: bool,
    rel: Relation,
}

impl Node {
    fn new(name: &'static str, peer: &'static str, primary: bool) -> Self {
        Node {
            name,
            primary,
            disk: DiskState::UpToDate,
            generation: Generation { current: 100, history: vec![1] },
            bitmap_uuid: 0,
            data: vec![0; BLOCKS],
            written_at: vec![0; BLOCKS],
            bitmap: BTreeSet::new(),
            marks: vec![0; BLOCKS],
            tracking: None,
            replicating: false,
            rotate_on_write: false,
            resync: None,
            retry_due: false,
            rel: Relation::new(peer),
        }
    }

    fn hello(&self) -> ResourceHello {
        ResourceHello {
            name: "r".into(),
            size: SIZE,
            block_size: BLOCK as u32,
            role: if self.primary { Role::Primary } else { Role::Secondary },
            disk: self.disk,
            generation: self.generation.clone(),
            bitmap_uuid: self.bitmap_uuid,
            out_of_sync_bytes: self.bitmap.len() as u64 * BLOCK,
            crashed_primary: false,
            generation_started_ms: 0,
            after_split_brain: AfterSplitBrain::Disconnect,
            discard_local: false,
        }
    }

    fn facts(&self) -> Facts {
        Facts {
            node: self.name.into(),
            hello: self.hello(),
            other_primary: None,
            checksum_resync: false,
            checksum_full_resync: false,
        }
    }

    fn mark(&mut self, b: usize) {
        self.bitmap.insert(b);
        self.marks[b] += 1;
    }
}

#[derive(Debug, Clone)]
enum Op {
    Write(usize),
    DeliverControl(bool),
    DeliverData,
    ResyncRead,
    DeliverResync,
    /// Online verify found block b different (or not): marked, then `verify --repair`.
    VerifyRepair(usize),
    Cut,
    Reconnect,
    /// A stream of the resource failed on one side (checksum, timeout, ...).
    StreamFail(bool),
    Retry(bool),
}

struct World {
    nodes: [Node; 2],
    /// Control messages in flight: [0] from A to B, [1] from B to A.
    control: [VecDeque<Msg>; 2],
    /// Replication data from the primary: (seq, block).
    data: VecDeque<(u64, usize)>,
    resync_chunks: VecDeque<Chunk>,
    link: bool,
    next_seq: u64,
    next_generation: u64,
    violations: Vec<String>,
}

impl World {
    fn new() -> Self {
        let mut w = World {
            nodes: [Node::new("a", "b", true), Node::new("b", "a", false)],
            control: [VecDeque::new(), VecDeque::new()],
            data: VecDeque::new(),
            resync_chunks: VecDeque::new(),
            link: false,
            next_seq: 1,
            next_generation: 200,
            violations: Vec::new(),
        };
        w.connect();
        w
    }

    fn primary(&self) -> usize {
        if self.nodes[0].primary {
            0
        } else {
            1
        }
    }

    fn deliver(&mut self, i: usize, ev: Event) {
        let facts = self.nodes[i].facts();
        let acts = step(&mut self.nodes[i].rel, &facts, ev);
        for a in acts {
            self.execute(i, a);
        }
    }

    fn send(&mut self, from: usize, m: Msg) {
        if self.link {
            self.control[from].push_back(m);
        }
    }

    fn execute(&mut self, i: usize, a: Action) {
        let j = 1 - i;
        match a {
            Action::SendOffer { answer, hello } => self.send(i, Msg::Offer(hello, answer)),
            Action::SendWithdraw { reason, declines_offer } => {
                self.send(i, Msg::Withdraw { reason, declines_offer })
            }
            Action::SendState => self.send(i, Msg::State(self.nodes[i].hello())),
            Action::SendBitmap => self.send(i, Msg::Bitmap(self.nodes[i].bitmap.iter().copied().collect())),
            Action::SendInvalidate { checksum } => self.send(i, Msg::Invalidate { checksum }),
            Action::BeginTracking => {
                self.nodes[i].tracking.get_or_insert_with(HashMap::new);
            }
            Action::MarkAllOutOfSync => {
                for b in 0..BLOCKS {
                    self.nodes[i].mark(b);
                }
            }
            Action::SetDisk { disk, .. } => self.nodes[i].disk = disk,
            Action::AdoptGeneration { generation, .. } => self.nodes[i].generation = generation,
            Action::StartReplication => {
                self.nodes[i].replicating = true;
                let dirty = !self.nodes[i].bitmap.is_empty();
                self.deliver(i, Event::ReplicationAttached { dirty });
            }
            Action::StopStreams { .. } => self.stop_streams(),
            Action::LosePeer => {
                let n = &mut self.nodes[i];
                if n.bitmap_uuid == 0 {
                    n.bitmap_uuid = n.generation.current;
                }
                n.rotate_on_write = true;
            }
            Action::StartResyncSource { .. } => {
                self.nodes[i].resync = Some(Vec::new());
                let g = self.nodes[i].generation.clone();
                self.send(i, Msg::ResyncStart(g));
            }
            Action::ResyncTargetStarted { generation } => {
                self.nodes[i].disk = DiskState::Inconsistent;
                self.nodes[i].generation = generation;
            }
            Action::CompleteResyncTarget { generation } => {
                let n = &mut self.nodes[i];
                n.disk = DiskState::UpToDate;
                n.generation = generation;
                n.bitmap.clear();
                n.bitmap_uuid = 0;
                n.tracking = None;
                self.deliver(i, Event::TargetCompleted { up_to_date: true });
            }
            Action::ScheduleRetry => self.nodes[i].retry_due = true,
            Action::Report(_) => {}
        }
        let _ = j;
    }

    /// The resource's streams close: undelivered replicated writes are marked on the
    /// primary (its session's end), resync chunks in flight are lost.
    fn stop_streams(&mut self) {
        let p = self.primary();
        for (_, b) in std::mem::take(&mut self.data) {
            self.nodes[p].mark(b);
        }
        self.resync_chunks.clear();
        for n in &mut self.nodes {
            n.replicating = false;
            n.resync = None;
        }
    }

    fn connect(&mut self) {
        if self.link {
            return;
        }
        self.link = true;
        let offers = [self.nodes[0].rel.offers(), self.nodes[1].rel.offers()];
        let hellos = [self.nodes[0].hello(), self.nodes[1].hello()];
        for i in 0..2 {
            let offer = offers[1 - i].then(|| hellos[1 - i].clone());
            self.deliver(i, Event::LinkUp { sent: hellos[i].clone(), offer });
        }
    }

    fn cut(&mut self) {
        if !self.link {
            return;
        }
        self.stop_streams();
        self.link = false;
        self.control = [VecDeque::new(), VecDeque::new()];
        for i in 0..2 {
            self.deliver(i, Event::LinkDown { reason: "cut".into() });
        }
    }

    fn write(&mut self, b: usize) {
        let p = self.primary();
        let seq = self.take_seq();
        if std::mem::take(&mut self.nodes[p].rotate_on_write) {
            let g = self.next_generation;
            self.next_generation += 1;
            let n = &mut self.nodes[p];
            let old = n.generation.current;
            n.generation.history.insert(0, old);
            n.generation.current = g;
            // The agent tells the peers in session (they follow it if in sync).
            if n.rel.is_up() {
                let h = n.hello();
                self.send(p, Msg::State(h));
            }
        }
        let n = &mut self.nodes[p];
        n.data[b] = seq;
        n.written_at[b] = seq;
        if n.replicating && n.rel.is_up() {
            self.data.push_back((seq, b));
        } else {
            n.mark(b);
        }
    }

    fn take_seq(&mut self) -> u64 {
        let s = self.next_seq;
        self.next_seq += 1;
        s
    }

    fn deliver_control(&mut self, from: usize) {
        let Some(m) = self.control[from].pop_front() else { return };
        let to = 1 - from;
        let ev = match m {
            Msg::Offer(h, answer) => Event::Offer { remote: h, answer },
            Msg::Withdraw { reason, declines_offer } => Event::Withdraw { reason, declines_offer },
            Msg::State(h) => Event::RemoteState(h),
            Msg::Bitmap(blocks) => {
                if !self.nodes[to].rel.is_up() {
                    return;
                }
                for b in blocks {
                    self.nodes[to].mark(b);
                }
                Event::BitmapDone
            }
            Msg::Invalidate { checksum } => Event::Invalidate { checksum },
            Msg::ResyncStart(g) => Event::ResyncStart { generation: g },
            Msg::ResyncDone(g) => Event::ResyncDone { generation: g },
        };
        self.deliver(to, ev);
    }

    fn deliver_data(&mut self) {
        let Some((seq, b)) = self.data.pop_front() else { return };
        let s = 1 - self.primary();
        if self.nodes[s].rel.session == Session::Offered {
            // The stream waits to be accepted until the secondary's session is up (the
            // answer to its offer is on the way on the control stream).
            self.data.push_front((seq, b));
            return;
        }
        if !self.nodes[s].rel.is_up() {
            // The secondary refuses the stream: the primary's session ends with this
            // write unacknowledged, so it is marked.
            let p = self.primary();
            self.stop_streams();
            self.nodes[p].mark(b);
            self.deliver(p, Event::StreamFailed { reason: "stream refused".into() });
            return;
        }
        let n = &mut self.nodes[s];
        n.data[b] = seq;
        n.written_at[b] = seq;
        if let Some(t) = n.tracking.as_mut() {
            let e = t.entry(b).or_insert(seq);
            *e = (*e).max(seq);
        }
    }

    fn source(&self) -> Option<usize> {
        (0..2).find(|i| self.nodes[*i].resync.is_some())
    }

    fn resync_read(&mut self) {
        let Some(s) = self.source() else { return };
        let in_flight: BTreeSet<usize> = self.resync_chunks.iter().map(|c| c.block).collect();
        let next = self.nodes[s].bitmap.iter().copied().find(|b| !in_flight.contains(b));
        match next {
            Some(b) => {
                let seq = self.take_seq();
                let n = &self.nodes[s];
                let c = Chunk { block: b, seq, version: n.data[b], marks: n.marks[b] };
                self.resync_chunks.push_back(c);
            }
            None if self.resync_chunks.is_empty() => {
                // Every bit clear and acknowledged: the resync is done.
                self.nodes[s].resync = None;
                self.nodes[s].bitmap_uuid = 0;
                let g = self.nodes[s].generation.clone();
                self.send(s, Msg::ResyncDone(g));
                self.deliver(s, Event::SourceEnded { result: Ok(()) });
            }
            None => {}
        }
    }

    fn deliver_resync(&mut self) {
        let Some(c) = self.resync_chunks.pop_front() else { return };
        let Some(s) = self.source() else { return };
        if self.nodes[1 - s].rel.session == Session::Offered {
            self.resync_chunks.push_front(c);
            return;
        }
        if !self.nodes[1 - s].rel.is_up() {
            // A node accepts resync streams only within an established session.
            self.resync_chunks.clear();
            self.nodes[s].resync = None;
            let reason = "resync stream refused".to_string();
            self.deliver(s, Event::SourceEnded { result: Err(reason) });
            return;
        }
        let t = &mut self.nodes[1 - s];
        let newer = t.tracking.as_ref().and_then(|m| m.get(&c.block)).is_some_and(|seq| *seq > c.seq);
        if !newer {
            if t.written_at[c.block] > c.seq {
                self.violations.push(format!(
                    "resync block {} read at seq {} overwrote a replicated write of seq {} on {}",
                    c.block, c.seq, t.written_at[c.block], t.name
                ));
            }
            t.data[c.block] = c.version;
            t.written_at[c.block] = c.seq;
        }
        let src = &mut self.nodes[s];
        if src.marks[c.block] == c.marks {
            src.bitmap.remove(&c.block);
        }
    }

    fn apply(&mut self, op: Op) {
        match op {
            Op::Write(b) => self.write(b),
            Op::DeliverControl(ab) => self.deliver_control(usize::from(!ab)),
            Op::DeliverData => self.deliver_data(),
            Op::ResyncRead => self.resync_read(),
            Op::DeliverResync => self.deliver_resync(),
            Op::VerifyRepair(b) => {
                let p = self.primary();
                if self.nodes[p].rel.is_up() {
                    self.nodes[p].mark(b);
                    self.deliver(p, Event::ResyncRequested);
                }
            }
            Op::Cut => self.cut(),
            Op::Reconnect => self.connect(),
            Op::StreamFail(a) => {
                let i = usize::from(!a);
                self.deliver(i, Event::StreamFailed { reason: "stream failed".into() });
            }
            Op::Retry(a) => {
                let i = usize::from(!a);
                if std::mem::take(&mut self.nodes[i].retry_due) {
                    self.deliver(i, Event::RetryDue);
                }
            }
        }
    }

    /// Delivers everything in flight and lets every resync finish.
    fn quiesce(&mut self) {
        self.connect();
        for _ in 0..10_000 {
            let busy = !self.control[0].is_empty()
                || !self.control[1].is_empty()
                || !self.data.is_empty()
                || !self.resync_chunks.is_empty()
                || self.source().is_some()
                || self.nodes.iter().any(|n| n.retry_due);
            if !busy {
                return;
            }
            for op in [
                Op::DeliverControl(true),
                Op::DeliverControl(false),
                Op::DeliverData,
                Op::ResyncRead,
                Op::DeliverResync,
                Op::Retry(true),
                Op::Retry(false),
            ] {
                self.apply(op);
            }
        }
        panic!(
            "did not quiesce: {:?} {:?} / {:?} {:?}; in flight {:?} {:?}",
            self.nodes[0].rel.session,
            self.nodes[0].rel.phase,
            self.nodes[1].rel.session,
            self.nodes[1].rel.phase,
            self.control,
            self.source()
        );
    }

    fn check_converged(&self) -> Result<(), String> {
        let p = self.primary();
        let (pri, sec) = (&self.nodes[p], &self.nodes[1 - p]);
        let up = pri.rel.session == Session::Up && sec.rel.session == Session::Up;
        if !up {
            return Err(format!("sessions not up: {:?} / {:?}", pri.rel.session, sec.rel.session));
        }
        if pri.rel.phase != Phase::InSync || sec.rel.phase != Phase::InSync {
            return Err(format!("phases {:?} / {:?}", pri.rel.phase, sec.rel.phase));
        }
        if sec.disk != DiskState::UpToDate {
            return Err(format!("secondary disk {:?}", sec.disk));
        }
        if !pri.bitmap.is_empty() {
            return Err(format!("primary still marks {:?}", pri.bitmap));
        }
        let differ: BTreeMap<usize, (u64, u64)> = (0..BLOCKS)
            .filter(|b| pri.data[*b] != sec.data[*b])
            .map(|b| (b, (pri.data[b], sec.data[b])))
            .collect();
        if !differ.is_empty() {
            return Err(format!(
                "in sync and up to date, but blocks differ (primary, secondary): {differ:?}"
            ));
        }
        Ok(())
    }
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..BLOCKS).prop_map(Op::Write),
        4 => any::<bool>().prop_map(Op::DeliverControl),
        4 => Just(Op::DeliverData),
        3 => Just(Op::ResyncRead),
        3 => Just(Op::DeliverResync),
        2 => (0..BLOCKS).prop_map(Op::VerifyRepair),
        1 => Just(Op::Cut),
        2 => Just(Op::Reconnect),
        1 => any::<bool>().prop_map(Op::StreamFail),
        2 => any::<bool>().prop_map(Op::Retry),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    /// Whatever happens, no resync block lands on a newer write, and once everything in
    /// flight is delivered the pair is in sync with identical data.
    #[test]
    fn random_histories_converge_without_overwriting_newer_writes(ops in proptest::collection::vec(arb_op(), 1..250)) {
        let mut w = World::new();
        for op in ops {
            w.apply(op);
            prop_assert!(w.violations.is_empty(), "{:?}", w.violations);
        }
        w.quiesce();
        prop_assert!(w.violations.is_empty(), "{:?}", w.violations);
        w.check_converged().map_err(TestCaseError::fail)?;
    }
}

/// `verify --repair` used to start the resync source directly, before the target tracked
/// replicated writes: a resync chunk read before a write, arriving after it, overwrote it.
/// The same interleaving through the relation's path is safe.
#[test]
fn verify_repair_race_is_closed_by_the_request_path() {
    // The old path: marked, and the source started at once.
    let mut w = World::new();
    w.write(3);
    w.deliver_data();
    w.nodes[0].mark(3);
    w.nodes[0].rel.phase = Phase::Source(tandem_replicator::relation::SourcePhase::Running);
    w.execute(0, Action::StartResyncSource { checksum: false });
    w.resync_read(); // chunk of block 3 read at seq s
    w.write(3); // a newer write, replicated...
    w.deliver_data(); // ...reaches b before ResyncStart (another stream)
    w.deliver_control(0); // ResyncStart: b tracks from now on
    w.deliver_resync(); // the older chunk arrives
    assert!(
        w.violations.iter().any(|v| v.contains("overwrote a replicated write")),
        "the old path must be caught: {:?}",
        w.violations
    );

    // The relation's path: the request goes through the target, which tracks first.
    let mut w = World::new();
    w.write(3);
    w.deliver_data();
    w.apply(Op::VerifyRepair(3));
    assert!(w.nodes[0].resync.is_none(), "the source must wait for the target's bitmap");
    w.deliver_control(0); // state with out-of-sync bytes: b tracks, answers with its bitmap
    assert!(w.nodes[1].tracking.is_some());
    w.deliver_control(1); // bitmap: a starts the resync
    assert!(w.nodes[0].resync.is_some());
    w.resync_read();
    w.write(3);
    w.deliver_data();
    w.deliver_control(0); // ResyncStart
    w.deliver_resync();
    assert!(w.violations.is_empty(), "{:?}", w.violations);
    w.quiesce();
    w.check_converged().unwrap();
}

#[test]
fn a_refused_session_stays_apart_until_an_administrator_acts() {
    let mut w = World::new();
    // Both primary: the session is refused, not retried.
    w.nodes[1].primary = true;
    w.deliver(1, Event::Promoted);
    w.quiesce_control();
    w.deliver(0, Event::RemoteState(w.nodes[1].hello()));
    w.quiesce_control();
    for n in &w.nodes {
        assert!(!n.rel.is_up(), "{} still up: {:?}", n.name, n.rel);
        assert!(!n.retry_due, "{} retries a refusal", n.name);
    }
    // The second primary demotes: it offers the resource again and the pair reconnects.
    w.nodes[1].primary = false;
    w.deliver(1, Event::Demoted);
    w.quiesce();
    w.check_converged().unwrap();
}

#[test]
fn admin_disconnect_and_connect() {
    let mut w = World::new();
    w.deliver(1, Event::AdminDisconnect);
    w.quiesce_control();
    assert!(!w.nodes[0].rel.is_up() && !w.nodes[1].rel.is_up());
    w.write(2);
    assert!(w.nodes[0].bitmap.contains(&2), "the primary tracks what the peer misses");
    // A new connection does not bring it back either.
    w.cut();
    w.connect();
    w.quiesce_control();
    assert!(!w.nodes[1].rel.is_up());
    w.deliver(1, Event::AdminConnect);
    w.quiesce();
    w.check_converged().unwrap();
}

impl World {
    fn quiesce_control(&mut self) {
        while !self.control[0].is_empty() || !self.control[1].is_empty() {
            self.deliver_control(0);
            self.deliver_control(1);
        }
    }
}
