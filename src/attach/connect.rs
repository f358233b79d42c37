//! The network end of `attach`: where a module is served and how to reach it (TCP or TLS).
//!
//! Owns target parsing (`HOST:PORT`, `SERIAL@HOST[:PORT]`), the rustls client config built from
//! the files `lucidgate cert issue-client` writes, and turning connection failures into
//! messages that say what to fix.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;

use crate::config::check::SerialError;
use crate::transport::ClientStream;

/// How long one TCP connect may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TCP keepalive: probe an idle link after this long...
const KEEPALIVE_IDLE: Duration = Duration::from_secs(10);
/// ...every this long...
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
/// ...and give up after this many unanswered probes (a dead link is noticed in about 20 s).
const KEEPALIVE_RETRIES: u32 = 3;
/// Unacknowledged data older than this drops the connection (TCP_USER_TIMEOUT), so a request
/// sent into a dead link is noticed within a few seconds.
const USER_TIMEOUT: Duration = Duration::from_secs(10);

/// Where a module is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Target {
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The module serial the target must answer GetId with (`SERIAL@HOST`, or `SERIAL`).
    pub(crate) serial: Option<String>,
    /// `SERIAL` alone: host and port are found by mDNS on these interfaces (empty: all) before
    /// every connection attempt.
    pub(crate) discover: Option<Vec<String>>,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let (Some(s), Some(_)) = (&self.serial, &self.discover) {
            return write!(f, "{s} (found by mDNS)");
        }
        if let Some(s) = &self.serial {
            write!(f, "{s}@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Why a target (as given, `target`) is none of the forms [`parse_target`] reads; the message
/// says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TargetError {
    #[error("serial {serial:?} {why}")]
    Serial { serial: String, why: SerialError },
    #[error("{target:?}: missing ']' after the IPv6 address")]
    Bracket { target: String },
    #[error(
        "{target:?} has no host; use HOST:PORT, SERIAL@HOST (e.g. pi.local:4216), or the module's 16-digit SERIAL alone to find it by mDNS"
    )]
    NoHost { target: String },
    #[error("{target:?}: port {port:?} is not a number from 1 to 65535")]
    BadPort { target: String, port: String },
    #[error(
        "{target:?} has no port; use HOST:PORT, or SERIAL@HOST to use the module's default port"
    )]
    NoPort { target: String },
}

/// Parses `HOST:PORT`, `[V6]:PORT`, `SERIAL@HOST[:PORT]` or `SERIAL` (16 hex digits: found by
/// mDNS). Without a port, a serial's port is derived as the server does by default
/// (`ports.base + serial % ports.span`), with `base`/`span`.
pub(crate) fn parse_target(s: &str, base: u16, span: u16) -> Result<Target, TargetError> {
    let target = || s.to_string();
    if s.len() == 16 && s.chars().all(|c| c.is_ascii_hexdigit()) {
        return Ok(Target {
            host: String::new(),
            port: 0,
            serial: Some(s.to_ascii_uppercase()),
            discover: Some(Vec::new()),
        });
    }
    let (serial, rest) = match s.split_once('@') {
        Some((serial, rest)) => {
            crate::config::check_serial(serial).map_err(|why| TargetError::Serial {
                serial: serial.to_string(),
                why,
            })?;
            (Some(serial.to_ascii_uppercase()), rest)
        }
        None => (None, s),
    };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| TargetError::Bracket { target: target() })?;
        (h.to_string(), after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), Some(p)),
            None => (rest.to_string(), None),
        }
    };
    if host.is_empty() {
        return Err(TargetError::NoHost { target: target() });
    }
    let port = match (port, &serial) {
        (Some(p), _) => {
            p.parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| TargetError::BadPort {
                    target: target(),
                    port: p.to_string(),
                })?
        }
        (None, Some(serial)) => crate::ports::derive(serial, base, span),
        (None, None) => {
            return Err(TargetError::NoPort { target: target() });
        }
    };
    Ok(Target {
        host,
        port,
        serial,
        discover: None,
    })
}

/// The TLS files of a client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TlsFiles {
    /// CA certificate(s) the server must chain to (`ca.crt`).
    pub(crate) ca: Option<PathBuf>,
    /// Client certificate; may also hold the key (`NAME.pem` holds both).
    pub(crate) cert: Option<PathBuf>,
    /// The key, when it is not in `cert`.
    pub(crate) key: Option<PathBuf>,
    /// Name to verify the server certificate against (default: the host).
    pub(crate) server_name: Option<String>,
}

