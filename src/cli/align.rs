//! `graft align REF MODEL -o OUT`: Git Re-Basin weight matching; `--print-spec MODEL` shows the permutation spec;
//! `--cycle A B C ...` reports cycle consistency. The flags become an `align::request::Request`, which the library
//! validates and carries out; this file prints the outcome.

use std::fmt::Write;
use std::path::PathBuf;

use super::{emit, parse_shard_size, table, Global, OutputArgs};
use crate::align::request::{self, Outcome, Request, Task};
use crate::align::{self, builtin, Arch, Options};
use crate::checkpoint::DEFAULT_MAX_SHARD_SIZE;
use crate::error::{Error, Result};
use crate::exec::Executor;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub values: super::ValueArgs,
    /// REF MODEL: align MODEL to REF. With --print-spec: one MODEL. With --cycle: the reference, then the models.
    #[arg(required = true, value_name = "CHECKPOINT")]
    checkpoints: Vec<PathBuf>,
    /// Built-in permutation spec (default: detected from config.json and tensor names).
    #[arg(long, value_enum, conflicts_with = "spec")]
    arch: Option<Arch>,
    /// Permutation spec file: YAML, or JSON when the name ends in .json (format in docs/align.md).
    #[arg(long, value_name = "FILE")]
    spec: Option<PathBuf>,
    /// bert, llama: also permute the residual stream (the hidden size) as one group shared by every layer.
    #[arg(long)]
    permute_residual: bool,
    /// Output: a directory (Hugging Face layout) or a single `.safetensors` file.
    #[arg(short = 'o', long = "output")]
    output: Option<PathBuf>,
    /// Shard size limit, e.g. 5GB (default, as Hugging Face), 500MB, 2GiB.
    #[arg(long, value_parser = parse_shard_size, default_value_t = DEFAULT_MAX_SHARD_SIZE)]
    max_shard_size: u64,
    /// Replace a checkpoint already at the output path.
    #[arg(long)]
    force: bool,
    /// Seed of the random order in which each pass visits the groups.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Most passes over all groups.
    #[arg(long, default_value_t = 100, value_parser = super::iterations_arg)]
    max_iter: usize,
    /// Print one JSON document instead of tables.
    #[arg(long)]
    json: bool,
    /// Print the permutation spec for MODEL (YAML, or JSON with --json) and exit.
    #[arg(long, conflicts_with_all = ["cycle", "output"])]
    print_spec: bool,
    /// Cycle consistency: align each model to the first and back, and around the loop of all of them.
    #[arg(long, conflicts_with = "output")]
    cycle: bool,
}

pub fn run(args: Args, global: &Global) -> Result<()> {
    let task = if args.print_spec {
        let [model] = args.checkpoints.as_slice() else {
            return Err(Error::usage("--print-spec takes one checkpoint"));
        };
        Task::PrintSpec { model: model.clone() }
    } else if args.cycle {
        Task::Cycle { checkpoints: args.checkpoints.clone() }
    } else {
        let [reference, model] = args.checkpoints.as_slice() else {
            return Err(Error::usage(
                "align takes two checkpoints: REF MODEL (or --print-spec MODEL, --cycle A B ...)",
            ));
        };
        let Some(output) = args.output.clone() else {
            return Err(Error::usage("align needs -o OUTPUT for the aligned model"));
        };
        let out = OutputArgs { output: output.clone(), max_shard_size: args.max_shard_size, force: args.force };
        Task::Align {
            reference: reference.clone(),
            model: model.clone(),
            output,
            writer: out.writer_options(Vec::new()),
        }
    };
    let request = Request {
        task,
        arch: args.arch,
        spec: args.spec.clone(),
        families: crate::train::models::alignment_families(),
        builtin: builtin::Options { permute_residual: args.permute_residual },
        matching: Options { seed: args.seed, max_iter: args.max_iter },
    };
    request.validate()?;
    let (report, written, label) = match request::run(&request, &Executor::new(global.threads)?)? {
        Outcome::Spec { spec, label } => {
            let text = if args.json {
                spec.to_json()
            } else {
                let residual = if args.permute_residual { ", --permute-residual" } else { "" };
                spec.to_yaml(&[
                    format!("graft permutation spec ({label}{residual}) for {}", args.checkpoints[0].display()),
                    "groups: name -> units; tensors: one entry per axis: null, a group, or {group, block}".into(),
                ])
            };
            return emit(&text);
        }
        Outcome::Cycle { report, label } if args.json => {
            let mut v = serde_json::to_value(&report).unwrap();
            v["spec"] = label.into();
            v["seed"] = args.seed.into();
            return emit(&(v.to_string() + "\n"));
        }
        Outcome::Cycle { report, .. } => return emit(&render_cycle(&report)),
        Outcome::Aligned { report, written, label } => (report, written, label),
    };
    if args.json {
        let mut v = serde_json::json!({
            "reference": args.checkpoints[0].display().to_string(),
            "model": args.checkpoints[1].display().to_string(),
            "output": written.path.display().to_string(),
            "spec": label,
            "seed": args.seed,
            "max_iter": args.max_iter,
        });
        let rep = serde_json::to_value(&report).unwrap();
        for (k, x) in rep.as_object().unwrap() {
            v[k] = x.clone();
        }
        return emit(&(v.to_string() + "\n"));
    }
    let mut s = String::new();
    let mut t = table(&["group", "units", "tensors", "objective before", "objective after", "moved"]);
    for g in &report.groups {
        t.add_row(vec![
            g.name.clone(),
            g.size.to_string(),
            g.tensors.to_string(),
            format!("{:.6}", g.objective_before),
            format!("{:.6}", g.objective_after),
            if g.identity { "identity".into() } else { format!("{} of {}", g.moved, g.size) },
        ]);
    }
    let _ = writeln!(s, "{t}");
    let _ = writeln!(
        s,
        "objective {:.6} -> {:.6} ({:+.6}) in {} pass{}{}; spec: {label}",
        report.objective_before,
        report.objective_after,
        report.objective_after - report.objective_before,
        report.iterations,
        if report.iterations == 1 { "" } else { "es" },
        if report.converged { ", converged" } else { ", stopped by --max-iter" },
    );
    let _ = writeln!(s, "wrote {} ({} tensors)", written.path.display(), written.tensors);
    emit(&s)
}

fn render_cycle(r: &align::CycleReport) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "reference: {}", r.reference);
    let mut t = table(&[
        "model",
        "objective gain",
        "passes",
        "round trip: identity groups",
        "fixed units",
        "rel. distance",
        "mse sum",
    ]);
    for p in &r.pairs {
        t.add_row(vec![
            p.model.clone(),
            format!("{:+.6}", p.forward.objective_after - p.forward.objective_before),
            format!("{} + {}", p.forward.iterations, p.back_iterations),
            format!("{} of {}", p.round_trip.identity_groups, p.round_trip.groups),
            format!("{:.4}", p.round_trip.fixed_units),
            format!("{:.3e}", p.round_trip.relative_distance),
            format!("{:.3e}", p.round_trip.mse_sum),
        ]);
    }
    let _ = writeln!(s, "{t}");
    let c = &r.cycle.composed;
    let _ = writeln!(
        s,
        "loop {} <- {}: {} of {} groups compose to the identity, {:.4} of units fixed, relative distance {:.3e}, \
         mse sum {:.3e}",
        r.cycle.models.join(" <- "),
        r.cycle.models[0],
        c.identity_groups,
        c.groups,
        c.fixed_units,
        c.relative_distance,
        c.mse_sum
    );
    s
}
