//! The optional OpenMetrics (Prometheus) endpoint: `GET /metrics` on `[metrics] listen`.
//!
//! A deliberately small HTTP/1.x responder (one request per connection, then close) instead of
//! an HTTP stack: the endpoint serves one read-only page from the same status the control socket
//! gives, and a full HTTP server would add more to the daemon's memory than every other feature.
//! Requests are bounded in size, time and number at once.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::accept::{self, ConnectionLimit};
use crate::control::{Answer, Command, Reply, Request};
use crate::status::{ModuleStatus, StatusReport};

/// Largest request head read (a scraper sends a few hundred bytes).
const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// A scrape must be sent and answered within this time.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; more wait in the kernel's backlog.
const MAX_SCRAPES: usize = 4;

/// Binds `addr` and serves `/metrics` until `cancel`.
pub(crate) async fn spawn(
    addr: SocketAddr,
    to_supervisor: mpsc::Sender<Request>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics endpoint on {addr} ([metrics] listen)"))?;
    if !addr.ip().is_loopback() {
        warn!(
            "the metrics endpoint on {addr} is reachable from the network; it shows module serials and client names (use 127.0.0.1 unless a scraper elsewhere needs it)"
        );
    }
    info!(
        event = "metrics-listening",
        "OpenMetrics on http://{addr}/metrics"
    );
    accept::spawn_bounded(
        "metrics endpoint",
        listener,
        ConnectionLimit::new(MAX_SCRAPES),
        Some(REQUEST_TIMEOUT),
        cancel,
        tracker,
        move |stream, _peer, permit| handle(stream, to_supervisor.clone(), permit),
    );
    Ok(())
}

/// Serves one scrape; `_permit` counts it against [`MAX_SCRAPES`] until it is done.
async fn handle(mut stream: TcpStream, tx: mpsc::Sender<Request>, _permit: OwnedSemaphorePermit) {
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && !head.windows(2).any(|w| w == b"\n\n") {
        if head.len() > MAX_REQUEST_HEAD {
            return respond(
                &mut stream,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request head too large\n",
            )
            .await;
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&chunk[..n]),
        }
    }
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    if method != "GET" {
        return respond(
            &mut stream,
            "405 Method Not Allowed",
            "text/plain",
            "only GET\n",
        )
        .await;
    }
    if path != "/metrics" && !path.starts_with("/metrics?") {
        return respond(&mut stream, "404 Not Found", "text/plain", "see /metrics\n").await;
    }
    let (reply, rx) = oneshot::channel();
    let status = if tx
        .send(Request {
            command: Command::Status,
            reply,
        })
        .await
        .is_ok()
    {
        match rx.await {
            Ok(Answer::Now(Reply::Status(report))) => Some(*report),
            _ => None,
        }
    } else {
        None
    };
    match status {
        Some(s) => {
            respond(
                &mut stream,
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &render(&s),
            )
            .await
        }
        None => {
            respond(
                &mut stream,
                "503 Service Unavailable",
                "text/plain",
                "daemon is shutting down\n",
            )
            .await
        }
    }
}

async fn respond(stream: &mut TcpStream, status: &str, ctype: &str, body: &str) {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes()).await;
    let _ = stream.write_all(body.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Escapes a label value (backslash, quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The status as OpenMetrics text.
fn render(s: &StatusReport) -> String {
    let mut out = String::new();
    let mut family = |name: &str, kind: &str, help: &str, rows: Vec<(String, u64)>| {
        let _ = writeln!(out, "# TYPE lucidgate_{name} {kind}");
        let _ = writeln!(out, "# HELP lucidgate_{name} {help}");
        let suffix = if kind == "counter" { "_total" } else { "" };
        for (labels, v) in rows {
            let _ = writeln!(out, "lucidgate_{name}{suffix}{{{labels}}} {v}");
        }
    };
    let module = |m: &ModuleStatus| {
        let class = m
            .identity
            .as_ref()
            .map(|i| i.class.as_str())
            .unwrap_or(m.model.as_str());
        format!(
            "serial=\"{}\",class=\"{}\",port=\"{}\"",
            label(&m.serial),
            label(class),
            m.port.map(|p| p.to_string()).unwrap_or_default()
        )
    };
    let served: Vec<_> = s.modules.iter().filter(|m| m.state == "serving").collect();
    let each = |f: &dyn Fn(&ModuleStatus) -> u64| -> Vec<(String, u64)> {
        served.iter().map(|m| (module(m), f(m))).collect()
    };
    let metric = |m: &ModuleStatus, f: &dyn Fn(&crate::relay::metrics::MetricsSnapshot) -> u64| {
        m.metrics.as_ref().map(f).unwrap_or(0)
    };
    family(
        "module_up",
        "gauge",
        "1 while the module is served.",
        each(&|_| 1),
    );
    family(
        "clients",
        "gauge",
        "Clients connected now.",
        each(&|m| m.clients as u64),
    );
    family(
        "sessions",
        "counter",
        "Client sessions since the relay started.",
        each(&|m| m.sessions),
    );
    family(
        "refused_clients",
        "counter",
        "Clients refused (policy or limit).",
        each(&|m| m.refused),
    );
    family(
        "refused_address",
        "counter",
        "Connections refused by allow_from, before any handshake.",
        each(&|m| m.refused_address),
    );
    family(
        "requests",
        "counter",
        "Request frames sent to the module.",
        each(&|m| metric(m, &|x| x.requests)),
    );
    family(
        "timeouts",
        "counter",
        "Requests the module did not answer in time (protocol-aware modes).",
        each(&|m| metric(m, &|x| x.timeouts)),
    );
    family(
        "denied_writes",
        "counter",
        "Writes from read-only clients answered locally.",
        each(&|m| metric(m, &|x| x.denied_writes)),
    );
    family(
        "bad_frames",
        "counter",
        "Clients cut off for sending non-protocol bytes.",
        each(&|m| metric(m, &|x| x.bad_frames)),
    );
    let mut answers = Vec::new();
    for m in &served {
        if let Some(x) = &m.metrics {
            answers.push((format!("{},status=\"0x00\"", module(m)), x.answers_ok));
            for (st, n) in &x.answer_errors {
                answers.push((format!("{},status=\"{}\"", module(m), label(st)), *n));
            }
        }
    }
    family(
        "answers",
        "counter",
        "Answers from the module by status code.",
        answers,
    );
    let mut bytes = Vec::new();
    for m in &served {
        bytes.push((format!("{},direction=\"up\"", module(m)), m.bytes_up));
        bytes.push((format!("{},direction=\"down\"", module(m)), m.bytes_down));
    }
    family(
        "bytes",
        "counter",
        "Bytes relayed (up: client to module).",
        bytes,
    );
    out.push_str("# EOF\n");
    out
}
