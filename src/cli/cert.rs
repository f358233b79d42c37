//! `lucidgate cert ...`: the built-in CA from the command line.

use anyhow::Result;

use super::{CertCmd, tell_daemon_pki};
use crate::config::{self, Config};

pub(super) fn cert(cfg: &Config, action: CertCmd) -> Result<i32> {
    let clock = crate::clock::SystemClock::from_env();
    let settings = crate::ca::PkiSettings::from_config(cfg);
    let pki = crate::ca::Pki::open(&cfg.state_dir, settings, &clock)?;
    let changed = match action {
        CertCmd::IssueClient {
            name,
            modules,
            all,
            read_only,
            days,
            out,
        } => {
            let rights = crate::ca::Rights {
                modules: if all { vec!["*".to_string()] } else { modules },
                read_only,
            };
            let b = pki.issue_client(&name, &rights, days)?;
            crate::state::ensure_private_dir(&out)?;
            let key = out.join(format!("{name}.key"));
            crate::state::write_atomic(&key, b.key_pem.as_bytes(), 0o600)?;
            crate::state::write_atomic(
                &out.join(format!("{name}.crt")),
                b.cert_pem.as_bytes(),
                0o644,
            )?;
            crate::state::write_atomic(
                &out.join(format!("{name}.pem")),
                format!("{}{}", b.key_pem, b.cert_pem).as_bytes(),
                0o600,
            )?;
            crate::state::write_atomic(&out.join("ca.crt"), b.ca_pem.as_bytes(), 0o644)?;
            println!(
                "issued {name} (serial {}, valid until {}, modules {}{}) in {}",
                b.serial,
                humantime::format_rfc3339_seconds(b.not_after),
                rights.modules.join(","),
                if read_only { ", read-only" } else { "" },
                out.display()
            );
            println!(
                "use it: socat - openssl-connect:HOST:PORT,cert={},cafile={}",
                out.join(format!("{name}.pem")).display(),
                out.join("ca.crt").display()
            );
            false
        }
        CertCmd::Revoke { who } => {
            for c in pki.revoke(&who)? {
                println!(
                    "revoked {} (serial {})",
                    if c.name.is_empty() {
                        "certificate"
                    } else {
                        &c.name
                    },
                    c.serial
                );
            }
            true
        }
        CertCmd::List => {
            print!("{}", list(&pki.inventory()?)?);
            false
        }
        CertCmd::RotateCa { overlap } => {
            let d =
                config::parse_duration(&overlap).map_err(|e| anyhow::anyhow!("--overlap {e}"))?;
            pki.rotate_ca(d)?;
            println!(
                "rotated the CA; the previous CA stays trusted for {overlap}. Reissue client certificates and hand out the new ca.crt ({}).",
                pki.paths().ca_crt().display()
            );
            true
        }
    };
    drop(pki);
    if changed {
        tell_daemon_pki(&cfg.control_socket)?;
    }
    Ok(0)
}

/// `cert list`: the PKI as a person reads it.
fn list(inv: &crate::ca::Inventory) -> Result<String> {
    use std::fmt::Write;
    use std::time::{Duration, SystemTime};
    let mut out = String::new();
    let fmt_t = |t: i64| {
        humantime::format_rfc3339_seconds(
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64),
        )
        .to_string()
    };
    if let Some(ext) = &inv.external {
        writeln!(
            out,
            "external PKI: CA bundle {}, server {} / {}",
            ext.ca_file.display(),
            ext.cert_file.display(),
            ext.key_file.display()
        )?;
    } else if let Some((serial, expires)) = &inv.ca {
        writeln!(
            out,
            "CA      serial {serial}  expires {}",
            humantime::format_rfc3339_seconds(*expires)
        )?;
    } else {
        writeln!(
            out,
            "CA      none yet (made on first `lucidgate serve` or `cert issue-client`)"
        )?;
    }
    if let Some((serial, until)) = &inv.previous_ca {
        writeln!(
            out,
            "CA (previous) serial {serial}  trusted until {}",
            humantime::format_rfc3339_seconds(*until)
        )?;
    }
    if let Some((server, renews)) = &inv.server {
        writeln!(
            out,
            "server  serial {}  expires {}  renews {}",
            server.serial,
            humantime::format_rfc3339_seconds(server.not_after),
            humantime::format_rfc3339_seconds(*renews)
        )?;
        writeln!(
            out,
            "        names {}",
            server.names.iter().cloned().collect::<Vec<_>>().join(" ")
        )?;
    }
    writeln!(out, "clients:")?;
    if inv.clients.is_empty() {
        writeln!(
            out,
            "  none (lucidgate cert issue-client NAME --all --out DIR)"
        )?;
    }
    let now = crate::clock::unix(inv.now);
    for c in &inv.clients {
        let state = match c.revoked_at {
            Some(t) => format!("REVOKED {}", fmt_t(t)),
            None if c.not_after <= now => "expired".into(),
            None => "valid".into(),
        };
        writeln!(
            out,
            "  {:<16} serial {}  expires {}  modules {}{}  {state}",
            c.name,
            c.serial,
            fmt_t(c.not_after),
            c.modules.join(","),
            if c.read_only { " read-only" } else { "" }
        )?;
    }
    Ok(out)
}
