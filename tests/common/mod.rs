//! Shared helpers of the end-to-end tests: a real `lucidgate serve` process, a umockdev test bed
//! with emulated modules behind it, `lucidgate emulate` on ptys, and real clients (std TCP and
//! socat). Nothing here mocks lucidgate's own logic.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use lucidgate::protocol::Answer;
use lucidgate::status::{ModuleStatus, StatusReport};

/// How long a test waits for something that should take milliseconds.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub const AO4: &str = "11001001FA480000";

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_lucidgate"))
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Fails with the fix when a system tool the tests need is missing.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: run ./scripts/test (it installs the test packages) or see README"
    );
}

/// Polls `f` until it returns `Some` or PATIENCE runs out.
pub fn wait_until<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(t) = f() {
            return t;
        }
        assert!(start.elapsed() < PATIENCE, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

// TCP ports. No test names a port number: a daemon's `[ports]` range comes from
// [`port_block`], any other port a test listens on or configures from [`free_port`]. Both hand
// out a slot of their region that no other test of this process and no other test process
// running at the same time holds, and whose ports were all free on 127.0.0.1 when it was taken.
//
// A slot is claimed with a guard: a listener on the port right after the slot's own ports,
// kept until the process exits (the kernel closes it also when the process crashes). Another
// process cannot bind the guard, so it skips the slot: no lock files, nothing to clean up. The
// guard port is in no slot, so no daemon ever needs it. The slot's own ports are checked by
// binding each once (1000 binds take milliseconds) and are handed out unbound, for the daemon
// to bind. Unlike binding port 0 and passing the number on, no other test can be given the
// same port in between; only an unrelated program could take it.

/// `[ports] span` of every test daemon (see [`Daemon::rewrite_config`]): a block from
/// [`port_block`] is this many ports from its base.
pub const PORT_SPAN: u16 = 1000;

/// Where [`port_block`] takes daemon blocks from: slots of `PORT_SPAN` ports plus a guard port.
/// Above [`DEFAULT_PORTS`], below [`EPHEMERAL_FLOOR`]: 27 slots.
pub const BLOCK_PORTS: Range<u16> = 5_000..EPHEMERAL_FLOOR;

/// Where [`free_port`] takes single ports from: slots of one port plus a guard port (500).
/// Below [`DEFAULT_PORTS`] and away from the privileged ports (< 1024).
pub const SINGLE_PORTS: Range<u16> = 3_000..DEFAULT_PORTS.start;

/// Ports never handed out: lucidgate's default `[ports]` (base 4000, span 1000). The README
/// demo test (`migrate.rs`) serves on 4216 with the default config, and a lucidgate installed
/// on the machine would serve there too.
pub const DEFAULT_PORTS: Range<u16> = 4_000..5_000;

/// Start of Linux's default ephemeral range (`net.ipv4.ip_local_port_range`, 32768..60999):
/// the kernel picks the local port of a client socket from there, so a port the tests hand
/// out below it is never also taken by some connection's client end.
pub const EPHEMERAL_FLOOR: u16 = 32_768;

const _: () = assert!(
    SINGLE_PORTS.start >= 1024
        && SINGLE_PORTS.end <= DEFAULT_PORTS.start
        && BLOCK_PORTS.start >= DEFAULT_PORTS.end
        && BLOCK_PORTS.end <= EPHEMERAL_FLOOR
);

/// Guards of the slots this process holds (see above); never released.
static GUARDS: Mutex<Vec<TcpListener>> = Mutex::new(Vec::new());
/// How many block / single slots this process has tried so far.
static BLOCKS_TRIED: AtomicUsize = AtomicUsize::new(0);
static SINGLES_TRIED: AtomicUsize = AtomicUsize::new(0);

/// The base of a free range of [`PORT_SPAN`] ports for a daemon's `[ports] base`; any port
/// in `base..base + PORT_SPAN` may also be given to that daemon as a fixed port.
pub fn port_block() -> u16 {
    claim_slot(BLOCK_PORTS, PORT_SPAN, &BLOCKS_TRIED)
}

/// A free port for a single listener (a fixed module port, the metrics endpoint, ...).
pub fn free_port() -> u16 {
    claim_slot(SINGLE_PORTS, 1, &SINGLES_TRIED)
}

/// Claims the next slot of `width` ports (and a guard port after them) in `region` that is
/// free; returns its first port. Processes start at different slots (by process id) so that
/// test processes running side by side rarely even try the same one.
fn claim_slot(region: Range<u16>, width: u16, tried: &AtomicUsize) -> u16 {
    let stride = width as usize + 1;
    let slots = region.len() / stride;
    let first = std::process::id() as usize;
    let free = |p: u16| TcpListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok();
    for _ in 0..slots {
        let slot = (first + tried.fetch_add(1, Ordering::Relaxed)) % slots;
        let base = region.start + (slot * stride) as u16;
        let guard = base + width;
        // Held by another test process (or by this one), or used by something else.
        let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, guard)) else {
            continue;
        };
        if (base..guard).all(free) {
            GUARDS.lock().unwrap().push(listener);
            return base;
        }
    }
    panic!(
        "no free slot of {width} port(s) left in {region:?} on 127.0.0.1: this process holds \
         {} slots, the rest are held by test processes running at the same time or in use",
        GUARDS.lock().unwrap().len()
    );
}

