//! Command line: the clap types and the dispatch to one function per command; each command
//! family lives in a file of its own (like ripgrep's thin `main`, its logic elsewhere).

mod attach;
#[cfg(target_os = "linux")]
mod cert;
mod config;
mod emulate;
#[cfg(target_os = "linux")]
mod provision;
#[cfg(target_os = "linux")]
mod serve;
#[cfg(windows)]
mod service;
#[cfg(target_os = "linux")]
mod status;

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::config::Config;
#[cfg(target_os = "linux")]
use crate::control::Command;

#[derive(Debug, Parser)]
#[command(
    name = "lucidgate",
    version,
    about = "Device server for LucidControl USB IO modules"
)]
struct Cli {
    /// Config file (default /etc/lucidgate/lucidgate.toml; missing means built-in defaults).
    #[arg(
        long,
        short = 'c',
        global = true,
        value_name = "FILE",
        env = "LUCIDGATE_CONFIG"
    )]
    pub(crate) config: Option<PathBuf>,
    /// Log level when RUST_LOG is not set (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    pub(crate) log_level: String,
    /// Where logs go: journald when started by systemd (auto), or stderr.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub(crate) log: crate::logging::LogTarget,
    /// Append log lines to this file instead (e.g. for lucidgate.exe run without a console).
    #[arg(long, global = true, value_name = "FILE")]
    pub(crate) log_file: Option<PathBuf>,
    #[command(subcommand)]
    pub(crate) command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    #[cfg(target_os = "linux")]
    /// Run the daemon: serve every LucidControl module that is plugged in.
    Serve {
        /// Also serve an emulated AO4 module on a pty (try lucidgate without hardware).
        #[arg(long)]
        demo: bool,
        /// Do not watch udev; serve only [[device]] entries (and --demo).
        #[arg(long)]
        no_udev: bool,
    },
    #[cfg(target_os = "linux")]
    /// Make the running daemon re-read its config (as `systemctl reload lucidgate`).
    Reload {
        /// Control socket (default: control_socket of the config).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    #[cfg(target_os = "linux")]
    /// Show the modules the running daemon serves.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Control socket (default: control_socket of the config).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
    /// Print the TCP port a module serial gets (no daemon needed).
    Port {
        /// The module's serial number, e.g. 11001001FA480000.
        serial: String,
    },
    #[cfg(target_os = "linux")]
    /// Manage the built-in CA and client certificates.
    Cert {
        #[command(subcommand)]
        action: CertCmd,
    },
    /// Work with the config file.
    Config {
        #[command(subcommand)]
        action: ConfigCmd,
    },
    /// Client side: a local serial port (pty + symlink) connected to a served module, that
    /// survives programs opening and closing it, network drops and server restarts.
    #[command(
        after_help = "Examples:\n  lucidgate attach pi.local:4216 --link /dev/lio0 --ca ca.crt --cert me.pem\n  lucidgate attach 11001001FA480000@pi.local --link /dev/lio0 --ca ca.crt --cert me.pem\n  lucidgate attach 11001001FA480000 --link /dev/lio0 --ca ca.crt --cert me.pem   # found by mDNS\n  lucidgate attach --config /etc/lucidgate/attach/lio0.toml   # [[port]] entries, see docs/attach.md"
    )]
    Attach(Box<AttachArgs>),
    #[cfg(target_os = "linux")]
    /// Certificate provisioning from a USB stick: run it by hand on an image or block device,
    /// or set the token requests must carry.
    #[command(
        args_conflicts_with_subcommands = true,
        after_help = "Examples:\n  lucidgate provision set-token                 # prints a new token, stores its hash in the config\n  lucidgate provision /dev/sdb1                 # what the daemon does when the stick is plugged in\n  lucidgate provision stick.img                 # a FAT image file\nThe stick carries lucidgate/request.toml; see docs/provisioning.md."
    )]
    Provision {
        /// A FAT block device (/dev/sdb1) or image file with lucidgate/request.toml.
        #[arg(value_name = "IMAGE-OR-DEVICE")]
        path: Option<PathBuf>,
        #[command(subcommand)]
        action: Option<ProvisionCmd>,
    },
    /// List the modules lucidgate servers announce on the local network (mDNS).
    Discover {
        /// How long to listen for announcements (ms).
        #[arg(long, value_name = "MS", default_value_t = crate::discovery::BROWSE_TIMEOUT.as_millis() as u64)]
        timeout_ms: u64,
        /// Network interface to listen on (repeatable; default: all).
        #[arg(long = "interface", value_name = "IFACE")]
        interfaces: Vec<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Emulate a LucidControl module on a pseudo-terminal.
    Emulate(EmulateArgs),
    #[cfg(windows)]
    /// Run `attach --config FILE` as a Windows service (started at boot, restarted on failure,
    /// logging to a file).
    #[command(
        after_help = "Examples (from an administrator prompt):\n  lucidgate service install --config C:\\ProgramData\\lucidgate\\attach.toml\n  lucidgate service uninstall\nSee docs/windows.md."
    )]
    Service {
        #[command(subcommand)]
        action: ServiceCmd,
    },
}

