//! Who is on the serial port: the GetId exchange a relay makes when it starts, before any client
//! is served, and what `status` and the journal say about it.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

use super::module::{Exchanged, exchange};
use crate::protocol::{Answer, Identity, class_name, opcode, status};

/// What GetId said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleIdentity {
    /// Class name (AO4, DI4, ...) or its number in hex when unknown.
    pub class: String,
    pub class_id: u16,
    pub type_id: u16,
    pub firmware: u16,
    pub hardware: u8,
    /// The serial as GetId reports it, in the USB serial's form (class, type, number).
    pub serial: String,
}

impl ModuleIdentity {
    fn from(id: &Identity) -> ModuleIdentity {
        ModuleIdentity {
            class: class_name(id.class)
                .map(str::to_string)
                .unwrap_or_else(|| format!("0x{:04X}", id.class)),
            class_id: id.class,
            type_id: id.type_,
            firmware: id.fw_revision,
            hardware: id.hw_revision,
            serial: id.usb_serial(),
        }
    }
}

/// The outcome of identifying a module.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) enum IdentityState {
    /// Not asked yet.
    #[default]
    Pending,
    /// GetId answered with the serial udev (or the config) gave.
    Confirmed(ModuleIdentity),
    /// GetId answered, with another serial (served anyway).
    Mismatch(ModuleIdentity),
    /// No usable answer (served anyway): why.
    Failed(String),
}

impl IdentityState {
    /// `pending`, `ok`, `mismatch` or `failed`.
    pub(crate) fn label(&self) -> &'static str {
        match self {
            IdentityState::Pending => "pending",
            IdentityState::Confirmed(_) => "ok",
            IdentityState::Mismatch(_) => "mismatch",
            IdentityState::Failed(_) => "failed",
        }
    }

    pub(crate) fn identity(&self) -> Option<&ModuleIdentity> {
        match self {
            IdentityState::Confirmed(i) | IdentityState::Mismatch(i) => Some(i),
            _ => None,
        }
    }

    /// What is wrong, for status.
    pub(crate) fn problem(&self, usb_serial: &str) -> Option<String> {
        match self {
            IdentityState::Mismatch(i) => Some(format!(
                "GetId reports serial {}, udev/config says {usb_serial}",
                i.serial
            )),
            IdentityState::Failed(why) => Some(why.clone()),
            _ => None,
        }
    }
}

/// The GetId request.
pub(crate) const GET_ID: [u8; 4] = [opcode::GET_ID, 0, 0, 0];

/// A module that did not identify itself (still starting up, busy, briefly confused) is asked
/// again while no client uses it: first after this long, then twice as long each time...
pub(crate) const RETRY_FIRST: Duration = Duration::from_secs(2);
/// ...up to this long between tries, for as long as the relay runs.
const RETRY_MAX: Duration = Duration::from_secs(60);

/// When to ask a module that has not identified itself again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Retry {
    pub(crate) at: tokio::time::Instant,
    wait: Duration,
    /// Tries so far, the first at relay start included.
    pub(crate) tries: u32,
}

impl Retry {
    /// After the first try failed.
    pub(crate) fn first() -> Retry {
        Retry {
            at: tokio::time::Instant::now() + RETRY_FIRST,
            wait: RETRY_FIRST,
            tries: 1,
        }
    }

    /// After one more try failed.
    pub(crate) fn next(self) -> Retry {
        let wait = (self.wait * 2).min(RETRY_MAX);
        Retry {
            at: tokio::time::Instant::now() + wait,
            wait,
            tries: self.tries + 1,
        }
    }
}

/// Asks the module on `dev` for its identity, waiting up to `timeout`. `Err` only when the
/// port itself fails (the module is gone); a silent or confused module is `Ok(Failed)`.
pub(crate) async fn ask_identity<D>(
    dev: &mut D,
    usb_serial: &str,
    timeout: Duration,
    stop: &CancellationToken,
    unplugged: &CancellationToken,
) -> std::io::Result<IdentityState>
where
    D: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let got = exchange(dev, &GET_ID, timeout, stop, unplugged).await?;
    Ok(judge(got, usb_serial, timeout))
}

/// What the outcome of a GetId exchange says about the module.
pub(crate) fn judge(got: Exchanged, usb_serial: &str, timeout: Duration) -> IdentityState {
    let raw = match got {
        Exchanged::Answer(raw) => raw,
        Exchanged::Timeout { partial } => {
            return IdentityState::Failed(format!(
                "no answer to GetId within {} ms{}",
                timeout.as_millis(),
                if partial == 0 {
                    String::new()
                } else {
                    format!(" ({partial} bytes of an incomplete answer)")
                }
            ));
        }
    };
    let Ok((answer, _)) = Answer::parse(&raw) else {
        return IdentityState::Failed("GetId answer is incomplete".into());
    };
    if answer.status != status::OK {
        return IdentityState::Failed(format!(
            "GetId answered with status 0x{:02X}",
            answer.status
        ));
    }
    let Some(id) = Identity::decode(&answer.data) else {
        return IdentityState::Failed(format!(
            "GetId answered with {} data bytes (expected 16)",
            answer.data.len()
        ));
    };
    let ident = ModuleIdentity::from(&id);
    // A module without a USB serial is named after its USB path: nothing to compare.
    if usb_serial.starts_with("path-") || ident.serial.eq_ignore_ascii_case(usb_serial) {
        IdentityState::Confirmed(ident)
    } else {
        IdentityState::Mismatch(ident)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn run(answer: Option<&[u8]>, serial: &str) -> IdentityState {
        let (mut far, mut near) = tokio::io::duplex(256);
        let module = async {
            let mut req = [0u8; 4];
            far.read_exact(&mut req).await.unwrap();
            assert_eq!(req, [0xC0, 0, 0, 0]);
            if let Some(a) = answer {
                far.write_all(a).await.unwrap();
            }
            far
        };
        let t = Duration::from_millis(1000);
        let go = CancellationToken::new();
        let (state, _far) = tokio::join!(ask_identity(&mut near, serial, t, &go, &go), module);
        state.unwrap()
    }

    fn get_id(serial: &str) -> Vec<u8> {
        let m = crate::emulator::Module::from_usb_serial(serial).unwrap();
        let mut a = vec![0x00, 0x10];
        a.extend(m.identity.encode());
        a
    }

    #[tokio::test(start_paused = true)]
    async fn every_outcome() {
        let ao4 = "11001001FA480000";
        let s = run(Some(&get_id(ao4)), ao4).await;
        assert_eq!(s.label(), "ok");
        assert_eq!(s.identity().unwrap().class, "AO4");
        let s = run(Some(&get_id(ao4)), "11001001FA480001").await;
        assert_eq!(s.label(), "mismatch");
        assert!(s.problem("11001001FA480001").unwrap().contains(ao4));
        assert_eq!(run(Some(&get_id(ao4)), "path-pci-0000").await.label(), "ok");
        let s = run(None, ao4).await;
        assert!(s.problem(ao4).unwrap().contains("no answer"), "{s:?}");
        let s = run(Some(&[0xA0, 0x00]), ao4).await;
        assert!(s.problem(ao4).unwrap().contains("0xA0"), "{s:?}");
        let s = run(Some(&[0x00, 0x02, 1, 2]), ao4).await;
        assert!(s.problem(ao4).unwrap().contains("2 data bytes"), "{s:?}");
    }
}
