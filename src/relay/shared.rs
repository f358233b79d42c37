//! Protocol-aware sessions: a client's bytes are parsed into request frames, writes from
//! read-only clients are answered locally, and requests reach the module one at a time through a
//! queue, each answer going back to the client that asked.
//!
//! Used for every client with `policy = "shared"` (many clients at once) and for read-only
//! clients under the other policies. The raw byte pump ([`super::pump`]) stays the default.

use std::io;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::metrics::Metrics;
use super::module::{Exchanged, exchange};
use super::pump::{SessionEnd, Traffic};
use crate::protocol::{
    Answer, MAX_REQUEST_LEN, Request, is_known_opcode, is_write, opcode_name, status,
};

/// Bytes read from a client at a time (a frame is at most [`MAX_REQUEST_LEN`]).
const CLIENT_READ_CHUNK: usize = 512;

/// One request on its way to the module, with where its answer goes.
#[derive(Debug)]
pub(crate) struct Ask {
    pub(crate) frame: Vec<u8>,
    pub(crate) reply: oneshot::Sender<Exchanged>,
    /// Asked by lucidgate itself (a GetId retry), not by a client: not counted as a request.
    pub(crate) internal: bool,
}

/// Who a client is and what it may do.
pub(crate) struct ClientCtx<'a> {
    /// Address and certificate name, for logs.
    pub(crate) who: &'a str,
    pub(crate) read_only: bool,
    pub(crate) idle_timeout: Option<Duration>,
    pub(crate) metrics: &'a Metrics,
    pub(crate) traffic: &'a Traffic,
}

/// Serves one client frame by frame until it leaves, sending its requests into `asks`.
pub(crate) async fn serve_client<S>(
    stream: &mut S,
    ctx: &ClientCtx<'_>,
    asks: mpsc::Sender<Ask>,
) -> SessionEnd
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut buf: Vec<u8> = Vec::with_capacity(MAX_REQUEST_LEN + CLIENT_READ_CHUNK);
    let mut chunk = [0u8; CLIENT_READ_CHUNK];
    loop {
        // Every whole frame that has arrived, in order, one answer at a time.
        loop {
            if let Some(&opc) = buf.first()
                && !is_known_opcode(opc)
            {
                ctx.metrics.bad_frames.fetch_add(1, Relaxed);
                return SessionEnd::BadFrame(format!(
                    "sent 0x{opc:02X} where a request must start (not a LucidControl opcode)"
                ));
            }
            let Ok(n) = Request::check(&buf) else { break };
            let frame: Vec<u8> = buf.drain(..n).collect();
            if let Err(end) = handle(stream, ctx, &asks, frame).await {
                return end;
            }
        }
        let read = stream.read(&mut chunk);
        let n = match ctx.idle_timeout {
            Some(t) => match tokio::time::timeout(t, read).await {
                Ok(r) => r,
                Err(_) => return SessionEnd::ClientIdle(t),
            },
            None => read.await,
        };
        match n {
            Ok(0) => return SessionEnd::ClientClosed,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return SessionEnd::ClientError(e),
        }
    }
}

async fn handle<S>(
    stream: &mut S,
    ctx: &ClientCtx<'_>,
    asks: &mpsc::Sender<Ask>,
    frame: Vec<u8>,
) -> Result<(), SessionEnd>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let opc = frame[0];
    let answer = if ctx.read_only && is_write(opc) {
        ctx.metrics.denied_writes.fetch_add(1, Relaxed);
        warn!(
            event = "write-denied",
            opcode = opcode_name(opc),
            "refused {} from read-only client {}: answered 0x{:02X} (not supported); the module did not see it",
            opcode_name(opc),
            ctx.who,
            status::NOT_SUPPORTED
        );
        Answer::error(status::NOT_SUPPORTED).encode()
    } else {
        let len = frame.len() as u64;
        let (reply, answer) = oneshot::channel();
        let ask = Ask {
            frame,
            reply,
            internal: false,
        };
        if asks.send(ask).await.is_err() {
            return Err(SessionEnd::RelayGone);
        }
        ctx.traffic.bytes_up.fetch_add(len, Relaxed);
        match answer.await {
            Ok(Exchanged::Answer(a)) => a,
            // The module did not answer: neither does lucidgate (as with the module itself, the
            // client's own timeout applies; a late answer is discarded, never misrouted).
            Ok(Exchanged::Timeout { .. }) => return Ok(()),
            Err(_) => return Err(SessionEnd::RelayGone),
        }
    };
    let write = async {
        stream.write_all(&answer).await?;
        stream.flush().await
    };
    match write.await {
        Ok(()) => {
            ctx.traffic
                .bytes_down
                .fetch_add(answer.len() as u64, Relaxed);
            Ok(())
        }
        Err(e) => Err(SessionEnd::ClientError(e)),
    }
}

