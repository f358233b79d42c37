//! The request file on a provisioning stick (`lucidgate/request.toml`): parsing and checking.
//! Every problem names the field (`client[2].name`) and, for syntax, the line; nothing is issued
//! unless the whole request is valid.

use serde::Deserialize;

use crate::config::ConfigError;

/// Largest request file read from a stick.
pub(crate) const MAX_REQUEST_BYTES: usize = 64 * 1024;
/// Most client certificates one request may ask for.
const MAX_CLIENTS: usize = 64;
/// Longest request id.
const MAX_ID_LEN: usize = 64;
/// Default lifetime of a client certificate issued from a stick.
pub(crate) const DEFAULT_DAYS: u32 = 365;

/// `lucidgate/request.toml` as written by the operator.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Request {
    /// Names this request so it is processed once; default: a hash of the file.
    pub(crate) id: Option<String>,
    /// Must match the device's provisioning token.
    pub(crate) token: Option<String>,
    #[serde(default)]
    pub(crate) client: Vec<ClientRequest>,
    pub(crate) import: Option<Import>,
}

/// One client certificate to issue.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClientRequest {
    pub(crate) name: String,
    /// Module serials, or `["*"]` for all.
    pub(crate) modules: Vec<String>,
    #[serde(default)]
    pub(crate) read_only: bool,
    pub(crate) days: Option<u32>,
}

/// The operator's own PKI, installed instead of the built-in CA. Paths are relative to the
/// stick's `lucidgate/` directory.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Import {
    /// CA certificate(s) client certificates must chain to.
    pub(crate) ca: String,
    /// Server certificate chain.
    pub(crate) cert: String,
    /// Server private key.
    pub(crate) key: String,
}

/// Parses `text` (from `origin`, for messages) and checks every field.
pub(crate) fn parse(text: &str, origin: &str) -> Result<Request, Vec<String>> {
    let req: Request = crate::config::parse_toml(text, origin).map_err(|e| match e {
        ConfigError::Invalid { location, message } => vec![format!("{location}: {message}")],
        other => vec![other.to_string()],
    })?;
    let mut errors = Vec::new();
    if let Some(id) = &req.id
        && let Err(m) = check_id(id)
    {
        errors.push(format!("{origin}: id: {m}"));
    }
    if req.client.is_empty() && req.import.is_none() {
        errors.push(format!(
            "{origin}: nothing to do; add [[client]] entries (name, modules) or an [import] table"
        ));
    }
    if req.client.len() > MAX_CLIENTS {
        errors.push(format!(
            "{origin}: {} [[client]] entries; at most {MAX_CLIENTS} per request",
            req.client.len()
        ));
    }
    let mut names = std::collections::BTreeSet::new();
    for (i, c) in req.client.iter().enumerate() {
        let at = format!("{origin}: client[{}]", i + 1);
        if let Err(e) = crate::ca::check_client_name(&c.name) {
            errors.push(format!("{at}.name: {e}"));
        } else if !names.insert(c.name.to_ascii_lowercase()) {
            errors.push(format!(
                "{at}.name: {:?} is asked for twice (names are file names on the stick)",
                c.name
            ));
        }
        if c.modules.is_empty() {
            errors.push(format!(
                "{at}.modules: empty; list module serials or [\"*\"] for all"
            ));
        }
        for m in &c.modules {
            if m != "*"
                && let Err(why) = crate::config::check_serial(m)
            {
                errors.push(format!("{at}.modules: serial {m:?} {why}"));
            }
        }
        if let Some(d) = c.days
            && (d == 0 || d > crate::ca::MAX_CLIENT_DAYS)
        {
            errors.push(format!(
                "{at}.days: {d} is outside 1..={}",
                crate::ca::MAX_CLIENT_DAYS
            ));
        }
    }
    if let Some(imp) = &req.import {
        for (field, p) in [("ca", &imp.ca), ("cert", &imp.cert), ("key", &imp.key)] {
            if let Err(m) = check_stick_path(p) {
                errors.push(format!("{origin}: import.{field}: {m}"));
            }
        }
        if !req.client.is_empty() {
            errors.push(format!(
                "{origin}: [import] and [[client]] together: with your own CA, issue client certificates with that CA"
            ));
        }
    }
    if errors.is_empty() {
        Ok(req)
    } else {
        Err(errors)
    }
}