/// How `attach` reaches its target.
#[derive(Clone)]
pub(crate) enum Connector {
    Plain,
    Tls {
        config: Arc<rustls::ClientConfig>,
        server_name: ServerName<'static>,
        /// The name came from --server-name (else, for a target found by mDNS, the address
        /// connected to is verified).
        explicit_name: bool,
        /// For messages: the CA file the server must chain to.
        ca: PathBuf,
    },
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Connector::Plain => f.write_str("Plain"),
            Connector::Tls { server_name, .. } => write!(f, "Tls({server_name:?})"),
        }
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("reading certificates from {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{}: not a PEM certificate file", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no certificate in it", path.display());
    }
    Ok(certs)
}

impl Connector {
    /// A TLS connector for `host` from `files`; every problem names the file and the option.
    pub(crate) fn tls(host: &str, files: &TlsFiles) -> Result<Connector> {
        let ca = files.ca.clone().context(
            "TLS needs the server's CA certificate: pass --ca ca.crt (written by `lucidgate cert issue-client`), or --plain for a plain relay",
        )?;
        let mut roots = rustls::RootCertStore::empty();
        for c in read_certs(&ca).with_context(|| format!("--ca {}", ca.display()))? {
            roots
                .add(c)
                .with_context(|| format!("--ca {}: not a usable CA certificate", ca.display()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_root_certificates(roots);
        let config = match &files.cert {
            Some(cert) => {
                let chain =
                    read_certs(cert).with_context(|| format!("--cert {}", cert.display()))?;
                let key_file = files.key.as_deref().unwrap_or(cert);
                let key = PrivateKeyDer::from_pem_file(key_file).map_err(|e| {
                    anyhow::anyhow!(
                        "{}: no private key ({e}); pass NAME.pem (key and certificate) as --cert, or the key as --key",
                        key_file.display()
                    )
                })?;
                builder.with_client_auth_cert(chain, key).with_context(|| {
                    format!("{}: key does not fit the certificate", cert.display())
                })?
            }
            None => builder.with_no_client_auth(),
        };
        let name = files.server_name.as_deref().unwrap_or(if host.is_empty() {
            "localhost"
        } else {
            host
        });
        let server_name = match name.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(name.to_string())
                .map_err(|_| anyhow::anyhow!("{name:?} is not a valid server name"))?,
        };
        Ok(Connector::Tls {
            config: Arc::new(config),
            server_name,
            explicit_name: files.server_name.is_some(),
            ca,
        })
    }

    pub(crate) fn describe(&self) -> &'static str {
        match self {
            Connector::Plain => "plain TCP",
            Connector::Tls { .. } => "TLS",
        }
    }

    /// Connects to `target` (resolving its name again on every call).
    pub(crate) async fn connect(&self, target: &Target) -> Result<Box<dyn ClientStream>, String> {
        let addrs: Vec<SocketAddr> = match &target.discover {
            Some(interfaces) => discover(target, interfaces).await?,
            None => tokio::net::lookup_host((target.host.as_str(), target.port))
                .await
                .map_err(|e| format!("cannot resolve {}: {e}", target.host))?
                .collect(),
        };
        let mut last = format!("{} resolves to no address", target.host);
        let mut tcp = None;
        for addr in addrs {
            match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr)).await {
                Ok(Ok(s)) => {
                    tcp = Some((s, addr));
                    break;
                }
                Ok(Err(e)) => last = format!("connecting to {addr}: {e}"),
                Err(_) => {
                    last = format!("connecting to {addr}: no answer within {CONNECT_TIMEOUT:?}")
                }
            }
        }
        let (tcp, addr) = tcp.ok_or(last)?;
        tune(&tcp);
        match self {
            Connector::Plain => Ok(Box::new(tcp)),
            Connector::Tls {
                config,
                server_name,
                explicit_name,
                ca,
            } => {
                let connector = tokio_rustls::TlsConnector::from(config.clone());
                // A server found by mDNS is verified by the address it was reached at (its
                // certificate names every address of the device).
                let server_name = if target.discover.is_some() && !explicit_name {
                    &ServerName::IpAddress(addr.ip().into())
                } else {
                    server_name
                };
                match tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    connector.connect(server_name.clone(), tcp),
                )
                .await
                {
                    Ok(Ok(s)) => Ok(Box::new(s)),
                    Ok(Err(e)) => Err(explain_tls(&e, server_name, ca)),
                    Err(_) => Err(format!(
                        "TLS handshake did not finish within {HANDSHAKE_TIMEOUT:?} (is the relay plain? then use --plain)"
                    )),
                }
            }
        }
    }
}

