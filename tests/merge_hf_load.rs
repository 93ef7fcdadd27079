//! A `graft merge` output directory loads with transformers (model and tokenizer, config dtype equal to the
//! tensors', a finite forward pass): `tools/check-hf-load` on a plain TIES merge written as float16 and on a
//! `tokenizer_source: union` merge of fixtures whose tokenizers differ (132 tokens), plus a copy of the plain merge
//! whose config.json names the wrong dtype, which the tool must reject.
//!
//! Needs Python with transformers, torch and safetensors (`GRAFT_PYTHON`, default /work/venv/bin/python) and takes
//! tens of seconds, so it is ignored by default: `cargo test --release --test merge_hf_load -- --ignored`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn fx(p: &str) -> String {
    crate::support::fixture(p).display().to_string()
}

fn merge(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let config = dir.join(format!("{name}.yml"));
    std::fs::write(&config, yaml).unwrap();
    let out = dir.join(name);
    let o = crate::support::command(&[]).arg("merge").arg(&config).arg("-o").arg(&out).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    out
}

fn check(dirs: &[&Path]) -> std::process::Output {
    Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/check-hf-load")).args(dirs).output().unwrap()
}

#[test]
#[ignore = "needs Python with transformers and torch (GRAFT_PYTHON); slow"]
fn merged_outputs_load_with_transformers() {
    let python = std::env::var("GRAFT_PYTHON").unwrap_or_else(|_| "/work/venv/bin/python".into());
    let importable = Command::new(&python).args(["-c", "import transformers, torch, safetensors"]).status();
    if !importable.is_ok_and(|s| s.success()) {
        eprintln!("skipped: {python} cannot import transformers, torch and safetensors (set GRAFT_PYTHON)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let plain = merge(
        tmp.path(),
        "plain",
        &format!(
            "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {{weight: 0.6, density: 0.5}}\n\
             \x20 - model: {b}\n    parameters: {{weight: 0.4, density: 0.5}}\ndtype: float16\n",
            base = fx("llama/base"),
            a = fx("llama/ft_a"),
            b = fx("llama/ft_b")
        ),
    );
    let union = merge(
        tmp.path(),
        "union",
        &format!(
            "merge_method: linear\nbase_model: {base}\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n\
             \x20 - model: {a}\n    parameters: {{weight: 0.3}}\n  - model: {b}\n    parameters: {{weight: 0.2}}\n\
             dtype: bfloat16\ntokenizer_source: union\n",
            base = fx("llama/base"),
            a = fx("llama-vocab/donor_a"),
            b = fx("llama-vocab/donor_b")
        ),
    );
    let o = check(&[&plain, &union]);
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{stdout}{}", String::from_utf8_lossy(&o.stderr));
    assert!(stdout.contains("torch.float16") && stdout.contains("128 embedding rows"), "{stdout}");
    assert!(stdout.contains("torch.bfloat16") && stdout.contains("with 132 tokens, 132 embedding rows"), "{stdout}");

    // The tool is not a rubber stamp: a config.json naming another dtype than the tensors' fails it.
    let bad = tmp.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    for f in std::fs::read_dir(&plain).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, bad.join(f.file_name().unwrap())).unwrap();
    }
    let config = std::fs::read_to_string(bad.join("config.json")).unwrap();
    std::fs::write(bad.join("config.json"), config.replace("\"float16\"", "\"bfloat16\"")).unwrap();
    let o = check(&[&bad]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("the tensors are torch.float16"));
}
