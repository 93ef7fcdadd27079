//! Real-data checks, run where `tools/fetch-data` has filled `$GRAFT_DATA` (default ~/.cache/graft-data):
//! `cargo test --release --test train_real -- --ignored --nocapture`.

use std::path::PathBuf;

fn data_dir() -> PathBuf {
    std::env::var_os("GRAFT_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/graft-data"))
}

fn train(args: &[&str]) -> serde_json::Value {
    let out = crate::support::command(&[]).arg("train").args(args).args(["--json", "--quiet"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
#[ignore = "needs tools/fetch-data fashion-mnist"]
fn fashion_mnist_mlp_reaches_85_percent_in_two_epochs() {
    let d = data_dir().join("fashion-mnist");
    let v = train(&[
        "--arch",
        "mlp",
        "--hidden",
        "256,128",
        "--data",
        d.to_str().unwrap(),
        "--epochs",
        "2",
        "--lr",
        "1e-3",
        "--batch",
        "128",
    ]);
    for e in v["report"]["epochs"].as_array().unwrap() {
        eprintln!(
            "epoch {}: {:.2} s, {:.0} samples/s, val accuracy {}",
            e["epoch"],
            e["time_s"].as_f64().unwrap(),
            e["samples_per_s"].as_f64().unwrap(),
            e["val_accuracy"]
        );
    }
    let acc = v["test"]["accuracy"].as_f64().unwrap();
    eprintln!("Fashion-MNIST MLP test accuracy {acc:.4}");
    assert!(acc >= 0.85, "test accuracy {acc}");
}

#[test]
#[ignore = "needs tools/fetch-data minilm spam-assassin"]
fn minilm_features_classify_spam_assassin() {
    let d = data_dir();
    let v = train(&[
        "--init",
        d.join("minilm-l6").to_str().unwrap(),
        "--data",
        &format!("spam:{}", d.join("spam-assassin").display()),
        "--freeze",
        "all-but-head",
        "--pooling",
        "mean",
        "--epochs",
        "10",
        "--lr",
        "5e-4",
        "--batch",
        "32",
        "--max-len",
        "128",
        "--eval-batch",
        "64",
    ]);
    assert_eq!(v["feature_extraction"], true);
    let acc = v["test"]["accuracy"].as_f64().unwrap();
    eprintln!("SpamAssassin MiniLM mean-pooled features: test accuracy {acc:.4}, f1 macro {}", v["test"]["f1_macro"]);
    assert!(acc >= 0.90, "test accuracy {acc}");
}

/// graft's tokenisation (the `tokenizers` crate on the checkpoint's tokenizer.json, padding off) against ids from
/// Python's `tokenizers` 0.23.3: `Tokenizer.from_file("minilm-l6/tokenizer.json").encode(s).ids`, padding removed.
#[test]
#[ignore = "needs tools/fetch-data minilm"]
fn minilm_tokenizer_matches_python_tokenizers() {
    let path = data_dir().join("minilm-l6").join("tokenizer.json");
    let tok = graft::train::tokenize::Tokenizer::open(&path, 128).unwrap();
    let cases: [(&str, &[u32]); 3] = [
        ("Hello, world!", &[101, 7592, 1010, 2088, 999, 102]),
        (
            "Graft merges checkpoints offline; it's FAST.",
            &[101, 22160, 2102, 13590, 2015, 26520, 2015, 2125, 4179, 1025, 2009, 1005, 1055, 3435, 1012, 102],
        ),
        ("unaffable naïve café 2002-08-21", &[101, 14477, 20961, 3468, 15743, 7668, 2526, 1011, 5511, 1011, 2538, 102]),
    ];
    for (text, want) in cases {
        assert_eq!(tok.encode(text).unwrap(), want, "{text}");
    }
    let short = graft::train::tokenize::Tokenizer::open(&path, 4).unwrap();
    assert_eq!(short.encode("Hello, world!").unwrap(), vec![101, 7592, 1010, 102]);
}
