//! `tandem demo`: a real two-node replication on this machine, end to end, verified.
//!
//! Two agents on 127.0.0.1 with their own keys, a sync-mode resource, ext4 on the primary's
//! device, a Maildir written like an MDA does (each message fsync'd, then renamed into new/).
//! The primary's agent is restarted in place (`tandem restart`, as after an upgrade) while
//! mail keeps arriving: the device stays, delivery only pauses. Then the primary node crashes (its agent and descriptor holder killed with -9, so the
//! mail filesystem gets I/O errors as on a dead machine), the standby is promoted and every
//! message checked on it, more mail delivered there, the old primary brought back as the
//! new mirror by a delta resync, and finally both images compared byte for byte and the
//! mirror's copy mounted read-only and every message checked against what was written.
//!
//! The agents run as a [`cluster::LocalCluster`], which removes every process, mount, loop
//! device and file of the run when it is dropped: on success, on an error and on Ctrl-C
//! (which the scenario notices between steps and turns into an error).

pub mod cluster;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

use cluster::{run_cmd, ClusterSpec, LocalCluster};

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
    deliver_from(maildir, 0, n)
}

/// Delivers messages `first..first + n`.
fn deliver_from(maildir: &Path, first: usize, n: usize) -> Result<BTreeMap<String, String>> {
    for d in ["tmp", "new", "cur"] {
        std::fs::create_dir_all(maildir.join(d))?;
    }
    let mut manifest = BTreeMap::new();
    let new_dir = std::fs::File::open(maildir.join("new"))?;
    for i in first..first + n {
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
        if (i + 1 - first).is_multiple_of(100) {
            println!("    delivered {} messages", i + 1 - first);
        }
    }
    Ok(manifest)
}

