//! The time source. Everything that decides validity (issuing, renewal, rustls' certificate
//! checks) asks a [`Clock`], so tests can move time. The only way to move it outside tests is the
//! explicitly dangerous `LUCIDGATE_DANGEROUS_CLOCK_OFFSET_SECS` environment variable.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Environment variable that shifts lucidgate's clock (tests only; it weakens validity checks).
pub const CLOCK_OFFSET_ENV: &str = "LUCIDGATE_DANGEROUS_CLOCK_OFFSET_SECS";

/// When this binary was built (UNIX seconds); an earlier clock is certainly wrong.
const BUILD_UNIX: &str = env!("LUCIDGATE_BUILD_UNIX");

/// A source of the current time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> SystemTime;
}

/// The system clock, shifted by a fixed offset (zero unless the dangerous variable is set).
#[derive(Debug, Clone, Default)]
pub struct SystemClock {
    offset_secs: i64,
}

impl SystemClock {
    /// The system clock, honouring [`CLOCK_OFFSET_ENV`].
    pub fn from_env() -> SystemClock {
        let offset_secs = std::env::var(CLOCK_OFFSET_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<i64>().ok())
            .unwrap_or(0);
        if offset_secs != 0 {
            tracing::warn!("{CLOCK_OFFSET_ENV}={offset_secs}: the clock is shifted (tests only)");
        }
        SystemClock { offset_secs }
    }

    #[cfg(test)]
    pub(crate) fn with_offset(offset_secs: i64) -> SystemClock {
        SystemClock { offset_secs }
    }
}

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        let now = SystemTime::now();
        if self.offset_secs >= 0 {
            now + Duration::from_secs(self.offset_secs as u64)
        } else {
            now.checked_sub(Duration::from_secs(self.offset_secs.unsigned_abs()))
                .unwrap_or(UNIX_EPOCH)
        }
    }
}

pub(crate) type SharedClock = Arc<dyn Clock>;

/// The build time as a `SystemTime`.
fn build_time() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(BUILD_UNIX.parse().unwrap_or(0))
}

/// `Some(why)` when `now` is clearly wrong: earlier than the build of this binary.
pub(crate) fn implausible(now: SystemTime) -> Option<String> {
    let built = build_time();
    (now < built).then(|| {
        format!(
            "the clock says {} but this lucidgate was built at {}",
            humantime::format_rfc3339_seconds(now),
            humantime::format_rfc3339_seconds(built)
        )
    })
}

/// Seconds since the epoch.
pub(crate) fn unix(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// rustls asks this for "now" when it checks certificates.
#[derive(Debug)]
pub(crate) struct RustlsTime(pub SharedClock);

impl rustls::time_provider::TimeProvider for RustlsTime {
    fn current_time(&self) -> Option<rustls::pki_types::UnixTime> {
        let d = self.0.now().duration_since(UNIX_EPOCH).ok()?;
        Some(rustls::pki_types::UnixTime::since_unix_epoch(d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_move_time_both_ways() {
        let base = SystemTime::now();
        let ahead = SystemClock::with_offset(3600).now();
        let behind = SystemClock::with_offset(-3600).now();
        assert!(ahead.duration_since(base).unwrap() >= Duration::from_secs(3599));
        assert!(base.duration_since(behind).unwrap() >= Duration::from_secs(3599));
    }

    #[test]
    fn a_clock_before_the_build_is_implausible() {
        assert!(implausible(SystemTime::now()).is_none());
        let why = implausible(UNIX_EPOCH + Duration::from_secs(86400)).unwrap();
        assert!(
            why.contains("1970-01-02") && why.contains("built at"),
            "{why}"
        );
    }
}
