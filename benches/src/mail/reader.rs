//! The IMAP-like reader: a thread that polls every mailbox's `new/`, reads each delivered
//! message whole, checks it, and renames it into `cur/` with the `:2,S` (seen) flag, as an
//! IMAP server does when its client fetches new mail. A message counts as read once it is
//! checked and moved; the time of the last one ends the measurement.
//!
//! Checked for each message: its `X-Bench-Run` is this run's, its `X-Bench-Id` is a message
//! that was sent and not read before (each is delivered exactly once), it is in the mailbox
//! it was sent to, and its body — everything after the first empty line, as Postfix stored
//! it (LF line ends, dots unstuffed) — has the length and SHA-256 it was sent with.
//! [`final_check`] reads every mailbox again once Postfix has stopped.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use super::postfix::mailbox;
use super::smtp::{hex, Outgoing};

/// How many messages have been read, and when the last of them was.
#[derive(Debug, Clone, Copy, Default)]
pub struct Progress {
    pub read: usize,
    pub bytes: u64,
    pub last_at: Option<Instant>,
}

pub struct Reader {
    progress: Arc<Mutex<Progress>>,
    stop: Arc<AtomicBool>,
    /// None once joined.
    thread: Option<JoinHandle<Result<()>>>,
}

impl Reader {
    /// Starts reading the `mailboxes` Maildirs under `base`.
    pub fn spawn(base: PathBuf, mailboxes: usize, messages: Arc<Vec<Outgoing>>, run: String) -> Self {
        let progress = Arc::new(Mutex::new(Progress::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (p, s) = (progress.clone(), stop.clone());
        let thread = std::thread::spawn(move || read_loop(&base, mailboxes, &messages, &run, &p, &s));
        Reader { progress, stop, thread: Some(thread) }
    }

    pub fn progress(&self) -> Progress {
        *self.progress.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// True once the thread ended, which before [`Reader::stop`] means it failed.
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Stops the thread; its error, if it failed.
    pub fn stop(mut self) -> Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => t.join().map_err(|_| anyhow::anyhow!("the reader panicked"))?,
            None => Ok(()),
        }
    }
}

/// On an error elsewhere: the thread stops and lets go of the volume before it is unmounted.
impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn read_loop(
    base: &Path,
    mailboxes: usize,
    messages: &[Outgoing],
    run: &str,
    progress: &Mutex<Progress>,
    stop: &AtomicBool,
) -> Result<()> {
    let mut seen = vec![false; messages.len()];
    while !stop.load(Ordering::Relaxed) {
        let mut found = false;
        for mb in 0..mailboxes {
            let md = base.join(mailbox(mb));
            for entry in
                std::fs::read_dir(md.join("new")).with_context(|| format!("reading {}", md.display()))?
            {
                let entry = entry?;
                let path = entry.path();
                let text = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
                let id = verify(&text, run, mb, messages).with_context(|| format!("{}", path.display()))?;
                if std::mem::replace(&mut seen[id], true) {
                    bail!("message {id} delivered twice (again as {})", path.display());
                }
                let name = entry.file_name();
                let to = md.join("cur").join(format!("{}:2,S", name.to_string_lossy()));
                std::fs::rename(&path, &to).with_context(|| format!("moving {} to cur/", path.display()))?;
                let mut p = progress.lock().unwrap_or_else(|e| e.into_inner());
                p.read += 1;
                p.bytes += text.len() as u64;
                p.last_at = Some(Instant::now());
                found = true;
            }
        }
        if !found {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    Ok(())
}

fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(": ")).map(str::trim)
}

/// Checks one delivered message found in mailbox `mb`; returns its id.
fn verify(text: &[u8], run: &str, mb: usize, messages: &[Outgoing]) -> Result<usize> {
    let split = text.windows(2).position(|w| w == b"\n\n").context("no end of headers")?;
    let headers = std::str::from_utf8(&text[..split]).context("headers not UTF-8")?;
    let body = &text[split + 2..];
    let got_run = header(headers, "X-Bench-Run").context("no X-Bench-Run header")?;
    if got_run != run {
        bail!("message of run {got_run:?} found in run {run:?}");
    }
    let id: usize = header(headers, "X-Bench-Id").context("no X-Bench-Id header")?.parse()?;
    let m = messages.get(id).with_context(|| format!("message id {id} was never sent"))?;
    let e = &m.expected;
    if e.mailbox != mb {
        bail!("message {id} for {} delivered to {}", mailbox(e.mailbox), mailbox(mb));
    }
    if body.len() != e.body_len {
        bail!("message {id}: body of {} bytes, {} sent", body.len(), e.body_len);
    }
    let sum: [u8; 32] = Sha256::digest(body).into();
    if sum != e.sha256 || header(headers, "X-Bench-Body-SHA256") != Some(hex(&e.sha256).as_str()) {
        bail!(
            "message {id}: body SHA-256 {} differs from the {} it was sent with",
            hex(&sum),
            hex(&e.sha256)
        );
    }
    Ok(id)
}

/// After Postfix stopped: every mailbox's `tmp/` and `new/` are empty and its `cur/` holds
/// each message sent to it exactly once, whole. Returns the bytes of mail stored.
pub fn final_check(base: &Path, mailboxes: usize, messages: &[Outgoing], run: &str) -> Result<u64> {
    let mut count = vec![0u32; messages.len()];
    let mut bytes = 0;
    for mb in 0..mailboxes {
        let md = base.join(mailbox(mb));
        for sub in ["tmp", "new"] {
            let left: Vec<_> = std::fs::read_dir(md.join(sub))?.flatten().map(|e| e.file_name()).collect();
            if !left.is_empty() {
                bail!("{} holds {} files after the run: {left:?}", md.join(sub).display(), left.len());
            }
        }
        for entry in std::fs::read_dir(md.join("cur"))? {
            let path = entry?.path();
            let text = std::fs::read(&path)?;
            let id = verify(&text, run, mb, messages).with_context(|| format!("{}", path.display()))?;
            count[id] += 1;
            bytes += text.len() as u64;
        }
    }
    let missing: Vec<usize> = (0..count.len()).filter(|i| count[*i] == 0).collect();
    let twice: Vec<usize> = (0..count.len()).filter(|i| count[*i] > 1).collect();
    if !missing.is_empty() || !twice.is_empty() {
        bail!(
            "{} accepted messages not delivered (first: {:?}), {} delivered more than once (first: {:?})",
            missing.len(),
            &missing[..missing.len().min(10)],
            twice.len(),
            &twice[..twice.len().min(10)]
        );
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mail::smtp::make;

    /// A message as virtual(8) stores it: Postfix's headers first, then the client's, LF
    /// line ends, dots unstuffed.
    fn stored(m: &Outgoing, run: &str) -> Vec<u8> {
        let mut s =
            format!("Return-Path: <sender@example.org>\nDelivered-To: u00@bench.test\nX-Bench-Run: {run}\n")
                .into_bytes();
        let text = std::str::from_utf8(&m.data).unwrap();
        for line in text.split_terminator("\r\n") {
            s.extend_from_slice(line.strip_prefix('.').unwrap_or(line).as_bytes());
            s.push(b'\n');
        }
        s
    }

    #[test]
    fn verify_accepts_the_message_as_stored_and_rejects_any_change() {
        let msgs = make(40, 4);
        for (id, m) in msgs.iter().enumerate() {
            let text = stored(m, "r");
            assert_eq!(verify(&text, "r", m.expected.mailbox, &msgs).unwrap(), id);
            assert!(verify(&text, "other", m.expected.mailbox, &msgs).is_err(), "another run's message");
            assert!(verify(&text, "r", (m.expected.mailbox + 1) % 4, &msgs).is_err(), "wrong mailbox");
            let mut flipped = text.clone();
            let last = flipped.len() - 2;
            flipped[last] ^= 1;
            assert!(verify(&flipped, "r", m.expected.mailbox, &msgs).is_err(), "a changed body byte");
            assert!(verify(&text[..text.len() - 1], "r", m.expected.mailbox, &msgs).is_err(), "a cut body");
        }
    }

    #[test]
    fn sizes_follow_the_documented_mix() {
        let msgs = make(2000, 16);
        let n = |f: &dyn Fn(usize) -> bool| msgs.iter().filter(|m| f(m.expected.body_len)).count();
        let small = n(&|l| (2048..8192).contains(&l));
        let (mid, big) = (n(&|l| l == 64 << 10), n(&|l| l == 512 << 10));
        assert_eq!(small + mid + big, msgs.len());
        assert!((1600..1800).contains(&small) && (180..300).contains(&mid) && (30..90).contains(&big));
    }

    fn maildirs(base: &Path, boxes: usize) {
        for mb in 0..boxes {
            for sub in ["tmp", "new", "cur"] {
                std::fs::create_dir_all(base.join(mailbox(mb)).join(sub)).unwrap();
            }
        }
    }

    #[test]
    fn final_check_finds_missing_duplicated_and_unread_mail() {
        let msgs = make(6, 2);
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        maildirs(base, 2);
        let put = |id: usize, sub: &str, name: &str| {
            let m = &msgs[id];
            std::fs::write(base.join(mailbox(m.expected.mailbox)).join(sub).join(name), stored(m, "r"))
                .unwrap();
        };
        for id in 0..6 {
            put(id, "cur", &format!("{id}:2,S"));
        }
        assert!(final_check(base, 2, &msgs, "r").is_ok());
        put(3, "cur", "3-again:2,S");
        let e = final_check(base, 2, &msgs, "r").unwrap_err().to_string();
        assert!(e.contains("1 delivered more than once (first: [3])"), "{e}");
        let m3 = base.join(mailbox(msgs[3].expected.mailbox)).join("cur");
        std::fs::remove_file(m3.join("3-again:2,S")).unwrap();
        std::fs::remove_file(m3.join("3:2,S")).unwrap();
        let e = final_check(base, 2, &msgs, "r").unwrap_err().to_string();
        assert!(e.contains("1 accepted messages not delivered (first: [3])"), "{e}");
        put(3, "new", "3");
        assert!(final_check(base, 2, &msgs, "r").unwrap_err().to_string().contains("new holds 1 files"));
    }
}
