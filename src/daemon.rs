//! The supervisor: turns device events into running relays.
//!
//! It owns the module table (present devices, running relays, recent failures) and the port
//! registry; nobody else changes them. Every input — a udev event, a relay that ended, a static
//! device appearing, a retry timer — updates what is *present*, then one reconcile step compares
//! what should run (present, enabled modules and their [`RelaySpec`]s) with what runs, and stops,
//! restarts or starts relays to match. Nothing is patched in place, so a reload (later) is just
//! another reconcile with a new config.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::ca::{Pki, PkiSettings};
use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, StaticDevice, TransportKind};
use crate::control::{self, Command, ModuleStatus, StatusReport};
use crate::device::watch::{self as udev_watch, WatchMsg};
use crate::device::{Action, DeviceEvent, Matcher, ModuleInfo, SerialSource};
use crate::ports::{PortSource, Registry};
use crate::relay::{self, ExitReason, RelayExit, RelayHandle, RelaySpec};
use crate::state;
use crate::tls::{TlsAccept, TlsState};
use crate::transport::Transport;
use tokio::sync::{Notify, watch};

/// How often the PKI looks at the device's addresses (a changed address gets a new server cert).
pub const PKI_ADDRESS_CHECK: Duration = Duration::from_secs(60);
/// Pause before retrying a PKI refresh that failed (e.g. the clock is not set yet).
pub const PKI_RETRY: Duration = Duration::from_secs(10);
/// Shortest pause between PKI refreshes.
const PKI_MIN_WAIT: Duration = Duration::from_millis(100);

/// How often configured `[[device]]` paths are checked for appearing and vanishing.
pub const STATIC_DEVICE_POLL: Duration = Duration::from_millis(250);
/// Queue between the udev thread and the supervisor.
const WATCH_QUEUE: usize = 256;
/// Queue of control requests waiting for the supervisor.
const CONTROL_QUEUE: usize = 16;
/// Prefix of the syspath-like key of static devices.
const STATIC_PREFIX: &str = "config:";
/// Provisioning sticks waiting or in progress at once; more are skipped with a log line (the
/// operator replugs them).
pub const MAX_STICKS_PENDING: usize = 4;

struct Running {
    handle: RelayHandle,
    info: ModuleInfo,
    source: PortSource,
}

/// What should run (serial → device and spec) and why other present devices do not.
type Desired = (
    BTreeMap<String, (ModuleInfo, RelaySpec)>,
    BTreeMap<PathBuf, &'static str>,
);

struct Failure {
    reason: String,
    at: Instant,
}

/// Hooks the daemon calls at points of its life (systemd notify plugs in here).
pub trait Lifecycle: Send {
    /// Config loaded, state usable, udev subscribed, present modules' listeners bound.
    fn ready(&mut self, _status: &str) {}
    /// The served set changed.
    fn status(&mut self, _status: &str) {}
    /// A reload started (it ends with `ready`).
    fn reloading(&mut self) {}
    /// How often the supervisor loop must call [`Lifecycle::watchdog`], if at all.
    fn watchdog_interval(&self) -> Option<Duration> {
        None
    }
    fn watchdog(&mut self) {}
    fn stopping(&mut self) {}
}

/// The supervisor's side of the PKI task: what relays hand out, and how to poke the task.
pub struct PkiHandle {
    pub tls: Arc<TlsState>,
    /// Wakes the PKI task to re-read `state_dir/pki`.
    pub reload: Arc<Notify>,
    /// The `[tls]` settings the task works with (changed by a reload).
    pub settings: watch::Sender<PkiSettings>,
}

/// Where the config comes from, so a reload can read it again.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// `None`: built-in defaults only.
    pub path: Option<PathBuf>,
    /// The file was named explicitly (`--config`) and must exist.
    pub required: bool,
    /// Devices added on the command line (`serve --demo`), kept across reloads.
    pub extra_devices: Vec<StaticDevice>,
}

impl ConfigSource {
    pub fn load(&self) -> Result<Config, crate::config::ConfigError> {
        let mut c = match &self.path {
            Some(p) => Config::load(p, self.required)?,
            None => Config::default(),
        };
        c.devices.extend(self.extra_devices.iter().cloned());
        Ok(c)
    }
}

/// A lifecycle that does nothing.
pub struct NoLifecycle;
impl Lifecycle for NoLifecycle {}

