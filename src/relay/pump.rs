//! The byte pump: client ⇄ module, both directions at once, no added delay.
//!
//! Each direction reads what is there and writes it on at once (no character delay, no
//! coalescing timer); a full peer stops that direction's reads (backpressure) instead of
//! queueing. Unlike `copy_bidirectional`, the ends are not symmetric: the module never sends
//! EOF, so a client's EOF ends the session, and any read or write error on the module means the
//! module is gone.
//!
//! The pump counts frames as they pass ([`Scan`]) without holding any byte back.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::metrics::{Metrics, Scan, Side};

/// How a session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// The client closed its side.
    ClientClosed,
    /// The client's connection failed (reset, broken pipe, TLS error).
    ClientError(io::Error),
    /// The client sent nothing for the idle timeout.
    ClientIdle(Duration),
    /// The module's device failed or hung up (unplugged).
    DeviceGone(io::Error),
    /// The client sent something that is not a request frame (protocol-aware sessions only).
    BadFrame(String),
    /// The relay is stopping.
    RelayGone,
}

/// Byte counters of a relay, updated by the pump.
#[derive(Debug, Default)]
pub(crate) struct Traffic {
    /// Client → module.
    pub(crate) bytes_up: AtomicU64,
    /// Module → client.
    pub(crate) bytes_down: AtomicU64,
    /// The current client has half-closed: it sends no more requests, so it no longer holds
    /// the module against a new client.
    pub(crate) half_closed: AtomicBool,
}

/// After a client half-closes (EOF on its side, as `printf … | socat - TCP:…` does), answers still
/// on their way are delivered until the module has been quiet this long: the module's own answer
/// timeout (about 1 s per the protocol), so the last request's answer is never lost.
const HALF_CLOSE_LINGER: Duration = Duration::from_secs(1);

fn eof(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, what.to_string())
}

