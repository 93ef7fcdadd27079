//! The llama family of causal language models (Llama, Mistral, SmolLM2, Qwen2) under Hugging Face's
//! `LlamaForCausalLM` / `Qwen2ForCausalLM` tensor names: token embedding, decoder layers of grouped-query attention
//! with rotary position embeddings and a SwiGLU MLP, each behind an RMSNorm, a final RMSNorm and a head that is its
//! own matrix or the embedding itself (tied).
//!
//! The numerics follow transformers' eager implementation so that graft's perplexities equal its: everything in f32,
//! RMSNorm as `w * (x / sqrt(mean(x²) + eps))`, the rotary angles as f32 products of the position and the f32
//! inverse frequencies (the `rotate_half` layout, which is what Hugging Face checkpoints store; `graft convert`
//! undoes llama.cpp's interleaved one), softmax over masked scores scaled by `1/sqrt(head_dim)`.
//!
//! On the CPU the layer runs on graft's fused kernels (`ops::decoder`: RMSNorm, SwiGLU, rotary embedding into head
//! order, scaled causal softmax), grouped-query attention without copying the shared key/value heads, and the head
//! only on the positions that predict a token, fused with the target log-probabilities (`ops::head_logprobs`: no
//! rows x vocabulary logits, nor their gradient); other devices take the same functions from candle's generic ops.
//!
//! Parameters live in a `ParamStore`, so the same model serves evaluation now and selective fine-tuning later: a
//! frozen parameter enters the forward pass detached.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use serde::Deserialize;

use super::layers::Linear;
use super::{Arch, ArchOptions, ArchSpec, Task};
use crate::error::{Arg, Error, Result};
use crate::train::ops;
use crate::train::params::{Init, Param, ParamStore};

fn default_theta() -> f64 {
    10_000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_positions() -> usize {
    2048
}

/// The `llama` architecture: causal LMs fine-tuned from their Hugging Face checkpoint, whose `config.json` is their
/// spec (`LlamaConfig`), so they have no `graft_arch` form.
#[derive(Debug)]
pub struct LlamaArch;

impl Arch for LlamaArch {
    fn name(&self) -> &'static str {
        "llama"
    }
    fn about(&self) -> &'static str {
        "llama-family causal LM (Llama, Mistral, SmolLM2, Qwen2), fine-tuned from --init"
    }
    fn alignment(&self) -> Option<super::AlignFamily> {
        Some(super::AlignFamily::Llama)
    }
    fn task(&self) -> Task {
        Task::CausalLm
    }
    fn fresh(&self, _options: &ArchOptions, _sample_shape: &[usize], _classes: usize) -> Result<ArchSpec> {
        Err(Error::usage(format!("a causal LM is fine-tuned from a checkpoint: pass {} DIR", Arg::Init)))
    }
    fn reads_config(&self, config: &serde_json::Value) -> bool {
        LlamaConfig::is_llama_family(config)
    }
}

/// The fields of a Hugging Face llama-family `config.json` the forward pass needs.
#[derive(Clone, Debug, Deserialize)]
pub struct LlamaConfig {
    #[serde(default)]
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub hidden_act: Option<String>,
    /// Mistral's (and Qwen2's, when `use_sliding_window`) attention window; graft attends to the whole window.
    #[serde(default)]
    pub sliding_window: Option<usize>,
    #[serde(default)]
    pub use_sliding_window: Option<bool>,
}

/// How the rotary inverse frequencies are rescaled for long contexts (`rope_scaling` in the config).
#[derive(Clone, Debug, PartialEq)]
enum RopeScaling {
    None,
    /// Positions divided by `factor` (equivalently, every frequency).
    Linear {
        factor: f64,
    },
    /// Llama 3.1's band-wise rescaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: f64,
    },
}

impl LlamaConfig {
    /// Reads and checks `config.json`; `shown` names the file in errors.
    pub fn from_json(v: &serde_json::Value, shown: &str) -> Result<LlamaConfig> {
        let cfg: LlamaConfig = serde_json::from_value(v.clone())
            .map_err(|e| Error::invalid(format!("{shown}: not a llama-family config: {e}")))?;
        cfg.check().map_err(|m| Error::invalid(format!("{shown}: {m}")))?;
        Ok(cfg)
    }

    /// Whether `config.json` describes a causal LM of the llama family.
    pub fn is_llama_family(v: &serde_json::Value) -> bool {
        let by_type = matches!(v.get("model_type").and_then(|m| m.as_str()), Some("llama" | "mistral" | "qwen2"));
        let by_arch = v.get("architectures").and_then(|a| a.as_array()).is_some_and(|a| {
            a.iter()
                .filter_map(|x| x.as_str())
                .any(|x| matches!(x, "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM"))
        });
        by_type || by_arch
    }

