//! Validators of single values, shared by the config, the CLI, attach, discovery and
//! provisioning: each says in words what is wrong. A leaf: it imports nothing of lucidgate.

use std::num::NonZeroU32;

/// Longest module serial accepted (in config, file names, logs).
pub const MAX_SERIAL_LEN: usize = 64;
/// Longest DNS label, hence longest mDNS host name.
pub const MAX_LABEL: usize = 63;
/// The scheme of a stored provisioning token hash.
pub const TOKEN_HASH_SCHEME: &str = "pbkdf2-sha256";
/// Bytes of a provisioning token hash.
pub const TOKEN_HASH_LEN: usize = 32;

/// Is `s` usable as a module serial (in config, in file names, in logs)?
pub fn check_serial(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("is empty".into());
    }
    if s.len() > MAX_SERIAL_LEN {
        return Err(format!("is longer than {MAX_SERIAL_LEN} characters"));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(format!(
            "contains {c:?}; use letters, digits, '-', '_', '.' or ':'"
        ));
    }
    Ok(())
}

/// Parses a duration such as "30d", "12h", "90s".
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(s.trim()).map_err(|e| {
        format!("{s:?} is not a duration ({e}); write e.g. \"30d\", \"12h\" or \"90s\"")
    })
}

/// Is `name` usable as the mDNS host name (one DNS label, no `.local`)?
pub fn check_hostname(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_LABEL {
        return Err(format!("must be 1 to {MAX_LABEL} characters"));
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(format!(
            "{name:?} is not a host name (letters, digits and inner hyphens only; no `.local`)"
        ));
    }
    Ok(())
}

/// Checks the form of a stored token hash; the message says what is wrong.
pub fn check_token_hash(stored: &str) -> Result<(), String> {
    parse_token_hash(stored).map(|_| ())
}

/// A stored token hash `pbkdf2-sha256$ROUNDS$SALT$HASH` (hex) as (rounds, salt, hash).
pub fn parse_token_hash(stored: &str) -> Result<(NonZeroU32, Vec<u8>, Vec<u8>), String> {
    let parts: Vec<&str> = stored.split('$').collect();
    let [scheme, rounds, salt, hash] = parts[..] else {
        return Err(format!(
            "expected {TOKEN_HASH_SCHEME}$ROUNDS$SALT$HASH (set it with `lucidgate provision set-token`)"
        ));
    };
    if scheme != TOKEN_HASH_SCHEME {
        return Err(format!(
            "unknown scheme {scheme:?}, expected {TOKEN_HASH_SCHEME}"
        ));
    }
    let rounds = rounds
        .parse::<u32>()
        .ok()
        .and_then(NonZeroU32::new)
        .ok_or_else(|| format!("rounds {rounds:?} is not a positive number"))?;
    let salt = unhex(salt).ok_or("the salt is not hex")?;
    let hash = unhex(hash)
        .filter(|h| h.len() == TOKEN_HASH_LEN)
        .ok_or("the hash is not 64 hex digits")?;
    Ok((rounds, salt, hash))
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_single_labels() {
        assert!(check_hostname("pi-lab-3").is_ok());
        assert!(check_hostname("pi.local").is_err());
        assert!(check_hostname("-pi").is_err());
        assert!(check_hostname("").is_err());
        assert!(check_hostname(&"a".repeat(64)).is_err());
    }
}
