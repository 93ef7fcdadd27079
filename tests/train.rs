//! `graft train` and `graft eval` end to end on the fixtures and on small synthetic data sets written here.

use crate::support::fixture;

use std::path::Path;
use std::process::Command;

use graft::checkpoint::Checkpoint;
use graft::rng::Rng;
use graft::train::data::idx;

fn graft() -> Command {
    crate::support::command(&[])
}

fn run(args: &[&str]) -> String {
    let out = graft().args(args).output().unwrap();
    assert!(out.status.success(), "graft {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn fails(args: &[&str]) -> String {
    let out = graft().args(args).output().unwrap();
    assert!(!out.status.success(), "graft {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    // Informational lines may precede it; the error itself is one line.
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("graft: error:")).collect();
    assert_eq!(errors.len(), 1, "one error line expected: {err}");
    assert_eq!(err.trim_end().lines().last(), Some(errors[0]));
    errors[0].to_string()
}

/// Ten well-separated classes of 28x28 "images": a random prototype per class plus noise (deterministic).
fn separable_idx(dir: &Path, train: usize, test: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut r = Rng::new(42);
    let protos: Vec<Vec<f64>> = (0..10).map(|_| (0..784).map(|_| 40.0 + 175.0 * r.next_f64()).collect()).collect();
    let mut write = |n: usize, prefix: &str| {
        let mut px = Vec::with_capacity(n * 784);
        let mut labels = Vec::with_capacity(n);
        for _ in 0..n {
            let c = r.below(10);
            labels.push(c as u8);
            px.extend(protos[c].iter().map(|&p| (p + 25.0 * r.normal()).clamp(0.0, 255.0) as u8));
        }
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), idx::encode(&[n, 28, 28], &px)).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), idx::encode(&[n], &labels)).unwrap();
    };
    write(train, "train");
    write(test, "t10k");
}

/// CIFAR-shaped data in graft's arrays format: 3x8x8 images, 10 classes, mean brightness per class and channel.
fn arrays(dir: &Path, n: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut r = Rng::new(7);
    let mut px = Vec::new();
    let mut labels = Vec::new();
    for _ in 0..n {
        let c = r.below(10);
        labels.push(c as u8);
        for ch in 0..3 {
            let base = 20.0 + 20.0 * c as f64 + 10.0 * ch as f64;
            px.extend((0..64).map(|_| (base + 15.0 * r.normal()).clamp(0.0, 255.0) as u8));
        }
    }
    std::fs::write(dir.join("meta.json"), r#"{"shape": [3, 8, 8], "dtype": "u8"}"#).unwrap();
    std::fs::write(dir.join("train.bin"), px).unwrap();
    std::fs::write(dir.join("train.labels"), labels).unwrap();
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s.trim()).unwrap()
}

fn tensor_bytes(ck: &Checkpoint, name: &str) -> Vec<u8> {
    ck.tensor(name).unwrap().data.to_vec()
}

#[test]
fn mlp_reaches_full_accuracy_on_separable_data() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    separable_idx(&data, 500, 200);
    let out = run(&[
        "train",
        "--arch",
        "mlp",
        "--hidden",
        "32",
        "--data",
        data.to_str().unwrap(),
        "--epochs",
        "4",
        "--lr",
        "0.01",
        "--batch",
        "32",
        "--json",
        "--quiet",
    ]);
    let v = json(&out);
    assert_eq!(v["test"]["accuracy"], 1.0, "{v}");
    assert_eq!(v["samples"]["test"], 200);
    let losses: Vec<f64> =
        v["report"]["epochs"].as_array().unwrap().iter().map(|e| e["train_loss"].as_f64().unwrap()).collect();
    assert!(losses[losses.len() - 1] < losses[0], "{losses:?}");
}

