//! Generates large Llama-shaped BF16 checkpoints in Hugging Face layout for benchmarks and memory measurements
//! (run: `cargo run --release --example gen-llama -- --size 1.5b --variant base --out DIR`).
//!
//! Values are uniform with the variance of a scaled normal initialisation, drawn from per-(tensor, chunk) streams,
//! so generation is parallel and deterministic. `ft_a`/`ft_b` regenerate the base values and add a small
//! perturbation from their own streams, so a fine-tune never needs the base on disk. The checkpoint is written into
//! `DIR.partial` and renamed to `DIR` when complete, so concurrent users never see a half-written one.

use std::path::PathBuf;

use graft::checkpoint::{parse_size, CheckpointWriter, Dtype, TensorDecl, WriterOptions};
use graft::exec::{Executor, Produce, CHUNK_ELEMS};
use graft::rng::Rng;

struct Shape {
    hidden: usize,
    heads: usize,
    kv_heads: usize,
    inter: usize,
    layers: usize,
    vocab: usize,
}

fn shape(size: &str) -> Option<Shape> {
    match size {
        "0.5b" => Some(Shape { hidden: 1024, heads: 16, kv_heads: 4, inter: 4096, layers: 28, vocab: 32000 }),
        "1.5b" => Some(Shape { hidden: 2048, heads: 16, kv_heads: 4, inter: 5632, layers: 30, vocab: 32000 }),
        "tiny" => Some(Shape { hidden: 256, heads: 8, kv_heads: 2, inter: 704, layers: 4, vocab: 4000 }),
        _ => None,
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: gen-llama --size 0.5b|1.5b|tiny --variant base|ft_a|ft_b --out DIR [--max-shard-size 2GB] [--seed N]"
    );
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (mut size, mut variant, mut out, mut shard, mut seed) =
        (None, "base".to_string(), None, 2_000_000_000u64, 1u64);
    while let Some(a) = args.next() {
        let mut val = || args.next().unwrap_or_else(|| usage());
        match a.as_str() {
            "--size" => size = Some(val()),
            "--variant" => variant = val(),
            "--out" => out = Some(PathBuf::from(val())),
            "--max-shard-size" => shard = parse_size(&val()).unwrap_or_else(|| usage()),
            "--seed" => seed = val().parse().unwrap_or_else(|_| usage()),
            _ => usage(),
        }
    }
    let (Some(size), Some(out)) = (size, out) else { usage() };
    let s = shape(&size).unwrap_or_else(|| usage());
    let perturb_seed = match variant.as_str() {
        "base" => None,
        "ft_a" => Some(seed + 101),
        "ft_b" => Some(seed + 202),
        _ => usage(),
    };
    if out.exists() {
        eprintln!("{} exists; nothing to do", out.display());
        return;
    }

    let hd = s.hidden / s.heads;
    let mut decls = vec![TensorDecl::new("model.embed_tokens.weight", Dtype::BF16, vec![s.vocab, s.hidden])];
    for l in 0..s.layers {
        let p = format!("model.layers.{l}");
        let h = s.hidden;
        decls.push(TensorDecl::new(format!("{p}.input_layernorm.weight"), Dtype::BF16, vec![h]));
        decls.push(TensorDecl::new(format!("{p}.self_attn.q_proj.weight"), Dtype::BF16, vec![s.heads * hd, h]));
        decls.push(TensorDecl::new(format!("{p}.self_attn.k_proj.weight"), Dtype::BF16, vec![s.kv_heads * hd, h]));
        decls.push(TensorDecl::new(format!("{p}.self_attn.v_proj.weight"), Dtype::BF16, vec![s.kv_heads * hd, h]));
        decls.push(TensorDecl::new(format!("{p}.self_attn.o_proj.weight"), Dtype::BF16, vec![h, s.heads * hd]));
        decls.push(TensorDecl::new(format!("{p}.post_attention_layernorm.weight"), Dtype::BF16, vec![h]));
        decls.push(TensorDecl::new(format!("{p}.mlp.gate_proj.weight"), Dtype::BF16, vec![s.inter, h]));
        decls.push(TensorDecl::new(format!("{p}.mlp.up_proj.weight"), Dtype::BF16, vec![s.inter, h]));
        decls.push(TensorDecl::new(format!("{p}.mlp.down_proj.weight"), Dtype::BF16, vec![h, s.inter]));
    }
    decls.push(TensorDecl::new("model.norm.weight", Dtype::BF16, vec![s.hidden]));
    decls.push(TensorDecl::new("lm_head.weight", Dtype::BF16, vec![s.vocab, s.hidden]));

    let partial = PathBuf::from(format!("{}.partial", out.display()));
    let _ = std::fs::remove_dir_all(&partial);
    let opts = WriterOptions { max_shard_size: shard, ..Default::default() };
    let writer = CheckpointWriter::create(&partial, decls, opts).unwrap_or_else(|e| panic!("{e}"));
    let exec = Executor::new(None).unwrap();
    let written = exec
        .write(writer, "generate", |_, d| {
            let name = d.name.clone();
            let is_norm = d.shape.len() == 1;
            let fan_in = *d.shape.last().unwrap() as f64;
            // Uniform on [-a, a] has variance a^2/3: match a normal init of std 1/sqrt(fan_in) (0.02 for embeddings).
            let std = if name.contains("embed") { 0.02 } else { 1.0 / fan_in.sqrt() };
            let a = (3.0f64).sqrt() * std;
            Ok(Produce::elementwise(Vec::new(), move |r: std::ops::Range<usize>| {
                let chunk = r.start / CHUNK_ELEMS;
                let mut base = Rng::for_label(seed, &format!("{name}/{chunk}"));
                let mut delta = perturb_seed.map(|ps| Rng::for_label(ps, &format!("{name}/{chunk}")));
                let v = (0..r.len())
                    .map(|_| {
                        let u = 2.0 * base.next_f32() - 1.0;
                        let mut x = if is_norm { 1.0 + 0.05 * u } else { a as f32 * u };
                        if let Some(d) = delta.as_mut() {
                            x += 0.01 * a.max(0.05) as f32 * (2.0 * d.next_f32() - 1.0);
                        }
                        x
                    })
                    .collect();
                Ok(v)
            }))
        })
        .unwrap_or_else(|e| panic!("{e}"));
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s.hidden,
        "num_attention_heads": s.heads, "num_key_value_heads": s.kv_heads, "head_dim": hd,
        "intermediate_size": s.inter, "num_hidden_layers": s.layers, "vocab_size": s.vocab, "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false, "torch_dtype": "bfloat16"
    });
    std::fs::write(partial.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    std::fs::rename(&partial, &out).unwrap();
    let params: u64 = written.total_bytes / 2;
    eprintln!("{}: {} params in {} shards", out.display(), params, written.shards);
}
