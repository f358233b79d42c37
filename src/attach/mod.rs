//! `lucidgate attach`: the client side. A local virtual serial port (a pty behind a fixed
//! symlink such as `/dev/lio0`) or a local TCP endpoint (`--listen 127.0.0.1:PORT`) connected
//! to a module served by `lucidgate serve`, over TLS with a client certificate by default, that
//! reconnects by itself and never goes away while the process runs.
//!
//! [`link`] owns the pty, [`listen`] the local TCP endpoint, [`local`] is either, [`connect`]
//! the way to the server, [`session`] the reconnect loop and what happens to bytes written
//! while disconnected. This module reads the attach config (`[[port]]` entries, one process for
//! several modules) and runs one session per port.

mod connect;
mod link;
mod listen;
mod local;
mod session;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, PortsConfig};
use connect::{Connector, Target, TlsFiles};
use link::Ownership;
#[cfg(target_os = "linux")]
use link::PtyPort;
use listen::TcpPort;
use local::LocalPort;
use session::{Limits, Session};

/// Largest attach config read.
const MAX_ATTACH_CONFIG_BYTES: u64 = 256 * 1024;

/// The attach config file: defaults for every port, then `[[port]]` entries.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AttachFile {
    // Defaults for every [[port]] (serde's flatten cannot be combined with deny_unknown_fields,
    // so the option fields are spelled out here and in PortEntry).
    pub(crate) ca: Option<PathBuf>,
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
    pub(crate) server_name: Option<String>,
    pub(crate) plain: Option<bool>,
    pub(crate) user: Option<String>,
    pub(crate) group: Option<String>,
    pub(crate) mode: Option<String>,
    pub(crate) hold_ms: Option<u64>,
    pub(crate) retry_max_ms: Option<u64>,
    /// Port numbering of the server, for `SERIAL@HOST` targets (default: the server's defaults).
    pub(crate) port_base: Option<u16>,
    pub(crate) port_span: Option<u16>,
    /// Interfaces to find `SERIAL` targets on by mDNS (default: all).
    #[serde(default)]
    pub(crate) mdns_interfaces: Vec<String>,
    #[serde(default)]
    pub port: Vec<PortEntry>,
}

/// Settings a `[[port]]` entry may override.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct PortOptions {
    pub(crate) ca: Option<PathBuf>,
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
    pub(crate) server_name: Option<String>,
    pub(crate) plain: Option<bool>,
    pub(crate) user: Option<String>,
    pub(crate) group: Option<String>,
    pub(crate) mode: Option<String>,
    pub(crate) hold_ms: Option<u64>,
    pub(crate) retry_max_ms: Option<u64>,
}

/// One attached module.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortEntry {
    /// `HOST:PORT`, `SERIAL@HOST[:PORT]` or `SERIAL` (found by mDNS).
    pub(crate) target: String,
    /// The symlink programs open, e.g. /dev/lio0 ...
    pub link: Option<PathBuf>,
    /// ... or a local TCP address programs connect to, e.g. 127.0.0.1:4001 (loopback unless
    /// `listen_any`).
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) listen_any: Option<bool>,
    pub(crate) ca: Option<PathBuf>,
    pub(crate) cert: Option<PathBuf>,
    pub(crate) key: Option<PathBuf>,
    pub(crate) server_name: Option<String>,
    pub(crate) plain: Option<bool>,
    pub(crate) user: Option<String>,
    pub(crate) group: Option<String>,
    pub(crate) mode: Option<String>,
    pub(crate) hold_ms: Option<u64>,
    pub(crate) retry_max_ms: Option<u64>,
}

macro_rules! options_of {
    ($v:expr) => {
        PortOptions {
            ca: $v.ca.clone(),
            cert: $v.cert.clone(),
            key: $v.key.clone(),
            server_name: $v.server_name.clone(),
            plain: $v.plain,
            user: $v.user.clone(),
            group: $v.group.clone(),
            mode: $v.mode.clone(),
            hold_ms: $v.hold_ms,
            retry_max_ms: $v.retry_max_ms,
        }
    };
}

