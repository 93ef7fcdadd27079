//! Output vocabularies (`tokenizer_source: base | union | <model>`, the `tokenizer:` block): graft's union merge of fixtures whose
//! tokenizers differ against mergekit's own output (fixtures/expected/union_llama, made by
//! tools/mergekit_vocab_parity.py), and against a plain f64 reference of mergekit's row rule written here; the
//! output tokenizer loads and encodes with the output's ids; per-token sources, `force` and padding; identical
//! tokenizers leave the merge bit for bit as it was; `tokenizer_source: <model>` equals the block form and
//! mergekit's output (fixtures/expected/donor_llama) and, like
//! `tokenizer_source: base`, puts each token's merged row at the output's id for it; embeddings padded past the
//! tokenizer stay as they are when no row moves.

use crate::support::{fixture, graft, s};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use graft::checkpoint::Checkpoint;

const VOCAB_TENSORS: [&str; 2] = ["model.embed_tokens.weight", "lm_head.weight"];

fn merge(dir: &Path, yaml: &str) -> PathBuf {
    let cfg = dir.join("c.yml");
    std::fs::write(&cfg, yaml).unwrap();
    let out = dir.join("out");
    let o = graft(&["merge", &s(&cfg), "-o", &s(&out)]);
    assert!(o.status.success(), "graft merge failed: {}", String::from_utf8_lossy(&o.stderr));
    out
}

/// token -> id of the tokenizer.json in `dir`, restricted to ids below its config's vocab_size when given.
fn vocab(dir: &Path) -> HashMap<String, usize> {
    let t = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    t.get_vocab(true).into_iter().map(|(k, v)| (k, v as usize)).collect()
}

struct Model {
    vocab: HashMap<String, usize>,
    /// name -> (rows, width, values)
    rows: HashMap<String, (usize, usize, Vec<f64>)>,
}

impl Model {
    fn load(dir: &Path) -> Model {
        let ck = Checkpoint::open(dir).unwrap();
        let rows = VOCAB_TENSORS
            .iter()
            .map(|n| {
                let t = ck.tensor(n).unwrap();
                let v = t.to_f32().unwrap().into_iter().map(f64::from).collect();
                (n.to_string(), (t.shape[0], t.shape[1], v))
            })
            .collect();
        Model { vocab: vocab(dir), rows }
    }

    fn row(&self, tensor: &str, id: usize) -> Vec<f64> {
        let (_, w, v) = &self.rows[tensor];
        v[id * w..(id + 1) * w].to_vec()
    }

    fn token_row(&self, tensor: &str, token: &str) -> Option<Vec<f64>> {
        self.vocab.get(token).map(|&i| self.row(tensor, i))
    }
}

fn mean(rows: &[Vec<f64>]) -> Vec<f64> {
    let mut m = vec![0.0; rows[0].len()];
    for r in rows {
        m.iter_mut().zip(r).for_each(|(a, b)| *a += b / rows.len() as f64);
    }
    m
}

fn weighted(rows: &[Vec<f64>], weights: &[f64]) -> Vec<f64> {
    let total: f64 = weights.iter().sum();
    let mut m = vec![0.0; rows[0].len()];
    for (r, w) in rows.iter().zip(weights) {
        m.iter_mut().zip(r).for_each(|(a, b)| *a += b * w / total);
    }
    m
}

