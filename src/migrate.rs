//! Importing a ser2net set-up: ser2net 4.x YAML and the 3.x `ser2net.conf` line format become
//! `[modules."SERIAL"] port = N` overrides, so existing clients keep their ports.
//!
//! ser2net's YAML repeats the `connection:` key, which generic YAML deserialisers reject or merge,
//! so the file is read as an event stream into a small tree that keeps every key and its line.
//! Every option lucidgate does not carry over is reported with its line, never dropped silently.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// One ser2net connection, as far as lucidgate cares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Connection {
    /// Line of the connection in the file.
    pub(crate) line: usize,
    pub(crate) port: u16,
    pub(crate) device: PathBuf,
    pub(crate) baud: Option<u32>,
    pub(crate) enabled: bool,
    pub(crate) kick_old: bool,
    /// What was not carried over, with why (line-numbered).
    pub(crate) notes: Vec<String>,
}

/// A YAML node that keeps duplicate keys and lines.
#[derive(Debug, Clone)]
enum Node {
    Scalar(String, usize),
    Map(Vec<(String, Node)>, usize),
    Seq(Vec<Node>, usize),
    Alias(usize),
}

impl Node {
    fn line(&self) -> usize {
        match self {
            Node::Scalar(_, l) | Node::Map(_, l) | Node::Seq(_, l) | Node::Alias(l) => *l,
        }
    }
    fn text(&self) -> Option<&str> {
        match self {
            Node::Scalar(s, _) => Some(s),
            _ => None,
        }
    }
}

#[derive(Default)]
struct TreeBuilder {
    stack: Vec<(Node, Option<String>)>,
    docs: Vec<Node>,
}

impl TreeBuilder {
    fn push_value(&mut self, node: Node) {
        match self.stack.last_mut() {
            None => self.docs.push(node),
            Some((Node::Seq(items, _), _)) => items.push(node),
            Some((Node::Map(entries, _), key)) => match key.take() {
                None => {
                    // A key: only scalar keys make sense in ser2net files.
                    *key = Some(node.text().unwrap_or("").to_string());
                }
                Some(k) => entries.push((k, node)),
            },
            Some(_) => {}
        }
    }
}

impl MarkedEventReceiver for TreeBuilder {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let line = mark.line();
        match ev {
            Event::Scalar(s, ..) => self.push_value(Node::Scalar(s, line)),
            Event::Alias(_) => self.push_value(Node::Alias(line)),
            Event::MappingStart(..) => self.stack.push((Node::Map(Vec::new(), line), None)),
            Event::SequenceStart(..) => self.stack.push((Node::Seq(Vec::new(), line), None)),
            Event::MappingEnd | Event::SequenceEnd => {
                if let Some((node, _)) = self.stack.pop() {
                    self.push_value(node);
                }
            }
            _ => {}
        }
    }
}

/// A ser2net file that cannot be read, with where.
#[derive(Debug, thiserror::Error)]
#[error("{origin}, line {line}: {message}")]
pub(crate) struct ImportError {
    pub(crate) origin: String,
    pub(crate) line: usize,
    pub(crate) message: String,
}

/// Reads a ser2net config (4.x YAML or 3.x conf, told apart by content).
pub(crate) fn parse(text: &str, origin: &str) -> Result<Vec<Connection>, ImportError> {
    let looks_yaml = text.trim_start().starts_with("%YAML")
        || text
            .lines()
            .any(|l| l.trim_start().starts_with("connection:"));
    if looks_yaml {
        parse_yaml(text, origin)
    } else {
        parse_conf(text, origin)
    }
}

fn err(origin: &str, line: usize, message: impl Into<String>) -> ImportError {
    ImportError {
        origin: origin.to_string(),
        line,
        message: message.into(),
    }
}

fn parse_yaml(text: &str, origin: &str) -> Result<Vec<Connection>, ImportError> {
    let mut tb = TreeBuilder::default();
    Parser::new_from_str(text)
        .load(&mut tb, true)
        .map_err(|e| {
            err(
                origin,
                e.marker().line(),
                format!("not valid YAML: {}", e.info()),
            )
        })?;
    let mut out = Vec::new();
    for doc in &tb.docs {
        let Node::Map(entries, _) = doc else { continue };
        for (key, value) in entries {
            match key.as_str() {
                "connection" => out.push(yaml_connection(value, origin)?),
                "define" | "default" => {}
                other => {
                    return Err(err(
                        origin,
                        value.line(),
                        format!(
                            "unknown top-level key `{other}` (expected connection, define or default)"
                        ),
                    ));
                }
            }
        }
    }
    Ok(out)
}

