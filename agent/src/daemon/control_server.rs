//! Serves the control socket: status and role changes for the CLI, and the event stream
//! (`tandem events`): after an `events` request the connection carries record lines only,
//! written by its own task, so a slow or stuck reader holds up nothing but itself.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::broadcast::error::RecvError;
use tracing::warn;

use super::resource::Resource;
use super::Agent;
use crate::control::{Request, Response, SnapshotOp};
use crate::events::Record;

pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
}

impl ControlServer {
    pub fn bind(path: &Path) -> Result<Self> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        }
        if path.exists() {
            // A live agent answers on it; a dead one left the file behind.
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                anyhow::bail!("another agent is already listening on {}", path.display());
            }
            std::fs::remove_file(path).with_context(|| format!("cannot remove stale {}", path.display()))?;
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("cannot listen on control socket {}", path.display()))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
        Ok(Self { listener, path: path.to_path_buf() })
    }

    pub async fn serve(self, agent: Arc<Agent>) {
        loop {
            tokio::select! {
                r = self.listener.accept() => match r {
                    Ok((s, _)) => { tokio::spawn(handle(agent.clone(), s)); }
                    Err(e) => warn!(socket = %self.path.display(), "control socket accept failed: {e}"),
                },
                _ = agent.shutdown.cancelled() => return,
            }
        }
    }
}

async fn handle(agent: Arc<Agent>, s: UnixStream) {
    let (r, mut w) = s.into_split();
    let mut lines = BufReader::new(r).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        match serde_json::from_str::<Request>(&line) {
            Ok(Request::Events { resource }) => return stream_events(&agent, resource, lines, w).await,
            Ok(Request::Restart) => {
                // Answered before the restart begins: the exec ends this connection.
                let checked = agent.check_restart();
                let resp = match &checked {
                    Ok(m) => Response::ok(m),
                    Err(e) => Response::err(format!("{e:#}")),
                };
                let _ = w.write_all(line_of(&resp).as_bytes()).await;
                let _ = w.flush().await;
                if checked.is_ok() {
                    agent.trigger_restart();
                }
                return;
            }
            _ => {}
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => dispatch(&agent, req).await,
            Err(e) => Response::err(format!("malformed request: {e}")),
        };
        if w.write_all(line_of(&resp).as_bytes()).await.is_err() {
            return;
        }
    }
}

fn line_of<T: serde::Serialize>(v: &T) -> String {
    let mut out = serde_json::to_string(v).unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}"));
    out.push('\n');
    out
}

fn no_such_resource(agent: &Agent, name: &str) -> String {
    format!(
        "no resource {name:?} on node {} (resources: {})",
        agent.me.name,
        agent.resources.keys().cloned().collect::<Vec<_>>().join(", ")
    )
}

/// Serves one `tandem events` reader: the answer, the current state, then every record
/// as it is published, until the reader goes away, falls behind (one `lost` record, then
/// the end: it never holds the bus back) or the agent stops.
async fn stream_events(
    agent: &Arc<Agent>,
    only: Option<String>,
    mut from_client: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    mut w: tokio::net::unix::OwnedWriteHalf,
) {
    if let Some(name) = only.as_deref().filter(|n| !agent.resources.contains_key(*n)) {
        let _ = w.write_all(line_of(&Response::err(no_such_resource(agent, name))).as_bytes()).await;
        return;
    }
    let (mut rx, dump) = agent.subscribe_events(only.as_deref());
    let mut out = line_of(&Response::ok("events follow"));
    for r in &dump {
        out += &line_of(r);
    }
    let write = async {
        w.write_all(out.as_bytes()).await?;
        loop {
            let line = match rx.recv().await {
                Ok(r) if only.as_deref().is_some_and(|o| r.resource().is_some_and(|n| n != o)) => continue,
                Ok(r) => line_of(&*r),
                Err(RecvError::Lagged(n)) => {
                    warn!(lost = n, "an events reader fell behind; ending its stream");
                    w.write_all(line_of(&Record::lost(n)).as_bytes()).await?;
                    return Ok(());
                }
                Err(RecvError::Closed) => return Ok(()),
            };
            w.write_all(line.as_bytes()).await?;
        }
    };
    tokio::select! {
        r = write => { let _: std::io::Result<()> = r; }
        // The reader closed its end (or sent something: it has no business to).
        _ = from_client.next_line() => {}
        _ = agent.shutdown.cancelled() => {}
    }
}