fn max_diff(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

fn union_config() -> String {
    format!(
        "merge_method: linear\nbase_model: {b}\nmodels:\n  - model: {b}\n    parameters: {{weight: 0.5}}\n  - model: {a}\n    \
         parameters: {{weight: 0.3}}\n  - model: {c}\n    parameters: {{weight: 0.2}}\ndtype: float32\n",
        b = s(&fixture("llama/base")),
        a = s(&fixture("llama-vocab/donor_a")),
        c = s(&fixture("llama-vocab/donor_b")),
    )
}

const WEIGHTS: [f64; 3] = [0.5, 0.3, 0.2];

fn inputs() -> Vec<Model> {
    ["llama/base", "llama-vocab/donor_a", "llama-vocab/donor_b"].iter().map(|p| Model::load(&fixture(p))).collect()
}

/// mergekit's rule for one model's row of a token it lacks (no `tokens:` settings): one holder's row, the base's
/// (model 0) among several, else the mean of the holders'.
fn default_row(models: &[Model], tensor: &str, token: &str) -> Vec<f64> {
    let held: Vec<(usize, Vec<f64>)> =
        models.iter().enumerate().filter_map(|(i, m)| m.token_row(tensor, token).map(|r| (i, r))).collect();
    match held.as_slice() {
        [] => panic!("no model holds {token}"),
        [(_, r)] => r.clone(),
        _ if held[0].0 == 0 => held[0].1.clone(),
        _ => mean(&held.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>()),
    }
}

#[test]
fn union_merge_matches_mergekit_and_the_row_rule() {
    let tmp = tempfile::tempdir().unwrap();
    let out = merge(tmp.path(), &format!("{}tokenizer_source: union\n", union_config()));
    let models = inputs();
    let got = Model::load(&out);
    let expected = Model::load(&fixture("expected/union_llama"));

    // The same vocabulary as mergekit's; graft numbers the new ordinary tokens in model then id order (mergekit in
    // hash order), the added token after them.
    let mut ours: Vec<_> = got.vocab.keys().cloned().collect();
    let mut theirs: Vec<_> = expected.vocab.keys().cloned().collect();
    ours.sort();
    theirs.sort();
    assert_eq!(ours, theirs);
    assert_eq!(got.vocab.len(), 132);
    for (t, id) in [("the", 3), ("a", 4), ("graft", 128), ("merge", 129), ("vocab", 130), ("<|im_start|>", 131)] {
        assert_eq!(got.vocab[t], id, "{t}");
    }
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 132);

    for tensor in VOCAB_TENSORS {
        assert_eq!(got.rows[tensor].0, 132, "{tensor} rows");
        let mut worst_mergekit = 0f64;
        let mut worst_reference = 0f64;
        for (token, &id) in &got.vocab {
            let row = got.row(tensor, id);
            worst_mergekit = worst_mergekit.max(max_diff(&row, &expected.token_row(tensor, token).unwrap()));
            let inputs: Vec<Vec<f64>> = models
                .iter()
                .map(|m| m.token_row(tensor, token).unwrap_or_else(|| default_row(&models, tensor, token)))
                .collect();
            worst_reference = worst_reference.max(max_diff(&row, &weighted(&inputs, &WEIGHTS)));
        }
        // Both compute the linear merge in f32 in the same order; the reference in f64 (a few f32 ulps away).
        assert_eq!(worst_mergekit, 0.0, "{tensor}: bit for bit as mergekit wrote it");
        assert!(worst_reference <= 1e-7, "{tensor}: {worst_reference} from the f64 reference");
    }
    // Every other tensor is as mergekit wrote it too.
    let (a, b) = (Checkpoint::open(&out).unwrap(), Checkpoint::open(fixture("expected/union_llama")).unwrap());
    for t in b.iter().filter(|t| !VOCAB_TENSORS.contains(&t.name)) {
        let (x, y) = (t.to_f32().unwrap(), a.tensor(t.name).unwrap().to_f32().unwrap());
        assert_eq!(x, y, "{}", t.name);
    }

    // The output tokenizer loads and encodes with the output's ids.
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    let ids = tok.encode("the graft merge vocab <|im_start|> a", false).unwrap().get_ids().to_vec();
    assert_eq!(ids, [3, 128, 129, 130, 131, 4]);
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["eos_token"], "</s>", "the base's tokenizer_config.json");
}

#[test]
fn token_sources_force_and_padding() {
    let tmp = tempfile::tempdir().unwrap();
    let base = s(&fixture("llama/base"));
    let b = s(&fixture("llama-vocab/donor_b"));
    let yaml = format!(
        "{}tokenizer:\n  source: union\n  pad_to_multiple_of: 8\n  tokens:\n    the:\n      source: {{kind: model_token, \
         model: {b}, token: a}}\n      force: true\n    <|im_start|>: {{source: {{kind: zero}}}}\n    <new>: {{source: \
         {{kind: model_token, model: {base}, token_id: 5}}}}\n",
        union_config()
    );
    let out = merge(tmp.path(), &yaml);
    let models = inputs();
    let got = Model::load(&out);
    assert_eq!(got.vocab.len(), 133);
    assert_eq!(got.vocab["<new>"], 132);
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 136);
    for tensor in VOCAB_TENSORS {
        assert_eq!(got.rows[tensor].0, 136);
        // Each model's remapped rows, by the configured sources, then by mergekit's rule.
        let remapped: Vec<Vec<Vec<f64>>> = models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let mut rows = vec![Vec::new(); 133];
                for (token, &id) in &got.vocab {
                    rows[id] = match (token.as_str(), m.token_row(tensor, token)) {
                        ("the", _) => models[2].token_row(tensor, "a").unwrap(),
                        (_, Some(r)) => r,
                        ("<|im_start|>", None) => vec![0.0; 32],
                        ("<new>", None) => models[0].row(tensor, 5),
                        (_, None) => default_row(&models, tensor, token),
                    };
                }
                let pad = mean(&rows);
                rows.extend(std::iter::repeat_n(pad, 3));
                assert_eq!(rows.len(), 136, "model {i}");
                rows
            })
            .collect();
        let mut worst = 0f64;
        for id in 0..136 {
            let inputs: Vec<Vec<f64>> = remapped.iter().map(|r| r[id].clone()).collect();
            worst = worst.max(max_diff(&got.row(tensor, id), &weighted(&inputs, &WEIGHTS)));
        }
        assert!(worst <= 1e-7, "{tensor}: {worst}");
    }
}

