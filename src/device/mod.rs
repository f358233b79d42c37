//! Devices: the udev watch ([`watch`]), deciding which ttys are LucidControl modules
//! ([`matcher`]), and the owned, `Send` [`DeviceEvent`] the rest of the daemon sees.
//!
//! udev's types are `!Send`; they never leave the watch thread. Everything downstream works on
//! plain data, which is also what makes the matching testable without udev.

pub mod access;
pub mod matcher;
pub mod watch;

use std::collections::BTreeMap;
use std::path::PathBuf;

pub use matcher::{Matcher, ModuleInfo, SerialSource};

/// What happened to a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Present: seen at start-up or plugged in.
    Add,
    /// Properties changed (e.g. the udev database was completed after the node appeared).
    Change,
    Remove,
}

/// A udev device event, as owned data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceEvent {
    pub action: Action,
    pub syspath: PathBuf,
    pub subsystem: String,
    pub devnode: Option<PathBuf>,
    /// All udev properties (`ID_VENDOR`, `ID_SERIAL_SHORT`, ...).
    pub properties: BTreeMap<String, String>,
    /// The `serial` sysfs attribute of the parent USB device, if any (fallback serial source).
    pub usb_serial_attr: Option<String>,
}

impl DeviceEvent {
    pub fn property(&self, name: &str) -> Option<&str> {
        self.properties.get(name).map(String::as_str)
    }
}
