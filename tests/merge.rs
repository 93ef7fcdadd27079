//! `graft merge` end to end on the committed fixtures: identities, determinism, non-float handling, configs, errors.

use crate::support::{fail, ok};

use std::path::Path;

use graft::checkpoint::Checkpoint;

fn fx(p: &str) -> String {
    format!("fixtures/{p}")
}

fn out(dir: &tempfile::TempDir, name: &str) -> String {
    dir.path().join(name).display().to_string()
}

/// Every tensor's raw bytes, in name order.
fn tensors(path: impl AsRef<Path>) -> Vec<(String, Vec<u8>)> {
    let ck = Checkpoint::open(path).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = ck.iter().map(|t| (t.name.to_string(), t.data.to_vec())).collect();
    v.sort();
    v
}

fn f32s(path: impl AsRef<Path>, name: &str) -> Vec<f32> {
    Checkpoint::open(path).unwrap().tensor(name).unwrap().to_f32().unwrap()
}

#[test]
fn linear_with_one_model_of_weight_one_is_bit_identical() {
    let d = tempfile::tempdir().unwrap();
    for family in ["llama/ft_a", "bert/base", "sepcnn/ft_b"] {
        let o = out(&d, family.replace('/', "_").as_str());
        ok(&["merge", "--method", "linear", "--weight", "1", &fx(family), "-o", &o]);
        assert_eq!(tensors(&o), tensors(fx(family)), "{family}");
    }
}

#[test]
fn slerp_endpoints_return_the_inputs() {
    let d = tempfile::tempdir().unwrap();
    for (t, want) in [("0", "llama/ft_a"), ("1", "llama/ft_b")] {
        let o = out(&d, t);
        ok(&["merge", "--method", "slerp", "--t", t, &fx("llama/ft_a"), &fx("llama/ft_b"), "-o", &o]);
        assert_eq!(tensors(&o), tensors(fx(want)), "t = {t}");
    }
}

/// A model directory with one tensor of 2.5 executor chunks (fixture tensors all fit in one chunk, so merging them
/// never runs the chunked parallel path) and a small one; `sharded` puts them in two shards with an index.
fn large_model(dir: &tempfile::TempDir, name: &str, seed: u64, sharded: bool) -> String {
    use graft::checkpoint::{CheckpointWriter, Dtype, TensorDecl, WriterOptions};
    let n = 2 * graft::exec::CHUNK_ELEMS + graft::exec::CHUNK_ELEMS / 2;
    let (mut base, mut delta) = (graft::rng::Rng::new(1), graft::rng::Rng::new(seed));
    let mut values = |k: usize| -> Vec<f32> {
        (0..k).map(|_| (base.normal() * 0.02 + if seed == 0 { 0.0 } else { delta.normal() * 0.002 }) as f32).collect()
    };
    let (large, small) = (values(n), values(1024));
    let path = dir.path().join(name);
    let decls = vec![
        TensorDecl::new("model.layers.0.mlp.down_proj.weight", Dtype::F32, vec![n / 1024, 1024]),
        TensorDecl::new("model.layers.0.input_layernorm.weight", Dtype::F32, vec![1024]),
    ];
    let max_shard_size = if sharded { 5_000_000 } else { WriterOptions::default().max_shard_size };
    let mut w = CheckpointWriter::create(&path, decls, WriterOptions { max_shard_size, ..Default::default() }).unwrap();
    w.write_f32("model.layers.0.mlp.down_proj.weight", &large).unwrap();
    w.write_f32("model.layers.0.input_layernorm.weight", &small).unwrap();
    assert_eq!(w.finish().unwrap().files.len(), if sharded { 3 } else { 1 });
    path.display().to_string()
}

