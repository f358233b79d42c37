//! Durable state files: atomic replace (write temp, fsync, rename, fsync dir) and private dirs.
//!
//! Every state file lucidgate owns goes through [`write_atomic`], so a power cut leaves either the
//! old or the new content, never a torn file.
//!
//! Ownership: what lucidgate creates takes the owner of the directory it is created in when it
//! runs as root ([`adopt_dir_owner`]). The state directory belongs to the service's user; an
//! administrator's `sudo lucidgate cert ...` must not leave root-owned files there that lock
//! the service out at its next start (`Permission denied`). Files it writes elsewhere (a
//! `--out` directory of root's, `/etc/lucidgate`) stay root's for the same reason.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Test hook for power-cut tests (`tests/power_cut.rs`): with this variable set to N, the
/// process kills itself (SIGKILL, no clean-up) at the N-th step of a state write, numbered
/// across the process's life from 1; set to `list` it prints every step it passes to stderr
/// (`crash-point N: STEP PATH`). Unset, the hook costs one atomic load per step.
const CRASH_AT_ENV: &str = "LUCIDGATE_DANGEROUS_CRASH_AT";

/// The steps of one atomic write at which a crash is tried.
fn crash_point(step: &str, path: &Path) {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    enum Hook {
        Off,
        List,
        At(u64),
    }
    static HOOK: OnceLock<Hook> = OnceLock::new();
    static COUNT: AtomicU64 = AtomicU64::new(0);
    let hook = HOOK.get_or_init(|| match std::env::var(CRASH_AT_ENV) {
        Ok(v) if v == "list" => Hook::List,
        Ok(v) => v.parse().map(Hook::At).unwrap_or(Hook::Off),
        Err(_) => Hook::Off,
    });
    if matches!(hook, Hook::Off) {
        return;
    }
    let n = COUNT.fetch_add(1, Ordering::SeqCst) + 1;
    match hook {
        Hook::List => eprintln!("crash-point {n}: {step} {}", path.display()),
        Hook::At(at) if *at == n => {
            eprintln!("crash-point {n}: {step} {}: killed", path.display());
            // SAFETY: kill(2) on our own pid; nothing runs after it.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
        }
        _ => {}
    }
}

/// Gives `file` (just created in `dir`) the owner and group of `dir` when this process runs as
/// root and `dir` is not root's. Without root this is not needed (nor possible): files get the
/// process's own ids.
fn adopt_dir_owner(file: &File, dir: &Path) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    let meta = fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if (meta.uid(), meta.gid()) == (0, 0) {
        return Ok(());
    }
    std::os::unix::fs::fchown(file, Some(meta.uid()), Some(meta.gid())).with_context(|| {
        format!(
            "handing a new file in {} to its owner (uid {}, gid {})",
            dir.display(),
            meta.uid(),
            meta.gid()
        )
    })
}

/// Opens (creating if needed) a file that only needs to exist, such as a lock file, with the
/// directory's owner as for every state file.
pub(crate) fn open_or_create(path: &Path, mode: u32) -> Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    adopt_dir_owner(&f, parent_of(path))?;
    Ok(f)
}

fn parent_of(path: &Path) -> &Path {
    path.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Creates `dir` (and parents) if needed and makes it 0700; refuses a world-writable one.
/// Each directory created takes the owner of the one it is created in ([`adopt_dir_owner`]).
pub(crate) fn ensure_private_dir(dir: &Path) -> Result<()> {
    let creating = |e: std::io::Error| {
        anyhow::Error::new(e).context(format!(
            "creating state directory {} (run as root, under systemd's StateDirectory=, or set state_dir in the config)",
            dir.display()
        ))
    };
    // The missing directories, outermost first.
    let mut missing: Vec<&Path> = dir.ancestors().take_while(|d| !d.exists()).collect();
    missing.retain(|d| !d.as_os_str().is_empty());
    for d in missing.into_iter().rev() {
        match fs::create_dir(d) {
            Ok(()) => adopt_dir_owner(&File::open(d).map_err(creating)?, parent_of(d))?,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(creating(e)),
        }
    }
    let meta = fs::metadata(dir).with_context(|| format!("reading {}", dir.display()))?;
    if !meta.is_dir() {
        anyhow::bail!("{} exists but is not a directory", dir.display());
    }
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private (chmod 0700)", dir.display()))?;
    }
    Ok(())
}

/// Replaces `path` with `data` atomically: a crash leaves the old or the new file, whole.
/// The file gets `mode` (e.g. 0o600 for keys, 0o644 for public data).
pub(crate) fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = parent_of(path);
    let name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let tmp: PathBuf = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        // The mode given to open() is filtered by the umask; set it exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        adopt_dir_owner(&f, dir)?;
        crash_point("created", &tmp);
        let (head, tail) = data.split_at(data.len() / 2);
        f.write_all(head)
            .with_context(|| format!("writing {}", tmp.display()))?;
        crash_point("half-written", &tmp);
        f.write_all(tail)
            .with_context(|| format!("writing {}", tmp.display()))?;
        crash_point("written", &tmp);
        f.sync_all()
            .with_context(|| format!("fsync of {}", tmp.display()))?;
        crash_point("synced", &tmp);
        fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        crash_point("renamed", path);
        File::open(dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("fsync of directory {}", dir.display()))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// The marker of a group write whose files are all staged and are being renamed into place.
