//! Configuration: the TOML file, its embedded defaults and its validation.
//!
//! Every field has a default, so `lucidgate serve` runs with no file at all. Parsing is strict
//! (`deny_unknown_fields`), and every error names the file, the line and the field and says how
//! to fix it. A [`Config`] that [`Config::load`] returns has been validated as a whole: the
//! daemon never runs with a half-checked config (a reload that fails keeps the old one).

//!
//! [`check`] holds the validators of single values (serials, host names, durations, the token
//! hash), [`validate`] the checks of a whole config, [`locate`] the TOML reader whose errors name
//! file, line and field (shared by every TOML file lucidgate reads) and the in-place editor.

pub(crate) mod check;
pub(crate) mod locate;
mod validate;

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[cfg(target_os = "linux")]
pub(crate) use check::{MAX_SERIAL_LEN, parse_duration};
pub(crate) use check::{check_serial, parse_net};
use locate::find_line;
pub use locate::parse_toml;
pub(crate) use locate::read_text;

/// Where `serve`, `status`, `port` and `config check` look for the config by default.
pub(crate) const DEFAULT_CONFIG_PATH: &str = "/etc/lucidgate/lucidgate.toml";
/// A config file larger than this is refused (it is certainly not a lucidgate config).
const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Addresses the relays listen on. The IPv6 wildcard is bound v6-only, so both wildcards
    /// can be listed together.
    pub(crate) listen: Vec<IpAddr>,
    /// Where the port registry (and later the PKI) lives.
    pub(crate) state_dir: PathBuf,
    /// Unix socket for `lucidgate status`.
    pub(crate) control_socket: PathBuf,
    pub(crate) ports: PortsConfig,
    pub(crate) relay: RelayConfig,
    pub(crate) tls: TlsConfig,
    pub(crate) limits: Limits,
    pub(crate) discovery: DiscoveryConfig,
    pub(crate) metrics: MetricsConfig,
    pub(crate) provision: ProvisionConfig,
    /// Match rules in addition to the built-in ones (vendor `deciphe_it`, model `LucidIo*`).
    #[serde(rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub(crate) match_rules: Vec<MatchRule>,
    /// Turn the built-in match rules off (then only `[[match]]` rules apply).
    pub(crate) builtin_match: bool,
    /// Per-module overrides, keyed by serial number.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) modules: BTreeMap<String, ModuleOverride>,
    /// Ttys served although udev does not describe them as modules.
    #[serde(rename = "device", skip_serializing_if = "Vec::is_empty")]
    pub(crate) devices: Vec<StaticDevice>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![
                IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ],
            state_dir: PathBuf::from("/var/lib/lucidgate"),
            control_socket: PathBuf::from("/run/lucidgate/control.sock"),
            ports: PortsConfig::default(),
            relay: RelayConfig::default(),
            tls: TlsConfig::default(),
            limits: Limits::default(),
            discovery: DiscoveryConfig::default(),
            metrics: MetricsConfig::default(),
            provision: ProvisionConfig::default(),
            match_rules: Vec::new(),
            builtin_match: true,
            modules: BTreeMap::new(),
            devices: Vec::new(),
        }
    }
}

/// Announcing served modules on the local network by mDNS/DNS-SD (`_lucidgate._tcp`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct DiscoveryConfig {
    /// Announce each served module (off: nothing is sent or listened for on UDP 5353).
    pub(crate) mdns: bool,
    /// Host name announced (without `.local`); empty: the machine's host name.
    pub(crate) hostname: String,
    /// Network interfaces to announce on (e.g. `["eth0"]`); empty: all.
    pub(crate) interfaces: Vec<String>,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            mdns: true,
            hostname: String::new(),
            interfaces: Vec::new(),
        }
    }
}

/// Certificate provisioning from USB sticks (see `provision`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ProvisionConfig {
    /// Hash of the provisioning token (`lucidgate provision set-token` writes it). Unset:
    /// provisioning is off; a stick only gets a result file saying so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) token_hash: Option<String>,
    /// Look at USB sticks (FAT partitions) that are plugged in.
    pub(crate) usb: bool,
}

impl Default for ProvisionConfig {
    fn default() -> Self {
        ProvisionConfig {
            token_hash: None,
            usb: true,
        }
    }
}

/// The optional OpenMetrics (Prometheus) endpoint.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct MetricsConfig {
    /// Address to serve `GET /metrics` on, e.g. `127.0.0.1:9464`; unset: no endpoint (the
    /// counters are in `lucidgate status --json` either way).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) listen: Option<std::net::SocketAddr>,
}