#[test]
fn frozen_tensors_stay_bit_identical() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    separable_idx(&data, 300, 50);
    let base = fixture("mlp/base");
    let base_ck = Checkpoint::open(&base).unwrap();

    // Head only.
    let out = t.path().join("head");
    run(&[
        "train",
        "--init",
        base.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--freeze",
        "all-but-head",
        "--epochs",
        "1",
        "--lr",
        "0.01",
        "--quiet",
        "-o",
        out.to_str().unwrap(),
    ]);
    let ck = Checkpoint::open(&out).unwrap();
    for n in ["layers.0.weight", "layers.0.bias", "layers.1.weight", "layers.1.bias"] {
        assert_eq!(tensor_bytes(&ck, n), tensor_bytes(&base_ck, n), "{n} must not change");
    }
    for n in ["layers.2.weight", "layers.2.bias"] {
        assert_ne!(tensor_bytes(&ck, n), tensor_bytes(&base_ck, n), "{n} must train");
    }

    // A selection file (graft snr --selection-json shape): layers.1 plus the head train.
    let sel = t.path().join("sel.json");
    std::fs::write(&sel, r#"{"selected": [{"name": "layers.1.weight"}, "layers.1.bias"]}"#).unwrap();
    let out = t.path().join("sel");
    let v = json(&run(&[
        "train",
        "--init",
        base.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--freeze",
        &format!("selected:{}", sel.display()),
        "--epochs",
        "1",
        "--lr",
        "0.01",
        "--quiet",
        "--json",
        "-o",
        out.to_str().unwrap(),
    ]));
    assert_eq!(v["freeze"]["trainable_tensors"], 4);
    assert_eq!(v["freeze"]["trainable_params"], 64 * 64 + 64 + 10 * 64 + 10);
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(tensor_bytes(&ck, "layers.0.weight"), tensor_bytes(&base_ck, "layers.0.weight"));
    assert_ne!(tensor_bytes(&ck, "layers.1.weight"), tensor_bytes(&base_ck, "layers.1.weight"));
}

#[test]
fn sepcnn_batchnorm_statistics_follow_the_policy() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    arrays(&data, 96);
    let base = fixture("sepcnn/base");
    let base_ck = Checkpoint::open(&base).unwrap();
    // Spectrum/axolotl YAML: only stage3 (and the head) train.
    let yaml = t.path().join("spectrum.yaml");
    std::fs::write(&yaml, "unfrozen_parameters:\n- ^stage3\\.\n- ^mlp\\.\n").unwrap();
    for (policy, frozen_stats_move) in [("freeze", false), ("update", true)] {
        let out = t.path().join(policy);
        let stderr = graft()
            .args([
                "train",
                "--init",
                base.to_str().unwrap(),
                "--data",
                data.to_str().unwrap(),
                "--freeze",
                &format!("regex:{}", yaml.display()),
                "--bn-stats",
                policy,
                "--epochs",
                "1",
                "--batch",
                "32",
                "-o",
                out.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(stderr.status.success(), "{}", String::from_utf8_lossy(&stderr.stderr));
        assert!(String::from_utf8_lossy(&stderr.stderr).contains("BatchNorm statistics of frozen layers"));
        let ck = Checkpoint::open(&out).unwrap();
        for info in base_ck.infos() {
            let n = &info.name;
            let same = tensor_bytes(&ck, n) == tensor_bytes(&base_ck, n);
            let trains = n.starts_with("stage3.") || n.starts_with("mlp.") || n.starts_with("classifier");
            let is_stat =
                n.ends_with("running_mean") || n.ends_with("running_var") || n.ends_with("num_batches_tracked");
            if trains {
                assert!(!same, "{n} should change");
            } else if is_stat {
                assert_eq!(!same, frozen_stats_move, "{n} under --bn-stats {policy}");
            } else {
                assert!(same, "{n} is frozen and must be bit-identical");
            }
        }
    }
}

#[test]
fn results_are_identical_for_any_thread_count() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    arrays(&data, 64);
    let base = fixture("sepcnn/base");
    let mut files = Vec::new();
    for threads in ["1", "2"] {
        let out = t.path().join(format!("t{threads}.safetensors"));
        run(&[
            "--threads",
            threads,
            "train",
            "--init",
            base.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--epochs",
            "1",
            "--batch",
            "16",
            "--quiet",
            "-o",
            out.to_str().unwrap(),
        ]);
        let ck = Checkpoint::open(&out).unwrap();
        files.push(ck.iter().map(|v| v.data.to_vec()).collect::<Vec<_>>());
    }
    assert!(files[0] == files[1], "1 and 2 threads gave different weights");
}

