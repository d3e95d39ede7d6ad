//! The messages and the SMTP client that sends them.
//!
//! The messages are made once, from a fixed seed, before any stack is measured, so every
//! stack and round gets the same mail in the same order and the client spends no CPU on
//! making it while the clock runs. Sizes (of the body; Postfix adds about 0.5 KiB of
//! headers): **85 % uniform in 2–8 KiB, 12 % 64 KiB, 3 % 512 KiB** (a mean of about 27 KiB),
//! each to one of the mailboxes, chosen uniformly. The body is lines of 76 random
//! base64-alphabet characters; every message carries its id, the run it belongs to and the
//! SHA-256 and length of its body in `X-Bench-*` headers, which the reader checks.
//!
//! The client: `sessions` threads, each taking the next message, opening a connection for
//! it (one message per connection, as most inbound mail arrives), `EHLO`, `MAIL`, `RCPT`,
//! `DATA`, the message (dot-stuffed, CRLF), and `QUIT`, without pipelining. A message is
//! accepted on the `250` after its data; any other reply fails the run, naming the message
//! and the reply.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};
use sha2::{Digest, Sha256};

use super::postfix::{mailbox, DOMAIN};

/// The seed of every message's size, mailbox and body.
pub const SEED: u64 = 0x6d61_696c_2d62_656e;

/// What the reader expects of a message.
#[derive(Debug, Clone)]
pub struct Expected {
    pub mailbox: usize,
    pub body_len: usize,
    pub sha256: [u8; 32],
}

/// One message, ready to send.
pub struct Outgoing {
    pub expected: Expected,
    /// The DATA payload: headers and body, CRLF, dot-stuffed, without the final ".".
    pub(super) data: Vec<u8>,
}

/// The run tag every message of a stack's round carries (`X-Bench-Run`) is prepended by
/// [`send_all`]; the rest of the message is the same for all.
pub fn make(count: usize, mailboxes: usize) -> Vec<Outgoing> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(SEED);
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    (0..count)
        .map(|id| {
            let size = match rng.random_range(0..100) {
                0..85 => rng.random_range(2048..8192),
                85..97 => 64 << 10,
                _ => 512 << 10,
            };
            let mb = rng.random_range(0..mailboxes);
            // The body as stored in the Maildir (LF line ends), exactly `size` bytes.
            let mut body = Vec::with_capacity(size);
            while body.len() < size {
                let n = (size - body.len() - 1).min(76);
                body.extend((0..n).map(|_| B64[rng.random_range(0..64)]));
                body.push(b'\n');
            }
            let sha256: [u8; 32] = Sha256::digest(&body).into();
            let mut data = format!(
                "From: Sender {s} <sender{s}@example.org>\r\n\
                 To: <{to}@{DOMAIN}>\r\n\
                 Subject: bench message {id}\r\n\
                 Date: Tue, 1 Dec 2026 12:00:00 +0000\r\n\
                 Message-ID: <{id}@client.{DOMAIN}>\r\n\
                 MIME-Version: 1.0\r\n\
                 Content-Type: text/plain; charset=us-ascii\r\n\
                 X-Bench-Id: {id}\r\n\
                 X-Bench-Body-Bytes: {size}\r\n\
                 X-Bench-Body-SHA256: {sum}\r\n\
                 \r\n",
                s = id % 50,
                to = mailbox(mb),
                sum = hex(&sha256),
            )
            .into_bytes();
            for line in body.split_inclusive(|b| *b == b'\n') {
                let line = &line[..line.len() - 1];
                if line.first() == Some(&b'.') {
                    data.push(b'.');
                }
                data.extend_from_slice(line);
                data.extend_from_slice(b"\r\n");
            }
            Outgoing { expected: Expected { mailbox: mb, body_len: size, sha256 }, data }
        })
        .collect()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Reads one (possibly multi-line) reply; returns its code and text.
fn reply(r: &mut impl BufRead) -> Result<(u16, String)> {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line)? == 0 {
            bail!("connection closed by the server after {text:?}");
        }
        text += &line;
        let b = line.as_bytes();
        if b.len() < 4 || !b[..3].iter().all(u8::is_ascii_digit) {
            bail!("malformed SMTP reply {line:?}");
        }
        if b[3] != b'-' {
            let code = line[..3].parse().context("reply code")?;
            return Ok((code, text));
        }
    }
}

fn expect(r: &mut impl BufRead, want: u16, after: &str, id: usize) -> Result<()> {
    let (code, text) = reply(r)?;
    if code != want {
        bail!("message {id}: {after} answered {}, expected {want}", text.trim_end());
    }
    Ok(())
}

fn send_one(addr: SocketAddr, id: usize, run: &str, m: &Outgoing) -> Result<()> {
    let stream = TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    // Not a speed limit: only so that a wedged server fails the bench instead of hanging it.
    stream.set_read_timeout(Some(Duration::from_secs(600)))?;
    let mut r = BufReader::new(stream.try_clone()?);
    let mut w = BufWriter::with_capacity(64 << 10, stream);
    expect(&mut r, 220, "the greeting", id)?;
    let mut cmd = |w: &mut BufWriter<TcpStream>, line: &str, want: u16| -> Result<()> {
        w.write_all(line.as_bytes())?;
        w.write_all(b"\r\n")?;
        w.flush()?;
        expect(&mut r, want, line, id)
    };
    cmd(&mut w, &format!("EHLO client.{DOMAIN}"), 250)?;
    cmd(&mut w, &format!("MAIL FROM:<sender{}@example.org>", id % 50), 250)?;
    cmd(&mut w, &format!("RCPT TO:<{}@{DOMAIN}>", mailbox(m.expected.mailbox)), 250)?;
    cmd(&mut w, "DATA", 354)?;
    w.write_all(format!("X-Bench-Run: {run}\r\n").as_bytes())?;
    w.write_all(&m.data)?;
    cmd(&mut w, ".", 250)?;
    cmd(&mut w, "QUIT", 221)
}

/// Sends every message over `sessions` concurrent sessions; returns once all are accepted,
/// or with the first failure (the other sessions stop after their current message).
pub fn send_all(addr: SocketAddr, messages: &Arc<Vec<Outgoing>>, sessions: usize, run: &str) -> Result<()> {
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let threads: Vec<_> = (0..sessions)
        .map(|_| {
            let (next, failed, messages, run) =
                (next.clone(), failed.clone(), messages.clone(), run.to_string());
            std::thread::spawn(move || -> Result<()> {
                while !failed.load(Ordering::Relaxed) {
                    let id = next.fetch_add(1, Ordering::Relaxed);
                    let Some(m) = messages.get(id) else { break };
                    if let Err(e) = send_one(addr, id, &run, m) {
                        failed.store(true, Ordering::Relaxed);
                        return Err(e);
                    }
                }
                Ok(())
            })
        })
        .collect();
    let mut first = Ok(());
    for t in threads {
        let r = t.join().map_err(|_| anyhow::anyhow!("an SMTP session panicked")).and_then(|r| r);
        if first.is_ok() {
            first = r;
        }
    }
    first
}
