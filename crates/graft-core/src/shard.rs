//! Sharded batch work: which part of a work list one process of N does (`--shard K/N`, or from the environment a
//! Slurm job array or a Kubernetes indexed Job sets), the manifest each shard writes beside its results file, and
//! gathering shard results files back into the one file a single process would have written. Also what every batch
//! command shares about its work list: quoted globs expanded by graft (`expand_globs`), the keyed results file that
//! `--resume FILE` appends to and skips from (`Results`), and the loop in which one failing item does not stop the
//! others (`run_batch`; it prints nothing: the caller reports each failure).
//!
//! The partition is round-robin over the work list in sorted order (item i goes to shard i mod N): it depends only on
//! the list and N, so N processes started anywhere cover the list exactly once, and neighbouring items (often of
//! similar size in a zoo) spread over the shards.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Arg, Error, Result};

/// Shard `index` of `count` (0-based: `0 <= index < count`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

/// The `--shard` flags every batch command shares.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ShardArgs {
    /// Do only shard K of N (0 <= K < N) of the sorted work list; `auto` reads it from the environment of a Slurm
    /// job array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT) or a Kubernetes indexed Job (JOB_COMPLETION_INDEX
    /// with --shard-count).
    #[arg(long, value_name = "K/N|auto")]
    pub shard: Option<String>,
    /// The number of shards for `--shard auto` where the environment does not say (Kubernetes indexed Jobs).
    #[arg(long, value_name = "N")]
    pub shard_count: Option<String>,
}

impl ShardArgs {
    /// The shard this process does, or `None` for all of the work.
    pub fn resolve(&self) -> Result<Option<Shard>> {
        resolve(self.shard.as_deref(), self.shard_count.as_deref(), |k| std::env::var(k).ok())
    }
}

fn count_arg(what: &str, s: &str) -> Result<usize> {
    match s.trim().parse::<usize>() {
        Ok(0) => Err(Error::usage(format!("{what} '{s}': the number of shards must be at least 1"))),
        Ok(n) => Ok(n),
        Err(_) => Err(Error::usage(format!("{what} '{s}' is not a whole number"))),
    }
}

fn index_arg(what: &str, s: &str) -> Result<usize> {
    s.trim().parse::<usize>().map_err(|_| Error::usage(format!("{what} '{s}' is not a whole number")))
}

fn checked(what: &str, index: usize, count: usize) -> Result<Shard> {
    if index >= count {
        return Err(Error::usage(format!("{what}: shard {index} of {count} does not exist (0 <= K < N)")));
    }
    Ok(Shard { index, count })
}

/// Parses `K/N`.
pub fn parse(spec: &str) -> Result<Shard> {
    let (k, n) = spec
        .split_once('/')
        .ok_or_else(|| Error::usage(format!("{} '{spec}' is not K/N (e.g. 0/4) or auto", Arg::Shard)))?;
    let shard = Arg::Shard.to_string();
    let count = count_arg(&shard, n)?;
    let index = index_arg(&shard, k)?;
    checked(&format!("{shard} {spec}"), index, count)
}

