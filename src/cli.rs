//! Command line: the subcommands and what each one runs.

use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use crate::config::{self, Config, StaticDevice};
use crate::control::{self, Command, StatusReport};
use crate::daemon::{self, ServeOptions};
use crate::emulator::{self, Module};
use crate::ports::{self, Registry};
use crate::pty::Pty;

/// Serial number of the module `serve --demo` emulates.
pub const DEMO_SERIAL: &str = "11001001FA480000";

#[derive(Debug, Parser)]
#[command(
    name = "lucidgate",
    version,
    about = "Device server for LucidControl USB IO modules"
)]
pub struct Cli {
    /// Config file (default /etc/lucidgate/lucidgate.toml; missing means built-in defaults).
    #[arg(
        long,
        short = 'c',
        global = true,
        value_name = "FILE",
        env = "LUCIDGATE_CONFIG"
    )]
    pub config: Option<PathBuf>,
    /// Log level when RUST_LOG is not set (error, warn, info, debug, trace).
    #[arg(long, global = true, default_value = "info", value_name = "LEVEL")]
    pub log_level: String,
    /// Where logs go: journald when started by systemd (auto), or stderr.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub log: crate::logging::LogTarget,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Run the daemon: serve every LucidControl module that is plugged in.
    Serve {
        /// Also serve an emulated AO4 module on a pty (try lucidgate without hardware).
        #[arg(long)]
        demo: bool,
        /// Do not watch udev; serve only [[device]] entries (and --demo).
        #[arg(long)]
        no_udev: bool,
    },
    /// Make the running daemon re-read its config (as `systemctl reload lucidgate`).
    Reload {
        /// Control socket (default: control_socket of the config).
        #[arg(long, value_name = "PATH")]
        socket: Option<PathBuf>,
    },
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
    Attach(AttachArgs),
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
    Emulate {
        /// Module class: DI4, DI8, AI4, AI8, RI4, RI8, DO4, DO8, AO4, AO8, DI4DO4 or 4 hex digits.
        #[arg(long, default_value = "AO4")]
        class: String,
        /// 16-hex-digit USB serial (class, type, number); default derived from the class.
        #[arg(long)]
        serial: Option<String>,
        /// Create this symlink to the pty (like socat's link=).
        #[arg(long, value_name = "PATH")]
        link: Option<PathBuf>,
        /// Serve an inherited file descriptor instead of a new pty (for test harnesses).
        #[arg(long, value_name = "FD", conflicts_with = "link")]
        fd: Option<i32>,
        /// Never answer (a hung module).
        #[arg(long)]
        silent: bool,
        /// Swallow the first N requests unanswered (a module still starting up).
        #[arg(long, value_name = "N", default_value_t = 0)]
        ignore_first: u64,
        /// Send each answer this long after its request (a slow module).
        #[arg(long, value_name = "MS", default_value_t = 0)]
        answer_delay_ms: u64,
    },
}

/// `lucidgate attach` options (one port; several come from an attach config via --config).
#[derive(Debug, clap::Args)]
pub struct AttachArgs {
    /// HOST:PORT, SERIAL@HOST[:PORT] (the port defaults to the one the server derives from
    /// the serial; GetId must then answer that serial), or SERIAL alone (16 hex digits: host and
    /// port are found by mDNS). Without it, --config names an attach config with [[port]] entries.
    #[arg(value_name = "TARGET", requires = "link")]
    pub target: Option<String>,
    /// The symlink programs open, e.g. /dev/lio0 (removed on exit).
    #[arg(long, value_name = "PATH")]
    pub link: Option<PathBuf>,
    /// CA certificate the server must chain to (ca.crt from `lucidgate cert issue-client`).
    #[arg(long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Client certificate, with its key (NAME.pem from `lucidgate cert issue-client`).
    #[arg(long, value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// The client key, when --cert holds only the certificate.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Name to check the server certificate against (default: the host of TARGET).
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// Plain TCP, for a relay configured with transport = "plain".
    #[arg(long)]
    pub plain: bool,
    /// Owner of the pty (name or uid).
    #[arg(long, value_name = "USER")]
    pub user: Option<String>,
    /// Group of the pty (name or gid).
    #[arg(long, value_name = "GROUP")]
    pub group: Option<String>,
    /// Permissions of the pty, octal (e.g. 0660).
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,
    /// How long bytes written while disconnected are held before they are dropped (ms; the
    /// module answer timeout).
    #[arg(long, value_name = "MS")]
    pub hold_ms: Option<u64>,
    /// Longest wait between reconnect attempts (ms).
    #[arg(long, value_name = "MS")]
    pub retry_max_ms: Option<u64>,
    /// Network interface to look for a SERIAL target on by mDNS (repeatable; default: all).
    #[arg(long = "mdns-interface", value_name = "IFACE")]
    pub mdns_interfaces: Vec<String>,
}

