//! One attached port's life: connect, pump bytes, notice the loss, wait, reconnect — forever,
//! with the local pty staying put.
//!
//! While there is no connection, what a program writes is held for at most the module's answer
//! timeout ([`Limits::hold`]): a request that reaches the module later than that would be
//! answered after the program gave up, and its answer would then be taken for the answer to
//! the program's next request. So a held request is delivered if the link comes back in time
//! and dropped (with a log line) otherwise. Bytes from the module are never dropped.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::connect::{Connector, Target};
use super::local::LocalPort;
use crate::protocol::{Answer, Identity, opcode};
use crate::transport::ClientStream;

/// Size of the read buffers in each direction.
const BUFFER_BYTES: usize = 4096;
/// At most this many bytes written while disconnected are held.
const HOLD_MAX_BYTES: usize = 4096;
/// How long the GetId check of `SERIAL@HOST` waits for the answer.
const IDENTITY_TIMEOUT: Duration = Duration::from_secs(3);
/// A session that lasted this long counts as healthy: the next loss retries quickly again.
const STABLE_AFTER: Duration = Duration::from_secs(5);

/// Timing of one attached port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// How long bytes written while disconnected are held (the module's answer timeout).
    pub(crate) hold: Duration,
    /// First retry delay after a loss.
    pub(crate) retry_min: Duration,
    /// Retry delays double up to this.
    pub(crate) retry_max: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            hold: Duration::from_millis(1000),
            retry_min: Duration::from_millis(100),
            retry_max: Duration::from_secs(10),
        }
    }
}

/// Capped exponential backoff with ±20 % jitter (so many clients do not retry in step).
#[derive(Debug)]
struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            next: min,
            min,
            max: max.max(min),
        }
    }

    fn reset(&mut self) {
        self.next = self.min;
    }

    /// The delay to wait now; doubles the following one.
    fn delay(&mut self) -> Duration {
        let base = self.next;
        self.next = (self.next * 2).min(self.max);
        base.mul_f64(0.8 + 0.4 * fastrand::f64())
    }
}

/// Bytes a program wrote while there was no connection.
#[derive(Debug, Default)]
struct Held {
    chunks: VecDeque<(Instant, Vec<u8>)>,
    bytes: usize,
}

impl Held {
    fn push(&mut self, data: &[u8]) {
        while self.bytes + data.len() > HOLD_MAX_BYTES {
            match self.chunks.pop_front() {
                Some((_, old)) => {
                    self.bytes -= old.len();
                    tracing::warn!(
                        "dropped {} held bytes: more than {HOLD_MAX_BYTES} bytes written while disconnected",
                        old.len()
                    );
                }
                None => break,
            }
        }
        let data = &data[..data.len().min(HOLD_MAX_BYTES)];
        self.bytes += data.len();
        self.chunks.push_back((Instant::now(), data.to_vec()));
    }

    /// Drops what is older than `hold`, with a log line.
    fn expire(&mut self, hold: Duration) {
        let now = Instant::now();
        while let Some((at, _)) = self.chunks.front() {
            if now.duration_since(*at) < hold {
                break;
            }
            let (_, data) = self.chunks.pop_front().expect("front exists");
            self.bytes -= data.len();
            tracing::warn!(
                bytes = data.len(),
                "dropped a request written while disconnected: not delivered within {} ms (the module timeout); the program sees no answer and can retry",
                hold.as_millis()
            );
        }
    }

    fn next_expiry(&self, hold: Duration) -> Option<Instant> {
        self.chunks.front().map(|(at, _)| *at + hold)
    }

    fn take(&mut self) -> Vec<u8> {
        self.bytes = 0;
        self.chunks.drain(..).flat_map(|(_, d)| d).collect()
    }
}

/// One attached port.
pub(crate) struct Session {
    pub(crate) target: Target,
    pub(crate) connector: Connector,
    pub(crate) port: LocalPort,
    pub(crate) limits: Limits,
}

/// Why a connected session ended.
enum End {
    Cancelled,
    Lost(String),
}

impl Session {
    /// Runs until `cancel`; never returns early on network trouble.
    pub(crate) async fn run(self, cancel: CancellationToken) {
        let mut held = Held::default();
        let mut backoff = Backoff::new(self.limits.retry_min, self.limits.retry_max);
        let mut failures = 0u32;
        loop {
            let attempt = self.connect();
            let connected = tokio::select! {
                r = self.holding(&mut held, attempt) => r,
                _ = cancel.cancelled() => return,
            };
            let why = match connected {
                Ok(stream) => {
                    tracing::info!(
                        "connected to {} ({}){}",
                        self.target,
                        self.connector.describe(),
                        if failures > 0 {
                            format!(" after {failures} failed attempts")
                        } else {
                            String::new()
                        }
                    );
                    failures = 0;
                    let started = Instant::now();
                    match self.pump(stream, &mut held, &cancel).await {
                        End::Cancelled => return,
                        End::Lost(why) => {
                            if started.elapsed() >= STABLE_AFTER {
                                backoff.reset();
                            }
                            format!("lost the connection to {}: {why}", self.target)
                        }
                    }
                }
                Err(why) => {
                    failures += 1;
                    format!("cannot connect to {}: {why}", self.target)
                }
            };
            let delay = backoff.delay();
            tracing::warn!("{why}; retrying in {:.1} s", delay.as_secs_f64());
            tokio::select! {
                _ = self.holding(&mut held, tokio::time::sleep(delay)) => {}
                _ = cancel.cancelled() => return,
            }
        }
    }