/// The port rule: `base + serial % span` unless a module has a fixed or remembered port.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct PortsConfig {
    pub(crate) base: u16,
    pub(crate) span: u16,
}

impl Default for PortsConfig {
    fn default() -> Self {
        PortsConfig {
            base: 4000,
            span: 1000,
        }
    }
}

/// How relays talk to clients by default; each can be overridden per module.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RelayConfig {
    pub(crate) transport: TransportKind,
    pub(crate) policy: ClientPolicy,
    /// Line speed set on the serial port (CDC-ACM ignores it; set anyway, as the vendor does).
    pub(crate) baud: u32,
    /// Ask each module GetId when its relay starts (turn off for ttys that are not
    /// LucidControl modules: they would receive the 4 request bytes).
    pub(crate) identify: bool,
    /// Client addresses admitted to every module (networks in CIDR notation or single
    /// addresses, IPv4-mapped IPv6 peers matched as IPv4); unset: every address. Checked
    /// before the TLS handshake; on every transport, and the only guard of a plain one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) allow_from: Option<Vec<String>>,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            transport: TransportKind::Mtls,
            policy: ClientPolicy::Exclusive,
            baud: 115_200,
            identify: true,
            allow_from: None,
        }
    }
}

/// The transport a relay speaks to its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum TransportKind {
    /// TLS with client certificates (mutual authentication): the default.
    Mtls,
    /// TLS, server authentication only: any client that trusts the CA may connect.
    Tls,
    /// Raw bytes over TCP, as ser2net's `raw` mode.
    Plain,
}

impl TransportKind {
    fn is_tls(self) -> bool {
        self != TransportKind::Plain
    }
}

impl fmt::Display for TransportKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TransportKind::Mtls => "mtls",
            TransportKind::Tls => "tls",
            TransportKind::Plain => "plain",
        })
    }
}

/// What happens when a second client connects to a module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientPolicy {
    /// The first client keeps the module; later ones are refused until it leaves.
    Exclusive,
    /// The newest client wins; the previous one is disconnected.
    KickOld,
    /// Several clients at once: lucidgate parses their requests, sends the module one at a
    /// time and routes each answer to the client that asked (protocol-aware, see `relay::shared`).
    Shared,
}

impl fmt::Display for ClientPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ClientPolicy::Exclusive => "exclusive",
            ClientPolicy::KickOld => "kick-old",
            ClientPolicy::Shared => "shared",
        })
    }
}

/// The built-in CA and the server certificate (or an external PKI).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct TlsConfig {
    /// Lifetime of the server certificate (renewed automatically), e.g. "30d".
    pub(crate) server_cert_lifetime: String,
    /// Renew the server certificate when this fraction of its life has passed.
    pub(crate) renew_fraction: f64,
    /// Lifetime of the built-in CA, e.g. "3650d".
    pub(crate) ca_lifetime: String,
    /// Extra DNS names for the server certificate (hostname, hostname.local, localhost and the
    /// current addresses are always in it).
    pub(crate) names: Vec<String>,
    /// Extra IP addresses for the server certificate.
    pub(crate) ips: Vec<IpAddr>,
    /// Bring your own PKI: the CA bundle that signs client certificates ...
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) ca_file: Option<PathBuf>,
    /// ... and the server certificate chain and key (key must be mode 0600).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) cert_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) key_file: Option<PathBuf>,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            server_cert_lifetime: "30d".into(),
            renew_fraction: 2.0 / 3.0,
            ca_lifetime: "3650d".into(),
            names: Vec::new(),
            ips: Vec::new(),
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

