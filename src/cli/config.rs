//! `lucidgate config check`, `config import-ser2net` and `lucidgate port`: what the
//! configuration says, without a daemon.

#[cfg(target_os = "linux")]
use std::path::Path;
use std::path::PathBuf;

#[cfg(target_os = "linux")]
use anyhow::Context;
use anyhow::Result;

use super::{describe_config_path, load_config};
use crate::config;
use crate::ports;
#[cfg(target_os = "linux")]
use crate::ports::Registry;

pub(super) fn port(config_path: &Option<PathBuf>, serial: &str) -> Result<i32> {
    let (cfg, _) = load_config(config_path)?;
    if let Err(why) = config::check_serial(serial) {
        anyhow::bail!("serial {serial:?} {why}");
    }
    // The registry of remembered ports lives on the server; elsewhere (lucidgate.exe on a PC)
    // the port is what the config fixes or the rule derives.
    #[cfg(target_os = "linux")]
    let (port, source) = {
        let registry = match std::fs::metadata(cfg.state_dir.join(ports::REGISTRY_FILE)) {
            Ok(_) => Registry::load(&cfg.state_dir)
                .map(|(r, _)| r)
                .unwrap_or_else(|_| Registry::empty(PathBuf::new())),
            Err(_) => Registry::empty(PathBuf::new()),
        };
        registry.lookup(serial, &cfg)
    };
    #[cfg(not(target_os = "linux"))]
    let (port, source) = ports::configured(serial, &cfg);
    println!("{port}");
    let why = match source {
        ports::PortSource::Derived => format!(
            "derived: {} + {} % {} (ports.base + serial % ports.span)",
            cfg.ports.base,
            if ports::serial_number(serial) == ports::fnv1a64(serial.as_bytes()) {
                "hash(serial)".to_string()
            } else {
                format!("0x{serial}")
            },
            cfg.ports.span
        ),
        ports::PortSource::Fixed => format!("fixed in [modules.\"{serial}\"]"),
        #[cfg(target_os = "linux")]
        other => format!(
            "{other}: remembered in {}",
            crate::daemon::registry_path(&cfg).display()
        ),
        #[cfg(not(target_os = "linux"))]
        other => other.to_string(),
    };
    eprintln!("{serial}: port {port} ({why})");
    Ok(0)
}

#[cfg(target_os = "linux")]
pub(super) fn import_ser2net(file: &Path) -> Result<i32> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading ser2net config {}", file.display()))?;
    let origin = file.display().to_string();
    let conns = crate::migrate::parse(&text, &origin)?;
    let (toml, notes) = crate::migrate::render(&conns, &origin, crate::migrate::serial_from_udev);
    print!("{toml}");
    for n in &notes {
        eprintln!("note: {n}");
    }
    eprintln!(
        "{} connections read, {} notes; add the output to {}",
        conns.len(),
        notes.len(),
        config::DEFAULT_CONFIG_PATH
    );
    Ok(0)
}

pub(super) fn check(config_path: &Option<PathBuf>) -> Result<i32> {
    let (cfg, path) = load_config(config_path)?;
    println!(
        "# effective configuration ({})",
        describe_config_path(&path)
    );
    print!("{}", cfg.to_toml());
    eprintln!("config OK");
    Ok(0)
}
