//! Records when lucidgate was built: a clock earlier than that is certainly wrong (a Pi without
//! RTC before NTP), and the PKI waits instead of issuing certificates that are not yet valid.
//! `SOURCE_DATE_EPOCH` (reproducible builds) wins over the build machine's clock.

fn main() {
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let epoch = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        });
    println!("cargo:rustc-env=LUCIDGATE_BUILD_UNIX={epoch}");
}
