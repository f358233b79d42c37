//! mDNS/DNS-SD: announcing each served module as a `_lucidgate._tcp` service, and finding one by
//! serial (for `lucidgate attach SERIAL` and `lucidgate discover`).
//!
//! The mdns-sd crate (pure Rust, no avahi needed) runs its own thread and sockets; lucidgate
//! only registers and withdraws services. The instance name carries class and serial
//! (`AO4 11001001FA480000`), TXT records carry `serial`, `class`, `transport`, `policy`.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mdns_sd::{IfKind, ServiceDaemon, ServiceEvent, ServiceInfo};
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

use crate::config::DiscoveryConfig;
use crate::config::check::MAX_LABEL;

/// The DNS-SD service type of a lucidgate relay.
const SERVICE_TYPE: &str = "_lucidgate._tcp.local.";
/// How long `discover` and `attach SERIAL` listen for answers by default.
pub(crate) const BROWSE_TIMEOUT: Duration = Duration::from_secs(3);
/// What is announced for one module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Announcement {
    pub(crate) serial: String,
    pub(crate) port: u16,
    /// Module class from GetId (AO4, ...), else from the USB serial, else the udev model.
    pub(crate) class: String,
    pub(crate) transport: String,
    pub(crate) policy: String,
}

/// A module found on the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Found {
    pub(crate) serial: String,
    pub(crate) class: String,
    pub(crate) transport: String,
    pub(crate) host: String,
    pub(crate) addresses: Vec<IpAddr>,
    pub(crate) port: u16,
}

/// The announcer shared by the relays (a cheap handle).
#[derive(Clone)]
pub(crate) struct Announcer {
    daemon: ServiceDaemon,
    host: String,
    /// serial → registered full name.
    registered: Arc<Mutex<BTreeMap<String, String>>>,
}

impl std::fmt::Debug for Announcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Announcer")
            .field("host", &self.host)
            .finish()
    }
}

/// Starts a DNS-SD daemon restricted to `interfaces` (all when empty).
fn service_daemon(interfaces: &[String]) -> Result<ServiceDaemon> {
    let daemon = ServiceDaemon::new().context("starting mDNS (UDP port 5353)")?;
    if !interfaces.is_empty() {
        daemon
            .disable_interface(IfKind::All)
            .context("selecting mDNS interfaces")?;
        for i in interfaces {
            daemon
                .enable_interface(IfKind::Name(i.clone()))
                .with_context(|| format!("enabling mDNS on interface {i}"))?;
        }
    }
    Ok(daemon)
}

// Announcing is the server's (Linux); browsing works everywhere.
#[cfg(target_os = "linux")]
impl Announcer {
    /// Starts announcing per `cfg`; `None` when discovery is off.
    pub(crate) fn start(cfg: &DiscoveryConfig) -> Result<Option<Announcer>> {
        if !cfg.mdns {
            return Ok(None);
        }
        let host = if cfg.hostname.is_empty() {
            let h = crate::host::name().unwrap_or_default();
            // Only the first label, made DNS-safe.
            let h: String = h
                .split('.')
                .next()
                .unwrap_or("")
                .chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
                .take(MAX_LABEL)
                .collect();
            if h.trim_matches('-').is_empty() {
                "lucidgate".to_string()
            } else {
                h.trim_matches('-').to_string()
            }
        } else {
            cfg.hostname.clone()
        };
        let daemon = service_daemon(&cfg.interfaces)?;
        info!(
            event = "mdns-started",
            "announcing modules by mDNS as {host}.local ({SERVICE_TYPE})"
        );
        Ok(Some(Announcer {
            daemon,
            host,
            registered: Arc::default(),
        }))
    }

    /// Announces (or re-announces) one module.
    pub(crate) fn announce(&self, a: &Announcement) {
        let instance = format!("{} {}", a.class, a.serial);
        let props = [
            ("serial", a.serial.as_str()),
            ("class", a.class.as_str()),
            ("transport", a.transport.as_str()),
            ("policy", a.policy.as_str()),
            ("version", env!("CARGO_PKG_VERSION")),
        ];
        let info = match ServiceInfo::new(
            SERVICE_TYPE,
            &instance,
            &format!("{}.local.", self.host),
            "",
            a.port,
            &props[..],
        ) {
            Ok(i) => i.enable_addr_auto(),
            Err(e) => {
                warn!(module_serial = %a.serial, "cannot announce module {} by mDNS: {e}", a.serial);
                return;
            }
        };
        let fullname = info.get_fullname().to_string();
        self.withdraw(&a.serial);
        match self.daemon.register(info) {
            Ok(()) => {
                info!(module_serial = %a.serial, event = "mdns-announced", "announced \"{instance}\" on port {} by mDNS", a.port);
                self.lock().insert(a.serial.clone(), fullname);
            }
            Err(e) => {
                warn!(module_serial = %a.serial, "cannot announce module {} by mDNS: {e}", a.serial)
            }
        }
    }

    /// Withdraws a module's announcement (goodbye packets), if it has one.
    pub(crate) fn withdraw(&self, serial: &str) {
        let Some(fullname) = self.lock().remove(serial) else {
            return;
        };
        match self.daemon.unregister(&fullname) {
            Ok(_) => debug!(module_serial = %serial, "withdrew {fullname} from mDNS"),
            Err(e) => warn!(module_serial = %serial, "withdrawing {fullname} from mDNS: {e}"),
        }
    }

    /// Withdraws everything and stops the mDNS thread.
    pub(crate) fn shutdown(&self) {
        let serials: Vec<String> = self.lock().keys().cloned().collect();
        for s in serials {
            self.withdraw(&s);
        }
        if let Ok(rx) = self.daemon.shutdown() {
            // Goodbyes are sent before the daemon reports it stopped.
            let _ = rx.recv_timeout(Duration::from_secs(1));
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, String>> {
        self.registered.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Browses for `_lucidgate._tcp` for up to `timeout` (on `interfaces`, all when empty). Stops
/// early once `want` (a serial) is found.
pub(crate) fn browse(
    timeout: Duration,
    interfaces: &[String],
    want: Option<&str>,
) -> Result<Vec<Found>> {
    let daemon = service_daemon(interfaces)?;
    let rx = daemon
        .browse(SERVICE_TYPE)
        .context("browsing for lucidgate modules by mDNS")?;
    let deadline = Instant::now() + timeout;
    let mut found: BTreeMap<String, Found> = BTreeMap::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        let Ok(ev) = rx.recv_timeout(left) else { break };
        if let ServiceEvent::ServiceResolved(s) = ev {
            let Some(serial) = s.get_property_val_str("serial").map(str::to_string) else {
                continue;
            };
            let mut addresses: Vec<IpAddr> =
                s.get_addresses().iter().map(|a| a.to_ip_addr()).collect();
            addresses.sort();
            let f = Found {
                class: s.get_property_val_str("class").unwrap_or("").to_string(),
                transport: s
                    .get_property_val_str("transport")
                    .unwrap_or("")
                    .to_string(),
                host: s.get_hostname().trim_end_matches('.').to_string(),
                addresses,
                port: s.get_port(),
                serial: serial.clone(),
            };
            let done = want.is_some_and(|w| w.eq_ignore_ascii_case(&serial));
            found.insert(serial, f);
            if done {
                break;
            }
        }
    }
    if let Ok(rx) = daemon.shutdown() {
        let _ = rx.recv_timeout(Duration::from_millis(500));
    }
    Ok(found.into_values().collect())
}
