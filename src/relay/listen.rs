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
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

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
    if let SocketAddr::V6(v6) = addr {
        // So "0.0.0.0" and "::" can both be listed without colliding. An IPv4-mapped address
        // (`::ffff:127.0.0.1`) is the exception: it is reached over IPv4, so dual-stack.
        socket.set_only_v6(v6.ip().to_ipv4_mapped().is_none())?;
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
    /// Client addresses admitted (`allow_from`); `None`: every address.
    pub(crate) allow_from: Option<Arc<[ipnet::IpNet]>>,
    /// Counts the connections `allow_from` turned away (status, metrics).
    pub(crate) refused_address: Arc<AtomicU64>,
    /// The module's span: refusals are logged with its serial and port.
    pub(crate) span: tracing::Span,
}

/// Whether `peer` may connect under `allow_from`. An IPv4-mapped IPv6 peer (`::ffff:a.b.c.d`,
/// from a dual-stack socket) is matched as the IPv4 address it is.
pub(crate) fn admitted(allow_from: Option<&[ipnet::IpNet]>, peer: IpAddr) -> bool {
    let peer = peer.to_canonical();
    allow_from.is_none_or(|nets| nets.iter().any(|n| n.contains(&peer)))
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
                // Before any handshake: an address that may not connect costs no TLS work.
                let allowed = admitted(cfg.allow_from.as_deref(), peer.ip());
                if !allowed {
                    cfg.refused_address.fetch_add(1, Ordering::Relaxed);
                    if refusals.admit() {
                        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
                        cfg.span.in_scope(|| {
                            tracing::warn!(peer_addr = %peer, event = "client-refused",
                                "client {peer} refused: its address is not in allow_from");
                        });
                    }
                }
                tune_client(&tcp, cfg.keepalive);
                let (transport, tx, cancel) =
                    (cfg.transport.clone(), tx.clone(), conn_cancel.clone());
                let handshake_timeout = cfg.handshake_timeout;
                let refusals = refusals.clone();
                let span = cfg.span.clone();
                async move {
                    if !allowed {
                        // Closed at once, before any byte is read or sent; the permit goes with it.
                        drop((tcp, permit));
                        return;
                    }
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
                .instrument(span)
            },
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::admitted;
    use crate::config::parse_net;
    use std::net::IpAddr;

    fn nets(list: &[&str]) -> Vec<ipnet::IpNet> {
        list.iter().map(|s| parse_net(s).unwrap()).collect()
    }

    #[test]
    fn allow_from_admits_exactly_the_listed_networks() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(admitted(None, ip("203.0.113.9")), "no list: every address");
        let list = nets(&["192.168.1.0/24", "127.0.0.1", "::1", "fd00::/8"]);
        let l = Some(list.as_slice());
        for yes in [
            "192.168.1.1",
            "192.168.1.254",
            "127.0.0.1",
            "::1",
            "fd12::7",
            "::ffff:192.168.1.9",
            "::ffff:127.0.0.1",
        ] {
            assert!(admitted(l, ip(yes)), "{yes} should be admitted");
        }
        for no in [
            "192.168.2.1",
            "127.0.0.2",
            "10.0.0.1",
            "::2",
            "fe80::1",
            "::ffff:10.0.0.1",
            "::ffff:192.168.2.1",
        ] {
            assert!(!admitted(l, ip(no)), "{no} should be refused");
        }
        // A v6-only list does not admit IPv4 peers, mapped or not.
        let v6 = nets(&["::/0"]);
        assert!(!admitted(Some(v6.as_slice()), ip("::ffff:10.0.0.1")));
        assert!(admitted(Some(v6.as_slice()), ip("2001:db8::1")));
    }
}
