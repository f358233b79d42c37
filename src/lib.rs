//! lucidgate: a device server for LucidControl USB IO modules.
//!
//! `lucidgate serve` watches udev and serves each module on a TCP port derived from its serial
//! number. The data flow is one way: [`device`] turns udev events into owned events, the
//! [`supervisor`] reconciles them into running [`relay`]s on ports from [`ports`], each
//! relay talking to its clients through a [`transport`] (plain or [`transport::tls`], with
//! certificates from the built-in CA in [`ca`]). [`control`] answers `status`; relays announce
//! themselves by mDNS through [`discovery`].
//! [`attach`] is the client side: a local serial port that reconnects by itself.
//! [`emulator`] is a module on a pty, for tests, the benchmark and `lucidgate emulate`.
//!
//! The device server is Linux only. On other systems (Windows: `lucidgate.exe`) the crate is
//! the client side: `attach --listen`, `discover`, `port`, `config check` and
//! `emulate --listen`, and on Windows [`service`] runs the attach as a Windows service; the
//! server's modules are compiled out (`cfg(target_os = "linux")`).

// The library's public surface is what the binary, the tests, the benchmark and the fuzz targets
// use; the rest is crate-private, and these docs (read with `cargo doc --document-private-items`)
// link to it.
#![allow(rustdoc::private_intra_doc_links)]
// Elsewhere than Linux the client side uses part of the shared modules (config, protocol,
// ports, clock); marking each unused item would scatter cfgs through code that is the same on
// every system. The Linux build keeps the dead-code lint.
#![cfg_attr(not(target_os = "linux"), allow(dead_code, unused_imports))]

#[cfg(target_os = "linux")]
mod accept;
pub mod attach;
#[cfg(target_os = "linux")]
pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
#[cfg(target_os = "linux")]
mod control;
#[cfg(target_os = "linux")]
mod daemon;
#[cfg(target_os = "linux")]
mod device;
mod discovery;
pub mod emulator;
#[doc(hidden)]
#[cfg(target_os = "linux")]
pub mod fuzzing;
#[cfg(target_os = "linux")]
mod host;
mod logging;
#[cfg(target_os = "linux")]
mod migrate;
#[cfg(target_os = "linux")]
mod openmetrics;
pub mod ports;
pub mod protocol;
#[cfg(target_os = "linux")]
pub mod provision;
#[cfg(target_os = "linux")]
pub mod pty;
#[cfg(target_os = "linux")]
pub mod relay;
#[cfg(windows)]
mod service;
#[cfg(target_os = "linux")]
mod state;
#[cfg(target_os = "linux")]
pub mod status;
mod stop;
#[cfg(target_os = "linux")]
mod supervisor;
#[cfg(target_os = "linux")]
mod systemd;
mod transport;
