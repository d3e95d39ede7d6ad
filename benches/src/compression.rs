//! Compression of mail-like data as the wire does it (each block on its own): ratio and
//! single-core speed of lz4 and zstd, to choose the default for WAN peers.
//!
//! The data set is a Maildir laid out as a filesystem would: messages with realistic
//! headers, plain-text and HTML bodies, quoted replies, and base64 attachments (already
//! compressed content, as most real attachments are), packed into 4 KiB blocks.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use tandem_protocol::compress::compress;
use tandem_protocol::Compression;

const WORDS: &[&str] = &[
    "meeting",
    "invoice",
    "attached",
    "please",
    "review",
    "the",
    "quarterly",
    "report",
    "thanks",
    "regards",
    "schedule",
    "customer",
    "delivery",
    "server",
    "mailbox",
    "tomorrow",
    "update",
    "contract",
    "project",
    "team",
    "budget",
    "shipment",
    "password",
    "account",
    "order",
    "urgent",
];

fn text(rng: &mut impl Rng, words: usize) -> String {
    let mut s = String::new();
    for i in 0..words {
        s += WORDS[rng.random_range(0..WORDS.len())];
        s += if i % 12 == 11 { ".\r\n" } else { " " };
    }
    s
}

fn base64(rng: &mut impl Rng, bytes: usize) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(bytes * 4 / 3 + bytes / 57 * 2);
    for i in 0..bytes * 4 / 3 {
        s.push(A[rng.random_range(0..64)] as char);
        if i % 76 == 75 {
            s += "\r\n";
        }
    }
    s
}

fn message(rng: &mut impl Rng, i: usize) -> String {
    let mut m = format!(
        "Return-Path: <user{a}@example.org>\r\nDelivered-To: user{b}@example.net\r\n\
         Received: from mx{c}.example.org (mx{c}.example.org [192.0.2.{c}])\r\n\tby mail.example.net (Postfix) \
         with ESMTPS id {i:08X}\r\n\tfor <user{b}@example.net>; Mon, 23 Nov 2026 10:{m:02}:00 +0000\r\n\
         DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=mail; b={sig}\r\n\
         From: User {a} <user{a}@example.org>\r\nTo: user{b}@example.net\r\nSubject: Re: {subj}\r\n\
         Message-ID: <{i}.{a}@example.org>\r\nMIME-Version: 1.0\r\n",
        a = rng.random_range(0..500),
        b = rng.random_range(0..500),
        c = rng.random_range(1..250),
        m = i % 60,
        sig = base64(rng, 128).replace("\r\n", ""),
        subj = text(rng, 6).trim(),
    );
    match rng.random_range(0..10) {
        0..=4 => {
            m += "Content-Type: text/plain; charset=utf-8\r\n\r\n";
            let (body, quoted) = (rng.random_range(40..600), rng.random_range(20..200));
            m += &text(rng, body);
            m += "\r\n> ";
            m += &text(rng, quoted).replace("\r\n", "\r\n> ");
        }
        5..=7 => {
            m += "Content-Type: text/html; charset=utf-8\r\n\r\n<html><body><table>";
            let rows = rng.random_range(5..60);
            for _ in 0..rows {
                m += &format!("<tr><td class=\"cell\">{}</td></tr>\r\n", text(rng, 8));
            }
            m += "</table></body></html>\r\n";
        }
        _ => {
            m += "Content-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n--b1\r\nContent-Type: text/plain\r\n\r\n";
            m += &text(rng, 80);
            m += "\r\n--b1\r\nContent-Type: application/pdf\r\nContent-Transfer-Encoding: base64\r\n\r\n";
            let size = rng.random_range(20_000..200_000);
            m += &base64(rng, size);
            m += "\r\n--b1--\r\n";
        }
    }
    m
}

/// `n` messages packed into 4 KiB blocks (each message starts on a block boundary, as on
/// ext4), about 16 MiB for 400 messages.
pub(crate) fn maildir_blocks(n: usize) -> Vec<Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    let mut blocks = Vec::new();
    for i in 0..n {
        let m = message(&mut rng, i);
        for chunk in m.as_bytes().chunks(4096) {
            let mut b = chunk.to_vec();
            b.resize(4096, 0);
            blocks.push(b);
        }
    }
    blocks
}

pub fn run() -> String {
    let blocks = maildir_blocks(400);
    let total = blocks.len() * 4096;
    let mut out = format!(
        "compression of a Maildir-like data set ({} blocks, {:.1} MiB; text, HTML, base64 attachments), \
         each 4 KiB block on its own as on the wire, one core:\n\n\
         | codec | wire bytes / data bytes | blocks sent compressed | compress MB/s | decompress MB/s |\n\
         |---|---|---|---|---|\n",
        blocks.len(),
        total as f64 / (1 << 20) as f64
    );
    for c in [Compression::Lz4, Compression::Zstd(1), Compression::Zstd(3)] {
        let t = Instant::now();
        let packed: Vec<Option<(u8, Vec<u8>)>> = blocks.iter().map(|b| compress(c, b)).collect();
        let ct = t.elapsed().as_secs_f64();
        let wire: usize =
            packed.iter().zip(&blocks).map(|(p, b)| p.as_ref().map_or(b.len(), |x| x.1.len())).sum();
        let compressed = packed.iter().filter(|p| p.is_some()).count();
        let t = Instant::now();
        let mut check = 0usize;
        for (p, b) in packed.iter().zip(&blocks) {
            if let Some((_, z)) = p {
                let d = match c {
                    Compression::Lz4 => lz4_flex::block::decompress(z, 4096).expect("lz4"),
                    _ => zstd::bulk::decompress(z, 4096).expect("zstd"),
                };
                assert_eq!(&d, b, "round trip");
                check += d.len();
            }
        }
        let dt = t.elapsed().as_secs_f64();
        out += &format!(
            "| {c} | {:.3} | {:.0} % | {:.0} | {:.0} |\n",
            wire as f64 / total as f64,
            compressed as f64 * 100.0 / blocks.len() as f64,
            total as f64 / ct / 1e6,
            check as f64 / dt.max(1e-9) / 1e6,
        );
    }
    out
}