/// Every bound and timeout of the daemon, with its default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Limits {
    /// Bytes buffered per direction per session (backpressure beyond that).
    pub(crate) buffer_bytes: usize,
    /// Connections per module being accepted or refused at once; more wait in the kernel backlog.
    pub(crate) max_pending_per_module: usize,
    /// A client that sends nothing for this long is disconnected (0: never).
    pub(crate) idle_timeout_secs: u64,
    /// TCP keepalive idle time for client connections (0: keepalive off).
    pub(crate) keepalive_secs: u64,
    /// How long a module's relay may take to stop before it is abandoned.
    pub(crate) stop_timeout_ms: u64,
    /// Pause before retrying a relay that failed to start (port busy, device not openable).
    pub(crate) retry_ms: u64,
    /// Most modules served at once (udev devices beyond this are refused with a log line).
    pub(crate) max_modules: usize,
    /// Most control-socket connections handled at once.
    pub(crate) max_control_clients: usize,
    /// A TLS handshake must finish within this time (slow or stuck peers are cut).
    pub(crate) handshake_timeout_ms: u64,
    /// TLS handshakes in progress at once, across all modules.
    pub(crate) max_handshakes: usize,
    /// Clients of one module at once with `policy = "shared"` (more are refused with a log line).
    pub(crate) max_clients_per_module: usize,
    /// How long lucidgate waits for a module's answer when it speaks the protocol itself
    /// (GetId at start, shared mode, read-only clients); the protocol says about 1 s.
    pub(crate) answer_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            buffer_bytes: 16 * 1024,
            max_pending_per_module: 16,
            idle_timeout_secs: 0,
            keepalive_secs: 60,
            stop_timeout_ms: 2_000,
            retry_ms: 1_000,
            max_modules: 128,
            max_control_clients: 8,
            handshake_timeout_ms: 10_000,
            max_handshakes: 64,
            max_clients_per_module: 16,
            answer_timeout_ms: 1_000,
        }
    }
}

/// One match rule: every field given must match (glob patterns), unset fields match anything.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct MatchRule {
    /// `ID_VENDOR`, e.g. `deciphe_it`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) vendor: Option<String>,
    /// `ID_MODEL`, e.g. `LucidIo*`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) model: Option<String>,
    /// `ID_VENDOR_ID` (4 hex digits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) vendor_id: Option<String>,
    /// `ID_MODEL_ID` (4 hex digits).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) product_id: Option<String>,
}

/// `[modules."SERIAL"]`: settings for one module.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ModuleOverride {
    /// A fixed port; never probed away from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) port: Option<u16>,
    /// `false`: the module is not served even when plugged in.
    pub(crate) enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) baud: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) policy: Option<ClientPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) transport: Option<TransportKind>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) identify: Option<bool>,
    /// Only these client names (certificate CN) may use the module; overrides the rights in
    /// client certificates.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) allow: Option<Vec<String>>,
    /// Client addresses admitted to this module, instead of `[relay] allow_from`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) allow_from: Option<Vec<String>>,
    /// Addresses this module listens on, instead of the top-level `listen` (e.g.
    /// `["127.0.0.1"]`: reachable through an SSH tunnel only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) listen: Option<Vec<IpAddr>>,
}

impl Default for ModuleOverride {
    fn default() -> Self {
        ModuleOverride {
            port: None,
            enabled: true,
            baud: None,
            policy: None,
            transport: None,
            identify: None,
            allow: None,
            allow_from: None,
            listen: None,
        }
    }
}

/// `[[device]]`: a tty served as a module without udev's word for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StaticDevice {
    pub(crate) path: PathBuf,
    pub(crate) serial: String,
    #[serde(default = "StaticDevice::default_model")]
    pub(crate) model: String,
}

impl StaticDevice {
    fn default_model() -> String {
        "static".to_string()
    }
}

/// A config that could not be read or is not valid. Its message names the file, the line (where
/// known) and the field, and says what to do.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}{hint}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
        hint: &'static str,
    },
    #[error("{location}: {message}")]
    Invalid { location: String, message: String },
}

/// The settings a module ends up with after defaults and its override are merged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleSettings {
    pub(crate) enabled: bool,
    pub fixed_port: Option<u16>,
    pub(crate) baud: u32,
    pub policy: ClientPolicy,
    pub(crate) transport: TransportKind,
    pub(crate) identify: bool,
    pub(crate) allow: Option<Vec<String>>,
    /// Client addresses admitted; `None`: every address.
    pub(crate) allow_from: Option<Vec<ipnet::IpNet>>,
    /// The addresses the module's port is bound on.
    pub(crate) listen: Vec<IpAddr>,
}

