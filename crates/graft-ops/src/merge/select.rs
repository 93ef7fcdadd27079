//! SNR-selective top-p merging (the reference study's method): merge only the layers whose weight matrices have the
//! highest Spectrum SNR and copy every other tensor from the reference model.
//!
//! Candidates are the merged weight matrices (float tensors of 2 or more dimensions with a score). They are ranked by
//! SNR, descending (an exactly low-rank matrix, infinite SNR, first; ties in storage order), computed on the
//! reference model (`base`), averaged over the experts (`avg`), or read from a `graft snr` selection file's scores;
//! the top `ceil(P * candidates)` are merged. A 1-D tensor follows the nearest enclosing module that holds candidate
//! matrices: `x.bias` and `x.bn.running_mean`'s siblings first (`x.weight`; a BatchNorm follows the convolution of
//! its block), then further out, never above the tensor's layer (a layer's norm follows that layer's matrices) and,
//! for a tensor outside every layer, never into a module holding layer matrices (so a final norm stays the
//! reference's). It is merged when any matrix it follows is. BatchNorm running statistics (`running_mean`,
//! `running_var`) stay the reference's, as in the reference study.
//!
//! With `alpha = snr`, each merged matrix's interpolation weight between the two experts A and B is
//! `snr_B / (snr_A + snr_B)` (the reference's rule): slerp's `t`, or the weights `(1 - alpha, alpha)` of linear and
//! the task-arithmetic family. A vector takes the mean alpha of the selected matrices it follows. Where alpha is undefined (an unscored matrix, both SNRs zero or both infinite), the configured
//! parameters stay.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::Serialize;

use super::method::AlphaTarget;
use super::plan::{Op, Plan, Source};
use crate::checkpoint::Checkpoint;
use crate::error::{Arg, Error, Result};
use crate::exec::Executor;
use crate::names::layer_of;
use crate::snr::{formats::SelectionFile, scan, ScanOptions};

/// Where the ranking's SNRs come from.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SnrSource {
    /// The reference model (the base).
    Base,
    /// The mean of the experts' SNRs.
    Avg,
    /// The scores of a `graft snr --selection` file.
    File(PathBuf),
}

impl SnrSource {
    /// `base`, `avg`, or any other text as the path of a selection file (as `--snr-from` takes it).
    pub fn parse(s: &str) -> SnrSource {
        match s {
            "base" => SnrSource::Base,
            "avg" => SnrSource::Avg,
            path => SnrSource::File(PathBuf::from(path)),
        }
    }
}

impl std::str::FromStr for SnrSource {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<SnrSource, Self::Err> {
        Ok(SnrSource::parse(s))
    }
}

/// The text `parse` reads back: `base`, `avg` or the file's path.
impl std::fmt::Display for SnrSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SnrSource::Base => f.write_str("base"),
            SnrSource::Avg => f.write_str("avg"),
            SnrSource::File(p) => write!(f, "{}", p.display()),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Alpha {
    /// The configured weights / t.
    Fixed,
    /// `snr_B / (snr_A + snr_B)` per merged layer.
    Snr,
}

#[derive(Clone, Debug, Serialize)]
pub struct SelectOptions {
    pub top_p: f64,
    pub from: SnrSource,
    pub alpha: Alpha,
}

/// Parses `top-p=P` (P in [0, 1]).
pub fn parse_top_p(s: &str) -> Result<f64> {
    let v = s
        .strip_prefix("top-p=")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .ok_or_else(|| Error::usage(format!("{} '{s}': expected top-p=P with P between 0 and 1", Arg::SnrSelect)))?;
    if !(0.0..=1.0).contains(&v) {
        return Err(Error::usage(format!("{} '{s}': P must lie between 0 and 1", Arg::SnrSelect)));
    }
    Ok(v)
}

/// One ranked candidate.
#[derive(Clone, Debug, Serialize)]
pub struct RankedLayer {
    pub name: String,
    /// The ranking SNR (None for JSON infinity: an exactly low-rank matrix).
    #[serde(serialize_with = "finite_or_null")]
    pub snr: f64,
    pub rank: usize,
    pub selected: bool,
    /// The interpolation weight of expert B, with `alpha = snr`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
}

fn finite_or_null<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else {
        s.serialize_none()
    }
}

/// What the selection did (recorded in the output's metadata and printed with `--dry-run`).
#[derive(Clone, Debug, Serialize)]
pub struct SelectionReport {
    pub top_p: f64,
    pub from: SnrSource,
    pub alpha: Alpha,
    pub candidates: usize,
    pub selected: usize,
    /// Every tensor the method computes (selected matrices and the vectors following them).
    pub merged_tensors: usize,
    pub ranking: Vec<RankedLayer>,
}

