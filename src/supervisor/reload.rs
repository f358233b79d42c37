//! `systemctl reload`: a pure [`plan`] of what a new configuration changes, and the
//! supervisor's reload that applies it. Settings only a restart can apply keep their running
//! values and are named in the plan's notes; relays follow by spec equality in the reconcile.

use tracing::{error, info, warn};

use super::Supervisor;
use crate::ca::PkiSettings;
use crate::config::{Config, ConfigError};
use crate::device::Matcher;
use crate::systemd::Lifecycle;
use std::path::PathBuf;
use std::sync::Arc;

/// What a reload runs with.
#[derive(Debug, Clone, PartialEq)]
struct ReloadPlan {
    /// The new configuration, with the settings that wait for a restart kept at their running
    /// values.
    pub(crate) config: Config,
    /// Changes that take effect only after a restart, in the operator's words.
    pub(crate) notes: Vec<String>,
}

/// What reloading from `old` to `new` does. Pure: no I/O, no clock.
fn plan(old: &Config, mut new: Config) -> ReloadPlan {
    let mut notes = Vec::new();
    let later = |what: &str| format!("{what} changes take effect after a restart");
    if new.state_dir != old.state_dir {
        notes.push(later("state_dir"));
        new.state_dir = old.state_dir.clone();
    }
    if new.control_socket != old.control_socket {
        notes.push(later("control_socket"));
        new.control_socket = old.control_socket.clone();
    }
    if new.discovery != old.discovery {
        notes.push(later("discovery"));
        new.discovery = old.discovery.clone();
    }
    // The udev watch's subsystems are chosen at start; the new value is kept so that sticks
    // already watched are judged by it.
    if new.provision.usb != old.provision.usb {
        notes.push(later("provision.usb"));
    }
    if new.metrics != old.metrics {
        notes.push(later("metrics"));
        new.metrics = old.metrics.clone();
    }
    // The handshake limit is a semaphore made at start.
    if new.limits.max_handshakes != old.limits.max_handshakes {
        notes.push(later("limits.max_handshakes"));
    }
    if new.uses_tls() && !old.uses_tls() {
        notes.push("TLS was off at start: restart lucidgate to serve TLS".to_string());
    }
    ReloadPlan { config: new, notes }
}

impl Supervisor {
    /// Re-reads the config; a bad one is refused whole and the running one stays. Relays whose
    /// settings did not change keep their clients; changed ones restart; removed ones stop.
    pub(crate) async fn reload(
        &mut self,
        lifecycle: &mut dyn Lifecycle,
    ) -> Result<String, ConfigError> {
        lifecycle.reloading();
        info!(event = "reload", "reloading the configuration");
        let new = match self.source.load() {
            Ok(c) => c,
            Err(e) => {
                error!(
                    event = "reload-failed",
                    "reload refused, the running configuration stays in force: {e}"
                );
                lifecycle.ready(&self.summary());
                return Err(e);
            }
        };
        let ReloadPlan { config: new, notes } = plan(&self.config, new);
        let pki = PkiSettings::from_config(&new);
        if *self.pki.settings.borrow() != pki {
            self.pki.settings.send_replace(pki);
            let _ = self.pki.reload.send(None);
        }
        self.config = Arc::new(new);
        self.matcher = Matcher::new(&self.config.effective_match_rules());
        let keys: Vec<PathBuf> = self.raw.keys().cloned().collect();
        for k in keys {
            self.rematch(&k, false);
        }
        self.poll_static();
        // Modules that failed get a fresh try under the new config.
        self.failures.clear();
        self.reconcile().await;
        let summary = self.summary();
        for n in &notes {
            warn!(event = "reload", "{n}");
        }
        info!(event = "reloaded", "configuration reloaded: {summary}");
        lifecycle.ready(&summary);
        Ok(if notes.is_empty() {
            summary
        } else {
            format!("{summary} (note: {})", notes.join("; "))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, "test.toml").unwrap()
    }

    #[test]
    fn the_same_config_changes_nothing() {
        let c = parse("[ports]\nbase = 5000\n");
        assert_eq!(
            plan(&c, c.clone()),
            ReloadPlan {
                config: c,
                notes: vec![]
            }
        );
    }

    #[test]
    fn relay_settings_take_effect_without_notes() {
        let old = parse("");
        let new = parse(
            "[ports]\nbase = 5000\n[relay]\ntransport = \"plain\"\n[modules.\"11001001FA480000\"]\nport = 4300\n",
        );
        let p = plan(&old, new.clone());
        assert_eq!(p.config, new);
        assert!(p.notes.is_empty(), "{:?}", p.notes);
    }

    #[test]
    fn restart_only_settings_keep_their_running_values_and_say_so() {
        let old = parse("state_dir = \"/var/lib/a\"\ncontrol_socket = \"/run/a.sock\"\n");
        let new = parse(
            "state_dir = \"/var/lib/b\"\ncontrol_socket = \"/run/b.sock\"\n[discovery]\nmdns = false\n[metrics]\nlisten = \"127.0.0.1:9100\"\n[ports]\nbase = 5000\n",
        );
        let p = plan(&old, new.clone());
        assert_eq!(p.config.state_dir, PathBuf::from("/var/lib/a"));
        assert_eq!(p.config.control_socket, PathBuf::from("/run/a.sock"));
        assert_eq!(p.config.discovery, old.discovery);
        assert_eq!(p.config.metrics, old.metrics);
        // What may change did.
        assert_eq!(p.config.ports, new.ports);
        assert_eq!(
            p.notes,
            [
                "state_dir changes take effect after a restart",
                "control_socket changes take effect after a restart",
                "discovery changes take effect after a restart",
                "metrics changes take effect after a restart",
            ]
        );
    }

    #[test]
    fn settings_made_at_start_are_noted_but_taken() {
        let old = parse("[relay]\ntransport = \"plain\"\n[provision]\nusb = true\n");
        let new = parse("[provision]\nusb = false\n[limits]\nmax_handshakes = 3\n");
        let p = plan(&old, new.clone());
        assert_eq!(p.config, new);
        assert_eq!(
            p.notes,
            [
                "provision.usb changes take effect after a restart",
                "limits.max_handshakes changes take effect after a restart",
                "TLS was off at start: restart lucidgate to serve TLS",
            ]
        );
    }
}
