//! The experiment plan: a YAML file describing the SNR-selective merging study (the reference study's workflow), with
//! defaults that reproduce it at a CPU-friendly scale. Unknown keys are errors, never silently ignored.

use std::path::{Path, PathBuf};

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
        let data = data_dir.join("digits-images-idx3-ubyte");
        Plan {
            name: "demo: SNR-selective merging on 8x8 digits".into(),
            data: format!("idx:{}", PathBuf::from(&data).display()),
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
}
