//! What a session carries bytes to on this machine: a pty behind a link (`link`) or a local
//! TCP endpoint (`listen`). The session does not care which.

use std::io;

#[cfg(target_os = "linux")]
use super::link::PtyPort;
use super::listen::TcpPort;

/// The local end of one attached port.
pub(crate) enum LocalPort {
    #[cfg(target_os = "linux")]
    Pty(PtyPort),
    Tcp(TcpPort),
}

impl LocalPort {
    /// Reads what a program wrote; `Ok(0)` means nothing this time (a local TCP client left).
    pub(crate) async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            #[cfg(target_os = "linux")]
            LocalPort::Pty(p) => p.read(buf).await,
            LocalPort::Tcp(t) => t.read(buf).await,
        }
    }

    /// Writes what the module answered to the program side.
    pub(crate) async fn write_all(&self, buf: &[u8]) -> io::Result<()> {
        match self {
            #[cfg(target_os = "linux")]
            LocalPort::Pty(p) => p.write_all(buf).await,
            LocalPort::Tcp(t) => t.write_all(buf).await,
        }
    }
}
