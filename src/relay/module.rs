//! One request/answer exchange with the module: the unit the protocol-aware features (identity,
//! shared mode, read-only clients) are built from.
//!
//! An exchange first discards bytes nobody asked for (a late answer to an earlier request),
//! writes one request and reads exactly one answer frame, or gives up after the answer timeout.
//! Callers never drop an exchange midway: a relay that is stopped while a request is out still
//! waits [`STOP_GRACE`] for the answer (a module answers within milliseconds), so no answer is
//! left in the port for whoever opens it next, and a silent module cannot hold a stop up for the
//! whole answer timeout.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::metrics::Scan;
use crate::protocol::{Answer, MAX_ANSWER_LEN};

/// When the relay is stopped during an exchange, how much longer the answer is waited for.
pub(crate) const STOP_GRACE: Duration = Duration::from_millis(100);

/// What came back for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Exchanged {
    /// One answer frame, exactly as the module sent it.
    Answer(Vec<u8>),
    /// No complete answer within the timeout (`partial` bytes of one had arrived).
    Timeout { partial: usize },
}

/// Reads and drops whatever the port holds right now, without waiting. Returns the number of
/// bytes dropped; `Err` when the port failed or hung up.
pub(crate) fn discard_pending<D: AsyncRead + Unpin + ?Sized>(dev: &mut D) -> io::Result<usize> {
    let mut cx = Context::from_waker(Waker::noop());
    let mut chunk = [0u8; MAX_ANSWER_LEN];
    let mut dropped = 0;
    loop {
        let mut rb = ReadBuf::new(&mut chunk);
        match Pin::new(&mut *dev).poll_read(&mut cx, &mut rb) {
            Poll::Ready(Ok(())) if rb.filled().is_empty() => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "device hung up",
                ));
            }
            Poll::Ready(Ok(())) => dropped += rb.filled().len(),
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => return Ok(dropped),
        }
    }
}

/// The most time a relay spends dropping answers owed to a departed client (one that wrote
/// thousands of requests and never read takes a while to be answered).
pub(crate) const SETTLE_MAX: Duration = Duration::from_secs(5);

/// Drops what the module still sends for a client that left with `owed` requests unanswered:
/// reads and discards until that many answer frames have come (`scan` goes on from where the
/// client's session left the module's byte stream, so an answer cut in half counts once), or
/// until the module has said nothing for `answer_timeout` (it answers within that or not at
/// all), for at most `limit`. A slow answer (a flash write) is waited for, not left to the
/// next client. Returns the bytes dropped and whether the owed answers came or the module fell
/// silent (false: `limit` ended it); `Err` when the port failed or hung up.
pub(crate) async fn settle<D: AsyncRead + Unpin + ?Sized>(
    dev: &mut D,
    scan: &mut Scan,
    owed: u64,
    answer_timeout: Duration,
    limit: Duration,
) -> io::Result<(usize, bool)> {
    let mut chunk = [0u8; 4096];
    let (mut dropped, mut answers) = (0, 0u64);
    let deadline = tokio::time::Instant::now() + limit;
    while answers < owed {
        let wait =
            answer_timeout.min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        if wait.is_zero() {
            return Ok((dropped, false));
        }
        match tokio::time::timeout(wait, dev.read(&mut chunk)).await {
            Err(_) => return Ok((dropped, tokio::time::Instant::now() < deadline)),
            Ok(Ok(0)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "device hung up",
                ));
            }
            Ok(Ok(n)) => {
                dropped += n;
                scan.feed(&chunk[..n], |_| answers += 1);
            }
            Ok(Err(e)) => return Err(e),
        }
    }
    Ok((dropped, true))
}

