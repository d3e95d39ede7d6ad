//! `tandem-bench --breakdown`: where one W1 iteration's time goes (or, with `--workloads`,
//! one request of another workload). Runs W1 (4 KiB, QD1, fsync after each write) on
//! Tandem without a peer and with a sync standby, with a
//! `tandem` built with the `stage-trace` feature: both agents then log when each request
//! passes each stage of the data path (see `tandem-replicator/src/stage_trace.rs`), on the
//! machine's one monotonic clock. Requests admitted during the timed fio run are joined by
//! sequence number across the two agents, and the table gives the median of each step,
//! writes and flushes apart, next to what fio saw. The gap between one request's completion
//! and the next one's admission is given for W1 only: with more than one request in flight
//! it measures nothing.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tandem_replicator::stage_trace::{Stage, FLUSH_BIT};

/// `CLOCK_MONOTONIC` now, in nanoseconds (the clock the agents' stage lines use).
pub fn now_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes into the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// The trace directory of configuration `cfg`, emptied.
pub fn trace_dir(work: &Path, cfg: &str) -> Result<PathBuf> {
    let d = work.join(format!("stages-{cfg}"));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

#[derive(Default, Clone)]
struct Trace {
    flush: bool,
    at: [Option<u64>; 9],
    /// Nanoseconds from the previous sequence number's completion to this admission.
    since_previous: Option<u64>,
}

fn read(dir: &Path, window: (u64, u64)) -> Result<Vec<Trace>> {
    let mut by_seq: HashMap<u64, Trace> = HashMap::new();
    for e in std::fs::read_dir(dir)? {
        let text = std::fs::read_to_string(e?.path())?;
        for line in text.lines() {
            let mut it = line.split(' ').map(|f| f.parse::<u64>());
            let (Some(Ok(stage)), Some(Ok(seq)), Some(Ok(ns))) = (it.next(), it.next(), it.next()) else {
                bail!("bad stage line {line:?} in {}", dir.display());
            };
            let t = by_seq.entry(seq).or_default();
            let stage = stage as u8;
            if stage & FLUSH_BIT != 0 {
                t.flush = true;
            }
            let s =
                Stage::from_u8(stage & !FLUSH_BIT).with_context(|| format!("unknown stage in {line:?}"))?;
            // The first time a request passes a stage is the one that counts.
            t.at[s as usize].get_or_insert(ns);
        }
    }
    // The gap from the previous request's completion to this one's admission: the kernel,
    // the loop device, FUSE and fio between two requests (at QD1 nothing else runs).
    let completed: HashMap<u64, u64> =
        by_seq.iter().filter_map(|(seq, t)| Some((*seq, t.at[Stage::Completed as usize]?))).collect();
    Ok(by_seq
        .into_iter()
        .filter(|(_, t)| t.at[Stage::Admitted as usize].is_some_and(|a| a >= window.0 && a <= window.1))
        .map(|(seq, mut t)| {
            let prev = seq.checked_sub(1).and_then(|p| completed.get(&p));
            t.since_previous = match (prev, t.at[Stage::Admitted as usize]) {
                (Some(p), Some(a)) => a.checked_sub(*p),
                _ => None,
            };
            t
        })
        .collect())
}

fn median(mut v: Vec<u64>) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    v.sort_unstable();
    Some(v[v.len() / 2] as f64 / 1000.0)
}

/// The steps reported, each from one stage to a later one.
const STEPS: [(&str, Stage, Stage); 9] = [
    ("primary: admitted → local I/O done", Stage::Admitted, Stage::LocalDone),
    ("primary: admitted → link writer has the frame", Stage::Admitted, Stage::Sent),
    ("wire out: link writer → standby's link reader", Stage::Sent, Stage::Received),
    ("standby: received → apply starts", Stage::Received, Stage::ApplyStart),
    ("standby: write / flush on its disk", Stage::ApplyStart, Stage::Applied),
    ("standby: applied → link writer has the ack", Stage::Applied, Stage::AckSent),
    ("wire back: ack writer → primary's link reader", Stage::AckSent, Stage::AckReceived),
    ("primary: ack received → request completed", Stage::AckReceived, Stage::Completed),
    ("primary: admitted → completed (engine total)", Stage::Admitted, Stage::Completed),
];

