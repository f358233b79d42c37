//! `lucidgate provision ...`: a provisioning stick or image processed by hand, and the token.

use std::path::PathBuf;

use anyhow::{Context, Result};

use super::{ProvisionCmd, load_config, runtime, tell_daemon, tell_daemon_pki};
use crate::control::{self, Command, Reply};

pub(super) fn provision(
    config: &Option<PathBuf>,
    path: Option<PathBuf>,
    action: Option<ProvisionCmd>,
) -> Result<i32> {
    use crate::provision::{self, Status};
    let (cfg, cfg_path) = load_config(config)?;
    match (path, action) {
        (_, Some(ProvisionCmd::SetToken { token, stdin })) => {
            let (token, generated) = match (token, stdin) {
                (Some(t), _) => (t, false),
                (None, true) => {
                    let mut line = String::new();
                    std::io::stdin()
                        .read_line(&mut line)
                        .context("reading the token from standard input")?;
                    (line.trim_end_matches(['\r', '\n']).to_string(), false)
                }
                (None, false) => (provision::token::generate()?, true),
            };
            provision::token::set_token(&cfg_path, &token)?;
            eprintln!(
                "stored the token's hash in {} ([provision] token_hash)",
                cfg_path.display()
            );
            if generated {
                println!("{token}");
                eprintln!(
                    "put it into the stick's lucidgate/request.toml as token = \"{token}\"; it is not stored anywhere in clear"
                );
            }
            tell_daemon(
                &cfg.control_socket,
                Command::Reload,
                "the config",
                "run `lucidgate reload`",
            )?;
            Ok(0)
        }
        (Some(path), None) => {
            let clock = crate::clock::SystemClock::from_env();
            // The modules the running daemon serves, for the result file.
            let modules = if cfg.control_socket.exists() {
                runtime()?
                    .block_on(control::ask(&cfg.control_socket, &Command::Status))
                    .ok()
                    .and_then(|reply| match reply {
                        Reply::Status(r) => Some(r),
                        _ => None,
                    })
                    .map(|r| {
                        r.modules
                            .into_iter()
                            .filter_map(|m| Some((m.serial, m.port?)))
                            .collect()
                    })
                    .unwrap_or_default()
            } else {
                Default::default()
            };
            let dev = provision::Gateway {
                state_dir: &cfg.state_dir,
                pki: crate::ca::PkiSettings::from_config(&cfg),
                clock: &clock,
                token_hash: cfg.provision.token_hash.clone(),
                hostname: provision::hostname(&cfg),
                modules,
            };
            let out = match provision::run_path(&path, &dev) {
                Ok(o) => o,
                Err(e) => {
                    eprintln!("lucidgate: {}: {e}", path.display());
                    return Ok(2);
                }
            };
            println!("{:?}: {}", out.status, out.message);
            for e in &out.errors {
                println!("  {e}");
            }
            for i in &out.issued {
                println!(
                    "  issued {} (serial {}) -> {}",
                    i.name,
                    i.serial,
                    i.files.join(" ")
                );
            }
            if !out.result_written {
                println!("  (no result file could be written on the stick)");
            }
            if out.status == Status::Done {
                tell_daemon_pki(&cfg.control_socket)?;
            }
            Ok(match out.status {
                Status::Done | Status::Duplicate => 0,
                Status::Refused | Status::Failed => 1,
            })
        }
        (None, None) => anyhow::bail!(
            "provision needs IMAGE-OR-DEVICE (a FAT stick or image with lucidgate/request.toml) or `set-token`"
        ),
    }
}
