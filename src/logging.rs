//! Logging set-up: journald with structured fields, or human-readable lines on stderr.
//!
//! Fields of events and spans become journal fields in upper case: `MODULE_SERIAL`,
//! `MODULE_MODEL`, `DEVNODE`, `PORT`, `PEER_ADDR`, `CLIENT_NAME`, `EVENT` (see docs/journald.md),
//! so `journalctl -u lucidgate MODULE_SERIAL=11001001FA480000` answers an operator's question.

use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Where logs go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum LogTarget {
    /// journald when stderr is connected to the journal (`JOURNAL_STREAM`), else stderr.
    Auto,
    Stderr,
    Journald,
}

/// The log filter: `RUST_LOG` when set (`debug`, `lucidgate=debug,rustls=warn`, ...), else
/// `level`. Plain target=level directives (tracing-subscriber's `Targets`): the regex-based
/// `EnvFilter` would add a quarter of a megabyte to the appliance binary for span filters
/// nobody here uses.
fn filter(level: &str) -> Targets {
    std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok())
        // rustls' own warnings (e.g. a client sending an IP address as SNI) are not the
        // operator's business; lucidgate logs every refused peer itself.
        .or_else(|| {
            format!("{level},rustls=error,fatfs=error,mdns_sd=warn")
                .parse()
                .ok()
        })
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO))
}

/// Installs the global subscriber. `level` is used when `RUST_LOG` is not set; `file`, when
/// given, takes the lines instead of stderr (appended; for `lucidgate.exe` run by the Task
/// Scheduler or as a service, where there is no console).
pub(crate) fn init(level: &str, target: LogTarget, file: Option<&std::path::Path>) {
    if let Some(path) = file {
        match std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            Ok(f) => {
                let fmt = tracing_subscriber::fmt::layer()
                    .with_writer(std::sync::Mutex::new(f))
                    .with_ansi(false)
                    .with_target(false);
                let _ = tracing_subscriber::registry()
                    .with(filter(level))
                    .with(fmt)
                    .try_init();
                return;
            }
            Err(e) => eprintln!(
                "lucidgate: cannot open the log file {} ({e}); logging to stderr",
                path.display()
            ),
        }
    }
    let journald = match target {
        LogTarget::Stderr => false,
        LogTarget::Journald => true,
        LogTarget::Auto => std::env::var_os("JOURNAL_STREAM").is_some(),
    };
    #[cfg(not(target_os = "linux"))]
    if journald {
        eprintln!("lucidgate: there is no journald here; logging to stderr");
    }
    #[cfg(target_os = "linux")]
    if journald {
        match tracing_journald::layer() {
            Ok(layer) => {
                // Conventional syslog priorities: info is 6, debug 7.
                let priorities = tracing_journald::PriorityMappings {
                    info: tracing_journald::Priority::Informational,
                    debug: tracing_journald::Priority::Debug,
                    ..tracing_journald::PriorityMappings::new()
                };
                let layer = layer
                    .with_field_prefix(None)
                    .with_syslog_identifier("lucidgate".to_string())
                    .with_priority_mappings(priorities);
                let _ = tracing_subscriber::registry()
                    .with(filter(level))
                    .with(layer)
                    .try_init();
                return;
            }
            Err(e) => eprintln!("lucidgate: journald is not reachable ({e}); logging to stderr"),
        }
    }
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = tracing_subscriber::registry()
        .with(filter(level))
        .with(fmt)
        .try_init();
}
