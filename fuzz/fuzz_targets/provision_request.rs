#![no_main]
// See src/fuzzing.rs for what is checked.
libfuzzer_sys::fuzz_target!(|data: &[u8]| lucidgate::fuzzing::provision_request(data));
