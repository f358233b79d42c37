//! The status report: what every present module is doing, built from the module table and the
//! relays' live counters (answered on the control socket, read by `lucidgate status`).

use super::Supervisor;
use crate::status::{ModuleStatus, StatusReport};

impl Supervisor {
    /// The status of every present module.
    pub(crate) fn status(&self) -> StatusReport {
        let (_, not) = self.desired();
        let mut modules = Vec::new();
        for (key, info) in &self.devices {
            let settings = self.config.module_settings(&info.serial);
            let mut m = ModuleStatus {
                serial: info.serial.clone(),
                serial_source: serde_json::to_value(info.serial_source)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                model: info.model.clone(),
                vendor: info.vendor.clone(),
                devnode: info.devnode.display().to_string(),
                port: None,
                port_source: None,
                transport: settings.transport.to_string(),
                policy: settings.policy.to_string(),
                clients: 0,
                client: None,
                state: "starting".into(),
                since: None,
                error: None,
                sessions: 0,
                refused: 0,
                refused_address: 0,
                bytes_up: 0,
                bytes_down: 0,
                identity_state: String::new(),
                identity: None,
                identity_error: None,
                metrics: None,
            };
            if let Some(reason) = not.get(key) {
                m.state = reason.to_string();
            } else if let Some(r) = self
                .relays
                .get(&info.serial)
                .filter(|r| r.info.syspath == *key)
            {
                let st = &r.handle.stats;
                use std::sync::atomic::Ordering::Relaxed;
                m.state = "serving".into();
                m.port = Some(r.handle.port);
                m.port_source = Some(r.source.to_string());
                m.clients = st.clients.load(Relaxed);
                {
                    let list = st.client.lock().unwrap_or_else(|p| p.into_inner());
                    m.client = (!list.is_empty()).then(|| list.join(", "));
                }
                m.metrics = Some(st.metrics.snapshot());
                let id = st.identity.lock().unwrap_or_else(|p| p.into_inner());
                m.identity_state = id.label().to_string();
                m.identity = id.identity().cloned();
                m.identity_error = id.problem(&info.serial);
                m.since = Some(humantime::format_rfc3339_seconds(r.handle.since).to_string());
                m.sessions = st.sessions.load(Relaxed);
                m.refused = st.refused.load(Relaxed);
                m.refused_address = st.refused_address.load(Relaxed);
                m.bytes_up = st.traffic.bytes_up.load(Relaxed);
                m.bytes_down = st.traffic.bytes_down.load(Relaxed);
            } else if let Some(f) = self.failures.get(&info.serial) {
                m.state = "failed".into();
                m.error = Some(f.reason.clone());
            }
            modules.push(m);
        }
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_string(),
            pid: std::process::id(),
            tasks: tokio::runtime::Handle::try_current()
                .map(|h| h.metrics().num_alive_tasks())
                .unwrap_or(0),
            modules,
        }
    }

    pub(super) fn summary(&self) -> String {
        let served: Vec<String> = self
            .relays
            .iter()
            .map(|(s, r)| format!("{s}:{}", r.handle.port))
            .collect();
        format!("{} modules served: {}", served.len(), served.join(" "))
    }
}
