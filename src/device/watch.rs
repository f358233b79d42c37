//! The udev watch: one thread that owns the udev monitor (udev types are `!Send`), subscribes
//! first and enumerates second (so nothing plugged in during start-up is missed), and sends
//! owned [`DeviceEvent`]s to the supervisor.

use std::os::fd::AsFd;
use std::sync::mpsc as std_mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use tokio::sync::mpsc;

use super::{Action, DeviceEvent};

/// How often the watch thread checks whether the daemon still listens while udev is quiet.
const WATCH_POLL_INTERVAL: Duration = Duration::from_millis(250);

/// What the watch sends.
#[derive(Debug)]
pub(crate) enum WatchMsg {
    Device(DeviceEvent),
    /// Every device present at start-up has been sent.
    Enumerated,
}

fn owned(device: &udev::Device, action: Action) -> DeviceEvent {
    let properties = device
        .properties()
        .map(|p| {
            (
                p.name().to_string_lossy().into_owned(),
                p.value().to_string_lossy().into_owned(),
            )
        })
        .collect();
    let usb_serial_attr = device
        .parent_with_subsystem_devtype("usb", "usb_device")
        .ok()
        .flatten()
        .and_then(|p| {
            p.attribute_value("serial")
                .map(|v| v.to_string_lossy().into_owned())
        });
    DeviceEvent {
        action,
        syspath: device.syspath().to_path_buf(),
        subsystem: device
            .subsystem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default(),
        devnode: device.devnode().map(|p| p.to_path_buf()),
        properties,
        usb_serial_attr,
    }
}

/// Starts the watch for `subsystems`. Returns once the monitor is subscribed (or with the error
/// that prevented it); the thread ends when the receiver is dropped.
pub(crate) fn spawn(subsystems: &[&str], tx: mpsc::Sender<WatchMsg>) -> Result<JoinHandle<()>> {
    let subsystems: Vec<String> = subsystems.iter().map(|s| s.to_string()).collect();
    let (ready_tx, ready_rx) = std_mpsc::sync_channel::<Result<()>>(1);
    let handle = std::thread::Builder::new()
        .name("udev-watch".into())
        .spawn(move || {
            let socket = match subscribe(&subsystems) {
                Ok(s) => {
                    let _ = ready_tx.send(Ok(()));
                    s
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            if let Err(e) = enumerate(&subsystems, &tx) {
                tracing::error!("enumerating present devices failed: {e:#}");
            }
            if tx.blocking_send(WatchMsg::Enumerated).is_err() {
                return;
            }
            run(&socket, &tx);
        })
        .context("starting the udev watch thread")?;
    ready_rx
        .recv()
        .context("the udev watch thread ended before subscribing")??;
    Ok(handle)
}

fn subscribe(subsystems: &[String]) -> Result<udev::MonitorSocket> {
    let mut builder = udev::MonitorBuilder::new()
        .context("creating a udev monitor (is /run/udev there? lucidgate needs udev)")?;
    for s in subsystems {
        builder = builder
            .match_subsystem(s)
            .with_context(|| format!("filtering udev events on subsystem {s}"))?;
    }
    builder.listen().context("subscribing to udev events")
}

fn enumerate(subsystems: &[String], tx: &mpsc::Sender<WatchMsg>) -> Result<()> {
    for s in subsystems {
        let mut e = udev::Enumerator::new().context("creating a udev enumerator")?;
        e.match_subsystem(s)?;
        for device in e.scan_devices().context("scanning udev devices")? {
            if tx
                .blocking_send(WatchMsg::Device(owned(&device, Action::Add)))
                .is_err()
            {
                return Ok(());
            }
        }
    }
    Ok(())
}

fn run(socket: &udev::MonitorSocket, tx: &mpsc::Sender<WatchMsg>) {
    let timeout = PollTimeout::try_from(WATCH_POLL_INTERVAL).unwrap_or(PollTimeout::MAX);
    loop {
        if tx.is_closed() {
            return;
        }
        let mut fds = [PollFd::new(socket.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => {
                tracing::error!("polling the udev monitor failed: {e}; hotplug stops working");
                return;
            }
        }
        for event in socket.iter() {
            let action = match event.event_type() {
                udev::EventType::Add => Action::Add,
                udev::EventType::Change => Action::Change,
                udev::EventType::Remove => Action::Remove,
                _ => continue,
            };
            if tx
                .blocking_send(WatchMsg::Device(owned(&event, action)))
                .is_err()
            {
                return;
            }
        }
    }
}
