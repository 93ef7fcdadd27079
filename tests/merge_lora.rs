//! LoRA inputs (`model+adapter`): a merge of `ft_a+adapter` is bit for bit the same merge of ft_a with the adapter
//! baked in beforehand (here, by a plain f64 computation of `W + s * B @ A` written in the test), with `alpha / r`
//! and with rank-stabilised `alpha / sqrt(r)` scaling, in config and flag form; so are SNR-selective merges (the
//! scan sees the adapted weights) with the adapter on an expert or on the reference the unselected tensors are
//! copied from. On a model with a weight of several executor chunks, in bf16, f16 and f32, passing `model+adapter`
//! through writes exactly the baked model and a TIES merge (pre-passes) equals the baked one, at 1, 2 and 3
//! threads; no temporary directory appears beside the output while the adapter is applied. A bad adapter reference
//! is a one-line usage error.

use std::path::{Path, PathBuf};

use crate::support::st::{f32t, write_st, T};
use crate::support::{command, fixture, graft, s};
use graft::checkpoint::dtype::from_f32_vec;
use graft::checkpoint::{Checkpoint, Dtype};

const TARGETS: [&str; 4] = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.0.self_attn.v_proj.weight",
    "model.layers.1.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
];
const RANK: usize = 4;
const ALPHA: f64 = 8.0;

/// Deterministic values in [-0.05, 0.05).
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
        })
        .collect()
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

/// A PEFT adapter for ft_a in `dir`: per target, A (r x in) and B (out x r) in f32.
fn adapter(dir: &Path, rslora: bool) -> Vec<(String, Vec<f32>, Vec<f32>)> {
    std::fs::create_dir_all(dir).unwrap();
    let model = Checkpoint::open(fixture("llama/ft_a")).unwrap();
    let mut tensors = Vec::new();
    let mut ab = Vec::new();
    for (i, t) in TARGETS.iter().enumerate() {
        let shape = &model.info(t).unwrap().shape;
        let (out, inp) = (shape[0], shape[1]);
        let a = values(2 * i as u64, RANK * inp);
        let b = values(2 * i as u64 + 1, out * RANK);
        let module = t.strip_suffix(".weight").unwrap();
        tensors.push(f32t(leak(format!("base_model.model.{module}.lora_A.weight")), &[RANK, inp], &a));
        tensors.push(f32t(leak(format!("base_model.model.{module}.lora_B.weight")), &[out, RANK], &b));
        ab.push((t.to_string(), a, b));
    }
    write_st(&dir.join("adapter_model.safetensors"), &tensors);
    let cfg = serde_json::json!({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA, "use_rslora": rslora,
        "target_modules": ["q_proj", "v_proj", "down_proj"], "base_model_name_or_path": "ft_a"});
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    ab
}

/// ft_a with the adapter baked in, computed here: W + scale * B @ A in f64, rounded to f32, then to W's dtype.
fn baked(dir: &Path, ab: &[(String, Vec<f32>, Vec<f32>)], scale: f64) {
    std::fs::create_dir_all(dir).unwrap();
    for f in std::fs::read_dir(fixture("llama/ft_a")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
    }
    let model = Checkpoint::open(fixture("llama/ft_a")).unwrap();
    let mut tensors = Vec::new();
    for t in model.iter() {
        let mut data = t.data.to_vec();
        if let Some((_, a, b)) = ab.iter().find(|(n, ..)| n == t.name) {
            assert_eq!(t.dtype, Dtype::BF16);
            let (out, inp) = (t.shape[0], t.shape[1]);
            let w = t.to_f32().unwrap();
            let mut v = vec![0f32; out * inp];
            for i in 0..out {
                for j in 0..inp {
                    let delta: f64 = (0..RANK).map(|k| b[i * RANK + k] as f64 * a[k * inp + j] as f64).sum();
                    v[i * inp + j] = (w[i * inp + j] as f64 + scale * delta) as f32;
                }
            }
            data = from_f32_vec(Dtype::BF16, &v);
            assert_ne!(data, t.data, "{}: the adapter changes it", t.name);
        }
        tensors.push(T { name: leak(t.name.to_string()), dtype: t.dtype.name(), shape: t.shape.to_vec(), data });
    }
    write_st(&dir.join("model.safetensors"), &tensors);
}