/// The module table and everything that changes it.
pub struct Supervisor {
    config: Arc<Config>,
    matcher: Matcher,
    registry: Registry,
    /// Present devices by syspath (udev) or `config:PATH` (static).
    devices: BTreeMap<PathBuf, ModuleInfo>,
    relays: BTreeMap<String, Running>,
    failures: BTreeMap<String, Failure>,
    generation: u64,
    exits_tx: mpsc::Sender<RelayExit>,
    exits_rx: mpsc::Receiver<RelayExit>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    pki: PkiHandle,
    /// The latest udev event of every tty seen (matching or not), so a reload with new match
    /// rules can judge devices that are already plugged in.
    raw: BTreeMap<PathBuf, DeviceEvent>,
    source: ConfigSource,
    /// mDNS announcements (None when `discovery.mdns` is off or mDNS could not start).
    announcer: Option<crate::discovery::Announcer>,
    sticks: Sticks,
    /// Set when only a restart by systemd can serve a module (its driver came after the
    /// service's device allow-list): the daemon then ends with an error.
    restart_for: Option<String>,
}

/// USB sticks seen for provisioning (by syspath, until removed) and the runs' outcomes.
struct Sticks {
    seen: BTreeMap<PathBuf, StickState>,
    clock: SharedClock,
    pending: Arc<tokio::sync::Semaphore>,
    /// One stick at a time (they share the PKI and the ledger).
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
    /// (syspath, outcome); `None`: the stick could not be read (not FAT, not openable): it is
    /// looked at again on its next add or change event (media inserted, reformatted).
    done_tx: mpsc::Sender<(PathBuf, Option<crate::provision::Status>)>,
    done_rx: mpsc::Receiver<(PathBuf, Option<crate::provision::Status>)>,
}

enum StickState {
    Running { devnode: PathBuf, again: bool },
    Done,
}

/// Whether a udev block device is a USB FAT filesystem worth looking at for a request.
fn is_provisioning_stick(ev: &DeviceEvent) -> bool {
    ev.subsystem == "block"
        && ev.devnode.is_some()
        && ev.property("ID_BUS") == Some("usb")
        && matches!(ev.property("ID_FS_TYPE"), Some("vfat") | Some("msdos"))
}

impl Supervisor {
    pub fn new(
        config: Arc<Config>,
        registry: Registry,
        cancel: CancellationToken,
        tracker: TaskTracker,
        pki: PkiHandle,
        source: ConfigSource,
    ) -> Self {
        let (exits_tx, exits_rx) = mpsc::channel(64);
        let (done_tx, done_rx) = mpsc::channel(MAX_STICKS_PENDING);
        Supervisor {
            sticks: Sticks {
                seen: BTreeMap::new(),
                clock: Arc::new(SystemClock::from_env()),
                pending: Arc::new(tokio::sync::Semaphore::new(MAX_STICKS_PENDING)),
                one_at_a_time: Arc::new(tokio::sync::Mutex::new(())),
                done_tx,
                done_rx,
            },
            matcher: Matcher::new(&config.effective_match_rules()),
            config,
            registry,
            devices: BTreeMap::new(),
            relays: BTreeMap::new(),
            failures: BTreeMap::new(),
            generation: 0,
            exits_tx,
            exits_rx,
            cancel,
            tracker,
            pki,
            raw: BTreeMap::new(),
            source,
            announcer: None,
            restart_for: None,
        }
    }

    /// Announces relays by mDNS from now on.
    pub fn set_announcer(&mut self, announcer: Option<crate::discovery::Announcer>) {
        self.announcer = announcer;
    }

    /// The clock provisioning issues certificates by (the PKI task's).
    pub fn set_clock(&mut self, clock: SharedClock) {
        self.sticks.clock = clock;
    }

    /// A block device: a USB stick that may carry a provisioning request.
    fn on_block(&mut self, ev: DeviceEvent) {
        if ev.action == Action::Remove {
            self.sticks.seen.remove(&ev.syspath);
            return;
        }
        if !self.config.provision.usb || !is_provisioning_stick(&ev) {
            return;
        }
        let Some(devnode) = ev.devnode.clone() else {
            return;
        };
        match self.sticks.seen.get_mut(&ev.syspath) {
            // Looked at already; the ledger keeps a request from being processed twice anyway.
            Some(StickState::Done) => {}
            // An event while it is being read (media swapped in): read it again afterwards
            // if this run finds no filesystem.
            Some(StickState::Running { again, .. }) => *again = true,
            None => {
                info!(devnode = %devnode.display(), event = "stick-plugged",
                    "USB stick {} ({}): looking for lucidgate/request.toml", devnode.display(),
                    ev.property("ID_FS_LABEL").unwrap_or("no label"));
                self.start_stick(ev.syspath.clone(), devnode);
            }
        }
    }

