//! Multi-document configs (mergekit-multi): a YAML file of several `---` documents, each a merge config with an
//! optional `name:`. A later document names an earlier merge by using its name as a model reference (anywhere a
//! model may appear, optionally with `+adapter` or `@revision`, as mergekit's `patched_config` does); that
//! reference is replaced by the stage's output directory. Stages run in dependency order (a cycle is an error
//! naming it); named stages are written to `<intermediates>/<name>`, and the output is the unnamed document (at most
//! one, as in mergekit), else the last document.
//!
//! A stage is current, and skipped, when its output is complete and its stamp (`<intermediates>/<name>.stamp.json`,
//! written after the stage succeeded) equals the one it would write now: graft's version, the stage's config text
//! (with every reference already resolved to a path), the options that change what is written, and for every input
//! model each file's name, size and modification time. A re-run stage rewrites its files, so the stages that read it
//! see new modification times and run again too.
//!
//! This module splits and orders the stages and computes stamps; `super::stages` runs each stage as one
//! single-document merge.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use yaml_serde::{Mapping, Value as Yaml};

use crate::error::{Error, Result};

/// One document of a multi-document config.
#[derive(Clone, Debug)]
pub struct Stage {
    /// `name:` of the document (None for the unnamed output document).
    pub name: Option<String>,
    /// 1-based position of the document in the file, for messages.
    pub document: usize,
    /// The document without `name:`, references to other stages replaced by their output paths.
    pub yaml: String,
    /// Indices (into `Stages::stages`) of the stages this one reads.
    pub needs: Vec<usize>,
}

impl Stage {
    /// How messages name the stage: `stage 'NAME' (document K)` or `the unnamed stage (document K)`.
    pub fn label(&self) -> String {
        match &self.name {
            Some(n) => format!("stage '{n}' (document {})", self.document),
            None => format!("the unnamed stage (document {})", self.document),
        }
    }

    /// File stem of the stage's config and stamp in the intermediates directory.
    pub fn stem(&self) -> &str {
        self.name.as_deref().unwrap_or("output")
    }
}

/// The stages of a multi-document config, in an order where every stage comes after the stages it reads.
#[derive(Clone, Debug)]
pub struct Stages {
    pub stages: Vec<Stage>,
    /// Index of the stage written to the output path.
    pub output: usize,
}

/// The default intermediates directory: `<OUT>.stages` beside the output.
pub fn default_intermediates(output: &Path) -> PathBuf {
    let mut name = output.file_name().map(|n| n.to_os_string()).unwrap_or_else(|| "merge".into());
    name.push(".stages");
    output.with_file_name(name)
}

/// Keys whose string values are model references (mergekit's `ModelReference` fields in a config).
const REFERENCE_KEYS: [&str; 4] = ["model", "base_model", "tokenizer_source", "source"];

/// The model part of a reference (`model+adapter`, `model@revision`).
fn model_part(s: &str) -> &str {
    let s = s.split('+').next().unwrap_or(s);
    s.split('@').next().unwrap_or(s)
}