/// `graft eval --json` on the mlp fixture against a plain f64 forward pass of the fixture's weights.
#[test]
fn eval_json_matches_a_plain_forward_pass() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    separable_idx(&data, 20, 100);
    let base = fixture("mlp/base");
    let v = json(&run(&["eval", base.to_str().unwrap(), "--data", data.to_str().unwrap(), "--json"]));
    let ck = Checkpoint::open(&base).unwrap();
    let w = |n: &str| -> Vec<f64> { ck.tensor(n).unwrap().to_f32().unwrap().into_iter().map(|x| x as f64).collect() };
    let (_, px) = idx::read(&data.join("t10k-images-idx3-ubyte")).unwrap();
    let (_, labels) = idx::read(&data.join("t10k-labels-idx1-ubyte")).unwrap();
    let mut correct = 0;
    let mut confusion = vec![vec![0u64; 10]; 10];
    for (s, &y) in labels.iter().enumerate() {
        let mut h: Vec<f64> = px[s * 784..(s + 1) * 784].iter().map(|&p| (p as f64 / 255.0 - 0.5) / 0.5).collect();
        for l in 0..3 {
            let (wt, b) = (w(&format!("layers.{l}.weight")), w(&format!("layers.{l}.bias")));
            let mut o: Vec<f64> =
                (0..b.len()).map(|r| b[r] + (0..h.len()).map(|k| wt[r * h.len() + k] * h[k]).sum::<f64>()).collect();
            if l < 2 {
                o.iter_mut().for_each(|x| *x = x.max(0.0));
            }
            h = o;
        }
        let pred = (0..10).max_by(|&a, &b| h[a].total_cmp(&h[b])).unwrap();
        correct += (pred == y as usize) as usize;
        confusion[y as usize][pred] += 1;
    }
    assert_eq!(v["samples"], 100);
    assert_eq!(v["accuracy"].as_f64().unwrap(), correct as f64 / 100.0);
    assert_eq!(v["confusion"], serde_json::json!(confusion));
    assert!(v["f1_macro"].as_f64().is_some() && v["loss"].as_f64().unwrap() > 0.0);
    // The table form names the classes.
    let table = run(&["eval", base.to_str().unwrap(), "--data", data.to_str().unwrap()]);
    assert!(table.contains("accuracy") && table.contains("precision"));
}

#[test]
fn transfer_body_sizes_a_new_head_and_writes_results_lines() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    separable_idx(&data, 300, 80);
    let base = fixture("mlp/base");
    let out = t.path().join("expert");
    let results = t.path().join("results.jsonl");
    let v = json(&run(&[
        "train",
        "--transfer-body",
        base.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--classes",
        "0,1,8,9",
        "--epochs",
        "2",
        "--lr",
        "0.01",
        "--seed",
        "3",
        "--quiet",
        "--json",
        "-o",
        out.to_str().unwrap(),
        "--results",
        results.to_str().unwrap(),
        "--experiment",
        "expert A",
    ]));
    assert_eq!(v["classes"], serde_json::json!(["0", "1", "8", "9"]));
    let ck = Checkpoint::open(&out).unwrap();
    assert_eq!(ck.tensor("layers.2.weight").unwrap().shape, &[4, 64]);
    assert!(ck.metadata().contains_key("graft.arch"));
    // The output evaluates without flags (architecture from its metadata), on the same class subset.
    let e = json(&run(&[
        "eval",
        out.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--classes",
        "0,1,8,9",
        "--json",
        "--results",
        results.to_str().unwrap(),
    ]));
    assert_eq!(e["accuracy"], v["test"]["accuracy"]);
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&results).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["kind"], "train");
    assert_eq!(lines[0]["experiment"], "expert A");
    assert_eq!(lines[0]["seed"], 3);
    assert_eq!(lines[0]["epochs"].as_array().unwrap().len(), 2);
    for k in ["accuracy", "f1_weighted", "f1_macro", "loss", "time_s", "peak_memory_bytes"] {
        assert!(lines[0]["metrics"][k].is_number(), "metrics.{k} missing");
    }
    for (k, val) in lines[0]["config"].as_object().unwrap() {
        assert!(val.is_string() || val.is_number(), "config.{k} = {val} is not a number or string");
    }
    assert_eq!(lines[1]["kind"], "eval");
    assert_eq!(lines[1]["metrics"]["accuracy"], lines[0]["metrics"]["accuracy"]);
}

