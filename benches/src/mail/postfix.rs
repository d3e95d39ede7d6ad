//! A Postfix instance of the bench's own, on the volume under test.
//!
//! The instance has a configuration directory of its own (`main.cf`, `master.cf`, the
//! mailbox map), started and stopped with `postfix -c DIR start|stop`; the machine's
//! default instance (`/etc/postfix`) is neither used nor touched. Postfix's
//! `queue_directory` and the `virtual(8)` Maildirs (`virtual_mailbox_base`) are both on the
//! mounted volume, so every write Postfix makes for a message — the queue file `cleanup(8)`
//! fsyncs before smtpd answers `250`, the queue file's moves and removal, the Maildir file
//! `virtual(8)` fsyncs before linking it into `new/` — lands on the device under test.
//! `data_directory` (PRNG seed, master lock) and the log (`maillog_file`, through
//! `postlogd`; there is no syslog here) stay beside the configuration, off the volume.
//!
//! What it takes to run on a fresh volume, and why:
//! - `master.cf` is written here, not copied from the package: only the services a local
//!   delivery needs, and **every service with `chroot = n`** — Debian's runs smtpd, cleanup
//!   and others chrooted into the queue directory, which needs copies of `/etc` files in the
//!   jail (the Debian init script makes them; nothing here runs it).
//! - The queue directory is created by root (Postfix requires it owned by root) and its
//!   subdirectories by `postfix start` itself (it runs `postfix check`, which creates the
//!   missing ones with their owners and modes).
//! - The mailboxes are owned by `nobody` (`virtual_uid_maps`/`virtual_gid_maps`), which is
//!   above `virtual_minimum_uid`; they are made beforehand, as an administrator provisions
//!   accounts, so the reader can watch their `new/` from the start.
//! - smtpd listens on 127.0.0.1 only, on a port free when the instance is made, and DNS is
//!   never asked (`myhostname` set, no relaying, mail only for `bench.test`).
//!
//! Everything else is Postfix's default (`in_flow_delay`, process limits, concurrency).
//! The instance is stopped in [`Drop`] too, and the drop waits until every Postfix process
//! has let go of the volume, so that an error anywhere still leaves nothing running and the
//! volume can be unmounted.

use std::ffi::CString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The domain the instance delivers mail for.
pub const DOMAIN: &str = "bench.test";

/// The user the Maildirs belong to.
const MAILBOX_USER: &str = "nobody";

/// The mailbox name of mailbox `i`.
pub fn mailbox(i: usize) -> String {
    format!("u{i:02}")
}

/// Fails, saying how to install it, when Postfix is missing; warns when the machine's own
/// instance runs (it competes for the CPU, though not for the port or the queue).
pub fn require_installed() -> Result<String> {
    let version = Command::new("postconf").args(["-h", "mail_version"]).output();
    let version = match version {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        _ => bail!(
            "Postfix not found (postconf failed): install it with \
             `DEBIAN_FRONTEND=noninteractive apt-get install -y postfix` (the bench runs an instance \
             of its own; the package's default instance need not run)"
        ),
    };
    if Command::new("postfix").arg("status").output().is_ok_and(|o| o.status.success()) {
        eprintln!("warning: the machine's default Postfix instance is running; it competes for the CPU");
    }
    Ok(version)
}

fn uid_gid(user: &str) -> Result<(u32, u32)> {
    let name = CString::new(user)?;
    // SAFETY: getpwnam with a valid C string; the result is read at once, before any other
    // call that could reuse its static buffer.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!("user {user} not found (Postfix's Maildirs belong to it)");
    }
    // SAFETY: pw is non-null and points to a passwd entry.
    Ok(unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
}

fn free_tcp_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The services of `master.cf`, every one unchrooted (see the module docs).
const MASTER_CF: &str = "\
pickup     unix  n       -       n       60      1       pickup
cleanup    unix  n       -       n       -       0       cleanup
qmgr       unix  n       -       n       300     1       qmgr
rewrite    unix  -       -       n       -       -       trivial-rewrite
bounce     unix  -       -       n       -       0       bounce
defer      unix  -       -       n       -       0       bounce
trace      unix  -       -       n       -       0       bounce
verify     unix  -       -       n       -       1       verify
flush      unix  n       -       n       1000?   0       flush
proxymap   unix  -       -       n       -       -       proxymap
proxywrite unix  -       -       n       -       1       proxymap
smtp       unix  -       -       n       -       -       smtp
relay      unix  -       -       n       -       -       smtp
showq      unix  n       -       n       -       -       showq
error      unix  -       -       n       -       -       error
retry      unix  -       -       n       -       -       error
discard    unix  -       -       n       -       -       discard
local      unix  -       n       n       -       -       local
virtual    unix  -       n       n       -       -       virtual
lmtp       unix  -       -       n       -       -       lmtp
anvil      unix  -       -       n       -       1       anvil
scache     unix  -       -       n       -       1       scache
postlog    unix-dgram n  -       n       -       1       postlogd
";

/// A running instance; stopped (and waited for) on drop.
pub struct Postfix {
    etc: PathBuf,
    log: PathBuf,
    volume: PathBuf,
    /// The Maildirs' parent on the volume (`virtual_mailbox_base`).
    pub mailboxes: PathBuf,
    pub port: u16,
    running: bool,
}

