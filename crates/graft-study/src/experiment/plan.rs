//! The experiment plan: a YAML file describing the SNR-selective merging study (the reference study's workflow), with
//! defaults that reproduce it at a CPU-friendly scale; or, with `kind: llm`, the study on a causal LM (two text
//! domains, selectively fine-tuned experts, SNR-selective merges, perplexity on both domains). Unknown keys are
//! errors, never silently ignored.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Plan {
    /// A label for reports.
    #[serde(default = "default_name")]
    pub name: String,
    /// Training data, as `graft train --data` takes it (a path or `kind:path`).
    pub data: String,
    /// Model architecture (`graft train --arch`) and its options, passed as `--KEY VALUE` flags.
    #[serde(default = "default_arch")]
    pub arch: String,
    #[serde(default)]
    pub arch_options: std::collections::BTreeMap<String, serde_json::Value>,
    /// Classes of expert A and expert B (disjoint).
    #[serde(default = "default_expert_a")]
    pub expert_a: Vec<usize>,
    #[serde(default = "default_expert_b")]
    pub expert_b: Vec<usize>,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    #[serde(default = "Stage::base")]
    pub base: Stage,
    #[serde(default = "Stage::experts")]
    pub experts: Stage,
    #[serde(default = "Stage::finetune")]
    pub finetune: Stage,
    /// Learning rate for fine-tuning the base model (the baseline); the reference used half the merged models' rate.
    #[serde(default = "default_baseline_lr")]
    pub baseline_lr: f64,
    /// Align the experts to the base before merging (weight matching).
    #[serde(default = "yes")]
    pub align: bool,
    /// Merge methods: lerp, slerp, ties (and any other `graft merge` method for two experts).
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    /// Fractions of layers merged, ranked by the base model's SNR.
    #[serde(default = "default_top_p")]
    pub top_p: Vec<f64>,
    /// Also rank by the experts' average SNR (at each top-p below 1, with the first method).
    #[serde(default = "yes")]
    pub snr_average_variant: bool,
    /// Freeze policies for fine-tuning merged models: head, selected, full.
    #[serde(default = "default_freeze")]
    pub freeze: Vec<Freeze>,
    /// Worker threads for each step (None: graft's default).
    #[serde(default)]
    pub threads: Option<usize>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    pub epochs: usize,
    pub lr: f64,
    #[serde(default = "default_batch")]
    pub batch: usize,
}

impl Stage {
    fn base() -> Self {
        Stage { epochs: 5, lr: 0.005, batch: default_batch() }
    }
    fn experts() -> Self {
        Stage { epochs: 5, lr: 1e-3, batch: default_batch() }
    }
    fn finetune() -> Self {
        Stage { epochs: 10, lr: 1e-4, batch: default_batch() }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Freeze {
    /// Train only the output head.
    Head,
    /// Train the merged (SNR-selected) layers and the head.
    Selected,
    /// Train everything.
    Full,
}

impl Freeze {
    pub fn label(self) -> &'static str {
        match self {
            Freeze::Head => "head",
            Freeze::Selected => "selected",
            Freeze::Full => "full",
        }
    }
}

fn default_name() -> String {
    "snr-selective-merging".into()
}
fn default_arch() -> String {
    "sepcnn".into()
}
fn default_expert_a() -> Vec<usize> {
    vec![0, 1, 8, 9]
}
fn default_expert_b() -> Vec<usize> {
    vec![2, 3, 4, 5, 6, 7]
}
fn default_seeds() -> Vec<u64> {
    vec![0]
}
fn default_batch() -> usize {
    128
}
fn default_baseline_lr() -> f64 {
    5e-5
}
fn yes() -> bool {
    true
}
fn default_methods() -> Vec<String> {
    vec!["lerp".into(), "slerp".into(), "ties".into()]
}
fn default_top_p() -> Vec<f64> {
    vec![0.10, 0.15, 1.0]
}
fn default_freeze() -> Vec<Freeze> {
    vec![Freeze::Head, Freeze::Selected, Freeze::Full]
}

impl Plan {
    pub fn load(path: &Path) -> Result<Plan> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let plan: Plan = yaml_serde::from_str(&text).map_err(|e| Error::format(path, format!("invalid plan: {e}")))?;
        plan.validate().map_err(|m| Error::format(path, m))?;
        Ok(plan)
    }

