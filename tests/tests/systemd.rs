//! The systemd unit (`agent/systemd/tandem.service`) and the agent's side of it.
//!
//! - `the_unit_verifies`: `systemd-analyze verify` is clean (ExecStart pointed at the
//!   binary under test, since /usr/bin/tandem is not installed here). It needs
//!   systemd-analyze, not systemd as PID 1.
//! - `the_agent_notifies_ready_watchdog_and_stopping`: run as by a `Type=notify` unit with
//!   `WatchdogSec=`, the agent sends READY=1 when its control socket answers, WATCHDOG=1
//!   regularly, and STOPPING=1 on SIGTERM before a clean exit.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tandem_tests::lab::LabOptions;
use tandem_tests::*;

fn unit_file() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../agent/systemd/tandem.service")
}

#[test]
fn the_unit_verifies() {
    let found = Command::new("sh")
        .args(["-c", "command -v systemd-analyze"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "this test needs systemd-analyze (apt-get install systemd)");
    let text = std::fs::read_to_string(unit_file()).unwrap();
    assert!(text.contains("Type=notify") && text.contains("WatchdogSec="), "{text}");
    assert!(text.contains("ExecStart=/usr/bin/tandem "), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let unit = dir.path().join("tandem.service");
    std::fs::write(&unit, text.replace("/usr/bin/tandem", &tandem_bin().to_string_lossy())).unwrap();
    let out = Command::new("systemd-analyze").arg("verify").arg(&unit).output().unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success() && report.trim().is_empty(),
        "systemd-analyze verify: {}\n{report}",
        out.status
    );
}

/// The agent process; killed if the test fails before it exits.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_agent_notifies_ready_watchdog_and_stopping() {
    let lab = new_lab(&["alpha", "beta"], &LabOptions::default());
    let socket_path = lab.dir.join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    socket.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let log = std::fs::File::create(lab.log("alpha")).unwrap();
    let mut agent = Agent(
        Command::new(lab.exe())
            .args(["agent", "--config"])
            .arg(&lab.config)
            .args(["--node", "alpha"])
            .env("NOTIFY_SOCKET", &socket_path)
            .env("WATCHDOG_USEC", "200000")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let recv = || {
        let mut buf = [0u8; 256];
        let n = socket
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("no notification: {e}\n{}", lab.log_text("alpha")));
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert_eq!(recv(), "READY=1");
    // Ready means the control socket answers.
    let st = lab.status("alpha").expect("the control socket answers once READY=1 is sent");
    assert_eq!(st.node, "alpha");
    let mut watchdogs = 0;
    while watchdogs < 3 {
        assert_eq!(recv(), "WATCHDOG=1");
        watchdogs += 1;
    }
    kill(Pid::from_raw(agent.0.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let msg = recv();
        if msg == "STOPPING=1" {
            break;
        }
        assert_eq!(msg, "WATCHDOG=1", "only watchdog pings before STOPPING=1");
        assert!(Instant::now() < deadline, "no STOPPING=1");
    }
    let status = agent.0.wait().unwrap();
    assert!(status.success(), "clean exit: {status}\n{}", lab.log_text("alpha"));
}
