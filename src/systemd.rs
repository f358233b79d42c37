//! systemd integration: the notify protocol (READY, STATUS, WATCHDOG, RELOADING, STOPPING).
//!
//! Without `NOTIFY_SOCKET` (not started by systemd) every call is a no-op, so the daemon runs
//! unchanged anywhere. The watchdog is pinged from the supervisor's own loop, so a stuck loop
//! stops the pings and systemd restarts the daemon.

use std::time::Duration;

use sd_notify::NotifyState;

/// Hooks the daemon calls at points of its life (systemd notify plugs in here).
pub(crate) trait Lifecycle: Send {
    /// Config loaded, state usable, udev subscribed, present modules' listeners bound.
    fn ready(&mut self, _status: &str) {}
    /// The served set changed.
    fn status(&mut self, _status: &str) {}
    /// A reload started (it ends with `ready`).
    fn reloading(&mut self) {}
    /// How often the supervisor loop must call [`Lifecycle::watchdog`], if at all.
    fn watchdog_interval(&self) -> Option<Duration> {
        None
    }
    fn watchdog(&mut self) {}
    fn stopping(&mut self) {}
}

/// Talks to systemd through `NOTIFY_SOCKET`.
#[derive(Debug, Default)]
pub(crate) struct Systemd {
    watchdog: Option<Duration>,
}

impl Systemd {
    /// Reads `WATCHDOG_USEC`/`WATCHDOG_PID` from the environment.
    pub(crate) fn from_env() -> Systemd {
        Systemd {
            watchdog: sd_notify::watchdog_enabled(),
        }
    }

    fn send(&self, states: &[NotifyState]) {
        if let Err(e) = sd_notify::notify(states) {
            tracing::debug!("sd_notify failed: {e}");
        }
    }
}

impl Lifecycle for Systemd {
    fn ready(&mut self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(status)]);
    }

    fn status(&mut self, status: &str) {
        self.send(&[NotifyState::Status(status)]);
    }

    fn reloading(&mut self) {
        match NotifyState::monotonic_usec_now() {
            Ok(now) => self.send(&[NotifyState::Reloading, now]),
            Err(_) => self.send(&[NotifyState::Reloading]),
        }
    }

    fn watchdog_interval(&self) -> Option<Duration> {
        // Ping at half the timeout, as sd_watchdog_enabled(3) recommends.
        self.watchdog.map(|d| d / 2)
    }

    fn watchdog(&mut self) {
        self.send(&[NotifyState::Watchdog]);
    }

    fn stopping(&mut self) {
        self.send(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
    }
}
