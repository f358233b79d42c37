//! `lucidgate attach` end to end: real programs (std file I/O, the vendor's pylucidio) open the
//! local link, through `lucidgate serve` to an emulated module on a pty; server restarts,
//! network drops (a TCP proxy in the middle cuts the session), TLS with client certificates,
//! and socat's behaviour in the same situations for comparison.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use lucidgate::protocol::Answer;

/// A running `lucidgate attach`.
struct Attach {
    child: Child,
    link: PathBuf,
    log: PathBuf,
}

impl Attach {
    fn start(target: &str, link: &Path, args: &[&str]) -> Attach {
        let log = link.with_extension("attach.log");
        let logf = File::create(&log).unwrap();
        let child = Command::new(bin())
            .args(["--log-level", "debug", "attach", target, "--link"])
            .arg(link)
            .args(args)
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("starting lucidgate attach");
        let a = Attach {
            child,
            link: link.to_path_buf(),
            log,
        };
        wait_until("the attach link", || link.exists().then_some(()));
        a
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

    fn stop(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let st = self.child.wait().unwrap();
        assert!(st.success(), "attach exited with {st}:\n{}", self.log());
        assert!(
            std::fs::symlink_metadata(&self.link).is_err(),
            "SIGTERM must remove the link"
        );
    }
}

impl Drop for Attach {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- attach log ---\n{}", self.log());
        }
    }
}

/// Opens the local port like a serial program does (read/write, no controlling tty).
fn open_port(link: &Path) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(link)
        .unwrap_or_else(|e| panic!("opening {}: {e}", link.display()))
}

