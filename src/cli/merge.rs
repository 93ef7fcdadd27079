//! `graft merge`: merge models with a mergekit method, from flags or a mergekit YAML config (docs/merge.md). The
//! flags become one `merge::request::Job` (a merge's options, and what to run: the models given, one config file,
//! or a batch of configs), which the library validates and runs (`job::run_job`, `batch::Batch`: multi-document
//! configs stage by stage, batches config by config, each merged into `OUT/<config name>`); this file prints what
//! it reports. A failing config of a batch does not stop the others (`super::run_batch`).

use std::fmt::Write;
use std::path::PathBuf;

use super::{emit, table, Global, OutputArgs};
use crate::checkpoint::Dtype;
use crate::error::{Error, Result};
use crate::exec::Executor;
use crate::merge::batch::{self, Batch};
use crate::merge::config::{Flags, Inputs, MergeConfig};
use crate::merge::execute::RunOptions;
use crate::merge::job::{self, Job, Work};
use crate::merge::method::AlphaTarget;
use crate::merge::params::{Kind, Scalar, Setting};
use crate::merge::plan::{Op, Plan};
use crate::merge::request::{self, Event, Options, Outcome};
use crate::merge::select::{self, Alpha, SelectOptions, SelectionReport, SnrSource};
use crate::merge::MergeMethod;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum TiesVariant {
    /// mergekit's per-tensor TIES.
    Mergekit,
    /// The TIES paper's reference code: global trim, sign by mass, mean of agreeing entries (the method
    /// `ties_paper`).
    Paper,
}

