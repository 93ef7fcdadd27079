//! A BERT encoder classifier that loads real pretrained checkpoints (MiniLM-L6, BERT-base...) under Hugging Face's
//! `BertModel` names (`embeddings.*`, `encoder.layer.{i}.*`, `pooler.dense`; a `bert.` prefix is accepted when
//! loading), followed by a pooling of the last hidden states (`cls`, masked `mean`, masked `max`, as the reference
//! notebooks) and the notebooks' head `classifier.dense` (hidden -> head_hidden) + ReLU + `classifier.out`.
//!
//! Differences from Hugging Face training mode: no dropout inside the encoder (runs are deterministic and the
//! feature-extraction mode is exactly a function of the inputs). The pooler is kept (loaded and saved unchanged) but
//! unused, as in the notebooks, which pool the last hidden states themselves.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::layers::{Ctx, Linear};
use super::{Arch, ArchOptions, ArchSpec, FeatureBody, Input, Model, Pooling, Spec};
use crate::error::{Arg, Error, Result};
use crate::train::ops;
use crate::train::params::{Init, Param, ParamStore};

fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}

/// The fields of a Hugging Face BERT `config.json` graft needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

/// The `bert` architecture: a pretrained encoder (graft's own output or a Hugging Face BERT directory) with a head.
#[derive(Debug)]
pub struct BertArch;

impl Arch for BertArch {
    fn name(&self) -> &'static str {
        "bert"
    }
    fn about(&self) -> &'static str {
        "BERT encoder with pooling and a classifier head, from a pretrained checkpoint; --pooling, --head-hidden"
    }
    fn alignment(&self) -> Option<super::AlignFamily> {
        Some(super::AlignFamily::Bert)
    }
    fn fresh(&self, _options: &ArchOptions, _sample_shape: &[usize], _classes: usize) -> Result<ArchSpec> {
        Err(Error::usage(format!(
            "{} bert needs a pretrained checkpoint: pass {} or {} DIR",
            Arg::Arch,
            Arg::Init,
            Arg::TransferBody
        )))
    }
    fn reads_config(&self, config: &serde_json::Value) -> bool {
        config.get("model_type").and_then(|m| m.as_str()) == Some("bert")
    }
    /// A Hugging Face BERT config gets graft's default head: mean pooling, 32 hidden units, 2 classes.
    fn spec_from_config(&self, config: &serde_json::Value) -> std::result::Result<ArchSpec, String> {
        let config: BertConfig = serde_json::from_value(config.clone()).map_err(|e| e.to_string())?;
        Ok(BertSpec { config, pooling: Pooling::Mean, head_hidden: 32, num_classes: 2 }.into())
    }
}

/// A BERT encoder with a pooling and a small classifier head (Linear-ReLU-Linear).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BertSpec {
    #[serde(flatten)]
    pub config: BertConfig,
    pub pooling: Pooling,
    pub head_hidden: usize,
    pub num_classes: usize,
}

/// The head's output layer: a checkpoint without it is a pretrained encoder.
const HEAD_OUT: &str = "classifier.out.weight";

impl Spec for BertSpec {
    fn arch(&self) -> &'static dyn Arch {
        &BertArch
    }
    fn num_classes(&self) -> usize {
        self.num_classes
    }
    fn set_num_classes(&mut self, n: usize) {
        self.num_classes = n
    }
    fn unfit_input(&self, sample_shape: &[usize]) -> Option<String> {
        (!sample_shape.is_empty()).then(|| "text".to_string())
    }
    fn build(&self, store: ParamStore) -> Result<Box<dyn Model>> {
        Ok(Box::new(BertClassifier::new(self.clone(), store)?))
    }
    fn override_from(&mut self, options: &ArchOptions) {
        if let Some(p) = options.pooling {
            self.pooling = p;
        }
        if let Some(h) = options.head_hidden {
            self.head_hidden = h;
        }
    }
    fn head_tensor(&self) -> Option<&'static str> {
        Some(HEAD_OUT)
    }
    fn reads_text(&self) -> bool {
        true
    }
    /// Hugging Face tools read the same file: keep it a valid BERT config.
    fn foreign_config(&self, config: &mut serde_json::Value) {
        config["model_type"] = "bert".into();
        config["architectures"] = serde_json::json!(["BertModel"]);
    }
}

