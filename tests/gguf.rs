//! GGUF in: a small llama-family GGUF written byte by byte in this file (header, metadata, tensor table, Q8_0 / F16 /
//! F32 data) is converted with `graft convert`, and the Hugging Face checkpoint is checked against values derived by
//! hand here: names and shapes, a Q8_0 block's `scale * q`, an F16 tensor's exact bits, the query/key rows put back
//! from llama.cpp's rotary permutation (a plain reference of that permutation is written below), `config.json`;
//! plus candle-quantised tensors of every type within their quantisation error, and one-line errors for bad files.
//! The GGUF opened directly by any command is checked against its conversion: the same hand-derived values, and
//! merge, snr, similarity, diff, apply, eval and train giving the same results on `X.gguf` as on `graft convert`'s
//! output (byte for byte, the recorded input paths aside).

use crate::support::graft;

use std::path::{Path, PathBuf};

use graft::checkpoint::{Checkpoint, Dtype};
use graft::gguf::{hf_name, permute_rows, unpermute_rows};

// ggml type ids and GGUF metadata value types (GGUF spec).
const T_F32: u32 = 0;
const T_F16: u32 = 1;
const T_Q8_0: u32 = 8;
const V_U32: u32 = 4;
const V_F32: u32 = 6;
const V_I32: u32 = 5;
const V_BOOL: u32 = 7;
const V_STRING: u32 = 8;
const V_ARRAY: u32 = 9;