/// The breakdown table of configuration `label`: fio's write and fsync p50 beside the
/// median of every step over the requests admitted inside `window`; `serial` when the
/// workload keeps one request in flight (then the gap between requests is given too).
pub fn table(
    label: &str,
    dir: &Path,
    window: (u64, u64),
    fio_write_p50: f64,
    fio_sync_p50: f64,
    serial: bool,
) -> Result<String> {
    let traces = read(dir, window)?;
    if traces.is_empty() {
        bail!("no stage lines in {}: build tandem with `--features tandem-agent/stage-trace`", dir.display());
    }
    let (writes, flushes): (Vec<_>, Vec<_>) = traces.iter().partition(|t| !t.flush);
    let step = |ts: &[&Trace], a: Stage, b: Stage| {
        median(ts.iter().filter_map(|t| t.at[b as usize]?.checked_sub(t.at[a as usize]?)).collect())
    };
    let fmt = |v: Option<f64>| v.map_or("-".into(), |v| format!("{v:.0}"));
    let mut s = format!(
        "{label}: {} writes and {} flushes traced\n\n| step (median µs) | write | flush |\n|---|---|---|\n",
        writes.len(),
        flushes.len()
    );
    s += &format!("| fio: request issued → completed (p50) | {fio_write_p50:.0} | {fio_sync_p50:.0} |\n");
    for (name, a, b) in STEPS {
        let (w, f) = (step(&writes, a, b), step(&flushes, a, b));
        if w.is_none() && f.is_none() {
            continue;
        }
        s += &format!("| {name} | {} | {} |\n", fmt(w), fmt(f));
    }
    if serial {
        let gap = |ts: &[&Trace]| median(ts.iter().filter_map(|t| t.since_previous).collect());
        s += &format!(
            "| between requests: previous one completed → this one admitted (kernel, loop, FUSE, fio) | {} | {} |\n",
            fmt(gap(&writes)),
            fmt(gap(&flushes)),
        );
    }
    let total = |ts: &[&Trace]| step(ts, Stage::Admitted, Stage::Completed);
    s += &format!(
        "| fio p50 − engine total (kernel, loop, FUSE and fio itself; a difference of medians, not a measured step) | {} | {} |\n",
        fmt(total(&writes).map(|t| fio_write_p50 - t)),
        fmt(total(&flushes).map(|t| fio_sync_p50 - t)),
    );
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two agents' files, joined by sequence number: a write and a flush inside the window,
    /// one request outside it that must not count.
    #[test]
    fn steps_are_joined_across_agents_and_split_by_kind() {
        let dir = tempfile::tempdir().unwrap();
        let us = |v: u64| v * 1000;
        // primary: admitted, local-done, sent, ack-received, completed
        let primary = [
            (0, 1, us(1000)),
            (1, 1, us(1010)),
            (2, 1, us(1004)),
            (7, 1, us(1100)),
            (8, 1, us(1102)),
            (FLUSH_BIT as u64, 2, us(2000)),
            (2, 2, us(2003)),
            (7, 2, us(2200)),
            (8, 2, us(2201)),
            (0, 3, us(9000)),
            (8, 3, us(9999)),
        ];
        // standby: received, apply-start, applied, ack-sent
        let standby =
            [(3, 1, us(1040)), (4, 1, us(1045)), (5, 1, us(1060)), (6, 1, us(1062)), (3, 2, us(2050))];
        let write = |name: &str, lines: &[(u64, u64, u64)]| {
            let text: String = lines.iter().map(|(a, b, c)| format!("{a} {b} {c}\n")).collect();
            std::fs::write(dir.path().join(name), text).unwrap();
        };
        write("stages.1", &primary);
        write("stages.2", &standby);
        let t = table("x", dir.path(), (us(500), us(5000)), 150.0, 300.0, true).unwrap();
        assert!(t.contains("1 writes and 1 flushes traced"), "{t}");
        assert!(t.contains("| wire out: link writer → standby's link reader | 36 | 47 |"), "{t}");
        assert!(t.contains("| standby: write / flush on its disk | 15 | - |"), "{t}");
        assert!(t.contains("| primary: admitted → completed (engine total) | 102 | 201 |"), "{t}");
        // The flush (seq 2) was admitted 898 µs after the write (seq 1) completed.
        assert!(t.contains("→ this one admitted (kernel, loop, FUSE, fio) | - | 898 |"), "{t}");
        assert!(t.contains("fio itself; a difference of medians, not a measured step) | 48 | 99 |"), "{t}");
        let parallel = table("x", dir.path(), (us(500), us(5000)), 150.0, 300.0, false).unwrap();
        assert!(!parallel.contains("between requests"), "{parallel}");
        assert!(
            parallel.contains("| primary: admitted → completed (engine total) | 102 | 201 |"),
            "{parallel}"
        );
    }

    #[test]
    fn no_lines_says_how_to_build() {
        let dir = tempfile::tempdir().unwrap();
        let e = table("x", dir.path(), (0, u64::MAX), 1.0, 1.0, true).unwrap_err().to_string();
        assert!(e.contains("stage-trace"), "{e}");
    }
}
