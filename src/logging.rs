//! Logging set-up: human-readable lines on stderr, filtered by `--log-level` or `RUST_LOG`.

use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `level` is used when `RUST_LOG` is not set.
pub fn init(level: &str) {
    let filter = EnvFilter::try_from_default_env()
        // rustls' own warnings (e.g. a client sending an IP address as SNI) are not the
        // operator's business; lucidgate logs every refused peer itself.
        .or_else(|_| EnvFilter::try_new(format!("{level},rustls=error")))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
