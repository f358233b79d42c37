//! The status report: what `lucidgate status` shows and the OpenMetrics endpoint exports,
//! built by the supervisor from its module table and the relays' counters.

use serde::{Deserialize, Serialize};

/// One module in `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModuleStatus {
    pub serial: String,
    pub serial_source: String,
    pub model: String,
    pub vendor: String,
    pub devnode: String,
    pub port: Option<u16>,
    pub port_source: Option<String>,
    pub transport: String,
    pub policy: String,
    pub clients: usize,
    pub client: Option<String>,
    /// `serving`, `failed`, `disabled`, `duplicate` or `over-limit`.
    pub state: String,
    pub since: Option<String>,
    pub error: Option<String>,
    pub sessions: u64,
    pub refused: u64,
    /// Connections turned away by `allow_from` (before any handshake).
    #[serde(default)]
    pub refused_address: u64,
    pub bytes_up: u64,
    pub bytes_down: u64,
    /// GetId at relay start: `pending`, `ok`, `mismatch` or `failed` (empty when not served).
    #[serde(default)]
    pub identity_state: String,
    /// What GetId said (class, type, firmware, hardware, serial).
    #[serde(default)]
    pub identity: Option<crate::relay::identify::ModuleIdentity>,
    /// What is wrong with the identity, if anything.
    #[serde(default)]
    pub identity_error: Option<String>,
    /// Protocol counters (requests, answers by status, timeouts, refused writes).
    #[serde(default)]
    pub metrics: Option<crate::relay::metrics::MetricsSnapshot>,
}

/// The answer to `status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub pid: u32,
    /// Tasks alive in the daemon's runtime (a leak shows as growth across plug cycles).
    pub tasks: usize,
    pub modules: Vec<ModuleStatus>,
}
