//! What each freeze policy costs: the training memory `graft train` measures from its allocations must order
//! head-only < selected < full and cover, for every run, what the parameter counts say training must hold
//! (every parameter in f32, plus a gradient and two AdamW moments for each trainable one); times include their parts.
//! The real-data runs (Fashion-MNIST, MiniLM on SpamAssassin; `tools/fetch-data`) are `#[ignore]`d.
//! `GRAFT_TEST_DEVICE=cuda` runs them all on a GPU (a `cuda` build; `tools/check-cuda` does), where the figure is the
//! CUDA memory pool's.

use crate::support::fixture;

use std::path::{Path, PathBuf};

use graft::rng::Rng;
use graft::train::data::idx;

/// The device every run trains on: `GRAFT_TEST_DEVICE` (default `cpu`; `cuda` on a GPU machine with a `cuda` build,
/// where the figure comes from the CUDA memory pool instead of the host allocator, and the same orderings must hold).
fn test_device() -> String {
    std::env::var("GRAFT_TEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

fn train_json(args: &[&str]) -> serde_json::Value {
    let out = crate::support::command(&[])
        .arg("train")
        .args(args)
        .args(["--quiet", "--json", "--device", &test_device()])
        .output()
        .unwrap();
    assert!(out.status.success(), "graft train {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap()
}

/// Fashion-MNIST-shaped idx files: 28x28 noisy class prototypes.
fn idx_data(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut r = Rng::new(3);
    let protos: Vec<Vec<f64>> = (0..10).map(|_| (0..784).map(|_| 255.0 * r.next_f64()).collect()).collect();
    let mut px = Vec::with_capacity(n * 784);
    let mut labels = Vec::with_capacity(n);
    for _ in 0..n {
        let c = r.below(10);
        labels.push(c as u8);
        px.extend(protos[c].iter().map(|&p| (p + 30.0 * r.normal()).clamp(0.0, 255.0) as u8));
    }
    std::fs::write(dir.join("train-images-idx3-ubyte"), idx::encode(&[n, 28, 28], &px)).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), idx::encode(&[n], &labels)).unwrap();
}

/// CIFAR-shaped arrays (3x8x8) for the sepcnn fixture.
fn arrays(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut r = Rng::new(9);
    let mut px = Vec::new();
    let mut labels = Vec::new();
    for _ in 0..n {
        let c = r.below(10);
        labels.push(c as u8);
        px.extend((0..192).map(|_| (20.0 * c as f64 + 20.0 * r.normal()).clamp(0.0, 255.0) as u8));
    }
    std::fs::write(dir.join("meta.json"), r#"{"shape": [3, 8, 8], "dtype": "u8"}"#).unwrap();
    std::fs::write(dir.join("train.bin"), px).unwrap();
    std::fs::write(dir.join("train.labels"), labels).unwrap();
}

struct Run {
    policy: String,
    trainable: u64,
    total: u64,
    memory: u64,
}

fn run_policies(init: &Path, data: &Path, policies: &[String], extra: &[&str]) -> Vec<Run> {
    policies
        .iter()
        .map(|policy| {
            let mut args = vec!["--init", init.to_str().unwrap(), "--data", data.to_str().unwrap(), "--freeze", policy];
            args.extend_from_slice(extra);
            let v = train_json(&args);
            let report = &v["report"];
            let parts = ["feature_s", "train_s"].map(|k| report[k].as_f64().unwrap());
            assert!(parts[1] > 0.0, "{policy}: {report}");
            assert_eq!(report["time_s"].as_f64().unwrap(), parts[0] + parts[1], "{policy}: time_s is the sum");
            Run {
                policy: policy.clone(),
                trainable: v["freeze"]["trainable_params"].as_u64().unwrap(),
                total: v["freeze"]["total_params"].as_u64().unwrap(),
                memory: report["training_memory_bytes"].as_u64().expect("training memory is counted on this device"),
            }
        })
        .collect()
}

/// Orders the runs by trainable parameters and checks the measured memory against the counts.
fn check_order(mut runs: Vec<Run>) {
    runs.sort_by_key(|r| r.trainable);
    for r in &runs {
        // Parameters (f32), and per trainable one a gradient and AdamW's first and second moments (f32 at least).
        let floor = 4 * r.total + 12 * r.trainable;
        assert!(
            r.memory >= floor,
            "{}: measured {} bytes < the {} bytes its parameters need",
            r.policy,
            r.memory,
            floor
        );
    }
    for pair in runs.windows(2) {
        let (small, large) = (&pair[0], &pair[1]);
        assert!(large.trainable > small.trainable, "the policies must differ in trainable parameters");
        // Not by the full 12 bytes per extra trainable parameter: the step's transient buffers (a batch's
        // activations, freed before the optimiser runs) can set the peak of a small model.
        assert!(
            large.memory > small.memory,
            "{} ({} bytes) must hold more than {} ({} bytes)",
            large.policy,
            large.memory,
            small.policy,
            small.memory
        );
    }
}

#[test]
fn mlp_training_memory_orders_as_the_parameter_counts_say() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    idx_data(&data, 256);
    let sel = t.path().join("sel.json");
    std::fs::write(&sel, r#"{"selected": ["layers.1.weight", "layers.1.bias"]}"#).unwrap();
    let policies = ["all-but-head".to_string(), format!("selected:{}", sel.display()), "none".to_string()];
    let runs = run_policies(&fixture("mlp/base"), &data, &policies, &["--epochs", "1", "--batch", "32"]);
    check_order(runs);
}

#[test]
fn sepcnn_training_memory_orders_as_the_parameter_counts_say() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    arrays(&data, 128);
    let yaml = t.path().join("spectrum.yaml");
    std::fs::write(&yaml, "unfrozen_parameters:\n- ^stage3\\.\n- ^mlp\\.\n").unwrap();
    let policies = ["all-but-head".to_string(), format!("regex:{}", yaml.display()), "none".to_string()];
    let runs = run_policies(&fixture("sepcnn/base"), &data, &policies, &["--epochs", "1", "--batch", "32"]);
    check_order(runs);
}

fn real_data(sub: &str) -> Option<PathBuf> {
    let root = std::env::var_os("GRAFT_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/graft-data"));
    let p = root.join(sub);
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} is missing (tools/fetch-data)", p.display());
        None
    }
}

