//! USB sticks seen for provisioning: which are being processed, one at a time, off the
//! supervisor's loop; their outcomes come back to it as messages.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::Supervisor;
use crate::ca::PkiSettings;
use crate::clock::{SharedClock, SystemClock};
use crate::device::{Action, DeviceEvent};

/// Provisioning sticks waiting or in progress at once; more are skipped with a log line (the
/// operator replugs them).
const MAX_STICKS_PENDING: usize = 4;

/// USB sticks seen for provisioning (by syspath, until removed) and the runs' outcomes.
pub(super) struct Sticks {
    seen: BTreeMap<PathBuf, StickState>,
    clock: SharedClock,
    pending: Arc<tokio::sync::Semaphore>,
    /// One stick at a time (they share the PKI and the ledger).
    one_at_a_time: Arc<tokio::sync::Mutex<()>>,
    /// (syspath, outcome); `None`: the stick could not be read (not FAT, not openable): it is
    /// looked at again on its next add or change event (media inserted, reformatted).
    done_tx: mpsc::Sender<(PathBuf, Option<crate::provision::Status>)>,
    pub(super) done_rx: mpsc::Receiver<(PathBuf, Option<crate::provision::Status>)>,
}

enum StickState {
    Running { devnode: PathBuf, again: bool },
    Done,
}

/// Whether a udev block device is a USB FAT filesystem worth looking at for a request.
fn is_provisioning_stick(ev: &DeviceEvent) -> bool {
    ev.subsystem == "block"
        && ev.devnode.is_some()
        && ev.property("ID_BUS") == Some("usb")
        && matches!(ev.property("ID_FS_TYPE"), Some("vfat") | Some("msdos"))
}

impl Sticks {
    pub(super) fn new() -> Sticks {
        let (done_tx, done_rx) = mpsc::channel(MAX_STICKS_PENDING);
        Sticks {
            seen: BTreeMap::new(),
            clock: Arc::new(SystemClock::from_env()),
            pending: Arc::new(tokio::sync::Semaphore::new(MAX_STICKS_PENDING)),
            one_at_a_time: Arc::new(tokio::sync::Mutex::new(())),
            done_tx,
            done_rx,
        }
    }

    /// The clock provisioning issues certificates by (the PKI task's).
    pub(super) fn set_clock(&mut self, clock: SharedClock) {
        self.clock = clock;
    }
}

impl Supervisor {
    /// A block device: a USB stick that may carry a provisioning request.
    pub(super) fn on_block(&mut self, ev: DeviceEvent) {
        if ev.action == Action::Remove {
            self.sticks.seen.remove(&ev.syspath);
            return;
        }
        if !self.config.provision.usb || !is_provisioning_stick(&ev) {
            return;
        }
        let Some(devnode) = ev.devnode.clone() else {
            return;
        };
        match self.sticks.seen.get_mut(&ev.syspath) {
            // Looked at already; the ledger keeps a request from being processed twice anyway.
            Some(StickState::Done) => {}
            // An event while it is being read (media swapped in): read it again afterwards
            // if this run finds no filesystem.
            Some(StickState::Running { again, .. }) => *again = true,
            None => {
                info!(devnode = %devnode.display(), event = "stick-plugged",
                    "USB stick {} ({}): looking for lucidgate/request.toml", devnode.display(),
                    ev.property("ID_FS_LABEL").unwrap_or("no label"));
                self.start_stick(ev.syspath.clone(), devnode);
            }
        }
    }

    /// Runs provisioning on a stick in a blocking task (one stick at a time).
    fn start_stick(&mut self, syspath: PathBuf, devnode: PathBuf) {
        let Ok(permit) = self.sticks.pending.clone().try_acquire_owned() else {
            warn!(devnode = %devnode.display(), event = "provision-busy",
                "{} sticks are being processed; {} is skipped (plug it in again later)", MAX_STICKS_PENDING, devnode.display());
            return;
        };
        self.sticks.seen.insert(
            syspath.clone(),
            StickState::Running {
                devnode: devnode.clone(),
                again: false,
            },
        );
        let config = self.config.clone();
        let modules: BTreeMap<String, u16> = self
            .relays
            .iter()
            .map(|(s, r)| (s.clone(), r.handle.port))
            .collect();
        let clock = self.sticks.clock.clone();
        let lock = self.sticks.one_at_a_time.clone();
        let done = self.sticks.done_tx.clone();
        self.tracker.spawn(async move {
            let _permit = permit;
            let _turn = lock.lock().await;
            let path = devnode.clone();
            let run = tokio::task::spawn_blocking(move || {
                let dev = crate::provision::Gateway {
                    state_dir: &config.state_dir,
                    pki: PkiSettings::from_config(&config),
                    clock: clock.as_ref(),
                    token_hash: config.provision.token_hash.clone(),
                    hostname: crate::provision::hostname(&config),
                    modules,
                };
                crate::provision::run_path(&path, &dev)
            })
            .await;
            let status = match run {
                Ok(Ok(outcome)) => Some(outcome.status),
                Ok(Err(crate::provision::NotProvisioning::NoRequest)) => {
                    info!(devnode = %devnode.display(), "USB stick {} has no lucidgate/request.toml; left alone", devnode.display());
                    Some(crate::provision::Status::Refused)
                }
                Ok(Err(e)) => {
                    warn!(devnode = %devnode.display(), event = "provision-failed", "USB stick {}: {e}", devnode.display());
                    None
                }
                Err(e) => {
                    error!("provisioning task failed: {e}");
                    None
                }
            };
            let _ = done.send((syspath, status)).await;
        });
    }

    /// After a provisioning run: the PKI may have changed (new clients, an imported CA); a
    /// stick that could not be read is read again if an event came meanwhile, else on its next.
    pub(super) fn on_provisioned(
        &mut self,
        syspath: PathBuf,
        status: Option<crate::provision::Status>,
    ) {
        let state = self.sticks.seen.remove(&syspath);
        match status {
            Some(s) => {
                self.sticks.seen.insert(syspath, StickState::Done);
                if s == crate::provision::Status::Done {
                    let _ = self.refresh_pki_settings(None);
                }
            }
            None => {
                if let Some(StickState::Running {
                    devnode,
                    again: true,
                }) = state
                {
                    self.start_stick(syspath, devnode);
                }
            }
        }
    }
}
