//! lucidgate side by side with socat and ser2net, in one run, in front of the same emulated
//! modules on ptys. Ratios matter, not absolute times (shared machines are noisy).
//!
//! `cargo bench --bench relay -- --quick` (CI: seconds, keeps the runner working) or `--full`
//! (for docs/benchmarks.md: `--out docs` writes benchmarks.md, benchmarks.json and the plot).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use lucidgate::emulator::{self, Module};
use lucidgate::pty::Pty;

#[path = "relay/goals.rs"]
mod goals;
#[path = "relay/instructions.rs"]
mod instructions;

/// How long a server may take to accept connections after it was started.
const START_PATIENCE: Duration = Duration::from_secs(10);
/// A bulk transfer that makes no progress for this long is reported as stalled.
const STALL: Duration = Duration::from_secs(5);
const GET_IO: [u8; 4] = [0x46, 0x00, 0x1D, 0x00];
// The servers' ports (26000..29200) sit below Linux's ephemeral range (32768..60999): there a
// client socket's local port could hold the port a server is about to bind (seen in full runs:
// "fixed port 49104 is busy").

struct Mode {
    full: bool,
    /// Round trips and bytes each way counted by callgrind.
    instr_requests: usize,
    instr_bytes: usize,
    rtt_requests: usize,
    bulk_bytes: usize,
    module_counts: Vec<usize>,
    load_requests: usize,
    out: Option<PathBuf>,
}

/// The lucidgate measured: this build's, or `BENCH_LUCIDGATE=PATH` (another build, e.g. the
/// tree before a change, measured by the same harness in the same conditions).
fn lucidgate_bin() -> PathBuf {
    std::env::var_os("BENCH_LUCIDGATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_lucidgate")))
}

/// A module emulator on a pty with a stable link name.
struct EmuModule {
    pty: Pty,
    shared: emulator::Shared,
}

impl EmuModule {
    fn new(dir: &Path, i: usize) -> EmuModule {
        let serial = format!("11001001FA48{i:04X}");
        let mut pty = Pty::open().unwrap();
        pty.link(&dir.join(format!("mod{i}"))).unwrap();
        let shared = emulator::Shared::new(Module::from_usb_serial(&serial).unwrap());
        let master = pty.master.try_clone().unwrap();
        let s = shared.clone();
        std::thread::spawn(move || emulator::serve_fd(master, s));
        EmuModule { pty, shared }
    }
    fn path(&self) -> PathBuf {
        self.pty.path().to_path_buf()
    }
}

