//! Why a device node cannot be opened, said so that the operator can act on it: the service's
//! device allow-list (EPERM, from the device cgroup), file permissions (EACCES), another program
//! (EBUSY).
//!
//! systemd resolves `DeviceAllow=char-ttyACM` (and `block-sd`) through /proc/devices when the
//! service starts: a driver loaded later (a module plugged in after a boot without one, on a
//! system without the package's modules-load.d entry) stays refused until the service restarts.
//! The driver names present when lucidgate started are recorded ([`record_start`]), so that
//! refusal is told apart from a device the unit never allows, and fixed by a restart.

use std::collections::BTreeSet;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::OnceLock;

/// The kernel's table of driver names by major number.
const PROC_DEVICES: &str = "/proc/devices";

/// `(block?, name)` of every driver in /proc/devices when lucidgate started.
static AT_START: OnceLock<BTreeSet<(bool, String)>> = OnceLock::new();

/// Records the drivers loaded now (call once, when the daemon starts).
pub(crate) fn record_start() {
    let _ = AT_START.set(drivers().into_iter().map(|(b, _, n)| (b, n)).collect());
}

/// `(block?, major, name)` from /proc/devices.
fn drivers() -> Vec<(bool, u32, String)> {
    let text = std::fs::read_to_string(PROC_DEVICES).unwrap_or_default();
    parse_proc_devices(&text)
}

fn parse_proc_devices(text: &str) -> Vec<(bool, u32, String)> {
    let mut block = false;
    let mut out = Vec::new();
    for line in text.lines() {
        match line.trim() {
            "Character devices:" => block = false,
            "Block devices:" => block = true,
            l => {
                if let Some((major, name)) = l.split_once(' ')
                    && let Ok(major) = major.parse()
                {
                    out.push((block, major, name.trim().to_string()));
                }
            }
        }
    }
    out
}

/// Whether lucidgate runs as a systemd service (which restarts it when it exits with an error).
pub(crate) fn under_systemd() -> bool {
    std::env::var_os("INVOCATION_ID").is_some()
}

/// A device that could not be opened, with what to do about it.
#[derive(Debug, thiserror::Error)]
#[error("{what} {devnode}: {source}; {hint}")]
pub struct OpenError {
    pub(crate) what: &'static str,
    pub(crate) devnode: String,
    pub(crate) source: io::Error,
    pub(crate) hint: String,
    /// The device's driver was loaded after the service's device allow-list was made: a
    /// restart of the service lets it in.
    pub(crate) restart_fixes_it: bool,
}

/// Explains why opening `devnode` (`what`: "opening serial port", ...) failed with `err`.
pub(crate) fn explain(what: &'static str, devnode: &Path, err: io::Error) -> OpenError {
    let (hint, restart_fixes_it) = hint(devnode, &err);
    OpenError {
        what,
        devnode: devnode.display().to_string(),
        source: err,
        hint,
        restart_fixes_it,
    }
}

fn hint(devnode: &Path, err: &io::Error) -> (String, bool) {
    let meta = std::fs::metadata(devnode).ok();
    match err.raw_os_error() {
        Some(libc::EPERM) => {
            let Some(m) = meta.filter(|m| m.file_type().is_char_device() || m.file_type().is_block_device()) else {
                return ("the kernel refused it (EPERM)".into(), false);
            };
            let block = m.file_type().is_block_device();
            let major = libc::major(m.rdev());
            let kind = if block { "block" } else { "char" };
            let name = drivers()
                .into_iter()
                .find(|(b, maj, _)| *b == block && *maj == major)
                .map(|(_, _, n)| n)
                .unwrap_or_else(|| format!("major {major}"));
            let late = AT_START
                .get()
                .is_some_and(|start| !start.contains(&(block, name.clone())));
            if late {
                let fix = if under_systemd() {
                    "lucidgate restarts itself to apply it"
                } else {
                    "restart lucidgate to apply it"
                };
                (
                    format!(
                        "refused by the service's device allow-list (DeviceAllow=), which was made when lucidgate started, before the {name} driver was loaded; {fix} (the package loads cdc_acm and sd_mod at boot through modules-load.d)"
                    ),
                    true,
                )
            } else {
                (
                    format!(
                        "refused by the service's device allow-list: lucidgate.service allows char-ttyACM (modules) and block-sd (USB sticks); for this {kind}-{name} device add `DeviceAllow={kind}-{name} rw` with `systemctl edit lucidgate`"
                    ),
                    false,
                )
            }
        }
        Some(libc::EACCES) => {
            let owner = meta
                .map(|m| {
                    let group = nix::unistd::Group::from_gid(m.gid().into())
                        .ok()
                        .flatten()
                        .map(|g| g.name)
                        .unwrap_or_else(|| m.gid().to_string());
                    format!("group {group}, mode {:o}", m.mode() & 0o777)
                })
                .unwrap_or_default();
            (
                format!(
                    "lucidgate's user may not open it ({owner}): the service reaches ttys through group dialout and USB sticks through group lucidgate (udev rule 70-lucidgate.rules)"
                ),
                false,
            )
        }
        Some(libc::EBUSY) => (
            "another program has it open exclusively (ModemManager, ser2net, a terminal program?); stop it".into(),
            false,
        ),
        Some(libc::ENOENT) | Some(libc::ENODEV) | Some(libc::ENXIO) => {
            ("the device is gone (unplugged?)".into(), false)
        }
        _ => ("is another program using it?".into(), false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_devices_is_read_by_section() {
        let text =
            "Character devices:\n  1 mem\n166 ttyACM\n\nBlock devices:\n  8 sd\n259 blkext\n";
        let d = parse_proc_devices(text);
        assert!(d.contains(&(false, 166, "ttyACM".into())));
        assert!(d.contains(&(true, 8, "sd".into())));
        assert!(!d.contains(&(true, 166, "ttyACM".into())));
        assert_eq!(d.len(), 4);
    }

    #[test]
    fn hints_point_at_the_cause() {
        let e = explain(
            "opening serial port",
            Path::new("/nonexistent/ttyACM9"),
            io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert!(e.to_string().contains("gone"), "{e}");
        let e = explain(
            "opening serial port",
            Path::new("/dev/null"),
            io::Error::from_raw_os_error(libc::EBUSY),
        );
        assert!(e.to_string().contains("another program"), "{e}");
        // /dev/null is char 1:3 ("mem"), present when lucidgate started: not a late driver.
        record_start();
        let e = explain(
            "opening serial port",
            Path::new("/dev/null"),
            io::Error::from_raw_os_error(libc::EPERM),
        );
        assert!(!e.restart_fixes_it, "{e}");
        assert!(e.to_string().contains("DeviceAllow=char-mem rw"), "{e}");
        let e = explain(
            "opening serial port",
            Path::new("/dev/null"),
            io::Error::from_raw_os_error(libc::EACCES),
        );
        assert!(e.to_string().contains("group dialout"), "{e}");
    }
}
