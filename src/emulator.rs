//! A LucidControl module emulator: the module logic ([`Module`]) and runners that serve it on the
//! master side of a pty ([`serve_fd`], Linux) or to TCP clients ([`serve_tcp`], everywhere).
//!
//! One implementation for `lucidgate emulate`, the test suite and the benchmark. It answers
//! GetId, GetIo/SetIo, GetIoGroup/SetIoGroup, GetParam/SetParam and CalibIo per
//! `shared/lucidcontrol-protocol.md`, keeps values per channel, and rejects bad requests with the
//! protocol's status codes.

use std::collections::BTreeMap;
use std::io::{Read, Write};
#[cfg(target_os = "linux")]
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
#[cfg(target_os = "linux")]
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};

use crate::protocol::{Answer, Identity, Request, opcode, status, value_size, value_type};

/// How often the runner looks at its stop flag while no request arrives.
const STOP_POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Pause after a read error (e.g. EIO while no client has the pty open) before trying again.
#[cfg(target_os = "linux")]
const HANGUP_RETRY: Duration = Duration::from_millis(20);
/// The analog input reading of the protocol doc's example (1.756254 V on channel 0).
const AI_CHANNEL0_MICROVOLTS: i64 = 0x001A_CC5E;
/// Full scale of the analog output modules (0..10 V), in microvolts.
const AO_MAX_MICROVOLTS: i64 = 10_000_000;

/// What a module of a class can do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    DigitalIn,
    DigitalOut,
    AnalogIn,
    AnalogOut,
    ResistanceIn,
    DigitalInOut,
}

fn kind_of(class: u16) -> Kind {
    match class & 0xFF00 {
        0x0000 => Kind::DigitalIn,
        0x0100 => Kind::AnalogIn,
        0x0A00 => Kind::ResistanceIn,
        0x1000 => Kind::DigitalOut,
        0x1100 => Kind::AnalogOut,
        0x4000 => Kind::DigitalInOut,
        _ => Kind::DigitalIn,
    }
}

/// The state and behaviour of one emulated module.
#[derive(Debug, Clone)]
pub struct Module {
    pub identity: Identity,
    /// Per channel, in the smallest unit of the class (µV, µA, mΩ-free ohms, logic 0/1).
    values: Vec<i64>,
    params: BTreeMap<u16, Vec<u8>>,
    /// When true, the module swallows requests and never answers (a hung module).
    pub(crate) silent: bool,
    /// This many first requests are swallowed unanswered (a module still starting up).
    pub(crate) ignore_first: u64,
    /// Each answer is sent this long after its request (a slow module: flash writes).
    pub(crate) answer_delay: std::time::Duration,
}

impl Module {
    /// A module of `class` (see [`crate::protocol::MODULE_CLASSES`]) with the given 16-hex-digit
    /// USB serial's low 32 bits as its serial number.
    fn new(class: u16, type_: u16, serial: u32) -> Module {
        let identity = Identity {
            fw_revision: 0x0104,
            hw_revision: 2,
            class,
            type_,
            serial,
        };
        let channels = if class == 0x4000 || class & 0x00F0 == 0x0010 {
            8
        } else {
            4
        };
        let kind = kind_of(class);
        let values = (0..channels)
            .map(|ch| match kind {
                Kind::AnalogIn => AI_CHANNEL0_MICROVOLTS + ch as i64 * 1_000,
                Kind::ResistanceIn => 1_000 + ch as i64 * 100,
                Kind::DigitalIn => (ch % 2) as i64,
                _ => 0,
            })
            .collect();
        Module {
            identity,
            values,
            params: BTreeMap::new(),
            silent: false,
            ignore_first: 0,
            answer_delay: std::time::Duration::ZERO,
        }
    }

    /// Builds a module from a 16-hex-digit USB serial (class, type, serial number).
    pub fn from_usb_serial(serial: &str) -> Option<Module> {
        if serial.len() != 16 || !serial.chars().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let class = u16::from_str_radix(&serial[0..4], 16).ok()?;
        let type_ = u16::from_str_radix(&serial[4..8], 16).ok()?;
        let number = u32::from_str_radix(&serial[8..16], 16).ok()?;
        Some(Module::new(class, type_, number))
    }

    fn channels(&self) -> usize {
        self.values.len()
    }

    fn kind(&self) -> Kind {
        kind_of(self.identity.class)
    }

