//! LucidControl frames: requests (`OPC P1 [P1a] P2 LEN DATA`) and answers (`STATUS LEN DATA`).
//!
//! Parsing is split the way mini-redis splits it: [`Request::check`] says whether a whole frame is
//! buffered (and how long it is) without allocating, [`Request::parse`] turns it into a value.
//! The module emulator, the protocol-aware relay modes and the tests all share this module, so the
//! framing rules live in exactly one place. Facts: `shared/lucidcontrol-protocol.md`.

use std::fmt;

/// Opcodes of the LucidControl protocol.
pub(crate) mod opcode {
    pub(crate) const SET_IO: u8 = 0x40;
    pub(crate) const SET_IO_GROUP: u8 = 0x42;
    pub(crate) const GET_IO: u8 = 0x46;
    pub(crate) const GET_IO_GROUP: u8 = 0x48;
    pub(crate) const CALIB_IO: u8 = 0x52;
    pub(crate) const SET_PARAM: u8 = 0xA0;
    pub(crate) const GET_PARAM: u8 = 0xA2;
    pub(crate) const GET_ID: u8 = 0xC0;
}

/// Status codes of an answer (those lucidgate uses; the protocol also defines 0xB2 bad P1,
/// 0xBA bad parameter, 0xC0 bad data, 0xD0 execution error and 0xFF internal error).
pub(crate) mod status {
    pub(crate) const OK: u8 = 0x00;
    pub(crate) const NOT_SUPPORTED: u8 = 0xA0;
    pub(crate) const BAD_LENGTH: u8 = 0xB0;
    pub(crate) const BAD_P2: u8 = 0xB4;
    pub(crate) const BAD_VALUE: u8 = 0xB6;
    pub(crate) const BAD_CHANNEL: u8 = 0xB8;
}

/// Value types (P2 of GetIo/SetIo).
pub(crate) mod value_type {
    pub(crate) const LOGIC: u8 = 0x00;
    pub(crate) const COUNTER: u8 = 0x0A;
    pub(crate) const RAW: u8 = 0x10;
    pub(crate) const VOLTAGE_MV: u8 = 0x1C;
    pub(crate) const VOLTAGE_UV: u8 = 0x1D;
    pub(crate) const CURRENT_UA: u8 = 0x23;
    pub(crate) const TEMPERATURE: u8 = 0x40;
    pub(crate) const TEMPERATURE_2: u8 = 0x41;
    pub(crate) const RESISTANCE: u8 = 0x50;
}

/// Length of the GetId answer data.
const GET_ID_DATA_LEN: usize = 16;
/// Bit in P1 of the group commands that announces the extended channel mask byte P1a.
const GROUP_EXTENDED_MASK_BIT: u8 = 0x80;

/// Whether an opcode changes the module's state (used for read-only clients).
pub(crate) fn is_write(opc: u8) -> bool {
    matches!(
        opc,
        opcode::SET_IO | opcode::SET_IO_GROUP | opcode::CALIB_IO | opcode::SET_PARAM
    )
}

/// Human name of an opcode, for logs.
pub(crate) fn opcode_name(opc: u8) -> &'static str {
    match opc {
        opcode::SET_IO => "SetIo",
        opcode::SET_IO_GROUP => "SetIoGroup",
        opcode::GET_IO => "GetIo",
        opcode::GET_IO_GROUP => "GetIoGroup",
        opcode::CALIB_IO => "CalibIo",
        opcode::SET_PARAM => "SetParam",
        opcode::GET_PARAM => "GetParam",
        opcode::GET_ID => "GetId",
        _ => "unknown",
    }
}

/// Whether an opcode is one the protocol defines: a frame that starts with anything else means
/// the sender is not speaking the protocol (or lost track of the framing).
pub(crate) fn is_known_opcode(opc: u8) -> bool {
    matches!(
        opc,
        opcode::SET_IO
            | opcode::SET_IO_GROUP
            | opcode::GET_IO
            | opcode::GET_IO_GROUP
            | opcode::CALIB_IO
            | opcode::SET_PARAM
            | opcode::GET_PARAM
            | opcode::GET_ID
    )
}

