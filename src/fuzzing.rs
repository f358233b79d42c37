//! The bodies of the fuzz targets (`fuzz/`, run with `cargo +nightly fuzz`), kept in the
//! library so the stable test suite replays the kept corpus through the very same checks
//! (`tests/fuzz_corpus.rs`). Each takes arbitrary bytes, must not panic, and checks what the
//! parser promises: errors say where, what lucidgate writes it reads back, frames re-encode
//! to the bytes they came from.

use crate::config::Config;
use crate::protocol::{Answer, Request};
use crate::relay::metrics::{Scan, Side};

/// The config parser: an error names the file (and, where there is one, the line and field);
/// a config that parses is printed by `config check` as TOML that parses again, the same.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, "fuzz.toml") {
        Ok(c) => {
            let printed = c.to_toml();
            let again = Config::parse(&printed, "printed.toml").unwrap_or_else(|e| {
                panic!("lucidgate printed a config it cannot read: {e}\n{printed}")
            });
            assert_eq!(again.to_toml(), printed, "printing is not stable");
        }
        Err(e) => {
            let m = e.to_string();
            assert!(
                m.starts_with("fuzz.toml"),
                "the error does not name the file: {m}"
            );
        }
    }
}

/// The LucidControl frame parsers: requests and answers re-encode to the bytes they were
/// parsed from, and the raw-mode scanner finds the same frames whether the bytes come whole
/// or in two pieces.
pub fn frames(data: &[u8]) {
    let split = data.first().map_or(0, |b| *b as usize).min(data.len());
    for side in [Side::Requests, Side::Answers] {
        let mut rest = data;
        let mut whole_frames = 0usize;
        loop {
            let used = match side {
                Side::Requests => match Request::parse(rest) {
                    Ok((r, used)) => {
                        assert_eq!(r.encode(), rest[..used], "request re-encodes differently");
                        used
                    }
                    Err(_) => break,
                },
                Side::Answers => match Answer::parse(rest) {
                    Ok((a, used)) => {
                        assert_eq!(a.encode(), rest[..used], "answer re-encodes differently");
                        used
                    }
                    Err(_) => break,
                },
            };
            assert!(used > 0, "a frame of no bytes");
            whole_frames += 1;
            rest = &rest[used..];
        }
        let mut headers = Vec::new();
        let mut scan = Scan::new(side);
        scan.feed(data, |h| headers.push(h.to_vec()));
        let mut pieces = Vec::new();
        let mut scan = Scan::new(side);
        scan.feed(&data[..split], |h| pieces.push(h.to_vec()));
        scan.feed(&data[split..], |h| pieces.push(h.to_vec()));
        assert_eq!(
            headers, pieces,
            "the scanner depends on how the bytes were cut"
        );
        // Every whole frame the parser found, the scanner found too (it may also see the
        // header of a last frame whose data has not all arrived).
        assert!(headers.len() >= whole_frames && headers.len() <= whole_frames + 1);
    }
}

/// The provisioning request parser (`lucidgate/request.toml` on a stick): every error names
/// the file.
pub fn provision_request(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = crate::provision::request::parse(text, "STICK/lucidgate/request.toml") {
        assert!(!errors.is_empty(), "refused without a reason");
        for e in errors {
            assert!(
                e.starts_with("STICK/lucidgate/request.toml"),
                "the error does not name the file: {e}"
            );
        }
    }
}

/// The control socket's request line: a command, or an error to send back; a command
/// lucidgate sends is read back as the same command.
pub fn control(data: &[u8]) {
    match crate::control::parse_request(data) {
        Ok(cmd) => {
            let line = serde_json::to_vec(&cmd).expect("a command serialises");
            let back = crate::control::parse_request(&line).map_err(|e| e.to_string());
            assert_eq!(back, Ok(cmd));
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}
