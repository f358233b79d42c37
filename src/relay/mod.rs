//! A relay: one module's serial port, its listeners and its client policy, in one task.
//!
//! The relay owns its serial port and listeners; cancelling its token (or dropping the daemon)
//! closes clients, listeners and the port. It tells the supervisor how it ended through
//! [`RelayExit`], so an unplug seen as EIO on the port is handled like a udev remove.
//!
//! Here: what a relay is started with ([`RelaySpec`], `RelayParts`), its handle, its
//! identity and announcement, and `policy = "shared"`. One client at a time (exclusive and
//! kick-old) is in `session`.

pub mod identify;
pub(crate) mod listen;
pub mod metrics;
mod module;
mod pump;
mod session;
mod shared;
pub(crate) mod tty;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, warn};

use crate::config::{ClientPolicy, Limits, ModuleSettings, TransportKind};
use crate::device::ModuleInfo;
use crate::discovery::{Announcement, Announcer};
use crate::transport::{Accepted, Transport};
use listen::{AcceptConfig, Incoming};
use pump::{SessionEnd, Traffic};
use tty::Tty;

/// How long a closing client gets to take its last bytes (TLS close_notify) before it is cut.
const CLIENT_CLOSE_TIMEOUT: Duration = Duration::from_millis(500);
/// Connections handed from the accept loops to the relay that it has not looked at yet.
const INCOMING_QUEUE: usize = 4;

/// Everything that decides how a module is served. Two equal specs mean a reload need not
/// touch the relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct RelaySpec {
    pub(crate) serial: String,
    pub(crate) devnode: PathBuf,
    pub(crate) fixed_port: Option<u16>,
    pub(crate) listen: Vec<IpAddr>,
    pub(crate) baud: u32,
    pub(crate) policy: ClientPolicy,
    pub(crate) transport: TransportKind,
    /// Ask the module GetId before serving it.
    pub(crate) identify: bool,
    pub(crate) buffer_bytes: usize,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) keepalive: Duration,
    pub(crate) max_pending: usize,
    /// A transport handshake (TLS) must finish within this time.
    pub(crate) handshake_timeout: Duration,
    /// Clients at once under `policy = "shared"`.
    pub(crate) max_clients: usize,
    /// How long the module gets to answer a request lucidgate forwards frame by frame.
    pub(crate) answer_timeout: Duration,
    /// Client names that may use the module (`[modules."SERIAL"] allow`), instead of the
    /// rights in their certificates. Part of the spec so that a reload that changes it
    /// restarts the relay with the new list.
    pub(crate) allow: Option<Vec<String>>,
    /// Client addresses admitted (`allow_from`); `None`: every address.
    pub(crate) allow_from: Option<Vec<ipnet::IpNet>>,
}

impl RelaySpec {
    /// The spec of the module `info` describes, with its merged `settings` and the daemon's
    /// `limits`.
    pub(crate) fn new(info: &ModuleInfo, settings: &ModuleSettings, limits: &Limits) -> RelaySpec {
        RelaySpec {
            serial: info.serial.clone(),
            devnode: info.devnode.clone(),
            fixed_port: settings.fixed_port,
            listen: settings.listen.clone(),
            baud: settings.baud,
            policy: settings.policy,
            transport: settings.transport,
            identify: settings.identify,
            buffer_bytes: limits.buffer_bytes,
            idle_timeout: (limits.idle_timeout_secs > 0)
                .then(|| Duration::from_secs(limits.idle_timeout_secs)),
            keepalive: Duration::from_secs(limits.keepalive_secs),
            max_pending: limits.max_pending_per_module,
            handshake_timeout: Duration::from_millis(limits.handshake_timeout_ms),
            max_clients: limits.max_clients_per_module,
            answer_timeout: Duration::from_millis(limits.answer_timeout_ms),
            allow: settings.allow.clone(),
            allow_from: settings.allow_from.clone(),
        }
    }
}

