//! systemd's readiness protocol (`sd_notify(3)`), for `Type=notify` units: one datagram per
//! state change to the socket named by `NOTIFY_SOCKET` (a path, or `@name` for the abstract
//! namespace). Without `NOTIFY_SOCKET` (not run by systemd) every call does nothing.
//!
//! - `READY=1` once the control socket is bound and served, so `systemctl start` returns
//!   when the CLI (and the OCF agent) can talk to the agent;
//! - `WATCHDOG=1` every half `WATCHDOG_USEC` from a task on the agent's runtime: if that
//!   runtime stalls (the control plane and QUIC run on it), systemd stops hearing from it
//!   and restarts the agent (`WatchdogSec=` in the unit);
//! - `STOPPING=1` when the shutdown starts.
//!
//! Sending never blocks; a failure is logged once and otherwise ignored: systemd's view of the service is
//! not a reason to stop replicating.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tracing::warn;

static WARNED: AtomicBool = AtomicBool::new(false);

/// Sends `state` (e.g. `"READY=1"`) to systemd, if it asked for notifications. Never
/// blocks: a receiver that does not read (its queue full) loses the message.
pub fn notify(state: &str) {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else { return };
    if let Err(e) = send(&target.to_string_lossy(), state) {
        if !WARNED.swap(true, Ordering::Relaxed) {
            warn!("cannot notify systemd ({state}) at {target:?}: {e} (further failures are not logged)");
        }
    }
}

fn send(target: &str, state: &str) -> std::io::Result<usize> {
    let sock = UnixDatagram::unbound()?;
    // It is sent from the agent's runtime thread, which must never wait for systemd.
    sock.set_nonblocking(true)?;
    match target.strip_prefix('@') {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
            sock.send_to_addr(state.as_bytes(), &addr)
        }
        None => sock.send_to(state.as_bytes(), target),
    }
}

/// How often to send `WATCHDOG=1`, if systemd's watchdog is on for this process: half the
/// interval it was given (`WATCHDOG_USEC`, for `WATCHDOG_PID` if set).
pub fn watchdog_interval() -> Option<Duration> {
    std::env::var_os("NOTIFY_SOCKET")?;
    if let Some(pid) = std::env::var("WATCHDOG_PID").ok().and_then(|p| p.parse::<u32>().ok()) {
        if pid != std::process::id() {
            return None;
        }
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_reach_a_path_socket() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        send(&path.to_string_lossy(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn states_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("tandem-notify-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        send(&format!("@{name}"), "WATCHDOG=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"WATCHDOG=1");
    }
}
