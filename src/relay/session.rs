//! One client at a time (`policy = "exclusive"` and `"kick-old"`): the relay's idle loop, the
//! session of the client it serves, the client policy for a client that arrives meanwhile
//! (refused, or it takes over), settling the answers a leaving client left behind, and the one
//! place a client's departure is logged ([`log_end`], shared clients' too).

use std::net::SocketAddr;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing::{info, warn};

use super::listen::Incoming;
use super::metrics::{Scan, Side};
use super::pump::SessionEnd;
use super::{CLIENT_CLOSE_TIMEOUT, ExitReason, Relay, RelayStats, describe, module, pump, shared};
use crate::config::ClientPolicy;

/// Bytes read from the module while no client is connected are read (so the module never
/// blocks) and discarded, this many at a time.
const DRAIN_BUFFER: usize = 256;

/// What happened to a session, for the relay's idle loop.
enum SessionOutcome {
    /// The client left: wait for the next one.
    Idle,
    /// A newer client takes over (kick-old): serve it now.
    Next(Incoming),
    /// The relay must end.
    End(ExitReason),
}

/// Why the serving of one client stopped.
enum Stop {
    /// The session itself ended: the client left, or the device or the relay went.
    Ended(SessionEnd),
    /// A newer client takes over.
    TakenOver(Incoming),
    /// The relay is stopping.
    Cancelled,
}

impl Relay {
    /// Exclusive and kick-old: idle until a client comes (reading the port meanwhile, and asking
    /// GetId again while the module has not identified itself), then serve it until it leaves.
    pub(super) async fn serve_one_at_a_time(&mut self) -> ExitReason {
        let mut drain = [0u8; DRAIN_BUFFER];
        let mut next: Option<Incoming> = None;
        loop {
            // Idle: wait for a client, keep reading the port so a hang-up is noticed now.
            let retry_at = self.identity_retry.map(|r| r.at);
            let incoming = match next.take() {
                Some(i) => i,
                None => tokio::select! {
                    _ = self.cancel.cancelled() => return ExitReason::Stopped,
                    _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)), if retry_at.is_some() => {
                        if let Err(reason) = self.update_identity().await {
                            return reason;
                        }
                        continue;
                    }
                    i = self.incoming.recv() => match i {
                        Some(i) => i,
                        None => return ExitReason::Stopped,
                    },
                    r = self.tty.read(&mut drain) => match r {
                        Ok(0) => return ExitReason::DeviceGone("device hung up".into()),
                        Ok(n) => {
                            tracing::debug!("discarded {n} bytes from the module: no client connected");
                            // A device that never stops talking must not starve the other
                            // modules on this thread: let the I/O driver run between reads.
                            tokio::task::yield_now().await;
                            continue;
                        }
                        Err(e) => return ExitReason::DeviceGone(e.to_string()),
                    },
                },
            };
            match self.session(incoming).await {
                SessionOutcome::Idle => {}
                SessionOutcome::Next(kicker) => next = Some(kicker),
                SessionOutcome::End(reason) => return reason,
            }
        }
    }

    /// A client of a LucidControl module left with `unanswered` requests (e.g. one that never
    /// read, or one that left before a slow answer came): those answers are dropped as they
    /// come (see [`module::settle`]), so the next client's first answer is its own. (The requests still queued are left to the module:
    /// flushing them would cut a frame and the module would read the next client's request as
    /// the rest of it.) Costs nothing after a client whose requests were all answered.
    async fn settle(&mut self, who: &str, unanswered: u64, scan: &mut Scan) -> std::io::Result<()> {
        let limit = module::SETTLE_MAX;
        // A stop does not wait for a chatty module: the port is closed anyway.
        let (dropped, quiet) = tokio::select! {
            r = module::settle(&mut self.tty, scan, unanswered, self.spec.answer_timeout, limit) => r?,
            _ = self.cancel.cancelled() => return Ok(()),
        };
        if quiet {
            info!(
                event = "answers-dropped",
                "client {who} left with {unanswered} requests unanswered; dropped {dropped} bytes of answers meant for it"
            );
        } else {
            warn!(
                event = "answers-dropped",
                "client {who} left with {unanswered} requests unanswered; the module was still sending after {limit:?} ({dropped} bytes dropped), serving the next client anyway"
            );
        }
        Ok(())
    }

    /// Serves one client until it leaves, a newer client takes over or the relay must end.
    async fn session(&mut self, incoming: Incoming) -> SessionOutcome {
        let Incoming {
            client: mut accepted,
            _permit,
        } = incoming;
        drop(_permit);
        let who = describe(&accepted);
        info!(peer_addr = %accepted.peer, client_name = accepted.name.as_deref().unwrap_or(""), event = "client-connected", "client {who} connected");
        self.stats.clients.store(1, Ordering::Relaxed);
        self.stats.sessions.fetch_add(1, Ordering::Relaxed);
        *self.stats.client_list() = vec![who.clone()];

        // Frame boundaries of what the module sends, from this session into the settling after.
        let mut answers = Scan::new(Side::Answers);
        let (requests_before, answers_before) = (
            self.stats.metrics.requests.load(Ordering::Relaxed),
            self.stats.metrics.answers(),
        );
        let stop = {
            let stats = &*self.stats;
            let spec = &self.spec;
            let stream = &mut *accepted.stream;
            let tty = &mut self.tty;
            let read_only = accepted.read_only;
            let who = who.as_str();
            let answers = &mut answers;
            // Read-only clients are served frame by frame so their writes can be refused;
            // everyone else gets the raw byte pump.
            let pump = async move {
                if read_only {
                    let ctx = shared::ClientCtx {
                        who,
                        read_only,
                        idle_timeout: spec.idle_timeout,
                        metrics: &stats.metrics,
                        traffic: &stats.traffic,
                    };
                    shared::serve_alone(stream, tty, &ctx, spec.answer_timeout).await
                } else {
                    // An answer to a request whose client left is not this client's.
                    if let Err(e) = module::discard_pending(tty) {
                        return SessionEnd::DeviceGone(e);
                    }
                    pump::pump(
                        stream,
                        tty,
                        spec.buffer_bytes,
                        spec.idle_timeout,
                        &stats.traffic,
                        &stats.metrics,
                        answers,
                    )
                    .await
                }
            };
            tokio::pin!(pump);
            loop {
                tokio::select! {
                    // The session first: a client that has already closed must release the
                    // module before a newcomer is judged (a quick reconnect is not refused).
                    biased;
                    end = &mut pump => break Stop::Ended(end),
                    _ = self.cancel.cancelled() => break Stop::Cancelled,
                    i = self.incoming.recv() => {
                        let Some(other) = i else { break Stop::Cancelled };
                        if let Some(other) = newcomer(self.spec.policy, &self.stats, who, accepted.peer, other) {
                            break Stop::TakenOver(other);
                        }
                    }
                }
            }
        };
        let _ = tokio::time::timeout(CLIENT_CLOSE_TIMEOUT, accepted.stream.shutdown()).await;
        self.stats.clients.store(0, Ordering::Relaxed);
        self.stats.client_list().clear();
        let client_left = matches!(
            stop,
            Stop::Ended(
                SessionEnd::ClientClosed
                    | SessionEnd::ClientError(_)
                    | SessionEnd::ClientIdle(_)
                    | SessionEnd::BadFrame(_)
            ) | Stop::TakenOver(_)
        );
        let unanswered = self
            .stats
            .metrics
            .requests
            .load(Ordering::Relaxed)
            .saturating_sub(requests_before)
            .saturating_sub(self.stats.metrics.answers().saturating_sub(answers_before));
        // Only for modules lucidgate speaks the protocol with: a tty with `identify = false`
        // is any serial device, a byte pipe whose bytes are not requests and answers.
        if client_left
            && self.spec.identify
            && unanswered > 0
            && let Err(e) = self.settle(&who, unanswered, &mut answers).await
        {
            return SessionOutcome::End(ExitReason::DeviceGone(e.to_string()));
        }
        match stop {
            Stop::Ended(SessionEnd::RelayGone) | Stop::Cancelled => {
                SessionOutcome::End(ExitReason::Stopped)
            }
            Stop::Ended(SessionEnd::DeviceGone(e)) => {
                SessionOutcome::End(ExitReason::DeviceGone(e.to_string()))
            }
            Stop::Ended(end) => {
                log_end(&who, &end);
                SessionOutcome::Idle
            }
            Stop::TakenOver(other) => SessionOutcome::Next(other),
        }
    }
}

