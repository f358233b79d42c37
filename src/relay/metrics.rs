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
        self.answers_with(st, 1);
    }

    /// Counts `n` answers of status `st` at once.
    fn answers_with(&self, st: u8, n: u64) {
        if n == 0 {
            return;
        }
        if st == status::OK {
            self.answers_ok.fetch_add(n, Relaxed);
        } else {
            *self
                .answer_errors
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(st)
                .or_default() += n;
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
        loop {
            // The current frame's data: skipped in bulk.
            let k = self.skip.min(bytes.len());
            self.skip -= k;
            bytes = &bytes[k..];
            if bytes.is_empty() {
                return;
            }
            // Whole headers at hand (the usual case): frame after frame by index, not byte by
            // byte (a bulk transfer of small frames spent most of its instructions here).
            if self.have == 0 {
                let i = match self.side {
                    Side::Answers => whole_frames(bytes, |_, _| 2, &mut frame),
                    Side::Requests => whole_frames(bytes, request_header_len, &mut frame),
                };
                if i >= bytes.len() {
                    self.skip = i - bytes.len();
                    return;
                }
                bytes = &bytes[i..];
            }
            // A header split between reads: collected byte by byte.
            self.head[self.have] = bytes[0];
            self.have += 1;
            bytes = &bytes[1..];
            if self.header_len(&self.head[..self.have]) == Some(self.have) {
                let header = self.have;
                frame(&self.head[..header]);
                self.skip = self.head[header - 1] as usize;
                self.have = 0;
            }
        }
    }

    /// The header length of the frame `start` begins, once `start` tells it.
    fn header_len(&self, start: &[u8]) -> Option<usize> {
        match (self.side, start) {
            (Side::Answers, _) => Some(2),
            (Side::Requests, [opc, p1, ..]) => Some(request_header_len(*opc, *p1)),
            (Side::Requests, _) => None,
        }
    }

    /// Counts what `bytes` completes into `metrics`: tallied locally and added once per run of
    /// equal statuses (one atomic add per read, not per frame; a bulk transfer of small frames
    /// spent most of its instructions in per-frame adds and an error-status lock).
    pub(crate) fn count(&mut self, bytes: &[u8], metrics: &Metrics) {
        match self.side {
            Side::Requests => {
                let mut n = 0;
                self.feed(bytes, |_| n += 1);
                if n > 0 {
                    metrics.requests.fetch_add(n, Relaxed);
                }
            }
            Side::Answers => {
                let (mut st, mut n) = (status::OK, 0);
                self.feed(bytes, |h| {
                    if h[0] != st {
                        metrics.answers_with(st, n);
                        (st, n) = (h[0], 0);
                    }
                    n += 1;
                });
                metrics.answers_with(st, n);
            }
        }
    }
}

/// Calls `frame` with the header of each frame that begins at 0 and after it whose header is
/// all in `bytes` (`header` tells a header's length from its first two bytes); returns where
/// the next frame begins (past the end when the last frame's data is still to come).
#[inline]
fn whole_frames(
    bytes: &[u8],
    header: impl Fn(u8, u8) -> usize,
    frame: &mut impl FnMut(&[u8]),
) -> usize {
    let mut i = 0;
    while let [a, b, ..] = bytes[i.min(bytes.len())..] {
        let h = header(a, b);
        let Some(head) = bytes.get(i..i + h) else {
            break;
        };
        frame(head);
        i += h + head[h - 1] as usize;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The frame headers of `bytes` found one byte at a time (what the scanner must match).
    fn headers_byte_by_byte(side: Side, bytes: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < bytes.len() {
            let h = match side {
                Side::Answers => 2,
                Side::Requests if i + 1 < bytes.len() => request_header_len(bytes[i], bytes[i + 1]),
                Side::Requests => break,
            };
            if i + h > bytes.len() {
                break;
            }
            out.push(bytes[i..i + h].to_vec());
            i += h + bytes[i + h - 1] as usize;
        }
        out
    }

    #[test]
    fn random_streams_cut_at_random_give_the_headers_of_a_bytewise_walk() {
        let mut rng = fastrand::Rng::with_seed(21);
        for round in 0..2000 {
            let side = if round % 2 == 0 {
                Side::Requests
            } else {
                Side::Answers
            };
            // Small lengths and the group opcodes often, so short and extended headers mix.
            let len = rng.usize(0..600);
            let bytes: Vec<u8> = (0..len)
                .map(|_| match rng.u8(0..8) {
                    0 => 0x42,
                    1 => 0x48,
                    2 => 0x81,
                    3..=5 => rng.u8(0..6),
                    _ => rng.u8(..),
                })
                .collect();
            let mut got = Vec::new();
            let mut scan = Scan::new(side);
            let mut rest = &bytes[..];
            while !rest.is_empty() {
                let k = rng.usize(1..=rest.len().min(40));
                scan.feed(&rest[..k], |h| got.push(h.to_vec()));
                rest = &rest[k..];
            }
            assert_eq!(got, headers_byte_by_byte(side, &bytes), "round {round}");
        }
    }

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