/// Finds the addresses and port of `target`'s module by mDNS.
async fn discover(target: &Target, interfaces: &[String]) -> Result<Vec<SocketAddr>, String> {
    let serial = target.serial.clone().unwrap_or_default();
    let (want, ifs) = (serial.clone(), interfaces.to_vec());
    let found = tokio::task::spawn_blocking(move || {
        crate::discovery::browse(crate::discovery::BROWSE_TIMEOUT, &ifs, Some(&want))
    })
    .await
    .map_err(|e| format!("mDNS browse failed: {e}"))?
    .map_err(|e| format!("{e:#}"))?;
    let f = found
        .into_iter()
        .find(|f| f.serial.eq_ignore_ascii_case(&serial))
        .ok_or_else(|| {
            format!(
                "no lucidgate on this network announces module {serial} by mDNS (listened {:?}): is the module plugged in and served, discovery.mdns on there, and this computer on the same network segment? Otherwise use {serial}@HOST",
                crate::discovery::BROWSE_TIMEOUT
            )
        })?;
    let mut addrs: Vec<SocketAddr> = f
        .addresses
        .iter()
        // A link-local IPv6 address needs its interface scope, which is lost here.
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80))
        .map(|ip| SocketAddr::new(*ip, f.port))
        .collect();
    addrs.sort_by_key(|a| a.is_ipv6());
    if addrs.is_empty() {
        return Err(format!(
            "module {serial} is announced by {} without a usable address",
            f.host
        ));
    }
    tracing::debug!(module_serial = %serial, "found by mDNS at {} port {}", f.host, f.port);
    Ok(addrs)
}

fn tune(tcp: &TcpStream) {
    let _ = tcp.set_nodelay(true);
    let sock = socket2::SockRef::from(tcp);
    let ka = socket2::TcpKeepalive::new()
        .with_time(KEEPALIVE_IDLE)
        .with_interval(KEEPALIVE_INTERVAL)
        .with_retries(KEEPALIVE_RETRIES);
    let _ = sock.set_tcp_keepalive(&ka);
    #[cfg(target_os = "linux")]
    let _ = sock.set_tcp_user_timeout(Some(USER_TIMEOUT));
}

/// A TLS failure, said so the operator knows which file or option to fix.
fn explain_tls(e: &io::Error, server_name: &ServerName<'_>, ca: &Path) -> String {
    use rustls::{CertificateError, Error as TlsError};
    let inner = e.get_ref().and_then(|i| i.downcast_ref::<TlsError>());
    let name = server_name.to_str();
    match inner {
        Some(TlsError::InvalidCertificate(CertificateError::UnknownIssuer))
        | Some(TlsError::InvalidCertificate(CertificateError::BadSignature)) => format!(
            "the server's certificate is not signed by the CA in {} (--ca): the server has another CA; fetch its ca.crt (from `lucidgate cert issue-client` on the server)",
            ca.display()
        ),
        Some(TlsError::InvalidCertificate(CertificateError::NotValidForName))
        | Some(TlsError::InvalidCertificate(CertificateError::NotValidForNameContext { .. })) => {
            format!(
                "the server's certificate is not valid for {name:?}: connect by a name it has (see `lucidgate cert list` on the server), add the name to [tls] names there, or pass --server-name"
            )
        }
        Some(TlsError::InvalidCertificate(CertificateError::Expired))
        | Some(TlsError::InvalidCertificate(CertificateError::ExpiredContext { .. })) => {
            "the server's certificate has expired (is the clock of this computer or of the server wrong?)".to_string()
        }
        Some(TlsError::AlertReceived(alert)) => format!(
            "the server refused this client ({alert:?}): is --cert issued by the server's CA, not revoked, and allowed on this module?"
        ),
        Some(other) => format!("TLS handshake failed: {other}"),
        None => format!("TLS handshake failed: {e} (is the relay plain? then use --plain)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t = parse_target("pi.local:4216", 4000, 1000).unwrap();
        assert_eq!(
            (t.host.as_str(), t.port, t.serial),
            ("pi.local", 4216, None)
        );
        let t = parse_target("[::1]:5000", 4000, 1000).unwrap();
        assert_eq!((t.host.as_str(), t.port), ("::1", 5000));
        assert_eq!(t.to_string(), "[::1]:5000");
        let t = parse_target("11001001fa480000@pi", 4000, 1000).unwrap();
        assert_eq!(t.serial.as_deref(), Some("11001001FA480000"));
        assert_eq!(t.port, crate::ports::derive("11001001FA480000", 4000, 1000));
        let t = parse_target("11001001FA480000@pi:4001", 4000, 1000).unwrap();
        assert_eq!(t.port, 4001);
    }

    #[test]
    fn bad_targets_say_what_to_write() {
        for (bad, want) in [
            ("pi.local", "has no port"),
            (":4000", "has no host"),
            ("pi:0", "not a number"),
            ("pi:70000", "not a number"),
            ("[::1:4000", "missing ']'"),
            ("A B@pi", "serial"),
        ] {
            let e = parse_target(bad, 4000, 1000).unwrap_err().to_string();
            assert!(e.contains(want), "{bad}: {e}");
        }
    }
}
