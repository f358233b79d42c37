//! USB-stick provisioning against real FAT images: made with `mkfs.vfat`, filled with mtools,
//! checked with `fsck.fat` and `openssl verify`, the issued certificates used by socat through
//! `lucidgate serve`; every bad-stick case; a stick pulled at every write; the udev path through
//! umockdev.

mod common;

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

const TOKEN: &str = "plug-and-provision-42";

fn request(id: &str, token: &str, clients: &str) -> String {
    format!("id = \"{id}\"\ntoken = \"{token}\"\n{clients}")
}

const TWO_CLIENTS: &str = "[[client]]\nname = \"dashboard\"\nmodules = [\"11001001FA480000\"]\nread_only = true\ndays = 30\n\n[[client]]\nname = \"operator\"\nmodules = [\"*\"]\n";

/// `lucidgate -c CONFIG provision IMG`: exit code and output.
fn provision(config: &Path, img: &Path) -> (i32, String) {
    let out = Command::new(bin())
        .arg("-c")
        .arg(config)
        .arg("provision")
        .arg(img)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The client certificate lines of `cert list`.
fn client_lines(list: &str) -> Vec<&str> {
    list.lines()
        .filter(|l| l.starts_with("  ") && l.contains(" serial "))
        .collect()
}

fn issued_count(d: &Daemon) -> usize {
    let o = d.cli(&["cert", "list"]);
    client_lines(&String::from_utf8_lossy(&o.stdout)).len()
}

fn set_token(d: &Daemon) {
    let o = d.cli(&["provision", "set-token", "--token", TOKEN]);
    assert!(o.status.success(), "set-token: {o:?}");
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    assert!(
        cfg.contains("token_hash = \"pbkdf2-sha256$") && !cfg.contains(TOKEN),
        "only the hash is stored:\n{cfg}"
    );
}

/// A valid request: certificates on the stick that openssl accepts and that socat uses to reach
/// the module through `lucidgate serve`; the read-only one cannot write; the result file names
/// the device and its modules; plugging the stick in again reissues nothing.
#[test]
fn a_valid_stick_gets_working_certificates_once() {
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
    set_token(&d);

    let img = fat_image(dir.path(), "stick.img", 8192);
    put(
        &img,
        "lucidgate/request.toml",
        request("lab-1", TOKEN, TWO_CLIENTS).as_bytes(),
    );
    let (code, out) = provision(&d.config, &img);
    assert_eq!(code, 0, "{out}");
    fsck(&img);

    let result = get_text(&img, "lucidgate/result.toml");
    let r: toml::Value = toml::from_str(&result).unwrap();
    assert_eq!(r["status"].as_str(), Some("done"), "{result}");
    assert_eq!(r["request"].as_str(), Some("lab-1"));
    assert_eq!(
        r["modules"][AO4].as_integer(),
        Some(port as i64),
        "{result}"
    );
    assert!(!r["hostname"].as_str().unwrap().is_empty());
    assert_eq!(r["issued"].as_array().unwrap().len(), 2);

    // The files, as an operator copies them off the stick.
    let certs = dir.path().join("from-stick");
    std::fs::create_dir(&certs).unwrap();
    for f in [
        "ca.crt",
        "operator.pem",
        "operator.crt",
        "operator.key",
        "dashboard.pem",
    ] {
        std::fs::write(
            certs.join(f),
            get(&img, &format!("lucidgate/out/{f}")).unwrap(),
        )
        .unwrap();
    }
    let v = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(certs.join("ca.crt"))
        .arg(certs.join("operator.crt"))
        .output()
        .unwrap();
    assert!(v.status.success(), "openssl verify: {v:?}");
    assert_eq!(
        socat_tls(port, &certs, "operator", &GET_ID),
        get_id_answer(AO4)
    );
    let set = [0x40, 0x00, 0x1D, 0x04, 0xA0, 0x25, 0x26, 0x00];
    assert_eq!(socat_tls(port, &certs, "operator", &set), vec![0x00, 0x00]);
    assert_eq!(
        socat_tls(port, &certs, "dashboard", &set),
        vec![0xA0, 0x00],
        "the read-only certificate from the stick cannot write"
    );
    let log = d.log();
    assert!(!log.contains(TOKEN), "the token never reaches the logs");

    // Replugged: the same request is not processed again.
    let before = issued_count(&d);
    let pem_before = get(&img, "lucidgate/out/operator.pem").unwrap();
    let (code, out) = provision(&d.config, &img);
    assert_eq!(code, 0, "{out}");
    let result = get_text(&img, "lucidgate/result.toml");
    assert!(
        result.contains("status = \"duplicate\"") && result.contains("nothing was reissued"),
        "{result}"
    );
    assert_eq!(issued_count(&d), before, "nothing new issued");
    assert_eq!(get(&img, "lucidgate/out/operator.pem").unwrap(), pem_before);
    fsck(&img);
}

/// Every kind of bad stick: a clear result file (or log line where nothing can be written),
/// nothing issued, the filesystem intact.
#[test]
fn bad_sticks_are_refused_with_a_clear_reason_and_nothing_is_issued() {
    let dir = tempfile::tempdir().unwrap();
    let d = Daemon::start(port_block(), "", None);
    // No token configured yet: provisioning is off.
    let img = fat_image(dir.path(), "off.img", 2048);
    put(
        &img,
        "lucidgate/request.toml",
        request("r", TOKEN, TWO_CLIENTS).as_bytes(),
    );
    let (code, out) = provision(&d.config, &img);
    assert_eq!(code, 1, "{out}");
    let res = get_text(&img, "lucidgate/result.toml");
    assert!(
        res.contains("status = \"refused\"") && res.contains("provisioning is off"),
        "{res}"
    );
    assert!(get(&img, "lucidgate/out/operator.pem").is_none());
    fsck(&img);

    set_token(&d);
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "wrong token",
            request("r1", "guess-guess-guess", TWO_CLIENTS),
            "wrong token",
        ),
        (
            "no token",
            "[[client]]\nname = \"a\"\nmodules = [\"*\"]\n".into(),
            "has no token",
        ),
        (
            "malformed TOML",
            format!("token = \"{TOKEN}\"\n[[client]\nname = \"a\"\n"),
            "line 2",
        ),
        (
            "path traversal",
            request(
                "r2",
                TOKEN,
                "[[client]]\nname = \"../../etc/passwd\"\nmodules = [\"*\"]\n",
            ),
            "client[1].name",
        ),
        (
            "unknown field",
            request(
                "r3",
                TOKEN,
                "[[client]]\nname = \"a\"\nmodules = [\"*\"]\nadmin = true\n",
            ),
            "admin",
        ),
        (
            "huge file",
            format!(
                "{}\n# {}\n",
                request("r4", TOKEN, TWO_CLIENTS),
                "x".repeat(100_000)
            ),
            "at most 65536 bytes",
        ),
        (
            "too many clients",
            request(
                "r5",
                TOKEN,
                &(0..65)
                    .map(|i| format!("[[client]]\nname = \"c{i}\"\nmodules = [\"*\"]\n"))
                    .collect::<String>(),
            ),
            "at most 64 per request",
        ),
        (
            "import files missing",
            request(
                "r6",
                TOKEN,
                "[import]\nca = \"import/ca.crt\"\ncert = \"import/server.crt\"\nkey = \"import/server.key\"\n",
            ),
            "import.ca: lucidgate/import/ca.crt is not on the stick",
        ),
    ];
    let before = issued_count(&d);
    for (what, req, want) in &cases {
        let img = fat_image(dir.path(), "bad.img", 2048);
        put(&img, "lucidgate/request.toml", req.as_bytes());
        let (code, out) = provision(&d.config, &img);
        assert_eq!(code, 1, "{what}: {out}");
        let res = get_text(&img, "lucidgate/result.toml");
        assert!(
            res.contains("status = \"refused\"") && res.contains(want),
            "{what}: result.toml does not say {want:?}:\n{res}"
        );
        assert!(
            get(&img, "lucidgate/out/operator.pem").is_none(),
            "{what}: nothing may be written"
        );
        fsck(&img);
    }
    assert_eq!(issued_count(&d), before, "no bad stick issued anything");

    // Not FAT at all (a stick with another filesystem, or garbage): left alone, said why.
    let junk = dir.path().join("junk.img");
    std::fs::write(&junk, vec![0x5Au8; 1 << 20]).unwrap();
    let (code, out) = provision(&d.config, &junk);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not a FAT filesystem"), "{out}");
    // FAT without a request: not a provisioning stick, nothing written to it.
    let plain = fat_image(dir.path(), "plain.img", 2048);
    let (code, out) = provision(&d.config, &plain);
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("not a provisioning stick"), "{out}");
    assert!(get(&plain, "lucidgate/result.toml").is_none());

    // Full: the stick cannot take the certificates, so none are issued.
    let full = fat_image(dir.path(), "full.img", 200);
    put(
        &full,
        "lucidgate/request.toml",
        request("r7", TOKEN, TWO_CLIENTS).as_bytes(),
    );
    let free = {
        let out = Command::new("mdir")
            .arg("-i")
            .arg(&full)
            .arg("::/")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let line = text
            .lines()
            .find(|l| l.contains("bytes free"))
            .unwrap()
            .to_string();
        line.split_whitespace()
            .take_while(|w| *w != "bytes")
            .collect::<String>()
            .parse::<usize>()
            .unwrap()
    };
    put(&full, "filler.bin", &vec![0u8; free - 2048]);
    let (code, out) = provision(&d.config, &full);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("the stick is full"), "{out}");
    assert!(get(&full, "lucidgate/out/operator.pem").is_none());
    fsck(&full);

    // Write-protected (a read-only block device, as with a stick's lock switch): nothing issued,
    // the journal says why.
    let ro = fat_image(dir.path(), "ro.img", 2048);
    put(
        &ro,
        "lucidgate/request.toml",
        request("r8", TOKEN, TWO_CLIENTS).as_bytes(),
    );
    let loopdev = ReadOnlyLoop::attach(&ro);
    let (code, out) = provision(&d.config, &loopdev.dev);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("read-only") && out.contains("no result file"),
        "{out}"
    );
    drop(loopdev);
    assert!(get(&ro, "lucidgate/result.toml").is_none());
    assert_eq!(issued_count(&d), before, "no bad stick issued anything");
    assert!(d.try_status().is_some(), "the daemon is fine");
}