/// Runs `during` while another thread delivers a message every 20 ms (from number
/// `first`), and 0.5 s more after it; returns what `during` returned and the messages.
fn deliver_during(
    maildir: &Path,
    first: usize,
    during: impl FnOnce() -> Result<String>,
) -> Result<(String, BTreeMap<String, String>)> {
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let (dir, stopping) = (maildir.to_path_buf(), stop.clone());
    let mail = std::thread::spawn(move || {
        let mut manifest = BTreeMap::new();
        let mut i = first;
        while !stopping.load(Ordering::SeqCst) {
            manifest.extend(deliver_from(&dir, i, 1).with_context(|| format!("delivering message {i}"))?);
            i += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok::<_, anyhow::Error>(manifest)
    });
    let out = during();
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let delivered = mail.join().map_err(|_| anyhow::anyhow!("the delivering thread panicked"))??;
    Ok((out?, delivered))
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
    let spec = ClusterSpec { size: o.size, timeout: Duration::from_secs(5), ..Default::default() };

    step(1, "generating keys and a two-node configuration on 127.0.0.1");
    let mut cluster = LocalCluster::on_loopback(&o.parent, &exe, &["alpha", "beta"], &spec)?;
    cluster.keep(o.keep);
    println!("    work directory {}", cluster.dir.display());
    println!("    config {}", cluster.config.display());
    let result = run_in(&mut cluster, o);
    match &result {
        Ok(true) => println!(
            "\nVERDICT: PASS — replicated {} messages, failed over without losing one, and the old \
             primary is an identical mirror again ({:.1}s)",
            o.messages,
            started.elapsed().as_secs_f64()
        ),
        Ok(false) => println!("\nVERDICT: FAIL — see above"),
        Err(e) => {
            println!("\nVERDICT: FAIL — {e:#}");
            for n in ["alpha", "beta"] {
                let log = cluster.log_text(n);
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                println!("--- last lines of {n}'s log:");
                for l in tail.iter().rev() {
                    println!("    {l}");
                }
            }
        }
    }
    if o.keep {
        println!("(kept {})", cluster.dir.display());
    }
    drop(cluster);
    println!(
        "cleaned up: agents stopped, mounts and loop devices removed{}",
        if o.keep { "" } else { ", files deleted" }
    );
    Ok(result.unwrap_or(false))
}

fn run_in(cluster: &mut LocalCluster, o: &DemoOptions) -> Result<bool> {
    step(2, "starting both agents (QUIC, mutual TLS with pinned certificates)");
    cluster.start("alpha")?;
    cluster.start("beta")?;
    cluster.wait_connected("alpha", Duration::from_secs(20))?;
    println!("    alpha and beta connected");
    check_interrupt()?;

    step(3, "promoting alpha to primary");
    let r = cluster.promote("alpha", false)?;
    if !r.ok {
        bail!("promote failed: {:?}", r.error);
    }
    let st = cluster.wait_for("alpha", "replication established", Duration::from_secs(20), |r| {
        r.device.is_some() && r.peers.iter().all(|p| p.replication == "established")
    })?;
    let dev = st.device.clone().unwrap_or_default();
    println!("    {}", r.message.unwrap_or_default());

    step(4, &format!("mkfs.ext4 on {dev} and mount it"));
    run_cmd(Command::new("mkfs.ext4").args(["-q", "-F", "-L", "maildata", &dev]))?;
    let mnt = cluster.dir.join("mnt");
    cluster.mount(&dev, &mnt, "")?;
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
    let s = cluster.status("alpha")?;
    for l in s.render(false, false).lines() {
        println!("    {l}");
    }

    step(7, "the mail server keeps running: a message every 0.5 s for 8 s");
    let mut manifest = manifest;
    for k in 0..16 {
        check_interrupt()?;
        manifest.extend(deliver_from(&mnt.join("Maildir"), o.messages + k, 1)?);
        std::thread::sleep(Duration::from_millis(500));
    }
    let st = cluster.resource_status("alpha")?;
    println!(
        "    {} messages in all; activity log: {} hot extents of 4 MiB (what a crash now would resync)",
        manifest.len(),
        st.stats.al_hot_extents
    );

    step(8, "upgrade in place: `tandem restart` on alpha while mail keeps arriving");
    let more = deliver_during(&mnt.join("Maildir"), o.messages + 16, || {
        run_cmd(
            Command::new(cluster.exe())
                .arg("--config")
                .arg(&cluster.config)
                .args(["--node", "alpha", "restart"]),
        )
    })?;
    let (printed, delivered) = more;
    for l in printed.lines() {
        println!("    {l}");
    }
    println!("    {} messages delivered during the restart, none failed", delivered.len());
    manifest.extend(delivered);
    // The standby takes what the restart left in flight (the activity log's extents) back
    // before it is a copy a failover may promote.
    cluster.wait_for("beta", "back in sync with alpha", Duration::from_secs(60), |r| {
        r.disk == crate::meta::DiskState::UpToDate
            && r.peers.iter().all(|p| p.connection == "connected" && p.out_of_sync_bytes == 0)
    })?;
    println!("    beta is in sync with alpha again");
    check_interrupt()?;

    step(9, "failover: kill -9 alpha's agent and its holder, as if the active mail server died");
    cluster.kill9("alpha")?;
    // The filesystem on the dead node's device can only be detached now.
    cluster.umount_lazy(&mnt)?;
    cluster.wait_for("beta", "alpha's loss noticed", Duration::from_secs(30), |r| {
        r.peers.iter().all(|p| p.connection != "connected")
    })?;
    println!("    alpha is gone; beta noticed the connection loss");
    check_interrupt()?;

    step(10, "promoting beta and checking every acknowledged message is there");
    let r = cluster.promote("beta", false)?;
    if !r.ok {
        bail!("promote beta failed: {:?}", r.error);
    }
    println!("    {}", r.message.unwrap_or_default());
    let dev_b = cluster.resource_status("beta")?.device.unwrap_or_default();
    cluster.mount(&dev_b, &mnt, "")?;
    let found = verify_maildir(&mnt.join("Maildir"), &manifest)?;
    println!("    {found}/{} messages present and intact on beta", manifest.len());
    let more = (o.messages / 5).max(1);
    let t = Instant::now();
    manifest.extend(deliver_from(&mnt.join("Maildir"), o.messages + 16, more)?);
    println!(
        "    beta serves the volume: {more} more messages delivered in {:.1}s",
        t.elapsed().as_secs_f64()
    );
    check_interrupt()?;

    step(11, "bringing alpha back: it becomes beta's mirror with a delta resync");
    cluster.start("alpha")?;
    let st = cluster.wait_for("beta", "alpha resynced", Duration::from_secs(120), |r| {
        r.peers.iter().all(|p| {
            p.connection == "connected" && p.replication == "established" && p.out_of_sync_bytes == 0
        })
    })?;
    let moved: u64 = st.peers.iter().filter_map(|p| p.resync.as_ref()).map(|r| r.data_bytes_sent).sum();
    println!(
        "    alpha is in sync again: {moved} bytes resynced ({:.2} % of the {} byte volume)",
        moved as f64 * 100.0 / o.size as f64,
        o.size
    );
    for l in cluster.status("beta")?.render(false, false).lines() {
        println!("    {l}");
    }

    step(12, "unmount, demote beta, stop both agents");
    cluster.umount(&mnt)?;
    let r = cluster.demote("beta")?;
    if !r.ok {
        bail!("demote failed: {:?}", r.error);
    }
    println!("    {}", r.message.unwrap_or_default());
    let clean = cluster.stop_all();
    for (n, ok) in &clean {
        println!("    {n} stopped {}", if *ok { "cleanly" } else { "UNCLEANLY" });
    }

    step(13, "verifying");
    let a = sha256_file(&cluster.image("alpha"))?;
    let b = sha256_file(&cluster.image("beta"))?;
    println!("    sha256 alpha image: {a}");
    println!("    sha256 beta  image: {b}");
    let equal = a == b;
    println!("    images identical: {}", if equal { "yes" } else { "NO" });
    let fsck = Command::new("e2fsck").args(["-f", "-n"]).arg(cluster.image("alpha")).output()?;
    println!("    e2fsck -fn of alpha's image: {}", if fsck.status.success() { "clean" } else { "ERRORS" });
    let dev = cluster.attach_ro(&cluster.image("alpha"))?;
    let ro = cluster.dir.join("mirror-ro");
    cluster.mount(&dev, &ro, "ro,noload")?;
    let checked = verify_maildir(&ro.join("Maildir"), &manifest);
    cluster.umount(&ro)?;
    cluster.detach(&dev)?;
    let checked = checked?;
    println!(
        "    messages read back from alpha's copy (the new mirror) and matched: {checked}/{}",
        manifest.len()
    );
    let small_resync = moved < o.size / 2;
    if !small_resync {
        println!("    the resync moved {moved} bytes: expected a delta, not a full copy");
    }
    Ok(equal
        && fsck.status.success()
        && checked == manifest.len()
        && clean.values().all(|c| *c)
        && small_resync)
}