/// Splits `text` (the file `file`) into its YAML documents; `Ok(None)` when it has only one (an ordinary config).
/// `dir` is the config file's directory (relative model paths that exist only there are made absolute, since the
/// stage configs are written elsewhere), `intermediates` where named stages are written.
pub fn split(text: &str, file: &Path, dir: &Path, intermediates: &Path) -> Result<Option<Stages>> {
    let err = |msg: String| Error::usage(format!("{}: {msg}", file.display()));
    let docs: Vec<Yaml> = yaml_serde::Deserializer::from_str(text)
        .map(Yaml::deserialize)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| err(format!("not valid YAML: {e}")))?;
    if docs.len() < 2 {
        return Ok(None);
    }
    let mut names: Vec<Option<String>> = Vec::new();
    let mut bodies: Vec<Mapping> = Vec::new();
    for (i, doc) in docs.into_iter().enumerate() {
        let Yaml::Mapping(mut m) = doc else {
            return Err(err(format!("document {} is not a mapping of config keys", i + 1)));
        };
        let name = match m.remove("name") {
            None => None,
            Some(Yaml::String(s)) if !s.trim().is_empty() => Some(s),
            Some(other) => {
                return Err(err(format!("document {}: 'name' must be a non-empty string, not {other:?}", i + 1)))
            }
        };
        if let Some(n) = &name {
            if names.iter().flatten().any(|x| x == n) {
                return Err(err(format!("document {}: duplicate stage name '{n}'", i + 1)));
            }
        } else if names.iter().any(Option::is_none) {
            return Err(err(format!(
                "document {} has no 'name', and neither has an earlier one: at most one stage (the output) may be \
                 unnamed",
                i + 1
            )));
        }
        names.push(name);
        bodies.push(m);
    }
    let output = names.iter().position(Option::is_none).unwrap_or(names.len() - 1);
    let stage_path = |k: usize| -> PathBuf {
        match &names[k] {
            Some(n) if k != output => intermediates.join(n),
            // The output stage's path is filled in by the runner; references to it are a cycle-free error below.
            _ => PathBuf::new(),
        }
    };
    let mut stages = Vec::new();
    for (k, body) in bodies.into_iter().enumerate() {
        let mut needs = BTreeSet::new();
        let mut value = Yaml::Mapping(body);
        substitute(&mut value, None, &mut |s: &str| {
            let model = model_part(s);
            if let Some(j) = names.iter().position(|n| n.as_deref() == Some(model)) {
                needs.insert(j);
                let rest = &s[model.len()..];
                return Some(format!("{}{rest}", stage_path(j).display()));
            }
            let local = Path::new(model);
            (local.is_relative() && !local.exists() && dir.join(local).exists())
                .then(|| format!("{}{}", dir.join(local).display(), &s[model.len()..]))
        });
        if needs.contains(&k) {
            return Err(err(format!(
                "document {} reads its own output ('{}')",
                k + 1,
                names[k].as_deref().unwrap_or("")
            )));
        }
        if let Some(&j) = needs.iter().find(|&&j| j == output) {
            return Err(err(format!(
                "document {} reads '{}', the output stage (document {}); the output must be the last step",
                k + 1,
                names[j].as_deref().unwrap_or(""),
                j + 1
            )));
        }
        let yaml = yaml_serde::to_string(&value).map_err(|e| err(format!("document {}: {e}", k + 1)))?;
        stages.push(Stage { name: names[k].clone(), document: k + 1, yaml, needs: needs.into_iter().collect() });
    }
    let order = topological(&stages).map_err(err)?;
    // Re-index into execution order.
    let position: Vec<usize> = {
        let mut p = vec![0; stages.len()];
        order.iter().enumerate().for_each(|(new, &old)| p[old] = new);
        p
    };
    let ordered: Vec<Stage> = order
        .iter()
        .map(|&old| {
            let mut s = stages[old].clone();
            s.needs = s.needs.iter().map(|&j| position[j]).collect();
            s.needs.sort_unstable();
            s
        })
        .collect();
    Ok(Some(Stages { stages: ordered, output: position[output] }))
}

/// Replaces, in place, every string under a model-reference key for which `f` gives a replacement.
fn substitute(v: &mut Yaml, key: Option<&str>, f: &mut impl FnMut(&str) -> Option<String>) {
    match v {
        Yaml::String(s) if key.is_some_and(|k| REFERENCE_KEYS.contains(&k)) => {
            if let Some(new) = f(s) {
                *s = new;
            }
        }
        Yaml::Mapping(m) => {
            for (k, val) in m.iter_mut() {
                substitute(val, k.as_str(), f);
            }
        }
        // A list keeps its key's meaning (e.g. `models:` entries are mappings anyway).
        Yaml::Sequence(items) => items.iter_mut().for_each(|x| substitute(x, key, f)),
        Yaml::Tagged(t) => substitute(&mut t.value, key, f),
        _ => {}
    }
}