/// A read-only loop device over an image (`losetup -r`), detached on drop.
struct ReadOnlyLoop {
    dev: PathBuf,
}

impl ReadOnlyLoop {
    fn attach(img: &Path) -> ReadOnlyLoop {
        let out = Command::new("losetup")
            .args(["-r", "-f", "--show"])
            .arg(img)
            .output()
            .expect("losetup (util-linux)");
        assert!(
            out.status.success(),
            "losetup -r needs loop devices (root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ReadOnlyLoop {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        }
    }
}

impl Drop for ReadOnlyLoop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A disk whose writes stop after a budget: a stick pulled at that moment.
struct PulledDisk {
    file: std::fs::File,
    writes_left: Option<usize>,
    writes: usize,
}

impl Read for PulledDisk {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for PulledDisk {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Some(left) = &mut self.writes_left {
            if *left == 0 {
                return Err(std::io::Error::from_raw_os_error(libc::EIO));
            }
            *left -= 1;
        }
        self.writes += 1;
        self.file.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Seek for PulledDisk {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.file.seek(pos)
    }
}

fn device<'a>(
    state: &'a Path,
    clock: &'a dyn lucidgate::clock::Clock,
) -> lucidgate::provision::Gateway<'a> {
    lucidgate::provision::Gateway {
        state_dir: state,
        pki: lucidgate::ca::PkiSettings {
            server_lifetime: std::time::Duration::from_secs(30 * 86400),
            renew_fraction: 0.6667,
            ca_lifetime: std::time::Duration::from_secs(3650 * 86400),
            extra_names: vec![],
            extra_ips: vec![],
            external: None,
        },
        clock,
        // Few rounds: this test runs provisioning hundreds of times.
        token_hash: Some(lucidgate::provision::token::hash_with_rounds(TOKEN, 10).unwrap()),
        hostname: "pi".into(),
        modules: Default::default(),
    }
}

