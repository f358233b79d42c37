//! The bounded accept loop behind every listener of the daemon: the modules' TCP ports
//! ([`crate::relay`]), the control socket ([`crate::control`]) and the OpenMetrics endpoint
//! ([`crate::openmetrics`]).
//!
//! This module owns how connections are taken in: a permit from the listener's
//! [`ConnectionLimit`] is taken *before* accepting (as mini-redis does), so a connection flood
//! waits in the kernel's backlog instead of growing memory; a failed accept (e.g. out of file
//! descriptors) is retried after a backoff that doubles from [`ACCEPT_BACKOFF_START`] to
//! [`ACCEPT_BACKOFF_MAX`] and that a shutdown interrupts; each connection runs as a task of the
//! caller's [`TaskTracker`], under the caller's time limit if it has one; the loop ends when the
//! [`CancellationToken`] is cancelled.
//!
//! It owns nothing else: binding, socket options, what a connection is for, and what happens to
//! it on shutdown are the caller's (its handler), as is the listening socket's lifetime (the
//! loop drops the listener when it ends; the control socket removes its file then).

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// First pause after a failed accept (e.g. out of file descriptors); doubles up to the max.
const ACCEPT_BACKOFF_START: Duration = Duration::from_millis(10);
/// Longest pause between two failed accepts.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A listening socket the loop can accept from: a TCP or a unix stream listener, or a wrapper
/// that owns one (the control socket with its file).
pub(crate) trait Listener: Send + 'static {
    /// The accepted connection.
    type Stream: Send + 'static;
    /// The peer's address.
    type Peer: Send + 'static;
    fn accept(&self) -> impl Future<Output = io::Result<(Self::Stream, Self::Peer)>> + Send;
}

impl Listener for TcpListener {
    type Stream = TcpStream;
    type Peer = std::net::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(TcpStream, Self::Peer)>> + Send {
        TcpListener::accept(self)
    }
}

impl Listener for UnixListener {
    type Stream = UnixStream;
    type Peer = tokio::net::unix::SocketAddr;
    fn accept(&self) -> impl Future<Output = io::Result<(UnixStream, Self::Peer)>> + Send {
        UnixListener::accept(self)
    }
}

/// How many connections may be open at once; clones share the count, so the listeners of one
/// module (one per address) share one limit.
#[derive(Clone)]
pub(crate) struct ConnectionLimit(Arc<Semaphore>);

impl ConnectionLimit {
    pub(crate) fn new(max: usize) -> Self {
        Self(Arc::new(Semaphore::new(max)))
    }
}

/// Accepts from `listener` until `cancel`, at most `limit` connections at once, and runs
/// `handler`'s future for each one as a task of `tracker`, cut off after `timeout` if given.
///
/// The handler gets the connection, its peer and the permit it counts against `limit` with:
/// the connection counts as long as the permit lives, so a handler that hands the connection on
/// (a relay's queue) hands the permit with it, and any other keeps it for its whole future.
/// The handler is called in the accept loop, so its synchronous part (socket options) runs
/// before the next accept. `what` names the listener in log lines ("control socket").
/// In-flight connections are not cancelled here: a handler that must stop on `cancel` selects
/// on it itself.
pub(crate) fn spawn_bounded<L, H, F>(
    what: &'static str,
    listener: L,
    limit: ConnectionLimit,
    timeout: Option<Duration>,
    cancel: CancellationToken,
    tracker: &TaskTracker,
    handler: H,
) where
    L: Listener,
    H: Fn(L::Stream, L::Peer, OwnedSemaphorePermit) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let tasks = tracker.clone();
    tracker.spawn(async move {
        let mut backoff = ACCEPT_BACKOFF_START;
        loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => return,
                p = limit.0.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
            };
            let (stream, peer) = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(x) => { backoff = ACCEPT_BACKOFF_START; x }
                    Err(e) => {
                        tracing::warn!("{what}: accept failed: {e}; retrying in {backoff:?}");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                        continue;
                    }
                },
            };
            let connection = handler(stream, peer, permit);
            match timeout {
                None => {
                    tasks.spawn(connection);
                }
                Some(timeout) => {
                    tasks.spawn(async move {
                        if tokio::time::timeout(timeout, connection).await.is_err() {
                            tracing::debug!("{what}: client timed out after {timeout:?}");
                        }
                    });
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Connections beyond the limit wait (unaccepted) until a permit is free; cancelling ends
    /// the loop and drops the listener.
    #[tokio::test]
    async fn waits_for_a_permit_before_accepting_and_stops_on_cancel() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        spawn_bounded(
            "test socket",
            listener,
            ConnectionLimit::new(1),
            None,
            cancel.clone(),
            &tracker,
            move |mut s: UnixStream, _peer, permit| {
                let mut release = release_rx.clone();
                async move {
                    let _permit = permit;
                    let _ = s.write_all(b"hi").await;
                    let _ = release.wait_for(|r| *r).await;
                }
            },
        );
        let mut first = UnixStream::connect(&path).await.unwrap();
        let mut buf = [0u8; 2];
        first.read_exact(&mut buf).await.unwrap();
        // The second connects (backlog) but is not served while the first holds the permit.
        let mut second = UnixStream::connect(&path).await.unwrap();
        let waited =
            tokio::time::timeout(Duration::from_millis(200), second.read_exact(&mut buf)).await;
        assert!(waited.is_err(), "served beyond the limit");
        release_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), second.read_exact(&mut buf))
            .await
            .expect("served once the permit was free")
            .unwrap();
        cancel.cancel();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .expect("the loop and its connections end on cancel");
    }

    /// A handler that outlives its time limit is cut off and its permit freed.
    #[tokio::test]
    async fn the_time_limit_cuts_a_connection_off() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (cancel, tracker) = (CancellationToken::new(), TaskTracker::new());
        spawn_bounded(
            "test port",
            listener,
            ConnectionLimit::new(1),
            Some(Duration::from_millis(100)),
            cancel.clone(),
            &tracker,
            |mut s: TcpStream, _peer, permit| async move {
                let _permit = permit;
                let _ = s.write_all(b"x").await;
                std::future::pending::<()>().await;
            },
        );
        for _ in 0..2 {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let mut buf = Vec::new();
            tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut buf))
                .await
                .expect("closed at the time limit")
                .unwrap();
            assert_eq!(buf, b"x");
        }
        cancel.cancel();
        tracker.close();
        tokio::time::timeout(Duration::from_secs(5), tracker.wait())
            .await
            .unwrap();
    }
}
