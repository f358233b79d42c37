//! The built-in certificate authority: it owns `state_dir/pki`.
//!
//! Files (keys 0600, directory 0700, every write atomic):
//! `ca.key`/`ca.crt` (ECDSA P-256, long-lived), `ca-previous.crt` + `ca-previous.toml` (a rotated
//! CA still trusted until its overlap ends), `server.key`/`server.crt` (short-lived, renewed
//! automatically), `issued.toml` (ledger of client certificates and revocations), `crl.pem`.
//!
//! Writers (the daemon's PKI task and the `cert` commands) take an exclusive `flock` on
//! `.lock`, and always re-read the files under it, so the files are the only truth. A missing or
//! corrupt key next to an existing certificate is an error that names the file; lucidgate never
//! silently replaces a CA.
//!
//! [`store`] owns the files (lock, paths, ledger, previous CA; loading never writes),
//! [`issue`] makes certificates (CA, server, clients, CRL) and rotates, [`import`] takes an
//! operator's own PKI, [`settings`] reads the `[tls]` table, [`x509`] parses certificates,
//! [`rights`] is what a client certificate grants.

mod import;
mod issue;
pub(crate) mod rights;
mod settings;
mod store;
mod x509;

use std::collections::BTreeSet;
use std::fs;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use rcgen::{Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

use crate::clock::{self, Clock};
pub(crate) use import::{imported_dir, install_import};
pub(crate) use rights::Rights;
pub(crate) use settings::server_names;
pub use settings::{ExternalPki, PkiSettings};
pub(crate) use store::{Inventory, Paths};

/// Certificates are valid from this long before they are issued (clients' clocks differ).
const BACKDATE: Duration = Duration::from_secs(3600);
/// Longest client certificate lifetime `cert issue-client --days` accepts.
pub(crate) const MAX_CLIENT_DAYS: u32 = 3650;
/// Longest client name (it becomes a file name).
const MAX_CLIENT_NAME: usize = 64;
/// The CRL is reissued at least this often (its next-update horizon).
const CRL_LIFETIME: Duration = Duration::from_secs(7 * 86400);

/// What the TLS layer needs, read from the PKI.
#[derive(Debug)]
pub(crate) struct Material {
    pub(crate) server_chain: Vec<CertificateDer<'static>>,
    pub(crate) server_key: PrivateKeyDer<'static>,
    /// Serial of the server certificate (hex), to tell rotations apart.
    pub(crate) server_serial: String,
    pub(crate) roots: Vec<CertificateDer<'static>>,
    pub(crate) crls: Vec<CertificateRevocationListDer<'static>>,
    /// Serials (hex) of revoked client certificates.
    pub(crate) revoked: BTreeSet<String>,
    /// When the PKI wants to be looked at again (renewal, end of a CA overlap).
    pub(crate) next_check: SystemTime,
}

/// One client certificate in the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedClient {
    pub(crate) name: String,
    pub(crate) serial: String,
    pub(crate) issued: i64,
    pub(crate) not_after: i64,
    pub(crate) modules: Vec<String>,
    pub(crate) read_only: bool,
    /// Serial of the CA that signed it.
    pub(crate) ca_serial: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

/// A client bundle as `cert issue-client` writes it.
pub(crate) struct ClientBundle {
    pub(crate) key_pem: String,
    pub(crate) cert_pem: String,
    pub(crate) ca_pem: String,
    pub(crate) serial: String,
    pub(crate) not_after: SystemTime,
}

/// The CA's certificate and key, loaded.
struct Ca {
    key: KeyPair,
    pem: String,
    der: CertificateDer<'static>,
    serial: String,
}

impl Ca {
    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>> {
        Issuer::from_ca_cert_der(&self.der, &self.key).context("reading the CA certificate")
    }
}

/// Validates a client name (it is a certificate CN and a file name).
pub(crate) fn check_client_name(name: &str) -> Result<()> {
    if name.is_empty() || name.len() > MAX_CLIENT_NAME {
        bail!("client name must be 1 to {MAX_CLIENT_NAME} characters");
    }
    if name.starts_with('.')
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        bail!(
            "client name {name:?} may hold letters, digits, '-', '_' and '.', and must not start with '.'"
        );
    }
    Ok(())
}

/// The PKI, opened under its lock.
pub struct Pki<'c> {
    paths: Paths,
    settings: PkiSettings,
    clock: &'c dyn Clock,
    _lock: nix::fcntl::Flock<fs::File>,
}