/// The client policy: `other` arrived while `who` (at `peer`) is served. Under
/// `policy = "exclusive"` it is refused, unless the client served has finished sending;
/// otherwise it takes over, and is returned.
fn newcomer(
    policy: ClientPolicy,
    stats: &RelayStats,
    who: &str,
    peer: SocketAddr,
    other: Incoming,
) -> Option<Incoming> {
    let lingering = stats.traffic.half_closed.load(Ordering::Relaxed);
    match policy {
        ClientPolicy::Exclusive if !lingering => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            warn!(peer_addr = %other.client.peer, event = "client-refused",
                "refused client {}: module is in use by {who} (policy exclusive; set policy = \"kick-old\" to let the newest client win)",
                describe(&other.client));
            // Dropping `other` closes the connection.
            None
        }
        _ => {
            info!(peer_addr = %peer, event = "client-kicked",
                "client {who} disconnected: {} takes over ({})", describe(&other.client),
                if lingering { "the old client had finished sending" } else { "policy kick-old" });
            Some(other)
        }
    }
}

/// Logs that client `who` left, and why. The relay's or the device's end, seen by a client
/// (shared clients see those too), is logged as a plain disconnect.
pub(crate) fn log_end(who: &str, end: &SessionEnd) {
    match end {
        SessionEnd::BadFrame(e) => {
            warn!(event = "client-disconnected", "client {who} cut off: {e}")
        }
        SessionEnd::ClientIdle(t) => info!(
            event = "client-disconnected",
            "client {who} idle for {t:?}; disconnected (limits.idle_timeout_secs)"
        ),
        SessionEnd::ClientError(e) => {
            info!(event = "client-disconnected", "client {who} dropped: {e}")
        }
        SessionEnd::ClientClosed | SessionEnd::DeviceGone(_) | SessionEnd::RelayGone => {
            info!(event = "client-disconnected", "client {who} disconnected")
        }
    }
}
