//! The provisioning secret: stored only as a salted PBKDF2-HMAC-SHA256 hash in the config
//! (`[provision] token_hash`), checked in constant time, and set by `lucidgate provision
//! set-token` (which edits the config file in place, atomically).

use std::num::NonZeroU32;
use std::path::Path;

use anyhow::{Context, Result, bail};
use ring::pbkdf2;
use ring::rand::{SecureRandom, SystemRandom};

use crate::config::check::{TOKEN_HASH_LEN, TOKEN_HASH_SCHEME, parse_token_hash};
use crate::config::locate::set_key;

/// PBKDF2 rounds: slow enough to make guessing a token from a leaked config expensive, quick
/// enough (about 0.1 s on a Pi 4) for a stick that is plugged in by hand.
const ITERATIONS: u32 = 100_000;
/// Longest token accepted (a request with a longer one is refused before hashing).
const MAX_TOKEN_LEN: usize = 256;
/// Shortest token `set-token` accepts.
const MIN_TOKEN_LEN: usize = 12;
const SALT_LEN: usize = 16;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Hashes `token` with a fresh salt: `pbkdf2-sha256$ROUNDS$SALT$HASH` (hex).
fn hash(token: &str) -> Result<String> {
    hash_with_rounds(token, ITERATIONS)
}

/// [`hash`] with another number of rounds (tests; [`verify`] reads the rounds from the hash).
pub fn hash_with_rounds(token: &str, rounds: u32) -> Result<String> {
    let mut salt = [0u8; SALT_LEN];
    SystemRandom::new()
        .fill(&mut salt)
        .map_err(|_| anyhow::anyhow!("no randomness for the token salt"))?;
    let mut out = [0u8; TOKEN_HASH_LEN];
    let rounds = NonZeroU32::new(rounds).context("rounds must be 1 or more")?;
    pbkdf2::derive(
        pbkdf2::PBKDF2_HMAC_SHA256,
        rounds,
        &salt,
        token.as_bytes(),
        &mut out,
    );
    Ok(format!(
        "{TOKEN_HASH_SCHEME}${rounds}${}${}",
        hex(&salt),
        hex(&out)
    ))
}

/// Whether `token` matches `stored` (constant time in the comparison).
pub(crate) fn verify(stored: &str, token: &str) -> bool {
    if token.len() > MAX_TOKEN_LEN {
        return false;
    }
    match parse_token_hash(stored) {
        Ok((rounds, salt, hash)) => pbkdf2::verify(
            pbkdf2::PBKDF2_HMAC_SHA256,
            rounds,
            &salt,
            token.as_bytes(),
            &hash,
        )
        .is_ok(),
        Err(_) => false,
    }
}

/// A new random token: 24 characters from an alphabet without look-alikes.
pub(crate) fn generate() -> Result<String> {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyz23456789";
    let mut raw = [0u8; 24];
    SystemRandom::new()
        .fill(&mut raw)
        .map_err(|_| anyhow::anyhow!("no randomness for a token"))?;
    Ok(raw
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect())
}

/// Returns `text` (a config file) with `[provision] token_hash` set to `value`, editing only that
/// line (comments and layout stay). The caller checks the result parses.
fn set_in_config(text: &str, value: &str) -> String {
    set_key(text, "provision", "token_hash", &format!("\"{value}\""))
}

/// `lucidgate provision set-token`: hashes `token` into the config file at `path` (created if
/// missing), atomically, keeping its mode. Returns the new file text.
pub(crate) fn set_token(path: &Path, token: &str) -> Result<()> {
    if token.len() < MIN_TOKEN_LEN || token.len() > MAX_TOKEN_LEN {
        bail!("a provisioning token must be {MIN_TOKEN_LEN} to {MAX_TOKEN_LEN} characters");
    }
    if token
        .chars()
        .any(|c| c.is_control() || c == '"' || c == '\\')
    {
        bail!("a provisioning token must not contain control characters, quotes or backslashes");
    }
    let (text, mode) = match std::fs::read_to_string(path) {
        Ok(t) => {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
            (t, mode)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), 0o644),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let new = set_in_config(&text, &hash(token)?);
    let cfg = crate::config::Config::parse(&new, &path.display().to_string()).map_err(|e| {
        anyhow::anyhow!(
            "{e}\n(after setting [provision] token_hash; edit the file by hand if it uses an unusual layout)"
        )
    })?;
    let stored = cfg.provision.token_hash.as_deref().unwrap_or("");
    if !verify(stored, token) {
        bail!(
            "{}: could not set [provision] token_hash (a `provision` key elsewhere in the file?); edit it by hand",
            path.display()
        );
    }
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::state::write_atomic(path, new.as_bytes(), mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_reject() {
        let h = hash("correct horse battery").unwrap();
        assert!(h.starts_with("pbkdf2-sha256$100000$"));
        assert!(verify(&h, "correct horse battery"));
        assert!(!verify(&h, "correct horse batterY"));
        assert!(!verify(&h, &"x".repeat(MAX_TOKEN_LEN + 1)));
        assert!(!verify("sha1$x", "correct horse battery"));
        assert!(crate::config::check::check_token_hash("pbkdf2-sha256$0$00$00").is_err());
        assert!(crate::config::check::check_token_hash(&h).is_ok());
        assert_ne!(hash("a").unwrap(), hash("a").unwrap(), "salted");
        let quick = hash_with_rounds("a", 10).unwrap();
        assert!(quick.starts_with("pbkdf2-sha256$10$") && verify(&quick, "a"));
    }
}