/// The shard from the flags, reading the environment through `env` for `auto` (or a lone `--shard-count`).
pub fn resolve(
    spec: Option<&str>,
    shard_count: Option<&str>,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Option<Shard>> {
    match spec {
        None if shard_count.is_none() => Ok(None),
        Some(s) if s != "auto" => {
            if shard_count.is_some() {
                return Err(Error::usage(format!(
                    "{count} goes with {shard} auto, not with {shard} K/N",
                    count = Arg::ShardCount,
                    shard = Arg::Shard
                )));
            }
            parse(s).map(Some)
        }
        _ => from_env(shard_count, env).map(Some),
    }
}

fn from_env(shard_count: Option<&str>, env: impl Fn(&str) -> Option<String>) -> Result<Shard> {
    if let Some(id) = env("SLURM_ARRAY_TASK_ID") {
        let count = match (env("SLURM_ARRAY_TASK_COUNT"), shard_count) {
            (_, Some(n)) => count_arg(&Arg::ShardCount.to_string(), n)?,
            (Some(n), None) => count_arg("SLURM_ARRAY_TASK_COUNT", &n)?,
            (None, None) => return Err(Error::usage("SLURM_ARRAY_TASK_ID is set but SLURM_ARRAY_TASK_COUNT is not")),
        };
        // Arrays may start anywhere (`--array=1-4`): the shard is the offset from the first task.
        let min = env("SLURM_ARRAY_TASK_MIN").map(|m| index_arg("SLURM_ARRAY_TASK_MIN", &m)).transpose()?.unwrap_or(0);
        if let Some(step) = env("SLURM_ARRAY_TASK_STEP").filter(|s| s.trim() != "1") {
            return Err(Error::usage(format!(
                "SLURM_ARRAY_TASK_STEP is {step}: {} auto needs a dense array",
                Arg::Shard
            )));
        }
        let id = index_arg("SLURM_ARRAY_TASK_ID", &id)?;
        let index = id
            .checked_sub(min)
            .ok_or_else(|| Error::usage(format!("SLURM_ARRAY_TASK_ID {id} is below SLURM_ARRAY_TASK_MIN {min}")))?;
        return checked(&format!("{} auto (Slurm array)", Arg::Shard), index, count);
    }
    if let Some(i) = env("JOB_COMPLETION_INDEX") {
        let n = shard_count.ok_or_else(|| {
            Error::usage(format!(
                "{} auto in a Kubernetes indexed Job needs {} N (the Job's completions)",
                Arg::Shard,
                Arg::ShardCount
            ))
        })?;
        let count = count_arg(&Arg::ShardCount.to_string(), n)?;
        let index = index_arg("JOB_COMPLETION_INDEX", &i)?;
        return checked(&format!("{} auto (JOB_COMPLETION_INDEX)", Arg::Shard), index, count);
    }
    Err(Error::usage(format!(
        "{shard} auto: neither SLURM_ARRAY_TASK_ID nor JOB_COMPLETION_INDEX is set (give {shard} K/N instead)",
        shard = Arg::Shard
    )))
}

/// This process's part of a batch's work list. Without a shard: every item, as given. With one: the shard's items of
/// the sorted list without repeats, after writing the shard's manifest beside `results` (when the command writes
/// one), which names every item of the whole list by `item_key` under the results lines' field `key`, so that
/// `gather` can name items a shard never recorded. `what` names the items in the progress line (`models`).
pub fn select<T: Ord + Clone>(
    items: &[T],
    shard: Option<Shard>,
    results: Option<&Path>,
    key: &str,
    item_key: impl Fn(&T) -> serde_json::Value,
    command: &str,
    what: &str,
) -> Result<Vec<T>> {
    let Some(shard) = shard else { return Ok(items.to_vec()) };
    let mut all = items.to_vec();
    all.sort();
    all.dedup();
    if let Some(results) = results {
        Manifest::new(shard, key, all.iter().map(item_key).collect()).write_for(results)?;
    }
    let mine = partition(&all, shard);
    eprintln!("graft: {command}: shard {shard}: {} of {} {what}", mine.len(), all.len());
    Ok(mine)
}

/// Runs `each` on every item of a batch (checkpoints, models, configs). With several items a failing one must not
/// hide the others: its error goes to `failed` (the caller reports it: a line on stderr, a JSON line) and the batch
/// goes on; the result then counts the failures ("N of M {what_failed}"). A single item's error is returned as it
/// is. An error from `failed` itself (a closed output) ends the batch with that error.
pub fn run_batch<T>(
    items: &[T],
    what_failed: &str,
    mut each: impl FnMut(&T) -> Result<()>,
    mut failed: impl FnMut(&T, &Error) -> Result<()>,
) -> Result<()> {
    let mut failures = 0usize;
    for item in items {
        match each(item) {
            Ok(()) => {}
            Err(e) if items.len() > 1 => {
                failures += 1;
                failed(item, &e)?;
            }
            Err(e) => return Err(e),
        }
    }
    match failures {
        0 => Ok(()),
        n => Err(Error::invalid(format!("{n} of {} {what_failed}", items.len()))),
    }
}

/// Whether item `position` of the sorted work list belongs to `shard`.
pub fn owns(shard: Shard, position: usize) -> bool {
    position % shard.count == shard.index
}

/// The items of `shard` from a work list, after sorting and removing repeats (so every process sees one order).
pub fn partition<T: Ord + Clone>(items: &[T], shard: Shard) -> Vec<T> {
    let mut sorted = items.to_vec();
    sorted.sort();
    sorted.dedup();
    sorted.into_iter().enumerate().filter(|(i, _)| owns(shard, *i)).map(|(_, x)| x).collect()
}

/// What a shard writes beside its results file, so that a gather can tell a missing item from one never asked for.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// Always `graft-shard/1`.
    pub format: String,
    pub shard: usize,
    pub count: usize,
    /// The JSON field of a results line that names its item.
    pub key: String,
    /// The keys of the whole work list (every shard's), in partition order: strings (a path), or for items named by
    /// several values (a pair of models) JSON arrays.
    pub items: Vec<serde_json::Value>,
}

