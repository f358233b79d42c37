//! The supervisor: turns device events into running relays.
//!
//! It owns the module table (present devices, running relays, recent failures) and the port
//! registry; nobody else changes them. Every input — a udev event, a relay that ended, a static
//! device appearing, a retry timer — updates what is *present*, then one reconcile step compares
//! what should run (present, enabled modules and their [`RelaySpec`]s) with what runs, and stops,
//! restarts or starts relays to match. Nothing is patched in place, so a reload is just another
//! reconcile with a new config ([`reload`] plans which settings wait for a restart).
//! USB sticks for provisioning are in [`sticks`]; the status report is built in [`status`];
//! [`event_loop`] feeds every input to the table and answers the control socket.

mod event_loop;
mod reload;
mod status;
mod sticks;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use crate::ca::PkiSettings;
use crate::clock::SharedClock;
use crate::config::{Config, StaticDevice, TransportKind};
use crate::device::{Action, DeviceEvent, Matcher, ModuleInfo, SerialSource};
use crate::ports::{PortSource, Registry};
use crate::relay::{self, ExitReason, RelayExit, RelayHandle, RelayParts, RelaySpec};
use crate::transport::Transport;
use crate::transport::pki_task::PkiReload;
use crate::transport::tls::{TlsAccept, TlsState};
use sticks::Sticks;

/// How often configured `[[device]]` paths are checked for appearing and vanishing.
const STATIC_DEVICE_POLL: Duration = Duration::from_millis(250);
/// Prefix of the syspath-like key of static devices.
const STATIC_PREFIX: &str = "config:";

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

/// The supervisor's side of the PKI task: what relays hand out, and how to poke the task.
pub(crate) struct PkiHandle {
    pub(crate) tls: Arc<TlsState>,
    /// Asks the PKI task to re-read `state_dir/pki` (closed when TLS is off: no task).
    pub(crate) reload: mpsc::UnboundedSender<PkiReload>,
    /// The `[tls]` settings the task works with (changed by a reload).
    pub(crate) settings: watch::Sender<PkiSettings>,
}

/// Where the config comes from, so a reload can read it again.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConfigSource {
    /// `None`: built-in defaults only.
    pub(crate) path: Option<PathBuf>,
    /// The file was named explicitly (`--config`) and must exist.
    pub(crate) required: bool,
    /// Devices added on the command line (`serve --demo`), kept across reloads.
    pub(crate) extra_devices: Vec<StaticDevice>,
}

impl ConfigSource {
    pub(crate) fn load(&self) -> Result<Config, crate::config::ConfigError> {
        let mut c = match &self.path {
            Some(p) => Config::load(p, self.required)?,
            None => Config::default(),
        };
        c.devices.extend(self.extra_devices.iter().cloned());
        Ok(c)
    }
}

/// The module table and everything that changes it.
pub(crate) struct Supervisor {
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

impl Supervisor {
    pub(crate) fn new(
        config: Arc<Config>,
        registry: Registry,
        cancel: CancellationToken,
        tracker: TaskTracker,
        pki: PkiHandle,
        source: ConfigSource,
    ) -> Self {
        let (exits_tx, exits_rx) = mpsc::channel(64);
        Supervisor {
            sticks: Sticks::new(),
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
    pub(crate) fn set_announcer(&mut self, announcer: Option<crate::discovery::Announcer>) {
        self.announcer = announcer;
    }

    /// The clock provisioning issues certificates by (the PKI task's).
    pub(crate) fn set_clock(&mut self, clock: SharedClock) {
        self.sticks.set_clock(clock);
    }

    /// Re-reads the PKI, with settings that see an operator PKI installed meanwhile.
    /// `ack` hears when the PKI task has re-read it (`Err` of the send: no task, TLS is off).
    fn refresh_pki_settings(&mut self, ack: PkiReload) -> Result<(), ()> {
        let pki = PkiSettings::from_config(&self.config);
        if *self.pki.settings.borrow() != pki {
            info!(
                event = "pki-reload",
                "the PKI source changed (an imported PKI?); reloading it"
            );
            self.pki.settings.send_replace(pki);
        }
        self.pki.reload.send(ack).map_err(|_| ())
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
        let now = self.raw.get(key).and_then(|ev| self.matcher.module_of(ev));
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
        RelaySpec::new(
            info,
            &self.config.module_settings(&info.serial),
            &self.config.limits,
        )
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
        let tty = relay::tty::Tty::open(&spec.devnode, spec.baud)?;
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
                    allow: spec.allow.clone(),
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
        let handle = relay::start(RelayParts {
            spec,
            port,
            generation: self.generation,
            listeners,
            tty,
            transport,
            parent: self.cancel.clone(),
            tracker: self.tracker.clone(),
            exits: self.exits_tx.clone(),
            announcer: self.announcer.clone(),
        })?;
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
