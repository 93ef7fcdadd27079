//! Real mergekit configs (`tests/fixtures/mergekit-corpus/`, collected from public repositories, verbatim) run
//! through `graft merge` on tiny stand-in checkpoints: every model reference in a config is pointed at a Llama-shaped
//! stand-in with the fixture tokenizer and as many layers as the config's `layer_range`s need. Hugging Face ids
//! (`org/name`, `org/name@revision`) go into a Hugging Face cache built for the config (`HF_HUB_CACHE`), relative
//! paths are created in the config's working directory, and absolute paths (which cannot be created) are the only
//! rewrite: their leading `/` is dropped in the working copy so they become relative paths there.
//!
//! The test prints the share graft accepts and graft's one-line reason for each refused config, and asserts that
//! the accepted set equals `ACCEPTED` beside the corpus (a regression, or a newly accepted config, fails until the
//! list is updated). An accepted config must have written a complete output directory (weights, `config.json`,
//! tokenizer); no config may make graft panic. With `GRAFT_CORPUS_DIR=DIR` the working directories are built there
//! and kept, with a `manifest.tsv` (config, working copy, graft's verdict and reason) that `tools/mergekit-corpus`
//! reads to run mergekit on the same stand-ins (from `mergekit-NAME`, a copy naming the cached snapshot directories
//! instead of the ids: mergekit 0.1.5 lists an id's files on the Hub even when they are cached).

use crate::support::st;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use half::bf16;
use serde::Deserialize;
use yaml_serde::Value as Yaml;

const CORPUS: &str = "tests/fixtures/mergekit-corpus";

/// The stand-ins' shape: the fixture tokenizer's 128 tokens, tiny widths.
const VOCAB: usize = 128;
const HIDDEN: usize = 16;
const HEADS: usize = 2;
const KV_HEADS: usize = 2;
const INTERMEDIATE: usize = 32;
/// Layers of a stand-in for a config without any `layer_range`.
const DEFAULT_LAYERS: usize = 4;

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A deterministic value in [-1, 1) from a seed (splitmix64), so stand-ins are the same on every run.
fn unit(mut x: u64) -> f32 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
}

/// Stand-in checkpoints by (layers, variant), each written once and linked wherever a config needs it. Variant 0 is
/// a "base"; the others are it plus a small perturbation of their own, like fine-tunes of one base.
struct StandIns {
    dir: PathBuf,
    made: BTreeSet<(usize, usize)>,
}

impl StandIns {
    fn get(&mut self, layers: usize, variant: usize) -> PathBuf {
        let dir = self.dir.join(format!("llama-{layers}l-v{variant}"));
        if self.made.insert((layers, variant)) {
            write_standin(&dir, layers, variant);
        }
        dir
    }
}

fn write_standin(dir: &Path, layers: usize, variant: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let head_dim = HIDDEN / HEADS;
    let mut shapes: Vec<(String, Vec<usize>)> = vec![("model.embed_tokens.weight".into(), vec![VOCAB, HIDDEN])];
    for l in 0..layers {
        let p = format!("model.layers.{l}");
        shapes.push((format!("{p}.input_layernorm.weight"), vec![HIDDEN]));
        shapes.push((format!("{p}.self_attn.q_proj.weight"), vec![HEADS * head_dim, HIDDEN]));
        shapes.push((format!("{p}.self_attn.k_proj.weight"), vec![KV_HEADS * head_dim, HIDDEN]));
        shapes.push((format!("{p}.self_attn.v_proj.weight"), vec![KV_HEADS * head_dim, HIDDEN]));
        shapes.push((format!("{p}.self_attn.o_proj.weight"), vec![HIDDEN, HEADS * head_dim]));
        shapes.push((format!("{p}.post_attention_layernorm.weight"), vec![HIDDEN]));
        shapes.push((format!("{p}.mlp.gate_proj.weight"), vec![INTERMEDIATE, HIDDEN]));
        shapes.push((format!("{p}.mlp.up_proj.weight"), vec![INTERMEDIATE, HIDDEN]));
        shapes.push((format!("{p}.mlp.down_proj.weight"), vec![HIDDEN, INTERMEDIATE]));
    }
    shapes.push(("model.norm.weight".into(), vec![HIDDEN]));
    shapes.push(("lm_head.weight".into(), vec![VOCAB, HIDDEN]));
    let tensors: Vec<st::T> = shapes
        .into_iter()
        .enumerate()
        .map(|(ti, (name, shape))| {
            let n: usize = shape.iter().product();
            let norm = shape.len() == 1;
            let data = (0..n)
                .flat_map(|j| {
                    let seed = ((ti as u64) << 32) | j as u64;
                    let base = if norm { 1.0 + 0.05 * unit(seed) } else { 0.2 * unit(seed) };
                    let delta = if variant == 0 { 0.0 } else { 0.02 * unit(seed ^ ((variant as u64) << 56)) };
                    bf16::from_f32(base + delta).to_le_bytes()
                })
                .collect();
            st::T { name: Box::leak(name.into_boxed_str()), dtype: "BF16", shape, data }
        })
        .collect();
    st::write_st(&dir.join("model.safetensors"), &tensors);
    let config = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": head_dim,
        "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": layers,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": false,
        "torch_dtype": "bfloat16"
    });
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    let fixture = manifest_dir().join("fixtures/llama/base");
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        std::fs::copy(fixture.join(f), dir.join(f)).unwrap();
    }
}