    /// Runs provisioning on a stick in a blocking task (one stick at a time).
    fn start_stick(&mut self, syspath: PathBuf, devnode: PathBuf) {
        let Ok(permit) = self.sticks.pending.clone().try_acquire_owned() else {
            warn!(devnode = %devnode.display(), event = "provision-busy",
                "{} sticks are being processed; {} is skipped (plug it in again later)", MAX_STICKS_PENDING, devnode.display());
            return;
        };
        self.sticks.seen.insert(
            syspath.clone(),
            StickState::Running {
                devnode: devnode.clone(),
                again: false,
            },
        );
        let config = self.config.clone();
        let modules: BTreeMap<String, u16> = self
            .relays
            .iter()
            .map(|(s, r)| (s.clone(), r.handle.port))
            .collect();
        let clock = self.sticks.clock.clone();
        let lock = self.sticks.one_at_a_time.clone();
        let done = self.sticks.done_tx.clone();
        self.tracker.spawn(async move {
            let _permit = permit;
            let _turn = lock.lock().await;
            let path = devnode.clone();
            let run = tokio::task::spawn_blocking(move || {
                let dev = crate::provision::Device {
                    state_dir: &config.state_dir,
                    pki: PkiSettings::from_config(&config),
                    clock: clock.as_ref(),
                    token_hash: config.provision.token_hash.clone(),
                    hostname: crate::provision::hostname(&config),
                    modules,
                };
                crate::provision::run_path(&path, &dev)
            })
            .await;
            let status = match run {
                Ok(Ok(outcome)) => Some(outcome.status),
                Ok(Err(crate::provision::NotProvisioning::NoRequest)) => {
                    info!(devnode = %devnode.display(), "USB stick {} has no lucidgate/request.toml; left alone", devnode.display());
                    Some(crate::provision::Status::Refused)
                }
                Ok(Err(e)) => {
                    warn!(devnode = %devnode.display(), event = "provision-failed", "USB stick {}: {e}", devnode.display());
                    None
                }
                Err(e) => {
                    error!("provisioning task failed: {e}");
                    None
                }
            };
            let _ = done.send((syspath, status)).await;
        });
    }

    /// After a provisioning run: the PKI may have changed (new clients, an imported CA); a
    /// stick that could not be read is read again if an event came meanwhile, else on its next.
    fn on_provisioned(&mut self, syspath: PathBuf, status: Option<crate::provision::Status>) {
        let state = self.sticks.seen.remove(&syspath);
        match status {
            Some(s) => {
                self.sticks.seen.insert(syspath, StickState::Done);
                if s == crate::provision::Status::Done {
                    self.refresh_pki_settings();
                }
            }
            None => {
                if let Some(StickState::Running {
                    devnode,
                    again: true,
                }) = state
                {
                    self.start_stick(syspath, devnode);
                }
            }
        }
    }

    /// Re-reads the PKI, with settings that see an operator PKI installed meanwhile.
    fn refresh_pki_settings(&mut self) {
        let pki = PkiSettings::from_config(&self.config);
        if *self.pki.settings.borrow() != pki {
            info!(
                event = "pki-reload",
                "the PKI source changed (an imported PKI?); reloading it"
            );
            self.pki.settings.send_replace(pki);
        }
        self.pki.reload.notify_one();
    }

    fn on_device(&mut self, ev: DeviceEvent) {
        if ev.subsystem == "block" {
            return self.on_block(ev);
        }
        let key = ev.syspath.clone();
        let removed = ev.action == Action::Remove;
        if removed {
            self.raw.remove(&key);
        } else {
            self.raw.insert(key.clone(), ev);
        }
        self.rematch(&key, removed);
    }

    /// Judges the device at `key` (a udev syspath) again with the current rules.
    fn rematch(&mut self, key: &PathBuf, unplugged: bool) {
        let now = self.raw.get(key).and_then(|ev| self.matcher.identify(ev));
        match now {
            Some(info) => {
                if self.devices.get(key) != Some(&info) {
                    if info.serial_source == SerialSource::UsbPath {
                        warn!(module_serial = %info.serial, devnode = %info.devnode.display(),
                            "module has no serial number; serving it on a port derived from its USB path (it changes if the module moves to another USB socket)");
                    }
                    info!(module_serial = %info.serial, module_model = %info.model, devnode = %info.devnode.display(), event = "plugged",
                        "module {} ({}) present at {}", info.serial, info.model, info.devnode.display());
                    self.failures.remove(&info.serial);
                    self.devices.insert(key.clone(), info);
                }
            }
            None => {
                if let Some(info) = self.devices.remove(key) {
                    if unplugged {
                        info!(module_serial = %info.serial, module_model = %info.model, devnode = %info.devnode.display(), event = "unplugged",
                            "module {} unplugged", info.serial);
                    } else {
                        info!(module_serial = %info.serial, devnode = %info.devnode.display(), event = "unplugged",
                            "module {} no longer matches the rules; stopping", info.serial);
                    }
                }
            }
        }
    }

    fn on_exit(&mut self, exit: RelayExit) {
        let current = self
            .relays
            .get(&exit.serial)
            .is_some_and(|r| r.handle.generation == exit.generation);
        if !current {
            return;
        }
        let running = self.relays.remove(&exit.serial).expect("checked above");
        if let ExitReason::DeviceGone(why) = exit.reason {
            warn!(module_serial = %exit.serial, port = running.handle.port, devnode = %running.info.devnode.display(), event = "device-lost",
                "module {} stopped answering on {}: {why}; waiting for it to come back", exit.serial, running.info.devnode.display());
            self.failures.insert(
                exit.serial,
                Failure {
                    reason: format!("device lost: {why}"),
                    at: Instant::now(),
                },
            );
        }
    }

