//! lucidgate.exe as a Windows service: `service install` registers `attach --config FILE` with
//! the Service Control Manager (started at boot, restarted if it fails, no console, logs to a
//! file), `service uninstall` stops and removes it, and `service run` is what the SCM starts.
//! The attach itself is the same code as `lucidgate attach --config`; this file owns only the
//! talk with the SCM (the `windows-service` crate does the FFI).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use windows_service::service::{
    ServiceAccess, ServiceAction, ServiceActionType, ServiceControl, ServiceControlAccept,
    ServiceErrorControl, ServiceExitCode, ServiceFailureActions, ServiceFailureResetPeriod,
    ServiceInfo, ServiceStartType, ServiceState, ServiceStatus, ServiceType,
};
use windows_service::service_control_handler::{self, ServiceControlHandlerResult};
use windows_service::service_manager::{ServiceManager, ServiceManagerAccess};
use windows_service::{define_windows_service, service_dispatcher};

/// The service name when `--name` is not given.
pub(crate) const DEFAULT_NAME: &str = "lucidgate-attach";
/// The account the service runs as by default: Windows' least-privileged service account
/// (network access, no administrator rights; it must be able to read the certificate files).
pub(crate) const DEFAULT_ACCOUNT: &str = r"NT AUTHORITY\LocalService";
/// How long `install` waits for the started service to report Running (or to fail).
const START_WAIT: Duration = Duration::from_secs(30);
/// How long `uninstall` waits for the service to stop before deleting it anyway.
const STOP_WAIT: Duration = Duration::from_secs(20);
/// The wait hint the service gives the SCM while it stops (the links close at once).
const STOP_HINT: Duration = Duration::from_secs(5);
/// After a failure (a crash, or attach ending with an error) the SCM starts it again this late.
const RESTART_DELAY: Duration = Duration::from_secs(10);
/// Failures further apart than this do not count towards the restart actions.
const FAILURE_RESET: Duration = Duration::from_secs(24 * 3600);
/// The exit code reported to the SCM when attach ends with an error (the log file says why).
const FAILED: u32 = 1;

/// What `service install` registers.
pub(crate) struct Install {
    pub(crate) name: String,
    pub(crate) config: PathBuf,
    pub(crate) log_file: Option<PathBuf>,
    pub(crate) account: String,
    pub(crate) start: bool,
}

/// The log file next to the attach config when none is given: a service has no console.
fn default_log_file(config: &Path, name: &str) -> PathBuf {
    config
        .parent()
        .unwrap_or(Path::new("."))
        .join(format!("{name}.log"))
}

fn absolute(p: &Path) -> Result<PathBuf> {
    std::path::absolute(p).with_context(|| format!("{}: not a usable path", p.display()))
}