/// The module side: takes requests from `asks` one at a time and exchanges them with `dev`,
/// until `stop` is cancelled or every sender is gone. An exchange in flight is finished first
/// (see [`super::module::STOP_GRACE`]).
/// Between requests the port is read so a hang-up is seen at once. `Err`: the module is gone.
pub(crate) async fn serve_module<D>(
    dev: &mut D,
    asks: &mut mpsc::Receiver<Ask>,
    stop: &CancellationToken,
    unplugged: &CancellationToken,
    timeout: Duration,
    metrics: &Metrics,
) -> io::Result<()>
where
    D: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut drain = [0u8; 256];
    loop {
        let ask = tokio::select! {
            biased;
            _ = stop.cancelled() => return Ok(()),
            a = asks.recv() => match a {
                Some(a) => a,
                None => return Ok(()),
            },
            r = dev.read(&mut drain) => match r {
                Ok(0) => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "device hung up")),
                Ok(n) => {
                    debug!("discarded {n} bytes from the module that no request asked for");
                    continue;
                }
                Err(e) => return Err(e),
            },
        };
        if !ask.internal {
            metrics.requests.fetch_add(1, Relaxed);
        }
        let got = exchange(dev, &ask.frame, timeout, stop, unplugged).await?;
        if ask.internal {
            let _ = ask.reply.send(got);
            continue;
        }
        match &got {
            Exchanged::Answer(a) => metrics.answer(a[0]),
            Exchanged::Timeout { partial } => {
                metrics.timeouts.fetch_add(1, Relaxed);
                warn!(
                    event = "module-timeout",
                    "module did not answer {} within {} ms{}",
                    opcode_name(ask.frame[0]),
                    timeout.as_millis(),
                    if *partial > 0 {
                        format!(" ({partial} bytes of an answer)")
                    } else {
                        String::new()
                    }
                );
            }
        }
        // The client may have left meanwhile; its answer is then dropped.
        let _ = ask.reply.send(got);
    }
}

