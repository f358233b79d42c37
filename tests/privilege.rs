//! Least privilege, as an unprivileged local user sees it: the control socket is 0660 and
//! refuses others, private keys are 0600 in a 0700 directory, state is not world-writable.
//! (The unit's sandbox is checked in tests/systemd.rs; the refusal of world-readable keys in
//! tests/tls.rs.)

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::*;

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[test]
fn another_local_user_cannot_use_the_control_socket_or_read_keys() {
    require_tool("setpriv");
    let d = Daemon::start(18500, "[relay]\ntransport = \"mtls\"\n", None);
    // The test's directory is private to root; open it up so only the modes below decide.
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d.config, std::fs::Permissions::from_mode(0o644)).unwrap();
    issue_client(&d, "ops", &["--all"]);
    let sock = d.dir.path().join("control.sock");
    let state = d.dir.path().join("state");
    let pki = state.join("pki");
    assert_eq!(mode(&sock), 0o660, "control socket");
    assert_eq!(mode(&state), 0o700, "state_dir");
    assert_eq!(mode(&pki), 0o700, "pki directory");
    for key in ["ca.key", "server.key", "issued.toml"] {
        assert_eq!(mode(&pki.join(key)), 0o600, "{key}");
    }
    for e in walk(&state) {
        assert_eq!(mode(&e) & 0o002, 0, "{} is world-writable", e.display());
    }
    // As nobody: status is refused by the socket's mode, keys cannot be read.
    let as_nobody = |args: &[&str]| {
        Command::new("setpriv")
            .args([
                "--reuid",
                "65534",
                "--regid",
                "65534",
                "--clear-groups",
                "--",
            ])
            .args(args)
            .output()
            .unwrap()
    };
    let out = as_nobody(&[
        bin().to_str().unwrap(),
        "-c",
        d.config.to_str().unwrap(),
        "status",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "nobody got a status: {out:?}");
    assert!(err.contains("ermission denied"), "{err}");
    let out = as_nobody(&["cat", pki.join("ca.key").to_str().unwrap()]);
    assert!(!out.status.success() && out.stdout.is_empty());
    // The owner (root here, the unit's user on a device) is served.
    assert!(d.try_status().is_some());
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}
