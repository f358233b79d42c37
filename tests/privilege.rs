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
    let d = Daemon::start(
        port_block(),
        Conf::new().relay(r#"transport = "mtls""#),
        None,
    );
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
    // The cause, not "lucidgate is not running": the socket's group is the way in.
    assert!(!err.contains("not running"), "{err}");
    assert!(err.contains("members of group root"), "{err}");
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

/// An administrator runs the CLI as root (`sudo lucidgate cert issue-client ...`, the README's
/// instruction) while the state directory belongs to the service's user: every state file the
/// CLI creates or replaces takes that owner, or the service cannot read its own PKI at its next
/// start ("reading .../issued.toml: Permission denied"). Files for the operator (`--out`) stay
/// root's.
#[test]
fn state_written_by_root_belongs_to_the_state_directory_owner() {
    require_tool("setpriv");
    assert!(nix::unistd::geteuid().is_root(), "this test runs as root");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir(&state).unwrap();
    // The service's user: nobody here.
    let (uid, gid) = (65534, 65534);
    std::os::unix::fs::chown(&state, Some(uid), Some(gid)).unwrap();
    let config = dir.path().join("lucidgate.toml");
    std::fs::write(
        &config,
        format!(
            "state_dir = \"{}\"\ncontrol_socket = \"{}\"\n",
            state.display(),
            dir.path().join("control.sock").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = dir.path().join("laptop");
    let cli = |args: &[&str]| {
        let o = Command::new(bin())
            .arg("-c")
            .arg(&config)
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{args:?}: {o:?}");
    };
    cli(&[
        "cert",
        "issue-client",
        "laptop",
        "--all",
        "--out",
        out.to_str().unwrap(),
    ]);
    cli(&[
        "cert",
        "issue-client",
        "tablet",
        "--all",
        "--out",
        out.to_str().unwrap(),
    ]);
    cli(&["cert", "revoke", "tablet"]);
    cli(&["cert", "rotate-ca", "--overlap", "1d"]);
    use std::os::unix::fs::MetadataExt;
    let files = walk(&state);
    assert!(files.len() > 8, "{files:?}");
    for f in &files {
        let m = std::fs::symlink_metadata(f).unwrap();
        assert_eq!(
            (m.uid(), m.gid()),
            (uid, gid),
            "{} was left to {}:{}",
            f.display(),
            m.uid(),
            m.gid()
        );
    }
    for f in walk(&out) {
        assert_eq!(std::fs::metadata(&f).unwrap().uid(), 0, "{}", f.display());
    }
    // The service's user reads all of it.
    let o = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .arg(bin())
        .arg("-c")
        .arg(&config)
        .args(["cert", "list"])
        .output()
        .unwrap();
    assert!(o.status.success(), "as the service's user: {o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("laptop"));
}
