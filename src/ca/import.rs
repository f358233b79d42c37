//! Bring your own PKI: an operator's CA bundle, server chain and key, named in `[tls]` or
//! installed from a provisioning stick into [`imported_dir`], checked and served instead of the
//! built-in CA.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

use super::x509::{CertInfo, read_private_key};
use super::{ExternalPki, Material, Pki};
use crate::state;

/// Where a PKI installed from a provisioning stick lives (used when `[tls]` names no files).
pub(crate) fn imported_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("pki").join("imported")
}

/// Checks an operator's PKI (CA bundle, server chain, server key, as PEM) and installs it into
/// [`imported_dir`]: the key must belong to the certificate and the certificate must be issued
/// by a CA of the bundle. Returns a summary for logs.
pub(crate) fn install_import(
    state_dir: &Path,
    ca: &[u8],
    cert: &[u8],
    key: &[u8],
) -> Result<String> {
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

impl Pki<'_> {
    pub(super) fn external_material(&self, ext: &ExternalPki) -> Result<Material> {
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
        let first_info = CertInfo::parse(first)?;
        let server_serial = first_info.serial;
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
            next_check: first_info.not_after,
            server_chain: chain,
            server_key,
            server_serial,
            roots,
            crls: Vec::new(),
            revoked,
        })
    }
}
