//! Batches of merge configs: several configs (or quoted globs of them) merged one by one, each as a merge of its own
//! (a multi-document config with its stages) into `<output>/<config name>`. `--shard K/N` splits the configs over
//! processes (`crate::shard`), and a results file (`--resume FILE`) records a line per merged output, read back from
//! the disk, and makes a later run skip the configs it records.
//!
//! `Batch::prepare` expands and checks the work list once; the caller then runs `Batch::merge` on each config of
//! `Batch::configs`, so that it decides how a failing config is reported while the others go on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::job::{Job, Work};
use super::request::{Event, Options};
use crate::checkpoint::Checkpoint;
use crate::error::{Arg, Error, Result};
use crate::exec::Executor;
use crate::shard::{self, Results};

/// Whether `path` names a mergekit YAML config (`.yml`/`.yaml`).
pub fn is_config_file(path: &Path) -> bool {
    path.extension().is_some_and(|e| e == "yml" || e == "yaml")
}

/// Whether `inputs` are a batch of configs: several configs, a quoted glob, or any config with a shard or a results
/// file (`batch_options`); otherwise they are one merge's models or config.
pub fn is_batch(inputs: &[PathBuf], batch_options: bool) -> bool {
    let globbed = inputs.iter().any(|p| !p.exists() && p.to_string_lossy().contains(['*', '?', '[']));
    let several_configs = inputs.len() > 1 && inputs.iter().all(|p| is_config_file(p));
    globbed || batch_options || several_configs
}

/// One merged output of a batch, as its results line records it.
#[derive(serde::Serialize)]
struct BatchLine {
    /// The config's canonical path (the line's key).
    config: String,
    output: String,
    method: Option<String>,
    tensors: usize,
    params: u64,
    /// The output directory's files and their sizes, by name.
    files: BTreeMap<String, u64>,
}

/// Describes a batch's output as written (read back from the disk, not from the merge's own account).
fn batch_line(config: String, out: &Path) -> Result<BatchLine> {
    let ck = Checkpoint::open(out)?;
    let method = ck
        .metadata()
        .get("graft.merge")
        .and_then(|m| serde_json::from_str::<serde_json::Value>(m).ok())
        .and_then(|m| m.get("method").and_then(|x| x.as_str()).map(str::to_string));
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(out).map_err(|e| Error::io(out, e))? {
        let entry = entry.map_err(|e| Error::io(out, e))?;
        let meta = entry.metadata().map_err(|e| Error::io(entry.path(), e))?;
        if meta.is_file() {
            files.insert(entry.file_name().to_string_lossy().into_owned(), meta.len());
        }
    }
    Ok(BatchLine {
        config,
        output: out.display().to_string(),
        method,
        tensors: ck.infos().len(),
        params: ck.infos().iter().map(|t| t.numel() as u64).sum(),
        files,
    })
}

fn name_of(config: &str) -> String {
    Path::new(config).file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default()
}

/// A batch ready to run: this process's configs, and the results file.
pub struct Batch {
    configs: Vec<String>,
    options: Options,
    dir: PathBuf,
    results: Option<Results>,
}

