//! The trainable networks and the registry of their architectures.
//!
//! An architecture is one file here: a spec (its hyper-parameters, a serde struct) that implements `Spec`, a unit
//! struct that implements `Arch` (its `--arch` name, help line, task, how a fresh spec is built from the options and
//! the data, which foreign `config.json` it reads) and a network that implements `Model`. The registry is the one
//! `architectures!` line per architecture below: it declares the `ArchSpec` variant and the `ARCHS` entry, and every
//! `--arch` value, help text and lookup comes from `ARCHS`. A causal LM (llama) is an `Arch` without a `Spec`: its
//! spec is the Hugging Face `config.json` it is fine-tuned from (`lm_train`, `lm_eval`).
//!
//! A spec is serialised as the `graft_arch`-tagged JSON that the fixtures' `config.json` carries and that graft
//! writes into its outputs (`config.json` and the `graft.arch` metadata key), so any checkpoint graft produces can be
//! rebuilt without flags: the tag is the variant's name in lower case, then the spec's fields in declaration order.
//! Parameter names equal the PyTorch originals'.

mod bert;
mod layers;
pub mod llama;
mod mlp;
mod resnet20;
mod sepcnn;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::params::ParamStore;
use crate::error::{Error, Result};
/// The families of `graft align`'s built-in permutation specs.
pub use graft_ops::align::builtin::Arch as AlignFamily;
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

/// What a model learns, which decides the trainer and the evaluation that serve it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Labelled samples to classes: `train::run_train`, `train::run_eval`.
    Classifier,
    /// Next-token prediction on text: `lm_train`, `lm_eval` (perplexity).
    CausalLm,
}

/// How to build a model from `--arch` and its options when no checkpoint says.
#[derive(Clone, Debug)]
pub struct ArchOptions {
    pub arch: Option<&'static dyn Arch>,
    /// mlp hidden sizes.
    pub hidden: Vec<usize>,
    /// sepcnn/resnet20 width multiplier.
    pub width: f64,
    /// sepcnn stage depths.
    pub depths: Vec<usize>,
    /// bert pooling and head hidden size (also override a checkpoint's).
    pub pooling: Option<Pooling>,
    pub head_hidden: Option<usize>,
}

impl Default for ArchOptions {
    fn default() -> Self {
        ArchOptions {
            arch: None,
            hidden: vec![256, 128],
            width: 1.0,
            depths: sepcnn::DEFAULT_DEPTHS.to_vec(),
            pooling: None,
            head_hidden: None,
        }
    }
}

/// A trainable architecture, as `--arch NAME` selects it and as a checkpoint's `config.json` reveals it.
///
/// Adding one takes a file `models/<name>.rs` with
/// - a unit struct implementing this trait: `name` (the `--arch` value; for a classifier also the `graft_arch` tag,
///   so the `ArchSpec` variant is this name capitalised), `about` (its `--arch` help line), `task`, `fresh`,
///   `alignment` (the built-in permutation spec `graft align` uses for it), and for an architecture that loads
///   foreign checkpoints `reads_config` and `spec_from_config`;
/// - for a classifier, its spec struct implementing `Spec` (classes, the input it takes, building the network,
///   head and text facts) and the network implementing `Model` (forward pass, head prefixes, encoder layers: what
///   freezing needs);
///
/// and one line in `architectures!` below. Nothing else names architectures: `registry_lists_each_architecture_once`
/// checks that the registry and the serialised tags agree.
pub trait Arch: Sync + std::fmt::Debug {
    /// The `--arch` value.
    fn name(&self) -> &'static str;
    /// One line for `--arch`'s help.
    fn about(&self) -> &'static str;
    fn task(&self) -> Task {
        Task::Classifier
    }
    /// The spec of a fresh (seeded, untrained) model for samples of `sample_shape` (empty for text) in `classes`
    /// classes; an error (naming the flags to pass) for an architecture that only starts from a checkpoint.
    fn fresh(&self, options: &ArchOptions, sample_shape: &[usize], classes: usize) -> Result<ArchSpec>;
    /// The built-in permutation spec that aligns this architecture's checkpoints (`graft align`), if any.
    fn alignment(&self) -> Option<AlignFamily> {
        None
    }
    /// Whether a foreign (Hugging Face) `config.json`, one without `graft_arch`, describes this architecture.
    fn reads_config(&self, _config: &serde_json::Value) -> bool {
        false
    }
    /// The spec of a foreign `config.json` this architecture reads: the pretrained body with graft's default head.
    fn spec_from_config(&self, config: &serde_json::Value) -> std::result::Result<ArchSpec, String> {
        let _ = config;
        Err(format!("{} has no graft spec to read from a config.json", self.name()))
    }
}

