//! Pseudo-terminal pairs: the emulator's stand-in for a module, and (later) `attach`'s local port.
//!
//! Owns creating a pty in raw mode and the optional symlink that names it; dropping a [`Pty`]
//! removes the link and closes both ends, which the other side sees as a hang-up.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::pty::openpty;
use nix::sys::termios::{self, SetArg};

/// A pty pair in raw mode. The master is the "module" side; the slave is what a serial client opens.
pub struct Pty {
    pub master: OwnedFd,
    /// Held open so the master never sees a hang-up while no client has the slave open.
    pub(crate) slave: OwnedFd,
    pub(crate) slave_path: PathBuf,
    link: Option<PathBuf>,
}

impl Pty {
    /// Opens a new pty pair, both sides raw (no echo, no line discipline translation).
    pub fn open() -> Result<Pty> {
        let pair = openpty(None, None).context("opening a pseudo-terminal pair (openpty)")?;
        make_raw(pair.slave.as_fd()).context("the new pty")?;
        let slave_path =
            nix::unistd::ttyname(pair.slave.as_fd()).context("ttyname of pty slave")?;
        Ok(Pty {
            master: pair.master,
            slave: pair.slave,
            slave_path,
            link: None,
        })
    }

    /// Makes `link` a symlink to the slave; an existing symlink there is replaced, anything
    /// else is refused so a typo cannot delete a real file.
    pub fn link(&mut self, link: &Path) -> Result<()> {
        match std::fs::symlink_metadata(link) {
            Ok(meta) if meta.file_type().is_symlink() => std::fs::remove_file(link)
                .with_context(|| format!("removing the old link {}", link.display()))?,
            Ok(_) => anyhow::bail!(
                "{} exists and is not a symlink; choose another --link path or remove it",
                link.display()
            ),
            Err(_) => {}
        }
        std::os::unix::fs::symlink(&self.slave_path, link).with_context(|| {
            format!(
                "creating the link {} -> {}",
                link.display(),
                self.slave_path.display()
            )
        })?;
        self.link = Some(link.to_path_buf());
        Ok(())
    }

    /// The name a client opens: the link when there is one, else the slave's /dev/pts path.
    pub fn path(&self) -> &Path {
        self.link.as_deref().unwrap_or(&self.slave_path)
    }
}

/// Puts a terminal in raw mode: no echo, no line editing, no CR/NL translation, 8 bits. A
/// module's bytes are binary; a cooked tty would echo a request back and eat 0x0D/0x11/0x13.
pub(crate) fn make_raw(tty: impl AsFd) -> Result<()> {
    let mut attrs = termios::tcgetattr(tty.as_fd()).context("tcgetattr")?;
    termios::cfmakeraw(&mut attrs);
    termios::tcsetattr(tty.as_fd(), SetArg::TCSANOW, &attrs).context("tcsetattr")
}

impl Drop for Pty {
    fn drop(&mut self) {
        if let Some(link) = &self.link {
            // Only remove the link if it still points at our slave.
            if std::fs::read_link(link).ok().as_deref() == Some(self.slave_path.as_path()) {
                let _ = std::fs::remove_file(link);
            }
        }
    }
}
