//! `graft apply`: task arithmetic theta = theta_base + sum_i lambda_i tau_i onto a base checkpoint. A negative lambda
//! is task negation. A term is a task vector checkpoint (`graft diff` output) or a fine-tuned model, whose delta
//! `fl32(ft - base)` is computed on the fly exactly as `graft diff` would write it.
//!
//! Per element, the base value and each `lambda_i * tau_i` are added in f64 in the order the terms are given, the sum
//! is rounded to f32, and the executor rounds that to the output dtype (the base's, unless another is asked for).
//! A tensor that no term touches (missing from every vector, or every lambda zero) passes through with the base's
//! bytes, bit for bit; so do non-float tensors.
//!
//! # The rounding bound of diff-then-apply (lambda = 1)
//!
//! Let `f` and `b` be one element of the fine-tuned and base tensors, both exact in f32 (F16/BF16/F32 inputs), and
//! `ulp_F(x)` the spacing of format F at `|x|` (`2^(e - p + 1)` for `2^e <= |x| < 2^(e+1)`, p significand bits), so
//! that rounding to nearest moves a value by at most `ulp_F(x) / 2`.
//!
//! 1. `graft diff` writes `tau = fl32(f - b)`, with `|tau - (f - b)| <= ulp_32(f - b) / 2`.
//! 2. `tau` is exact (`tau = f - b`) when `b/2 <= f <= 2b` (Sterbenz), when `f - b` is subnormal in f32, and, for
//!    inputs stored with p-bit significands whose exponents differ by d, whenever `p + d + 1 <= 24`, or
//!    `p + d <= 24` when f and b have the same sign: `f - b` is then an integer multiple of the smaller input's
//!    ulp below `2^(p+d+1)` (below `2^(p+d)` for a true subtraction), which f32 holds exactly. For BF16 inputs
//!    that is d <= 15 (16 with equal signs), for F16 d <= 12 (13).
//! 3. `graft apply` computes `s = fl64(b + 1 * tau)`, `r = fl32(s)`, `theta = fl_D(r)` with D the base's dtype. When
//!    `tau` is exact, `b + tau = f` is representable in f32, so `s = r = theta = f`: the fine-tuned value bit for bit
//!    (only the sign of a zero can differ, +0 for -0).
//! 4. In general `|r - f| <= ulp_32(f - b)/2 + ulp_64(b + tau)/2 + ulp_32(s)/2`, which is at most about
//!    `2 ulp_32(M)` with `M = max(|f|, |b|)`, and about one `ulp_32(M)` when f and b have the same sign. Rounding to
//!    D then gives `theta = f` whenever `|r - f| < ulp_D(f) / 4` (f is in D, and its neighbours in D are at least
//!    `ulp_D(f) / 2` away), and otherwise `|theta - f| <= |r - f| + ulp_D(r) / 2`.
//!
//! A vector written with a narrower `--dtype` adds `ulp_V(tau) / 2` to the first term. The unit tests below check
//! (4) on adversarial pairs; `tests/taskvec.rs` checks (3) and (4) on the F32 and BF16 fixtures.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::matching::{pair, Coverage, Skipped};
use super::{canonical_display, TASK_ARITHMETIC, TASK_VECTOR_OF};
use crate::checkpoint::{Checkpoint, CheckpointWriter, Dtype, TensorDecl, TensorView, WriterOptions};
use crate::error::{Arg, Error, Result};
use crate::exec::{Executor, Produce, Read};

/// Whether a term is a stored task vector or a fine-tuned model whose delta is computed on the fly.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TermKind {
    Vector,
    Finetuned,
}

/// One `lambda * tau` term.
#[derive(Clone, Copy, Debug)]
pub struct Term<'a> {
    pub ck: &'a Checkpoint,
    pub kind: TermKind,
    pub lambda: f64,
}