/// Stage indices in document order, each after the stages it needs; a cycle is an error naming its stages.
fn topological(stages: &[Stage]) -> std::result::Result<Vec<usize>, String> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    fn visit(
        k: usize,
        s: &[Stage],
        marks: &mut [Mark],
        path: &mut Vec<usize>,
        out: &mut Vec<usize>,
    ) -> std::result::Result<(), String> {
        match marks[k] {
            Mark::Done => return Ok(()),
            Mark::Open => {
                let from = path.iter().position(|&p| p == k).unwrap_or(0);
                let cycle: Vec<String> =
                    path[from..].iter().chain(std::iter::once(&k)).map(|&i| s[i].stem().to_string()).collect();
                return Err(format!("the stages read each other in a cycle: {}", cycle.join(" -> ")));
            }
            Mark::New => {}
        }
        marks[k] = Mark::Open;
        path.push(k);
        for &j in &s[k].needs {
            visit(j, s, marks, path, out)?;
        }
        path.pop();
        marks[k] = Mark::Done;
        out.push(k);
        Ok(())
    }
    let mut marks = vec![Mark::New; stages.len()];
    let mut out = Vec::new();
    for k in 0..stages.len() {
        visit(k, stages, &mut marks, &mut Vec::new(), &mut out)?;
    }
    Ok(out)
}

/// Name, size and modification time (ns since the epoch) of `path`, or of each file directly in it.
fn fingerprint(path: &Path) -> serde_json::Value {
    let entry = |p: &Path| -> Option<serde_json::Value> {
        let meta = std::fs::metadata(p).ok()?;
        let mtime = meta.modified().ok()?.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos() as u64;
        let name = p.file_name()?.to_string_lossy().into_owned();
        Some(serde_json::json!([name, meta.len(), mtime]))
    };
    let files: Vec<serde_json::Value> = if path.is_dir() {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(path)
            .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect())
            .unwrap_or_default();
        paths.sort();
        paths.iter().filter_map(|p| entry(p)).collect()
    } else {
        entry(path).into_iter().collect()
    };
    serde_json::json!({ "path": path.display().to_string(), "files": files })
}

/// The stamp of a stage: what it would be computed from.
pub fn stamp(stage_yaml: &str, options: &str, inputs: &[PathBuf]) -> String {
    let inputs: Vec<serde_json::Value> = inputs.iter().map(|p| fingerprint(p)).collect();
    let v = serde_json::json!({
        "graft": env!("CARGO_PKG_VERSION"),
        "config": stage_yaml,
        "options": options,
        "inputs": inputs,
    });
    serde_json::to_string_pretty(&v).unwrap() + "\n"
}

