//! The trainable networks and their architecture descriptions.
//!
//! An architecture is an `ArchSpec`, serialised as the `graft_arch`-tagged JSON that the fixtures' `config.json`
//! carries and that graft writes into its outputs (`config.json` and the `graft.arch` metadata key), so any
//! checkpoint graft produces can be rebuilt without flags. Parameter names equal the PyTorch originals'.

pub mod bert;
pub mod layers;
pub mod llama;
pub mod mlp;
pub mod resnet20;
pub mod sepcnn;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::params::ParamStore;
use crate::error::{Error, Result};
pub use layers::{BatchNorm, BnStats, Ctx};

/// What a model consumes: dense inputs (images, feature vectors) or token ids with their attention mask.
pub enum Input {
    Dense(Tensor),
    Tokens { ids: Tensor, mask: Tensor },
}

/// The pooling of a BERT encoder's token states into one vector per sequence.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// The first token's state ([CLS]).
    Cls,
    /// Mean over the real (unmasked) tokens.
    Mean,
    /// Elementwise maximum over the real tokens.
    Max,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "graft_arch", rename_all = "lowercase")]
pub enum ArchSpec {
    /// Fully connected ReLU network: `sizes` = input, hidden..., classes.
    Mlp { sizes: Vec<usize> },
    /// The reference study's separable-conv residual network.
    Sepcnn { in_channels: usize, widths: Vec<usize>, depths: Vec<usize>, fc: Vec<usize>, num_classes: usize },
    /// CIFAR-style ResNet-20 (3 stages of `blocks` basic blocks, option-A shortcuts).
    Resnet20 { in_channels: usize, widths: Vec<usize>, blocks: usize, num_classes: usize },
    /// A BERT encoder with a pooling and a small classifier head (Linear-ReLU-Linear).
    Bert {
        #[serde(flatten)]
        config: bert::BertConfig,
        pooling: Pooling,
        head_hidden: usize,
        num_classes: usize,
    },
}

impl ArchSpec {
    pub fn name(&self) -> &'static str {
        match self {
            ArchSpec::Mlp { .. } => "mlp",
            ArchSpec::Sepcnn { .. } => "sepcnn",
            ArchSpec::Resnet20 { .. } => "resnet20",
            ArchSpec::Bert { .. } => "bert",
        }
    }

    pub fn num_classes(&self) -> usize {
        match self {
            ArchSpec::Mlp { sizes } => *sizes.last().unwrap_or(&0),
            ArchSpec::Sepcnn { num_classes, .. }
            | ArchSpec::Resnet20 { num_classes, .. }
            | ArchSpec::Bert { num_classes, .. } => *num_classes,
        }
    }

    /// The same body with a head for `n` classes.
    pub fn with_num_classes(&self, n: usize) -> ArchSpec {
        let mut s = self.clone();
        match &mut s {
            ArchSpec::Mlp { sizes } => {
                if let Some(l) = sizes.last_mut() {
                    *l = n
                }
            }
            ArchSpec::Sepcnn { num_classes, .. }
            | ArchSpec::Resnet20 { num_classes, .. }
            | ArchSpec::Bert { num_classes, .. } => *num_classes = n,
        }
        s
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("architecture serialises")
    }

    /// Reads an architecture from JSON: graft's own (`graft_arch`), or a Hugging Face BERT config
    /// (`model_type: bert`), which gets graft's default head.
    pub fn from_json(v: &serde_json::Value) -> std::result::Result<ArchSpec, String> {
        if v.get("graft_arch").is_some() {
            return serde_json::from_value(v.clone()).map_err(|e| e.to_string());
        }
        if v.get("model_type").and_then(|m| m.as_str()) == Some("bert") {
            let config: bert::BertConfig = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
            return Ok(ArchSpec::Bert { config, pooling: Pooling::Mean, head_hidden: 32, num_classes: 2 });
        }
        Err("no \"graft_arch\" field and not a BERT config".into())
    }

    /// Checks that data with `sample_shape` (per sample; empty for text) fits this architecture.
    pub fn check_input(&self, sample_shape: &[usize]) -> Result<()> {
        let numel: usize = sample_shape.iter().product();
        let bad = |want: String| {
            Err(Error::usage(format!(
                "the data's samples have shape {sample_shape:?} but the {} model expects {want}",
                self.name()
            )))
        };
        match self {
            ArchSpec::Mlp { sizes } if sample_shape.is_empty() || sizes[0] != numel => {
                bad(format!("{} input features", sizes[0]))
            }
            ArchSpec::Sepcnn { in_channels, .. } | ArchSpec::Resnet20 { in_channels, .. }
                if sample_shape.len() != 3 || sample_shape[0] != *in_channels =>
            {
                bad(format!("images of shape ({in_channels}, H, W)"))
            }
            ArchSpec::Bert { .. } if !sample_shape.is_empty() => bad("text".into()),
            _ => Ok(()),
        }
    }
}

/// A network: its parameter store, its forward pass and which of its tensors form the classification head.
pub trait Model: Send {
    fn spec(&self) -> &ArchSpec;
    fn store(&self) -> &ParamStore;
    /// Logits (N, classes).
    fn forward(&self, x: &Input, ctx: &Ctx) -> candle_core::Result<Tensor>;
    /// The BatchNorm layers (for the running-statistics policy).
    fn batchnorms(&self) -> Vec<&BatchNorm> {
        Vec::new()
    }
    /// Module name prefixes of the classification head (replaced by `--transfer-body`, trained by `all-but-head`).
    fn head_prefixes(&self) -> Vec<String>;
    /// Whether a tensor belongs to the head.
    fn is_head(&self, name: &str) -> bool {
        self.head_prefixes().iter().any(|p| name == p || name.starts_with(&format!("{p}.")))
    }
    /// Encoder layer index of a tensor for `--train-last-layers` (transformers only).
    fn encoder_layer(&self, _name: &str) -> Option<usize> {
        None
    }
    fn encoder_layers(&self) -> usize {
        0
    }
    /// The BERT classifier behind this model, for feature extraction.
    fn as_bert(&self) -> Option<&bert::BertClassifier> {
        None
    }
}

/// Builds a freshly initialised model (seeded) for `spec`.
pub fn build(spec: &ArchSpec, store: ParamStore) -> Result<Box<dyn Model>> {
    Ok(match spec {
        ArchSpec::Mlp { .. } => Box::new(mlp::Mlp::new(spec.clone(), store)?),
        ArchSpec::Sepcnn { .. } => Box::new(sepcnn::SepCnn::new(spec.clone(), store)?),
        ArchSpec::Resnet20 { .. } => Box::new(resnet20::ResNet20::new(spec.clone(), store)?),
        ArchSpec::Bert { .. } => Box::new(bert::BertClassifier::new(spec.clone(), store)?),
    })
}

/// `round(base * width)`, at least 1: the width multiplier rule for every architecture.
pub fn scaled(base: usize, width: f64) -> usize {
    ((base as f64 * width).round() as usize).max(1)
}

#[cfg(test)]
mod tests;
