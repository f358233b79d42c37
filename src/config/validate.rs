//! The checks of a whole configuration that types alone cannot make: each error is (table, key,
//! message), placed on its line by [`super::Config::parse`].

use std::collections::BTreeMap;

use super::Config;
use super::check::{check_hostname, check_serial, check_token_hash, parse_duration, parse_net};

impl Config {
    /// Checks what types alone cannot; the error is (table, key, message).
    pub(super) fn validate(&self) -> Result<(), (String, String, String)> {
        let err = |t: &str, k: &str, m: String| Err((t.to_string(), k.to_string(), m));
        if self.listen.is_empty() {
            return err(
                "",
                "listen",
                "no listen address; use e.g. listen = [\"0.0.0.0\", \"::\"]".into(),
            );
        }
        if self.ports.base == 0 {
            return err("ports", "base", "must be 1 or more (e.g. 4000)".into());
        }
        if self.ports.span == 0 {
            return err("ports", "span", "must be 1 or more (e.g. 1000)".into());
        }
        if self.ports.base as u32 + self.ports.span as u32 - 1 > u16::MAX as u32 {
            return err(
                "ports",
                "span",
                format!(
                    "base {} + span {} goes past port 65535; lower base or span",
                    self.ports.base, self.ports.span
                ),
            );
        }
        if let Some(list) = &self.relay.allow_from {
            check_allow_from(list).or_else(|m| err("relay", "allow_from", m))?;
        }
        if self.relay.baud == 0 {
            return err("relay", "baud", "must be more than 0 (e.g. 115200)".into());
        }
        let l = &self.limits;
        if !(64..=1024 * 1024).contains(&l.buffer_bytes) {
            return err(
                "limits",
                "buffer_bytes",
                format!("{} is outside 64..=1048576", l.buffer_bytes),
            );
        }
        for (key, v) in [
            ("max_pending_per_module", l.max_pending_per_module),
            ("max_modules", l.max_modules),
            ("max_control_clients", l.max_control_clients),
        ] {
            if v == 0 {
                return err("limits", key, "must be 1 or more".into());
            }
        }
        if l.handshake_timeout_ms == 0 {
            return err("limits", "handshake_timeout_ms", "must be 1 or more".into());
        }
        if l.max_handshakes == 0 {
            return err("limits", "max_handshakes", "must be 1 or more".into());
        }
        if !self.discovery.hostname.is_empty()
            && let Err(m) = check_hostname(&self.discovery.hostname)
        {
            return err("discovery", "hostname", m.to_string());
        }
        if let Some(i) = self
            .discovery
            .interfaces
            .iter()
            .find(|i| i.is_empty() || i.len() > 15 || i.contains('/'))
        {
            return err(
                "discovery",
                "interfaces",
                format!("{i:?} is not a network interface name (as `ip link` lists them)"),
            );
        }
        if let Some(h) = &self.provision.token_hash
            && let Err(m) = check_token_hash(h)
        {
            return err("provision", "token_hash", m.to_string());
        }
        if l.max_clients_per_module == 0 {
            return err(
                "limits",
                "max_clients_per_module",
                "must be 1 or more".into(),
            );
        }
        if !(10..=60_000).contains(&l.answer_timeout_ms) {
            return err(
                "limits",
                "answer_timeout_ms",
                "must be between 10 and 60000 (the protocol's timeout is 1000)".into(),
            );
        }
        let t = &self.tls;
        for (key, v) in [
            ("server_cert_lifetime", &t.server_cert_lifetime),
            ("ca_lifetime", &t.ca_lifetime),
        ] {
            match parse_duration(v) {
                Err(m) => return err("tls", key, m.to_string()),
                Ok(d) if d.as_secs() < 2 => {
                    return err("tls", key, format!("{v:?} is too short (2s at least)"));
                }
                Ok(_) => {}
            }
        }
        if !(0.05..=0.95).contains(&t.renew_fraction) {
            return err(
                "tls",
                "renew_fraction",
                format!("{} is outside 0.05..=0.95", t.renew_fraction),
            );
        }
        for n in &t.names {
            if n.is_empty()
                || !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
            {
                return err("tls", "names", format!("{n:?} is not a DNS name"));
            }
        }
        let ext = [&t.ca_file, &t.cert_file, &t.key_file];
        if ext.iter().any(|f| f.is_some()) && !ext.iter().all(|f| f.is_some()) {
            return err(
                "tls",
                "ca_file",
                "an external PKI needs all three of ca_file, cert_file and key_file".into(),
            );
        }
        if l.stop_timeout_ms == 0 {
            return err("limits", "stop_timeout_ms", "must be 1 or more".into());
        }
        if l.retry_ms == 0 {
            return err("limits", "retry_ms", "must be 1 or more".into());
        }
        for (i, rule) in self.match_rules.iter().enumerate() {
            let fields = [&rule.vendor, &rule.model, &rule.vendor_id, &rule.product_id];
            if fields.iter().all(|f| f.is_none()) {
                return err(
                    "match",
                    "vendor",
                    format!(
                        "[[match]] rule #{} has no field; give vendor, model, vendor_id or product_id",
                        i + 1
                    ),
                );
            }
            for (key, pat) in [
                ("vendor", &rule.vendor),
                ("model", &rule.model),
                ("vendor_id", &rule.vendor_id),
                ("product_id", &rule.product_id),
            ] {
                if let Some(p) = pat
                    && let Err(e) = glob::Pattern::new(p)
                {
                    return err("match", key, format!("bad pattern {p:?}: {e}"));
                }
            }
        }
        let mut ports_seen: BTreeMap<u16, &str> = BTreeMap::new();
        for (serial, m) in &self.modules {
            let table = format!("modules.\"{serial}\"");
            if let Err(why) = check_serial(serial) {
                return err(&table, "", format!("module serial {serial:?} {why}"));
            }
            if let Some(port) = m.port {
                if port == 0 {
                    return err(&table, "port", "must be 1..=65535".into());
                }
                if let Some(other) = ports_seen.insert(port, serial) {
                    return err(
                        &table,
                        "port",
                        format!(
                            "port {port} is also given to module {other}; give each module its own port"
                        ),
                    );
                }
            }
            if m.baud == Some(0) {
                return err(&table, "baud", "must be more than 0".into());
            }
            if let Some(list) = &m.allow_from {
                check_allow_from(list).or_else(|msg| err(&table, "allow_from", msg))?;
            }
            if m.listen.as_ref().is_some_and(Vec::is_empty) {
                return err(
                    &table,
                    "listen",
                    "no listen address; remove the field to use the top-level listen, or use e.g. listen = [\"127.0.0.1\"]".into(),
                );
            }
        }
        let mut serials_seen = std::collections::BTreeSet::new();
        for (i, d) in self.devices.iter().enumerate() {
            if !d.path.is_absolute() {
                return err(
                    "device",
                    "path",
                    format!(
                        "[[device]] #{}: path {} must be absolute (e.g. /dev/ttyUSB0)",
                        i + 1,
                        d.path.display()
                    ),
                );
            }
            if let Err(why) = check_serial(&d.serial) {
                return err(
                    "device",
                    "serial",
                    format!("[[device]] #{}: serial {:?} {why}", i + 1, d.serial),
                );
            }
            if !serials_seen.insert(d.serial.as_str()) {
                return err(
                    "device",
                    "serial",
                    format!(
                        "[[device]] #{}: serial {} is listed twice; each device needs its own serial",
                        i + 1,
                        d.serial
                    ),
                );
            }
        }
        Ok(())
    }
}

/// An `allow_from` list: every entry a network or an address, and not empty (an empty list
/// would admit nobody, which is never what was meant).
fn check_allow_from(list: &[String]) -> Result<(), String> {
    if list.is_empty() {
        return Err(
            "an empty list admits no client; remove the field to admit every address, \
             or list the networks (e.g. [\"192.168.1.0/24\", \"::1\"])"
                .into(),
        );
    }
    for entry in list {
        parse_net(entry)?;
    }
    Ok(())
}
