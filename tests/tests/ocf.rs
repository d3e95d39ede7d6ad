//! The OCF resource agent (`agent/ocf/tandem`) against real `tandem agent` processes,
//! without a cluster (the Pacemaker cluster tests are in `pacemaker.rs`):
//!
//! - `ocf_tester_passes`: resource-agents' `ocf-tester` runs every action (meta-data
//!   against the OCF DTD, probes, start/stop twice, promote/demote twice, notify) on one
//!   node, whose agent the OCF `start` itself launches; the peer stays up throughout.
//! - `monitor_reports_a_dead_agent_by_what_it_was`: monitor after `kill -9` of the agent
//!   under a promoted instance whose device the descriptor holder keeps starts a new agent,
//!   which takes the same device over (8); with the holder killed too it says 9; under a
//!   started instance 1; 7 after a clean stop; the stable device path follows the role.
//!
//! Both need root, FUSE, loop devices and the Pacemaker packages; they fail with the
//! reason without them.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tandem_tests::lab::{Lab, LabOptions};
use tandem_tests::*;

const OCF_SUCCESS: i32 = 0;
const OCF_ERR_GENERIC: i32 = 1;
const OCF_NOT_RUNNING: i32 = 7;
const OCF_RUNNING_MASTER: i32 = 8;
const OCF_FAILED_MASTER: i32 = 9;

/// An agent the OCF `start` launched (not the lab's child): stopped when the test ends,
/// before the lab cleans up. Its pid is in the OCF agent's pid file.
struct OcfLaunchedAgent {
    pid_file: PathBuf,
}

