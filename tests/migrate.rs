//! `lucidgate config import-ser2net` on real files, with `/dev/ttyACM*` names resolved through
//! udev (umockdev), and the README's demo commands run exactly as written.

mod common;

use std::process::Command;

use common::*;

/// A ser2net.yaml whose three connections accept on `ports`.
fn ser2net_yaml(ports: [u16; 3]) -> String {
    let [p0, p1, p2] = ports;
    format!(
        r#"%YAML 1.1
---
define: &banner \r\nser2net port \p device \d [\B] (Debian GNU/Linux)\r\n\r\n

connection: &lio0
    accepter: tcp,{p0}
    enable: on
    options:
      banner: *banner
      kickolduser: true
    connector: serialdev,
              /dev/ttyACM0,
              115200n81,local

connection: &lio1
    accepter: tcp,{p1}
    connector: serialdev,/dev/serial/by-id/usb-deciphe_it_LucidIo_DI4_00001001000000AA-if00,115200n81,local

connection: &lio2
    accepter: tcp,{p2}
    connector: serialdev,/dev/ttyACM5,115200n81,local
"#
    )
}

#[test]
fn import_resolves_tty_names_through_udev_and_keeps_the_ports() {
    let mut bed = Umockdev::start();
    bed.add(0, AO4, "deciphe_it", "LucidIo_AO4", true);
    let dir = tempfile::tempdir().unwrap();
    let yaml = dir.path().join("ser2net.yaml");
    let ports = [free_port(), free_port(), free_port()];
    std::fs::write(&yaml, ser2net_yaml(ports)).unwrap();
    let out = Command::new("umockdev-wrapper")
        .arg(bin())
        .args(["config", "import-ser2net"])
        .arg(&yaml)
        .env("UMOCKDEV_DIR", &bed.root)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let toml = String::from_utf8_lossy(&out.stdout);
    let notes = String::from_utf8_lossy(&out.stderr);
    // ttyACM0 is the plugged AO4 (udev), lio1 names its serial in the by-id path, ttyACM5 is absent.
    let cfg = lucidgate::config::Config::parse(&toml, "imported").unwrap();
    assert_eq!(cfg.module_settings(AO4).fixed_port, Some(ports[0]));
    assert_eq!(
        cfg.module_settings(AO4).policy,
        lucidgate::config::ClientPolicy::KickOld
    );
    assert_eq!(
        cfg.module_settings("00001001000000AA").fixed_port,
        Some(ports[1])
    );
    assert!(toml.contains(&format!("# port = {}", ports[2])));
    assert!(
        notes.contains("line 9") && notes.contains("banner"),
        "{notes}"
    );
    assert!(
        notes.contains("/dev/ttyACM5") && notes.contains("plug the module in"),
        "{notes}"
    );

    // The imported overrides are honoured by serve: the module keeps ser2net's port.
    let d = Daemon::start(port_block(), &toml, Some(&bed));
    assert_eq!(d.wait_serving(AO4), ports[0]);
    assert_eq!(socat_exchange(ports[0], &GET_ID), get_id_answer(AO4));
}

#[test]
fn import_reports_malformed_files_with_lines() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("ser2net.conf");
    std::fs::write(
        &conf,
        "# old ser2net\n4001:raw:0:/dev/ttyACM0:115200\n4002:raw\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["config", "import-ser2net"])
        .arg(&conf)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("ser2net.conf, line 3") && err.contains("PORT:STATE"),
        "{err}"
    );
}

/// The README's "try it without hardware" block, run line by line as written.
#[test]
fn readme_demo_commands_work_as_written() {
    require_tool("socat");
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let block = readme
        .split("```sh demo\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("README has a ```sh demo block");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("lucidgate.toml");
    // Same commands, but state and socket in a scratch directory (LUCIDGATE_CONFIG).
    std::fs::write(
        &cfg,
        format!(
            "state_dir = \"{}\"\ncontrol_socket = \"{}\"\n",
            dir.path().join("state").display(),
            dir.path().join("control.sock").display()
        ),
    )
    .unwrap();
    let bin_dir = bin().parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("bash")
        .arg("-euo")
        .arg("pipefail")
        .arg("-c")
        // The block as written; the trap only makes sure a failing line leaves no daemon behind.
        .arg(format!(
            "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n{block}"
        ))
        .current_dir(dir.path())
        .env("PATH", path)
        .env("LUCIDGATE_CONFIG", &cfg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "demo block failed\n{block}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("11001001FA480000") && stdout.contains("serving"),
        "{stdout}"
    );
    // xxd of the GetId answer: status 00, 16 bytes, class 0x1100.
    assert!(
        stdout.contains("0010 0401 0200 1101 1000 0048 fa00 0000"),
        "{stdout}"
    );
}