#[test]
fn identical_tokenizers_leave_the_merge_unchanged() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = format!(
        "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 0.4}}\n  - model: {}\n    parameters: \
         {{weight: 0.6}}\n",
        s(&fixture("llama/ft_a")),
        s(&fixture("llama/ft_b"))
    );
    let plain = merge(&tmp.path().join("p").tap_mkdir(), &yaml);
    let union = merge(&tmp.path().join("u").tap_mkdir(), &format!("{yaml}tokenizer_source: union\n"));
    let bytes = |p: &Path| {
        let ck = Checkpoint::open(p).unwrap();
        ck.iter().map(|t| (t.name.to_string(), t.data.to_vec())).collect::<Vec<_>>()
    };
    assert_eq!(bytes(&plain), bytes(&union));
    assert_eq!(vocab(&union), vocab(&fixture("llama/ft_a")));
}

/// Every tensor's name and raw bytes.
fn tensor_bytes(p: &Path) -> Vec<(String, Vec<u8>)> {
    let ck = Checkpoint::open(p).unwrap();
    ck.iter().map(|t| (t.name.to_string(), t.data.to_vec())).collect()
}

/// The linear merge's rows of `got` checked by token against an f64 reference: each model's row for the token, or
/// mergekit's default for a model lacking it, weighted. Returns the worst difference over both vocabulary tensors.
fn worst_by_token(got: &Model, models: &[Model]) -> f64 {
    let mut worst = 0f64;
    for tensor in VOCAB_TENSORS {
        for (token, &id) in &got.vocab {
            let inputs: Vec<Vec<f64>> = models
                .iter()
                .map(|m| m.token_row(tensor, token).unwrap_or_else(|| default_row(models, tensor, token)))
                .collect();
            worst = worst.max(max_diff(&got.row(tensor, id), &weighted(&inputs, &WEIGHTS)));
        }
    }
    worst
}

