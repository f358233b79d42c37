//! Instructions per request and per MiB, counted by callgrind: a measure of CPU work that does
//! not depend on how busy the machine is (this kind of machine offers no hardware counters to
//! `perf stat`). Each server runs under `valgrind --tool=callgrind`; after a warm-up on an open
//! connection the counters are zeroed (`callgrind_control -z`), the workload runs, and the
//! counters are dumped (`-d`), in every process of the server's tree (socat forks one per
//! connection; its accept and fork are counted). Start-up and shutdown are left out. User-space
//! instructions only: the kernel's share of each syscall is not in these figures.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{EmuModule, Kind, Mode, Pty, Report, bulk_on, drain, round_trips, start_under, tcp};

/// Requests before the counters are zeroed (connection set-up, first allocations).
const WARM_UP_REQUESTS: usize = 50;
/// Bytes each way before the counters are zeroed.
const WARM_UP_BYTES: usize = 64 << 10;
/// How long a callgrind control command may take (it waits for the process to answer).
const CONTROL_PATIENCE: Duration = Duration::from_secs(30);
/// Ports of the servers under callgrind (below the ephemeral range, apart from the others).
const BASE_PORT: u16 = 29300;

#[derive(Default, serde::Serialize)]
pub(super) struct InstrRow {
    pub(super) server: String,
    pub(super) per_request: Option<f64>,
    pub(super) per_mib_up: Option<f64>,
    pub(super) per_mib_down: Option<f64>,
}

/// The process ids of a tree (the server and its children, e.g. socat's forked handlers).
fn tree(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        out.push(p);
        if let Ok(c) = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")) {
            stack.extend(c.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
        }
    }
    out
}

/// Runs `callgrind_control ARGS PID` for every process of the server's trees.
fn control(roots: &[u32], args: &[&str]) -> Result<(), String> {
    for pid in roots.iter().flat_map(|p| tree(*p)) {
        let mut child = Command::new("callgrind_control")
            .args(args)
            .arg(pid.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("callgrind_control: {e} (apt-get install valgrind)"))?;
        let t0 = Instant::now();
        loop {
            match child.try_wait() {
                Ok(Some(st)) if st.success() => break,
                Ok(Some(st)) => return Err(format!("callgrind_control {args:?} {pid}: {st}")),
                Ok(None) if t0.elapsed() > CONTROL_PATIENCE => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "callgrind_control {args:?} {pid}: no answer in {CONTROL_PATIENCE:?}"
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(5)),
                Err(e) => return Err(e.to_string()),
            }
        }
    }
    Ok(())
}

/// The instructions of the dumps named `phase`, summed over the files of every process.
fn dumped(dir: &Path, phase: &str) -> Result<u64, String> {
    let want = format!("desc: Trigger: dump {phase}");
    let mut total = 0;
    let mut found = false;
    for e in std::fs::read_dir(dir).map_err(|e| e.to_string())?.flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().starts_with("cg.") {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        if !text.lines().any(|l| l == want) {
            continue;
        }
        found = true;
        total += text
            .lines()
            .find_map(|l| l.strip_prefix("totals: "))
            .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            .ok_or_else(|| format!("{}: no totals line", e.path().display()))?;
    }
    found
        .then_some(total)
        .ok_or_else(|| format!("no callgrind dump {phase:?} in {}", dir.display()))
}

/// `valgrind --tool=callgrind` with its output files in `dir`, one per process.
fn callgrind(dir: &Path) -> Vec<String> {
    vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        "--trace-children=yes".into(),
        format!("--callgrind-out-file={}/cg.%p", dir.display()),
    ]
}

fn count_requests(kind: Kind, module: &Path, n: usize, base: u16) -> Result<f64, String> {
    let dir = tempfile::tempdir().unwrap();
    let s = start_under(kind, &[module], base, "", &callgrind(dir.path()))?;
    let roots = super::server_pids(&s);
    let mut c = tcp(s.ports[0]);
    c.set_read_timeout(Some(CONTROL_PATIENCE)).unwrap();
    round_trips(&mut c, WARM_UP_REQUESTS);
    control(&roots, &["-z"])?;
    round_trips(&mut c, n);
    control(&roots, &["-d", "requests"])?;
    keep(dir.path(), &s.name, "requests");
    Ok(dumped(dir.path(), "requests")? as f64 / n as f64)
}

