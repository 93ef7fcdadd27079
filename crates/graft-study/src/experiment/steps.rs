//! Expanding a plan into steps: the graft subcommands that train the base and the experts, align the experts, scan
//! SNR, merge, measure consistency and fine-tune every merged model under every freeze policy, per seed.
//!
//! The classifier study's steps come in two phases: the second (merging and everything after it) is planned once the
//! first has run, because whether the naive (unaligned) merges are needed depends on whether alignment changed
//! anything. An LLM study's steps (`llm_steps`: the base's SNR scan, the experts' selective fine-tuning, the merges
//! and every model's perplexity on both domains) are one phase: its experts share the base, so nothing is aligned.

use std::path::{Path, PathBuf};

use super::plan::{Freeze, LlmPlan, Plan};
use super::runner::Step;
use graft_ops::merge::select::SnrSource;

/// The directory of one seed's artefacts.
pub fn seed_dir(rundir: &Path, seed: u64) -> PathBuf {
    rundir.join(format!("seed-{seed}"))
}

/// Where a fine-tuning step's results line goes (collected into RUNDIR/results.jsonl afterwards).
pub fn results_file(rundir: &Path, seed: u64, id: &str) -> PathBuf {
    seed_dir(rundir, seed).join("results").join(format!("{id}.jsonl"))
}

