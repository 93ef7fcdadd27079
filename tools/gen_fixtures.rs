//! Writes the deterministic test checkpoints under `fixtures/` (run: `cargo run --release --example gen-fixtures`).
//!
//! Each family has `base`, two fine-tunes `ft_a` and `ft_b` (base plus a small deterministic perturbation: a rank-2
//! update and noise on matrices, noise on vectors, as fine-tuning leaves them), and `indep`, an independently
//! initialised model of the same shapes. Every variant is a directory with `model.safetensors` and `config.json`.
//! The Llama family also has `base-sharded`, the base split into 3 shards with an index.
//!
//! Families: `mlp` (784-64-64-10, F32), `sepcnn` (the reference study's separable-conv residual network at width
//! 1/16, F32, BatchNorm buffers with I64 `num_batches_tracked`), `bert` (2-layer BERT encoder, real BERT names, I64
//! `position_ids`, F32) and `llama` (2-layer decoder with grouped-query attention, BF16).

use std::path::Path;

use graft::checkpoint::{dtype, CheckpointWriter, Dtype, TensorDecl, WriterOptions};
use graft::rng::Rng;

#[derive(Clone)]
struct T {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    /// Float values with a role that decides how variants differ.
    Float(Vec<f32>, Role),
    /// Integer values stored as I64.
    Int(Vec<i64>),
}

#[derive(Clone, Copy, PartialEq)]
enum Role {
    Weight,
    Bias,
    /// LayerNorm/BatchNorm scale (near 1).
    Scale,
    RunningMean,
    RunningVar,
}

struct Builder {
    rng: Rng,
    tensors: Vec<T>,
    dtype: Dtype,
}

impl Builder {
    fn new(seed: u64, dtype: Dtype) -> Self {
        Builder { rng: Rng::new(seed), tensors: Vec::new(), dtype }
    }
    fn normal(&mut self, n: usize, std: f64) -> Vec<f32> {
        (0..n).map(|_| (self.rng.normal() * std) as f32).collect()
    }
    fn push(&mut self, name: String, shape: Vec<usize>, values: Vec<f32>, role: Role) {
        self.tensors.push(T { name, dtype: self.dtype, shape, kind: Kind::Float(values, role) });
    }
    fn linear(&mut self, name: &str, out: usize, inp: usize, bias: bool) {
        let w = self.normal(out * inp, 1.0 / (inp as f64).sqrt());
        self.push(format!("{name}.weight"), vec![out, inp], w, Role::Weight);
        if bias {
            let b = self.normal(out, 0.02);
            self.push(format!("{name}.bias"), vec![out], b, Role::Bias);
        }
    }
    fn conv(&mut self, name: &str, out: usize, in_per_group: usize, k: usize) {
        let fan_in = in_per_group * k * k;
        let w = self.normal(out * fan_in, 1.0 / (fan_in as f64).sqrt());
        self.push(format!("{name}.weight"), vec![out, in_per_group, k, k], w, Role::Weight);
        let b = self.normal(out, 0.02);
        self.push(format!("{name}.bias"), vec![out], b, Role::Bias);
    }
    fn norm(&mut self, name: &str, n: usize, bias: bool) {
        let s: Vec<f32> = self.normal(n, 0.05).into_iter().map(|v| 1.0 + v).collect();
        self.push(format!("{name}.weight"), vec![n], s, Role::Scale);
        if bias {
            let b = self.normal(n, 0.02);
            self.push(format!("{name}.bias"), vec![n], b, Role::Bias);
        }
    }
    fn batchnorm(&mut self, name: &str, n: usize, batches: i64) {
        self.norm(name, n, true);
        let m = self.normal(n, 0.1);
        self.push(format!("{name}.running_mean"), vec![n], m, Role::RunningMean);
        let v: Vec<f32> = self.normal(n, 0.2).into_iter().map(|v| (1.0 + v).abs() + 0.1).collect();
        self.push(format!("{name}.running_var"), vec![n], v, Role::RunningVar);
        self.tensors.push(T {
            name: format!("{name}.num_batches_tracked"),
            dtype: Dtype::I64,
            shape: vec![],
            kind: Kind::Int(vec![batches]),
        });
    }
    fn sepconv(&mut self, name: &str, cin: usize, cout: usize) {
        self.conv(&format!("{name}.depthwise"), cin, 1, 3);
        self.batchnorm(&format!("{name}.bn_depthwise"), cin, 100);
        self.conv(&format!("{name}.pointwise"), cout, cin, 1);
        self.batchnorm(&format!("{name}.bn_pointwise"), cout, 100);
    }
}

fn mlp(seed: u64) -> Vec<T> {
    let mut b = Builder::new(seed, Dtype::F32);
    let sizes = [784, 64, 64, 10];
    for (i, w) in sizes.windows(2).enumerate() {
        b.linear(&format!("layers.{i}"), w[1], w[0], true);
    }
    b.tensors
}