impl AttachFile {
    /// The defaults every [[port]] starts from.
    fn defaults(&self) -> PortOptions {
        options_of!(self)
    }
}

impl PortEntry {
    fn options(&self) -> PortOptions {
        options_of!(self)
    }
}

impl PortOptions {
    /// `self` with unset fields taken from `defaults`.
    fn or(&self, defaults: &PortOptions) -> PortOptions {
        PortOptions {
            ca: self.ca.clone().or_else(|| defaults.ca.clone()),
            cert: self.cert.clone().or_else(|| defaults.cert.clone()),
            key: self.key.clone().or_else(|| defaults.key.clone()),
            server_name: self
                .server_name
                .clone()
                .or_else(|| defaults.server_name.clone()),
            plain: self.plain.or(defaults.plain),
            user: self.user.clone().or_else(|| defaults.user.clone()),
            group: self.group.clone().or_else(|| defaults.group.clone()),
            mode: self.mode.clone().or_else(|| defaults.mode.clone()),
            hold_ms: self.hold_ms.or(defaults.hold_ms),
            retry_max_ms: self.retry_max_ms.or(defaults.retry_max_ms),
        }
    }
}

/// Where programs on this machine reach an attached module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Local {
    /// A pty behind this symlink (`--link`).
    Link(PathBuf),
    /// A TCP endpoint (`--listen`); checked to be loopback unless `--listen-any`.
    Listen(SocketAddr),
}

