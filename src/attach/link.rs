//! The local end of `attach`: a pty whose slave programs open through a stable symlink.
//!
//! Owns the pty for the whole life of the process: the name (`--link`) never changes and never
//! disappears while `attach` runs, whatever happens to the network. The process keeps a slave
//! descriptor open itself, which gives socat's `ignoreof` semantics: programs may open and close
//! the port as often as they like and the master never sees a hang-up.

#[cfg(target_os = "linux")]
pub(crate) use pty_port::PtyPort;

/// Owner, group and permissions of the pty (socat's `user=`, `group=`, `mode=`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Ownership {
    pub(crate) user: Option<String>,
    pub(crate) group: Option<String>,
    pub(crate) mode: Option<u32>,
}

/// Parses an octal mode such as `0660` or `660`.
pub(crate) fn parse_mode(s: &str) -> Result<u32, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u32::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 => Ok(m),
        _ => Err(format!(
            "{s:?} is not a permission mode; use octal like 0660"
        )),
    }
}

/// The pty itself (Linux: lucidgate.exe has `--listen` only).
#[cfg(target_os = "linux")]
mod pty_port {
    use std::io;
    use std::os::fd::{AsFd, OwnedFd};
    use std::path::Path;

    use anyhow::{Context, Result};
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    use tokio::io::unix::AsyncFd;

    use super::Ownership;
    use crate::pty::Pty;

    fn resolve_user(u: &str) -> Result<nix::unistd::Uid> {
        if let Ok(n) = u.parse::<u32>() {
            return Ok(nix::unistd::Uid::from_raw(n));
        }
        match nix::unistd::User::from_name(u) {
            Ok(Some(user)) => Ok(user.uid),
            _ => anyhow::bail!("user {u:?} does not exist (check --user / `user`)"),
        }
    }

    fn resolve_group(g: &str) -> Result<nix::unistd::Gid> {
        if let Ok(n) = g.parse::<u32>() {
            return Ok(nix::unistd::Gid::from_raw(n));
        }
        match nix::unistd::Group::from_name(g) {
            Ok(Some(group)) => Ok(group.gid),
            _ => anyhow::bail!("group {g:?} does not exist (check --group / `group`)"),
        }
    }

    /// The pty and its async master.
    pub(crate) struct PtyPort {
        master: AsyncFd<OwnedFd>,
        pty: Pty,
    }

    impl PtyPort {
        /// Opens a raw pty, applies `own` to its slave and links `link` to it.
        pub(crate) fn open(link: &Path, own: &Ownership) -> Result<PtyPort> {
            let mut pty = Pty::open()?;
            let slave = pty.slave_path.clone();
            if own.user.is_some() || own.group.is_some() {
                let uid = own.user.as_deref().map(resolve_user).transpose()?;
                let gid = own.group.as_deref().map(resolve_group).transpose()?;
                nix::unistd::fchown(pty.slave.as_fd(), uid, gid)
                    .with_context(|| format!("changing the owner of {}", slave.display()))?;
            }
            if let Some(mode) = own.mode {
                nix::sys::stat::fchmod(
                    pty.slave.as_fd(),
                    nix::sys::stat::Mode::from_bits_truncate(mode),
                )
                .with_context(|| format!("changing the mode of {}", slave.display()))?;
            }
            pty.link(link)?;
            let master = pty
                .master
                .try_clone()
                .context("duplicating the pty master")?;
            let flags = fcntl(master.as_fd(), FcntlArg::F_GETFL).context("fcntl F_GETFL")?;
            fcntl(
                master.as_fd(),
                FcntlArg::F_SETFL(OFlag::from_bits_truncate(flags) | OFlag::O_NONBLOCK),
            )
            .context("making the pty master non-blocking")?;
            // SAFETY: `master` is an OwnedFd moved into the AsyncFd: it stays open, and keeps its
            // number, until the AsyncFd is dropped.
            let master = unsafe { AsyncFd::register(master) }
                .map_err(|e| e.into_parts().1)
                .context("registering the pty with the runtime")?;
            Ok(PtyPort { master, pty })
        }

        /// The pty's own name (`/dev/pts/N`).
        pub(crate) fn slave_path(&self) -> &Path {
            &self.pty.slave_path
        }

        /// Reads what a program wrote to the port.
        pub(crate) async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
            loop {
                let mut guard = self.master.readable().await?;
                match guard.try_io(|fd| {
                    nix::unistd::read(fd.get_ref().as_fd(), buf).map_err(io::Error::from)
                }) {
                    Ok(r) => return r,
                    Err(_would_block) => continue,
                }
            }
        }

        /// Writes everything in `buf` to the program side (waits while the pty's buffer is full).
        pub(crate) async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
            while !buf.is_empty() {
                let mut guard = self.master.writable().await?;
                match guard
                    .try_io(|fd| nix::unistd::write(fd.get_ref(), buf).map_err(io::Error::from))
                {
                    Ok(Ok(n)) => buf = &buf[n..],
                    Ok(Err(e)) => return Err(e),
                    Err(_would_block) => continue,
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_as_octal() {
        assert_eq!(parse_mode("0660"), Ok(0o660));
        assert_eq!(parse_mode("600"), Ok(0o600));
        assert!(parse_mode("0999").is_err());
        assert!(parse_mode("rw").is_err());
        assert!(parse_mode("7777").is_err());
    }
}
