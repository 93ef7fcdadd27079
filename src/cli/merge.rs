//! `graft merge`: merge models with a mergekit method, from flags or a mergekit YAML config (docs/merge.md).

use std::fmt::Write;
use std::path::PathBuf;
use std::time::Instant;

use super::{emit, table, Global, OutputArgs};
use crate::checkpoint::{Checkpoint, Dtype};
use crate::error::{Error, Result};
use crate::exec::Executor;
use crate::merge::config::{self, Flags, MergeConfig};
use crate::merge::execute::{self, RunOptions, Summary};
use crate::merge::params::{Scalar, Setting};
use crate::merge::plan::{self, Op, Plan};
use crate::merge::select::{self, Alpha, SelectOptions, SelectionReport, SnrSource};

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum TiesVariant {
    /// mergekit's per-tensor TIES.
    Mergekit,
    /// The TIES paper's reference code: global trim, sign by mass, mean of agreeing entries.
    Paper,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Compat {
    /// Round every step to mergekit's working dtype as mergekit does.
    Mergekit,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum AlphaArg {
    Fixed,
    Snr,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Reference {
    Base,
    First,
}

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub values: super::ValueArgs,
    /// A mergekit YAML config (`.yml`/`.yaml`), or the models to merge (files or checkpoint directories).
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Merge method: linear, slerp, task_arithmetic, ties, dare_ties, dare_linear, breadcrumbs, breadcrumbs_ties,
    /// della, della_linear, model_stock, passthrough.
    #[arg(long)]
    method: Option<String>,
    /// Base model (task vectors are taken against it; for slerp, the reference for unmerged tensors).
    #[arg(long)]
    base: Option<PathBuf>,
    /// slerp position (0 = first model); several comma-separated values form a layer gradient.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    t: Vec<f64>,
    /// Weight per model: one value for all, or one per (non-base) model, comma-separated.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    weight: Vec<f64>,
    /// Fraction of each task vector kept (ties, dare, breadcrumbs, della): one value or one per model.
    #[arg(long, value_delimiter = ',')]
    density: Vec<f64>,
    /// Fraction of largest magnitudes removed (breadcrumbs): one value or one per model.
    #[arg(long, value_delimiter = ',')]
    gamma: Vec<f64>,
    /// Spread of DELLA's keep probabilities: one value or one per model.
    #[arg(long, value_delimiter = ',')]
    epsilon: Vec<f64>,
    /// Passthrough scale factor.
    #[arg(long, value_delimiter = ',', allow_negative_numbers = true)]
    scale: Vec<f64>,
    /// Scale of the merged task vector (task arithmetic family).
    #[arg(long, allow_negative_numbers = true)]
    lambda: Option<f64>,
    /// Divide by the sum of the weights (true/false; the method's default otherwise).
    #[arg(long)]
    normalize: Option<bool>,
    /// Restore sparsified task vectors' L1 norm (true/false; the method's default otherwise).
    #[arg(long)]
    rescale: Option<bool>,
    /// model_stock: one interpolation factor per row.
    #[arg(long)]
    filter_wise: bool,
    /// Seed of DARE/DELLA random masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// TIES variant.
    #[arg(long, value_enum, default_value = "mergekit")]
    ties_variant: TiesVariant,
    /// Reproduce mergekit's arithmetic in its working dtype instead of computing in f32.
    #[arg(long, value_enum)]
    compat: Option<Compat>,
    /// mergekit's `dtype` (output dtype when --out-dtype is absent; the working dtype with --compat mergekit).
    #[arg(long)]
    dtype: Option<String>,
    /// Output dtype of float tensors (default: --dtype, else the inputs').
    #[arg(long)]
    out_dtype: Option<String>,
    /// Where tensors that are not merged come from.
    #[arg(long, value_enum)]
    reference: Option<Reference>,
    /// Merge only the top fraction of weight matrices by SNR: `top-p=P` (P in [0, 1]); the rest is copied from the
    /// reference.
    #[arg(long, value_name = "top-p=P")]
    snr_select: Option<String>,
    /// SNRs to rank by: `base` (the reference model), `avg` (mean over the experts) or a `graft snr` selection file.
    #[arg(long, default_value = "base", value_name = "base|avg|FILE")]
    snr_from: String,
    /// Interpolation weight of each merged layer: `fixed` (the configured weights/t) or `snr` (snr_B / (snr_A + snr_B)).
    #[arg(long, value_enum, default_value = "fixed")]
    alpha: AlphaArg,
    /// Print the plan (which tensor from which models with which parameters) and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print a JSON summary (or the plan as JSON with --dry-run).
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    output: OutputArgs,
}

fn dtype_arg(flag: &str, s: &Option<String>) -> Result<Option<Dtype>> {
    s.as_deref()
        .map(|v| match Dtype::parse_user(v) {
            Some(d) if d.is_float() => Ok(d),
            _ => Err(Error::usage(format!("{flag} '{v}' is not a float dtype (bf16, f16, f32, f64)"))),
        })
        .transpose()
}

fn is_config(inputs: &[PathBuf]) -> bool {
    inputs.len() == 1 && inputs[0].extension().is_some_and(|e| e == "yml" || e == "yaml")
}

fn build_config(a: &Args) -> Result<MergeConfig> {
    if is_config(&a.inputs) {
        let set_by_flags = [
            ("--method", a.method.is_some()),
            ("--t", !a.t.is_empty()),
            ("--weight", !a.weight.is_empty()),
            ("--density", !a.density.is_empty()),
            ("--gamma", !a.gamma.is_empty()),
            ("--epsilon", !a.epsilon.is_empty()),
            ("--scale", !a.scale.is_empty()),
            ("--lambda", a.lambda.is_some()),
            ("--normalize", a.normalize.is_some()),
            ("--rescale", a.rescale.is_some()),
            ("--filter-wise", a.filter_wise),
            ("--dtype", a.dtype.is_some()),
            ("--out-dtype", a.out_dtype.is_some()),
        ];
        if let Some((flag, _)) = set_by_flags.iter().find(|(_, set)| *set) {
            return Err(Error::usage(format!("{flag} cannot be combined with a YAML config; set it in the config")));
        }
        let mut cfg = config::load(&a.inputs[0])?;
        if let Some(r) = a.reference {
            cfg.reference = match r {
                Reference::Base => cfg.base_model.clone(),
                Reference::First => cfg.model_paths().first().cloned(),
            };
        }
        if let Some(b) = &a.base {
            return Err(Error::usage(format!("--base {} cannot be combined with a YAML config", b.display())));
        }
        return Ok(cfg);
    }
    let method = a.method.clone().ok_or_else(|| Error::usage("give --method (or a YAML config)"))?;
    let mut shared: Vec<(String, Setting)> = Vec::new();
    if !a.t.is_empty() {
        shared.push(("t".into(), Setting::gradient(a.t.clone())));
    }
    if let Some(l) = a.lambda {
        shared.push(("lambda".into(), Setting::num(l)));
    }
    if let Some(n) = a.normalize {
        shared.push(("normalize".into(), Setting::bool(n)));
    }
    if let Some(r) = a.rescale {
        shared.push(("rescale".into(), Setting::bool(r)));
    }
    if a.filter_wise {
        shared.push(("filter_wise".into(), Setting::bool(true)));
    }
    let mut per_model = Vec::new();
    let linear_like = crate::merge::method(&method).is_ok_and(crate::merge::weighs_inputs);
    let weight = if a.weight.is_empty() && linear_like { vec![1.0] } else { a.weight.clone() };
    for (name, v) in [
        ("weight", weight),
        ("density", a.density.clone()),
        ("gamma", a.gamma.clone()),
        ("epsilon", a.epsilon.clone()),
        ("scale", a.scale.clone()),
    ] {
        if !v.is_empty() {
            per_model.push((name.to_string(), v));
        }
    }
    Flags {
        method,
        models: a.inputs.clone(),
        base: a.base.clone(),
        shared,
        per_model,
        dtype: dtype_arg("--dtype", &a.dtype)?,
        out_dtype: dtype_arg("--out-dtype", &a.out_dtype)?,
        reference_first: a.reference == Some(Reference::First),
    }
    .into_config()
}

pub fn run(a: Args, global: &Global) -> Result<()> {
    let started = Instant::now();
    let mut cfg = build_config(&a)?;
    cfg.copy_mismatched = a.snr_select.is_some();
    let models: Vec<Checkpoint> = cfg.model_paths().iter().map(Checkpoint::open).collect::<Result<_>>()?;
    let mut plan = plan::build(&cfg, &models)?;
    let exec = Executor::new(global.threads)?;
    let selection = match &a.snr_select {
        Some(s) => {
            let opts = SelectOptions {
                top_p: select::parse_top_p(s)?,
                from: SnrSource::parse(&a.snr_from),
                alpha: if a.alpha == AlphaArg::Snr { Alpha::Snr } else { Alpha::Fixed },
            };
            Some(select::apply(&mut plan, &models, &exec, &opts)?)
        }
        None => {
            if a.alpha == AlphaArg::Snr || a.snr_from != "base" {
                return Err(Error::usage("--alpha and --snr-from need --snr-select"));
            }
            None
        }
    };
    if a.dry_run {
        return if a.json {
            let mut v = serde_json::to_value(&plan).unwrap();
            if let Some(s) = &selection {
                v["selection"] = serde_json::to_value(s).unwrap();
            }
            emit(&(v.to_string() + "\n"))
        } else {
            let mut text = render_plan(&plan);
            if let Some(s) = &selection {
                text.push_str(&render_selection(s));
            }
            emit(&text)
        };
    }
    let run = RunOptions {
        seed: a.seed,
        compat: a.compat == Some(Compat::Mergekit),
        ties_paper: a.ties_variant == TiesVariant::Paper,
    };
    let inputs: Vec<PathBuf> = models.iter().flat_map(|m| m.files()).collect();
    let mut opts = a.output.writer_options(inputs);
    opts.metadata.extend(execute::merge_metadata(
        &plan,
        &cfg,
        &run,
        selection.as_ref().map(|s| serde_json::to_value(s).unwrap()),
    ));
    let written = execute::execute(&plan, &cfg, &models, &exec, &a.output.output, opts, &run)?;
    let merged = plan.merged_count();
    let summary = Summary {
        output: written.path.clone(),
        method: plan.method.clone(),
        models: plan.models.clone(),
        tensors: written.tensors,
        merged,
        copied: written.tensors - merged,
        bytes: written.total_bytes,
        files: written.files.clone(),
        seconds: started.elapsed().as_secs_f64(),
    };
    if a.json {
        emit(&(serde_json::to_string(&summary).unwrap() + "\n"))
    } else {
        emit(&format!(
            "{}: {} tensors ({} merged with {}, {} copied), {} in {:.2}s\n",
            summary.output.display(),
            summary.tensors,
            summary.merged,
            summary.method,
            summary.copied,
            super::human_bytes(summary.bytes),
            summary.seconds
        ))
    }
}

fn scalar_text(s: &Scalar) -> String {
    match s {
        Scalar::Num(x) => format!("{}", (x * 1e6).round() / 1e6),
        other => other.to_string(),
    }
}

fn render_plan(plan: &Plan) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "method: {}", plan.method);
    for (i, m) in plan.models.iter().enumerate() {
        let mut roles = Vec::new();
        if plan.base == Some(i) {
            roles.push("base");
        }
        if plan.reference == i {
            roles.push("reference");
        }
        let roles = if roles.is_empty() { String::new() } else { format!(" ({})", roles.join(", ")) };
        let _ = writeln!(s, "m{i}: {}{roles}", m.display());
    }
    let mut t = table(&["tensor", "dtype", "shape", "op", "inputs", "parameters"]);
    for pt in &plan.tensors {
        let (op, inputs, params) = match &pt.op {
            Op::Merge { inputs, base, params } => {
                let ins: Vec<String> = inputs
                    .iter()
                    .enumerate()
                    .map(|(k, src)| {
                        let renamed = if src.tensor != pt.name { format!(":{}", src.tensor) } else { String::new() };
                        format!("m{}{}{renamed}", src.model, if Some(k) == *base { "*" } else { "" })
                    })
                    .collect();
                let mut ps: Vec<String> =
                    params.shared.iter().map(|(k, v)| format!("{k}={}", scalar_text(v))).collect();
                let mut names: Vec<&String> = params.inputs.iter().flat_map(|m| m.keys()).collect();
                names.sort();
                names.dedup();
                for n in names {
                    let vals: Vec<String> =
                        params.inputs.iter().map(|m| m.get(n).map(scalar_text).unwrap_or_else(|| "-".into())).collect();
                    ps.push(format!("{n}=[{}]", vals.join(",")));
                }
                ("merge".to_string(), ins.join(" "), ps.join(" "))
            }
            Op::Copy { from, reason } => {
                let renamed = if from.tensor != pt.name { format!(":{}", from.tensor) } else { String::new() };
                (format!("copy ({reason})"), format!("m{}{renamed}", from.model), String::new())
            }
        };
        t.add_row(vec![pt.name.clone(), pt.dtype.to_string(), format!("{:?}", pt.shape), op, inputs, params]);
    }
    let _ = writeln!(s, "{t}");
    let merged = plan.merged_count();
    let _ = writeln!(
        s,
        "{} tensors: {merged} merged, {} copied; {} layers{}",
        plan.tensors.len(),
        plan.tensors.len() - merged,
        plan.layers,
        if plan.models.len() > 1 { " (* marks the base)" } else { "" }
    );
    s
}

fn render_selection(s: &SelectionReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "SNR selection: top-p {} of {} candidate matrices -> {} selected ({} tensors merged), SNR from {:?}, alpha {:?}",
        s.top_p, s.candidates, s.selected, s.merged_tensors, s.from, s.alpha
    );
    let mut t = table(&["rank", "matrix", "snr", "selected", "alpha"]);
    for r in &s.ranking {
        t.add_row(vec![
            r.rank.to_string(),
            r.name.clone(),
            if r.snr.is_finite() { format!("{:.6}", r.snr) } else { "inf".into() },
            if r.selected { "yes".into() } else { String::new() },
            r.alpha.map(|a| format!("{a:.4}")).unwrap_or_default(),
        ]);
    }
    let _ = writeln!(out, "{t}");
    out
}