    fn check(&self) -> std::result::Result<(), String> {
        let heads = self.num_attention_heads;
        let kv = self.kv_heads();
        if heads == 0 || kv == 0 || !heads.is_multiple_of(kv) {
            return Err(format!(
                "num_attention_heads {heads} is not a multiple of num_key_value_heads {kv} (grouped-query attention)"
            ));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(heads) {
            return Err(format!("hidden_size {} is not divisible by {heads} heads", self.hidden_size));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!("head_dim {} is odd; rotary embeddings need pairs", self.head_dim()));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" {
                return Err(format!("hidden_act '{act}' is not supported (llama-family models use silu)"));
            }
        }
        self.rope_scaling()?;
        Ok(())
    }

    /// The attention window transformers applies, if any: Mistral's `sliding_window`, Qwen2's when
    /// `use_sliding_window` is set.
    pub fn attention_window(&self) -> Option<usize> {
        match self.model_type.as_str() {
            "qwen2" if self.use_sliding_window != Some(true) => None,
            _ => self.sliding_window,
        }
    }

    /// Refuses sequences longer than the attention window: graft attends causally over the whole sequence, which
    /// equals sliding-window attention only while the sequence fits in the window.
    pub fn check_sequence_length(&self, len: usize, shown: &str) -> Result<()> {
        match self.attention_window() {
            Some(w) if len > w => Err(Error::usage(format!(
                "{shown}: sliding_window {w} is shorter than {max_len} {len}; graft does not implement sliding-window \
                 attention, use {max_len} {w} or less",
                max_len = Arg::MaxLen
            ))),
            _ => Ok(()),
        }
    }

    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    pub fn head_dim(&self) -> usize {
        self.head_dim.unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Qwen2 gives its query, key and value projections a bias; llama does when `attention_bias` says so.
    fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2"
    }

    fn rope_scaling(&self) -> std::result::Result<RopeScaling, String> {
        let Some(v) = self.rope_scaling.as_ref().filter(|v| !v.is_null()) else {
            return Ok(RopeScaling::None);
        };
        let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(|t| t.as_str()).unwrap_or("default");
        let num = |key: &str| -> std::result::Result<f64, String> {
            v.get(key).and_then(|x| x.as_f64()).ok_or_else(|| format!("rope_scaling of type '{kind}' lacks '{key}'"))
        };
        match kind {
            "default" => Ok(RopeScaling::None),
            "linear" => Ok(RopeScaling::Linear { factor: num("factor")? }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_positions: num("original_max_position_embeddings")?,
            }),
            other => Err(format!("rope_scaling type '{other}' is not supported (supported: linear, llama3)")),
        }
    }

    /// The rotary inverse frequencies: `1 / theta^(2i/d)` and the configured rescaling computed in f64, then rounded
    /// to f32 once (transformers computes them in f32 throughout; the difference is within an f32 rounding).
    fn inv_freq(&self) -> Vec<f32> {
        let d = self.head_dim();
        let base: Vec<f64> = (0..d / 2).map(|i| 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64)).collect();
        let scaled: Vec<f64> = match self.rope_scaling().unwrap_or(RopeScaling::None) {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_positions } => {
                let low_wavelen = original_max_positions / low_freq_factor;
                let high_wavelen = original_max_positions / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_positions / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        };
        scaled.iter().map(|&f| f as f32).collect()
    }
}

/// `w * x / sqrt(mean(x²) + eps)` over the last axis.
struct RmsNorm {
    weight: Param,
    eps: f64,
}

impl RmsNorm {
    fn new(store: &mut ParamStore, name: &str, n: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm { weight: store.param(&format!("{name}.weight"), &[n], Init::Const(1.0))?, eps })
    }
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if ops::fused_available(x) {
            return ops::rms_norm(x, &self.weight.t(), self.eps);
        }
        let variance = x.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = x.broadcast_div(&(variance + self.eps)?.sqrt()?)?;
        match self.weight.trainable() {
            true => normed.broadcast_mul(&self.weight.t()),
            false => ops::frozen_scale(&normed, &self.weight.t()),
        }
    }
}

struct Block {
    input_norm: RmsNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: RmsNorm,
    gate: Linear,
    up: Linear,
    down: Linear,
}

