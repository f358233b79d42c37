//! `lucidgate service`: the attach as a Windows service (logic in `crate::service`).

use std::path::{Path, PathBuf};

use anyhow::Result;

use super::ServiceCmd;

pub(super) fn service(
    action: ServiceCmd,
    config: Option<&Path>,
    log_file: Option<PathBuf>,
) -> Result<i32> {
    let config = || {
        config.map(Path::to_path_buf).ok_or_else(|| {
            anyhow::anyhow!(
                "the service runs an attach config: give --config FILE ([[port]] entries with listen = \"127.0.0.1:PORT\"; see attach.toml.example)"
            )
        })
    };
    match action {
        ServiceCmd::Install {
            name,
            account,
            no_start,
        } => crate::service::install(crate::service::Install {
            name,
            config: config()?,
            log_file,
            account,
            start: !no_start,
        }),
        ServiceCmd::Uninstall { name } => crate::service::uninstall(&name),
        ServiceCmd::Run { name } => crate::service::run(&name, &config()?),
    }
}