fn yaml_connection(node: &Node, origin: &str) -> Result<Connection, ImportError> {
    let Node::Map(entries, line) = node else {
        return Err(err(
            origin,
            node.line(),
            "a connection must be a mapping with accepter and connector",
        ));
    };
    let line = *line;
    let get = |k: &str| entries.iter().find(|(key, _)| key == k).map(|(_, v)| v);
    let mut notes = Vec::new();
    let accepter = get("accepter")
        .and_then(Node::text)
        .ok_or_else(|| err(origin, line, "connection without `accepter: tcp,PORT`"))?;
    let accepter_line = get("accepter").map(Node::line).unwrap_or(line);
    let port = parse_accepter(accepter, accepter_line, &mut notes)
        .map_err(|m| err(origin, accepter_line, m))?;
    let connector = get("connector").and_then(Node::text).ok_or_else(|| {
        err(
            origin,
            line,
            "connection without `connector: serialdev,/dev/...`",
        )
    })?;
    let connector_line = get("connector").map(Node::line).unwrap_or(line);
    let (device, baud) = parse_connector(connector, connector_line, &mut notes)
        .map_err(|m| err(origin, connector_line, m))?;
    let enabled = !matches!(
        get("enable").and_then(Node::text),
        Some("off" | "false" | "no")
    );
    let mut kick_old = false;
    for (key, value) in entries {
        match key.as_str() {
            "accepter" | "connector" | "enable" => {}
            "options" => match value {
                Node::Map(opts, _) => {
                    for (k, v) in opts {
                        option(
                            k,
                            v.text().unwrap_or("(alias)"),
                            v.line(),
                            &mut kick_old,
                            &mut notes,
                        );
                    }
                }
                other => notes.push(format!(
                    "line {}: `options` is not a mapping; ignored",
                    other.line()
                )),
            },
            other => notes.push(format!(
                "line {}: connection key `{other}` is not carried over",
                value.line()
            )),
        }
    }
    Ok(Connection {
        line,
        port,
        device,
        baud,
        enabled,
        kick_old,
        notes,
    })
}

fn option(key: &str, value: &str, line: usize, kick_old: &mut bool, notes: &mut Vec<String>) {
    match key.to_ascii_lowercase().as_str() {
        "kickolduser" => *kick_old = matches!(value, "true" | "on" | "yes" | ""),
        k if k.starts_with("chardelay") => notes.push(format!(
            "line {line}: `{key}` dropped: lucidgate relays bytes at once, it has no character delay"
        )),
        "max-connections" if value == "1" => {}
        "local" => {}
        _ => notes.push(format!(
            "line {line}: option `{key}: {value}` is not supported by lucidgate and was not carried over"
        )),
    }
}

fn parse_accepter(accepter: &str, line: usize, notes: &mut Vec<String>) -> Result<u16, String> {
    let parts: Vec<&str> = accepter.split(',').map(str::trim).collect();
    let proto = parts[0].split('(').next().unwrap_or("").trim();
    match proto {
        "tcp" => {}
        "telnet" => notes.push(format!(
            "line {line}: accepter `{accepter}` uses telnet; lucidgate serves raw TCP (LucidControl clients use raw)"
        )),
        other => return Err(format!("accepter protocol `{other}` is not supported (only tcp)")),
    }
    if parts.len() > 2 {
        notes.push(format!(
            "line {line}: accepter binds to {}; lucidgate listens on the addresses of `listen` in its config",
            parts[1..parts.len() - 1].join(",")
        ));
    }
    let port = parts.last().copied().unwrap_or("");
    port.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("`{accepter}` has no port 1..=65535 at its end"))
}

fn parse_connector(
    connector: &str,
    line: usize,
    notes: &mut Vec<String>,
) -> Result<(PathBuf, Option<u32>), String> {
    let parts: Vec<&str> = connector
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if parts.first() != Some(&"serialdev") || parts.len() < 2 {
        return Err(format!(
            "connector `{connector}` is not `serialdev,/dev/...,SPEED...`"
        ));
    }
    let device = PathBuf::from(parts[1]);
    let mut baud = None;
    for p in &parts[2..] {
        let digits: String = p.chars().take_while(char::is_ascii_digit).collect();
        if !digits.is_empty() {
            baud = digits.parse().ok();
        } else if *p != "local" {
            notes.push(format!("line {line}: serial option `{p}` was not carried over (lucidgate uses raw 8N1, no flow control)"));
        }
    }
    Ok((device, baud))
}