/// Longest request frame: 5 header bytes and 255 data bytes.
pub(crate) const MAX_REQUEST_LEN: usize = 5 + 255;
/// Longest answer frame: status, length and 255 data bytes.
pub(crate) const MAX_ANSWER_LEN: usize = 2 + 255;

/// Header length of a request that starts with `opc` and `p1`.
pub(crate) fn request_header_len(opc: u8, p1: u8) -> usize {
    if is_group(opc) && p1 & GROUP_EXTENDED_MASK_BIT != 0 {
        5
    } else {
        4
    }
}

fn is_group(opc: u8) -> bool {
    opc == opcode::SET_IO_GROUP || opc == opcode::GET_IO_GROUP
}

/// Outcome of [`Request::check`] / [`Answer::check`] on a buffer that does not hold a whole frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Incomplete {
    /// At least this many more bytes are needed before the frame length is known or complete.
    Needs(usize),
}

/// One request frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) opcode: u8,
    pub(crate) p1: u8,
    /// Extended channel mask of the group commands when bit 7 of `p1` is set.
    pub(crate) p1a: Option<u8>,
    pub(crate) p2: u8,
    pub(crate) data: Vec<u8>,
}

impl Request {
    /// A request without the extended mask byte.
    #[cfg(test)]
    fn new(opcode: u8, p1: u8, p2: u8, data: impl Into<Vec<u8>>) -> Self {
        Request {
            opcode,
            p1,
            p1a: None,
            p2,
            data: data.into(),
        }
    }

    fn header_len(opc: u8, p1: u8) -> usize {
        request_header_len(opc, p1)
    }

    /// Returns the length of the whole frame at the start of `buf`, or how much more is needed.
    pub(crate) fn check(buf: &[u8]) -> Result<usize, Incomplete> {
        if buf.len() < 2 {
            return Err(Incomplete::Needs(4 - buf.len()));
        }
        let header = Self::header_len(buf[0], buf[1]);
        if buf.len() < header {
            return Err(Incomplete::Needs(header - buf.len()));
        }
        let total = header + buf[header - 1] as usize;
        if buf.len() < total {
            return Err(Incomplete::Needs(total - buf.len()));
        }
        Ok(total)
    }

    /// Parses the frame at the start of `buf`; returns it and the number of bytes it used.
    pub(crate) fn parse(buf: &[u8]) -> Result<(Request, usize), Incomplete> {
        let total = Self::check(buf)?;
        let header = Self::header_len(buf[0], buf[1]);
        let (p1a, p2) = if header == 5 {
            (Some(buf[2]), buf[3])
        } else {
            (None, buf[2])
        };
        Ok((
            Request {
                opcode: buf[0],
                p1: buf[1],
                p1a,
                p2,
                data: buf[header..total].to_vec(),
            },
            total,
        ))
    }

    /// The frame's bytes. Data longer than 255 bytes cannot be framed and is cut (callers build
    /// requests from parsed frames or from small literals).
    pub(crate) fn encode(&self) -> Vec<u8> {
        let len = self.data.len().min(u8::MAX as usize);
        let mut out = Vec::with_capacity(5 + len);
        out.push(self.opcode);
        out.push(self.p1);
        if let Some(p1a) = self.p1a {
            out.push(p1a);
        }
        out.push(self.p2);
        out.push(len as u8);
        out.extend_from_slice(&self.data[..len]);
        out
    }

    /// The channel mask of a group command (P1 without the extension bit, P1a above it).
    pub(crate) fn group_mask(&self) -> u16 {
        let low = (self.p1 & !GROUP_EXTENDED_MASK_BIT) as u16;
        match self.p1a {
            Some(high) => low | ((high as u16) << 7),
            None => low,
        }
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", opcode_name(self.opcode))?;
        write!(f, " [")?;
        for (i, b) in self.encode().iter().enumerate() {
            if i > 0 {
                write!(f, " ")?;
            }
            write!(f, "{b:02X}")?;
        }
        write!(f, "]")
    }
}

/// One answer frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub(crate) status: u8,
    pub(crate) data: Vec<u8>,
}