const MANIFEST_FORMAT: &str = "graft-shard/1";

/// The manifest path of a results file: `FILE.shard.json`.
pub fn manifest_path(results: &Path) -> PathBuf {
    let mut s = results.as_os_str().to_owned();
    s.push(".shard.json");
    PathBuf::from(s)
}

impl Manifest {
    pub fn new(shard: Shard, key: &str, items: Vec<serde_json::Value>) -> Manifest {
        Manifest { format: MANIFEST_FORMAT.into(), shard: shard.index, count: shard.count, key: key.into(), items }
    }

    /// Writes the manifest of `results`; a shard restarted with another partition is refused, not mixed in.
    pub fn write_for(&self, results: &Path) -> Result<()> {
        let path = manifest_path(results);
        if let Ok(old) = Manifest::read(&path) {
            if old != *self {
                return Err(Error::usage(format!(
                    "{}: written by shard {}/{} over another work list; use a new results file for this one",
                    path.display(),
                    old.shard,
                    old.count
                )));
            }
            return Ok(());
        }
        let text = serde_json::to_string_pretty(self).expect("plain struct") + "\n";
        crate::checkpoint::write_atomic(&path, text.as_bytes())
    }

    pub fn read(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let m: Manifest =
            serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not a shard manifest: {e}")))?;
        if m.format != MANIFEST_FORMAT || m.count == 0 || m.shard >= m.count {
            return Err(Error::format(path, format!("not a {MANIFEST_FORMAT} manifest of a shard K/N with K < N")));
        }
        Ok(m)
    }
}

/// Names a few items of a long list in a one-line message.
fn some(items: &[String]) -> String {
    const SHOWN: usize = 8;
    let mut s = items.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if items.len() > SHOWN {
        s.push_str(&format!(" and {} more", items.len() - SHOWN));
    }
    s
}