fn run_on(
    img: &Path,
    budget: Option<usize>,
    dev: &lucidgate::provision::Gateway,
) -> (Option<lucidgate::provision::Status>, usize) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut disk = PulledDisk {
        file,
        writes_left: budget,
        writes: 0,
    };
    let status = match lucidgate::provision::run_disk(&mut disk, true, dev) {
        Ok(o) => {
            if budget.is_none() && o.status != lucidgate::provision::Status::Done {
                eprintln!(
                    "run without a cut: {:?}: {} {:?}",
                    o.status, o.message, o.errors
                );
            }
            Some(o.status)
        }
        Err(e) => {
            eprintln!("run: {e}");
            None
        }
    };
    (status, disk.writes)
}

/// The stick is pulled after every possible number of writes of a run: the device's state stays
/// consistent (the ledger records the request only when everything was delivered; certificates
/// that did not reach the stick are revoked), a complete copy of every earlier file is still on
/// the stick, and plugging it in again then succeeds.
#[test]
fn a_stick_pulled_at_any_write_leaves_everything_consistent() {
    use lucidgate::provision::{Status, ledger};
    let dir = tempfile::tempdir().unwrap();
    let clock = lucidgate::clock::SystemClock::from_env();
    let base = fat_image(dir.path(), "base.img", 4096);
    // An earlier request's files are on the stick.
    put(
        &base,
        "lucidgate/request.toml",
        request("old", TOKEN, TWO_CLIENTS).as_bytes(),
    );
    let state0 = dir.path().join("state0");
    let (st, _) = run_on(&base, None, &device(&state0, &clock));
    assert_eq!(st, Some(Status::Done));
    let old_pem = get(&base, "lucidgate/out/operator.pem").unwrap();
    put(
        &base,
        "lucidgate/request.toml",
        request("new", TOKEN, TWO_CLIENTS).as_bytes(),
    );

    // How many writes a whole run takes.
    let probe = dir.path().join("probe.img");
    std::fs::copy(&base, &probe).unwrap();
    let (st, total) = run_on(
        &probe,
        None,
        &device(&dir.path().join("probe-state"), &clock),
    );
    assert_eq!(st, Some(Status::Done));
    assert!(total > 10, "{total} writes");

    // Every write point for the first and last writes (directory and rename steps), evenly
    // spaced ones between (bounded run time).
    let mut budgets: Vec<usize> = (0..total.min(24)).collect();
    budgets.extend((24..total.saturating_sub(24)).step_by((total / 120).max(1)));
    budgets.extend(total.saturating_sub(24).max(24)..total);
    let mut cut_points = 0;
    for budget in budgets {
        let img = dir.path().join("cut.img");
        std::fs::copy(&base, &img).unwrap();
        let state = dir.path().join(format!("state-{budget}"));
        let dev = device(&state, &clock);
        let (st, _) = run_on(&img, Some(budget), &dev);
        cut_points += 1;
        if st == Some(Status::Done) {
            // Cut while unmounting: everything was delivered and recorded already.
            assert!(ledger::find(&state, "new").unwrap().is_some());
            assert!(get(&img, "lucidgate/out/operator.pem").is_some_and(|p| is_whole_pem(&p)));
            std::fs::remove_dir_all(&state).unwrap();
            continue;
        }
        // Device state: the request is not recorded, so a replug processes it.
        assert!(
            ledger::find(&state, "new").unwrap().is_none(),
            "cut after {budget}: recorded although not delivered"
        );
        // Every certificate issued in the cut run is revoked.
        if state.join("pki").exists() {
            let pki = lucidgate::ca::Pki::open(&state, dev.pki.clone(), &clock).unwrap();
            let clients = pki.inventory().unwrap().clients;
            for c in &clients {
                assert!(
                    c.revoked_at.is_some(),
                    "cut after {budget}: undelivered but valid: {c:?}\n{clients:?}"
                );
            }
        }
        // The stick: operator.pem is the old one, the new one, or (mid-swap) a complete copy
        // beside it.
        let candidates = ["", ".old", ".new"]
            .iter()
            .filter_map(|ext| get(&img, &format!("lucidgate/out/operator.pem{ext}")))
            .collect::<Vec<_>>();
        assert!(
            candidates.iter().any(|c| *c == old_pem || is_whole_pem(c)),
            "cut after {budget}: no complete operator.pem left"
        );
        // Plugged in again (the stick works now): it succeeds.
        let (st, _) = run_on(&img, None, &dev);
        assert_eq!(st, Some(Status::Done), "replug after a cut at {budget}");
        if !get(&img, "lucidgate/out/operator.pem").is_some_and(|p| is_whole_pem(&p)) {
            let _ = std::fs::copy(&img, "/tmp/failed.img");
        }
        assert!(
            get(&img, "lucidgate/out/operator.pem").is_some_and(|p| is_whole_pem(&p)),
            "replug after a cut at {budget}: operator.pem"
        );
        assert!(ledger::find(&state, "new").unwrap().is_some());
        std::fs::remove_dir_all(&state).unwrap();
    }
    eprintln!("pulled the stick at {cut_points} write points of {total}");
}