/// Fashion-MNIST, fresh MLP and sepcnn bodies trained once, then head-only / selected / full from them.
#[test]
#[ignore = "real data: tools/fetch-data fashion-mnist; minutes"]
fn fashion_mnist_policies_order_by_training_memory() {
    let Some(data) = real_data("fashion-mnist") else { return };
    let t = tempfile::tempdir().unwrap();
    for (arch, selected) in [("mlp", "^layers\\.1\\."), ("sepcnn", "^stage3\\.")] {
        let base = t.path().join(arch);
        let d = data.to_str().unwrap();
        train_json(&["--arch", arch, "--data", d, "--limit", "2000", "--epochs", "1", "-o", base.to_str().unwrap()]);
        let yaml = t.path().join(format!("{arch}.yaml"));
        std::fs::write(&yaml, format!("unfrozen_parameters:\n- '{selected}'\n")).unwrap();
        let policies = ["all-but-head".to_string(), format!("regex:{}", yaml.display()), "none".to_string()];
        let runs = run_policies(&base, &data, &policies, &["--limit", "10000", "--epochs", "1", "--batch", "64"]);
        for r in &runs {
            eprintln!(
                "{arch} {}: trainable {} of {}, training memory {} bytes",
                r.policy, r.trainable, r.total, r.memory
            );
        }
        check_order(runs);
    }
}

/// MiniLM-L6 on SpamAssassin: frozen encoder (features extracted once, their time counted) against the last 2
/// layers and full fine-tuning.
#[test]
#[ignore = "real data: tools/fetch-data minilm spam-assassin; many minutes"]
fn minilm_policies_order_by_training_memory_and_count_feature_extraction() {
    let (Some(model), Some(data)) = (real_data("minilm-l6"), real_data("spam-assassin")) else { return };
    let extra = ["--limit", "600", "--epochs", "1", "--batch", "16", "--max-len", "128"];
    let mut runs = Vec::new();
    for policy in ["all-but-head", "last2", "none"] {
        let mut args = vec!["--init", model.to_str().unwrap(), "--data", data.to_str().unwrap()];
        if policy == "last2" {
            args.extend(["--train-last-layers", "2"]);
        } else {
            args.extend(["--freeze", policy]);
        }
        args.extend(extra);
        let v = train_json(&args);
        let report = &v["report"];
        eprintln!("minilm {policy}: {report}");
        if policy == "all-but-head" {
            assert!(report["feature_s"].as_f64().unwrap() > report["train_s"].as_f64().unwrap());
        }
        runs.push(Run {
            policy: policy.into(),
            trainable: v["freeze"]["trainable_params"].as_u64().unwrap(),
            total: v["freeze"]["total_params"].as_u64().unwrap(),
            memory: report["training_memory_bytes"].as_u64().unwrap(),
        });
    }
    check_order(runs);
}
