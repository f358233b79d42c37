//! The control socket: a unix stream socket (0660) where `lucidgate status` (and later
//! `reload`) ask the running daemon. One JSON request line, one JSON answer line.
//!
//! This module alone owns the socket file: [`bind`] creates it (replacing a stale one) and sets
//! its mode, and it is removed when the [`ControlSocket`] is dropped, which the server does when
//! it stops. Connections are taken in by the bounded accept loop of `accept.rs`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::{self, ConnectionLimit};
use crate::status::StatusReport;

/// Longest request line accepted.
const MAX_REQUEST_BYTES: usize = 4096;
/// A control client must send its request and take its answer within this time.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(5);

/// What a control client may ask.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case", deny_unknown_fields)]
pub(crate) enum Command {
    Status,
    /// Re-read the PKI (after `lucidgate cert ...` changed it).
    ReloadPki,
    /// Re-read the config and reconcile (as SIGHUP).
    Reload,
}

/// What the daemon answers; JSON only on the socket ([`Reply::to_json`], [`Reply::from_json`]).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Reply {
    Status(Box<StatusReport>),
    /// The config was re-read: what is served now, with notes on what waits for a restart.
    Reloaded(String),
    Ok,
    /// Refused or failed: what the client is told.
    Refused(String),
}

impl Reply {
    /// The wire form: one JSON object.
    fn to_json(&self) -> serde_json::Value {
        match self {
            Reply::Status(r) => serde_json::to_value(r).unwrap_or_else(
                |e| serde_json::json!({ "error": format!("cannot encode the status: {e}") }),
            ),
            Reply::Reloaded(summary) => serde_json::json!({ "ok": true, "status": summary }),
            Reply::Ok => serde_json::json!({ "ok": true }),
            Reply::Refused(why) => serde_json::json!({ "error": why }),
        }
    }

    /// Reads the wire form of the answer to `command`.
    fn from_json(command: &Command, value: serde_json::Value) -> Result<Reply, String> {
        if let Some(err) = value.get("error").and_then(|e| e.as_str()) {
            return Ok(Reply::Refused(err.to_string()));
        }
        Ok(match command {
            Command::Status => Reply::Status(Box::new(
                serde_json::from_value(value).map_err(|e| format!("not a status report: {e}"))?,
            )),
            Command::Reload => {
                Reply::Reloaded(value["status"].as_str().unwrap_or("reloaded").to_string())
            }
            Command::ReloadPki => Reply::Ok,
        })
    }
}

/// A request handed to the supervisor, with where to send the answer.
pub(crate) struct Request {
    pub(crate) command: Command,
    pub(crate) reply: oneshot::Sender<Answer>,
}

/// The supervisor's answer: a reply now, or one that comes when the PKI task has re-read the
/// PKI (the client's task waits for it, not the supervisor).
pub(crate) enum Answer {
    Now(Reply),
    AfterPkiRefresh(oneshot::Receiver<Result<(), String>>),
}

/// The bound control socket: its listener and its file. The file lives as long as the
/// listener: it is removed when the server stops (or when the socket is dropped unserved, e.g.
/// the daemon fails to start after binding it), and by nothing else.
pub(crate) struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        // While the listener is still open (fields drop after this): a daemon starting now finds
        // our socket live (and stops) or no file at all; never a stale file it would replace and
        // then lose to this removal.
        let _ = std::fs::remove_file(&self.path);
    }
}

impl accept::Listener for ControlSocket {
    type Stream = UnixStream;
    type Peer = tokio::net::unix::SocketAddr;
    fn accept(&self) -> impl Future<Output = std::io::Result<(UnixStream, Self::Peer)>> + Send {
        self.listener.accept()
    }
}

/// Binds the control socket (0660). A stale socket file (no daemon behind it) is replaced; a
/// live one means another lucidgate is running, which is an error.
pub(crate) async fn bind(path: &Path) -> Result<ControlSocket> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| {
            format!(
                "creating {} for the control socket (run as root, or set control_socket in the config)",
                dir.display()
            )
        })?;
    }
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            anyhow::bail!(
                "another lucidgate is already running (its control socket {} answers); stop it first",
                path.display()
            );
        }
        std::fs::remove_file(path)
            .with_context(|| format!("removing stale control socket {}", path.display()))?;
    }
    let socket = ControlSocket {
        listener: UnixListener::bind(path)
            .with_context(|| format!("binding control socket {}", path.display()))?,
        path: path.to_path_buf(),
    };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))?;
    Ok(socket)
}

/// Serves control clients until `cancel`, at most `max_clients` at once, each within
/// [`CONTROL_TIMEOUT`]; the socket file is removed when it stops.
pub(crate) fn spawn_server(
    socket: ControlSocket,
    to_supervisor: mpsc::Sender<Request>,
    max_clients: usize,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) {
    accept::spawn_bounded(
        "control socket",
        socket,
        ConnectionLimit::new(max_clients),
        Some(CONTROL_TIMEOUT),
        cancel,
        tracker,
        move |stream, _peer, permit| handle(stream, to_supervisor.clone(), permit),
    );
}

