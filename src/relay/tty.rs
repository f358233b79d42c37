//! The module's serial port as an async byte stream that wakes the relay only when there is
//! something to read.
//!
//! tokio-serial registers the tty for reading *and* writing. A tty reports "writable" edges
//! whenever the other side drains its buffer, so every request written to a module woke the
//! relay twice more for nothing (measured with strace: 4 wake-ups per round trip instead of 2,
//! and the round trip 1.07x socat's). Here the tty is registered for reading only; a write goes
//! straight to the fd, and only when the tty's buffer is full (EAGAIN: the module does not read)
//! is a duplicate descriptor registered (for both directions, like tokio-serial's) until writes
//! go through at once again.
//! The port is opened by serialport (exclusive: TIOCEXCL + flock, raw, 8N1) as before.

use std::io;
use std::os::fd::{AsFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use anyhow::{Context as _, Result};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// An open serial port (or pty), non-blocking, registered for reading.
#[derive(Debug)]
pub(crate) struct Tty {
    fd: AsyncFd<OwnedFd>,
    /// A dup of the fd registered for writability, only while writes would block.
    write_wait: Option<AsyncFd<OwnedFd>>,
    /// Writes that went through at once since the last one that would have blocked.
    clean_writes: u32,
}

/// After this many writes in a row that did not block, the writability registration goes.
const KEEP_WRITE_WAIT: u32 = 16;

fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the OwnedFd moves into the AsyncFd, which keeps it open (and its number) until
    // it is dropped.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

impl Tty {
    /// Opens `devnode` exclusively: raw, 8N1, no flow control, at `baud`.
    pub(crate) fn open(devnode: &std::path::Path, baud: u32) -> Result<Tty> {
        let port = tokio_serial::new(devnode.to_string_lossy(), baud)
            .data_bits(tokio_serial::DataBits::Eight)
            .parity(tokio_serial::Parity::None)
            .stop_bits(tokio_serial::StopBits::One)
            .flow_control(tokio_serial::FlowControl::None)
            .open_native()
            .map_err(|e| {
                // serialport keeps only a description; the OS error of a plain open tells the
                // cause (policy, permissions, busy) apart.
                let os = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK)
                    .open(devnode)
                    .err()
                    .unwrap_or_else(|| io::Error::other(e.to_string()));
                crate::device::access::explain("opening serial port", devnode, os)
            })?;
        // SAFETY: into_raw_fd hands over the descriptor (TIOCEXCL and the flock stay with it
        // until it is closed).
        let fd = unsafe { OwnedFd::from_raw_fd(port.into_raw_fd()) };
        Tty::from_fd(fd).with_context(|| format!("registering {}", devnode.display()))
    }

    /// Wraps an open tty descriptor (made non-blocking here).
    fn from_fd(fd: OwnedFd) -> io::Result<Tty> {
        let flags = fcntl(fd.as_fd(), FcntlArg::F_GETFL)?;
        fcntl(
            fd.as_fd(),
            FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
        )?;
        Ok(Tty {
            fd: register(fd, Interest::READABLE)?,
            write_wait: None,
            clean_writes: 0,
        })
    }
}

impl AsyncRead for Tty {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let want = unfilled.len();
            match nix::unistd::read(self.fd.get_ref().as_fd(), unfilled) {
                Ok(n) => {
                    // A short read drained the tty: wait for the next edge instead of reading
                    // again only to get EAGAIN (what tokio does for sockets; one syscall less
                    // per answer).
                    if n < want {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(Errno::EAGAIN) => guard.clear_ready(),
                Err(Errno::EINTR) => {}
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

impl AsyncWrite for Tty {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let mut blocked = false;
        loop {
            match nix::unistd::write(self.fd.get_ref(), data) {
                Ok(n) => {
                    if blocked {
                        self.clean_writes = 0;
                    } else if self.write_wait.is_some() {
                        // Writes go through at once again: after a few, stop listening for
                        // writability (kept meanwhile so bulk transfers do not re-register).
                        self.clean_writes += 1;
                        if self.clean_writes >= KEEP_WRITE_WAIT {
                            self.write_wait = None;
                        }
                    }
                    return Poll::Ready(Ok(n));
                }
                Err(Errno::EINTR) => continue,
                Err(Errno::EAGAIN) => {
                    blocked = true;
                    if self.write_wait.is_none() {
                        let dup = self.fd.get_ref().try_clone()?;
                        // Readable too: a pty does not always wake its writers on an edge of its
                        // own, but every event on this registration reports the full mask, so
                        // the other side's traffic also tells us when there is room again.
                        self.write_wait =
                            Some(register(dup, Interest::READABLE | Interest::WRITABLE)?);
                    }
                    let w = self.write_wait.as_ref().expect("just set");
                    let mut guard = ready!(w.poll_write_ready(cx))?;
                    guard.clear_ready();
                }
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Written bytes are in the tty's buffer; there is nothing of ours to flush.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Bytes both ways, and a full tty buffer (the other side does not read) blocks the writer
    /// until the other side drains it, without losing a byte.
    #[tokio::test]
    async fn bytes_pass_and_a_full_buffer_waits_for_the_reader() {
        let pty = crate::pty::Pty::open().unwrap();
        let mut tty = Tty::from_fd(pty.master.try_clone().unwrap()).unwrap();
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&pty.slave_path)
            .unwrap();
        let mut s = slave.try_clone().unwrap();
        std::io::Write::write_all(&mut s, b"\xC0\x00\x00\x00").unwrap();
        let mut buf = [0u8; 4];
        tokio::time::timeout(std::time::Duration::from_secs(3), tty.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"\xC0\x00\x00\x00");

        let total = 1 << 20;
        let reader = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let mut got = 0usize;
            let mut sum = 0u64;
            let mut chunk = [0u8; 4096];
            let mut r = slave;
            while got < total {
                let n = std::io::Read::read(&mut r, &mut chunk).unwrap();
                sum += chunk[..n].iter().map(|b| *b as u64).sum::<u64>();
                got += n;
            }
            sum
        });
        let data: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
        let want: u64 = data.iter().map(|b| *b as u64).sum();
        tokio::time::timeout(std::time::Duration::from_secs(20), tty.write_all(&data))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(reader.join().unwrap(), want);
    }
}