impl Pki<'_> {
    pub(crate) fn paths(&self) -> &Paths {
        &self.paths
    }

    fn now(&self) -> SystemTime {
        self.clock.now()
    }

    fn plausible_now(&self, what: &str) -> Result<SystemTime> {
        let now = self.now();
        if let Some(why) = clock::implausible(now) {
            bail!("not {what} yet: {why}; waiting until the clock is set (NTP)");
        }
        Ok(now)
    }
}

#[cfg(test)]
mod tests {
    use super::x509::read_cert_pem;
    use super::*;
    use crate::clock::SystemClock;
    use rustls::pki_types::pem::PemObject;
    use std::os::unix::fs::PermissionsExt;
    use std::path::{Path, PathBuf};

    fn settings() -> PkiSettings {
        PkiSettings {
            server_lifetime: Duration::from_secs(30 * 86400),
            renew_fraction: 2.0 / 3.0,
            ca_lifetime: Duration::from_secs(3650 * 86400),
            extra_names: vec!["pi.example".into()],
            extra_ips: vec![],
            external: None,
        }
    }

    #[test]
    fn first_refresh_creates_ca_and_server_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let clock = SystemClock::default();
        let pki = Pki::open(dir.path(), settings(), &clock).unwrap();
        let (m, rotated) = pki.refresh().unwrap();
        assert!(rotated);
        assert_eq!(m.roots.len(), 1);
        for f in ["ca.key", "server.key"] {
            let mode = fs::metadata(dir.path().join("pki").join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let mode = fs::metadata(dir.path().join("pki"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let (_, der) = read_cert_pem(&pki.paths.server_crt()).unwrap();
        let sans = x509::CertInfo::parse(&der).unwrap().names;
        assert!(
            sans.contains("dns:pi.example") && sans.contains("ip:127.0.0.1"),
            "{sans:?}"
        );
        // A second refresh changes nothing.
        let (m2, rotated) = pki.refresh().unwrap();
        assert!(!rotated);
        assert_eq!(m.server_serial, m2.server_serial);
    }

    #[test]
    fn renewal_happens_after_two_thirds_of_the_life() {
        let dir = tempfile::tempdir().unwrap();
        let clock = SystemClock::default();
        let (first, _) = Pki::open(dir.path(), settings(), &clock)
            .unwrap()
            .refresh()
            .unwrap();
        let later = SystemClock::with_offset(19 * 86400);
        let (m, rotated) = Pki::open(dir.path(), settings(), &later)
            .unwrap()
            .refresh()
            .unwrap();
        assert!(!rotated, "19 of 30 days is before renewal");
        assert_eq!(m.server_serial, first.server_serial);
        let later = SystemClock::with_offset(21 * 86400);
        let (m, rotated) = Pki::open(dir.path(), settings(), &later)
            .unwrap()
            .refresh()
            .unwrap();
        assert!(rotated, "21 of 30 days is past renewal");
        assert_ne!(m.server_serial, first.server_serial);
    }

    #[test]
    fn an_implausible_clock_issues_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let clock = SystemClock::with_offset(-20 * 365 * 86400);
        let e = Pki::open(dir.path(), settings(), &clock)
            .unwrap()
            .refresh()
            .unwrap_err()
            .to_string();
        assert!(e.contains("built at") && e.contains("waiting"), "{e}");
        assert!(!dir.path().join("pki/ca.crt").exists());
    }

    #[test]
    fn missing_or_corrupt_ca_key_is_an_error_never_a_new_ca() {
        let dir = tempfile::tempdir().unwrap();
        let clock = SystemClock::default();
        Pki::open(dir.path(), settings(), &clock)
            .unwrap()
            .refresh()
            .unwrap();
        let key = dir.path().join("pki/ca.key");
        let ca_before = fs::read(dir.path().join("pki/ca.crt")).unwrap();
        fs::write(&key, "garbage").unwrap();
        let e = Pki::open(dir.path(), settings(), &clock)
            .unwrap()
            .refresh()
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca.key") && e.contains("backup"), "{e}");
        fs::remove_file(&key).unwrap();
        let e = Pki::open(dir.path(), settings(), &clock)
            .unwrap()
            .refresh()
            .unwrap_err()
            .to_string();
        assert!(e.contains("ca.key") && e.contains("missing"), "{e}");
        assert_eq!(fs::read(dir.path().join("pki/ca.crt")).unwrap(), ca_before);
    }

    #[test]
    fn world_readable_keys_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let clock = SystemClock::default();
        Pki::open(dir.path(), settings(), &clock)
            .unwrap()
            .refresh()
            .unwrap();
        let key = dir.path().join("pki/server.key");
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).unwrap();
        let e = Pki::open(dir.path(), settings(), &clock)
            .unwrap()
            .refresh()
            .unwrap_err()
            .to_string();
        assert!(e.contains("server.key") && e.contains("chmod 600"), "{e}");
    }

