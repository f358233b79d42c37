//! Where things are in a TOML file: the one reader whose errors name the file, the line, the
//! column and the field (config, attach config, provisioning requests), and the one in-place
//! editor (`provision set-token`), which changes a single line and keeps comments and layout.

use std::path::Path;

use super::ConfigError;

/// Deserializes TOML `text` into `T`; errors name `origin`, the line, the column and the field.
/// Shared by every TOML file lucidgate reads (config, attach config, provisioning requests).
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    origin: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let field = e.span().and_then(|s| field_at(text, s.start));
        toml_error(text, origin, &e, field)
    })
}

/// The largest char boundary at or below `offset` (spans from the parser are byte offsets).
fn boundary(text: &str, offset: usize) -> usize {
    let mut o = offset.min(text.len());
    while !text.is_char_boundary(o) {
        o -= 1;
    }
    o
}

/// The dotted path of the field at byte `offset` of a TOML document, read from the text: the
/// key of the `key = value` line the offset is in (or the nearest one above, for a value that
/// spans lines), under the nearest `[table]` or `[[array]]` header above (the N-th `[[array]]`
/// is `array[N]`, counted from 1). Best effort, for error messages.
pub(super) fn field_at(text: &str, offset: usize) -> Option<String> {
    let offset = boundary(text, offset);
    let before = &text[..offset];
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let lines: Vec<&str> = text[..line_start].lines().collect();
    let current = text[line_start..].lines().next().unwrap_or("");
    let header = |l: &str| -> Option<(String, bool)> {
        let t = l.trim();
        let array = t.starts_with("[[");
        let name = t.strip_prefix('[')?.trim_start_matches('[');
        let name = name.split(']').next()?.trim();
        (!name.is_empty()).then(|| (name.to_string(), array))
    };
    let key_of = |l: &str| -> Option<String> {
        let t = l.trim();
        if t.starts_with('[') || t.starts_with('#') {
            return None;
        }
        let (k, _) = t.split_once('=')?;
        let k = k.trim();
        (!k.is_empty()).then(|| k.to_string())
    };
    // The offset on a header: the table itself.
    if let Some((name, _)) = header(current) {
        return Some(path_with_table(&lines, name, &header));
    }
    let mut above = lines.len();
    let mut key = key_of(current);
    if key.is_none() {
        // A value continued from a line above (a multi-line array).
        while above > 0 {
            above -= 1;
            if header(lines[above]).is_some() {
                above += 1;
                break;
            }
            if let Some(k) = key_of(lines[above]) {
                key = Some(k);
                break;
            }
        }
    }
    let key = key?;
    // The table the key is in.
    for i in (0..above.min(lines.len())).rev() {
        if let Some((name, array)) = header(lines[i]) {
            let table = if array {
                let n = lines[..=i]
                    .iter()
                    .filter(|l| header(l).is_some_and(|(h, a)| a && h == name))
                    .count();
                format!("{name}[{n}]")
            } else {
                name
            };
            return Some(format!("{table}.{key}"));
        }
    }
    Some(key)
}

/// `name` as the path of a header line: an array of tables gets its index.
fn path_with_table(
    lines: &[&str],
    name: String,
    header: &dyn Fn(&str) -> Option<(String, bool)>,
) -> String {
    let n = lines
        .iter()
        .filter(|l| header(l).is_some_and(|(h, a)| a && h == name))
        .count();
    if n > 0 {
        format!("{name}[{}]", n + 1)
    } else {
        name
    }
}

/// Reads a UTF-8 text file (a `what`: config, attach config, ...) of at most `max` bytes;
/// errors name the file.
pub(crate) fn read_text(path: &Path, max: u64, what: &str) -> Result<String, ConfigError> {
    let meta = std::fs::metadata(path).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        source: e,
        hint: "",
    })?;
    if meta.len() > max {
        return Err(ConfigError::Invalid {
            location: path.display().to_string(),
            message: format!(
                "file is {} bytes; a {what} is at most {max} bytes (is this the right file?)",
                meta.len()
            ),
        });
    }
    let text = std::fs::read(path).map_err(|e| ConfigError::Read {
        path: path.to_path_buf(),
        source: e,
        hint: "",
    })?;
    String::from_utf8(text).map_err(|e| ConfigError::Invalid {
        location: path.display().to_string(),
        message: format!(
            "not UTF-8 text (invalid byte at offset {}); save the file as UTF-8",
            e.utf8_error().valid_up_to()
        ),
    })
}

