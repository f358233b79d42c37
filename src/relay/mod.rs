//! A relay: one module's serial port, its listeners and its client policy, in one task.
//!
//! The relay owns its serial port and listeners; cancelling its token (or dropping the daemon)
//! closes clients, listeners and the port. It tells the supervisor how it ended through
//! [`RelayExit`], so an unplug seen as EIO on the port is handled like a udev remove.

pub mod listen;
pub mod pump;
pub mod tty;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, warn};

use crate::config::{ClientPolicy, Limits, TransportKind};
use crate::transport::{Accepted, Transport};
use listen::{AcceptConfig, Incoming};
use pump::{SessionEnd, Traffic};
use tty::Tty;

/// Bytes read from the module while no client is connected are read (so the module never
/// blocks) and discarded, this many at a time.
const DRAIN_BUFFER: usize = 256;
/// How long a closing client gets to take its last bytes (TLS close_notify) before it is cut.
const CLIENT_CLOSE_TIMEOUT: Duration = Duration::from_millis(500);
/// Connections handed from the accept loops to the relay that it has not looked at yet.
const INCOMING_QUEUE: usize = 4;

/// Everything that decides how a module is served. Two equal specs mean a reload need not
/// touch the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelaySpec {
    pub serial: String,
    pub devnode: PathBuf,
    pub fixed_port: Option<u16>,
    pub listen: Vec<IpAddr>,
    pub baud: u32,
    pub policy: ClientPolicy,
    pub transport: TransportKind,
    pub buffer_bytes: usize,
    pub idle_timeout: Option<Duration>,
    pub keepalive: Duration,
    pub max_pending: usize,
}

impl RelaySpec {
    pub fn limits_from(&mut self, limits: &Limits) {
        self.buffer_bytes = limits.buffer_bytes;
        self.idle_timeout =
            (limits.idle_timeout_secs > 0).then(|| Duration::from_secs(limits.idle_timeout_secs));
        self.keepalive = Duration::from_secs(limits.keepalive_secs);
        self.max_pending = limits.max_pending_per_module;
    }
}

/// Live counters of a relay, read by `status`.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub clients: AtomicUsize,
    pub sessions: AtomicU64,
    pub refused: AtomicU64,
    pub traffic: Traffic,
    /// The connected client's address and name, if any.
    pub client: Mutex<Option<String>>,
}

/// Why a relay ended.
#[derive(Debug)]
pub enum ExitReason {
    /// Cancelled by the supervisor or shutdown.
    Stopped,
    /// The serial port failed or hung up: the module is gone (or broken).
    DeviceGone(String),
}

/// Sent to the supervisor when a relay task ends.
#[derive(Debug)]
pub struct RelayExit {
    pub serial: String,
    pub generation: u64,
    pub reason: ExitReason,
}

/// The supervisor's handle on a running relay.
pub struct RelayHandle {
    pub spec: RelaySpec,
    pub port: u16,
    pub generation: u64,
    pub stats: Arc<RelayStats>,
    pub since: std::time::SystemTime,
    cancel: CancellationToken,
    join: tokio::task::JoinHandle<()>,
}

impl RelayHandle {
    /// Stops the relay and waits (up to `timeout`) until its port and device are closed.
    pub async fn stop(self, timeout: Duration) {
        self.cancel.cancel();
        let serial = self.spec.serial.clone();
        if tokio::time::timeout(timeout, self.join).await.is_err() {
            warn!(module_serial = %serial, "relay did not stop within {timeout:?}; abandoned");
        }
    }

    pub fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
}

/// Starts a relay on already-bound listeners and an open serial port.
#[allow(clippy::too_many_arguments)]
pub fn start(
    spec: RelaySpec,
    port: u16,
    generation: u64,
    listeners: Vec<std::net::TcpListener>,
    serial: Tty,
    transport: Transport,
    parent: &CancellationToken,
    tracker: &TaskTracker,
    exits: mpsc::Sender<RelayExit>,
) -> Result<RelayHandle> {
    let cancel = parent.child_token();
    let stats = Arc::new(RelayStats::default());
    let relay_tasks = TaskTracker::new();
    let (tx, rx) = mpsc::channel(INCOMING_QUEUE);
    listen::spawn_acceptors(
        listeners,
        AcceptConfig {
            transport,
            keepalive: spec.keepalive,
            max_pending: spec.max_pending,
        },
        tx,
        cancel.clone(),
        &relay_tasks,
    )
    .context("registering listeners with the runtime")?;
    let span = tracing::info_span!("module", module_serial = %spec.serial, port);
    let relay = Relay {
        spec: spec.clone(),
        serial,
        incoming: rx,
        stats: stats.clone(),
        cancel: cancel.clone(),
    };
    let serial_name = spec.serial.clone();
    let join = tracker.spawn(
        async move {
            let reason = relay.run().await;
            relay_tasks.close();
            relay_tasks.wait().await;
            let _ = exits
                .send(RelayExit {
                    serial: serial_name,
                    generation,
                    reason,
                })
                .await;
        }
        .instrument(span),
    );
    Ok(RelayHandle {
        spec,
        port,
        generation,
        stats,
        since: std::time::SystemTime::now(),
        cancel,
        join,
    })
}