#[test]
fn results_do_not_depend_on_threads_or_sharding() {
    let d = tempfile::tempdir().unwrap();
    let large = [
        large_model(&d, "base", 0, false),
        large_model(&d, "base-sharded", 0, true),
        large_model(&d, "ft_a", 2, false),
        large_model(&d, "ft_b", 3, true),
    ];
    let fixtures = [fx("llama/base"), fx("llama/base-sharded"), fx("llama/ft_a"), fx("llama/ft_b")];
    for (set, models) in [&large, &fixtures].into_iter().enumerate() {
        for method in [
            &["--method", "ties", "--density", "0.4"][..],
            &["--method", "dare_ties", "--density", "0.5", "--seed", "7"],
            &["--method", "della", "--density", "0.5", "--epsilon", "0.2"],
        ] {
            let mut runs = Vec::new();
            for (threads, base) in [("1", &models[0]), ("3", &models[1])] {
                let o = out(&d, &format!("{}-{set}-{threads}", method[1]));
                let mut args = vec!["merge", "--threads", threads, "--base", base];
                args.extend_from_slice(method);
                args.extend_from_slice(&[&models[2], &models[3], "-o", &o, "--weight", "0.6,0.4"]);
                ok(&args);
                runs.push(tensors(&o));
            }
            assert_eq!(runs[0], runs[1], "{method:?} on {}", models[0]);
        }
    }
}

#[test]
fn dare_seed_changes_the_mask() {
    let d = tempfile::tempdir().unwrap();
    let run = |seed: &str| {
        let o = out(&d, seed);
        ok(&[
            "merge",
            "--method",
            "dare_linear",
            "--base",
            &fx("llama/base"),
            "--density",
            "0.5",
            "--seed",
            seed,
            &fx("llama/ft_a"),
            "-o",
            &o,
        ]);
        tensors(&o)
    };
    assert_ne!(run("1"), run("2"));
}

#[test]
fn non_float_tensors_are_copied_from_the_base() {
    let d = tempfile::tempdir().unwrap();
    let o = out(&d, "sep");
    ok(&[
        "merge",
        "--method",
        "ties",
        "--base",
        &fx("sepcnn/base"),
        "--density",
        "0.5",
        &fx("sepcnn/ft_a"),
        &fx("sepcnn/ft_b"),
        "-o",
        &o,
    ]);
    let base = Checkpoint::open(fx("sepcnn/base")).unwrap();
    let merged = Checkpoint::open(&o).unwrap();
    let ints: Vec<_> = base.iter().filter(|t| !t.is_float()).collect();
    assert!(!ints.is_empty());
    for t in ints {
        let m = merged.tensor(t.name).unwrap();
        assert_eq!((m.dtype, m.data), (t.dtype, t.data), "{}", t.name);
        // ft_a's counters differ from the base's: the base's value wins.
        assert_ne!(Checkpoint::open(fx("sepcnn/ft_a")).unwrap().tensor(t.name).unwrap().data, t.data);
    }
    // The merged-tensor list names every float tensor and no integer one.
    let list: Vec<String> = serde_json::from_str(&merged.metadata()["graft.merged_tensors"]).unwrap();
    assert_eq!(list.len(), base.iter().filter(|t| t.is_float()).count());
    assert!(list.iter().all(|n| base.tensor(n).unwrap().is_float()));
    let meta: serde_json::Value = serde_json::from_str(&merged.metadata()["graft.merge"]).unwrap();
    assert_eq!(meta["method"], "ties");
}