    #[test]
    fn client_certificates_carry_rights_and_can_be_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let clock = SystemClock::default();
        let pki = Pki::open(dir.path(), settings(), &clock).unwrap();
        let rights = Rights {
            modules: vec!["11001001FA480000".into()],
            read_only: true,
        };
        let b = pki.issue_client("dash", &rights, 365).unwrap();
        let der = CertificateDer::from_pem_slice(b.cert_pem.as_bytes()).unwrap();
        let id = rights::client_identity(&der).unwrap();
        assert_eq!(id.name, "dash");
        assert_eq!(id.rights, rights);
        assert_eq!(id.serial, b.serial);
        let revoked = pki.revoke("dash").unwrap();
        assert_eq!(revoked.len(), 1);
        let (m, _) = pki.refresh().unwrap();
        assert!(m.revoked.contains(&b.serial));
        assert!(
            pki.revoke("dash")
                .unwrap_err()
                .to_string()
                .contains("already revoked")
        );
        assert!(
            pki.revoke("nobody")
                .unwrap_err()
                .to_string()
                .contains("cert list")
        );
        for bad in ["", "../x", ".hidden", "a/b", &"x".repeat(65)] {
            assert!(pki.issue_client(bad, &rights, 1).is_err(), "{bad:?}");
        }
        assert!(pki.issue_client("x", &Rights::default(), 1).is_err());
        assert!(pki.issue_client("x", &rights, 0).is_err());
    }

    #[test]
    fn ca_rotation_keeps_the_old_ca_trusted_during_the_overlap() {
        let dir = tempfile::tempdir().unwrap();
        let clock = SystemClock::default();
        let pki = Pki::open(dir.path(), settings(), &clock).unwrap();
        let (m1, _) = pki.refresh().unwrap();
        pki.rotate_ca(Duration::from_secs(7 * 86400)).unwrap();
        let (m2, _) = pki.refresh().unwrap();
        assert_eq!(m2.roots.len(), 2);
        assert_ne!(m2.server_serial, m1.server_serial);
        assert!(m2.roots.contains(&m1.roots[0]));
        drop(pki);
        let later = SystemClock::with_offset(8 * 86400);
        let (m3, _) = Pki::open(dir.path(), settings(), &later)
            .unwrap()
            .refresh()
            .unwrap();
        assert_eq!(m3.roots.len(), 1);
        assert!(!m3.roots.contains(&m1.roots[0]));
    }

    /// Every file under `dir` with its bytes and modification time.
    fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, (Vec<u8>, SystemTime)> {
        let mut out = std::collections::BTreeMap::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                let m = fs::symlink_metadata(&p).unwrap();
                if m.is_dir() {
                    todo.push(p.clone());
                }
                let bytes = if m.is_file() {
                    fs::read(&p).unwrap()
                } else {
                    Vec::new()
                };
                out.insert(p, (bytes, m.modified().unwrap()));
            }
        }
        out
    }

    #[test]
    fn cert_list_reads_only_even_after_the_overlap_ended() {
        let dir = tempfile::tempdir().unwrap();
        let clock = SystemClock::default();
        let pki = Pki::open(dir.path(), settings(), &clock).unwrap();
        pki.refresh().unwrap();
        let all = Rights {
            modules: vec!["*".into()],
            read_only: false,
        };
        pki.issue_client("laptop", &all, 30).unwrap();
        pki.rotate_ca(Duration::from_secs(86400)).unwrap();
        pki.refresh().unwrap();
        assert!(pki.inventory().unwrap().previous_ca.is_some());
        drop(pki);
        // Two days on, the overlap has ended: listing must not clean up (or touch) anything.
        let later = SystemClock::with_offset(2 * 86400);
        let before = snapshot(dir.path());
        let pki = Pki::open(dir.path(), settings(), &later).unwrap();
        let listed = pki.inventory().unwrap();
        assert!(listed.previous_ca.is_none(), "{listed:?}");
        assert!(
            listed.clients.iter().any(|c| c.name == "laptop"),
            "{listed:?}"
        );
        assert_eq!(snapshot(dir.path()), before, "cert list changed the state");
        assert!(pki.paths().prev_crt().exists());
        // The daemon's refresh is what forgets the old CA.
        pki.refresh().unwrap();
        assert!(!pki.paths().prev_crt().exists());
        assert!(!pki.paths().prev_meta().exists());
    }
}