fn parse_conf(text: &str, origin: &str) -> Result<Vec<Connection>, ImportError> {
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let l = raw.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let upper = l.split(':').next().unwrap_or("");
        if matches!(
            upper,
            "BANNER"
                | "TRACEFILE"
                | "CONTROLPORT"
                | "SIGNATURE"
                | "OPENSTR"
                | "CLOSESTR"
                | "CLOSEON"
                | "DEVICE"
                | "LED"
        ) {
            // Definitions used by connections; reported where a connection uses them.
            continue;
        }
        let fields: Vec<&str> = l.splitn(5, ':').collect();
        if fields.len() < 4 {
            return Err(err(
                origin,
                line,
                format!("`{l}` is not PORT:STATE:TIMEOUT:DEVICE:OPTIONS"),
            ));
        }
        let mut notes = Vec::new();
        let port_field = fields[0];
        let port = port_field
            .rsplit(',')
            .next()
            .and_then(|p| p.trim().parse::<u16>().ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| {
                err(
                    origin,
                    line,
                    format!("`{port_field}` is not a port 1..=65535"),
                )
            })?;
        if port_field.contains(',') {
            notes.push(format!(
                "line {line}: binds to {port_field}; lucidgate listens on the addresses of `listen`"
            ));
        }
        let enabled = match fields[1] {
            "raw" | "rawlp" => true,
            "telnet" => {
                notes.push(format!(
                    "line {line}: state telnet; lucidgate serves raw TCP"
                ));
                true
            }
            "off" => false,
            other => {
                return Err(err(
                    origin,
                    line,
                    format!("state `{other}` is not raw, rawlp, telnet or off"),
                ));
            }
        };
        let timeout: u64 = fields[2].trim().parse().map_err(|_| {
            err(
                origin,
                line,
                format!("timeout `{}` is not a number of seconds", fields[2]),
            )
        })?;
        if timeout > 0 {
            notes.push(format!(
                "line {line}: per-connection timeout {timeout}s: lucidgate has one for all modules (limits.idle_timeout_secs = {timeout})"
            ));
        }
        let device = PathBuf::from(fields[3].trim());
        if !device.is_absolute() {
            return Err(err(
                origin,
                line,
                format!("device `{}` is not an absolute path", fields[3]),
            ));
        }
        let mut baud = None;
        let mut kick_old = false;
        for opt in fields.get(4).copied().unwrap_or("").split_whitespace() {
            if let Ok(b) = opt.parse::<u32>() {
                baud = Some(b);
            } else {
                match opt.to_ascii_uppercase().as_str() {
                    "8DATABITS" | "NONE" | "1STOPBIT" | "-RTSCTS" | "LOCAL" | "-XONXOFF" => {}
                    "KICKOLDUSER" => kick_old = true,
                    _ => option(opt, "", line, &mut kick_old, &mut notes),
                }
            }
        }
        out.push(Connection {
            line,
            port,
            device,
            baud,
            enabled,
            kick_old,
            notes,
        });
    }
    Ok(out)
}

/// How a device path was tied to a module serial.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resolved {
    /// From the `/dev/serial/by-id/...` name.
    ById(String),
    /// Asked udev about the tty (the module is plugged in).
    Udev(String),
    Unresolved(String),
}

/// The serial in a by-id name: `usb-deciphe_it_LucidIo_AO4_11001001FA480000-if00`.
fn serial_from_by_id(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    if !path.to_string_lossy().contains("/serial/by-id/") {
        return None;
    }
    let stem = name.rsplit_once("-if").map(|(s, _)| s).unwrap_or(name);
    let serial = stem.rsplit('_').next()?;
    crate::config::check_serial(serial)
        .ok()
        .map(|_| serial.to_string())
}

/// Symlinks followed when a device path is resolved.
const MAX_LINK_HOPS: usize = 8;