#[cfg(windows)]
#[derive(Debug, Subcommand)]
enum ServiceCmd {
    /// Register the service for the attach config given with --config (checked first) and
    /// start it. The log goes to --log-file, by default NAME.log beside the config.
    Install {
        /// Service name (several services, each with its own config, can be installed).
        #[arg(long, default_value = crate::service::DEFAULT_NAME)]
        name: String,
        /// Account the service runs as; it must be able to read the certificate files.
        #[arg(long, default_value = crate::service::DEFAULT_ACCOUNT)]
        account: String,
        /// Register only; start it later with `sc start NAME` (or at the next boot).
        #[arg(long)]
        no_start: bool,
    },
    /// Stop the service and remove it.
    Uninstall {
        /// Service name.
        #[arg(long, default_value = crate::service::DEFAULT_NAME)]
        name: String,
    },
    /// What the Service Control Manager starts (not for use by hand).
    #[command(hide = true)]
    Run {
        #[arg(long, default_value = crate::service::DEFAULT_NAME)]
        name: String,
    },
}

/// `lucidgate emulate` options.
#[derive(Debug, clap::Args)]
pub struct EmulateArgs {
    /// Module class: DI4, DI8, AI4, AI8, RI4, RI8, DO4, DO8, AO4, AO8, DI4DO4 or 4 hex digits.
    #[arg(long, default_value = "AO4")]
    pub class: String,
    /// 16-hex-digit USB serial (class, type, number); default derived from the class.
    #[arg(long)]
    pub serial: Option<String>,
    /// Create this symlink to the pty (like socat's link=).
    #[arg(long, value_name = "PATH")]
    pub link: Option<PathBuf>,
    /// Serve an inherited file descriptor instead of a new pty (for test harnesses).
    #[arg(long, value_name = "FD", conflicts_with = "link")]
    pub fd: Option<i32>,
    /// Serve TCP clients on this address instead of a pty (one at a time, as a module's one
    /// line; port 0 picks a free one, printed on stdout). The only way on Windows.
    #[arg(long, value_name = "ADDR:PORT", conflicts_with_all = ["link", "fd"])]
    pub listen: Option<std::net::SocketAddr>,
    /// Never answer (a hung module).
    #[arg(long)]
    pub silent: bool,
    /// Swallow the first N requests unanswered (a module still starting up).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub ignore_first: u64,
    /// Send each answer this long after its request (a slow module).
    #[arg(long, value_name = "MS", default_value_t = 0)]
    pub answer_delay_ms: u64,
}

