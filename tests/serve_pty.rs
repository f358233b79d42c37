//! `lucidgate serve` with modules on ptys (`lucidgate emulate` + `[[device]]`): the unplug paths
//! umockdev cannot simulate (a hang-up mid-session), client policies, shutdown.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

#[test]
fn unplug_mid_session_ends_the_client_and_replug_serves_the_same_port() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("lio0");
    let emu = Emulator::start(&link, "AO4", AO4);
    let base = port_block();
    let d = Daemon::start(base, Conf::new().device(&link, AO4), None);
    let port = d.wait_serving(AO4);
    assert_eq!(port, base + 216);
    assert_eq!(d.module(AO4).unwrap().serial_source, "config");

    let mut c = connect(port);
    assert_eq!(ask(&mut c, &GET_ID), get_id_answer(AO4));
    // Half a request is in flight when the module vanishes.
    c.write_all(&GET_IO_UV[..2]).unwrap();
    emu.kill();
    let mut buf = [0u8; 16];
    let t0 = Instant::now();
    let r = c.read(&mut buf);
    assert!(matches!(r, Ok(0)), "client should see EOF, got {r:?}");
    assert!(t0.elapsed() < Duration::from_secs(2));
    d.wait_absent(AO4);

    // The daemon is fine and serves the module again on the same port when it comes back.
    let _emu = Emulator::start(&link, "AO4", AO4);
    assert_eq!(d.wait_serving(AO4), port);
    let mut c = connect(port);
    assert_eq!(ask(&mut c, &GET_IO_UV), vec![0x00, 0x04, 0, 0, 0, 0]);
    assert!(
        d.log().contains("device-lost") || d.log().contains("gone"),
        "{}",
        d.log()
    );
}

#[test]
fn exclusive_policy_refuses_a_second_client_until_the_first_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("lio0");
    let _emu = Emulator::start(&link, "AO4", AO4);
    let d = Daemon::start(port_block(), Conf::new().device(&link, AO4), None);
    let port = d.wait_serving(AO4);
    let mut first = connect(port);
    assert_eq!(ask(&mut first, &GET_ID), get_id_answer(AO4));
    let m = d.module(AO4).unwrap();
    assert_eq!(m.clients, 1);
    assert!(m.client.unwrap().starts_with("127.0.0.1:"));

    let mut second = connect(port);
    second.write_all(&GET_ID).unwrap();
    let mut buf = [0u8; 32];
    assert!(
        matches!(second.read(&mut buf), Ok(0) | Err(_)),
        "second client refused"
    );
    // The first client is undisturbed.
    assert_eq!(ask(&mut first, &GET_ID), get_id_answer(AO4));
    wait_until("refusal logged", || {
        d.log().contains("client-refused").then_some(())
    });
    assert!(d.log().contains("in use by 127.0.0.1:"), "{}", d.log());
    assert_eq!(d.module(AO4).unwrap().refused, 1);

    drop(first);
    wait_until("first client gone", || {
        (d.module(AO4).unwrap().clients == 0).then_some(())
    });
    let mut third = connect(port);
    assert_eq!(ask(&mut third, &GET_ID), get_id_answer(AO4));
}

#[test]
fn kick_old_policy_lets_the_newest_client_win() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("lio0");
    let _emu = Emulator::start(&link, "AO4", AO4);
    let extra = Conf::new()
        .device(&link, AO4)
        .module(AO4, r#"policy = "kick-old""#);
    let d = Daemon::start(port_block(), extra, None);
    let port = d.wait_serving(AO4);
    let mut old = connect(port);
    assert_eq!(ask(&mut old, &GET_ID), get_id_answer(AO4));
    let mut new = connect(port);
    assert_eq!(ask(&mut new, &GET_ID), get_id_answer(AO4));
    let mut buf = [0u8; 8];
    assert!(
        matches!(old.read(&mut buf), Ok(0) | Err(_)),
        "old client kicked"
    );
    assert_eq!(ask(&mut new, &GET_IO_UV)[..2], [0x00, 0x04]);
}

