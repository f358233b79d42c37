//! Replays the fuzzers' kept corpus (`fuzz/corpus/TARGET/`) through the fuzz targets' checks
//! (`src/fuzzing.rs`) on the stable toolchain: what a fuzzing run once found stays fixed.
//! The fuzzing itself is `scripts/fuzz` (cargo-fuzz, nightly), run for a bounded time in CI.

use std::path::PathBuf;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        let data = std::fs::read(&path).unwrap();
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "{target}: {} fails the check", path.display());
        n += 1;
    }
    assert!(n > 0, "no corpus for {target}");
    println!("{target}: {n} inputs");
}

#[test]
fn config_corpus() {
    replay("config", lucidgate::fuzzing::config);
}

#[test]
fn frames_corpus() {
    replay("frames", lucidgate::fuzzing::frames);
}

#[test]
fn provision_request_corpus() {
    replay("provision_request", lucidgate::fuzzing::provision_request);
}

#[test]
fn control_corpus() {
    replay("control", lucidgate::fuzzing::control);
}