/// The matrices (indices into the plan) a vector named `name` follows: those under the nearest enclosing module of
/// the vector that holds any, not above its layer, and, for a vector outside layers, only modules without layer
/// matrices. Empty when none qualifies.
pub fn follows(name: &str, matrices: &[(usize, &str)]) -> Vec<usize> {
    let comps: Vec<&str> = name.split('.').collect();
    let layer_pos = comps.iter().position(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    let lowest = layer_pos.map_or(1, |p| p + 1);
    for depth in (lowest..comps.len()).rev() {
        let prefix = comps[..depth].join(".") + ".";
        let under: Vec<&(usize, &str)> = matrices.iter().filter(|(_, m)| m.starts_with(&prefix)).collect();
        if under.is_empty() {
            continue;
        }
        if layer_pos.is_none() && under.iter().any(|(_, m)| layer_of(m).is_some()) {
            return Vec::new();
        }
        return under.iter().map(|(i, _)| *i).collect();
    }
    Vec::new()
}

/// `ceil(p * n)` without floating-point overshoot (0.07 * 100 is 7.000000000000001 in f64: 7, not 8).
pub fn top_count(p: f64, n: usize) -> usize {
    let v = p * n as f64;
    let r = v.round();
    let c = if (v - r).abs() < 1e-9 * v.abs().max(1.0) { r } else { v.ceil() };
    (c.max(0.0) as usize).min(n)
}

/// The models whose SNRs `avg` averages and `alpha` compares: the method's inputs other than its task-vector base
/// (for slerp, whose "base" is just its t = 0 end, both inputs).
fn experts(plan: &Plan) -> Vec<usize> {
    let first = plan.tensors.iter().find_map(|t| {
        if let Op::Merge { inputs, base, .. } = &t.op {
            Some((inputs, *base))
        } else {
            None
        }
    });
    let Some((inputs, base)) = first else { return Vec::new() };
    let skip_base = plan.method.base_role().base_is_reference();
    inputs.iter().enumerate().filter(|(k, _)| !(skip_base && Some(*k) == base)).map(|(_, s)| s.model).collect()
}

fn scores_of(ck: &Checkpoint, exec: &Executor) -> Result<HashMap<String, f64>> {
    let scans = scan(ck, exec, &ScanOptions::default())?;
    Ok(scans.into_iter().filter_map(|t| t.result.score().map(|s| (t.name, s))).collect())
}

/// Applies SNR top-p selection to `plan`: unselected tensors become copies of the reference, and with
/// `alpha = snr` the selected ones get SNR-derived weights.
pub fn apply(plan: &mut Plan, models: &[Checkpoint], exec: &Executor, opts: &SelectOptions) -> Result<SelectionReport> {
    if plan.new_layer_count.is_some()
        || plan.tensors.iter().any(|t| match &t.op {
            Op::Merge { inputs, .. } => inputs.iter().any(|s| s.tensor != t.name),
            Op::Copy { from, .. } => from.tensor != t.name,
        })
    {
        return Err(Error::usage(format!(
            "{} works on merges of whole models (models:), not on slices",
            Arg::SnrSelect
        )));
    }
    if plan.method.contract().max_inputs == Some(1) {
        return Err(Error::usage(format!(
            "{} needs a merge method; {} merges nothing",
            Arg::SnrSelect,
            plan.method.name()
        )));
    }
    let experts = experts(plan);
    let mut expert_scores: Vec<HashMap<String, f64>> = Vec::new();
    if opts.from == SnrSource::Avg || opts.alpha == Alpha::Snr {
        for &e in &experts {
            expert_scores.push(scores_of(&models[e], exec)?);
        }
    }
    let ranking_scores: HashMap<String, f64> = match &opts.from {
        SnrSource::Base => scores_of(&models[plan.reference], exec)?,
        SnrSource::Avg => {
            if expert_scores.is_empty() {
                return Err(Error::usage(format!("{} avg needs at least one expert model", Arg::SnrFrom)));
            }
            let mut avg = HashMap::new();
            for name in expert_scores[0].keys() {
                let all: Option<Vec<f64>> = expert_scores.iter().map(|m| m.get(name).copied()).collect();
                if let Some(all) = all {
                    avg.insert(name.clone(), all.iter().sum::<f64>() / all.len() as f64);
                }
            }
            avg
        }
        SnrSource::File(path) => {
            let f = SelectionFile::read(path)?;
            f.scores.into_iter().map(|(k, v)| (k, if v >= f64::MAX { f64::INFINITY } else { v })).collect()
        }
    };
    // Candidates: merged matrices with a score, in storage order.
    let mut candidates: Vec<(usize, f64)> = plan
        .tensors
        .iter()
        .enumerate()
        .filter(|(_, t)| matches!(t.op, Op::Merge { .. }) && t.shape.len() >= 2)
        .filter_map(|(i, t)| ranking_scores.get(&t.name).map(|&s| (i, s)))
        .collect();
    candidates.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let k = top_count(opts.top_p, candidates.len());
    let selected: Vec<usize> = candidates[..k].iter().map(|c| c.0).collect();
    let is_selected = |i: usize| selected.contains(&i);

    // Alphas of selected matrices.
    let alpha_of = |name: &str| -> Option<f64> {
        if opts.alpha != Alpha::Snr {
            return None;
        }
        let (a, b) = (expert_scores[0].get(name)?, expert_scores[1].get(name)?);
        let alpha = b / (a + b);
        alpha.is_finite().then_some(alpha)
    };
    if opts.alpha == Alpha::Snr && experts.len() != 2 {
        return Err(Error::usage(format!(
            "{} snr needs exactly two expert models; this merge has {}",
            Arg::Alpha,
            experts.len()
        )));
    }
    // slerp takes the SNR weight as its `t`; the weighted methods as their per-model weights.
    let alpha_target = plan.method.snr_alpha();
    // `--alpha snr` with a method that has no such weight was refused before any model was read
    // (`super::request::Request::validate`).
    // Merge-candidate matrices by name, for the vectors to follow.
    let matrices: Vec<(usize, &str)> = plan
        .tensors
        .iter()
        .enumerate()
        .filter(|(_, t)| matches!(t.op, Op::Merge { .. }) && t.shape.len() >= 2)
        .map(|(i, t)| (i, t.name.as_str()))
        .collect();
    let followed: Vec<Option<Vec<usize>>> =
        plan.tensors.iter().map(|t| (t.shape.len() < 2).then(|| follows(&t.name, &matrices))).collect();
    let mut merged_tensors = 0;
    let reference = plan.reference;
    let ranking: Vec<RankedLayer> = candidates
        .iter()
        .enumerate()
        .map(|(r, &(i, s))| RankedLayer {
            name: plan.tensors[i].name.clone(),
            snr: s,
            rank: r + 1,
            selected: r < k,
            alpha: if r < k { alpha_of(&plan.tensors[i].name) } else { None },
        })
        .collect();
    for (i, follow) in followed.iter().enumerate() {
        let t = &plan.tensors[i];
        if !matches!(t.op, Op::Merge { .. }) {
            continue;
        }
        let running_stat = t.name.ends_with(".running_mean") || t.name.ends_with(".running_var");
        let (keep, alpha) = match follow {
            _ if running_stat => (false, None),
            None => (is_selected(i), alpha_of(&t.name)),
            Some(ms) => {
                let chosen: Vec<usize> = ms.iter().copied().filter(|&m| is_selected(m)).collect();
                let alphas: Vec<f64> = chosen.iter().filter_map(|&m| alpha_of(&plan.tensors[m].name)).collect();
                let mean = (!alphas.is_empty()).then(|| alphas.iter().sum::<f64>() / alphas.len() as f64);
                (!chosen.is_empty(), mean)
            }
        };
        let name = t.name.clone();
        if !keep {
            plan.tensors[i].op =
                Op::Copy { from: Source { model: reference, tensor: name }, reason: "not selected by SNR".to_string() };
            continue;
        }
        merged_tensors += 1;
        if let (Some(alpha), Some(target), Op::Merge { inputs, params, .. }) =
            (alpha, alpha_target, &mut plan.tensors[i].op)
        {
            match target {
                AlphaTarget::Shared(name) => {
                    params.shared.insert(name.into(), super::params::Scalar::Num(alpha));
                }
                AlphaTarget::PerInput(name) => {
                    for (e, w) in experts.iter().zip([1.0 - alpha, alpha]) {
                        if let Some(k) = inputs.iter().position(|s| s.model == *e) {
                            params.set_input(k, name, w);
                        }
                    }
                }
            }
        }
    }
    Ok(SelectionReport {
        top_p: opts.top_p,
        from: opts.from.clone(),
        alpha: opts.alpha,
        candidates: candidates.len(),
        selected: k,
        merged_tensors,
        ranking,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vectors_follow_the_nearest_module_with_matrices() {
        let m = [
            (0, "model.embed_tokens.weight"),
            (1, "model.layers.3.self_attn.q_proj.weight"),
            (2, "model.layers.3.mlp.up_proj.weight"),
            (3, "stage1.0.conv1.depthwise.weight"),
            (4, "stage1.0.conv1.pointwise.weight"),
            (5, "stem.depthwise.weight"),
            (6, "x.weight"),
        ];
        assert_eq!(follows("x.bias", &m), vec![6]);
        assert_eq!(follows("model.layers.3.input_layernorm.weight", &m), vec![1, 2]);
        assert_eq!(follows("model.layers.4.input_layernorm.weight", &m), Vec::<usize>::new());
        assert_eq!(follows("stage1.0.conv1.bn_depthwise.running_mean", &m), vec![3, 4]);
        assert_eq!(follows("stem.bn_pointwise.weight", &m), vec![5]);
        assert_eq!(follows("model.norm.weight", &m), Vec::<usize>::new());
    }

    #[test]
    fn top_count_is_a_ceiling_without_float_overshoot() {
        assert_eq!(top_count(0.15, 100), 15);
        assert_eq!(top_count(0.10, 100), 10);
        assert_eq!(top_count(0.07, 100), 7);
        assert_eq!(top_count(0.151, 100), 16);
        assert_eq!(top_count(0.01, 7), 1);
        assert_eq!(top_count(0.0, 7), 0);
        assert_eq!(top_count(1.0, 7), 7);
        assert_eq!(parse_top_p("top-p=0.25").unwrap(), 0.25);
        assert!(parse_top_p("top-k=3").is_err() && parse_top_p("top-p=1.5").is_err());
    }
}
