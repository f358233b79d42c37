//! Binding a module's listeners and the accept loop that feeds its relay.
//!
//! Listeners are bound synchronously by the supervisor (so a busy port is known at once and can
//! be probed away from), then handed to the relay. The accept loop is the daemon's bounded one
//! (`crate::accept`): a permit is taken *before* accepting, so a connection flood waits in the
//! kernel's backlog instead of growing memory; the permit travels with the connection until the
//! relay decides. What is the relay's own is here: client socket options, the transport
//! handshake, and the budget of refusal log lines.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::accept::{self, ConnectionLimit};
use crate::transport::{Accepted, Transport};

/// Kernel backlog of each listener.
const LISTEN_BACKLOG: i32 = 128;
/// Refused connections logged one by one per window and module; beyond that they are counted
/// and summed up in one line when the window is over (a flood must not flood the journal).
const REFUSAL_LOG_BURST: u32 = 10;
const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(1);

/// The budget of refusal log lines of one module's listeners.
#[derive(Default)]
struct RefusalLog {
    state: std::sync::Mutex<RefusalWindow>,
}

#[derive(Default)]
struct RefusalWindow {
    start: Option<tokio::time::Instant>,
    logged: u32,
    suppressed: u64,
}

impl RefusalLog {
    /// Whether this refusal may be logged on its own; emits the summary of the last window.
    fn admit(&self) -> bool {
        let now = tokio::time::Instant::now();
        let mut w = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if w.start
            .is_none_or(|s| now.duration_since(s) >= REFUSAL_LOG_WINDOW)
        {
            if w.suppressed > 0 {
                tracing::warn!(
                    event = "client-refused",
                    refused_unlogged = w.suppressed,
                    "{} more connections refused in {:?} (not logged one by one: at most {REFUSAL_LOG_BURST} per {REFUSAL_LOG_WINDOW:?})",
                    w.suppressed,
                    now.duration_since(w.start.unwrap_or(now))
                );
            }
            *w = RefusalWindow {
                start: Some(now),
                logged: 0,
                suppressed: 0,
            };
        }
        if w.logged < REFUSAL_LOG_BURST {
            w.logged += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }
}

/// Binds `port` on every address of `addrs`. Fails if any address cannot be bound, so a
/// module is either reachable on all configured addresses or not started; an IPv6 address on
/// a host without IPv6 is skipped with a warning instead.
pub(crate) fn bind_all(addrs: &[IpAddr], port: u16) -> io::Result<Vec<std::net::TcpListener>> {
    let mut out = Vec::with_capacity(addrs.len());
    for addr in addrs {
        match bind_one(SocketAddr::new(*addr, port)) {
            Ok(l) => out.push(l),
            Err(e)
                if addr.is_ipv6()
                    && matches!(
                        e.raw_os_error(),
                        Some(libc::EAFNOSUPPORT) | Some(libc::EADDRNOTAVAIL)
                    ) =>
            {
                tracing::warn!(%addr, port, "IPv6 is not available here, not listening on {addr}: {e}");
            }
            Err(e) => return Err(e),
        }
    }
    if out.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::AddrNotAvailable,
            "none of the listen addresses could be bound",
        ));
    }
    Ok(out)
}

fn bind_one(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        // So "0.0.0.0" and "::" can both be listed without colliding.
        socket.set_only_v6(true)?;
    }
    // Rebinding right after an unplug must not wait for TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.set_cloexec(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket.into())
}

/// Socket options for a client connection: no Nagle delay, keepalive for half-open peers.
fn tune_client(tcp: &TcpStream, keepalive: Duration) {
    let _ = tcp.set_nodelay(true);
    if !keepalive.is_zero() {
        let ka = TcpKeepalive::new()
            .with_time(keepalive)
            .with_interval(keepalive / 4 + Duration::from_secs(1))
            .with_retries(4);
        let _ = SockRef::from(tcp).set_tcp_keepalive(&ka);
    }
}

/// A connection that passed the transport, with the permit it holds until the relay decides.
pub(crate) struct Incoming {
    pub(crate) client: Accepted,
    pub(crate) _permit: OwnedSemaphorePermit,
}

/// Accept settings.
#[derive(Clone)]
pub(crate) struct AcceptConfig {
    pub(crate) transport: Transport,
    pub(crate) keepalive: Duration,
    pub(crate) max_pending: usize,
    /// Time a transport handshake may take (`limits.handshake_timeout_ms`; plain is immediate).
    pub(crate) handshake_timeout: Duration,
}

/// Runs one accept loop per listener until `cancel` (the bounded loop of `crate::accept`, all
/// listeners sharing one limit of `max_pending`); connections that pass the transport are sent
/// to `tx`. Tasks are tracked by `tracker`.
pub(crate) fn spawn_acceptors(
    listeners: Vec<std::net::TcpListener>,
    cfg: AcceptConfig,
    tx: mpsc::Sender<Incoming>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) -> io::Result<()> {
    let limit = ConnectionLimit::new(cfg.max_pending);
    let refusals = Arc::new(RefusalLog::default());
    let mut tokio_listeners = Vec::with_capacity(listeners.len());
    for l in listeners {
        tokio_listeners.push(TcpListener::from_std(l)?);
    }
    for listener in tokio_listeners {
        let (cfg, tx, conn_cancel, refusals) =
            (cfg.clone(), tx.clone(), cancel.clone(), refusals.clone());
        // No time limit here: the transport bounds its handshake, and then the relay decides.
        accept::spawn_bounded(
            "module port",
            listener,
            limit.clone(),
            None,
            cancel.clone(),
            tracker,
            move |tcp, peer, permit| {
                tune_client(&tcp, cfg.keepalive);
                let (transport, tx, cancel) =
                    (cfg.transport.clone(), tx.clone(), conn_cancel.clone());
                let handshake_timeout = cfg.handshake_timeout;
                let refusals = refusals.clone();
                async move {
                    let accepted = tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = transport.accept(tcp, peer, handshake_timeout) => r,
                    };
                    match accepted {
                        Ok(client) => {
                            let _ = tx
                                .send(Incoming {
                                    client,
                                    _permit: permit,
                                })
                                .await;
                        }
                        Err(e) => {
                            drop(permit);
                            if refusals.admit() {
                                tracing::warn!(peer_addr = %peer, client_name = e.client_name().unwrap_or(""),
                                    event = "client-refused", "client refused: {e}");
                            }
                        }
                    }
                }
            },
        );
    }
    Ok(())
}