impl Drop for EmuModule {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// A relay under test: one process (lucidgate, ser2net) or one per module (socat).
struct Server {
    name: String,
    children: Vec<Child>,
    ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    /// Stops the servers as an operator would: SIGTERM, then SIGKILL after a grace period (a
    /// killed relay cannot release its serial port's exclusive flag).
    fn drop(&mut self) {
        for c in &self.children {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for c in &mut self.children {
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(3) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Is something listening on `port`? Read from /proc, not by connecting: socat forks a child
/// for every connection, and a probe's child would hold the pty open beside the real client's.
fn listening(port: u16) -> bool {
    let needle = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|f| {
        std::fs::read_to_string(f).is_ok_and(|t| {
            t.lines().any(|l| {
                let cols: Vec<&str> = l.split_whitespace().collect();
                cols.len() > 3 && format!("{} ", cols[1]).ends_with(&needle) && cols[3] == "0A"
            })
        })
    })
}

fn wait_port(port: u16) -> Result<Duration, String> {
    let t0 = Instant::now();
    while t0.elapsed() < START_PATIENCE {
        if listening(port) {
            return Ok(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Err(format!(
        "port {port} did not open within {START_PATIENCE:?}"
    ))
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Lucidgate,
    Socat,
    Ser2net { chardelay: bool },
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Lucidgate => "lucidgate",
            Kind::Socat => "socat",
            Kind::Ser2net { chardelay: true } => "ser2net (default)",
            Kind::Ser2net { chardelay: false } => "ser2net (chardelay: false)",
        }
    }
}

/// Starts a server; `Err` (with its stderr) when it does not come up, so the run goes on.
fn start(kind: Kind, modules: &[&Path], base: u16, extra_config: &str) -> Result<Server, String> {
    start_under(kind, modules, base, extra_config, &[])
}

/// `program` run under `under` (e.g. valgrind and its options), or directly when it is empty.
fn command(program: impl AsRef<std::ffi::OsStr>, under: &[String]) -> Command {
    match under.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// `start`, with every server process run under `under`.
fn start_under(
    kind: Kind,
    modules: &[&Path],
    base: u16,
    extra_config: &str,
    under: &[String],
) -> Result<Server, String> {
    let dir = tempfile::tempdir().unwrap();
    let ports: Vec<u16> = (0..modules.len()).map(|i| base + i as u16).collect();
    let mut children = Vec::new();
    match kind {
        Kind::Lucidgate => {
            let mut cfg = format!(
                "listen = [\"127.0.0.1\"]\nstate_dir = \"{}\"\ncontrol_socket = \"{}\"\n{extra_config}\n[discovery]\nmdns = false\n",
                dir.path().join("state").display(),
                dir.path().join("control.sock").display()
            );
            if !extra_config.contains("[relay]") {
                cfg.push_str("[relay]\ntransport = \"plain\"\n");
            }
            for (i, m) in modules.iter().enumerate() {
                let serial = format!("BENCH{i:04}");
                cfg.push_str(&format!(
                    "[[device]]\npath = \"{}\"\nserial = \"{serial}\"\n[modules.\"{serial}\"]\nport = {}\n",
                    m.display(),
                    ports[i]
                ));
            }
            std::fs::write(dir.path().join("c.toml"), cfg).unwrap();
            children.push(
                command(lucidgate_bin(), under)
                    .args(["--log-level", "warn", "-c"])
                    .arg(dir.path().join("c.toml"))
                    .args(["serve", "--no-udev"])
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
                    .spawn()
                    .unwrap(),
            );
        }
        Kind::Socat => {
            for (i, m) in modules.iter().enumerate() {
                children.push(
                    command("socat", under)
                        .arg(format!(
                            "tcp-l:{},fork,reuseaddr,nodelay,bind=127.0.0.1",
                            ports[i]
                        ))
                        .arg(format!("FILE:{},raw,echo=0", m.display()))
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap(),
                );
            }
        }
        Kind::Ser2net { chardelay } => {
            let mut yaml = String::from("%YAML 1.1\n---\n");
            for (i, m) in modules.iter().enumerate() {
                yaml.push_str(&format!(
                    "connection: &c{i}\n  accepter: tcp,127.0.0.1,{}\n  connector: serialdev,{},115200n81,local\n",
                    ports[i],
                    m.display()
                ));
                if !chardelay {
                    yaml.push_str("  options:\n    chardelay: false\n");
                }
            }
            let cfg = dir.path().join("ser2net.yaml");
            std::fs::write(&cfg, yaml).unwrap();
            children.push(
                command("ser2net", under)
                    .args(["-n", "-u", "-c"])
                    .arg(&cfg)
                    .arg("-P")
                    .arg(dir.path().join("pid"))
                    .stdout(Stdio::null())
                    .stderr(std::fs::File::create(dir.path().join("stderr")).unwrap())
                    .spawn()
                    .unwrap(),
            );
        }
    }
    let server = Server {
        name: kind.name().to_string(),
        children,
        ports,
        _dir: dir,
    };
    for p in &server.ports {
        if let Err(e) = wait_port(*p) {
            let stderr =
                std::fs::read_to_string(server._dir.path().join("stderr")).unwrap_or_default();
            return Err(format!(
                "{} with {} modules: {e}; stderr: {}",
                kind.name(),
                modules.len(),
                stderr.trim()
            ));
        }
    }
    Ok(server)
}

/// Kernel-side bytes of RSS (kB) of a process and all its descendants.
fn tree_rss_kb(pid: u32) -> u64 {
    let mut total = 0;
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/status")) {
            total += s
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
        if let Ok(c) = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")) {
            stack.extend(c.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
        }
    }
    total
}

/// CPU time (user + system) of a process tree, including reaped children.
fn tree_cpu(pid: u32) -> Duration {
    let tick = 100.0; // USER_HZ
    let mut total = 0.0;
    let mut stack = vec![pid];
    while let Some(p) = stack.pop() {
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
            let after = s.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
            let f: Vec<&str> = after.split_whitespace().collect();
            // fields after the comm: utime=12 stime=13 cutime=14 cstime=15 (1-based from state)
            for i in [11, 12, 13, 14] {
                total += f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
            }
        }
        if let Ok(c) = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")) {
            stack.extend(c.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
        }
    }
    Duration::from_secs_f64(total / tick)
}

/// Context switches of all threads of a process (a proxy for wake-ups).
fn wakeups(pid: u32) -> u64 {
    let mut n = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("status")) {
                for l in s.lines().filter(|l| l.contains("ctxt_switches")) {
                    n += l
                        .split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
    }
    n
}

/// Waits until the server has no per-connection children left (socat's forked handlers linger
/// 0.5 s after a client leaves and would read the module's pty beside the next client's).
fn settle(s: &Server) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(3) {
        let busy = s.children.iter().any(|c| {
            let p = c.id();
            std::fs::read_to_string(format!("/proc/{p}/task/{p}/children"))
                .is_ok_and(|c| !c.trim().is_empty())
        });
        if !busy {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// CPU time (ns, from the scheduler's accounting) of every thread of the server's live
/// processes: precise where `tree_cpu`'s clock ticks (10 ms) are too coarse for one transfer.
fn server_cpu_ns(s: &Server) -> u64 {
    let mut total = 0;
    let mut stack = server_pids(s);
    while let Some(p) = stack.pop() {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) {
            for t in tasks.flatten() {
                total += std::fs::read_to_string(t.path().join("schedstat"))
                    .ok()
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        if let Ok(c) = std::fs::read_to_string(format!("/proc/{p}/task/{p}/children")) {
            stack.extend(c.split_whitespace().filter_map(|x| x.parse::<u32>().ok()));
        }
    }
    total
}

fn server_pids(s: &Server) -> Vec<u32> {
    s.children.iter().map(|c| c.id()).collect()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// Round trips of GetIo over any stream; returns the sorted latencies.
fn round_trips<S: Read + Write>(s: &mut S, n: usize) -> Vec<Duration> {
    let mut out = Vec::with_capacity(n);
    let mut ans = [0u8; 6];
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&GET_IO).unwrap();
        s.read_exact(&mut ans).unwrap();
        out.push(t.elapsed());
        assert_eq!(ans[..2], [0x00, 0x04]);
    }
    out.sort();
    out
}

fn tcp(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(STALL)).unwrap();
    s
}

struct Rtt {
    p50: f64,
    p99: f64,
    p999: f64,
    samples: Vec<f64>,
}

fn rtt_stats(sorted: &[Duration]) -> Rtt {
    Rtt {
        p50: us(percentile(sorted, 0.5)),
        p99: us(percentile(sorted, 0.99)),
        p999: us(percentile(sorted, 0.999)),
        samples: sorted.iter().map(|d| us(*d)).collect(),
    }
}

/// Bulk transfer through a relay between a TCP client and the pty master directly.
/// Returns MB/s or None when it stalled.
fn bulk(port: u16, pty: &Pty, bytes: usize, up: bool, down: bool) -> (Option<f64>, Option<f64>) {
    bulk_on(&tcp(port), pty, bytes, up, down)
}

/// `bulk` over a connection that stays open afterwards.
/// A download starts as the module's answer to a request: the client sends GetIo and the
/// "module" sees it arrive before it starts writing. Without this, the bytes a module writes
/// before the relay has taken this client on belong to whoever the relay serves then: a
/// previous client still lingering for its answers after a half-close gets them (a relay has
/// no way to know they were meant for a client it has not accepted yet), and a full run
/// reported that as a "down stall" (the first 2048 or 4095 bytes went to the previous client).
fn request_reaches_module(client: &TcpStream, pty: &Pty) -> bool {
    let mut c = client.try_clone().unwrap();
    if c.write_all(&GET_IO).is_err() {
        return false;
    }
    let mut m = std::fs::File::from(pty.master.try_clone().unwrap());
    let mut got = [0u8; GET_IO.len()];
    let mut have = 0;
    while have < got.len() {
        let mut fds = [nix::poll::PollFd::new(
            m.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        if nix::poll::poll(&mut fds, nix::poll::PollTimeout::try_from(STALL).unwrap()).unwrap_or(0)
            == 0
        {
            return false;
        }
        match m.read(&mut got[have..]) {
            Ok(n) if n > 0 => have += n,
            _ => return false,
        }
    }
    got == GET_IO
}

fn bulk_on(
    client: &TcpStream,
    pty: &Pty,
    bytes: usize,
    up: bool,
    down: bool,
) -> (Option<f64>, Option<f64>) {
    let master_r = std::fs::File::from(pty.master.try_clone().unwrap());
    let master_w = std::fs::File::from(pty.master.try_clone().unwrap());
    let stalled = Arc::new(AtomicBool::new(false));
    if down && !request_reaches_module(client, pty) {
        return (None, None);
    }
    let t0 = Instant::now();
    let chunk = vec![0x5Au8; 4096];
    let mut threads = Vec::new();
    if up {
        let mut c = client.try_clone().unwrap();
        let ch = chunk.clone();
        threads.push(std::thread::spawn(move || {
            let mut sent = 0;
            while sent < bytes {
                let n = ch.len().min(bytes - sent);
                if c.write_all(&ch[..n]).is_err() {
                    return;
                }
                sent += n;
            }
        }));
    }
    let up_reader = up.then(|| {
        let st = stalled.clone();
        std::thread::spawn(move || {
            let mut m = master_r;
            let mut got = 0;
            let mut buf = vec![0u8; 65536];
            let fd = m.as_fd().try_clone_to_owned().unwrap();
            while got < bytes {
                let mut fds = [nix::poll::PollFd::new(
                    fd.as_fd(),
                    nix::poll::PollFlags::POLLIN,
                )];
                if nix::poll::poll(&mut fds, nix::poll::PollTimeout::try_from(STALL).unwrap())
                    .unwrap_or(0)
                    == 0
                {
                    st.store(true, Ordering::Relaxed);
                    return None;
                }
                match m.read(&mut buf) {
                    Ok(n) if n > 0 => got += n,
                    _ => return None,
                }
            }
            Some(t0.elapsed())
        })
    });
    if down {
        let ch = chunk.clone();
        let mut m = master_w;
        threads.push(std::thread::spawn(move || {
            let mut sent = 0;
            while sent < bytes {
                let n = ch.len().min(bytes - sent);
                if m.write_all(&ch[..n]).is_err() {
                    return;
                }
                sent += n;
            }
        }));
    }
    let down_reader = down.then(|| {
        let mut c = client.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut got = 0;
            let mut buf = vec![0u8; 65536];
            while got < bytes {
                match c.read(&mut buf) {
                    Ok(n) if n > 0 => got += n,
                    _ => return None,
                }
            }
            Some(t0.elapsed())
        })
    });
    let mbps = |d: Option<Duration>| d.map(|d| bytes as f64 / d.as_secs_f64() / 1e6);
    let u = up_reader.map(|h| h.join().unwrap()).unwrap_or(None);
    let d = down_reader.map(|h| h.join().unwrap()).unwrap_or(None);
    if (up && u.is_none()) || (down && d.is_none()) {
        // Writers blocked on a stalled peer end when the connection closes.
        let _ = client.shutdown(std::net::Shutdown::Both);
    }
    for t in threads {
        let _ = t.join();
    }
    (mbps(u), mbps(d))
}

#[derive(Default, serde::Serialize)]
struct Row {
    server: String,
    /// CPU time of the server's process tree per round trip and per MiB uploaded (µs).
    cpu_us_per_request: Option<f64>,
    cpu_us_per_mib_up: Option<f64>,
    rtt_p50_us: Option<f64>,
    rtt_p99_us: Option<f64>,
    rtt_p999_us: Option<f64>,
    up_mb_s: Option<f64>,
    down_mb_s: Option<f64>,
    duplex_up_mb_s: Option<f64>,
    duplex_down_mb_s: Option<f64>,
}

#[derive(Default, serde::Serialize)]
struct ScaleRow {
    server: String,
    modules: usize,
    processes: usize,
    rss_kb: u64,
    cpu_ms_per_10k: f64,
    p99_us_under_load: f64,
}

#[derive(Default, serde::Serialize)]
struct Report {
    date: String,
    machine: String,
    mode: String,
    pinned: bool,
    /// Round trip straight on the emulator's pty, no relay (the floor every relay adds to).
    bare_pty_rtt_p50_us: Option<f64>,
    instructions: Vec<instructions::InstrRow>,
    single: Vec<Row>,
    scale: Vec<ScaleRow>,
    hotplug_add_ms: Option<Vec<f64>>,
    hotplug_remove_ms: Option<Vec<f64>>,
    tls: BTreeMap<String, f64>,
    startup_ms_16: Option<f64>,
    idle_cpu_percent_16: Option<f64>,
    idle_wakeups_per_s_16: Option<f64>,
    /// Servers that did not start, with their stderr.
    failures: Vec<String>,
    #[serde(skip)]
    rtt_samples: BTreeMap<String, Vec<f64>>,
}

fn single_module(mode: &Mode, r: &mut Report) {
    let dir = tempfile::tempdir().unwrap();
    let emu = EmuModule::new(dir.path(), 0);
    let raw = Pty::open().unwrap();
    let mut raw = raw;
    raw.link(&dir.path().join("raw")).unwrap();
    {
        let mut tty = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(emu.path())
            .unwrap();
        round_trips(&mut tty, mode.rtt_requests / 10);
        let p50 = rtt_stats(&round_trips(&mut tty, mode.rtt_requests)).p50;
        eprintln!("{:<28} rtt p50 {p50:>8.1} us", "bare pty (no relay)");
        r.bare_pty_rtt_p50_us = Some(p50);
    }
    let kinds = [
        Kind::Lucidgate,
        Kind::Socat,
        Kind::Ser2net { chardelay: true },
        Kind::Ser2net { chardelay: false },
    ];
    for (k, kind) in kinds.into_iter().enumerate() {
        let base = 26000 + (k as u16) * 10;
        let mut row = Row {
            server: kind.name().into(),
            ..Default::default()
        };
        {
            let s = match start(kind, &[&emu.path()], base, "") {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    r.failures.push(e);
                    continue;
                }
            };
            let mut c = tcp(s.ports[0]);
            round_trips(&mut c, mode.rtt_requests / 10); // warm-up
            let cpu0 = server_cpu_ns(&s);
            let lat = round_trips(&mut c, mode.rtt_requests);
            row.cpu_us_per_request =
                Some((server_cpu_ns(&s) - cpu0) as f64 / 1e3 / mode.rtt_requests as f64);
            let st = rtt_stats(&lat);
            (row.rtt_p50_us, row.rtt_p99_us, row.rtt_p999_us) =
                (Some(st.p50), Some(st.p99), Some(st.p999));
            r.rtt_samples.insert(s.name.clone(), st.samples);
            eprintln!(
                "{:<28} rtt p50 {:>8.1} us  p99 {:>8.1} us",
                s.name, st.p50, st.p99
            );
        }
        {
            let Ok(s) = start(
                kind,
                &[raw.path()],
                base + 5,
                // A raw pty is no module: it must not receive GetId.
                "[relay]\ntransport = \"plain\"\nidentify = false\n",
            )
            .map_err(|e| r.failures.push(e)) else {
                r.single.push(row);
                continue;
            };
            let c = tcp(s.ports[0]);
            let cpu0 = server_cpu_ns(&s);
            let (u, _) = bulk_on(&c, &raw, mode.bulk_bytes, true, false);
            row.cpu_us_per_mib_up = u.map(|_| {
                (server_cpu_ns(&s) - cpu0) as f64
                    / 1e3
                    / (mode.bulk_bytes as f64 / (1 << 20) as f64)
            });
            drop(c);
            settle(&s);
            drain(&raw);
            let (_, d) = bulk(s.ports[0], &raw, mode.bulk_bytes, false, true);
            settle(&s);
            drain(&raw);
            let (du, dd) = bulk(s.ports[0], &raw, mode.bulk_bytes, true, true);
            settle(&s);
            drain(&raw);
            (
                row.up_mb_s,
                row.down_mb_s,
                row.duplex_up_mb_s,
                row.duplex_down_mb_s,
            ) = (u, d, du, dd);
            let f = |x: Option<f64>| {
                x.map(|v| format!("{v:.1}"))
                    .unwrap_or_else(|| "stalled".into())
            };
            eprintln!(
                "{:<28} up {} MB/s down {} MB/s duplex {}/{}",
                s.name,
                f(u),
                f(d),
                f(du),
                f(dd)
            );
        }
        r.single.push(row);
    }
}

/// Empties whatever is left in the pty after a transfer.
fn drain(p: &Pty) {
    let f = p.master.try_clone().unwrap();
    let _ = nix::fcntl::fcntl(
        f.as_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    );
    let mut f = std::fs::File::from(f);
    let mut buf = [0u8; 65536];
    std::thread::sleep(Duration::from_millis(50));
    while matches!(f.read(&mut buf), Ok(n) if n > 0) {}
    let _ = nix::fcntl::fcntl(
        p.master.as_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::empty()),
    );
}

fn scale(mode: &Mode, r: &mut Report) {
    for &n in &mode.module_counts {
        let dir = tempfile::tempdir().unwrap();
        let mods: Vec<EmuModule> = (0..n).map(|i| EmuModule::new(dir.path(), i)).collect();
        let paths: Vec<PathBuf> = mods.iter().map(|m| m.path()).collect();
        let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
        for (k, kind) in [
            Kind::Lucidgate,
            Kind::Socat,
            Kind::Ser2net { chardelay: false },
        ]
        .into_iter()
        .enumerate()
        {
            let s = match start(kind, &refs, 27000 + (k as u16) * 200, "") {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{e}");
                    r.failures.push(e);
                    continue;
                }
            };
            let pids = server_pids(&s);
            let cpu0: Duration = pids.iter().map(|p| tree_cpu(*p)).sum();
            let per = (mode.load_requests / n).max(50);
            let handles: Vec<_> = s
                .ports
                .iter()
                .map(|&p| {
                    std::thread::spawn(move || {
                        let mut c = tcp(p);
                        round_trips(&mut c, per)
                    })
                })
                .collect();
            let rss: u64 = pids.iter().map(|p| tree_rss_kb(*p)).sum();
            let mut all: Vec<Duration> = handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect();
            all.sort();
            let processes: usize = pids
                .iter()
                .map(|p| {
                    1 + std::fs::read_to_string(format!("/proc/{p}/task/{p}/children"))
                        .map(|c| c.split_whitespace().count())
                        .unwrap_or(0)
                })
                .sum();
            let cpu1: Duration = pids.iter().map(|p| tree_cpu(*p)).sum();
            let total = (per * n) as f64;
            let row = ScaleRow {
                server: s.name.clone(),
                modules: n,
                processes,
                rss_kb: rss,
                cpu_ms_per_10k: (cpu1 - cpu0).as_secs_f64() * 1e3 * 10_000.0 / total,
                p99_us_under_load: us(percentile(&all, 0.99)),
            };
            eprintln!(
                "{:<28} {n:>3} modules: {} procs, RSS {} kB, CPU {:.1} ms/10k, p99 {:.0} us",
                row.server, row.processes, row.rss_kb, row.cpu_ms_per_10k, row.p99_us_under_load
            );
            settle(&s);
            r.scale.push(row);
        }
    }
}

/// udev add → port accepting, remove → port closed, through the umockdev harness.
fn hotplug(mode: &Mode, r: &mut Report) {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    if Command::new("umockdev-wrapper")
        .arg("true")
        .status()
        .is_err()
    {
        eprintln!("hotplug: umockdev-wrapper missing, skipped");
        return;
    }
    let mut harness = Command::new("umockdev-wrapper")
        .arg("/usr/bin/python3")
        .arg(repo.join("tests/common/umockdev_harness.py"))
        .arg(lucidgate_bin())
        .arg(repo.join("tests/fixtures/lucidio-ao4.umockdev"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut hin = harness.stdin.take().unwrap();
    let mut hout = std::io::BufReader::new(harness.stdout.take().unwrap());
    use std::io::BufRead;
    let mut line = String::new();
    hout.read_line(&mut line).unwrap();
    let root = line.trim().trim_start_matches("root ").to_string();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = [\"127.0.0.1\"]\nstate_dir = \"{}\"\ncontrol_socket = \"{}\"\n[relay]\ntransport = \"plain\"\n[ports]\nbase = 28000\n[discovery]\nmdns = false\n",
            dir.path().join("s").display(),
            dir.path().join("c.sock").display()
        ),
    )
    .unwrap();
    let mut daemon = Command::new("umockdev-wrapper")
        .arg(lucidgate_bin())
        .args(["--log-level", "warn", "-c"])
        .arg(&cfg)
        .arg("serve")
        .env("UMOCKDEV_DIR", &root)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ctl = dir.path().join("c.sock");
    let t0 = Instant::now();
    while !ctl.exists() && t0.elapsed() < START_PATIENCE {
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(200));
    let mut add = Vec::new();
    let mut remove = Vec::new();
    let cycles = if mode.full { 20 } else { 3 };
    for i in 0..cycles {
        let serial = format!("11001001FA48{i:04X}");
        let port = 28000 + lucidgate::ports::derive(&serial, 0, 1000);
        let t = Instant::now();
        writeln!(hin, "add {i} {serial} deciphe_it LucidIo_AO4").unwrap();
        line.clear();
        hout.read_line(&mut line).unwrap();
        let syspath = line.trim().trim_start_matches("ok ").to_string();
        while !listening(port) {
            assert!(
                t.elapsed() < START_PATIENCE,
                "hotplug: port {port} never opened"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        add.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        writeln!(hin, "remove {syspath}").unwrap();
        line.clear();
        hout.read_line(&mut line).unwrap();
        while listening(port) {
            assert!(
                t.elapsed() < START_PATIENCE,
                "hotplug: port {port} never closed"
            );
            std::thread::sleep(Duration::from_micros(200));
        }
        remove.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let _ = writeln!(hin, "quit");
    let _ = daemon.kill();
    let _ = daemon.wait();
    let _ = harness.wait();
    add.sort_by(f64::total_cmp);
    remove.sort_by(f64::total_cmp);
    eprintln!(
        "hotplug add→accepting median {:.1} ms, remove→closed median {:.1} ms",
        add[add.len() / 2],
        remove[remove.len() / 2]
    );
    r.hotplug_add_ms = Some(add);
    r.hotplug_remove_ms = Some(remove);
}

fn tls(mode: &Mode, r: &mut Report) {
    let dir = tempfile::tempdir().unwrap();
    let emu = EmuModule::new(dir.path(), 0);
    // lucidgate with mutual TLS; a plain one beside it for the ratio.
    let s = start(
        Kind::Lucidgate,
        &[&emu.path()],
        29000,
        "[relay]\ntransport = \"mtls\"\n",
    )
    .expect("lucidgate starts");
    let cfg = s._dir.path().join("c.toml");
    let out = dir.path().join("client");
    let ok = Command::new(lucidgate_bin())
        .arg("-c")
        .arg(&cfg)
        .args(["cert", "issue-client", "bench", "--all", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let client_cfg = tls_client_config(&out);
    // The server's key and certificate, for the socat anchor (read before `s` goes away).
    let pki_dir = Path::new(&cfg).parent().unwrap().join("state/pki");
    let server_pem_text = format!(
        "{}{}",
        std::fs::read_to_string(pki_dir.join("server.key")).unwrap(),
        std::fs::read_to_string(pki_dir.join("server.crt")).unwrap()
    );
    let connect_tls = |port: u16| {
        let t = Instant::now();
        let tcp = tcp(port);
        let conn =
            rustls::ClientConnection::new(client_cfg.clone(), "127.0.0.1".try_into().unwrap())
                .unwrap();
        let mut stream = rustls::StreamOwned::new(conn, tcp);
        while stream.conn.is_handshaking() {
            stream.conn.complete_io(&mut stream.sock).unwrap();
        }
        (stream, t.elapsed())
    };
    let mut handshakes: Vec<Duration> = (0..if mode.full { 200 } else { 20 })
        .map(|_| connect_tls(s.ports[0]).1)
        .collect();
    handshakes.sort();
    let (mut stream, _) = connect_tls(s.ports[0]);
    round_trips(&mut stream, mode.rtt_requests / 10);
    let tls_rtt = rtt_stats(&round_trips(&mut stream, mode.rtt_requests));
    drop(stream);
    drop(s);
    // A pty of its own: the comparison must not depend on how the mTLS server let go of its.
    let emu_plain = EmuModule::new(dir.path(), 1);
    let plain = start(Kind::Lucidgate, &[&emu_plain.path()], 29010, "").expect("lucidgate starts");
    let mut c = tcp(plain.ports[0]);
    round_trips(&mut c, mode.rtt_requests / 10);
    let plain_rtt = rtt_stats(&round_trips(&mut c, mode.rtt_requests));
    drop(c);
    drop(plain);
    // socat openssl-listen as the anchor, with lucidgate's certificates.
    let pki = out.clone();
    let server_pem = dir.path().join("server.pem");
    std::fs::write(&server_pem, &server_pem_text).unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&server_pem, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let socat = Command::new("socat")
        .arg(format!(
            "openssl-listen:29020,fork,reuseaddr,bind=127.0.0.1,cert={},cafile={},verify=1",
            server_pem.display(),
            pki.join("ca.crt").display()
        ))
        .arg(format!("FILE:{},raw,echo=0", emu.path().display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(29020).expect("socat openssl-listen starts");
    let mut socat_hs: Vec<Duration> = (0..if mode.full { 200 } else { 20 })
        .map(|_| connect_tls(29020).1)
        .collect();
    socat_hs.sort();
    let anchor = Server {
        name: "socat openssl-listen".into(),
        children: vec![socat],
        ports: vec![29020],
        _dir: tempfile::tempdir().unwrap(),
    };
    settle(&anchor);
    let (mut st, _) = connect_tls(29020);
    round_trips(&mut st, mode.rtt_requests / 10);
    let socat_rtt = rtt_stats(&round_trips(&mut st, mode.rtt_requests));
    drop(st);
    drop(anchor);
    r.tls
        .insert("lucidgate_mtls_rtt_p50_us".into(), tls_rtt.p50);
    r.tls
        .insert("lucidgate_mtls_rtt_p99_us".into(), tls_rtt.p99);
    r.tls
        .insert("lucidgate_plain_rtt_p50_us".into(), plain_rtt.p50);
    r.tls
        .insert("lucidgate_plain_rtt_p99_us".into(), plain_rtt.p99);
    r.tls.insert(
        "lucidgate_handshake_p50_us".into(),
        us(percentile(&handshakes, 0.5)),
    );
    r.tls.insert("socat_tls_rtt_p50_us".into(), socat_rtt.p50);
    r.tls.insert("socat_tls_rtt_p99_us".into(), socat_rtt.p99);
    r.tls.insert(
        "socat_tls_handshake_p50_us".into(),
        us(percentile(&socat_hs, 0.5)),
    );
    eprintln!(
        "TLS rtt p50 {:.1} us vs plain {:.1} us ({:.2}x); handshake p50 {:.0} us (socat {:.0} us)",
        tls_rtt.p50,
        plain_rtt.p50,
        tls_rtt.p50 / plain_rtt.p50,
        us(percentile(&handshakes, 0.5)),
        us(percentile(&socat_hs, 0.5))
    );
}

fn tls_client_config(dir: &Path) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_file(dir.join("ca.crt")).unwrap())
        .unwrap();
    let certs = vec![CertificateDer::from_pem_file(dir.join("bench.crt")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(dir.join("bench.key")).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .unwrap(),
    )
}

fn idle(mode: &Mode, r: &mut Report) {
    let dir = tempfile::tempdir().unwrap();
    let n = 16;
    let mods: Vec<EmuModule> = (0..n).map(|i| EmuModule::new(dir.path(), i)).collect();
    let paths: Vec<PathBuf> = mods.iter().map(|m| m.path()).collect();
    let refs: Vec<&Path> = paths.iter().map(PathBuf::as_path).collect();
    let t0 = Instant::now();
    let s = start(Kind::Lucidgate, &refs, 29100, "").expect("lucidgate starts");
    let startup = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let pid = s.children[0].id();
    let window = if mode.full {
        Duration::from_secs(10)
    } else {
        Duration::from_secs(2)
    };
    let (c0, w0) = (tree_cpu(pid), wakeups(pid));
    std::thread::sleep(window);
    let (c1, w1) = (tree_cpu(pid), wakeups(pid));
    let cpu = (c1 - c0).as_secs_f64() / window.as_secs_f64() * 100.0;
    let wps = (w1 - w0) as f64 / window.as_secs_f64();
    eprintln!(
        "16 modules: startup to all ports open {:.0} ms; idle CPU {cpu:.2}%, {wps:.1} wake-ups/s",
        startup.as_secs_f64() * 1e3
    );
    r.startup_ms_16 = Some(startup.as_secs_f64() * 1e3);
    r.idle_cpu_percent_16 = Some(cpu);
    r.idle_wakeups_per_s_16 = Some(wps);
}

/// The output files' name: the pinned run is kept beside the unpinned one.
fn stem(r: &Report) -> &'static str {
    if r.pinned {
        "benchmarks-pinned"
    } else {
        "benchmarks"
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}"))
        .unwrap_or_else(|| "stalled".into())
}

fn markdown(r: &Report) -> String {
    let mut md = String::new();
    md.push_str(if r.pinned {
        "# Benchmarks, pinned to one CPU\n\n"
    } else {
        "# Benchmarks\n\n"
    });
    md.push_str(&format!(
        "Measured {} on {} with `cargo bench --bench relay -- --full{} --out docs`, all servers in one run,\n\
         in front of the same module emulator on ptys, with the same client. Shared machines are noisy:\n\
         read the ratios, not the absolute numbers. Goals, profile and before/after: [performance.md](performance.md).{}\n\n",
        r.date,
        r.machine,
        if r.pinned { " --pinned" } else { "" },
        if r.pinned {
            "\nPinned: servers, clients and emulators all on CPU 0 (a relay cannot hide work on another core)."
        } else {
            ""
        }
    ));
    let lg = r.single.iter().find(|x| x.server == "lucidgate");
    md.push_str(
        "## One module: round trip (GetIo, 4-byte request, 6-byte answer) and bulk throughput\n\n",
    );
    md.push_str("| server | p50 µs | p99 µs | p99.9 µs | p50 vs lucidgate | up MB/s | down MB/s | duplex up/down MB/s | CPU µs / request | CPU µs / MiB up |\n|---|---:|---:|---:|---:|---:|---:|---|---:|---:|\n");
    for row in &r.single {
        let ratio = match (row.rtt_p50_us, lg.and_then(|l| l.rtt_p50_us)) {
            (Some(a), Some(b)) => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        md.push_str(&format!(
            "| {} | {} | {} | {} | {ratio} | {} | {} | {} / {} | {} | {} |\n",
            row.server,
            fmt_opt(row.rtt_p50_us, 1),
            fmt_opt(row.rtt_p99_us, 1),
            fmt_opt(row.rtt_p999_us, 1),
            fmt_opt(row.up_mb_s, 2),
            fmt_opt(row.down_mb_s, 2),
            fmt_opt(row.duplex_up_mb_s, 2),
            fmt_opt(row.duplex_down_mb_s, 2),
            fmt_opt(row.cpu_us_per_request, 1),
            fmt_opt(row.cpu_us_per_mib_up, 0),
        ));
    }
    if let Some(b) = r.bare_pty_rtt_p50_us {
        md.push_str(&format!(
            "\nBare pty (the emulator's pty opened directly, no relay): p50 {b:.1} µs. CPU: the server's process tree, scheduler accounting.\n"
        ));
    }
    md.push_str(&format!("\n\"stalled\": no progress for 5 s (a full-duplex bulk transfer that deadlocks).\n\n![round-trip distributions]({}-rtt.png)\n\n", stem(r)));
    md.push_str("## Many modules\n\nAll modules loaded at once, one client each. RSS and CPU of the whole server process tree (socat: one process per module).\n\n");
    md.push_str("| server | modules | processes | RSS kB | CPU ms / 10k requests | p99 µs under load |\n|---|---:|---:|---:|---:|---:|\n");
    for s in &r.scale {
        md.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {:.0} |\n",
            s.server, s.modules, s.processes, s.rss_kb, s.cpu_ms_per_10k, s.p99_us_under_load
        ));
    }
    if let (Some(a), Some(rm)) = (&r.hotplug_add_ms, &r.hotplug_remove_ms) {
        md.push_str(&format!(
            "\n## Hotplug (lucidgate only: socat and ser2net have no hotplug)\n\nudev add event → port accepting: median {:.1} ms, max {:.1} ms; remove → port closed: median {:.1} ms, max {:.1} ms ({} cycles, umockdev).\n",
            a[a.len() / 2],
            a[a.len() - 1],
            rm[rm.len() / 2],
            rm[rm.len() - 1],
            a.len()
        ));
    }
    if !r.tls.is_empty() {
        let g = |k: &str| r.tls.get(k).copied().unwrap_or(f64::NAN);
        md.push_str(&format!(
            "\n## TLS\n\n| | p50 µs | p99 µs | handshake p50 µs |\n|---|---:|---:|---:|\n| lucidgate plain | {:.1} | {:.1} | - |\n| lucidgate mTLS | {:.1} | {:.1} | {:.0} |\n| socat openssl-listen (mTLS) | {:.1} | {:.1} | {:.0} |\n\nmTLS round trip / plain: {:.2}x (goal ≤ 1.2x).\n",
            g("lucidgate_plain_rtt_p50_us"),
            g("lucidgate_plain_rtt_p99_us"),
            g("lucidgate_mtls_rtt_p50_us"),
            g("lucidgate_mtls_rtt_p99_us"),
            g("lucidgate_handshake_p50_us"),
            g("socat_tls_rtt_p50_us"),
            g("socat_tls_rtt_p99_us"),
            g("socat_tls_handshake_p50_us"),
            g("lucidgate_mtls_rtt_p50_us") / g("lucidgate_plain_rtt_p50_us"),
        ));
    }
    if !r.instructions.is_empty() {
        md.push_str("\n## Instructions (callgrind)\n\nUser-space instructions of the server's processes, counted by `valgrind --tool=callgrind` between a zero and a dump on an open connection after a warm-up (start-up, connection set-up and shutdown left out; socat's per-connection fork counted). Independent of how busy the machine is; the kernel's work in syscalls is not included.\n\n| server | per request (GetIo) | per MiB up | per MiB down | per request vs lucidgate | per MiB up vs lucidgate |\n|---|---:|---:|---:|---:|---:|\n");
        let lg = r.instructions.iter().find(|x| x.server == "lucidgate");
        for x in &r.instructions {
            let ratio = |a: Option<f64>, b: Option<f64>| {
                a.zip(b)
                    .map(|(a, b)| format!("{:.2}x", a / b))
                    .unwrap_or_else(|| "-".into())
            };
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} |\n",
                x.server,
                fmt_opt(x.per_request, 0),
                fmt_opt(x.per_mib_up, 0),
                fmt_opt(x.per_mib_down, 0),
                ratio(x.per_request, lg.and_then(|l| l.per_request)),
                ratio(x.per_mib_up, lg.and_then(|l| l.per_mib_up)),
            ));
        }
    }
    md.push_str("\n## Goals (issue 21)\n\n");
    md.push_str(&goals::markdown(&goals::goals(r)));
    if !r.failures.is_empty() {
        md.push_str("\n## Servers that did not start\n\n");
        for f in &r.failures {
            md.push_str(&format!("- {f}\n"));
        }
    }
    if let (Some(s), Some(c), Some(w)) = (
        r.startup_ms_16,
        r.idle_cpu_percent_16,
        r.idle_wakeups_per_s_16,
    ) {
        md.push_str(&format!(
            "\n## Start-up and idle (16 modules)\n\nStart to all 16 ports accepting: {s:.0} ms. Idle: {c:.2} % CPU, {w:.1} context switches/s.\n"
        ));
    }
    md
}

/// The round-trip distributions as an SVG (CDF, log-x), turned into PNG with rsvg-convert.
fn plot(r: &Report, out: &Path) {
    let (w, h, ml, mb) = (900.0, 500.0, 70.0, 50.0);
    let all: Vec<f64> = r.rtt_samples.values().flatten().copied().collect();
    if all.is_empty() {
        return;
    }
    let lo = all
        .iter()
        .copied()
        .fold(f64::MAX, f64::min)
        .max(1.0)
        .log10()
        .floor();
    let hi = all.iter().copied().fold(0.0, f64::max).log10().ceil();
    let x = |v: f64| ml + (v.max(1.0).log10() - lo) / (hi - lo) * (w - ml - 20.0);
    let y = |q: f64| h - mb - q * (h - mb - 20.0);
    let colors = ["#d62728", "#1f77b4", "#2ca02c", "#ff7f0e"];
    let mut svg = format!(
        "<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='13'><rect width='100%' height='100%' fill='white'/>"
    );
    for d in (lo as i32)..=(hi as i32) {
        let xv = x(10f64.powi(d));
        svg.push_str(&format!("<line x1='{xv}' y1='20' x2='{xv}' y2='{}' stroke='#ddd'/><text x='{xv}' y='{}' text-anchor='middle'>{} µs</text>", h - mb, h - mb + 18.0, 10f64.powi(d)));
    }
    for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
        svg.push_str(&format!(
            "<text x='{}' y='{}' text-anchor='end'>{q}</text>",
            ml - 6.0,
            y(q) + 4.0
        ));
    }
    svg.push_str(&format!("<text x='{}' y='{}' text-anchor='middle'>round trip (log scale); y: fraction of requests at or below</text>", w / 2.0, h - 8.0));
    let names = [
        "lucidgate",
        "socat",
        "ser2net (chardelay: false)",
        "ser2net (default)",
    ];
    for (i, name) in names.iter().enumerate() {
        let Some(s) = r.rtt_samples.get(*name) else {
            continue;
        };
        let n = s.len() as f64;
        let step = (s.len() / 400).max(1);
        let pts: Vec<String> = s
            .iter()
            .enumerate()
            .step_by(step)
            .map(|(k, v)| format!("{:.1},{:.1}", x(*v), y((k + 1) as f64 / n)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill='none' stroke='{}' stroke-width='2' points='{}'/>",
            colors[i],
            pts.join(" ")
        ));
        svg.push_str(&format!("<rect x='{}' y='{}' width='14' height='4' fill='{}'/><text x='{}' y='{}'>{name}</text>", ml + 10.0, 30.0 + i as f64 * 18.0, colors[i], ml + 30.0, 36.0 + i as f64 * 18.0));
    }
    svg.push_str("</svg>");
    let svg_path = out.join(format!("{}-rtt.svg", stem(r)));
    std::fs::write(&svg_path, svg).unwrap();
    match Command::new("rsvg-convert")
        .arg("-o")
        .arg(out.join(format!("{}-rtt.png", stem(r))))
        .arg(&svg_path)
        .status()
    {
        Ok(s) if s.success() => {
            let _ = std::fs::remove_file(&svg_path);
        }
        _ => eprintln!(
            "rsvg-convert (librsvg2-bin) not found: left {}",
            svg_path.display()
        ),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--full");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from);
    let pinned = args.iter().any(|a| a == "--pinned");
    let mode = if full {
        Mode {
            full,
            instr_requests: 5_000,
            instr_bytes: 16 << 20,
            rtt_requests: 10_000,
            bulk_bytes: 16 << 20,
            module_counts: vec![1, 16, 64],
            load_requests: 20_000,
            out,
        }
    } else {
        Mode {
            full,
            instr_requests: 500,
            instr_bytes: 2 << 20,
            rtt_requests: 500,
            bulk_bytes: 1 << 20,
            module_counts: vec![1, 4],
            load_requests: 2_000,
            out,
        }
    };
    if pinned {
        // Server, client and emulator on one CPU (`--pinned`): the fair measure of efficiency
        // on a small board, where a relay cannot hide its work on another core.
        // Children (servers) and threads (emulators, clients) inherit this.
        let mut one = nix::sched::CpuSet::new();
        one.set(0).unwrap();
        nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one)
            .expect("pinning the benchmark to CPU 0");
    }
    for tool in ["socat", "ser2net"] {
        if Command::new(tool)
            .arg("-V")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            eprintln!("{tool} is needed for the side-by-side benchmark: apt-get install {tool}");
            std::process::exit(2);
        }
    }
    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let mut r = Report {
        date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        // Online CPUs, not `available_parallelism` (1 once `--pinned` has set the affinity).
        machine: format!(
            "{machine}, {} cores{}",
            nix::unistd::sysconf(nix::unistd::SysconfVar::_NPROCESSORS_ONLN)
                .ok()
                .flatten()
                .unwrap_or(1),
            if pinned {
                ", all work pinned to CPU 0"
            } else {
                ""
            }
        ),
        mode: if full { "full".into() } else { "quick".into() },
        pinned,
        ..Default::default()
    };
    // `--instructions`: the callgrind counts alone (with BENCH_CALLGRIND_KEEP=DIR, to see
    // where they go).
    let only_instructions = args.iter().any(|a| a == "--instructions");
    if !only_instructions {
        single_module(&mode, &mut r);
        scale(&mode, &mut r);
        hotplug(&mode, &mut r);
        tls(&mode, &mut r);
        idle(&mode, &mut r);
    }
    instructions::instructions(&mode, &mut r);
    let md = markdown(&r);
    println!("{md}");
    if let Some(out) = &mode.out {
        std::fs::create_dir_all(out).unwrap();
        std::fs::write(out.join(format!("{}.md", stem(&r))), &md).unwrap();
        std::fs::write(
            out.join(format!("{}.json", stem(&r))),
            serde_json::to_string_pretty(&r).unwrap(),
        )
        .unwrap();
        plot(&r, out);
    }
    if only_instructions {
        return;
    }
    // Sanity, not goals: the runner must have measured something real.
    let lg = r
        .single
        .iter()
        .find(|x| x.server == "lucidgate")
        .expect("lucidgate measured");
    assert!(lg.rtt_p50_us.is_some() && lg.up_mb_s.is_some() && lg.down_mb_s.is_some());
    eprintln!("goals:\n{}", goals::markdown(&goals::goals(&r)));
    eprintln!("bench: ok (mode {})", r.mode);
}
