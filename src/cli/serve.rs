//! `lucidgate serve`: the daemon on a one-thread runtime, with `--demo`'s emulated module.

use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};

use super::{describe_config_path, emulate::module_for};
use crate::config::{self, StaticDevice};
use crate::daemon::{self, ServeOptions};
use crate::emulator;
use crate::pty::Pty;

/// Serial number of the module `serve --demo` emulates.
const DEMO_SERIAL: &str = "11001001FA480000";

/// The daemon's runtime: one thread. A relay is a byte pump whose every wake-up is I/O; on one
/// thread a byte read from the serial port is written to the socket by the same thread, with no
/// cross-thread wake-up, and there is one thread stack and one malloc arena instead of one per
/// core (measured in docs/benchmarks.md: lower round trip and RSS than the multi-thread runtime).
/// Blocking work (PKI files, key generation) goes to `spawn_blocking`; udev has its own thread.
fn serve_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub(super) fn serve(config_path: &Option<PathBuf>, demo: bool, no_udev: bool) -> Result<i32> {
    let (path, required) = match config_path {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(config::DEFAULT_CONFIG_PATH), false),
    };
    let mut source = crate::supervisor::ConfigSource {
        path: Some(path.clone()),
        required,
        extra_devices: Vec::new(),
    };
    let mut cfg = source.load()?;
    tracing::info!(
        "lucidgate {} starting; config {}",
        env!("CARGO_PKG_VERSION"),
        describe_config_path(&path)
    );
    let _demo = if demo {
        let (demo, device) = start_demo()?;
        cfg.devices.retain(|d| d.serial != DEMO_SERIAL);
        cfg.devices.push(device.clone());
        source.extra_devices.push(device);
        Some(demo)
    } else {
        None
    };
    let mut systemd = crate::systemd::Systemd::from_env();
    serve_runtime()?.block_on(daemon::serve(
        cfg,
        ServeOptions { no_udev, source },
        &mut systemd,
    ))?;
    Ok(0)
}

/// What `serve --demo` keeps alive: the emulator's pty and thread.
struct Demo {
    _pty: Pty,
    shared: emulator::Shared,
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

fn start_demo() -> Result<(Demo, StaticDevice)> {
    let pty = Pty::open()?;
    let module = module_for("AO4", Some(DEMO_SERIAL.to_string()))?;
    let shared = emulator::Shared::new(module);
    let master = pty.master.try_clone()?;
    let s = shared.clone();
    std::thread::Builder::new()
        .name("demo-module".into())
        .spawn(move || {
            if let Err(e) = emulator::serve_fd(master, s) {
                tracing::error!("demo module stopped: {e:#}");
            }
        })?;
    tracing::info!(
        "demo: emulated LucidIo AO4 {DEMO_SERIAL} on {}",
        pty.slave_path.display()
    );
    let device = StaticDevice {
        path: pty.slave_path.clone(),
        serial: DEMO_SERIAL.to_string(),
        model: "LucidIo_AO4 (demo)".to_string(),
    };
    Ok((Demo { _pty: pty, shared }, device))
}