const GROUP_MARKER: &str = ".group-commit";

/// Replaces several files of `dir` as one (a key and its certificate, a CA and what trusts
/// it): after a crash, [`recover_group`] leaves either all the old or all the new files.
/// Each file is first written whole (atomically) as `NAME.new`; then a marker naming them is
/// written; then they are renamed into place and the marker is removed.
pub(crate) fn write_group(dir: &Path, files: &[(&str, &[u8], u32)]) -> Result<()> {
    for (name, data, mode) in files {
        write_atomic(&dir.join(format!("{name}.new")), data, *mode)?;
    }
    let names: Vec<&str> = files.iter().map(|f| f.0).collect();
    let marker = dir.join(GROUP_MARKER);
    write_atomic(&marker, names.join("\n").as_bytes(), 0o600)?;
    commit_group(dir, &names)?;
    Ok(())
}

fn commit_group(dir: &Path, names: &[&str]) -> Result<()> {
    for name in names {
        let (new, path) = (dir.join(format!("{name}.new")), dir.join(name));
        if new.exists() {
            fs::rename(&new, &path)
                .with_context(|| format!("renaming {} to {}", new.display(), path.display()))?;
            crash_point("group-renamed", &path);
        }
    }
    sync_dir(dir)?;
    let marker = dir.join(GROUP_MARKER);
    fs::remove_file(&marker).with_context(|| format!("removing {}", marker.display()))?;
    crash_point("group-committed", &marker);
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("fsync of directory {}", dir.display()))
}

/// Finishes or undoes a [`write_group`] that a crash interrupted, and removes the temporary
/// files of interrupted [`write_atomic`]s (of processes no longer running). With the marker,
/// every file was staged whole: the rest are renamed into place. Without it, the staged files
/// are removed and the old ones stay. Returns a line per action, for the log.
pub(crate) fn recover_group(dir: &Path) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let marker = dir.join(GROUP_MARKER);
    if let Ok(text) = fs::read_to_string(&marker) {
        let names: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
        commit_group(dir, &names)?;
        done.push(format!(
            "completed an interrupted update of {} in {}",
            names.join(", "),
            dir.display()
        ));
    }
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(done),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let stale_tmp = name.starts_with('.')
            && name
                .rsplit_once(".tmp.")
                .and_then(|(_, pid)| pid.parse::<u32>().ok())
                .is_some_and(|pid| {
                    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
                });
        let staged = name.ends_with(".new");
        if stale_tmp || staged {
            fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
            if staged {
                done.push(format!(
                    "dropped {} of an update that was interrupted before it was complete",
                    entry.path().display()
                ));
            }
        }
    }
    Ok(done)
}

/// Moves a corrupt state file aside (to `NAME.corrupt-UNIXTIME`) so it can be inspected, and
/// returns where it went.
pub(crate) fn move_aside(path: &Path) -> Result<PathBuf> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".corrupt-{stamp}"));
    let aside = PathBuf::from(aside);
    fs::rename(path, &aside)
        .with_context(|| format!("moving {} aside to {}", path.display(), aside.display()))?;
    Ok(aside)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_sets_mode() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.toml");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // No temp files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn private_dir_is_0700() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("a/b");
        ensure_private_dir(&d).unwrap();
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::set_permissions(&d, fs::Permissions::from_mode(0o777)).unwrap();
        ensure_private_dir(&d).unwrap();
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }

    #[test]
    fn a_group_is_all_old_or_all_new_after_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        write_group(d, &[("a", b"a1", 0o600), ("b", b"b1", 0o644)]).unwrap();
        assert_eq!(fs::read(d.join("a")).unwrap(), b"a1");
        assert!(recover_group(d).unwrap().is_empty());
        // Staged but not committed (no marker): rolled back.
        fs::write(d.join("a.new"), b"a2").unwrap();
        let done = recover_group(d).unwrap();
        assert!(
            done[0].contains("interrupted before it was complete"),
            "{done:?}"
        );
        assert_eq!(fs::read(d.join("a")).unwrap(), b"a1");
        assert!(!d.join("a.new").exists());
        // Committed halfway (marker, a renamed, b still staged): rolled forward.
        fs::write(d.join("a"), b"a2").unwrap();
        fs::write(d.join("b.new"), b"b2").unwrap();
        fs::write(d.join(GROUP_MARKER), b"a\nb").unwrap();
        let done = recover_group(d).unwrap();
        assert!(done[0].contains("completed"), "{done:?}");
        assert_eq!(fs::read(d.join("b")).unwrap(), b"b2");
        assert!(!d.join(GROUP_MARKER).exists());
        // A dead writer's temp file goes; names are left as they are.
        fs::write(d.join(".a.tmp.999999999"), b"x").unwrap();
        recover_group(d).unwrap();
        let mut names: Vec<_> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn move_aside_keeps_the_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ports.toml");
        fs::write(&p, b"garbage").unwrap();
        let aside = move_aside(&p).unwrap();
        assert!(!p.exists());
        assert_eq!(fs::read(aside).unwrap(), b"garbage");
    }
}