#[test]
fn legacy_tokenizer_source_model_remaps_rows_as_the_block_form() {
    let tmp = tempfile::tempdir().unwrap();
    let donor = fixture("llama-vocab/donor_a");
    let legacy =
        merge(&tmp.path().join("l").tap_mkdir(), &format!("{}tokenizer_source: {}\n", union_config(), s(&donor)));
    let block =
        merge(&tmp.path().join("b").tap_mkdir(), &format!("{}tokenizer:\n  source: {}\n", union_config(), s(&donor)));
    assert_eq!(tensor_bytes(&legacy), tensor_bytes(&block));

    // The donor's whole vocabulary (131 tokens, "the" and "a" swapped against the base), its tokenizer file as is.
    let got = Model::load(&legacy);
    assert_eq!(got.vocab, vocab(&donor));
    assert_eq!((got.vocab["the"], got.vocab["a"], got.vocab["<|im_start|>"]), (4, 3, 130));
    assert_eq!(
        std::fs::read(legacy.join("tokenizer.json")).unwrap(),
        std::fs::read(donor.join("tokenizer.json")).unwrap()
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(legacy.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["vocab_size"], 131);
    for tensor in VOCAB_TENSORS {
        assert_eq!(got.rows[tensor].0, 131, "{tensor} rows");
    }
    let worst = worst_by_token(&got, &inputs());
    assert!(worst <= 1e-7, "{worst} from the f64 reference");

    // mergekit's output for the same config (fixtures/expected/donor_llama): every row by token, every other tensor.
    let expected = Model::load(&fixture("expected/donor_llama"));
    assert_eq!(expected.vocab.len(), 131);
    for tensor in VOCAB_TENSORS {
        for (token, &id) in &expected.vocab {
            assert_eq!(got.token_row(tensor, token).unwrap(), expected.row(tensor, id), "{tensor} '{token}'");
        }
    }
    let (a, b) = (Checkpoint::open(&legacy).unwrap(), Checkpoint::open(fixture("expected/donor_llama")).unwrap());
    for t in b.iter().filter(|t| !VOCAB_TENSORS.contains(&t.name)) {
        assert_eq!(t.to_f32().unwrap(), a.tensor(t.name).unwrap().to_f32().unwrap(), "{}", t.name);
    }
}

#[test]
fn legacy_tokenizer_source_base_puts_each_tokens_row_at_the_base_id() {
    let tmp = tempfile::tempdir().unwrap();
    let out = merge(tmp.path(), &format!("{}tokenizer_source: base\n", union_config()));
    let models = inputs();
    let got = Model::load(&out);
    let base = fixture("llama/base");
    assert_eq!(got.vocab, vocab(&base));
    assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), std::fs::read(base.join("tokenizer.json")).unwrap());
    for tensor in VOCAB_TENSORS {
        assert_eq!(got.rows[tensor].0, 128, "{tensor} rows");
    }
    let worst = worst_by_token(&got, &models);
    assert!(worst <= 1e-7, "{worst} from the f64 reference");
    // donor_a holds "the" at id 4: merging by id instead of by token would give another row at the base's id 3.
    assert_eq!((models[1].vocab["the"], got.vocab["the"]), (4, 3));
    let tensor = VOCAB_TENSORS[0];
    let by_id = weighted(&models.iter().map(|m| m.row(tensor, 3)).collect::<Vec<_>>(), &WEIGHTS);
    assert!(max_diff(&got.row(tensor, 3), &by_id) > 1e-3, "the rows were not remapped");
}

#[test]
fn embeddings_padded_past_the_tokenizer_stay_when_no_row_moves() {
    // ft_a and ft_b with the last token dropped from their tokenizers: 127 tokens, 128 embedding rows each.
    let tmp = tempfile::tempdir().unwrap();
    let padded: Vec<PathBuf> = ["llama/ft_a", "llama/ft_b"]
        .iter()
        .map(|m| {
            let dir = tmp.path().join(Path::new(m).file_name().unwrap()).tap_mkdir();
            for f in ["config.json", "model.safetensors"] {
                std::fs::copy(fixture(m).join(f), dir.join(f)).unwrap();
            }
            let mut tok: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(fixture(m).join("tokenizer.json")).unwrap()).unwrap();
            assert_eq!(tok["model"]["vocab"].as_object_mut().unwrap().remove("through"), Some(127.into()));
            std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
            dir
        })
        .collect();
    let yaml = format!(
        "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 0.4}}\n  - model: {}\n    parameters: \
         {{weight: 0.6}}\n",
        s(&padded[0]),
        s(&padded[1])
    );
    let plain = merge(&tmp.path().join("p").tap_mkdir(), &yaml);
    let base = merge(&tmp.path().join("b").tap_mkdir(), &format!("{yaml}tokenizer_source: base\n"));
    assert_eq!(tensor_bytes(&plain), tensor_bytes(&base));
    assert_eq!(Model::load(&base).rows[VOCAB_TENSORS[0]].0, 128);
    assert_eq!(vocab(&base).len(), 127);
}

#[test]
fn a_token_source_outside_the_merge_is_a_usage_error() {
    let tmp = tempfile::tempdir().unwrap();
    let yaml = format!("{}tokenizer:\n  tokens:\n    x: {{source: {}}}\n", union_config(), s(&fixture("llama/ft_a")));
    let cfg = tmp.path().join("c.yml");
    std::fs::write(&cfg, yaml).unwrap();
    let out = tmp.path().join("out");
    let o = graft(&["merge", &s(&cfg), "-o", &s(&out)]);
    let e = String::from_utf8(o.stderr).unwrap();
    assert_eq!(o.status.code(), Some(2), "{e}");
    assert_eq!(e.trim_end().lines().count(), 1, "{e}");
    assert!(e.contains("is not one of the merged models"), "{e}");
    assert!(!out.exists());
}

trait TapMkdir {
    fn tap_mkdir(self) -> Self;
}

impl TapMkdir for PathBuf {
    fn tap_mkdir(self) -> Self {
        std::fs::create_dir_all(&self).unwrap();
        self
    }
}