/// The YAML documents of a config, or None when it is not valid YAML (graft must then say so).
fn documents(text: &str) -> Option<Vec<Yaml>> {
    yaml_serde::Deserializer::from_str(text).map(Yaml::deserialize).collect::<Result<Vec<_>, _>>().ok()
}

/// Model references in first-appearance order: the values of `model`, `base_model`, `tokenizer_source` and a
/// tokenizer's `source` (not `base`/`union`), anywhere in the documents, except the names of the file's own stages
/// (`name:` of a multi-document file), which are merges, not models. A `+adapter` suffix is kept on the model.
fn references(docs: &[Yaml]) -> Vec<String> {
    fn walk(v: &Yaml, out: &mut Vec<String>) {
        match v {
            Yaml::Mapping(m) => {
                for (k, val) in m {
                    let key = k.as_str().unwrap_or("");
                    let tokenizer_key = matches!(key, "tokenizer_source" | "source");
                    if let (true, Some(s)) = (tokenizer_key || matches!(key, "model" | "base_model"), val.as_str()) {
                        let keyword = tokenizer_key && matches!(s, "base" | "union");
                        if !keyword && !s.is_empty() && !out.iter().any(|o| o == s) {
                            out.push(s.to_string());
                        }
                    }
                    walk(val, out);
                }
            }
            Yaml::Sequence(s) => s.iter().for_each(|x| walk(x, out)),
            Yaml::Tagged(t) => walk(&t.value, out),
            _ => {}
        }
    }
    let stages: Vec<&str> = docs.iter().filter_map(|d| d.get("name").and_then(Yaml::as_str)).collect();
    let mut out = Vec::new();
    docs.iter().for_each(|d| walk(d, &mut out));
    out.retain(|r| !stages.contains(&r.as_str()));
    out
}

/// Layers the stand-ins need: the largest end of any `layer_range`.
fn layers_needed(docs: &[Yaml]) -> usize {
    fn walk(v: &Yaml, most: &mut usize) {
        match v {
            Yaml::Mapping(m) => {
                for (k, val) in m {
                    if k.as_str() == Some("layer_range") {
                        if let Some(end) = val.as_sequence().and_then(|s| s.get(1)).and_then(Yaml::as_u64) {
                            *most = (*most).max(end as usize);
                        }
                    }
                    walk(val, most);
                }
            }
            Yaml::Sequence(s) => s.iter().for_each(|x| walk(x, most)),
            _ => {}
        }
    }
    let mut most = 0;
    docs.iter().for_each(|d| walk(d, &mut most));
    if most == 0 {
        DEFAULT_LAYERS
    } else {
        most
    }
}

/// huggingface_hub's id shape (`org/name`, optional `@revision`), as `graft::hub` reads it.
fn hub_id(r: &str) -> Option<(String, String)> {
    let (repo, rev) = r.split_once('@').unwrap_or((r, "main"));
    let (org, name) = repo.split_once('/')?;
    let ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with(['.', '-'])
            && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    };
    (ok(org) && ok(name) && !rev.is_empty()).then(|| (format!("{org}--{name}"), rev.to_string()))
}

