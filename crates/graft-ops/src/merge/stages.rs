//! Running a multi-document config (split and ordered by `super::multi`): each stage's config is written to
//! `<intermediates>/<stage>.yml` and merged, as one single-document merge with the job's options, into
//! `<intermediates>/<stage>` (the output stage into the output path), in dependency order. A stage whose output is
//! complete and whose stamp matches is skipped; an existing output is replaced only with the writer's overwrite
//! (`--force`), and the refusal comes before any stage runs. A dry run lists the stages instead. `run_file` is the
//! entry for a config file of either kind.

use std::path::{Path, PathBuf};

use super::multi::{self, Stages};
use super::request::{Event, Options, PlannedStage};
use crate::error::{Arg, Error, Result};
use crate::exec::Executor;

/// One config file into `output`: a single-document config as one merge, a multi-document one stage by stage
/// (`intermediate_dir`: where its named stages go, default `<output>.stages`).
pub fn run_file(
    file: &Path,
    options: &Options,
    output: &Path,
    intermediate_dir: Option<PathBuf>,
    exec: &Executor,
    report: &mut dyn FnMut(Event) -> Result<()>,
) -> Result<()> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::io(file, e))?;
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let given = intermediate_dir.is_some();
    let intermediates = intermediate_dir.unwrap_or_else(|| multi::default_intermediates(output));
    if let Some(stages) = multi::split(&text, file, &dir, &intermediates)? {
        return run(file, &stages, &intermediates, options, output, exec, report);
    }
    if given {
        return Err(Error::usage(format!("{} applies to multi-document configs only", Arg::IntermediateDir)));
    }
    options.merge(options.load(file, report)?, output.to_path_buf(), exec, report)
}

/// Runs the stages of `file` (see the module header); `output` is where the output stage is written.
pub fn run(
    file: &Path,
    stages: &Stages,
    intermediates: &Path,
    options: &Options,
    output: &Path,
    exec: &Executor,
    report: &mut dyn FnMut(Event) -> Result<()>,
) -> Result<()> {
    let file = file.display().to_string();
    let out_of = |k: usize| -> PathBuf {
        if k == stages.output {
            output.to_path_buf()
        } else {
            intermediates.join(stages.stages[k].stem())
        }
    };
    if options.dry_run {
        let planned = (stages.stages.iter().enumerate())
            .map(|(k, s)| PlannedStage {
                label: s.label(),
                output: out_of(k),
                reads: s.needs.iter().map(|&j| stages.stages[j].stem().to_string()).collect(),
            })
            .collect();
        return report(Event::Stages(planned));
    }
    std::fs::create_dir_all(intermediates).map_err(|e| Error::io(intermediates, e))?;
    let stamp_options = options.stamp();
    // Writes stage k's config file and returns it, its stamp file and the stamp it would write now.
    let prepare = |k: usize| -> Result<(PathBuf, PathBuf, String)> {
        let stage = &stages.stages[k];
        let config_file = intermediates.join(format!("{}.yml", stage.stem()));
        crate::files::write_atomic(&config_file, stage.yaml.as_bytes())?;
        // The inputs as the stage will read them; a config that does not load is reported when the stage runs.
        let inputs =
            super::config::load(&config_file, options.lenient).map(|l| l.config.model_paths()).unwrap_or_default();
        let stamp = multi::stamp(&stage.yaml, &stamp_options, &inputs);
        Ok((config_file, intermediates.join(format!("{}.stamp.json", stage.stem())), stamp))
    };
    // An existing output is replaced only with --force: refuse before any stage runs if the output or a stage it
    // reads is out of date.
    if !options.writer.overwrite && output.exists() {
        let mut chain = vec![stages.output];
        let mut i = 0;
        while i < chain.len() {
            for &j in &stages.stages[chain[i]].needs {
                if !chain.contains(&j) {
                    chain.push(j);
                }
            }
            i += 1;
        }
        chain.sort_unstable();
        for k in chain {
            let (_, stamp_file, stamp) = prepare(k)?;
            if !multi::is_current(&out_of(k), &stamp_file, &stamp) {
                return Err(Error::usage(format!(
                    "{file}: {} exists and {} is out of date; pass {} to replace it",
                    output.display(),
                    stages.stages[k].label(),
                    Arg::Force
                )));
            }
        }
    }
    for (k, stage) in stages.stages.iter().enumerate() {
        let out = out_of(k);
        let (config_file, stamp_file, stamp) = prepare(k)?;
        if multi::is_current(&out, &stamp_file, &stamp) {
            report(Event::Note(format!("{file}: {} is up to date: {} (skipped)", stage.label(), out.display())))?;
            continue;
        }
        let _ = std::fs::remove_file(&stamp_file);
        let mut one = options.clone();
        // Intermediates are graft's own files; the output is replaced only with --force, as for any merge.
        one.writer.overwrite |= k != stages.output;
        let merged = one.load(&config_file, report).and_then(|cfg| one.merge(cfg, out, exec, report));
        merged.map_err(|e| {
            let at = format!("{file}: {}", stage.label());
            match e {
                Error::Usage(m) => Error::usage(format!("{at}: {m}")),
                Error::Invalid(m) => Error::invalid(format!("{at}: {m}")),
                other => Error::invalid(format!("{at}: {other}")),
            }
        })?;
        crate::files::write_atomic(&stamp_file, stamp.as_bytes())?;
    }
    Ok(())
}
