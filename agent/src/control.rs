//! The local control socket: one JSON request per line, one JSON response per line.
//! The admin verbs of the `tandem` CLI are clients of it.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use serde::{Deserialize, Serialize};

use crate::status::{NodeStatus, VerifyReport};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Promote {
        resource: String,
        force: bool,
    },
    Demote {
        resource: String,
    },
    Invalidate {
        resource: String,
        checksum: bool,
    },
    Connect {
        resource: String,
    },
    Disconnect {
        resource: String,
    },
    Verify {
        resource: String,
        repair: bool,
    },
    Resync {
        resource: String,
    },
    Resolve {
        resource: String,
        discard_local: bool,
    },
    /// Take the resource out of service on this node (`tandem down`): demoted, no
    /// replication with any peer, until `Up`.
    Down {
        resource: String,
    },
    /// Put the resource back in service after `Down` (or `Disconnect`).
    Up {
        resource: String,
    },
    /// `peer` is known to be down (fenced, or lost by the cluster manager): close the
    /// connection to it now instead of waiting for the peer timeout.
    PeerLost {
        peer: String,
    },
    /// `tandem restart`: the agent answers, shuts down for a restart (primaries' devices
    /// stay with the descriptor holder) and execs its binary again, which takes them over.
    Restart,
    /// `tandem snapshot ...`.
    Snapshot {
        resource: String,
        op: SnapshotOp,
    },
    /// `tandem events`: a stream. The agent answers with one `Response` line (an error if
    /// `resource` is not one of its resources), then writes one `events::Record` per line
    /// until the client goes away or the agent stops. The client sends nothing more and
    /// keeps its end open: closing it (even only its sending side) ends the stream.
    Events {
        #[serde(default)]
        resource: Option<String>,
    },
}

/// What `tandem snapshot` does.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum SnapshotOp {
    Create {
        name: Option<String>,
    },
    List,
    Delete {
        name: String,
    },
    Expose {
        name: String,
        #[serde(default)]
        overlay: bool,
    },
    Unexpose {
        name: String,
    },
    Restore {
        name: String,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<NodeStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<Vec<VerifyReport>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Vec<crate::daemon::resource::SnapshotStatus>>,
    /// Devices made (`snapshot expose`): (volume, device).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub devices: Option<Vec<(String, String)>>,
}

impl Response {
    pub fn ok(message: impl Into<String>) -> Self {
        Self { ok: true, message: Some(message.into()), ..Default::default() }
    }
    pub fn err(e: impl std::fmt::Display) -> Self {
        Self { ok: false, error: Some(e.to_string()), ..Default::default() }
    }
}

/// Sends one request to the agent listening on `socket`.
pub fn call(socket: &Path, req: &Request, timeout: Duration) -> Result<Response> {
    let mut s = UnixStream::connect(socket).with_context(|| {
        format!("cannot reach the agent at {} (is `tandem agent` running for this node?)", socket.display())
    })?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(req)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut resp = String::new();
    BufReader::new(&s)
        .read_line(&mut resp)
        .with_context(|| format!("no answer from the agent at {}", socket.display()))?;
    if resp.is_empty() {
        return Err(anyhow!("the agent at {} closed the connection without answering", socket.display()));
    }
    serde_json::from_str(&resp).with_context(|| format!("unreadable answer from the agent: {resp:?}"))
}
