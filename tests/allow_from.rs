//! Address allow-lists (`allow_from`, relay-wide and per module) and per-module listen
//! addresses, end to end: real client sockets from chosen loopback source addresses (IPv4,
//! IPv6, and IPv4 peers seen as IPv4-mapped IPv6 on a dual-stack listener), a reload that
//! widens a list, and `config check` on malformed entries.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use common::*;
use socket2::{Domain, Socket, Type};

const AO4_B: &str = "11001001FA480001";
const AO4_C: &str = "11001001FA480002";

/// A TCP connection to `to` from the local address `from` (any loopback address works on
/// Linux: 127.0.0.0/8 is all local).
fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    s.bind(&SocketAddr::new(from, 0).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(3))?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(Duration::from_secs(3)))?;
    Ok(s)
}

/// GetId from `from` to `to`: the answer, or `None` when the connection was closed unanswered.
fn get_id_from(from: &str, to: SocketAddr) -> Option<Vec<u8>> {
    let mut s = connect_from(from.parse().unwrap(), to).expect("connect");
    if s.write_all(&GET_ID).is_err() {
        return None;
    }
    let answer = read_answer(&mut s).ok();
    if answer.is_none() {
        // Refused means closed, not left hanging: the read above ended before its timeout.
        let mut b = [0u8; 1];
        assert!(matches!(s.read(&mut b), Ok(0) | Err(_)));
    }
    answer
}

fn ipv6_loopback() -> bool {
    std::net::TcpListener::bind("[::1]:0").is_ok()
}

fn at(addr: &str, port: u16) -> SocketAddr {
    SocketAddr::new(addr.parse().unwrap(), port)
}

