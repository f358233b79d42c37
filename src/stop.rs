//! What ends a command that runs in the foreground until told to stop (`attach`, `emulate`):
//! SIGTERM or SIGINT on Linux (systemd stops units with SIGTERM), Ctrl-C elsewhere.

#[cfg(target_os = "linux")]
use anyhow::Context;
use anyhow::Result;

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
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}
