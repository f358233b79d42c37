//! The command line without a daemon: config check, port, status errors, emulate.

mod common;

use std::process::Command;

use common::*;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}

#[test]
fn config_check_prints_defaults_without_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("lucidgate.toml");
    std::fs::write(&cfg, "").unwrap();
    let out = run(&["-c", cfg.to_str().unwrap(), "config", "check"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for want in [
        "base = 4000",
        "span = 1000",
        "state_dir = \"/var/lib/lucidgate\"",
        "policy = \"exclusive\"",
    ] {
        assert!(text.contains(want), "{want} missing in:\n{text}");
    }
}

#[test]
fn config_errors_name_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "listen = [\"127.0.0.1\"]\n\n[ports]\nbase = 70000\n").unwrap();
    let out = run(&["-c", cfg.to_str().unwrap(), "config", "check"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("bad.toml") && err.contains("line 4") && err.contains("ports.base"),
        "{err}"
    );
    assert!(!err.contains("panicked"));

    let missing = dir.path().join("nope.toml");
    let out = run(&["-c", missing.to_str().unwrap(), "serve"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("nope.toml") && err.contains("--config"),
        "{err}"
    );
}

#[test]
fn port_prints_the_rule_and_honours_overrides() {
    let out = run(&["port", AO4]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4216");
    assert!(String::from_utf8_lossy(&out.stderr).contains("derived"));

    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, format!("[modules.\"{AO4}\"]\nport = 4001\n")).unwrap();
    let out = run(&["-c", cfg.to_str().unwrap(), "port", AO4]);
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "4001");

    let out = run(&["port", "../etc"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("serial"));
}

#[test]
fn status_without_a_daemon_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("none.sock");
    let out = run(&["status", "--socket", sock.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("not running") && err.contains("none.sock"),
        "{err}"
    );
}

#[test]
fn emulate_serves_a_module_on_its_link() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("emu");
    let emu = Emulator::start(&link, "DI4", "00001001000000AA");
    // Talk to it as a serial client would: open the link, raw bytes.
    let mut port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&link)
        .unwrap();
    use std::io::{Read, Write};
    port.write_all(&GET_ID).unwrap();
    let mut buf = [0u8; 18];
    port.read_exact(&mut buf).unwrap();
    assert_eq!(buf.to_vec(), get_id_answer("00001001000000AA"));
    drop(port);
    assert!(emu.stop().success());
    assert!(!link.exists(), "link removed on exit");

    let out = run(&["emulate", "--class", "XX9"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown module class"));
    let out = run(&["emulate", "--class", "AO4", "--serial", "00001001000000AA"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("class"));
}

/// `emulate --fd` on a real tty that starts cooked (as a USB gadget's /dev/ttyGS0 does): the
/// emulator puts it in raw mode, or the line discipline would hold the request back until a
/// newline and echo it to the host.
#[test]
fn emulate_fd_puts_a_cooked_tty_in_raw_mode() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let pair = nix::pty::openpty(None, None).unwrap();
    let attrs = nix::sys::termios::tcgetattr(&pair.slave).unwrap();
    assert!(
        attrs
            .local_flags
            .contains(nix::sys::termios::LocalFlags::ICANON | nix::sys::termios::LocalFlags::ECHO),
        "a new pty starts cooked"
    );
    let slave = pair.slave.as_raw_fd();
    let mut cmd = Command::new(bin());
    cmd.args(["emulate", "--class", "AO4", "--serial", AO4, "--fd", "3"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    // SAFETY: dup2 is async-signal-safe; it runs in the child between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(slave, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    // Bytes written before the emulator has set the mode would be echoed by the cooked line
    // discipline: wait until the tty is raw (it never is if `--fd` leaves it cooked).
    let cooked = nix::sys::termios::LocalFlags::ICANON | nix::sys::termios::LocalFlags::ECHO;
    let start = std::time::Instant::now();
    let raw = loop {
        let a = nix::sys::termios::tcgetattr(&pair.slave).unwrap();
        if !a.local_flags.intersects(cooked) {
            break true;
        }
        if start.elapsed() > PATIENCE {
            break false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    drop(pair.slave);
    if !raw {
        let _ = child.kill();
        let _ = child.wait();
        panic!("emulate --fd left the tty cooked (ICANON or ECHO still set)");
    }
    let mut host = std::fs::File::from(pair.master);
    host.write_all(&GET_ID).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let mut reader = host.try_clone().unwrap();
    std::thread::spawn(move || {
        let _ = tx.send(read_answer(&mut reader));
    });
    let answer = rx.recv_timeout(PATIENCE);
    let _ = child.kill();
    let _ = child.wait();
    let answer = answer
        .expect("no answer: the request is stuck in a cooked line discipline")
        .unwrap();
    assert_eq!(answer, get_id_answer(AO4), "echoed or translated bytes");
}

#[test]
fn emulate_listen_serves_a_module_on_a_tcp_port() {
    use std::io::{BufRead, BufReader};
    let mut child = Command::new(bin())
        .args(["emulate", "--class", "AO4", "--listen", "127.0.0.1:0"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr: std::net::SocketAddr = line.trim().parse().expect("the address on stdout");
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .unwrap();
    assert_eq!(ask(&mut s, &GET_ID), get_id_answer(AO4));
    assert_eq!(ask(&mut s, &GET_IO_UV)[..2], [0x00, 0x04]);
    drop(s);
    // A second client after the first left: the module's one line is free again.
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(3)))
        .unwrap();
    assert_eq!(ask(&mut s, &GET_ID), get_id_answer(AO4));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(child.wait().unwrap().success());
    let mut rest = String::new();
    out.read_line(&mut rest).unwrap();
    assert_eq!(rest.trim(), "requests 3 writes 0");
}