/// `lucidgate attach` options (one port; several come from an attach config via --config).
#[derive(Debug, clap::Args)]
struct AttachArgs {
    /// HOST:PORT, SERIAL@HOST[:PORT] (the port defaults to the one the server derives from
    /// the serial; GetId must then answer that serial), or SERIAL alone (16 hex digits: host and
    /// port are found by mDNS). Without it, --config names an attach config with [[port]] entries.
    #[arg(value_name = "TARGET")]
    pub(crate) target: Option<String>,
    /// The symlink programs open, e.g. /dev/lio0 (removed on exit).
    #[arg(long, value_name = "PATH", conflicts_with = "listen")]
    pub(crate) link: Option<PathBuf>,
    /// Instead of a link: a local TCP address programs connect to (e.g. 127.0.0.1:4001; port 0
    /// picks a free one, printed on stdout). One local client at a time.
    #[arg(long, value_name = "ADDR:PORT")]
    pub(crate) listen: Option<std::net::SocketAddr>,
    /// Allow a --listen address other than loopback (other machines then use the module with
    /// this machine's certificate).
    #[arg(long, requires = "listen")]
    pub(crate) listen_any: bool,
    /// CA certificate the server must chain to (ca.crt from `lucidgate cert issue-client`).
    #[arg(long, value_name = "FILE")]
    pub(crate) ca: Option<PathBuf>,
    /// Client certificate, with its key (NAME.pem from `lucidgate cert issue-client`).
    #[arg(long, value_name = "FILE")]
    pub(crate) cert: Option<PathBuf>,
    /// The client key, when --cert holds only the certificate.
    #[arg(long, value_name = "FILE")]
    pub(crate) key: Option<PathBuf>,
    /// Name to check the server certificate against (default: the host of TARGET).
    #[arg(long, value_name = "NAME")]
    pub(crate) server_name: Option<String>,
    /// Plain TCP, for a relay configured with transport = "plain".
    #[arg(long)]
    pub(crate) plain: bool,
    /// Owner of the pty (name or uid).
    #[arg(long, value_name = "USER")]
    pub(crate) user: Option<String>,
    /// Group of the pty (name or gid).
    #[arg(long, value_name = "GROUP")]
    pub(crate) group: Option<String>,
    /// Permissions of the pty, octal (e.g. 0660).
    #[arg(long, value_name = "MODE")]
    pub(crate) mode: Option<String>,
    /// How long bytes written while disconnected are held before they are dropped (ms; the
    /// module answer timeout).
    #[arg(long, value_name = "MS")]
    pub(crate) hold_ms: Option<u64>,
    /// Longest wait between reconnect attempts (ms).
    #[arg(long, value_name = "MS")]
    pub(crate) retry_max_ms: Option<u64>,
    /// Network interface to look for a SERIAL target on by mDNS (repeatable; default: all).
    #[arg(long = "mdns-interface", value_name = "IFACE")]
    pub(crate) mdns_interfaces: Vec<String>,
}

#[cfg(target_os = "linux")]
#[derive(Debug, Subcommand)]
enum ProvisionCmd {
    /// Set the provisioning token (stored only as a salted hash in the config file). Without
    /// --token a random one is generated and printed once.
    SetToken {
        /// The token (12 to 256 characters); default: a new random one.
        #[arg(long, value_name = "TOKEN", conflicts_with = "stdin")]
        token: Option<String>,
        /// Read the token from the first line of standard input.
        #[arg(long)]
        stdin: bool,
    },
}