struct LayerNorm {
    weight: Param,
    bias: Param,
    eps: f64,
}

impl LayerNorm {
    fn new(store: &mut ParamStore, name: &str, n: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: store.param(&format!("{name}.weight"), &[n], Init::Const(1.0))?,
            bias: store.param(&format!("{name}.bias"), &[n], Init::Const(0.0))?,
            eps,
        })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (w, b) = (self.weight.t(), self.bias.t());
        if !x.track_op() && !w.track_op() && !b.track_op() {
            // Nothing here needs a gradient: candle's fused kernel.
            return candle_nn::ops::layer_norm(&x.contiguous()?, &w, &b, self.eps as f32);
        }
        candle_nn::ops::layer_norm_slow(x, &w, &b, self.eps as f32)
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_ln: LayerNorm,
    inter: Linear,
    out: Linear,
    out_ln: LayerNorm,
}

pub struct BertClassifier {
    spec: ArchSpec,
    store: ParamStore,
    word: Param,
    position: Param,
    token_type: Param,
    emb_ln: LayerNorm,
    layers: Vec<Layer>,
    heads: usize,
    pooling: Pooling,
    dense: Linear,
    out: Linear,
}

impl BertClassifier {
    pub fn new(spec: BertSpec, mut store: ParamStore) -> Result<Self> {
        let BertSpec { config: c, pooling, head_hidden, num_classes } = &spec;
        if c.hidden_size % c.num_attention_heads.max(1) != 0 || c.num_attention_heads == 0 {
            return Err(Error::usage(format!(
                "bert: hidden size {} is not a multiple of {} heads",
                c.hidden_size, c.num_attention_heads
            )));
        }
        if !c.hidden_act.starts_with("gelu") {
            return Err(Error::usage(format!("bert: activation '{}' is not supported (gelu only)", c.hidden_act)));
        }
        let h = c.hidden_size;
        let st = &mut store;
        let emb = Init::Normal(0.02);
        let word = st.param("embeddings.word_embeddings.weight", &[c.vocab_size, h], emb)?;
        let position = st.param("embeddings.position_embeddings.weight", &[c.max_position_embeddings, h], emb)?;
        let token_type = st.param("embeddings.token_type_embeddings.weight", &[c.type_vocab_size, h], emb)?;
        let emb_ln = LayerNorm::new(st, "embeddings.LayerNorm", h, c.layer_norm_eps)?;
        let mut layers = Vec::new();
        for l in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{l}");
            layers.push(Layer {
                query: Linear::new(st, &format!("{p}.attention.self.query"), h, h, true)?,
                key: Linear::new(st, &format!("{p}.attention.self.key"), h, h, true)?,
                value: Linear::new(st, &format!("{p}.attention.self.value"), h, h, true)?,
                attn_out: Linear::new(st, &format!("{p}.attention.output.dense"), h, h, true)?,
                attn_ln: LayerNorm::new(st, &format!("{p}.attention.output.LayerNorm"), h, c.layer_norm_eps)?,
                inter: Linear::new(st, &format!("{p}.intermediate.dense"), h, c.intermediate_size, true)?,
                out: Linear::new(st, &format!("{p}.output.dense"), c.intermediate_size, h, true)?,
                out_ln: LayerNorm::new(st, &format!("{p}.output.LayerNorm"), h, c.layer_norm_eps)?,
            });
        }
        // Loaded and saved for interchange; the notebooks' classifier pools the hidden states instead.
        let pooler = Linear::new(st, "pooler.dense", h, h, true)?;
        pooler.weight.set_trainable(false);
        if let Some(b) = &pooler.bias {
            b.set_trainable(false);
        }
        let dense = Linear::new(st, "classifier.dense", h, *head_hidden, true)?;
        let out = Linear::new(st, "classifier.out", *head_hidden, *num_classes, true)?;
        let heads = c.num_attention_heads;
        let pooling = *pooling;
        Ok(BertClassifier {
            spec: spec.into(),
            store,
            word,
            position,
            token_type,
            emb_ln,
            layers,
            heads,
            pooling,
            dense,
            out,
        })
    }

    /// The pooled last hidden states (N, hidden) of token ids (N, L) with attention mask (N, L) of 0/1.
    pub fn encode(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        let (n, len) = ids.dims2()?;
        let dt = self.word.var.dtype();
        let word = self.word.t().embedding(&ids.flatten_all()?)?.reshape((n, len, ()))?;
        let pos = self.position.t().narrow(0, 0, len)?;
        let typ = self.token_type.t().narrow(0, 0, 1)?;
        let mut h = self.emb_ln.forward(&word.broadcast_add(&pos.broadcast_add(&typ)?)?)?;
        let hidden = h.dim(2)?;
        let hd = hidden / self.heads;
        let maskf = mask.to_dtype(dt)?;
        // Additive attention bias: 0 for real tokens, a large negative number for padding.
        let bias = ((maskf.clone() - 1.0)? * 1e9)?.reshape((n, 1, 1, len))?;
        let scale = 1.0 / (hd as f64).sqrt();
        for l in &self.layers {
            let split = |t: Tensor| -> candle_core::Result<Tensor> {
                t.reshape((n, len, self.heads, hd))?.transpose(1, 2)?.contiguous()
            };
            let q = split(l.query.forward(&h)?)?;
            let k = split(l.key.forward(&h)?)?;
            let v = split(l.value.forward(&h)?)?;
            let scores = (q.matmul(&k.t()?)? * scale)?.broadcast_add(&bias)?;
            let probs = ops::softmax_last_dim(&scores)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.contiguous()?.reshape((n, len, hidden))?;
            let a = l.attn_ln.forward(&(l.attn_out.forward(&ctx)? + &h)?)?;
            let i = l.inter.forward(&a)?.gelu_erf()?;
            h = l.out_ln.forward(&(l.out.forward(&i)? + &a)?)?;
        }
        let m3 = maskf.unsqueeze(2)?;
        match self.pooling {
            Pooling::Cls => h.narrow(1, 0, 1)?.squeeze(1),
            Pooling::Mean => {
                let count = m3.sum(1)?.clamp(1.0, f64::INFINITY)?;
                h.broadcast_mul(&m3)?.sum(1)?.broadcast_div(&count)
            }
            Pooling::Max => h.broadcast_add(&((m3 - 1.0)? * 1e9)?)?.max(1),
        }
    }

    /// The head on pooled features (N, hidden).
    pub fn head(&self, feats: &Tensor) -> candle_core::Result<Tensor> {
        self.out.forward(&ops::relu(&self.dense.forward(feats)?)?)
    }

    /// Whether every encoder parameter is frozen (feature extraction: the pooled features are a fixed function).
    pub fn encoder_frozen(&self) -> bool {
        self.store.params().filter(|(n, _)| !n.starts_with("classifier.")).all(|(_, p)| !p.trainable())
    }
}

impl FeatureBody for BertClassifier {
    fn pooled(&self, ids: &Tensor, mask: &Tensor) -> candle_core::Result<Tensor> {
        self.encode(ids, mask)
    }
    fn frozen(&self) -> bool {
        self.encoder_frozen()
    }
}

impl Model for BertClassifier {
    fn spec(&self) -> &ArchSpec {
        &self.spec
    }
    fn store(&self) -> &ParamStore {
        &self.store
    }
    fn forward(&self, x: &Input, _ctx: &Ctx) -> candle_core::Result<Tensor> {
        match x {
            Input::Tokens { ids, mask } => self.head(&self.encode(ids, mask)?),
            // Pre-computed pooled features (feature-extraction mode).
            Input::Dense(f) => self.head(f),
        }
    }
    fn head_prefixes(&self) -> Vec<String> {
        vec!["classifier".into()]
    }
    fn encoder_layer(&self, name: &str) -> Option<usize> {
        name.strip_prefix("encoder.layer.").and_then(|r| r.split('.').next()).and_then(|i| i.parse().ok())
    }
    fn encoder_layers(&self) -> usize {
        self.layers.len()
    }
    fn feature_body(&self) -> Option<&dyn FeatureBody> {
        Some(self)
    }
}