enum Meta {
    U32(u32),
    F32(f32),
    Str(&'static str),
    Bool(bool),
    Strs(Vec<&'static str>),
    I32s(Vec<i32>),
}

struct RawTensor {
    name: String,
    ggml_type: u32,
    /// torch order (outermost first); written innermost first as GGUF does.
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend_from_slice(&(s.len() as u64).to_le_bytes());
    b.extend_from_slice(s.as_bytes());
}

/// A GGUF v3 file, alignment 32, exactly as the spec lays it out.
fn gguf_bytes(meta: &[(&str, Meta)], tensors: &[RawTensor]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&3u32.to_le_bytes());
    b.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    b.extend_from_slice(&(meta.len() as u64).to_le_bytes());
    for (k, v) in meta {
        put_str(&mut b, k);
        match v {
            Meta::U32(x) => {
                b.extend_from_slice(&V_U32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Meta::F32(x) => {
                b.extend_from_slice(&V_F32.to_le_bytes());
                b.extend_from_slice(&x.to_le_bytes());
            }
            Meta::Str(s) => {
                b.extend_from_slice(&V_STRING.to_le_bytes());
                put_str(&mut b, s);
            }
            Meta::Bool(x) => {
                b.extend_from_slice(&V_BOOL.to_le_bytes());
                b.push(*x as u8);
            }
            Meta::Strs(items) => {
                b.extend_from_slice(&V_ARRAY.to_le_bytes());
                b.extend_from_slice(&V_STRING.to_le_bytes());
                b.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for s in items {
                    put_str(&mut b, s);
                }
            }
            Meta::I32s(items) => {
                b.extend_from_slice(&V_ARRAY.to_le_bytes());
                b.extend_from_slice(&V_I32.to_le_bytes());
                b.extend_from_slice(&(items.len() as u64).to_le_bytes());
                for x in items {
                    b.extend_from_slice(&x.to_le_bytes());
                }
            }
        }
    }
    let mut offset = 0u64;
    for t in tensors {
        put_str(&mut b, &t.name);
        b.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            b.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        b.extend_from_slice(&t.ggml_type.to_le_bytes());
        b.extend_from_slice(&offset.to_le_bytes());
        offset += (t.data.len() as u64).div_ceil(32) * 32;
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for t in tensors {
        b.extend_from_slice(&t.data);
        while b.len() % 32 != 0 {
            b.push(0);
        }
    }
    b
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Plain reference of llama.cpp's `LlamaModel.permute`: `w.reshape(n_head, 2, rows/n_head/2, cols).swapaxes(1, 2)`,
/// i.e. output row (h, j, i) is input row (h, i, j).
fn reference_permute(w: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let half = rows / n_head / 2;
    let mut out = vec![0f32; w.len()];
    for h in 0..n_head {
        for i in 0..2 {
            for j in 0..half {
                let src = (h * 2 + i) * half + j;
                let dst = (h * half + j) * 2 + i;
                out[dst * cols..(dst + 1) * cols].copy_from_slice(&w[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

const HIDDEN: usize = 32;
const N_HEAD: usize = 2;
const N_KV: usize = 1;
const HEAD_DIM: usize = HIDDEN / N_HEAD;
const FFN: usize = 64;
const VOCAB: usize = 4;

/// A distinct, f16-exact value per element (multiples of 1/64 below 4).
fn pattern(n: usize, seed: usize) -> Vec<f32> {
    (0..n).map(|k| ((k * 37 + seed * 11) % 251) as f32 / 64.0 - 1.5).collect()
}

/// Q8_0 token embedding: row r is one block with scale 0.5 + r/4 (f16-exact) and q[i] = (7r + 5i) mod 61 - 30.
fn q8_block(r: usize) -> (f32, Vec<i8>) {
    (0.5 + r as f32 / 4.0, (0..32).map(|i| ((7 * r + 5 * i) % 61) as i8 - 30).collect())
}

struct Fixture {
    _dir: tempfile::TempDir,
    gguf: PathBuf,
    wq: Vec<f32>,
    wk: Vec<f32>,
    wv: Vec<f32>,
}

fn llama_fixture(arch: &'static str) -> Fixture {
    llama_fixture_with(arch, Vec::new())
}

fn llama_fixture_with(arch: &'static str, extra_meta: Vec<(&'static str, Meta)>) -> Fixture {
    llama_fixture_sized(arch, VOCAB, 0, extra_meta)
}

/// The fixture with `vocab` embedding rows; `variant` shifts every value pattern, making a different model of the
/// same shapes.
fn llama_fixture_sized(
    arch: &'static str,
    vocab: usize,
    variant: usize,
    extra_meta: Vec<(&'static str, Meta)>,
) -> Fixture {
    llama_fixture_full(arch, vocab, variant, extra_meta, Vec::new())
}

/// The fixture with `extra_tensors` stored after the model's.
fn llama_fixture_full(
    arch: &'static str,
    vocab: usize,
    variant: usize,
    extra_meta: Vec<(&'static str, Meta)>,
    extra_tensors: Vec<RawTensor>,
) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut tensors = Vec::new();
    let mut emb = Vec::new();
    for r in 0..vocab {
        let (d, q) = q8_block(r + variant);
        emb.extend_from_slice(&half::f16::from_f32(d).to_bits().to_le_bytes());
        emb.extend(q.iter().map(|x| *x as u8));
    }
    tensors.push(RawTensor {
        name: "token_embd.weight".into(),
        ggml_type: T_Q8_0,
        shape: vec![vocab, HIDDEN],
        data: emb,
    });
    let pattern = |n: usize, seed: usize| pattern(n, seed + 13 * variant);
    let wq = pattern(HIDDEN * HIDDEN, 1);
    let wk = pattern(N_KV * HEAD_DIM * HIDDEN, 2);
    let wv = pattern(N_KV * HEAD_DIM * HIDDEN, 3);
    let q_gguf = reference_permute(&wq, HIDDEN, HIDDEN, N_HEAD);
    let k_gguf = reference_permute(&wk, N_KV * HEAD_DIM, HIDDEN, N_KV);
    let f16: Vec<u8> = q_gguf.iter().flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes()).collect();
    let blk = |p: &str| format!("blk.0.{p}.weight");
    tensors.push(RawTensor { name: blk("attn_q"), ggml_type: T_F16, shape: vec![HIDDEN, HIDDEN], data: f16 });
    tensors.push(RawTensor {
        name: blk("attn_k"),
        ggml_type: T_F32,
        shape: vec![N_KV * HEAD_DIM, HIDDEN],
        data: f32_bytes(&k_gguf),
    });
    for (name, shape, seed) in [
        ("attn_v", vec![N_KV * HEAD_DIM, HIDDEN], 3),
        ("attn_output", vec![HIDDEN, HIDDEN], 4),
        ("ffn_gate", vec![FFN, HIDDEN], 5),
        ("ffn_up", vec![FFN, HIDDEN], 6),
        ("ffn_down", vec![HIDDEN, FFN], 7),
        ("attn_norm", vec![HIDDEN], 8),
        ("ffn_norm", vec![HIDDEN], 9),
    ] {
        let n = shape.iter().product();
        tensors.push(RawTensor { name: blk(name), ggml_type: T_F32, shape, data: f32_bytes(&pattern(n, seed)) });
    }
    tensors.push(RawTensor {
        name: "output_norm.weight".into(),
        ggml_type: T_F32,
        shape: vec![HIDDEN],
        data: f32_bytes(&pattern(HIDDEN, 10)),
    });
    let mut meta = vec![
        ("general.architecture", Meta::Str(arch)),
        ("llama.block_count", Meta::U32(1)),
        ("llama.embedding_length", Meta::U32(HIDDEN as u32)),
        ("llama.feed_forward_length", Meta::U32(FFN as u32)),
        ("llama.attention.head_count", Meta::U32(N_HEAD as u32)),
        ("llama.attention.head_count_kv", Meta::U32(N_KV as u32)),
        ("llama.rope.freq_base", Meta::F32(100000.0)),
        ("llama.attention.layer_norm_rms_epsilon", Meta::F32(1e-5)),
        ("llama.context_length", Meta::U32(2048)),
        ("tokenizer.ggml.bos_token_id", Meta::U32(1)),
        ("tokenizer.ggml.eos_token_id", Meta::U32(2)),
    ];
    meta.extend(extra_meta);
    tensors.extend(extra_tensors);
    let gguf = dir.path().join("tiny.gguf");
    std::fs::write(&gguf, gguf_bytes(&meta, &tensors)).unwrap();
    Fixture { _dir: dir, gguf, wq, wk, wv }
}

fn convert(gguf: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["convert", gguf.to_str().unwrap(), "-o", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = graft(&args);
    assert!(o.status.success(), "convert failed: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn converts_llama_gguf_to_hugging_face() {
    let fx = llama_fixture("llama");
    let out = fx._dir.path().join("hf");
    convert(&fx.gguf, &out, &[]);
    check_hand_derived(&fx, &Checkpoint::open(&out).unwrap(), &out);
    // The GGUF opened as a checkpoint is that same Hugging Face checkpoint, side files included.
    let ck = Checkpoint::open(&fx.gguf).unwrap();
    check_hand_derived(&fx, &ck, ck.dir().unwrap());
}

fn check_hand_derived(fx: &Fixture, ck: &Checkpoint, dir: &Path) {
    let mut names: Vec<&str> = ck.names().collect();
    names.sort();
    let mut expected = vec![
        "model.embed_tokens.weight",
        "model.norm.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
    ];
    expected.sort();
    assert_eq!(names, expected);
    assert_eq!(ck.info("model.layers.0.mlp.down_proj.weight").unwrap().shape, vec![HIDDEN, FFN]);
    assert_eq!(ck.info("model.layers.0.mlp.gate_proj.weight").unwrap().shape, vec![FFN, HIDDEN]);

    // Q8_0: every value is the block's f16 scale times its int8, as written above.
    let emb = ck.tensor("model.embed_tokens.weight").unwrap();
    assert_eq!(emb.dtype, Dtype::F32);
    assert_eq!(emb.shape, &[VOCAB, HIDDEN]);
    let got = emb.to_f32().unwrap();
    for r in 0..VOCAB {
        let (d, q) = q8_block(r);
        for i in 0..32 {
            assert_eq!(got[r * 32 + i], d * q[i] as f32, "row {r} col {i}");
        }
    }

    // F16 stays F16, bit for bit, with its rows back in Hugging Face's order.
    let q = ck.tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.dtype, Dtype::F16);
    let want: Vec<u8> = fx.wq.iter().flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes()).collect();
    assert_eq!(q.data, &want[..]);
    assert_eq!(ck.tensor("model.layers.0.self_attn.k_proj.weight").unwrap().to_f32().unwrap(), fx.wk);
    // v is not permuted.
    assert_eq!(ck.tensor("model.layers.0.self_attn.v_proj.weight").unwrap().to_f32().unwrap(), fx.wv);

    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "llama");
    assert_eq!(config["hidden_size"], HIDDEN);
    assert_eq!(config["intermediate_size"], FFN);
    assert_eq!(config["num_hidden_layers"], 1);
    assert_eq!(config["num_attention_heads"], N_HEAD);
    assert_eq!(config["num_key_value_heads"], N_KV);
    assert_eq!(config["vocab_size"], VOCAB);
    assert_eq!(config["tie_word_embeddings"], true);
    assert_eq!(config["rope_theta"], 100000.0);
    assert_eq!(config["rms_norm_eps"], 1e-5);
    assert_eq!(config["max_position_embeddings"], 2048);
    assert_eq!(config["eos_token_id"], 2);
}

#[test]
fn dtype_flag_narrows_every_tensor() {
    let fx = llama_fixture("llama");
    let out = fx._dir.path().join("bf16");
    convert(&fx.gguf, &out, &["--dtype", "bf16"]);
    let ck = Checkpoint::open(&out).unwrap();
    assert!(ck.infos().iter().all(|t| t.dtype == Dtype::BF16));
    // The un-permuted f16 query, narrowed: the Hugging Face-order reference rounded to bf16.
    let q = ck.tensor("model.layers.0.self_attn.q_proj.weight").unwrap().to_f32().unwrap();
    let want: Vec<f32> = fx.wq.iter().map(|x| half::bf16::from_f32(*x).to_f32()).collect();
    assert_eq!(q, want);
}

#[test]
fn unpermute_inverts_llama_cpp_permutation() {
    for (rows, cols, heads) in [(32, 3, 2), (64, 5, 4), (12, 1, 3), (128, 2, 1)] {
        let w: Vec<f32> = (0..rows * cols).map(|k| k as f32).collect();
        let p = permute_rows(&w, cols, heads);
        assert_eq!(p, reference_permute(&w, rows, cols, heads), "forward vs reference {rows}x{cols}/{heads}");
        assert_eq!(unpermute_rows(&p, cols, heads), w, "round trip {rows}x{cols}/{heads}");
        assert_eq!(permute_rows(&unpermute_rows(&w, cols, heads), cols, heads), w);
        if rows / heads > 2 {
            assert_ne!(p, w, "the permutation moves rows");
        }
    }
}

#[test]
fn names_map_to_hugging_face() {
    assert_eq!(hf_name("token_embd.weight").unwrap(), "model.embed_tokens.weight");
    assert_eq!(hf_name("output.weight").unwrap(), "lm_head.weight");
    assert_eq!(hf_name("blk.17.attn_output.weight").unwrap(), "model.layers.17.self_attn.o_proj.weight");
    assert_eq!(hf_name("blk.3.attn_q.bias").unwrap(), "model.layers.3.self_attn.q_proj.bias");
    assert_eq!(hf_name("blk.3.ffn_norm.weight").unwrap(), "model.layers.3.post_attention_layernorm.weight");
    assert!(hf_name("rope_freqs.weight").is_none());
    assert!(hf_name("blk.x.attn_q.weight").is_none());
}

/// Every quantisation type candle writes, quantised by candle from known values: the converted tensor is within
/// the type's quantisation error of the original (loose bounds: 4-bit types ~ range/16 per block).
#[test]
fn every_quant_type_dequantises_within_its_error() {
    use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
    use candle_core::{Device, Tensor};
    let cols = 256; // one K-quant super-block per row
    let rows = 4;
    let values: Vec<f32> = (0..rows * cols).map(|k| ((k * 7919) % 1000) as f32 / 500.0 - 1.0).collect();
    let src = Tensor::from_vec(values.clone(), (rows, cols), &Device::Cpu).unwrap();
    let types = [
        (GgmlDType::F32, 0.0),
        (GgmlDType::F16, 1e-3),
        (GgmlDType::BF16, 8e-3),
        (GgmlDType::Q8_0, 0.01),
        (GgmlDType::Q5_0, 0.07),
        (GgmlDType::Q5_1, 0.07),
        (GgmlDType::Q4_0, 0.14),
        (GgmlDType::Q4_1, 0.14),
        (GgmlDType::Q6K, 0.04),
        (GgmlDType::Q5K, 0.07),
        (GgmlDType::Q4K, 0.14),
        (GgmlDType::Q3K, 0.3),
        (GgmlDType::Q2K, 0.6),
    ];
    let dir = tempfile::tempdir().unwrap();
    for (t, tol) in types {
        let q = QTensor::quantize(&src, t).unwrap();
        let arch = gguf_file::Value::String("llama".into());
        let heads = gguf_file::Value::U32(1);
        let mut f = std::fs::File::create(dir.path().join("q.gguf")).unwrap();
        gguf_file::write(
            &mut f,
            &[("general.architecture", &arch), ("llama.attention.head_count", &heads)],
            &[("blk.0.ffn_up.weight", &q)],
        )
        .unwrap();
        drop(f);
        let g = graft::gguf::GgufFile::open(dir.path().join("q.gguf")).unwrap();
        assert_eq!(g.tensors()[0].shape, vec![rows, cols]);
        let got = g.dequantize("blk.0.ffn_up.weight").unwrap();
        let err = got.iter().zip(&values).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(err <= tol, "{t:?}: max error {err} > {tol}");
        // Opened as a checkpoint, the tensor is decoded block by block (candle's per-type decoder, no QTensor):
        // the same values, bit for bit, as the whole-tensor dequantisation above.
        let ck = Checkpoint::open(dir.path().join("q.gguf")).unwrap();
        let view = ck.tensor("model.layers.0.mlp.up_proj.weight").unwrap();
        assert_eq!(view.dtype, graft::gguf::natural_dtype(t));
        let mine = view.to_f32().unwrap();
        assert!(mine.iter().zip(&got).all(|(a, b)| a.to_bits() == b.to_bits()), "{t:?}");
    }
}

fn one_line_error(args: &[&str]) -> String {
    let o = graft(args);
    assert_eq!(o.status.code(), Some(1), "stderr: {}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr).trim().to_string();
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

#[test]
fn bad_gguf_files_give_one_line_errors() {
    let fx = llama_fixture("gpt2");
    let out = fx._dir.path().join("out");
    let o = out.to_str().unwrap();
    let err = one_line_error(&["convert", fx.gguf.to_str().unwrap(), "-o", o]);
    assert!(err.contains("tiny.gguf") && err.contains("architecture 'gpt2' is not supported"), "{err}");

    let fx = llama_fixture("llama");
    let bytes = std::fs::read(&fx.gguf).unwrap();
    let cut = fx._dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = one_line_error(&["convert", cut.to_str().unwrap(), "-o", o]);
    assert!(err.contains("cut.gguf") && err.contains("truncated"), "{err}");
    std::fs::write(&cut, &bytes[..40]).unwrap();
    let err = one_line_error(&["inspect", cut.to_str().unwrap()]);
    assert!(err.contains("cut.gguf"), "{err}");

    // An unknown ggml type id (99) in the first tensor's table entry: it follows the name, dims and count.
    let mut bad = bytes.clone();
    let name = b"token_embd.weight";
    let at = bad.windows(name.len()).position(|w| w == name).unwrap() + name.len() + 4 + 2 * 8;
    bad[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let unknown = fx._dir.path().join("unknown.gguf");
    std::fs::write(&unknown, bad).unwrap();
    let err = one_line_error(&["convert", unknown.to_str().unwrap(), "-o", o]);
    assert!(err.contains("unknown.gguf") && err.contains("unsupported quantisation type"), "{err}");
    assert!(!out.exists());

    // Every command that opens a checkpoint says the same, naming the file.
    let gpt2 = llama_fixture("gpt2");
    let err = one_line_error(&["snr", gpt2.gguf.to_str().unwrap()]);
    assert!(err.contains("tiny.gguf") && err.contains("architecture 'gpt2' is not supported"), "{err}");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = one_line_error(&["diff", "--base", cut.to_str().unwrap(), fx.gguf.to_str().unwrap(), "-o", o]);
    assert!(err.contains("cut.gguf") && err.contains("truncated"), "{err}");
    let err =
        one_line_error(&["merge", "--method", "linear", unknown.to_str().unwrap(), fx.gguf.to_str().unwrap(), "-o", o]);
    assert!(err.contains("unknown.gguf") && err.contains("unsupported quantisation type"), "{err}");
    let err = one_line_error(&["eval", gpt2.gguf.to_str().unwrap(), "--data", "text:/dev/null"]);
    assert!(err.contains("tiny.gguf") && err.contains("'gpt2'"), "{err}");
    assert!(!out.exists());
}

#[test]
fn inspect_shows_quant_types_and_metadata() {
    let fx = llama_fixture("llama");
    let o = graft(&["inspect", "--json", fx.gguf.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["architecture"], "llama");
    assert_eq!(j["tensor_count"], 11);
    assert_eq!(j["quants"]["Q8_0"]["tensors"], 1);
    assert_eq!(j["quants"]["Q8_0"]["bytes"], VOCAB * 34);
    assert_eq!(j["quants"]["F16"]["tensors"], 1);
    assert_eq!(j["metadata"]["llama.block_count"], "1");
    let text = graft(&["inspect", fx.gguf.to_str().unwrap()]);
    let s = String::from_utf8_lossy(&text.stdout);
    assert!(
        s.contains("Q8_0") && s.contains("token_embd.weight") && s.contains("llama.attention.head_count_kv"),
        "{s}"
    );
}

/// A byte-level BPE vocabulary small enough to tokenise by hand. "€" is stored as llama.cpp stores it (UTF-8 text)
/// and must be respelled in GPT-2's byte alphabet, where its bytes E2 82 AC read "âĤ¬".
const BPE_TOKENS: [&str; 25] = [
    "<|endoftext|>",
    "h",
    "e",
    "l",
    "o",
    "Ġ",
    "w",
    "r",
    "d",
    "he",
    "ll",
    "hell",
    "hello",
    "Ġw",
    "or",
    "Ġwor",
    "ld",
    "Ġworld",
    "â",
    "Ĥ",
    "¬",
    "âĤ",
    "€",
    "<think>",
    "<|bad\u{1}|>",
];
const BPE_MERGES: [&str; 11] =
    ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "â Ĥ", "âĤ ¬"];

fn bpe_meta(add_bos: bool) -> Vec<(&'static str, Meta)> {
    let mut types = vec![1; BPE_TOKENS.len()];
    types[0] = 3; // CONTROL: a special added token
    types[23] = 4; // USER_DEFINED: a plain added token
    types[24] = 3; // CONTROL but spelled outside the byte alphabet: a llama.cpp mislabel, not added
    vec![
        ("tokenizer.ggml.model", Meta::Str("gpt2")),
        ("tokenizer.ggml.pre", Meta::Str("smollm")),
        ("tokenizer.ggml.tokens", Meta::Strs(BPE_TOKENS.to_vec())),
        ("tokenizer.ggml.merges", Meta::Strs(BPE_MERGES.to_vec())),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.add_bos_token", Meta::Bool(add_bos)),
        ("tokenizer.chat_template", Meta::Str("{{ messages[0]['content'] }}")),
    ]
}

#[test]
fn byte_level_bpe_tokenizer_is_rebuilt_from_the_vocabulary() {
    for add_bos in [false, true] {
        let fx = llama_fixture_with("llama", bpe_meta(add_bos));
        let out = fx._dir.path().join("hf");
        convert(&fx.gguf, &out, &[]);
        let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
        let ids = |text: &str| tok.encode(text, true).unwrap().get_ids().to_vec();
        // Worked by hand, and what transformers gives reading this GGUF (checked once with transformers 5.25):
        // BOS "h" (1) and EOS "e" (2) are named special tokens, so they are matched whole before BPE runs and
        // "hello" becomes h, e, "ll" (10), "o" (4); " world" merges to 17 ("Ġworld"), "€" to its respelling (22),
        // the control token stays whole (0), "<think>" is matched whole (23); BOS prepended only when asked.
        let bos: Vec<u32> = if add_bos { vec![1] } else { vec![] };
        assert_eq!(ids("hello world€<|endoftext|>"), [bos.clone(), vec![1, 2, 10, 4, 17, 22, 0]].concat());
        assert_eq!(ids("hello<think>"), [bos.clone(), vec![1, 2, 10, 4, 23]].concat());
        assert_eq!(tok.decode(&[12, 17, 22], false).unwrap(), "hello world€");
        let added: Vec<String> = tok.get_added_tokens_decoder().values().map(|t| t.content.clone()).collect();
        assert!(!added.iter().any(|t| t.starts_with("<|bad")), "{added:?}");

        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
        assert_eq!((cfg["bos_token"].as_str(), cfg["eos_token"].as_str()), (Some("h"), Some("e")));
        assert_eq!(cfg["add_bos_token"], add_bos);
        assert_eq!(cfg["chat_template"], "{{ messages[0]['content'] }}");
    }
}

#[test]
fn other_tokenizer_types_are_not_rebuilt_and_say_so() {
    let fx = llama_fixture_with("llama", vec![("tokenizer.ggml.model", Meta::Str("t5"))]);
    let out = fx._dir.path().join("hf");
    let o = graft(&["convert", fx.gguf.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("'t5' is not rebuilt"));
    assert!(!out.join("tokenizer.json").exists() && out.join("config.json").exists());
}

// ---- sentencepiece vocabularies and Llama 3's rope_freqs (fixtures/gguf-sp, made by tools/make-gguf-fixtures) ----

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn sentencepiece_vocabulary_tokenises_as_transformers_does() {
    let out = crate::support::tmp("gguf", "sp");
    convert(&crate::support::fixture("gguf-sp/sp-llama.gguf"), &out, &[]);
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    // The reference: transformers' ids when it builds the tokenizer from the GGUF itself (recorded by the generator).
    let cases = read_json(&crate::support::fixture("gguf-sp/sp-llama.expected.json"));
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text, true).unwrap().get_ids(), want, "{text:?}");
    }
    // A character outside the vocabulary falls back to its UTF-8 bytes (☃ is E2 98 83), and decodes back.
    let snowman = tok.encode("a ☃", false).unwrap();
    let pieces = snowman.get_tokens().join(" ");
    assert!(pieces.contains("<0xE2> <0x98> <0x83>"), "{pieces}");
    assert_eq!(tok.decode(snowman.get_ids(), false).unwrap(), "a ☃");
    // BOS first (add_bos_token), the control pieces whole, the user-defined one whole and not special.
    let ids = tok.encode("<|im_start|>x<tool>", true).unwrap().get_ids().to_vec();
    let id = |t: &str| tok.token_to_id(t).unwrap();
    assert_eq!((ids[0], ids[1], ids[ids.len() - 1]), (id("<s>"), id("<|im_start|>"), id("<tool>")));
    let cfg = read_json(&out.join("tokenizer_config.json"));
    assert_eq!((cfg["bos_token"].as_str(), cfg["eos_token"].as_str()), (Some("<s>"), Some("</s>")));
    assert_eq!(
        (cfg["unk_token"].as_str(), &cfg["add_bos_token"], &cfg["add_eos_token"]),
        (Some("<unk>"), &true.into(), &false.into())
    );
    assert!(cfg["chat_template"].as_str().unwrap().contains("<|im_start|>"));
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn llama3_rope_freqs_become_a_rope_scaling_that_reproduces_them() {
    use graft::gguf::rope::{llama3_rope_freqs, Llama3Rope};
    let gguf = crate::support::fixture("gguf-sp/rope-llama3.gguf");
    let out = crate::support::tmp("gguf", "rope");
    let dir = out.join("hf");
    convert(&gguf, &dir, &[]);
    let cfg = read_json(&dir.join("config.json"));
    // The generator's parameters (Llama 3.2's), recovered from the tensor alone.
    let rs = &cfg["rope_scaling"];
    assert_eq!(
        rs,
        &serde_json::json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192})
    );
    let p = Llama3Rope {
        factor: rs["factor"].as_f64().unwrap(),
        low_freq_factor: rs["low_freq_factor"].as_f64().unwrap(),
        high_freq_factor: rs["high_freq_factor"].as_f64().unwrap(),
        original_max_position_embeddings: rs["original_max_position_embeddings"].as_u64().unwrap(),
    };
    let stored = graft::gguf::GgufFile::open(&gguf).unwrap().dequantize("rope_freqs.weight").unwrap();
    let again = llama3_rope_freqs(cfg["rope_theta"].as_f64().unwrap(), cfg["head_dim"].as_u64().unwrap() as usize, &p);
    assert_eq!(
        again.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
        stored.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
    );
    assert!(!Checkpoint::open(&dir).unwrap().names().any(|n| n.contains("rope")));

    // eval uses the scaling: the GGUF scores as its conversion does, and the conversion without rope_scaling differs.
    let text = out.join("text.txt");
    std::fs::write(&text, "The quick brown fox jumps over the lazy dog. ".repeat(12)).unwrap();
    let nll = |ck: &Path| {
        let data = format!("text:{}", text.display());
        json_of(&["eval", ck.to_str().unwrap(), "--data", &data, "--max-len", "64", "--json"])["nll"].as_f64().unwrap()
    };
    let (on_gguf, on_dir) = (nll(&gguf), nll(&dir));
    assert_eq!(on_gguf, on_dir);
    let mut unscaled = cfg.clone();
    unscaled.as_object_mut().unwrap().remove("rope_scaling");
    std::fs::write(dir.join("config.json"), serde_json::to_string(&unscaled).unwrap()).unwrap();
    assert_ne!(nll(&dir), on_dir);
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn rope_freqs_of_llama3_parameter_sets_are_recovered_bit_for_bit() {
    use graft::gguf::rope::{llama3_rope_freqs, recover_llama3};
    // Each case's tensor was computed by llama.cpp's converter's formula in torch (tools/make-gguf-fixtures).
    let cases = read_json(&crate::support::fixture("gguf-sp/rope_freqs_cases.json"));
    for case in cases.as_array().unwrap() {
        let bits: Vec<u32> = case["bits"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap() as u32).collect();
        let values: Vec<f32> = bits.iter().map(|b| f32::from_bits(*b)).collect();
        let (theta, dim) = (case["theta"].as_f64().unwrap(), case["head_dim"].as_u64().unwrap() as usize);
        let p = recover_llama3(&values, theta, dim, None, None).unwrap_or_else(|e| panic!("{case}: {e}"));
        let again: Vec<u32> = llama3_rope_freqs(theta, dim, &p).iter().map(|x| x.to_bits()).collect();
        assert_eq!(again, bits, "{case}");
        // Only the factor and the two wavelengths (original / low, original / high) are determined by the tensor.
        let num = |k: &str| case[k].as_f64().unwrap();
        let original = num("original_max_position_embeddings");
        let o = p.original_max_position_embeddings as f64;
        assert_eq!(p.factor, num("factor"));
        assert!((o / p.low_freq_factor - original / num("low_freq_factor")).abs() < 1e-6, "{p:?} {case}");
        assert!((o / p.high_freq_factor - original / num("high_freq_factor")).abs() < 1e-6, "{p:?} {case}");
    }
}

#[test]
fn unknown_tokenizer_types_and_unreproducible_rope_freqs_are_one_line_errors() {
    let o = "/nonexistent-out";
    let fx = llama_fixture_with("llama", vec![("tokenizer.ggml.model", Meta::Str("wordpiece-9"))]);
    let err = one_line_error(&["convert", fx.gguf.to_str().unwrap(), "-o", o]);
    assert!(err.contains("tiny.gguf") && err.contains("'wordpiece-9' is not a tokenizer type"), "{err}");

    // Divisors between 1 and the factor that no single smooth ramp gives.
    let bad = [1.0f32, 1.0, 1.0, 1.0, 1.5, 1.5, 1.5, 3.0];
    let rope = RawTensor { name: "rope_freqs.weight".into(), ggml_type: T_F32, shape: vec![8], data: f32_bytes(&bad) };
    let fx = llama_fixture_full("llama", VOCAB, 0, Vec::new(), vec![rope]);
    for cmd in [vec!["convert", fx.gguf.to_str().unwrap(), "-o", o], vec!["snr", fx.gguf.to_str().unwrap()]] {
        let err = one_line_error(&cmd);
        assert!(err.contains("tiny.gguf") && err.contains("rope_freqs.weight") && err.contains("no llama3"), "{err}");
    }
}

// ---- a GGUF as an input to every command: the result equals the result on its `graft convert` output ----------

fn run_ok(args: &[&str]) -> Vec<u8> {
    let o = graft(args);
    assert!(o.status.success(), "graft {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    o.stdout
}

fn json_of(args: &[&str]) -> serde_json::Value {
    serde_json::from_slice(&run_ok(args)).unwrap()
}

/// `bytes` with each `(from, to)` path spelling replaced: outputs record the paths of their inputs (provenance
/// metadata, reports), which name the GGUF on one side and the converted directory on the other. A safetensors
/// file's header is replaced as text and its tensor data kept as is (the header length changes with the paths).
fn with_paths_replaced(name: &str, bytes: &[u8], subs: &[(&Path, &Path)]) -> Vec<u8> {
    let replace = |text: &str| {
        subs.iter().fold(text.to_string(), |t, (from, to)| t.replace(from.to_str().unwrap(), to.to_str().unwrap()))
    };
    if name.ends_with(".safetensors") {
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        // The header is padded with spaces to an alignment, which depends on its length.
        let header = replace(std::str::from_utf8(&bytes[8..8 + n]).unwrap().trim_end());
        return [header.as_bytes(), &bytes[8 + n..]].concat();
    }
    replace(&String::from_utf8_lossy(bytes)).into_bytes()
}

/// Asserts that output directories `g` (from GGUF inputs) and `c` (from their conversions) hold the same files with
/// the same bytes, paths aside.
fn assert_same_outputs(g: &Path, c: &Path, subs: &[(&Path, &Path)]) {
    let subs: Vec<(&Path, &Path)> = subs.iter().copied().chain([(g, c)]).collect();
    let (gf, cf) = (files_of(g), files_of(c));
    assert_eq!(gf.iter().map(|f| &f.0).collect::<Vec<_>>(), cf.iter().map(|f| &f.0).collect::<Vec<_>>());
    for ((name, x), (_, y)) in gf.iter().zip(&cf) {
        let x = with_paths_replaced(name, x, &subs);
        let y = with_paths_replaced(name, y, &[]);
        let shown = |b: &[u8]| String::from_utf8_lossy(&b[..b.len().min(3000)]).to_string();
        assert!(x == y, "{} vs {}: {name} differs:\n{}\n{}", g.display(), c.display(), shown(&x), shown(&y));
    }
}

/// Every file under `dir`, by relative path, with its bytes.
fn files_of(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push((p.file_name().unwrap().to_string_lossy().to_string(), std::fs::read(&p).unwrap()));
    }
    out.sort();
    out
}

/// Two fixtures of the same shapes (different values) with a byte-level BPE vocabulary, and their conversions.
struct Pair {
    a: Fixture,
    b: Fixture,
    a_hf: PathBuf,
    b_hf: PathBuf,
}

fn pair() -> Pair {
    let a = llama_fixture_sized("llama", BPE_TOKENS.len(), 0, bpe_meta(true));
    let b = llama_fixture_sized("llama", BPE_TOKENS.len(), 1, bpe_meta(true));
    let (a_hf, b_hf) = (a._dir.path().join("hf"), b._dir.path().join("hf"));
    convert(&a.gguf, &a_hf, &[]);
    convert(&b.gguf, &b_hf, &[]);
    Pair { a, b, a_hf, b_hf }
}

#[test]
fn gguf_opens_as_the_checkpoint_convert_writes() {
    let p = pair();
    let g = Checkpoint::open(&p.a.gguf).unwrap();
    let c = Checkpoint::open(&p.a_hf).unwrap();
    assert!(g.is_gguf() && !c.is_gguf());
    assert_eq!(g.names().collect::<Vec<_>>(), c.names().collect::<Vec<_>>(), "same names in the same order");
    assert_eq!(g.total_bytes(), c.total_bytes());
    for (x, y) in g.iter().zip(c.iter()) {
        assert_eq!((x.dtype, x.shape), (y.dtype, y.shape), "{}", x.name);
        assert!(x.data == y.data, "{}: bytes differ", x.name);
    }
    assert_eq!(g.files(), vec![p.a.gguf.clone()]);
    let side = files_of(g.dir().unwrap());
    let names: Vec<&str> = side.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["config.json", "tokenizer.json", "tokenizer_config.json"]);
    for (name, bytes) in &side {
        assert_eq!(bytes, &std::fs::read(p.a_hf.join(name)).unwrap(), "{name}");
    }
}

#[test]
fn merge_of_gguf_inputs_equals_merge_of_their_conversions() {
    let p = pair();
    let (a, b, a_hf, b_hf) =
        (p.a.gguf.to_str().unwrap(), p.b.gguf.to_str().unwrap(), p.a_hf.to_str().unwrap(), p.b_hf.to_str().unwrap());
    let out = |n: &str| p.a._dir.path().join(n);
    let merge = |inputs: &[&str], extra: &[&str], o: &Path| {
        let mut args = vec!["merge"];
        args.extend_from_slice(inputs);
        args.extend_from_slice(extra);
        args.extend_from_slice(&["-o", o.to_str().unwrap()]);
        run_ok(&args);
    };
    // Two GGUFs, linear.
    let linear = ["--method", "linear", "--weight", "0.3,0.7"];
    merge(&[a, b], &linear, &out("g2"));
    merge(&[a_hf, b_hf], &linear, &out("c2"));
    // A GGUF base and a safetensors model, task arithmetic.
    let task = ["--method", "task_arithmetic", "--base", a, "--weight", "0.5"];
    merge(&[b_hf], &task, &out("g1"));
    let task_hf = ["--method", "task_arithmetic", "--base", a_hf, "--weight", "0.5"];
    merge(&[b_hf], &task_hf, &out("c1"));
    let subs = [(p.a.gguf.as_path(), p.a_hf.as_path()), (p.b.gguf.as_path(), p.b_hf.as_path())];
    // Decoding on first access from several threads leaves the result as it is with one.
    merge(&[a, b], &[&linear[..], &["--threads", "1"]].concat(), &out("g2-1"));
    let (one, many) = (Checkpoint::open(out("g2-1")).unwrap(), Checkpoint::open(out("g2")).unwrap());
    assert!(one.iter().zip(many.iter()).all(|(x, y)| x.name == y.name && x.data == y.data));
    for (g, c) in [("g2", "c2"), ("g1", "c1")] {
        assert!(out(g).join("tokenizer.json").is_file(), "the base's tokenizer is carried");
        assert_same_outputs(&out(g), &out(c), &subs);
    }
}

#[test]
fn snr_diff_and_similarity_of_ggufs_equal_those_of_their_conversions() {
    let p = pair();
    let subs = [(p.a.gguf.as_path(), p.a_hf.as_path()), (p.b.gguf.as_path(), p.b_hf.as_path())];
    let (a, b, a_hf, b_hf) =
        (p.a.gguf.to_str().unwrap(), p.b.gguf.to_str().unwrap(), p.a_hf.to_str().unwrap(), p.b_hf.to_str().unwrap());
    let same_stdout = |g: &[&str], c: &[&str]| {
        let (g, c) = (run_ok(g), run_ok(c));
        assert_eq!(String::from_utf8(with_paths_replaced("", &g, &subs)).unwrap(), String::from_utf8(c).unwrap());
    };
    same_stdout(&["snr", a, "--json"], &["snr", a_hf, "--json"]);
    same_stdout(&["similarity", "--base", a, b, a, "--json"], &["similarity", "--base", a_hf, b_hf, a_hf, "--json"]);

    let out = |n: &str| p.a._dir.path().join(n);
    let (g, c) = (out("dg"), out("dc"));
    run_ok(&["diff", "--base", a, b, "-o", g.to_str().unwrap()]);
    run_ok(&["diff", "--base", a_hf, b_hf, "-o", c.to_str().unwrap()]);
    assert_same_outputs(&g, &c, &subs);
    // The task vector added back onto the GGUF base, and onto its conversion.
    let (ag, ac) = (out("ag"), out("ac"));
    run_ok(&["apply", a, "--vector", g.to_str().unwrap(), "-o", ag.to_str().unwrap()]);
    run_ok(&["apply", a_hf, "--vector", g.to_str().unwrap(), "-o", ac.to_str().unwrap()]);
    assert_same_outputs(&ag, &ac, &subs);
    // A GGUF and its own conversion are the same model: the task vector between them is empty.
    let none = json_of(&["diff", "--base", b, b_hf, "-o", out("none").to_str().unwrap(), "--json"]);
    assert_eq!(none["tensors"], 0, "{none}");
    assert_eq!(none["skipped_equal"].as_array().unwrap().len(), 11, "{none}");
}

#[test]
fn eval_of_a_gguf_equals_eval_of_its_conversion() {
    let p = pair();
    let text = p.a._dir.path().join("text.txt");
    std::fs::write(&text, "hello world hello world€ hello hello world<|endoftext|>hello").unwrap();
    let data = format!("text:{}", text.display());
    let subs = [(p.a.gguf.as_path(), p.a_hf.as_path())];
    let eval = |ck: &Path| {
        let o = run_ok(&["eval", ck.to_str().unwrap(), "--data", &data, "--max-len", "4", "--json"]);
        let mut v: serde_json::Value = serde_json::from_slice(&with_paths_replaced("", &o, &subs)).unwrap();
        for k in ["time_s", "tokens_per_s", "peak_memory_bytes"] {
            v.as_object_mut().unwrap().remove(k);
        }
        v
    };
    let (g, c) = (eval(&p.a.gguf), eval(&p.a_hf));
    assert!(g["tokens"].as_u64().unwrap() > 8 && g["nll"].as_f64().unwrap().is_finite(), "{g}");
    assert_eq!(g, c);
}

#[test]
fn training_from_a_gguf_equals_training_from_its_conversion() {
    let p = pair();
    let text = p.a._dir.path().join("text.txt");
    std::fs::write(&text, "hello world hello world€ hello hello world hello world hello").unwrap();
    let data = format!("text:{}", text.display());
    let train = |init: &Path, out: &Path| {
        let (i, o) = (init.to_str().unwrap(), out.to_str().unwrap());
        run_ok(&["train", "--init", i, "--data", &data, "--max-len", "4", "--epochs", "1", "--batch", "2", "-o", o]);
        Checkpoint::open(out).unwrap()
    };
    let (g, c) = (train(&p.a.gguf, &p.a._dir.path().join("tg")), train(&p.a_hf, &p.a._dir.path().join("tc")));
    assert_eq!(g.names().collect::<Vec<_>>(), c.names().collect::<Vec<_>>());
    assert!(g.iter().zip(c.iter()).all(|(x, y)| x.dtype == y.dtype && x.data == y.data), "same trained weights");
    let moved = g.iter().zip(Checkpoint::open(&p.a_hf).unwrap().iter()).filter(|(x, y)| x.data != y.data).count();
    assert!(moved > 0, "training changed the weights");
    for f in ["config.json", "tokenizer.json"] {
        assert_eq!(
            std::fs::read(g.dir().unwrap().join(f)).unwrap(),
            std::fs::read(c.dir().unwrap().join(f)).unwrap(),
            "{f}"
        );
    }
}