#[test]
fn ties_output_matches_an_f64_reference_on_the_fixture() {
    // TIES density 0.5, weights 0.5/0.5, normalize: recompute one tensor plainly from the fixture files.
    let d = tempfile::tempdir().unwrap();
    let o = out(&d, "ties");
    ok(&[
        "merge",
        "--method",
        "ties",
        "--base",
        &fx("mlp/base"),
        "--density",
        "0.5",
        "--weight",
        "0.5",
        &fx("mlp/ft_a"),
        &fx("mlp/ft_b"),
        "-o",
        &o,
    ]);
    let name = "layers.1.weight";
    let b = f32s(fx("mlp/base"), name);
    let xs = [f32s(fx("mlp/ft_a"), name), f32s(fx("mlp/ft_b"), name)];
    let n = b.len();
    let k = n / 2;
    let trimmed: Vec<Vec<f64>> = xs
        .iter()
        .map(|x| {
            let dl: Vec<f64> = x.iter().zip(&b).map(|(a, c)| (*a - *c) as f64).collect();
            let mut mags: Vec<f64> = dl.iter().map(|v| v.abs()).collect();
            mags.sort_by(|a, b| b.partial_cmp(a).unwrap());
            let thr = mags[k - 1];
            dl.iter().map(|&v| if v.abs() >= thr { v } else { 0.0 }).collect()
        })
        .collect();
    let got = f32s(&o, name);
    for e in 0..n {
        let s = 0.5 * trimmed[0][e] + 0.5 * trimmed[1][e];
        let (mut m, mut w) = (0.0, 0.0);
        for t in &trimmed {
            if (s >= 0.0 && t[e] > 0.0) || (s < 0.0 && t[e] < 0.0) {
                m += 0.5 * t[e];
                w += 0.5;
            }
        }
        let r = b[e] as f64 + if w > 0.0 { m / w } else { m };
        assert!((got[e] as f64 - r).abs() < 1e-6, "{e}: {} vs {r}", got[e]);
    }
}

#[test]
fn yaml_config_slices_stack_layers_and_fix_the_config() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("stack.yml");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n  - sources:\n      - model: {b}\n        layer_range: [1, 2]\ntokenizer_source: base\n",
            a = fx("llama/ft_a"),
            b = fx("llama/ft_b")
        ),
    )
    .unwrap();
    let o = out(&d, "stack");
    ok(&["merge", cfg.to_str().unwrap(), "-o", &o]);
    let m = Checkpoint::open(&o).unwrap();
    let b = Checkpoint::open(fx("llama/ft_b")).unwrap();
    let a = Checkpoint::open(fx("llama/ft_a")).unwrap();
    assert_eq!(
        m.tensor("model.layers.2.mlp.up_proj.weight").unwrap().data,
        b.tensor("model.layers.1.mlp.up_proj.weight").unwrap().data
    );
    assert_eq!(
        m.tensor("model.layers.1.mlp.up_proj.weight").unwrap().data,
        a.tensor("model.layers.1.mlp.up_proj.weight").unwrap().data
    );
    assert_eq!(
        m.tensor("model.embed_tokens.weight").unwrap().data,
        a.tensor("model.embed_tokens.weight").unwrap().data
    );
    assert_eq!(m.tensor("lm_head.weight").unwrap().data, b.tensor("lm_head.weight").unwrap().data);
    assert_eq!(m.len(), a.len() + 9);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(Path::new(&o).join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 3);
}

#[test]
fn gradients_and_filters_reach_the_right_tensors() {
    // linear, weight of ft_a: 0 on mlp tensors, gradient [1, 0] elsewhere; ft_b weight 1; normalize.
    // Layer 0 attention: weights (1, 1) -> mean; layer 1 attention: (0, 1) -> ft_b; any mlp: (0, 1) -> ft_b.
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("g.yml");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: linear\nmodels:\n  - model: {a}\n    parameters:\n      weight:\n        - filter: mlp\n          value: 0\n        - value: [1, 0]\n  - model: {b}\n    parameters:\n      weight: 1\ndtype: float32\n",
            a = fx("llama/ft_a"),
            b = fx("llama/ft_b")
        ),
    )
    .unwrap();
    let o = out(&d, "g");
    let plan = ok(&["merge", cfg.to_str().unwrap(), "-o", &o, "--dry-run", "--json"]);
    assert!(!Path::new(&o).exists(), "dry run wrote something");
    let plan: serde_json::Value = serde_json::from_str(&plan).unwrap();
    let w = |name: &str| -> Vec<f64> {
        let t = plan["tensors"].as_array().unwrap().iter().find(|t| t["name"] == name).unwrap();
        t["params"]["inputs"].as_array().unwrap().iter().map(|m| m["weight"].as_f64().unwrap()).collect()
    };
    assert_eq!(w("model.layers.0.self_attn.q_proj.weight"), vec![1.0, 1.0]);
    assert_eq!(w("model.layers.1.self_attn.q_proj.weight"), vec![0.0, 1.0]);
    assert_eq!(w("model.layers.0.mlp.up_proj.weight"), vec![0.0, 1.0]);
    assert_eq!(w("model.embed_tokens.weight"), vec![1.0, 1.0]);
    ok(&["merge", cfg.to_str().unwrap(), "-o", &o]);
    let b = f32s(fx("llama/ft_b"), "model.layers.1.self_attn.q_proj.weight");
    assert_eq!(f32s(&o, "model.layers.1.self_attn.q_proj.weight"), b);
    let a0 = f32s(fx("llama/ft_a"), "model.layers.0.self_attn.q_proj.weight");
    let b0 = f32s(fx("llama/ft_b"), "model.layers.0.self_attn.q_proj.weight");
    let m0 = f32s(&o, "model.layers.0.self_attn.q_proj.weight");
    for ((x, y), m) in a0.iter().zip(&b0).zip(&m0) {
        assert_eq!(*m, (x + y) / 2.0);
    }
}

