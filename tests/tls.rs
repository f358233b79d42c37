//! TLS with client certificates, against real peers (socat, openssl): the default transport,
//! every refusal case, live revocation, rotation under load, CA rotation overlap, restarts.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// A daemon with its default transport (mutual TLS) serving one emulated AO4, plus `extra`.
fn tls_daemon(base: u16, extra: Conf) -> (Daemon, Emulator, u16) {
    let link_dir = tempfile::tempdir().unwrap().keep();
    let link = link_dir.join("lio0");
    let emu = Emulator::start(&link, "AO4", AO4);
    let d = Daemon::start(base, extra.device(&link, AO4).default_transport(), None);
    let port = d.wait_serving(AO4);
    assert_eq!(
        d.module(AO4).unwrap().transport,
        "mtls",
        "TLS with client certs is the default"
    );
    (d, emu, port)
}

fn cert_serial(pem: &Path) -> String {
    let out = Command::new("openssl")
        .args(["x509", "-noout", "-serial", "-in"])
        .arg(pem)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_ascii_lowercase()
}

/// The serial of the certificate the server presents to a new connection.
fn presented_serial(port: u16, ca: &Path) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -CAfile {} </dev/null 2>/dev/null | openssl x509 -noout -serial",
            ca.display()
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .trim_start_matches("serial=")
        .to_ascii_lowercase()
}