/// Serves one control client; `_permit` counts it against the limit until it is done.
async fn handle(stream: UnixStream, tx: mpsc::Sender<Request>, _permit: OwnedSemaphorePermit) {
    let (rd, mut wr) = stream.into_split();
    let mut line = Vec::new();
    let mut reader = BufReader::new(rd).take(MAX_REQUEST_BYTES as u64 + 1);
    let shutting_down = || Reply::Refused("daemon is shutting down".into());
    let answer = match reader.read_until(b'\n', &mut line).await {
        Err(e) => Reply::Refused(format!("reading request: {e}")),
        Ok(_) => match parse_request(&line) {
            Err(e) => Reply::Refused(e.to_string()),
            Ok(command) => {
                let (reply, rx) = oneshot::channel();
                if tx.send(Request { command, reply }).await.is_err() {
                    shutting_down()
                } else {
                    match rx.await {
                        Ok(Answer::Now(reply)) => reply,
                        Ok(Answer::AfterPkiRefresh(done)) => match done.await {
                            Ok(Ok(())) => Reply::Ok,
                            Ok(Err(e)) => Reply::Refused(format!("re-reading the PKI failed: {e}")),
                            Err(_) => shutting_down(),
                        },
                        Err(_) => shutting_down(),
                    }
                }
            }
        },
    };
    let mut out = serde_json::to_vec(&answer.to_json()).unwrap_or_default();
    out.push(b'\n');
    let _ = wr.write_all(&out).await;
    let _ = wr.shutdown().await;
}

/// A request line that is not a command; its message is what the client is told.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RequestError {
    #[error("request longer than {MAX_REQUEST_BYTES} bytes")]
    TooLong,
    #[error("bad request: {0}; send one JSON line such as {{\"cmd\":\"status\"}}")]
    Json(serde_json::Error),
}

/// Parses one request line of the control protocol (a JSON object such as
/// `{"cmd":"status"}`, at most [`MAX_REQUEST_BYTES`]).
pub(crate) fn parse_request(line: &[u8]) -> Result<Command, RequestError> {
    if line.len() > MAX_REQUEST_BYTES {
        return Err(RequestError::TooLong);
    }
    serde_json::from_slice::<Command>(line).map_err(RequestError::Json)
}

/// Sends `command` to the daemon at `path` and returns its answer; a refusal is an error that
/// says why.
pub(crate) async fn ask(path: &Path, command: &Command) -> Result<Reply> {
    let stream = match UnixStream::connect(path).await {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            anyhow::bail!("{}", permission_hint(path, &e))
        }
        Err(e) => anyhow::bail!(
            "lucidgate is not running (cannot connect to its control socket {}: {e}); start it with `lucidgate serve` or `systemctl start lucidgate`, or pass --config/--socket if it uses another socket",
            path.display()
        ),
    };
    let (rd, mut wr) = stream.into_split();
    let mut req = serde_json::to_vec(command)?;
    req.push(b'\n');
    let exchange = async {
        wr.write_all(&req).await?;
        let mut line = String::new();
        BufReader::new(rd).read_line(&mut line).await?;
        Ok::<_, std::io::Error>(line)
    };
    let line = tokio::time::timeout(CONTROL_TIMEOUT, exchange)
        .await
        .context("the daemon did not answer in time")?
        .with_context(|| format!("talking to {}", path.display()))?;
    let value: serde_json::Value =
        serde_json::from_str(&line).context("the daemon's answer is not JSON")?;
    match Reply::from_json(command, value)
        .map_err(|e| anyhow::anyhow!("the daemon's answer: {e}"))?
    {
        Reply::Refused(err) => anyhow::bail!("the daemon refused the request: {err}"),
        reply => Ok(reply),
    }
}

/// What to tell a user the socket (or its directory) refuses: it is there, the daemon may well
/// run, and the group that owns it is the way in.
fn permission_hint(path: &Path, e: &std::io::Error) -> String {
    use std::os::unix::fs::MetadataExt;
    // The socket itself, or else the first directory above it that we can see.
    let owner_gid = path
        .ancestors()
        .find_map(|p| std::fs::metadata(p).ok().map(|m| m.gid()));
    let group = owner_gid
        .and_then(|gid| nix::unistd::Group::from_gid(gid.into()).ok().flatten())
        .map(|g| g.name)
        .unwrap_or_else(|| "lucidgate".into());
    let user = nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .unwrap_or_else(|| "USER".into());
    format!(
        "permission denied on the control socket {} ({e}): it is open to root and members of group {group}; add yourself with `sudo adduser {user} {group}` and log in again, or use sudo",
        path.display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_keep_their_wire_form() {
        let report = StatusReport {
            version: "0.1.0".into(),
            pid: 7,
            tasks: 3,
            modules: vec![],
        };
        let cases = [
            (Command::Status, Reply::Status(Box::new(report))),
            (Command::Reload, Reply::Reloaded("1 modules served".into())),
            (Command::ReloadPki, Reply::Ok),
            (
                Command::Reload,
                Reply::Refused("reload refused: bad".into()),
            ),
        ];
        for (command, reply) in cases {
            assert_eq!(
                Reply::from_json(&command, reply.to_json()).unwrap(),
                reply,
                "{command:?}"
            );
        }
        // What clients of the socket (scripts, older CLIs) read.
        assert_eq!(
            Reply::Reloaded("s".into()).to_json(),
            serde_json::json!({ "ok": true, "status": "s" })
        );
        assert_eq!(
            Reply::Refused("no".into()).to_json(),
            serde_json::json!({ "error": "no" })
        );
        assert!(Reply::from_json(&Command::Status, serde_json::json!({ "ok": true })).is_err());
    }

    #[test]
    fn commands_parse_strictly() {
        assert_eq!(
            serde_json::from_str::<Command>(r#"{"cmd":"status"}"#).unwrap(),
            Command::Status
        );
        for bad in [r#"{"cmd":"shutdown"}"#, "status", "", "{}"] {
            assert!(serde_json::from_str::<Command>(bad).is_err(), "{bad}");
        }
    }
}