#[test]
fn bad_inputs_fail_with_one_line() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    separable_idx(&data, 20, 10);
    let d = data.to_str().unwrap();
    let base = fixture("mlp/base");
    let b = base.to_str().unwrap();
    assert!(fails(&["train", "--arch", "mlp", "--data", "/nonexistent/x"]).contains("no such file"));
    assert!(fails(&["train", "--arch", "mlp", "--data", d, "--classes", "3,12"]).contains("class 12"));
    assert!(fails(&["train", "--arch", "sepcnn", "--init", b, "--data", d]).contains("holds a mlp model"));
    assert!(fails(&["train", "--init", b, "--data", d, "--classes", "0,1"]).contains("--transfer-body"));
    assert!(fails(&["train", "--init", b, "--data", d, "--freeze", "bogus"]).contains("--freeze"));
    let sel = t.path().join("sel.json");
    std::fs::write(&sel, r#"["no.such.layer"]"#).unwrap();
    assert!(fails(&["train", "--init", b, "--data", d, "--freeze", &format!("selected:{}", sel.display())])
        .contains("matches no parameter"));
    let sep = fixture("sepcnn/base");
    assert!(fails(&["eval", sep.to_str().unwrap(), "--data", d]).contains("expects images of shape (3, H, W)"));
    let bad = t.path().join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("train-images-idx3-ubyte"), [0u8, 0, 8, 1, 0, 0, 0, 9]).unwrap();
    std::fs::write(bad.join("train-labels-idx1-ubyte"), idx::encode(&[9], &[0; 9])).unwrap();
    assert!(fails(&["train", "--arch", "mlp", "--data", bad.to_str().unwrap()]).contains("need 9 data bytes"));
}

/// A WordPiece `tokenizer.json` for the bert fixture's 96-token vocabulary: specials, 40 words, 8 suffixes.
fn tiny_tokenizer(words: &[&str]) -> String {
    let mut vocab = serde_json::Map::new();
    for (i, t) in ["[PAD]", "[UNK]", "[CLS]", "[SEP]"].iter().enumerate() {
        vocab.insert(t.to_string(), i.into());
    }
    for w in words {
        let n = vocab.len();
        vocab.insert(w.to_string(), n.into());
    }
    let special = |t: &str| serde_json::json!({"SpecialToken": {"id": t, "type_id": 0}});
    serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": {"type": "BertNormalizer", "clean_text": true, "handle_chinese_chars": true,
                       "strip_accents": null, "lowercase": true},
        "pre_tokenizer": {"type": "BertPreTokenizer"},
        "post_processor": {"type": "TemplateProcessing",
            "single": [special("[CLS]"), {"Sequence": {"id": "A", "type_id": 0}}, special("[SEP]")],
            "pair": [special("[CLS]"), {"Sequence": {"id": "A", "type_id": 0}}, special("[SEP]"),
                     {"Sequence": {"id": "B", "type_id": 1}}, special("[SEP]")],
            "special_tokens": {"[CLS]": {"id": "[CLS]", "ids": [2], "tokens": ["[CLS]"]},
                               "[SEP]": {"id": "[SEP]", "ids": [3], "tokens": ["[SEP]"]}}},
        "decoder": null,
        "model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                  "max_input_chars_per_word": 100, "vocab": vocab}
    })
    .to_string()
}

