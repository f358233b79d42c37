//! `lucidgate cert ...`: the built-in CA from the command line.

use anyhow::Result;

use super::{CertCmd, runtime};
use crate::config::{self, Config};
use crate::control::{self, Command};

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
            print!("{}", pki.list()?);
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
    if changed && cfg.control_socket.exists() {
        // Tell a running daemon; it also notices by itself at its next PKI check.
        match runtime()?.block_on(control::ask(&cfg.control_socket, &Command::ReloadPki)) {
            Ok(_) => eprintln!("the running daemon re-read the PKI"),
            Err(e) => eprintln!(
                "note: could not tell the daemon ({e:#}); it picks the change up at its next PKI check"
            ),
        }
    }
    Ok(0)
}
