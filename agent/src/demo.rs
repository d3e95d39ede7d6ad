//! `tandem demo`: a real two-node replication on this machine, end to end, verified.
//!
//! Two agents on 127.0.0.1 with their own keys, a sync-mode resource, ext4 on the primary's
//! device, a Maildir written like an MDA does (each message fsync'd, then renamed into new/),
//! then both images are compared byte for byte and the standby's copy is mounted read-only
//! and every message checked against what was written.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use crate::lab::{run_cmd, Lab, LabOptions};

pub struct DemoOptions {
    pub messages: usize,
    pub size: u64,
    pub keep: bool,
    pub parent: PathBuf,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn check_interrupt() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

fn step(n: usize, what: &str) {
    println!("\n[{n}] {what}");
}

fn sha256_file(p: &Path) -> Result<String> {
    let mut f = std::fs::File::open(p).with_context(|| format!("cannot open {}", p.display()))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A mail message whose body is derived from its number, so it can be checked later.
fn message(i: usize) -> Vec<u8> {
    let mut m = format!(
        "Return-Path: <sender{i}@example.org>\r\nDelivered-To: postmaster@example.net\r\n\
         From: Sender {i} <sender{i}@example.org>\r\nTo: postmaster@example.net\r\n\
         Subject: tandem demo message {i}\r\nMessage-ID: <{i}.demo@tandem>\r\n\r\n"
    )
    .into_bytes();
    let lines = 20 + (i * 7919) % 200;
    for l in 0..lines {
        m.extend_from_slice(
            format!("line {l} of message {i}: the quick brown fox jumps over the lazy dog\r\n").as_bytes(),
        );
    }
    m
}

/// Delivers `n` messages into `maildir` (tmp/ -> fsync -> new/), returning name -> sha256.
fn deliver(maildir: &Path, n: usize) -> Result<BTreeMap<String, String>> {
    for d in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(maildir.join(d))?;
    }
    let mut manifest = BTreeMap::new();
    let new_dir = std::fs::File::open(maildir.join("new"))?;
    for i in 0..n {
        check_interrupt()?;
        let name = format!("{}.M{i}P{}.tandem-demo", 1_700_000_000 + i, std::process::id());
        let body = message(i);
        let tmp = maildir.join("tmp").join(&name);
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&body)?;
        f.sync_all()?;
        std::fs::rename(&tmp, maildir.join("new").join(&name))?;
        new_dir.sync_all()?;
        manifest.insert(name, format!("{:x}", Sha256::digest(&body)));
        if (i + 1) % 100 == 0 {
            println!("    delivered {} messages", i + 1);
        }
    }
    Ok(manifest)
}

fn verify_maildir(maildir: &Path, manifest: &BTreeMap<String, String>) -> Result<usize> {
    let mut ok = 0;
    for (name, sum) in manifest {
        let p = maildir.join("new").join(name);
        let data = std::fs::read(&p).with_context(|| format!("message {name} missing on the standby"))?;
        let got = format!("{:x}", Sha256::digest(&data));
        if &got != sum {
            bail!("message {name} differs on the standby");
        }
        ok += 1;
    }
    Ok(ok)
}

pub fn run(o: &DemoOptions) -> Result<bool> {
    if !crate::sysutil::is_root() {
        bail!("tandem demo needs root (it mounts FUSE, attaches loop devices and mounts ext4)");
    }
    for tool in ["losetup", "mkfs.ext4", "mount", "umount", "e2fsck"] {
        if Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map_or(true, |o| !o.status.success())
        {
            bail!("{tool} not found (apt-get install util-linux e2fsprogs mount)");
        }
    }
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_interrupt as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_interrupt as *const () as libc::sighandler_t);
    }
    let started = Instant::now();
    let exe = std::env::current_exe()?;
    let opts = LabOptions { size: o.size, timeout: Duration::from_secs(5), ..Default::default() };

    step(1, "generating keys and a two-node configuration on 127.0.0.1");
    let mut lab = Lab::new(&o.parent, &exe, &["alpha", "beta"], &opts)?;
    lab.keep(o.keep);
    println!("    work directory {}", lab.dir.display());
    println!("    config {}", lab.config.display());
    let result = run_in(&mut lab, o);
    match &result {
        Ok(true) => println!(
            "\nVERDICT: PASS — replicated {} messages; standby identical ({:.1}s)",
            o.messages,
            started.elapsed().as_secs_f64()
        ),
        Ok(false) => println!("\nVERDICT: FAIL — see above"),
        Err(e) => {
            println!("\nVERDICT: FAIL — {e:#}");
            for n in ["alpha", "beta"] {
                let log = lab.log_text(n);
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                println!("--- last lines of {n}'s log:");
                for l in tail.iter().rev() {
                    println!("    {l}");
                }
            }
        }
    }
    if o.keep {
        println!("(kept {})", lab.dir.display());
    }
    drop(lab);
    println!(
        "cleaned up: agents stopped, mounts and loop devices removed{}",
        if o.keep { "" } else { ", files deleted" }
    );
    Ok(result.unwrap_or(false))
}