    /// Checks what YAML types cannot: class sets, fractions, non-empty lists.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.expert_a.is_empty() || self.expert_b.is_empty() {
            return Err("expert_a and expert_b need at least one class each".into());
        }
        if let Some(c) = self.expert_a.iter().find(|c| self.expert_b.contains(c)) {
            return Err(format!("class {c} is in both expert_a and expert_b; the experts' classes must be disjoint"));
        }
        if let Some(p) = self.top_p.iter().find(|p| p.is_nan() || **p <= 0.0 || **p > 1.0) {
            return Err(format!("top_p {p} is not in (0, 1]"));
        }
        if self.seeds.is_empty() || self.methods.is_empty() || self.top_p.is_empty() || self.freeze.is_empty() {
            return Err("seeds, methods, top_p and freeze must not be empty".into());
        }
        for s in [&self.base, &self.experts, &self.finetune] {
            if s.epochs == 0 || s.batch == 0 || s.lr.is_nan() || s.lr <= 0.0 {
                return Err("every stage needs epochs >= 1, batch >= 1 and lr > 0".into());
            }
        }
        Ok(())
    }

    /// The plan `graft demo` runs: the whole study on the digits shipped in fixtures/, small enough for 2 cores.
    pub fn demo(data_dir: &Path) -> Plan {
        Plan {
            name: "demo: SNR-selective merging on 8x8 digits".into(),
            data: format!("idx:{}", data_dir.display()),
            arch: "mlp".into(),
            arch_options: [("hidden".to_string(), serde_json::json!("64,64,64"))].into_iter().collect(),
            expert_a: default_expert_a(),
            expert_b: default_expert_b(),
            seeds: vec![0, 1],
            base: Stage { epochs: 8, lr: 0.005, batch: 64 },
            experts: Stage { epochs: 5, lr: 1e-3, batch: 64 },
            finetune: Stage { epochs: 5, lr: 1e-3, batch: 64 },
            baseline_lr: 5e-4,
            align: true,
            methods: default_methods(),
            top_p: default_top_p(),
            snr_average_variant: true,
            freeze: default_freeze(),
            threads: None,
        }
    }
}

/// The study on a causal LM (`kind: llm`): expert A and expert B fine-tuned from one base on two text domains, with
/// only the base's highest-SNR layers unfrozen (Spectrum's selection); no alignment (the experts share the base);
/// every method merged at every top-p by the base's SNR; every model's perplexity on both domains' test texts.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmPlan {
    pub kind: LlmKind,
    #[serde(default = "default_llm_name")]
    pub name: String,
    /// The base model: a llama-family checkpoint (file or directory with `config.json` and the tokenizer) or a GGUF
    /// file, converted by `graft convert` first.
    pub base: String,
    pub domain_a: Domain,
    pub domain_b: Domain,
    #[serde(default = "default_seeds")]
    pub seeds: Vec<u64>,
    /// Percentage of each layer type the experts train, best base SNR first (`graft snr --top-percent`; 100 trains
    /// everything).
    #[serde(default = "default_unfrozen_percent")]
    pub unfrozen_percent: f64,
    #[serde(default = "LlmStage::experts")]
    pub experts: LlmStage,
    /// Tokens per window when measuring perplexity.
    #[serde(default = "default_eval_max_len")]
    pub eval_max_len: usize,
    /// Merge methods (`graft merge --method`; `lerp` is `linear`), each at every top-p.
    #[serde(default = "default_llm_methods")]
    pub methods: Vec<String>,
    /// Fractions of the weight matrices merged, ranked by the base's SNR; the rest come from the base.
    #[serde(default = "default_llm_top_p")]
    pub top_p: Vec<f64>,
    /// Keep every merged checkpoint; `false` deletes each once both its evaluations are done (a model of 135M
    /// parameters is 0.5 GB in f32). A rerun merges again only what it has to evaluate again.
    #[serde(default = "yes")]
    pub keep_merged: bool,
    #[serde(default)]
    pub threads: Option<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LlmKind {
    Llm,
}

