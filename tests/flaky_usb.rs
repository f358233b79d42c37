//! Flaky USB: modules plugged and unplugged hundreds of times (umockdev + ptys), several at
//! once, unplugged while a client is mid-request or writing; a module whose writes fail
//! (EIO once its pty is gone). No panic, nothing leaked (fds, threads, runtime tasks), ports
//! stable.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

/// Modules plugged and unplugged together each round.
const SERIALS: [&str; 3] = ["11001001FA480000", "11001001FA480001", "11001001FA480002"];
const ROUNDS: u32 = 100;

#[test]
fn hundreds_of_plug_cycles_of_several_modules_leak_nothing_and_keep_their_ports() {
    let mut bed = Umockdev::start();
    let base = port_block();
    let d = Daemon::start(base, "", Some(&bed));
    // Round 0 warms up (lazily created runtime threads) and learns the ports.
    let mut idx = 0u32;
    let mut plug_all = |bed: &mut Umockdev| -> Vec<String> {
        SERIALS
            .iter()
            .map(|s| {
                idx += 1;
                bed.add_module(idx, s)
            })
            .collect()
    };
    let sys = plug_all(&mut bed);
    let ports: Vec<u16> = SERIALS.iter().map(|s| d.wait_serving(s)).collect();
    assert_eq!(ports, [base + 216, base + 217, base + 218]);
    for s in &sys {
        bed.remove(s);
    }
    for s in SERIALS {
        d.wait_absent(s);
    }
    std::thread::sleep(Duration::from_millis(100));
    let (fds, threads, tasks) = (d.fd_count(), d.thread_count(), d.task_count());

    let t0 = Instant::now();
    let mut mid_request = 0;
    for round in 1..=ROUNDS {
        let sys = plug_all(&mut bed);
        for (s, port) in SERIALS.iter().zip(&ports) {
            assert_eq!(d.wait_serving(s), *port, "round {round}: {s} moved");
        }
        let k = round as usize % SERIALS.len();
        let mut c = connect(ports[k]);
        assert_eq!(ask(&mut c, &GET_IO_UV)[..2], [0x00, 0x04], "round {round}");
        if round % 5 == 0 {
            // Half a request is on its way when all three go at once.
            c.write_all(&GET_IO_UV[..2]).unwrap();
            mid_request += 1;
        }
        for s in &sys {
            bed.remove(s);
        }
        // The client of an unplugged module sees its connection end, soon.
        let mut b = [0u8; 16];
        let t = Instant::now();
        let r = c.read(&mut b);
        assert!(
            matches!(r, Ok(0)) || r.is_err() && t.elapsed() < Duration::from_secs(2),
            "round {round}: the client got {r:?}"
        );
        for s in SERIALS {
            d.wait_absent(s);
        }
    }
    let took = t0.elapsed();
    std::thread::sleep(Duration::from_millis(100));
    let (fds2, threads2, tasks2) = (d.fd_count(), d.thread_count(), d.task_count());
    println!(
        "{} plug/unplug cycles ({ROUNDS} rounds of {} modules at once, {mid_request} mid-request) in {took:?}; fds {fds} -> {fds2}, threads {threads} -> {threads2}, tasks {tasks} -> {tasks2}",
        ROUNDS as usize * SERIALS.len(),
        SERIALS.len()
    );
    assert!(fds2 <= fds, "fds grew: {fds} -> {fds2}");
    assert!(
        threads2 <= threads + 2,
        "threads grew: {threads} -> {threads2}"
    );
    assert!(tasks2 <= tasks, "runtime tasks grew: {tasks} -> {tasks2}");
    assert!(!d.log().contains("panicked"), "{}", d.log());
    // The registry kept one port per module throughout.
    let registry = std::fs::read_to_string(d.dir.path().join("state/ports.toml")).unwrap();
    for (s, p) in SERIALS.iter().zip(&ports) {
        assert!(registry.contains(&format!("{s} = {p}")), "{registry}");
    }
}

