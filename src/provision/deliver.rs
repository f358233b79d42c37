//! What a valid request gets: client certificates issued and written to the stick's
//! `lucidgate/out/` (revoked again if they cannot all be delivered), or an operator's PKI read
//! from the stick and installed.

use std::io::{Read, Seek, Write};

use super::stick::Stick;
use super::{DIR, Gateway, Issued, MAX_IMPORT_FILE, OUT_DIR, Outcome, Status, request};
use crate::ca::Pki;
use crate::ca::rights::Rights;

/// Issues and writes every client; on any failure revokes what this request issued.
pub(super) fn issue<D: Read + Write + Seek>(
    stick: &Stick<D>,
    clients: &[request::ClientRequest],
    dev: &Gateway,
    out: &mut Outcome,
) -> Option<Vec<String>> {
    let pki = match Pki::open(dev.state_dir, dev.pki.clone(), dev.clock) {
        Ok(p) => p,
        Err(e) => {
            out.message = format!("the PKI is not usable: {e:#}; nothing was issued");
            return None;
        }
    };
    let mut issued: Vec<Issued> = Vec::new();
    let mut ca_pem = String::new();
    let mut failure = None;
    for c in clients {
        let rights = Rights {
            modules: c.modules.clone(),
            read_only: c.read_only,
        };
        let days = c.days.unwrap_or(request::DEFAULT_DAYS);
        let bundle = match pki.issue_client(&c.name, &rights, days) {
            Ok(b) => b,
            Err(e) => {
                failure = Some(format!("issuing {}: {e:#}", c.name));
                break;
            }
        };
        let mut item = Issued {
            name: c.name.clone(),
            serial: bundle.serial.clone(),
            modules: c.modules.clone(),
            read_only: c.read_only,
            not_after: humantime::format_rfc3339_seconds(bundle.not_after).to_string(),
            files: Vec::new(),
        };
        ca_pem = bundle.ca_pem.clone();
        let files = [
            (format!("{OUT_DIR}/{}.key", c.name), bundle.key_pem.clone()),
            (format!("{OUT_DIR}/{}.crt", c.name), bundle.cert_pem.clone()),
            (
                format!("{OUT_DIR}/{}.pem", c.name),
                format!("{}{}", bundle.key_pem, bundle.cert_pem),
            ),
        ];
        issued.push(item.clone());
        for (path, data) in files {
            if let Err(e) = stick.write_replace(&path, data.as_bytes()) {
                failure = Some(format!("writing {path}: {e}"));
                break;
            }
            item.files.push(path);
        }
        if failure.is_some() {
            break;
        }
        if let Some(last) = issued.last_mut() {
            *last = item;
        }
    }
    if failure.is_none()
        && !ca_pem.is_empty()
        && let Err(e) = stick.write_replace(&format!("{OUT_DIR}/ca.crt"), ca_pem.as_bytes())
    {
        failure = Some(format!("writing {OUT_DIR}/ca.crt: {e}"));
    }
    if let Some(why) = failure {
        // Certificates that did not reach the operator must not stay valid.
        let mut revoked = Vec::new();
        for i in &issued {
            match pki.revoke(&i.serial) {
                Ok(_) => revoked.push(i.name.clone()),
                Err(e) => out
                    .errors
                    .push(format!("revoking undelivered {}: {e:#}", i.name)),
            }
        }
        out.message = if revoked.is_empty() {
            format!("{why}; nothing was issued")
        } else {
            format!(
                "{why}; the certificates issued meanwhile ({}) were revoked; plug the stick in again",
                revoked.join(", ")
            )
        };
        return None;
    }
    let did = issued
        .iter()
        .map(|i| format!("issued {} serial {}", i.name, i.serial))
        .collect();
    out.message = format!(
        "issued {} client certificate(s) into {OUT_DIR}/ with ca.crt",
        issued.len()
    );
    out.issued = issued;
    Some(did)
}

/// Installs the operator's CA bundle and server certificate/key from the stick.
pub(super) fn import<D: Read + Write + Seek>(
    stick: &Stick<D>,
    imp: &request::Import,
    dev: &Gateway,
    out: &mut Outcome,
) -> Option<Vec<String>> {
    let mut read = |field: &str, rel: &str| -> Option<Vec<u8>> {
        let path = format!("{DIR}/{rel}");
        match stick.read(&path, MAX_IMPORT_FILE) {
            Ok(Some(b)) => Some(b),
            Ok(None) => {
                out.errors
                    .push(format!("import.{field}: {path} is not on the stick"));
                None
            }
            Err(e) => {
                out.errors.push(format!("import.{field}: {e}"));
                None
            }
        }
    };
    let (ca, cert, key) = (
        read("ca", &imp.ca),
        read("cert", &imp.cert),
        read("key", &imp.key),
    );
    let (Some(ca), Some(cert), Some(key)) = (ca, cert, key) else {
        out.status = Status::Refused;
        out.message = "the [import] files are not all readable; nothing was installed".into();
        return None;
    };
    match crate::ca::install_import(dev.state_dir, &ca, &cert, &key) {
        Ok(summary) => {
            out.message = format!(
                "installed your PKI ({summary}); the device now uses it instead of the built-in CA"
            );
            Some(vec![format!("imported {summary}")])
        }
        Err(e) => {
            out.status = Status::Refused;
            out.message = format!("the [import] was not installed: {e:#}");
            None
        }
    }
}