/// One text domain: a name for reports and its training and test texts, as `graft train`/`graft eval --data` take
/// them (`text:PATH`: a text file, a `.jsonl` of `{"text": ...}` lines, or a directory of them).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Domain {
    pub name: String,
    pub train: String,
    pub test: String,
}

/// Fine-tuning of the experts (`graft train` of a causal LM).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LlmStage {
    #[serde(default = "one")]
    pub epochs: usize,
    pub lr: f64,
    /// Sequences per optimiser step.
    #[serde(default = "default_llm_batch")]
    pub batch: usize,
    /// Tokens per packed training sequence.
    #[serde(default = "default_eval_max_len")]
    pub max_len: usize,
}

impl LlmStage {
    fn experts() -> Self {
        LlmStage { epochs: 1, lr: 1e-4, batch: default_llm_batch(), max_len: default_eval_max_len() }
    }
}

fn default_llm_name() -> String {
    "SNR-selective merging of LLM experts".into()
}
fn default_unfrozen_percent() -> f64 {
    25.0
}
fn default_eval_max_len() -> usize {
    128
}
fn default_llm_batch() -> usize {
    8
}
fn one() -> usize {
    1
}
fn default_llm_methods() -> Vec<String> {
    vec!["linear".into(), "task_arithmetic".into(), "ties".into()]
}
fn default_llm_top_p() -> Vec<f64> {
    vec![0.25, 1.0]
}

impl LlmPlan {
    /// Checks what YAML types cannot: distinct domain names usable in metric names, fractions, non-empty lists.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for d in [&self.domain_a, &self.domain_b] {
            if d.name.is_empty() || !d.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                return Err(format!(
                    "domain name '{}' must be letters, digits, '-' or '_' (it names the report's columns)",
                    d.name
                ));
            }
        }
        if self.domain_a.name == self.domain_b.name {
            return Err(format!("domain_a and domain_b are both named '{}'", self.domain_a.name));
        }
        if let Some(p) = self.top_p.iter().find(|p| p.is_nan() || **p <= 0.0 || **p > 1.0) {
            return Err(format!("top_p {p} is not in (0, 1]"));
        }
        if !(self.unfrozen_percent > 0.0 && self.unfrozen_percent <= 100.0) {
            return Err(format!("unfrozen_percent {} is not in (0, 100]", self.unfrozen_percent));
        }
        if self.seeds.is_empty() || self.methods.is_empty() || self.top_p.is_empty() {
            return Err("seeds, methods and top_p must not be empty".into());
        }
        let e = &self.experts;
        if e.epochs == 0 || e.batch == 0 || e.max_len < 2 || e.lr.is_nan() || e.lr <= 0.0 || self.eval_max_len < 2 {
            return Err("experts need epochs >= 1, batch >= 1, max_len >= 2 and lr > 0; eval_max_len >= 2".into());
        }
        Ok(())
    }
}

/// A plan of either kind.
#[derive(Clone, Debug)]
pub enum Study {
    Classifier(Plan),
    Llm(LlmPlan),
}

