//! Event handlers: administrator commands run on role changes, connections, resyncs, split
//! brain, and before a promotion while a peer is unreachable (`fence-peer`, which can refuse
//! the promotion — the place to wire STONITH).
//!
//! Every handler runs with `sh -c COMMAND` and gets the event in its environment:
//! `TANDEM_EVENT`, `TANDEM_RESOURCE`, `TANDEM_NODE`, `TANDEM_PEER` (empty for events not
//! about one peer), `TANDEM_ROLE`, `TANDEM_DISK`, plus event-specific variables. Its output
//! goes to the agent's log. Only `fence-peer` is waited for; the others run in the
//! background and never delay the data path.
//!
//! Every run is reported on the event bus (`call` when it starts, `response` when it ends)
//! and counted per event: runs, and failures (a non-zero exit, a timeout, a kill, or a
//! handler that could not be started).

use std::collections::BTreeMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use tokio::process::Command;
use tracing::{info, warn};

use super::events::ResourceEvents;
use crate::config::Handlers;
use crate::events::{HandlerOutcome, Kind, Object, Record};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HookEvent {
    FencePeer,
    SplitBrain,
    RoleChange,
    Connected,
    Disconnected,
    SyncStart,
    SyncDone,
}

impl HookEvent {
    pub const ALL: [HookEvent; 7] = [
        HookEvent::FencePeer,
        HookEvent::SplitBrain,
        HookEvent::RoleChange,
        HookEvent::Connected,
        HookEvent::Disconnected,
        HookEvent::SyncStart,
        HookEvent::SyncDone,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            HookEvent::FencePeer => "fence-peer",
            HookEvent::SplitBrain => "split-brain",
            HookEvent::RoleChange => "role-change",
            HookEvent::Connected => "connected",
            HookEvent::Disconnected => "disconnected",
            HookEvent::SyncStart => "sync-start",
            HookEvent::SyncDone => "sync-done",
        }
    }

    fn command(self, h: &Handlers) -> Option<&String> {
        match self {
            HookEvent::FencePeer => h.fence_peer.as_ref(),
            HookEvent::SplitBrain => h.split_brain.as_ref(),
            HookEvent::RoleChange => h.role_change.as_ref(),
            HookEvent::Connected => h.connected.as_ref(),
            HookEvent::Disconnected => h.disconnected.as_ref(),
            HookEvent::SyncStart => h.sync_start.as_ref(),
            HookEvent::SyncDone => h.sync_done.as_ref(),
        }
    }
}

/// What a handler is told about the event.
#[derive(Debug, Clone, Default)]
pub struct HookContext {
    pub peer: Option<String>,
    pub role: String,
    pub disk: String,
    /// Event-specific variables (`TANDEM_…`).
    pub extra: Vec<(&'static str, String)>,
}

/// How often one kind of handler ran, and how often it failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HookStats {
    pub event: HookEvent,
    pub runs: u64,
    /// Non-zero exit, timeout, killed by a signal, or could not be started.
    pub failures: u64,
}

/// How one run ended.
#[derive(Debug)]
enum Ended {
    Exited(i32),
    TimedOut,
    Killed,
    Failed(String),
}

/// The handlers of one resource on this node.
#[derive(Clone)]
pub struct Hooks {
    resource: String,
    node: String,
    handlers: Handlers,
    timeout: Duration,
    events: Arc<ResourceEvents>,
    /// The shell handlers run with (`/bin/sh`; another in tests).
    shell: std::path::PathBuf,
    stats: Arc<Mutex<BTreeMap<HookEvent, (u64, u64)>>>,
}

impl Hooks {
    pub fn new(
        resource: &str,
        node: &str,
        handlers: Handlers,
        timeout: Duration,
        events: Arc<ResourceEvents>,
    ) -> Self {
        Self {
            resource: resource.to_string(),
            node: node.to_string(),
            handlers,
            timeout,
            events,
            shell: "/bin/sh".into(),
            stats: Arc::default(),
        }
    }

    /// Runs and failures so far of every kind of handler (zero for those that never ran,
    /// configured or not: counters exist from the start), in `HookEvent::ALL` order.
    pub fn stats(&self) -> Vec<HookStats> {
        let stats = self.stats.lock().unwrap();
        HookEvent::ALL
            .iter()
            .map(|e| {
                let (runs, failures) = stats.get(e).copied().unwrap_or_default();
                HookStats { event: *e, runs, failures }
            })
            .collect()
    }

    pub fn configured(&self, event: HookEvent) -> bool {
        event.command(&self.handlers).is_some()
    }

    fn command(&self, event: HookEvent, cmd: &str, ctx: &HookContext) -> Command {
        let mut c = Command::new(&self.shell);
        c.arg("-c")
            .arg(cmd)
            .env("TANDEM_EVENT", event.as_str())
            .env("TANDEM_RESOURCE", &self.resource)
            .env("TANDEM_NODE", &self.node)
            .env("TANDEM_PEER", ctx.peer.as_deref().unwrap_or(""))
            .env("TANDEM_ROLE", &ctx.role)
            .env("TANDEM_DISK", &ctx.disk)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        for (k, v) in &ctx.extra {
            c.env(k, v);
        }
        c
    }

