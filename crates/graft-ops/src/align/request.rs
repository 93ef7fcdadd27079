//! `graft align` as a typed request: align one model to a reference and write it, check the cycle consistency of
//! several, or show the permutation spec a model gets. `Request::validate` checks the request without opening a
//! file; `run` opens the checkpoints, chooses and resolves the spec (a spec file, a named built-in, or the built-in
//! detected from the model), and carries out the task.

use std::path::PathBuf;

use super::{builtin, Arch, CycleReport, Options, Report, Spec};
use crate::checkpoint::{Checkpoint, WriterOptions, Written};
use crate::error::{Arg, Error, Result};
use crate::exec::Executor;

/// What to do.
#[derive(Clone, Debug)]
pub enum Task {
    /// Align `model` to `reference` and write the aligned model to `output`.
    Align { reference: PathBuf, model: PathBuf, output: PathBuf, writer: WriterOptions },
    /// Align each model to the first checkpoint and back, and around the loop of all of them.
    Cycle { checkpoints: Vec<PathBuf> },
    /// The permutation spec `model` gets, checked against it.
    PrintSpec { model: PathBuf },
}

#[derive(Clone, Debug)]
pub struct Request {
    pub task: Task,
    /// A built-in spec by name (default: detected from config.json and tensor names).
    pub arch: Option<Arch>,
    /// A spec file instead of a built-in.
    pub spec: Option<PathBuf>,
    /// The built-in spec of each trained architecture, by `graft_arch` name, for detection (`builtin::Families`).
    pub families: Vec<(&'static str, Arch)>,
    pub builtin: builtin::Options,
    pub matching: Options,
}

/// What `run` did.
pub enum Outcome {
    /// The spec (as chosen, before resolving) and how it was chosen.
    Spec {
        spec: Spec,
        label: String,
    },
    Cycle {
        report: CycleReport,
        label: String,
    },
    Aligned {
        report: Report,
        written: Written,
        label: String,
    },
}

impl Request {
    /// The checks that need no file.
    pub fn validate(&self) -> Result<()> {
        if self.matching.max_iter == 0 {
            return Err(Error::usage(format!("{} must be at least 1", Arg::MaxIter)));
        }
        if self.arch.is_some() && self.spec.is_some() {
            return Err(Error::usage(format!("{} and {} choose the spec two ways; give one", Arg::Arch, Arg::Spec)));
        }
        match &self.task {
            Task::Cycle { checkpoints } if checkpoints.len() < 2 => {
                Err(Error::usage(format!("{} takes the reference and at least one model", Arg::Cycle)))
            }
            _ => Ok(()),
        }
    }

    fn choose_spec(&self, ck: &Checkpoint) -> Result<(Spec, String)> {
        super::choose_spec(ck, self.spec.as_deref(), self.arch, &self.families, self.builtin)
    }
}

/// Carries out the request (see the module header).
pub fn run(request: &Request, exec: &Executor) -> Result<Outcome> {
    request.validate()?;
    match &request.task {
        Task::PrintSpec { model } => {
            let ck = Checkpoint::open(model)?;
            let (spec, label) = request.choose_spec(&ck)?;
            spec.resolve(&ck)?;
            Ok(Outcome::Spec { spec, label })
        }
        Task::Cycle { checkpoints } => {
            let cks: Vec<(String, Checkpoint)> = checkpoints
                .iter()
                .map(|p| Ok((p.display().to_string(), Checkpoint::open(p)?)))
                .collect::<Result<_>>()?;
            let (spec, label) = request.choose_spec(&cks[0].1)?;
            let spec = spec.resolve(&cks[0].1)?;
            let report = super::cycle(&cks, &spec, request.matching, exec)?;
            Ok(Outcome::Cycle { report, label })
        }
        Task::Align { reference, model, output, writer } => {
            let (r, m) = (Checkpoint::open(reference)?, Checkpoint::open(model)?);
            let (spec, label) = request.choose_spec(&m)?;
            let spec = spec.resolve(&m)?;
            let mut writer = writer.clone();
            writer.inputs.extend(r.files());
            writer.inputs.extend(m.files());
            let (_, report, written) = super::align_and_write(&r, &m, &spec, request.matching, output, writer, exec)?;
            Ok(Outcome::Aligned { report, written, label })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn missing(name: &str) -> PathBuf {
        PathBuf::from("/nonexistent/graft-align-test").join(name)
    }

    fn request(task: Task) -> Request {
        Request {
            task,
            arch: None,
            spec: None,
            families: Vec::new(),
            builtin: builtin::Options { permute_residual: false },
            matching: Options { seed: 0, max_iter: 100 },
        }
    }

    #[test]
    fn refusals_come_before_any_file_is_opened() {
        let align = || Task::Align {
            reference: missing("ref"),
            model: missing("model"),
            output: missing("out"),
            writer: WriterOptions::default(),
        };
        let cases = [
            (Request { matching: Options { seed: 0, max_iter: 0 }, ..request(align()) }, "max_iter must be at least 1"),
            (
                Request { arch: Some(Arch::Mlp), spec: Some(missing("spec.yml")), ..request(align()) },
                "arch and spec choose the spec two ways",
            ),
            (
                request(Task::Cycle { checkpoints: vec![missing("a")] }),
                "cycle takes the reference and at least one model",
            ),
        ];
        let exec = Executor::new(Some(1)).unwrap();
        for (r, want) in cases {
            let e = run(&r, &exec).err().expect("refused");
            assert!(matches!(e, Error::Usage(_)) && e.to_string().contains(want), "{e:?}");
        }
        for task in [
            align(),
            Task::Cycle { checkpoints: vec![missing("a"), missing("b")] },
            Task::PrintSpec { model: missing("m") },
        ] {
            let r = request(task);
            assert!(r.validate().is_ok());
            assert!(matches!(run(&r, &exec).err().expect("no checkpoint"), Error::Io { .. }), "then files are opened");
        }
    }
}