#[derive(Clone, Debug, Default)]
pub struct ApplyOptions {
    /// Output dtype of float tensors (default: each tensor keeps the base's dtype).
    pub dtype: Option<Dtype>,
    /// Skip tensors that do not pair with the base (their delta counts as zero) instead of failing.
    pub allow_missing: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct TermReport {
    pub path: String,
    pub kind: TermKind,
    pub lambda: f64,
    /// Base tensors this term changed.
    pub tensors: usize,
}

/// What `apply` wrote.
#[derive(Clone, Debug, Serialize)]
pub struct ApplyReport {
    pub base: String,
    pub output: String,
    pub files: Vec<String>,
    pub tensors: usize,
    pub bytes: u64,
    /// Tensors at least one term changed.
    pub changed: usize,
    /// Tensors written with the base's values (no term touches them, or non-float).
    pub unchanged: usize,
    pub terms: Vec<TermReport>,
    /// Non-float tensors found in task vectors (`graft diff --keep-nonfloat`): arithmetic does not apply to them,
    /// so the base's values are kept.
    pub ignored_nonfloat: Vec<String>,
    /// Tensors of a term that do not pair with the base, skipped under `allow_missing`.
    pub skipped_mismatched: Vec<Skipped>,
    /// Things the user should know (a vector computed against another base).
    pub warnings: Vec<String>,
}

/// One term of a request, by path: a task vector or a fine-tuned model, and its weight.
#[derive(Clone, Debug)]
pub struct TermSpec {
    pub path: PathBuf,
    pub kind: TermKind,
    pub lambda: f64,
}

/// `graft apply` as a typed request: the base, the terms in order, and where the result goes.
#[derive(Clone, Debug)]
pub struct Request {
    pub base: PathBuf,
    pub terms: Vec<TermSpec>,
    pub output: PathBuf,
    /// Shard size, metadata and overwrite policy; the base's and every term's files are added to `inputs`, and a
    /// directory output carries the base's side files (config, tokenizer).
    pub writer: WriterOptions,
    pub options: ApplyOptions,
}

impl Request {
    /// The checks that need no file: at least one term, finite weights, a float output dtype.
    pub fn validate(&self) -> Result<()> {
        if self.terms.is_empty() {
            return Err(Error::usage(format!(
                "nothing to apply: give at least one {} or {}",
                Arg::Vector,
                Arg::Finetuned
            )));
        }
        if let Some(t) = self.terms.iter().find(|t| !t.lambda.is_finite()) {
            return Err(Error::usage(format!("{}: lambda {} is not a finite number", t.path.display(), t.lambda)));
        }
        if let Some(d) = self.options.dtype.filter(|d| !d.is_float()) {
            return Err(Error::usage(format!("{} must be a float type, not {d}", Arg::Dtype)));
        }
        Ok(())
    }
}

/// Carries out one request: opens the base and the terms, protects them as inputs, and writes the sum.
pub fn run(request: &Request, exec: &Executor) -> Result<ApplyReport> {
    request.validate()?;
    let base = Checkpoint::open(&request.base)?;
    let checkpoints = request.terms.iter().map(|t| Checkpoint::open(&t.path)).collect::<Result<Vec<_>>>()?;
    let terms: Vec<Term> =
        request.terms.iter().zip(&checkpoints).map(|(t, ck)| Term { ck, kind: t.kind, lambda: t.lambda }).collect();
    let mut writer = request.writer.clone();
    writer.inputs.extend(base.files());
    for ck in &checkpoints {
        writer.inputs.extend(ck.files());
    }
    if request.output.extension().is_none_or(|e| e != "safetensors") {
        writer.carry_from = base.dir().map(Path::to_path_buf);
    }
    apply(&base, &terms, &request.options, exec, &request.output, writer)
}

/// `theta[i] = fl32(base[i] + sum_k lambda_k * deltas_k[i])`, the sum taken in f64 in the order of `terms`.
pub fn combine(base: &[f32], terms: &[(f64, &[f32])]) -> Vec<f32> {
    let mut out = Vec::with_capacity(base.len());
    for (i, &b) in base.iter().enumerate() {
        let mut acc = b as f64;
        for (lambda, d) in terms {
            acc += lambda * d[i] as f64;
        }
        out.push(acc as f32);
    }
    out
}

/// Writes `base + sum lambda_i tau_i` to `out`.
pub fn apply(
    base: &Checkpoint,
    terms: &[Term],
    opts: &ApplyOptions,
    exec: &Executor,
    out: &Path,
    mut writer_opts: WriterOptions,
) -> Result<ApplyReport> {
    if terms.is_empty() {
        return Err(Error::usage(format!("nothing to apply: give at least one {} or {}", Arg::Vector, Arg::Finetuned)));
    }
    if let Some(d) = opts.dtype.filter(|d| !d.is_float()) {
        return Err(Error::usage(format!("{} must be a float type, not {d}", Arg::Dtype)));
    }
    if let Some(t) = terms.iter().find(|t| !t.lambda.is_finite()) {
        return Err(Error::usage(format!("{}: lambda {} is not a finite number", t.ck.path().display(), t.lambda)));
    }
    let mut warnings = Vec::new();
    let base_canon = canonical_display(base.path());
    for t in terms.iter().filter(|t| t.kind == TermKind::Vector) {
        if let Some(of) = vector_base(t.ck)? {
            if canonical_display(Path::new(&of)) != base_canon {
                warnings.push(format!(
                    "{} is the task vector of a model against base {of}, not against {base_canon}",
                    t.ck.path().display()
                ));
            }
        }
    }

    // contributors[k]: the terms that change base tensor k.
    let infos = base.infos();
    let mut contributors: Vec<Vec<usize>> = vec![Vec::new(); infos.len()];
    let mut skipped = Vec::new();
    let mut ignored_nonfloat = Vec::new();
    // Lookups by name in maps, not by scanning the tensor list: apply stays linear in the tensor count (a scan per
    // paired name took 14 s at 64k tensors).
    let mut ignored_seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let position: std::collections::HashMap<&str, usize> =
        infos.iter().enumerate().map(|(k, i)| (i.name.as_str(), k)).collect();
    let mut term_reports = Vec::new();
    for (ti, t) in terms.iter().enumerate() {
        let coverage = if t.kind == TermKind::Vector { Coverage::Subset } else { Coverage::Full };
        let p = pair(base, t.ck, coverage, opts.allow_missing)?;
        skipped.extend(p.skipped);
        let mut count = 0;
        for name in &p.common {
            let k = *position.get(name.as_str()).expect("paired names come from the base");
            if !infos[k].dtype.is_float() {
                if t.kind == TermKind::Vector && ignored_seen.insert(infos[k].name.as_str()) {
                    ignored_nonfloat.push(name.clone());
                }
                continue;
            }
            if t.lambda != 0.0 {
                contributors[k].push(ti);
                count += 1;
            }
        }
        term_reports.push(TermReport {
            path: t.ck.path().display().to_string(),
            kind: t.kind,
            lambda: t.lambda,
            tensors: count,
        });
    }

    let decls: Vec<TensorDecl> = infos
        .iter()
        .map(|i| {
            let dtype = if i.dtype.is_float() { opts.dtype.unwrap_or(i.dtype) } else { i.dtype };
            TensorDecl::new(i.name.clone(), dtype, i.shape.clone())
        })
        .collect();
    let changed = contributors.iter().filter(|c| !c.is_empty()).count();

    let record = serde_json::json!({
        "base": base_canon,
        "terms": terms.iter().map(|t| serde_json::json!({
            "path": canonical_display(t.ck.path()), "kind": t.kind, "lambda": t.lambda
        })).collect::<Vec<_>>(),
    });
    writer_opts.metadata.insert(TASK_ARITHMETIC.to_string(), record.to_string());
    let writer = CheckpointWriter::create(out, decls, writer_opts)?;
    let written = exec.write(writer, "apply", |k, _| {
        let b = Read { checkpoint: base, tensor: base.view(k) };
        if contributors[k].is_empty() {
            return Ok(Produce::Input(b));
        }
        let mut sources: Vec<(f64, Source)> = Vec::new();
        let mut reads = vec![b];
        for &ti in &contributors[k] {
            let t = &terms[ti];
            let v = t.ck.tensor(b.tensor.name)?;
            reads.push(Read { checkpoint: t.ck, tensor: v });
            sources.push((t.lambda, Source { view: v, finetuned: t.kind == TermKind::Finetuned }));
        }
        let b = b.tensor;
        Ok(Produce::elementwise(reads, move |r| {
            let bv = b.f32_range(r.clone())?;
            let mut deltas = Vec::with_capacity(sources.len());
            for (_, s) in &sources {
                let mut d = s.view.f32_range(r.clone())?;
                if s.finetuned {
                    for (x, y) in d.iter_mut().zip(&bv) {
                        *x -= y;
                    }
                }
                deltas.push(d);
            }
            let weighted: Vec<(f64, &[f32])> =
                sources.iter().zip(&deltas).map(|((l, _), d)| (*l, d.as_slice())).collect();
            Ok(combine(&bv, &weighted))
        }))
    })?;

    Ok(ApplyReport {
        base: base.path().display().to_string(),
        output: written.path.display().to_string(),
        files: written.files.iter().map(|f| f.display().to_string()).collect(),
        tensors: written.tensors,
        bytes: written.total_bytes,
        changed,
        unchanged: written.tensors - changed,
        terms: term_reports,
        ignored_nonfloat,
        skipped_mismatched: skipped,
        warnings,
    })
}

struct Source<'a> {
    view: TensorView<'a>,
    finetuned: bool,
}