    /// Runs the handler for `event` and waits for it (up to the hook timeout). `Ok(None)`
    /// if none is configured; `Ok(Some(code))` with its exit code; an error if it could not
    /// run, was killed, or ran too long.
    pub async fn run(&self, event: HookEvent, ctx: &HookContext) -> Result<Option<i32>> {
        let Some(cmd) = event.command(&self.handlers) else { return Ok(None) };
        let what = format!("{} handler `{cmd}` for {}", event.as_str(), self.resource);
        let peer = ctx.peer.clone();
        self.events.emit(|name| Record {
            handler: Some(event),
            peer: peer.clone(),
            ..Record::new(Kind::Call, Object::Handler, name)
        });
        let ended = self.execute(event, cmd, ctx).await;
        {
            let mut stats = self.stats.lock().unwrap();
            let s = stats.entry(event).or_default();
            s.0 += 1;
            if !matches!(ended, Ended::Exited(0)) {
                s.1 += 1;
            }
        }
        self.events.emit(|name| {
            let mut r =
                Record { handler: Some(event), peer, ..Record::new(Kind::Response, Object::Handler, name) };
            match &ended {
                Ended::Exited(code) => (r.outcome, r.exit_code) = (Some(HandlerOutcome::Exited), Some(*code)),
                Ended::TimedOut => r.outcome = Some(HandlerOutcome::TimedOut),
                Ended::Killed => r.outcome = Some(HandlerOutcome::Killed),
                Ended::Failed(e) => (r.outcome, r.reason) = (Some(HandlerOutcome::Failed), Some(e.clone())),
            }
            r
        });
        match ended {
            Ended::Exited(code) => {
                info!(resource = %self.resource, event = event.as_str(), peer = ctx.peer.as_deref().unwrap_or(""),
                      "{what} exited with {code}");
                Ok(Some(code))
            }
            Ended::TimedOut => bail!("the {what} did not finish within {:?}; killed", self.timeout),
            Ended::Killed => bail!("the {what} was killed by a signal"),
            Ended::Failed(e) => bail!("the {what} failed: {e}"),
        }
    }