impl Config {
    /// Loads `path`. With `required == false` a missing file means "all defaults" (the default
    /// path need not exist); an explicitly named file must exist.
    pub(crate) fn load(path: &Path, required: bool) -> Result<Config, ConfigError> {
        match std::fs::metadata(path) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::default());
            }
            Err(e) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    hint: if e.kind() == std::io::ErrorKind::NotFound {
                        " (check the --config path; without --config the embedded defaults are used)"
                    } else {
                        ""
                    },
                    source: e,
                });
            }
        }
        let text = read_text(path, MAX_CONFIG_BYTES, "config")?;
        Config::parse(&text, &path.display().to_string())
    }

    /// Parses and validates config text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = parse_toml(text, origin)?;
        config.validate().map_err(|(table, key, message)| {
            let line = find_line(text, &table, &key);
            let field = if table.is_empty() {
                key.clone()
            } else {
                format!("{table}.{key}")
            };
            ConfigError::Invalid {
                location: match line {
                    Some(l) => format!("{origin}, line {l}, field `{field}`"),
                    None => format!("{origin}, field `{field}`"),
                },
                message,
            }
        })?;
        Ok(config)
    }
    /// The settings of module `serial`: its override merged over the relay defaults.
    pub fn module_settings(&self, serial: &str) -> ModuleSettings {
        let o = self.modules.get(serial).cloned().unwrap_or_default();
        ModuleSettings {
            enabled: o.enabled,
            fixed_port: o.port,
            baud: o.baud.unwrap_or(self.relay.baud),
            policy: o.policy.unwrap_or(self.relay.policy),
            transport: o.transport.unwrap_or(self.relay.transport),
            identify: o.identify.unwrap_or(self.relay.identify),
            allow: o.allow,
            // Validated when the config was loaded: nothing is dropped here.
            allow_from: o
                .allow_from
                .as_ref()
                .or(self.relay.allow_from.as_ref())
                .map(|list| list.iter().filter_map(|s| parse_net(s).ok()).collect()),
            listen: o.listen.unwrap_or_else(|| self.listen.clone()),
        }
    }

    /// Whether any module may be served over TLS (then the PKI is needed).
    pub(crate) fn uses_tls(&self) -> bool {
        self.relay.transport.is_tls()
            || self
                .modules
                .values()
                .any(|m| m.transport.is_some_and(TransportKind::is_tls))
    }

    /// The rules devices are matched with: built-in ones (unless turned off) then config's.
    pub(crate) fn effective_match_rules(&self) -> Vec<MatchRule> {
        let mut rules = Vec::new();
        if self.builtin_match {
            rules.push(MatchRule {
                vendor: Some("deciphe_it".into()),
                ..Default::default()
            });
            rules.push(MatchRule {
                model: Some("LucidIo*".into()),
                ..Default::default()
            });
        }
        rules.extend(self.match_rules.iter().cloned());
        rules
    }

    /// The effective config as TOML (what `config check` prints).
    pub(crate) fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot print config: {e}\n"))
    }
}

#[cfg(test)]
mod tests {
    use super::locate::{field_at, line_col};
    use super::*;

    fn err_of(text: &str) -> String {
        Config::parse(text, "test.toml").unwrap_err().to_string()
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(Config::parse("", "x").unwrap(), Config::default());
    }

    #[test]
    fn defaults_round_trip_through_toml() {
        let c = Config::default();
        assert_eq!(Config::parse(&c.to_toml(), "printed").unwrap(), c);
    }

    #[test]
    fn full_example_parses() {
        let c = Config::parse(
            r#"
listen = ["127.0.0.1"]
state_dir = "/tmp/lg"
[ports]
base = 5000
span = 100
[relay]
policy = "kick-old"
[[match]]
vendor_id = "04d8"
[modules."11001001FA480000"]
port = 4001
baud = 9600
[modules."AAAA"]
enabled = false
[[device]]
path = "/dev/ttyUSB0"
serial = "DEADBEEF"
"#,
            "x",
        )
        .unwrap();
        assert_eq!(c.ports.base, 5000);
        let s = c.module_settings("11001001FA480000");
        assert_eq!(s.fixed_port, Some(4001));
        assert_eq!(s.baud, 9600);
        assert_eq!(s.policy, ClientPolicy::KickOld);
        assert!(!c.module_settings("AAAA").enabled);
        assert_eq!(c.effective_match_rules().len(), 3);
        assert_eq!(c.devices[0].model, "static");
    }