    /// Static devices appear when their path exists and vanish when it does not.
    fn poll_static(&mut self) {
        let configured: BTreeSet<PathBuf> = self
            .config
            .devices
            .iter()
            .map(|d| PathBuf::from(format!("{STATIC_PREFIX}{}", d.path.display())))
            .collect();
        let gone: Vec<PathBuf> = self
            .devices
            .keys()
            .filter(|k| k.to_string_lossy().starts_with(STATIC_PREFIX) && !configured.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            if let Some(info) = self.devices.remove(&key) {
                info!(module_serial = %info.serial, event = "unplugged", "static device {} removed from the config", info.serial);
            }
        }
        for dev in self.config.devices.clone() {
            let key = PathBuf::from(format!("{STATIC_PREFIX}{}", dev.path.display()));
            let present = dev.path.exists();
            let known = self.devices.contains_key(&key);
            if present && !known {
                let info = static_info(&dev, key.clone());
                info!(module_serial = %info.serial, devnode = %dev.path.display(), event = "plugged",
                    "static device {} present at {}", info.serial, dev.path.display());
                self.failures.remove(&info.serial);
                self.devices.insert(key, info);
            } else if !present
                && known
                && let Some(info) = self.devices.remove(&key)
            {
                info!(module_serial = %info.serial, devnode = %dev.path.display(), event = "unplugged",
                    "static device {} gone from {}", info.serial, dev.path.display());
            }
        }
    }

    fn spec_for(&self, info: &ModuleInfo) -> RelaySpec {
        let s = self.config.module_settings(&info.serial);
        let mut spec = RelaySpec {
            serial: info.serial.clone(),
            devnode: info.devnode.clone(),
            fixed_port: s.fixed_port,
            listen: self.config.listen.clone(),
            baud: s.baud,
            policy: s.policy,
            transport: s.transport,
            identify: s.identify,
            buffer_bytes: 0,
            idle_timeout: None,
            keepalive: Duration::ZERO,
            max_pending: 1,
            handshake_timeout: Duration::ZERO,
            max_clients: 1,
            answer_timeout: Duration::ZERO,
        };
        spec.limits_from(&self.config.limits);
        spec
    }

    /// What should run: serial → (device, spec), and why other present devices do not run.
    fn desired(&self) -> Desired {
        let mut want = BTreeMap::new();
        let mut not = BTreeMap::new();
        for (key, info) in &self.devices {
            if !self.config.module_settings(&info.serial).enabled {
                not.insert(key.clone(), "disabled");
            } else if want.contains_key(&info.serial) {
                not.insert(key.clone(), "duplicate");
            } else if want.len() >= self.config.limits.max_modules {
                not.insert(key.clone(), "over-limit");
            } else {
                want.insert(info.serial.clone(), (info.clone(), self.spec_for(info)));
            }
        }
        (want, not)
    }

    async fn reconcile(&mut self) {
        let (desired, _) = self.desired();
        let stop_timeout = Duration::from_millis(self.config.limits.stop_timeout_ms);
        let stale: Vec<String> = self
            .relays
            .iter()
            .filter(|(serial, r)| {
                r.handle.is_finished()
                    || desired.get(*serial).is_none_or(|(info, spec)| {
                        *spec != r.handle.spec || info.syspath != r.info.syspath
                    })
            })
            .map(|(s, _)| s.clone())
            .collect();
        for serial in stale {
            let r = self.relays.remove(&serial).expect("listed above");
            let why = if desired.contains_key(&serial) {
                "settings changed"
            } else {
                "module gone"
            };
            info!(module_serial = %serial, port = r.handle.port, event = "relay-stopped", "stopping relay for {serial} on port {} ({why})", r.handle.port);
            let present = self.devices.values().any(|d| d.serial == serial);
            if present {
                r.handle.stop(stop_timeout).await;
            } else {
                r.handle.stop_unplugged(stop_timeout).await;
            }
        }
        self.failures
            .retain(|serial, _| desired.contains_key(serial));
        let retry = Duration::from_millis(self.config.limits.retry_ms);
        for (serial, (info, spec)) in desired {
            if self.relays.contains_key(&serial) {
                continue;
            }
            if self
                .failures
                .get(&serial)
                .is_some_and(|f| f.at.elapsed() < retry)
            {
                continue;
            }
            match self.start(&info, spec) {
                Ok(running) => {
                    self.failures.remove(&serial);
                    self.relays.insert(serial, running);
                }
                Err(e) => {
                    let late_driver = e
                        .downcast_ref::<crate::device::access::OpenError>()
                        .is_some_and(|o| o.restart_fixes_it);
                    if late_driver && crate::device::access::under_systemd() {
                        error!(module_serial = %serial, devnode = %info.devnode.display(), event = "restart-for-device-policy",
                            "cannot serve module {serial}: {e:#}");
                        self.restart_for = Some(format!("{e:#}"));
                        self.cancel.cancel();
                        return;
                    }
                    error!(module_serial = %serial, devnode = %info.devnode.display(), event = "relay-failed",
                        "cannot serve module {serial}: {e:#}; retrying in {retry:?}");
                    self.failures.insert(
                        serial,
                        Failure {
                            reason: format!("{e:#}"),
                            at: Instant::now(),
                        },
                    );
                }
            }
        }
    }

