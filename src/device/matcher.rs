//! Which ttys are LucidControl modules, and what their identity (serial, model) is.

use std::path::PathBuf;

use glob::Pattern;

use super::DeviceEvent;
use crate::config::{MatchRule, check_serial};

/// Where a module's serial came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum SerialSource {
    /// udev's `ID_SERIAL_SHORT`.
    Udev,
    /// The USB device's `serial` attribute (udev had none).
    UsbAttribute,
    /// No serial at all: the key is made from the USB path, so the port follows the socket the
    /// module is plugged into.
    UsbPath,
    /// A `[[device]]` entry of the config.
    Config,
}

/// A module as the supervisor knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ModuleInfo {
    /// The key of everything: ports, overrides, status, logs.
    pub(crate) serial: String,
    pub(crate) serial_source: SerialSource,
    pub(crate) model: String,
    pub(crate) vendor: String,
    pub(crate) devnode: PathBuf,
    /// Identifies the device across its events (udev syspath, or the config path).
    pub(crate) syspath: PathBuf,
}

/// Compiled match rules.
#[derive(Debug, Clone)]
pub(crate) struct Matcher {
    rules: Vec<CompiledRule>,
}

#[derive(Debug, Clone)]
struct CompiledRule {
    fields: Vec<(&'static str, Pattern)>,
}

impl Matcher {
    /// Compiles rules; patterns were validated with the config, a bad one here matches nothing.
    pub(crate) fn new(rules: &[MatchRule]) -> Matcher {
        let rules = rules
            .iter()
            .map(|r| {
                let mut fields = Vec::new();
                for (prop, pat) in [
                    ("ID_VENDOR", &r.vendor),
                    ("ID_MODEL", &r.model),
                    ("ID_VENDOR_ID", &r.vendor_id),
                    ("ID_MODEL_ID", &r.product_id),
                ] {
                    if let Some(p) = pat {
                        let compiled =
                            Pattern::new(p).unwrap_or_else(|_| Pattern::new("[]never").unwrap());
                        fields.push((prop, compiled));
                    }
                }
                CompiledRule { fields }
            })
            .collect();
        Matcher { rules }
    }

    fn matches(&self, ev: &DeviceEvent) -> bool {
        self.rules.iter().any(|r| {
            !r.fields.is_empty()
                && r.fields.iter().all(|(prop, pat)| {
                    ev.property(prop)
                        .is_some_and(|v| pat.matches_with(v, glob::MatchOptions::new()))
                })
        })
    }