/// Whether the checkpoint at `out` is complete and was made from exactly `stamp` (stored at `stamp_file`).
pub fn is_current(out: &Path, stamp_file: &Path, stamp: &str) -> bool {
    let complete = if out.extension().is_some_and(|e| e == "safetensors") {
        out.is_file()
    } else {
        out.join("config.json").is_file()
            && (out.join("model.safetensors").is_file() || out.join("model.safetensors.index.json").is_file())
    };
    complete && std::fs::read_to_string(stamp_file).is_ok_and(|s| s == stamp)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split_str(text: &str) -> Result<Option<Stages>> {
        split(text, Path::new("multi.yml"), Path::new("/nonexistent-dir"), Path::new("/stages"))
    }

    const LINEAR: &str = "merge_method: linear\nmodels:\n  - model: org/a\n  - model: org/b\nparameters: {weight: 1}\n";

    #[test]
    fn one_document_is_an_ordinary_config() {
        assert!(split_str(LINEAR).unwrap().is_none());
    }

    #[test]
    fn stages_are_ordered_and_references_become_paths() {
        // The final (unnamed) document comes first in the file and reads both named ones; `second` reads `first`.
        let text = format!(
            "merge_method: slerp\nbase_model: second+some/adapter\nmodels:\n  - model: first\nparameters: {{t: 0.5}}\n\
             ---\nname: second\nmerge_method: linear\nmodels:\n  - model: first@main\n  - model: org/b\nparameters: {{weight: 1}}\n\
             ---\nname: first\n{LINEAR}"
        );
        let s = split_str(&text).unwrap().unwrap();
        let order: Vec<&str> = s.stages.iter().map(Stage::stem).collect();
        assert_eq!(order, ["first", "second", "output"]);
        assert_eq!(s.output, 2);
        assert_eq!(s.stages[1].needs, [0]);
        assert_eq!(s.stages[2].needs, [0, 1]);
        assert!(s.stages[1].yaml.contains("model: /stages/first@main"), "{}", s.stages[1].yaml);
        assert!(s.stages[2].yaml.contains("base_model: /stages/second+some/adapter"), "{}", s.stages[2].yaml);
        assert!(!s.stages[0].yaml.contains("name:"), "name is graft's, not the stage config's");
        assert_eq!(s.stages[2].document, 1);
    }

    #[test]
    fn all_named_means_the_last_document_is_the_output() {
        let text = format!("name: a\n{LINEAR}---\nname: b\n{}", LINEAR.replace("org/a", "a"));
        let s = split_str(&text).unwrap().unwrap();
        assert_eq!(s.stages[s.output].stem(), "b");
    }

    #[test]
    fn malformed_multi_documents_are_errors_naming_the_problem() {
        let cases = [
            (format!("name: a\n{LINEAR}---\nname: a\n{LINEAR}"), "duplicate stage name 'a'"),
            (format!("{LINEAR}---\n{LINEAR}"), "at most one stage (the output) may be unnamed"),
            (
                format!(
                    "name: a\n{}---\nname: b\n{}---\n{LINEAR}",
                    LINEAR.replace("org/a", "b"),
                    LINEAR.replace("org/a", "a")
                ),
                "cycle: a -> b -> a",
            ),
            (format!("name: a\n{}---\n{LINEAR}", LINEAR.replace("org/a", "a")), "reads its own output ('a')"),
            (
                format!("name: a\n{}---\nname: b\n{LINEAR}", LINEAR.replace("org/a", "b")),
                "the output must be the last step",
            ),
            (format!("- 1\n---\n{LINEAR}"), "document 1 is not a mapping"),
            (format!("name: [x]\n{LINEAR}---\n{LINEAR}"), "'name' must be a non-empty string"),
        ];
        for (text, want) in cases {
            let e = split_str(&text).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("multi.yml"), "{e}\nwanted: {want}");
        }
    }

    #[test]
    fn stamps_change_with_config_options_and_inputs() {
        let dir = tempfile::tempdir().unwrap();
        let input = dir.path().join("in");
        std::fs::create_dir(&input).unwrap();
        std::fs::write(input.join("model.safetensors"), b"abc").unwrap();
        let s0 = stamp("cfg", "opts", std::slice::from_ref(&input));
        assert_eq!(s0, stamp("cfg", "opts", std::slice::from_ref(&input)), "deterministic");
        assert_ne!(s0, stamp("cfg2", "opts", std::slice::from_ref(&input)));
        assert_ne!(s0, stamp("cfg", "opts2", std::slice::from_ref(&input)));
        std::fs::write(input.join("model.safetensors"), b"abcd").unwrap();
        assert_ne!(s0, stamp("cfg", "opts", std::slice::from_ref(&input)), "an input file changed size");

        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let file = dir.path().join("out.stamp.json");
        std::fs::write(&file, &s0).unwrap();
        assert!(!is_current(&out, &file, &s0), "no weights yet");
        std::fs::write(out.join("config.json"), b"{}").unwrap();
        std::fs::write(out.join("model.safetensors"), b"x").unwrap();
        assert!(is_current(&out, &file, &s0));
        assert!(!is_current(&out, &file, "other"));
    }
}