/// Registers (and by default starts) the service; the attach config is checked first, so a
/// mistake is reported here with its file and line, not later in a log nobody reads.
pub(crate) fn install(i: Install) -> Result<i32> {
    let config = absolute(&i.config)?;
    let file = crate::attach::AttachFile::load(&config)?;
    file.specs(&config.display().to_string())?;
    let log = absolute(
        &i.log_file
            .unwrap_or_else(|| default_log_file(&config, &i.name)),
    )?;
    let exe = std::env::current_exe().context("finding lucidgate.exe's own path")?;
    let args: Vec<OsString> = [
        OsStr::new("--config"),
        config.as_os_str(),
        OsStr::new("--log-file"),
        log.as_os_str(),
        OsStr::new("service"),
        OsStr::new("run"),
        OsStr::new("--name"),
        OsStr::new(&i.name),
    ]
    .into_iter()
    .map(OsString::from)
    .collect();
    let manager = ServiceManager::local_computer(
        None::<&str>,
        ServiceManagerAccess::CONNECT | ServiceManagerAccess::CREATE_SERVICE,
    )
    .context("opening the Service Control Manager (run this from an administrator prompt)")?;
    let info = ServiceInfo {
        name: OsString::from(&i.name),
        display_name: OsString::from(format!("lucidgate attach ({})", i.name)),
        service_type: ServiceType::OWN_PROCESS,
        start_type: ServiceStartType::AutoStart,
        error_control: ServiceErrorControl::Normal,
        executable_path: exe.clone(),
        launch_arguments: args,
        dependencies: vec![],
        account_name: Some(OsString::from(&i.account)),
        account_password: None,
    };
    let service = manager
        .create_service(
            &info,
            ServiceAccess::CHANGE_CONFIG | ServiceAccess::START | ServiceAccess::QUERY_STATUS,
        )
        .with_context(|| {
            format!(
                "creating the service {:?} (if it exists: `lucidgate service uninstall --name {}` first)",
                i.name, i.name
            )
        })?;
    let _ = service.set_description(format!(
        "Local TCP ports carried to LucidControl modules over mutual TLS ({})",
        config.display()
    ));
    let restart = ServiceFailureActions {
        reset_period: ServiceFailureResetPeriod::After(FAILURE_RESET),
        reboot_msg: None,
        command: None,
        actions: Some(vec![
            ServiceAction {
                action_type: ServiceActionType::Restart,
                delay: RESTART_DELAY,
            };
            3
        ]),
    };
    if let Err(e) = service
        .update_failure_actions(restart)
        .and_then(|()| service.set_failure_actions_on_non_crash_failures(true))
    {
        eprintln!(
            "note: could not set the restart-on-failure actions ({e}); the service is installed without them"
        );
    }
    println!(
        "installed the service {:?}: {} attach --config {}, as {}, starting at boot; log: {}",
        i.name,
        exe.display(),
        config.display(),
        i.account,
        log.display()
    );
    if !i.start {
        println!("start it with `sc start {}`", i.name);
        return Ok(0);
    }
    service
        .start(&[] as &[&OsStr])
        .with_context(|| format!("starting the service {:?}", i.name))?;
    let begun = Instant::now();
    loop {
        let s = service
            .query_status()
            .with_context(|| format!("asking for the state of {:?}", i.name))?;
        match s.current_state {
            ServiceState::Running => {
                println!("{} is running", i.name);
                return Ok(0);
            }
            ServiceState::Stopped => anyhow::bail!(
                "the service {:?} stopped at once (exit {:?}); its log {} says why",
                i.name,
                s.exit_code,
                log.display()
            ),
            _ if begun.elapsed() > START_WAIT => anyhow::bail!(
                "the service {:?} did not report running within {START_WAIT:?}; see {}",
                i.name,
                log.display()
            ),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Stops the service (waiting up to `STOP_WAIT`) and removes it.
pub(crate) fn uninstall(name: &str) -> Result<i32> {
    let manager = ServiceManager::local_computer(None::<&str>, ServiceManagerAccess::CONNECT)
        .context("opening the Service Control Manager (run this from an administrator prompt)")?;
    let service = manager
        .open_service(
            name,
            ServiceAccess::STOP | ServiceAccess::DELETE | ServiceAccess::QUERY_STATUS,
        )
        .with_context(|| format!("opening the service {name:?} (is it installed?)"))?;
    let begun = Instant::now();
    loop {
        let s = service
            .query_status()
            .with_context(|| format!("asking for the state of {name:?}"))?;
        match s.current_state {
            ServiceState::Stopped => break,
            ServiceState::StopPending => {}
            _ => {
                service
                    .stop()
                    .with_context(|| format!("stopping the service {name:?}"))?;
            }
        }
        if begun.elapsed() > STOP_WAIT {
            eprintln!("note: {name} did not stop within {STOP_WAIT:?}; removing it anyway");
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    service
        .delete()
        .with_context(|| format!("removing the service {name:?}"))?;
    println!("stopped and removed the service {name:?}");
    Ok(0)
}

/// The name and attach config `service run` was started with, for the service's main
/// function (the SCM calls it on a thread of its own, without arguments we could pass).
static RUN: OnceLock<(String, PathBuf)> = OnceLock::new();
/// The exit code of the attach, for `service run` to return.
static EXIT: AtomicU32 = AtomicU32::new(0);

define_windows_service!(ffi_service_main, service_main);

/// `service run`: hands the thread to the SCM, which calls `service_main`; returns when the
/// service has stopped.
pub(crate) fn run(name: &str, config: &Path) -> Result<i32> {
    let _ = RUN.set((name.to_string(), config.to_path_buf()));
    service_dispatcher::start(name, ffi_service_main).context(
        "`service run` is what the Service Control Manager starts; install the service with `lucidgate service install --config FILE`, or run `lucidgate attach --config FILE` by hand",
    )?;
    Ok(EXIT.load(Ordering::SeqCst) as i32)
}

fn service_main(_arguments: Vec<OsString>) {
    if let Err(e) = serve() {
        tracing::error!("the service ended: {e:#}");
        EXIT.store(FAILED, Ordering::SeqCst);
    }
}

fn status(state: ServiceState, exit: ServiceExitCode, wait: Duration) -> ServiceStatus {
    ServiceStatus {
        service_type: ServiceType::OWN_PROCESS,
        current_state: state,
        controls_accepted: if state == ServiceState::Running {
            ServiceControlAccept::STOP | ServiceControlAccept::SHUTDOWN
        } else {
            ServiceControlAccept::empty()
        },
        exit_code: exit,
        checkpoint: 0,
        wait_hint: wait,
        process_id: None,
    }
}

fn serve() -> Result<()> {
    let (name, config) = RUN.get().context("service started without a name")?;
    let handle = service_control_handler::register(name, |control| match control {
        ServiceControl::Stop | ServiceControl::Shutdown => {
            crate::stop::request("service stop");
            ServiceControlHandlerResult::NoError
        }
        ServiceControl::Interrogate => ServiceControlHandlerResult::NoError,
        _ => ServiceControlHandlerResult::NotImplemented,
    })
    .context("registering with the Service Control Manager")?;
    let ok = ServiceExitCode::Win32(0);
    let result = (|| {
        let file = crate::attach::AttachFile::load(config)?;
        let specs = file.specs(&config.display().to_string())?;
        handle
            .set_service_status(status(ServiceState::Running, ok, Duration::ZERO))
            .context("reporting Running to the Service Control Manager")?;
        tracing::info!(
            "service {name} running: attach --config {}",
            config.display()
        );
        crate::attach::run(specs)
    })();
    let exit = match &result {
        Ok(0) => ok,
        Ok(code) => ServiceExitCode::ServiceSpecific(*code as u32),
        Err(_) => ServiceExitCode::ServiceSpecific(FAILED),
    };
    let _ = handle.set_service_status(status(ServiceState::StopPending, exit, STOP_HINT));
    match &result {
        Err(e) => {
            tracing::error!("service {name}: attach ended: {e:#}");
            EXIT.store(FAILED, Ordering::SeqCst);
        }
        Ok(_) => tracing::info!("service {name} stopped"),
    }
    handle
        .set_service_status(status(ServiceState::Stopped, exit, Duration::ZERO))
        .context("reporting Stopped to the Service Control Manager")
}
