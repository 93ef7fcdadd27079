//! Plain f64 reference forward passes of the fixture families, written with loops and independent of graft's
//! alignment code: they only read tensors by name. Used to check that a permuted model computes the same function.

#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;

use graft::checkpoint::Checkpoint;

/// Every float tensor of a checkpoint, as f64, by name.
pub struct Weights {
    tensors: HashMap<String, (Vec<usize>, Vec<f64>)>,
    pub config: serde_json::Value,
}

impl Weights {
    pub fn load(path: &Path) -> Weights {
        let ck = Checkpoint::open(path).unwrap();
        let mut tensors = HashMap::new();
        for v in ck.iter() {
            if v.is_float() {
                let data = v.to_f32().unwrap().into_iter().map(|x| x as f64).collect();
                tensors.insert(v.name.to_string(), (v.shape.to_vec(), data));
            }
        }
        let config = serde_json::from_str(&std::fs::read_to_string(path.join("config.json")).unwrap()).unwrap();
        Weights { tensors, config }
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn get(&self, name: &str) -> &[f64] {
        &self.tensors.get(name).unwrap_or_else(|| panic!("no tensor {name}")).1
    }

    pub fn shape(&self, name: &str) -> &[usize] {
        &self.tensors[name].0
    }

    fn cfg(&self, key: &str) -> usize {
        self.config[key].as_u64().unwrap_or_else(|| panic!("config has no {key}")) as usize
    }
}

/// `W x + b` for a (out, in) weight.
pub fn linear(w: &Weights, name: &str, x: &[f64]) -> Vec<f64> {
    let weight = w.get(&format!("{name}.weight"));
    let (out, inp) = (w.shape(&format!("{name}.weight"))[0], w.shape(&format!("{name}.weight"))[1]);
    assert_eq!(inp, x.len(), "{name}");
    let bias_name = format!("{name}.bias");
    (0..out)
        .map(|o| {
            let b = if w.has(&bias_name) { w.get(&bias_name)[o] } else { 0.0 };
            b + (0..inp).map(|i| weight[o * inp + i] * x[i]).sum::<f64>()
        })
        .collect()
}

fn relu(v: &mut [f64]) {
    for x in v {
        *x = x.max(0.0);
    }
}

// ------------------------------------------------------------------------------------------------------------
// MLP: Linear -> ReLU -> ... -> Linear.

pub fn mlp(w: &Weights, x: &[f64]) -> Vec<f64> {
    let mut h = x.to_vec();
    let mut i = 0;
    while w.has(&format!("layers.{i}.weight")) {
        h = linear(w, &format!("layers.{i}"), &h);
        if w.has(&format!("layers.{}.weight", i + 1)) {
            relu(&mut h);
        }
        i += 1;
    }
    h
}

// ------------------------------------------------------------------------------------------------------------
// The separable-conv residual net (tools/gen_fixtures.rs): sepconv = depthwise 3x3 (bias) -> BN -> pointwise 1x1
// (bias) -> BN. Stem + ReLU; per stage, blocks relu(conv2(relu(conv1(x))) + x); max-pool 2x2 and a transition
// (no ReLU) between stages; global average pool; per MLP layer Linear -> BN -> ReLU; classifier. BatchNorm in eval
// mode (running statistics, eps 1e-5).

/// A feature map: channels x height x width.
#[derive(Clone)]
pub struct Map {
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub v: Vec<f64>,
}

impl Map {
    fn at(&self, c: usize, i: isize, j: isize) -> f64 {
        if i < 0 || j < 0 || i >= self.h as isize || j >= self.w as isize {
            0.0
        } else {
            self.v[(c * self.h + i as usize) * self.w + j as usize]
        }
    }
}

fn batchnorm(w: &Weights, name: &str, c: usize, x: f64) -> f64 {
    let (g, b) = (w.get(&format!("{name}.weight"))[c], w.get(&format!("{name}.bias"))[c]);
    let (m, v) = (w.get(&format!("{name}.running_mean"))[c], w.get(&format!("{name}.running_var"))[c]);
    (x - m) / (v + 1e-5).sqrt() * g + b
}

fn sepconv(w: &Weights, name: &str, x: &Map) -> Map {
    let dw = w.get(&format!("{name}.depthwise.weight"));
    let db = w.get(&format!("{name}.depthwise.bias"));
    assert_eq!(w.shape(&format!("{name}.depthwise.weight")), &[x.c, 1, 3, 3]);
    let mut y = Map { c: x.c, h: x.h, w: x.w, v: vec![0.0; x.v.len()] };
    for c in 0..x.c {
        for i in 0..x.h {
            for j in 0..x.w {
                let mut s = db[c];
                for di in 0..3 {
                    for dj in 0..3 {
                        s += dw[c * 9 + di * 3 + dj]
                            * x.at(c, i as isize + di as isize - 1, j as isize + dj as isize - 1);
                    }
                }
                y.v[(c * x.h + i) * x.w + j] = batchnorm(w, &format!("{name}.bn_depthwise"), c, s);
            }
        }
    }
    let pw = w.get(&format!("{name}.pointwise.weight"));
    let pb = w.get(&format!("{name}.pointwise.bias"));
    let out = w.shape(&format!("{name}.pointwise.weight"))[0];
    let hw = x.h * x.w;
    let mut z = Map { c: out, h: x.h, w: x.w, v: vec![0.0; out * hw] };
    for o in 0..out {
        for p in 0..hw {
            let s = pb[o] + (0..x.c).map(|c| pw[o * x.c + c] * y.v[c * hw + p]).sum::<f64>();
            z.v[o * hw + p] = batchnorm(w, &format!("{name}.bn_pointwise"), o, s);
        }
    }
    z
}

fn maxpool2(x: &Map) -> Map {
    let (h, wd) = (x.h / 2, x.w / 2);
    let mut v = Vec::with_capacity(x.c * h * wd);
    for c in 0..x.c {
        for i in 0..h {
            for j in 0..wd {
                let (i2, j2) = (2 * i as isize, 2 * j as isize);
                v.push(x.at(c, i2, j2).max(x.at(c, i2 + 1, j2)).max(x.at(c, i2, j2 + 1)).max(x.at(c, i2 + 1, j2 + 1)));
            }
        }
    }
    Map { c: x.c, h, w: wd, v }
}

pub fn sepcnn(w: &Weights, image: &Map) -> Vec<f64> {
    let mut x = sepconv(w, "stem", image);
    relu(&mut x.v);
    let mut stage = 1;
    while w.has(&format!("stage{stage}.0.conv1.depthwise.weight")) {
        if stage > 1 {
            x = maxpool2(&x);
            x = sepconv(w, &format!("transition{}", stage - 1), &x);
        }
        let mut i = 0;
        while w.has(&format!("stage{stage}.{i}.conv1.depthwise.weight")) {
            let mut h = sepconv(w, &format!("stage{stage}.{i}.conv1"), &x);
            relu(&mut h.v);
            let h = sepconv(w, &format!("stage{stage}.{i}.conv2"), &h);
            for (a, b) in x.v.iter_mut().zip(&h.v) {
                *a = (*a + b).max(0.0);
            }
            i += 1;
        }
        stage += 1;
    }
    let hw = (x.h * x.w) as f64;
    let mut v: Vec<f64> = (0..x.c).map(|c| x.v[c * x.h * x.w..(c + 1) * x.h * x.w].iter().sum::<f64>() / hw).collect();
    let mut i = 0;
    while w.has(&format!("mlp.{i}.linear.weight")) {
        v = linear(w, &format!("mlp.{i}.linear"), &v);
        for (c, x) in v.iter_mut().enumerate() {
            *x = batchnorm(w, &format!("mlp.{i}.bn"), c, *x).max(0.0);
        }
        i += 1;
    }
    linear(w, "classifier", &v)
}

// ------------------------------------------------------------------------------------------------------------
// BERT encoder: embeddings + LayerNorm; per layer multi-head self-attention, output dense + residual + LayerNorm,
// intermediate GELU (tanh form), output dense + residual + LayerNorm; pooler tanh(dense(first token)).

fn layernorm(w: &Weights, name: &str, x: &[f64], eps: f64) -> Vec<f64> {
    let n = x.len() as f64;
    let mean = x.iter().sum::<f64>() / n;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    let (g, b) = (w.get(&format!("{name}.weight")), w.get(&format!("{name}.bias")));
    x.iter().enumerate().map(|(i, v)| (v - mean) / (var + eps).sqrt() * g[i] + b[i]).collect()
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

fn softmax(v: &mut [f64]) {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut s = 0.0;
    for x in v.iter_mut() {
        *x = (*x - m).exp();
        s += *x;
    }
    for x in v.iter_mut() {
        *x /= s;
    }
}

/// Attention over `tokens` positions: `q` (heads x hd per token), `k`/`v` (kv heads x hd per token); query head `h`
/// reads kv head `h / (heads / kv)`; `causal` masks later positions.
fn attention(
    q: &[Vec<f64>],
    k: &[Vec<f64>],
    v: &[Vec<f64>],
    heads: usize,
    kv: usize,
    hd: usize,
    causal: bool,
) -> Vec<Vec<f64>> {
    let t = q.len();
    let rep = heads / kv;
    (0..t)
        .map(|i| {
            let mut ctx = vec![0.0; heads * hd];
            for h in 0..heads {
                let g = h / rep;
                let keys = if causal { i + 1 } else { t };
                let mut s: Vec<f64> = (0..keys)
                    .map(|j| (0..hd).map(|d| q[i][h * hd + d] * k[j][g * hd + d]).sum::<f64>() / (hd as f64).sqrt())
                    .collect();
                softmax(&mut s);
                for (j, p) in s.iter().enumerate() {
                    for d in 0..hd {
                        ctx[h * hd + d] += p * v[j][g * hd + d];
                    }
                }
            }
            ctx
        })
        .collect()
}

/// Last hidden states (tokens x hidden) and the pooler output.
pub fn bert(w: &Weights, ids: &[usize]) -> (Vec<Vec<f64>>, Vec<f64>) {
    let hidden = w.cfg("hidden_size");
    let heads = w.cfg("num_attention_heads");
    let hd = hidden / heads;
    let eps = 1e-12;
    let (we, pe, te) = (
        w.get("embeddings.word_embeddings.weight"),
        w.get("embeddings.position_embeddings.weight"),
        w.get("embeddings.token_type_embeddings.weight"),
    );
    let mut h: Vec<Vec<f64>> = ids
        .iter()
        .enumerate()
        .map(|(p, &id)| {
            let e: Vec<f64> = (0..hidden).map(|d| we[id * hidden + d] + pe[p * hidden + d] + te[d]).collect();
            layernorm(w, "embeddings.LayerNorm", &e, eps)
        })
        .collect();
    let mut l = 0;
    while w.has(&format!("encoder.layer.{l}.attention.self.query.weight")) {
        let p = format!("encoder.layer.{l}");
        let q: Vec<Vec<f64>> = h.iter().map(|x| linear(w, &format!("{p}.attention.self.query"), x)).collect();
        let k: Vec<Vec<f64>> = h.iter().map(|x| linear(w, &format!("{p}.attention.self.key"), x)).collect();
        let v: Vec<Vec<f64>> = h.iter().map(|x| linear(w, &format!("{p}.attention.self.value"), x)).collect();
        let ctx = attention(&q, &k, &v, heads, heads, hd, false);
        h = h
            .iter()
            .zip(&ctx)
            .map(|(x, c)| {
                let a = linear(w, &format!("{p}.attention.output.dense"), c);
                let s: Vec<f64> = a.iter().zip(x).map(|(a, b)| a + b).collect();
                let h1 = layernorm(w, &format!("{p}.attention.output.LayerNorm"), &s, eps);
                let inter: Vec<f64> =
                    linear(w, &format!("{p}.intermediate.dense"), &h1).into_iter().map(gelu).collect();
                let o = linear(w, &format!("{p}.output.dense"), &inter);
                let s: Vec<f64> = o.iter().zip(&h1).map(|(a, b)| a + b).collect();
                layernorm(w, &format!("{p}.output.LayerNorm"), &s, eps)
            })
            .collect();
        l += 1;
    }
    let pooled = linear(w, "pooler.dense", &h[0]).into_iter().map(f64::tanh).collect();
    (h, pooled)
}

// ------------------------------------------------------------------------------------------------------------
// Llama decoder: RMSNorm, grouped-query causal attention with rotary embeddings (rotate-half form, the config's
// rope_theta, default 10000), SwiGLU MLP, final RMSNorm and lm_head (the embedding when tie_word_embeddings).

fn rmsnorm(w: &Weights, name: &str, x: &[f64], eps: f64) -> Vec<f64> {
    let ms = x.iter().map(|v| v * v).sum::<f64>() / x.len() as f64;
    let g = w.get(&format!("{name}.weight"));
    x.iter().enumerate().map(|(i, v)| v / (ms + eps).sqrt() * g[i]).collect()
}

fn rope(x: &mut [f64], heads: usize, hd: usize, pos: usize, base: f64) {
    let half = hd / 2;
    for h in 0..heads {
        for i in 0..half {
            let theta = pos as f64 * base.powf(-2.0 * i as f64 / hd as f64);
            let (a, b) = (x[h * hd + i], x[h * hd + i + half]);
            x[h * hd + i] = a * theta.cos() - b * theta.sin();
            x[h * hd + i + half] = b * theta.cos() + a * theta.sin();
        }
    }
}

/// Logits (tokens x vocab).
pub fn llama(w: &Weights, ids: &[usize]) -> Vec<Vec<f64>> {
    let hidden = w.cfg("hidden_size");
    let heads = w.cfg("num_attention_heads");
    let kv = w.cfg("num_key_value_heads");
    let hd = w.cfg("head_dim");
    let eps = 1e-5;
    let base = w.config["rope_theta"].as_f64().unwrap_or(10000.0);
    let tied = w.config["tie_word_embeddings"].as_bool().unwrap_or(false);
    let emb = w.get("model.embed_tokens.weight");
    let mut h: Vec<Vec<f64>> = ids.iter().map(|&id| emb[id * hidden..(id + 1) * hidden].to_vec()).collect();
    let mut l = 0;
    while w.has(&format!("model.layers.{l}.self_attn.q_proj.weight")) {
        let p = format!("model.layers.{l}");
        let x: Vec<Vec<f64>> = h.iter().map(|v| rmsnorm(w, &format!("{p}.input_layernorm"), v, eps)).collect();
        let mut q: Vec<Vec<f64>> = x.iter().map(|v| linear(w, &format!("{p}.self_attn.q_proj"), v)).collect();
        let mut k: Vec<Vec<f64>> = x.iter().map(|v| linear(w, &format!("{p}.self_attn.k_proj"), v)).collect();
        let v: Vec<Vec<f64>> = x.iter().map(|v| linear(w, &format!("{p}.self_attn.v_proj"), v)).collect();
        for (pos, (qi, ki)) in q.iter_mut().zip(k.iter_mut()).enumerate() {
            rope(qi, heads, hd, pos, base);
            rope(ki, kv, hd, pos, base);
        }
        let ctx = attention(&q, &k, &v, heads, kv, hd, true);
        for (hi, c) in h.iter_mut().zip(&ctx) {
            let o = linear(w, &format!("{p}.self_attn.o_proj"), c);
            for (a, b) in hi.iter_mut().zip(&o) {
                *a += b;
            }
            let x = rmsnorm(w, &format!("{p}.post_attention_layernorm"), hi, eps);
            let g = linear(w, &format!("{p}.mlp.gate_proj"), &x);
            let u = linear(w, &format!("{p}.mlp.up_proj"), &x);
            let act: Vec<f64> = g.iter().zip(&u).map(|(g, u)| g / (1.0 + (-g).exp()) * u).collect();
            let d = linear(w, &format!("{p}.mlp.down_proj"), &act);
            for (a, b) in hi.iter_mut().zip(&d) {
                *a += b;
            }
        }
        l += 1;
    }
    let head = if tied { "model.embed_tokens" } else { "lm_head" };
    h.iter().map(|v| linear(w, head, &rmsnorm(w, "model.norm", v, eps))).collect()
}

/// Largest absolute difference, after checking the lengths agree.
pub fn max_abs_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

// ------------------------------------------------------------------------------------------------------------
// Generic conv nets for the cnn built-in's other shapes: a torchvision-style ResNet (BasicBlock, 1x1 conv +
// BatchNorm downsample shortcut) and a VGG-style plain net whose classifier reads the flattened feature map.

/// `name.weight` (out, in, k, k), stride 1, zero padding k/2, optional `name.bias`.
pub fn conv2d(w: &Weights, name: &str, x: &Map) -> Map {
    let wt = w.get(&format!("{name}.weight"));
    let s = w.shape(&format!("{name}.weight"));
    let (out, inp, k) = (s[0], s[1], s[2]);
    assert_eq!(inp, x.c, "{name}");
    let pad = (k / 2) as isize;
    let bias = format!("{name}.bias");
    let mut v = vec![0.0; out * x.h * x.w];
    for o in 0..out {
        for i in 0..x.h {
            for j in 0..x.w {
                let mut acc = if w.has(&bias) { w.get(&bias)[o] } else { 0.0 };
                for c in 0..inp {
                    for di in 0..k {
                        for dj in 0..k {
                            let wv = wt[((o * inp + c) * k + di) * k + dj];
                            acc += wv * x.at(c, i as isize + di as isize - pad, j as isize + dj as isize - pad);
                        }
                    }
                }
                v[(o * x.h + i) * x.w + j] = acc;
            }
        }
    }
    Map { c: out, h: x.h, w: x.w, v }
}

pub fn batchnorm2d(w: &Weights, name: &str, x: &Map) -> Map {
    let hw = x.h * x.w;
    let v = x.v.iter().enumerate().map(|(k, &val)| batchnorm(w, name, k / hw, val)).collect();
    Map { v, ..x.clone() }
}

/// conv1/bn1/relu, then `layer{s}.{i}` BasicBlocks, global average pool, `fc`.
pub fn resnet(w: &Weights, image: &Map) -> Vec<f64> {
    let mut x = batchnorm2d(w, "bn1", &conv2d(w, "conv1", image));
    relu(&mut x.v);
    let mut s = 1;
    while w.has(&format!("layer{s}.0.conv1.weight")) {
        let mut i = 0;
        while w.has(&format!("layer{s}.{i}.conv1.weight")) {
            let p = format!("layer{s}.{i}");
            let mut h = batchnorm2d(w, &format!("{p}.bn1"), &conv2d(w, &format!("{p}.conv1"), &x));
            relu(&mut h.v);
            let h = batchnorm2d(w, &format!("{p}.bn2"), &conv2d(w, &format!("{p}.conv2"), &h));
            let skip = if w.has(&format!("{p}.downsample.0.weight")) {
                batchnorm2d(w, &format!("{p}.downsample.1"), &conv2d(w, &format!("{p}.downsample.0"), &x))
            } else {
                x.clone()
            };
            x = Map { v: h.v.iter().zip(&skip.v).map(|(a, b)| (a + b).max(0.0)).collect(), ..h };
            i += 1;
        }
        s += 1;
    }
    let hw = x.h * x.w;
    let pooled: Vec<f64> = (0..x.c).map(|c| x.v[c * hw..(c + 1) * hw].iter().sum::<f64>() / hw as f64).collect();
    linear(w, "fc", &pooled)
}

/// features.0 conv, features.1 BN, ReLU, features.3 conv, features.4 BN, ReLU, max-pool 2x2, flatten (C, H, W),
/// classifier.0 Linear, ReLU, classifier.2 Linear.
pub fn vgg(w: &Weights, image: &Map) -> Vec<f64> {
    let mut x = batchnorm2d(w, "features.1", &conv2d(w, "features.0", image));
    relu(&mut x.v);
    let mut x = batchnorm2d(w, "features.4", &conv2d(w, "features.3", &x));
    relu(&mut x.v);
    let x = maxpool2(&x);
    let mut h = linear(w, "classifier.0", &x.v);
    relu(&mut h);
    linear(w, "classifier.2", &h)
}