/// With `BENCH_CALLGRIND_KEEP=DIR`, the callgrind files of each server are copied to
/// `DIR/SERVER-WHAT/` for `callgrind_annotate` (where do the instructions go?).
fn keep(dir: &Path, server: &str, what: &str) {
    let Some(out) = std::env::var_os("BENCH_CALLGRIND_KEEP") else {
        return;
    };
    let out = Path::new(&out).join(format!(
        "{}-{what}",
        server.split_whitespace().next().unwrap_or(server)
    ));
    let _ = std::fs::create_dir_all(&out);
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let _ = std::fs::copy(e.path(), out.join(e.file_name()));
    }
    eprintln!("callgrind files kept in {}", out.display());
}

fn count_bulk(kind: Kind, raw: &Pty, bytes: usize, base: u16) -> Result<(f64, f64), String> {
    let dir = tempfile::tempdir().unwrap();
    let s = start_under(
        kind,
        &[raw.path()],
        base,
        // A raw pty is no module: it must not receive GetId.
        "[relay]\ntransport = \"plain\"\nidentify = false\n",
        &callgrind(dir.path()),
    )?;
    let roots = super::server_pids(&s);
    let c = tcp(s.ports[0]);
    c.set_read_timeout(Some(CONTROL_PATIENCE)).unwrap();
    let stalled = |what: &str| format!("{}: {what} stalled under callgrind", s.name);
    bulk_on(&c, raw, WARM_UP_BYTES, true, false)
        .0
        .ok_or_else(|| stalled("warm-up up"))?;
    bulk_on(&c, raw, WARM_UP_BYTES, false, true)
        .1
        .ok_or_else(|| stalled("warm-up down"))?;
    let mib = bytes as f64 / (1 << 20) as f64;
    control(&roots, &["-z"])?;
    bulk_on(&c, raw, bytes, true, false)
        .0
        .ok_or_else(|| stalled("upload"))?;
    control(&roots, &["-d", "up"])?;
    let up = dumped(dir.path(), "up")? as f64 / mib;
    control(&roots, &["-z"])?;
    bulk_on(&c, raw, bytes, false, true)
        .1
        .ok_or_else(|| stalled("download"))?;
    control(&roots, &["-d", "down"])?;
    let down = dumped(dir.path(), "down")? as f64 / mib;
    drop(c);
    keep(dir.path(), &s.name, "bulk");
    drop(s);
    drain(raw);
    Ok((up, down))
}

/// Counts instructions for lucidgate, socat and ser2net (chardelay off); a server that cannot
/// run under callgrind is reported as a failure, not as a figure.
pub(super) fn instructions(mode: &Mode, r: &mut Report) {
    if Command::new("valgrind")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        r.failures.push(
            "instruction counts: valgrind is not installed (apt-get install valgrind)".into(),
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let emu = EmuModule::new(dir.path(), 0);
    let mut raw = Pty::open().unwrap();
    raw.link(&dir.path().join("raw")).unwrap();
    let kinds = [
        Kind::Lucidgate,
        Kind::Socat,
        Kind::Ser2net { chardelay: false },
    ];
    for (k, kind) in kinds.into_iter().enumerate() {
        let base = BASE_PORT + (k as u16) * 10;
        let mut row = InstrRow {
            server: kind.name().into(),
            ..Default::default()
        };
        match count_requests(kind, &emu.path(), mode.instr_requests, base) {
            Ok(v) => row.per_request = Some(v),
            Err(e) => r.failures.push(format!("instructions per request: {e}")),
        }
        match count_bulk(kind, &raw, mode.instr_bytes, base + 5) {
            Ok((u, d)) => (row.per_mib_up, row.per_mib_down) = (Some(u), Some(d)),
            Err(e) => r.failures.push(format!("instructions per MiB: {e}")),
        }
        eprintln!(
            "{:<28} instructions: {} per request, {} per MiB up, {} per MiB down",
            row.server,
            super::fmt_opt(row.per_request, 0),
            super::fmt_opt(row.per_mib_up, 0),
            super::fmt_opt(row.per_mib_down, 0),
        );
        r.instructions.push(row);
    }
}
