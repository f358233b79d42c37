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

pub mod rights;
pub mod task;

use std::collections::BTreeSet;
use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, SanType,
    SerialNumber,
};
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, pem::PemObject,
};
use serde::{Deserialize, Serialize};

use crate::clock::{self, Clock};
use crate::state;
pub use rights::{ClientIdentity, Rights};

/// Certificates are valid from this long before they are issued (clients' clocks differ).
const BACKDATE: Duration = Duration::from_secs(3600);
/// Longest client certificate lifetime `cert issue-client --days` accepts.
pub const MAX_CLIENT_DAYS: u32 = 3650;
/// Longest client name (it becomes a file name).
pub const MAX_CLIENT_NAME: usize = 64;
/// The CRL is reissued at least this often (its next-update horizon).
const CRL_LIFETIME: Duration = Duration::from_secs(7 * 86400);

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
    pub fn from_config(c: &crate::config::Config) -> PkiSettings {
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
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// What the TLS layer needs, read from the PKI.
#[derive(Debug)]
pub struct Material {
    pub server_chain: Vec<CertificateDer<'static>>,
    pub server_key: PrivateKeyDer<'static>,
    /// Serial of the server certificate (hex), to tell rotations apart.
    pub server_serial: String,
    pub roots: Vec<CertificateDer<'static>>,
    pub crls: Vec<CertificateRevocationListDer<'static>>,
    /// Serials (hex) of revoked client certificates.
    pub revoked: BTreeSet<String>,
    /// When the PKI wants to be looked at again (renewal, end of a CA overlap).
    pub next_check: SystemTime,
}

/// One client certificate in the ledger.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IssuedClient {
    pub name: String,
    pub serial: String,
    pub issued: i64,
    pub not_after: i64,
    pub modules: Vec<String>,
    pub read_only: bool,
    /// Serial of the CA that signed it.
    pub ca_serial: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<i64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ledger {
    #[serde(default)]
    crl_number: u64,
    #[serde(default)]
    client: Vec<IssuedClient>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PreviousCa {
    /// Trusted until this UNIX time.
    trusted_until: i64,
}

/// A client bundle as `cert issue-client` writes it.
pub struct ClientBundle {
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
    pub serial: String,
    pub not_after: SystemTime,
}

/// Paths inside the PKI directory.
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn new(state_dir: &Path) -> Paths {
        Paths {
            dir: state_dir.join("pki"),
        }
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn ca_crt(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn prev_crt(&self) -> PathBuf {
        self.dir.join("ca-previous.crt")
    }
    pub fn prev_meta(&self) -> PathBuf {
        self.dir.join("ca-previous.toml")
    }
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub fn server_crt(&self) -> PathBuf {
        self.dir.join("server.crt")
    }
    pub fn ledger(&self) -> PathBuf {
        self.dir.join("issued.toml")
    }
    pub fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }
    fn lock(&self) -> PathBuf {
        self.dir.join(".lock")
    }
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

/// Reads a private key, refusing one that others can read.
pub fn read_private_key(path: &Path) -> Result<String> {
    let meta =
        fs::metadata(path).with_context(|| format!("reading key file {}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "refusing to use key file {}: it is readable by others (mode {mode:04o}); run `chmod 600 {}`",
            path.display(),
            path.display()
        );
    }
    fs::read_to_string(path).with_context(|| format!("reading key file {}", path.display()))
}

fn read_cert_pem(path: &Path) -> Result<(String, CertificateDer<'static>)> {
    let pem = fs::read_to_string(path)
        .with_context(|| format!("reading certificate {}", path.display()))?;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
        anyhow::anyhow!(
            "{} holds no PEM certificate ({e}); restore it from a backup",
            path.display()
        )
    })?;
    Ok((pem, der))
}

fn random_serial() -> Result<SerialNumber> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness for a certificate serial"))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x10; // positive, and no leading zero byte to trim
    Ok(SerialNumber::from_slice(&bytes))
}

fn new_key() -> Result<KeyPair> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating an ECDSA P-256 key")
}

fn odt(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

fn not_after_of(der: &[u8]) -> Result<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("unreadable certificate: {e}"))?;
    let ts = cert.validity().not_after.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64))
}