#[cfg(target_os = "linux")]
#[derive(Debug, Subcommand)]
enum CertCmd {
    /// Issue a client certificate: NAME.key, NAME.crt, NAME.pem (key + cert, for socat's cert=)
    /// and ca.crt in --out.
    IssueClient {
        /// The client's name (certificate CN; shown in logs and status).
        name: String,
        /// Modules the client may use (serials, comma-separated).
        #[arg(
            long,
            value_delimiter = ',',
            conflicts_with = "all",
            required_unless_present = "all"
        )]
        modules: Vec<String>,
        /// The client may use every module.
        #[arg(long)]
        all: bool,
        /// Reading only: writes (SetIo, SetParam, ...) are refused by the protocol-aware relay.
        #[arg(long)]
        read_only: bool,
        /// Validity in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
        /// Directory to write the files to (created 0700 if missing).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Revoke client certificates by name or serial; a running daemon refuses them at once.
    Revoke {
        /// Client name or certificate serial (hex).
        who: String,
    },
    /// Show the CA, the server certificate and the issued client certificates.
    List,
    /// Make a new CA; client certificates of the old one stay valid for the overlap.
    RotateCa {
        /// How long the old CA stays trusted, e.g. "30d".
        #[arg(long, default_value = "30d")]
        overlap: String,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Validate the config and print the effective settings.
    Check,
    #[cfg(target_os = "linux")]
    /// Turn a ser2net config (4.x YAML or 3.x ser2net.conf) into module port overrides, so
    /// existing clients keep their ports. Prints TOML to add to lucidgate.toml.
    ImportSer2net {
        /// The ser2net config, e.g. /etc/ser2net.yaml.
        file: PathBuf,
    },
}

pub fn main() -> Result<i32> {
    let cli = Cli::parse();
    crate::logging::init(&cli.log_level, cli.log, cli.log_file.as_deref());
    run(cli)
}

fn load_config(path: &Option<PathBuf>) -> Result<(Config, PathBuf)> {
    let (p, required) = match path {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(crate::config::DEFAULT_CONFIG_PATH), false),
    };
    let cfg = Config::load(&p, required)?;
    Ok((cfg, p))
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> Result<i32> {
    let c = &cli.config;
    match cli.command {
        #[cfg(target_os = "linux")]
        Cmd::Serve { demo, no_udev } => serve::serve(c, demo, no_udev),
        #[cfg(target_os = "linux")]
        Cmd::Reload { socket } => status::reload(c, socket),
        #[cfg(target_os = "linux")]
        Cmd::Status { json, socket } => status::status(c, json, socket),
        Cmd::Port { serial } => config::port(c, &serial),
        #[cfg(target_os = "linux")]
        Cmd::Config {
            action: ConfigCmd::ImportSer2net { file },
        } => config::import_ser2net(&file),
        Cmd::Config {
            action: ConfigCmd::Check,
        } => config::check(c),
        Cmd::Attach(a) => attach::attach(*a, c.as_deref()),
        Cmd::Discover {
            timeout_ms,
            interfaces,
            json,
        } => attach::discover(
            std::time::Duration::from_millis(timeout_ms),
            &interfaces,
            json,
        ),
        Cmd::Emulate(a) => emulate::emulate(a),
        #[cfg(windows)]
        Cmd::Service { action } => service::service(action, c.as_deref(), cli.log_file),
        #[cfg(target_os = "linux")]
        Cmd::Cert { action } => {
            let (cfg, _) = load_config(c)?;
            cert::cert(&cfg, action)
        }
        #[cfg(target_os = "linux")]
        Cmd::Provision { path, action } => provision::provision(c, path, action),
    }
}

fn describe_config_path(path: &Path) -> String {
    if path.exists() {
        path.display().to_string()
    } else {
        format!("{} not found: built-in defaults", path.display())
    }
}

#[cfg(target_os = "linux")]
/// Tells a running daemon (if its socket is there) that `what` changed; says whether it heard.
fn tell_daemon(socket: &Path, command: Command, what: &str, otherwise: &str) -> Result<()> {
    if !socket.exists() {
        return Ok(());
    }
    match runtime()?.block_on(crate::control::ask(socket, &command)) {
        Ok(_) => eprintln!("the running daemon re-read {what}"),
        Err(e) => eprintln!("note: could not tell the daemon ({e:#}); {otherwise}"),
    }
    Ok(())
}

#[cfg(target_os = "linux")]
/// Tells a running daemon that the PKI changed (it would notice at its next PKI check anyway).
fn tell_daemon_pki(socket: &Path) -> Result<()> {
    tell_daemon(
        socket,
        Command::ReloadPki,
        "the PKI",
        "it picks the change up at its next PKI check",
    )
}
