//! `graft merge`'s output directory as mergekit lays it out: tokenizer, generation config and chat template carried
//! from the base, `config.json` describing the tensors written (dtype, layers, vocabulary), `tokenizer_source`
//! donors (their vocabulary, with rows remapped onto it), `modules:`, `--lenient`, and Hugging Face ids resolved from a local cache. Driven through the binary on
//! `fixtures/llama` (whose base and fine-tunes carry a 128-token WordLevel tokenizer).

use crate::support::{fail, fail_env, fixture, run_ok, run_ok_env, s};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use graft::checkpoint::{Checkpoint, Dtype};

fn write_config(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.display().to_string()
}

fn json(p: impl AsRef<Path>) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(p.as_ref()).unwrap()).unwrap()
}

/// Every tensor's raw bytes, in name order (the header's metadata names the input paths, so files differ).
fn tensors(path: impl AsRef<Path>) -> Vec<(String, Vec<u8>)> {
    let ck = Checkpoint::open(path).unwrap();
    let mut v: Vec<(String, Vec<u8>)> = ck.iter().map(|t| (t.name.to_string(), t.data.to_vec())).collect();
    v.sort();
    v
}

const TOKENIZER_SIDE_FILES: &[&str] =
    &["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"];

fn ta_config(dir: &Path, extra: &str) -> String {
    write_config(
        dir,
        "ta.yml",
        &format!(
            "merge_method: task_arithmetic\nbase_model: {}\nmodels:\n  - model: {}\n    parameters: {{weight: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.5}}\n{extra}",
            s(&fixture("llama/base")),
            s(&fixture("llama/ft_a")),
            s(&fixture("llama/ft_b"))
        ),
    )
}

#[test]
fn default_merge_carries_tokenizer_generation_config_and_chat_template() {
    let d = tempfile::tempdir().unwrap();
    let cfg = ta_config(d.path(), "");
    let out = d.path().join("out");
    run_ok(&["merge", &cfg, "-o", &s(&out)]);
    for f in TOKENIZER_SIDE_FILES.iter().chain(&["generation_config.json"]) {
        assert_eq!(std::fs::read(out.join(f)).unwrap(), std::fs::read(fixture("llama/base").join(f)).unwrap(), "{f}");
    }
    // config.json is the base's, with the written dtype stated in both spellings.
    let mut want = json(fixture("llama/base/config.json"));
    want["dtype"] = "bfloat16".into();
    assert_eq!(json(out.join("config.json")), want);
    // A flag-built merge lays its output out the same way.
    let out2 = d.path().join("flags");
    run_ok(&[
        "merge",
        "--method",
        "task_arithmetic",
        "--base",
        &s(&fixture("llama/base")),
        &s(&fixture("llama/ft_a")),
        &s(&fixture("llama/ft_b")),
        "-o",
        &s(&out2),
    ]);
    for f in TOKENIZER_SIDE_FILES.iter().chain(&["generation_config.json", "config.json"]) {
        assert!(out2.join(f).is_file(), "{f}");
    }
}

#[test]
fn no_copy_tokenizer_keeps_only_the_model_configs() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    run_ok(&["merge", &ta_config(d.path(), ""), "--no-copy-tokenizer", "-o", &s(&out)]);
    for f in TOKENIZER_SIDE_FILES {
        assert!(!out.join(f).exists(), "{f} should not be copied");
    }
    assert!(out.join("config.json").is_file() && out.join("generation_config.json").is_file());
}

#[test]
fn config_states_the_dtype_the_tensors_were_written_in() {
    let d = tempfile::tempdir().unwrap();
    for (extra, name, dtype) in
        [("dtype: float16\n", "float16", Dtype::F16), ("dtype: bfloat16\nout_dtype: float32\n", "float32", Dtype::F32)]
    {
        let out = d.path().join(name);
        run_ok(&["merge", &ta_config(d.path(), extra), "-o", &s(&out)]);
        let ck = Checkpoint::open(&out).unwrap();
        assert!(ck.iter().all(|t| t.dtype == dtype), "{name}: every tensor is written as {dtype:?}");
        let c = json(out.join("config.json"));
        assert_eq!(c["dtype"], name);
        // The base had `torch_dtype`, so it is kept in step.
        assert_eq!(c["torch_dtype"], name);
        assert_eq!(c["vocab_size"], 128);
    }
}

