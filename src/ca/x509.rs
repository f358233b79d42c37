//! Keys, serials and certificates as the CA reads and makes them; [`CertInfo`] is a
//! certificate parsed once into what the PKI looks at.

use std::collections::BTreeSet;
use std::fs;
use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use rcgen::{KeyPair, SerialNumber};
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, pem::PemObject};

use super::rights;

/// What the PKI reads from a certificate, parsed once.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct CertInfo {
    /// Serial number (hex).
    pub(crate) serial: String,
    pub(crate) not_before: SystemTime,
    pub(crate) not_after: SystemTime,
    /// Subject alternative names as `dns:NAME` and `ip:ADDR`.
    pub(crate) names: BTreeSet<String>,
    /// Authority key identifier (hex; empty when absent).
    pub(crate) authority_key_id: String,
    /// Subject key identifier (hex; empty when absent).
    pub(crate) subject_key_id: String,
}

fn unix_time(ts: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64)
}

impl CertInfo {
    pub(crate) fn parse(der: &[u8]) -> Result<CertInfo> {
        use x509_parser::prelude::*;
        let (_, cert) = x509_parser::parse_x509_certificate(der)
            .map_err(|e| anyhow::anyhow!("unreadable certificate: {e}"))?;
        let mut names = BTreeSet::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for gn in &san.value.general_names {
                match gn {
                    GeneralName::DNSName(d) => {
                        names.insert(format!("dns:{d}"));
                    }
                    GeneralName::IPAddress(b) => {
                        let ip: Option<IpAddr> = match b.len() {
                            4 => Some(IpAddr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())),
                            16 => Some(IpAddr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())),
                            _ => None,
                        };
                        if let Some(ip) = ip {
                            names.insert(format!("ip:{ip}"));
                        }
                    }
                    _ => {}
                }
            }
        }
        let (mut authority_key_id, mut subject_key_id) = (String::new(), String::new());
        for e in cert.iter_extensions() {
            match e.parsed_extension() {
                ParsedExtension::AuthorityKeyIdentifier(a) => {
                    if let Some(k) = &a.key_identifier {
                        authority_key_id = rights::hex(k.0);
                    }
                }
                ParsedExtension::SubjectKeyIdentifier(k) => subject_key_id = rights::hex(k.0),
                _ => {}
            }
        }
        Ok(CertInfo {
            serial: rights::hex(cert.raw_serial()),
            not_before: unix_time(cert.validity().not_before.timestamp()),
            not_after: unix_time(cert.validity().not_after.timestamp()),
            names,
            authority_key_id,
            subject_key_id,
        })
    }
}

/// Reads a private key, refusing one that others can read.
pub(crate) fn read_private_key(path: &Path) -> Result<String> {
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

pub(super) fn read_cert_pem(path: &Path) -> Result<(String, CertificateDer<'static>)> {
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

pub(super) fn random_serial() -> Result<SerialNumber> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| anyhow::anyhow!("no randomness for a certificate serial"))?;
    bytes[0] &= 0x7f;
    bytes[0] |= 0x10; // positive, and no leading zero byte to trim
    Ok(SerialNumber::from_slice(&bytes))
}

pub(super) fn new_key() -> Result<KeyPair> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).context("generating an ECDSA P-256 key")
}

pub(super) fn odt(t: SystemTime) -> time::OffsetDateTime {
    time::OffsetDateTime::from(t)
}

/// Whether the certificate `der` is for the key `key` (same SubjectPublicKeyInfo).
pub(super) fn cert_matches_key(der: &[u8], key: &KeyPair) -> Result<bool> {
    use rcgen::PublicKeyData;
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("unreadable certificate: {e}"))?;
    Ok(cert.public_key().raw == key.subject_public_key_info().as_slice())
}

pub(super) fn crl_next_update(der: &CertificateRevocationListDer<'_>) -> Option<SystemTime> {
    let (_, crl) = x509_parser::parse_x509_crl(der).ok()?;
    let ts = crl.next_update()?.timestamp();
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(ts.max(0) as u64))
}
