//! The `--mail` tables: every round, the medians and their ratio to `loop`, and the checks.

use super::{Round, Stack, MAILBOXES};
use crate::Args;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return f64::NAN;
    }
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

pub(super) fn table(
    version: &str,
    args: &Args,
    count: usize,
    body_bytes: usize,
    rounds: usize,
    stacks: &[Stack],
    results: &[Round],
) -> String {
    let mut s = format!(
        "Mail (Postfix {version}): {count} messages ({:.1} MB of bodies) per stack and round, {} SMTP sessions, \
         one message per connection, {MAILBOXES} Maildirs (virtual(8)), queue and Maildirs on ext4 \
         (data=ordered) on a {} MiB volume; {rounds} interleaved rounds\n\n\
         | round | stack | messages | MB delivered | all accepted (s) | all read (s) | msgs/s | MB/s |\n\
         |---|---|---|---|---|---|---|---|\n",
        body_bytes as f64 / 1e6,
        args.mail_sessions,
        args.size >> 20,
    );
    for r in results {
        s += &format!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {:.0} | {:.1} |\n",
            r.round,
            r.stack.name(),
            r.messages,
            r.bytes as f64 / 1e6,
            r.smtp_secs,
            r.secs,
            r.rate(),
            r.bytes as f64 / 1e6 / r.secs
        );
    }
    let medians: Vec<(Stack, Vec<f64>, f64)> = stacks
        .iter()
        .map(|st| {
            let rates: Vec<f64> = results.iter().filter(|r| r.stack == *st).map(Round::rate).collect();
            let m = median(&mut rates.clone());
            (*st, rates, m)
        })
        .collect();
    let loop_median = medians.iter().find(|m| m.0 == Stack::Loop).map(|m| m.2);
    s += "\n| stack | msgs/s per round | median msgs/s | median vs loop |\n|---|---|---|---|\n";
    for (st, rates, m) in &medians {
        let per: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
        let vs = loop_median.map_or("-".to_string(), |l| format!("{:.0} %", 100.0 * m / l));
        s += &format!("| {} | {} | {m:.0} | {vs} |\n", st.name(), per.join(", "));
    }
    if let (Some(l), Some(sync)) = (loop_median, medians.iter().find(|m| m.0 == Stack::Sync)) {
        s += &format!("\nsync / loop (medians): {:.2}\n", sync.2 / l);
    }
    s += "\n| round | stack | delivered exactly once, whole, checksum right | Postfix queue after | e2fsck -fn | \
          standby blocks compared (all equal) |\n|---|---|---|---|---|---|\n";
    for r in results {
        s += &format!(
            "| {} | {} | {} of {} | empty | clean | {} |\n",
            r.round,
            r.stack.name(),
            r.messages,
            r.messages,
            r.standby_blocks.map_or("-".to_string(), |b| b.to_string())
        );
    }
    s
}
