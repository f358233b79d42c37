//! Per-module protocol counters (requests, answers by status, timeouts, refused writes) and the
//! frame scanner that counts them in raw mode without touching the bytes.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::{Deserialize, Serialize};

use crate::protocol::{request_header_len, status};

/// Counters of one relay. In raw mode they come from [`Scan`]ning the byte streams; in the
/// protocol-aware modes from the exchanges themselves (then timeouts are counted too).
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) requests: AtomicU64,
    pub(crate) answers_ok: AtomicU64,
    /// Answers with a status other than OK, by status.
    pub(crate) answer_errors: Mutex<BTreeMap<u8, u64>>,
    /// Requests the module did not answer within the answer timeout.
    pub(crate) timeouts: AtomicU64,
    /// Writes from read-only clients answered locally with "not supported".
    pub(crate) denied_writes: AtomicU64,
    /// Clients cut off for sending something that is not a request frame.
    pub(crate) bad_frames: AtomicU64,
}

impl Metrics {
    pub(crate) fn answer(&self, st: u8) {
        if st == status::OK {
            self.answers_ok.fetch_add(1, Relaxed);
        } else {
            *self
                .answer_errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(st)
                .or_default() += 1;
        }
    }

    /// Answers of any status so far.
    pub(crate) fn answers(&self) -> u64 {
        self.answers_ok.load(Relaxed)
            + self
                .answer_errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .sum::<u64>()
    }

    pub(crate) fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            requests: self.requests.load(Relaxed),
            answers_ok: self.answers_ok.load(Relaxed),
            answer_errors: self
                .answer_errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(k, v)| (format!("0x{k:02X}"), *v))
                .collect(),
            timeouts: self.timeouts.load(Relaxed),
            denied_writes: self.denied_writes.load(Relaxed),
            bad_frames: self.bad_frames.load(Relaxed),
        }
    }
}

/// The counters as `status --json` shows them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricsSnapshot {
    pub requests: u64,
    pub answers_ok: u64,
    /// Error answers by status (`"0xA0"`: count).
    pub answer_errors: BTreeMap<String, u64>,
    pub timeouts: u64,
    pub denied_writes: u64,
    pub bad_frames: u64,
}

/// Which side of the protocol a [`Scan`] follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Requests,
    Answers,
}

/// Follows the frame boundaries of a byte stream that arrives in arbitrary pieces, looking only
/// at headers and skipping data in bulk (cost per read: a few comparisons per frame).
#[derive(Debug)]
pub(crate) struct Scan {
    side: Side,
    head: [u8; 5],
    have: usize,
    skip: usize,
}

impl Scan {
    pub(crate) fn new(side: Side) -> Scan {
        Scan {
            side,
            head: [0; 5],
            have: 0,
            skip: 0,
        }
    }

    /// Feeds bytes; calls `frame` with each complete header (its last byte is the data length).
    pub(crate) fn feed(&mut self, mut bytes: &[u8], mut frame: impl FnMut(&[u8])) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let k = self.skip.min(bytes.len());
                self.skip -= k;
                bytes = &bytes[k..];
                continue;
            }
            self.head[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            let header = match self.side {
                Side::Answers => 2,
                Side::Requests if self.have >= 2 => request_header_len(self.head[0], self.head[1]),
                Side::Requests => continue,
            };
            if self.have == header {
                frame(&self.head[..header]);
                self.skip = self.head[header - 1] as usize;
                self.have = 0;
            }
        }
    }

    /// Counts what `bytes` completes into `metrics`.
    pub(crate) fn count(&mut self, bytes: &[u8], metrics: &Metrics) {
        let side = self.side;
        self.feed(bytes, |h| match side {
            Side::Requests => {
                metrics.requests.fetch_add(1, Relaxed);
            }
            Side::Answers => metrics.answer(h[0]),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_are_counted_once() {
        // GetIo, SetIoGroup with the extended mask byte and 8 data bytes, GetId.
        let stream: Vec<u8> = [
            &[0x46, 0x00, 0x1D, 0x00][..],
            &[0x42, 0x81, 0x01, 0x1D, 0x08, 1, 2, 3, 4, 5, 6, 7, 8],
            &[0xC0, 0x00, 0x00, 0x00],
        ]
        .concat();
        for cut in 0..stream.len() {
            for cut2 in cut..stream.len() {
                let m = Metrics::default();
                let mut s = Scan::new(Side::Requests);
                s.count(&stream[..cut], &m);
                s.count(&stream[cut..cut2], &m);
                s.count(&stream[cut2..], &m);
                assert_eq!(m.requests.load(Relaxed), 3, "cut at {cut},{cut2}");
            }
        }
        let m = Metrics::default();
        let mut s = Scan::new(Side::Answers);
        for b in [0x00, 0x04, 1, 2, 3, 4, 0xA0, 0x00, 0x00, 0x00] {
            s.count(&[b], &m);
        }
        let snap = m.snapshot();
        assert_eq!(snap.answers_ok, 2);
        assert_eq!(snap.answer_errors.get("0xA0"), Some(&1));
    }
}
