//! Git Re-Basin alignment: find the permutations of a model's hidden units that make it closest to a reference
//! model, and write the permuted (functionally identical) model.
//!
//! - `spec`: permutation specs as data (file format, validation against a checkpoint).
//! - `builtin`: the built-in specs (`mlp`, `cnn`, `bert`, `llama`) inferred from names, shapes and config.json.
//! - `matching`: weight matching, the coordinate-ascent search over groups.
//! - `lap`: the exact linear assignment solver it calls.
//! - `permute`: permutations, gathers and the streamed write of a permuted checkpoint.
//! - `request`: `graft align` as a typed request (align, cycle check or spec), validated before any file is opened.
//!
//! This file ties them together: choosing a spec, aligning and writing, and the cycle-consistency check.

pub mod builtin;
pub mod lap;
pub mod matching;
pub mod permute;
pub mod request;
pub mod spec;

use std::path::Path;

use serde::Serialize;

pub use builtin::Arch;
pub use matching::{Options, Report};
pub use permute::Perms;
pub use spec::{Resolved, Spec};

use crate::checkpoint::{Checkpoint, CheckpointWriter, WriterOptions, Written};
use crate::error::Result;
use crate::exec::Executor;

/// The spec to use for `ck`: a spec file, a named built-in, or the built-in detected from config.json and names.
pub fn choose_spec(
    ck: &Checkpoint,
    file: Option<&Path>,
    arch: Option<Arch>,
    families: &builtin::Families,
    opts: builtin::Options,
) -> Result<(Spec, String)> {
    if let Some(f) = file {
        return Ok((Spec::load(f)?, format!("spec file {}", f.display())));
    }
    let arch = match arch {
        Some(a) => a,
        None => builtin::detect(ck, families)?,
    };
    let spec = builtin::infer(arch, ck, opts)?;
    Ok((spec, arch.name().to_string()))
}

/// Aligns `model` to `reference` and writes the aligned model (a copy of `model` with its permutations applied;
/// config and tokenizer files carried from the model's directory).
pub fn align_and_write(
    reference: &Checkpoint,
    model: &Checkpoint,
    spec: &Resolved,
    opts: Options,
    out: &Path,
    mut writer_opts: WriterOptions,
    exec: &Executor,
) -> Result<(Perms, Report, Written)> {
    let (perms, report) = matching::weight_matching(reference, model, spec, None, opts, exec)?;
    writer_opts.carry_from =
        if out.extension().is_some_and(|e| e == "safetensors") { None } else { model.dir().map(Path::to_path_buf) };
    let writer = CheckpointWriter::create(out, permute::same_decls(model), writer_opts)?;
    let written = permute::write_permuted(model, spec, &perms, writer, exec, "align")?;
    Ok((perms, report, written))
}

/// How far a permuted model is from the original.
#[derive(Clone, Debug, Serialize)]
pub struct Distance {
    /// Groups whose permutation is the identity, out of `groups`.
    pub identity_groups: usize,
    pub groups: usize,
    /// Fraction of all units (over all groups) that stay in place.
    pub fixed_units: f64,
    /// `||W - P(W)|| / ||W||` over the permuted float tensors.
    pub relative_distance: f64,
    /// Sum over permuted float tensors of the mean squared difference (the reference study's cycle loss).
    pub mse_sum: f64,
}

fn distance(ck: &Checkpoint, spec: &Resolved, perms: &Perms, exec: &Executor) -> Result<Distance> {
    let (sq, norm, mse_sum) = matching::distance(ck, ck, spec, perms, exec)?;
    let units: usize = perms.iter().map(|p| p.len()).sum();
    let fixed: usize = perms.iter().map(|p| p.iter().enumerate().filter(|(i, &j)| *i == j).count()).sum();
    Ok(Distance {
        identity_groups: perms.iter().filter(|p| permute::is_identity(p)).count(),
        groups: perms.len(),
        fixed_units: if units == 0 { 1.0 } else { fixed as f64 / units as f64 },
        relative_distance: if norm > 0.0 { (sq / norm).sqrt() } else { 0.0 },
        mse_sum,
    })
}

/// Aligning one model to the reference and its aligned copy back to the model.
#[derive(Clone, Debug, Serialize)]
pub struct PairCycle {
    pub model: String,
    /// The alignment of the model to the reference.
    pub forward: Report,
    /// Passes of the alignment of the aligned copy back to the model.
    pub back_iterations: usize,
    /// The composition of both alignments against the identity: how far the round trip lands from the model.
    pub round_trip: Distance,
}

/// Aligning each model to the previous one around the loop `m0 <- m1 <- ... <- m0`.
#[derive(Clone, Debug, Serialize)]
pub struct LoopCycle {
    pub models: Vec<String>,
    /// The composition of the alignments around the loop, applied to `m0`, against `m0`.
    pub composed: Distance,
}

#[derive(Clone, Debug, Serialize)]
pub struct CycleReport {
    pub reference: String,
    pub pairs: Vec<PairCycle>,
    #[serde(rename = "loop")]
    pub cycle: LoopCycle,
}

/// Cycle consistency of alignment. For each model `M` after the first (the reference `A`): align `M` to `A` (`P`),
/// align the result back to `M` (`Q`) and measure `Q(P(M))` against `M`, as the reference study does. Then around
/// the loop of all checkpoints, align each to the one before it and measure how far the composed permutation moves
/// the first; a cycle-consistent alignment composes to the identity.
pub fn cycle(
    checkpoints: &[(String, Checkpoint)],
    spec: &Resolved,
    opts: Options,
    exec: &Executor,
) -> Result<CycleReport> {
    let (ref_name, reference) = &checkpoints[0];
    let mut pairs = Vec::new();
    let mut forward_perms = Vec::new();
    for (name, model) in &checkpoints[1..] {
        let (p, forward) = matching::weight_matching(reference, model, spec, None, opts, exec)?;
        // Aligning P(M) back to M from the identity is aligning M to itself starting from P: the result R is the
        // round trip's composed permutation directly, with no permuted copy written.
        let (round, back) = matching::weight_matching(model, model, spec, Some(p.clone()), opts, exec)?;
        pairs.push(PairCycle {
            model: name.clone(),
            forward,
            back_iterations: back.iterations,
            round_trip: distance(model, spec, &round, exec)?,
        });
        forward_perms.push(p);
    }
    // Loop m0 <- m1 <- ... <- m_{k-1} <- m0: P_i aligns m_{i+1} to m_i, so m0 ~ P_0(P_1(...P_{k-1}(m0))).
    let k = checkpoints.len();
    let mut steps: Vec<Perms> = vec![forward_perms[0].clone()];
    for i in 1..k {
        let (_, target) = &checkpoints[i];
        let (_, source) = &checkpoints[(i + 1) % k];
        steps.push(matching::weight_matching(target, source, spec, None, opts, exec)?.0);
    }
    let mut composed = steps[k - 1].clone();
    for p in steps[..k - 1].iter().rev() {
        composed = permute::compose(&composed, p);
    }
    Ok(CycleReport {
        reference: ref_name.clone(),
        pairs,
        cycle: LoopCycle {
            models: checkpoints.iter().map(|(n, _)| n.clone()).collect(),
            composed: distance(reference, spec, &composed, exec)?,
        },
    })
}