fn is_whole_pem(b: &[u8]) -> bool {
    let t = String::from_utf8_lossy(b);
    t.contains("-----BEGIN PRIVATE KEY-----")
        && t.contains("-----END CERTIFICATE-----")
        && t.trim_end().ends_with("-----END CERTIFICATE-----")
}

/// The udev path: a USB stick (a block device with ID_BUS=usb, ID_FS_TYPE=vfat, through
/// umockdev) plugged into a running daemon is provisioned without anyone running a command; a
/// stick with another filesystem is left alone. What umockdev cannot do: the device node is a
/// regular file, not a real block device (read-only and size ioctls are not simulated; the
/// read-only case is tested above with a real read-only loop device).
#[test]
fn a_stick_plugged_into_the_running_daemon_is_provisioned() {
    let dir = tempfile::tempdir().unwrap();
    let mut bed = Umockdev::start();
    let d = Daemon::start(port_block(), "", Some(&bed));
    set_token(&d);
    let img = fat_image(dir.path(), "stick.img", 4096);
    put(
        &img,
        "lucidgate/request.toml",
        request("udev-1", TOKEN, TWO_CLIENTS).as_bytes(),
    );
    let (syspath, backing) = bed.add_stick(0, &img, "vfat");
    // The run is over when it is logged (result.toml is final a moment before the stick is
    // unmounted cleanly; fsck in between would see the dirty flag).
    wait_until("the daemon to finish the stick", || {
        d.log().contains("request_id=\"udev-1\"").then_some(())
    });
    let result = get(&backing, "lucidgate/result.toml")
        .map(|r| String::from_utf8_lossy(&r).to_string())
        .expect("result.toml");
    assert!(
        result.contains("status = \"done\""),
        "{result}\n{}",
        d.log()
    );
    assert!(get(&backing, "lucidgate/out/operator.pem").is_some());
    fsck(&backing);
    let log = d.log();
    assert!(
        log.contains("event=\"provision-done\"") && log.contains("request_id=\"udev-1\""),
        "{log}"
    );
    bed.remove_stick(&syspath);

    // Another filesystem: not touched.
    let other = dir.path().join("ext4.img");
    std::fs::write(&other, vec![0u8; 64 << 10]).unwrap();
    let (_, backing) = bed.add_stick(1, &other, "ext4");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert_eq!(std::fs::read(&backing).unwrap(), vec![0u8; 64 << 10]);
    assert!(
        !d.log().contains("/dev/sdc1"),
        "an ext4 stick is not looked at"
    );
    assert!(d.try_status().is_some());
}