/// Joins shard results files (each with its manifest) into the lines one process would have written, in work-list
/// order. Every item must be recorded exactly once: a missing shard, a missing item or an item recorded twice is an
/// error that names them.
pub fn gather(files: &[PathBuf]) -> Result<String> {
    if files.is_empty() {
        return Err(Error::usage("gather needs at least one shard results file"));
    }
    let mut reference: Option<(Manifest, &Path)> = None;
    let mut shard_files: BTreeMap<usize, &Path> = BTreeMap::new();
    let mut lines: BTreeMap<String, (String, &Path)> = BTreeMap::new();
    let mut duplicated: BTreeSet<String> = BTreeSet::new();
    let mut strays: Vec<String> = Vec::new();
    for file in files {
        let mpath = manifest_path(file);
        if !mpath.exists() {
            return Err(Error::format(
                file,
                format!(
                    "no shard manifest {} (shard results are written by {} with {})",
                    mpath.display(),
                    Arg::Shard,
                    Arg::Resume
                ),
            ));
        }
        let m = Manifest::read(&mpath)?;
        match &reference {
            None => reference = Some((m.clone(), file)),
            Some((r, rfile)) => {
                if r.count != m.count || r.items != m.items || r.key != m.key {
                    return Err(Error::format(
                        &mpath,
                        format!(
                            "shard {}/{} is of another work list than {} (shard {}/{})",
                            m.shard,
                            m.count,
                            rfile.display(),
                            r.shard,
                            r.count
                        ),
                    ));
                }
            }
        }
        if let Some(other) = shard_files.insert(m.shard, file) {
            return Err(Error::usage(format!(
                "shard {}/{} given twice: {} and {}",
                m.shard,
                m.count,
                other.display(),
                file.display()
            )));
        }
        let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
        // A last line without its newline is a shard cut short mid-write: its item counts as missing.
        let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
        for (n, line) in complete.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| Error::format(file, format!("line {}: not a JSON line: {e}", n + 1)))?;
            let key = line_key(&v, &m.key).ok_or_else(|| {
                Error::format(file, format!("line {}: no \"{}\" field naming its item", n + 1, m.key))
            })?;
            match lines.entry(key) {
                std::collections::btree_map::Entry::Occupied(e) => {
                    duplicated.insert(e.key().clone());
                }
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert((line.to_string(), file));
                }
            }
        }
    }
    let (manifest, _) = reference.expect("at least one file");
    let items: Vec<String> = manifest.items.iter().map(key_text).collect();
    let listed: BTreeSet<&str> = items.iter().map(String::as_str).collect();
    for key in lines.keys() {
        if !listed.contains(key.as_str()) {
            strays.push(key.clone());
        }
    }
    let missing: Vec<String> = items.iter().filter(|k| !lines.contains_key(*k)).cloned().collect();
    let absent_shards: Vec<String> = (0..manifest.count)
        .filter(|k| !shard_files.contains_key(k))
        .map(|k| format!("{k}/{}", manifest.count))
        .collect();
    let mut problems = Vec::new();
    if !missing.is_empty() {
        problems.push(format!("{} of {} items missing: {}", missing.len(), items.len(), some(&missing)));
    }
    if !absent_shards.is_empty() {
        problems.push(format!("shards not given: {}", absent_shards.join(", ")));
    }
    if !duplicated.is_empty() {
        let d: Vec<String> = duplicated.into_iter().collect();
        problems.push(format!("{} items recorded more than once: {}", d.len(), some(&d)));
    }
    if !strays.is_empty() {
        problems.push(format!("{} items not in the work list: {}", strays.len(), some(&strays)));
    }
    if !problems.is_empty() {
        return Err(Error::invalid(format!("gather: {}", problems.join("; "))));
    }
    let mut out = String::new();
    for key in &items {
        out.push_str(&lines[key].0);
        out.push('\n');
    }
    Ok(out)
}

/// How an item's key reads in messages and compares: a string as it is, any other value as compact JSON.
pub fn key_text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The key of a results line: its field `key` (absent or null: none).
fn line_key(line: &serde_json::Value, key: &str) -> Option<String> {
    line.get(key).filter(|k| !k.is_null()).map(key_text)
}

/// A batch's results file (`--resume FILE`): one JSON line per finished item, named by the field `key`. Opening it
/// reads which items are done; a last line cut short by a crash is dropped from the file, so that the next append
/// starts on a line of its own.
pub struct Results {
    path: PathBuf,
    done: BTreeSet<String>,
}