    fn start(&mut self, info: &ModuleInfo, spec: RelaySpec) -> Result<Running> {
        let in_use: BTreeSet<u16> = self.relays.values().map(|r| r.handle.port).collect();
        let listen = spec.listen.clone();
        let (port, source, listeners) =
            self.registry
                .assign(&spec.serial, &self.config, &in_use, |p| {
                    relay::listen::bind_all(&listen, p)
                })?;
        let serial_port = relay::tty::Tty::open(&spec.devnode, spec.baud)?;
        self.generation += 1;
        let transport = match spec.transport {
            TransportKind::Plain => Transport::Plain,
            kind => {
                if let Some(why) = self.pki.tls.not_ready() {
                    anyhow::bail!("TLS is not available: {why}");
                }
                Transport::Tls(TlsAccept {
                    state: self.pki.tls.clone(),
                    mutual: kind == TransportKind::Mtls,
                    module: spec.serial.clone(),
                    allow: self.config.module_settings(&spec.serial).allow,
                })
            }
        };
        match spec.transport {
            TransportKind::Plain => {
                warn!(module_serial = %info.serial, event = "insecure-transport",
                "module {} is served as plain TCP (transport = \"plain\"): anyone who can reach port {port} can use it", info.serial)
            }
            TransportKind::Tls => warn!(module_serial = %info.serial, event = "insecure-transport",
                "module {} is served over TLS without client certificates (transport = \"tls\"): any client can use it", info.serial),
            TransportKind::Mtls => {}
        }
        let handle = relay::start(
            spec,
            port,
            self.generation,
            listeners,
            serial_port,
            transport,
            &self.cancel,
            &self.tracker,
            self.exits_tx.clone(),
            self.announcer.clone(),
        )?;
        let addrs: Vec<String> = self
            .config
            .listen
            .iter()
            .map(|a| relay::display_addr(a, port))
            .collect();
        info!(module_serial = %info.serial, module_model = %info.model, devnode = %info.devnode.display(), port, port_source = %source, event = "serving",
            "serving module {} ({}) from {} on {} (port {source})", info.serial, info.model, info.devnode.display(), addrs.join(", "));
        Ok(Running {
            handle,
            info: info.clone(),
            source,
        })
    }