#[test]
fn scripted_clients_that_half_close_get_their_answers_back_to_back() {
    // `printf … | socat - TCP:…` half-closes right after sending: the answer must still arrive,
    // and the next scripted call must not be refused while the previous one lingers.
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("lio0");
    let _emu = Emulator::start(&link, "AI4", "01001001FA480001");
    let d = Daemon::start(
        port_block(),
        Conf::new().device(&link, "01001001FA480001"),
        None,
    );
    let port = d.wait_serving("01001001FA480001");
    for _ in 0..3 {
        assert_eq!(
            socat_exchange(port, &GET_IO_UV),
            vec![0x00, 0x04, 0x5E, 0xCC, 0x1A, 0x00],
            "the protocol doc's GetIo example"
        );
    }
}

#[test]
fn sigterm_closes_clients_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("lio0");
    let _emu = Emulator::start(&link, "AO4", AO4);
    let mut d = Daemon::start(port_block(), Conf::new().device(&link, AO4), None);
    let port = d.wait_serving(AO4);
    let mut c = connect(port);
    assert_eq!(ask(&mut c, &GET_ID), get_id_answer(AO4));
    let sock = d.dir.path().join("control.sock");
    assert!(sock.exists());
    let st = d.stop();
    assert!(st.success(), "exit status {st}");
    let mut buf = [0u8; 8];
    assert!(matches!(c.read(&mut buf), Ok(0) | Err(_)));
    assert!(!sock.exists(), "control socket removed on exit");
    assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
    // The emulator's port was released: it can be opened again at once.
    d.restart(None);
    assert_eq!(d.wait_serving(AO4), port);
}

#[test]
fn a_silent_module_does_not_hang_the_daemon_or_other_modules() {
    let dir = tempfile::tempdir().unwrap();
    let (l1, l2) = (dir.path().join("lio0"), dir.path().join("lio1"));
    let _hung = Emulator::start_with(&l1, "AO4", AO4, &["--silent"]);
    let _ok = Emulator::start(&l2, "AO4", "11001001FA480001");
    let extra = Conf::new().device(&l1, AO4).device(&l2, "11001001FA480001");
    let d = Daemon::start(port_block(), extra, None);
    let (p1, p2) = (d.wait_serving(AO4), d.wait_serving("11001001FA480001"));
    let mut c1 = connect(p1);
    c1.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    c1.write_all(&GET_ID).unwrap();
    assert!(
        read_answer(&mut c1).is_err(),
        "no answer from a hung module"
    );
    let mut c2 = connect(p2);
    let t0 = Instant::now();
    for _ in 0..100 {
        assert_eq!(ask(&mut c2, &GET_IO_UV)[..2], [0x00, 0x04]);
    }
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(d.status().modules.len(), 2);
}

#[test]
fn disabled_module_is_listed_but_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("lio0");
    let _emu = Emulator::start(&link, "AO4", AO4);
    let extra = Conf::new()
        .device(&link, AO4)
        .module(AO4, "enabled = false");
    let d = Daemon::start(port_block(), extra, None);
    let m = wait_until("module listed", || d.module(AO4));
    assert_eq!(m.state, "disabled");
    assert!(m.port.is_none());
}

#[test]
fn fixed_port_override_and_busy_port_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("lio0");
    let _emu = Emulator::start(&link, "AO4", AO4);
    // Another program holds the fixed port (one of the daemon's own range).
    let base = port_block();
    let fixed = base + 1;
    let blocker = std::net::TcpListener::bind(("127.0.0.1", fixed)).unwrap();
    let extra = Conf::new()
        .device(&link, AO4)
        .module(AO4, format!("port = {fixed}"));
    let d = Daemon::start(base, extra, None);
    let m = wait_until("failure reported", || {
        d.module(AO4).filter(|m| m.state == "failed")
    });
    let err = m.error.unwrap();
    assert!(
        err.contains(&fixed.to_string()) && err.contains("busy"),
        "{err}"
    );
    // Freed: the retry picks it up.
    drop(blocker);
    assert_eq!(d.wait_serving(AO4), fixed);
    assert_eq!(d.module(AO4).unwrap().port_source.as_deref(), Some("fixed"));
}