fn run_in(lab: &mut Lab, o: &DemoOptions) -> Result<bool> {
    step(2, "starting both agents (QUIC, mutual TLS with pinned certificates)");
    lab.start("alpha")?;
    lab.start("beta")?;
    lab.wait_connected("alpha", Duration::from_secs(20))?;
    println!("    alpha and beta connected");
    check_interrupt()?;

    step(3, "promoting alpha to primary");
    let r = lab.promote("alpha", false)?;
    if !r.ok {
        bail!("promote failed: {:?}", r.error);
    }
    let st = lab.wait_for("alpha", "replication established", Duration::from_secs(20), |r| {
        r.device.is_some() && r.peers.iter().all(|p| p.replication == "established")
    })?;
    let dev = st.device.clone().unwrap_or_default();
    println!("    {}", r.message.unwrap_or_default());

    step(4, &format!("mkfs.ext4 on {dev} and mount it"));
    run_cmd(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "maildata", &dev]))?;
    let mnt = lab.dir.join("mnt");
    lab.mount(&dev, &mnt, "")?;
    check_interrupt()?;

    step(5, &format!("delivering {} messages into a Maildir (fsync each, rename into new/)", o.messages));
    let t = Instant::now();
    let manifest = deliver(&mnt.join("Maildir"), o.messages)?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "    {} messages in {secs:.1}s ({:.0} msg/s, each acknowledged by the standby's disk)",
        o.messages,
        o.messages as f64 / secs
    );

    step(6, "status on alpha");
    let s = lab.status("alpha")?;
    for l in s.render().lines() {
        println!("    {l}");
    }

    step(7, "unmount, demote alpha, stop both agents");
    lab.umount(&mnt)?;
    let r = lab.demote("alpha")?;
    if !r.ok {
        bail!("demote failed: {:?}", r.error);
    }
    println!("    {}", r.message.unwrap_or_default());
    let clean = lab.stop_all();
    for (n, ok) in &clean {
        println!("    {n} stopped {}", if *ok { "cleanly" } else { "UNCLEANLY" });
    }

    step(8, "verifying");
    let a = sha256_file(&lab.image("alpha"))?;
    let b = sha256_file(&lab.image("beta"))?;
    println!("    sha256 alpha image: {a}");
    println!("    sha256 beta  image: {b}");
    let equal = a == b;
    println!("    images identical: {}", if equal { "yes" } else { "NO" });
    let fsck = Command::new("e2fsck").args(["-f", "-n"]).arg(lab.image("beta")).output()?;
    println!("    e2fsck -fn of beta's image: {}", if fsck.status.success() { "clean" } else { "ERRORS" });
    let dev = lab.attach_ro(&lab.image("beta"))?;
    let ro = lab.dir.join("standby-ro");
    lab.mount(&dev, &ro, "ro,noload")?;
    let checked = verify_maildir(&ro.join("Maildir"), &manifest);
    lab.umount(&ro)?;
    lab.detach(&dev)?;
    let checked = checked?;
    println!("    messages read back from beta's copy and matched: {checked}/{}", manifest.len());
    Ok(equal && fsck.status.success() && checked == manifest.len() && clean.values().all(|c| *c))
}