#[test]
fn mismatched_inputs_name_every_mismatch() {
    let d = tempfile::tempdir().unwrap();
    let one_layer = out(&d, "short");
    let cfg = d.path().join("short.yml");
    std::fs::write(
        &cfg,
        format!(
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: {}\n        layer_range: [0, 1]\n",
            fx("llama/ft_a")
        ),
    )
    .unwrap();
    ok(&["merge", cfg.to_str().unwrap(), "-o", &one_layer]);
    let (code, e) = fail(&["merge", "--method", "linear", &fx("llama/ft_b"), &one_layer, "-o", &out(&d, "x")]);
    assert_eq!(code, 1);
    for t in [
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.self_attn.q_proj.weight",
        "model.layers.1.input_layernorm.weight",
    ] {
        assert!(e.contains(t), "{t} missing from: {e}");
    }
    let (_, e) = fail(&["merge", "--method", "linear", &fx("llama/ft_b"), &fx("mlp/ft_a"), "-o", &out(&d, "y")]);
    assert!(e.contains("'layers.0.weight'") && e.contains("'lm_head.weight'"), "{e}");
}

#[test]
fn bad_configs_and_flags_are_usage_errors() {
    let d = tempfile::tempdir().unwrap();
    let o = out(&d, "o");
    let write = |name: &str, text: String| {
        let p = d.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    };
    let a = fx("llama/ft_a");
    let cases = [
        (write("a.yml", format!("merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {{weight: 1, densty: 0.5}}\n")), "unknown parameter 'densty'"),
        (write("b.yml", format!("merge_method: frankenmerge\nmodels:\n  - model: {a}\n")), "unsupported merge method"),
        (write("c.yml", format!("merge_method: linear\nmodels:\n  - model: {a}\nbase_mdoel: x\n")), "unknown key 'base_mdoel'"),
        (write("d.yml", format!("merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n    parameters: {{t: 0.5}}\n", b = fx("llama/ft_b"))), "shared by all models"),
        (write("e.yml", format!("merge_method: linear\nmodels:\n  - model: {a}\n")), "missing required parameter 'weight'"),
    ];
    for (cfg, want) in cases {
        let (code, e) = fail(&["merge", &cfg, "-o", &o]);
        assert_eq!(code, 2, "{e}");
        assert!(e.contains(want), "{want}: {e}");
    }
    let (code, e) = fail(&["merge", "--method", "ties", &a, "-o", &o]);
    assert!(code == 2 && e.contains("--base"), "{e}");
    let (code, e) = fail(&["merge", "--method", "slerp", "--t", "0.5", &a, "-o", &o]);
    assert!(code == 2 && e.contains("at least 2"), "{e}");
    let (_, e) = fail(&["merge", "--method", "linear", &a, "-o", &a]);
    assert!(e.contains("input"), "{e}");
    assert!(!Path::new(&o).exists());
}