const SEPCNN_WIDTHS: [usize; 3] = [4, 8, 16];
const SEPCNN_DEPTHS: [usize; 3] = [2, 1, 1];
const SEPCNN_FC: [usize; 4] = [32, 16, 8, 4];

fn sepcnn(seed: u64) -> Vec<T> {
    let mut b = Builder::new(seed, Dtype::F32);
    let [c1, c2, c3] = SEPCNN_WIDTHS;
    b.sepconv("stem", 3, c1);
    let mut prev = c1;
    for (s, (&c, &d)) in SEPCNN_WIDTHS.iter().zip(&SEPCNN_DEPTHS).enumerate() {
        if s > 0 {
            b.sepconv(&format!("transition{s}"), prev, c);
        }
        for i in 0..d {
            b.sepconv(&format!("stage{}.{i}.conv1", s + 1), c, c);
            b.sepconv(&format!("stage{}.{i}.conv2", s + 1), c, c);
        }
        prev = c;
    }
    let _ = (c2, c3);
    let mut fin = prev;
    for (i, &h) in SEPCNN_FC.iter().enumerate() {
        b.linear(&format!("mlp.{i}.linear"), h, fin, true);
        b.batchnorm(&format!("mlp.{i}.bn"), h, 100);
        fin = h;
    }
    b.linear("classifier", 10, fin, true);
    b.tensors
}

const BERT: (usize, usize, usize, usize, usize, usize) = (96, 32, 4, 64, 2, 40); // vocab, hidden, heads, inter, layers, positions

fn bert(seed: u64) -> Vec<T> {
    let (vocab, h, _heads, inter, layers, pos) = BERT;
    let mut b = Builder::new(seed, Dtype::F32);
    let e = b.normal(vocab * h, 0.02);
    b.push("embeddings.word_embeddings.weight".into(), vec![vocab, h], e, Role::Weight);
    let e = b.normal(pos * h, 0.02);
    b.push("embeddings.position_embeddings.weight".into(), vec![pos, h], e, Role::Weight);
    let e = b.normal(2 * h, 0.02);
    b.push("embeddings.token_type_embeddings.weight".into(), vec![2, h], e, Role::Weight);
    b.norm("embeddings.LayerNorm", h, true);
    b.tensors.push(T {
        name: "embeddings.position_ids".into(),
        dtype: Dtype::I64,
        shape: vec![1, pos],
        kind: Kind::Int((0..pos as i64).collect()),
    });
    for l in 0..layers {
        let p = format!("encoder.layer.{l}");
        for m in ["query", "key", "value"] {
            b.linear(&format!("{p}.attention.self.{m}"), h, h, true);
        }
        b.linear(&format!("{p}.attention.output.dense"), h, h, true);
        b.norm(&format!("{p}.attention.output.LayerNorm"), h, true);
        b.linear(&format!("{p}.intermediate.dense"), inter, h, true);
        b.linear(&format!("{p}.output.dense"), h, inter, true);
        b.norm(&format!("{p}.output.LayerNorm"), h, true);
    }
    b.linear("pooler.dense", h, h, true);
    b.tensors
}

const LLAMA: (usize, usize, usize, usize, usize, usize) = (128, 32, 4, 2, 64, 2); // vocab, hidden, heads, kv heads, inter, layers

fn llama(seed: u64) -> Vec<T> {
    let (vocab, h, heads, kv, inter, layers) = LLAMA;
    let hd = h / heads;
    let mut b = Builder::new(seed, Dtype::BF16);
    let e = b.normal(vocab * h, 0.02);
    b.push("model.embed_tokens.weight".into(), vec![vocab, h], e, Role::Weight);
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        b.norm(&format!("{p}.input_layernorm"), h, false);
        b.linear(&format!("{p}.self_attn.q_proj"), heads * hd, h, false);
        b.linear(&format!("{p}.self_attn.k_proj"), kv * hd, h, false);
        b.linear(&format!("{p}.self_attn.v_proj"), kv * hd, h, false);
        b.linear(&format!("{p}.self_attn.o_proj"), h, heads * hd, false);
        b.norm(&format!("{p}.post_attention_layernorm"), h, false);
        b.linear(&format!("{p}.mlp.gate_proj"), inter, h, false);
        b.linear(&format!("{p}.mlp.up_proj"), inter, h, false);
        b.linear(&format!("{p}.mlp.down_proj"), h, inter, false);
    }
    b.norm("model.norm", h, false);
    b.linear("lm_head", vocab, h, false);
    b.tensors
}

