//! Power cuts: every state write (port registry, PKI, ledger) is killed at every step
//! (`LUCIDGATE_DANGEROUS_CRASH_AT=N`: SIGKILL at the N-th step of a state write: file created,
//! half written, written, synced, renamed, and each step of a group commit), for the daemon's
//! first start and for `provision STICK`, `cert issue-client`, `cert revoke` and `cert rotate-ca`; then at random
//! moments. After each kill the state must load and be consistent: the daemon starts, keeps
//! the module's port, serves a freshly issued client over mutual TLS, earlier clients are
//! accepted or refused as the ledger says, and no staged or temporary file is left.
//! (SIGKILL keeps what reached the page cache; the fsync order that makes this hold across a
//! real power cut is in `state::write_atomic`/`write_group`.)

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const CRASH_AT: &str = "LUCIDGATE_DANGEROUS_CRASH_AT";
const TOKEN: &str = "cut-the-power-7";

/// The module every daemon here serves (an emulator that outlives the daemons), always on the
/// same ports.
struct Bench {
    _links: tempfile::TempDir,
    extra: Conf,
    base: u16,
    _emu: Emulator,
}

impl Bench {
    fn new() -> Bench {
        let links = tempfile::tempdir().unwrap();
        let link = links.path().join("ao4");
        let emu = Emulator::start(&link, "AO4", AO4);
        Bench {
            // Shared: the probe and the earlier clients are judged one after another without
            // waiting for the module to be free.
            extra: Conf::new().device(&link, AO4).relay(r#"policy = "shared""#),
            base: port_block(),
            _links: links,
            _emu: emu,
        }
    }

    /// A daemon directory (config written, not started) whose state is a copy of `state`.
    fn prepare(&self, state: Option<&Path>) -> Daemon {
        let d = Daemon::prepare(tempfile::tempdir().unwrap(), self.base, &self.extra);
        if let Some(s) = state {
            copy_dir(s, &d.dir.path().join("state"));
        }
        d
    }
}

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success());
}

/// `lucidgate -c CONFIG ARGS` with the crash hook at `at` ("list" or a step number).
fn cli_crash(d: &Daemon, args: &[&str], at: &str) -> std::process::Output {
    Command::new(bin())
        .arg("-c")
        .arg(&d.config)
        .args(args)
        .env(CRASH_AT, at)
        .output()
        .unwrap()
}

fn killed(st: &std::process::ExitStatus) -> bool {
    use std::os::unix::process::ExitStatusExt;
    st.signal() == Some(9)
}

fn crash_points(stderr: &[u8]) -> usize {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| l.starts_with("crash-point "))
        .count()
}

/// `lucidgate serve` with the crash hook; returns (killed by it, crash points passed) once
/// it is killed or ready.
fn serve_crash(d: &Daemon, at: &str) -> (bool, usize) {
    let err = d.dir.path().join("crash.err");
    let mut child = Command::new(bin())
        .arg("-c")
        .arg(&d.config)
        .args(["serve", "--no-udev"])
        .env(CRASH_AT, at)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let st = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break Some(st);
        }
        // Ready and serving the module: every start-up write is done.
        if d.try_status()
            .is_some_and(|s| s.modules.iter().any(|m| m.state == "serving"))
        {
            break None;
        }
        assert!(
            start.elapsed() < PATIENCE,
            "serve neither crashed nor got ready"
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    let was_killed = st.as_ref().is_some_and(killed);
    if st.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    (was_killed, crash_points(&std::fs::read(&err).unwrap()))
}