/// GetId at relay start: class, type, firmware, hardware and serial in status and the journal
/// fields; a module whose GetId serial disagrees, or that does not answer, is reported and served.
#[test]
fn modules_are_identified_and_problems_reported_but_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let di4 = lucidgate::emulator::default_serial(0x0000);
    let links: Vec<_> = (0..4).map(|i| dir.path().join(format!("m{i}"))).collect();
    let _ao4 = Emulator::start(&links[0], "AO4", AO4);
    let _di4 = Emulator::start(&links[1], "DI4", &di4);
    // Says it is ...FA480002 over GetId, but the config names it ...FA480009.
    let _liar = Emulator::start(&links[2], "AO4", "11001001FA480002");
    let _silent = Emulator::start_with(&links[3], "AO4", "11001001FA480003", &["--silent"]);
    let extra = Conf::new()
        .device(&links[0], AO4)
        .device(&links[1], &di4)
        .device(&links[2], "11001001FA480009")
        .device(&links[3], "11001001FA480003");
    let d = Daemon::start(port_block(), extra, None);
    let settled = |serial: &str| {
        wait_until(&format!("{serial} identified"), || {
            d.module(serial)
                .filter(|m| m.identity_state != "pending" && m.state == "serving")
        })
    };
    let m = settled(AO4);
    assert_eq!(m.identity_state, "ok", "{m:?}");
    let id = m.identity.as_ref().expect("GetId's answer in status");
    assert_eq!(id.class, "AO4");
    assert_eq!(id.serial, AO4);
    assert_eq!(id.type_id, 0x1001);
    // The field names scripts rely on, on the raw JSON.
    assert_status_wire_form(&d, AO4);
    let m = settled(&di4);
    assert_eq!(
        m.identity.as_ref().map(|id| id.class.as_str()),
        Some("DI4"),
        "{m:?}"
    );
    let m = settled("11001001FA480009");
    assert_eq!(m.identity_state, "mismatch", "{m:?}");
    assert!(
        m.identity_error
            .as_deref()
            .unwrap()
            .contains("11001001FA480002"),
        "{m:?}"
    );
    let m = settled("11001001FA480003");
    assert_eq!(m.identity_state, "failed", "{m:?}");
    assert!(
        m.identity_error.as_deref().unwrap().contains("no answer"),
        "{m:?}"
    );
    // Served anyway, and the identification left nothing behind for the first client.
    let mut c = connect(d.wait_serving(AO4));
    assert_eq!(ask(&mut c, &GET_ID), get_id_answer(AO4));
    let mut c = connect(d.wait_serving("11001001FA480009"));
    assert_eq!(ask(&mut c, &GET_ID), get_id_answer("11001001FA480002"));
    let log = d.log();
    assert!(
        log.contains("event=\"identified\"") && log.contains("module_class=AO4"),
        "{log}"
    );
    assert!(log.contains("event=\"identity-mismatch\""), "{log}");
    assert!(log.contains("event=\"identity-failed\""), "{log}");
}

/// The wire form of `status --json` that scripts read (README, docs/protocol-aware.md), checked
/// on the raw JSON on purpose: every other test reads the typed report, which would follow a
/// renamed field. The names are those the tests read through the typed report; `serial` must
/// be served (so its identity and metrics are there).
fn assert_status_wire_form(d: &Daemon, serial: &str) {
    let json: serde_json::Value =
        serde_json::from_str(&d.try_status_json().expect("status answers")).unwrap();
    assert!(json["tasks"].as_u64().is_some(), "{json}");
    let raw = json["modules"]
        .as_array()
        .and_then(|ms| ms.iter().find(|m| m["serial"] == serial))
        .unwrap_or_else(|| panic!("no {serial} in {json}"));
    for key in [
        "serial",
        "serial_source",
        "model",
        "devnode",
        "port",
        "port_source",
        "transport",
        "policy",
        "clients",
        "client",
        "state",
        "error",
        "refused",
        "bytes_up",
        "identity_state",
        "identity_error",
    ] {
        assert!(raw.get(key).is_some(), "no {key} in {raw}");
    }
    assert!(raw["port"].as_u64().is_some(), "{raw}");
    for key in ["class", "serial", "type_id"] {
        assert!(
            raw["identity"].get(key).is_some(),
            "no identity.{key} in {raw}"
        );
    }
    assert!(raw["identity"]["firmware"].as_u64().is_some(), "{raw}");
    for key in [
        "requests",
        "answers_ok",
        "bad_frames",
        "timeouts",
        "denied_writes",
    ] {
        assert!(
            raw["metrics"].get(key).is_some(),
            "no metrics.{key} in {raw}"
        );
    }
}