#[test]
fn model_stock_and_paper_ties_run_and_summarise() {
    let d = tempfile::tempdir().unwrap();
    let o = out(&d, "ms");
    let s = ok(&[
        "merge",
        "--json",
        "--method",
        "model_stock",
        "--base",
        &fx("llama/base"),
        &fx("llama/ft_a"),
        &fx("llama/ft_b"),
        "-o",
        &o,
    ]);
    let s: serde_json::Value = serde_json::from_str(&s).unwrap();
    assert_eq!((s["tensors"].as_u64(), s["merged"].as_u64()), (Some(21), Some(21)));
    // f64 reference: offsets' cosine, t = 2c / (1 + c), t * mean + (1 - t) * base, then bf16 rounding (half an ulp).
    let name = "model.layers.0.mlp.up_proj.weight";
    let (b, a, c, m) =
        (f32s(fx("llama/base"), name), f32s(fx("llama/ft_a"), name), f32s(fx("llama/ft_b"), name), f32s(&o, name));
    let oa: Vec<f64> = a.iter().zip(&b).map(|(x, y)| (*x - *y) as f64).collect();
    let oc: Vec<f64> = c.iter().zip(&b).map(|(x, y)| (*x - *y) as f64).collect();
    let dot: f64 = oa.iter().zip(&oc).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let cos = dot / (norm(&oa) * norm(&oc));
    let t = 2.0 * cos / (1.0 + cos);
    for k in 0..b.len() {
        let r = t * (a[k] as f64 + c[k] as f64) / 2.0 + (1.0 - t) * b[k] as f64;
        assert!((m[k] as f64 - r).abs() <= r.abs() / 256.0 + 1e-30, "{k}: {} vs {r} (t {t})", m[k]);
    }
    let o2 = out(&d, "paper");
    ok(&[
        "merge",
        "--method",
        "ties",
        "--ties-variant",
        "paper",
        "--density",
        "0.3",
        "--base",
        &fx("llama/base"),
        &fx("llama/ft_a"),
        &fx("llama/ft_b"),
        "-o",
        &o2,
    ]);
    let meta: serde_json::Value =
        serde_json::from_str(&Checkpoint::open(&o2).unwrap().metadata()["graft.merge"]).unwrap();
    assert_eq!(meta["ties_variant"], "paper");
}

