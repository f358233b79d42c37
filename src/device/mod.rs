//! Devices: the udev watch ([`watch`]), deciding which ttys are LucidControl modules
//! ([`matcher`]), and the owned, `Send` [`DeviceEvent`] the rest of the daemon sees.
//!
//! udev's types are `!Send`; they never leave the watch thread. Everything downstream works on
//! plain data, which is also what makes the matching testable without udev.

pub(crate) mod access;
mod matcher;
pub(crate) mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub(crate) use matcher::{Matcher, ModuleInfo, SerialSource};

/// What happened to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Action {
    /// Present: seen at start-up or plugged in.
    Add,
    /// Properties changed (e.g. the udev database was completed after the node appeared).
    Change,
    Remove,
}

/// A udev device event, as owned data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceEvent {
    pub(crate) action: Action,
    pub(crate) syspath: PathBuf,
    pub(crate) subsystem: String,
    pub(crate) devnode: Option<PathBuf>,
    /// All udev properties (`ID_VENDOR`, `ID_SERIAL_SHORT`, ...).
    pub(crate) properties: BTreeMap<String, String>,
    /// The `serial` sysfs attribute of the parent USB device, if any (fallback serial source).
    pub(crate) usb_serial_attr: Option<String>,
}

impl DeviceEvent {
    pub(crate) fn property(&self, name: &str) -> Option<&str> {
        self.properties.get(name).map(String::as_str)
    }
}