/// `--method`'s choices and their help, from the registry.
fn method_choices() -> clap::builder::PossibleValuesParser {
    clap::builder::PossibleValuesParser::new(
        crate::merge::methods().iter().map(|m| clap::builder::PossibleValue::new(m.name()).help(m.about())),
    )
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

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub values: super::ValueArgs,
    /// A mergekit YAML config (`.yml`/`.yaml`), or the models to merge (files or checkpoint directories). Several
    /// configs, or a quoted glob of them (`'configs/*.yml'`), are merged one by one into `OUT/<config name>`.
    #[arg(required = true)]
    inputs: Vec<PathBuf>,
    /// Merge method.
    #[arg(long, value_parser = method_choices())]
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
    /// Any parameter of the method, for every model: `NAME=VALUE` (a number, true/false, or comma-separated numbers
    /// for a layer gradient). Repeatable.
    #[arg(long = "param", value_name = "NAME=VALUE", allow_hyphen_values = true)]
    params: Vec<String>,
    /// A per-model parameter of one model: `INDEX:NAME=VALUE`, INDEX counting the models as given from 0.
    /// Repeatable.
    #[arg(long = "model-param", value_name = "INDEX:NAME=VALUE", allow_hyphen_values = true)]
    model_params: Vec<String>,
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
    snr_from: SnrSource,
    /// Interpolation weight of each merged layer: `fixed` (the configured weights/t) or `snr` (snr_B / (snr_A + snr_B)).
    #[arg(long, value_enum, default_value = "fixed")]
    alpha: AlphaArg,
    /// Do not copy the tokenizer files and chat template next to the output (mergekit's --no-copy-tokenizer);
    /// `config.json` and `generation_config.json` are still written.
    #[arg(long)]
    no_copy_tokenizer: bool,
    /// Chat template written with the tokenizer: `auto` (the inputs' most common), a name mergekit knows (`chatml`,
    /// `llama3`, `mistral`, `alpaca`, `exaone`) or Jinja text; overrides a config's `chat_template`.
    #[arg(long, value_name = "auto|NAME|JINJA")]
    chat_template: Option<String>,
    /// Keys of a YAML config that mergekit would silently ignore (unknown keys, typos) are warnings, not errors.
    /// Unknown methods and unsupported features stay errors.
    #[arg(long)]
    lenient: bool,
    /// Multi-document configs: where the named stages' merges are written (default: OUT.stages beside the
    /// output). A stage whose output there is complete and made from the same config, options and input files is
    /// skipped.
    #[arg(long, value_name = "DIR")]
    intermediate_dir: Option<PathBuf>,
    /// Print the plan (which tensor from which models with which parameters) and write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Print a JSON summary (or the plan as JSON with --dry-run).
    #[arg(long)]
    json: bool,
    /// Several configs: append a line per merged output (config, output, tensors, files) to FILE and skip configs
    /// already recorded there (with --shard, the file `graft gather` joins).
    #[arg(long, value_name = "FILE")]
    resume: Option<PathBuf>,
    #[command(flatten)]
    shard: crate::shard::ShardArgs,
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

/// A parameter given by a dedicated flag: shared (one setting) or per model (one value, or one per model).
enum Given {
    Shared(Setting),
    PerModel(Vec<f64>),
}

/// The per-parameter flags, one row each: flag, the method parameter it sets, and its value if given.
fn param_flags(a: &Args) -> Vec<(&'static str, &'static str, Option<Given>)> {
    let list = |v: &Vec<f64>| (!v.is_empty()).then(|| Given::PerModel(v.clone()));
    vec![
        ("--t", "t", (!a.t.is_empty()).then(|| Given::Shared(Setting::gradient(a.t.clone())))),
        ("--weight", "weight", list(&a.weight)),
        ("--density", "density", list(&a.density)),
        ("--gamma", "gamma", list(&a.gamma)),
        ("--epsilon", "epsilon", list(&a.epsilon)),
        ("--scale", "scale", list(&a.scale)),
        ("--lambda", "lambda", a.lambda.map(|l| Given::Shared(Setting::num(l)))),
        ("--normalize", "normalize", a.normalize.map(|n| Given::Shared(Setting::bool(n)))),
        ("--rescale", "rescale", a.rescale.map(|r| Given::Shared(Setting::bool(r)))),
        ("--filter-wise", "filter_wise", a.filter_wise.then(|| Given::Shared(Setting::bool(true)))),
    ]
}

/// Parses `NAME=VALUE` for `method`: the name must be one of its parameters, the value of the parameter's kind.
fn parse_param(method: &dyn MergeMethod, flag: &str, text: &str) -> Result<(String, Setting)> {
    let bad = |why: String| Error::usage(format!("{flag} '{text}': {why}"));
    let (name, value) = text.split_once('=').ok_or_else(|| bad("expected NAME=VALUE".into()))?;
    let def = method.params().iter().find(|d| d.name == name).ok_or_else(|| {
        let accepted: Vec<&str> = method.params().iter().map(|d| d.name).collect();
        bad(format!("{} has no parameter '{name}' (accepted: {})", method.name(), accepted.join(", ")))
    })?;
    let setting = match def.kind {
        Kind::Bool => match value {
            "true" => Setting::bool(true),
            "false" => Setting::bool(false),
            _ => return Err(bad(format!("'{name}' takes true or false"))),
        },
        Kind::Float => {
            let nums: std::result::Result<Vec<f64>, _> = value.split(',').map(|v| v.trim().parse::<f64>()).collect();
            match nums {
                Ok(v) if v.iter().all(|x| x.is_finite()) => Setting::gradient(v),
                _ => return Err(bad(format!("'{name}' takes a number or comma-separated numbers"))),
            }
        }
    };
    Ok((name.to_string(), setting))
}

/// Applies `--param` (top-level parameters) and `--model-param` (one model's parameters) to a config built from
/// flags, refusing a parameter that a dedicated flag also sets.
fn apply_param_args(a: &Args, cfg: &mut MergeConfig) -> Result<()> {
    let flagged = |name: &str| param_flags(a).into_iter().find(|(_, p, g)| *p == name && g.is_some()).map(|r| r.0);
    for text in &a.params {
        let (name, setting) = parse_param(cfg.method, "--param", text)?;
        if let Some(flag) = flagged(&name) {
            return Err(Error::usage(format!("--param {name} and {flag} set the same parameter; give one")));
        }
        cfg.parameters.insert(name, setting);
    }
    for text in &a.model_params {
        let (index, rest) = text
            .split_once(':')
            .and_then(|(i, r)| i.parse::<usize>().ok().map(|i| (i, r)))
            .ok_or_else(|| Error::usage(format!("--model-param '{text}': expected INDEX:NAME=VALUE")))?;
        let (name, setting) = parse_param(cfg.method, "--model-param", rest)?;
        let Inputs::Models(entries) = &mut cfg.inputs else { unreachable!("flags describe models") };
        let count = entries.len();
        let entry = entries.get_mut(index).ok_or_else(|| {
            Error::usage(format!("--model-param '{text}': model index {index} out of range (0..{count})"))
        })?;
        entry.parameters.insert(name, setting);
    }
    Ok(())
}

/// Flags that set what a YAML config sets itself: refused with a config (or a batch of them).
fn refuse_config_flags(a: &Args) -> Result<()> {
    let mut set_by_flags = vec![("--method", a.method.is_some())];
    set_by_flags.extend(param_flags(a).into_iter().map(|(flag, _, given)| (flag, given.is_some())));
    set_by_flags.extend([
        ("--param", !a.params.is_empty()),
        ("--model-param", !a.model_params.is_empty()),
        ("--dtype", a.dtype.is_some()),
        ("--out-dtype", a.out_dtype.is_some()),
    ]);
    if let Some((flag, _)) = set_by_flags.iter().find(|(_, set)| *set) {
        return Err(Error::usage(format!("{flag} cannot be combined with a YAML config; set it in the config")));
    }
    if let Some(b) = &a.base {
        return Err(Error::usage(format!("--base {} cannot be combined with a YAML config", b.display())));
    }
    Ok(())
}

/// The merge config the flags describe (models given on the command line, not a YAML config).
fn build_config(a: &Args) -> Result<MergeConfig> {
    let name = a.method.as_deref().ok_or_else(|| Error::usage("give --method (or a YAML config)"))?;
    let method = crate::merge::method(name)?;
    let mut shared: Vec<(String, Setting)> = Vec::new();
    let mut per_model: Vec<(String, Vec<f64>)> = Vec::new();
    for (_, param, given) in param_flags(a) {
        match given {
            Some(Given::Shared(s)) => shared.push((param.to_string(), s)),
            Some(Given::PerModel(v)) => per_model.push((param.to_string(), v)),
            None => {}
        }
    }
    // Flags weigh every model 1 unless told otherwise (the per-model weight `--alpha snr` sets, when the method
    // has one); `--model-param` may then change single models' weights.
    if let Some(AlphaTarget::PerInput(w)) = method.snr_alpha() {
        let top_level = a.params.iter().any(|p| p.split_once('=').is_some_and(|(n, _)| n == w));
        if !top_level && !per_model.iter().any(|(n, _)| n == w) {
            per_model.push((w.to_string(), vec![1.0]));
        }
    }
    let env = crate::hub::CacheEnv::from_env();
    let resolve = |p: &PathBuf, what: &str| crate::merge::lora::resolve(&p.to_string_lossy(), None, &env, what);
    let models = a.inputs.iter().map(|p| resolve(p, "model argument")).collect::<Result<Vec<_>>>()?;
    let base = a.base.as_ref().map(|b| resolve(b, "--base")).transpose()?;
    let written = a.inputs.iter().zip(&models).chain(a.base.iter().zip(&base));
    let labels = written.filter(|(w, r)| w != r).map(|(w, r)| (r.clone(), w.display().to_string())).collect();
    let mut cfg = Flags {
        models,
        base,
        shared,
        per_model,
        dtype: dtype_arg("--dtype", &a.dtype)?,
        out_dtype: dtype_arg("--out-dtype", &a.out_dtype)?,
        reference_first: a.reference == Some(Reference::First),
        ..Flags::new(method)
    }
    .into_config()?;
    cfg.labels = labels;
    apply_param_args(a, &mut cfg)?;
    Ok(cfg)
}

/// The options every merge of the run gets.
fn options(a: &Args) -> Result<Options> {
    let select = match &a.snr_select {
        Some(s) => Some(SelectOptions {
            top_p: select::parse_top_p(s)?,
            from: a.snr_from.clone(),
            alpha: if a.alpha == AlphaArg::Snr { Alpha::Snr } else { Alpha::Fixed },
        }),
        None if a.alpha == AlphaArg::Snr || a.snr_from != SnrSource::Base => {
            return Err(Error::usage("--alpha and --snr-from need --snr-select"))
        }
        None => None,
    };
    Ok(Options {
        run: RunOptions { seed: a.seed, compat: a.compat == Some(Compat::Mergekit) },
        select,
        writer: a.output.writer_options(Vec::new()),
        copy_tokenizer: !a.no_copy_tokenizer,
        dry_run: a.dry_run,
        chat_template: a.chat_template.clone(),
        ties_paper: a.ties_variant == TiesVariant::Paper,
        lenient: a.lenient,
        reference: a.reference.map(|r| match r {
            Reference::Base => request::Reference::Base,
            Reference::First => request::Reference::First,
        }),
    })
}

/// The job the command line asks for: a batch of configs, one config file, or one merge of the given models.
fn build_job(a: &Args) -> Result<Job> {
    let options = options(a)?;
    let batch_options = a.resume.is_some() || a.shard.shard.is_some() || a.shard.shard_count.is_some();
    let work = if batch::is_batch(&a.inputs, batch_options) {
        // An input that is not a config is the batch's own error, named by the library.
        if a.inputs.iter().all(|p| batch::is_config_file(p)) {
            refuse_config_flags(a)?;
        }
        Work::Batch {
            configs: a.inputs.iter().map(|p| p.to_string_lossy().into_owned()).collect(),
            shard: a.shard.resolve()?,
            resume: a.resume.clone(),
        }
    } else if a.inputs.len() == 1 && batch::is_config_file(&a.inputs[0]) {
        refuse_config_flags(a)?;
        Work::File(a.inputs[0].clone())
    } else {
        Work::Config(Box::new(build_config(a)?))
    };
    Ok(Job { work, options, output: a.output.output.clone(), intermediate_dir: a.intermediate_dir.clone() })
}

pub fn run(a: Args, global: &Global) -> Result<()> {
    let job = build_job(&a)?;
    job.validate()?;
    let exec = Executor::new(global.threads)?;
    let mut print = |event: Event| print_event(&a, event);
    if let Work::Batch { .. } = job.work {
        let mut batch = Batch::prepare(&job)?;
        let configs = batch.configs().to_vec();
        return super::run_batch(&configs, a.json, "config", "configs could not be merged", String::clone, |c| {
            batch.merge(c, &exec, &mut print)
        });
    }
    job::run_job(&job, &exec, &mut print)
}

fn print_event(a: &Args, event: Event) -> Result<()> {
    match event {
        Event::Note(line) => {
            eprintln!("{line}");
            Ok(())
        }
        Event::Stages(stages) => {
            let mut text = String::new();
            for (k, s) in stages.iter().enumerate() {
                let reads = if s.reads.is_empty() { String::new() } else { format!(", reads {}", s.reads.join(", ")) };
                let _ = writeln!(text, "{}/{} {} -> {}{reads}", k + 1, stages.len(), s.label, s.output.display());
            }
            emit(&text)
        }
        Event::Merged(Outcome::Planned { plan, selection }) if a.json => {
            let mut v = serde_json::to_value(&plan).unwrap();
            if let Some(s) = &selection {
                v["selection"] = serde_json::to_value(s).unwrap();
            }
            emit(&(v.to_string() + "\n"))
        }
        Event::Merged(Outcome::Planned { plan, selection }) => {
            let mut text = render_plan(&plan);
            if let Some(s) = &selection {
                text.push_str(&render_selection(s));
            }
            emit(&text)
        }
        Event::Merged(Outcome::Written(summary)) if a.json => emit(&(serde_json::to_string(&summary).unwrap() + "\n")),
        Event::Merged(Outcome::Written(summary)) => emit(&format!(
            "{}: {} tensors ({} merged with {}, {} copied), {} in {:.2}s\n",
            summary.output.display(),
            summary.tensors,
            summary.merged,
            summary.method,
            summary.copied,
            super::human_bytes(summary.bytes),
            summary.seconds
        )),
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
    let _ = writeln!(s, "method: {}", plan.method.name());
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::Checkpoint;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        args: Args,
    }

    fn args(argv: &[&str]) -> Args {
        Cmd::try_parse_from(std::iter::once("merge").chain(argv.iter().copied())).unwrap().args
    }

    /// The resolved parameters of every merged tensor of the merge `argv` describes (fixture models).
    fn resolved(argv: &[&str]) -> Vec<crate::merge::params::TensorParams> {
        let cfg = build_config(&args(argv)).unwrap();
        let models: Vec<Checkpoint> = cfg.model_paths().iter().map(Checkpoint::open).collect::<Result<_>>().unwrap();
        let plan = crate::merge::plan::build(&cfg, &models).unwrap();
        plan.tensors
            .into_iter()
            .filter_map(|t| match t.op {
                Op::Merge { params, .. } => Some(params),
                Op::Copy { .. } => None,
            })
            .collect()
    }

    #[test]
    fn param_and_model_param_resolve_as_the_dedicated_flags_do() {
        let (b, x, y) = ("fixtures/llama/base", "fixtures/llama/ft_a", "fixtures/llama/ft_b");
        let common = ["--method", "ties", "--base", b, x, y, "-o", "unused"];
        let by_flags =
            resolved(&[&common[..], &["--density", "0.3", "--weight", "0.2,0.7", "--lambda", "0.9"]].concat());
        let by_params = resolved(
            &[
                &common[..],
                &["--param", "density=0.3", "--model-param", "0:weight=0.2", "--model-param", "1:weight=0.7"],
                &["--param", "lambda=0.9"],
            ]
            .concat(),
        );
        assert!(!by_flags.is_empty());
        assert_eq!(by_flags, by_params);
        // A gradient through --param matches --t's.
        let slerp = ["--method", "slerp", x, y, "-o", "unused"];
        assert_eq!(
            resolved(&[&slerp[..], &["--t", "0,0.4,1"]].concat()),
            resolved(&[&slerp[..], &["--param", "t=0,0.4,1"]].concat())
        );
    }

    #[test]
    fn param_names_and_values_are_checked_against_the_method() {
        let ties = crate::merge::method("ties").unwrap();
        assert_eq!(
            parse_param(ties, "--param", "normalize=false").unwrap(),
            ("normalize".into(), Setting::bool(false))
        );
        assert_eq!(parse_param(ties, "--param", "density=0.5").unwrap(), ("density".into(), Setting::num(0.5)));
        for (text, want) in [
            ("densty=0.5", "ties has no parameter 'densty' (accepted: weight, density"),
            ("normalize=1", "'normalize' takes true or false"),
            ("density=high", "'density' takes a number or comma-separated numbers"),
            ("density=nan", "'density' takes a number"),
            ("density", "expected NAME=VALUE"),
        ] {
            let e = parse_param(ties, "--param", text).unwrap_err().to_string();
            assert!(e.contains(want), "{text}: {e}");
        }
        let (b, x) = ("fixtures/llama/base", "fixtures/llama/ft_a");
        for (argv, want) in [
            (vec!["--model-param", "3:density=0.5"], "model index 3 out of range (0..1)"),
            (vec!["--model-param", "density=0.5"], "expected INDEX:NAME=VALUE"),
            (
                vec!["--param", "density=0.5", "--density", "0.4"],
                "--param density and --density set the same parameter",
            ),
        ] {
            let a = args(&[&["--method", "ties", "--base", b, x, "-o", "unused"][..], &argv[..]].concat());
            let e = build_config(&a).unwrap_err().to_string();
            assert!(e.contains(want), "{argv:?}: {e}");
        }
        let a = args(&["--method", "linear", "--ties-variant", "paper", x, "-o", "unused"]);
        let e = build_job(&a).and_then(|j| j.validate()).unwrap_err().to_string();
        assert!(e.contains("ties_variant applies to method ties only"), "{e}");
        let a = args(&["--method", "ties", "--ties-variant", "paper", "--base", b, x, "-o", "unused"]);
        assert_eq!(options(&a).unwrap().apply(build_config(&a).unwrap()).unwrap().method.name(), "ties_paper");
    }
}