impl Study {
    /// Reads a plan file: `kind: llm` is the LLM study; no `kind` (or `kind: classifier`) the classifier study.
    pub fn load(path: &Path) -> Result<Study> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Study::parse(&text).map_err(|m| Error::format(path, m))
    }

    pub fn parse(text: &str) -> std::result::Result<Study, String> {
        let mut value: yaml_serde::Value = yaml_serde::from_str(text).map_err(|e| format!("invalid plan: {e}"))?;
        let kind = match value.get("kind") {
            None => "classifier".to_string(),
            Some(yaml_serde::Value::String(k)) => k.clone(),
            Some(other) => return Err(format!("invalid plan: kind {other:?} is not a string")),
        };
        match kind.as_str() {
            "llm" => {
                let plan: LlmPlan = yaml_serde::from_value(value).map_err(|e| format!("invalid plan: {e}"))?;
                plan.validate()?;
                Ok(Study::Llm(plan))
            }
            "classifier" => {
                if let yaml_serde::Value::Mapping(m) = &mut value {
                    m.remove("kind");
                }
                let plan: Plan = yaml_serde::from_value(value).map_err(|e| format!("invalid plan: {e}"))?;
                plan.validate()?;
                Ok(Study::Classifier(plan))
            }
            other => Err(format!("invalid plan: unknown kind '{other}' (expected classifier or llm)")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_fill_a_minimal_plan_and_unknown_keys_are_refused() {
        let p: Plan = yaml_serde::from_str("data: idx:some/path\n").unwrap();
        assert_eq!(p.expert_a, vec![0, 1, 8, 9]);
        assert_eq!(p.top_p, vec![0.10, 0.15, 1.0]);
        assert_eq!(p.freeze, vec![Freeze::Head, Freeze::Selected, Freeze::Full]);
        assert!(p.validate().is_ok());
        let e = yaml_serde::from_str::<Plan>("data: x\ntopp: [0.1]\n").unwrap_err().to_string();
        assert!(e.contains("unknown field `topp`"), "{e}");
        let p: Plan = yaml_serde::from_str("data: x\nexpert_a: [1, 2]\nexpert_b: [2, 3]\n").unwrap();
        assert_eq!(
            p.validate().unwrap_err(),
            "class 2 is in both expert_a and expert_b; the experts' classes must be disjoint"
        );
        let p: Plan = yaml_serde::from_str("data: x\ntop_p: [0.0]\n").unwrap();
        assert!(p.validate().is_err());
    }

    const LLM: &str = "kind: llm\nbase: b\ndomain_a: {name: spam, train: text:a, test: text:at}\n\
                       domain_b: {name: reviews, train: text:b, test: text:bt}\n";

    #[test]
    fn llm_plans_fill_defaults_and_refuse_unknown_keys_and_bad_values() {
        let Study::Llm(p) = Study::parse(LLM).unwrap() else { panic!("not an LLM plan") };
        assert_eq!((p.unfrozen_percent, p.top_p.clone(), p.experts.batch), (25.0, vec![0.25, 1.0], 8));
        assert!(matches!(Study::parse("data: x\n").unwrap(), Study::Classifier(_)));
        assert!(matches!(Study::parse("kind: classifier\ndata: x\n").unwrap(), Study::Classifier(_)));
        let e = Study::parse(&format!("{LLM}expert_a: [1]\n")).unwrap_err();
        assert!(e.contains("unknown field `expert_a`"), "{e}");
        let e = Study::parse(&format!("{LLM}experts: {{lr: 0.1, steps: 3}}\n")).unwrap_err();
        assert!(e.contains("unknown field `steps`"), "{e}");
        let e = Study::parse("kind: vision\ndata: x\n").unwrap_err();
        assert_eq!(e, "invalid plan: unknown kind 'vision' (expected classifier or llm)");
        let same = LLM.replace("reviews", "spam");
        assert_eq!(Study::parse(&same).unwrap_err(), "domain_a and domain_b are both named 'spam'");
        assert!(Study::parse(&format!("{LLM}unfrozen_percent: 0\n")).is_err());
        assert!(Study::parse(&format!("{LLM}top_p: [1.5]\n")).is_err());
    }
}
