//! lucidgate.exe (the client side built for Windows) under wine, against a Linux
//! `lucidgate serve` with an emulated module on loopback: `attach --listen` over mTLS, byte for
//! byte, through a server restart; a foreign CA's clear error; `emulate --listen`; `discover`
//! of a module announced by mDNS on loopback (wine's sockets carry it); `service install`
//! under wine's Service Control Manager.
//!
//! Run by `scripts/test-windows`, which builds the .exe and sets `LUCIDGATE_EXE` and
//! `WINEPREFIX`; the tests are `#[ignore]`d in a plain `cargo test` (no .exe there), never
//! passed without running.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A digital-input module's serial (class 0000).
const DI4: &str = "00001001000000AA";
/// How long wine may take to start the .exe and print its first line.
const WINE_START: Duration = Duration::from_secs(60);

fn exe() -> PathBuf {
    PathBuf::from(std::env::var_os("LUCIDGATE_EXE").expect(
        "LUCIDGATE_EXE is not set: run scripts/test-windows (it builds lucidgate.exe and runs these)",
    ))
}

/// `wine64 lucidgate.exe ARGS`, quiet.
fn wine(args: &[&str]) -> Command {
    let wine = ["/usr/lib/wine/wine64", "/usr/bin/wine64"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("wine64 is not installed (scripts/test-windows installs it)");
    let mut c = Command::new(wine);
    c.arg(exe()).args(args).env("WINEDEBUG", "-all");
    c
}

/// A Linux path as the .exe sees it (wine's drive Z: is /).
fn win_path(p: &Path) -> String {
    format!("Z:{}", p.display()).replace('/', "\\")
}

/// A running lucidgate.exe that printed an address on its first stdout line.
struct WinProcess {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
}

impl WinProcess {
    fn start(mut cmd: Command, log: PathBuf) -> WinProcess {
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting wine");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(WINE_START).unwrap_or_else(|_| {
            panic!(
                "lucidgate.exe printed no address within {WINE_START:?}:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        let addr = line.trim().parse().unwrap_or_else(|_| {
            panic!(
                "no address on stdout ({line:?}):\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
        WinProcess { child, addr, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, what: &str, count: usize) {
        let start = Instant::now();
        while self.log().matches(what).count() < count {
            assert!(
                start.elapsed() < PATIENCE * 3,
                "lucidgate.exe log has not {count}x {what:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn get_id(&self) -> Vec<u8> {
        let mut s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        ask(&mut s, &GET_ID)
    }
}

impl Drop for WinProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- lucidgate.exe log ---\n{}", self.log());
        }
    }
}

fn mtls_daemon() -> (Daemon, Emulator, u16, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("module");
    let emu = Emulator::start(&module, "AO4", AO4);
    let d = Daemon::start(
        port_block(),
        Conf::new().device(&module, AO4).default_transport(),
        None,
    );
    let port = d.wait_serving(AO4);
    (d, emu, port, dir)
}

#[test]
#[ignore = "needs lucidgate.exe and wine: scripts/test-windows runs it"]
fn exe_attach_listen_over_mtls_survives_a_server_restart() {
    let (mut d, _emu, port, dir) = mtls_daemon();
    let certs = issue_client(&d, "winpc", &["--modules", AO4]);
    let target = format!("127.0.0.1:{port}");
    let (ca, pem) = (
        win_path(&certs.join("ca.crt")),
        win_path(&certs.join("winpc.pem")),
    );
    let a = WinProcess::start(
        wine(&[
            "--log-level",
            "debug",
            "attach",
            &target,
            "--listen",
            "127.0.0.1:0",
            "--ca",
            &ca,
            "--cert",
            &pem,
            "--retry-max-ms",
            "500",
        ]),
        dir.path().join("attach.log"),
    );
    a.wait_log("connected to", 1);
    assert!(a.log().contains("(TLS)"), "{}", a.log());
    assert_eq!(
        a.get_id(),
        get_id_answer(AO4),
        "GetId through lucidgate.exe"
    );
    let client = d.module(AO4).unwrap().client.unwrap_or_default();
    assert!(
        client.contains("winpc"),
        "the server sees the certificate: {client}"
    );

    // The server restarts: the local port stays and works again after the reconnect.
    d.stop();
    a.wait_log("lost the connection", 1);
    d.restart(None);
    d.wait_serving(AO4);
    a.wait_log("connected to", 2);
    assert_eq!(
        a.get_id(),
        get_id_answer(AO4),
        "GetId after the server restart"
    );
}

#[test]
#[ignore = "needs lucidgate.exe and wine: scripts/test-windows runs it"]
fn exe_refuses_a_server_of_a_foreign_ca_clearly() {
    require_tool("openssl");
    let (d, _emu, port, dir) = mtls_daemon();
    let certs = issue_client(&d, "winpc", &["--modules", AO4]);
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-subj",
            "/CN=someone else",
            "-days",
            "2",
            "-keyout",
        ])
        .arg(other.join("ca.key"))
        .arg("-out")
        .arg(other.join("ca.crt"))
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let target = format!("127.0.0.1:{port}");
    let (ca, pem) = (
        win_path(&other.join("ca.crt")),
        win_path(&certs.join("winpc.pem")),
    );
    let a = WinProcess::start(
        wine(&[
            "attach",
            &target,
            "--listen",
            "127.0.0.1:0",
            "--ca",
            &ca,
            "--cert",
            &pem,
        ]),
        dir.path().join("attach.log"),
    );
    a.wait_log("not signed by the CA in", 1);
    assert!(a.log().contains("retrying in"), "{}", a.log());
    // Nothing reaches the module meanwhile: a local client gets no answer.
    let mut s = TcpStream::connect(a.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    std::io::Write::write_all(&mut s, &GET_ID).unwrap();
    let mut b = [0u8; 32];
    assert!(
        !matches!(s.read(&mut b), Ok(n) if n > 0),
        "an answer through a refused server"
    );
}

#[test]
#[ignore = "needs lucidgate.exe and wine: scripts/test-windows runs it"]
fn exe_emulates_a_module_on_a_tcp_port() {
    let dir = tempfile::tempdir().unwrap();
    let e = WinProcess::start(
        wine(&[
            "emulate",
            "--class",
            "DI4",
            "--serial",
            DI4,
            "--listen",
            "127.0.0.1:0",
        ]),
        dir.path().join("emulate.log"),
    );
    assert_eq!(e.get_id(), get_id_answer(DI4));
    // A pty exists on Linux only: the .exe says what to use instead.
    let out = wine(&["emulate", "--link", "Z:\\tmp\\lio0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--listen"),
        "{out:?}"
    );
}

#[test]
#[ignore = "needs lucidgate.exe and wine: scripts/test-windows runs it"]
fn exe_discover_finds_a_module_announced_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let module = dir.path().join("module");
    let _emu = Emulator::start(&module, "AO4", AO4);
    let d = Daemon::start(
        port_block(),
        Conf::new()
            .device(&module, AO4)
            .relay(r#"transport = "mtls""#)
            .table("discovery", "mdns = true")
            .table("discovery", r#"hostname = "lucidgate-wine""#)
            .table("discovery", r#"interfaces = ["lo"]"#),
        None,
    );
    let port = d.wait_serving(AO4);
    let out = wine(&["discover", "--json", "--timeout-ms", "4000"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let found: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("discover printed no JSON ({e}): {out:?}"));
    let m = found
        .as_array()
        .expect("a list")
        .iter()
        .find(|f| f["serial"] == AO4)
        .unwrap_or_else(|| panic!("lucidgate.exe discover did not see {AO4}: {found}"));
    assert_eq!(m["port"], port, "{m}");
    assert_eq!(m["host"], "lucidgate-wine.local", "{m}");
    assert_eq!(m["transport"], "mtls", "{m}");
}

/// The installed service's name in these tests (not the default, so a developer's own
/// wine prefix keeps its `lucidgate-attach`).
const SERVICE: &str = "lucidgate-wine-test";

/// Removes the test service however a test ends (a failed assertion must not leave it
/// running in the wine prefix for the next test).
struct ServiceGuard;

impl Drop for ServiceGuard {
    fn drop(&mut self) {
        let _ = wine(&["service", "uninstall", "--name", SERVICE]).output();
    }
}

#[test]
#[ignore = "needs lucidgate.exe and wine: scripts/test-windows runs it"]
fn exe_runs_the_attach_as_a_windows_service() {
    let (_d, _emu, port, dir) = mtls_daemon();
    let certs = issue_client(&_d, "winsvc", &["--modules", AO4]);
    let local = free_port();
    let config = dir.path().join("attach.toml");
    // The config names Windows paths, as on a PC (wine's Z: is /).
    std::fs::write(
        &config,
        format!(
            "ca = '{}'\ncert = '{}'\nretry_max_ms = 500\n\n[[port]]\ntarget = \"127.0.0.1:{port}\"\nlisten = \"127.0.0.1:{local}\"\n",
            win_path(&certs.join("ca.crt")),
            win_path(&certs.join("winsvc.pem")),
        ),
    )
    .unwrap();
    let log = dir.path().join("service.log");
    // wine ends its session, services included, about a second after the last program in it
    // exits (measured: the installed service's port closed 1.5 s after `service install`
    // returned); Windows keeps services running with nobody logged in. A program kept running
    // for the test stands in for that: without it the service dies with the installer.
    let _session = WinProcess::start(
        wine(&[
            "emulate",
            "--class",
            "DI4",
            "--serial",
            DI4,
            "--listen",
            "127.0.0.1:0",
        ]),
        dir.path().join("session.log"),
    );
    let _guard = ServiceGuard;
    let _ = wine(&["service", "uninstall", "--name", SERVICE]).output();

    // A config with a mistake is refused at install, with its file and line; nothing is
    // registered.
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[[port]]\ntarget = 4216\n").unwrap();
    let out = wine(&[
        "--config",
        &win_path(&bad),
        "service",
        "install",
        "--name",
        SERVICE,
    ])
    .output()
    .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(err.contains("bad.toml") && err.contains("line 2"), "{err}");
    let out = wine(&["service", "uninstall", "--name", SERVICE])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is it installed?"),
        "{out:?}"
    );

    // Installed (and started) by the Service Control Manager: the local port works, byte for
    // byte, and the log goes to the file (a service has no console).
    let out = wine(&[
        "--config",
        &win_path(&config),
        "--log-file",
        &win_path(&log),
        "service",
        "install",
        "--name",
        SERVICE,
    ])
    .output()
    .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("{SERVICE} is running")),
        "{out:?}"
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    let begun = Instant::now();
    let answer = loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", local)) {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            break ask(&mut s, &GET_ID);
        }
        assert!(
            begun.elapsed() < PATIENCE * 3,
            "the service's port 127.0.0.1:{local} did not open; its log:\n{}",
            read_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(answer, get_id_answer(AO4), "{}", read_log());
    let begun = Instant::now();
    while !read_log().contains("connected to") {
        assert!(begun.elapsed() < PATIENCE, "no connect in {}", read_log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(read_log().contains(&format!("service {SERVICE} running")));

    // Uninstall stops it first: the port closes, the log says why.
    let out = wine(&["service", "uninstall", "--name", SERVICE])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        TcpStream::connect(("127.0.0.1", local)).is_err(),
        "the local port is still open after uninstall"
    );
    let l = read_log();
    assert!(
        l.contains("service stop: ") && l.contains(&format!("service {SERVICE} stopped")),
        "{l}"
    );
}
