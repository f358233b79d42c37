//! Validators of single values, shared by the config, the CLI, attach, discovery and
//! provisioning: each error says in words what is wrong (its `Display`). A leaf: it imports
//! nothing of lucidgate.

use std::num::NonZeroU32;

/// Longest module serial accepted (in config, file names, logs).
pub(crate) const MAX_SERIAL_LEN: usize = 64;
/// Longest DNS label, hence longest mDNS host name.
pub(crate) const MAX_LABEL: usize = 63;
/// The scheme of a stored provisioning token hash.
pub(crate) const TOKEN_HASH_SCHEME: &str = "pbkdf2-sha256";
/// Bytes of a provisioning token hash.
pub(crate) const TOKEN_HASH_LEN: usize = 32;

/// Why a string is not a usable module serial; the message follows the serial in a sentence
/// (`serial "X" is empty`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum SerialError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {MAX_SERIAL_LEN} characters")]
    TooLong,
    #[error("contains {0:?}; use letters, digits, '-', '_', '.' or ':'")]
    BadChar(char),
}

/// Is `s` usable as a module serial (in config, in file names, in logs)?
pub(crate) fn check_serial(s: &str) -> Result<(), SerialError> {
    if s.is_empty() {
        return Err(SerialError::Empty);
    }
    if s.len() > MAX_SERIAL_LEN {
        return Err(SerialError::TooLong);
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')))
    {
        return Err(SerialError::BadChar(c));
    }
    Ok(())
}

/// A text that is not a duration.
#[derive(Debug, thiserror::Error)]
#[error("{text:?} is not a duration ({reason}); write e.g. \"30d\", \"12h\" or \"90s\"")]
pub(crate) struct DurationError {
    text: String,
    reason: humantime::DurationError,
}

/// Parses a duration such as "30d", "12h", "90s".
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, DurationError> {
    humantime::parse_duration(s.trim()).map_err(|reason| DurationError {
        text: s.to_string(),
        reason,
    })
}

/// Why a name is not usable as the mDNS host name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HostnameError {
    #[error("must be 1 to {MAX_LABEL} characters")]
    Length,
    #[error("{0:?} is not a host name (letters, digits and inner hyphens only; no `.local`)")]
    NotALabel(String),
}

/// Is `name` usable as the mDNS host name (one DNS label, no `.local`)?
pub(crate) fn check_hostname(name: &str) -> Result<(), HostnameError> {
    if name.is_empty() || name.len() > MAX_LABEL {
        return Err(HostnameError::Length);
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        || name.starts_with('-')
        || name.ends_with('-')
    {
        return Err(HostnameError::NotALabel(name.to_string()));
    }
    Ok(())
}

/// What is wrong with a stored provisioning token hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum TokenHashError {
    #[error(
        "expected {TOKEN_HASH_SCHEME}$ROUNDS$SALT$HASH (set it with `lucidgate provision set-token`)"
    )]
    Form,
    #[error("unknown scheme {0:?}, expected {TOKEN_HASH_SCHEME}")]
    Scheme(String),
    #[error("rounds {0:?} is not a positive number")]
    Rounds(String),
    #[error("the salt is not hex")]
    Salt,
    #[error("the hash is not 64 hex digits")]
    Hash,
}

/// Checks the form of a stored token hash; the error says what is wrong.
pub(crate) fn check_token_hash(stored: &str) -> Result<(), TokenHashError> {
    parse_token_hash(stored).map(|_| ())
}

/// A stored token hash `pbkdf2-sha256$ROUNDS$SALT$HASH` (hex) as (rounds, salt, hash).
pub(crate) fn parse_token_hash(
    stored: &str,
) -> Result<(NonZeroU32, Vec<u8>, Vec<u8>), TokenHashError> {
    let parts: Vec<&str> = stored.split('$').collect();
    let [scheme, rounds, salt, hash] = parts[..] else {
        return Err(TokenHashError::Form);
    };
    if scheme != TOKEN_HASH_SCHEME {
        return Err(TokenHashError::Scheme(scheme.to_string()));
    }
    let rounds = rounds
        .parse::<u32>()
        .ok()
        .and_then(NonZeroU32::new)
        .ok_or_else(|| TokenHashError::Rounds(rounds.to_string()))?;
    let salt = unhex(salt).ok_or(TokenHashError::Salt)?;
    let hash = unhex(hash)
        .filter(|h| h.len() == TOKEN_HASH_LEN)
        .ok_or(TokenHashError::Hash)?;
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

/// An `allow_from` entry: a network in CIDR notation (`192.168.1.0/24`, `fd00::/8`) or a single
/// address (`127.0.0.1`, `::1`). Host bits after the prefix are cleared (`10.1.2.3/8` is
/// `10.0.0.0/8`), as ip(8) and iptables do.
pub(crate) fn parse_net(s: &str) -> Result<ipnet::IpNet, String> {
    let t = s.trim();
    if let Ok(net) = t.parse::<ipnet::IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(addr) = t.parse::<std::net::IpAddr>() {
        return Ok(ipnet::IpNet::from(addr));
    }
    Err(format!(
        "{s:?} is neither an address nor a network; write e.g. \"192.168.1.0/24\", \"10.0.0.7\" or \"fd00::/8\""
    ))
}

#[cfg(test)]
mod net_tests {
    use super::parse_net;

    #[test]
    fn networks_and_single_addresses_parse() {
        assert_eq!(
            parse_net("192.168.1.0/24").unwrap().to_string(),
            "192.168.1.0/24"
        );
        assert_eq!(parse_net("10.1.2.3/8").unwrap().to_string(), "10.0.0.0/8");
        assert_eq!(parse_net("127.0.0.1").unwrap().to_string(), "127.0.0.1/32");
        assert_eq!(parse_net("::1").unwrap().to_string(), "::1/128");
        assert_eq!(parse_net("fd00::/8").unwrap().to_string(), "fd00::/8");
        for bad in [
            "",
            "192.168.1.0/33",
            "::/129",
            "lan",
            "192.168.1",
            "10.0.0.0/",
        ] {
            let e = parse_net(bad).unwrap_err();
            assert!(e.contains("neither an address nor a network"), "{bad}: {e}");
        }
    }
}
