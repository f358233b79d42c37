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

// The library's public surface is what the binary, the tests, the benchmark and the fuzz targets
// use; the rest is crate-private, and these docs (read with `cargo doc --document-private-items`)
// link to it.
#![allow(rustdoc::private_intra_doc_links)]

mod accept;
pub mod attach;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
mod control;
mod daemon;
mod device;
mod discovery;
pub mod emulator;
#[doc(hidden)]
pub mod fuzzing;
mod host;
mod logging;
mod migrate;
mod openmetrics;
pub mod ports;
pub mod protocol;
pub mod provision;
pub mod pty;
pub mod relay;
mod state;
pub mod status;
mod supervisor;
mod systemd;
mod transport;