impl Results {
    pub fn open(path: &Path, key: &str) -> Result<Results> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(Error::io(path, e)),
        };
        let complete = text.rfind('\n').map_or("", |i| &text[..=i]);
        if complete.len() != text.len() {
            std::fs::write(path, complete).map_err(|e| Error::io(path, e))?;
        }
        let mut done = BTreeSet::new();
        for (n, line) in complete.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .map_err(|e| Error::format(path, format!("line {}: not a JSON line: {e}", n + 1)))?;
            let k =
                line_key(&v, key).ok_or_else(|| Error::format(path, format!("line {}: no \"{key}\" field", n + 1)))?;
            done.insert(k);
        }
        Ok(Results { path: path.to_path_buf(), done })
    }

    /// Whether the item keyed `key` (as `key_text` writes it) is recorded.
    pub fn contains(&self, key: &str) -> bool {
        self.done.contains(key)
    }

    /// Appends one finished item's line (ending in a newline) and syncs it, so a crash loses at most the line being
    /// written.
    pub fn append(&mut self, key: &str, line: &str) -> Result<()> {
        use std::io::Write;
        let path = &self.path;
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| Error::io(path, e))?;
        f.write_all(line.as_bytes()).and_then(|_| f.sync_data()).map_err(|e| Error::io(path, e))?;
        self.done.insert(key.to_string());
        Ok(())
    }
}

/// How a results line names a file or directory item: its canonical path (the path as given where it has none), so
/// that lines written from different working directories agree.
pub fn canonical(path: &str) -> String {
    std::fs::canonicalize(path).map(|p| p.display().to_string()).unwrap_or_else(|_| path.to_string())
}

/// Arguments as given, with quoted globs (`*`, `?`, `[...]` in an argument that is not itself a path) expanded in
/// sorted order, so that N processes started with the same quoted glob see one list whatever their shell does.
pub fn expand_globs(args: &[String]) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for a in args {
        if Path::new(a).exists() || !a.contains(['*', '?', '[']) {
            out.push(a.clone());
            continue;
        }
        let found = glob(a)?;
        if found.is_empty() {
            return Err(Error::usage(format!("'{a}' matches no file or directory")));
        }
        out.extend(found);
    }
    Ok(out)
}

fn glob(pattern: &str) -> Result<Vec<String>> {
    let absolute = pattern.starts_with('/');
    let mut paths = vec![if absolute { PathBuf::from("/") } else { PathBuf::new() }];
    for part in pattern.split('/').filter(|p| !p.is_empty()) {
        let mut next = Vec::new();
        if !part.contains(['*', '?', '[']) {
            for p in paths {
                let q = p.join(part);
                if q.exists() {
                    next.push(q);
                }
            }
        } else {
            let re = glob_regex(part)?;
            for p in paths {
                let dir = if p.as_os_str().is_empty() { Path::new(".") } else { p.as_path() };
                let Ok(entries) = std::fs::read_dir(dir) else { continue };
                let mut names: Vec<String> =
                    entries.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
                names.sort();
                for n in names {
                    // As in shells, wildcards do not match a leading dot.
                    if re.is_match(&n) && (!n.starts_with('.') || part.starts_with('.')) {
                        next.push(p.join(n));
                    }
                }
            }
        }
        paths = next;
    }
    Ok(paths.into_iter().map(|p| p.display().to_string()).collect())
}

