//! The agent's use of the holder: find the node's holder (or start one), stay attached to
//! it for the agent's lifetime, and hold, take and forget the primaries' connections.
//!
//! The holder runs in a session of its own (`setsid`), so it outlives the agent that
//! started it — killed, restarted or upgraded. One connection to it stays open for as long
//! as the agent runs: that is what the holder counts as "an agent is attached" (the grace
//! time starts when it closes). Under systemd the holder can run as a unit of its own
//! (`tandem-holder.service`); the agent then finds it on the socket and starts none.

use std::os::fd::BorrowedFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tracing::info;

use super::client::{HolderClient, Taken};

/// How long a holder just started may take to answer.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The holder's socket in a node's run directory.
pub fn socket_path(run_dir: &Path) -> PathBuf {
    run_dir.join("holder.sock")
}

/// The holder's pid file in a node's run directory.
pub fn pid_path(run_dir: &Path) -> PathBuf {
    run_dir.join("holder.pid")
}

/// The agent's attachment to the node's holder.
pub struct Keeper {
    client: Mutex<HolderClient>,
    /// How long the holder keeps connections without an agent.
    pub grace: Duration,
    /// When this agent attached: what the holder reports as its time without an agent
    /// ends here, so a takeover's pause is that plus the time since.
    attached_at: Instant,
}

impl Keeper {
    /// Attaches to the holder on `run_dir`'s socket, starting one (`exe holder ...`) if
    /// none answers. A holder already running keeps the grace time it was started with.
    pub fn attach(exe: &Path, run_dir: &Path, grace: Duration) -> Result<Self> {
        let socket = socket_path(run_dir);
        let client = match HolderClient::connect(&socket) {
            Ok(c) => {
                info!(socket = %socket.display(), "descriptor holder found");
                c
            }
            Err(_) => {
                spawn(exe, run_dir, &socket, grace)?;
                let deadline = Instant::now() + START_TIMEOUT;
                loop {
                    match HolderClient::connect(&socket) {
                        Ok(c) => break c,
                        Err(e) if Instant::now() > deadline => {
                            return Err(e).context(format!(
                                "the descriptor holder did not answer within {START_TIMEOUT:?} (see {})",
                                run_dir.join("holder.log").display()
                            ))
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
            }
        };
        client
            .attach()
            .with_context(|| format!("attaching to the descriptor holder at {}", socket.display()))?;
        Ok(Self { client: Mutex::new(client), grace, attached_at: Instant::now() })
    }

    /// The keys of the connections held.
    pub fn held(&self) -> Result<Vec<String>> {
        Ok(self.client.lock().unwrap().list()?)
    }

    /// Has the holder keep `fds` (all devices of one connection) and `state` under `key`.
    pub fn hold(&self, key: &str, fds: &[BorrowedFd<'_>], state: &[u8]) -> Result<()> {
        self.client.lock().unwrap().hold(key, fds, state).with_context(|| format!("holding {key}"))
    }

    /// The devices and state held under `key`.
    pub fn take(&self, key: &str) -> Result<Taken> {
        self.client.lock().unwrap().take(key).with_context(|| format!("taking {key} over"))
    }

    /// Has the holder close its copies of `key`'s devices.
    pub fn forget(&self, key: &str) -> Result<()> {
        self.client.lock().unwrap().forget(key).with_context(|| format!("releasing {key}"))
    }

    /// When this agent attached to the holder.
    pub fn attached_at(&self) -> Instant {
        self.attached_at
    }
}

fn spawn(exe: &Path, run_dir: &Path, socket: &Path, grace: Duration) -> Result<()> {
    std::fs::create_dir_all(run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    let log_path = run_dir.join("holder.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    if !exe.exists() {
        bail!("cannot start the descriptor holder: {} does not exist", exe.display());
    }
    let mut cmd = Command::new(exe);
    cmd.arg("holder")
        .arg("--socket")
        .arg(socket)
        .arg("--grace")
        .arg(humantime::format_duration(grace).to_string())
        .arg("--pid-file")
        .arg(pid_path(run_dir))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // A daemon's double fork: the child starts a session of its own and forks again; the
    // grandchild execs the holder and is nobody's child once the middle one exits, so it
    // outlives this process and is never left a zombie of it.
    // SAFETY: between fork and exec only async-signal-safe calls (setsid, fork, _exit).
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            match nix::unistd::fork().map_err(std::io::Error::from)? {
                nix::unistd::ForkResult::Parent { .. } => libc::_exit(0),
                nix::unistd::ForkResult::Child => Ok(()),
            }
        });
    }
    let mut middle = cmd.spawn().with_context(|| format!("cannot start {cmd:?}"))?;
    let _ = middle.wait();
    info!(socket = %socket.display(), grace = ?grace, "descriptor holder started");
    Ok(())
}