/// The hyper-parameters of one classifier architecture: the payload of its `ArchSpec` variant.
pub trait Spec: Send + Sync {
    /// The registry entry this spec belongs to.
    fn arch(&self) -> &'static dyn Arch;
    fn num_classes(&self) -> usize;
    fn set_num_classes(&mut self, n: usize);
    /// What the model expects (as "the model expects ...") when samples of `sample_shape` do not fit it.
    fn unfit_input(&self, sample_shape: &[usize]) -> Option<String>;
    /// A freshly initialised (seeded) network with this spec, its parameters in `store`.
    fn build(&self, store: ParamStore) -> Result<Box<dyn Model>>;
    /// Applies the options that override a checkpoint's own spec (bert's pooling and head size).
    fn override_from(&mut self, _options: &ArchOptions) {}
    /// A tensor of the architecture's own head, for an architecture whose checkpoints may come without one (a
    /// pretrained encoder): such a checkpoint gets a fresh head sized to the data.
    fn head_tensor(&self) -> Option<&'static str> {
        None
    }
    /// Whether the model reads text: its checkpoints carry the tokenizer files they were trained with.
    fn reads_text(&self) -> bool {
        false
    }
    /// Adds what other tools need to read the `config.json` graft writes (bert: `model_type`, `architectures`).
    fn foreign_config(&self, _config: &mut serde_json::Value) {}
}

/// `Spec::unfit_input` of the convolutional networks: samples must be images of `channels` channels, (C, H, W).
pub fn unfit_image(channels: usize, sample_shape: &[usize]) -> Option<String> {
    (sample_shape.len() != 3 || sample_shape[0] != channels).then(|| format!("images of shape ({channels}, H, W)"))
}

/// Declares the registry: `Variant(spec type)` per classifier (the variant's lower-case name is its `graft_arch`
/// tag), then the architectures without a graft spec. Order is the order of help texts and messages.
macro_rules! architectures {
    ($($variant:ident($spec:ty) = $arch:expr),* $(,)? ; $($other:expr),* $(,)?) => {
        #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "graft_arch", rename_all = "lowercase")]
        pub enum ArchSpec {
            $($variant($spec)),*
        }

        impl ArchSpec {
            /// The spec's behaviour (the one dispatch over the variants).
            pub fn as_spec(&self) -> &dyn Spec {
                match self {
                    $(ArchSpec::$variant(s) => s),*
                }
            }

            fn as_spec_mut(&mut self) -> &mut dyn Spec {
                match self {
                    $(ArchSpec::$variant(s) => s),*
                }
            }
        }

        $(impl From<$spec> for ArchSpec {
            fn from(s: $spec) -> ArchSpec {
                ArchSpec::$variant(s)
            }
        })*

        /// Every trainable architecture, in the order help texts and messages list them.
        pub static ARCHS: &[&dyn Arch] = &[$(&$arch,)* $(&$other,)*];
    };
}

architectures! {
    Mlp(mlp::MlpSpec) = mlp::MlpArch,
    Sepcnn(sepcnn::SepcnnSpec) = sepcnn::SepcnnArch,
    Resnet20(resnet20::Resnet20Spec) = resnet20::Resnet20Arch,
    Bert(bert::BertSpec) = bert::BertArch;
    llama::LlamaArch,
}

