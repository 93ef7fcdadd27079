//! Causal LMs: graft's llama forward against the plain f64 reference in `common/forward.rs` (per-token
//! log-likelihoods), single-file against sharded loading, `graft eval --data text:` perplexity against the reference
//! on the same windows, thread-count determinism, the text sources (file, JSONL, directory), and one-line errors.

#[path = "common/forward.rs"]
mod forward;

use std::path::{Path, PathBuf};
use std::process::Command;

use forward::Weights;
use graft::train::lm_eval;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama").join(name)
}

fn graft(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_graft")).args(args).output().expect("run graft")
}

/// log p(ids[t+1] | ids[..=t]) from the f64 reference's logits.
fn reference_logprobs(w: &Weights, ids: &[usize]) -> Vec<f64> {
    let logits = forward::llama(w, ids);
    (0..ids.len() - 1)
        .map(|t| {
            let row = &logits[t];
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            row[ids[t + 1]] - lse
        })
        .collect()
}

/// Deterministic token ids in the fixture's vocabulary (128).
fn ids(n: usize, seed: u64) -> Vec<u32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 33) % 128) as u32
        })
        .collect()
}

#[test]
fn per_token_loglikelihoods_equal_the_f64_reference() {
    let model = lm_eval::load_llama(&fixture("base"), &candle_core::Device::Cpu).unwrap();
    let w = Weights::load(&fixture("base"));
    let a = ids(24, 1);
    let b = ids(24, 2);
    let got = lm_eval::token_logprobs(&model, &[&a, &b], 8).unwrap();
    for (window, lp) in [&a, &b].iter().zip(&got) {
        let want = reference_logprobs(&w, &window.iter().map(|&x| x as usize).collect::<Vec<_>>());
        assert_eq!(lp.len(), want.len());
        for (t, (g, r)) in lp.iter().zip(&want).enumerate() {
            assert!((*g as f64 - r).abs() <= 1e-4 * r.abs().max(1.0), "token {t}: graft {g}, reference {r}");
        }
    }
    // Batched and one at a time agree bit for bit (no window sees another).
    let alone = lm_eval::token_logprobs(&model, &[&b], 1).unwrap();
    assert_eq!(alone[0], got[1]);
}

#[test]
fn sharded_checkpoint_scores_as_the_single_file() {
    let single = lm_eval::load_llama(&fixture("base"), &candle_core::Device::Cpu).unwrap();
    let sharded = lm_eval::load_llama(&fixture("base-sharded"), &candle_core::Device::Cpu).unwrap();
    let a = ids(16, 3);
    assert_eq!(
        lm_eval::token_logprobs(&single, &[&a], 1).unwrap(),
        lm_eval::token_logprobs(&sharded, &[&a], 1).unwrap()
    );
}

/// Words of the fixture tokenizer's vocabulary (a whitespace word-level tokenizer).
fn text(words: usize, seed: u64) -> String {
    let tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("base").join("tokenizer.json")).unwrap()).unwrap();
    let mut vocab: Vec<(&String, u64)> =
        tok["model"]["vocab"].as_object().unwrap().iter().map(|(k, v)| (k, v.as_u64().unwrap())).collect();
    vocab.sort_by_key(|(_, id)| *id);
    ids(words, seed).iter().map(|&i| vocab[3 + i as usize % 120].0.as_str()).collect::<Vec<_>>().join(" ")
}

