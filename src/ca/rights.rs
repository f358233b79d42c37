//! Access rights carried by client certificates, and reading them back from a peer's certificate.
//!
//! Rights are subject-alternative-name URIs, so they are visible to `openssl x509 -text` and
//! survive any TLS library: `lucidgate:module:SERIAL` (one module), `lucidgate:module:*` (all),
//! `lucidgate:read-only` (no writes; enforced by the protocol-aware relay).

use x509_parser::prelude::*;

const URI_MODULE_PREFIX: &str = "lucidgate:module:";
const URI_READ_ONLY: &str = "lucidgate:read-only";

/// What a client certificate grants.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub(crate) struct Rights {
    /// Module serials, or `*` for all.
    pub(crate) modules: Vec<String>,
    pub(crate) read_only: bool,
}

impl Rights {
    /// The SAN URIs that encode these rights.
    pub(crate) fn uris(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .modules
            .iter()
            .map(|m| format!("{URI_MODULE_PREFIX}{m}"))
            .collect();
        if self.read_only {
            out.push(URI_READ_ONLY.to_string());
        }
        out
    }

    pub(crate) fn allows(&self, serial: &str) -> bool {
        self.modules.iter().any(|m| m == "*" || m == serial)
    }
}

/// A client as its certificate describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientIdentity {
    /// The subject's common name (the name given to `cert issue-client`).
    pub(crate) name: String,
    /// Certificate serial, lowercase hex.
    pub(crate) serial: String,
    pub(crate) rights: Rights,
}

/// A peer's certificate that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("unreadable certificate: {0}")]
pub(crate) struct UnreadableCertificate(x509_parser::nom::Err<X509Error>);

/// Reads name, serial and rights from a DER certificate.
pub(crate) fn client_identity(der: &[u8]) -> Result<ClientIdentity, UnreadableCertificate> {
    let (_, cert) = parse_x509_certificate(der).map_err(UnreadableCertificate)?;
    let name = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or("")
        .to_string();
    let serial = hex(cert.raw_serial());
    let mut rights = Rights::default();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for gn in &san.value.general_names {
            if let GeneralName::URI(uri) = gn {
                if *uri == URI_READ_ONLY {
                    rights.read_only = true;
                } else if let Some(m) = uri.strip_prefix(URI_MODULE_PREFIX) {
                    rights.modules.push(m.to_string());
                }
            }
        }
    }
    Ok(ClientIdentity {
        name,
        serial,
        rights,
    })
}

/// Lowercase hex without separators (leading zero bytes dropped, as openssl prints serials).
pub(crate) fn hex(bytes: &[u8]) -> String {
    let trimmed: &[u8] = {
        let first = bytes
            .iter()
            .position(|b| *b != 0)
            .unwrap_or(bytes.len().saturating_sub(1));
        &bytes[first..]
    };
    trimmed.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rights_round_trip_through_uris() {
        let r = Rights {
            modules: vec!["11001001FA480000".into()],
            read_only: true,
        };
        assert_eq!(
            r.uris(),
            vec!["lucidgate:module:11001001FA480000", "lucidgate:read-only"]
        );
        assert!(r.allows("11001001FA480000"));
        assert!(!r.allows("11001001FA480001"));
        let all = Rights {
            modules: vec!["*".into()],
            read_only: false,
        };
        assert!(all.allows("anything"));
        assert!(!Rights::default().allows("x"));
    }

    #[test]
    fn hex_drops_leading_zero_bytes() {
        assert_eq!(hex(&[0x00, 0x1a, 0x02]), "1a02");
        assert_eq!(hex(&[0x00]), "00");
    }
}