impl Answer {
    pub(crate) fn ok(data: impl Into<Vec<u8>>) -> Self {
        Answer {
            status: status::OK,
            data: data.into(),
        }
    }

    pub(crate) fn error(status: u8) -> Self {
        Answer {
            status,
            data: Vec::new(),
        }
    }

    /// Returns the length of the whole answer at the start of `buf`, or how much more is needed.
    pub fn check(buf: &[u8]) -> Result<usize, Incomplete> {
        if buf.len() < 2 {
            return Err(Incomplete::Needs(2 - buf.len()));
        }
        let total = 2 + buf[1] as usize;
        if buf.len() < total {
            return Err(Incomplete::Needs(total - buf.len()));
        }
        Ok(total)
    }

    pub(crate) fn parse(buf: &[u8]) -> Result<(Answer, usize), Incomplete> {
        let total = Self::check(buf)?;
        Ok((
            Answer {
                status: buf[0],
                data: buf[2..total].to_vec(),
            },
            total,
        ))
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let len = self.data.len().min(u8::MAX as usize);
        let mut out = Vec::with_capacity(2 + len);
        out.push(self.status);
        out.push(len as u8);
        out.extend_from_slice(&self.data[..len]);
        out
    }
}

/// The decoded data of a GetId answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub(crate) fw_revision: u16,
    pub(crate) hw_revision: u8,
    pub(crate) class: u16,
    pub(crate) type_: u16,
    pub(crate) serial: u32,
}

impl Identity {
    /// Decodes GetId answer data (16 bytes; the last 5 are reserved).
    pub(crate) fn decode(data: &[u8]) -> Option<Identity> {
        if data.len() < 11 {
            return None;
        }
        Some(Identity {
            fw_revision: u16::from_le_bytes([data[0], data[1]]),
            hw_revision: data[2],
            class: u16::from_le_bytes([data[3], data[4]]),
            type_: u16::from_le_bytes([data[5], data[6]]),
            serial: u32::from_le_bytes([data[7], data[8], data[9], data[10]]),
        })
    }

    pub fn encode(&self) -> [u8; GET_ID_DATA_LEN] {
        let mut out = [0u8; GET_ID_DATA_LEN];
        out[0..2].copy_from_slice(&self.fw_revision.to_le_bytes());
        out[2] = self.hw_revision;
        out[3..5].copy_from_slice(&self.class.to_le_bytes());
        out[5..7].copy_from_slice(&self.type_.to_le_bytes());
        out[7..11].copy_from_slice(&self.serial.to_le_bytes());
        out
    }

    /// The 16-hex-digit USB serial string this identity corresponds to (class, type, serial).
    pub(crate) fn usb_serial(&self) -> String {
        format!("{:04X}{:04X}{:08X}", self.class, self.type_, self.serial)
    }
}

/// Module classes and their names.
pub(crate) const MODULE_CLASSES: &[(&str, u16)] = &[
    ("DI4", 0x0000),
    ("DI8", 0x0010),
    ("AI4", 0x0100),
    ("AI8", 0x0110),
    ("RI4", 0x0A00),
    ("RI8", 0x0A10),
    ("DO4", 0x1000),
    ("DO8", 0x1010),
    ("AO4", 0x1100),
    ("AO8", 0x1110),
    ("DI4DO4", 0x4000),
];

pub(crate) fn class_name(class: u16) -> Option<&'static str> {
    MODULE_CLASSES
        .iter()
        .find(|(_, c)| *c == class)
        .map(|(n, _)| *n)
}

pub(crate) fn class_by_name(name: &str) -> Option<u16> {
    MODULE_CLASSES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, c)| *c)
}