/// Each registered architecture that `graft align` has a built-in spec for, by name: what alignment reads a
/// checkpoint's `graft_arch` with.
pub fn alignment_families() -> Vec<(&'static str, AlignFamily)> {
    ARCHS.iter().filter_map(|a| a.alignment().map(|f| (a.name(), f))).collect()
}

/// The architecture called `name`.
pub fn lookup(name: &str) -> Option<&'static dyn Arch> {
    ARCHS.iter().copied().find(|a| a.name() == name)
}

/// The names of the architectures for `task` as prose: "a, b, c or d".
pub fn names_of(task: Task) -> String {
    let names: Vec<&str> = ARCHS.iter().filter(|a| a.task() == task).map(|a| a.name()).collect();
    match names.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => names.join(""),
    }
}

/// The architecture of `task` whose foreign `config.json` this is.
pub fn reading_config(config: &serde_json::Value, task: Task) -> Option<&'static dyn Arch> {
    ARCHS.iter().copied().find(|a| a.task() == task && a.reads_config(config))
}

impl ArchSpec {
    pub fn arch(&self) -> &'static dyn Arch {
        self.as_spec().arch()
    }

    pub fn name(&self) -> &'static str {
        self.arch().name()
    }

    pub fn num_classes(&self) -> usize {
        self.as_spec().num_classes()
    }

    /// The same body with a head for `n` classes.
    pub fn with_num_classes(&self, n: usize) -> ArchSpec {
        let mut s = self.clone();
        s.as_spec_mut().set_num_classes(n);
        s
    }

    /// Applies the options that override a checkpoint's own spec.
    pub fn override_from(&mut self, options: &ArchOptions) {
        self.as_spec_mut().override_from(options)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("architecture serialises")
    }

    /// Reads an architecture from JSON: graft's own (`graft_arch`), or a foreign config one of the registry's
    /// classifiers reads (a Hugging Face BERT config, `model_type: bert`), which gets graft's default head.
    pub fn from_json(v: &serde_json::Value) -> std::result::Result<ArchSpec, String> {
        if v.get("graft_arch").is_some() {
            return serde_json::from_value(v.clone()).map_err(|e| e.to_string());
        }
        match reading_config(v, Task::Classifier) {
            Some(arch) => arch.spec_from_config(v),
            None => Err(format!(
                "no \"graft_arch\" field, and not a config.json any of {} reads (a Hugging Face BERT config is)",
                names_of(Task::Classifier)
            )),
        }
    }

    /// Checks that data with `sample_shape` (per sample; empty for text) fits this architecture.
    pub fn check_input(&self, sample_shape: &[usize]) -> Result<()> {
        match self.as_spec().unfit_input(sample_shape) {
            Some(want) => Err(Error::usage(format!(
                "the data's samples have shape {sample_shape:?} but the {} model expects {want}",
                self.name()
            ))),
            None => Ok(()),
        }
    }
}

/// A body (an encoder) whose pooled outputs a classifier head reads: when the body is frozen its outputs are a fixed
/// function of the inputs, computed once (feature extraction) instead of every epoch.
pub trait FeatureBody {
    /// The pooled outputs (N, features) of token ids (N, L) with their attention mask (N, L) of 0/1.
    fn pooled(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor>;
    /// Whether every body parameter is frozen.
    fn frozen(&self) -> bool;
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
    /// The body whose pooled outputs the head reads, for feature extraction (bert's encoder).
    fn feature_body(&self) -> Option<&dyn FeatureBody> {
        None
    }
}

/// Builds a freshly initialised model (seeded) for `spec`.
pub fn build(spec: &ArchSpec, store: ParamStore) -> Result<Box<dyn Model>> {
    spec.as_spec().build(store)
}

/// `round(base * width)`, at least 1: the width multiplier rule for every architecture.
pub fn scaled(base: usize, width: f64) -> usize {
    ((base as f64 * width).round() as usize).max(1)
}

#[cfg(test)]
mod tests;