#[test]
fn socat_with_a_client_certificate_reaches_the_module_and_certificates_verify() {
    let (d, _emu, port) = tls_daemon(port_block(), Conf::new());
    let alice = issue_client(&d, "alice", &["--modules", AO4]);
    assert_eq!(
        socat_tls(port, &alice, "alice", &GET_ID),
        get_id_answer(AO4)
    );

    // Files: key 0600, pem 0600, certificates readable; the PKI dir is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&alice.join("alice.key")), 0o600);
    assert_eq!(mode(&alice.join("alice.pem")), 0o600);
    let pki = d.dir.path().join("state/pki");
    assert_eq!(mode(&pki), 0o700);
    assert_eq!(mode(&pki.join("ca.key")), 0o600);
    assert_eq!(mode(&pki.join("server.key")), 0o600);

    // openssl accepts the server and client certificates; rights and names are in the SANs.
    let ca = alice.join("ca.crt");
    for cert in [alice.join("alice.crt"), pki.join("server.crt")] {
        let out = Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(&ca)
            .arg(&cert)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "openssl verify {}: {}",
            cert.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = |cert: &Path| {
        let o = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(cert)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let client = text(&alice.join("alice.crt"));
    assert!(
        client.contains(&format!("URI:lucidgate:module:{AO4}")),
        "{client}"
    );
    assert!(client.contains("TLS Web Client Authentication"), "{client}");
    let server = text(&pki.join("server.crt"));
    for want in [
        "DNS:localhost",
        "IP Address:127.0.0.1",
        "TLS Web Server Authentication",
    ] {
        assert!(
            server.contains(want),
            "{want} missing in server certificate:\n{server}"
        );
    }
    let host = nix::unistd::gethostname()
        .unwrap()
        .to_string_lossy()
        .into_owned();
    assert!(
        server.contains(&format!("DNS:{host}")),
        "hostname {host} in SANs:\n{server}"
    );
    // Status names the client while it is connected.
    let mut s = Command::new("socat")
        .arg("-")
        .arg(socat_tls_address(port, &alice, "alice"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let m = wait_until("client listed", || d.module(AO4).filter(|m| m.clients == 1));
    assert!(m.client.as_deref().unwrap().contains("(alice)"), "{m:?}");
    let _ = s.kill();
    let _ = s.wait();
}

#[test]
fn every_refusal_case_is_refused_logged_and_leaves_allowed_clients_alone() {
    let (d, _emu, port) = tls_daemon(port_block(), Conf::new());
    let good = issue_client(&d, "good", &["--all"]);
    let other_module = issue_client(&d, "elsewhere", &["--modules", "11001001FA480001"]);
    let revoked = issue_client(&d, "gone", &["--all"]);
    let ca = good.join("ca.crt");

    // An allowed client holds a session open through all of it.
    let mut keep = Command::new("socat")
        .arg("-")
        .arg(socat_tls_address(port, &good, "good"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut keep_in = keep.stdin.take().unwrap();
    let mut keep_out = keep.stdout.take().unwrap();
    let mut ask_kept = || {
        keep_in.write_all(&GET_ID).unwrap();
        let mut ans = [0u8; 18];
        keep_out.read_exact(&mut ans).unwrap();
        assert_eq!(ans.to_vec(), get_id_answer(AO4));
    };
    ask_kept();

    // A certificate of another CA.
    let foreign = d.dir.path().join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    let sh = |cmd: String| {
        let o = Command::new("sh").arg("-c").arg(&cmd).output().unwrap();
        assert!(
            o.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    sh(format!(
        "cd {} && openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout ca.key -out ca.crt -subj /CN=evil-ca -days 30 2>/dev/null && \
         openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout c.key -out c.csr -subj /CN=mallory 2>/dev/null && \
         printf 'subjectAltName=URI:lucidgate:module:*\\nextendedKeyUsage=clientAuth\\n' > ext && \
         openssl x509 -req -in c.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out c.crt -days 30 -extfile ext 2>/dev/null",
        foreign.display()
    ));

    // Revoke one while the daemon runs: it must be refused without a restart.
    let o = d.cli(&["cert", "revoke", "gone"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("re-read the PKI"));
    // In force when the command returns (the daemon answers once the PKI task has re-read it;
    // it used to answer when it had only asked, and a quick client still got in).
    assert!(
        socat_tls(port, &revoked, "gone", &GET_ID).is_empty(),
        "a revoked client was served right after `cert revoke` returned"
    );

    let cases: Vec<(&str, Vec<String>, &str)> = vec![
        ("no client certificate", vec![], "no certificates"),
        (
            "certificate of another CA",
            cert_args(&foreign, "c"),
            "UnknownIssuer",
        ),
        (
            "revoked certificate",
            cert_args(&revoked, "gone"),
            "revoked",
        ),
        (
            "certificate for another module",
            cert_args(&other_module, "elsewhere"),
            "does not grant module",
        ),
    ];
    for (what, args, logged) in cases {
        let (got, err) = s_client(port, &ca, &args, &GET_ID);
        assert!(
            got.is_empty(),
            "{what}: got an answer {got:02X?}; stderr {err}"
        );
        wait_until(&format!("log of refusal ({what})"), || {
            d.log()
                .lines()
                .any(|l| {
                    l.contains("client-refused")
                        && l.to_lowercase().contains(&logged.to_lowercase())
                })
                .then_some(())
        });
        // The allowed session is undisturbed.
        ask_kept();
    }
    // Refusals name the peer and the certificate subject, also when the handshake itself fails.
    let log = d.log();
    for (reason, subject) in [
        ("does not grant module", "elsewhere"),
        ("revoked", "gone"),
        ("unknownissuer", "mallory"),
    ] {
        let line = log
            .lines()
            .find(|l| l.contains("client-refused") && l.to_lowercase().contains(reason))
            .unwrap_or_else(|| panic!("no refusal line for {reason}:\n{log}"));
        assert!(
            line.contains("127.0.0.1:") && line.contains(subject),
            "{line}"
        );
    }

    // The allowed certificate also works with openssl, and after all that with socat.
    drop(keep_in);
    let _ = keep.wait();
    wait_until("kept session closed", || {
        (d.module(AO4).unwrap().clients == 0).then_some(())
    });
    let (got, err) = s_client(port, &ca, &cert_args(&good, "good"), &GET_ID);
    assert_eq!(got, get_id_answer(AO4), "{err}");
}

#[test]
fn expired_client_certificates_are_refused() {
    // The daemon's clock runs 400 days ahead: a 365-day certificate issued now is expired there.
    let link_dir = tempfile::tempdir().unwrap();
    let link = link_dir.path().join("lio0");
    let _emu = Emulator::start(&link, "AO4", AO4);
    let mut d = Daemon::start(
        port_block(),
        Conf::new().device(&link, AO4).default_transport(),
        None,
    );
    let old = issue_client(&d, "old", &["--all", "--days", "365"]);
    d.stop();
    unsafe {
        std::env::set_var(
            lucidgate::clock::CLOCK_OFFSET_ENV,
            (400 * 86400).to_string(),
        )
    };
    d.restart(None);
    unsafe { std::env::remove_var(lucidgate::clock::CLOCK_OFFSET_ENV) };
    let port = d.wait_serving(AO4);
    let (got, err) = s_client(port, &old.join("ca.crt"), &cert_args(&old, "old"), &GET_ID);
    assert!(got.is_empty(), "expired certificate got an answer; {err}");
    wait_until("expiry logged", || {
        d.log()
            .lines()
            .any(|l| {
                l.contains("client-refused")
                    && l.contains("certificate expired")
                    && l.contains("(old)")
            })
            .then_some(())
    });
}

#[test]
fn server_certificate_rotates_under_load_without_dropping_a_frame() {
    // A 6 s server certificate is renewed after 4 s; a client exchanging frames every few ms
    // across the swap sees no error, and a new connection sees the new certificate.
    let (d, _emu, port) = tls_daemon(
        port_block(),
        Conf::new().table("tls", r#"server_cert_lifetime = "6s""#),
    );
    let c = issue_client(&d, "load", &["--all"]);
    let ca = c.join("ca.crt");
    let before = presented_serial(port, &ca);
    assert_eq!(
        before,
        cert_serial(&d.dir.path().join("state/pki/server.crt"))
    );

    let mut child = Command::new("socat")
        .arg("-")
        .arg(socat_tls_address(port, &c, "load"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    let mut output = child.stdout.take().unwrap();
    let start = Instant::now();
    let mut frames = 0u32;
    while start.elapsed() < Duration::from_secs(7) {
        input.write_all(&GET_IO_UV).unwrap();
        let mut ans = [0u8; 6];
        output.read_exact(&mut ans).unwrap();
        assert_eq!(ans[..2], [0x00, 0x04], "frame {frames}");
        frames += 1;
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(frames > 500, "only {frames} frames");
    wait_until("rotation logged", || {
        d.log().contains("cert-rotated").then_some(())
    });
    let after = presented_serial(port, &ca);
    assert_ne!(before, after, "a new connection sees the new certificate");
    // The old session is still alive after the swap.
    input.write_all(&GET_ID).unwrap();
    let mut ans = [0u8; 18];
    output.read_exact(&mut ans).unwrap();
    assert_eq!(ans.to_vec(), get_id_answer(AO4));
    drop(input);
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn ca_rotation_accepts_both_cas_during_the_overlap_and_only_the_new_one_after() {
    let (d, _emu, port) = tls_daemon(port_block(), Conf::new());
    let old = issue_client(&d, "old", &["--all"]);
    let o = d.cli(&["cert", "rotate-ca", "--overlap", "10s"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let rotated_at = Instant::now();
    let new = issue_client(&d, "new", &["--all"]);
    assert_ne!(
        std::fs::read(old.join("ca.crt")).unwrap(),
        std::fs::read(new.join("ca.crt")).unwrap()
    );
    // During the overlap: both are accepted (each verifies the server with the new CA).
    let new_ca = new.join("ca.crt");
    let ask = |dir: &Path, name: &str| s_client(port, &new_ca, &cert_args(dir, name), &GET_ID);
    assert_eq!(
        ask(&old, "old").0,
        get_id_answer(AO4),
        "old CA's client during overlap"
    );
    assert_eq!(ask(&new, "new").0, get_id_answer(AO4), "new CA's client");
    // After the overlap only the new one.
    let wait = Duration::from_secs(11).saturating_sub(rotated_at.elapsed());
    std::thread::sleep(wait);
    wait_until("overlap end noticed", || {
        d.log().contains("ca-overlap-ended").then_some(())
    });
    assert!(
        ask(&old, "old").0.is_empty(),
        "old CA's client after overlap"
    );
    assert_eq!(ask(&new, "new").0, get_id_answer(AO4));
    let list = d.cli(&["cert", "list"]);
    let list = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.contains("old") && list.contains("new") && list.contains("server"),
        "{list}"
    );
}

#[test]
fn restart_keeps_the_ca_and_a_broken_key_is_a_clear_error() {
    let (mut d, _emu, port) = tls_daemon(port_block(), Conf::new());
    let c = issue_client(&d, "keep", &["--all"]);
    let ca_before = std::fs::read(d.dir.path().join("state/pki/ca.crt")).unwrap();
    assert!(d.stop().success());
    d.restart(None);
    assert_eq!(d.wait_serving(AO4), port);
    assert_eq!(
        std::fs::read(d.dir.path().join("state/pki/ca.crt")).unwrap(),
        ca_before
    );
    assert_eq!(
        socat_tls(port, &c, "keep", &GET_ID),
        get_id_answer(AO4),
        "old client certs still work"
    );
    assert!(d.stop().success());

    // A corrupt CA key: serve refuses to start and names the file; nothing is replaced.
    let key = d.dir.path().join("state/pki/ca.key");
    std::fs::write(&key, "not a key").unwrap();
    let out = Command::new(bin())
        .arg("-c")
        .arg(&d.config)
        .args(["serve", "--no-udev"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ca.key") && err.contains("backup"), "{err}");
    assert_eq!(
        std::fs::read(d.dir.path().join("state/pki/ca.crt")).unwrap(),
        ca_before
    );
    // A world-readable key is refused too.
    std::fs::write(&key, "x").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(bin())
        .arg("-c")
        .arg(&d.config)
        .args(["serve", "--no-udev"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("readable by others") && err.contains("chmod 600"),
        "{err}"
    );
}

#[test]
fn plain_and_server_only_tls_are_opt_in_and_warned_about() {
    let link_dir = tempfile::tempdir().unwrap();
    let (l1, l2) = (link_dir.path().join("a"), link_dir.path().join("b"));
    let _e1 = Emulator::start(&l1, "AO4", AO4);
    let _e2 = Emulator::start(&l2, "AO4", "11001001FA480001");
    let extra = Conf::new()
        .device(&l1, AO4)
        .device(&l2, "11001001FA480001")
        .relay(r#"transport = "plain""#)
        .module("11001001FA480001", r#"transport = "tls""#);
    let d = Daemon::start(port_block(), extra, None);
    let p1 = d.wait_serving(AO4);
    let p2 = d.wait_serving("11001001FA480001");
    assert_eq!(socat_exchange(p1, &GET_ID), get_id_answer(AO4));
    // Server-only TLS: no client certificate needed, the server is still verified.
    let ca = d.dir.path().join("state/pki/ca.crt");
    let (got, err) = s_client(p2, &ca, &["-verify_return_error"], &GET_ID);
    assert_eq!(got, get_id_answer("11001001FA480001"), "{err}");
    let log = d.log();
    assert!(
        log.lines()
            .any(|l| l.contains("insecure-transport") && l.contains(AO4) && l.contains("plain"))
    );
    assert!(
        log.lines()
            .any(|l| l.contains("insecure-transport") && l.contains("without client certificates"))
    );
}

/// `[modules."SERIAL"] allow` names the clients that may use a module; a reload that changes
/// the list takes effect at once (the relay restarts with it), for new connections.
#[test]
fn a_reload_that_changes_the_allow_list_takes_effect() {
    let link_dir = tempfile::tempdir().unwrap();
    let link = link_dir.path().join("lio0");
    let _emu = Emulator::start(&link, "AO4", AO4);
    let allow = |names: &str| {
        Conf::new()
            .device(&link, AO4)
            .default_transport()
            .module(AO4, format!("allow = [{names}]"))
    };
    let d = Daemon::start(port_block(), allow("\"laptop\""), None);
    let port = d.wait_serving(AO4);
    let laptop = issue_client(&d, "laptop", &["--all"]);
    let tablet = issue_client(&d, "tablet", &["--all"]);
    assert_eq!(
        socat_tls(port, &laptop, "laptop", &GET_ID),
        get_id_answer(AO4)
    );
    assert!(
        socat_tls(port, &tablet, "tablet", &GET_ID).is_empty(),
        "tablet is not allowed"
    );

    d.rewrite_config(allow("\"tablet\""));
    let out = d.cli(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let port = d.wait_serving(AO4);
    wait_until("the new allow list", || {
        (socat_tls(port, &tablet, "tablet", &GET_ID) == get_id_answer(AO4)).then_some(())
    });
    assert!(
        socat_tls(port, &laptop, "laptop", &GET_ID).is_empty(),
        "laptop was taken off the allow list"
    );
    // The refusal is logged by the relay's task, after the client has seen the connection end.
    wait_until("the laptop's refusal in the log", || {
        d.log().contains("laptop is not in [modules").then_some(())
    });
}