    /// The status of every present module.
    pub fn status(&self) -> StatusReport {
        let (_, not) = self.desired();
        let mut modules = Vec::new();
        for (key, info) in &self.devices {
            let settings = self.config.module_settings(&info.serial);
            let mut m = ModuleStatus {
                serial: info.serial.clone(),
                serial_source: serde_json::to_value(info.serial_source)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                model: info.model.clone(),
                vendor: info.vendor.clone(),
                devnode: info.devnode.display().to_string(),
                port: None,
                port_source: None,
                transport: settings.transport.to_string(),
                policy: settings.policy.to_string(),
                clients: 0,
                client: None,
                state: "starting".into(),
                since: None,
                error: None,
                sessions: 0,
                refused: 0,
                bytes_up: 0,
                bytes_down: 0,
                identity_state: String::new(),
                identity: None,
                identity_error: None,
                metrics: None,
            };
            if let Some(reason) = not.get(key) {
                m.state = reason.to_string();
            } else if let Some(r) = self
                .relays
                .get(&info.serial)
                .filter(|r| r.info.syspath == *key)
            {
                let st = &r.handle.stats;
                use std::sync::atomic::Ordering::Relaxed;
                m.state = "serving".into();
                m.port = Some(r.handle.port);
                m.port_source = Some(r.source.to_string());
                m.clients = st.clients.load(Relaxed);
                {
                    let list = st.client.lock().unwrap_or_else(|p| p.into_inner());
                    m.client = (!list.is_empty()).then(|| list.join(", "));
                }
                m.metrics = Some(st.metrics.snapshot());
                let id = st.identity.lock().unwrap_or_else(|p| p.into_inner());
                m.identity_state = id.label().to_string();
                m.identity = id.identity().cloned();
                m.identity_error = id.problem(&info.serial);
                m.since = Some(humantime::format_rfc3339_seconds(r.handle.since).to_string());
                m.sessions = st.sessions.load(Relaxed);
                m.refused = st.refused.load(Relaxed);
                m.bytes_up = st.traffic.bytes_up.load(Relaxed);
                m.bytes_down = st.traffic.bytes_down.load(Relaxed);
            } else if let Some(f) = self.failures.get(&info.serial) {
                m.state = "failed".into();
                m.error = Some(f.reason.clone());
            }
            modules.push(m);
        }
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            tasks: tokio::runtime::Handle::try_current()
                .map(|h| h.metrics().num_alive_tasks())
                .unwrap_or(0),
            modules,
        }
    }

    fn summary(&self) -> String {
        let served: Vec<String> = self
            .relays
            .iter()
            .map(|(s, r)| format!("{s}:{}", r.handle.port))
            .collect();
        format!("{} modules served: {}", served.len(), served.join(" "))
    }

    /// Re-reads the config; a bad one is refused whole and the running one stays. Relays whose
    /// settings did not change keep their clients; changed ones restart; removed ones stop.
    pub async fn reload(&mut self, lifecycle: &mut dyn Lifecycle) -> Result<String, String> {
        lifecycle.reloading();
        info!(event = "reload", "reloading the configuration");
        let mut new = match self.source.load() {
            Ok(c) => c,
            Err(e) => {
                error!(
                    event = "reload-failed",
                    "reload refused, the running configuration stays in force: {e}"
                );
                lifecycle.ready(&self.summary());
                return Err(e.to_string());
            }
        };
        let old = self.config.clone();
        let mut notes = Vec::new();
        if new.state_dir != old.state_dir {
            notes.push("state_dir changes take effect after a restart".to_string());
            new.state_dir = old.state_dir.clone();
        }
        if new.control_socket != old.control_socket {
            notes.push("control_socket changes take effect after a restart".to_string());
            new.control_socket = old.control_socket.clone();
        }
        if new.discovery != old.discovery {
            notes.push("discovery changes take effect after a restart".to_string());
            new.discovery = old.discovery.clone();
        }
        if new.provision.usb != old.provision.usb {
            notes.push("provision.usb changes take effect after a restart".to_string());
        }
        if new.metrics != old.metrics {
            notes.push("metrics changes take effect after a restart".to_string());
            new.metrics = old.metrics.clone();
        }
        if new.limits.max_handshakes != old.limits.max_handshakes {
            notes.push("limits.max_handshakes changes take effect after a restart".to_string());
        }
        if new.uses_tls() && !old.uses_tls() {
            notes.push("TLS was off at start: restart lucidgate to serve TLS".to_string());
        }
        let pki = PkiSettings::from_config(&new);
        if *self.pki.settings.borrow() != pki {
            self.pki.settings.send_replace(pki);
            self.pki.reload.notify_one();
        }
        self.config = Arc::new(new);
        self.matcher = Matcher::new(&self.config.effective_match_rules());
        let keys: Vec<PathBuf> = self.raw.keys().cloned().collect();
        for k in keys {
            self.rematch(&k, false);
        }
        self.poll_static();
        // Modules that failed get a fresh try under the new config.
        self.failures.clear();
        self.reconcile().await;
        let summary = self.summary();
        for n in &notes {
            warn!(event = "reload", "{n}");
        }
        info!(event = "reloaded", "configuration reloaded: {summary}");
        lifecycle.ready(&summary);
        Ok(if notes.is_empty() {
            summary
        } else {
            format!("{summary} (note: {})", notes.join("; "))
        })
    }

    /// Runs until `cancel`: the event loop of the daemon.
    pub async fn run(
        mut self,
        mut watch_rx: mpsc::Receiver<WatchMsg>,
        watch_done: bool,
        mut control_rx: mpsc::Receiver<control::Request>,
        mut reload_rx: mpsc::Receiver<()>,
        lifecycle: &mut dyn Lifecycle,
    ) -> Result<()> {
        let mut enumerated = watch_done;
        let mut ready = false;
        let mut last_summary = String::new();
        let cancel = self.cancel.clone();
        let mut watch_open = !watch_done;
        // One interval for the whole loop: a sleep made anew each turn would never fire while
        // other events (e.g. frequent status requests) keep the loop busy.
        let mut tick = tokio::time::interval(STATIC_DEVICE_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let watchdog_every = lifecycle.watchdog_interval();
        let mut watchdog =
            tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !ready && enumerated {
                self.poll_static();
                self.reconcile().await;
                last_summary = self.summary();
                lifecycle.ready(&last_summary);
                info!(event = "ready", "ready: {last_summary}");
                ready = true;
            }
            let need_tick = !self.config.devices.is_empty() || !self.failures.is_empty();
            tokio::select! {
                _ = cancel.cancelled() => break,
                msg = watch_rx.recv(), if watch_open => match msg {
                    Some(WatchMsg::Device(ev)) => self.on_device(ev),
                    Some(WatchMsg::Enumerated) => { enumerated = true; continue; }
                    None => {
                        watch_open = false;
                        enumerated = true;
                        warn!("the udev watch ended; hotplug no longer works");
                    }
                },
                Some(exit) = self.exits_rx.recv() => self.on_exit(exit),
                Some((syspath, status)) = self.sticks.done_rx.recv() => {
                    self.on_provisioned(syspath, status);
                    continue;
                }
                Some(req) = control_rx.recv() => {
                    let answer = match req.command {
                        Command::Status => serde_json::to_value(self.status()).unwrap_or_default(),
                        Command::ReloadPki => {
                            // `provision` may have installed an operator PKI: settings first.
                            self.refresh_pki_settings();
                            serde_json::json!({ "ok": true })
                        }
                        Command::Reload => match self.reload(lifecycle).await {
                            Ok(summary) => serde_json::json!({ "ok": true, "status": summary }),
                            Err(e) => serde_json::json!({ "error": format!("reload refused: {e}") }),
                        },
                    };
                    let _ = req.reply.send(answer);
                    continue;
                }
                _ = tick.tick(), if need_tick => self.poll_static(),
                _ = watchdog.tick(), if watchdog_every.is_some() => {
                    lifecycle.watchdog();
                    continue;
                }
                Some(()) = reload_rx.recv() => {
                    let _ = self.reload(lifecycle).await;
                    last_summary = self.summary();
                    continue;
                }
            }
            if ready {
                self.reconcile().await;
                let summary = self.summary();
                if summary != last_summary {
                    lifecycle.status(&summary);
                    last_summary = summary;
                }
            }
        }
        lifecycle.stopping();
        info!(
            event = "stopping",
            "shutting down: stopping {} relays",
            self.relays.len()
        );
        let stop_timeout = Duration::from_millis(self.config.limits.stop_timeout_ms);
        // The root token is cancelled, so all relays are stopping at once; wait for each.
        for (_, r) in std::mem::take(&mut self.relays) {
            r.handle.stop(stop_timeout).await;
        }
        match self.restart_for.take() {
            Some(why) => anyhow::bail!(
                "exiting so that systemd restarts lucidgate with a device allow-list that includes the new driver: {why}"
            ),
            None => Ok(()),
        }
    }
}