#[test]
fn slices_set_the_layer_count_to_what_was_written() {
    let d = tempfile::tempdir().unwrap();
    let cfg = write_config(
        d.path(),
        "stack.yml",
        &format!(
            "merge_method: passthrough\nslices:\n  - sources:\n      - {{model: {}, layer_range: [0, 2]}}\n  - sources:\n      - {{model: {}, layer_range: [1, 2]}}\n",
            s(&fixture("llama/ft_a")),
            s(&fixture("llama/ft_b"))
        ),
    );
    let out = d.path().join("out");
    run_ok(&["merge", &cfg, "-o", &s(&out)]);
    let layers: BTreeSet<String> = Checkpoint::open(&out)
        .unwrap()
        .iter()
        .filter_map(|t| t.name.split("layers.").nth(1).map(|r| r.split('.').next().unwrap().to_string()))
        .collect();
    assert_eq!(layers.len(), 3, "{layers:?}");
    assert_eq!(json(out.join("config.json"))["num_hidden_layers"], 3);
    assert_eq!(json(fixture("llama/ft_a/config.json"))["num_hidden_layers"], 2);
}

/// A donor model directory: ft_b's tensors, a config that differs from the base's, and `tokenizer_json`.
fn donor(dir: &Path, tokenizer_json: &serde_json::Value) -> PathBuf {
    let donor = dir.join("donor");
    std::fs::create_dir_all(&donor).unwrap();
    std::fs::copy(fixture("llama/ft_b/model.safetensors"), donor.join("model.safetensors")).unwrap();
    let mut c = json(fixture("llama/ft_b/config.json"));
    c["donor_marker"] = true.into();
    std::fs::write(donor.join("config.json"), c.to_string()).unwrap();
    std::fs::write(donor.join("tokenizer.json"), tokenizer_json.to_string()).unwrap();
    donor
}

#[test]
fn donor_tokenizer_source_brings_its_tokenizer_but_not_its_config() {
    let d = tempfile::tempdir().unwrap();
    let mut tok = json(fixture("llama/base/tokenizer.json"));
    tok["normalizer"] = serde_json::Value::Null;
    let donor = donor(d.path(), &tok);
    let out = d.path().join("out");
    run_ok(&["merge", &ta_config(d.path(), &format!("tokenizer_source: {}\n", s(&donor))), "-o", &s(&out)]);
    assert_eq!(json(out.join("tokenizer.json")), tok);
    let c = json(out.join("config.json"));
    assert!(c.get("donor_marker").is_none(), "config.json must be the base's: {c}");
    assert_eq!(c["vocab_size"], 128);
}

#[test]
fn a_donor_tokenizer_larger_than_the_embeddings_gets_rows_for_every_token() {
    let d = tempfile::tempdir().unwrap();
    let extra = |id: u64| {
        let mut tok = json(fixture("llama/base/tokenizer.json"));
        tok["added_tokens"].as_array_mut().unwrap().push(serde_json::json!({
            "id": id, "content": "<extra>", "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": true
        }));
        tok
    };
    // 129 token ids against 128 embedding rows: the rows are remapped onto the donor's vocabulary, and the token no
    // merged model holds gets zeros (mergekit's rule).
    let larger = donor(d.path(), &extra(128));
    let out = d.path().join("out");
    run_ok(&["merge", &ta_config(d.path(), &format!("tokenizer_source: {}\n", s(&larger))), "-o", &s(&out)]);
    assert_eq!(json(out.join("config.json"))["vocab_size"], 129);
    let merged = Checkpoint::open(&out).unwrap();
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let t = merged.tensor(name).unwrap();
        assert_eq!(t.shape[0], 129, "{name}");
        let values = t.to_f32().unwrap();
        let width = t.shape[1];
        assert!(values[128 * width..].iter().all(|&x| x == 0.0), "{name}: row 128");
        assert!(values[..width].iter().any(|&x| x != 0.0), "{name}: row 0");
    }
}

#[test]
fn a_single_module_merges_like_its_slices_and_two_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let slices = format!(
        "slices:\n  - sources:\n      - {{model: {}, layer_range: [0, 2]}}\n      - {{model: {}, layer_range: [0, 2]}}\n",
        s(&fixture("llama/ft_a")),
        s(&fixture("llama/ft_b"))
    );
    let indented: String = slices.lines().map(|l| format!("    {l}\n")).collect();
    let head = format!("merge_method: slerp\nbase_model: {}\nparameters: {{t: 0.3}}\n", s(&fixture("llama/ft_a")));
    let plain = write_config(d.path(), "plain.yml", &format!("{head}{slices}"));
    let module = write_config(d.path(), "module.yml", &format!("{head}modules:\n  default:\n{indented}"));
    let (a, b) = (d.path().join("a"), d.path().join("b"));
    run_ok(&["merge", &plain, "-o", &s(&a)]);
    run_ok(&["merge", &module, "-o", &s(&b)]);
    assert_eq!(tensors(&a), tensors(&b));
    let two = write_config(d.path(), "two.yml", &format!("{head}modules:\n  text:\n{indented}  vision:\n{indented}"));
    let (code, e) = fail(&["merge", &two, "-o", &s(&d.path().join("c"))]);
    assert_eq!(code, 2);
    assert!(e.contains("multi-module") && e.contains("two.yml"), "{e}");
}

