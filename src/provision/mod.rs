//! Certificate provisioning from a USB stick: the operator of a screenless Pi plugs in a FAT
//! stick with `lucidgate/request.toml`; lucidgate checks its token, issues the client
//! certificates it asks for (or installs the operator's own PKI), writes them to
//! `lucidgate/out/` and says what it did in `lucidgate/result.toml`.
//!
//! Safe on an unattended device: without a configured token nothing is issued; a request is
//! processed once ([`ledger`]); nothing is issued unless the stick can take the files; files on
//! the stick are replaced, never torn ([`stick`]); certificates that could not be delivered
//! (stick pulled or full mid-way) are revoked at once. The same logic runs from udev (the
//! daemon) and by hand (`lucidgate provision IMAGE-OR-DEVICE`).

mod deliver;
pub mod ledger;
pub(crate) mod request;
pub mod stick;
pub mod token;

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::path::Path;

use anyhow::Result;
use serde::Serialize;
use tracing::{error, info, warn};

use crate::ca::PkiSettings;
use crate::clock::Clock;
use stick::{Disk, Stick, StickError};

/// Where things live on the stick.
const DIR: &str = "lucidgate";
const REQUEST_PATH: &str = "lucidgate/request.toml";
const RESULT_PATH: &str = "lucidgate/result.toml";
const OUT_DIR: &str = "lucidgate/out";
/// Largest file of an `[import]` read from the stick.
const MAX_IMPORT_FILE: usize = 64 * 1024;
/// Bytes a client's files take at most (key, certificate, both), before cluster rounding.
const CLIENT_FILE_BYTES: u64 = 4096;

/// The gateway being provisioned: what a run needs to know about this lucidgate.
pub struct Gateway<'a> {
    pub state_dir: &'a Path,
    pub pki: PkiSettings,
    pub clock: &'a dyn Clock,
    /// `[provision] token_hash`; `None`: provisioning is off.
    pub token_hash: Option<String>,
    pub hostname: String,
    /// The modules served now: serial → port.
    pub modules: BTreeMap<String, u16>,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    /// Everything asked for was done.
    Done,
    /// Not done, by rule: no or wrong token, invalid request, stick full or read-only.
    Refused,
    /// Processed before; nothing reissued.
    Duplicate,
    /// Not done because something broke (the stick was pulled, the PKI failed).
    Failed,
}

impl Status {
    fn event(self) -> &'static str {
        match self {
            Status::Done => "provision-done",
            Status::Refused => "provision-refused",
            Status::Duplicate => "provision-duplicate",
            Status::Failed => "provision-failed",
        }
    }
}

/// One certificate delivered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Issued {
    pub(crate) name: String,
    pub(crate) serial: String,
    pub(crate) modules: Vec<String>,
    pub(crate) read_only: bool,
    pub(crate) not_after: String,
    pub(crate) files: Vec<String>,
}

/// The outcome of a run, and what `result.toml` says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Outcome {
    pub status: Status,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) request: Option<String>,
    pub message: String,
    pub(crate) hostname: String,
    pub(crate) time: String,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) issued: Vec<Issued>,
    /// Serial → port of the modules served now.
    pub(crate) modules: BTreeMap<String, u16>,
    /// The stick, for logs: label and volume id.
    #[serde(skip)]
    pub(crate) stick: String,
    /// Whether result.toml is on the stick.
    #[serde(skip)]
    pub(crate) result_written: bool,
}

/// A stick that is not for lucidgate (no `lucidgate/request.toml`) or not FAT at all.
#[derive(Debug, thiserror::Error)]
pub enum NotProvisioning {
    #[error("{0}")]
    Stick(#[from] StickError),
    #[error("no {REQUEST_PATH} on it (not a provisioning stick)")]
    NoRequest,
    #[error(
        "{path} is mounted at {at}; unmount it first (lucidgate reads and writes the stick itself)"
    )]
    Mounted { path: String, at: String },
    #[error(transparent)]
    Open(#[from] crate::device::access::OpenError),
}

/// Where `path` (a block device) is mounted, if it is: lucidgate must not write a filesystem the
/// kernel has mounted (a desktop's automounter, an operator's `mount`).
fn mounted_at(path: &Path) -> Option<String> {
    let dev = std::fs::canonicalize(path).ok()?;
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (src, at) = (f.next()?, f.next()?);
        (src.starts_with('/') && std::fs::canonicalize(src).ok()? == dev)
            .then(|| at.replace("\\040", " "))
    })
}