#[test]
fn allow_from_admits_and_refuses_exactly_as_configured() {
    let dir = tempfile::tempdir().unwrap();
    let (la, lb, lc) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    let _ea = Emulator::start(&la, "AO4", AO4);
    let _eb = Emulator::start(&lb, "AO4", AO4_B);
    let _ec = Emulator::start(&lc, "AO4", AO4_C);
    let v6 = ipv6_loopback();
    let conf = |a_allow: &str| {
        Conf::new()
            .device(&la, AO4)
            .device(&lb, AO4_B)
            .device(&lc, AO4_C)
            // Relay-wide: 127.0.0.0/30 (127.0.0.1..3) and ::1.
            .relay("transport = \"plain\"\nallow_from = [\"127.0.0.0/30\", \"::1\"]")
            // A: its own list (one address), on IPv4 and IPv6 loopback.
            .module(
                AO4,
                format!("allow_from = {a_allow}\nlisten = [\"127.0.0.1\", \"::1\"]"),
            )
            // B: the relay-wide list, on a dual-stack socket bound to an IPv4-mapped address:
            // its IPv4 peers arrive as ::ffff:127.0.0.x and are matched as IPv4.
            .module(AO4_B, "listen = [\"::ffff:127.0.0.1\"]")
    };
    let d = Daemon::start(
        port_block(),
        // C: bound to 127.0.0.2 only (the top-level listen is 127.0.0.1).
        conf("[\"127.0.0.1\", \"::1\"]").module(AO4_C, "listen = [\"127.0.0.2\"]"),
        None,
    );
    let (pa, pb, pc) = (
        d.wait_serving(AO4),
        d.wait_serving(AO4_B),
        d.wait_serving(AO4_C),
    );

    // A: 127.0.0.1 and ::1 in, 127.0.0.2 out (it is in the relay-wide list, which A replaces).
    assert_eq!(
        get_id_from("127.0.0.1", at("127.0.0.1", pa)),
        Some(get_id_answer(AO4))
    );
    assert_eq!(get_id_from("127.0.0.2", at("127.0.0.1", pa)), None);
    if v6 {
        assert_eq!(get_id_from("::1", at("::1", pa)), Some(get_id_answer(AO4)));
    } else {
        eprintln!("no IPv6 loopback here: the ::1 checks are skipped");
    }
    // A real plain-TCP client (socat) from an admitted address.
    assert_eq!(socat_exchange(pa, &GET_ID), get_id_answer(AO4));
    wait_until("A's refusal counted", || {
        (d.module(AO4).unwrap().refused_address == 1).then_some(())
    });
    assert!(d.log().contains("127.0.0.2"), "{}", d.log());
    assert!(d.log().contains("not in allow_from"), "{}", d.log());

    // B: mapped peers matched as IPv4 against the relay-wide 127.0.0.0/30.
    assert_eq!(
        get_id_from("127.0.0.3", at("127.0.0.1", pb)),
        Some(get_id_answer(AO4_B))
    );
    assert_eq!(get_id_from("127.0.0.4", at("127.0.0.1", pb)), None);
    assert_eq!(get_id_from("127.0.0.9", at("127.0.0.1", pb)), None);
    wait_until("B's refusals counted", || {
        (d.module(AO4_B).unwrap().refused_address == 2).then_some(())
    });
    assert!(d.log().contains("127.0.0.4"), "{}", d.log());
    // The other counters are not touched by an address refusal.
    assert_eq!(d.module(AO4_B).unwrap().refused, 0);

    // C: listens on 127.0.0.2 only; 127.0.0.1 has nothing on that port.
    assert_eq!(
        get_id_from("127.0.0.2", at("127.0.0.2", pc)),
        Some(get_id_answer(AO4_C))
    );
    let e = connect_from("127.0.0.1".parse().unwrap(), at("127.0.0.1", pc)).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");

    // A reload that widens A's list takes effect (the list is part of the relay's spec).
    d.rewrite_config(
        conf("[\"127.0.0.1\", \"127.0.0.2\"]").module(AO4_C, "listen = [\"127.0.0.2\"]"),
    );
    let out = d.cli(&["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pa = d.wait_serving(AO4);
    wait_until("127.0.0.2 admitted to A after the reload", || {
        get_id_from("127.0.0.2", at("127.0.0.1", pa)).filter(|a| *a == get_id_answer(AO4))
    });
    assert_eq!(get_id_from("127.0.0.3", at("127.0.0.1", pa)), None);

    // The counter is exported.
    let metrics = d.cli(&["status", "--json"]);
    assert!(String::from_utf8_lossy(&metrics.stdout).contains("\"refused_address\""));
}

#[test]
fn config_check_names_the_line_and_field_of_a_bad_allow_from() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("lucidgate.toml");
    let check = |text: &str| {
        std::fs::write(&cfg, text).unwrap();
        let out = Command::new(bin())
            .args(["-c", cfg.to_str().unwrap(), "config", "check"])
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = check(
        "[relay]\ntransport = \"plain\"\nallow_from = [\"10.0.0.0/8\", \"192.168.1.0/33\"]\n",
    );
    assert_eq!(code, Some(2), "{err}");
    for want in [
        "lucidgate.toml",
        "line 3",
        "relay.allow_from",
        "192.168.1.0/33",
        "neither an address nor a network",
    ] {
        assert!(err.contains(want), "{want} missing in: {err}");
    }
    let (code, err) = check(&format!(
        "[modules.\"{AO4}\"]\nport = 4300\n\nallow_from = []\n"
    ));
    assert_eq!(code, Some(2), "{err}");
    for want in ["line 4", "allow_from", "admits no client"] {
        assert!(err.contains(want), "{want} missing in: {err}");
    }
    let (code, err) = check(&format!("[modules.\"{AO4}\"]\nlisten = []\n"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("line 2") && err.contains("listen"), "{err}");
    let (code, err) = check(&format!("[modules.\"{AO4}\"]\nlisten = [\"lan\"]\n"));
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("line 2"), "{err}");
    // Good entries pass.
    let (code, err) = check("[relay]\nallow_from = [\"10.1.2.3/8\", \"::1\"]\n");
    assert_eq!(code, Some(0), "{err}");
}
