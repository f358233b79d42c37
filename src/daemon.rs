//! The composition root of `lucidgate serve`: signals, state, the control socket, metrics, the
//! udev watch, the PKI task and the [`Supervisor`], started in that order and stopped in
//! reverse.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::ca::PkiSettings;
use crate::clock::{SharedClock, SystemClock};
use crate::config::Config;
use crate::control;
use crate::device::watch as udev_watch;
use crate::ports::Registry;
use crate::state;
use crate::supervisor::{ConfigSource, PkiHandle, Supervisor};
use crate::systemd::Lifecycle;
use crate::transport::pki_task::{refresh_pki, spawn_pki_task};
use crate::transport::tls::TlsState;

/// Queue between the udev thread and the supervisor.
const WATCH_QUEUE: usize = 256;
/// Queue of control requests waiting for the supervisor.
const CONTROL_QUEUE: usize = 16;

/// Options of `lucidgate serve` beyond the config.
#[derive(Debug, Default, Clone)]
pub(crate) struct ServeOptions {
    /// Do not watch udev (only `[[device]]` entries are served).
    pub(crate) no_udev: bool,
    /// Where the config was read from (for reloads).
    pub(crate) source: ConfigSource,
}

/// Runs the daemon until SIGINT/SIGTERM: state, control socket, udev watch, supervisor.
pub(crate) async fn serve(
    config: Config,
    opts: ServeOptions,
    lifecycle: &mut dyn Lifecycle,
) -> Result<()> {
    // Signals first: a SIGTERM during start-up (key generation can take a moment) must end
    // the daemon cleanly, and SIGHUP must never kill it.
    let cancel = CancellationToken::new();
    let (reload_tx, reload_rx) = mpsc::channel(1);
    spawn_signal_handler(cancel.clone(), reload_tx)?;
    crate::device::access::record_start();
    let config = Arc::new(config);
    state::ensure_private_dir(&config.state_dir)?;
    let (registry, warnings) = Registry::load(&config.state_dir)?;
    for w in warnings {
        warn!("{w}");
    }
    let tracker = TaskTracker::new();

    let control_socket = control::bind(&config.control_socket).await?;
    let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
    if let Some(addr) = config.metrics.listen {
        crate::openmetrics::spawn(addr, control_tx.clone(), cancel.clone(), &tracker).await?;
    }
    // The control server removes the socket file when it stops (see control::ControlSocket).
    control::spawn_server(
        control_socket,
        control_tx,
        config.limits.max_control_clients,
        cancel.clone(),
        &tracker,
    );

    let (watch_tx, watch_rx) = mpsc::channel(WATCH_QUEUE);
    let mut watch_done = opts.no_udev;
    let _watch_thread = if opts.no_udev {
        drop(watch_tx);
        None
    } else {
        // Block devices too when USB-stick provisioning is on (a stick at boot is seen too).
        let subsystems: &[&str] = if config.provision.usb {
            &["tty", "block"]
        } else {
            &["tty"]
        };
        match udev_watch::spawn(subsystems, watch_tx) {
            Ok(h) => Some(h),
            Err(e) => {
                warn!(
                    "udev is not available ({e:#}); hotplug is off, only [[device]] entries are served"
                );
                watch_done = true;
                None
            }
        }
    };

    let clock: SharedClock = Arc::new(SystemClock::from_env());
    let tls = TlsState::new(clock.clone(), config.limits.max_handshakes);
    // Without TLS there is no PKI task: the receiver is dropped and requests are answered at once.
    let (pki_reload, pki_reload_rx) = mpsc::unbounded_channel();
    let (pki_settings, pki_settings_rx) = watch::channel(PkiSettings::from_config(&config));
    if config.uses_tls() {
        let settings = PkiSettings::from_config(&config);
        match refresh_pki(&config.state_dir, &settings, &clock, &tls) {
            Ok(_) => {}
            Err(e) if crate::clock::implausible(clock.now()).is_some() => {
                warn!("TLS relays wait for the clock: {e:#}");
            }
            Err(e) => return Err(e.context("loading the PKI")),
        }
        spawn_pki_task(
            config.state_dir.clone(),
            pki_settings_rx,
            clock.clone(),
            tls.clone(),
            pki_reload_rx,
            cancel.clone(),
            &tracker,
        );
    } else {
        tls.set_unavailable("no module uses TLS".into());
    }

    let announcer = match crate::discovery::Announcer::start(&config.discovery) {
        Ok(a) => a,
        Err(e) => {
            warn!(
                event = "mdns-unavailable",
                "modules are served without mDNS announcements: {e:#} (set discovery.mdns = false to silence this)"
            );
            None
        }
    };
    let mut supervisor = Supervisor::new(
        config.clone(),
        registry,
        cancel.clone(),
        tracker.clone(),
        PkiHandle {
            tls,
            reload: pki_reload,
            settings: pki_settings,
        },
        opts.source.clone(),
    );
    supervisor.set_announcer(announcer.clone());
    supervisor.set_clock(clock.clone());
    let result = supervisor
        .run(watch_rx, watch_done, control_rx, reload_rx, lifecycle)
        .await;
    cancel.cancel();
    tracker.close();
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .is_err()
    {
        warn!("some tasks did not finish within 5 s of shutdown");
    }
    if let Some(a) = announcer {
        // Goodbye packets, so browsers forget the modules now rather than after the TTL.
        tokio::task::spawn_blocking(move || a.shutdown()).await.ok();
    }
    info!("stopped");
    result
}

fn spawn_signal_handler(cancel: CancellationToken, reload: mpsc::Sender<()>) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut hup = signal(SignalKind::hangup()).context("installing SIGHUP handler")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => { info!("SIGTERM received"); break; }
                _ = int.recv() => { info!("SIGINT received"); break; }
                _ = hup.recv() => {
                    info!("SIGHUP received: reloading");
                    // A reload already queued covers this one too.
                    let _ = reload.try_send(());
                }
                _ = cancel.cancelled() => return,
            }
        }
        cancel.cancel();
    });
    Ok(())
}

/// Path of the state dir's port registry (for `lucidgate port`).
pub(crate) fn registry_path(config: &Config) -> PathBuf {
    config.state_dir.join(crate::ports::REGISTRY_FILE)
}
