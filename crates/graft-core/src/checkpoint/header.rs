//! Parsing and validating one safetensors file's header against the file's bytes.
//!
//! Layout: 8 bytes little-endian header length N, N bytes of JSON (an object mapping tensor names to
//! `{dtype, shape, data_offsets}` plus an optional `__metadata__` map of strings), then the data section. Validation
//! proves that every tensor's byte range matches its shape and dtype, lies inside the data section, and that the
//! ranges tile the data section exactly (no overlaps, no unaccounted bytes), so later reads cannot go wrong.

use std::collections::BTreeMap;
use std::path::Path;

use super::dtype::Dtype;
use crate::error::{Error, Result};

/// Headers larger than this are refused: real ones are kilobytes to a few megabytes.
pub const MAX_HEADER_LEN: u64 = 100_000_000;

/// One tensor's entry, with offsets relative to the start of the data section.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeaderEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub begin: usize,
    pub end: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Header {
    /// Entries in the order of their data (ascending offsets).
    pub entries: Vec<HeaderEntry>,
    pub metadata: BTreeMap<String, String>,
    /// Where the data section starts in the file (8 + header length).
    pub data_start: usize,
}

/// Validates the header of `bytes` (the whole file). `path` is only used in messages.
pub fn parse(path: &Path, bytes: &[u8]) -> Result<Header> {
    if bytes.len() < 8 {
        return Err(Error::format(
            path,
            format!("file is {} bytes, too short for the 8-byte safetensors header length", bytes.len()),
        ));
    }
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    if n > MAX_HEADER_LEN {
        return Err(Error::format(path, format!("header length {n} is absurd (over 100 MB); not a safetensors file?")));
    }
    let available = bytes.len() as u64 - 8;
    if n > available {
        return Err(Error::format(
            path,
            format!("header length {n} is larger than the {available} bytes that follow it (truncated file?)"),
        ));
    }
    let n = n as usize;
    let text = std::str::from_utf8(&bytes[8..8 + n])
        .map_err(|e| Error::format(path, format!("header is not valid UTF-8 JSON: {e}")))?;
    let json: serde_json::Value =
        serde_json::from_str(text).map_err(|e| Error::format(path, format!("header is not valid JSON: {e}")))?;
    let serde_json::Value::Object(map) = json else {
        return Err(Error::format(path, "header is not a JSON object of tensors"));
    };

    let data_start = 8 + n;
    let data_len = bytes.len() - data_start;
    let mut header = Header { data_start, ..Default::default() };
    for (name, value) in map {
        if name == "__metadata__" {
            header.metadata = parse_metadata(path, &value)?;
            continue;
        }
        header.entries.push(parse_entry(path, &name, &value)?);
    }

    for e in &header.entries {
        if e.end > data_len {
            return Err(Error::tensor(
                path,
                &e.name,
                format!(
                    "data_offsets [{}, {}) lie outside the data section of {data_len} bytes (truncated file?)",
                    e.begin, e.end
                ),
            ));
        }
    }
    // Tiling check on ranges sorted by start: each must begin where the previous ended.
    header.entries.sort_by(|a, b| (a.begin, a.end, &a.name).cmp(&(b.begin, b.end, &b.name)));
    let mut pos = 0usize;
    let mut prev: Option<&HeaderEntry> = None;
    for e in &header.entries {
        if e.begin < pos {
            let p = prev.expect("pos > 0 implies a previous entry");
            return Err(Error::tensor(
                path,
                &e.name,
                format!(
                    "data_offsets [{}, {}) overlap tensor '{}' at [{}, {})",
                    e.begin, e.end, p.name, p.begin, p.end
                ),
            ));
        }
        if e.begin > pos {
            return Err(Error::tensor(
                path,
                &e.name,
                format!("{} bytes before its data_offsets start ({}) belong to no tensor", e.begin - pos, e.begin),
            ));
        }
        pos = e.end;
        prev = Some(e);
    }
    if pos < data_len {
        let msg =
            format!("{} bytes after offset {pos} at the end of the data section belong to no tensor", data_len - pos);
        return Err(match prev {
            Some(p) => Error::tensor(path, &p.name, msg),
            None => Error::format(path, msg),
        });
    }
    Ok(header)
}

fn parse_metadata(path: &Path, value: &serde_json::Value) -> Result<BTreeMap<String, String>> {
    let serde_json::Value::Object(m) = value else {
        return Err(Error::format(path, "__metadata__ is not an object of strings"));
    };
    m.iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(Error::format(path, format!("__metadata__ entry '{k}' is not a string"))),
        })
        .collect()
}

fn parse_entry(path: &Path, name: &str, value: &serde_json::Value) -> Result<HeaderEntry> {
    let bad = |msg: String| Error::tensor(path, name, msg);
    let obj = value.as_object().ok_or_else(|| bad("entry is not an object {dtype, shape, data_offsets}".into()))?;
    if let Some(k) = obj.keys().find(|k| !matches!(k.as_str(), "dtype" | "shape" | "data_offsets")) {
        return Err(bad(format!("unexpected field '{k}' in its entry")));
    }
    let dtype_name =
        obj.get("dtype").and_then(|v| v.as_str()).ok_or_else(|| bad("missing or non-string dtype".into()))?;
    let dtype = Dtype::from_header_name(dtype_name).ok_or_else(|| bad(format!("unknown dtype '{dtype_name}'")))?;
    let shape_json =
        obj.get("shape").and_then(|v| v.as_array()).ok_or_else(|| bad("missing or non-list shape".into()))?;
    let shape = shape_json
        .iter()
        .map(|d| d.as_u64().and_then(|d| usize::try_from(d).ok()))
        .collect::<Option<Vec<usize>>>()
        .ok_or_else(|| bad(format!("shape {} is not a list of non-negative integers", compact(shape_json))))?;
    let offsets = obj
        .get("data_offsets")
        .and_then(|v| v.as_array())
        .filter(|a| a.len() == 2)
        .and_then(|a| Some((a[0].as_u64()?, a[1].as_u64()?)))
        .ok_or_else(|| bad("data_offsets is not a pair of non-negative integers".into()))?;
    let (begin, end) = (usize::try_from(offsets.0), usize::try_from(offsets.1));
    let (Ok(begin), Ok(end)) = (begin, end) else {
        return Err(bad("data_offsets do not fit in memory addresses".into()));
    };
    if begin > end {
        return Err(bad(format!("data_offsets [{begin}, {end}) end before they begin")));
    }
    let needed = shape
        .iter()
        .try_fold(dtype.size(), |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad(format!("shape {shape:?} overflows the address space")))?;
    if needed != end - begin {
        return Err(bad(format!(
            "shape {shape:?} of {dtype} needs {needed} bytes but data_offsets [{begin}, {end}) span {}",
            end - begin
        )));
    }
    Ok(HeaderEntry { name: name.to_string(), dtype, shape, begin, end })
}

fn compact(v: &[serde_json::Value]) -> String {
    serde_json::to_string(v).unwrap_or_default()
}
