//! One request/answer exchange with the module: the unit the protocol-aware features (identity,
//! shared mode, read-only clients) are built from.
//!
//! An exchange first discards bytes nobody asked for (a late answer to an earlier request),
//! writes one request and reads exactly one answer frame, or gives up after the answer timeout.
//! Callers never drop an exchange midway (it is not raced against cancellation): a relay that is
//! stopped while a request is out waits for that answer, at most the timeout, so no answer is left
//! in the port for whoever opens it next.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use crate::protocol::{Answer, MAX_ANSWER_LEN};

/// What came back for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exchanged {
    /// One answer frame, exactly as the module sent it.
    Answer(Vec<u8>),
    /// No complete answer within the timeout (`partial` bytes of one had arrived).
    Timeout { partial: usize },
}

/// Reads and drops whatever the port holds right now, without waiting. Returns the number of
/// bytes dropped; `Err` when the port failed or hung up.
pub fn discard_pending<D: AsyncRead + Unpin + ?Sized>(dev: &mut D) -> io::Result<usize> {
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

/// Sends `request` (one whole frame) and waits up to `timeout` for one answer frame.
/// `Err` only when the port fails: the module is gone.
pub async fn exchange<D>(dev: &mut D, request: &[u8], timeout: Duration) -> io::Result<Exchanged>
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
    match tokio::time::timeout(timeout, read).await {
        Ok(r) => r.map(|()| Exchanged::Answer(buf)),
        Err(_) => Ok(Exchanged::Timeout { partial: buf.len() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let (got, mut far) = tokio::join!(exchange(&mut near, &[0x46, 0, 0x1D, 0], t), module);
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
        let (got, far) = tokio::join!(exchange(&mut near, &[0xC0, 0, 0, 0], t), silent);
        assert_eq!(got.unwrap(), Exchanged::Timeout { partial: 1 });

        // A hang-up is an error.
        drop(far);
        assert!(exchange(&mut near, &[0xC0, 0, 0, 0], t).await.is_err());
    }
}