/// Reads one answer from the port within `timeout` (None when nothing whole arrives).
fn read_port_answer(port: &File, timeout: Duration) -> Option<Vec<u8>> {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 256];
    loop {
        if let Ok(n) = Answer::check(&buf) {
            assert_eq!(n, buf.len(), "more than one answer: {buf:02X?}");
            return Some(buf);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let mut fds = [PollFd::new(port.as_fd(), PollFlags::POLLIN)];
        let ms = PollTimeout::from(left.as_millis().min(10_000) as u16);
        if poll(&mut fds, ms).unwrap() == 0 {
            continue;
        }
        let n = (&*port).read(&mut chunk).unwrap();
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn ask_port(port: &File, req: &[u8]) -> Vec<u8> {
    (&*port).write_all(req).unwrap();
    read_port_answer(port, Duration::from_secs(3)).expect("an answer through the attached port")
}

/// A plain daemon serving an emulated AO4; returns it, the emulator and the relay port.
fn plain_daemon() -> (Daemon, Emulator, u16, tempfile::TempDir) {
    let links = tempfile::tempdir().unwrap();
    let module = links.path().join("module");
    let emu = Emulator::start(&module, "AO4", AO4);
    let d = Daemon::start(port_block(), Conf::new().device(&module, AO4), None);
    let port = d.wait_serving(AO4);
    (d, emu, port, links)
}

#[test]
fn a_program_opening_the_port_for_every_request_gets_every_answer() {
    let (d, _emu, port, links) = plain_daemon();
    let link = links.path().join("lio0");
    // SERIAL@HOST with the server's port numbering: GetId confirms the module.
    let a = Attach::start(&format!("{AO4}@127.0.0.1:{port}"), &link, &["--plain"]);
    a.wait_log("connected to", 1);
    let want = get_id_answer(AO4);
    // The LucidIoCtrl pattern: open, one request, read the answer, close; 100 times.
    for i in 0..100 {
        let p = open_port(&link);
        assert_eq!(ask_port(&p, &GET_ID), want, "round {i}");
        drop(p);
    }
    assert_eq!(
        a.log().matches("connected to").count(),
        1,
        "closing the port must not touch the TCP session"
    );
    assert_eq!(d.module(AO4).unwrap().clients, 1);
    a.stop();
    // A wrong serial for the port is refused with a message naming both.
    let other = links.path().join("lio1");
    let wrong = Attach::start(
        &format!("1100100100000001@127.0.0.1:{port}"),
        &other,
        &["--plain"],
    );
    wrong.wait_log("serves module", 1);
    assert!(
        wrong.log().contains("not 1100100100000001"),
        "{}",
        wrong.log()
    );
}

#[test]
fn the_port_survives_server_restarts_and_network_drops() {
    let (mut d, _emu, port, links) = plain_daemon();
    // A TCP proxy in the middle: cutting its sessions is a network drop for attach.
    let proxy = Proxy::start(port);
    let link = links.path().join("lio0");
    let a = Attach::start(
        &format!("127.0.0.1:{}", proxy.port),
        &link,
        &["--plain", "--hold-ms", "2000", "--retry-max-ms", "300"],
    );
    a.wait_log("connected to", 1);
    let pty = std::fs::read_link(&link).unwrap();
    let p = open_port(&link);
    let want = get_id_answer(AO4);
    assert_eq!(ask_port(&p, &GET_ID), want);

    // Network drop: the session is cut; the same open port works again after the reconnect.
    proxy.cut();
    a.wait_log("lost the connection", 1);
    a.wait_log("connected to", 2);
    assert_eq!(ask_port(&p, &GET_ID), want);
    assert_eq!(std::fs::read_link(&link).unwrap(), pty);
    drop(p);
    a.stop();

    // Server restarts (attached directly: a proxy would accept while the server is down).
    let a = Attach::start(
        &format!("127.0.0.1:{port}"),
        &link,
        &["--plain", "--hold-ms", "2000", "--retry-max-ms", "300"],
    );
    a.wait_log("connected to", 1);
    let pty = std::fs::read_link(&link).unwrap();
    let p = open_port(&link);
    assert_eq!(ask_port(&p, &GET_ID), want);

    // A request written while the server is down is held, then delivered in time.
    d.stop();
    a.wait_log("lost the connection", 1);
    (&p).write_all(&GET_IO_UV).unwrap();
    d.restart(None);
    let answer = read_port_answer(&p, Duration::from_secs(5)).expect("the held request's answer");
    assert_eq!(answer[..2], [0x00, 0x04], "{answer:02X?}");

    // Down longer than the hold time: the request is dropped (logged), never delivered late.
    d.stop();
    a.wait_log("lost the connection", 2);
    (&p).write_all(&GET_ID).unwrap();
    a.wait_log("dropped a request written while disconnected", 1);
    d.restart(None);
    a.wait_log("connected to", 3);
    assert_eq!(
        read_port_answer(&p, Duration::from_millis(500)),
        None,
        "a dropped request must not be answered late"
    );
    assert_eq!(ask_port(&p, &GET_ID), want, "no stale answer in between");

    assert_eq!(
        std::fs::read_link(&link).unwrap(),
        pty,
        "the link points to the same pty the whole time"
    );
    drop(p);
    a.stop();
}

#[test]
fn tls_with_a_client_certificate_and_a_clear_refusal_of_the_wrong_ca() {
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
    let certs = issue_client(&d, "laptop", &["--modules", AO4]);
    let link = links.path().join("lio0");
    let ca = certs.join("ca.crt");
    let pem = certs.join("laptop.pem");
    let a = Attach::start(
        &format!("127.0.0.1:{port}"),
        &link,
        &[
            "--ca",
            ca.to_str().unwrap(),
            "--cert",
            pem.to_str().unwrap(),
        ],
    );
    a.wait_log("connected to", 1);
    assert!(a.log().contains("(TLS)"), "{}", a.log());
    let p = open_port(&link);
    assert_eq!(ask_port(&p, &GET_ID), get_id_answer(AO4));
    let client = d.module(AO4).unwrap().client.unwrap_or_default();
    assert!(client.contains("laptop"), "{client}");
    drop(p);
    a.stop();

    // Another CA: refused, and the message says which file to fix.
    let other = links.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
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
    let wrong = Attach::start(
        &format!("127.0.0.1:{port}"),
        &links.path().join("lio1"),
        &[
            "--ca",
            other.join("ca.crt").to_str().unwrap(),
            "--cert",
            pem.to_str().unwrap(),
        ],
    );
    wrong.wait_log("not signed by the CA in", 1);
    assert!(wrong.log().contains("other/ca.crt"), "{}", wrong.log());
    assert!(wrong.log().contains("retrying in"), "{}", wrong.log());

    // A missing --ca is a start-up error that says what to pass.
    let out = Command::new(bin())
        .arg("attach")
        .arg(format!("127.0.0.1:{}", free_port()))
        .arg("--link")
        .arg(links.path().join("lio2"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ca") && err.contains("--plain"), "{err}");
}

/// The vendor's Python library, a real third-party client, through the attached port.
#[test]
fn pylucidio_reads_and_writes_the_module_through_the_attached_port() {
    let python = repo().join("target/test-venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run ./scripts/test-venv (./scripts/test does) to install pylucidio",
        python.display()
    );
    let (_d, _emu, port, links) = plain_daemon();
    let link = links.path().join("lio0");
    let a = Attach::start(&format!("127.0.0.1:{port}"), &link, &["--plain"]);
    a.wait_log("connected to", 1);
    let script = r#"
import sys
from lucidIo.LucidControlAO4 import LucidControlAO4
from lucidIo.Values import ValueVOS4
from lucidIo import IoReturn
for i in range(3):
    ao4 = LucidControlAO4(sys.argv[1])
    assert ao4.open() != False, "open failed"
    assert ao4.identify(0) == IoReturn.IoReturn.IO_RETURN_OK, "identify failed"
    v = ValueVOS4()
    v.setVoltage(1.25 + i)
    assert ao4.setIo(0, v) == IoReturn.IoReturn.IO_RETURN_OK, "setIo failed"
    r = ValueVOS4()
    assert ao4.getIo(0, r) == IoReturn.IoReturn.IO_RETURN_OK, "getIo failed"
    print(ao4.getDeviceSnr(), round(r.getVoltage(), 3))
    ao4.close()
"#;
    let out = Command::new("timeout")
        .arg("60")
        .arg(&python)
        .arg("-c")
        .arg(script)
        .arg(&link)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pylucidio failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    for (i, l) in lines.iter().enumerate() {
        let volts = format!("{}", 1.25 + i as f64);
        assert!(l.ends_with(&volts), "round {i}: {l}");
        // pylucidio prints the serial number part of the identity.
        assert!(l.starts_with(&format!("{}", 0xFA48_0000u32)), "{l}");
    }
    a.stop();
}

/// What the docs say about socat: it exits when the session drops and its link goes with it.
#[test]
fn socat_in_the_same_situation_exits_and_takes_the_link_away() {
    require_tool("socat");
    let (mut d, _emu, port, links) = plain_daemon();
    let link = links.path().join("socat-lio0");
    let mut socat = Command::new("socat")
        .arg(format!("pty,link={},raw,echo=0,ignoreof", link.display()))
        .arg(format!("tcp:127.0.0.1:{port}"))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_until("socat's link", || link.exists().then_some(()));
    let p = open_port(&link);
    assert_eq!(ask_port(&p, &GET_ID), get_id_answer(AO4));
    d.stop();
    let st = wait_until("socat to exit", || socat.try_wait().unwrap());
    assert!(st.code().is_some(), "socat exited by itself");
    assert!(
        std::fs::symlink_metadata(&link).is_err(),
        "socat removed its link"
    );
    d.restart(None);
    d.wait_serving(AO4);
    // The program's open port is dead: writes go nowhere, nothing answers.
    let _ = (&p).write_all(&GET_ID);
    assert_eq!(read_port_answer(&p, Duration::from_millis(500)), None);
}

/// A TCP proxy on loopback whose sessions the test can cut (a network drop).
struct Proxy {
    port: u16,
    sessions: Arc<Mutex<Vec<TcpStream>>>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let sessions: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (sessions.clone(), stop.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(c) = c else { continue };
                let Ok(u) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                s.lock().unwrap().push(c.try_clone().unwrap());
                s.lock().unwrap().push(u.try_clone().unwrap());
                for (mut from, mut to) in [(c.try_clone().unwrap(), u.try_clone().unwrap()), (u, c)]
                {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy {
            port,
            sessions,
            stop,
        }
    }

    /// Cuts every session (both sides see the connection end).
    fn cut(&self) {
        for s in self.sessions.lock().unwrap().drain(..) {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.cut();
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Discovery: the daemon announces its module by mDNS (on loopback only, so the test stays on
/// this machine); `lucidgate discover` (an mdns-sd browser) lists it with the right port and TXT,
/// `lucidgate attach SERIAL` finds it with no host or port given and verifies the server
/// certificate by the address it found; unplugging withdraws the announcement.
#[test]
fn a_serial_alone_is_found_by_mdns() {
    let links = tempfile::tempdir().unwrap();
    let module = links.path().join("module");
    let emu = Emulator::start(&module, "AO4", AO4);
    let d = Daemon::start(
        port_block(),
        Conf::new()
            .device(&module, AO4)
            .relay(r#"transport = "mtls""#)
            .table("discovery", "mdns = true")
            .table("discovery", r#"hostname = "lucidgate-test""#)
            .table("discovery", r#"interfaces = ["lo"]"#),
        None,
    );
    let port = d.wait_serving(AO4);
    let discover = |ms: &str| -> serde_json::Value {
        let out = Command::new(bin())
            .args([
                "discover",
                "--interface",
                "lo",
                "--json",
                "--timeout-ms",
                ms,
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let found = discover("4000");
    let m = found
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["serial"] == AO4)
        .unwrap_or_else(|| panic!("{AO4} not announced: {found}"));
    assert_eq!(m["port"], port, "{m}");
    assert_eq!(m["class"], "AO4", "{m}");
    assert_eq!(m["transport"], "mtls", "{m}");
    assert_eq!(m["host"], "lucidgate-test.local", "{m}");
    assert!(d.log().contains("event=\"mdns-announced\""));

    let certs = issue_client(&d, "finder", &["--modules", AO4]);
    let link = links.path().join("lio-mdns");
    let ca = certs.join("ca.crt");
    let pem = certs.join("finder.pem");
    let a = Attach::start(
        AO4,
        &link,
        &[
            "--ca",
            ca.to_str().unwrap(),
            "--cert",
            pem.to_str().unwrap(),
            "--mdns-interface",
            "lo",
        ],
    );
    a.wait_log("connected to", 1);
    let p = open_port(&link);
    assert_eq!(ask_port(&p, &GET_ID), get_id_answer(AO4));
    drop(p);
    a.stop();

    // Unplugged: the relay withdraws its service (goodbye packets).
    emu.kill();
    d.wait_absent(AO4);
    let found = discover("1500");
    assert!(
        !found.as_array().unwrap().iter().any(|f| f["serial"] == AO4),
        "still announced after unplug: {found}"
    );
}
