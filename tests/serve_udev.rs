//! `lucidgate serve` through real udev code paths (umockdev): modules present at start, plugged
//! while running, removed and re-added; other ttys ignored; a real socat client.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[test]
fn module_present_at_start_is_served_on_its_serial_port_and_socat_gets_get_id() {
    let mut bed = Umockdev::start();
    bed.add(0, AO4, "deciphe_it", "LucidIo_AO4", true);
    let base = port_block();
    let d = Daemon::start(base, "", Some(&bed));
    let port = d.wait_serving(AO4);
    assert_eq!(port, base + 216, "port = base + serial % span");
    let m = d.module(AO4).unwrap();
    assert_eq!(m.devnode, "/dev/ttyACM0");
    assert_eq!(m.model, "LucidIo_AO4");
    assert_eq!(m.transport, "plain");
    assert_eq!(m.serial_source, "udev");
    // A real socat client, byte for byte.
    assert_eq!(socat_exchange(port, &GET_ID), get_id_answer(AO4));
    // `lucidgate port` agrees without asking the daemon.
    let out = d.cli(&["port", AO4]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        (base + 216).to_string()
    );
}

#[test]
fn hotplug_two_modules_get_different_ports_and_replug_keeps_the_port() {
    let mut bed = Umockdev::start();
    let base = port_block();
    let d = Daemon::start(base, "", Some(&bed));
    assert_eq!(d.status().modules.len(), 0);

    let t0 = Instant::now();
    let a = bed.add_module(0, AO4);
    let pa = d.wait_serving(AO4);
    let plug_to_serving = t0.elapsed();
    let b = bed.add_module(1, "11001001FA480001");
    let pb = d.wait_serving("11001001FA480001");
    assert_ne!(pa, pb);
    assert_eq!((pa, pb), (base + 216, base + 217));
    assert!(
        plug_to_serving < Duration::from_secs(2),
        "took {plug_to_serving:?} from uevent to serving"
    );

    let mut c = connect(pa);
    assert_eq!(ask(&mut c, &GET_ID), get_id_answer(AO4));
    let mut cb = connect(pb);
    assert_eq!(ask(&mut cb, &GET_ID), get_id_answer("11001001FA480001"));

    // Unplug: the client is closed, the port stops listening, the module leaves status.
    bed.remove(&a);
    d.wait_absent(AO4);
    let mut buf = [0u8; 8];
    use std::io::Read;
    assert!(
        matches!(c.read(&mut buf), Ok(0) | Err(_)),
        "client should see the end"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", pa)).is_err(),
        "port closed after unplug"
    );
    // The other module is untouched.
    assert_eq!(ask(&mut cb, &GET_IO_UV)[..2], [0x00, 0x04]);

    // Replug (on another USB socket and tty): same serial, same port.
    bed.add_module(2, AO4);
    assert_eq!(d.wait_serving(AO4), pa);
    assert_eq!(d.module(AO4).unwrap().devnode, "/dev/ttyACM2");
    let mut c = connect(pa);
    assert_eq!(ask(&mut c, &GET_ID), get_id_answer(AO4));
    drop(b);
}

#[test]
fn other_ttys_are_ignored_and_rules_in_config_add_them() {
    let mut bed = Umockdev::start();
    bed.add(0, "A50285BI", "FTDI", "FT232R_USB_UART", true);
    bed.add(1, AO4, "deciphe_it", "LucidIo_AO4", true);
    let base = port_block();
    let d = Daemon::start(base, "", Some(&bed));
    d.wait_serving(AO4);
    let mods = d.status().modules;
    assert_eq!(mods.len(), 1, "only the LucidControl module: {mods:?}");
    drop(d);

    // With a rule for it, the FTDI tty is served too (port from its non-hex serial's hash).
    let d = Daemon::start(base, "[[match]]\nvendor = \"FTDI\"\n", Some(&bed));
    let p = d.wait_serving("A50285BI");
    assert_eq!(p, lucidgate::ports::derive("A50285BI", base, PORT_SPAN));
}

#[test]
fn port_survives_daemon_restart_and_collisions_are_remembered() {
    let mut bed = Umockdev::start();
    // Two serials whose derived ports collide (…0000 and …03E8 differ by exactly the span).
    bed.add(0, AO4, "deciphe_it", "LucidIo_AO4", true);
    let base = port_block();
    let (derived, probed) = (base + 216, base + 217);
    let mut d = Daemon::start(base, "", Some(&bed));
    assert_eq!(d.wait_serving(AO4), derived);
    bed.add_module(1, "11001001FA4803E8");
    assert_eq!(d.wait_serving("11001001FA4803E8"), probed);
    let registry = std::fs::read_to_string(d.dir.path().join("state/ports.toml")).unwrap();
    let registry: toml::Table = toml::from_str(&registry).unwrap();
    assert_eq!(
        registry["ports"]["11001001FA4803E8"].as_integer(),
        Some(probed as i64)
    );
    assert_eq!(registry["ports"][AO4].as_integer(), Some(derived as i64));
    assert!(d.stop().success(), "SIGTERM exits 0");

    // After a restart the probed module keeps its port even if it comes up first.
    let mut bed2 = Umockdev::start();
    bed2.add(0, "11001001FA4803E8", "deciphe_it", "LucidIo_AO4", true);
    d.restart(Some(&bed2));
    assert_eq!(d.wait_serving("11001001FA4803E8"), probed);
    assert_eq!(
        d.module("11001001FA4803E8").unwrap().port_source.as_deref(),
        Some("registry")
    );
    bed2.add_module(1, AO4);
    assert_eq!(d.wait_serving(AO4), derived);
}

#[test]
fn change_event_completes_a_device_that_appeared_without_properties() {
    let mut bed = Umockdev::start();
    let d = Daemon::start(port_block(), "", Some(&bed));
    // The node appears as a tty the rules do not match yet (udev has not run usb_id) ...
    let sys = bed.add(0, AO4, "unknown_vendor", "unknown_model", false);
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.module(AO4).is_none(), "not a module yet");
    // ... then the change event brings the real properties.
    bed.change(
        &sys,
        &[("ID_VENDOR", "deciphe_it"), ("ID_MODEL", "LucidIo_AO4")],
    );
    let port = d.wait_serving(AO4);
    let mut c = connect(port);
    assert_eq!(ask(&mut c, &GET_ID), get_id_answer(AO4));
}