impl std::fmt::Display for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Local::Link(p) => write!(f, "{}", p.display()),
            Local::Listen(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl Local {
    /// The local end named by a `link` and a `listen` (exactly one of them).
    pub(crate) fn of(
        link: Option<&Path>,
        listen: Option<SocketAddr>,
        listen_any: bool,
    ) -> Result<Local> {
        match (link, listen) {
            (Some(l), None) => {
                if !l.is_absolute() {
                    anyhow::bail!(
                        "link {} is not an absolute path (e.g. /dev/lio0)",
                        l.display()
                    );
                }
                Ok(Local::Link(l.to_path_buf()))
            }
            (None, Some(a)) => {
                listen::check_listen(a, listen_any).map_err(anyhow::Error::msg)?;
                Ok(Local::Listen(a))
            }
            (Some(_), Some(_)) => {
                anyhow::bail!("give either link (a serial port) or listen (a TCP port), not both")
            }
            (None, None) => anyhow::bail!(
                "no local end: give link = \"/dev/lio0\" (--link) for programs that open a serial port, or listen = \"127.0.0.1:4001\" (--listen) for programs that connect over TCP"
            ),
        }
    }
}

/// A port ready to open: everything parsed and checked.
#[derive(Debug, Clone)]
pub(crate) struct PortSpec {
    pub(crate) target: Target,
    pub(crate) local: Local,
    pub(crate) ownership: Ownership,
    pub(crate) connector: Connector,
    pub(crate) limits: Limits,
}

impl AttachFile {
    /// Reads and checks an attach config; errors name the file, the line and the field.
    pub(crate) fn load(path: &Path) -> Result<AttachFile, ConfigError> {
        let text = crate::config::read_text(path, MAX_ATTACH_CONFIG_BYTES, "attach config")?;
        let origin = path.display().to_string();
        let file: AttachFile = crate::config::parse_toml(&text, &origin)?;
        if file.port.is_empty() {
            return Err(ConfigError::Invalid {
                location: origin,
                message: "no [[port]] entry; add one with target = \"HOST:PORT\" and link = \"/dev/lio0\"".into(),
            });
        }
        Ok(file)
    }

    /// Turns every entry into a [`PortSpec`]; errors name the entry.
    pub(crate) fn specs(&self, origin: &str) -> Result<Vec<PortSpec>> {
        let defaults = PortsConfig::default();
        let base = self.port_base.unwrap_or(defaults.base);
        let span = self.port_span.unwrap_or(defaults.span);
        let mut locals = BTreeSet::new();
        let mut out = Vec::new();
        for (i, entry) in self.port.iter().enumerate() {
            let at = format!("{origin}, [[port]] #{} ({})", i + 1, entry.target);
            let local = Local::of(
                entry.link.as_deref(),
                entry.listen,
                entry.listen_any.unwrap_or(false),
            )
            .with_context(|| at.clone())?;
            if !locals.insert(local.to_string()) {
                anyhow::bail!("{at}: {local} is used by an earlier [[port]]");
            }
            let spec = spec(
                &entry.target,
                local,
                &entry.options().or(&self.defaults()),
                base,
                span,
                &self.mdns_interfaces,
            )
            .with_context(|| at.clone())?;
            out.push(spec);
        }
        Ok(out)
    }
}

/// Builds one port's spec from its options.
pub(crate) fn spec(
    target: &str,
    local: Local,
    o: &PortOptions,
    base: u16,
    span: u16,
    mdns_interfaces: &[String],
) -> Result<PortSpec> {
    let mut target = connect::parse_target(target, base, span)?;
    if let Some(ifs) = &mut target.discover {
        *ifs = mdns_interfaces.to_vec();
    }
    let connector = if o.plain.unwrap_or(false) {
        Connector::Plain
    } else {
        Connector::tls(
            &target.host,
            &TlsFiles {
                ca: o.ca.clone(),
                cert: o.cert.clone(),
                key: o.key.clone(),
                server_name: o.server_name.clone(),
            },
        )?
    };
    let mode = o
        .mode
        .as_deref()
        .map(link::parse_mode)
        .transpose()
        .map_err(|e| anyhow::anyhow!("mode {e}"))?;
    let defaults = Limits::default();
    let limits = Limits {
        hold: o
            .hold_ms
            .map(Duration::from_millis)
            .unwrap_or(defaults.hold),
        retry_min: defaults.retry_min,
        retry_max: o
            .retry_max_ms
            .map(Duration::from_millis)
            .unwrap_or(defaults.retry_max),
    };
    Ok(PortSpec {
        target,
        local,
        ownership: Ownership {
            user: o.user.clone(),
            group: o.group.clone(),
            mode,
        },
        connector,
        limits,
    })
}

/// Opens every port, then runs their sessions until SIGTERM/SIGINT; removes the links on exit.
pub(crate) fn run(specs: Vec<PortSpec>) -> Result<i32> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let mut stop = crate::stop::StopSignal::install()?;
        let cancel = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        for s in specs {
            let (port, local) = match &s.local {
                #[cfg(not(target_os = "linux"))]
                Local::Link(link) => anyhow::bail!(
                    "{}: a serial-port link (a pty) exists on Linux only; here, give programs a TCP port with --listen 127.0.0.1:PORT (listen = \"...\" in the attach config)",
                    link.display()
                ),
                #[cfg(target_os = "linux")]
                Local::Link(link) => {
                    let pty = PtyPort::open(link, &s.ownership)
                        .with_context(|| format!("creating the local port {}", link.display()))?;
                    tracing::info!(
                        "{} -> {} ({}); programs open {}",
                        link.display(),
                        pty.slave_path().display(),
                        s.target,
                        link.display()
                    );
                    (LocalPort::Pty(pty), link.display().to_string())
                }
                Local::Listen(addr) => {
                    let tcp = TcpPort::bind(*addr).await?;
                    let bound = tcp.local_addr();
                    tracing::info!(
                        "listening on {bound} for {}; programs connect to {bound} (one at a time)",
                        s.target
                    );
                    (LocalPort::Tcp(tcp), bound.to_string())
                }
            };
            // Scripts learn that the link exists (or the address, with port 0 the one chosen)
            // from this line on stdout.
            println!("{local}");
            let _ = std::io::stdout().flush();
            let span = tracing::info_span!("attach", local = %local, target = %s.target);
            let session = Session {
                target: s.target,
                connector: s.connector,
                port,
                limits: s.limits,
            };
            let c = cancel.clone();
            tasks.spawn(tracing::Instrument::instrument(session.run(c), span));
        }
        #[cfg(target_os = "linux")]
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        let why = stop.recv().await;
        tracing::info!("{why}: removing the links and stopping");
        #[cfg(target_os = "linux")]
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
        cancel.cancel();
        // Each session drops its pty (and removes its link) or its listener as it returns.
        while tasks.join_next().await.is_some() {}
        Ok(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<AttachFile, String> {
        crate::config::parse_toml(text, "attach.toml").map_err(|e| e.to_string())
    }

    #[test]
    fn a_file_with_defaults_and_ports() {
        let f = parse(
            "plain = true\nhold_ms = 500\n[[port]]\ntarget = \"pi:4001\"\nlink = \"/dev/lio0\"\n[[port]]\ntarget = \"11001001FA480000@pi\"\nlink = \"/dev/lio1\"\nmode = \"0660\"\nhold_ms = 200\n",
        )
        .unwrap();
        let specs = f.specs("attach.toml").unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].limits.hold, Duration::from_millis(500));
        assert_eq!(specs[1].limits.hold, Duration::from_millis(200));
        assert_eq!(specs[1].ownership.mode, Some(0o660));
        assert_eq!(
            specs[1].target.port,
            crate::ports::derive("11001001FA480000", 4000, 1000)
        );
    }

    #[test]
    fn bad_files_name_line_field_and_entry() {
        let e = parse("[[port]]\ntarget = \"pi:1\"\nlnk = \"/dev/x\"\n").unwrap_err();
        assert!(e.contains("line 3") && e.contains("lnk"), "{e}");
        let f = parse("plain = true\n[[port]]\ntarget = \"pi\"\nlink = \"/dev/x\"\n").unwrap();
        let e = format!("{:#}", f.specs("attach.toml").unwrap_err());
        assert!(
            e.contains("[[port]] #1 (pi)") && e.contains("has no port"),
            "{e}"
        );
        let f = parse("[[port]]\ntarget = \"pi:1\"\nlink = \"/dev/x\"\n").unwrap();
        let e = format!("{:#}", f.specs("attach.toml").unwrap_err());
        assert!(e.contains("--ca"), "{e}");
        let f = parse(
            "plain = true\n[[port]]\ntarget = \"pi:1\"\nlink = \"/dev/x\"\n[[port]]\ntarget = \"pi:2\"\nlink = \"/dev/x\"\n",
        )
        .unwrap();
        let e = format!("{:#}", f.specs("attach.toml").unwrap_err());
        assert!(e.contains("#2") && e.contains("earlier"), "{e}");
    }

    #[test]
    fn listen_entries_beside_links() {
        let f = parse(
            "plain = true\n[[port]]\ntarget = \"pi:4001\"\nlink = \"/dev/lio0\"\n[[port]]\ntarget = \"pi:4002\"\nlisten = \"127.0.0.1:5001\"\n",
        )
        .unwrap();
        let specs = f.specs("attach.toml").unwrap();
        assert_eq!(specs[0].local, Local::Link("/dev/lio0".into()));
        assert_eq!(
            specs[1].local,
            Local::Listen("127.0.0.1:5001".parse().unwrap())
        );
        let e = |text: &str| {
            format!(
                "{:#}",
                parse(text).unwrap().specs("attach.toml").unwrap_err()
            )
        };
        let err = e("plain = true\n[[port]]\ntarget = \"pi:1\"\nlisten = \"0.0.0.0:5001\"\n");
        assert!(
            err.contains("[[port]] #1") && err.contains("listen_any"),
            "{err}"
        );
        let ok = parse("plain = true\n[[port]]\ntarget = \"pi:1\"\nlisten = \"0.0.0.0:5001\"\nlisten_any = true\n").unwrap();
        assert!(ok.specs("attach.toml").is_ok());
        let err = e(
            "plain = true\n[[port]]\ntarget = \"pi:1\"\nlisten = \"127.0.0.1:5001\"\nlink = \"/dev/x\"\n",
        );
        assert!(err.contains("not both"), "{err}");
        let err = e("plain = true\n[[port]]\ntarget = \"pi:1\"\n");
        assert!(err.contains("no local end"), "{err}");
        let err = e(
            "plain = true\n[[port]]\ntarget = \"pi:1\"\nlisten = \"127.0.0.1:5001\"\n[[port]]\ntarget = \"pi:2\"\nlisten = \"127.0.0.1:5001\"\n",
        );
        assert!(err.contains("#2") && err.contains("earlier"), "{err}");
    }
}