/// What must hold after any crash: the state loads, the port is kept, a new client gets
/// through, `old` clients are accepted exactly when the ledger lists them unrevoked, and
/// nothing staged or temporary is left. Returns whether each of `old` was accepted.
fn check_consistent(d: &mut Daemon, port: Option<u16>, old: &[(&str, &Path)], what: &str) {
    d.restart(None);
    let p = d.wait_serving(AO4);
    if let Some(port) = port {
        assert_eq!(p, port, "{what}: the module's port changed");
    }
    let probe = issue_client(d, "probe", &["--all"]);
    let cfg = tls_client_config(&probe, "probe");
    let mut s = tls_connect(p, &cfg).unwrap_or_else(|e| panic!("{what}: probe: {e}"));
    assert_eq!(
        ask(&mut s, &GET_ID),
        get_id_answer(AO4),
        "{what}: a new client"
    );
    drop(s);
    let list = d.cli(&["cert", "list"]);
    assert!(list.status.success(), "{what}: cert list failed: {list:?}");
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    for (name, dir) in old {
        let listed_revoked = list
            .lines()
            .any(|l| l.split_whitespace().any(|w| w == *name) && l.contains("REVOKED"));
        // The server is verified against today's CA (after a rotation old clients get the
        // new CA certificate); what is checked is whether the server accepts the client.
        let cfg = tls_client_config_trusting(dir, name, &probe.join("ca.crt"));
        // The exclusive module is free once the probe's session is over.
        let accepted = wait_until(&format!("{what}: {name} decided"), || {
            match tls_connect(p, &cfg) {
                Ok(mut s) => {
                    if s.write_all(&GET_ID).is_err() {
                        return Some(false);
                    }
                    match read_answer(&mut s) {
                        Ok(a) => Some(a == get_id_answer(AO4)),
                        Err(_) => Some(false),
                    }
                }
                Err(_) => Some(false),
            }
        });
        assert_eq!(
            accepted, !listed_revoked,
            "{what}: {name} accepted={accepted} but the ledger says revoked={listed_revoked}:\n{list}"
        );
    }
    for dir in [d.dir.path().join("state"), d.dir.path().join("state/pki")] {
        for e in std::fs::read_dir(&dir).unwrap() {
            let n = e.unwrap().file_name().into_string().unwrap();
            assert!(
                !(n.ends_with(".new") || n.contains(".tmp.") || n == ".group-commit"),
                "{what}: {n} left in {}",
                dir.display()
            );
        }
    }
    assert!(d.stop().success());
}

