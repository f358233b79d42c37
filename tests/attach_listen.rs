//! `lucidgate attach --listen`: a local TCP endpoint instead of a pty, for programs that connect
//! over TCP (the vendor's Windows tools, pyserial's `socket://`). The same session as the pty
//! link: reconnect, hold-and-drop, TLS; plus one local client at a time and loopback only
//! unless told otherwise. Real peers: socat, pyserial, a std TCP client.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A running `lucidgate attach TARGET --listen 127.0.0.1:0` and the address it chose.
struct AttachTcp {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl AttachTcp {
    fn start(target: &str, args: &[&str]) -> AttachTcp {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("attach.log");
        let mut child = Command::new(bin())
            .args([
                "--log-level",
                "debug",
                "attach",
                target,
                "--listen",
                "127.0.0.1:0",
            ])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("starting lucidgate attach --listen");
        // The first line on stdout is the address it listens on (port 0: the one it chose).
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("no address on stdout: {line:?}"));
        AttachTcp {
            child,
            addr,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, what: &str, count: usize) {
        let start = Instant::now();
        while self.log().matches(what).count() < count {
            assert!(
                start.elapsed() < PATIENCE,
                "attach log has not {count}x {what:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn client(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    fn stop(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let st = self.child.wait().unwrap();
        assert!(st.success(), "attach exited with {st}:\n{}", self.log());
        assert!(
            TcpStream::connect(self.addr).is_err(),
            "the listener must be gone after SIGTERM"
        );
    }
}

impl Drop for AttachTcp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- attach log ---\n{}", self.log());
        }
    }
}

fn plain_daemon() -> (Daemon, Emulator, u16, tempfile::TempDir) {
    let links = tempfile::tempdir().unwrap();
    let module = links.path().join("module");
    let emu = Emulator::start(&module, "AO4", AO4);
    let d = Daemon::start(port_block(), Conf::new().device(&module, AO4), None);
    let port = d.wait_serving(AO4);
    (d, emu, port, links)
}

/// Whether the local side closed `s` without answering.
fn closed_unanswered(s: &mut TcpStream) -> bool {
    let _ = s.write_all(&GET_ID);
    let mut b = [0u8; 32];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn tcp_clients_one_at_a_time_through_reconnects_and_server_restarts() {
    let (mut d, _emu, port, _links) = plain_daemon();
    let a = AttachTcp::start(
        &format!("{AO4}@127.0.0.1:{port}"),
        &["--plain", "--hold-ms", "2000", "--retry-max-ms", "300"],
    );
    a.wait_log("connected to", 1);
    let want = get_id_answer(AO4);

    // A real plain-TCP client, byte for byte.
    assert_eq!(socat_exchange(a.addr.port(), &GET_ID), want);

    // A program that connects for every request (the LucidIoCtrl pattern over TCP): the session
    // to the server is not touched.
    for i in 0..20 {
        let mut c = a.client();
        assert_eq!(ask(&mut c, &GET_ID), want, "round {i}");
    }
    assert_eq!(a.log().matches("connected to").count(), 1, "{}", a.log());

    // One local client at a time: a second one is closed at once and the first is undisturbed.
    let mut first = a.client();
    assert_eq!(ask(&mut first, &GET_ID), want);
    let mut second = a.client();
    assert!(
        closed_unanswered(&mut second),
        "the second local client must be refused"
    );
    a.wait_log("another local client is connected", 1);
    assert_eq!(ask(&mut first, &GET_IO_UV)[..2], [0x00, 0x04]);

    // The server restarts while the local client stays connected: a request written while it
    // is down is held and answered once it is back; the local port never went away.
    d.stop();
    a.wait_log("lost the connection", 1);
    first.write_all(&GET_IO_UV).unwrap();
    d.restart(None);
    let answer = read_answer(&mut first).expect("the held request's answer");
    assert_eq!(answer[..2], [0x00, 0x04], "{answer:02X?}");
    assert_eq!(ask(&mut first, &GET_ID), want);
    drop(first);

    // Down longer than the hold time: dropped, never answered late.
    d.stop();
    a.wait_log("lost the connection", 2);
    let mut c = a.client();
    c.write_all(&GET_ID).unwrap();
    a.wait_log("dropped a request written while disconnected", 1);
    d.restart(None);
    a.wait_log("connected to", 3);
    c.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut b = [0u8; 32];
    assert!(
        matches!(c.read(&mut b), Err(ref e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut),
        "a dropped request must not be answered late"
    );
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(ask(&mut c, &GET_ID), want, "no stale answer in between");
    drop(c);
    a.stop();
}

#[test]
fn pyserial_socket_urls_and_mtls_through_the_local_port() {
    require_tool("openssl");
    let links = tempfile::tempdir().unwrap();
    let module = links.path().join("module");
    let _emu = Emulator::start(&module, "AO4", AO4);
    let d = Daemon::start(
        port_block(),
        Conf::new().device(&module, AO4).default_transport(),
        None,
    );
    let port = d.wait_serving(AO4);
    let certs = issue_client(&d, "pc", &["--modules", AO4]);
    let (ca, pem) = (certs.join("ca.crt"), certs.join("pc.pem"));
    let a = AttachTcp::start(
        &format!("127.0.0.1:{port}"),
        &[
            "--ca",
            ca.to_str().unwrap(),
            "--cert",
            pem.to_str().unwrap(),
        ],
    );
    a.wait_log("connected to", 1);
    assert!(a.log().contains("(TLS)"), "{}", a.log());
    let mut c = a.client();
    assert_eq!(ask(&mut c, &GET_ID), get_id_answer(AO4));
    drop(c);
    let client = d.module(AO4).unwrap().client.unwrap_or_default();
    assert!(
        client.contains("pc"),
        "the server sees the certificate's name: {client}"
    );

    // pyserial's socket:// URL (what a Python program that takes a port URL uses). The vendor's
    // pylucidio opens its port with serial.Serial(), which takes device names only: it needs
    // --link, not --listen.
    let python = repo().join("target/test-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run ./scripts/test-venv",
        python.display()
    );
    let script = r#"
import sys, serial
s = serial.serial_for_url(sys.argv[1], timeout=5)
s.write(bytes([0xC0, 0, 0, 0]))
head = s.read(2)
body = s.read(head[1])
print((head + body).hex())
"#;
    let out = Command::new("timeout")
        .arg("60")
        .arg(&python)
        .arg("-c")
        .arg(script)
        .arg(format!("socket://{}", a.addr))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pyserial failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hex: String = get_id_answer(AO4)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), hex);
    a.stop();
}

#[test]
fn a_listen_address_other_than_loopback_needs_listen_any() {
    let run = |args: &[&str]| {
        Command::new("timeout")
            .arg("10")
            .arg(bin())
            .args(["attach", &format!("127.0.0.1:{}", free_port()), "--plain"])
            .args(args)
            .output()
            .unwrap()
    };
    let out = run(&["--listen", "0.0.0.0:0"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not a loopback address") && err.contains("--listen-any"),
        "{err}"
    );
    let out = run(&["--listen", "127.0.0.1:0", "--link", "/tmp/x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
    let out = run(&[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--link") && err.contains("--listen"), "{err}");

    // With --listen-any it listens (the unspecified address) and runs until stopped.
    let mut child = Command::new(bin())
        .args(["attach", &format!("127.0.0.1:{}", free_port()), "--plain"])
        .args(["--listen", "0.0.0.0:0", "--listen-any"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("0.0.0.0:"), "{line:?}");
    let _ = child.kill();
    let _ = child.wait();
}