/// name -> SNR of every scored matrix of `model`, from `graft snr` (the SNR library's own tests check the values).
fn snr_scores(model: &str) -> std::collections::HashMap<String, f64> {
    let o = ok(&["snr", model, "--jsonl"]);
    let d: serde_json::Value = serde_json::from_str(o.lines().next().unwrap()).unwrap();
    d["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["status"] == "ok")
        .map(|t| (t["name"].as_str().unwrap().to_string(), t["snr"].as_f64().unwrap()))
        .collect()
}

#[test]
fn snr_selection_merges_only_the_top_matrices_and_what_follows_them() {
    let d = tempfile::tempdir().unwrap();
    let o = out(&d, "sel");
    let (base, a, b) = (fx("sepcnn/base"), fx("sepcnn/ft_a"), fx("sepcnn/ft_b"));
    ok(&[
        "merge",
        "--method",
        "linear",
        "--base",
        &base,
        "--weight",
        "0.5",
        &a,
        &b,
        "--snr-select",
        "top-p=0.2",
        "-o",
        &o,
    ]);
    let scores = snr_scores(&base);
    let mut ranked: Vec<(&String, &f64)> = scores.iter().collect();
    ranked.sort_by(|x, y| y.1.partial_cmp(x.1).unwrap());
    let k = (0.2 * ranked.len() as f64).ceil() as usize;
    let selected: Vec<&str> = ranked[..k].iter().map(|(n, _)| n.as_str()).collect();
    let (cb, ca, cc, m) = (
        Checkpoint::open(&base).unwrap(),
        Checkpoint::open(&a).unwrap(),
        Checkpoint::open(&b).unwrap(),
        Checkpoint::open(&o).unwrap(),
    );
    let merged_list: Vec<String> = serde_json::from_str(&m.metadata()["graft.merged_tensors"]).unwrap();
    for t in cb.iter() {
        let got = m.tensor(t.name).unwrap();
        let matrix = t.is_float() && t.shape.len() >= 2;
        let module = t.name.rsplit_once('.').unwrap().0;
        let merged = if matrix {
            selected.contains(&t.name)
        } else if t.name.ends_with("running_mean") || t.name.ends_with("running_var") || !t.is_float() {
            false
        } else {
            // Biases follow their own matrix; BatchNorm vectors the matrices of their block.
            let own = format!("{module}.weight");
            if scores.contains_key(&own) {
                selected.contains(&own.as_str())
            } else {
                let block = module.rsplit_once('.').map(|p| p.0).unwrap_or("");
                selected.iter().any(|s| !block.is_empty() && s.starts_with(&format!("{block}.")))
            }
        };
        assert_eq!(merged_list.contains(&t.name.to_string()), merged, "{}", t.name);
        if merged {
            let want: Vec<f32> = ca
                .tensor(t.name)
                .unwrap()
                .to_f32()
                .unwrap()
                .iter()
                .zip(cc.tensor(t.name).unwrap().to_f32().unwrap())
                .map(|(x, y)| x * 0.5 + y * 0.5)
                .collect();
            assert_eq!(got.to_f32().unwrap(), want, "{}", t.name);
        } else {
            assert_eq!(got.data, t.data, "{} should be the base's", t.name);
        }
    }
    assert!(merged_list.len() > k, "biases and norms follow the selected matrices");
    let meta: serde_json::Value = serde_json::from_str(&m.metadata()["graft.merge"]).unwrap();
    assert_eq!(meta["selection"]["selected"].as_u64(), Some(k as u64));
}

#[test]
fn snr_alpha_weights_each_layer_by_the_experts_snrs() {
    let d = tempfile::tempdir().unwrap();
    let (base, a, b) = (fx("llama/base"), fx("llama/ft_a"), fx("llama/ft_b"));
    let o = out(&d, "alpha");
    ok(&[
        "merge",
        "--method",
        "linear",
        "--base",
        &base,
        &a,
        &b,
        "--snr-select",
        "top-p=0.5",
        "--snr-from",
        "avg",
        "--alpha",
        "snr",
        "-o",
        &o,
    ]);
    let (sa, sb) = (snr_scores(&a), snr_scores(&b));
    // avg ranking: the top half of the matrices by (snr_A + snr_B) / 2.
    let mut ranked: Vec<(&String, f64)> = sa.keys().map(|n| (n, (sa[n] + sb[n]) / 2.0)).collect();
    ranked.sort_by(|x, y| y.1.partial_cmp(&x.1).unwrap());
    let k = (0.5 * ranked.len() as f64).ceil() as usize;
    let m = Checkpoint::open(&o).unwrap();
    for (i, (name, _)) in ranked.iter().enumerate() {
        let got = m.tensor(name).unwrap().to_f32().unwrap();
        if i >= k {
            assert_eq!(got, f32s(&base, name), "{name} not selected");
            continue;
        }
        let alpha = sb[*name] / (sa[*name] + sb[*name]);
        let (xa, xb) = (f32s(&a, name), f32s(&b, name));
        for e in 0..got.len() {
            let r = (1.0 - alpha) * xa[e] as f64 + alpha * xb[e] as f64;
            assert!((got[e] as f64 - r).abs() <= r.abs() / 256.0 + 1e-12, "{name}[{e}]: {} vs {r}", got[e]);
        }
    }
    // The final norm is outside every layer: always the reference's.
    assert_eq!(f32s(&o, "model.norm.weight"), f32s(&base, "model.norm.weight"));
    let (code, e) = fail(&["merge", "--method", "linear", &a, &b, "--alpha", "snr", "-o", &out(&d, "x")]);
    assert!(code == 2 && e.contains("--snr-select"), "{e}");
    // model_stock has no per-model weight an SNR ratio could set.
    let (code, e) = fail(&[
        "merge",
        "--method",
        "model_stock",
        "--base",
        &base,
        &a,
        &b,
        "--snr-select",
        "top-p=0.5",
        "--alpha",
        "snr",
        "-o",
        &out(&d, "y"),
    ]);
    assert!(code == 2 && e.contains("--alpha snr does not apply to model_stock"), "{e}");
}