/// Whether the certificate `der` is for the key `key` (same SubjectPublicKeyInfo).
fn cert_matches_key(der: &[u8], key: &KeyPair) -> Result<bool> {
    use rcgen::PublicKeyData;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("unreadable certificate: {e}"))?;
    Ok(cert.public_key().raw == key.subject_public_key_info().as_slice())
}

fn not_before_of(der: &[u8]) -> Result<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("unreadable certificate: {e}"))?;
    let ts = cert.validity().not_before.timestamp();
    Ok(SystemTime::UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64))
}

/// Issuer serial and SAN strings of a certificate, for "does it still fit" checks.
fn describe_server(der: &[u8]) -> Result<(String, BTreeSet<String>, String)> {
    use x509_parser::prelude::*;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("unreadable certificate: {e}"))?;
    let mut sans = BTreeSet::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for gn in &san.value.general_names {
            match gn {
                GeneralName::DNSName(d) => {
                    sans.insert(format!("dns:{d}"));
                }
                GeneralName::IPAddress(b) => {
                    let ip: Option<IpAddr> = match b.len() {
                        4 => Some(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())),
                        16 => Some(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())),
                        _ => None,
                    };
                    if let Some(ip) = ip {
                        sans.insert(format!("ip:{ip}"));
                    }
                }
                _ => {}
            }
        }
    }
    let aki = cert
        .iter_extensions()
        .find_map(|e| match e.parsed_extension() {
            ParsedExtension::AuthorityKeyIdentifier(a) => {
                a.key_identifier.as_ref().map(|k| rights::hex(k.0))
            }
            _ => None,
        })
        .unwrap_or_default();
    Ok((rights::hex(cert.raw_serial()), sans, aki))
}

fn key_id(der: &[u8]) -> String {
    use x509_parser::prelude::*;
    x509_parser::parse_x509_certificate(der)
        .ok()
        .and_then(|(_, c)| {
            c.iter_extensions()
                .find_map(|e| match e.parsed_extension() {
                    ParsedExtension::SubjectKeyIdentifier(k) => Some(rights::hex(k.0)),
                    _ => None,
                })
        })
        .unwrap_or_default()
}

/// The names and addresses the server certificate should cover now.
pub fn server_names(settings: &PkiSettings) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    names.insert("dns:localhost".to_string());
    if let Ok(h) = nix::unistd::gethostname() {
        let h = h.to_string_lossy().to_string();
        if !h.is_empty()
            && h.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
        {
            names.insert(format!("dns:{h}"));
            if !h.contains('.') {
                names.insert(format!("dns:{h}.local"));
            }
        }
    }
    if let Ok(addrs) = nix::ifaddrs::getifaddrs() {
        for a in addrs {
            let ip: Option<IpAddr> = a.address.and_then(|s| {
                s.as_sockaddr_in()
                    .map(|v4| IpAddr::V4(v4.ip()))
                    .or_else(|| s.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip())))
            });
            if let Some(ip) = ip {
                // Link-local v6 addresses need a scope and are not used to reach a Pi.
                if let IpAddr::V6(v6) = ip
                    && (v6.segments()[0] & 0xffc0) == 0xfe80
                {
                    continue;
                }
                names.insert(format!("ip:{ip}"));
            }
        }
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

/// Where a PKI installed from a provisioning stick lives (used when `[tls]` names no files).
pub fn imported_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pki").join("imported")
}

