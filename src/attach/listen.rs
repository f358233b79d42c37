//! The local end of `attach --listen`: a plain TCP endpoint on this machine (for programs that
//! open a TCP connection instead of a serial port, as the vendor's Windows tools can) carried
//! to the module over the same session as a pty link.
//!
//! The listener lives as long as the process, whatever happens to the network. One local
//! client at a time: a second one is closed at once with a log line naming the one connected
//! (two programs interleaving requests on one module would get each other's answers). When the
//! local client leaves, the session to the server stays up for the next one.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{Mutex, mpsc};

/// Pause after a failed accept (EMFILE and the like) before the next one.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);
/// A local client that stopped sending (a half-close, as `socat -` does at the end of its
/// input) still gets the answers to what it sent for this long (the protocol's answer time);
/// then its connection is closed.
const HALF_CLOSE_LINGER: Duration = Duration::from_secs(1);

/// The local client's sending half, shared with the task that closes it after a half-close.
type Writer = Arc<Mutex<Option<(SocketAddr, OwnedWriteHalf)>>>;

/// Checks a `--listen` address: loopback unless `any` (`--listen-any`) says otherwise.
pub(crate) fn check_listen(addr: SocketAddr, any: bool) -> Result<(), String> {
    if addr.ip().is_loopback() || any {
        return Ok(());
    }
    Err(format!(
        "--listen {addr} is not a loopback address: anyone who can reach this machine there would \
         use the module with this machine's client certificate, unauthenticated. Use \
         127.0.0.1:{port} (or [::1]:{port}); add --listen-any (listen_any = true) if other \
         machines are really meant to connect",
        port = addr.port()
    ))
}

/// The listening socket and the local client connected now (if any).
pub(crate) struct TcpPort {
    addr: SocketAddr,
    /// Local clients accepted while none was connected.
    incoming: Mutex<mpsc::Receiver<tokio::net::TcpStream>>,
    reader: Mutex<Option<OwnedReadHalf>>,
    writer: Writer,
    /// A local client is connected (the accept task refuses others meanwhile).
    busy: Arc<AtomicBool>,
    accept_task: tokio::task::JoinHandle<()>,
}

impl Drop for TcpPort {
    fn drop(&mut self) {
        self.accept_task.abort();
    }
}

impl TcpPort {
    /// Binds `addr` (port 0: any free port; [`TcpPort::local_addr`] tells which).
    pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpPort> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening on {addr}"))?;
        let addr = listener.local_addr().context("the listening address")?;
        let busy = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::channel(1);
        let accept_task = tokio::spawn(accept_loop(listener, tx, busy.clone()));
        Ok(TcpPort {
            addr,
            incoming: Mutex::new(rx),
            reader: Mutex::new(None),
            writer: Arc::new(Mutex::new(None)),
            busy,
            accept_task,
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Reads what the local client sent; waits for a client when none is connected. `Ok(0)`:
    /// the client left (the session goes on for the next one).
    pub(crate) async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut reader = self.reader.lock().await;
        if reader.is_none() {
            let Some(stream) = self.incoming.lock().await.recv().await else {
                return std::future::pending().await;
            };
            let peer = stream.peer_addr()?;
            let _ = stream.set_nodelay(true);
            let (r, w) = stream.into_split();
            tracing::info!(local_client = %peer, "local client {peer} connected");
            *self.writer.lock().await = Some((peer, w));
            *reader = Some(r);
        }
        let r = reader.as_mut().expect("a reader was just set");
        match r.read(buf).await {
            Ok(n) if n > 0 => Ok(n),
            Ok(_) => {
                // Done sending; answers to what it sent may still be on their way.
                *reader = None;
                let closing = self.writer.lock().await.as_ref().map(|(p, _)| *p);
                self.busy.store(false, Ordering::SeqCst);
                let writer = self.writer.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(HALF_CLOSE_LINGER).await;
                    let mut w = writer.lock().await;
                    // Unless a new client took its place meanwhile.
                    if let Some((peer, half)) = w.as_mut()
                        && Some(*peer) == closing
                    {
                        let _ = half.shutdown().await;
                        tracing::info!(local_client = %peer, "local client {peer} disconnected");
                        *w = None;
                    }
                });
                Ok(0)
            }
            Err(e) => {
                *reader = None;
                if let Some((peer, _)) = self.writer.lock().await.take() {
                    tracing::info!(local_client = %peer, "local client {peer} disconnected: {e}");
                }
                self.busy.store(false, Ordering::SeqCst);
                Ok(0)
            }
        }
    }

    /// Sends `buf` to the local client. With none connected (or one that just left) the bytes
    /// have nobody to go to and are dropped: the session to the server is not at fault.
    pub(crate) async fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        let mut writer = self.writer.lock().await;
        if let Some((peer, w)) = writer.as_mut()
            && let Err(e) = w.write_all(buf).await
        {
            tracing::info!(local_client = %peer, "writing to local client {peer}: {e}");
            *writer = None;
        }
        Ok(())
    }
}

/// Accepts local clients for as long as the port lives; refuses one while another is connected.
async fn accept_loop(
    listener: TcpListener,
    tx: mpsc::Sender<tokio::net::TcpStream>,
    busy: Arc<AtomicBool>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if busy.swap(true, Ordering::SeqCst) {
                    tracing::warn!(local_client = %peer,
                        "local client {peer} refused: another local client is connected (one at a time: two programs would get each other's answers)");
                    drop(stream);
                    continue;
                }
                if tx.send(stream).await.is_err() {
                    return;
                }
            }
            Err(e) => {
                // EMFILE and the like: wait instead of spinning.
                tracing::warn!("accepting a local client: {e}");
                tokio::time::sleep(ACCEPT_RETRY).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::check_listen;

    #[test]
    fn only_loopback_unless_told() {
        assert!(check_listen("127.0.0.1:4001".parse().unwrap(), false).is_ok());
        assert!(check_listen("[::1]:4001".parse().unwrap(), false).is_ok());
        let e = check_listen("0.0.0.0:4001".parse().unwrap(), false).unwrap_err();
        assert!(
            e.contains("--listen-any") && e.contains("127.0.0.1:4001"),
            "{e}"
        );
        assert!(check_listen("192.168.1.5:4001".parse().unwrap(), false).is_err());
        assert!(check_listen("0.0.0.0:4001".parse().unwrap(), true).is_ok());
    }
}