    async fn execute(&self, event: HookEvent, cmd: &str, ctx: &HookContext) -> Ended {
        let child = match self.command(event, cmd, ctx).spawn() {
            Ok(c) => c,
            Err(e) => return Ended::Failed(format!("cannot run it: {e}")),
        };
        let out = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(Ok(out)) => out,
            Ok(Err(e)) => return Ended::Failed(e.to_string()),
            Err(_) => return Ended::TimedOut,
        };
        for line in
            String::from_utf8_lossy(&out.stdout).lines().chain(String::from_utf8_lossy(&out.stderr).lines())
        {
            info!(resource = %self.resource, event = event.as_str(), "handler: {line}");
        }
        match out.status.code() {
            Some(code) => Ended::Exited(code),
            None => Ended::Killed,
        }
    }

    /// Runs the handler for `event` in the background, logging its outcome.
    pub fn fire(&self, event: HookEvent, ctx: HookContext) {
        if !self.configured(event) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            match me.run(event, &ctx).await {
                Ok(Some(0)) | Ok(None) => {}
                Ok(Some(code)) => {
                    warn!(resource = %me.resource, event = event.as_str(), "handler exited with {code}")
                }
                Err(e) => warn!(resource = %me.resource, "{e:#}"),
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::daemon::events::EventBus;
    use crate::events::HandlerOutcome;

    fn hooks(h: Handlers, timeout: Duration) -> Hooks {
        hooks_on(EventBus::new(), h, timeout)
    }

    fn hooks_on(bus: Arc<EventBus>, h: Handlers, timeout: Duration) -> Hooks {
        Hooks::new("mail", "alpha", h, timeout, ResourceEvents::new("mail", bus))
    }

    /// Every run is counted, failures (non-zero exit, timeout, cannot start) apart, and
    /// reported on the bus as `call` then `response` with how it ended.
    #[tokio::test(flavor = "current_thread")]
    async fn handler_runs_are_counted_and_reported_as_events() {
        let bus = EventBus::new();
        let (mut rx, dump) = bus.subscribe(std::iter::empty::<(&ResourceEvents, fn() -> _)>(), None);
        assert_eq!(dump.len(), 1, "only the end-of-dump marker: {dump:?}");
        let h = hooks_on(
            bus.clone(),
            Handlers {
                role_change: Some("exit 0".into()),
                connected: Some("exit 4".into()),
                sync_done: Some("sleep 30".into()),
                split_brain: Some("/nonexistent/handler".into()),
                ..Default::default()
            },
            Duration::from_millis(300),
        );
        let ctx = HookContext { peer: Some("beta".into()), ..Default::default() };
        assert_eq!(h.run(HookEvent::RoleChange, &ctx).await.unwrap(), Some(0));
        assert_eq!(h.run(HookEvent::RoleChange, &ctx).await.unwrap(), Some(0));
        assert_eq!(h.run(HookEvent::Connected, &ctx).await.unwrap(), Some(4));
        h.run(HookEvent::SyncDone, &ctx).await.unwrap_err();
        // sh starts, but cannot find the command: exit 127.
        assert_eq!(h.run(HookEvent::SplitBrain, &ctx).await.unwrap(), Some(127));
        assert_eq!(h.run(HookEvent::FencePeer, &ctx).await.unwrap(), None, "not configured: not a run");
        let stats: Vec<(HookEvent, u64, u64)> =
            h.stats().iter().map(|s| (s.event, s.runs, s.failures)).collect();
        assert_eq!(
            stats,
            vec![
                (HookEvent::FencePeer, 0, 0),
                (HookEvent::SplitBrain, 1, 1),
                (HookEvent::RoleChange, 2, 0),
                (HookEvent::Connected, 1, 1),
                (HookEvent::Disconnected, 0, 0),
                (HookEvent::SyncStart, 0, 0),
                (HookEvent::SyncDone, 1, 1),
            ]
        );
        let mut seen = Vec::new();
        while let Ok(r) = rx.try_recv() {
            assert_eq!((r.name.as_deref(), r.peer.as_deref()), (Some("mail"), Some("beta")), "{r:?}");
            seen.push((r.kind, r.handler.unwrap(), r.outcome, r.exit_code));
        }
        let call = |e| (Kind::Call, e, None, None);
        let exited = |e, c| (Kind::Response, e, Some(HandlerOutcome::Exited), Some(c));
        assert_eq!(
            seen,
            vec![
                call(HookEvent::RoleChange),
                exited(HookEvent::RoleChange, 0),
                call(HookEvent::RoleChange),
                exited(HookEvent::RoleChange, 0),
                call(HookEvent::Connected),
                exited(HookEvent::Connected, 4),
                call(HookEvent::SyncDone),
                (Kind::Response, HookEvent::SyncDone, Some(HandlerOutcome::TimedOut), None),
                call(HookEvent::SplitBrain),
                exited(HookEvent::SplitBrain, 127),
            ]
        );
    }

    /// A handler that cannot be started at all is a failure, reported as such.
    #[tokio::test(flavor = "current_thread")]
    async fn handler_that_cannot_start_is_a_failure_in_events() {
        let bus = EventBus::new();
        let (mut rx, _) = bus.subscribe(std::iter::empty::<(&ResourceEvents, fn() -> _)>(), None);
        let mut h = hooks_on(
            bus.clone(),
            Handlers { connected: Some("true".into()), ..Default::default() },
            Duration::from_secs(5),
        );
        h.shell = "/nonexistent/sh".into();
        h.run(HookEvent::Connected, &HookContext::default()).await.unwrap_err();
        let connected = h.stats().into_iter().find(|s| s.event == HookEvent::Connected).unwrap();
        assert_eq!((connected.runs, connected.failures), (1, 1));
        let _call = rx.try_recv().unwrap();
        let resp = rx.try_recv().unwrap();
        assert_eq!((resp.kind, resp.outcome), (Kind::Response, Some(HandlerOutcome::Failed)));
        assert!(resp.reason.as_deref().unwrap_or_default().contains("cannot run"), "{resp:?}");
    }

    #[tokio::test(flavor = "current_thread")]
    async fn handler_gets_the_event_and_its_exit_code_counts() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("env");
        let h = hooks(
            Handlers {
                fence_peer: Some(format!(
                    "echo \"$TANDEM_EVENT $TANDEM_RESOURCE $TANDEM_NODE $TANDEM_PEER $TANDEM_ROLE $TANDEM_X\" > {}; exit 3",
                    out.display()
                )),
                ..Default::default()
            },
            Duration::from_secs(10),
        );
        let ctx = HookContext {
            peer: Some("beta".into()),
            role: "secondary".into(),
            disk: "up_to_date".into(),
            extra: vec![("TANDEM_X", "x1".into())],
        };
        assert_eq!(h.run(HookEvent::FencePeer, &ctx).await.unwrap(), Some(3));
        assert_eq!(std::fs::read_to_string(&out).unwrap().trim(), "fence-peer mail alpha beta secondary x1");
        assert_eq!(h.run(HookEvent::SyncDone, &ctx).await.unwrap(), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_handler_that_hangs_is_killed_and_reported() {
        let h = hooks(
            Handlers { fence_peer: Some("sleep 30".into()), ..Default::default() },
            Duration::from_millis(200),
        );
        let e = h.run(HookEvent::FencePeer, &HookContext::default()).await.unwrap_err().to_string();
        assert!(e.contains("did not finish"), "{e}");
    }
}