/// The base a task vector was computed against, from its `TASK_VECTOR_OF` metadata (None when it has none).
pub fn vector_base(vector: &Checkpoint) -> Result<Option<String>> {
    let Some(raw) = vector.metadata().get(TASK_VECTOR_OF) else { return Ok(None) };
    let v: serde_json::Value = serde_json::from_str(raw)
        .map_err(|e| Error::format(vector.path(), format!("metadata {TASK_VECTOR_OF} is not valid JSON: {e}")))?;
    Ok(v.get("base").and_then(|b| b.as_str()).map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::dtype::{from_f32_vec, to_f32_vec};
    use crate::rng::Rng;

    /// Each refusal comes from `validate`, before any of the (missing) files is opened; a request that passes goes
    /// on to open the base and fails there.
    #[test]
    fn requests_are_refused_before_any_file_is_opened() {
        let term = |lambda| TermSpec { path: "/nonexistent/graft-apply/tv".into(), kind: TermKind::Vector, lambda };
        let good = Request {
            base: "/nonexistent/graft-apply/base".into(),
            terms: vec![term(0.5)],
            output: "/nonexistent/graft-apply/out".into(),
            writer: WriterOptions::default(),
            options: ApplyOptions::default(),
        };
        let exec = Executor::new(Some(1)).unwrap();
        let refused = [
            (Request { terms: Vec::new(), ..good.clone() }, "nothing to apply"),
            (Request { terms: vec![term(0.5), term(f64::NAN)], ..good.clone() }, "lambda NaN is not a finite number"),
            (
                Request { options: ApplyOptions { dtype: Some(Dtype::I32), allow_missing: false }, ..good.clone() },
                "must be a float type, not I32",
            ),
        ];
        for (request, why) in refused {
            for e in [request.validate().unwrap_err(), run(&request, &exec).unwrap_err()] {
                assert!(matches!(e, Error::Usage(_)) && e.to_string().contains(why), "{e}");
            }
        }
        good.validate().unwrap();
        let e = run(&good, &exec).unwrap_err();
        assert!(!matches!(e, Error::Usage(_)) && e.to_string().contains("/nonexistent/graft-apply/base"), "{e}");
    }

    /// Spacing of a format with `p` significand bits at |x| (normal range of f32, which is all the tests use).
    fn ulp(x: f64, p: i32) -> f64 {
        if x == 0.0 {
            return 2f64.powi(-149);
        }
        2f64.powi(x.abs().log2().floor() as i32 - p + 1).max(2f64.powi(-149))
    }

    fn diff_then_apply(f: f32, b: f32) -> f32 {
        let tau = f - b;
        combine(&[b], &[(1.0, &[tau])])[0]
    }

    #[test]
    fn combine_matches_a_plain_f64_sum() {
        let base = [1.0f32, -2.0, 0.5];
        let d1 = [0.25f32, 0.5, -0.125];
        let d2 = [1.0f32, 1.0, 1.0];
        let got = combine(&base, &[(0.5, &d1), (-2.0, &d2)]);
        // Hand-computed: 1 + 0.125 - 2 = -0.875; -2 + 0.25 - 2 = -3.75; 0.5 - 0.0625 - 2 = -1.5625.
        assert_eq!(got, vec![-0.875, -3.75, -1.5625]);
        assert_eq!(combine(&base, &[]), base.to_vec());
    }

    #[test]
    fn lambda_one_is_exact_when_sterbenz_applies() {
        let mut rng = Rng::new(7);
        for _ in 0..100_000 {
            let b = (rng.normal() * 0.1) as f32;
            let f = b * (1.0 + (rng.next_f64() as f32 - 0.5)); // within a factor 2 of b
            assert_eq!(diff_then_apply(f, b), f, "f {f:e} b {b:e}");
        }
    }

    #[test]
    fn lambda_one_is_exact_for_bf16_values_within_15_binades() {
        let mut rng = Rng::new(8);
        let (mut exact_claims, mut wide_inexact) = (0, 0);
        for _ in 0..200_000 {
            let b = (rng.normal() * 0.05) as f32;
            let f = (rng.normal() * 0.05 * 2f64.powi((rng.next_f64() * 40.0) as i32 - 20)) as f32;
            let [b, f] = [b, f].map(|x| to_f32_vec(Dtype::BF16, &from_f32_vec(Dtype::BF16, &[x]))[0]);
            if f == 0.0 || b == 0.0 {
                continue;
            }
            let d = (f.abs().log2().floor() - b.abs().log2().floor()).abs() as i32;
            let same_sign = (f > 0.0) == (b > 0.0);
            if 8 + d < 24 || (same_sign && 8 + d == 24) {
                exact_claims += 1;
                assert_eq!(diff_then_apply(f, b), f, "f {f:e} b {b:e}");
            } else if diff_then_apply(f, b) != f {
                wide_inexact += 1;
            }
        }
        // Both sides of the criterion occur: it is not vacuous, and beyond it exactness does fail.
        assert!(exact_claims > 100_000 && wide_inexact > 1000, "{exact_claims} {wide_inexact}");
    }

    #[test]
    fn general_bound_holds_on_adversarial_pairs() {
        // Magnitudes 2^-30..2^30 apart and mixed signs: Sterbenz fails almost always.
        let mut rng = Rng::new(9);
        let mut inexact = 0;
        for _ in 0..200_000 {
            let f = (rng.normal() * 2f64.powi((rng.next_f64() * 60.0) as i32 - 30)) as f32;
            let b = (rng.normal() * 2f64.powi((rng.next_f64() * 60.0) as i32 - 30)) as f32;
            let r = diff_then_apply(f, b) as f64;
            let (f64_, b64) = (f as f64, b as f64);
            let tau = (f - b) as f64;
            let s = b64 + tau;
            let bound = ulp(f64_ - b64, 24) / 2.0 + ulp(s, 53) / 2.0 + ulp(s, 24) / 2.0;
            assert!((r - f64_).abs() <= bound, "f {f:e} b {b:e} r {r:e} bound {bound:e}");
            let m = f64_.abs().max(b64.abs());
            assert!((r - f64_).abs() <= 2.0 * ulp(m, 24) * (1.0 + 1e-9), "f {f:e} b {b:e}");
            if r != f64_ {
                inexact += 1;
            }
        }
        // The construction must actually exercise the inexact case.
        assert!(inexact > 10_000, "only {inexact} inexact results");
    }
}
