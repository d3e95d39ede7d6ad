//! Event handlers: administrator commands run on role changes, connections, resyncs, split
//! brain, and before a promotion while a peer is unreachable (`fence-peer`, which can refuse
//! the promotion — the place to wire STONITH).
//!
//! Every handler runs with `sh -c COMMAND` and gets the event in its environment:
//! `TANDEM_EVENT`, `TANDEM_RESOURCE`, `TANDEM_NODE`, `TANDEM_PEER` (empty for events not
//! about one peer), `TANDEM_ROLE`, `TANDEM_DISK`, plus event-specific variables. Its output
//! goes to the agent's log. Only `fence-peer` is waited for; the others run in the
//! background and never delay the data path.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::process::Command;
use tracing::{info, warn};

use crate::config::Handlers;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// The handlers of one resource on this node.
#[derive(Debug, Clone)]
pub struct Hooks {
    resource: String,
    node: String,
    handlers: Handlers,
    timeout: Duration,
}

impl Hooks {
    pub fn new(resource: &str, node: &str, handlers: Handlers, timeout: Duration) -> Self {
        Self { resource: resource.to_string(), node: node.to_string(), handlers, timeout }
    }

    pub fn configured(&self, event: HookEvent) -> bool {
        event.command(&self.handlers).is_some()
    }

    fn command(&self, event: HookEvent, cmd: &str, ctx: &HookContext) -> Command {
        let mut c = Command::new("/bin/sh");
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
        let child =
            self.command(event, cmd, ctx).spawn().with_context(|| format!("cannot run the {what}"))?;
        let out = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(r) => r.with_context(|| format!("the {what} failed"))?,
            Err(_) => bail!("the {what} did not finish within {:?}; killed", self.timeout),
        };
        for line in
            String::from_utf8_lossy(&out.stdout).lines().chain(String::from_utf8_lossy(&out.stderr).lines())
        {
            info!(resource = %self.resource, event = event.as_str(), "handler: {line}");
        }
        match out.status.code() {
            Some(code) => {
                info!(resource = %self.resource, event = event.as_str(), peer = ctx.peer.as_deref().unwrap_or(""),
                      "{what} exited with {code}");
                Ok(Some(code))
            }
            None => bail!("the {what} was killed by a signal"),
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

    fn hooks(h: Handlers, timeout: Duration) -> Hooks {
        Hooks::new("mail", "alpha", h, timeout)
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