fn eval_json(args: &[&str]) -> serde_json::Value {
    let o = graft(args);
    assert!(o.status.success(), "graft {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn eval_perplexity_equals_the_reference_on_the_same_windows() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.txt");
    std::fs::write(&file, text(70, 5)).unwrap();
    let data = format!("text:{}", file.display());
    let ck = fixture("base");
    let out = eval_json(&["eval", ck.to_str().unwrap(), "--data", &data, "--max-len", "16", "--json"]);

    // The reference: the same tokenizer, consecutive windows of 16 (the last one shorter), mean over predictions.
    let toks =
        lm_eval::tokenize_documents(&ck.join("tokenizer.json"), &[std::fs::read_to_string(&file).unwrap()]).unwrap();
    assert_eq!(toks.len(), 70);
    let w = Weights::load(&ck);
    let (mut sum, mut n) = (0.0, 0usize);
    for win in toks.chunks(16).filter(|c| c.len() >= 2) {
        let lp = reference_logprobs(&w, &win.iter().map(|&x| x as usize).collect::<Vec<_>>());
        sum -= lp.iter().sum::<f64>();
        n += lp.len();
    }
    assert_eq!(out["tokens"], 70);
    assert_eq!(out["windows"], 5);
    assert_eq!(out["predicted_tokens"], n as u64);
    let nll = out["nll"].as_f64().unwrap();
    assert!((nll - sum / n as f64).abs() < 1e-5, "graft {nll}, reference {}", sum / n as f64);
    assert!((out["perplexity"].as_f64().unwrap() - nll.exp()).abs() < 1e-9);

    // Any thread count, bit for bit.
    let one =
        eval_json(&["--threads", "1", "eval", ck.to_str().unwrap(), "--data", &data, "--max-len", "16", "--json"]);
    assert_eq!(one["nll"], out["nll"]);

    // A results line for graft report.
    let results = dir.path().join("r.jsonl");
    let o = graft(&[
        "eval",
        ck.to_str().unwrap(),
        "--data",
        &data,
        "--max-len",
        "16",
        "--results",
        results.to_str().unwrap(),
    ]);
    assert!(o.status.success());
    let line: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&results).unwrap().trim()).unwrap();
    assert_eq!(line["kind"], "eval");
    assert_eq!(line["metrics"]["perplexity"], out["perplexity"]);
    let report_dir = dir.path().join("report");
    let report = graft(&["report", results.to_str().unwrap(), "--output", report_dir.to_str().unwrap()]);
    assert!(report.status.success(), "report: {}", String::from_utf8_lossy(&report.stderr));
}

#[test]
fn jsonl_and_directory_sources_are_documents_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (text(20, 7), text(30, 8));
    let docs = dir.path().join("docs");
    std::fs::create_dir(&docs).unwrap();
    std::fs::write(docs.join("1.txt"), &a).unwrap();
    std::fs::write(docs.join("2.txt"), &b).unwrap();
    std::fs::write(docs.join("ignored.md"), "not read").unwrap();
    let jsonl = dir.path().join("d.jsonl");
    std::fs::write(&jsonl, format!("{}\n\n{}\n", serde_json::json!({"text": a}), serde_json::json!({"text": b})))
        .unwrap();
    let ck = fixture("base");
    let run = |p: &Path| {
        eval_json(&[
            "eval",
            ck.to_str().unwrap(),
            "--data",
            &format!("text:{}", p.display()),
            "--max-len",
            "8",
            "--json",
        ])
    };
    let (d, j) = (run(&docs), run(&jsonl));
    assert_eq!((d["documents"].clone(), d["tokens"].clone()), (serde_json::json!(2), serde_json::json!(50)));
    assert_eq!(d["nll"], j["nll"]);
}

fn one_line_error(args: &[&str], code: i32) -> String {
    let o = graft(args);
    assert_eq!(o.status.code(), Some(code), "graft {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    err
}

#[test]
fn bad_text_and_configs_give_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let ck = fixture("base");
    let ck = ck.to_str().unwrap();
    let missing = dir.path().join("nope.txt");
    let e = one_line_error(&["eval", ck, "--data", &format!("text:{}", missing.display())], 2);
    assert!(e.contains("nope.txt"), "{e}");

    let bad = dir.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"the a\"}\n{\"body\": 1}\n").unwrap();
    let e = one_line_error(&["eval", ck, "--data", &format!("text:{}", bad.display())], 1);
    assert!(e.contains("bad.jsonl") && e.contains("line 2") && e.contains("\"text\""), "{e}");

    let short = dir.path().join("short.txt");
    std::fs::write(&short, "the").unwrap();
    let e = one_line_error(&["eval", ck, "--data", &format!("text:{}", short.display())], 2);
    assert!(e.contains("at least 2"), "{e}");

    // A config graft cannot honour is named, with the file.
    let model = dir.path().join("m");
    std::fs::create_dir(&model).unwrap();
    for f in ["model.safetensors", "tokenizer.json"] {
        std::fs::copy(fixture("base").join(f), model.join(f)).unwrap();
    }
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("base").join("config.json")).unwrap()).unwrap();
    cfg["rope_scaling"] = serde_json::json!({"rope_type": "yarn", "factor": 4.0});
    std::fs::write(model.join("config.json"), cfg.to_string()).unwrap();
    let e = one_line_error(&["eval", model.to_str().unwrap(), "--data", &format!("text:{}", short.display())], 1);
    assert!(e.contains("config.json") && e.contains("yarn"), "{e}");
}
