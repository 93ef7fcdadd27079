//! Collecting an experiment's results: every fine-tuning step's results line, with the merge's consistency numbers
//! added to its metrics, into one `RUNDIR/results.jsonl` for `graft report`; and reading alignment reports.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};

/// Whether an alignment report (`graft align --json`) says some permutation is not the identity.
pub fn alignment_changed(report: &Value) -> bool {
    match report {
        Value::Object(m) => m.iter().any(|(k, v)| match (k.as_str(), v) {
            ("identity", Value::Bool(b)) => !b,
            ("changed", Value::Bool(b)) => *b,
            _ => alignment_changed(v),
        }),
        Value::Array(a) => a.iter().any(alignment_changed),
        _ => false,
    }
}

/// Reads the JSON document a step left on its standard output.
pub fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not a JSON document: {e}")))
}

/// Concatenates the results lines of every `*.jsonl` under each seed's `results/` directory into `out` (written
/// whole under a temporary name, then renamed), adding `extra(line)` metrics to each. Returns the line count.
pub fn collect(
    rundir: &Path,
    seeds: &[u64],
    out: &Path,
    extra: impl Fn(&Value) -> Vec<(String, f64)>,
) -> Result<usize> {
    let mut text = String::new();
    let mut n = 0;
    for &seed in seeds {
        let dir = super::steps::seed_dir(rundir, seed).join("results");
        let Ok(rd) = std::fs::read_dir(&dir) else { continue };
        let mut files: Vec<_> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "jsonl"))
            .collect();
        files.sort();
        for f in files {
            let body = std::fs::read_to_string(&f).map_err(|e| Error::io(&f, e))?;
            // A step that was rerun appended again: its last line is the current one.
            let Some(last) = body.lines().rev().find(|l| !l.trim().is_empty()) else { continue };
            let mut line: Value =
                serde_json::from_str(last).map_err(|e| Error::format(&f, format!("not a results line: {e}")))?;
            for (k, v) in extra(&line) {
                if let Some(m) = line.get_mut("metrics").and_then(|m| m.as_object_mut()) {
                    m.insert(k, serde_json::json!(v));
                }
            }
            text.push_str(&line.to_string());
            text.push('\n');
            n += 1;
        }
    }
    let tmp = out.with_extension("jsonl.partial");
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alignment_change_is_found_at_any_depth() {
        let same = serde_json::json!({"groups": [{"name": "g0", "identity": true}, {"name": "g1", "identity": true}]});
        let moved =
            serde_json::json!({"groups": [{"name": "g0", "identity": true}, {"name": "g1", "identity": false}]});
        assert!(!alignment_changed(&same));
        assert!(alignment_changed(&moved));
        assert!(alignment_changed(&serde_json::json!({"changed": true})));
    }
}