    fn supports(&self, vt: u8) -> bool {
        match self.kind() {
            Kind::DigitalIn => matches!(vt, value_type::LOGIC | value_type::COUNTER),
            Kind::DigitalOut | Kind::DigitalInOut => vt == value_type::LOGIC,
            Kind::AnalogIn | Kind::AnalogOut => matches!(
                vt,
                value_type::VOLTAGE_MV
                    | value_type::VOLTAGE_UV
                    | value_type::RAW
                    | value_type::CURRENT_UA
            ),
            Kind::ResistanceIn => matches!(
                vt,
                value_type::RESISTANCE
                    | value_type::TEMPERATURE
                    | value_type::TEMPERATURE_2
                    | value_type::RAW
            ),
        }
    }

    fn writable(&self, channel: usize) -> bool {
        match self.kind() {
            Kind::DigitalOut | Kind::AnalogOut => true,
            Kind::DigitalInOut => channel >= 4,
            _ => false,
        }
    }

    fn encode_value(&self, vt: u8, v: i64) -> Vec<u8> {
        match vt {
            value_type::LOGIC => vec![(v != 0) as u8],
            value_type::VOLTAGE_MV => ((v / 1_000) as i16).to_le_bytes().to_vec(),
            _ => (v as i32).to_le_bytes().to_vec(),
        }
    }

    fn decode_value(vt: u8, bytes: &[u8]) -> i64 {
        match vt {
            value_type::LOGIC => bytes[0] as i64,
            value_type::VOLTAGE_MV => i16::from_le_bytes([bytes[0], bytes[1]]) as i64 * 1_000,
            _ => i32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]) as i64,
        }
    }

    fn check_value(&self, vt: u8, v: i64) -> bool {
        match (self.kind(), vt) {
            (_, value_type::LOGIC) => v == 0 || v == 1,
            (Kind::AnalogOut, _) => (0..=AO_MAX_MICROVOLTS).contains(&v),
            _ => true,
        }
    }

    /// The channels selected by a group command's mask, or `None` if it selects none or one
    /// the module lacks.
    fn group_channels(&self, req: &Request) -> Option<Vec<usize>> {
        let mask = req.group_mask();
        if mask == 0 || (mask as u32) >> self.channels() != 0 {
            return None;
        }
        Some(
            (0..self.channels())
                .filter(|c| mask & (1 << c) != 0)
                .collect(),
        )
    }

    /// Answers one request, changing the module's state as the module would.
    fn handle(&mut self, req: &Request) -> Answer {
        match req.opcode {
            opcode::GET_ID => {
                if !req.data.is_empty() {
                    return Answer::error(status::BAD_LENGTH);
                }
                Answer::ok(self.identity.encode().to_vec())
            }
            opcode::GET_IO => {
                let ch = req.p1 as usize;
                if ch >= self.channels() {
                    return Answer::error(status::BAD_CHANNEL);
                }
                if !self.supports(req.p2) {
                    return Answer::error(status::BAD_P2);
                }
                if !req.data.is_empty() {
                    return Answer::error(status::BAD_LENGTH);
                }
                Answer::ok(self.encode_value(req.p2, self.values[ch]))
            }
            opcode::SET_IO => {
                let ch = req.p1 as usize;
                if ch >= self.channels() {
                    return Answer::error(status::BAD_CHANNEL);
                }
                if !self.writable(ch) {
                    return Answer::error(status::NOT_SUPPORTED);
                }
                if !self.supports(req.p2) {
                    return Answer::error(status::BAD_P2);
                }
                let Some(size) = value_size(req.p2) else {
                    return Answer::error(status::BAD_P2);
                };
                if req.data.len() != size {
                    return Answer::error(status::BAD_LENGTH);
                }
                let v = Self::decode_value(req.p2, &req.data);
                if !self.check_value(req.p2, v) {
                    return Answer::error(status::BAD_VALUE);
                }
                self.values[ch] = v;
                Answer::ok(vec![])
            }
            opcode::GET_IO_GROUP => {
                let Some(chans) = self.group_channels(req) else {
                    return Answer::error(status::BAD_CHANNEL);
                };
                if !self.supports(req.p2) {
                    return Answer::error(status::BAD_P2);
                }
                if !req.data.is_empty() {
                    return Answer::error(status::BAD_LENGTH);
                }
                let mut data = Vec::new();
                for ch in chans {
                    data.extend(self.encode_value(req.p2, self.values[ch]));
                }
                Answer::ok(data)
            }
            opcode::SET_IO_GROUP => {
                let Some(chans) = self.group_channels(req) else {
                    return Answer::error(status::BAD_CHANNEL);
                };
                if chans.iter().any(|&c| !self.writable(c)) {
                    return Answer::error(status::NOT_SUPPORTED);
                }
                if !self.supports(req.p2) {
                    return Answer::error(status::BAD_P2);
                }
                let Some(size) = value_size(req.p2) else {
                    return Answer::error(status::BAD_P2);
                };
                if req.data.len() != size * chans.len() {
                    return Answer::error(status::BAD_LENGTH);
                }
                let decoded: Vec<i64> = req
                    .data
                    .chunks(size)
                    .map(|b| Self::decode_value(req.p2, b))
                    .collect();
                if decoded.iter().any(|&v| !self.check_value(req.p2, v)) {
                    return Answer::error(status::BAD_VALUE);
                }
                for (ch, v) in chans.into_iter().zip(decoded) {
                    self.values[ch] = v;
                }
                Answer::ok(vec![])
            }
            opcode::CALIB_IO => {
                if req.p1 as usize >= self.channels() {
                    return Answer::error(status::BAD_CHANNEL);
                }
                if req.data.len() > 4 {
                    return Answer::error(status::BAD_LENGTH);
                }
                Answer::ok(vec![])
            }
            opcode::GET_PARAM => {
                if req.data.len() != 2 {
                    return Answer::error(status::BAD_LENGTH);
                }
                let addr = u16::from_le_bytes([req.data[0], req.data[1]]);
                Answer::ok(self.params.get(&addr).cloned().unwrap_or_else(|| vec![0]))
            }
            opcode::SET_PARAM => {
                if req.data.len() < 3 {
                    return Answer::error(status::BAD_LENGTH);
                }
                if req.p2 & !0x80 != 0 {
                    return Answer::error(status::BAD_P2);
                }
                let addr = u16::from_le_bytes([req.data[0], req.data[1]]);
                self.params.insert(addr, req.data[2..].to_vec());
                Answer::ok(vec![])
            }
            _ => Answer::error(status::NOT_SUPPORTED),
        }
    }
}

