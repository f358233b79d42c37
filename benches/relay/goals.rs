//! The leanness goals (issue 21) checked against one run's figures: each goal with lucidgate's
//! value, the reference it is held to, and whether it is met. Printed by every run (CI too)
//! and written into benchmarks.md; a goal whose figures are missing says so.

use std::path::PathBuf;

use super::Report;

/// The packaged (release, stripped, LTO) binaries' size goal.
pub(super) const BINARY_GOAL_BYTES: u64 = 3 << 20;

pub(super) struct Goal {
    pub(super) what: String,
    pub(super) lucidgate: String,
    pub(super) reference: String,
    pub(super) met: Option<bool>,
}

fn row<'a>(r: &'a Report, server: &str) -> Option<&'a super::Row> {
    r.single.iter().find(|x| x.server == server)
}

fn rss(r: &Report, server: &str, modules: usize) -> Option<u64> {
    r.scale
        .iter()
        .find(|x| x.server == server && x.modules == modules)
        .map(|x| x.rss_kb)
}

fn compare(
    what: &str,
    lg: Option<f64>,
    reference: Option<f64>,
    ok: impl Fn(f64, f64) -> bool,
    unit: &str,
    reference_name: &str,
) -> Goal {
    let f = |v: Option<f64>| {
        v.map(|v| format!("{v:.1} {unit}"))
            .unwrap_or_else(|| "not measured".into())
    };
    Goal {
        what: what.into(),
        lucidgate: f(lg),
        reference: format!("{} ({reference_name})", f(reference)),
        met: lg.zip(reference).map(|(a, b)| ok(a, b)),
    }
}

/// The release binaries this checkout has built (host and cross), with their sizes.
fn binaries() -> Vec<(String, u64)> {
    let target = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target");
    [
        "release",
        "aarch64-unknown-linux-gnu/release",
        "armv7-unknown-linux-gnueabihf/release",
    ]
    .iter()
    .filter_map(|d| {
        let p = target.join(d).join("lucidgate");
        std::fs::metadata(&p).ok().map(|m| (d.to_string(), m.len()))
    })
    .collect()
}

pub(super) fn goals(r: &Report) -> Vec<Goal> {
    let mut g = Vec::new();
    let ser2net = "ser2net (chardelay: false)";
    for n in [1, 16] {
        let lg = rss(r, "lucidgate", n).map(|v| v as f64);
        let s2n = rss(r, ser2net, n).map(|v| v as f64);
        if lg.is_some() {
            g.push(compare(
                &format!("RSS, {n} module(s): ≤ ser2net"),
                lg,
                s2n,
                |a, b| a <= b,
                "kB",
                "ser2net",
            ));
        }
    }
    for (dir, size) in binaries() {
        g.push(Goal {
            what: format!("stripped binary ({dir}) < 3 MiB"),
            lucidgate: format!("{size} B"),
            reference: format!("{BINARY_GOAL_BYTES} B"),
            met: Some(size < BINARY_GOAL_BYTES),
        });
    }
    let (lg, socat) = (row(r, "lucidgate"), row(r, "socat"));
    g.push(compare(
        "CPU per request: ≤ 0.8× socat",
        lg.and_then(|x| x.cpu_us_per_request),
        socat.and_then(|x| x.cpu_us_per_request),
        |a, b| a <= 0.8 * b,
        "µs",
        "socat",
    ));
    g.push(compare(
        "CPU per MiB uploaded: ≤ socat",
        lg.and_then(|x| x.cpu_us_per_mib_up),
        socat.and_then(|x| x.cpu_us_per_mib_up),
        |a, b| a <= b,
        "µs",
        "socat",
    ));
    g.push(compare(
        &format!(
            "upload MB/s{}: ≥ socat",
            if r.pinned { " on one CPU" } else { "" }
        ),
        lg.and_then(|x| x.up_mb_s),
        socat.and_then(|x| x.up_mb_s),
        |a, b| a >= b,
        "MB/s",
        "socat",
    ));
    let over = |x: Option<&super::Row>| {
        x.and_then(|x| x.rtt_p50_us)
            .zip(r.bare_pty_rtt_p50_us)
            .map(|(a, b)| a - b)
    };
    g.push(compare(
        "RTT p50 over the bare pty: ≤ half of socat's",
        over(lg),
        over(socat),
        |a, b| a <= b / 2.0,
        "µs",
        "socat's",
    ));
    let instr = |s: &str| r.instructions.iter().find(|x| x.server == s);
    let (li, si) = (instr("lucidgate"), instr("socat"));
    g.push(compare(
        "instructions per request: ≤ socat",
        li.and_then(|x| x.per_request),
        si.and_then(|x| x.per_request),
        |a, b| a <= b,
        "",
        "socat",
    ));
    g.push(compare(
        "instructions per MiB uploaded: ≤ socat",
        li.and_then(|x| x.per_mib_up),
        si.and_then(|x| x.per_mib_up),
        |a, b| a <= b,
        "",
        "socat",
    ));
    g
}

pub(super) fn markdown(goals: &[Goal]) -> String {
    let mut md = String::from("| goal | lucidgate | held to | met |\n|---|---:|---:|:---:|\n");
    for x in goals {
        md.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            x.what,
            x.lucidgate,
            x.reference,
            match x.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "-",
            }
        ));
    }
    md
}