impl Postfix {
    /// Configures an instance in `dir` (off the volume) with its queue and `mailboxes`
    /// Maildirs on the filesystem mounted at `volume`, and starts it.
    pub fn start(dir: &Path, volume: &Path, mailboxes: usize) -> Result<Self> {
        let etc = dir.join("etc");
        let data = dir.join("data");
        let log = dir.join("postfix.log");
        let queue = volume.join("spool");
        let base = volume.join("vmail");
        let (postfix_uid, postfix_gid) = uid_gid("postfix")?;
        let (uid, gid) = uid_gid(MAILBOX_USER)?;
        for d in [&etc, &data, &queue, &base] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        std::os::unix::fs::chown(&data, Some(postfix_uid), Some(postfix_gid))?;
        let mut map = String::new();
        for i in 0..mailboxes {
            let name = mailbox(i);
            for sub in ["", "tmp", "new", "cur"] {
                let d = base.join(&name).join(sub);
                std::fs::create_dir_all(&d)?;
                std::os::unix::fs::chown(&d, Some(uid), Some(gid))?;
            }
            writeln!(map, "{name}@{DOMAIN} {name}/")?;
        }
        std::fs::write(etc.join("vmailbox"), map)?;
        let port = free_tcp_port()?;
        let main_cf = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {queue}\n\
             data_directory = {data}\n\
             mail_owner = postfix\n\
             setgid_group = postdrop\n\
             myhostname = mail.{DOMAIN}\n\
             mydomain = {DOMAIN}\n\
             inet_interfaces = 127.0.0.1\n\
             inet_protocols = ipv4\n\
             mydestination =\n\
             mynetworks = 127.0.0.0/8\n\
             relayhost =\n\
             alias_maps =\n\
             alias_database =\n\
             local_recipient_maps =\n\
             smtpd_tls_security_level = none\n\
             smtp_tls_security_level = none\n\
             biff = no\n\
             maillog_file = {log}\n\
             maillog_file_prefixes = {dir}\n\
             virtual_mailbox_domains = {DOMAIN}\n\
             virtual_mailbox_base = {base}\n\
             virtual_mailbox_maps = texthash:{etc}/vmailbox\n\
             virtual_uid_maps = static:{uid}\n\
             virtual_gid_maps = static:{gid}\n",
            queue = queue.display(),
            data = data.display(),
            log = log.display(),
            dir = dir.display(),
            base = base.display(),
            etc = etc.display(),
        );
        std::fs::write(etc.join("main.cf"), main_cf)?;
        let smtpd = format!("127.0.0.1:{port} inet n       -       n       -       -       smtpd\n");
        std::fs::write(etc.join("master.cf"), smtpd + MASTER_CF)?;
        let mut pf =
            Postfix { etc, log, volume: volume.to_path_buf(), mailboxes: base, port, running: false };
        let out = Command::new("postfix").arg("-c").arg(&pf.etc).arg("start").output()?;
        // From here on, a failed start is cleaned up by Drop.
        pf.running = true;
        if !out.status.success() {
            bail!(
                "postfix -c {} start failed: {}{}\nlog: {}",
                pf.etc.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                pf.log_tail(20)
            );
        }
        Ok(pf)
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The last `n` lines of the instance's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// `postqueue -p`: None if the queue is empty, else the listing.
    pub fn queue_listing(&self) -> Result<Option<String>> {
        let out = Command::new("postqueue").arg("-c").arg(&self.etc).arg("-p").output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "postqueue -c {} -p failed: {text}{}",
                self.etc.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok((!text.contains("Mail queue is empty")).then_some(text))
    }

    /// Lines of the log that report a delivery other than `status=sent` or a fatal error
    /// (the first), and warnings (the second).
    pub fn log_problems(&self) -> (Vec<String>, Vec<String>) {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let problems = text
            .lines()
            .filter(|l| {
                (l.contains(" status=") && !l.contains(" status=sent"))
                    || l.contains("fatal:")
                    || l.contains("panic:")
            })
            .map(str::to_string)
            .collect();
        let warnings = text.lines().filter(|l| l.contains("warning:")).map(str::to_string).collect();
        (problems, warnings)
    }

    /// Stops the instance and waits until no process uses the volume any more.
    pub fn stop(mut self) -> Result<()> {
        self.running = false;
        let out = Command::new("postfix").arg("-c").arg(&self.etc).arg("stop").output()?;
        if !out.status.success() {
            bail!("postfix -c {} stop failed: {}", self.etc.display(), String::from_utf8_lossy(&out.stderr));
        }
        wait_unused(&self.volume, Duration::from_secs(60))
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        if !self.running {
            return;
        }
        let _ = Command::new("postfix").arg("-c").arg(&self.etc).arg("stop").output();
        if wait_unused(&self.volume, Duration::from_secs(30)).is_err() {
            // `postfix abort`: master and its children are killed at once.
            let _ = Command::new("postfix").arg("-c").arg(&self.etc).arg("abort").output();
            let _ = wait_unused(&self.volume, Duration::from_secs(10));
        }
    }
}

/// The processes (other than zombies) with their working directory, root or an open file
/// on the filesystem at `dir`.
fn users_of(dir: &Path) -> Vec<u32> {
    let Ok(procs) = std::fs::read_dir("/proc") else { return vec![] };
    let mut users = Vec::new();
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        let base = p.path();
        let on = |l: &Path| std::fs::read_link(l).is_ok_and(|t| t.starts_with(dir));
        let mut uses = on(&base.join("cwd")) || on(&base.join("root"));
        if !uses {
            if let Ok(fds) = std::fs::read_dir(base.join("fd")) {
                uses = fds.flatten().any(|fd| on(&fd.path()));
            }
        }
        if uses {
            users.push(pid);
        }
    }
    users
}

/// Waits until no process uses the filesystem at `dir` (Postfix's daemons keep their
/// working directory in the queue and exit in their own time after `postfix stop`).
fn wait_unused(dir: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let users = users_of(dir);
        if users.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("processes {users:?} still use {} {timeout:?} after postfix stop", dir.display());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
