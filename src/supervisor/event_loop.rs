//! The supervisor's event loop: udev events, relays that ended, provisioning outcomes, control
//! requests, reload signals, timers and the watchdog, each handled in turn; one reconcile after
//! every input that may change what should run.

use std::time::Duration;

use anyhow::Result;
use tokio::sync::{mpsc, oneshot};
use tracing::{info, warn};

use super::{STATIC_DEVICE_POLL, Supervisor};
use crate::control::{self, Answer, Command, Reply};
use crate::device::watch::WatchMsg;
use crate::systemd::Lifecycle;

impl Supervisor {
    /// Runs until `cancel`: the event loop of the daemon.
    pub async fn run(
        mut self,
        mut watch_rx: mpsc::Receiver<WatchMsg>,
        watch_done: bool,
        mut control_rx: mpsc::Receiver<control::Request>,
        mut reload_rx: mpsc::Receiver<()>,
        lifecycle: &mut dyn Lifecycle,
    ) -> Result<()> {
        let mut enumerated = watch_done;
        let mut ready = false;
        let mut last_summary = String::new();
        let cancel = self.cancel.clone();
        let mut watch_open = !watch_done;
        // One interval for the whole loop: a sleep made anew each turn would never fire while
        // other events (e.g. frequent status requests) keep the loop busy.
        let mut tick = tokio::time::interval(STATIC_DEVICE_POLL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let watchdog_every = lifecycle.watchdog_interval();
        let mut watchdog =
            tokio::time::interval(watchdog_every.unwrap_or(Duration::from_secs(3600)));
        watchdog.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            if !ready && enumerated {
                self.poll_static();
                self.reconcile().await;
                last_summary = self.summary();
                lifecycle.ready(&last_summary);
                info!(event = "ready", "ready: {last_summary}");
                ready = true;
            }
            let need_tick = !self.config.devices.is_empty() || !self.failures.is_empty();
            tokio::select! {
                _ = cancel.cancelled() => break,
                msg = watch_rx.recv(), if watch_open => match msg {
                    Some(WatchMsg::Device(ev)) => self.on_device(ev),
                    Some(WatchMsg::Enumerated) => { enumerated = true; continue; }
                    None => {
                        watch_open = false;
                        enumerated = true;
                        warn!("the udev watch ended; hotplug no longer works");
                    }
                },
                Some(exit) = self.exits_rx.recv() => self.on_exit(exit),
                Some((syspath, status)) = self.sticks.done_rx.recv() => {
                    self.on_provisioned(syspath, status);
                    continue;
                }
                Some(req) = control_rx.recv() => {
                    let answer = match req.command {
                        Command::Status => Answer::Now(Reply::Status(Box::new(self.status()))),
                        Command::ReloadPki => {
                            // `provision` may have installed an operator PKI: settings first.
                            // The client hears back once the PKI task has re-read it, so the
                            // CLI says "re-read" only once the new material is in use.
                            let (ack, done) = oneshot::channel();
                            match self.refresh_pki_settings(Some(ack)) {
                                Ok(()) => Answer::AfterPkiRefresh(done),
                                // TLS is off: there is no PKI in use to re-read.
                                Err(()) => Answer::Now(Reply::Ok),
                            }
                        }
                        Command::Reload => Answer::Now(match self.reload(lifecycle).await {
                            Ok(summary) => Reply::Reloaded(summary),
                            Err(e) => Reply::Refused(format!("reload refused: {e}")),
                        }),
                    };
                    let _ = req.reply.send(answer);
                    continue;
                }
                _ = tick.tick(), if need_tick => self.poll_static(),
                _ = watchdog.tick(), if watchdog_every.is_some() => {
                    lifecycle.watchdog();
                    continue;
                }
                Some(()) = reload_rx.recv() => {
                    let _ = self.reload(lifecycle).await;
                    last_summary = self.summary();
                    continue;
                }
            }
            if ready {
                self.reconcile().await;
                let summary = self.summary();
                if summary != last_summary {
                    lifecycle.status(&summary);
                    last_summary = summary;
                }
            }
        }
        lifecycle.stopping();
        info!(
            event = "stopping",
            "shutting down: stopping {} relays",
            self.relays.len()
        );
        let stop_timeout = Duration::from_millis(self.config.limits.stop_timeout_ms);
        // The root token is cancelled, so all relays are stopping at once; wait for each.
        for (_, r) in std::mem::take(&mut self.relays) {
            r.handle.stop(stop_timeout).await;
        }
        match self.restart_for.take() {
            Some(why) => anyhow::bail!(
                "exiting so that systemd restarts lucidgate with a device allow-list that includes the new driver: {why}"
            ),
            None => Ok(()),
        }
    }
}