/// Asks udev which module serial a tty path belongs to: a `tty*` name directly, an alias
/// (`/dev/lucid0`, `/dev/serial/by-path/...`) by its device number, else by following links.
pub(crate) fn serial_from_udev(path: &Path) -> Option<String> {
    let of = |dev: udev::Device| -> Option<String> {
        let serial = dev.property_value("ID_SERIAL_SHORT")?.to_str()?.to_string();
        crate::config::check_serial(&serial).ok().map(|_| serial)
    };
    let name = path.file_name()?.to_str()?;
    if name.starts_with("tty")
        && let Some(s) = udev::Device::from_subsystem_sysname("tty".into(), name.into())
            .ok()
            .and_then(of)
    {
        return Some(s);
    }
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        if meta.file_type().is_char_device()
            && let Some(s) = udev::Device::from_devnum(udev::DeviceType::Character, meta.rdev())
                .ok()
                .and_then(of)
        {
            return Some(s);
        }
    }
    // Follow symlinks by hand: realpath(3) is avoided on purpose, umockdev's wrapper of it
    // corrupts the heap (seen with umockdev 0.17.16).
    let mut real = path.to_path_buf();
    for _ in 0..MAX_LINK_HOPS {
        match std::fs::read_link(&real) {
            Ok(target) => {
                real = match real.parent() {
                    Some(dir) if target.is_relative() => dir.join(target),
                    _ => target,
                }
            }
            Err(_) => break,
        }
    }
    let sysname = real.file_name()?.to_str()?.to_string();
    udev::Device::from_subsystem_sysname("tty".into(), sysname)
        .ok()
        .and_then(of)
}

fn resolve(path: &Path, udev: impl Fn(&Path) -> Option<String>) -> Resolved {
    if let Some(s) = serial_from_by_id(path) {
        return Resolved::ById(s);
    }
    if let Some(s) = udev(path) {
        return Resolved::Udev(s);
    }
    Resolved::Unresolved(format!(
        "{} could not be tied to a module serial (plug the module in and import again, or fill in its serial)",
        path.display()
    ))
}

/// Turns connections into config text (to stdout) and notes (to stderr).
pub(crate) fn render(
    conns: &[Connection],
    origin: &str,
    udev: impl Fn(&Path) -> Option<String>,
) -> (String, Vec<String>) {
    let mut out = format!("# Imported from {origin} by `lucidgate config import-ser2net`.\n");
    let mut notes = Vec::new();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for c in conns {
        for n in &c.notes {
            notes.push(format!("{origin}: {n}"));
        }
        let _ = writeln!(
            out,
            "\n# line {}: port {} -> {}",
            c.line,
            c.port,
            c.device.display()
        );
        let serial = match resolve(&c.device, &udev) {
            Resolved::ById(s) | Resolved::Udev(s) => s,
            Resolved::Unresolved(why) => {
                notes.push(format!("{origin}: line {}: {why}", c.line));
                let _ = writeln!(out, "# {why}:\n# [modules.\"SERIAL\"]\n# port = {}", c.port);
                continue;
            }
        };
        if let Some(first) = seen.insert(serial.clone(), c.line) {
            notes.push(format!(
                "{origin}: line {}: module {serial} was already imported from line {first}; this connection is left out",
                c.line
            ));
            let _ = writeln!(out, "# module {serial} already imported from line {first}");
            continue;
        }
        let _ = writeln!(out, "[modules.\"{serial}\"]\nport = {}", c.port);
        if !c.enabled {
            let _ = writeln!(out, "enabled = false");
        }
        if let Some(b) = c.baud.filter(|b| *b != 115_200) {
            let _ = writeln!(out, "baud = {b}");
        }
        if c.kick_old {
            let _ = writeln!(out, "policy = \"kick-old\"");
        }
    }
    (out, notes)
}

#[cfg(test)]
mod tests {
    use super::*;

    const YAML: &str = r#"%YAML 1.1
---
define: &banner \r\nser2net port \p device \d\r\n

connection: &con0
    accepter: tcp,4001
    enable: on
    options:
      banner: *banner
      kickolduser: true
      telnet-brk-on-sync: true
    connector: serialdev,
              /dev/ttyACM0,
              115200n81,local

connection: &con1
    accepter: telnet,0.0.0.0,4002
    connector: serialdev,/dev/serial/by-id/usb-deciphe_it_LucidIo_DI4_00001001000000AA-if00,9600n81
    options:
      chardelay: false

connection: &con2
    accepter: tcp,4003
    enable: off
    connector: serialdev,/dev/ttyACM7,115200n81
"#;

