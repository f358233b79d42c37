//! The transport seam between a relay and its clients.
//!
//! A relay accepts TCP connections and hands each to its [`Transport`], which turns it into a
//! [`ClientStream`] (or refuses it). Plain TCP passes the socket through; TLS (its own module)
//! slots in as another variant, so the relay's pump and client policy never know which one
//! they talk to.

#[cfg(target_os = "linux")]
pub(crate) mod pki_task;
#[cfg(target_os = "linux")]
pub(crate) mod tls;

#[cfg(target_os = "linux")]
use std::io;
#[cfg(target_os = "linux")]
use std::net::SocketAddr;
#[cfg(target_os = "linux")]
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
#[cfg(target_os = "linux")]
use tokio::net::TcpStream;

#[cfg(target_os = "linux")]
use tls::TlsAccept;

/// A connected client's byte stream, whatever the transport.
pub(crate) trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> ClientStream for T {}

/// A client that passed the transport's checks.
#[cfg(target_os = "linux")]
pub(crate) struct Accepted {
    pub(crate) stream: Box<dyn ClientStream>,
    pub(crate) peer: SocketAddr,
    /// The client's name (certificate subject) where the transport authenticates clients.
    pub(crate) name: Option<String>,
    /// The client's certificate grants reading only.
    pub(crate) read_only: bool,
}

#[cfg(target_os = "linux")]
impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accepted")
            .field("peer", &self.peer)
            .field("name", &self.name)
            .finish()
    }
}

/// Why a connection was not accepted.
#[cfg(target_os = "linux")]
#[derive(Debug, thiserror::Error)]
pub(crate) enum TransportError {
    #[error("handshake with {peer} did not finish within {timeout:?}")]
    Timeout { peer: SocketAddr, timeout: Duration },
    #[error("handshake with {peer} failed: {source}")]
    Handshake { peer: SocketAddr, source: io::Error },
    #[error("refused {peer}{}: {reason}", name.as_ref().map(|n| format!(" ({n})")).unwrap_or_default())]
    Refused {
        peer: SocketAddr,
        reason: String,
        /// The certificate subject, when the handshake got that far.
        name: Option<String>,
    },
}

#[cfg(target_os = "linux")]
impl TransportError {
    /// The client name (certificate subject) involved, if known.
    pub(crate) fn client_name(&self) -> Option<&str> {
        match self {
            TransportError::Refused { name, .. } => name.as_deref(),
            _ => None,
        }
    }
}

/// How a relay talks to its clients.
#[cfg(target_os = "linux")]
#[derive(Clone, Debug)]
pub(crate) enum Transport {
    /// Raw bytes over TCP.
    Plain,
    /// TLS (with or without client certificates), see [`tls`].
    Tls(TlsAccept),
}

#[cfg(target_os = "linux")]
impl Transport {
    /// Completes the transport's handshake on a fresh connection, within `timeout`.
    pub(crate) async fn accept(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        timeout: Duration,
    ) -> Result<Accepted, TransportError> {
        match self {
            Transport::Plain => Ok(Accepted {
                stream: Box::new(tcp),
                peer,
                name: None,
                read_only: false,
            }),
            Transport::Tls(t) => t.accept(tcp, peer, timeout).await,
        }
    }
}