#[test]
fn lenient_warns_about_ignored_keys_and_runs() {
    let d = tempfile::tempdir().unwrap();
    let cfg = ta_config(d.path(), "select_topk: 0.5\n");
    let out = d.path().join("out");
    let (code, e) = fail(&["merge", &cfg, "-o", &s(&out)]);
    assert_eq!(code, 2);
    assert!(e.contains("unknown key 'select_topk'"), "{e}");
    let o = run_ok(&["merge", &cfg, "--lenient", "-o", &s(&out)]);
    let err = String::from_utf8(o.stderr).unwrap();
    let warnings: Vec<&str> = err.lines().filter(|l| l.starts_with("warning: ")).collect();
    assert_eq!(warnings.len(), 1, "{err}");
    assert!(warnings[0].starts_with(&format!("warning: {cfg}: unknown key 'select_topk'")), "{err}");
    assert!(out.join("model.safetensors").is_file());
    // A bad value is not an ignored key: still an error.
    let cfg = ta_config(d.path(), "chat_template: chatlm\n");
    assert_eq!(fail(&["merge", &cfg, "--lenient", "-o", &s(&d.path().join("x"))]).0, 2);
}

/// A Hugging Face cache holding `org/llama-base` (refs/main -> a snapshot with the base's files).
fn hub_cache(root: &Path) -> PathBuf {
    let hash = "4f1c2a9e0b7d3c6a5e8f9d0c1b2a3f4e5d6c7b8a";
    let repo = root.join("hub").join("models--org--llama-base");
    let snap = repo.join("snapshots").join(hash);
    std::fs::create_dir_all(&snap).unwrap();
    for e in std::fs::read_dir(fixture("llama/base")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), snap.join(e.file_name())).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), hash).unwrap();
    root.join("hub")
}

#[test]
fn hugging_face_ids_resolve_from_the_local_cache() {
    let d = tempfile::tempdir().unwrap();
    let cache = hub_cache(d.path());
    let models = format!(
        "models:\n  - model: {}\n    parameters: {{weight: 0.5}}\n  - model: {}\n    parameters: {{weight: 0.5}}\n",
        s(&fixture("llama/ft_a")),
        s(&fixture("llama/ft_b"))
    );
    let by_id = write_config(
        d.path(),
        "id.yml",
        &format!("merge_method: task_arithmetic\nbase_model: org/llama-base\n{models}"),
    );
    let by_path = write_config(
        d.path(),
        "path.yml",
        &format!("merge_method: task_arithmetic\nbase_model: {}\n{models}", s(&fixture("llama/base"))),
    );
    let (a, b, c) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
    run_ok(&["merge", &by_path, "-o", &s(&a)]);
    run_ok_env(&["merge", &by_id, "-o", &s(&b)], &[("HF_HUB_CACHE", &cache)]);
    assert_eq!(tensors(&a), tensors(&b));
    assert!(b.join("tokenizer.json").is_file(), "the tokenizer comes from the cached snapshot");
    // HF_HOME/hub is the cache when HF_HUB_CACHE is unset; the flag form resolves ids too.
    run_ok_env(
        &[
            "merge",
            "--method",
            "task_arithmetic",
            "--base",
            "org/llama-base",
            &s(&fixture("llama/ft_a")),
            &s(&fixture("llama/ft_b")),
            "-o",
            &s(&c),
        ],
        &[("HF_HOME", d.path())],
    );
    assert_eq!(tensors(&a).len(), tensors(&c).len());
    // Errors about a model resolved from an id name the id as written (then the snapshot it resolved to).
    let (code, e) = fail_env(
        &["merge", "--method", "linear", "org/llama-base", "org/llama-base", "-o", &s(&d.path().join("z"))],
        &[("HF_HUB_CACHE", &cache)],
    );
    assert_eq!(code, 2, "{e}");
    assert!(e.contains("model org/llama-base (") && e.contains("is listed twice"), "{e}");
    let twice = write_config(
        d.path(),
        "twice.yml",
        "merge_method: linear\nmodels:\n  - model: org/llama-base\n  - model: org/llama-base\n",
    );
    let (code, e) = fail_env(&["merge", &twice, "-o", &s(&d.path().join("z"))], &[("HF_HUB_CACHE", &cache)]);
    assert_eq!(code, 2, "{e}");
    assert!(e.contains("model org/llama-base (") && e.contains("snapshots"), "{e}");

    // Not cached: a usage error naming the id, the cache and the command that fetches it.
    let missing = write_config(
        d.path(),
        "missing.yml",
        &format!("merge_method: task_arithmetic\nbase_model: org/absent\n{models}"),
    );
    let (code, e) = fail_env(&["merge", &missing, "-o", &s(&d.path().join("x"))], &[("HF_HUB_CACHE", &cache)]);
    assert_eq!(code, 2, "{e}");
    assert!(e.contains("'org/absent'") && e.contains("models--org--absent"), "{e}");
    assert!(e.contains("huggingface-cli download org/absent"), "{e}");
    // A local path that does not exist is named, not a bare OS error.
    let nopath = write_config(d.path(), "nopath.yml", "merge_method: linear\nmodels:\n  - model: ./no/such/model\n");
    let (code, e) = fail(&["merge", &nopath, "-o", &s(&d.path().join("y"))]);
    assert_eq!(code, 2, "{e}");
    assert!(e.contains("models[0].model: './no/such/model' does not exist"), "{e}");
}