/// An operator CA, a server certificate it signed, and an unrelated key (openssl).
fn operator_pki(dir: &Path) -> PathBuf {
    let pki = dir.join("operator-pki");
    std::fs::create_dir_all(&pki).unwrap();
    let sh = format!(
        "set -e; cd {}; \
         openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt -subj /CN=Operator-CA -days 30 2>/dev/null; \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout server.key -out server.csr -subj /CN=pi -addext subjectAltName=IP:127.0.0.1 2>/dev/null; \
         openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out server.crt -days 30 -copy_extensions copy 2>/dev/null; \
         openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out other.key; \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout client.key -out client.csr -subj /CN=opclient 2>/dev/null; \
         printf 'extendedKeyUsage=clientAuth\\nsubjectAltName=URI:lucidgate:module:*\\n' > client.ext; \
         openssl x509 -req -in client.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out client.crt -days 30 -extfile client.ext 2>/dev/null",
        pki.display()
    );
    let out = Command::new("sh").arg("-c").arg(&sh).output().unwrap();
    assert!(out.status.success(), "openssl: {out:?}");
    pki
}

/// `[import]`: the operator's own CA and server certificate replace the built-in CA; a key that
/// does not belong to the certificate is refused and nothing is installed.
#[test]
fn an_import_installs_the_operators_pki() {
    let dir = tempfile::tempdir().unwrap();
    let pki = operator_pki(dir.path());
    let emu = Emulator::start(&dir.path().join("ao4"), "AO4", AO4);
    let d = Daemon::start(
        port_block(),
        Conf::new()
            .device(&emu.link, AO4)
            .relay(r#"transport = "mtls""#),
        None,
    );
    let port = d.wait_serving(AO4);
    set_token(&d);
    let import = "[import]\nca = \"import/ca.crt\"\ncert = \"import/server.crt\"\nkey = \"import/server.key\"\n";

    // A stick with the import request, the operator's CA and certificate, and `key`.
    let import_stick = |name: &str, id: &str, key: &str| {
        let img = fat_image(dir.path(), name, 2048);
        put(
            &img,
            "lucidgate/request.toml",
            request(id, TOKEN, import).as_bytes(),
        );
        for (on_stick, file) in [
            ("ca.crt", "ca.crt"),
            ("server.crt", "server.crt"),
            ("server.key", key),
        ] {
            put(
                &img,
                &format!("lucidgate/import/{on_stick}"),
                &std::fs::read(pki.join(file)).unwrap(),
            );
        }
        img
    };

    // The wrong key first.
    let img = import_stick("bad-import.img", "imp-0", "other.key");
    let (code, out) = provision(&d.config, &img);
    assert_eq!(code, 1, "{out}");
    let res = get_text(&img, "lucidgate/result.toml");
    assert!(res.contains("does not belong to import.cert"), "{res}");
    assert!(!d.dir.path().join("state/pki/imported").exists());

    let img = import_stick("import.img", "imp-1", "server.key");
    let (code, out) = provision(&d.config, &img);
    assert_eq!(code, 0, "{out}");
    let res = get_text(&img, "lucidgate/result.toml");
    assert!(res.contains("Operator-CA"), "{res}");
    use std::os::unix::fs::PermissionsExt;
    let key = d.dir.path().join("state/pki/imported/server.key");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The running daemon now presents the operator's server certificate and accepts clients of
    // the operator's CA.
    let got = wait_until("the daemon to use the imported PKI", || {
        let (bytes, err) = s_client(
            port,
            &pki.join("ca.crt"),
            &cert_args(&pki, "client"),
            &GET_ID,
        );
        if bytes != get_id_answer(AO4) {
            eprintln!("s_client: {err}");
        }
        (bytes == get_id_answer(AO4)).then_some(bytes)
    });
    assert_eq!(got, get_id_answer(AO4));
}

/// A crafted stick whose `lucidgate` directory is a cluster chain that loops onto itself, with no
/// end marker: a reader that follows it never finishes. lucidgate gives up after reading
/// `MAX_READ_BYTES` or its time limit and says so; nothing hangs.
#[test]
fn a_stick_with_a_looping_directory_does_not_hang_provisioning() {
    use lucidgate::provision::ledger;
    use std::time::Duration;
    let dir = tempfile::tempdir().unwrap();
    require_tool("mkfs.vfat");
    let img = dir.path().join("loop.img");
    let out = Command::new("mkfs.vfat")
        .args(["-C", "-F", "32", "-s", "1", "-n", "LOOP"])
        .arg(&img)
        .arg("34000")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    put(
        &img,
        "lucidgate/request.toml",
        request("x", TOKEN, TWO_CLIENTS).as_bytes(),
    );
    let mut b = std::fs::read(&img).unwrap();
    let u16_at = |b: &[u8], o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    let u32_at =
        |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]) as usize;
    let bps = u16_at(&b, 11);
    let reserved = u16_at(&b, 14);
    let fats = b[16] as usize;
    let fat_sectors = u32_at(&b, 36);
    let root = u32_at(&b, 44);
    let data = (reserved + fats * fat_sectors) * bps;
    let cluster_off = |c: usize| data + (c - 2) * bps;
    // The first directory entry in the root: lucidgate/.
    let r = cluster_off(root);
    let entry = (0..bps / 32)
        .map(|i| r + i * 32)
        .find(|&e| b[e + 11] == 0x10 && b[e] != b'.' && b[e] != 0xE5)
        .expect("the lucidgate directory entry");
    let c = (u16_at(&b, entry + 20) << 16) | u16_at(&b, entry + 26);
    // Its cluster: '.' and '..', then deleted entries only (no end marker), and its FAT entry
    // points at itself, in every FAT.
    let d = cluster_off(c);
    for i in 2..bps / 32 {
        b[d + i * 32..d + i * 32 + 32].fill(0);
        b[d + i * 32] = 0xE5;
    }
    for f in 0..fats {
        let o = (reserved + f * fat_sectors) * bps + c * 4;
        b[o..o + 4].copy_from_slice(&(c as u32).to_le_bytes());
    }
    std::fs::write(&img, &b).unwrap();

    let state = dir.path().join("state");
    let clock = lucidgate::clock::SystemClock::from_env();
    let dev = device(&state, &clock);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&img)
        .unwrap();
    // The daemon's limit is a minute (stick::TIME_LIMIT); two seconds here.
    let disk = lucidgate::provision::stick::Disk::with_time_limit(file, Duration::from_secs(2));
    let started = std::time::Instant::now();
    let err = match lucidgate::provision::run_disk(disk, true, &dev) {
        Ok(o) => format!("{:?} {} {:?}", o.status, o.message, o.errors),
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("took too long") || err.contains("read more than"),
        "{err}"
    );
    assert!(started.elapsed() < PATIENCE, "took {:?}", started.elapsed());
    assert!(ledger::find(&state, "x").unwrap().is_none());
}
