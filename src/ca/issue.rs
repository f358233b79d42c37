//! Making certificates: the CA, the server certificate (renewed by [`Pki::refresh`]), client
//! certificates with their rights, revocations and the CRL, and CA rotation.

use std::collections::BTreeSet;
use std::fs;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::pki_types::{CertificateRevocationListDer, PrivateKeyDer, pem::PemObject};

use super::store::{Ledger, PreviousCa};
use super::x509::{
    CertInfo, crl_next_update, new_key, odt, random_serial, read_cert_pem, read_private_key,
};
use super::{
    BACKDATE, CRL_LIFETIME, Ca, ClientBundle, IssuedClient, MAX_CLIENT_DAYS, Material, Pki, Rights,
    check_client_name, rights, server_names,
};
use crate::clock;
use crate::state;

impl Pki<'_> {
    pub(super) fn create_ca(&self) -> Result<Ca> {
        let now = self.plausible_now("creating the CA")?;
        let host = crate::host::name().unwrap_or_else(|| "lucidgate".into());
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
        let serial = CertInfo::parse(&der)?.serial;
        Ok(Ca {
            pem: cert.pem(),
            der,
            key,
            serial,
        })
    }

    pub(super) fn ca_or_create(&self) -> Result<Ca> {
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

    /// Signs a new CRL from `ledger` and saves both as one (a revocation is in both or in
    /// neither, whatever a crash interrupts).
    pub(super) fn save_ledger_and_crl(&self, ca: &Ca, ledger: &mut Ledger) -> Result<()> {
        let crl = self.crl_pem(ca, ledger)?;
        state::write_group(
            &self.paths.dir,
            &[
                ("crl.pem", crl.as_bytes(), 0o644),
                ("issued.toml", Self::ledger_text(ledger)?.as_bytes(), 0o600),
            ],
        )
    }

    pub(super) fn issue_server(&self, ca: &Ca, names: &BTreeSet<String>) -> Result<()> {
        let now = self.plausible_now("issuing the server certificate")?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        let host = crate::host::name().unwrap_or_else(|| "lucidgate".into());
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

    /// When the server certificate `cert` should be renewed.
    pub(super) fn renew_at(&self, cert: &CertInfo) -> SystemTime {
        let nb = cert.not_before + BACKDATE;
        let life = cert.not_after.duration_since(nb).unwrap_or_default();
        nb + life.mul_f64(self.settings.renew_fraction.clamp(0.05, 0.95))
    }

    pub(super) fn crl_pem(&self, ca: &Ca, ledger: &mut Ledger) -> Result<String> {
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
    pub(crate) fn refresh(&self) -> Result<(Material, bool)> {
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
                let cert = CertInfo::parse(der)?;
                let ca_key_id = CertInfo::parse(&ca.der)?.subject_key_id;
                if self.renew_at(&cert) <= now {
                    Some("server certificate due for renewal".into())
                } else if cert.authority_key_id != ca_key_id {
                    Some("the CA changed".into())
                } else if cert.names != names {
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
        let server = CertInfo::parse(&server_der)?;
        let mut next_check = self.renew_at(&server);
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
                server_serial: server.serial,
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

    /// Issues a client certificate with `rights`, valid for `days`.
    pub(crate) fn issue_client(
        &self,
        name: &str,
        rights: &Rights,
        days: u32,
    ) -> Result<ClientBundle> {
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
        let serial = CertInfo::parse(cert.der())?.serial;
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
    pub(crate) fn revoke(&self, who: &str) -> Result<Vec<IssuedClient>> {
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
    pub(crate) fn rotate_ca(&self, overlap: Duration) -> Result<()> {
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
}