#[test]
fn a_kill_at_any_state_write_step_leaves_state_that_loads_and_is_consistent() {
    let mut bench = Bench::new();
    let mut tried = 0usize;
    let t0 = Instant::now();

    // 1. The daemon's first start: CA, server certificate, CRL and ledger, port registry.
    let d = bench.prepare(None);
    let (k, points) = serve_crash(&d, "list");
    assert!(
        !k && points >= 20,
        "first start passes {points} crash points"
    );
    drop(d);
    for at in 1..=points {
        let mut d = bench.prepare(None);
        let (k, _) = serve_crash(&d, &at.to_string());
        assert!(k, "first start, step {at}: not killed");
        check_consistent(&mut d, None, &[], &format!("first start, step {at}"));
        tried += 1;
    }
    println!("first start: {points} kill points");

    // A base state: the daemon ran once (port registered), two clients issued.
    let mut base = bench.prepare(None);
    base.restart(None);
    let port = base.wait_serving(AO4);
    let alice = issue_client(&base, "alice", &["--all"]);
    let bob = issue_client(&base, "bob", &["--all"]);
    assert!(base.stop().success());
    let base_state = base.dir.path().join("state");
    let old = [("alice", alice.as_path()), ("bob", bob.as_path())];
    // Provisioning on: the token's hash in every config from here on, and a stick (a FAT
    // image) asking for one client certificate.
    let set = base.cli(&["provision", "set-token", "--token", TOKEN]);
    assert!(set.status.success(), "{set:?}");
    let cfg = std::fs::read_to_string(&base.config).unwrap();
    let hash = cfg
        .lines()
        .find(|l| l.starts_with("token_hash"))
        .expect("set-token wrote the hash");
    bench.extra = bench.extra.clone().table("provision", hash);
    let sticks = tempfile::tempdir().unwrap();
    let stick = fat_image(sticks.path(), "stick.img", 1024);
    put(
        &stick,
        "lucidgate/request.toml",
        format!(
            "id = \"cut\"\ntoken = \"{TOKEN}\"\n[[client]]\nname = \"dave\"\nmodules = [\"*\"]\n"
        )
        .as_bytes(),
    );

    // 2. CLI operations on that state, each killed at every step.
    let ops: [(&str, Vec<String>); 4] = [
        ("provision", vec!["provision".into(), "STICK".into()]),
        (
            "issue-client",
            vec![
                "cert".into(),
                "issue-client".into(),
                "carol".into(),
                "--all".into(),
                "--out".into(),
            ],
        ),
        ("revoke", vec!["cert".into(), "revoke".into(), "bob".into()]),
        ("rotate-ca", vec!["cert".into(), "rotate-ca".into()]),
    ];
    for (name, args) in &ops {
        let with_out = |d: &Daemon| -> Vec<String> {
            let mut a = args.clone();
            if a.last().map(String::as_str) == Some("--out") {
                a.push(d.dir.path().join("carol").display().to_string());
            }
            if a.last().map(String::as_str) == Some("STICK") {
                // A fresh copy of the stick for every run.
                let img = d.dir.path().join("stick.img");
                std::fs::copy(&stick, &img).unwrap();
                *a.last_mut().unwrap() = img.display().to_string();
            }
            a
        };
        let d = bench.prepare(Some(&base_state));
        let a = with_out(&d);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        let out = cli_crash(&d, &a, "list");
        assert!(out.status.success(), "{name}: {out:?}");
        let points = crash_points(&out.stderr);
        assert!(points >= 5, "{name} passes {points} crash points");
        for at in 1..=points {
            let mut d = bench.prepare(Some(&base_state));
            let a = with_out(&d);
            let a: Vec<&str> = a.iter().map(String::as_str).collect();
            let out = cli_crash(&d, &a, &at.to_string());
            assert!(
                killed(&out.status),
                "{name}, step {at}: not killed: {out:?}"
            );
            check_consistent(&mut d, Some(port), &old, &format!("{name}, step {at}"));
            // The interrupted operation can simply be run again.
            let again = d.cli(&a);
            // (A revocation that made it is reported as such: nothing to redo.)
            assert!(
                again.status.success()
                    || String::from_utf8_lossy(&again.stderr).contains("already revoked"),
                "{name}, step {at}: rerun failed: {again:?}"
            );
            tried += 1;
        }
        println!("{name}: {points} kill points");
    }

    // 3. Random moments: `cert rotate-ca` killed by the test at a random time within its run.
    let d = bench.prepare(Some(&base_state));
    let t = Instant::now();
    assert!(d.cli(&["cert", "rotate-ca"]).status.success());
    let took = t.elapsed();
    let mut rng = XorShift(0x9E37_79B9_7F4A_7C15);
    let mut landed = 0;
    const RANDOM_KILLS: usize = 20;
    for i in 0..RANDOM_KILLS {
        let after = took.mul_f64((rng.next_u64() % 1000) as f64 / 1000.0 * 1.2);
        let mut d = bench.prepare(Some(&base_state));
        let mut child = Command::new(bin())
            .arg("-c")
            .arg(&d.config)
            .args(["cert", "rotate-ca"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(after);
        let _ = child.kill();
        let st = child.wait().unwrap();
        if killed(&st) {
            landed += 1;
        }
        check_consistent(
            &mut d,
            Some(port),
            &old,
            &format!("random kill {i} after {after:?}"),
        );
        tried += 1;
    }
    println!(
        "random: {RANDOM_KILLS} kills of rotate-ca (takes {took:?}), {landed} before it finished; {tried} kill points in all, {:?}",
        t0.elapsed()
    );
}

#[test]
fn corrupt_state_is_moved_aside_or_refused_never_silently_replaced() {
    // Ports of its own (a bench of its own): the other test here runs at the same time.
    let bench = Bench::new();
    let mut d = bench.prepare(None);
    d.restart(None);
    let port = d.wait_serving(AO4);
    assert!(d.stop().success());
    let state = d.dir.path().join("state");
    // A torn port registry is moved aside with a log line; the port is derived again.
    std::fs::write(state.join("ports.toml"), "ports = { \"11001001FA48").unwrap();
    d.restart(None);
    assert_eq!(d.wait_serving(AO4), port);
    assert!(d.log().contains("moved aside"), "{}", d.log());
    let aside: Vec<PathBuf> = std::fs::read_dir(&state)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("ports.toml.corrupt-"))
        .collect();
    assert_eq!(
        aside.len(),
        1,
        "the corrupt registry is kept for inspection"
    );
    assert!(d.stop().success());
    // A CA key that does not belong to the CA certificate: refused, named, never replaced.
    let pki = state.join("pki");
    let other = tempfile::tempdir().unwrap();
    let o = Daemon::prepare(other, port_block(), &bench.extra);
    issue_client(&o, "x", &["--all"]);
    let key = std::fs::read(pki.join("ca.key")).unwrap();
    std::fs::copy(o.dir.path().join("state/pki/ca.key"), pki.join("ca.key")).unwrap();
    let out = d.cli(&["cert", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("is not the certificate of the key") && err.contains("ca.key"),
        "{err}"
    );
    assert_ne!(std::fs::read(pki.join("ca.key")).unwrap(), key);
    assert!(pki.join("ca.crt").exists(), "nothing was replaced");
}