/// `fixtures/expected/chat_template_chatml/chat_template.jinja` is what `mergekit-yaml` 0.1.5 wrote for the config
/// next to it (the fixtures' own template replaced by `chat_template: chatml`).
#[test]
fn a_named_chat_template_is_written_where_and_as_mergekit_writes_it() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    run_ok(&["merge", &ta_config(d.path(), "chat_template: chatml\n"), "-o", &s(&out)]);
    let want = std::fs::read(fixture("expected/chat_template_chatml/chat_template.jinja")).unwrap();
    assert_eq!(std::fs::read(out.join("chat_template.jinja")).unwrap(), want);
    assert_ne!(std::fs::read(fixture("llama/base/chat_template.jinja")).unwrap(), want, "the base's is replaced");
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(fixture("llama/base/tokenizer.json")).unwrap()
    );
}

#[test]
fn chat_template_auto_takes_the_inputs_most_common_and_literals_and_flags_work() {
    let d = tempfile::tempdir().unwrap();
    // ft_b keeps its template in tokenizer_config.json (the older place) and differs from base's and ft_a's.
    let other = d.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::copy(fixture("llama/ft_b/model.safetensors"), other.join("model.safetensors")).unwrap();
    std::fs::copy(fixture("llama/ft_b/config.json"), other.join("config.json")).unwrap();
    let mut tc = json(fixture("llama/ft_b/tokenizer_config.json"));
    tc["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}".into();
    std::fs::write(other.join("tokenizer_config.json"), tc.to_string()).unwrap();
    let base_template = std::fs::read_to_string(fixture("llama/base/chat_template.jinja")).unwrap();
    let config = |extra: &str| {
        write_config(
            d.path(),
            "auto.yml",
            &format!(
                "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 1.0}}\n  - model: {}\n    parameters: {{weight: 1.0}}\n  - model: {}\n    parameters: {{weight: 1.0}}\n{extra}",
                s(&other),
                s(&fixture("llama/ft_a")),
                s(&fixture("llama/base")),
            ),
        )
    };
    let out = d.path().join("auto");
    run_ok(&["merge", &config("chat_template: auto\n"), "-o", &s(&out)]);
    assert_eq!(std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(), base_template.trim(), "two of three");

    // A literal template from the first model's directory replaces the one in its tokenizer_config.json too.
    let literal = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}";
    let out = d.path().join("literal");
    run_ok(&["merge", &config(""), "--chat-template", literal, "-o", &s(&out)]);
    assert_eq!(std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(), literal);
    assert!(json(out.join("tokenizer_config.json")).get("chat_template").is_none());

    let (code, e) = fail(&["merge", &config("chat_template: chatlm\n"), "-o", &s(&d.path().join("x"))]);
    assert_eq!(code, 2, "{e}");
    assert!(e.contains("chatlm") && e.contains("chatml") && e.contains("auto.yml"), "{e}");
    let (code, e) =
        fail(&["merge", &config("chat_template: chatml\n"), "--no-copy-tokenizer", "-o", &s(&d.path().join("y"))]);
    assert_eq!(code, 2, "{e}");
    assert!(e.contains("--no-copy-tokenizer"), "{e}");
}