/// Size in bytes of one value of a value type, or `None` for a type the protocol doc does not list.
pub(crate) fn value_size(value_type: u8) -> Option<usize> {
    match value_type {
        value_type::LOGIC => Some(1),
        value_type::VOLTAGE_MV => Some(2),
        value_type::COUNTER
        | value_type::RAW
        | value_type::VOLTAGE_UV
        | value_type::CURRENT_UA
        | value_type::TEMPERATURE
        | value_type::TEMPERATURE_2
        | value_type::RESISTANCE => Some(4),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_io_request_round_trips() {
        let bytes = [0x46, 0x00, 0x1D, 0x00];
        let (req, used) = Request::parse(&bytes).unwrap();
        assert_eq!(used, 4);
        assert_eq!(req, Request::new(opcode::GET_IO, 0, 0x1D, vec![]));
        assert_eq!(req.encode(), bytes);
    }

    #[test]
    fn set_io_with_data() {
        let bytes = [0x40, 0x00, 0x1D, 0x04, 0xA0, 0x25, 0x26, 0x00, 0x99];
        let (req, used) = Request::parse(&bytes).unwrap();
        assert_eq!(used, 8);
        assert_eq!(req.data, vec![0xA0, 0x25, 0x26, 0x00]);
    }

    #[test]
    fn group_extended_mask_byte() {
        // P1 bit 7 set: P1a follows, header is 5 bytes.
        let bytes = [0x48, 0x81, 0x01, 0x1D, 0x00];
        assert_eq!(Request::check(&bytes), Ok(5));
        let (req, _) = Request::parse(&bytes).unwrap();
        assert_eq!(req.p1a, Some(0x01));
        assert_eq!(req.p2, 0x1D);
        assert_eq!(req.group_mask(), 0x81);
        assert_eq!(req.encode(), bytes);
        // Not a group command: bit 7 of P1 means nothing.
        assert_eq!(Request::check(&[0x46, 0x81, 0x1D, 0x00]), Ok(4));
    }

    #[test]
    fn incomplete_frames_ask_for_more() {
        assert_eq!(Request::check(&[]), Err(Incomplete::Needs(4)));
        assert_eq!(
            Request::check(&[0x46, 0x00, 0x1D]),
            Err(Incomplete::Needs(1))
        );
        assert_eq!(
            Request::check(&[0x40, 0x00, 0x1D, 0x04, 0x01]),
            Err(Incomplete::Needs(3))
        );
        assert_eq!(
            Request::check(&[0x42, 0x80, 0x01]),
            Err(Incomplete::Needs(2))
        );
        assert_eq!(Answer::check(&[0x00]), Err(Incomplete::Needs(1)));
        assert_eq!(
            Answer::check(&[0x00, 0x04, 1, 2]),
            Err(Incomplete::Needs(2))
        );
    }

    #[test]
    fn every_byte_string_parses_or_asks_for_more() {
        // Exhaustive over short inputs: never panics, and a reported frame fits in the buffer.
        for len in 0..6usize {
            let mut buf = vec![0u8; len];
            for seed in 0..4096u32 {
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = (seed.wrapping_mul(2654435761).rotate_left(i as u32 * 7) >> 3) as u8;
                }
                if let Ok(n) = Request::check(&buf) {
                    assert!(n <= buf.len());
                    let (req, used) = Request::parse(&buf).unwrap();
                    assert_eq!(used, n);
                    assert_eq!(req.encode(), &buf[..n]);
                }
                if let Ok(n) = Answer::check(&buf) {
                    assert!(n <= buf.len());
                }
            }
        }
    }

    #[test]
    fn identity_encodes_the_usb_serial() {
        let id = Identity {
            fw_revision: 0x0102,
            hw_revision: 3,
            class: 0x1100,
            type_: 0x1001,
            serial: 0xFA48_0000,
        };
        assert_eq!(id.usb_serial(), "11001001FA480000");
        assert_eq!(Identity::decode(&id.encode()), Some(id));
        assert_eq!(class_name(0x1100), Some("AO4"));
        assert_eq!(class_by_name("di4do4"), Some(0x4000));
    }

    #[test]
    fn answer_round_trip() {
        let bytes = [0x00, 0x04, 0x5E, 0xCC, 0x1A, 0x00];
        let (ans, used) = Answer::parse(&bytes).unwrap();
        assert_eq!(used, 6);
        assert_eq!(ans.data, vec![0x5E, 0xCC, 0x1A, 0x00]);
        assert_eq!(ans.encode(), bytes);
    }
}
