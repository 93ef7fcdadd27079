//! Results lines: reading the JSONL files that `graft train`, `graft eval`, `graft interpolate --eval` and
//! `graft experiment` append to (the schema is docs/results-format.md), validating every line, and resolving lines
//! that record the same run twice.
//!
//! A bad line is an error naming `FILE:LINE`; unknown fields are ignored so that older readers accept newer writers.

use std::collections::HashMap;
use std::fmt;
use std::ops::Deref;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};
pub use graft_core::results::{Kind, Line};

/// Where a line came from: renders as `FILE:LINE` (1-based line numbers, as editors count).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

impl Location {
    /// A one-line `FILE:LINE: msg` error. The error type has no line field, so the location travels in the path
    /// slot of `Error::Format`, which renders as `{path}: {msg}`.
    pub fn error(&self, msg: impl Into<String>) -> Error {
        Error::format(self.to_string(), msg)
    }
}

/// One validated results line and where it was read. It reads as the `Line` itself (`line.kind`, `line.metric(..)`):
/// the location only matters for messages.
#[derive(Clone, Debug)]
pub struct ResultLine {
    pub location: Location,
    pub line: Line,
}

impl Deref for ResultLine {
    type Target = Line;
    fn deref(&self) -> &Line {
        &self.line
    }
}

/// The lines of several results files, with later lines for the same run replacing earlier ones.
#[derive(Debug, Default)]
pub struct ResultSet {
    pub lines: Vec<ResultLine>,
    /// (replaced line, the later line that replaced it).
    pub superseded: Vec<(Location, Location)>,
    /// Non-blank lines read, before superseding.
    pub lines_read: usize,
}

/// Reads and validates every results file, in order. Blank lines are skipped; anything else must be a valid line.
pub fn read_files(paths: &[PathBuf]) -> Result<ResultSet> {
    let mut all = Vec::new();
    for path in paths {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        all.extend(parse_lines(path, &bytes)?);
    }
    if all.is_empty() {
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(Error::invalid(format!("no result lines in {}", names.join(", "))));
    }
    Ok(supersede(all))
}

/// Parses the contents of one results file.
pub fn parse_lines(path: &Path, bytes: &[u8]) -> Result<Vec<ResultLine>> {
    let mut out = Vec::new();
    for (i, raw) in bytes.split(|&b| b == b'\n').enumerate() {
        let location = Location { file: path.to_path_buf(), line: i + 1 };
        let text = std::str::from_utf8(raw).map_err(|e| location.error(format!("not valid UTF-8: {e}")))?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        out.push(parse_line(location, text)?);
    }
    Ok(out)
}

/// Validates one line against the schema (`graft_core::results::Line::parse`); errors name `FILE:LINE`.
pub fn parse_line(location: Location, text: &str) -> Result<ResultLine> {
    let line = Line::parse(text).map_err(|e| location.error(e))?;
    Ok(ResultLine { location, line })
}