impl Batch {
    /// Expands the job's batch (globs, sorted, without repeats), checks that every item is a config and that no two
    /// share an output, takes this shard's part (writing its manifest beside the results file), and creates the
    /// output directory. A job that is not a batch is refused.
    pub fn prepare(job: &Job) -> Result<Batch> {
        job.validate()?;
        let Work::Batch { configs, shard, resume } = &job.work else {
            return Err(Error::invalid("Batch::prepare takes a batch of configs"));
        };
        let mut configs = shard::expand_globs(configs)?;
        if let Some(c) = configs.iter().find(|c| !is_config_file(Path::new(c))) {
            return Err(Error::usage(format!(
                "{c} is not a YAML config: several configs, a glob, {} and {} are for batches of mergekit configs, \
                 one merge each",
                Arg::Shard,
                Arg::Resume
            )));
        }
        configs.sort();
        configs.dedup();
        let dir = job.output.clone();
        let mut by_name: BTreeMap<String, &str> = BTreeMap::new();
        for c in &configs {
            if let Some(other) = by_name.insert(name_of(c), c) {
                return Err(Error::usage(format!(
                    "{other} and {c} would both be merged into {}; rename one",
                    dir.join(name_of(c)).display()
                )));
            }
        }
        let item = |c: &String| serde_json::Value::String(shard::canonical(c));
        let mine = shard::select(&configs, *shard, resume.as_deref(), "config", item, "merge", "configs")?;
        let mut batch = Batch { configs: mine, options: job.options.clone(), dir, results: None };
        if batch.configs.is_empty() {
            return Ok(batch);
        }
        if !job.options.dry_run {
            std::fs::create_dir_all(&batch.dir).map_err(|e| Error::io(&batch.dir, e))?;
        }
        batch.results = resume.as_deref().map(|f| Results::open(f, "config")).transpose()?;
        Ok(batch)
    }

    /// This process's configs, in the order they run.
    pub fn configs(&self) -> &[String] {
        &self.configs
    }

    /// Merges one config (one of `configs`) into `<output>/<config name>`, unless the results file records it;
    /// then records it there.
    pub fn merge(&mut self, config: &str, exec: &Executor, report: &mut dyn FnMut(Event) -> Result<()>) -> Result<()> {
        let key = shard::canonical(config);
        if self.results.as_ref().is_some_and(|r| r.contains(&key)) {
            return report(Event::Note(format!("graft: merge: {config}: already in the results file, skipped")));
        }
        let out = self.dir.join(name_of(config));
        super::stages::run_file(Path::new(config), &self.options, &out, None, exec, report)?;
        if let (Some(r), false) = (self.results.as_mut(), self.options.dry_run) {
            let line = serde_json::to_string(&batch_line(key.clone(), &out)?).expect("plain struct");
            r.append(&key, &(line + "\n"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(configs: &[&str], output: PathBuf) -> Job {
        Job {
            work: Work::Batch { configs: configs.iter().map(|c| c.to_string()).collect(), shard: None, resume: None },
            options: Options::default(),
            output,
            intermediate_dir: None,
        }
    }

    #[test]
    fn a_bad_work_list_is_refused_before_the_output_directory_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        for (configs, want) in [
            (&["/x/a.yml", "/y/a.yaml"][..], "/x/a.yml and /y/a.yaml would both be merged into"),
            (&["/x/a.yml", "/x/model.safetensors"][..], "/x/model.safetensors is not a YAML config"),
        ] {
            let e = Batch::prepare(&job(configs, out.clone())).err().expect("refused");
            assert!(matches!(e, Error::Usage(_)) && e.to_string().contains(want), "{e}");
            assert!(!out.exists());
        }
        let batch = Batch::prepare(&job(&["/x/b.yml", "/x/a.yml", "/x/b.yml"], out.clone())).unwrap();
        assert_eq!(batch.configs(), ["/x/a.yml", "/x/b.yml"], "sorted, without repeats");
        assert!(out.is_dir());
    }

    #[test]
    fn inputs_are_a_batch_when_several_configs_a_glob_or_batch_options() {
        let p = |s: &[&str]| s.iter().map(PathBuf::from).collect::<Vec<_>>();
        assert!(!is_batch(&p(&["/nonexistent/c.yml"]), false));
        assert!(is_batch(&p(&["/nonexistent/c.yml"]), true));
        assert!(is_batch(&p(&["/nonexistent/a.yml", "/nonexistent/b.yaml"]), false));
        assert!(is_batch(&p(&["/nonexistent/*.yml"]), false));
        assert!(!is_batch(&p(&["/nonexistent/a", "/nonexistent/b"]), false), "models to merge");
    }
}
