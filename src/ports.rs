//! The port rule and the port registry.
//!
//! A module's port comes from, in order: a fixed port in config, the port the registry
//! (`state_dir/ports.toml`) remembers for its serial, or the derived port `base + serial % span`
//! (16-hex-digit serials are read as hex; other keys are hashed with FNV-1a, which is stable
//! across versions and architectures). A derived port that is taken is probed upward (wrapping
//! inside the span) and the choice is persisted, so once a serial has a port it keeps it.
//! The supervisor is the registry's only writer.

#[cfg(target_os = "linux")]
use std::collections::{BTreeMap, BTreeSet};
use std::io;
#[cfg(target_os = "linux")]
use std::path::{Path, PathBuf};

#[cfg(target_os = "linux")]
use anyhow::{Context, Result};
#[cfg(target_os = "linux")]
use serde::Deserialize;
use serde::Serialize;

use crate::config::Config;
#[cfg(target_os = "linux")]
use crate::config::check_serial;
#[cfg(target_os = "linux")]
use crate::state;

/// File name of the registry inside `state_dir`.
pub(crate) const REGISTRY_FILE: &str = "ports.toml";

/// Where a module's port came from (shown in `status` and `lucidgate port`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum PortSource {
    /// `[modules."SERIAL"] port = N` in config.
    Fixed,
    /// Remembered in the registry from an earlier run.
    Registry,
    /// `base + serial % span`.
    Derived,
    /// The derived port was taken; the next free one was chosen and remembered.
    Probed,
    /// The remembered port is busy right now (another program holds it); served elsewhere until
    /// it is free again, without forgetting the remembered one.
    Temporary,
}

impl std::fmt::Display for PortSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PortSource::Fixed => "fixed",
            PortSource::Registry => "registry",
            PortSource::Derived => "derived",
            PortSource::Probed => "probed",
            PortSource::Temporary => "temporary",
        })
    }
}

/// Why no port could be given.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PortError {
    #[error("fixed port {port} is busy; free it or change [modules.\"{serial}\"] port")]
    FixedBusy {
        serial: String,
        port: u16,
        source: io::Error,
    },
    #[error(
        "no free port in {base}..={last} for {serial}; widen ports.span or give the module a fixed port"
    )]
    Exhausted {
        serial: String,
        base: u16,
        last: u16,
    },
    #[error("cannot listen on port {port}")]
    Bind { port: u16, source: io::Error },
}

/// FNV-1a, 64 bit: a stable hash for serials that are not hex numbers.
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The number a serial stands for in the port rule.
pub(crate) fn serial_number(serial: &str) -> u64 {
    if !serial.is_empty() && serial.len() <= 16 && serial.chars().all(|c| c.is_ascii_hexdigit()) {
        u64::from_str_radix(serial, 16).unwrap_or_else(|_| fnv1a64(serial.as_bytes()))
    } else {
        fnv1a64(serial.as_bytes())
    }
}

/// `base + serial % span`.
pub fn derive(serial: &str, base: u16, span: u16) -> u16 {
    let span = span.max(1) as u64;
    (base as u64 + serial_number(serial) % span) as u16
}

/// The port the config alone gives `serial`: fixed in `[modules."SERIAL"]`, else derived.
pub(crate) fn configured(serial: &str, config: &Config) -> (u16, PortSource) {
    match config.module_settings(serial).fixed_port {
        Some(p) => (p, PortSource::Fixed),
        None => (
            derive(serial, config.ports.base, config.ports.span),
            PortSource::Derived,
        ),
    }
}

#[cfg(target_os = "linux")]
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    #[serde(default)]
    ports: BTreeMap<String, u16>,
}

/// The remembered serial → port map, persisted atomically on every change.
#[derive(Debug)]
#[cfg(target_os = "linux")]
pub(crate) struct Registry {
    path: PathBuf,
    ports: BTreeMap<String, u16>,
}

#[cfg(target_os = "linux")]
impl Registry {
    /// An empty registry that writes to `path` (nothing is written until a port is recorded).
    pub(crate) fn empty(path: PathBuf) -> Registry {
        Registry {
            path,
            ports: BTreeMap::new(),
        }
    }