/// Results files are append-only logs: rerunning a command with the same configuration appends a line for the same
/// run. The later line wins, keeping the place of the first so that row order does not depend on reruns. A run is
/// identified by (kind, experiment, run_id, config), so interpolation points that share a run_id stay distinct.
pub fn supersede(lines: Vec<ResultLine>) -> ResultSet {
    let lines_read = lines.len();
    let mut index: HashMap<(Kind, String, String, String), usize> = HashMap::new();
    let mut kept: Vec<ResultLine> = Vec::with_capacity(lines.len());
    let mut superseded = Vec::new();
    for line in lines {
        let key =
            (line.kind, line.experiment.clone(), line.run_id.clone(), Value::Object(line.config.clone()).to_string());
        match index.get(&key) {
            Some(&i) => {
                superseded.push((kept[i].location.clone(), line.location.clone()));
                kept[i] = line;
            }
            None => {
                index.insert(key, kept.len());
                kept.push(line);
            }
        }
    }
    ResultSet { lines: kept, superseded, lines_read }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<ResultLine>> {
        parse_lines(Path::new("r.jsonl"), text.as_bytes())
    }

    const GOOD: &str = r#"{"kind":"train","run_id":"a","experiment":"lerp","seed":1,"config":{"method":"lerp","top_p":0.1},"metrics":{"accuracy":0.8,"time_s":12.5,"peak_memory_bytes":1000,"extra":3},"future_field":[1,2]}"#;

    #[test]
    fn reads_a_valid_line_and_ignores_unknown_fields() {
        let lines = parse(&format!("\n{GOOD}\n\n")).unwrap();
        assert_eq!(lines.len(), 1);
        let l = &lines[0];
        assert_eq!(l.location.line, 2);
        assert_eq!((l.kind, l.run_id.as_str(), l.experiment.as_str(), l.seed), (Kind::Train, "a", "lerp", 1));
        assert_eq!(l.metric("accuracy"), Some(0.8));
        assert_eq!(l.metric("extra"), Some(3.0));
        assert_eq!(l.metric("f1_macro"), None);
        assert!(!l.baseline);
        assert_eq!(l.config.keys().collect::<Vec<_>>(), ["method", "top_p"]);
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let cases = [
            ("not json", "r.jsonl:2: not valid JSON"),
            ("[1,2]", "r.jsonl:2: expected a JSON object, found an array"),
            (r#"{"kind":"train"}"#, "r.jsonl:2: missing field 'run_id'"),
            (&GOOD.replace(r#""kind":"train""#, r#""kind":"fit""#), "r.jsonl:2: unknown kind 'fit'"),
            (&GOOD.replace(r#""seed":1"#, r#""seed":"one""#), "r.jsonl:2: field 'seed' must be an integer"),
            (
                &GOOD.replace(r#""accuracy":0.8"#, r#""accuracy":81.2"#),
                "r.jsonl:2: metrics.accuracy = 81.2 is outside [0, 1]",
            ),
            (&GOOD.replace(r#""time_s":12.5"#, r#""time_s":"fast""#), "r.jsonl:2: metrics.time_s must be a number"),
            (&GOOD.replace(r#""time_s":12.5"#, r#""time_s":-1"#), "r.jsonl:2: metrics.time_s = -1 is negative"),
            (&GOOD.replace(r#""experiment":"lerp""#, r#""experiment":"""#), "r.jsonl:2: field 'experiment' is empty"),
            (
                &GOOD.replace(r#""kind":"train""#, r#""kind":"interpolate""#),
                "r.jsonl:2: an interpolate line needs config.lambda",
            ),
            (
                &format!("{},\"baseline\":1}}", &GOOD[..GOOD.len() - 1]),
                "r.jsonl:2: field 'baseline' must be true or false",
            ),
        ];
        for (line, want) in cases {
            let err = parse(&format!("{GOOD}\n{line}\n")).unwrap_err().to_string();
            assert!(err.starts_with(want), "{line}\n got: {err}\nwant: {want}");
            assert!(!err.contains('\n'));
        }
    }

    #[test]
    fn null_metrics_are_absent() {
        let l = &parse(&GOOD.replace(r#""accuracy":0.8"#, r#""accuracy":null"#)).unwrap()[0];
        assert_eq!(l.metric("accuracy"), None);
    }

    #[test]
    fn later_lines_supersede_earlier_ones_for_the_same_run() {
        let second = GOOD.replace("0.8", "0.9");
        let other_run = GOOD.replace(r#""run_id":"a""#, r#""run_id":"b""#);
        let set = supersede(parse(&format!("{GOOD}\n{other_run}\n{second}")).unwrap());
        assert_eq!(set.lines_read, 3);
        assert_eq!(set.lines.len(), 2);
        assert_eq!(set.lines[0].metric("accuracy"), Some(0.9));
        assert_eq!(set.lines[0].location.line, 3);
        assert_eq!(set.lines[1].run_id, "b");
        assert_eq!(set.superseded.len(), 1);
        assert_eq!((set.superseded[0].0.line, set.superseded[0].1.line), (1, 3));
    }

    #[test]
    fn empty_input_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty.jsonl");
        std::fs::write(&p, "\n\n").unwrap();
        let err = read_files(&[p]).unwrap_err().to_string();
        assert!(err.starts_with("no result lines in "), "{err}");
    }
}