/// A module that does not answer GetId when its relay starts (still starting up) is asked
/// again while no client uses it, under the raw and the shared policy alike: status moves from
/// `failed` to `ok` without a replug.
#[test]
fn a_module_silent_at_plug_is_identified_by_a_retry() {
    let dir = tempfile::tempdir().unwrap();
    let (l1, l2) = (dir.path().join("lio0"), dir.path().join("lio1"));
    let shared = "11001001FA480001";
    let _late = Emulator::start_with(&l1, "AO4", AO4, &["--ignore-first", "1"]);
    let _late_shared = Emulator::start_with(&l2, "AO4", shared, &["--ignore-first", "1"]);
    let extra = Conf::new()
        .device(&l1, AO4)
        .device(&l2, shared)
        .module(shared, r#"policy = "shared""#)
        .limits("answer_timeout_ms = 300");
    let d = Daemon::start(port_block(), extra, None);
    for serial in [AO4, shared] {
        let m = wait_until(&format!("{serial}: first GetId failed"), || {
            d.module(serial).filter(|m| m.identity_state == "failed")
        });
        assert!(
            m.identity_error.as_deref().unwrap().contains("no answer"),
            "{m:?}"
        );
    }
    for serial in [AO4, shared] {
        let m = wait_until(&format!("{serial}: identified by a retry"), || {
            d.module(serial).filter(|m| m.identity_state == "ok")
        });
        assert_eq!(
            m.identity.as_ref().map(|id| id.serial.as_str()),
            Some(serial),
            "{m:?}"
        );
        // The retry is lucidgate's own: not a client request.
        assert_eq!(m.metrics.as_ref().map(|x| x.requests), Some(0), "{m:?}");
    }
    assert!(d.log().contains("at GetId try 2"), "{}", d.log());
    // And the retries left nothing behind for a client.
    let mut c = connect(d.wait_serving(AO4));
    assert_eq!(ask(&mut c, &GET_ID), get_id_answer(AO4));
    let mut c = connect(d.wait_serving(shared));
    assert_eq!(ask(&mut c, &GET_ID), get_id_answer(shared));
}

/// A client that leaves before its (slow) answer comes: the answer is dropped when it comes,
/// however late within the answer timeout, and the next client's first answer is its own.
/// (Found by hand on a real module: a settle that only waited for 100 ms of quiet let an
/// answer that took longer reach the next client as the answer to its request.)
#[test]
fn a_departed_clients_slow_answer_never_reaches_the_next_client() {
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("lio0");
    let _slow = Emulator::start_with(&link, "AO4", AO4, &["--answer-delay-ms", "400"]);
    let d = Daemon::start(port_block(), Conf::new().device(&link, AO4), None);
    let port = d.wait_serving(AO4);
    wait_until("identified", || {
        d.module(AO4).filter(|m| m.identity_state == "ok")
    });
    for round in 0..3 {
        let mut gone = connect(port);
        gone.write_all(&GET_IO_UV).unwrap();
        drop(gone);
        // The relay sees the close (exclusive policy: a client still connected would hold the
        // module); the answer is still on its way.
        std::thread::sleep(Duration::from_millis(50));
        let mut next = connect(port);
        next.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(
            ask(&mut next, &GET_ID),
            get_id_answer(AO4),
            "round {round}: the next client got the departed client's answer"
        );
    }
    assert!(d.log().contains("event=\"answers-dropped\""), "{}", d.log());
}