/// The text path end to end: tab-separated data, the tokenizer of the checkpoint directory, the bert fixture as a
/// frozen encoder (feature extraction), a new head; the encoder comes back bit for bit, the tokenizer is carried.
#[test]
fn bert_feature_extraction_on_tab_separated_text() {
    let t = tempfile::tempdir().unwrap();
    let words = [
        "good", "great", "fine", "nice", "superb", "bad", "awful", "poor", "dull", "weak", "movie", "film", "plot",
        "the", "a", "was", "is", "very", "##ness", "##ly",
    ];
    let enc = t.path().join("encoder");
    std::fs::create_dir_all(&enc).unwrap();
    for f in ["model.safetensors", "config.json"] {
        std::fs::copy(fixture("bert/base").join(f), enc.join(f)).unwrap();
    }
    std::fs::write(enc.join("tokenizer.json"), tiny_tokenizer(&words)).unwrap();
    let mut r = Rng::new(5);
    let mut lines = String::new();
    for _ in 0..240 {
        let pos = r.below(2) == 1;
        let adj = if pos { &words[0..5] } else { &words[5..10] };
        let text = format!("The {} was {} {}", words[10 + r.below(3)], adj[r.below(5)], adj[r.below(5)]);
        lines.push_str(&format!("{}\t{text}\n", if pos { "positive" } else { "negative" }));
    }
    let data = t.path().join("sentiment.tsv");
    std::fs::write(&data, lines).unwrap();
    let out = t.path().join("clf");
    let v = json(&run(&[
        "train",
        "--init",
        enc.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--freeze",
        "all-but-head",
        "--pooling",
        "max",
        "--epochs",
        "30",
        "--lr",
        "0.01",
        "--batch",
        "16",
        "--json",
        "--quiet",
        "-o",
        out.to_str().unwrap(),
    ]));
    assert_eq!(v["feature_extraction"], true);
    assert_eq!(v["classes"], serde_json::json!(["negative", "positive"]));
    assert!(v["test"]["accuracy"].as_f64().unwrap() >= 0.9, "{}", v["test"]);
    let ck = Checkpoint::open(&out).unwrap();
    let base = Checkpoint::open(fixture("bert/base")).unwrap();
    for info in base.infos().iter().filter(|i| i.name != "embeddings.position_ids") {
        assert_eq!(tensor_bytes(&ck, &info.name), tensor_bytes(&base, &info.name), "{}", info.name);
    }
    assert!(out.join("tokenizer.json").is_file());
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        (cfg["model_type"].as_str(), cfg["graft_arch"].as_str(), cfg["pooling"].as_str()),
        (Some("bert"), Some("bert"), Some("max"))
    );
    let e = json(&run(&["eval", out.to_str().unwrap(), "--data", data.to_str().unwrap(), "--json"]));
    assert_eq!(e["accuracy"], v["test"]["accuracy"]);
}

#[test]
fn a_taken_output_is_refused_before_training() {
    let t = tempfile::tempdir().unwrap();
    let data = t.path().join("data");
    separable_idx(&data, 100, 20);
    let out = t.path().join("out");
    let args = |out: &Path| -> Vec<String> {
        ["train", "--arch", "mlp", "--hidden", "8", "--data", data.to_str().unwrap(), "--epochs", "1", "--quiet"]
            .iter()
            .map(|s| s.to_string())
            .chain(["-o".to_string(), out.to_str().unwrap().to_string()])
            .collect()
    };
    let a = args(&out);
    run(&a.iter().map(String::as_str).collect::<Vec<_>>());
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    // Refused up front, before the data is even read (this data path does not exist).
    let missing = t.path().join("no-such-data");
    let again: Vec<String> = a
        .iter()
        .map(|s| if s == data.to_str().unwrap() { missing.to_str().unwrap().to_string() } else { s.clone() })
        .collect();
    let err = fails(&again.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(err.contains("already holds a checkpoint") && err.contains("--force"), "{err}");
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), before);
}

/// `--arch` takes exactly the registry's names, and `--help` shows each with its registry help line.
#[test]
fn arch_values_and_help_come_from_the_registry() {
    use graft::train::models::ARCHS;
    let help = run(&["train", "--help"]);
    for a in ARCHS {
        assert!(help.contains(&format!("- {}:", a.name())), "{} missing from --help:\n{help}", a.name());
        assert!(help.contains(a.about()), "{}'s help line missing from --help", a.name());
    }
    let out = graft().args(["train", "--arch", "gpt2", "--data", "/nonexistent/x"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let names: Vec<&str> = ARCHS.iter().map(|a| a.name()).collect();
    assert!(err.contains(&format!("[possible values: {}]", names.join(", "))), "{err}");
    // A named causal LM needs its checkpoint: refused before the (missing) data is looked at.
    let err = fails(&["train", "--arch", "llama", "--data", "/nonexistent/x"]);
    assert!(err.contains("pass --init DIR"), "{err}");
}
