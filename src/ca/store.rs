//! The PKI's files under their lock: paths, the ledger of issued clients, the CA and the
//! previous CA. Loading only reads (`cert list` changes nothing); what a load finds out of date
//! is cleaned up by [`Pki::refresh`](super::Pki::refresh).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result, bail};
use rcgen::KeyPair;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

use super::x509::{CertInfo, cert_matches_key, read_cert_pem, read_private_key};
use super::{Ca, ExternalPki, IssuedClient, Pki, PkiSettings};
use crate::clock::Clock;
use crate::state;

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Ledger {
    #[serde(default)]
    pub(crate) crl_number: u64,
    #[serde(default)]
    pub(crate) client: Vec<IssuedClient>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct PreviousCa {
    /// Trusted until this UNIX time.
    pub(crate) trusted_until: i64,
}

/// Paths inside the PKI directory.
#[derive(Debug, Clone)]
pub(crate) struct Paths {
    pub(crate) dir: PathBuf,
}

impl Paths {
    fn new(state_dir: &Path) -> Paths {
        Paths {
            dir: state_dir.join("pki"),
        }
    }
    fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub(crate) fn ca_crt(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub(crate) fn prev_crt(&self) -> PathBuf {
        self.dir.join("ca-previous.crt")
    }
    pub(crate) fn prev_meta(&self) -> PathBuf {
        self.dir.join("ca-previous.toml")
    }
    pub(crate) fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    pub(crate) fn server_crt(&self) -> PathBuf {
        self.dir.join("server.crt")
    }
    fn ledger(&self) -> PathBuf {
        self.dir.join("issued.toml")
    }
    pub(crate) fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }
    fn lock(&self) -> PathBuf {
        self.dir.join(".lock")
    }
}

/// What `cert list` shows: the PKI as it is on disk, read without changing anything.
#[derive(Debug, Clone)]
pub struct Inventory {
    /// Set when `[tls]` names an operator's PKI (then nothing below is lucidgate's).
    pub(crate) external: Option<ExternalPki>,
    /// The CA's serial and expiry (None: not made yet).
    pub(crate) ca: Option<(String, SystemTime)>,
    /// The previous CA's serial and the end of its overlap, while it is trusted.
    pub(crate) previous_ca: Option<(String, SystemTime)>,
    /// The server certificate, with when it will be renewed.
    pub(crate) server: Option<(CertInfo, SystemTime)>,
    pub clients: Vec<IssuedClient>,
    /// When this was read (to tell expired clients).
    pub(crate) now: SystemTime,
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

    pub(super) fn load_ca(&self) -> Result<Option<Ca>> {
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
                let serial = CertInfo::parse(&der)
                    .with_context(|| format!("reading {}", cp.display()))?
                    .serial;
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

    pub(super) fn write_ca(&self, ca: &Ca) -> Result<()> {
        state::write_group(
            &self.paths.dir,
            &[
                ("ca.key", ca.key.serialize_pem().as_bytes(), 0o600),
                ("ca.crt", ca.pem.as_bytes(), 0o644),
            ],
        )
    }

    pub(super) fn load_ledger(&self) -> Result<Ledger> {
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

    pub(super) fn ledger_text(ledger: &Ledger) -> Result<String> {
        let mut text = String::from(
            "# lucidgate: client certificates issued by this device's CA. Written by lucidgate.\n",
        );
        text.push_str(&toml::to_string(ledger).context("serialising the ledger")?);
        Ok(text)
    }

    pub(super) fn save_ledger(&self, ledger: &Ledger) -> Result<()> {
        state::write_atomic(
            &self.paths.ledger(),
            Self::ledger_text(ledger)?.as_bytes(),
            0o600,
        )
    }

    /// The previous CA and the end of its overlap, if it is still trusted at `now`. Only reads:
    /// the files of an ended overlap stay until [`Pki::refresh`] removes them, so `cert list`
    /// and other readers never change the state.
    pub(super) fn previous_ca(
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
    pub(super) fn forget_ended_overlap(&self, now: SystemTime) -> Result<()> {
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

    /// The PKI as `cert list` shows it; reads only.
    pub fn inventory(&self) -> Result<Inventory> {
        let now = self.now();
        let external = self.settings.external.clone();
        let ca = match external {
            Some(_) => None,
            None => self
                .load_ca()?
                .map(|ca| CertInfo::parse(&ca.der).map(|i| (ca.serial, i.not_after)))
                .transpose()?,
        };
        let previous_ca = self
            .previous_ca(now)?
            .map(|(der, until)| CertInfo::parse(&der).map(|i| (i.serial, until)))
            .transpose()?;
        let server = if self.paths.server_crt().exists() {
            let (_, der) = read_cert_pem(&self.paths.server_crt())?;
            let info = CertInfo::parse(&der)?;
            let renew = self.renew_at(&info);
            Some((info, renew))
        } else {
            None
        };
        Ok(Inventory {
            external,
            ca,
            previous_ca,
            server,
            clients: self.load_ledger()?.client,
            now,
        })
    }
}