/// A request id: letters, digits, `-`, `_`, `.`.
fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_ID_LEN {
        return Err(format!("must be 1 to {MAX_ID_LEN} characters"));
    }
    if !id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(format!(
            "{id:?} may hold letters, digits, '-', '_' and '.' only"
        ));
    }
    Ok(())
}

/// A path on the stick, relative to `lucidgate/`: plain names separated by `/`, no `..`, no
/// absolute paths.
fn check_stick_path(p: &str) -> Result<(), String> {
    if p.is_empty() || p.len() > 255 {
        return Err("must be 1 to 255 characters".into());
    }
    if p.starts_with('/') || p.contains('\\') {
        return Err(format!(
            "{p:?} must be relative to the stick's lucidgate/ directory, with '/' separators"
        ));
    }
    for part in p.split('/') {
        if part.is_empty() || part == "." || part == ".." {
            return Err(format!(
                "{p:?} may not contain empty, '.' or '..' parts (it must stay inside lucidgate/)"
            ));
        }
        if part
            .chars()
            .any(|c| c.is_control() || ":*?\"<>|".contains(c))
        {
            return Err(format!("{p:?} has a character FAT does not allow"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_requests_never_panic() {
        let pieces = [
            "token = \"t\"\n",
            "[[client]]\n",
            "name = ",
            "\"../x\"",
            "\"a\"",
            "modules = [",
            "\"*\"",
            "]",
            "\n",
            "days = ",
            "99999999999",
            "-1",
            "[import]\n",
            "ca = ",
            "\"/\"",
            "é",
            "\u{0}",
            "{",
            "}",
            "=",
            "#",
            "id = ",
            "read_only = true\n",
        ];
        let mut seed = 11u64;
        for _ in 0..3000 {
            let mut t = String::new();
            for _ in 0..(seed % 16) {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                t.push_str(pieces[(seed >> 33) as usize % pieces.len()]);
            }
            let _ = parse(&t, "fuzz");
        }
    }

    #[test]
    fn a_valid_request() {
        let r = parse(
            "token = \"t\"\n[[client]]\nname = \"dash\"\nmodules = [\"11001001FA480000\"]\nread_only = true\ndays = 30\n",
            "request.toml",
        )
        .unwrap();
        assert_eq!(r.client[0].name, "dash");
        assert!(r.client[0].read_only);
    }

    #[test]
    fn every_problem_is_named() {
        let errs = parse(
            "id = \"a b\"\n[[client]]\nname = \"../../etc/passwd\"\nmodules = []\ndays = 0\n[[client]]\nname = \"x\"\nmodules = [\"a/b\"]\n",
            "request.toml",
        )
        .unwrap_err()
        .join("\n");
        for want in [
            "id: \"a b\"",
            "client[1].name",
            "client[1].modules: empty",
            "client[1].days: 0",
            "client[2].modules: serial \"a/b\"",
        ] {
            assert!(errs.contains(want), "{want} missing in:\n{errs}");
        }
        let errs = parse("token = 1\n", "request.toml").unwrap_err().join("\n");
        assert!(errs.contains("line 1") && errs.contains("token"), "{errs}");
        let errs = parse(
            "[import]\nca = \"../ca.crt\"\ncert = \"/etc/x\"\nkey = \"k\"\n",
            "r",
        )
        .unwrap_err()
        .join("\n");
        assert!(
            errs.contains("import.ca") && errs.contains("import.cert"),
            "{errs}"
        );
    }
}
