//! A merge job as a front end asks for it: a merge's options once (`Options`) and what to run with them (`Work`):
//! one merge of a config built from flags, a YAML config file (one merge, or the stages of a multi-document config,
//! `super::stages`), or a batch of config files (`super::batch`). `Job::validate` checks it without reading any
//! file; `run_job` carries out a config or a config file, reporting each merge as an `Event` for the front end to
//! print, and a batch runs config by config through `super::batch::Batch` (so that the front end decides how a
//! failing config is reported while the others go on).

use std::path::PathBuf;

use super::config::MergeConfig;
use super::request::{Event, Options};
use super::stages;
use crate::error::{Arg, Error, Result};
use crate::exec::Executor;
use crate::shard::Shard;

/// What a job merges.
#[derive(Clone, Debug)]
pub enum Work {
    /// One merge of a config the caller built (from flags).
    Config(Box<MergeConfig>),
    /// A mergekit YAML config file: one merge, or a multi-document config's stages.
    File(PathBuf),
    /// Config files or quoted globs of them, each config merged into `<output>/<config name>`. `resume`: the
    /// results file that records each merged output and whose configs are skipped; `shard`: this process's part.
    Batch { configs: Vec<String>, shard: Option<Shard>, resume: Option<PathBuf> },
}

/// A merge job: what to merge, with which options, to where.
#[derive(Clone, Debug)]
pub struct Job {
    pub work: Work,
    pub options: Options,
    /// The output checkpoint (a batch: the directory of the outputs).
    pub output: PathBuf,
    /// A multi-document config: where its named stages are written (default: `<output>.stages`).
    pub intermediate_dir: Option<PathBuf>,
}

impl Job {
    /// The checks that need no file: option combinations the work cannot honour.
    pub fn validate(&self) -> Result<()> {
        self.options.validate()?;
        match &self.work {
            Work::Config(cfg) => {
                if self.intermediate_dir.is_some() {
                    return Err(Error::usage(format!(
                        "{} applies to multi-document configs only",
                        Arg::IntermediateDir
                    )));
                }
                self.options.request(self.options.apply((**cfg).clone())?, self.output.clone()).validate()
            }
            Work::File(_) => Ok(()),
            Work::Batch { .. } if self.intermediate_dir.is_some() => Err(Error::usage(format!(
                "{} applies to one multi-document config; in a batch each config's stages go to OUT/<config \
                 name>.stages",
                Arg::IntermediateDir
            ))),
            Work::Batch { .. } => Ok(()),
        }
    }
}

/// Carries out a job's config or config file (a batch runs through `batch::Batch`, config by config), reporting
/// each merge as it is done.
pub fn run_job(job: &Job, exec: &Executor, report: &mut dyn FnMut(Event) -> Result<()>) -> Result<()> {
    job.validate()?;
    match &job.work {
        Work::Config(cfg) => job.options.merge(job.options.apply((**cfg).clone())?, job.output.clone(), exec, report),
        Work::File(file) => {
            let intermediates = job.intermediate_dir.clone();
            stages::run_file(file, &job.options, &job.output, intermediates, exec, report)
        }
        Work::Batch { .. } => {
            Err(Error::invalid("a batch of configs runs through merge::batch::Batch, one config at a time"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::config::Flags;
    use crate::merge::execute::RunOptions;
    use crate::merge::select::{Alpha, SelectOptions, SnrSource};

    /// Paths no test creates: a check that opened one would fail with an I/O error instead of its own.
    const MISSING: &str = "/nonexistent/graft-request-test";

    fn flags_config(method: &str) -> MergeConfig {
        let missing = |name: &str| PathBuf::from(MISSING).join(name);
        Flags {
            models: vec![missing("a"), missing("b")],
            base: Some(missing("base")),
            ..Flags::new(crate::merge::method(method).unwrap())
        }
        .into_config()
        .unwrap()
    }

    fn job(work: Work, options: Options) -> Job {
        Job { work, options, output: PathBuf::from(MISSING).join("out"), intermediate_dir: None }
    }

    fn refusal(j: &Job) -> String {
        let e = j.validate().unwrap_err();
        assert!(matches!(e, Error::Usage(_)), "a usage error, not {e:?}");
        e.to_string()
    }

    #[test]
    fn a_job_is_refused_before_any_file_is_read() {
        let file = || Work::File(PathBuf::from(MISSING).join("config.yml"));
        let batch = || Work::Batch { configs: vec![format!("{MISSING}/*.yml")], shard: None, resume: None };
        let config = |m: &str| Work::Config(Box::new(flags_config(m)));

        let bad_template = Options { chat_template: Some("nosuch".into()), ..Options::default() };
        for work in [file(), batch(), config("linear")] {
            let e = refusal(&job(work, bad_template.clone()));
            assert!(e.contains("chat_template 'nosuch' is neither 'auto', a named template"), "{e}");
        }
        let short_jinja = Options { chat_template: Some("{{ x }}".into()), ..Options::default() };
        assert!(refusal(&job(file(), short_jinja)).contains("is not a Jinja template"));

        let paper = Options { ties_paper: true, ..Options::default() };
        assert!(refusal(&job(config("linear"), paper.clone())).contains("ties_variant applies to method ties only"));
        assert!(job(config("ties"), paper.clone()).validate().is_ok());
        let compat_paper = Options { run: RunOptions { seed: 0, compat: true }, ..paper };
        assert!(refusal(&job(config("ties"), compat_paper)).contains("does not combine with --ties-variant paper"));

        let snr_alpha = Options {
            select: Some(SelectOptions { top_p: 0.5, from: SnrSource::Base, alpha: Alpha::Snr }),
            ..Options::default()
        };
        assert!(
            refusal(&job(config("model_stock"), snr_alpha.clone())).contains("alpha snr does not apply to model_stock")
        );
        assert!(job(config("slerp"), snr_alpha).validate().is_ok());

        let staged = |work| Job { intermediate_dir: Some(PathBuf::from(MISSING)), ..job(work, Options::default()) };
        assert!(refusal(&staged(config("linear"))).contains("intermediate_dir applies to multi-document configs only"));
        assert!(refusal(&staged(batch())).contains("intermediate_dir applies to one multi-document config"));
        // Whether a file is a multi-document config is known only once it is read.
        assert!(staged(file()).validate().is_ok());
        assert!(
            job(file(), Options::default()).validate().is_ok() && job(batch(), Options::default()).validate().is_ok()
        );
    }

    #[test]
    fn running_a_refused_job_reads_nothing() {
        let exec = Executor::new(Some(1)).unwrap();
        let bad = Options { chat_template: Some("nosuch".into()), ..Options::default() };
        let mut events = Vec::new();
        let e = run_job(&job(Work::File(PathBuf::from(MISSING).join("c.yml")), bad), &exec, &mut |ev| {
            events.push(format!("{ev:?}"));
            Ok(())
        })
        .unwrap_err();
        assert!(matches!(e, Error::Usage(_)) && e.to_string().contains("nosuch"), "{e}");
        assert!(events.is_empty());
        // The same job with good options gets as far as reading the file.
        let e =
            run_job(&job(Work::File(PathBuf::from(MISSING).join("c.yml")), Options::default()), &exec, &mut |_| Ok(()))
                .unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e:?}");
    }
}
