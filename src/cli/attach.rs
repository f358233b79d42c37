//! `lucidgate attach` and `lucidgate discover`: the client side.

use std::path::Path;

use anyhow::Result;

use super::AttachArgs;

pub(super) fn attach(a: AttachArgs, config: Option<&Path>) -> Result<i32> {
    use crate::attach::{self, AttachFile, PortOptions};
    let specs = match (&a.target, config) {
        (Some(target), _) => {
            if a.link.is_none() && a.listen.is_none() {
                anyhow::bail!(
                    "with a TARGET, give --link PATH (a serial port for programs, e.g. /dev/lio0) or --listen ADDR:PORT (a TCP port, e.g. 127.0.0.1:4001)"
                );
            }
            let local = attach::Local::of(a.link.as_deref(), a.listen, a.listen_any)?;
            let o = PortOptions {
                ca: a.ca,
                cert: a.cert,
                key: a.key,
                server_name: a.server_name,
                plain: Some(a.plain),
                user: a.user,
                group: a.group,
                mode: a.mode,
                hold_ms: a.hold_ms,
                retry_max_ms: a.retry_max_ms,
            };
            let d = crate::config::PortsConfig::default();
            vec![attach::spec(
                target,
                local,
                &o,
                d.base,
                d.span,
                &a.mdns_interfaces,
            )?]
        }
        (None, Some(path)) => {
            let file = AttachFile::load(path)?;
            file.specs(&path.display().to_string())?
        }
        (None, None) => anyhow::bail!(
            "attach needs a TARGET (HOST:PORT, SERIAL@HOST or SERIAL) with --link or --listen, or --config FILE with [[port]] entries"
        ),
    };
    attach::run(specs)
}

pub(super) fn discover(
    timeout: std::time::Duration,
    interfaces: &[String],
    json: bool,
) -> Result<i32> {
    let found = crate::discovery::browse(timeout, interfaces, None)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&found)?);
        return Ok(0);
    }
    if found.is_empty() {
        eprintln!(
            "no lucidgate module announced within {timeout:?} (is discovery.mdns on at the server, and this computer on the same network segment?)"
        );
        return Ok(1);
    }
    println!(
        "{:<18} {:<8} {:<10} {:<24} PORT",
        "SERIAL", "CLASS", "TRANSPORT", "HOST"
    );
    for f in &found {
        let addr = f
            .addresses
            .iter()
            .find(|a| a.is_ipv4())
            .or(f.addresses.first())
            .map(|a| format!(" ({a})"))
            .unwrap_or_default();
        println!(
            "{:<18} {:<8} {:<10} {:<24} {}",
            f.serial,
            f.class,
            f.transport,
            format!("{}{addr}", f.host),
            f.port
        );
    }
    Ok(0)
}
