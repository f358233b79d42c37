//! TLS for relays: rustls server configs built from the PKI's [`Material`], swapped atomically
//! when the PKI changes, and the authorization of a client after its handshake.
//!
//! Every new handshake takes the current config; sessions in flight keep the one they started
//! with, so a certificate rotation neither drops established sessions nor refuses new ones.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::DigitallySignedStruct;
use rustls::ServerConfig;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;

use super::{Accepted, TransportError};
use crate::ca::{Material, rights};
use crate::clock::{RustlsTime, SharedClock};

/// The TLS state every relay shares.
pub(crate) struct TlsState {
    /// Mutual TLS: client certificates required.
    mutual: ArcSwapOption<ServerConfig>,
    /// Server authentication only.
    server_only: ArcSwapOption<ServerConfig>,
    revoked: ArcSwap<BTreeSet<String>>,
    /// Why there is no config (e.g. the clock is not set yet).
    unavailable: ArcSwap<String>,
    server_serial: ArcSwap<String>,
    /// Bounds concurrent handshakes across all modules (slowloris).
    handshakes: Semaphore,
    clock: SharedClock,
}

impl std::fmt::Debug for TlsState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsState")
            .field("server_serial", &self.server_serial.load())
            .finish()
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

impl TlsState {
    pub(crate) fn new(clock: SharedClock, max_handshakes: usize) -> Arc<TlsState> {
        Arc::new(TlsState {
            mutual: ArcSwapOption::empty(),
            server_only: ArcSwapOption::empty(),
            revoked: ArcSwap::from_pointee(BTreeSet::new()),
            unavailable: ArcSwap::from_pointee("the PKI has not been loaded yet".to_string()),
            server_serial: ArcSwap::from_pointee(String::new()),
            handshakes: Semaphore::new(max_handshakes),
            clock,
        })
    }

    /// Builds configs from `m` and makes them current for new handshakes.
    pub(crate) fn publish(&self, m: &Material) -> Result<()> {
        let mut roots = rustls::RootCertStore::empty();
        for r in &m.roots {
            roots
                .add(r.clone())
                .context("adding a CA certificate to the trust store")?;
        }
        let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .with_crls(m.crls.clone())
            .allow_unknown_revocation_status()
            .only_check_end_entity_revocation()
            .build()
            .context("building the client certificate verifier")?;
        let verifier = Arc::new(NamingVerifier { inner: webpki });
        let time = Arc::new(RustlsTime(self.clock.clone()));
        let mutual = ServerConfig::builder_with_details(provider(), time.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(m.server_chain.clone(), m.server_key.clone_key())
            .context("loading the server certificate and key")?;
        let server_only = ServerConfig::builder_with_details(provider(), time)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
            .with_no_client_auth()
            .with_single_cert(m.server_chain.clone(), m.server_key.clone_key())
            .context("loading the server certificate and key")?;
        self.mutual.store(Some(Arc::new(mutual)));
        self.server_only.store(Some(Arc::new(server_only)));
        self.revoked.store(Arc::new(m.revoked.clone()));
        self.server_serial.store(Arc::new(m.server_serial.clone()));
        Ok(())
    }

    /// Records why TLS cannot be offered (only matters while no config was ever published).
    pub(crate) fn set_unavailable(&self, why: String) {
        self.unavailable.store(Arc::new(why));
    }

    /// `None` when TLS can be offered, else why not.
    pub(crate) fn not_ready(&self) -> Option<String> {
        if self.mutual.load().is_some() {
            None
        } else {
            Some(self.unavailable.load().to_string())
        }
    }

    pub(crate) fn server_serial(&self) -> String {
        self.server_serial.load().to_string()
    }
}

thread_local! {
    /// Subject of the client certificate the verifier just rejected on this thread. rustls runs
    /// the verifier inside the poll that then fails the handshake, so the accepting task reads
    /// it back on the same thread right after the error, to name the peer in the log.
    static REJECTED_SUBJECT: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

fn take_rejected_subject() -> Option<String> {
    REJECTED_SUBJECT.with(|s| s.borrow_mut().take())
}

/// rustls' WebPKI client verifier, remembering the subject of certificates it rejects.
#[derive(Debug)]
struct NamingVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for NamingVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }
    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let r = self
            .inner
            .verify_client_cert(end_entity, intermediates, now);
        if r.is_err() {
            let name = rights::client_identity(end_entity).map(|id| id.name).ok();
            REJECTED_SUBJECT.with(|s| *s.borrow_mut() = name);
        }
        r
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The TLS side of one relay: which module, whether client certificates are required, and
/// who may use it.
#[derive(Clone, Debug)]
pub(crate) struct TlsAccept {
    pub(crate) state: Arc<TlsState>,
    pub(crate) mutual: bool,
    /// The module this relay serves (checked against the client's rights).
    pub(crate) module: String,
    /// `[modules."SERIAL"] allow`: when set, only these client names (and it overrides the
    /// rights in the certificate).
    pub(crate) allow: Option<Vec<String>>,
}

impl TlsAccept {
    pub(crate) async fn accept(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Result<Accepted, TransportError> {
        let refused =
            |reason: String, name: Option<String>| TransportError::Refused { peer, reason, name };
        let handshake = async {
            let _permit = self
                .state
                .handshakes
                .acquire()
                .await
                .map_err(|_| refused("shutting down".into(), None))?;
            let config = if self.mutual {
                self.state.mutual.load_full()
            } else {
                self.state.server_only.load_full()
            };
            let Some(config) = config else {
                return Err(refused(
                    format!(
                        "TLS is not available yet: {}",
                        self.state.unavailable.load()
                    ),
                    None,
                ));
            };
            take_rejected_subject();
            tokio_rustls::TlsAcceptor::from(config)
                .accept(tcp)
                .await
                .map_err(|e| match take_rejected_subject() {
                    Some(name) => refused(format!("handshake failed: {e}"), Some(name)),
                    None => TransportError::Handshake { peer, source: e },
                })
        };
        let tls = tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| TransportError::Timeout { peer, timeout })??;
        if !self.mutual {
            return Ok(Accepted {
                stream: Box::new(tls),
                peer,
                name: None,
                read_only: false,
            });
        }
        let Some(cert) = tls.get_ref().1.peer_certificates().and_then(|c| c.first()) else {
            return Err(refused("no client certificate".into(), None));
        };
        let id = rights::client_identity(cert).map_err(|e| refused(e.to_string(), None))?;
        if self.state.revoked.load().contains(&id.serial) {
            return Err(refused(
                format!("certificate {} is revoked", id.serial),
                Some(id.name),
            ));
        }
        let allowed = match &self.allow {
            Some(names) => names.contains(&id.name),
            None => id.rights.allows(&self.module),
        };
        if !allowed {
            let why = match &self.allow {
                Some(_) => format!("{} is not in [modules.\"{}\"] allow", id.name, self.module),
                None => format!(
                    "certificate of {} does not grant module {} (it grants: {})",
                    id.name,
                    self.module,
                    if id.rights.modules.is_empty() {
                        "none".to_string()
                    } else {
                        id.rights.modules.join(",")
                    }
                ),
            };
            return Err(refused(why, Some(id.name)));
        }
        Ok(Accepted {
            stream: Box::new(tls),
            peer,
            name: Some(id.name),
            read_only: id.rights.read_only,
        })
    }
}
