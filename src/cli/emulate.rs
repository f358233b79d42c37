//! `lucidgate emulate`: a LucidControl module on a pty (or an inherited fd), or on a TCP port,
//! for tests, the benchmark and trying lucidgate without hardware.

use std::io::Write;
#[cfg(target_os = "linux")]
use std::os::fd::{FromRawFd, OwnedFd};
#[cfg(target_os = "linux")]
use std::path::PathBuf;
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};

use super::{EmulateArgs, runtime};
use crate::emulator::{self, Module};
#[cfg(target_os = "linux")]
use crate::pty::Pty;

pub(super) fn emulate(a: EmulateArgs) -> Result<i32> {
    let mut module = module_for(&a.class, a.serial)?;
    module.silent = a.silent;
    module.ignore_first = a.ignore_first;
    module.answer_delay = std::time::Duration::from_millis(a.answer_delay_ms);
    if let Some(addr) = a.listen {
        return serve_tcp(&a.class, module, addr);
    }
    #[cfg(target_os = "linux")]
    return serve(&a.class, module, a.link, a.fd);
    #[cfg(not(target_os = "linux"))]
    anyhow::bail!("here the emulated module is served on a TCP port: give --listen 127.0.0.1:PORT")
}

/// Serves `module` to TCP clients on `addr` until a stop signal; prints the address on stdout.
fn serve_tcp(class: &str, module: Module, addr: std::net::SocketAddr) -> Result<i32> {
    let usb_serial = module.identity.usb_serial();
    let shared = emulator::Shared::new(module);
    let rt = runtime()?;
    let mut stop = {
        let _guard = rt.enter();
        crate::stop::StopSignal::install()?
    };
    let listener =
        std::net::TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
    let bound = listener.local_addr().context("the listening address")?;
    eprintln!("emulating LucidControl {class} {usb_serial} on tcp {bound}; Ctrl-C stops");
    println!("{bound}");
    let _ = std::io::stdout().flush();
    let stop_flag = shared.stop.clone();
    let counters = shared.counters.clone();
    let worker = std::thread::spawn(move || emulator::serve_tcp(listener, shared));
    rt.block_on(stop.recv());
    stop_flag.store(true, Ordering::Relaxed);
    match worker.join() {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("the emulator thread panicked"),
    }
    print_counters(&counters);
    Ok(0)
}

/// What the module saw, for scripts and tests (e.g. that a refused write never arrived).
fn print_counters(counters: &emulator::Counters) {
    println!(
        "requests {} writes {}",
        counters.requests.load(Ordering::Relaxed),
        counters.writes.load(Ordering::Relaxed)
    );
}

pub(super) fn module_for(class: &str, serial: Option<String>) -> Result<Module> {
    let class_id = emulator::parse_class(class).with_context(|| {
        format!("unknown module class {class:?}; use AO4, DI4, DO4, AI4, ... or 4 hex digits")
    })?;
    let serial = serial.unwrap_or_else(|| emulator::default_serial(class_id));
    let module = Module::from_usb_serial(&serial).with_context(|| {
        format!(
            "serial {serial:?} is not 16 hex digits (class, type, number, e.g. 11001001FA480000)"
        )
    })?;
    if module.identity.class != class_id {
        anyhow::bail!(
            "serial {serial} starts with class {:04X}, not {class} ({class_id:04X}); the first 4 digits of a LucidControl serial are its class",
            module.identity.class
        );
    }
    Ok(module)
}

/// Serves `module` on a new pty (linked at `link`) or on the inherited `fd` until a signal.
#[cfg(target_os = "linux")]
fn serve(class: &str, module: Module, link: Option<PathBuf>, fd: Option<i32>) -> Result<i32> {
    let usb_serial = module.identity.usb_serial();
    let shared = emulator::Shared::new(module);
    // Signal handlers first: a SIGTERM that comes as soon as the link exists must still end
    // the emulator cleanly (and remove the link), not by the default action.
    let rt = runtime()?;
    let mut stop = {
        let _guard = rt.enter();
        crate::stop::StopSignal::install()?
    };
    let (master, _pty) = match fd {
        Some(fd) => {
            if fd < 3 {
                anyhow::bail!(
                    "--fd {fd} is stdin/stdout/stderr; pass the inherited pty fd (3 or more)"
                );
            }
            // SAFETY: the caller hands us this descriptor (documented in --help) and nothing
            // else in this process uses it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // A real tty (a USB gadget's /dev/ttyGS0, a serial line) starts cooked: echo and
            // line editing would mangle the binary protocol. A pipe or socket stays as it is.
            if nix::unistd::isatty(&owned).unwrap_or(false) {
                crate::pty::make_raw(&owned)
                    .with_context(|| format!("--fd {fd}: putting the tty in raw mode"))?;
            }
            (owned, None)
        }
        None => {
            let mut pty = Pty::open()?;
            if let Some(l) = &link {
                pty.link(l)?;
            }
            let master = pty
                .master
                .try_clone()
                .context("duplicating the pty master")?;
            (master, Some(pty))
        }
    };
    let where_ = match &_pty {
        Some(p) => p.path().display().to_string(),
        None => format!("fd {}", fd.unwrap_or(-1)),
    };
    eprintln!("emulating LucidControl {class} {usb_serial} on {where_}; Ctrl-C stops");
    // Tell scripts where the module is, on stdout.
    println!("{where_}");
    let _ = std::io::stdout().flush();
    let stop_flag = shared.stop.clone();
    let counters = shared.counters.clone();
    let worker = std::thread::spawn(move || emulator::serve_fd(master, shared));
    rt.block_on(stop.recv());
    stop_flag.store(true, Ordering::Relaxed);
    match worker.join() {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("the emulator thread panicked"),
    }
    print_counters(&counters);
    Ok(0)
}
