//! The PKI task (TLS kept fresh from the PKI; here, above `ca`, so that `ca` never needs the
//! transport): keeps the server certificate renewed, follows address changes and CA overlaps,
//! and re-reads the PKI when `lucidgate cert ...` or provisioning asks for it; publishes the
//! result to the relays through [`TlsState`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Result;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info};

use super::tls::TlsState;
use crate::ca::{Pki, PkiSettings};
use crate::clock::SharedClock;

/// How often the PKI looks at the device's addresses (a changed address gets a new server cert).
const PKI_ADDRESS_CHECK: Duration = Duration::from_secs(60);
/// Pause before retrying a PKI refresh that failed (e.g. the clock is not set yet).
const PKI_RETRY: Duration = Duration::from_secs(10);
/// Shortest pause between PKI refreshes.
const PKI_MIN_WAIT: Duration = Duration::from_millis(100);

/// Brings the PKI up to date and publishes it to the relays; returns when to look again.
pub(crate) fn refresh_pki(
    state_dir: &std::path::Path,
    settings: &PkiSettings,
    clock: &SharedClock,
    tls: &TlsState,
) -> Result<Duration> {
    let result =
        Pki::open(state_dir, settings.clone(), clock.as_ref()).and_then(|pki| pki.refresh());
    match result {
        Ok((material, rotated)) => {
            let before = tls.server_serial();
            tls.publish(&material)?;
            if rotated && !before.is_empty() {
                info!(
                    event = "cert-rotated",
                    "server certificate rotated: serial {before} -> {}", material.server_serial
                );
            }
            let wait = material
                .next_check
                .duration_since(clock.now())
                .unwrap_or_default()
                .clamp(PKI_MIN_WAIT, PKI_ADDRESS_CHECK);
            Ok(wait)
        }
        Err(e) => {
            tls.set_unavailable(format!("{e:#}"));
            Err(e)
        }
    }
}

/// A request to re-read the PKI now; the sender, if any, hears when the new material is in use
/// (or why the refresh failed), so `lucidgate cert revoke` returns only once the revocation
/// is in force.
pub(crate) type PkiReload = Option<oneshot::Sender<Result<(), String>>>;

/// The PKI task: renews the server certificate, follows address changes and CA overlaps, and
/// re-reads the PKI when `lucidgate cert ...` asks for it.
pub(crate) fn spawn_pki_task(
    state_dir: PathBuf,
    settings: watch::Receiver<PkiSettings>,
    clock: SharedClock,
    tls: Arc<TlsState>,
    mut reload: mpsc::UnboundedReceiver<PkiReload>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
) {
    tracker.spawn(async move {
        let mut wait = Duration::ZERO;
        loop {
            let mut waiting = Vec::new();
            tokio::select! {
                _ = cancel.cancelled() => return,
                asked = reload.recv() => {
                    let Some(ack) = asked else { return };
                    info!(event = "pki-reload", "re-reading the PKI");
                    // Requests that came meanwhile are answered by the same refresh.
                    waiting.extend(ack);
                    while let Ok(more) = reload.try_recv() {
                        waiting.extend(more);
                    }
                }
                _ = tokio::time::sleep(wait) => {}
            }
            let (d, s, c, t) = (
                state_dir.clone(),
                settings.borrow().clone(),
                clock.clone(),
                tls.clone(),
            );
            let r = tokio::task::spawn_blocking(move || refresh_pki(&d, &s, &c, &t)).await;
            let outcome = match &r {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(e) => Err(format!("the PKI task failed: {e}")),
            };
            for ack in waiting {
                let _ = ack.send(outcome.clone());
            }
            wait = match r {
                Ok(Ok(w)) => w,
                Ok(Err(e)) => {
                    error!(
                        event = "pki-error",
                        "PKI refresh failed: {e:#}; retrying in {PKI_RETRY:?}"
                    );
                    PKI_RETRY
                }
                Err(e) => {
                    error!("PKI task failed: {e}");
                    PKI_RETRY
                }
            };
        }
    });
}