fn glob_regex(part: &str) -> Result<regex::Regex> {
    let mut re = String::from("^");
    let mut chars = part.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '*' => re.push_str(".*"),
            '?' => re.push('.'),
            '[' => {
                let mut class = String::from("[");
                if chars.peek() == Some(&'!') {
                    chars.next();
                    class.push('^');
                }
                let mut closed = false;
                for d in chars.by_ref() {
                    if d == ']' {
                        closed = true;
                        break;
                    }
                    if d == '\\' || d == '[' {
                        class.push('\\');
                    }
                    class.push(d);
                }
                if !closed {
                    return Err(Error::usage(format!("glob '{part}': unclosed '['")));
                }
                class.push(']');
                re.push_str(&class);
            }
            c => re.push_str(&regex::escape(&c.to_string())),
        }
    }
    re.push('$');
    regex::Regex::new(&re).map_err(|e| Error::usage(format!("glob '{part}': {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string())
    }

    #[test]
    fn a_batch_goes_on_past_failures_and_counts_them() {
        let items = [1, 2, 3, 4];
        let mut done = Vec::new();
        let mut reported = Vec::new();
        let e = run_batch(
            &items,
            "items failed",
            |&i| {
                done.push(i);
                if i % 2 == 0 {
                    Err(Error::invalid(format!("item {i} is even")))
                } else {
                    Ok(())
                }
            },
            |&i, e| {
                reported.push((i, e.to_string()));
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!(done, items, "every item runs");
        assert_eq!(reported, [(2, "item 2 is even".to_string()), (4, "item 4 is even".to_string())]);
        assert_eq!(e.to_string(), "2 of 4 items failed");
        assert_eq!(e.exit_code(), 1);
    }

    #[test]
    fn a_single_item_batch_returns_its_own_error_and_a_failing_report_ends_the_batch() {
        let never = |_: &u8, _: &Error| -> Result<()> { panic!("a single item is not reported") };
        let e = run_batch(&[7u8], "failed", |_| Err(Error::usage("bad seven")), never).unwrap_err();
        assert_eq!((e.to_string(), e.exit_code()), ("bad seven".to_string(), 2));
        assert!(run_batch(&[1u8, 2], "failed", |_| Ok(()), never).is_ok());
        let mut ran = 0;
        let e = run_batch(
            &[1u8, 2, 3],
            "failed",
            |_| {
                ran += 1;
                Err(Error::invalid("x"))
            },
            |_, _| Err(Error::invalid("stdout closed")),
        )
        .unwrap_err();
        assert_eq!((e.to_string(), ran), ("stdout closed".to_string(), 1));
    }

    #[test]
    fn parses_k_of_n_and_refuses_bad_ones() {
        assert_eq!(parse("0/4").unwrap(), Shard { index: 0, count: 4 });
        assert_eq!(parse("3/4").unwrap(), Shard { index: 3, count: 4 });
        for bad in ["4/4", "5/4", "0/0", "a/4", "1/b", "1", "-1/4", "1/4/5", ""] {
            let e = parse(bad).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}: {e}");
        }
    }

    #[test]
    fn environment_of_slurm_arrays_and_indexed_jobs() {
        let none = env(&[]);
        assert_eq!(resolve(None, None, &none).unwrap(), None);
        assert!(resolve(Some("auto"), None, &none).is_err());
        let slurm =
            env(&[("SLURM_ARRAY_TASK_ID", "6"), ("SLURM_ARRAY_TASK_COUNT", "4"), ("SLURM_ARRAY_TASK_MIN", "4")]);
        assert_eq!(resolve(Some("auto"), None, &slurm).unwrap(), Some(Shard { index: 2, count: 4 }));
        let past = env(&[("SLURM_ARRAY_TASK_ID", "4"), ("SLURM_ARRAY_TASK_COUNT", "4")]);
        assert_eq!(resolve(Some("auto"), None, &past).unwrap_err().exit_code(), 2);
        let k8s = env(&[("JOB_COMPLETION_INDEX", "1")]);
        assert_eq!(resolve(None, Some("3"), &k8s).unwrap(), Some(Shard { index: 1, count: 3 }));
        assert!(resolve(Some("auto"), None, &k8s).is_err(), "indexed Jobs need --shard-count");
        assert!(resolve(Some("auto"), Some("0"), &k8s).is_err());
        assert!(resolve(Some("1/2"), Some("2"), &k8s).is_err());
        // An explicit K/N wins over the environment.
        assert_eq!(resolve(Some("0/2"), None, &slurm).unwrap(), Some(Shard { index: 0, count: 2 }));
    }

    #[test]
    fn shards_cover_the_list_exactly_once_in_any_input_order() {
        let items: Vec<String> = (0..23).map(|i| format!("m{i:02}")).collect();
        let mut shuffled = items.clone();
        shuffled.reverse();
        shuffled.push("m05".into()); // a repeat is one item
        for count in 1..=7 {
            let mut seen: Vec<String> = Vec::new();
            for index in 0..count {
                let part = partition(&shuffled, Shard { index, count });
                assert_eq!(part, partition(&items, Shard { index, count }));
                // Round robin: sizes differ by at most one.
                assert!(part.len() == 23 / count || part.len() == 23 / count + 1);
                seen.extend(part);
            }
            seen.sort();
            assert_eq!(seen, items, "N = {count}");
        }
    }
}