fn merge(dir: &Path, a: &str, name: &str) -> PathBuf {
    let cfg = dir.join(format!("{name}.yml"));
    let yaml = format!(
        "merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.7}}\n  - model: \
         {c}\n    parameters: {{weight: 0.4}}\ndtype: float32\n",
        b = s(&fixture("llama/base")),
        c = s(&fixture("llama/ft_b"))
    );
    std::fs::write(&cfg, yaml).unwrap();
    let out = dir.join(name);
    let o = graft(&["merge", &s(&cfg), "-o", &s(&out)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn tensors(p: &Path) -> Vec<(String, Vec<u8>)> {
    let ck = Checkpoint::open(p).unwrap();
    let mut v: Vec<_> = ck.iter().map(|t| (t.name.to_string(), t.data.to_vec())).collect();
    v.sort();
    v
}

#[test]
fn model_plus_adapter_merges_as_the_baked_model() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    for (rslora, scale) in [(false, ALPHA / RANK as f64), (true, ALPHA / (RANK as f64).sqrt())] {
        let tag = if rslora { "rs" } else { "plain" };
        let ab = adapter(&d.join(format!("adapter-{tag}")), rslora);
        baked(&d.join(format!("baked-{tag}")), &ab, scale);
        let with_adapter =
            merge(d, &format!("{}+{}", s(&fixture("llama/ft_a")), s(&d.join(format!("adapter-{tag}")))), tag);
        let with_baked = merge(d, &s(&d.join(format!("baked-{tag}"))), &format!("{tag}-baked"));
        assert_eq!(tensors(&with_adapter), tensors(&with_baked), "{tag}");
        // The flag form reads the same reference.
        let flags = |reference: String, name: &str| {
            let out = d.join(name);
            let o = graft(&["merge", "--method", "linear", &reference, &s(&fixture("llama/ft_b")), "-o", &s(&out)]);
            assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
            tensors(&out)
        };
        let adapted = flags(format!("{}+{}", s(&fixture("llama/ft_a")), s(&d.join(format!("adapter-{tag}")))), "f1");
        assert_eq!(adapted, flags(s(&d.join(format!("baked-{tag}"))), "f2"), "{tag}: flag form");
        std::fs::remove_dir_all(d.join("f1")).unwrap();
        std::fs::remove_dir_all(d.join("f2")).unwrap();
    }
    // The two scalings differ, so the comparison above saw each one.
    assert_ne!(tensors(&d.join("baked-plain")), tensors(&d.join("baked-rs")));
}

#[test]
fn a_missing_adapter_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let reference = format!("{}+{}", s(&fixture("llama/ft_a")), s(&tmp.path().join("no-adapter")));
    let o = graft(&["merge", "--method", "linear", &reference, &s(&fixture("llama/ft_b")), "-o", &s(&out)]);
    let e = String::from_utf8(o.stderr).unwrap();
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(e.contains("no-adapter"), "{e}");
    assert!(!out.exists());
}

fn selection_merge(d: &Path, base: &str, a: &str, name: &str) -> (Vec<(String, Vec<u8>)>, serde_json::Value) {
    let out = d.join(name);
    let args = [
        "merge",
        "--method",
        "linear",
        "--base",
        base,
        a,
        &s(&fixture("llama/ft_b")),
        "--snr-select",
        "top-p=0.5",
        "--snr-from",
        "avg",
        "--alpha",
        "snr",
        "-o",
        &s(&out),
    ];
    let o = graft(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ck = Checkpoint::open(&out).unwrap();
    let meta: serde_json::Value = serde_json::from_str(&ck.metadata()["graft.merge"]).unwrap();
    (tensors(&out), meta["selection"].clone())
}

#[test]
fn snr_selection_scans_the_adapted_model() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ab = adapter(&d.join("adapter"), false);
    baked(&d.join("baked"), &ab, ALPHA / RANK as f64);
    let adapted = format!("{}+{}", s(&fixture("llama/ft_a")), s(&d.join("adapter")));
    let (base, baked_a) = (s(&fixture("llama/base")), s(&d.join("baked")));
    // The adapter on an expert: the ranking averages its SNRs and `--alpha snr` weighs by them.
    let (t1, sel1) = selection_merge(d, &base, &adapted, "expert");
    let (t2, sel2) = selection_merge(d, &base, &baked_a, "expert-baked");
    assert_eq!(sel1, sel2);
    assert_eq!(t1, t2);
    // The adapter on the reference: the unselected tensors are copies of the adapted weights.
    let (t3, sel3) = selection_merge(d, &adapted, &s(&fixture("llama/ft_a")), "reference");
    let (t4, sel4) = selection_merge(d, &baked_a, &s(&fixture("llama/ft_a")), "reference-baked");
    assert_eq!(sel3, sel4);
    assert_eq!(t3, t4);
    // The adapter changed what the scan saw.
    let (_, raw) = selection_merge(d, &base, &s(&fixture("llama/ft_a")), "raw");
    assert_ne!(sel1, raw);
}

/// Rows of the weight that spans several executor chunks (1 Mi elements each): 1100 x 1024 is 2 chunks, the second
/// ragged, and its rows do not align with the chunk boundary.
const BIG: [usize; 2] = [1100, 1024];
const SMALL: [usize; 2] = [24, 40];

fn narrow(dtype: &str, v: &[f32]) -> Vec<u8> {
    match dtype {
        "F32" => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        "BF16" => v.iter().flat_map(|&x| half::bf16::from_f32(x).to_bits().to_le_bytes()).collect(),
        "F16" => v.iter().flat_map(|&x| half::f16::from_f32(x).to_bits().to_le_bytes()).collect(),
        _ => unreachable!(),
    }
}

fn widen(dtype: &str, b: &[u8]) -> Vec<f32> {
    match dtype {
        "F32" => b.chunks(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect(),
        "BF16" => b.chunks(2).map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
        "F16" => b.chunks(2).map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
        _ => unreachable!(),
    }
}

/// A two-matrix model in `dtype` (plus a norm vector nothing adapts), written as `dir/model.safetensors`.
fn chunked_model(dir: &Path, dtype: &'static str, seed: u64, adapt: Option<&[(Vec<f32>, Vec<f32>)]>) {
    std::fs::create_dir_all(dir).unwrap();
    let mut tensors = Vec::new();
    for (m, (name, shape)) in
        [("model.layers.0.mlp.big.weight", BIG), ("model.layers.0.attn.small.weight", SMALL)].into_iter().enumerate()
    {
        let (out, inp) = (shape[0], shape[1]);
        let w = widen(dtype, &narrow(dtype, &values(seed * 10 + m as u64, out * inp)));
        let v = match adapt {
            None => w,
            Some(ab) => {
                let (a, b) = &ab[m];
                (0..out * inp)
                    .map(|e| {
                        let (i, j) = (e / inp, e % inp);
                        let delta: f64 = (0..RANK).map(|k| b[i * RANK + k] as f64 * a[k * inp + j] as f64).sum();
                        (w[e] as f64 + ALPHA / RANK as f64 * delta) as f32
                    })
                    .collect()
            }
        };
        tensors.push(T { name, dtype, shape: shape.to_vec(), data: narrow(dtype, &v) });
    }
    let norm = values(seed * 10 + 7, BIG[1]);
    tensors.push(T { name: "model.layers.0.norm.weight", dtype, shape: vec![BIG[1]], data: narrow(dtype, &norm) });
    write_st(&dir.join("model.safetensors"), &tensors);
}

/// The adapter of `chunked_model`'s two matrices (f32 factors), and its factors.
fn chunked_adapter(dir: &Path) -> Vec<(Vec<f32>, Vec<f32>)> {
    std::fs::create_dir_all(dir).unwrap();
    let mut tensors = Vec::new();
    let mut ab = Vec::new();
    for (m, (module, [out, inp])) in
        [("model.layers.0.mlp.big", BIG), ("model.layers.0.attn.small", SMALL)].into_iter().enumerate()
    {
        let (a, b) = (values(100 + m as u64, RANK * inp), values(200 + m as u64, out * RANK));
        tensors.push(f32t(leak(format!("base_model.model.{module}.lora_A.weight")), &[RANK, inp], &a));
        tensors.push(f32t(leak(format!("base_model.model.{module}.lora_B.weight")), &[out, RANK], &b));
        ab.push((a, b));
    }
    write_st(&dir.join("adapter_model.safetensors"), &tensors);
    let cfg = serde_json::json!({"peft_type": "LORA", "r": RANK, "lora_alpha": ALPHA});
    std::fs::write(dir.join("adapter_config.json"), cfg.to_string()).unwrap();
    ab
}

#[test]
fn a_weight_of_several_chunks_is_adapted_as_baked_at_any_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let ab = chunked_adapter(&d.join("adapter"));
    for dtype in ["BF16", "F16", "F32"] {
        let m = |n: &str| d.join(format!("{dtype}-{n}"));
        chunked_model(&m("base"), dtype, 1, None);
        chunked_model(&m("a"), dtype, 2, None);
        chunked_model(&m("b"), dtype, 3, None);
        chunked_model(&m("a-baked"), dtype, 2, Some(&ab));
        let adapted = format!("{}+{}", s(&m("a")), s(&d.join("adapter")));
        let baked = tensors(&m("a-baked"));
        assert_ne!(tensors(&m("a")), baked, "{dtype}: the adapter changes the model");
        let mut ties_runs = Vec::new();
        for threads in ["1", "2", "3"] {
            let run = |args: &[&str], name: &str| {
                let out = d.join(format!("{dtype}-{name}-{threads}"));
                let mut all = vec!["merge", "--threads", threads];
                all.extend_from_slice(args);
                all.extend_from_slice(&["-o", leak(s(&out))]);
                let o = graft(&all);
                assert!(o.status.success(), "{dtype} {name}: {}", String::from_utf8_lossy(&o.stderr));
                let t = tensors(&out);
                std::fs::remove_dir_all(&out).unwrap();
                t
            };
            // Copied unchanged: the adapted weights converted, never their stored bytes.
            assert_eq!(run(&["--method", "passthrough", &adapted], "pass"), baked, "{dtype}, {threads} threads");
            let ties = |a: &str, name: &str| {
                let (base, b) = (s(&m("base")), s(&m("b")));
                run(&["--method", "ties", "--density", "0.4", "--base", &base, a, &b, "--weight", "0.6,0.4"], name)
            };
            let with_adapter = ties(&adapted, "ties");
            assert_eq!(with_adapter, ties(&s(&m("a-baked")), "ties-baked"), "{dtype}, {threads} threads");
            ties_runs.push(with_adapter);
        }
        assert!(ties_runs.iter().all(|r| *r == ties_runs[0]), "{dtype}: thread counts differ");
    }
}

#[test]
fn no_temporary_directory_appears_beside_the_output() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    chunked_adapter(&d.join("adapter"));
    chunked_model(&d.join("a"), "BF16", 2, None);
    chunked_model(&d.join("b"), "BF16", 3, None);
    let before: Vec<String> =
        std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    let adapted = format!("{}+{}", s(&d.join("a")), s(&d.join("adapter")));
    let out = s(&d.join("out"));
    let args = ["merge", "--threads", "1", "--method", "linear", &adapted, &s(&d.join("b")), "-o", &out];
    let mut child = command(&args).stdout(std::process::Stdio::null()).spawn().unwrap();
    // The whole directory, listed again and again while the merge runs: a temporary directory of adapted weights
    // would live from before the first tensor is merged to the end.
    let mut seen = std::collections::BTreeSet::new();
    let status = loop {
        for e in std::fs::read_dir(d).unwrap() {
            seen.insert(e.unwrap().file_name().to_string_lossy().to_string());
        }
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
    };
    assert!(status.success());
    let unexpected: Vec<&String> =
        seen.iter().filter(|n| !before.contains(n) && n.as_str() != "out" && !n.starts_with(".out.graft-")).collect();
    assert!(unexpected.is_empty(), "beside the output: {unexpected:?}");
}

