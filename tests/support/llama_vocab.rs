//! The llama fixtures' tokenizer vocabulary (a whitespace word-level tokenizer), read from `fixtures/llama/base`: the
//! words tests build their texts from, so that every word is one known token.

use std::path::Path;

/// The words of the fixture tokenizer, by id.
pub fn vocabulary() -> Vec<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/llama/base/tokenizer.json");
    let tok: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut vocab: Vec<(String, u64)> =
        tok["model"]["vocab"].as_object().unwrap().iter().map(|(k, v)| (k.clone(), v.as_u64().unwrap())).collect();
    vocab.sort_by_key(|(_, id)| *id);
    vocab.into_iter().map(|(w, _)| w).collect()
}