struct Relay {
    spec: RelaySpec,
    serial: Tty,
    incoming: mpsc::Receiver<Incoming>,
    stats: Arc<RelayStats>,
    cancel: CancellationToken,
}

fn describe(c: &Accepted) -> String {
    match &c.name {
        Some(n) => format!("{} ({n})", c.peer),
        None => c.peer.to_string(),
    }
}

impl Relay {
    async fn run(mut self) -> ExitReason {
        // Cancellation drops listeners; dropping `self` closes the serial port.
        let reason = self.serve().await;
        self.cancel.cancel();
        reason
    }

    async fn serve(&mut self) -> ExitReason {
        let mut drain = [0u8; DRAIN_BUFFER];
        let mut next: Option<Incoming> = None;
        loop {
            // Idle: wait for a client, keep reading the port so a hang-up is noticed now.
            let incoming = match next.take() {
                Some(i) => i,
                None => tokio::select! {
                    _ = self.cancel.cancelled() => return ExitReason::Stopped,
                    i = self.incoming.recv() => match i {
                        Some(i) => i,
                        None => return ExitReason::Stopped,
                    },
                    r = self.serial.read(&mut drain) => match r {
                        Ok(0) => return ExitReason::DeviceGone("device hung up".into()),
                        Ok(n) => {
                            tracing::debug!("discarded {n} bytes from the module: no client connected");
                            continue;
                        }
                        Err(e) => return ExitReason::DeviceGone(e.to_string()),
                    },
                },
            };
            match self.session(incoming).await {
                Some(Ok(kicker)) => next = Some(kicker),
                Some(Err(reason)) => return reason,
                None => {}
            }
        }
    }

    /// Serves one client until it leaves. Returns `Some(Ok(next))` when a newer client takes
    /// over (kick-old), `Some(Err(reason))` when the relay must end, `None` to go idle.
    async fn session(&mut self, incoming: Incoming) -> Option<Result<Incoming, ExitReason>> {
        let Incoming {
            client: mut accepted,
            _permit,
        } = incoming;
        drop(_permit);
        let who = describe(&accepted);
        info!(peer_addr = %accepted.peer, client_name = accepted.name.as_deref().unwrap_or(""), event = "client-connected", "client {who} connected");
        self.stats.clients.store(1, Ordering::Relaxed);
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        *self.stats.client.lock().unwrap_or_else(|p| p.into_inner()) = Some(who.clone());

        let mut outcome: Option<Result<Incoming, ExitReason>> = None;
        let end = {
            let pump = pump::pump(
                &mut *accepted.stream,
                &mut self.serial,
                self.spec.buffer_bytes,
                self.spec.idle_timeout,
                &self.stats.traffic,
            );
            tokio::pin!(pump);
            loop {
                tokio::select! {
                    // The session first: a client that has already closed must release the
                    // module before a newcomer is judged (a quick reconnect is not refused).
                    biased;
                    end = &mut pump => break Some(end),
                    _ = self.cancel.cancelled() => {
                        outcome = Some(Err(ExitReason::Stopped));
                        break None;
                    }
                    i = self.incoming.recv() => {
                        let Some(other) = i else {
                            outcome = Some(Err(ExitReason::Stopped));
                            break None;
                        };
                        let lingering = self.stats.traffic.half_closed.load(Ordering::Relaxed);
                        match self.spec.policy {
                            ClientPolicy::Exclusive if !lingering => {
                                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                                warn!(peer_addr = %other.client.peer, event = "client-refused",
                                    "refused client {}: module is in use by {who} (policy exclusive; set policy = \"kick-old\" to let the newest client win)",
                                    describe(&other.client));
                                // Dropping `other` closes the connection.
                            }
                            _ => {
                                info!(peer_addr = %accepted.peer, event = "client-kicked",
                                    "client {who} disconnected: {} takes over ({})", describe(&other.client),
                                    if lingering { "the old client had finished sending" } else { "policy kick-old" });
                                outcome = Some(Ok(other));
                                break None;
                            }
                        }
                    }
                }
            }
        };
        let _ = tokio::time::timeout(CLIENT_CLOSE_TIMEOUT, accepted.stream.shutdown()).await;
        self.stats.clients.store(0, Ordering::Relaxed);
        *self.stats.client.lock().unwrap_or_else(|p| p.into_inner()) = None;
        match end {
            Some(SessionEnd::ClientClosed) => {
                info!(event = "client-disconnected", "client {who} disconnected");
                None
            }
            Some(SessionEnd::ClientError(e)) => {
                info!(event = "client-disconnected", "client {who} dropped: {e}");
                None
            }
            Some(SessionEnd::ClientIdle(t)) => {
                info!(
                    event = "client-disconnected",
                    "client {who} idle for {t:?}; disconnected (limits.idle_timeout_secs)"
                );
                None
            }
            Some(SessionEnd::DeviceGone(e)) => Some(Err(ExitReason::DeviceGone(e.to_string()))),
            None => outcome,
        }
    }
}

/// The address clients use to reach a listener, for logs.
pub fn display_addr(addr: &IpAddr, port: u16) -> String {
    SocketAddr::new(*addr, port).to_string()
}
