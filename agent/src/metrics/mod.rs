//! The metrics endpoint: `GET /metrics` over HTTP/1.1 on the node's `metrics` address, in
//! the Prometheus text format (see [`exposition`]).
//!
//! Whatever arrives on the port is untrusted and must never hold up the agent: each
//! connection is served on its own task; a request's head must arrive within
//! [`HEAD_TIMEOUT`] and fit in [`MAX_HEAD`] bytes (hyper answers malformed requests with
//! 400 and closes); a connection lives at most [`CONNECTION_LIFETIME`]; beyond
//! [`MAX_CONNECTIONS`] at once, new connections are closed at once rather than queued, so a
//! flood of slow clients costs file descriptors for a few seconds and nothing else. Status
//! is read without waiting for any lock a role change holds.

pub mod exposition;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::daemon::Agent;

/// A request's line and headers must arrive within this time...
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// ...and fit in this many bytes (hyper's smallest read buffer).
pub const MAX_HEAD: usize = 8192;
/// A connection, however busy, is closed after this long (Prometheus opens a new one).
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// Connections served at once; more are closed on arrival.
pub const MAX_CONNECTIONS: usize = 64;

pub struct MetricsServer {
    listener: TcpListener,
    addr: SocketAddr,
}

impl MetricsServer {
    pub async fn bind(addr: SocketAddr) -> Result<Self> {
        let listener = TcpListener::bind(addr).await.with_context(|| {
            format!("cannot serve metrics on {addr} (node.metrics): is another process using the port?")
        })?;
        let addr = listener.local_addr()?;
        Ok(Self { listener, addr })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub async fn serve(self, agent: Arc<Agent>) {
        info!(address = %self.addr, "serving metrics on http://{}/metrics", self.addr);
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            let (stream, from) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        // Out of file descriptors, typically: wait instead of spinning.
                        warn!(address = %self.addr, "metrics accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = agent.shutdown.cancelled() => return,
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                debug!(client = %from, "metrics: too many connections, closing this one");
                drop(stream);
                continue;
            };
            let agent = agent.clone();
            tokio::spawn(async move {
                let _slot = slot;
                let service = hyper::service::service_fn(move |req| {
                    let agent = agent.clone();
                    async move { Ok::<_, Infallible>(answer(&agent, &req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEAD_TIMEOUT)
                    .max_buf_size(MAX_HEAD)
                    .serve_connection(TokioIo::new(stream), service);
                match tokio::time::timeout(CONNECTION_LIFETIME, conn).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => debug!(client = %from, "metrics connection ended: {e}"),
                    Err(_) => {
                        debug!(client = %from, "metrics connection closed after {CONNECTION_LIFETIME:?}")
                    }
                }
            });
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    r
}

fn answer(agent: &Agent, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(StatusCode::METHOD_NOT_ALLOWED, "only GET /metrics is served\n");
        r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/metrics" => {
            let body = exposition::encode(agent.scrape());
            let mut r = text(StatusCode::OK, body);
            r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(exposition::CONTENT_TYPE));
            r
        }
        "/" => text(StatusCode::OK, "Tandem agent: metrics at /metrics\n"),
        other => text(StatusCode::NOT_FOUND, format!("no {other:?} here: metrics are at /metrics\n")),
    }
}