fn s(v: impl ToString) -> String {
    v.to_string()
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn common(plan: &Plan, seed: u64) -> Vec<String> {
    let mut a = vec![s("--data"), plan.data.clone(), s("--seed"), s(seed)];
    if let Some(t) = plan.threads {
        a.extend([s("--threads"), s(t)]);
    }
    a
}

fn stage_args(stage: &super::plan::Stage, lr: f64) -> Vec<String> {
    vec![s("--epochs"), s(stage.epochs), s("--lr"), s(lr), s("--batch"), s(stage.batch), s("--quiet")]
}

fn classes(c: &[usize]) -> String {
    c.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

/// Training of the base and experts, alignment and SNR scans.
pub fn phase_one(plan: &Plan, rundir: &Path) -> Vec<Step> {
    let mut steps = Vec::new();
    for &seed in &plan.seeds {
        let dir = seed_dir(rundir, seed);
        let id = |x: &str| format!("seed{seed}/{x}");
        let base = dir.join("base");
        let mut args = vec![s("train"), s("--arch"), plan.arch.clone()];
        for (k, v) in &plan.arch_options {
            args.push(format!("--{}", k.replace('_', "-")));
            args.push(v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
        }
        args.extend(common(plan, seed));
        args.extend(stage_args(&plan.base, plan.base.lr));
        args.extend([s("-o"), path(&base), s("--force")]);
        steps.push(Step { id: id("base"), args, outputs: vec![base.clone()], after: vec![], stdout_to: None });

        for (name, cls) in [("expert-a", &plan.expert_a), ("expert-b", &plan.expert_b)] {
            let out = dir.join(name);
            let mut args = vec![s("train"), s("--transfer-body"), path(&base), s("--classes"), classes(cls)];
            args.extend(common(plan, seed));
            args.extend(stage_args(&plan.experts, plan.experts.lr));
            args.extend([s("-o"), path(&out), s("--force")]);
            steps.push(Step { id: id(name), args, outputs: vec![out], after: vec![id("base")], stdout_to: None });
        }
        if plan.align {
            for e in ["a", "b"] {
                let out = dir.join(format!("aligned-{e}"));
                let mut args = vec![s("align"), path(&base), path(&dir.join(format!("expert-{e}")))];
                args.extend([s("--seed"), s(seed), s("-o"), path(&out), s("--force"), s("--json")]);
                steps.push(Step {
                    id: id(&format!("align-{e}")),
                    args,
                    outputs: vec![out],
                    after: vec![id(&format!("expert-{e}"))],
                    stdout_to: Some(dir.join(format!("align-{e}.json"))),
                });
            }
        }
        for m in ["base", "expert-a", "expert-b"] {
            let after = vec![id(m)];
            steps.push(Step {
                id: id(&format!("snr-{m}")),
                args: vec![s("snr"), path(&dir.join(m)), s("--json")],
                outputs: vec![],
                after,
                stdout_to: Some(dir.join(format!("snr-{m}.json"))),
            });
        }
    }
    steps
}

/// One merged model of the study.
#[derive(Clone, Debug)]
pub struct MergeSpec {
    pub method: String,
    pub top_p: f64,
    /// Whose SNR ranks the layers: the base's, or the experts' average.
    pub snr_from: SnrSource,
    /// Merge the aligned experts (false: the naive merge of the unaligned ones).
    pub aligned: bool,
}

impl MergeSpec {
    pub fn id(&self) -> String {
        let mut id = format!("{}-p{}", self.method, self.top_p);
        if self.snr_from == SnrSource::Avg {
            id.push_str("-snravg");
        }
        if !self.aligned {
            id.push_str("-naive");
        }
        id
    }

    /// The experiment name in reports, e.g. `lerp top-15%` or `lerp all layers (naive)`.
    pub fn label(&self) -> String {
        let p =
            if self.top_p >= 1.0 { "all layers".to_string() } else { format!("top-{}%", (self.top_p * 100.0).round()) };
        let mut l = format!("{} {p}", self.method);
        if self.snr_from == SnrSource::Avg {
            l.push_str(" (SNR avg)");
        }
        if !self.aligned {
            l.push_str(" (naive)");
        }
        l
    }
}

/// The merges of the study: every method at every top-p, the SNR-average ranking variant, and (when alignment
/// changed something) the naive merges of the unaligned experts at every top-p with the first method.
pub fn merges(plan: &Plan, alignment_changed: bool) -> Vec<MergeSpec> {
    let mut v = Vec::new();
    for m in &plan.methods {
        for &p in &plan.top_p {
            v.push(MergeSpec { method: m.clone(), top_p: p, snr_from: SnrSource::Base, aligned: plan.align });
        }
    }
    if plan.snr_average_variant {
        for &p in plan.top_p.iter().filter(|p| **p < 1.0) {
            v.push(MergeSpec {
                method: plan.methods[0].clone(),
                top_p: p,
                snr_from: SnrSource::Avg,
                aligned: plan.align,
            });
        }
    }
    if plan.align && alignment_changed {
        for &p in &plan.top_p {
            v.push(MergeSpec { method: plan.methods[0].clone(), top_p: p, snr_from: SnrSource::Base, aligned: false });
        }
    }
    v
}

/// graft merge's method for a study method: the study's LERP is mergekit's linear; its TIES is sign election and
/// disjoint averaging without trimming (density 1).
fn merge_method_args(method: &str) -> Vec<String> {
    match method {
        "lerp" | "linear" => vec![s("--method"), s("linear")],
        "ties" => vec![s("--method"), s("ties"), s("--density"), s("1")],
        // t is the fallback; --alpha snr sets each merged layer's own.
        "slerp" => vec![s("--method"), s("slerp"), s("--t"), s("0.5")],
        other => vec![s("--method"), s(other)],
    }
}

/// Merging, consistency, baseline and fine-tuning steps for one seed.
pub fn phase_two(plan: &Plan, rundir: &Path, seed: u64, merges: &[MergeSpec]) -> Vec<Step> {
    let dir = seed_dir(rundir, seed);
    let id = |x: &str| format!("seed{seed}/{x}");
    let base = dir.join("base");
    let mut steps = Vec::new();
    let finetune = |steps: &mut Vec<Step>,
                    key: &str,
                    label: &str,
                    init: &Path,
                    freeze: Freeze,
                    lr: f64,
                    baseline: bool,
                    after: String,
                    config: &[(&str, String)]| {
        let step_id = id(&format!("ft-{key}-{}", freeze.label()));
        let results = results_file(rundir, seed, &format!("ft-{key}-{}", freeze.label()));
        let freeze_arg = match freeze {
            Freeze::Head => s("all-but-head"),
            Freeze::Selected => format!("selected:{}", path(init)),
            Freeze::Full => s("none"),
        };
        let mut args = vec![s("train"), s("--init"), path(init), s("--freeze"), freeze_arg];
        args.extend(common(plan, seed));
        args.extend(stage_args(&plan.finetune, lr));
        args.extend([s("--results"), path(&results), s("--experiment"), format!("{label} / {}", freeze.label())]);
        for (k, v) in config {
            args.extend([s("--config"), format!("{k}={v}")]);
        }
        if baseline {
            args.push(s("--baseline"));
        }
        steps.push(Step { id: step_id, args, outputs: vec![results], after: vec![after], stdout_to: None });
    };
    finetune(
        &mut steps,
        "base",
        "base",
        &base,
        Freeze::Full,
        plan.baseline_lr,
        true,
        id("base"),
        &[("method", s("none"))],
    );
    for m in merges {
        let out = dir.join(format!("merge-{}", m.id()));
        let (a, b, prefix) =
            if m.aligned { ("aligned-a", "aligned-b", "align") } else { ("expert-a", "expert-b", "expert") };
        let mut args = vec![s("merge")];
        args.extend(merge_method_args(&m.method));
        args.extend([path(&dir.join(a)), path(&dir.join(b)), s("--base"), path(&base)]);
        args.extend([s("--snr-select"), format!("top-p={}", m.top_p), s("--snr-from"), m.snr_from.to_string()]);
        args.extend([
            s("--alpha"),
            s("snr"),
            s("--reference"),
            s("base"),
            s("-o"),
            path(&out),
            s("--force"),
            s("--json"),
        ]);
        let merge_id = id(&format!("merge-{}", m.id()));
        steps.push(Step {
            id: merge_id.clone(),
            args,
            outputs: vec![out.clone()],
            after: vec![id(&format!("{prefix}-a")), id(&format!("{prefix}-b"))],
            stdout_to: Some(dir.join(format!("merge-{}.json", m.id()))),
        });
        steps.push(Step {
            id: id(&format!("consistency-{}", m.id())),
            args: vec![
                s("similarity"),
                s("--merged"),
                path(&out),
                s("--experts"),
                path(&dir.join(a)),
                path(&dir.join(b)),
                s("--base"),
                path(&base),
                s("--only-merged"),
                // The experts' heads (other class counts) cannot be compared with the base's.
                s("--allow-missing"),
                s("--json"),
            ],
            outputs: vec![],
            after: vec![merge_id.clone()],
            stdout_to: Some(dir.join(format!("consistency-{}.json", m.id()))),
        });
        let config = [
            ("method", m.method.clone()),
            ("top_p", s(m.top_p)),
            ("snr_from", m.snr_from.to_string()),
            ("aligned", s(m.aligned)),
        ];
        for &f in &plan.freeze {
            finetune(&mut steps, &m.id(), &m.label(), &out, f, plan.finetune.lr, false, merge_id.clone(), &config);
        }
    }
    steps
}

// The study on a causal LM (`kind: llm`).

/// One model of an LLM study: its id (path-safe, also its directory under the seed's), its label in reports, and
/// the merge it comes from, if any.
#[derive(Clone, Debug)]
pub struct LlmModel {
    pub id: String,
    pub label: String,
    pub merge: Option<MergeSpec>,
}

/// Where the base's SNR scan leaves the experts' unfrozen-parameter YAML and the scores the merges rank by.
pub fn llm_unfrozen_yaml(rundir: &Path) -> PathBuf {
    rundir.join("snr-base-unfrozen.yaml")
}
pub fn llm_selection(rundir: &Path) -> PathBuf {
    rundir.join("snr-base-selection.json")
}

/// The base model's checkpoint: the plan's own, or its conversion when the plan names a GGUF file.
pub fn llm_base(plan: &LlmPlan, rundir: &Path) -> PathBuf {
    if llm_base_is_gguf(plan) {
        rundir.join("base")
    } else {
        PathBuf::from(&plan.base)
    }
}

fn llm_base_is_gguf(plan: &LlmPlan) -> bool {
    Path::new(&plan.base).extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// Where a model's perplexity on one domain is kept (`graft eval --json`). The base's are shared by every seed.
pub fn llm_eval_report(rundir: &Path, seed: u64, model: &str, domain: &str) -> PathBuf {
    let dir = if model == "base" { rundir.to_path_buf() } else { seed_dir(rundir, seed) };
    dir.join("eval").join(format!("{model}-{domain}.json"))
}

/// Where an expert's training summary (`graft train --json`) or a merge's summary (`graft merge --json`) is kept.
pub fn llm_step_report(rundir: &Path, seed: u64, model: &str) -> PathBuf {
    seed_dir(rundir, seed).join(format!("{model}.json"))
}

/// The models of an LLM study, in report order: the base, the experts, then every method at every top-p.
pub fn llm_models(plan: &LlmPlan) -> Vec<LlmModel> {
    let mut v = vec![
        LlmModel { id: "base".into(), label: "base".into(), merge: None },
        LlmModel { id: "expert-a".into(), label: format!("expert A ({})", plan.domain_a.name), merge: None },
        LlmModel { id: "expert-b".into(), label: format!("expert B ({})", plan.domain_b.name), merge: None },
    ];
    for m in &plan.methods {
        for &p in &plan.top_p {
            let spec = MergeSpec { method: m.clone(), top_p: p, snr_from: SnrSource::Base, aligned: true };
            v.push(LlmModel { id: format!("merge-{}", spec.id()), label: spec.label(), merge: Some(spec) });
        }
    }
    v
}

/// graft merge's arguments for a method of the LLM study: each expert at weight 1 (linear and TIES normalise, so
/// this is their mean; task arithmetic adds both task vectors to the base); TIES without trimming (density 1).
fn llm_merge_method_args(method: &str) -> Vec<String> {
    match method {
        "slerp" => merge_method_args(method),
        "lerp" | "linear" => vec![s("--method"), s("linear"), s("--weight"), s("1")],
        "ties" => vec![s("--method"), s("ties"), s("--density"), s("1"), s("--weight"), s("1")],
        other => vec![s("--method"), s(other), s("--weight"), s("1")],
    }
}

/// Every step of an LLM study: (conversion of a GGUF base), the base's SNR scan, the base's perplexity on both
/// domains, then per seed the two experts, every merge, and every model's perplexity on both domains.
pub fn llm_steps(plan: &LlmPlan, rundir: &Path) -> Vec<Step> {
    let threads: Vec<String> = plan.threads.map(|t| vec![s("--threads"), s(t)]).unwrap_or_default();
    let base = llm_base(plan, rundir);
    let mut steps = Vec::new();
    let mut base_after = Vec::new();
    if llm_base_is_gguf(plan) {
        let mut args = vec![s("convert"), plan.base.clone(), s("-o"), path(&base), s("--force")];
        args.extend(threads.clone());
        steps.push(Step {
            id: "convert-base".into(),
            args,
            outputs: vec![base.clone()],
            after: vec![],
            stdout_to: None,
        });
        base_after.push(s("convert-base"));
    }
    let (unfrozen, selection) = (llm_unfrozen_yaml(rundir), llm_selection(rundir));
    let mut args = vec![s("snr"), path(&base), s("--top-percent"), s(plan.unfrozen_percent)];
    args.extend([s("--unfrozen-yaml"), path(&unfrozen), s("--selection-json"), path(&selection), s("--json")]);
    args.extend(threads.clone());
    steps.push(Step {
        id: "snr-base".into(),
        args,
        outputs: vec![unfrozen.clone(), selection.clone()],
        after: base_after.clone(),
        stdout_to: Some(rundir.join("snr-base.json")),
    });
    let domains = [("a", &plan.domain_a), ("b", &plan.domain_b)];
    let eval = |steps: &mut Vec<Step>, seed: u64, model: &str, checkpoint: &Path, after: &[String]| {
        for (key, d) in domains {
            let report = llm_eval_report(rundir, seed, model, key);
            let mut args = vec![s("eval"), path(checkpoint), s("--data"), d.test.clone()];
            args.extend([s("--max-len"), s(plan.eval_max_len), s("--json")]);
            args.extend(threads.clone());
            let id =
                if model == "base" { format!("eval-base-{key}") } else { format!("seed{seed}/eval-{model}-{key}") };
            steps.push(Step { id, args, outputs: vec![], after: after.to_vec(), stdout_to: Some(report) });
        }
    };
    eval(&mut steps, 0, "base", &base, &base_after);
    for &seed in &plan.seeds {
        let dir = seed_dir(rundir, seed);
        let id = |x: &str| format!("seed{seed}/{x}");
        for (key, d) in domains {
            let name = format!("expert-{key}");
            let out = dir.join(&name);
            let freeze = if plan.unfrozen_percent >= 100.0 { s("none") } else { format!("regex:{}", path(&unfrozen)) };
            let e = &plan.experts;
            let mut args = vec![s("train"), s("--init"), path(&base), s("--data"), d.train.clone()];
            args.extend([s("--freeze"), freeze, s("--max-len"), s(e.max_len), s("--epochs"), s(e.epochs)]);
            args.extend([
                s("--lr"),
                s(e.lr),
                s("--batch"),
                s(e.batch),
                s("--seed"),
                s(seed),
                s("--quiet"),
                s("--json"),
            ]);
            args.extend([s("-o"), path(&out), s("--force")]);
            args.extend(threads.clone());
            steps.push(Step {
                id: id(&name),
                args,
                outputs: vec![out.clone()],
                after: vec![s("snr-base")],
                stdout_to: Some(llm_step_report(rundir, seed, &name)),
            });
            eval(&mut steps, seed, &name, &out, &[id(&name)]);
        }
        for model in llm_models(plan) {
            let Some(m) = &model.merge else { continue };
            let out = dir.join(&model.id);
            let mut args = vec![s("merge")];
            args.extend(llm_merge_method_args(&m.method));
            args.extend([path(&dir.join("expert-a")), path(&dir.join("expert-b")), s("--base"), path(&base)]);
            args.extend([s("--snr-select"), format!("top-p={}", m.top_p), s("--snr-from"), path(&selection)]);
            args.extend([s("--reference"), s("base"), s("-o"), path(&out), s("--force"), s("--json")]);
            args.extend(threads.clone());
            // A merge deleted after its evaluations (keep_merged: false) stays done; `run_llm` redoes it when an
            // evaluation of it is missing.
            steps.push(Step {
                id: id(&model.id),
                args,
                outputs: if plan.keep_merged { vec![out.clone()] } else { vec![] },
                after: vec![id("expert-a"), id("expert-b"), s("snr-base")],
                stdout_to: Some(llm_step_report(rundir, seed, &model.id)),
            });
            eval(&mut steps, seed, &model.id, &out, &[id(&model.id)]);
        }
    }
    steps
}