    /// Connects and, for `SERIAL@HOST`, checks with GetId that the right module answers.
    async fn connect(&self) -> Result<Box<dyn ClientStream>, String> {
        let mut stream = self.connector.connect(&self.target).await?;
        if let Some(want) = &self.target.serial {
            let got = tokio::time::timeout(IDENTITY_TIMEOUT, ask_serial(&mut stream))
                .await
                .map_err(|_| {
                    format!(
                        "no GetId answer within {IDENTITY_TIMEOUT:?} (is another client holding the module?)"
                    )
                })??;
            if !got.eq_ignore_ascii_case(want) {
                return Err(format!(
                    "port {} serves module {got}, not {want}: give the port explicitly (SERIAL@HOST:PORT) or check the server's ports.base/span",
                    self.target.port
                ));
            }
        }
        Ok(stream)
    }

    /// Runs `fut` while holding (bounded, timed) what programs write to the port.
    async fn holding<F: Future>(&self, held: &mut Held, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        let mut buf = [0u8; BUFFER_BYTES];
        loop {
            let expiry = held.next_expiry(self.limits.hold);
            tokio::select! {
                out = &mut fut => return out,
                r = self.port.read(&mut buf) => match r {
                    Ok(n) if n > 0 => {
                        tracing::debug!(bytes = n, "holding bytes written while disconnected");
                        held.push(&buf[..n]);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!("reading the local pty: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = async { tokio::time::sleep_until(expiry.expect("some")).await }, if expiry.is_some() => {
                    held.expire(self.limits.hold);
                }
            }
        }
    }

    /// Moves bytes both ways until the connection ends or `cancel`.
    async fn pump(
        &self,
        stream: Box<dyn ClientStream>,
        held: &mut Held,
        cancel: &CancellationToken,
    ) -> End {
        let (mut net_r, mut net_w) = tokio::io::split(stream);
        held.expire(self.limits.hold);
        let pending = held.take();
        if !pending.is_empty() {
            tracing::info!(
                bytes = pending.len(),
                "delivering bytes written while disconnected"
            );
            if let Err(e) = net_w.write_all(&pending).await {
                held.push(&pending);
                return End::Lost(format!("writing: {e}"));
            }
        }
        let mut up_buf = vec![0u8; BUFFER_BYTES];
        let up = async {
            loop {
                let n = match self.port.read(&mut up_buf).await {
                    Ok(0) => continue,
                    Ok(n) => n,
                    Err(e) => return (format!("reading the local pty: {e}"), None),
                };
                let r = match net_w.write_all(&up_buf[..n]).await {
                    Ok(()) => net_w.flush().await,
                    Err(e) => Err(e),
                };
                if let Err(e) = r {
                    // Not delivered: hold it, so a quick reconnect still delivers it in time.
                    return (format!("writing: {e}"), Some(up_buf[..n].to_vec()));
                }
            }
        };
        let down = async {
            let mut buf = vec![0u8; BUFFER_BYTES];
            loop {
                match net_r.read(&mut buf).await {
                    Ok(0) => return "the server closed it".to_string(),
                    Ok(n) => {
                        if let Err(e) = self.port.write_all(&buf[..n]).await {
                            return format!("writing to the local pty: {e}");
                        }
                    }
                    Err(e) => return format!("reading: {e}"),
                }
            }
        };
        tokio::select! {
            (why, undelivered) = up => {
                if let Some(bytes) = undelivered {
                    held.push(&bytes);
                }
                End::Lost(why)
            }
            why = down => End::Lost(why),
            _ = cancel.cancelled() => End::Cancelled,
        }
    }
}

/// Sends GetId and returns the module's serial.
async fn ask_serial(stream: &mut Box<dyn ClientStream>) -> Result<String, String> {
    stream
        .write_all(&[opcode::GET_ID, 0, 0, 0])
        .await
        .map_err(|e| format!("sending GetId: {e}"))?;
    stream
        .flush()
        .await
        .map_err(|e| format!("sending GetId: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 64];
    loop {
        if let Ok((answer, _)) = Answer::parse(&buf) {
            return match Identity::decode(&answer.data) {
                Some(id) if answer.status == 0 => Ok(id.usb_serial()),
                _ => Err(format!(
                    "the module answered GetId with status 0x{:02X} and {} bytes",
                    answer.status,
                    answer.data.len()
                )),
            };
        }
        const CLOSED: &str = "the server closed the connection before answering GetId (another client holds the module, or this client is not allowed on it)";
        let n = match stream.read(&mut chunk).await {
            Ok(0) => return Err(CLOSED.to_string()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(CLOSED.to_string());
            }
            Err(e) => return Err(format!("reading the GetId answer: {e}")),
        };
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_with_jitter() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let d: Vec<_> = (0..6).map(|_| b.delay().as_millis()).collect();
        assert!((80..=120).contains(&d[0]), "{d:?}");
        assert!((160..=240).contains(&d[1]), "{d:?}");
        assert!((800..=1200).contains(&d[5]), "{d:?}");
        b.reset();
        assert!(b.delay() <= Duration::from_millis(120));
    }

    #[tokio::test(start_paused = true)]
    async fn held_bytes_expire_after_the_hold_time_and_stay_bounded() {
        let mut h = Held::default();
        h.push(b"abcd");
        tokio::time::advance(Duration::from_millis(600)).await;
        h.push(b"efgh");
        tokio::time::advance(Duration::from_millis(500)).await;
        h.expire(Duration::from_secs(1));
        assert_eq!(h.take(), b"efgh");
        for _ in 0..10 {
            h.push(&[0u8; 1000]);
        }
        assert!(h.bytes <= HOLD_MAX_BYTES);
        assert_eq!(h.take().len(), 4000);
    }
}