/// A fine-tune of `base`: matrices get a rank-2 update plus noise, vectors noise, BatchNorm statistics drift, and
/// `num_batches_tracked` advances.
fn finetune(base: &[T], seed: u64) -> Vec<T> {
    let mut rng = Rng::new(seed);
    base.iter()
        .map(|t| {
            let kind = match &t.kind {
                Kind::Int(v) if t.name.ends_with("num_batches_tracked") => {
                    Kind::Int(v.iter().map(|x| x + 50).collect())
                }
                Kind::Int(v) => Kind::Int(v.clone()),
                Kind::Float(v, role) => {
                    let scale = rms(v).max(1e-3);
                    let mut out = v.clone();
                    match role {
                        Role::Weight => {
                            let rows = t.shape[0];
                            let cols = v.len() / rows;
                            for _ in 0..2 {
                                let u: Vec<f64> = (0..rows).map(|_| rng.normal()).collect();
                                let w: Vec<f64> = (0..cols).map(|_| rng.normal()).collect();
                                for r in 0..rows {
                                    for c in 0..cols {
                                        out[r * cols + c] += (0.03 * scale * u[r] * w[c]) as f32;
                                    }
                                }
                            }
                            for x in out.iter_mut() {
                                *x += (0.01 * scale * rng.normal()) as f32;
                            }
                        }
                        Role::RunningVar => {
                            for x in out.iter_mut() {
                                *x *= (1.0 + 0.05 * rng.normal()).abs() as f32;
                            }
                        }
                        _ => {
                            for x in out.iter_mut() {
                                *x += (0.02 * scale * rng.normal()) as f32;
                            }
                        }
                    }
                    Kind::Float(out, *role)
                }
            };
            T { kind, ..t.clone() }
        })
        .collect()
}

fn rms(v: &[f32]) -> f64 {
    (v.iter().map(|&x| x as f64 * x as f64).sum::<f64>() / v.len().max(1) as f64).sqrt()
}

fn write(dir: &Path, tensors: &[T], config: &serde_json::Value, max_shard: Option<u64>) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(config).unwrap() + "\n").unwrap();
    let decls: Vec<TensorDecl> =
        tensors.iter().map(|t| TensorDecl::new(t.name.clone(), t.dtype, t.shape.clone())).collect();
    let opts = WriterOptions { max_shard_size: max_shard.unwrap_or(u64::MAX), overwrite: true, ..Default::default() };
    let mut w = CheckpointWriter::create(dir, decls, opts).unwrap();
    for t in tensors {
        let bytes = match &t.kind {
            Kind::Float(v, _) => dtype::from_f32_vec(t.dtype, v),
            Kind::Int(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        };
        w.write_tensor(&t.name, &bytes).unwrap();
    }
    w.finish().unwrap();
}

fn family(root: &Path, name: &str, make: fn(u64) -> Vec<T>, seed: u64, config: serde_json::Value) -> Vec<T> {
    let base = make(seed);
    write(&root.join(name).join("base"), &base, &config, None);
    write(&root.join(name).join("ft_a"), &finetune(&base, seed + 1), &config, None);
    write(&root.join(name).join("ft_b"), &finetune(&base, seed + 2), &config, None);
    write(&root.join(name).join("indep"), &make(seed + 1000), &config, None);
    base
}

fn main() {
    let root = std::env::args().nth(1).unwrap_or_else(|| "fixtures".into());
    let root = Path::new(&root);
    family(root, "mlp", mlp, 11, serde_json::json!({ "graft_arch": "mlp", "sizes": [784, 64, 64, 10] }));
    family(
        root,
        "sepcnn",
        sepcnn,
        21,
        serde_json::json!({
            "graft_arch": "sepcnn", "in_channels": 3, "widths": SEPCNN_WIDTHS, "depths": SEPCNN_DEPTHS,
            "fc": SEPCNN_FC, "num_classes": 10
        }),
    );
    let (vocab, h, heads, inter, layers, pos) = BERT;
    family(
        root,
        "bert",
        bert,
        31,
        serde_json::json!({
            "architectures": ["BertModel"], "model_type": "bert", "vocab_size": vocab, "hidden_size": h,
            "num_attention_heads": heads, "intermediate_size": inter, "num_hidden_layers": layers,
            "max_position_embeddings": pos, "type_vocab_size": 2, "hidden_act": "gelu", "layer_norm_eps": 1e-12
        }),
    );
    let (vocab, h, heads, kv, inter, layers) = LLAMA;
    let llama_config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": h,
        "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": h / heads, "intermediate_size": inter,
        "num_hidden_layers": layers, "rms_norm_eps": 1e-5, "tie_word_embeddings": false, "torch_dtype": "bfloat16"
    });
    let base = family(root, "llama", llama, 41, llama_config.clone());
    // Three shards: the greedy split at a third of the total (rounded up) yields exactly three files.
    let total: u64 = base.iter().map(|t| t.shape.iter().product::<usize>() as u64 * t.dtype.size() as u64).sum();
    write(&root.join("llama").join("base-sharded"), &base, &llama_config, Some(total.div_ceil(3) + 2048));
    eprintln!("fixtures written under {}", root.display());
}
