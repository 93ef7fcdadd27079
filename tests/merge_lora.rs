//! LoRA inputs (`model+adapter`): a merge of `ft_a+adapter` is bit for bit the same merge of ft_a with the adapter
//! baked in beforehand (here, by a plain f64 computation of `W + s * B @ A` written in the test), with `alpha / r`
//! and with rank-stabilised `alpha / sqrt(r)` scaling, in config and flag form; a bad adapter reference is a
//! one-line usage error.

use std::path::{Path, PathBuf};

use crate::support::st::{f32t, write_st, T};
use crate::support::{fixture, graft, s};
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