fn static_info(dev: &StaticDevice, key: PathBuf) -> ModuleInfo {
    ModuleInfo {
        serial: dev.serial.clone(),
        serial_source: SerialSource::Config,
        model: dev.model.clone(),
        vendor: "static".into(),
        devnode: dev.path.clone(),
        syspath: key,
    }
}

/// Options of `lucidgate serve` beyond the config.
#[derive(Debug, Default, Clone)]
pub struct ServeOptions {
    /// Do not watch udev (only `[[device]]` entries are served).
    pub no_udev: bool,
    /// Where the config was read from (for reloads).
    pub source: ConfigSource,
}

/// Runs the daemon until SIGINT/SIGTERM: state, control socket, udev watch, supervisor.
pub async fn serve(
    config: Config,
    opts: ServeOptions,
    lifecycle: &mut dyn Lifecycle,
) -> Result<()> {
    // Signals first: a SIGTERM during start-up (key generation can take a moment) must end
    // the daemon cleanly, and SIGHUP must never kill it.
    let cancel = CancellationToken::new();
    let (reload_tx, reload_rx) = mpsc::channel(1);
    spawn_signal_handler(cancel.clone(), reload_tx)?;
    crate::device::access::record_start();
    let config = Arc::new(config);
    state::ensure_private_dir(&config.state_dir)?;
    let (registry, warnings) = Registry::load(&config.state_dir)?;
    for w in warnings {
        warn!("{w}");
    }
    let tracker = TaskTracker::new();

    let control_socket = control::bind(&config.control_socket).await?;
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
    if let Some(addr) = config.metrics.listen {
        crate::openmetrics::spawn(addr, control_tx.clone(), cancel.clone(), &tracker).await?;
    }
    // The control server removes the socket file when it stops (see control::ControlSocket).
    control::spawn_server(
        control_socket,
        control_tx,
        config.limits.max_control_clients,
        cancel.clone(),
        &tracker,
    );

    let (watch_tx, watch_rx) = mpsc::channel(WATCH_QUEUE);
    let mut watch_done = opts.no_udev;
    let _watch_thread = if opts.no_udev {
        drop(watch_tx);
        None
    } else {
        // Block devices too when USB-stick provisioning is on (a stick at boot is seen too).
        let subsystems: &[&str] = if config.provision.usb {
            &["tty", "block"]
        } else {
            &["tty"]
        };
        match udev_watch::spawn(subsystems, watch_tx) {
            Ok(h) => Some(h),
            Err(e) => {
                warn!(
                    "udev is not available ({e:#}); hotplug is off, only [[device]] entries are served"
                );
                watch_done = true;
                None
            }
        }
    };

    let clock: SharedClock = Arc::new(SystemClock::from_env());
    let tls = TlsState::new(clock.clone(), config.limits.max_handshakes);
    let pki_reload = Arc::new(Notify::new());
    let (pki_settings, pki_settings_rx) = watch::channel(PkiSettings::from_config(&config));
    if config.uses_tls() {
        let settings = PkiSettings::from_config(&config);
        match refresh_pki(&config.state_dir, &settings, &clock, &tls) {
            Ok(_) => {}
            Err(e) if crate::clock::implausible(clock.now()).is_some() => {
                warn!("TLS relays wait for the clock: {e:#}");
            }
            Err(e) => return Err(e.context("loading the PKI")),
        }
        spawn_pki_task(
            config.state_dir.clone(),
            pki_settings_rx,
            clock.clone(),
            tls.clone(),
            pki_reload.clone(),
            cancel.clone(),
            &tracker,
        );
    } else {
        tls.set_unavailable("no module uses TLS".into());
    }

    let announcer = match crate::discovery::Announcer::start(&config.discovery) {
        Ok(a) => a,
        Err(e) => {
            warn!(
                event = "mdns-unavailable",
                "modules are served without mDNS announcements: {e:#} (set discovery.mdns = false to silence this)"
            );
            None
        }
    };
    let mut supervisor = Supervisor::new(
        config.clone(),
        registry,
        cancel.clone(),
        tracker.clone(),
        PkiHandle {
            tls,
            reload: pki_reload,
            settings: pki_settings,
        },
        opts.source.clone(),
    );
    supervisor.set_announcer(announcer.clone());
    supervisor.set_clock(clock.clone());
    let result = supervisor
        .run(watch_rx, watch_done, control_rx, reload_rx, lifecycle)
        .await;
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        warn!("some tasks did not finish within 5 s of shutdown");
    }
    if let Some(a) = announcer {
        // Goodbye packets, so browsers forget the modules now rather than after the TTL.
        tokio::task::spawn_blocking(move || a.shutdown()).await.ok();
    }
    info!("stopped");
    result
}