/// Pumps bytes between `client` and `device` until one side ends.
pub(crate) async fn pump<C, D>(
    client: &mut C,
    device: &mut D,
    buffer_bytes: usize,
    idle_timeout: Option<Duration>,
    traffic: &Traffic,
    metrics: &Metrics,
    down_scan: &mut Scan,
) -> SessionEnd
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    D: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    traffic.half_closed.store(false, Ordering::Relaxed);
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut device_rx, mut device_tx) = tokio::io::split(device);
    let mut up_buf = vec![0u8; buffer_bytes];
    let mut down_buf = vec![0u8; buffer_bytes];
    let mut up_scan = Scan::new(Side::Requests);

    let up = async {
        loop {
            let read = client_rx.read(&mut up_buf);
            let n = match idle_timeout {
                Some(t) => match tokio::time::timeout(t, read).await {
                    Ok(r) => r,
                    Err(_) => return SessionEnd::ClientIdle(t),
                },
                None => read.await,
            };
            let n = match n {
                Ok(0) => return SessionEnd::ClientClosed,
                Ok(n) => n,
                Err(e) => return SessionEnd::ClientError(e),
            };
            // Written and counted piece by piece: when the session ends while this waits for
            // the module (the other direction failed), every request byte the module got is
            // counted, so the answers still owed are known exactly. No flush: on a tty it is
            // tcdrain, which would block until the bytes left the wire.
            let mut done = 0;
            while done < n {
                let w = match device_tx.write(&up_buf[done..n]).await {
                    Ok(0) => return SessionEnd::DeviceGone(eof("device accepts no more bytes")),
                    Ok(w) => w,
                    Err(e) => return SessionEnd::DeviceGone(e),
                };
                traffic.bytes_up.fetch_add(w as u64, Ordering::Relaxed);
                up_scan.count(&up_buf[done..done + w], metrics);
                done += w;
            }
        }
    };
    let down = async {
        loop {
            let n = match device_rx.read(&mut down_buf).await {
                Ok(0) => return SessionEnd::DeviceGone(eof("device hung up")),
                Ok(n) => n,
                Err(e) => return SessionEnd::DeviceGone(e),
            };
            // Counted as soon as read: an answer that reaches a client that just left is
            // still an answer (not one the relay must wait for afterwards).
            down_scan.count(&down_buf[..n], metrics);
            if let Err(e) = client_tx.write_all(&down_buf[..n]).await {
                return SessionEnd::ClientError(e);
            }
            // TLS buffers records until flushed; for TCP this is free.
            if let Err(e) = client_tx.flush().await {
                return SessionEnd::ClientError(e);
            }
            traffic.bytes_down.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    tokio::pin!(up, down);
    let end = tokio::select! {
        end = &mut up => end,
        end = &mut down => return end,
    };
    if !matches!(end, SessionEnd::ClientClosed) {
        return end;
    }
    // Half-close: keep the module→client direction until the module is quiet.
    traffic.half_closed.store(true, Ordering::Relaxed);
    let linger = tokio::time::sleep(HALF_CLOSE_LINGER);
    tokio::pin!(linger);
    let mut seen = traffic.bytes_down.load(Ordering::Relaxed);
    loop {
        tokio::select! {
            end = &mut down => return match end {
                SessionEnd::ClientError(_) => SessionEnd::ClientClosed,
                other => other,
            },
            _ = &mut linger => {
                let now = traffic.bytes_down.load(Ordering::Relaxed);
                if now == seen {
                    return SessionEnd::ClientClosed;
                }
                seen = now;
                linger.as_mut().reset(tokio::time::Instant::now() + HALF_CLOSE_LINGER);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bytes_flow_both_ways_and_client_eof_ends() {
        let (mut client_far, mut client) = tokio::io::duplex(64);
        let (mut device_far, mut device) = tokio::io::duplex(64);
        let traffic = Traffic::default();
        let task = async {
            client_far.write_all(b"\x46\x00\x1d\x00").await.unwrap();
            let mut req = [0u8; 4];
            device_far.read_exact(&mut req).await.unwrap();
            assert_eq!(&req, b"\x46\x00\x1d\x00");
            device_far
                .write_all(b"\x00\x04\x5e\xcc\x1a\x00")
                .await
                .unwrap();
            let mut ans = [0u8; 6];
            client_far.read_exact(&mut ans).await.unwrap();
            assert_eq!(&ans, b"\x00\x04\x5e\xcc\x1a\x00");
            drop(client_far);
            device_far
        };
        let (end, _device_far) = {
            let metrics = Metrics::default();
            let mut scan = Scan::new(Side::Answers);
            tokio::join!(
                pump(
                    &mut client,
                    &mut device,
                    16,
                    None,
                    &traffic,
                    &metrics,
                    &mut scan
                ),
                task
            )
        };
        assert!(matches!(end, SessionEnd::ClientClosed), "{end:?}");
        assert_eq!(traffic.bytes_up.load(Ordering::Relaxed), 4);
        assert_eq!(traffic.bytes_down.load(Ordering::Relaxed), 6);
    }

    #[tokio::test(start_paused = true)]
    async fn answers_after_a_client_half_close_are_delivered() {
        let (client_far, mut client) = tokio::io::duplex(64);
        let (mut device_far, mut device) = tokio::io::duplex(64);
        let traffic = Traffic::default();
        let (mut far_rx, mut far_tx) = tokio::io::split(client_far);
        let task = async {
            far_tx.write_all(b"\xc0\x00\x00\x00").await.unwrap();
            far_tx.shutdown().await.unwrap(); // half-close, like socat after stdin EOF
            let mut req = [0u8; 4];
            device_far.read_exact(&mut req).await.unwrap();
            tokio::time::sleep(Duration::from_millis(700)).await;
            device_far.write_all(b"\x00\x01\x07").await.unwrap();
            let mut ans = [0u8; 3];
            far_rx.read_exact(&mut ans).await.unwrap();
            assert_eq!(&ans, b"\x00\x01\x07");
            device_far
        };
        let (end, _d) = {
            let metrics = Metrics::default();
            let mut scan = Scan::new(Side::Answers);
            tokio::join!(
                pump(
                    &mut client,
                    &mut device,
                    16,
                    None,
                    &traffic,
                    &metrics,
                    &mut scan
                ),
                task
            )
        };
        assert!(matches!(end, SessionEnd::ClientClosed), "{end:?}");
        assert_eq!(traffic.bytes_down.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn device_hangup_ends_the_session() {
        let (_client_far, mut client) = tokio::io::duplex(64);
        let (device_far, mut device) = tokio::io::duplex(64);
        drop(device_far);
        let end = pump(
            &mut client,
            &mut device,
            16,
            None,
            &Traffic::default(),
            &Metrics::default(),
            &mut Scan::new(Side::Answers),
        )
        .await;
        assert!(matches!(end, SessionEnd::DeviceGone(_)), "{end:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn idle_client_is_cut_off() {
        let (_client_far, mut client) = tokio::io::duplex(64);
        let (_device_far, mut device) = tokio::io::duplex(64);
        let t = Duration::from_secs(30);
        let end = pump(
            &mut client,
            &mut device,
            16,
            Some(t),
            &Traffic::default(),
            &Metrics::default(),
            &mut Scan::new(Side::Answers),
        )
        .await;
        assert!(
            matches!(end, SessionEnd::ClientIdle(d) if d == t),
            "{end:?}"
        );
    }
}