/// A llama-family causal LM.
pub struct Llama {
    pub config: LlamaConfig,
    embed: Param,
    blocks: Vec<Block>,
    norm: RmsNorm,
    /// `None` when the head is the embedding (tied).
    head: Option<Linear>,
    inv_freq: Vec<f32>,
    store: ParamStore,
}

/// A parameter whose values a checkpoint will fill: registering it as zeros costs no random draws.
const FILLED_BY_CHECKPOINT: Init = Init::Const(0.0);

fn linear(store: &mut ParamStore, name: &str, inp: usize, out: usize, bias: bool) -> Result<Linear> {
    let weight = store.param(&format!("{name}.weight"), &[out, inp], FILLED_BY_CHECKPOINT)?;
    let bias = if bias { Some(store.param(&format!("{name}.bias"), &[out], FILLED_BY_CHECKPOINT)?) } else { None };
    Ok(Linear { weight, bias })
}

impl Llama {
    /// Registers every tensor of the model in `store` (which the model then owns) under its Hugging Face name, in
    /// `state_dict` order. The values are placeholders until a checkpoint is loaded into the store.
    pub fn new(config: LlamaConfig, mut store: ParamStore) -> Result<Llama> {
        let c = &config;
        let (d, hd) = (c.hidden_size, c.head_dim());
        let embed = store.param("model.embed_tokens.weight", &[c.vocab_size, d], FILLED_BY_CHECKPOINT)?;
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let bias = c.qkv_bias();
            blocks.push(Block {
                q: linear(&mut store, &format!("{p}.self_attn.q_proj"), d, c.num_attention_heads * hd, bias)?,
                k: linear(&mut store, &format!("{p}.self_attn.k_proj"), d, c.kv_heads() * hd, bias)?,
                v: linear(&mut store, &format!("{p}.self_attn.v_proj"), d, c.kv_heads() * hd, bias)?,
                o: linear(
                    &mut store,
                    &format!("{p}.self_attn.o_proj"),
                    c.num_attention_heads * hd,
                    d,
                    c.attention_bias,
                )?,
                gate: linear(&mut store, &format!("{p}.mlp.gate_proj"), d, c.intermediate_size, c.mlp_bias)?,
                up: linear(&mut store, &format!("{p}.mlp.up_proj"), d, c.intermediate_size, c.mlp_bias)?,
                down: linear(&mut store, &format!("{p}.mlp.down_proj"), c.intermediate_size, d, c.mlp_bias)?,
                input_norm: RmsNorm::new(&mut store, &format!("{p}.input_layernorm"), d, c.rms_norm_eps)?,
                post_norm: RmsNorm::new(&mut store, &format!("{p}.post_attention_layernorm"), d, c.rms_norm_eps)?,
            });
        }
        let norm = RmsNorm::new(&mut store, "model.norm", d, c.rms_norm_eps)?;
        let head =
            if c.tie_word_embeddings { None } else { Some(linear(&mut store, "lm_head", d, c.vocab_size, false)?) };
        let inv_freq = config.inv_freq();
        Ok(Llama { config, embed, blocks, norm, head, inv_freq, store })
    }

    pub fn store(&self) -> &ParamStore {
        &self.store
    }

    pub fn device(&self) -> candle_core::Device {
        self.embed.var.device().clone()
    }

    /// cos and sin of the rotary angles for positions `0..t`, (t, head_dim) each, in the `rotate_half` layout.
    fn rotary(&self, t: usize, device: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(t * 2 * half), Vec::with_capacity(t * 2 * half));
        for pos in 0..t {
            // The angle is an f32 product, as in transformers; its cosine is then computed exactly and rounded.
            let angles: Vec<f32> = self.inv_freq.iter().map(|&f| pos as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|&a| (a as f64).cos() as f32));
                sin.extend(angles.iter().map(|&a| (a as f64).sin() as f32));
            }
        }
        Ok((Tensor::from_vec(cos, (t, 2 * half), device)?, Tensor::from_vec(sin, (t, 2 * half), device)?))
    }

    /// The rotary angles' cos and sin for positions `0..t` as the fused CPU kernels take them: one value per angle
    /// (the `rotate_half` layout uses each twice), the same f32-rounded values `rotary` gives.
    fn rope_tables(&self, t: usize) -> Arc<ops::RopeTables> {
        let half = self.inv_freq.len();
        let (mut cos, mut sin) = (Vec::with_capacity(t * half), Vec::with_capacity(t * half));
        for pos in 0..t {
            for &f in &self.inv_freq {
                let a = (pos as f32 * f) as f64;
                cos.push(a.cos() as f32 as f64);
                sin.push(a.sin() as f32 as f64);
            }
        }
        Arc::new(ops::RopeTables { positions: t, half, cos, sin })
    }

    /// Logits (batch, time, vocab) for token ids (batch, time), attending causally.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let x = self.hidden(ids)?;
        let (b, t, _) = x.dims3()?;
        self.head(&x.reshape((b * t, self.config.hidden_size))?)?.reshape((b, t, self.config.vocab_size))
    }

    /// The final hidden states (batch, time, hidden) for token ids (batch, time), after the final norm.
    fn hidden(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let c = &self.config;
        let (heads, kv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let device = ids.device();
        let embed = self.embed.t();
        let mut x = embed.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, c.hidden_size))?;
        let dtype = x.dtype();
        let scale = 1.0 / (hd as f64).sqrt();
        if ops::fused_available(&x) {
            return self.hidden_fused(x, b, t);
        }
        let (cos, sin) = self.rotary(t, device)?;
        let (cos, sin) = (cos.to_dtype(dtype)?, sin.to_dtype(dtype)?);
        let mask: Vec<f32> =
            (0..t).flat_map(|i| (0..t).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
        let mask = Tensor::from_vec(mask, (t, t), device)?.to_dtype(dtype)?;
        for block in &self.blocks {
            let h = block.input_norm.forward(&x)?;
            let q = block.q.forward(&h)?.reshape((b, t, heads, hd))?.transpose(1, 2)?;
            let k = block.k.forward(&h)?.reshape((b, t, kv, hd))?.transpose(1, 2)?;
            let v = block.v.forward(&h)?.reshape((b, t, kv, hd))?.transpose(1, 2)?;
            let q = rotate(&q, &cos, &sin)?;
            let k = repeat_kv(&rotate(&k, &cos, &sin)?, heads / kv)?;
            let v = repeat_kv(&v.contiguous()?, heads / kv)?;
            let scores = ops::frozen_shift(&(q.matmul(&k.transpose(2, 3)?.contiguous()?)? * scale)?, &mask)?;
            // Training needs graft's softmax (it has a backward pass); inference takes candle's fused one.
            let attn = if scores.track_op() {
                ops::softmax_last_dim(&scores)?
            } else {
                candle_nn::ops::softmax_last_dim(&scores)?
            };
            let o = attn.matmul(&v)?.transpose(1, 2)?.reshape((b, t, heads * hd))?;
            // Below the first trained layer the residual stream is a constant: only the new term is differentiated.
            let attn_out = block.o.forward(&o)?;
            x = if x.track_op() { (x + attn_out)? } else { ops::frozen_shift(&attn_out, &x)? };
            let h = block.post_norm.forward(&x)?;
            let mlp =
                block.down.forward(&(candle_nn::ops::silu(&block.gate.forward(&h)?)? * block.up.forward(&h)?)?)?;
            x = if x.track_op() { (x + mlp)? } else { ops::frozen_shift(&mlp, &x)? };
        }
        self.norm.forward(&x)
    }

    /// `hidden` on the CPU with graft's fused kernels: RMSNorm, the rotary embedding applied while the query and
    /// key move into head order, grouped-query attention without copies of the shared key/value heads (each key
    /// head's query heads stacked along the rows of one product), one scaled causal softmax, and SwiGLU.
    fn hidden_fused(&self, mut x: Tensor, b: usize, t: usize) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (heads, kv, hd) = (c.num_attention_heads, c.kv_heads(), c.head_dim());
        let group = heads / kv;
        let scale = 1.0 / (hd as f64).sqrt();
        let rope = self.rope_tables(t);
        for block in &self.blocks {
            let h = block.input_norm.forward(&x)?;
            let q = ops::rope_to_heads(&block.q.forward(&h)?.reshape((b, t, heads, hd))?, &rope)?;
            let k = ops::rope_to_heads(&block.k.forward(&h)?.reshape((b, t, kv, hd))?, &rope)?;
            let v = block.v.forward(&h)?.reshape((b, t, kv, hd))?.transpose(1, 2)?.contiguous()?;
            // Query heads g * group .. (g + 1) * group share key head g: as rows they are one (group * t, hd) block.
            let scores = q.reshape((b, kv, group * t, hd))?.matmul(&k.t()?)?;
            let attn = ops::causal_softmax(&scores, scale)?;
            let o = attn.matmul(&v)?.reshape((b, heads, t, hd))?.transpose(1, 2)?.reshape((b, t, heads * hd))?;
            let attn_out = block.o.forward(&o)?;
            x = if x.track_op() { (x + attn_out)? } else { ops::frozen_shift(&attn_out, &x)? };
            let h = block.post_norm.forward(&x)?;
            let mlp = block.down.forward(&ops::swiglu(&block.gate.forward(&h)?, &block.up.forward(&h)?)?)?;
            x = if x.track_op() { (x + mlp)? } else { ops::frozen_shift(&mlp, &x)? };
        }
        self.norm.forward(&x)
    }

    /// Logits (rows, vocab) of hidden-state rows (rows, hidden).
    fn head(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.head {
            Some(head) => head.forward(x),
            None => match self.embed.trainable() {
                true => x.matmul(&self.embed.t().t()?),
                false => ops::frozen_linear(x, &self.embed.t(), None),
            },
        }
    }

    /// The head's matrix (vocab, hidden): its own or the embedding (tied), tracked when it trains.
    fn head_weight(&self) -> Tensor {
        match &self.head {
            Some(head) => head.weight.t(),
            None => self.embed.t(),
        }
    }

    /// Log-likelihood of each next token: (batch, time - 1) values `log p(ids[t+1] | ids[..=t])`, from the
    /// logits in one fused pass per position (sums in f64); on the CPU the head and that pass are one blocked op.
    pub fn next_token_logprobs(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t) = ids.dims2()?;
        // The last position predicts nothing: the head runs on the other rows only.
        let x = self.hidden(ids)?.narrow(1, 0, t - 1)?.contiguous()?.reshape((b * (t - 1), self.config.hidden_size))?;
        let targets = ids.narrow(1, 1, t - 1)?.contiguous()?.flatten_all()?;
        let rows = b * (t - 1);
        if ops::fused_available(&x) {
            // The head and the log-softmax in blocks: the logits never exist whole, with a graph or without.
            return ops::head_logprobs(&x, &self.head_weight(), &targets)?.reshape((b, t - 1));
        }
        if x.track_op() || rows <= HEAD_ROWS {
            return ops::target_logprobs(&self.head(&x)?, &targets)?.reshape((b, t - 1));
        }
        // Without a graph, the logits are needed one block of rows at a time: a block stays in cache between the
        // product that writes it and the pass that reads it, and no tensor of rows x vocabulary is ever allocated.
        let mut parts = Vec::with_capacity(rows.div_ceil(HEAD_ROWS));
        for start in (0..rows).step_by(HEAD_ROWS) {
            let n = HEAD_ROWS.min(rows - start);
            parts.push(ops::target_logprobs(&self.head(&x.narrow(0, start, n)?)?, &targets.narrow(0, start, n)?)?);
        }
        Tensor::cat(&parts, 0)?.reshape((b, t - 1))
    }
}