/// Brings the PKI up to date and publishes it to the relays; returns when to look again.
fn refresh_pki(
    state_dir: &std::path::Path,
    settings: &PkiSettings,
    clock: &SharedClock,
    tls: &TlsState,
) -> Result<Duration> {
    let result =
        Pki::open(state_dir, settings.clone(), clock.as_ref()).and_then(|pki| pki.refresh());
    match result {
        Ok((material, rotated)) => {
            let before = tls.server_serial();
            tls.publish(&material)?;
            if rotated && !before.is_empty() {
                info!(
                    event = "cert-rotated",
                    "server certificate rotated: serial {before} -> {}", material.server_serial
                );
            }
            let wait = material
                .next_check
                .duration_since(clock.now())
                .unwrap_or_default()
                .clamp(PKI_MIN_WAIT, PKI_ADDRESS_CHECK);
            Ok(wait)
        }
        Err(e) => {
            tls.set_unavailable(format!("{e:#}"));
            Err(e)
        }
    }
}

/// The PKI task: renews the server certificate, follows address changes and CA overlaps, and
/// re-reads the PKI when `lucidgate cert ...` asks for it.
fn spawn_pki_task(
    state_dir: PathBuf,
    settings: watch::Receiver<PkiSettings>,
    clock: SharedClock,
    tls: Arc<TlsState>,
    reload: Arc<Notify>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) {
    tracker.spawn(async move {
        let mut wait = Duration::ZERO;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = reload.notified() => info!(event = "pki-reload", "re-reading the PKI"),
                _ = tokio::time::sleep(wait) => {}
            }
            let (d, s, c, t) = (
                state_dir.clone(),
                settings.borrow().clone(),
                clock.clone(),
                tls.clone(),
            );
            let r = tokio::task::spawn_blocking(move || refresh_pki(&d, &s, &c, &t)).await;
            wait = match r {
                Ok(Ok(w)) => w,
                Ok(Err(e)) => {
                    error!(
                        event = "pki-error",
                        "PKI refresh failed: {e:#}; retrying in {PKI_RETRY:?}"
                    );
                    PKI_RETRY
                }
                Err(e) => {
                    error!("PKI task failed: {e}");
                    PKI_RETRY
                }
            };
        }
    });
}

fn spawn_signal_handler(cancel: CancellationToken, reload: mpsc::Sender<()>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM received"); break; }
                _ = int.recv() => { info!("SIGINT received"); break; }
                _ = hup.recv() => {
                    info!("SIGHUP received: reloading");
                    // A reload already queued covers this one too.
                    let _ = reload.try_send(());
                }
                _ = cancel.cancelled() => return,
            }
        }
        cancel.cancel();
    });
    Ok(())
}

/// Path of the state dir's port registry (for `lucidgate port`).
pub fn registry_path(config: &Config) -> PathBuf {
    config.state_dir.join(crate::ports::REGISTRY_FILE)
}