/// Checks an operator's PKI (CA bundle, server chain, server key, as PEM) and installs it into
/// [`imported_dir`]: the key must belong to the certificate and the certificate must be issued
/// by a CA of the bundle. Returns a summary for logs.
pub fn install_import(state_dir: &Path, ca: &[u8], cert: &[u8], key: &[u8]) -> Result<String> {
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(ca)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("import.ca is not PEM certificates: {e}"))?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|e| anyhow::anyhow!("import.cert is not PEM certificates: {e}"))?;
    let (Some(root), Some(leaf)) = (roots.first(), chain.first()) else {
        bail!("import.ca and import.cert must each hold at least one certificate");
    };
    let private = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| anyhow::anyhow!("import.key is not a PEM private key: {e}"))?;
    let provider = rustls::crypto::ring::default_provider();
    rustls::sign::CertifiedKey::from_der(chain.clone(), private, &provider)
        .map_err(|e| anyhow::anyhow!("import.key does not belong to import.cert: {e}"))?;
    let (_, leaf_x) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| anyhow::anyhow!("import.cert is not readable: {e}"))?;
    let issuers: Vec<_> = roots
        .iter()
        .chain(chain.iter().skip(1))
        .filter_map(|c| {
            x509_parser::parse_x509_certificate(c)
                .ok()
                .map(|(_, x)| x.subject().to_string())
        })
        .collect();
    if !issuers.contains(&leaf_x.issuer().to_string()) {
        bail!(
            "import.cert is issued by {:?}, which is not in import.ca (or the chain in import.cert)",
            leaf_x.issuer().to_string()
        );
    }
    let root_name = x509_parser::parse_x509_certificate(root)
        .map(|(_, x)| x.subject().to_string())
        .unwrap_or_default();
    let dir = imported_dir(state_dir);
    state::ensure_private_dir(state_dir)?;
    state::ensure_private_dir(&dir)?;
    // Key first: a cut between the files leaves no usable set (all three are needed) rather
    // than a certificate without its key.
    state::write_atomic(&dir.join("server.key"), key, 0o600)?;
    state::write_atomic(&dir.join("server.crt"), cert, 0o644)?;
    state::write_atomic(&dir.join("ca.crt"), ca, 0o644)?;
    Ok(format!(
        "CA {root_name:?}, server certificate {:?}",
        leaf_x.subject().to_string()
    ))
}