    /// The module this event describes, or `None` for a device that is not one (wrong
    /// subsystem, not on USB, no device node, no rule matches).
    pub(crate) fn module_of(&self, ev: &DeviceEvent) -> Option<ModuleInfo> {
        if ev.subsystem != "tty" || ev.property("ID_BUS") != Some("usb") {
            return None;
        }
        let devnode = ev.devnode.clone()?;
        if !self.matches(ev) {
            return None;
        }
        let usable = |s: &str| check_serial(s).is_ok();
        let (serial, serial_source) =
            if let Some(s) = ev.property("ID_SERIAL_SHORT").filter(|s| usable(s)) {
                (s.to_string(), SerialSource::Udev)
            } else if let Some(s) = ev
                .usb_serial_attr
                .as_deref()
                .map(str::trim)
                .filter(|s| usable(s))
            {
                (s.to_string(), SerialSource::UsbAttribute)
            } else {
                let path = ev
                    .property("ID_PATH")
                    .map(str::to_string)
                    .unwrap_or_else(|| ev.syspath.to_string_lossy().replace('/', "-"));
                let key: String = format!("path-{path}")
                    .chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || "-_.:".contains(c) {
                            c
                        } else {
                            '_'
                        }
                    })
                    .take(crate::config::MAX_SERIAL_LEN)
                    .collect();
                (key, SerialSource::UsbPath)
            };
        Some(ModuleInfo {
            serial,
            serial_source,
            model: ev.property("ID_MODEL").unwrap_or("unknown").to_string(),
            vendor: ev.property("ID_VENDOR").unwrap_or("unknown").to_string(),
            devnode,
            syspath: ev.syspath.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::device::Action;

    fn ev(props: &[(&str, &str)]) -> DeviceEvent {
        DeviceEvent {
            action: Action::Add,
            syspath: "/sys/devices/usb1/1-1/1-1:1.0/tty/ttyACM0".into(),
            subsystem: "tty".into(),
            devnode: Some("/dev/ttyACM0".into()),
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            usb_serial_attr: None,
        }
    }

    fn lucid() -> Vec<(&'static str, &'static str)> {
        vec![
            ("ID_BUS", "usb"),
            ("ID_VENDOR", "deciphe_it"),
            ("ID_MODEL", "LucidIo_AO4"),
            ("ID_SERIAL_SHORT", "11001001FA480000"),
            ("ID_PATH", "pci-0000:00:14.0-usb-0:1:1.0"),
        ]
    }

    fn default_matcher() -> Matcher {
        Matcher::new(&Config::default().effective_match_rules())
    }

    #[test]
    fn matches_a_lucidcontrol_module() {
        let m = default_matcher().module_of(&ev(&lucid())).unwrap();
        assert_eq!(m.serial, "11001001FA480000");
        assert_eq!(m.serial_source, SerialSource::Udev);
        assert_eq!(m.model, "LucidIo_AO4");
    }

    #[test]
    fn model_rule_alone_is_enough() {
        let mut p = lucid();
        p[1] = ("ID_VENDOR", "somebody_else");
        assert!(default_matcher().module_of(&ev(&p)).is_some());
    }

    #[test]
    fn other_ttys_are_ignored() {
        let ftdi = ev(&[
            ("ID_BUS", "usb"),
            ("ID_VENDOR", "FTDI"),
            ("ID_MODEL", "FT232R_USB_UART"),
            ("ID_SERIAL_SHORT", "A50285BI"),
        ]);
        assert!(default_matcher().module_of(&ftdi).is_none());
        let mut not_usb = ev(&lucid());
        not_usb.properties.insert("ID_BUS".into(), "pci".into());
        assert!(default_matcher().module_of(&not_usb).is_none());
        let mut block = ev(&lucid());
        block.subsystem = "block".into();
        assert!(default_matcher().module_of(&block).is_none());
        let mut no_node = ev(&lucid());
        no_node.devnode = None;
        assert!(default_matcher().module_of(&no_node).is_none());
    }

    #[test]
    fn config_rules_add_devices_and_builtin_can_be_switched_off() {
        let ftdi = ev(&[
            ("ID_BUS", "usb"),
            ("ID_VENDOR_ID", "0403"),
            ("ID_MODEL_ID", "6001"),
        ]);
        let cfg = Config::parse(
            "[[match]]\nvendor_id = \"0403\"\nproduct_id = \"60*\"\n",
            "t",
        )
        .unwrap();
        assert!(
            Matcher::new(&cfg.effective_match_rules())
                .module_of(&ftdi)
                .is_some()
        );
        let cfg = Config::parse(
            "builtin_match = false\n[[match]]\nvendor_id = \"0403\"\n",
            "t",
        )
        .unwrap();
        assert!(
            Matcher::new(&cfg.effective_match_rules())
                .module_of(&ev(&lucid()))
                .is_none()
        );
    }

    #[test]
    fn serial_fallbacks() {
        let mut p = lucid();
        p.retain(|(k, _)| *k != "ID_SERIAL_SHORT");
        let mut e = ev(&p);
        e.usb_serial_attr = Some("ABC123 \n".into());
        let m = default_matcher().module_of(&e).unwrap();
        assert_eq!(
            (m.serial.as_str(), m.serial_source),
            ("ABC123", SerialSource::UsbAttribute)
        );
        e.usb_serial_attr = None;
        let m = default_matcher().module_of(&e).unwrap();
        assert_eq!(m.serial, "path-pci-0000:00:14.0-usb-0:1:1.0");
        assert_eq!(m.serial_source, SerialSource::UsbPath);
        // A serial with characters that cannot be a key falls back too.
        e.properties
            .insert("ID_SERIAL_SHORT".into(), "../../etc".into());
        assert_eq!(
            default_matcher().module_of(&e).unwrap().serial_source,
            SerialSource::UsbPath
        );
    }
}