/// Live counters of a relay, read by `status`.
#[derive(Debug, Default)]
pub(crate) struct RelayStats {
    pub(crate) clients: AtomicUsize,
    pub(crate) sessions: AtomicU64,
    pub(crate) refused: AtomicU64,
    /// Connections refused before any handshake because of their address (`allow_from`).
    pub(crate) refused_address: Arc<AtomicU64>,
    pub(crate) traffic: Traffic,
    /// The connected clients' addresses and names.
    pub(crate) client: Mutex<Vec<String>>,
    /// What GetId said when the relay started.
    pub(crate) identity: Mutex<identify::IdentityState>,
    /// Protocol counters.
    pub(crate) metrics: metrics::Metrics,
}

impl RelayStats {
    fn client_list(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Why a relay ended.
#[derive(Debug)]
pub(crate) enum ExitReason {
    /// Cancelled by the supervisor or shutdown.
    Stopped,
    /// The serial port failed or hung up: the module is gone (or broken).
    DeviceGone(String),
}

/// Sent to the supervisor when a relay task ends.
#[derive(Debug)]
pub(crate) struct RelayExit {
    pub(crate) serial: String,
    pub(crate) generation: u64,
    pub(crate) reason: ExitReason,
}

/// The supervisor's handle on a running relay.
pub(crate) struct RelayHandle {
    pub(crate) spec: RelaySpec,
    pub(crate) port: u16,
    pub(crate) generation: u64,
    pub(crate) stats: Arc<RelayStats>,
    pub(crate) since: std::time::SystemTime,
    cancel: CancellationToken,
    /// Cancelled (before `cancel`) when the device was unplugged: no answer is waited for.
    unplugged: CancellationToken,
    join: tokio::task::JoinHandle<()>,
}

impl RelayHandle {
    /// Stops the relay of a module that was unplugged: nothing of it is waited for.
    pub(crate) async fn stop_unplugged(self, timeout: Duration) {
        self.unplugged.cancel();
        self.stop(timeout).await;
    }

    /// Stops the relay and waits (up to `timeout`) until its port and device are closed.
    pub(crate) async fn stop(self, timeout: Duration) {
        self.cancel.cancel();
        let serial = self.spec.serial.clone();
        if tokio::time::timeout(timeout, self.join).await.is_err() {
            warn!(module_serial = %serial, "relay did not stop within {timeout:?}; abandoned");
        }
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.join.is_finished()
    }
}

/// What a relay is started with: everything the supervisor prepared for it.
pub(crate) struct RelayParts {
    pub(crate) spec: RelaySpec,
    /// The port `listeners` are bound to.
    pub(crate) port: u16,
    /// Tells this relay's [`RelayExit`] from that of an earlier relay of the same module.
    pub(crate) generation: u64,
    /// Already bound, one per address of `spec.listen`.
    pub(crate) listeners: Vec<std::net::TcpListener>,
    /// The module's serial port, already open.
    pub(crate) tty: Tty,
    pub(crate) transport: Transport,
    /// The relay's own token is a child of this one.
    pub(crate) parent: CancellationToken,
    /// The relay task is spawned on this tracker.
    pub(crate) tracker: TaskTracker,
    /// Where the relay says how it ended.
    pub(crate) exits: mpsc::Sender<RelayExit>,
    pub(crate) announcer: Option<Announcer>,
}

/// Starts a relay on already-bound listeners and an open serial port.
pub(crate) fn start(parts: RelayParts) -> Result<RelayHandle> {
    let RelayParts {
        spec,
        port,
        generation,
        listeners,
        tty,
        transport,
        parent,
        tracker,
        exits,
        announcer,
    } = parts;
    let cancel = parent.child_token();
    let unplugged = CancellationToken::new();
    let stats = Arc::new(RelayStats::default());
    let relay_tasks = TaskTracker::new();
    let (tx, rx) = mpsc::channel(INCOMING_QUEUE);
    let span = tracing::info_span!("module", module_serial = %spec.serial, port);
    listen::spawn_acceptors(
        listeners,
        AcceptConfig {
            transport,
            keepalive: spec.keepalive,
            max_pending: spec.max_pending,
            handshake_timeout: spec.handshake_timeout,
            allow_from: spec.allow_from.clone().map(Arc::from),
            refused_address: stats.refused_address.clone(),
            span: span.clone(),
        },
        tx,
        cancel.clone(),
        &relay_tasks,
    )
    .context("registering listeners with the runtime")?;
    let relay = Relay {
        spec: spec.clone(),
        tty,
        incoming: rx,
        stats: stats.clone(),
        cancel: cancel.clone(),
        tasks: relay_tasks.clone(),
        announcer: announcer.clone(),
        port,
        unplugged: unplugged.clone(),
        identity_retry: None,
    };
    let serial_name = spec.serial.clone();
    let join = tracker.spawn(
        async move {
            let reason = relay.run().await;
            if let Some(a) = &announcer {
                a.withdraw(&serial_name);
            }
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
        unplugged,
        join,
    })
}

struct Relay {
    spec: RelaySpec,
    tty: Tty,
    incoming: mpsc::Receiver<Incoming>,
    stats: Arc<RelayStats>,
    cancel: CancellationToken,
    /// Acceptors and (in shared mode) client tasks.
    tasks: TaskTracker,
    announcer: Option<Announcer>,
    port: u16,
    unplugged: CancellationToken,
    /// When to ask GetId again, while the module has not identified itself.
    identity_retry: Option<identify::Retry>,
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

    /// Asks the module who it is: before any client is served (clients queue meanwhile), and
    /// again while no client uses it as long as it has not answered. A stop meanwhile still
    /// reads an answer on its way (see [`module::STOP_GRACE`]).
    async fn update_identity(&mut self) -> Result<(), ExitReason> {
        let state = identify::ask_identity(
            &mut self.tty,
            &self.spec.serial,
            self.spec.answer_timeout,
            &self.cancel,
            &self.unplugged,
        )
        .await
        .map_err(|e| ExitReason::DeviceGone(e.to_string()))?;
        if record_identity(&self.stats, &self.spec, &mut self.identity_retry, state) {
            announce(&self.announcer, &self.spec, self.port, &self.stats);
        }
        Ok(())
    }

    async fn serve(&mut self) -> ExitReason {
        if self.spec.identify
            && let Err(reason) = self.update_identity().await
        {
            return reason;
        }
        if self.cancel.is_cancelled() {
            return ExitReason::Stopped;
        }
        announce(&self.announcer, &self.spec, self.port, &self.stats);
        if self.spec.policy == ClientPolicy::Shared {
            return self.serve_shared().await;
        }
        self.serve_one_at_a_time().await
    }

    /// `policy = "shared"`: every client gets a task that parses its requests; the relay
    /// itself is the module side, exchanging one request at a time in arrival order.
    async fn serve_shared(&mut self) -> ExitReason {
        let (ask_tx, mut ask_rx) = mpsc::channel::<shared::Ask>(self.spec.max_clients);
        let module = shared::serve_module(
            &mut self.tty,
            &mut ask_rx,
            &self.cancel,
            &self.unplugged,
            self.spec.answer_timeout,
            &self.stats.metrics,
        );
        tokio::pin!(module);
        // A GetId retry goes through the same queue as the clients' requests.
        let mut asked: Option<tokio::sync::oneshot::Receiver<module::Exchanged>> = None;
        loop {
            let retry_at = self
                .identity_retry
                .filter(|_| asked.is_none())
                .map(|r| r.at);
            let incoming = tokio::select! {
                r = &mut module => return match r {
                    Ok(()) => ExitReason::Stopped,
                    Err(e) => ExitReason::DeviceGone(e.to_string()),
                },
                i = self.incoming.recv() => match i {
                    Some(i) => i,
                    None => return ExitReason::Stopped,
                },
                _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                    let (reply, answer) = tokio::sync::oneshot::channel();
                    let ask = shared::Ask { frame: identify::GET_ID.to_vec(), reply, internal: true };
                    match ask_tx.try_send(ask) {
                        Ok(()) => asked = Some(answer),
                        // Busy with clients: they are what matters; try later.
                        Err(_) => self.identity_retry = self.identity_retry.map(identify::Retry::next),
                    }
                    continue;
                }
                got = async { asked.as_mut().expect("guarded").await }, if asked.is_some() => {
                    asked = None;
                    if let Ok(got) = got {
                        let state = identify::judge(got, &self.spec.serial, self.spec.answer_timeout);
                        if record_identity(&self.stats, &self.spec, &mut self.identity_retry, state) {
                            announce(&self.announcer, &self.spec, self.port, &self.stats);
                        }
                    }
                    continue;
                }
            };
            let Incoming {
                client: accepted,
                _permit,
            } = incoming;
            drop(_permit);
            let who = describe(&accepted);
            let now = self.stats.clients.load(Ordering::Relaxed);
            if now >= self.spec.max_clients {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                warn!(peer_addr = %accepted.peer, event = "client-refused",
                    "refused client {who}: {now} clients share the module already (limits.max_clients_per_module)");
                continue;
            }
            self.stats.clients.fetch_add(1, Ordering::Relaxed);
            self.stats.sessions.fetch_add(1, Ordering::Relaxed);
            self.stats.client_list().push(who.clone());
            info!(peer_addr = %accepted.peer, client_name = accepted.name.as_deref().unwrap_or(""), event = "client-connected",
                "client {who} connected (shared, {} clients)", now + 1);
            let stats = self.stats.clone();
            let stop = self.cancel.child_token();
            let asks = ask_tx.clone();
            let idle_timeout = self.spec.idle_timeout;
            self.tasks.spawn(
                async move {
                    let mut accepted = accepted;
                    let ctx = shared::ClientCtx {
                        who: &who,
                        read_only: accepted.read_only,
                        idle_timeout,
                        metrics: &stats.metrics,
                        traffic: &stats.traffic,
                    };
                    let end = tokio::select! {
                        e = shared::serve_client(&mut *accepted.stream, &ctx, asks) => e,
                        _ = stop.cancelled() => SessionEnd::RelayGone,
                    };
                    let _ = tokio::time::timeout(CLIENT_CLOSE_TIMEOUT, accepted.stream.shutdown())
                        .await;
                    stats.clients.fetch_sub(1, Ordering::Relaxed);
                    {
                        let mut list = stats.client_list();
                        if let Some(i) = list.iter().position(|c| *c == who) {
                            list.remove(i);
                        }
                    }
                    session::log_end(&who, &end);
                }
                .in_current_span(),
            );
        }
    }
}

/// Stores what GetId said, logs it and schedules the next try while the module has not
/// identified itself. Returns whether the module is now identified after earlier tries failed
/// (its announcement then carries the class GetId gave).
fn record_identity(
    stats: &RelayStats,
    spec: &RelaySpec,
    retry: &mut Option<identify::Retry>,
    state: identify::IdentityState,
) -> bool {
    use identify::IdentityState;
    let tries = retry.map_or(1, |r| r.tries + 1);
    let again = tries > 1;
    match &state {
        IdentityState::Confirmed(i) => info!(
            module_class = %i.class,
            module_type = format!("0x{:04X}", i.type_id),
            firmware = i.firmware,
            hardware = i.hardware,
            event = "identified",
            "module is a LucidControl {} (type 0x{:04X}, firmware 0x{:04X}, hardware {}){}",
            i.class, i.type_id, i.firmware, i.hardware,
            if again { format!(", at GetId try {tries}") } else { String::new() }
        ),
        IdentityState::Mismatch(i) => warn!(
            module_class = %i.class,
            id_serial = %i.serial,
            event = "identity-mismatch",
            "GetId reports serial {} but the device says {}: check the [[device]] entry or the module; served anyway",
            i.serial, spec.serial
        ),
        IdentityState::Failed(why) if !again => warn!(
            event = "identity-failed",
            "could not identify the module on {}: {why}; served anyway, asking again in {:?} while no client uses it (is it a LucidControl module? if not, set identify = false)",
            spec.devnode.display(),
            identify::RETRY_FIRST
        ),
        IdentityState::Failed(why) => tracing::debug!("GetId try {tries} failed: {why}"),
        IdentityState::Pending => {}
    }
    let failed = matches!(state, IdentityState::Failed(_));
    *retry = match (*retry, failed) {
        (_, false) => None,
        (None, true) => Some(identify::Retry::first()),
        (Some(r), true) => Some(r.next()),
    };
    *stats.identity.lock().unwrap_or_else(|p| p.into_inner()) = state;
    again && !failed
}

/// The module's class: what GetId said, else what its USB serial says, else `module`.
fn class_of(spec: &RelaySpec, stats: &RelayStats) -> String {
    let id = stats.identity.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(i) = id.identity() {
        return i.class.clone();
    }
    let s = &spec.serial;
    s.get(..4)
        .filter(|_| s.len() == 16)
        .and_then(|c| u16::from_str_radix(c, 16).ok())
        .and_then(crate::protocol::class_name)
        .unwrap_or("module")
        .to_string()
}

/// Announces (or announces again) the module by mDNS.
fn announce(announcer: &Option<Announcer>, spec: &RelaySpec, port: u16, stats: &RelayStats) {
    if let Some(a) = announcer {
        a.announce(&Announcement {
            serial: spec.serial.clone(),
            port,
            class: class_of(spec, stats),
            transport: spec.transport.to_string(),
            policy: spec.policy.to_string(),
        });
    }
}

/// The address clients use to reach a listener, for logs.
pub(crate) fn display_addr(addr: &IpAddr, port: u16) -> String {
    SocketAddr::new(*addr, port).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::device::SerialSource;

    fn spec(config: &str) -> RelaySpec {
        let c = Config::parse(config, "test.toml").unwrap();
        let info = ModuleInfo {
            serial: "11001001FA480000".into(),
            serial_source: SerialSource::Udev,
            model: "LucidIo_AO4".into(),
            vendor: "test".into(),
            devnode: "/dev/ttyACM0".into(),
            syspath: "/sys/x".into(),
        };
        RelaySpec::new(&info, &c.module_settings(&info.serial), &c.limits)
    }

    #[test]
    fn a_spec_is_whole_when_made() {
        let s = spec(
            "[limits]\nidle_timeout_secs = 0\nanswer_timeout_ms = 70\n[modules.\"11001001FA480000\"]\nbaud = 9600\n",
        );
        assert_eq!((s.serial.as_str(), s.baud), ("11001001FA480000", 9600));
        assert_eq!(s.devnode, PathBuf::from("/dev/ttyACM0"));
        assert_eq!(s.idle_timeout, None);
        assert_eq!(s.answer_timeout, Duration::from_millis(70));
        assert_eq!(
            spec("[limits]\nidle_timeout_secs = 5\n").idle_timeout,
            Some(Duration::from_secs(5))
        );
        // What a reload compares.
        assert_eq!(spec(""), spec(""));
        assert_ne!(spec(""), spec("[limits]\nkeepalive_secs = 7\n"));
        assert_ne!(
            spec(""),
            spec("[modules.\"11001001FA480000\"]\nallow = [\"laptop\"]\n")
        );
        // Address lists: the module's own, else the relay-wide one, else everyone.
        let own = spec(
            "[relay]\nallow_from = [\"10.0.0.0/8\"]\n[modules.\"11001001FA480000\"]\nallow_from = [\"::1\", \"127.0.0.1\"]\nlisten = [\"127.0.0.1\"]\n",
        );
        assert_eq!(
            own.allow_from
                .as_deref()
                .map(|l| l.iter().map(|n| n.to_string()).collect::<Vec<_>>()),
            Some(vec!["::1/128".to_string(), "127.0.0.1/32".to_string()])
        );
        assert_eq!(own.listen, vec![IpAddr::from([127, 0, 0, 1])]);
        let wide = spec("[relay]\nallow_from = [\"10.1.2.3/8\"]\n");
        assert_eq!(wide.allow_from.unwrap()[0].to_string(), "10.0.0.0/8");
        assert_eq!(spec("").allow_from, None);
        assert_eq!(spec("").listen.len(), 2);
    }
}