pub(super) fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |i| before.len() - i - 1)
        + 1;
    (line, col)
}

pub(super) fn toml_error(
    text: &str,
    origin: &str,
    e: &toml::de::Error,
    field: Option<String>,
) -> ConfigError {
    let field = field.filter(|f| !f.is_empty() && f != ".");
    let mut location = origin.to_string();
    if let Some(span) = e.span() {
        let (line, col) = line_col(text, span.start);
        location.push_str(&format!(", line {line}, column {col}"));
    }
    if let Some(f) = &field {
        location.push_str(&format!(", field `{f}`"));
    }
    let mut message = e.message().trim().to_string();
    if message.starts_with("unknown field") {
        message.push_str(" (remove it or fix its spelling; `lucidgate config check` prints every valid field with its default)");
    }
    ConfigError::Invalid { location, message }
}

/// Best-effort line of `key` in `[table]` (for errors found after parsing).
pub(super) fn find_line(text: &str, table: &str, key: &str) -> Option<usize> {
    let mut current = String::new();
    let mut table_line = None;
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(rest) = line.strip_prefix('[') {
            let name = rest.trim_start_matches('[');
            let name = name.split(']').next().unwrap_or("").trim();
            current = name.to_string();
            if current == table {
                table_line = Some(i + 1);
            }
            continue;
        }
        if current == table && !key.is_empty() {
            let k = line.split('=').next().unwrap_or("").trim();
            if k == key {
                return Some(i + 1);
            }
        }
    }
    table_line
}

/// Returns `text` (a TOML file) with `key = value` (`value` already in TOML form) in `[table]`,
/// editing only that line: replaced where it is, else added at the end of the table, else in a
/// new table at the end. Comments and layout stay; the caller checks that the result parses.
pub(crate) fn set_key(text: &str, table: &str, key: &str, value: &str) -> String {
    let line = format!("{key} = {value}");
    let mut out: Vec<String> = Vec::new();
    let mut in_table = false;
    let mut seen_table = false;
    let mut done = false;
    for l in text.lines() {
        let t = l.trim();
        if t.starts_with('[') {
            if in_table && !done {
                out.push(line.clone());
                done = true;
            }
            in_table = t.trim_start_matches('[').trim_end_matches(']').trim() == table;
            seen_table |= in_table;
        } else if in_table && !done && t.split('=').next().map(str::trim) == Some(key) {
            out.push(line.clone());
            done = true;
            continue;
        }
        out.push(l.to_string());
    }
    if in_table && !done {
        out.push(line.clone());
        done = true;
    }
    if !done && !seen_table {
        if out.last().is_some_and(|l| !l.trim().is_empty()) {
            out.push(String::new());
        }
        out.push(format!("[{table}]"));
        out.push(line);
    }
    let mut s = out.join("\n");
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_key_edits_only_that_line() {
        let set = |t: &str| set_key(t, "provision", "token_hash", "\"H\"");
        let t = "# mine\n[relay]\npolicy = \"shared\"\n";
        assert_eq!(
            set(t),
            "# mine\n[relay]\npolicy = \"shared\"\n\n[provision]\ntoken_hash = \"H\"\n"
        );
        let t = "[provision]\n# keep\ntoken_hash = \"old\"\n[relay]\nbaud = 9600\n";
        assert_eq!(
            set(t),
            "[provision]\n# keep\ntoken_hash = \"H\"\n[relay]\nbaud = 9600\n"
        );
        let t = "[provision]\n[relay]\n";
        assert_eq!(set(t), "[provision]\ntoken_hash = \"H\"\n[relay]\n");
        assert_eq!(set(""), "[provision]\ntoken_hash = \"H\"\n");
    }
}