    /// Loads the registry from `state_dir`. A missing file is an empty registry; a corrupt one is
    /// moved aside (ports can be derived again) and reported in the returned warnings.
    pub(crate) fn load(state_dir: &Path) -> Result<(Registry, Vec<String>)> {
        let path = state_dir.join(REGISTRY_FILE);
        // Temporary files of writes a crash interrupted (the files themselves are whole).
        let mut warnings = crate::state::recover_group(state_dir)?;
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok((Registry::empty(path), warnings));
            }
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let aside = state::move_aside(&path)?;
                warnings.push(format!(
                    "port registry {} is not UTF-8; moved aside to {}, ports are derived again",
                    path.display(),
                    aside.display()
                ));
                return Ok((Registry::empty(path), warnings));
            }
            Err(e) => {
                return Err(e).with_context(|| format!("reading port registry {}", path.display()));
            }
        };
        let file: RegistryFile = match toml::from_str(&text) {
            Ok(f) => f,
            Err(e) => {
                let aside = state::move_aside(&path)?;
                warnings.push(format!(
                    "port registry {} is corrupt ({}); moved aside to {}, ports are derived again",
                    path.display(),
                    e.message(),
                    aside.display()
                ));
                return Ok((Registry::empty(path), warnings));
            }
        };
        let mut ports = BTreeMap::new();
        for (serial, port) in file.ports {
            if let Err(why) = check_serial(&serial) {
                warnings.push(format!(
                    "port registry {}: ignoring entry {serial:?}: serial {why}",
                    path.display()
                ));
            } else if port == 0 {
                warnings.push(format!(
                    "port registry {}: ignoring port 0 of {serial}",
                    path.display()
                ));
            } else {
                ports.insert(serial, port);
            }
        }
        Ok((Registry { path, ports }, warnings))
    }

    fn get(&self, serial: &str) -> Option<u16> {
        self.ports.get(serial).copied()
    }

    #[cfg(test)]
    fn entries(&self) -> &BTreeMap<String, u16> {
        &self.ports
    }

    /// Remembers `serial → port` and writes the registry if that changed anything.
    fn record(&mut self, serial: &str, port: u16) -> Result<()> {
        if self.ports.get(serial) == Some(&port) {
            return Ok(());
        }
        let old = self.ports.insert(serial.to_string(), port);
        let file = RegistryFile {
            ports: self.ports.clone(),
        };
        let mut text = String::from(
            "# lucidgate port registry: module serial -> TCP port.\n\
             # Written by lucidgate; a module keeps its port across replug and restart.\n\
             # Delete a line to let that module's port be derived again.\n",
        );
        text.push_str(&toml::to_string(&file).unwrap_or_default());
        if let Err(e) = state::write_atomic(&self.path, text.as_bytes(), 0o644) {
            match old {
                Some(p) => self.ports.insert(serial.to_string(), p),
                None => self.ports.remove(serial),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Records a choice; a registry that cannot be written costs stability across restarts,
    /// not service, so it is logged and the module is served anyway.
    fn record_or_warn(&mut self, serial: &str, port: u16) {
        if let Err(e) = self.record(serial, port) {
            tracing::warn!(
                serial,
                port,
                "cannot persist the port of {serial}: {e:#}; it may change after a restart"
            );
        }
    }

    /// What the rule gives `serial` without binding anything (`lucidgate port`): the port and
    /// where it comes from.
    pub(crate) fn lookup(&self, serial: &str, config: &Config) -> (u16, PortSource) {
        match (configured(serial, config), self.get(serial)) {
            ((p, PortSource::Fixed), _) => (p, PortSource::Fixed),
            (_, Some(p)) => (p, PortSource::Registry),
            (derived, None) => derived,
        }
    }

    /// Chooses and binds a port for `serial`. `bind` tries to listen on a port (it returns
    /// `AddrInUse` when another program has it); `in_use` are ports of relays running now.
    /// A derived or probed choice is persisted before it is returned.
    pub(crate) fn assign<T>(
        &mut self,
        serial: &str,
        config: &Config,
        in_use: &BTreeSet<u16>,
        mut bind: impl FnMut(u16) -> io::Result<T>,
    ) -> Result<(u16, PortSource, T), PortError> {
        let (first, source) = self.lookup(serial, config);
        if source == PortSource::Fixed {
            return match bind(first) {
                Ok(t) => Ok((first, source, t)),
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(PortError::FixedBusy {
                    serial: serial.to_string(),
                    port: first,
                    source: e,
                }),
                Err(e) => Err(PortError::Bind {
                    port: first,
                    source: e,
                }),
            };
        }
        // Ports that belong to somebody else even while that module is absent.
        let mut reserved: BTreeSet<u16> = self
            .ports
            .iter()
            .filter(|(s, _)| s.as_str() != serial)
            .map(|(_, p)| *p)
            .collect();
        reserved.extend(
            config
                .modules
                .iter()
                .filter(|(s, _)| s.as_str() != serial)
                .filter_map(|(_, m)| m.port),
        );
        reserved.extend(in_use.iter().copied());

        if !reserved.contains(&first) {
            match bind(first) {
                Ok(t) => {
                    if source == PortSource::Derived {
                        self.record_or_warn(serial, first);
                    }
                    return Ok((first, source, t));
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => {}
                Err(e) => {
                    return Err(PortError::Bind {
                        port: first,
                        source: e,
                    });
                }
            }
        }
        // Probe upward from the derived port, wrapping inside the span.
        let base = config.ports.base;
        let span = config.ports.span.max(1);
        let start = derive(serial, base, span);
        for i in 1..=span as u32 {
            let port = (base as u32 + ((start - base) as u32 + i) % span as u32) as u16;
            if port == first || reserved.contains(&port) {
                continue;
            }
            match bind(port) {
                Ok(t) => {
                    let probed = if source == PortSource::Registry {
                        PortSource::Temporary
                    } else {
                        self.record_or_warn(serial, port);
                        PortSource::Probed
                    };
                    return Ok((port, probed, t));
                }
                Err(e) if e.kind() == io::ErrorKind::AddrInUse => continue,
                Err(e) => return Err(PortError::Bind { port, source: e }),
            }
        }
        Err(PortError::Exhausted {
            serial: serial.to_string(),
            base,
            last: (base as u32 + span as u32 - 1) as u16,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free(_: u16) -> io::Result<()> {
        Ok(())
    }

    #[test]
    fn derivation_matches_the_issue_example() {
        assert_eq!(derive("11001001FA480000", 4000, 1000), 4216);
        assert_eq!(derive("0", 4000, 1000), 4000);
        assert_eq!(
            derive("FFFFFFFFFFFFFFFF", 4000, 1000),
            4000 + (u64::MAX % 1000) as u16
        );
        // Non-hex and over-long serials are hashed, stably.
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        let p = derive("path-pci-0000:00:14.0-usb-0:1:1.0", 4000, 1000);
        assert!((4000..5000).contains(&p));
        assert_eq!(p, derive("path-pci-0000:00:14.0-usb-0:1:1.0", 4000, 1000));
        assert_eq!(derive("anything", 4000, 1), 4000);
    }

    #[test]
    fn derived_port_is_persisted_and_survives_reload() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::default();
        let (mut reg, w) = Registry::load(dir.path()).unwrap();
        assert!(w.is_empty());
        let (p, src, ()) = reg
            .assign("11001001FA480000", &cfg, &BTreeSet::new(), free)
            .unwrap();
        assert_eq!((p, src), (4216, PortSource::Derived));
        let (reg2, _) = Registry::load(dir.path()).unwrap();
        assert_eq!(reg2.get("11001001FA480000"), Some(4216));
        assert_eq!(
            reg2.lookup("11001001FA480000", &cfg),
            (4216, PortSource::Registry)
        );
    }

    #[test]
    fn collisions_probe_to_the_next_free_port_and_stick() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::default();
        let (mut reg, _) = Registry::load(dir.path()).unwrap();
        // Two serials with the same derived port (4216).
        let a = "11001001FA480000";
        let b = "11001001FA4803E8"; // + 1000
        assert_eq!(derive(b, 4000, 1000), 4216);
        let (pa, _, ()) = reg.assign(a, &cfg, &BTreeSet::new(), free).unwrap();
        let (pb, sb, ()) = reg.assign(b, &cfg, &BTreeSet::new(), free).unwrap();
        assert_eq!((pa, pb, sb), (4216, 4217, PortSource::Probed));
        // Another program holds 4218: a third colliding serial skips it.
        let c = "11001001FA4807D0"; // + 2000
        let (pc, _, ()) = reg
            .assign(c, &cfg, &BTreeSet::new(), |p| {
                if p == 4218 {
                    Err(io::ErrorKind::AddrInUse.into())
                } else {
                    Ok(())
                }
            })
            .unwrap();
        assert_eq!(pc, 4219);
        // After a restart, b keeps 4217 even though a is absent now.
        let (mut reg2, _) = Registry::load(dir.path()).unwrap();
        let (pb2, sb2, ()) = reg2.assign(b, &cfg, &BTreeSet::new(), free).unwrap();
        assert_eq!((pb2, sb2), (4217, PortSource::Registry));
    }

    #[test]
    fn probing_wraps_inside_the_span_and_can_run_out() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::default();
        cfg.ports.base = 5000;
        cfg.ports.span = 3;
        let (mut reg, _) = Registry::load(dir.path()).unwrap();
        let serial = "2"; // derives 5002
        let busy = |p: u16| -> io::Result<()> {
            if p == 5002 {
                Err(io::ErrorKind::AddrInUse.into())
            } else {
                Ok(())
            }
        };
        let (p, _, ()) = reg.assign(serial, &cfg, &BTreeSet::new(), busy).unwrap();
        assert_eq!(p, 5000);
        let all_busy = |_: u16| -> io::Result<()> { Err(io::ErrorKind::AddrInUse.into()) };
        let e = reg
            .assign("1", &cfg, &BTreeSet::new(), all_busy)
            .unwrap_err()
            .to_string();
        assert!(e.contains("5000..=5002") && e.contains("ports.span"), "{e}");
    }

    #[test]
    fn fixed_port_wins_and_is_never_probed() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::parse("[modules.\"AB\"]\nport = 4001\n", "t").unwrap();
        let (mut reg, _) = Registry::load(dir.path()).unwrap();
        let (p, s, ()) = reg.assign("AB", &cfg, &BTreeSet::new(), free).unwrap();
        assert_eq!((p, s), (4001, PortSource::Fixed));
        assert_eq!(
            reg.get("AB"),
            None,
            "fixed ports are config's, not the registry's"
        );
        let e = reg
            .assign("AB", &cfg, &BTreeSet::new(), |_| -> io::Result<()> {
                Err(io::ErrorKind::AddrInUse.into())
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("4001") && e.contains("modules.\"AB\""), "{e}");
        // Another module whose derived port is 4001 steps around the fixed one.
        let (p2, s2, ()) = reg.assign("1", &cfg, &BTreeSet::new(), free).unwrap();
        assert_eq!((p2, s2), (4002, PortSource::Probed));
    }

    #[test]
    fn busy_registry_port_is_temporary_and_not_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = Config::default();
        let (mut reg, _) = Registry::load(dir.path()).unwrap();
        reg.record("11001001FA480000", 4500).unwrap();
        let (p, s, ()) = reg
            .assign("11001001FA480000", &cfg, &BTreeSet::new(), |p| {
                if p == 4500 {
                    Err(io::ErrorKind::AddrInUse.into())
                } else {
                    Ok(())
                }
            })
            .unwrap();
        assert_eq!((p, s), (4217, PortSource::Temporary));
        assert_eq!(reg.get("11001001FA480000"), Some(4500));
    }

    #[test]
    fn corrupt_registry_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(REGISTRY_FILE), "ports = [[[").unwrap();
        let (reg, w) = Registry::load(dir.path()).unwrap();
        assert!(reg.entries().is_empty());
        assert!(
            w[0].contains("corrupt") && w[0].contains("moved aside"),
            "{w:?}"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(
            names.iter().any(|n| n.starts_with("ports.toml.corrupt-")),
            "{names:?}"
        );
        std::fs::write(
            dir.path().join(REGISTRY_FILE),
            "[ports]\n\"a b\" = 4000\nGOOD = 4001\nZERO = 0\n",
        )
        .unwrap();
        let (reg, w) = Registry::load(dir.path()).unwrap();
        assert_eq!(reg.entries().len(), 1);
        assert_eq!(w.len(), 2, "{w:?}");
    }
}