#[test]
fn an_adapter_that_overflows_the_weights_dtype_is_an_error_naming_the_weight() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let [out, inp] = SMALL;
    let w = vec![0.5f32; out * inp];
    let model = |name: &str| {
        std::fs::create_dir_all(d.join(name)).unwrap();
        let t = T { name: "proj.weight", dtype: "F16", shape: SMALL.to_vec(), data: narrow("F16", &w) };
        write_st(&d.join(name).join("model.safetensors"), &[t]);
    };
    model("a");
    model("b");
    // Every element of B @ A is 4 * 300 * 300 = 360000, past f16's largest finite value (65504).
    let ad = d.join("adapter");
    std::fs::create_dir_all(&ad).unwrap();
    write_st(
        &ad.join("adapter_model.safetensors"),
        &[
            f32t("base_model.model.proj.lora_A.weight", &[RANK, inp], &vec![300.0; RANK * inp]),
            f32t("base_model.model.proj.lora_B.weight", &[out, RANK], &vec![300.0; out * RANK]),
        ],
    );
    std::fs::write(ad.join("adapter_config.json"), r#"{"peft_type": "LORA", "r": 4, "lora_alpha": 4}"#).unwrap();
    let adapted = format!("{}+{}", s(&d.join("a")), s(&ad));
    let o = graft(&["merge", "--method", "linear", &adapted, &s(&d.join("b")), "-o", &s(&d.join("out"))]);
    let e = String::from_utf8(o.stderr).unwrap();
    assert_eq!(o.status.code(), Some(1), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    let whole = format!("{} of {} values are NaN or infinite", out * inp, out * inp);
    for part in [&s(&d.join("a").join("model.safetensors")), "'proj.weight'", &whole, "LoRA"] {
        assert!(e.contains(part), "{part}: {e}");
    }
    assert!(!d.join("out").exists());
}