/// A running `lucidgate serve` with its own config, state dir and control socket.
pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub log: PathBuf,
    pub base: u16,
    /// Extra environment for the daemon (NOTIFY_SOCKET, ...).
    pub env: Vec<(String, String)>,
    /// A command the daemon runs under (e.g. `unshare -m ...`); the daemon's argv is appended.
    pub wrapper: Vec<String>,
    /// Extra arguments after `serve`.
    pub args: Vec<String>,
}

impl Daemon {
    /// Writes a config (loopback only, ports from `base`) plus `extra` and starts the daemon;
    /// under `bed`'s umockdev preload when given. Returns once `status` answers.
    pub fn start(base: u16, extra: impl std::fmt::Display, bed: Option<&Umockdev>) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, base, extra, bed)
    }

    /// Like [`start`], reusing a directory (and so the state) of an earlier daemon.
    pub fn start_in(
        dir: tempfile::TempDir,
        base: u16,
        extra: impl std::fmt::Display,
        bed: Option<&Umockdev>,
    ) -> Daemon {
        let mut d = Self::prepare(dir, base, extra);
        d.spawn(bed, &[]);
        d
    }

    /// Writes the config but does not start the daemon (set `env`/`wrapper`, then `restart`).
    pub fn prepare(dir: tempfile::TempDir, base: u16, extra: impl std::fmt::Display) -> Daemon {
        let config = dir.path().join("lucidgate.toml");
        let log = dir.path().join("daemon.log");
        let d = Daemon {
            child: None,
            dir,
            config,
            log,
            base,
            env: Vec::new(),
            wrapper: Vec::new(),
            args: Vec::new(),
        };
        d.rewrite_config(extra);
        d
    }

    /// Writes the config: loopback only, state and socket in the test's directory, ports from
    /// `base`, plus `extra` (also how reload tests change it): a [`Conf`], or TOML as text.
    pub fn rewrite_config(&self, extra: impl std::fmt::Display) {
        let extra = extra.to_string();
        let state = self.dir.path().join("state");
        let sock = self.dir.path().join("control.sock");
        std::fs::write(
            &self.config,
            format!(
                "listen = [\"127.0.0.1\"]\nstate_dir = \"{}\"\ncontrol_socket = \"{}\"\n{extra}\n[ports]\nbase = {}\nspan = {PORT_SPAN}\n{}{}",
                state.display(),
                sock.display(),
                self.base,
                // Tests talk to loopback only: no mDNS on the host's network unless a test
                // asks for it (in a network namespace of its own).
                if extra.contains("[discovery]") { "" } else { "[discovery]\nmdns = false\n" },
                // The relay tests talk plain TCP unless they set [relay] themselves.
                if extra.contains("[relay]") { "" } else { "[relay]\ntransport = \"plain\"\n" }
            ),
        )
        .unwrap();
    }

    /// Sends a signal to the daemon.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig).unwrap();
    }

    fn spawn(&mut self, bed: Option<&Umockdev>, args: &[&str]) {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = match bed {
            Some(b) => {
                let mut c = Command::new("umockdev-wrapper");
                c.arg(bin()).env("UMOCKDEV_DIR", &b.root);
                c
            }
            None if !self.wrapper.is_empty() => {
                let mut c = Command::new(&self.wrapper[0]);
                c.args(&self.wrapper[1..]).arg(bin());
                c
            }
            None => {
                let mut c = Command::new(bin());
                c.arg("--log-level").arg("debug");
                c
            }
        };
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        cmd.arg("-c")
            .arg(&self.config)
            .arg("serve")
            .args(args)
            .args(&self.args)
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(logf.try_clone().unwrap())
            .stderr(logf);
        if bed.is_none() {
            cmd.arg("--no-udev");
        }
        self.child = Some(cmd.spawn().expect("starting lucidgate serve"));
        let start = Instant::now();
        loop {
            if self.try_status().is_some() {
                break;
            }
            if let Some(st) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "lucidgate serve exited with {st} during start:\n{}",
                    self.log()
                );
            }
            assert!(
                start.elapsed() < PATIENCE,
                "daemon not ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts the daemon again (after [`stop`]) with the same config and state.
    pub fn restart(&mut self, bed: Option<&Umockdev>) {
        assert!(self.child.is_none(), "stop the daemon first");
        self.spawn(bed, &[]);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(bin())
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .unwrap()
    }

    /// `status --json` as the daemon wrote it, when it answers (for the checks of the wire form;
    /// everything else reads [`status`](Self::status)).
    pub fn try_status_json(&self) -> Option<String> {
        let out = self.cli(&["status", "--json"]);
        out.status
            .success()
            .then(|| String::from_utf8(out.stdout).expect("status --json is UTF-8"))
    }

    /// The status report, when the daemon answers. An answer that is not a status report fails
    /// the test.
    pub fn try_status(&self) -> Option<StatusReport> {
        let json = self.try_status_json()?;
        Some(
            serde_json::from_str(&json)
                .unwrap_or_else(|e| panic!("status --json is not a status report ({e}):\n{json}")),
        )
    }

    pub fn status(&self) -> StatusReport {
        self.try_status()
            .unwrap_or_else(|| panic!("status failed; daemon log:\n{}", self.log()))
    }

    pub fn module(&self, serial: &str) -> Option<ModuleStatus> {
        self.status()
            .modules
            .into_iter()
            .find(|m| m.serial == serial)
    }

    /// Waits until `serial` is served and returns its port.
    pub fn wait_serving(&self, serial: &str) -> u16 {
        let start = Instant::now();
        loop {
            if let Some(m) = self.module(serial)
                && m.state == "serving"
            {
                return m.port.expect("a served module has a port");
            }
            assert!(
                start.elapsed() < PATIENCE,
                "{serial} not served; status {:?}\nlog:\n{}",
                self.status(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits until `serial` is absent from status.
    pub fn wait_absent(&self, serial: &str) {
        wait_until(&format!("{serial} to leave status"), || {
            self.module(serial).is_none().then_some(())
        });
    }

    /// SIGTERM, then waits for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let start = Instant::now();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            assert!(
                start.elapsed() < PATIENCE,
                "daemon did not stop on SIGTERM:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Open file descriptors of the daemon process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .count()
    }

    /// (resident, peak resident) memory of the daemon process in KiB.
    pub fn memory_kib(&self) -> (u64, u64) {
        let st = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let field = |name: &str| {
            st.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in /proc/PID/status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    /// Tasks alive in the daemon's async runtime (from `status --json`).
    pub fn task_count(&self) -> usize {
        self.status().tasks
    }

    /// Tasks (threads) of the daemon process.
    pub fn thread_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/task", self.pid()))
            .unwrap()
            .count()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("--- daemon log ---\n{}", self.log());
        }
    }
}

/// A umockdev test bed run by `tests/common/umockdev_harness.py`.
pub struct Umockdev {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub root: String,
}

impl Umockdev {
    pub fn start() -> Umockdev {
        require_tool("umockdev-wrapper");
        let mut child = Command::new("umockdev-wrapper")
            .arg("/usr/bin/python3")
            .arg(repo().join("tests/common/umockdev_harness.py"))
            .arg(bin())
            .arg(repo().join("tests/fixtures/lucidio-ao4.umockdev"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting the umockdev harness");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let root = line
            .strip_prefix("root ")
            .unwrap_or_else(|| {
                panic!(
                    "harness did not start (python3-gi, gir1.2-umockdev-1.0 installed?): {line:?}"
                )
            })
            .trim()
            .to_string();
        Umockdev {
            child,
            stdin,
            stdout,
            root,
        }
    }

    fn call(&mut self, line: &str) -> String {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
        let mut answer = String::new();
        self.stdout.read_line(&mut answer).unwrap();
        let answer = answer.trim().to_string();
        assert!(answer.starts_with("ok"), "harness: {line} -> {answer}");
        answer.trim_start_matches("ok").trim().to_string()
    }

    /// Adds a module (`quiet`: no uevent, i.e. present before the daemon starts); returns its
    /// syspath.
    pub fn add(
        &mut self,
        idx: u32,
        serial: &str,
        vendor: &str,
        model: &str,
        quiet: bool,
    ) -> String {
        self.call(&format!(
            "add {idx} {serial} {vendor} {model}{}",
            if quiet { " quiet" } else { "" }
        ))
    }

    pub fn add_module(&mut self, idx: u32, serial: &str) -> String {
        self.add(idx, serial, "deciphe_it", "LucidIo_AO4", false)
    }

    pub fn change(&mut self, syspath: &str, props: &[(&str, &str)]) {
        let kv: Vec<String> = props.iter().map(|(k, v)| format!("{k}={v}")).collect();
        self.call(&format!("change {syspath} {}", kv.join(" ")));
    }

    /// Plugs in a USB stick whose partition holds a copy of `image`; returns its syspath and
    /// the file that backs its device node (to read what lucidgate wrote).
    pub fn add_stick(&mut self, idx: u32, image: &Path, fstype: &str) -> (String, PathBuf) {
        let answer = self.call(&format!("addstick {idx} {} {fstype}", image.display()));
        let (syspath, backing) = answer.split_once(' ').expect("syspath and backing file");
        (syspath.to_string(), PathBuf::from(backing))
    }

    pub fn remove_stick(&mut self, syspath: &str) {
        self.call(&format!("removestick {syspath}"));
    }

    pub fn remove(&mut self, syspath: &str) {
        self.call(&format!("remove {syspath}"));
    }
}

impl Drop for Umockdev {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "quit");
        let _ = self.stdin.flush();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `lucidgate emulate --link PATH` as a child process: a module on a pty.
pub struct Emulator {
    child: Child,
    pub link: PathBuf,
}

impl Emulator {
    pub fn start(link: &Path, class: &str, serial: &str) -> Emulator {
        Self::start_with(link, class, serial, &[])
    }

    pub fn start_with(link: &Path, class: &str, serial: &str, extra: &[&str]) -> Emulator {
        let child = Command::new(bin())
            .args(["emulate", "--class", class, "--serial", serial, "--link"])
            .arg(link)
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .expect("starting lucidgate emulate");
        wait_until("the emulator's link", || link.exists().then_some(()));
        Emulator {
            child,
            link: link.to_path_buf(),
        }
    }

    /// Pulls the plug: SIGKILL, the pty master closes, the daemon sees a hang-up.
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.link);
    }

    /// Stops cleanly and returns how many requests, and of them writes, the module received.
    pub fn stop_counted(mut self) -> (u64, u64) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let mut out = String::new();
        std::io::Read::read_to_string(self.child.stdout.as_mut().unwrap(), &mut out).unwrap();
        assert!(
            self.child.wait().unwrap().success(),
            "emulator failed: {out}"
        );
        let last = out.lines().last().unwrap_or("");
        let n: Vec<u64> = last
            .split_whitespace()
            .filter_map(|w| w.parse().ok())
            .collect();
        assert_eq!(n.len(), 2, "emulator's counts line: {last:?}");
        (n[0], n[1])
    }

    /// Stops cleanly (SIGTERM): the link is removed by the emulator itself.
    pub fn stop(mut self) -> ExitStatus {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        self.child.wait().unwrap()
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects to a relay on loopback.
pub fn connect(port: u16) -> TcpStream {
    let s = wait_until(&format!("port {port} to accept"), || {
        TcpStream::connect(("127.0.0.1", port)).ok()
    });
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Reads one LucidControl answer frame from `s`.
pub fn read_answer(s: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 300];
    loop {
        if let Ok(n) = Answer::check(&buf) {
            assert_eq!(n, buf.len(), "more bytes than one answer: {buf:02X?}");
            return Ok(buf);
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Sends one request on `s` and reads its answer.
pub fn ask<S: Read + Write>(s: &mut S, req: &[u8]) -> Vec<u8> {
    s.write_all(req).unwrap();
    read_answer(s).expect("an answer")
}

/// GetId and GetIo request bytes.
pub const GET_ID: [u8; 4] = [0xC0, 0x00, 0x00, 0x00];
pub const GET_IO_UV: [u8; 4] = [0x46, 0x00, 0x1D, 0x00];

/// The GetId answer the emulator gives for `serial` (fw 0x0104, hw 2).
pub fn get_id_answer(serial: &str) -> Vec<u8> {
    let m = lucidgate::emulator::Module::from_usb_serial(serial).unwrap();
    let mut out = vec![0x00, 0x10];
    out.extend(m.identity.encode());
    out
}

/// Sends `req` with a real socat client (`socat - TCP:127.0.0.1:PORT`) and returns what came back.
pub fn socat_exchange(port: u16, req: &[u8]) -> Vec<u8> {
    require_tool("socat");
    let mut child = Command::new("socat")
        .args(["-t", "2", "-", &format!("TCP:127.0.0.1:{port}")])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(req).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "socat failed: {out:?}");
    out.stdout
}

/// Issues a client certificate with `lucidgate cert issue-client NAME ARGS --out DIR` against
/// the daemon's config; returns DIR (NAME.pem, NAME.key, NAME.crt, ca.crt).
pub fn issue_client(d: &Daemon, name: &str, args: &[&str]) -> PathBuf {
    let out = d.dir.path().join(format!("clients-{name}"));
    let mut all = vec!["cert", "issue-client", name];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--out", out.to_str().unwrap()]);
    let o = d.cli(&all);
    assert!(
        o.status.success(),
        "issue-client failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

/// One request through `socat - openssl-connect:...` with a client certificate (the client side
/// of the vendor article, with TLS); returns what came back.
pub fn socat_tls(port: u16, dir: &Path, name: &str, req: &[u8]) -> Vec<u8> {
    require_tool("socat");
    let addr = format!("{},verify=1", socat_tls_address(port, dir, name));
    let mut child = Command::new("socat")
        .args(["-t", "2", "-", &addr])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(req).unwrap();
    child.wait_with_output().unwrap().stdout
}

/// socat's address of a TLS connection to `port` on loopback that presents the client
/// certificate NAME of `dir` (NAME.pem, key and certificate) and verifies the server with
/// `dir`'s `ca.crt`, as in a directory made by [`issue_client`].
pub fn socat_tls_address(port: u16, dir: &Path, name: &str) -> String {
    format!(
        "openssl-connect:127.0.0.1:{port},cert={},cafile={}",
        dir.join(format!("{name}.pem")).display(),
        dir.join("ca.crt").display()
    )
}

/// The `openssl s_client` arguments that present the client certificate NAME of `dir`:
/// `-cert dir/NAME.crt -key dir/NAME.key` (as in a directory made by [`issue_client`]).
pub fn cert_args(dir: &Path, name: &str) -> Vec<String> {
    let file = |ext: &str| dir.join(format!("{name}.{ext}")).display().to_string();
    vec!["-cert".into(), file("crt"), "-key".into(), file("key")]
}

/// One request through `openssl s_client -quiet` with the given extra arguments (e.g.
/// [`cert_args`]); returns (bytes received, stderr).
pub fn s_client(
    port: u16,
    ca: &Path,
    extra: &[impl AsRef<std::ffi::OsStr>],
    req: &[u8],
) -> (Vec<u8>, String) {
    require_tool("openssl");
    let mut child = Command::new("timeout")
        .args([
            "10",
            "openssl",
            "s_client",
            "-quiet",
            "-no_ign_eof",
            "-connect",
        ])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-CAfile")
        .arg(ca)
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(req);
    // Give the answer time to arrive before EOF makes s_client close the session.
    std::thread::sleep(Duration::from_millis(800));
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    (
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The `extra` part of a test daemon's config ([`Daemon::start`], [`Daemon::rewrite_config`]),
/// written as TOML by `Display`: `[[device]]` entries, then the tables in the order first named.
/// Keys are TOML lines as in the config file; naming a table again adds to it.
///
/// ```ignore
/// Conf::new()
///     .device(&link, AO4)
///     .relay(r#"policy = "shared""#)
///     .limits("answer_timeout_ms = 300")
///     .module(AO4, r#"transport = "tls""#)
/// ```
///
/// `rewrite_config` adds `[relay] transport = "plain"` and `[discovery] mdns = false` unless
/// the extra has that table: any `.relay(...)` (even [`Conf::default_transport`]) gives up the
/// tests' plain TCP, and any `.table("discovery", ...)` the tests' mDNS off.
#[derive(Debug, Clone, Default)]
pub struct Conf {
    /// (path, serial) of each `[[device]]`.
    devices: Vec<(PathBuf, String)>,
    /// (header, key lines) of each table.
    tables: Vec<(String, Vec<String>)>,
}

impl Conf {
    pub fn new() -> Conf {
        Conf::default()
    }

    /// A `[[device]]` entry serving the tty at `link` as module `serial`.
    pub fn device(mut self, link: &Path, serial: &str) -> Conf {
        self.devices.push((link.to_path_buf(), serial.to_string()));
        self
    }

    /// Keys of `[relay]`.
    pub fn relay(self, keys: impl std::fmt::Display) -> Conf {
        self.table("relay", keys)
    }

    /// An empty `[relay]`: lucidgate's own default transport (mutual TLS) instead of the tests'
    /// plain TCP.
    pub fn default_transport(self) -> Conf {
        self.table("relay", "")
    }

    /// Keys of `[limits]`.
    pub fn limits(self, keys: impl std::fmt::Display) -> Conf {
        self.table("limits", keys)
    }

    /// Keys of `[modules."SERIAL"]`.
    pub fn module(self, serial: &str, keys: impl std::fmt::Display) -> Conf {
        self.table(&format!("modules.\"{serial}\""), keys)
    }

    /// Keys of any other table (`[tls]`, `[metrics]`, `[discovery]`, `[provision]` ...); an
    /// empty `keys` only makes sure the table is there.
    pub fn table(mut self, name: &str, keys: impl std::fmt::Display) -> Conf {
        let keys = keys.to_string();
        let i = match self.tables.iter().position(|(n, _)| n == name) {
            Some(i) => i,
            None => {
                self.tables.push((name.to_string(), Vec::new()));
                self.tables.len() - 1
            }
        };
        if !keys.is_empty() {
            self.tables[i].1.push(keys);
        }
        self
    }
}

impl std::fmt::Display for Conf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (path, serial) in &self.devices {
            writeln!(
                f,
                "[[device]]\npath = \"{}\"\nserial = \"{serial}\"",
                path.display()
            )?;
        }
        for (name, keys) in &self.tables {
            writeln!(f, "[{name}]")?;
            for k in keys {
                writeln!(f, "{}", k.trim_end_matches('\n'))?;
            }
        }
        Ok(())
    }
}

/// A TLS client configuration from a directory made by [`issue_client`] (rustls, as a real
/// peer: the server's certificate is verified against the directory's `ca.crt`).
pub fn tls_client_config(dir: &Path, name: &str) -> std::sync::Arc<rustls::ClientConfig> {
    tls_client_config_trusting(dir, name, &dir.join("ca.crt"))
}

/// Like [`tls_client_config`], verifying the server against the CA bundle `ca` instead (a
/// client that got the new CA after a rotation).
pub fn tls_client_config_trusting(
    dir: &Path,
    name: &str,
    ca: &Path,
) -> std::sync::Arc<rustls::ClientConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let chain: Vec<_> = CertificateDer::pem_file_iter(dir.join(format!("{name}.crt")))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    std::sync::Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

pub type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects with TLS and finishes the handshake (so a refusal shows here, not at first read).
pub fn tls_connect(
    port: u16,
    cfg: &std::sync::Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream> {
    let tcp = TcpStream::connect(("127.0.0.1", port))?;
    tcp.set_read_timeout(Some(Duration::from_secs(3)))?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into());
    let conn = rustls::ClientConnection::new(cfg.clone(), name).map_err(std::io::Error::other)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock)?;
    }
    Ok(s)
}

/// A small deterministic pseudo-random generator (xorshift64) for test inputs: the same seed
/// gives the same bytes, so a failure can be replayed.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| (self.next_u64() >> 24) as u8).collect()
    }
}

// FAT images for the provisioning tests (mkfs.vfat, mtools, fsck.fat).

/// An empty FAT image of `kib` KiB with label KEYS.
pub fn fat_image(dir: &Path, name: &str, kib: u32) -> PathBuf {
    require_tool("mkfs.vfat");
    let img = dir.join(name);
    let _ = std::fs::remove_file(&img);
    let out = Command::new("mkfs.vfat")
        .args(["-C", "-n", "KEYS"])
        .arg(&img)
        .arg(kib.to_string())
        .output()
        .unwrap();
    assert!(out.status.success(), "mkfs.vfat: {out:?}");
    img
}

/// Copies `data` to `path` on the image (parent directories made with mmd).
pub fn put(img: &Path, path: &str, data: &[u8]) {
    require_tool("mcopy");
    let mut dir = String::new();
    let parts: Vec<&str> = path.split('/').collect();
    for p in &parts[..parts.len() - 1] {
        dir.push('/');
        dir.push_str(p);
        let _ = Command::new("mmd")
            .arg("-i")
            .arg(img)
            .arg(format!("::{dir}"))
            .output();
    }
    let src = img.with_extension(format!("src-{}", path.replace('/', "_")));
    std::fs::write(&src, data).unwrap();
    let out = Command::new("mcopy")
        .args(["-o", "-i"])
        .arg(img)
        .arg(&src)
        .arg(format!("::/{path}"))
        .output()
        .unwrap();
    assert!(out.status.success(), "mcopy: {out:?}");
}

/// Reads `path` from the image, if it is there.
pub fn get(img: &Path, path: &str) -> Option<Vec<u8>> {
    let out = Command::new("mcopy")
        .arg("-i")
        .arg(img)
        .arg(format!("::/{path}"))
        .arg("-")
        .output()
        .unwrap();
    out.status.success().then_some(out.stdout)
}

pub fn get_text(img: &Path, path: &str) -> String {
    String::from_utf8(get(img, path).unwrap_or_else(|| panic!("{path} is not on the stick")))
        .unwrap()
}

/// `fsck.fat -n`: the filesystem lucidgate left is clean.
pub fn fsck(img: &Path) {
    let out = Command::new("fsck.vfat")
        .arg("-n")
        .arg(img)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "fsck.fat found damage:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
