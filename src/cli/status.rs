//! `lucidgate status` and `lucidgate reload`: questions to the running daemon over its control
//! socket, and the status table.

use std::path::PathBuf;

use anyhow::Result;

use super::{load_config, runtime};
use crate::control::{self, Command, Reply};
use crate::status::StatusReport;

pub(super) fn reload(config: &Option<PathBuf>, socket: Option<PathBuf>) -> Result<i32> {
    let socket = socket_of(config, socket)?;
    match runtime()?.block_on(control::ask(&socket, &Command::Reload))? {
        Reply::Reloaded(summary) => println!("{summary}"),
        other => anyhow::bail!("unexpected answer to reload: {other:?}"),
    }
    Ok(0)
}

pub(super) fn status(config: &Option<PathBuf>, json: bool, socket: Option<PathBuf>) -> Result<i32> {
    let socket = socket_of(config, socket)?;
    let Reply::Status(report) = runtime()?.block_on(control::ask(&socket, &Command::Status))?
    else {
        anyhow::bail!("the daemon did not answer with a status report");
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", status_table(&report));
    }
    Ok(0)
}

/// `--socket`, else the control socket of the config.
fn socket_of(config: &Option<PathBuf>, socket: Option<PathBuf>) -> Result<PathBuf> {
    Ok(match socket {
        Some(s) => s,
        None => load_config(config)?.0.control_socket,
    })
}

/// The human-readable status table.
fn status_table(report: &StatusReport) -> String {
    if report.modules.is_empty() {
        return "no modules present (plug one in, or try `lucidgate serve --demo`)\n".to_string();
    }
    let header = [
        "SERIAL",
        "MODEL",
        "DEVICE",
        "PORT",
        "TRANSPORT",
        "CLIENTS",
        "REQUESTS",
        "STATE",
        "SINCE",
    ];
    let rows: Vec<[String; 9]> = report
        .modules
        .iter()
        .map(|m| {
            [
                m.serial.clone(),
                // What the module says it is, once it has been asked.
                match &m.identity {
                    Some(id) => format!("{} (fw {:#06x})", id.class, id.firmware),
                    None => m.model.clone(),
                },
                m.devnode.clone(),
                m.port.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                m.transport.clone(),
                match &m.client {
                    Some(c) => format!("{} ({c})", m.clients),
                    None => m.clients.to_string(),
                },
                m.metrics
                    .as_ref()
                    .map(|x| x.requests.to_string())
                    .unwrap_or_else(|| "-".into()),
                match (&m.error, &m.identity_error) {
                    (Some(e), _) => format!("{}: {e}", m.state),
                    (None, Some(e)) => format!("{} (identity {}: {e})", m.state, m.identity_state),
                    (None, None) => m.state.clone(),
                },
                m.since.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = String::new();
    let mut line = |cells: Vec<&str>| {
        let parts: Vec<String> = cells
            .iter()
            .zip(widths.iter())
            .enumerate()
            .map(|(i, (c, w))| {
                if i + 1 == cells.len() {
                    c.to_string()
                } else {
                    format!("{c:<w$}")
                }
            })
            .collect();
        out.push_str(parts.join("  ").trim_end());
        out.push('\n');
    };
    line(header.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    out
}