impl crate::train::freeze::FreezeTarget for Llama {
    fn store(&self) -> &ParamStore {
        &self.store
    }
    fn arch_name(&self) -> &'static str {
        LlamaArch.name()
    }
    /// The separate output projection is the head; a tied model has none of its own.
    fn is_head(&self, name: &str) -> bool {
        name.starts_with("lm_head.")
    }
    fn encoder_layer(&self, name: &str) -> Option<usize> {
        name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
    }
    fn encoder_layers(&self) -> usize {
        self.config.num_hidden_layers
    }
    fn head_trains_with_selection(&self) -> bool {
        false
    }
    /// The last layers train with the final norm that reads them and the head.
    fn trains_with_last_layers(&self, name: &str) -> bool {
        self.is_head(name) || name.starts_with("model.norm.")
    }
}

/// `x * cos + rotate_half(x) * sin` for x (batch, heads, time, head_dim).
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let x = x.contiguous()?;
    let (first, second) = (x.narrow(D::Minus1, 0, half)?, x.narrow(D::Minus1, half, half)?);
    let rotated = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
    // The angles are constants: only x is differentiated (candle would keep gradients for cos and sin too).
    ops::frozen_scale(&x, cos)? + ops::frozen_scale(&rotated, sin)?
}

/// Each key/value head repeated for the `n` query heads that share it: (b, kv, t, d) -> (b, kv * n, t, d).
fn repeat_kv(x: &Tensor, n: usize) -> candle_core::Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    x.unsqueeze(2)?.expand((b, kv, n, t, d))?.contiguous()?.reshape((b, kv * n, t, d))
}

/// Rows of logits computed at a time when no gradient is needed (32 x 49,152 f32 for SmolLM2: 6 MiB).
const HEAD_ROWS: usize = 32;

/// The working dtype of the causal LM (transformers' perplexities are measured in f32 here too).
pub const WORKING_DTYPE: DType = DType::F32;