    #[test]
    fn yaml_connections_with_duplicate_keys_options_and_lines() {
        let c = parse(YAML, "ser2net.yaml").unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(
            (c[0].port, c[0].device.as_path()),
            (4001, Path::new("/dev/ttyACM0"))
        );
        assert!(c[0].kick_old);
        assert_eq!(c[0].baud, Some(115200));
        assert!(
            c[0].notes
                .iter()
                .any(|n| n.contains("banner") && n.starts_with("line 9")),
            "{:?}",
            c[0].notes
        );
        assert!(c[0].notes.iter().any(|n| n.contains("telnet-brk-on-sync")));
        assert_eq!(c[1].port, 4002);
        assert!(c[1].notes.iter().any(|n| n.contains("telnet")));
        assert!(
            c[1].notes
                .iter()
                .any(|n| n.contains("chardelay") && n.contains("no character delay"))
        );
        assert!(!c[2].enabled);
        let fake_udev =
            |p: &Path| (p == Path::new("/dev/ttyACM0")).then(|| "11001001FA480000".to_string());
        let (toml, notes) = render(&c, "ser2net.yaml", fake_udev);
        let cfg = crate::config::Config::parse(&toml, "imported").unwrap();
        let a = cfg.module_settings("11001001FA480000");
        assert_eq!(
            (a.fixed_port, a.policy),
            (Some(4001), crate::config::ClientPolicy::KickOld)
        );
        let b = cfg.module_settings("00001001000000AA");
        assert_eq!((b.fixed_port, b.baud), (Some(4002), 9600));
        assert!(toml.contains("# port = 4003"), "{toml}");
        assert!(
            notes
                .iter()
                .any(|n| n.contains("/dev/ttyACM7") && n.contains("plug the module in")),
            "{notes:?}"
        );
    }

    #[test]
    fn conf_lines_of_ser2net_3() {
        let text = "# ser2net 3 config\nBANNER:banner1:hello\n4001:raw:600:/dev/ttyACM0:115200 8DATABITS NONE 1STOPBIT banner1\n\
                    127.0.0.1,4002:telnet:0:/dev/serial/by-id/usb-deciphe_it_LucidIo_AO4_11001001FA480001-if00:9600 kickolduser\n\
                    4003:off:0:/dev/ttyACM2:115200\n";
        let c = parse(text, "ser2net.conf").unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!((c[0].line, c[0].port), (3, 4001));
        assert!(c[0].notes.iter().any(|n| n.contains("600s")));
        assert!(c[0].notes.iter().any(|n| n.contains("banner1")));
        assert_eq!(
            (c[1].port, c[1].baud, c[1].kick_old),
            (4002, Some(9600), true)
        );
        assert!(!c[2].enabled);
        let (toml, _) = render(&c, "ser2net.conf", |_| None);
        let cfg = crate::config::Config::parse(&toml, "imported").unwrap();
        assert_eq!(
            cfg.module_settings("11001001FA480001").fixed_port,
            Some(4002)
        );
    }

    #[test]
    fn malformed_files_get_line_numbered_errors() {
        let cases: &[(&str, &str)] = &[
            (
                "connection: &c\n    accepter: tcp,notaport\n    connector: serialdev,/dev/ttyACM0\n",
                "line 2",
            ),
            ("connection: &c\n    accepter: tcp,4001\n", "line 2"),
            (
                "connection: &c\n    accepter: udp,4001\n    connector: serialdev,/dev/x\n",
                "line 2",
            ),
            ("connection: &c\n  accepter: [tcp\n", "line"),
            (
                "connection: &c\n    accepter: tcp,4001\n    connector: sctp,/dev/x\n",
                "line 3",
            ),
            (
                "connection: &c\n    accepter: tcp,4001\n    connector: serialdev,/dev/x\nbogus: 1\n",
                "line 4",
            ),
            ("# c\n\n4001:raw:0\n", "line 3"),
            ("4001:weird:0:/dev/ttyACM0:115200\n", "line 1"),
            ("70000:raw:0:/dev/ttyACM0:115200\n", "line 1"),
            ("4001:raw:x:/dev/ttyACM0:115200\n", "line 1"),
            ("4001:raw:0:ttyACM0:115200\n", "line 1"),
        ];
        for (text, want) in cases {
            let e = parse(text, "f").unwrap_err().to_string();
            assert!(e.starts_with("f, ") && e.contains(want), "{text:?} -> {e}");
        }
    }

    #[test]
    fn by_id_names_carry_the_serial() {
        assert_eq!(
            serial_from_by_id(Path::new(
                "/dev/serial/by-id/usb-deciphe_it_LucidIo_AO4_11001001FA480000-if00"
            )),
            Some("11001001FA480000".into())
        );
        assert_eq!(serial_from_by_id(Path::new("/dev/ttyACM0")), None);
    }
}