fn link(target: &Path, at: &Path) {
    if at.symlink_metadata().is_ok() {
        return;
    }
    std::fs::create_dir_all(at.parent().unwrap()).unwrap();
    std::os::unix::fs::symlink(target, at).unwrap();
}

/// Where a reference was placed.
enum Placed {
    /// In the cache, at this snapshot directory (relative to the working directory).
    Hub(String),
    /// As a local path: the config's own text, or (for an absolute path) the relative path used instead.
    Local(Option<String>),
}

/// Points `reference` at `standin` in the working directory `work` (local paths) or its cache `work/hub` (ids).
fn place(reference: &str, standin: &Path, work: &Path) -> Placed {
    let model = reference.split('+').next().unwrap();
    if let Some((dir, rev)) = hub_id(model) {
        // A fixed fake commit hash per revision, one snapshot each.
        let hash = format!("{:040x}", rev.bytes().fold(7u128, |h, b| h.wrapping_mul(131).wrapping_add(b as u128)));
        let repo = format!("hub/models--{dir}");
        std::fs::create_dir_all(work.join(&repo).join("refs")).unwrap();
        std::fs::write(work.join(&repo).join("refs").join(&rev), &hash).unwrap();
        let snapshot = format!("{repo}/snapshots/{hash}");
        link(standin, &work.join(&snapshot));
        return Placed::Hub(snapshot);
    }
    let relative = model.trim_start_matches('/');
    link(standin, &work.join(relative));
    Placed::Local((relative != model).then(|| relative.to_string()))
}

struct Outcome {
    accepted: bool,
    /// Accepted only with `--lenient` (the default run's refusal named keys mergekit ignores).
    lenient: bool,
    reason: String,
}

impl Outcome {
    /// The verdict as `ACCEPTED` lists it: the name, with ` --lenient` when only that run merged it.
    fn listed(&self, name: &str) -> Option<String> {
        match (self.accepted, self.lenient) {
            (false, _) => None,
            (true, false) => Some(name.to_string()),
            (true, true) => Some(format!("{name} --lenient")),
        }
    }
}

fn complete_output(out: &Path) -> bool {
    let weights = out.join("model.safetensors").is_file() || out.join("model.safetensors.index.json").is_file();
    weights && out.join("config.json").is_file() && out.join("tokenizer.json").is_file()
}

/// Runs `graft merge` on the working copy; when it refuses, once more with `--lenient`.
fn run_graft(config: &Path, work: &Path) -> Outcome {
    let strict = run_graft_once(config, work, false);
    if strict.accepted {
        return strict;
    }
    let lenient = run_graft_once(config, work, true);
    Outcome { lenient: lenient.accepted, ..if lenient.accepted { lenient } else { strict } }
}

fn run_graft_once(config: &Path, work: &Path, lenient: bool) -> Outcome {
    let out = work.join("out");
    let _ = std::fs::remove_dir_all(&out);
    let mut args = vec!["merge", config.file_name().unwrap().to_str().unwrap(), "-o", "out", "--threads", "1"];
    if lenient {
        args.push("--lenient");
    }
    let run = crate::support::command(&[])
        .current_dir(work)
        .env("HF_HUB_CACHE", work.join("hub"))
        .env_remove("HF_HOME")
        .args(&args)
        .output()
        .expect("graft runs");
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_ne!(run.status.code(), Some(101), "{}: graft panicked:\n{stderr}", config.display());
    if run.status.success() {
        assert!(complete_output(&out), "{}: exit 0 but the output directory is incomplete", config.display());
        // With --lenient, the reason is the first warning: what the default run refused.
        let warning = stderr.lines().find(|l| l.contains("warning")).unwrap_or("").to_string();
        return Outcome { accepted: true, lenient, reason: warning };
    }
    let reason = stderr.lines().find(|l| !l.trim().is_empty()).unwrap_or("(no message)").to_string();
    Outcome { accepted: false, lenient, reason }
}

