//! How the PKI is set up: the `[tls]` table read into [`PkiSettings`], and the names and
//! addresses the server certificate must cover.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::imported_dir;

/// How the PKI is set up (from the `[tls]` config table).
#[derive(Debug, Clone, PartialEq)]
pub struct PkiSettings {
    pub server_lifetime: Duration,
    /// Renew when this fraction of the server certificate's life has passed.
    pub renew_fraction: f64,
    pub ca_lifetime: Duration,
    /// Extra names and addresses for the server certificate.
    pub extra_names: Vec<String>,
    pub extra_ips: Vec<IpAddr>,
    /// Bring your own PKI: trust bundle for clients, server chain and key.
    pub external: Option<ExternalPki>,
}

impl PkiSettings {
    /// The settings of the `[tls]` table (validated with the config).
    pub(crate) fn from_config(c: &crate::config::Config) -> PkiSettings {
        let d = |s: &str, default: u64| {
            crate::config::parse_duration(s).unwrap_or(Duration::from_secs(default))
        };
        PkiSettings {
            server_lifetime: d(&c.tls.server_cert_lifetime, 30 * 86400),
            renew_fraction: c.tls.renew_fraction,
            ca_lifetime: d(&c.tls.ca_lifetime, 3650 * 86400),
            extra_names: c.tls.names.clone(),
            extra_ips: c.tls.ips.clone(),
            external: match (&c.tls.ca_file, &c.tls.cert_file, &c.tls.key_file) {
                (Some(ca), Some(cert), Some(key)) => Some(ExternalPki {
                    ca_file: ca.clone(),
                    cert_file: cert.clone(),
                    key_file: key.clone(),
                }),
                // A PKI installed from a provisioning stick, when the config names none.
                _ => {
                    let dir = imported_dir(&c.state_dir);
                    let ext = ExternalPki {
                        ca_file: dir.join("ca.crt"),
                        cert_file: dir.join("server.crt"),
                        key_file: dir.join("server.key"),
                    };
                    (ext.ca_file.exists() && ext.cert_file.exists() && ext.key_file.exists())
                        .then_some(ext)
                }
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ExternalPki {
    pub(crate) ca_file: PathBuf,
    pub(crate) cert_file: PathBuf,
    pub(crate) key_file: PathBuf,
}

/// The names and addresses the server certificate should cover now.
pub(crate) fn server_names(settings: &PkiSettings) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    names.insert("dns:localhost".to_string());
    if let Some(h) = crate::host::name()
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
    {
        names.insert(format!("dns:{h}"));
        if !h.contains('.') {
            names.insert(format!("dns:{h}.local"));
        }
    }
    for ip in crate::host::addresses() {
        names.insert(format!("ip:{ip}"));
    }
    names.insert("ip:127.0.0.1".into());
    names.insert("ip:::1".into());
    for n in &settings.extra_names {
        names.insert(format!("dns:{n}"));
    }
    for ip in &settings.extra_ips {
        names.insert(format!("ip:{ip}"));
    }
    names
}