/// Runs provisioning on a block device or image file. The device is opened read-write (read-only
/// when it is write-protected: then nothing can be issued, and the journal says why).
pub(crate) fn run_path(path: &Path, dev: &Gateway) -> Result<Outcome, NotProvisioning> {
    if let Some(at) = mounted_at(path) {
        return Err(NotProvisioning::Mounted {
            path: path.display().to_string(),
            at,
        });
    }
    let open = |write: bool| {
        std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
    };
    let (file, writable) = match open(true) {
        Ok(f) => (f, true),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EROFS) | Some(libc::EACCES) | Some(libc::EPERM)
            ) =>
        {
            match open(false) {
                Ok(f) => (f, false),
                Err(_) => {
                    return Err(crate::device::access::explain("cannot open", path, e).into());
                }
            }
        }
        Err(e) => {
            return Err(crate::device::access::explain("cannot open", path, e).into());
        }
    };
    let writable = writable && !is_read_only_block_device(&file);
    run_disk(Disk::new(file), writable, dev)
}

/// Whether `file` is a block device the kernel marks read-only (a stick's lock switch, a
/// read-only loop device): such a device opens for writing, but every write fails.
fn is_read_only_block_device(file: &std::fs::File) -> bool {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileTypeExt;
    let is_block = file
        .metadata()
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if !is_block {
        return false;
    }
    // BLKROGET: _IO(0x12, 94), writes an int.
    const BLKROGET: libc::c_ulong = 0x125E;
    let mut ro: libc::c_int = 0;
    // SAFETY: BLKROGET writes one int through the pointer, which points at `ro`; the fd is open
    // for the duration of the call.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKROGET as _, &mut ro) };
    r == 0 && ro != 0
}

/// The host name a result file names: `[discovery] hostname`, else the machine's.
pub(crate) fn hostname(cfg: &crate::config::Config) -> String {
    if !cfg.discovery.hostname.is_empty() {
        return cfg.discovery.hostname.clone();
    }
    crate::host::name().unwrap_or_else(|| "lucidgate".into())
}

fn now_text(dev: &Gateway) -> String {
    humantime::format_rfc3339_seconds(dev.clock.now()).to_string()
}

/// Runs provisioning on an opened disk (a block device, an image, or a test's wrapper).
pub fn run_disk<D: Read + Write + Seek>(
    disk: D,
    writable: bool,
    dev: &Gateway,
) -> Result<Outcome, NotProvisioning> {
    let stick = Stick::open(disk)?;
    let name = format!("{} ({:08x})", stick.label(), stick.volume_id());
    let text = match stick.read(REQUEST_PATH, request::MAX_REQUEST_BYTES) {
        Ok(Some(t)) => Ok(t),
        Ok(None) => return Err(NotProvisioning::NoRequest),
        Err(e) => Err(e),
    };
    let mut out = Outcome {
        status: Status::Failed,
        request: None,
        message: String::new(),
        hostname: dev.hostname.clone(),
        time: now_text(dev),
        errors: Vec::new(),
        issued: Vec::new(),
        modules: dev.modules.clone(),
        stick: name,
        result_written: false,
    };
    process(&stick, text, writable, dev, &mut out);
    if writable {
        match write_result(&stick, &out) {
            Ok(()) => out.result_written = true,
            Err(e) => out
                .errors
                .push(format!("writing {RESULT_PATH} failed: {e}")),
        }
        if let Err(e) = stick.close() {
            out.errors.push(format!("unmounting the stick: {e}"));
        }
    }
    log(&out);
    Ok(out)
}

fn refuse(out: &mut Outcome, message: String) {
    out.status = Status::Refused;
    out.message = message;
}