async fn dispatch(agent: &Arc<Agent>, req: Request) -> Response {
    let resource =
        |name: &str| agent.resources.get(name).cloned().ok_or_else(|| no_such_resource(agent, name));
    match req {
        Request::Status => Response { ok: true, status: Some(agent.status()), ..Default::default() },
        Request::Events { .. } => Response::err("events is a stream; it is served by itself"),
        Request::Restart => Response::err("restart is served by itself"),
        Request::Promote { resource: name, force } => {
            run(resource(&name), |r| async move { r.promote(force).await }).await
        }
        Request::Demote { resource: name } => run(resource(&name), |r| async move { r.demote().await }).await,
        Request::Invalidate { resource: name, checksum } => {
            run(resource(&name), |r| async move { r.invalidate(checksum) }).await
        }
        Request::Connect { resource: name } => {
            let agent = agent.clone();
            run(resource(&name), |r| async move {
                if r.is_down() {
                    anyhow::bail!("{name} is down on this node: `tandem up {name}` puts it back in service");
                }
                let msg = r.admin_connect();
                // A peer not reached yet is dialled now, not after the back-off.
                agent.redial.notify_waiters();
                Ok(msg)
            })
            .await
        }
        Request::Disconnect { resource: name } => {
            run(resource(&name), |r| async move { Ok(r.admin_disconnect()) }).await
        }
        Request::Resolve { resource: name, discard_local } => {
            let agent = agent.clone();
            run(resource(&name), |r| async move {
                if !discard_local {
                    anyhow::bail!(
                        "resolve needs --discard-local: run it on the node whose changes are to be discarded"
                    );
                }
                let msg = r.resolve_discard_local()?;
                agent.redial.notify_waiters();
                Ok(msg)
            })
            .await
        }
        Request::Down { resource: name } => run(resource(&name), |r| async move { r.down().await }).await,
        Request::Up { resource: name } => {
            let agent = agent.clone();
            run(resource(&name), |r| async move {
                let msg = r.up();
                agent.redial.notify_waiters();
                Ok(msg)
            })
            .await
        }
        Request::PeerLost { peer } => match agent.peer_lost(&peer) {
            Ok(m) => Response::ok(m),
            Err(e) => Response::err(format!("{e:#}")),
        },
        Request::Snapshot { resource: name, op } => match resource(&name) {
            Err(e) => Response::err(e),
            Ok(r) => snapshot(&r, op).await.unwrap_or_else(|e| Response::err(format!("{e:#}"))),
        },
        Request::Resync { resource: name } => {
            run(resource(&name), |r| async move { r.request_resync() }).await
        }
        Request::Verify { resource: name, repair } => match resource(&name) {
            Err(e) => Response::err(e),
            Ok(r) => match r.verify(repair).await {
                Err(e) => Response::err(format!("{e:#}")),
                Ok(reports) => {
                    let total: u64 = reports.iter().map(|r| r.differing_bytes).sum();
                    let msg = if total == 0 {
                        format!("{name}: no differences")
                    } else {
                        format!(
                            "{name}: {total} bytes differ{}",
                            if repair {
                                "; resync started"
                            } else {
                                "; marked out of sync (run `tandem resync`)"
                            }
                        )
                    };
                    Response { ok: true, message: Some(msg), verify: Some(reports), ..Default::default() }
                }
            },
        },
    }
}

async fn snapshot(r: &Arc<Resource>, op: SnapshotOp) -> anyhow::Result<Response> {
    Ok(match op {
        SnapshotOp::Create { name } => Response::ok(r.snapshot_create(name).await?.name),
        SnapshotOp::List => Response { ok: true, snapshots: Some(r.snapshot_list()), ..Default::default() },
        SnapshotOp::Delete { name } => Response::ok(r.snapshot_delete(&name).await?),
        SnapshotOp::Expose { name, overlay } => {
            let devices = r.snapshot_expose(&name, overlay).await?;
            let msg = devices.iter().map(|(_, d)| d.as_str()).collect::<Vec<_>>().join(" ");
            Response { ok: true, message: Some(msg), devices: Some(devices), ..Default::default() }
        }
        SnapshotOp::Unexpose { name } => Response::ok(r.snapshot_unexpose(&name).await?),
        SnapshotOp::Restore { name } => Response::ok(r.snapshot_restore(&name).await?),
    })
}

async fn run<F, Fut>(res: Result<Arc<Resource>, String>, f: F) -> Response
where
    F: FnOnce(Arc<Resource>) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<String>>,
{
    match res {
        Err(e) => Response::err(e),
        Ok(r) => match f(r).await {
            Ok(m) => Response::ok(m),
            Err(e) => Response::err(format!("{e:#}")),
        },
    }
}