impl OcfLaunchedAgent {
    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(&self.pid_file).ok()?.trim().parse().ok()
    }

    fn alive(&self) -> bool {
        self.pid().is_some_and(|p| kill(Pid::from_raw(p), None).is_ok())
    }

    fn kill9(&self) {
        if let Some(p) = self.pid() {
            let _ = kill(Pid::from_raw(p), Signal::SIGKILL);
            let deadline = Instant::now() + Duration::from_secs(10);
            while self.alive() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

impl Drop for OcfLaunchedAgent {
    fn drop(&mut self) {
        let Some(p) = self.pid() else { return };
        let pid = Pid::from_raw(p);
        if kill(pid, Signal::SIGTERM).is_ok() {
            let deadline = Instant::now() + Duration::from_secs(20);
            while kill(pid, None).is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

/// The OCF environment of one instance of the agent for node `node` of the lab.
struct Ocf<'a> {
    lab: &'a Lab,
    node: &'static str,
    rsctmp: PathBuf,
}

impl Ocf<'_> {
    fn new<'a>(lab: &'a Lab, node: &'static str) -> Ocf<'a> {
        let rsctmp = lab.dir.join(format!("{node}-rsctmp"));
        std::fs::create_dir_all(&rsctmp).unwrap();
        Ocf { lab, node, rsctmp }
    }

    fn params(&self) -> Vec<(String, String)> {
        vec![
            ("resource".into(), self.lab.resource.clone()),
            ("config".into(), self.lab.config.display().to_string()),
            ("node".into(), self.node.into()),
            ("binary".into(), self.lab.exe().display().to_string()),
            ("agent_log".into(), self.lab.log(self.node).display().to_string()),
        ]
    }

    fn launched(&self) -> OcfLaunchedAgent {
        OcfLaunchedAgent { pid_file: self.rsctmp.join(format!("tandem-agent-{}.pid", self.node)) }
    }

    fn action(&self, action: &str) -> Output {
        let mut cmd = Command::new(ocf_agent());
        cmd.arg(action).env("HA_RSCTMP", &self.rsctmp).env("OCF_ROOT", "/usr/lib/ocf");
        for (k, v) in self.params() {
            cmd.env(format!("OCF_RESKEY_{k}"), v);
        }
        cmd.output().unwrap_or_else(|e| panic!("run the OCF agent: {e}"))
    }

    /// Runs `action` and returns its exit code.
    fn rc(&self, action: &str) -> i32 {
        let out = self.action(action);
        out.status.code().unwrap_or_else(|| panic!("{action} killed: {out:?}"))
    }

    fn expect(&self, action: &str, rc: i32) {
        let out = self.action(action);
        assert_eq!(
            out.status.code(),
            Some(rc),
            "OCF {action} on {}: {}{}\nagent log:\n{}",
            self.node,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.lab.log_text(self.node)
        );
    }
}

fn ocf_lab() -> Lab {
    require_real_devices();
    require_pacemaker();
    new_lab(&["alpha", "beta"], &LabOptions::default())
}

fn link_target(p: &Path) -> Option<PathBuf> {
    std::fs::read_link(p).ok()
}

#[test]
fn ocf_tester_passes() {
    let mut lab = ocf_lab();
    lab.start("beta").unwrap();
    let ocf = Ocf::new(&lab, "alpha");
    let launched = ocf.launched();
    let mut cmd = Command::new("ocf-tester");
    cmd.args(["-n", "tandem_test"]).env("HA_RSCTMP", &ocf.rsctmp);
    for (k, v) in ocf.params() {
        cmd.arg("-o").arg(format!("{k}={v}"));
    }
    // ocf-tester runs the agent as `nobody` too: use a copy it can reach even when the
    // checkout is under a directory only root may enter (a `mktemp -d` clone).
    let reachable = tempfile::Builder::new().prefix("tandem-ocf-").tempdir_in(lab_parent()).unwrap();
    std::fs::set_permissions(reachable.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let agent = reachable.path().join("tandem");
    std::fs::copy(ocf_agent(), &agent).unwrap();
    let out = cmd.arg(&agent).output().expect("run ocf-tester");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(
        out.status.success() && text.contains("passed all tests"),
        "ocf-tester failed ({}):\n{text}\nagent log:\n{}",
        out.status,
        lab.log_text("alpha")
    );
    // The OCF start launched alpha's agent; ocf-tester's last stop took the resource down
    // without stopping the agent, and beta was never touched.
    assert!(launched.alive(), "the agent the OCF start launched is gone:\n{}", lab.log_text("alpha"));
    let a = lab.resource_status("alpha").unwrap();
    assert!(a.down && a.role == "secondary" && a.device.is_none(), "{a:?}");
    let b = lab.resource_status("beta").unwrap();
    assert!(!b.down && b.role == "secondary", "{b:?}");
    drop(launched);
}

#[test]
fn monitor_reports_a_dead_agent_by_what_it_was() {
    let mut lab = ocf_lab();
    lab.start("beta").unwrap();
    let ocf = Ocf::new(&lab, "alpha");
    let launched = ocf.launched();
    let stable = lab.dir.join("alpha/dev").join(&lab.resource);

    // Never started: 7, and no agent is launched by a probe.
    ocf.expect("monitor", OCF_NOT_RUNNING);
    assert!(!launched.alive());

    ocf.expect("start", OCF_SUCCESS);
    ocf.expect("monitor", OCF_SUCCESS);
    ocf.expect("promote", OCF_SUCCESS);
    ocf.expect("monitor", OCF_RUNNING_MASTER);
    let device = lab.resource_status("alpha").unwrap().device.expect("primary has a device");
    assert_eq!(link_target(&stable), Some(PathBuf::from(&device)), "stable path of the primary");

    // The agent dies under the promoted instance, but the descriptor holder keeps its
    // device: the monitor starts a new agent, which takes the same device over.
    let killed = launched.pid();
    launched.kill9();
    ocf.expect("monitor", OCF_RUNNING_MASTER);
    assert!(launched.alive() && launched.pid() != killed, "the monitor started a new agent");
    let st = lab.resource_status("alpha").unwrap();
    assert_eq!(st.device.as_deref(), Some(device.as_str()), "the same device: {st:?}");
    assert!(st.takeover.is_some(), "the new agent took the device over: {st:?}");
    assert_eq!(link_target(&stable), Some(PathBuf::from(&device)), "stable path of the primary");

    // The agent and the holder die (what a crash of the node does to them): a failed primary.
    let holder: i32 = std::fs::read_to_string(lab.dir.join("alpha/run/holder.pid"))
        .expect("the holder's pid file")
        .trim()
        .parse()
        .unwrap();
    kill(Pid::from_raw(holder), Signal::SIGKILL).unwrap();
    launched.kill9();
    assert_eq!(ocf.rc("monitor"), OCF_FAILED_MASTER);
    // Pacemaker's recovery: demote (the agent is gone: nothing to demote, it fails), stop,
    // start (which launches a new agent: the stale link is gone), promote.
    ocf.expect("stop", OCF_SUCCESS);
    ocf.expect("monitor", OCF_NOT_RUNNING);
    ocf.expect("start", OCF_SUCCESS);
    assert!(launched.alive());
    assert_eq!(link_target(&stable), None, "a restarted agent removes the stale link");
    ocf.expect("monitor", OCF_SUCCESS);

    // The agent dies under a started instance: a plain failure.
    launched.kill9();
    assert_eq!(ocf.rc("monitor"), OCF_ERR_GENERIC);
    ocf.expect("stop", OCF_SUCCESS);
    ocf.expect("monitor", OCF_NOT_RUNNING);

    // Start, promote, demote, stop: the link follows the role; beta stays in service.
    ocf.expect("start", OCF_SUCCESS);
    lab.wait_connected("alpha", Duration::from_secs(60)).unwrap();
    ocf.expect("promote", OCF_SUCCESS);
    assert!(link_target(&stable).is_some());
    ocf.expect("demote", OCF_SUCCESS);
    ocf.expect("monitor", OCF_SUCCESS);
    assert_eq!(link_target(&stable), None, "no stable path on a secondary");
    ocf.expect("stop", OCF_SUCCESS);
    ocf.expect("monitor", OCF_NOT_RUNNING);
    assert!(!lab.resource_status("beta").unwrap().down);
    drop(launched);
}
