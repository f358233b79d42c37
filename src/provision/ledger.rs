//! The provisioning ledger (`state_dir/provision.toml`): which requests were processed, when,
//! from which stick, and what they issued, so replugging a stick does not reissue. Written
//! atomically; a corrupt ledger is moved aside with a log line (the worst case is a request
//! processed twice), never silently replaced.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

/// The ledger keeps this many most recent requests.
const MAX_ENTRIES: usize = 1000;
/// Largest ledger file read.
const MAX_LEDGER_BYTES: u64 = 4 * 1024 * 1024;

/// One processed request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Processed {
    pub(crate) id: String,
    /// When (RFC 3339, UTC).
    pub(crate) at: String,
    /// The stick: label and volume id.
    pub(crate) stick: String,
    /// What it did: `issued NAME serial SERIAL`, `imported CA ...`.
    pub(crate) did: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    request: Vec<Processed>,
}

fn path(state_dir: &Path) -> PathBuf {
    state_dir.join("provision.toml")
}

fn load(state_dir: &Path) -> Result<File> {
    let p = path(state_dir);
    let text = match std::fs::metadata(&p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(File::default()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        Ok(m) if m.len() > MAX_LEDGER_BYTES => None,
        Ok(_) => std::fs::read_to_string(&p).ok(),
    };
    match text.and_then(|t| toml::from_str::<File>(&t).ok()) {
        Some(f) => Ok(f),
        None => {
            let aside = crate::state::move_aside(&p)?;
            tracing::error!(
                event = "state-corrupt",
                "the provisioning ledger {} is unreadable; moved aside to {} and started empty (a stick's request may be processed again)",
                p.display(),
                aside.display()
            );
            Ok(File::default())
        }
    }
}

/// The entry for request `id`, if it was processed.
pub fn find(state_dir: &Path, id: &str) -> Result<Option<Processed>> {
    Ok(load(state_dir)?.request.into_iter().find(|r| r.id == id))
}

/// Records a processed request (atomically; the oldest entries beyond [`MAX_ENTRIES`] go).
pub(crate) fn record(state_dir: &Path, entry: Processed) -> Result<()> {
    crate::state::ensure_private_dir(state_dir)?;
    let mut f = load(state_dir)?;
    f.request.retain(|r| r.id != entry.id);
    f.request.push(entry);
    let excess = f.request.len().saturating_sub(MAX_ENTRIES);
    f.request.drain(..excess);
    let text = toml::to_string(&f).context("encoding the provisioning ledger")?;
    crate::state::write_atomic(&path(state_dir), text.as_bytes(), 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_and_corruption_is_moved_aside() {
        let d = tempfile::tempdir().unwrap();
        let e = Processed {
            id: "r1".into(),
            at: "2026-11-29T00:00:00Z".into(),
            stick: "KEYS (1234abcd)".into(),
            did: vec!["issued dash serial 01".into()],
        };
        record(d.path(), e.clone()).unwrap();
        assert_eq!(find(d.path(), "r1").unwrap(), Some(e));
        assert_eq!(find(d.path(), "r2").unwrap(), None);
        std::fs::write(path(d.path()), "not = [toml").unwrap();
        assert_eq!(find(d.path(), "r1").unwrap(), None);
        let aside = std::fs::read_dir(d.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains("corrupt"));
        assert!(aside, "the corrupt ledger is kept for inspection");
    }
}