    /// Every bad input names the line and the field; none panics.
    #[test]
    fn bad_inputs_name_line_and_field() {
        let cases: &[(&str, &[&str])] = &[
            (
                "lisen = []",
                &["line 1", "unknown field `lisen`", "config check"],
            ),
            ("[ports]\nbase = 70000", &["line 2", "`ports.base`"]),
            ("[ports]\nbase = \"x\"", &["line 2", "`ports.base`"]),
            (
                "[ports]\nspan = 0",
                &["line 2", "`ports.span`", "1 or more"],
            ),
            (
                "[ports]\nbase = 65000\nspan = 1000",
                &["line 3", "`ports.span`", "65535"],
            ),
            ("listen = []", &["line 1", "`listen`"]),
            ("listen = [\"999.1.1.1\"]", &["line 1", "listen"]),
            (
                "[relay]\npolicy = \"shared-ish\"",
                &["line 2", "`relay.policy`"],
            ),
            ("[relay]\nbaud = 0", &["line 2", "`relay.baud`"]),
            (
                "[limits]\nbuffer_bytes = 1",
                &["line 2", "`limits.buffer_bytes`"],
            ),
            (
                "[limits]\nmax_modules = 0",
                &["line 2", "`limits.max_modules`"],
            ),
            ("[limits]\nfoo = 1", &["line 2", "unknown field `foo`"]),
            ("[[match]]\n", &["`match.vendor`", "no field"]),
            (
                "[[match]]\nmodel = \"[\"",
                &["line 2", "`match.model`", "bad pattern"],
            ),
            ("[modules.\"A B\"]\nport = 1", &["line 1", "contains ' '"]),
            (
                "[modules.\"AB\"]\nport = 0",
                &["line 2", "`modules.\"AB\".port`"],
            ),
            (
                "[modules.\"AB\"]\nport = 4001\n[modules.\"CD\"]\nport = 4001",
                &["line 4", "also given to module AB"],
            ),
            (
                "[modules.\"AB\"]\nprot = 4001",
                &["line 2", "unknown field `prot`"],
            ),
            (
                "[[device]]\npath = \"dev/x\"\nserial = \"A\"",
                &["line 2", "absolute"],
            ),
            (
                "[[device]]\npath = \"/dev/x\"",
                &["line 1", "missing field `serial`"],
            ),
            (
                "[[device]]\npath = \"/dev/x\"\nserial = \"A\"\n[[device]]\npath = \"/dev/y\"\nserial = \"A\"",
                &["listed twice"],
            ),
            ("ports = 3", &["line 1", "`ports`"]),
            ("[ports\nbase = 1", &["line 1"]),
            ("= = =", &["line 1"]),
        ];
        for (text, wants) in cases {
            let e = err_of(text);
            assert!(e.starts_with("test.toml"), "{text:?} -> {e}");
            for w in *wants {
                assert!(e.contains(w), "{text:?}: error {e:?} lacks {w:?}");
            }
        }
    }

    #[test]
    fn garbage_never_panics() {
        let pieces = [
            "[",
            "]",
            "=",
            "\"",
            "ports",
            "base",
            "1",
            "\n",
            "[[device]]",
            "modules.",
            "'",
            "#",
            "{",
            "}",
            ",",
            "-1",
            "99999999999999999999",
            "true",
            "\u{0}",
            "é",
        ];
        let mut seed = 7u64;
        for _ in 0..3000 {
            let mut s = String::new();
            for _ in 0..(seed % 12) {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                s.push_str(pieces[(seed >> 33) as usize % pieces.len()]);
            }
            let _ = Config::parse(&s, "fuzz");
        }
    }

    #[test]
    fn field_paths_are_read_from_the_file_and_never_panic() {
        let text = "# c\n[ports]\nbase = 1\n[[device]]\npath = \"/a\"\n[[device]]\nserial = [\n  1,\n]\n[modules.\"AB\"]\nport = 2\n";
        let at = |needle: &str| field_at(text, text.find(needle).unwrap());
        assert_eq!(at("1\n[[").as_deref(), Some("ports.base"));
        assert_eq!(at("\"/a\"").as_deref(), Some("device[1].path"));
        assert_eq!(at("1,").as_deref(), Some("device[2].serial"));
        assert_eq!(at("2\n").as_deref(), Some("modules.\"AB\".port"));
        // Every offset of odd texts, multibyte characters included.
        let odd = "é=\n[[ä]]\n= =\n[x\n\"ü\" = [\n\n]\n";
        for t in [text, odd, "", "\n", "[", "[[", "a", "é"] {
            for o in 0..=t.len() + 2 {
                let _ = field_at(t, o);
                let _ = line_col(t, o);
            }
        }
    }

    #[test]
    fn missing_default_file_means_defaults_but_named_file_must_exist() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("none.toml");
        assert_eq!(Config::load(&p, false).unwrap(), Config::default());
        let e = Config::load(&p, true).unwrap_err().to_string();
        assert!(e.contains("none.toml") && e.contains("--config"), "{e}");
        std::fs::write(&p, [0xff, 0xfe]).unwrap();
        let e = Config::load(&p, true).unwrap_err().to_string();
        assert!(e.contains("UTF-8"), "{e}");
    }
}