#[test]
fn a_module_that_vanishes_while_a_client_streams_writes_fails_cleanly() {
    // EIO on write: the pty master is gone while the relay is writing requests to it.
    let dir = tempfile::tempdir().unwrap();
    let link = dir.path().join("lio0");
    let emu = Emulator::start(&link, "AO4", AO4);
    let d = Daemon::start(port_block(), Conf::new().device(&link, AO4), None);
    let port = d.wait_serving(AO4);
    let fds = d.fd_count();
    let mut c = connect(port);
    assert_eq!(ask(&mut c, &GET_ID), get_id_answer(AO4));
    let mut w = c.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let burst = GET_IO_UV.repeat(64);
        let mut sent = 0usize;
        w.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        while w.write_all(&burst).is_ok() {
            sent += burst.len();
        }
        sent
    });
    let reader = std::thread::spawn(move || {
        let mut b = [0u8; 4096];
        let mut got = 0usize;
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        loop {
            match c.read(&mut b) {
                Ok(0) => return (got, true),
                Ok(n) => got += n,
                Err(_) => return (got, false),
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    emu.kill();
    let (got, eof) = reader.join().unwrap();
    let sent = writer.join().unwrap();
    println!("streaming client: {sent} bytes sent, {got} bytes of answers, then EOF: {eof}");
    assert!(
        eof,
        "the client's connection did not end when the module vanished"
    );
    assert!(got > 0);
    d.wait_absent(AO4);
    let log = d.log();
    assert!(log.contains("device-lost") || log.contains("gone"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    // Back on the same port, nothing kept from the broken session.
    let _emu = Emulator::start(&link, "AO4", AO4);
    assert_eq!(d.wait_serving(AO4), port);
    let mut c = connect(port);
    assert_eq!(ask(&mut c, &GET_ID), get_id_answer(AO4));
    drop(c);
    wait_until("fds back to where they were", || {
        (d.fd_count() <= fds).then_some(())
    });
}

#[test]
fn a_device_that_floods_bytes_is_drained_or_held_back_within_the_memory_bound() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    const FLOODER: &str = "11001001FA4800C8";
    let dir = tempfile::tempdir().unwrap();
    let mut pty = lucidgate::pty::Pty::open().unwrap();
    pty.link(&dir.path().join("flood")).unwrap();
    let good = dir.path().join("good");
    let _emu = Emulator::start(&good, "AO4", AO4);
    let d = Daemon::start(
        port_block(),
        Conf::new()
            .device(&dir.path().join("flood"), FLOODER)
            .device(&good, AO4),
        None,
    );
    let (pf, pg) = (d.wait_serving(FLOODER), d.wait_serving(AO4));
    let (rss0, _) = d.memory_kib();

    // The device sends without pause from now on.
    let sent = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut master = std::fs::File::from(pty.master.try_clone().unwrap());
    let writer = {
        let (sent, stop) = (sent.clone(), stop.clone());
        std::thread::spawn(move || {
            let chunk = [0x55u8; 16 * 1024];
            while !stop.load(Ordering::Relaxed) {
                match master.write(&chunk) {
                    Ok(n) => {
                        sent.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(_) => break,
                }
            }
        })
    };
    let round_trips = |what: &str| {
        let mut c = connect(pg);
        let t = Instant::now();
        for _ in 0..200 {
            assert_eq!(ask(&mut c, &GET_ID), get_id_answer(AO4), "{what}");
        }
        t.elapsed() / 200
    };
    // No client: the relay drains it, and the other module is served as before.
    let rt = round_trips("no client of the flooder");
    std::thread::sleep(Duration::from_secs(1));
    let drained = sent.load(Ordering::Relaxed);
    assert!(drained > 1_000_000, "only {drained} bytes drained");
    // A client that does not read: the flood is held back in the pty, nothing grows.
    let mut c = connect(pf);
    std::thread::sleep(Duration::from_millis(500));
    let a = sent.load(Ordering::Relaxed);
    let rt2 = round_trips("a client of the flooder that does not read");
    std::thread::sleep(Duration::from_millis(500));
    let b = sent.load(Ordering::Relaxed);
    let (rss, hwm) = d.memory_kib();
    println!(
        "device flood: {drained} bytes drained with no client; held back with a client that does not read ({} bytes in 0.5 s); other module's round trip {rt:?} then {rt2:?}; memory {rss0} -> {rss} KiB (peak {hwm})",
        b - a
    );
    assert!(
        b - a < 64 * 1024,
        "{} bytes taken from the device while its client did not read",
        b - a
    );
    assert!(hwm < 64 * 1024, "peak {hwm} KiB");
    // The client reads: it gets the flood, as fast as it reads, and the other module is
    // still served without delay.
    let reading = Arc::new(AtomicBool::new(true));
    let reader = {
        let reading = reading.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 65536];
            let mut got = 0u64;
            c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            while reading.load(Ordering::Relaxed) {
                let n = c.read(&mut buf).unwrap();
                assert!(n > 0 && buf[..n].iter().all(|&x| x == 0x55));
                got += n as u64;
            }
            got
        })
    };
    let rt3 = round_trips("a client of the flooder that reads");
    reading.store(false, Ordering::Relaxed);
    let got = reader.join().unwrap();
    println!(
        "device flood: a reading client got {got} bytes; other module's round trip meanwhile {rt3:?}"
    );
    for (what, t) in [("drained", rt), ("relayed", rt3)] {
        assert!(
            t < rt2 * 5 + Duration::from_millis(1),
            "the other module's round trip went from {rt2:?} to {t:?} while the flood was {what}"
        );
    }
    stop.store(true, Ordering::Relaxed);
    drop(pty);
    let _ = writer.join();
    d.wait_absent(FLOODER);
    assert!(!d.log().contains("panicked"));
}