/// Counters a test or the benchmark can read while the emulator runs.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) requests: AtomicU64,
    pub(crate) writes: AtomicU64,
}

/// A module being served on a pty master, shared with whoever started it.
#[derive(Clone)]
pub struct Shared {
    pub(crate) module: Arc<Mutex<Module>>,
    pub(crate) counters: Arc<Counters>,
    pub stop: Arc<AtomicBool>,
}

impl Shared {
    pub fn new(module: Module) -> Shared {
        Shared {
            module: Arc::new(Mutex::new(module)),
            counters: Arc::new(Counters::default()),
            stop: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Serves `shared`'s module on `fd` (a pty master, or any byte stream) until the stop flag is set.
/// Blocking: run it on a thread of its own.
#[cfg(target_os = "linux")]
pub fn serve_fd(fd: OwnedFd, shared: Shared) -> Result<()> {
    let mut file = std::fs::File::from(fd);
    let mut buf: Vec<u8> = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !shared.stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
        let timeout = PollTimeout::try_from(STOP_POLL_INTERVAL).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, timeout) {
            Ok(0) => continue,
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e).context("poll on the emulator's pty"),
        }
        let revents = fds[0].revents().unwrap_or(PollFlags::empty());
        if !revents.contains(PollFlags::POLLIN) {
            // POLLHUP with no data: nobody has the other side open right now.
            std::thread::sleep(HANGUP_RETRY);
            continue;
        }
        let n = match file.read(&mut chunk) {
            Ok(0) => {
                std::thread::sleep(HANGUP_RETRY);
                continue;
            }
            Ok(n) => n,
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                std::thread::sleep(HANGUP_RETRY);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading requests from the emulator's pty"),
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Err(e) = answer_requests(&mut buf, &shared, &mut file) {
            if e.raw_os_error() == Some(libc::EIO) {
                continue;
            }
            return Err(e).context("writing an answer to the emulator's pty");
        }
    }
    Ok(())
}

/// Answers every whole request at the front of `buf` (removing it) on `out`, as the module
/// would: counted, possibly unanswered (`silent`, `ignore_first`) or late (`answer_delay`).
fn answer_requests(
    buf: &mut Vec<u8>,
    shared: &Shared,
    out: &mut impl Write,
) -> std::io::Result<()> {
    while let Ok((req, used)) = Request::parse(buf) {
        buf.drain(..used);
        let seen = shared.counters.requests.fetch_add(1, Ordering::Relaxed);
        if crate::protocol::is_write(req.opcode) {
            shared.counters.writes.fetch_add(1, Ordering::Relaxed);
        }
        let (answer, delay) = {
            let mut module = shared.module.lock().unwrap_or_else(|p| p.into_inner());
            if module.silent || seen < module.ignore_first {
                continue;
            }
            (module.handle(&req), module.answer_delay)
        };
        if !delay.is_zero() {
            std::thread::sleep(delay);
        }
        out.write_all(&answer.encode())?;
    }
    Ok(())
}

/// Serves `shared`'s module to TCP clients on `listener`, one at a time (a module has one
/// line), until the stop flag is set: a module to try `attach` or a program against where there
/// is no pty (Windows). Blocking: run it on a thread of its own.
pub fn serve_tcp(listener: std::net::TcpListener, shared: Shared) -> Result<()> {
    listener
        .set_nonblocking(true)
        .context("setting up the emulator's listener")?;
    while !shared.stop.load(Ordering::Relaxed) {
        let mut client = match listener.accept() {
            Ok((client, _)) => client,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(STOP_POLL_INTERVAL);
                continue;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("accepting a client of the emulated module"),
        };
        let _ = client.set_nonblocking(false);
        let _ = client.set_nodelay(true);
        let _ = client.set_read_timeout(Some(STOP_POLL_INTERVAL));
        let mut buf: Vec<u8> = Vec::with_capacity(512);
        let mut chunk = [0u8; 512];
        while !shared.stop.load(Ordering::Relaxed) {
            match client.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    if answer_requests(&mut buf, &shared, &mut client).is_err() {
                        break;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => break,
            }
        }
    }
    Ok(())
}

/// Parses a module class given by name (`AO4`) or as 4 hex digits (`1100`).
pub(crate) fn parse_class(s: &str) -> Option<u16> {
    crate::protocol::class_by_name(s).or_else(|| {
        if s.len() == 4 {
            u16::from_str_radix(s, 16).ok()
        } else {
            None
        }
    })
}

/// Serial number used when `emulate` is given only a class.
pub fn default_serial(class: u16) -> String {
    format!("{class:04X}1001FA480000")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::status::*;

    fn ao4() -> Module {
        Module::from_usb_serial("11001001FA480000").unwrap()
    }

    fn ai4() -> Module {
        Module::from_usb_serial("01001001FA480001").unwrap()
    }

    fn ask(m: &mut Module, bytes: &[u8]) -> Vec<u8> {
        let (req, used) = Request::parse(bytes).expect("whole frame");
        assert_eq!(used, bytes.len());
        m.handle(&req).encode()
    }

    /// Table of (module, request, answer) straight from the protocol doc and pylucidio's trace.
    #[test]
    fn answers_the_protocol_docs_examples() {
        let mut ai = ai4();
        assert_eq!(
            ask(&mut ai, &[0x46, 0x00, 0x1D, 0x00]),
            vec![0x00, 0x04, 0x5E, 0xCC, 0x1A, 0x00]
        );
        let mut ao = ao4();
        let id = ask(&mut ao, &[0xC0, 0x00, 0x00, 0x00]);
        assert_eq!(&id[..2], &[0x00, 0x10]);
        assert_eq!(
            Identity::decode(&id[2..]).unwrap().usb_serial(),
            "11001001FA480000"
        );
        // setIo(0, 2.5 V) as pylucidio sends it, then read it back in µV and mV.
        assert_eq!(
            ask(&mut ao, &[0x40, 0x00, 0x1D, 0x04, 0xA0, 0x25, 0x26, 0x00]),
            vec![0, 0]
        );
        assert_eq!(
            ask(&mut ao, &[0x46, 0x00, 0x1D, 0x00]),
            vec![0x00, 0x04, 0xA0, 0x25, 0x26, 0x00]
        );
        assert_eq!(
            ask(&mut ao, &[0x46, 0x00, 0x1C, 0x00]),
            [&[0x00u8, 0x02][..], &2500i16.to_le_bytes()].concat()
        );
        // setIoGroup(F,T,T,T) then getIoGroup(all 4).
        let mut set = vec![0x42, 0x0E, 0x1D, 0x0C];
        for v in [1_000_000i32, 2_000_000, 3_000_000] {
            set.extend(v.to_le_bytes());
        }
        assert_eq!(ask(&mut ao, &set), vec![0, 0]);
        let all = ask(&mut ao, &[0x48, 0x0F, 0x1D, 0x00]);
        assert_eq!(&all[..2], &[0x00, 0x10]);
        let vals: Vec<i32> = all[2..]
            .chunks(4)
            .map(|c| i32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(vals, vec![2_500_000, 1_000_000, 2_000_000, 3_000_000]);
        // getParamMode(0)
        assert_eq!(
            ask(&mut ao, &[0xA2, 0x00, 0x00, 0x02, 0x00, 0x11]),
            vec![0x00, 0x01, 0x00]
        );
        assert_eq!(
            ask(&mut ao, &[0xA0, 0x00, 0x80, 0x03, 0x00, 0x11, 0x05]),
            vec![0, 0]
        );
        assert_eq!(
            ask(&mut ao, &[0xA2, 0x00, 0x00, 0x02, 0x00, 0x11]),
            vec![0x00, 0x01, 0x05]
        );
    }

    #[test]
    fn rejects_bad_requests_with_the_right_status() {
        let cases: &[(&[u8], u8)] = &[
            (&[0x46, 0x04, 0x1D, 0x00], BAD_CHANNEL),
            (&[0x46, 0x00, 0x77, 0x00], BAD_P2),
            (&[0x46, 0x00, 0x1D, 0x01, 0x00], BAD_LENGTH),
            (&[0x40, 0x09, 0x1D, 0x04, 0, 0, 0, 0], BAD_CHANNEL),
            (&[0x40, 0x00, 0x1D, 0x02, 0, 0], BAD_LENGTH),
            // 11 V is above the AO4's range.
            (&[0x40, 0x00, 0x1D, 0x04, 0xC0, 0xD8, 0xA7, 0x00], BAD_VALUE),
            (&[0x40, 0x00, 0x00, 0x01, 0x01], BAD_P2),
            (&[0x48, 0x00, 0x1D, 0x00], BAD_CHANNEL),
            (&[0x48, 0x10, 0x1D, 0x00], BAD_CHANNEL),
            (&[0x48, 0x81, 0x01, 0x1D, 0x00], BAD_CHANNEL),
            (&[0x42, 0x03, 0x1D, 0x04, 0, 0, 0, 0], BAD_LENGTH),
            (&[0xC0, 0x00, 0x00, 0x01, 0x00], BAD_LENGTH),
            (&[0xA2, 0x00, 0x00, 0x01, 0x00], BAD_LENGTH),
            (&[0xA0, 0x00, 0x01, 0x03, 0x00, 0x11, 0x05], BAD_P2),
            (&[0x52, 0x07, 0x00, 0x00], BAD_CHANNEL),
            (&[0x99, 0x00, 0x00, 0x00], NOT_SUPPORTED),
        ];
        for (req, want) in cases {
            let mut m = ao4();
            let before = m.values.clone();
            let ans = ask(&mut m, req);
            assert_eq!(ans, vec![*want, 0], "request {req:02X?}");
            assert_eq!(
                m.values, before,
                "a rejected request changed state: {req:02X?}"
            );
        }
        // Inputs cannot be written.
        let mut ai = ai4();
        assert_eq!(
            ask(&mut ai, &[0x40, 0x00, 0x1D, 0x04, 0, 0, 0, 0]),
            vec![NOT_SUPPORTED, 0]
        );
    }

    #[test]
    fn digital_modules_use_logic_values() {
        let mut d = Module::from_usb_serial("40001001000000AA").unwrap();
        assert_eq!(d.channels(), 8);
        assert_eq!(
            ask(&mut d, &[0x40, 0x01, 0x00, 0x01, 0x01]),
            vec![NOT_SUPPORTED, 0]
        );
        assert_eq!(ask(&mut d, &[0x40, 0x05, 0x00, 0x01, 0x01]), vec![0, 0]);
        assert_eq!(ask(&mut d, &[0x46, 0x05, 0x00, 0x00]), vec![0, 1, 1]);
        assert_eq!(
            ask(&mut d, &[0x40, 0x05, 0x00, 0x01, 0x02]),
            vec![BAD_VALUE, 0]
        );
    }

    #[test]
    fn classes_parse_by_name_or_hex() {
        assert_eq!(parse_class("AO4"), Some(0x1100));
        assert_eq!(parse_class("1010"), Some(0x1010));
        assert_eq!(parse_class("nope"), None);
        assert_eq!(default_serial(0x1100), "11001001FA480000");
        assert!(Module::from_usb_serial("xyz").is_none());
    }
}
