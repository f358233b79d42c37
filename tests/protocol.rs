//! The protocol-aware relay against emulated modules: shared mode with many clients at once,
//! read-only client certificates (with socat as the TLS client), module timeouts, counters.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;

const SET_UV: u8 = 0x40;
const GET_IO: u8 = 0x46;
const MICROVOLTS: u8 = 0x1D;

fn set_uv(ch: u8, v: u32) -> Vec<u8> {
    let mut r = vec![SET_UV, ch, MICROVOLTS, 4];
    r.extend_from_slice(&v.to_le_bytes());
    r
}

fn get_uv(ch: u8) -> [u8; 4] {
    [GET_IO, ch, MICROVOLTS, 0]
}

/// GET /metrics, parsed by the reference OpenMetrics parser (prometheus_client, from the test
/// venv); returns every sample as {name, labels, value}.
fn scrape(addr: &str) -> Vec<serde_json::Value> {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: pi\r\n\r\n")
        .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    let python = repo().join("target/test-venv/bin/python");
    assert!(python.exists(), "run ./scripts/test-venv first");
    let mut child = std::process::Command::new(python)
        .args([
            "-c",
            "import sys, json\nfrom prometheus_client.openmetrics.parser import text_string_to_metric_families as p\nprint(json.dumps([{'name': s.name, 'labels': s.labels, 'value': s.value} for f in p(sys.stdin.read()) for s in f.samples]))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused:\n{body}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Eight clients share one AO8, each on its own channel, sending SetIo and GetIo back to back
/// (two frames per write) thousands of times: every GetIo returns the value that client set, so
/// no answer ever reached the wrong client or came out of order. A ninth client sends an HTTP
/// request and is cut off alone, mid-run.
#[test]
fn shared_mode_routes_every_answer_to_the_client_that_asked() {
    const CLIENTS: u8 = 8;
    const ROUNDS: u32 = 400;
    let dir = tempfile::tempdir().unwrap();
    let ao8 = lucidgate::emulator::default_serial(0x1110);
    let emu = Emulator::start(&dir.path().join("ao8"), "AO8", &ao8);
    let metrics = format!("127.0.0.1:{}", free_port());
    let d = Daemon::start(
        port_block(),
        Conf::new()
            .device(&emu.link, &ao8)
            .relay(r#"transport = "plain""#)
            .relay(r#"policy = "shared""#)
            .table("metrics", format!(r#"listen = "{metrics}""#)),
        None,
    );
    let port = d.wait_serving(&ao8);
    let started = Instant::now();
    let workers: Vec<_> = (0..CLIENTS)
        .map(|ch| {
            std::thread::spawn(move || {
                let mut c = connect(port);
                for k in 0..ROUNDS {
                    let v = 1_000_000 + ch as u32 * 100_000 + k;
                    let mut both = set_uv(ch, v);
                    both.extend_from_slice(&get_uv(ch));
                    c.write_all(&both).unwrap();
                    let mut set_answer = [0u8; 2];
                    c.read_exact(&mut set_answer).unwrap();
                    assert_eq!(set_answer, [0x00, 0x00], "client {ch} round {k}: SetIo");
                    let mut get_answer = [0u8; 6];
                    c.read_exact(&mut get_answer).unwrap();
                    let mut want = vec![0x00, 0x04];
                    want.extend_from_slice(&v.to_le_bytes());
                    assert_eq!(get_answer.to_vec(), want, "client {ch} round {k}: GetIo");
                }
            })
        })
        .collect();
    // The garbage client, while the others run.
    std::thread::sleep(Duration::from_millis(50));
    let mut bad = connect(port);
    bad.write_all(b"GET / HTTP/1.1\r\nHost: pi\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 16];
    match bad.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the garbage client was not cut off: {other:?}"),
    }
    for w in workers {
        w.join().expect("a sharing client got a wrong answer");
    }
    let elapsed = started.elapsed();
    let total = CLIENTS as u64 * ROUNDS as u64 * 2;
    eprintln!(
        "{total} requests from {CLIENTS} clients in {elapsed:?} ({:.0} µs per request)",
        elapsed.as_secs_f64() * 1e6 / total as f64
    );

    let m = d.module(&ao8).unwrap();
    assert_eq!(m.policy, "shared");
    let counts = m.metrics.as_ref().expect("counters of a served module");
    assert_eq!(counts.requests, total, "{m:?}");
    assert_eq!(counts.answers_ok, total, "{m:?}");
    assert_eq!(counts.bad_frames, 1, "{m:?}");
    assert_eq!(counts.timeouts, 0, "{m:?}");
    let log = d.log();
    assert!(
        log.contains("cut off: sent 0x47 where a request must start"),
        "{log}"
    );
    // The same counters on the OpenMetrics endpoint, read by prometheus_client's parser.
    let samples = scrape(&metrics);
    let sample = |name: &str, extra: &str| {
        samples
            .iter()
            .find(|s| {
                s["name"] == name
                    && s["labels"]["serial"] == ao8.as_str()
                    && (extra.is_empty() || s["labels"]["status"] == extra)
            })
            .unwrap_or_else(|| panic!("no {name} for {ao8}: {samples:?}"))["value"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(sample("lucidgate_requests_total", ""), total as f64);
    assert_eq!(sample("lucidgate_answers_total", "0x00"), total as f64);
    assert_eq!(sample("lucidgate_bad_frames_total", ""), 1.0);
    assert_eq!(sample("lucidgate_module_up", ""), 1.0);
    // The module saw exactly the clients' requests (and the GetId at start), nothing else.
    drop(d);
    let (requests, writes) = emu.stop_counted();
    assert_eq!((requests, writes), (total + 1, total / 2));
}

/// A client certificate issued with `--read-only`: socat can read, but SetIo is answered 0xA0
/// by lucidgate and never reaches the module; the refusal is logged with the client's name. A
/// read-write certificate on the same (exclusive) module still writes.
#[test]
fn read_only_certificates_read_but_their_writes_never_reach_the_module() {
    let dir = tempfile::tempdir().unwrap();
    let emu = Emulator::start(&dir.path().join("ao4"), "AO4", AO4);
    let d = Daemon::start(
        port_block(),
        Conf::new()
            .device(&emu.link, AO4)
            .relay(r#"transport = "mtls""#),
        None,
    );
    let port = d.wait_serving(AO4);
    let ro = issue_client(&d, "dashboard", &["--modules", AO4, "--read-only"]);
    let rw = issue_client(&d, "operator", &["--modules", AO4]);

    assert_eq!(
        socat_tls(port, &ro, "dashboard", &GET_ID),
        get_id_answer(AO4)
    );
    let set = set_uv(0, 2_500_000);
    assert_eq!(
        socat_tls(port, &ro, "dashboard", &set),
        vec![0xA0, 0x00],
        "a read-only client's write is answered 'not supported'"
    );
    // Group writes and parameter writes too; reads in the same session still pass.
    let mut session = vec![0x42, 0x01, 0x1D, 0x04, 0, 0, 0, 0]; // SetIoGroup channel 0
    session.extend_from_slice(&[0xA0, 0x00, 0x80, 0x02, 0x11, 0x00]); // SetParam, persistent
    session.extend_from_slice(&get_uv(0));
    let got = socat_tls(port, &ro, "dashboard", &session);
    assert_eq!(got, vec![0xA0, 0x00, 0xA0, 0x00, 0x00, 0x04, 0, 0, 0, 0]);

    assert_eq!(socat_tls(port, &rw, "operator", &set), vec![0x00, 0x00]);
    let mut want = vec![0x00, 0x04];
    want.extend_from_slice(&2_500_000u32.to_le_bytes());
    assert_eq!(socat_tls(port, &ro, "dashboard", &get_uv(0)), want);

    let m = d.module(AO4).unwrap();
    assert_eq!(
        m.metrics.as_ref().map(|c| c.denied_writes),
        Some(3),
        "{m:?}"
    );
    let log = d.log();
    assert!(
        log.contains("refused SetIo from read-only client")
            && log.contains("(dashboard)")
            && log.contains("event=\"write-denied\""),
        "{log}"
    );
    drop(d);
    let (_, writes) = emu.stop_counted();
    assert_eq!(writes, 1, "only the operator's write reached the module");
}

/// In shared mode a module that does not answer costs the asking client its answer (as the
/// module itself would), is counted as a timeout, and the next request is served normally.
#[test]
fn shared_mode_applies_the_module_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let serial = "11001001FA480007";
    let emu = Emulator::start_with(&dir.path().join("m"), "AO4", serial, &["--silent"]);
    let d = Daemon::start(
        port_block(),
        Conf::new()
            .device(&emu.link, serial)
            .relay(r#"transport = "plain""#)
            .relay(r#"policy = "shared""#)
            .limits("answer_timeout_ms = 300"),
        None,
    );
    let port = d.wait_serving(serial);
    let m = wait_until("identification to give up", || {
        d.module(serial).filter(|m| m.identity_state == "failed")
    });
    assert!(
        m.identity_error
            .as_deref()
            .unwrap()
            .contains("no answer to GetId within 300 ms"),
        "{m:?}"
    );
    let mut a = connect(port);
    let mut b = connect(port);
    a.set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    a.write_all(&GET_ID).unwrap();
    b.write_all(&GET_ID).unwrap();
    let mut buf = [0u8; 4];
    assert!(a.read(&mut buf).is_err(), "no answer is invented");
    let m = wait_until("two timeouts", || {
        d.module(serial)
            .filter(|m| m.metrics.as_ref().is_some_and(|c| c.timeouts == 2))
    });
    assert_eq!(m.metrics.as_ref().map(|c| c.requests), Some(2), "{m:?}");
    assert_eq!(m.clients, 2, "{m:?}");
    assert!(
        d.log()
            .contains("module did not answer GetId within 300 ms")
    );
}