#[derive(Debug, Subcommand)]
pub enum ProvisionCmd {
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

#[derive(Debug, Subcommand)]
pub enum CertCmd {
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
pub enum ConfigCmd {
    /// Validate the config and print the effective settings.
    Check,
    /// Turn a ser2net config (4.x YAML or 3.x ser2net.conf) into module port overrides, so
    /// existing clients keep their ports. Prints TOML to add to lucidgate.toml.
    ImportSer2net {
        /// The ser2net config, e.g. /etc/ser2net.yaml.
        file: PathBuf,
    },
}

/// Parses the command line and runs it; returns the exit code.
pub fn main() -> Result<i32> {
    let cli = Cli::parse();
    crate::logging::init(&cli.log_level, cli.log);
    run(cli)
}

fn load_config(path: &Option<PathBuf>) -> Result<(Config, PathBuf)> {
    let (p, required) = match path {
        Some(p) => (p.clone(), true),
        None => (PathBuf::from(config::DEFAULT_CONFIG_PATH), false),
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

/// The daemon's runtime: one thread. A relay is a byte pump whose every wake-up is I/O; on one
/// thread a byte read from the serial port is written to the socket by the same thread, with no
/// cross-thread wake-up, and there is one thread stack and one malloc arena instead of one per
/// core (measured in docs/benchmarks.md: lower round trip and RSS than the multi-thread runtime).
/// Blocking work (PKI files, key generation) goes to `spawn_blocking`; udev has its own thread.
fn serve_runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

pub fn run(cli: Cli) -> Result<i32> {
    match cli.command {
        Cmd::Serve { demo, no_udev } => {
            let (path, required) = match &cli.config {
                Some(p) => (p.clone(), true),
                None => (PathBuf::from(config::DEFAULT_CONFIG_PATH), false),
            };
            let mut source = crate::supervisor::ConfigSource {
                path: Some(path.clone()),
                required,
                extra_devices: Vec::new(),
            };
            let mut cfg = source.load()?;
            tracing::info!(
                "lucidgate {} starting; config {}",
                env!("CARGO_PKG_VERSION"),
                describe_config_path(&path)
            );
            let _demo = if demo {
                let (demo, device) = start_demo()?;
                cfg.devices.retain(|d| d.serial != DEMO_SERIAL);
                cfg.devices.push(device.clone());
                source.extra_devices.push(device);
                Some(demo)
            } else {
                None
            };
            let mut systemd = crate::systemd::Systemd::from_env();
            serve_runtime()?.block_on(daemon::serve(
                cfg,
                ServeOptions { no_udev, source },
                &mut systemd,
            ))?;
            Ok(0)
        }
        Cmd::Reload { socket } => {
            let socket = match socket {
                Some(s) => s,
                None => load_config(&cli.config)?.0.control_socket,
            };
            let v = runtime()?.block_on(control::ask(&socket, &Command::Reload))?;
            println!("{}", v["status"].as_str().unwrap_or("reloaded"));
            Ok(0)
        }
        Cmd::Status { json, socket } => {
            let socket = match socket {
                Some(s) => s,
                None => load_config(&cli.config)?.0.control_socket,
            };
            let value = runtime()?.block_on(control::ask(&socket, &Command::Status))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            } else {
                let report: StatusReport =
                    serde_json::from_value(value).context("reading the daemon's status")?;
                print!("{}", status_table(&report));
            }
            Ok(0)
        }
        Cmd::Port { serial } => {
            let (cfg, _) = load_config(&cli.config)?;
            if let Err(why) = config::check_serial(&serial) {
                anyhow::bail!("serial {serial:?} {why}");
            }
            let registry = match std::fs::metadata(cfg.state_dir.join(ports::REGISTRY_FILE)) {
                Ok(_) => Registry::load(&cfg.state_dir)
                    .map(|(r, _)| r)
                    .unwrap_or_else(|_| Registry::empty(PathBuf::new())),
                Err(_) => Registry::empty(PathBuf::new()),
            };
            let (port, source) = registry.lookup(&serial, &cfg);
            println!("{port}");
            let why = match source {
                ports::PortSource::Derived => format!(
                    "derived: {} + {} % {} (ports.base + serial % ports.span)",
                    cfg.ports.base,
                    if ports::serial_number(&serial) == ports::fnv1a64(serial.as_bytes()) {
                        "hash(serial)".to_string()
                    } else {
                        format!("0x{serial}")
                    },
                    cfg.ports.span
                ),
                ports::PortSource::Fixed => format!("fixed in [modules.\"{serial}\"]"),
                other => format!(
                    "{other}: remembered in {}",
                    daemon::registry_path(&cfg).display()
                ),
            };
            eprintln!("{serial}: port {port} ({why})");
            Ok(0)
        }
        Cmd::Config {
            action: ConfigCmd::ImportSer2net { file },
        } => {
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("reading ser2net config {}", file.display()))?;
            let origin = file.display().to_string();
            let conns = crate::migrate::parse(&text, &origin)?;
            let (toml, notes) =
                crate::migrate::render(&conns, &origin, crate::migrate::serial_from_udev);
            print!("{toml}");
            for n in &notes {
                eprintln!("note: {n}");
            }
            eprintln!(
                "{} connections read, {} notes; add the output to {}",
                conns.len(),
                notes.len(),
                config::DEFAULT_CONFIG_PATH
            );
            Ok(0)
        }
        Cmd::Config {
            action: ConfigCmd::Check,
        } => {
            let (cfg, path) = load_config(&cli.config)?;
            println!(
                "# effective configuration ({})",
                describe_config_path(&path)
            );
            print!("{}", cfg.to_toml());
            eprintln!("config OK");
            Ok(0)
        }
        Cmd::Attach(a) => attach(a, cli.config.as_deref()),
        Cmd::Discover {
            timeout_ms,
            interfaces,
            json,
        } => discover(
            std::time::Duration::from_millis(timeout_ms),
            &interfaces,
            json,
        ),
        Cmd::Emulate {
            class,
            serial,
            link,
            fd,
            silent,
            ignore_first,
            answer_delay_ms,
        } => {
            let mut module = module_for(&class, serial)?;
            module.silent = silent;
            module.ignore_first = ignore_first;
            module.answer_delay = std::time::Duration::from_millis(answer_delay_ms);
            emulate(&class, module, link, fd)
        }
        Cmd::Cert { action } => {
            let (cfg, _) = load_config(&cli.config)?;
            cert(&cfg, action)
        }
        Cmd::Provision { path, action } => provision(&cli.config, path, action),
    }
}

fn provision(
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
            if cfg.control_socket.exists() {
                match runtime()?.block_on(control::ask(&cfg.control_socket, &Command::Reload)) {
                    Ok(_) => eprintln!("the running daemon re-read the config"),
                    Err(e) => {
                        eprintln!("note: could not tell the daemon ({e:#}); run `lucidgate reload`")
                    }
                }
            }
            Ok(0)
        }
        (Some(path), None) => {
            let clock = crate::clock::SystemClock::from_env();
            // The modules the running daemon serves, for the result file.
            let modules = if cfg.control_socket.exists() {
                runtime()?
                    .block_on(control::ask(&cfg.control_socket, &Command::Status))
                    .ok()
                    .and_then(|v| serde_json::from_value::<StatusReport>(v).ok())
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
            let dev = provision::Device {
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
            if out.status == Status::Done && cfg.control_socket.exists() {
                let _ = runtime()?.block_on(control::ask(&cfg.control_socket, &Command::ReloadPki));
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

fn attach(a: AttachArgs, config: Option<&Path>) -> Result<i32> {
    use crate::attach::{self, AttachFile, PortOptions};
    let specs = match (&a.target, config) {
        (Some(target), _) => {
            let link = a
                .link
                .as_deref()
                .context("--link is required with a TARGET")?;
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
                link,
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
            "attach needs a TARGET (HOST:PORT, SERIAL@HOST or SERIAL) with --link, or --config FILE with [[port]] entries"
        ),
    };
    attach::run(specs)
}

fn discover(timeout: std::time::Duration, interfaces: &[String], json: bool) -> Result<i32> {
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

fn cert(cfg: &Config, action: CertCmd) -> Result<i32> {
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

fn describe_config_path(path: &Path) -> String {
    if path.exists() {
        path.display().to_string()
    } else {
        format!("{} not found: built-in defaults", path.display())
    }
}

fn module_for(class: &str, serial: Option<String>) -> Result<Module> {
    let class_id = emulator::parse_class(class).with_context(|| {
        format!("unknown module class {class:?}; use AO4, DI4, DO4, AI4, ... or 4 hex digits")
    })?;
    let serial = serial.unwrap_or_else(|| emulator::default_serial(class_id));
    let module = Module::from_usb_serial(&serial).with_context(|| {
        format!(
            "serial {serial:?} is not 16 hex digits (class, type, number, e.g. 11001001FA480000)"
        )
    })?;
    if module.identity.class != class_id {
        anyhow::bail!(
            "serial {serial} starts with class {:04X}, not {class} ({class_id:04X}); the first 4 digits of a LucidControl serial are its class",
            module.identity.class
        );
    }
    Ok(module)
}

fn emulate(class: &str, module: Module, link: Option<PathBuf>, fd: Option<i32>) -> Result<i32> {
    let usb_serial = module.identity.usb_serial();
    let shared = emulator::Shared::new(module);
    // Signal handlers first: a SIGTERM that comes as soon as the link exists must still end
    // the emulator cleanly (and remove the link), not by the default action.
    let rt = runtime()?;
    let (mut term, mut int) = {
        use tokio::signal::unix::{SignalKind, signal};
        let _guard = rt.enter();
        (
            signal(SignalKind::terminate()).context("installing SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("installing SIGINT handler")?,
        )
    };
    let (master, _pty) = match fd {
        Some(fd) => {
            if fd < 3 {
                anyhow::bail!(
                    "--fd {fd} is stdin/stdout/stderr; pass the inherited pty fd (3 or more)"
                );
            }
            // SAFETY: the caller hands us this descriptor (documented in --help) and nothing
            // else in this process uses it.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            // A real tty (a USB gadget's /dev/ttyGS0, a serial line) starts cooked: echo and
            // line editing would mangle the binary protocol. A pipe or socket stays as it is.
            if nix::unistd::isatty(&owned).unwrap_or(false) {
                crate::pty::make_raw(&owned)
                    .with_context(|| format!("--fd {fd}: putting the tty in raw mode"))?;
            }
            (owned, None)
        }
        None => {
            let mut pty = Pty::open()?;
            if let Some(l) = &link {
                pty.link(l)?;
            }
            let master = pty
                .master
                .try_clone()
                .context("duplicating the pty master")?;
            (master, Some(pty))
        }
    };
    let where_ = match &_pty {
        Some(p) => p.path().display().to_string(),
        None => format!("fd {}", fd.unwrap_or(-1)),
    };
    eprintln!("emulating LucidControl {class} {usb_serial} on {where_}; Ctrl-C stops");
    // Tell scripts where the module is, on stdout.
    println!("{where_}");
    let _ = std::io::stdout().flush();
    let stop = shared.stop.clone();
    let counters = shared.counters.clone();
    let worker = std::thread::spawn(move || emulator::serve_fd(master, shared));
    rt.block_on(async {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
    });
    stop.store(true, Ordering::Relaxed);
    match worker.join() {
        Ok(r) => r?,
        Err(_) => anyhow::bail!("the emulator thread panicked"),
    }
    // What the module saw, for scripts and tests (e.g. that a refused write never arrived).
    println!(
        "requests {} writes {}",
        counters.requests.load(Ordering::Relaxed),
        counters.writes.load(Ordering::Relaxed)
    );
    Ok(0)
}

/// What `serve --demo` keeps alive: the emulator's pty and thread.
pub struct Demo {
    _pty: Pty,
    shared: emulator::Shared,
}

impl Drop for Demo {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

fn start_demo() -> Result<(Demo, StaticDevice)> {
    let pty = Pty::open()?;
    let module = module_for("AO4", Some(DEMO_SERIAL.to_string()))?;
    let shared = emulator::Shared::new(module);
    let master = pty.master.try_clone()?;
    let s = shared.clone();
    std::thread::Builder::new()
        .name("demo-module".into())
        .spawn(move || {
            if let Err(e) = emulator::serve_fd(master, s) {
                tracing::error!("demo module stopped: {e:#}");
            }
        })?;
    tracing::info!(
        "demo: emulated LucidIo AO4 {DEMO_SERIAL} on {}",
        pty.slave_path.display()
    );
    let device = StaticDevice {
        path: pty.slave_path.clone(),
        serial: DEMO_SERIAL.to_string(),
        model: "LucidIo_AO4 (demo)".to_string(),
    };
    Ok((Demo { _pty: pty, shared }, device))
}

/// The human-readable status table.
pub fn status_table(report: &StatusReport) -> String {
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
