//! What ends a command that runs in the foreground until told to stop (`attach`, `emulate`):
//! SIGTERM or SIGINT on Linux (systemd stops units with SIGTERM), Ctrl-C elsewhere, and on
//! Windows the Service Control Manager's stop (`request`, from `service`).

#[cfg(target_os = "linux")]
use anyhow::Context;
use anyhow::Result;

/// A stop asked for from inside the process (the Windows service's control handler). A
/// `Notify` keeps the request when nobody waits yet, so a stop sent during start-up is not lost.
#[cfg(not(target_os = "linux"))]
static REQUEST: tokio::sync::Notify = tokio::sync::Notify::const_new();
#[cfg(not(target_os = "linux"))]
static REQUEST_WHY: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// Ends the waiting `StopSignal::recv` (or the next one), which then says `why`.
#[cfg(not(target_os = "linux"))]
pub(crate) fn request(why: &'static str) {
    let _ = REQUEST_WHY.set(why);
    REQUEST.notify_one();
}

/// The installed stop handlers.
pub(crate) struct StopSignal {
    #[cfg(target_os = "linux")]
    term: tokio::signal::unix::Signal,
    #[cfg(target_os = "linux")]
    int: tokio::signal::unix::Signal,
}

impl StopSignal {
    /// Installs the handlers (inside a Tokio runtime): from here on the signal no longer ends
    /// the process by its default action, so a link or listener is cleaned up.
    pub(crate) fn install() -> Result<StopSignal> {
        #[cfg(target_os = "linux")]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(StopSignal {
                term: signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
                int: signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
            })
        }
        #[cfg(not(target_os = "linux"))]
        Ok(StopSignal {})
    }

    /// Waits for the signal; says which.
    pub(crate) async fn recv(&mut self) -> &'static str {
        #[cfg(target_os = "linux")]
        {
            tokio::select! {
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            // A service has no console: there Ctrl-C cannot be installed, and only the
            // request ends the wait.
            let ctrl_c = async {
                if tokio::signal::ctrl_c().await.is_err() {
                    std::future::pending::<()>().await
                }
            };
            tokio::select! {
                _ = ctrl_c => "Ctrl-C",
                _ = REQUEST.notified() => REQUEST_WHY.get().copied().unwrap_or("stop requested"),
            }
        }
    }
}
