//! The holder process (`tandem holder`): keeps descriptors and their state for agents, and
//! lets go of them once the grace time has passed with no agent attached.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tracing::{info, warn};

use super::fdpass::{recv, send};
use super::Message;

/// Where the holder listens, and for how long it keeps connections without an agent.
#[derive(Debug, Clone)]
pub struct HolderSettings {
    pub socket: PathBuf,
    pub grace: Duration,
    /// Written with the holder's pid while it runs (removed when it exits).
    pub pid_file: Option<PathBuf>,
}

#[derive(Default)]
struct State {
    held: BTreeMap<String, (Vec<OwnedFd>, Vec<u8>)>,
    /// Connections that attached, held or took a descriptor (agents, not a `list`).
    attached: usize,
    /// Since when no agent is attached (none ever was: since the start).
    orphaned_since: Option<Instant>,
    /// The last agent left with nothing held: a clean stop, nothing to wait for.
    done: bool,
}

/// One connection's standing with the holder.
#[derive(Default)]
struct Attachment {
    /// It attached (an agent, not a `list`).
    attached: bool,
    /// How long no agent had been attached when it attached: the pause its agent reports.
    agentless: Duration,
}

struct Holder {
    state: Mutex<State>,
    changed: Condvar,
}

impl Holder {
    /// `conn`: this connection's attachment (see [`Attachment`]).
    fn handle(&self, msg: Message, fds: Vec<OwnedFd>, conn: &mut Attachment) -> (Message, Vec<OwnedFd>) {
        let mut s = self.state.lock().unwrap();
        let reply = match msg {
            Message::Hold { key, state } => {
                if fds.is_empty() {
                    Message::Error { reason: format!("hold {key}: no descriptor came with it") }
                } else {
                    info!(key = %key, descriptors = fds.len(), "holding the connection");
                    s.held.insert(key, (fds, state));
                    self.attach(&mut s, conn);
                    Message::Ok
                }
            }
            Message::Take { key } => match s.held.get(&key) {
                Some((fds, state)) => {
                    match fds.iter().map(|f| f.try_clone()).collect::<Result<Vec<_>, _>>() {
                        Ok(dups) => {
                            let state = state.clone();
                            self.attach(&mut s, conn);
                            let agentless_ms = conn.agentless.as_millis() as u64;
                            info!(key = %key, agentless_ms, "handing the connection to an agent");
                            return (Message::Held { key, state, agentless_ms }, dups);
                        }
                        Err(e) => Message::Error { reason: format!("take {key}: cannot duplicate: {e}") },
                    }
                }
                None => Message::Error { reason: format!("nothing is held under {key}") },
            },
            Message::Forget { key } => {
                if s.held.remove(&key).is_some() {
                    info!(key = %key, "connection released");
                }
                if s.held.is_empty() && s.attached == 0 && !conn.attached {
                    // Released with no agent: nothing left to wait for.
                    s.done = true;
                    self.changed.notify_all();
                }
                Message::Ok
            }
            Message::List => Message::Keys { keys: s.held.keys().cloned().collect() },
            Message::Attach => {
                self.attach(&mut s, conn);
                Message::Ok
            }
            other => Message::Error { reason: format!("{other:?} is not a request") },
        };
        (reply, Vec::new())
    }

    fn attach(&self, s: &mut State, conn: &mut Attachment) {
        if !conn.attached {
            conn.attached = true;
            if s.attached == 0 {
                conn.agentless = s.orphaned_since.map_or(Duration::ZERO, |since| since.elapsed());
            }
            s.attached += 1;
            s.orphaned_since = None;
        }
    }

    fn detach(&self, attached: bool) {
        if attached {
            let mut s = self.state.lock().unwrap();
            s.attached -= 1;
            if s.attached == 0 {
                s.orphaned_since = Some(Instant::now());
                if s.held.is_empty() {
                    s.done = true;
                } else {
                    warn!(held = s.held.len(), "no agent attached: requests wait for the next one");
                }
            }
            self.changed.notify_all();
        }
    }

    fn serve(self: Arc<Self>, sock: UnixStream) {
        let mut conn = Attachment::default();
        loop {
            match recv(&sock) {
                Ok(Some((msg, fds))) => {
                    let (reply, fds) = self.handle(msg, fds, &mut conn);
                    let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
                    if send(&sock, &reply, &raw).is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    // A bad message ends this connection only.
                    warn!("holder connection dropped: {e}");
                    let _ = send(&sock, &Message::Error { reason: e.to_string() }, &[]);
                    break;
                }
            }
        }
        self.detach(conn.attached);
    }

    /// Waits until the grace time has passed with no agent attached, or the last agent left
    /// with nothing held; then lets go.
    fn watch(&self, grace: Duration) {
        let mut s = self.state.lock().unwrap();
        loop {
            if s.done {
                return;
            }
            if let Some(since) = s.orphaned_since {
                let left = grace.saturating_sub(since.elapsed());
                if left.is_zero() {
                    if !s.held.is_empty() {
                        warn!(
                            held = s.held.len(),
                            grace = ?grace,
                            "no agent came back within the grace time: closing the connections (their requests fail with EIO)"
                        );
                    }
                    s.held.clear();
                    return;
                }
                s = self.changed.wait_timeout(s, left).unwrap().0;
            } else {
                s = self.changed.wait(s).unwrap();
            }
        }
    }
}

/// Whether something answers on `socket` (a holder already runs there).
pub fn is_running(socket: &Path) -> bool {
    UnixStream::connect(socket).is_ok()
}

/// Runs the holder until the grace time has passed with no agent attached, or the last
/// agent has left with nothing held.
pub fn run(settings: &HolderSettings) -> Result<()> {
    if is_running(&settings.socket) {
        bail!("a holder already runs at {}", settings.socket.display());
    }
    let _ = std::fs::remove_file(&settings.socket);
    let listener = UnixListener::bind(&settings.socket)
        .with_context(|| format!("cannot listen on {}", settings.socket.display()))?;
    if let Some(p) = &settings.pid_file {
        std::fs::write(p, format!("{}\n", std::process::id()))
            .with_context(|| format!("cannot write {}", p.display()))?;
    }
    let holder = Arc::new(Holder {
        state: Mutex::new(State { orphaned_since: Some(Instant::now()), ..Default::default() }),
        changed: Condvar::new(),
    });
    {
        let holder = holder.clone();
        std::thread::Builder::new().name("holder-accept".into()).spawn(move || {
            for sock in listener.incoming() {
                let Ok(sock) = sock else { continue };
                let h = holder.clone();
                if let Err(e) =
                    std::thread::Builder::new().name("holder-conn".into()).spawn(move || h.serve(sock))
                {
                    warn!("cannot serve a holder connection: {e}");
                }
            }
        })?;
    }
    info!(socket = %settings.socket.display(), grace = ?settings.grace, "holder running");
    holder.watch(settings.grace);
    let _ = std::fs::remove_file(&settings.socket);
    if let Some(p) = &settings.pid_file {
        let _ = std::fs::remove_file(p);
    }
    info!("holder exits");
    Ok(())
}