/// Validates a client name (it is a certificate CN and a file name).
pub fn check_client_name(name: &str) -> Result<()> {
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

impl<'c> Pki<'c> {
    /// Opens (and locks) the PKI directory under `state_dir`, creating it if needed.
    pub fn open(state_dir: &Path, settings: PkiSettings, clock: &'c dyn Clock) -> Result<Pki<'c>> {
        let paths = Paths::new(state_dir);
        state::ensure_private_dir(state_dir)?;
        state::ensure_private_dir(&paths.dir)?;
        let lock_file = state::open_or_create(&paths.lock(), 0o600)?;
        let lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", paths.lock().display()))?;
        // Under the lock: finish or undo what a crash (power cut) interrupted.
        for line in state::recover_group(&paths.dir)? {
            tracing::warn!(event = "state-recovered", "{line}");
        }
        Ok(Pki {
            paths,
            settings,
            clock,
            _lock: lock,
        })
    }

    pub fn paths(&self) -> &Paths {
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

    fn load_ca(&self) -> Result<Option<Ca>> {
        let (kp, cp) = (self.paths.ca_key(), self.paths.ca_crt());
        match (kp.exists(), cp.exists()) {
            (false, false) => Ok(None),
            (true, false) => bail!(
                "{} exists but {} is missing; restore the CA certificate from a backup (lucidgate will not make a new CA over an existing key)",
                kp.display(),
                cp.display()
            ),
            (false, true) => bail!(
                "{} exists but its key {} is missing; restore the key from a backup, or move the pki directory aside to start a new CA (all client certificates must then be reissued)",
                cp.display(),
                kp.display()
            ),
            (true, true) => {
                let key_pem = read_private_key(&kp)?;
                let key = KeyPair::from_pem(&key_pem).map_err(|e| {
                    anyhow::anyhow!(
                        "{} is not a usable private key ({e}); restore it from a backup",
                        kp.display()
                    )
                })?;
                let (pem, der) = read_cert_pem(&cp)?;
                let serial = describe_server(&der)
                    .with_context(|| format!("reading {}", cp.display()))?
                    .0;
                if !cert_matches_key(&der, &key)? {
                    bail!(
                        "{} is not the certificate of the key {}; restore the pair from a backup (lucidgate will not make a new CA over an existing key)",
                        cp.display(),
                        kp.display()
                    );
                }
                Ok(Some(Ca {
                    key,
                    pem,
                    der,
                    serial,
                }))
            }
        }
    }

    fn create_ca(&self) -> Result<Ca> {
        let now = self.plausible_now("creating the CA")?;
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "lucidgate".into());
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        // A unique subject per CA: after a rotation the old and the new CA must not share a
        // name, or path building picks the wrong one for old clients.
        let serial = random_serial()?;
        let tag: String = rights::hex(&serial.to_bytes()).chars().take(8).collect();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("lucidgate CA {host} {tag}"));
        params
            .distinguished_name
            .push(DnType::OrganizationName, "lucidgate");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = odt(now - BACKDATE);
        params.not_after = odt(now + self.settings.ca_lifetime);
        params.serial_number = Some(serial);
        params.key_identifier_method = KeyIdMethod::Sha256;
        let key = new_key()?;
        let cert = params.self_signed(&key)?;
        let der = cert.der().clone();
        let serial = describe_server(&der)?.0;
        Ok(Ca {
            pem: cert.pem(),
            der,
            key,
            serial,
        })
    }

    fn write_ca(&self, ca: &Ca) -> Result<()> {
        state::write_group(
            &self.paths.dir,
            &[
                ("ca.key", ca.key.serialize_pem().as_bytes(), 0o600),
                ("ca.crt", ca.pem.as_bytes(), 0o644),
            ],
        )
    }

    fn ca_or_create(&self) -> Result<Ca> {
        match self.load_ca()? {
            Some(ca) => Ok(ca),
            None => {
                let ca = self.create_ca()?;
                self.write_ca(&ca)?;
                tracing::info!(
                    event = "ca-created",
                    "created the lucidgate CA in {}",
                    self.paths.dir.display()
                );
                Ok(ca)
            }
        }
    }

    fn load_ledger(&self) -> Result<Ledger> {
        let p = self.paths.ledger();
        match fs::read_to_string(&p) {
            Ok(t) => toml::from_str(&t).map_err(|e| {
                anyhow::anyhow!(
                    "{} is corrupt ({}); restore it from a backup (it lists issued and revoked client certificates)",
                    p.display(),
                    e.message()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Ledger::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    fn ledger_text(ledger: &Ledger) -> Result<String> {
        let mut text = String::from(
            "# lucidgate: client certificates issued by this device's CA. Written by lucidgate.\n",
        );
        text.push_str(&toml::to_string(ledger).context("serialising the ledger")?);
        Ok(text)
    }

    fn save_ledger(&self, ledger: &Ledger) -> Result<()> {
        state::write_atomic(
            &self.paths.ledger(),
            Self::ledger_text(ledger)?.as_bytes(),
            0o600,
        )
    }

    /// Signs a new CRL from `ledger` and saves both as one (a revocation is in both or in
    /// neither, whatever a crash interrupts).
    fn save_ledger_and_crl(&self, ca: &Ca, ledger: &mut Ledger) -> Result<()> {
        let crl = self.crl_pem(ca, ledger)?;
        state::write_group(
            &self.paths.dir,
            &[
                ("crl.pem", crl.as_bytes(), 0o644),
                ("issued.toml", Self::ledger_text(ledger)?.as_bytes(), 0o600),
            ],
        )
    }

    /// The previous CA and the end of its overlap, if it is still trusted at `now`. Only reads:
    /// the files of an ended overlap stay until [`Pki::refresh`] removes them, so `cert list`
    /// and other readers never change the state.
    fn previous_ca(
        &self,
        now: SystemTime,
    ) -> Result<Option<(CertificateDer<'static>, SystemTime)>> {
        match self.previous_ca_until()? {
            Some(until) if now < until => {
                Ok(Some((read_cert_pem(&self.paths.prev_crt())?.1, until)))
            }
            _ => Ok(None),
        }
    }

    /// When the previous CA's overlap ends (None: there is no previous CA).
    fn previous_ca_until(&self) -> Result<Option<SystemTime>> {
        let (cp, mp) = (self.paths.prev_crt(), self.paths.prev_meta());
        if !cp.exists() {
            return Ok(None);
        }
        let meta: PreviousCa = toml::from_str(
            &fs::read_to_string(&mp).with_context(|| format!("reading {}", mp.display()))?,
        )
        .map_err(|e| anyhow::anyhow!("{} is corrupt: {}", mp.display(), e.message()))?;
        Ok(Some(
            SystemTime::UNIX_EPOCH + Duration::from_secs(meta.trusted_until.max(0) as u64),
        ))
    }

    /// Removes the previous CA once its overlap is over (part of [`Pki::refresh`]).
    fn forget_ended_overlap(&self, now: SystemTime) -> Result<()> {
        if self.previous_ca_until()?.is_some_and(|until| now >= until) {
            let _ = fs::remove_file(self.paths.prev_crt());
            let _ = fs::remove_file(self.paths.prev_meta());
            tracing::info!(
                event = "ca-overlap-ended",
                "the previous CA is no longer trusted (overlap ended)"
            );
        }
        Ok(())
    }

    fn issue_server(&self, ca: &Ca, names: &BTreeSet<String>) -> Result<()> {
        let now = self.plausible_now("issuing the server certificate")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let host = nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_else(|_| "lucidgate".into());
        params.distinguished_name.push(DnType::CommonName, host);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "lucidgate");
        for n in names {
            if let Some(d) = n.strip_prefix("dns:") {
                params
                    .subject_alt_names
                    .push(SanType::DnsName(d.try_into()?));
            } else if let Some(ip) = n.strip_prefix("ip:").and_then(|s| s.parse().ok()) {
                params.subject_alt_names.push(SanType::IpAddress(ip));
            }
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = odt(now - BACKDATE);
        params.not_after = odt(now + self.settings.server_lifetime);
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
        let key = new_key()?;
        let cert = params.signed_by(&key, &ca.issuer()?)?;
        state::write_group(
            &self.paths.dir,
            &[
                ("server.key", key.serialize_pem().as_bytes(), 0o600),
                ("server.crt", cert.pem().as_bytes(), 0o644),
            ],
        )
    }

    /// When the server certificate read from `der` should be renewed.
    fn renew_at(&self, der: &[u8]) -> Result<SystemTime> {
        let nb = not_before_of(der)? + BACKDATE;
        let na = not_after_of(der)?;
        let life = na.duration_since(nb).unwrap_or_default();
        Ok(nb + life.mul_f64(self.settings.renew_fraction.clamp(0.05, 0.95)))
    }

    fn crl_pem(&self, ca: &Ca, ledger: &mut Ledger) -> Result<String> {
        let now = self.plausible_now("signing the revocation list")?;
        ledger.crl_number += 1;
        let revoked = ledger
            .client
            .iter()
            .filter(|c| c.ca_serial == ca.serial)
            .filter_map(|c| {
                let at = c.revoked_at?;
                let bytes: Vec<u8> = (0..c.serial.len() / 2)
                    .filter_map(|i| u8::from_str_radix(&c.serial[2 * i..2 * i + 2], 16).ok())
                    .collect();
                Some(rcgen::RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&bytes),
                    revocation_time: odt(
                        SystemTime::UNIX_EPOCH + Duration::from_secs(at.max(0) as u64)
                    ),
                    reason_code: Some(rcgen::RevocationReason::CessationOfOperation),
                    invalidity_date: None,
                })
            })
            .collect();
        let params = CertificateRevocationListParams {
            this_update: odt(now - BACKDATE),
            next_update: odt(now + CRL_LIFETIME),
            crl_number: SerialNumber::from(ledger.crl_number),
            issuing_distribution_point: None,
            revoked_certs: revoked,
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params.signed_by(&ca.issuer()?)?;
        Ok(crl.pem()?)
    }

    /// Brings the PKI up to date (CA exists, server certificate valid and covering the current
    /// names, CRL fresh) and returns what TLS needs. `rotated` tells whether a new server
    /// certificate was issued.
    pub fn refresh(&self) -> Result<(Material, bool)> {
        if let Some(ext) = &self.settings.external {
            return Ok((self.external_material(ext)?, false));
        }
        let now = self.now();
        let ca = self.ca_or_create()?;
        let names = server_names(&self.settings);
        let mut rotated = false;
        let current = if self.paths.server_crt().exists() && self.paths.server_key().exists() {
            let (_, der) = read_cert_pem(&self.paths.server_crt())?;
            Some(der)
        } else {
            None
        };
        let why = match &current {
            None => Some("no server certificate yet".to_string()),
            Some(der) => {
                let (_, sans, aki) = describe_server(der)?;
                if self.renew_at(der)? <= now {
                    Some("server certificate due for renewal".into())
                } else if aki != key_id(&ca.der) {
                    Some("the CA changed".into())
                } else if sans != names {
                    Some("the device's names or addresses changed".into())
                } else {
                    None
                }
            }
        };
        if let Some(why) = why {
            self.issue_server(&ca, &names)?;
            tracing::info!(
                event = "cert-rotated",
                "issued a new server certificate ({why})"
            );
            rotated = true;
        }
        let mut ledger = self.load_ledger()?;
        let crl_stale = match fs::read(self.paths.crl()) {
            Ok(pem) => match CertificateRevocationListDer::from_pem_slice(&pem) {
                Ok(der) => crl_next_update(&der).is_none_or(|nu| nu <= now + CRL_LIFETIME / 2),
                Err(_) => true,
            },
            Err(_) => true,
        };
        if crl_stale {
            self.save_ledger_and_crl(&ca, &mut ledger)?;
        }
        let (_, server_der) = read_cert_pem(&self.paths.server_crt())?;
        let key_pem = read_private_key(&self.paths.server_key())?;
        let server_key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
            anyhow::anyhow!(
                "{} is not a usable key: {e}",
                self.paths.server_key().display()
            )
        })?;
        let mut roots = vec![ca.der.clone()];
        let mut next_check = self.renew_at(&server_der)?;
        self.forget_ended_overlap(now)?;
        if let Some((prev, until)) = self.previous_ca(now)? {
            roots.push(prev);
            next_check = next_check.min(until);
        }
        let crl_pem = fs::read(self.paths.crl())?;
        let crls = vec![
            CertificateRevocationListDer::from_pem_slice(&crl_pem)
                .map_err(|e| anyhow::anyhow!("{}: {e}", self.paths.crl().display()))?,
        ];
        let revoked = ledger
            .client
            .iter()
            .filter(|c| c.revoked_at.is_some())
            .map(|c| c.serial.clone())
            .collect();
        Ok((
            Material {
                server_serial: describe_server(&server_der)?.0,
                server_chain: vec![server_der],
                server_key,
                roots,
                crls,
                revoked,
                next_check,
            },
            rotated,
        ))
    }

    fn external_material(&self, ext: &ExternalPki) -> Result<Material> {
        let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ext.ca_file)
            .with_context(|| format!("reading CA bundle {}", ext.ca_file.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("{}: {e}", ext.ca_file.display()))?;
        if roots.is_empty() {
            bail!(
                "{} holds no certificate (tls.ca_file)",
                ext.ca_file.display()
            );
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&ext.cert_file)
            .with_context(|| format!("reading server certificate {}", ext.cert_file.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("{}: {e}", ext.cert_file.display()))?;
        let Some(first) = chain.first() else {
            bail!(
                "{} holds no certificate (tls.cert_file)",
                ext.cert_file.display()
            );
        };
        let server_serial = describe_server(first)?.0;
        let key_pem = read_private_key(&ext.key_file)?;
        let server_key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| {
            anyhow::anyhow!(
                "{} (tls.key_file) is not a usable key: {e}",
                ext.key_file.display()
            )
        })?;
        let revoked = self
            .load_ledger()?
            .client
            .iter()
            .filter(|c| c.revoked_at.is_some())
            .map(|c| c.serial.clone())
            .collect();
        Ok(Material {
            next_check: not_after_of(first)?,
            server_chain: chain,
            server_key,
            server_serial,
            roots,
            crls: Vec::new(),
            revoked,
        })
    }

    /// Issues a client certificate with `rights`, valid for `days`.
    pub fn issue_client(&self, name: &str, rights: &Rights, days: u32) -> Result<ClientBundle> {
        if self.settings.external.is_some() {
            bail!(
                "this device uses an external PKI (tls.ca_file); issue client certificates with that CA"
            );
        }
        check_client_name(name)?;
        if days == 0 || days > MAX_CLIENT_DAYS {
            bail!("--days must be 1 to {MAX_CLIENT_DAYS}");
        }
        if rights.modules.is_empty() {
            bail!("a client certificate needs --modules SERIAL,... or --all");
        }
        for m in &rights.modules {
            if m != "*" {
                crate::config::check_serial(m)
                    .map_err(|why| anyhow::anyhow!("module serial {m:?} {why}"))?;
            }
        }
        let now = self.plausible_now("issuing a client certificate")?;
        let ca = self.ca_or_create()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "lucidgate client");
        for uri in rights.uris() {
            params
                .subject_alt_names
                .push(SanType::URI(uri.as_str().try_into()?));
        }
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let not_after = now + Duration::from_secs(days as u64 * 86400);
        params.not_before = odt(now - BACKDATE);
        params.not_after = odt(not_after);
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        params.key_identifier_method = KeyIdMethod::Sha256;
        let key = new_key()?;
        let cert = params.signed_by(&key, &ca.issuer()?)?;
        let serial = describe_server(cert.der())?.0;
        let mut ledger = self.load_ledger()?;
        ledger.client.push(IssuedClient {
            name: name.to_string(),
            serial: serial.clone(),
            issued: clock::unix(now),
            not_after: clock::unix(not_after),
            modules: rights.modules.clone(),
            read_only: rights.read_only,
            ca_serial: ca.serial.clone(),
            revoked_at: None,
        });
        self.save_ledger(&ledger)?;
        tracing::info!(
            client_name = name,
            event = "client-cert-issued",
            "issued client certificate {name} (serial {serial})"
        );
        Ok(ClientBundle {
            key_pem: key.serialize_pem(),
            cert_pem: cert.pem(),
            ca_pem: ca.pem.clone(),
            serial,
            not_after,
        })
    }

    /// Revokes every certificate named `who` or with serial `who`; returns what was revoked.
    pub fn revoke(&self, who: &str) -> Result<Vec<IssuedClient>> {
        let now = self.now();
        let mut ledger = self.load_ledger()?;
        let who_l = who.to_ascii_lowercase();
        let mut hit = Vec::new();
        for c in ledger.client.iter_mut() {
            if (c.name == who || c.serial == who_l) && c.revoked_at.is_none() {
                c.revoked_at = Some(clock::unix(now));
                hit.push(c.clone());
            }
        }
        if hit.is_empty() {
            if ledger
                .client
                .iter()
                .any(|c| c.name == who || c.serial == who_l)
            {
                bail!("{who} is already revoked");
            }
            if self.settings.external.is_some() && who_l.chars().all(|c| c.is_ascii_hexdigit()) {
                // A certificate of the external CA: revoke by serial.
                ledger.client.push(IssuedClient {
                    name: String::new(),
                    serial: who_l.clone(),
                    issued: 0,
                    not_after: 0,
                    modules: vec![],
                    read_only: false,
                    ca_serial: "external".into(),
                    revoked_at: Some(clock::unix(now)),
                });
                self.save_ledger(&ledger)?;
                return Ok(ledger.client.last().cloned().into_iter().collect());
            }
            bail!(
                "no issued client certificate is named or numbered {who:?}; `lucidgate cert list` shows them"
            );
        }
        match self.load_ca()? {
            Some(ca) => self.save_ledger_and_crl(&ca, &mut ledger)?,
            None => self.save_ledger(&ledger)?,
        }
        Ok(hit)
    }

    /// Makes a new CA; the old one stays trusted for client certificates for `overlap`.
    pub fn rotate_ca(&self, overlap: Duration) -> Result<()> {
        if self.settings.external.is_some() {
            bail!("this device uses an external PKI (tls.ca_file); rotate that CA yourself");
        }
        let now = self.plausible_now("rotating the CA")?;
        let old = self
            .load_ca()?
            .context("there is no CA to rotate yet (it is made on first start)")?;
        let new = self.create_ca()?;
        let meta = PreviousCa {
            trusted_until: clock::unix(now + overlap),
        };
        // One group: a crash leaves the old CA alone or the new one with the old trusted.
        state::write_group(
            &self.paths.dir,
            &[
                ("ca-previous.crt", old.pem.as_bytes(), 0o644),
                (
                    "ca-previous.toml",
                    toml::to_string(&meta)?.as_bytes(),
                    0o644,
                ),
                ("ca.key", new.key.serialize_pem().as_bytes(), 0o600),
                ("ca.crt", new.pem.as_bytes(), 0o644),
            ],
        )?;
        let names = server_names(&self.settings);
        self.issue_server(&new, &names)?;
        let mut ledger = self.load_ledger()?;
        self.save_ledger_and_crl(&new, &mut ledger)?;
        tracing::info!(
            event = "ca-rotated",
            "rotated the CA; the previous one is trusted until {}",
            humantime::format_rfc3339_seconds(now + overlap)
        );
        Ok(())
    }

    /// A human summary of the PKI (`cert list`).
    pub fn list(&self) -> Result<String> {
        use std::fmt::Write;
        let mut out = String::new();
        let fmt_t = |t: i64| {
            humantime::format_rfc3339_seconds(
                SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64),
            )
            .to_string()
        };
        if let Some(ext) = &self.settings.external {
            writeln!(
                out,
                "external PKI: CA bundle {}, server {} / {}",
                ext.ca_file.display(),
                ext.cert_file.display(),
                ext.key_file.display()
            )?;
        } else if let Some(ca) = self.load_ca()? {
            writeln!(
                out,
                "CA      serial {}  expires {}",
                ca.serial,
                humantime::format_rfc3339_seconds(not_after_of(&ca.der)?)
            )?;
        } else {
            writeln!(
                out,
                "CA      none yet (made on first `lucidgate serve` or `cert issue-client`)"
            )?;
        }
        if let Some((prev, until)) = self.previous_ca(self.now())? {
            writeln!(
                out,
                "CA (previous) serial {}  trusted until {}",
                describe_server(&prev)?.0,
                humantime::format_rfc3339_seconds(until)
            )?;
        }
        if self.paths.server_crt().exists() {
            let (_, der) = read_cert_pem(&self.paths.server_crt())?;
            let (serial, sans, _) = describe_server(&der)?;
            writeln!(
                out,
                "server  serial {serial}  expires {}  renews {}",
                humantime::format_rfc3339_seconds(not_after_of(&der)?),
                humantime::format_rfc3339_seconds(self.renew_at(&der)?)
            )?;
            writeln!(
                out,
                "        names {}",
                sans.into_iter().collect::<Vec<_>>().join(" ")
            )?;
        }
        let ledger = self.load_ledger()?;
        writeln!(out, "clients:")?;
        if ledger.client.is_empty() {
            writeln!(
                out,
                "  none (lucidgate cert issue-client NAME --all --out DIR)"
            )?;
        }
        for c in &ledger.client {
            let state = match c.revoked_at {
                Some(t) => format!("REVOKED {}", fmt_t(t)),
                None if c.not_after <= clock::unix(self.now()) => "expired".into(),
                None => "valid".into(),
            };
            writeln!(
                out,
                "  {:<16} serial {}  expires {}  modules {}{}  {state}",
                c.name,
                c.serial,
                fmt_t(c.not_after),
                c.modules.join(","),
                if c.read_only { " read-only" } else { "" }
            )?;
        }
        Ok(out)
    }
}

fn crl_next_update(der: &CertificateRevocationListDer<'_>) -> Option<SystemTime> {
    let (_, crl) = x509_parser::parse_x509_crl(der).ok()?;
    let ts = crl.next_update()?.timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::SystemClock;

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
        let (_, sans, _) = describe_server(&der).unwrap();
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
        assert!(pki.list().unwrap().contains("CA (previous)"));
        drop(pki);
        // Two days on, the overlap has ended: listing must not clean up (or touch) anything.
        let later = SystemClock::with_offset(2 * 86400);
        let before = snapshot(dir.path());
        let pki = Pki::open(dir.path(), settings(), &later).unwrap();
        let listed = pki.list().unwrap();
        assert!(!listed.contains("CA (previous)"), "{listed}");
        assert!(listed.contains("laptop"), "{listed}");
        assert_eq!(snapshot(dir.path()), before, "cert list changed the state");
        assert!(pki.paths().prev_crt().exists());
        // The daemon's refresh is what forgets the old CA.
        pki.refresh().unwrap();
        assert!(!pki.paths().prev_crt().exists());
        assert!(!pki.paths().prev_meta().exists());
    }
}