/// Sends `request` (one whole frame) and waits up to `timeout` for one answer frame: up to
/// [`STOP_GRACE`] once `stop` is cancelled, not at all once `unplugged` is (the device is gone:
/// nobody will open it after us). `Err` only when the port fails: the module is gone.
pub(crate) async fn exchange<D>(
    dev: &mut D,
    request: &[u8],
    timeout: Duration,
    stop: &CancellationToken,
    unplugged: &CancellationToken,
) -> io::Result<Exchanged>
where
    D: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let stale = discard_pending(dev)?;
    if stale > 0 {
        tracing::debug!("discarded {stale} bytes from the module that no request asked for");
    }
    dev.write_all(request).await?;
    let mut buf = Vec::with_capacity(MAX_ANSWER_LEN);
    let mut chunk = [0u8; MAX_ANSWER_LEN];
    let read = async {
        loop {
            if let Ok(n) = Answer::check(&buf) {
                // The module sends one answer per request; anything after it is noise.
                buf.truncate(n);
                return Ok::<_, io::Error>(());
            }
            let n = dev.read(&mut chunk).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "device hung up",
                ));
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    };
    let outcome = {
        tokio::pin!(read);
        tokio::select! {
            r = &mut read => Some(r),
            _ = tokio::time::sleep(timeout) => None,
            _ = unplugged.cancelled() => None,
            _ = stop.cancelled() => tokio::select! {
                r = tokio::time::timeout(STOP_GRACE, &mut read) => r.ok(),
                _ = unplugged.cancelled() => None,
            },
        }
    };
    match outcome {
        Some(r) => r.map(|()| Exchanged::Answer(buf)),
        None => Ok(Exchanged::Timeout { partial: buf.len() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn settle_drops_the_owed_answers_waits_for_slow_ones_and_is_bounded() {
        use super::super::metrics::Side;
        let t = Duration::from_secs(1);
        let (mut far, mut near) = tokio::io::duplex(256);
        // Five answers owed, the third one slow (a flash write), the first cut in half by the
        // end of the client's session (its first byte went to the client).
        let module = async {
            far.write_all(&[0x04, 1, 2, 3, 4]).await.unwrap();
            far.write_all(&[0x00, 0x00]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(600)).await;
            for _ in 0..3 {
                far.write_all(&[0x00, 0x00]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            far
        };
        let mut scan = Scan::new(Side::Answers);
        scan.feed(&[0x00], |_| unreachable!("half a header"));
        let start = tokio::time::Instant::now();
        let (got, mut far) = tokio::join!(
            settle(&mut near, &mut scan, 5, t, Duration::from_secs(5)),
            module
        );
        assert_eq!(got.unwrap(), (13, true));
        assert!(
            start.elapsed() >= Duration::from_millis(600),
            "the slow answer was waited for"
        );
        // An answer the module never sends is waited for one answer timeout.
        let start = tokio::time::Instant::now();
        let mut scan = Scan::new(Side::Answers);
        let got = settle(&mut near, &mut scan, 1, t, Duration::from_secs(5)).await;
        assert_eq!(got.unwrap(), (0, true));
        assert_eq!(start.elapsed(), t);
        // A module that never stops talking is given up on after the limit.
        let chatter = async {
            loop {
                if far.write_all(&[0xFF]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let mut scan = Scan::new(Side::Answers);
        tokio::select! {
            r = settle(&mut near, &mut scan, 1000, t, Duration::from_millis(200)) => {
                let (n, done) = r.unwrap();
                assert!(!done && n >= 30, "{n} {done}");
            }
            _ = chatter => unreachable!("the module side never ends by itself"),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn stale_bytes_are_dropped_and_one_answer_is_read() {
        let (mut far, mut near) = tokio::io::duplex(256);
        far.write_all(&[0x00, 0x10, 9, 9]).await.unwrap(); // a late answer, cut short
        tokio::task::yield_now().await;
        let module = async {
            let mut req = [0u8; 4];
            far.read_exact(&mut req).await.unwrap();
            assert_eq!(req, [0x46, 0, 0x1D, 0]);
            far.write_all(&[0x00, 0x04, 1, 2]).await.unwrap();
            tokio::time::sleep(Duration::from_millis(10)).await;
            far.write_all(&[3, 4]).await.unwrap();
            far
        };
        let t = Duration::from_secs(1);
        let go = CancellationToken::new();
        let (got, mut far) = tokio::join!(
            exchange(&mut near, &[0x46, 0, 0x1D, 0], t, &go, &go),
            module
        );
        assert_eq!(
            got.unwrap(),
            Exchanged::Answer(vec![0x00, 0x04, 1, 2, 3, 4])
        );

        // Silence: a timeout, not an error.
        let silent = async {
            let mut req = [0u8; 4];
            far.read_exact(&mut req).await.unwrap();
            far.write_all(&[0x00]).await.unwrap();
            far
        };
        let (got, mut far) =
            tokio::join!(exchange(&mut near, &[0xC0, 0, 0, 0], t, &go, &go), silent);
        assert_eq!(got.unwrap(), Exchanged::Timeout { partial: 1 });

        // Stopping: an answer on its way is still read, a silent module is given up on soon.
        let stop = CancellationToken::new();
        stop.cancel();
        let slow = async {
            let mut req = [0u8; 4];
            far.read_exact(&mut req).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
            far.write_all(&[0x00, 0x00]).await.unwrap();
            far
        };
        let (got, mut far) =
            tokio::join!(exchange(&mut near, &[0xC0, 0, 0, 0], t, &stop, &go), slow);
        assert_eq!(got.unwrap(), Exchanged::Answer(vec![0x00, 0x00]));
        let start = tokio::time::Instant::now();
        let silent = async {
            let mut req = [0u8; 4];
            far.read_exact(&mut req).await.unwrap();
            far
        };
        let (got, far) = tokio::join!(exchange(&mut near, &[0xC0, 0, 0, 0], t, &stop, &go), silent);
        assert_eq!(got.unwrap(), Exchanged::Timeout { partial: 0 });
        assert_eq!(start.elapsed(), STOP_GRACE);

        // Unplugged: nothing is waited for.
        let (far2, mut near2) = tokio::io::duplex(256);
        let gone = CancellationToken::new();
        gone.cancel();
        let start = tokio::time::Instant::now();
        let got = exchange(&mut near2, &[0xC0, 0, 0, 0], t, &stop, &gone).await;
        assert_eq!(got.unwrap(), Exchanged::Timeout { partial: 0 });
        assert_eq!(start.elapsed(), Duration::ZERO);
        drop(far2);

        // A hang-up is an error.
        drop(far);
        assert!(
            exchange(&mut near, &[0xC0, 0, 0, 0], t, &go, &go)
                .await
                .is_err()
        );
    }
}