#[test]
fn real_mergekit_configs_on_standins() {
    let corpus = manifest_dir().join(CORPUS);
    let mut configs: Vec<PathBuf> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yml" | "yaml")))
        .collect();
    configs.sort();
    assert!(configs.len() >= 60, "the corpus has {} configs", configs.len());

    let keep = std::env::var_os("GRAFT_CORPUS_DIR").map(PathBuf::from);
    let root = keep.clone().unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mergekit-corpus"));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let mut standins = StandIns { dir: root.join("standins"), made: BTreeSet::new() };

    let mut results: BTreeMap<String, Outcome> = BTreeMap::new();
    let mut manifest = String::from("config\tworking_copy\tdocuments\tgraft\treason\n");
    for config in &configs {
        let name = config.file_name().unwrap().to_str().unwrap().to_string();
        let work = root.join("work").join(config.file_stem().unwrap());
        std::fs::create_dir_all(&work).unwrap();
        let mut text = std::fs::read_to_string(config).unwrap();
        let docs = documents(&text).unwrap_or_default();
        let layers = layers_needed(&docs);
        // mergekit 0.1.5 asks the Hub for an id's file list even when it is cached, so its copy names the cached
        // snapshot directories instead (the same files); longest ids first, so `org/name@rev` goes before `org/name`.
        let mut snapshots: Vec<(String, String)> = Vec::new();
        for (variant, reference) in references(&docs).iter().enumerate() {
            let standin = standins.get(layers, variant);
            let model = reference.split('+').next().unwrap().to_string();
            match place(reference, &standin, &work) {
                Placed::Hub(snapshot) => snapshots.push((model, snapshot)),
                Placed::Local(Some(relative)) => text = text.replace(&model, &relative),
                Placed::Local(None) => {}
            }
        }
        let copy = work.join(&name);
        std::fs::write(&copy, &text).unwrap();
        snapshots.sort_by_key(|(id, _)| std::cmp::Reverse(id.len()));
        let for_mergekit = snapshots.iter().fold(text.clone(), |t, (id, snap)| t.replace(id, snap));
        std::fs::write(work.join(format!("mergekit-{name}")), for_mergekit).unwrap();
        let outcome = run_graft(&copy, &work);
        manifest.push_str(&format!(
            "{name}\t{}\t{}\t{}\t{}\n",
            copy.display(),
            docs.len(),
            match (outcome.accepted, outcome.lenient) {
                (true, false) => "accepted",
                (true, true) => "accepted --lenient",
                _ => "refused",
            },
            outcome.reason
        ));
        let _ = std::fs::remove_dir_all(work.join("out"));
        results.insert(name, outcome);
    }
    std::fs::write(root.join("manifest.tsv"), &manifest).unwrap();

    let accepted: BTreeSet<String> = results.iter().filter_map(|(n, o)| o.listed(n)).collect();
    let strict = results.values().filter(|o| o.accepted && !o.lenient).count();
    let share = |n: usize| format!("{n} of {} ({:.0}%)", results.len(), 100.0 * n as f64 / results.len() as f64);
    println!("graft merge accepts {} real configs as written, {} with --lenient", share(strict), share(accepted.len()));
    for (name, o) in results.iter().filter(|(_, o)| o.lenient) {
        println!("accepted with --lenient only: {name}: {}", o.reason);
    }
    for (name, o) in results.iter().filter(|(_, o)| !o.accepted) {
        println!("refused {name}: {}", o.reason);
    }
    if keep.is_none() {
        let _ = std::fs::remove_dir_all(&root);
    }

    let listed = std::fs::read_to_string(corpus.join("ACCEPTED")).unwrap();
    let expected: BTreeSet<String> =
        listed.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect();
    let newly: Vec<_> = accepted.difference(&expected).collect();
    let lost: Vec<_> = expected
        .difference(&accepted)
        .map(|l| (l, results.get(l.split(' ').next().unwrap()).map(|o| o.reason.as_str())))
        .collect();
    assert!(
        newly.is_empty() && lost.is_empty(),
        "accepted set changed; now accepted but not in ACCEPTED: {newly:?}; in ACCEPTED but refused: {lost:?}"
    );
}