/// One client, served frame by frame on a module nobody else uses (a read-only client under
/// the exclusive or kick-old policy).
pub(crate) async fn serve_alone<S, D>(
    stream: &mut S,
    dev: &mut D,
    ctx: &ClientCtx<'_>,
    timeout: Duration,
) -> SessionEnd
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
    D: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (tx, mut rx) = mpsc::channel(1);
    // The module side ends when the client's queue closes (not on its own).
    let until_done = CancellationToken::new();
    let client = serve_client(stream, ctx, tx);
    let module = serve_module(dev, &mut rx, &until_done, &until_done, timeout, ctx.metrics);
    tokio::pin!(client, module);
    tokio::select! {
        end = &mut client => {
            // The client's queue is closed: the module side finishes the request in flight
            // (if any) and returns.
            match module.await {
                Ok(()) => end,
                Err(e) => SessionEnd::DeviceGone(e),
            }
        }
        r = &mut module => match r {
            Err(e) => SessionEnd::DeviceGone(e),
            Ok(()) => SessionEnd::RelayGone,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Random byte streams from a client: the session ends (bad frame, EOF) without a panic, and
    /// what reached the module is whole frames only.
    #[tokio::test(start_paused = true)]
    async fn random_client_bytes_never_panic_and_only_frames_pass() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..300 {
            let len = (next() % 64) as usize;
            // Mostly valid opcodes, so frames of every shape get through.
            let ops = [0x40u8, 0x42, 0x46, 0x48, 0x52, 0xA0, 0xA2, 0xC0];
            let bytes: Vec<u8> = (0..len)
                .map(|i| {
                    let r = next();
                    if i % 7 == 0 {
                        ops[(r % 8) as usize]
                    } else {
                        r as u8
                    }
                })
                .collect();
            let (mut client_far, mut client) = tokio::io::duplex(4096);
            let (mut module_far, mut module) = tokio::io::duplex(4096);
            let metrics = Metrics::default();
            let traffic = Traffic::default();
            let ctx = ClientCtx {
                who: "fuzz",
                read_only: next() % 2 == 0,
                idle_timeout: None,
                metrics: &metrics,
                traffic: &traffic,
            };
            client_far.write_all(&bytes).await.unwrap();
            drop(client_far);
            // The module answers every request it gets with an empty OK.
            let answering = async {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 512];
                loop {
                    match tokio::time::timeout(
                        Duration::from_millis(50),
                        module_far.read(&mut chunk),
                    )
                    .await
                    {
                        Ok(Ok(n)) if n > 0 => {
                            buf.extend_from_slice(&chunk[..n]);
                            while let Ok(n) = Request::check(&buf) {
                                assert!(is_known_opcode(buf[0]), "only frames reach the module");
                                buf.drain(..n);
                                module_far.write_all(&[0, 0]).await.unwrap();
                            }
                        }
                        _ => return buf,
                    }
                }
            };
            let t = Duration::from_millis(10);
            let (end, rest) =
                tokio::join!(serve_alone(&mut client, &mut module, &ctx, t), answering);
            assert!(
                rest.is_empty(),
                "a partial frame reached the module: {rest:02X?}"
            );
            assert!(
                matches!(
                    end,
                    SessionEnd::ClientClosed | SessionEnd::BadFrame(_) | SessionEnd::ClientError(_)
                ),
                "{end:?}"
            );
        }
    }

    /// A read-only client: reads pass, a write is answered 0xA0 locally and never reaches the
    /// module, garbage ends the session.
    #[tokio::test]
    async fn read_only_client_reads_but_never_writes() {
        let (mut client_far, mut client) = tokio::io::duplex(256);
        let (mut module_far, mut module) = tokio::io::duplex(256);
        let metrics = Metrics::default();
        let traffic = Traffic::default();
        let ctx = ClientCtx {
            who: "test (dashboard)",
            read_only: true,
            idle_timeout: None,
            metrics: &metrics,
            traffic: &traffic,
        };
        let far = async {
            client_far
                .write_all(&[0x40, 0x00, 0x00, 0x01, 0x01])
                .await
                .unwrap();
            let mut a = [0u8; 2];
            client_far.read_exact(&mut a).await.unwrap();
            assert_eq!(a, [0xA0, 0x00]);
            client_far
                .write_all(&[0x46, 0x00, 0x00, 0x00])
                .await
                .unwrap();
            let mut req = [0u8; 4];
            module_far.read_exact(&mut req).await.unwrap();
            assert_eq!(
                req,
                [0x46, 0x00, 0x00, 0x00],
                "the write never reached the module"
            );
            module_far.write_all(&[0x00, 0x01, 0x01]).await.unwrap();
            let mut a = [0u8; 3];
            client_far.read_exact(&mut a).await.unwrap();
            assert_eq!(a, [0x00, 0x01, 0x01]);
            client_far.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
            (client_far, module_far)
        };
        let t = Duration::from_secs(1);
        let (end, _) = tokio::join!(serve_alone(&mut client, &mut module, &ctx, t), far);
        assert!(matches!(end, SessionEnd::BadFrame(_)), "{end:?}");
        let m = metrics.snapshot();
        assert_eq!(
            (m.requests, m.answers_ok, m.denied_writes, m.bad_frames),
            (1, 1, 1, 1)
        );
    }
}