fn process<D: Read + Write + Seek>(
    stick: &Stick<D>,
    text: Result<Vec<u8>, StickError>,
    writable: bool,
    dev: &Gateway,
    out: &mut Outcome,
) {
    let bytes = match text {
        Ok(b) => b,
        Err(e) => return refuse(out, format!("cannot read the request: {e}")),
    };
    let Ok(text) = String::from_utf8(bytes.clone()) else {
        return refuse(out, format!("{REQUEST_PATH} is not UTF-8 text"));
    };
    let req = match request::parse(&text, REQUEST_PATH) {
        Ok(r) => r,
        Err(errors) => {
            out.errors = errors;
            return refuse(out, "the request is not valid; nothing was done".into());
        }
    };
    let id = req.id.clone().unwrap_or_else(|| {
        let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
        format!(
            "sha256-{}",
            d.as_ref()[..8]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        )
    });
    out.request = Some(id.clone());
    // The token before anything else is looked at or written.
    let Some(hash) = &dev.token_hash else {
        return refuse(
            out,
            format!(
                "provisioning is off on {}: no token is configured there (run `lucidgate provision set-token` on the device); nothing was done",
                dev.hostname
            ),
        );
    };
    match &req.token {
        None => return refuse(out, "the request has no token; nothing was done".into()),
        Some(t) if !token::verify(hash, t) => {
            return refuse(
                out,
                "wrong token: it does not match this device's provisioning token; nothing was done"
                    .into(),
            );
        }
        Some(_) => {}
    }
    match ledger::find(dev.state_dir, &id) {
        Ok(Some(p)) => {
            out.status = Status::Duplicate;
            out.message = format!(
                "request {id} was processed on {} from stick {} ({}); nothing was reissued (give the request a new id to issue again)",
                p.at,
                p.stick,
                p.did.join(", ")
            );
            return;
        }
        Ok(None) => {}
        Err(e) => {
            out.message = format!("cannot read the provisioning ledger: {e:#}; nothing was done");
            return;
        }
    }
    if !writable {
        return refuse(
            out,
            "the stick is read-only (write-protect switch?); nothing was issued".into(),
        );
    }
    // Room for every file (each takes at least a cluster), and the result file.
    let files = req.client.len() as u64 * 3 + 2;
    let per_file = CLIENT_FILE_BYTES.div_ceil(stick.cluster_size()).max(1) * stick.cluster_size();
    let need = files * per_file + 2 * stick.cluster_size();
    match stick.free_bytes() {
        Ok(free) if free < need => {
            return refuse(
                out,
                format!(
                    "the stick is full: about {} KiB are needed, {} KiB are free; nothing was issued",
                    need.div_ceil(1024),
                    free / 1024
                ),
            );
        }
        Ok(_) => {}
        Err(e) => {
            out.message = format!("cannot read the stick's free space: {e}; nothing was done");
            return;
        }
    }
    // Prove the stick takes writes before anything is issued.
    out.message = "in progress (if this stays, the stick was pulled: plug it in again)".into();
    if let Err(e) = stick
        .create_dirs(OUT_DIR)
        .and_then(|()| write_result(stick, out))
    {
        out.message = format!("the stick does not take writes ({e}); nothing was issued");
        return;
    }
    let did = match &req.import {
        Some(imp) => deliver::import(stick, imp, dev, out),
        None => deliver::issue(stick, &req.client, dev, out),
    };
    let Some(did) = did else { return };
    let entry = ledger::Processed {
        id: id.clone(),
        at: out.time.clone(),
        stick: out.stick.clone(),
        did,
    };
    if let Err(e) = ledger::record(dev.state_dir, entry) {
        // Delivered but not recorded: a replug would issue again. Say so.
        out.errors.push(format!(
            "recording the request in the ledger failed: {e:#}; replugging this stick would issue again"
        ));
    }
    out.status = Status::Done;
}

fn write_result<D: Read + Write + Seek>(stick: &Stick<D>, out: &Outcome) -> Result<(), StickError> {
    let body = toml::to_string(out).unwrap_or_else(|e| format!("# encoding failed: {e}\n"));
    let text = format!(
        "# Written by lucidgate {} on {} at {}.\n{body}",
        env!("CARGO_PKG_VERSION"),
        out.hostname,
        out.time
    );
    stick.create_dirs(DIR)?;
    stick.write_replace(RESULT_PATH, text.as_bytes())
}

fn log(out: &Outcome) {
    let names: Vec<&str> = out.issued.iter().map(|i| i.name.as_str()).collect();
    let request = out.request.as_deref().unwrap_or("");
    let detail = if out.errors.is_empty() {
        String::new()
    } else {
        format!(" [{}]", out.errors.join("; "))
    };
    let written = if out.result_written {
        ""
    } else {
        " (no result file could be written)"
    };
    match out.status {
        Status::Done => info!(
            event = out.status.event(),
            stick = %out.stick,
            request_id = request,
            issued = names.join(","),
            "provisioning stick {}: request {request}: {}{written}{detail}",
            out.stick, out.message
        ),
        Status::Refused | Status::Duplicate => warn!(
            event = out.status.event(),
            stick = %out.stick,
            request_id = request,
            "provisioning stick {}: request {request}: {}{written}{detail}",
            out.stick, out.message
        ),
        Status::Failed => error!(
            event = out.status.event(),
            stick = %out.stick,
            request_id = request,
            "provisioning stick {}: request {request}: {}{written}{detail}",
            out.stick, out.message
        ),
    }
}
