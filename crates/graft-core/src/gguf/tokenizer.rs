//! The Hugging Face tokenizer files of a GGUF checkpoint, rebuilt from its `tokenizer.ggml.*` metadata so that the
//! converted directory tokenises exactly as transformers does when it reads the GGUF itself.
//!
//! Rebuilt: byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`: SmolLM2, Llama 3, Qwen2, most BPE models)
//! and sentencepiece BPE ones (`llama`: Llama 2, Mistral, TinyLlama, most older GGUFs). transformers' rules for such
//! files (`integrations/gguf/gguf_tokenizer_mapping.py`, `LlamaTokenizer`, `TokenizersBackend`), which this follows:
//! - gpt2: a token spelled outside GPT-2's byte alphabet is respelled byte by byte in it; merges are the file's, in
//!   order; the pre-tokenizer is byte-level with GPT-2's split, or, for the `tokenizer.ggml.pre` families it knows
//!   (`llama3`/`llama-bpe`..., `qwen2`...), that family's split regex followed by a byte-level mapping;
//! - llama: tokens as the file spells them (`▁` for a space, `<0xNN>` byte pieces); merges are the file's if it has
//!   any, else recovered from the scores (every split of a token into two vocabulary tokens, ordered by the token's
//!   score, best first, then by the pieces' lengths); byte fallback; a `▁` prepended to the first word and every
//!   space written as `▁` (Metaspace, prepend "first"; transformers ignores `tokenizer.ggml.add_space_prefix`, and
//!   so does this); BOS added unless `add_bos_token` says otherwise;
//! - tokens typed CONTROL (3) (in gpt2 files only those spelled in the byte alphabet) and the BOS/EOS/UNK/PAD tokens
//!   are special added tokens, USER_DEFINED (4) ones are plain added tokens;
//! - BOS and EOS are added around a sequence as `add_bos_token` / `add_eos_token` say.
//!
//! Other tokenizer types llama.cpp defines (`t5`, `bert`, `rwkv`, ...) are not rebuilt: `convert` says so and writes
//! the weights and config only. A type llama.cpp does not define is an error.

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Map};

use super::GgufFile;
use crate::error::{Error, Result};

/// GPT-2's printable spelling of every byte (`bytes_to_unicode`): printable Latin-1 bytes stand for themselves,
/// the others for code points from 256 on, in byte order.
fn byte_alphabet() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in out.iter_mut().enumerate() {
        let printable = (b'!'..=b'~').contains(&(b as u8)) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        *slot = if printable {
            char::from_u32(b as u32).unwrap()
        } else {
            next += 1;
            char::from_u32(next - 1).unwrap()
        };
    }
    out
}

const LLAMA3_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);
const QWEN2_SPLIT: &str = concat!(
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}",
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
);

/// The split regex transformers uses for a `tokenizer.ggml.pre` family, if it knows one.
fn family_split(pre: &str) -> Option<&'static str> {
    match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0" | "lfm2" | "dbrx"
        | "smaug-bpe" => Some(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => Some(QWEN2_SPLIT),
        _ => None,
    }
}

fn strings(g: &GgufFile, key: &str) -> Result<Option<Vec<String>>> {
    let Some(v) = g.metadata().get(key) else { return Ok(None) };
    let bad = || Error::format(g.path(), format!("metadata '{key}' is not an array of strings"));
    let items = v.to_vec().map_err(|_| bad())?;
    items.iter().map(|x| x.to_string().cloned().map_err(|_| bad())).collect::<Result<Vec<_>>>().map(Some)
}

fn token_types(g: &GgufFile) -> Vec<i64> {
    let Some(Ok(items)) = g.metadata().get("tokenizer.ggml.token_type").map(Value::to_vec) else { return Vec::new() };
    items.iter().map(|x| x.to_i32().map(i64::from).or_else(|_| x.to_i64()).unwrap_or(1)).collect()
}

fn flag(g: &GgufFile, key: &str) -> Option<bool> {
    g.metadata().get(key).and_then(|v| v.to_bool().ok())
}

/// Files to write beside the weights: (file name, contents).
pub type SideFiles = Vec<(&'static str, Vec<u8>)>;

/// Tokenizer types llama.cpp defines (`llama_vocab_type`) and transformers' `gemma4`, that graft does not rebuild.
const NOT_REBUILT: [&str; 7] = ["t5", "bert", "rwkv", "plamo2", "gemma4", "none", "no_vocab"];

/// The tokenizer files for the converted directory (`tokenizer.json`, `tokenizer_config.json`), or the reason
/// none can be written; an error for a tokenizer type no GGUF writer defines.
pub fn hf_tokenizer_files(g: &GgufFile) -> Result<std::result::Result<SideFiles, String>> {
    let model = g.metadata().get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).cloned();
    let kind = match model.as_deref() {
        Some("gpt2") => Kind::ByteLevel,
        Some("llama") => Kind::SentencePiece,
        Some(other) if NOT_REBUILT.contains(&other) => {
            return Ok(Err(format!(
                "its tokenizer type '{other}' is not rebuilt (only byte-level BPE 'gpt2' and sentencepiece 'llama')"
            )))
        }
        Some(other) => {
            return Err(Error::format(
                g.path(),
                format!("tokenizer.ggml.model '{other}' is not a tokenizer type llama.cpp defines"),
            ))
        }
        None => return Ok(Err("it carries no tokenizer (no tokenizer.ggml.model)".into())),
    };
    let name = model.unwrap_or_default();
    let tokens = strings(g, "tokenizer.ggml.tokens")?.ok_or_else(|| {
        Error::format(g.path(), format!("tokenizer.ggml.model is {name} but tokenizer.ggml.tokens is missing"))
    })?;
    let merges = strings(g, "tokenizer.ggml.merges")?;
    let types = token_types(g);
    let token_at = |key: &str| g.meta_u64(key).and_then(|i| tokens.get(i as usize).map(|t| (t.clone(), i)));
    let named: Vec<(&str, Option<(String, u64)>)> = [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ]
    .into_iter()
    .map(|(name, key)| (name, token_at(key)))
    .collect();
    // A sentencepiece vocabulary without the flag gets BOS, as llama.cpp gives it (transformers follows).
    let add_bos = flag(g, "tokenizer.ggml.add_bos_token").unwrap_or(kind == Kind::SentencePiece);
    let add_eos = flag(g, "tokenizer.ggml.add_eos_token").unwrap_or(false);

    let (model, pre_tokenizer, decoder, added) = match kind {
        Kind::ByteLevel => {
            let merges = merges
                .ok_or_else(|| Error::format(g.path(), "a byte-level BPE vocabulary without tokenizer.ggml.merges"))?;
            byte_level_parts(g, &tokens, &merges, &types)
        }
        Kind::SentencePiece => sentencepiece_parts(g, &tokens, merges.as_deref(), &types)?,
    };
    let mut added = added;
    // The named special tokens not added yet are added as special tokens, whatever their type (transformers adds
    // each it names that it has not added already).
    for (content, id) in named.iter().filter_map(|(_, t)| t.as_ref()) {
        if !added.iter().any(|(i, _, _)| i == id) {
            added.push((*id, content.clone(), true));
        }
    }
    added.sort_by_key(|(id, _, _)| *id);
    let added: Vec<serde_json::Value> = added
        .into_iter()
        .map(|(id, content, special)| {
            json!({
                "id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": special,
            })
        })
        .collect();
    let get = |name: &str| named.iter().find(|(n, _)| *n == name).and_then(|(_, t)| t.clone());
    let post_processor = template(get("bos_token").filter(|_| add_bos), get("eos_token").filter(|_| add_eos));
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": pre_tokenizer, "post_processor": post_processor, "decoder": decoder, "model": model,
    });
    let mut config = Map::new();
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    config.insert("add_bos_token".into(), json!(add_bos));
    config.insert("add_eos_token".into(), json!(add_eos));
    for (name, token) in &named {
        if let Some((t, _)) = token {
            config.insert((*name).into(), json!(t));
        }
    }
    if let Some(t) = g.metadata().get("tokenizer.chat_template").and_then(|v| v.to_string().ok()) {
        config.insert("chat_template".into(), json!(t));
    }
    let pretty = |v: &serde_json::Value| (serde_json::to_string_pretty(v).unwrap() + "\n").into_bytes();
    Ok(Ok(vec![
        ("tokenizer.json", pretty(&tokenizer)),
        ("tokenizer_config.json", pretty(&serde_json::Value::Object(config))),
    ]))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    ByteLevel,
    SentencePiece,
}

/// An added token: id, content, special.
type Added = (u64, String, bool);

/// The BPE model, pre-tokenizer, decoder and added tokens of a byte-level vocabulary.
fn byte_level_parts(
    g: &GgufFile,
    tokens: &[String],
    merges: &[String],
    types: &[i64],
) -> (serde_json::Value, serde_json::Value, serde_json::Value, Vec<Added>) {
    let alphabet = byte_alphabet();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Map::new();
    for (id, token) in tokens.iter().enumerate() {
        let spelled =
            if in_alphabet(token) { token.clone() } else { token.bytes().map(|b| alphabet[b as usize]).collect() };
        vocab.insert(spelled, json!(id));
    }
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        match types.get(id) {
            Some(3) if in_alphabet(token) => added.push((id as u64, token.clone(), true)),
            Some(4) => added.push((id as u64, token.clone(), false)),
            _ => {}
        }
    }
    let pre = g.metadata().get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let pre_tokenizer = match family_split(&pre) {
        Some(regex) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]}),
        None => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
    };
    let model = json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
              "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
              "vocab": vocab, "merges": merge_pairs(merges)});
    let decoder = json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true});
    (model, pre_tokenizer, decoder, added)
}

/// The file's merges ("a b") as pairs.
fn merge_pairs(merges: &[String]) -> Vec<serde_json::Value> {
    merges
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap_or((m.as_str(), ""));
            json!([a, b])
        })
        .collect()
}

fn scores(g: &GgufFile, n: usize) -> Result<Vec<f64>> {
    let bad = |why: &str| Error::format(g.path(), format!("metadata 'tokenizer.ggml.scores' {why}"));
    let v = g
        .metadata()
        .get("tokenizer.ggml.scores")
        .ok_or_else(|| bad("is missing (a sentencepiece vocabulary without merges needs it)"))?;
    let items = v.to_vec().map_err(|_| bad("is not an array of numbers"))?;
    if items.len() != n {
        return Err(bad(&format!("has {} entries for {n} tokens", items.len())));
    }
    items
        .iter()
        .map(|x| x.to_f32().map(f64::from).or_else(|_| x.to_f64()).map_err(|_| bad("is not an array of numbers")))
        .collect()
}

/// Merges implied by a sentencepiece vocabulary (transformers' `generate_merges` with the scores): for each token
/// in file order, every split into two vocabulary tokens (ordered by the pieces' ids), then all of them ordered by
/// the token's score, the left piece's length and the right piece's length, largest first, ties in that order.
/// A token listed twice keeps its first position, its last score and its last id, as Python dictionaries do.
pub fn merges_from_scores(tokens: &[String], scores: &[f64]) -> Vec<(String, String)> {
    use std::collections::HashMap;
    let mut id: HashMap<&str, usize> = HashMap::new();
    let mut score: HashMap<&str, f64> = HashMap::new();
    let mut order: Vec<&str> = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        if id.insert(t, i).is_none() {
            order.push(t);
        }
        score.insert(t, scores[i]);
    }
    let mut merges: Vec<(&str, &str, f64, usize, usize)> = Vec::new();
    for token in order {
        let mut local = Vec::new();
        for (cut, _) in token.char_indices().skip(1) {
            let (l, r) = token.split_at(cut);
            if let (Some(&il), Some(&ir)) = (id.get(l), id.get(r)) {
                local.push((il, ir, l, r));
            }
        }
        local.sort_by_key(|&(il, ir, _, _)| (il, ir));
        let s = score[token];
        merges.extend(local.into_iter().map(|(_, _, l, r)| (l, r, s, l.chars().count(), r.chars().count())));
    }
    // Largest first; a stable sort on the reversed comparison keeps equal keys in their order, as Python's
    // `sorted(..., reverse=True)` does.
    merges.sort_by(|a, b| (b.2, b.3, b.4).partial_cmp(&(a.2, a.3, a.4)).unwrap_or(std::cmp::Ordering::Equal));
    merges.into_iter().map(|(l, r, _, _, _)| (l.to_string(), r.to_string())).collect()
}

/// The BPE model, pre-tokenizer, decoder and added tokens of a sentencepiece vocabulary.
fn sentencepiece_parts(
    g: &GgufFile,
    tokens: &[String],
    merges: Option<&[String]>,
    types: &[i64],
) -> Result<(serde_json::Value, serde_json::Value, serde_json::Value, Vec<Added>)> {
    let merges: Vec<serde_json::Value> = match merges {
        Some(m) => merge_pairs(m),
        None => merges_from_scores(tokens, &scores(g, tokens.len())?).into_iter().map(|(l, r)| json!([l, r])).collect(),
    };
    let mut vocab = Map::new();
    for (id, token) in tokens.iter().enumerate() {
        vocab.insert(token.clone(), json!(id));
    }
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        match types.get(id) {
            Some(3) => added.push((id as u64, token.clone(), true)),
            Some(4) => added.push((id as u64, token.clone(), false)),
            _ => {}
        }
    }
    let model = json!({"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
              "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
              "vocab": vocab, "merges": merges});
    let pre_tokenizer =
        json!({"type": "Metaspace", "replacement": "\u{2581}", "prepend_scheme": "first", "split": false});
    let decoder = json!({"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
        {"type": "ByteFallback"},
        {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0},
    ]});
    Ok((model, pre_tokenizer, decoder, added))
}

/// transformers' post-processor for these flags (`TokenizersBackend.update_post_processor`): BOS and EOS around
/// each sequence of a single input or a pair.
fn template(bos: Option<(String, u64)>, eos: Option<(String, u64)>) -> serde_json::Value {
    let seq = |id: &str, type_id: u32| json!({"Sequence": {"id": id, "type_id": type_id}});
    let st = |t: &Option<(String, u64)>, type_id: u32| {
        t.as_ref().map(|(c, _)| json!({"SpecialToken": {"id": c, "type_id": type_id}}))
    };
    let around = |id: &str, type_id: u32| -> Vec<serde_json::Value> {
        st(&bos, type_id).into_iter().chain([seq(id, type_id)]).chain(st(&eos, type_id)).collect()
    };
    let single = around("A", 0);
    let pair: Vec<serde_json::Value> = single.iter().cloned().chain(around("B", 1)).collect();
    let mut special = Map::new();
    for (content, id) in bos.iter().chain(eos.iter()) {
        special.insert(content.clone(), json!({"id": content, "ids": [id], "tokens": [content]}));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_come_from_scores_best_first() {
        let tokens: Vec<String> = ["<unk>", "a", "b", "c", "ab", "abc", "bc", "ba"].map(String::from).to_vec();
        let scores = [0.0, -1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -6.0];
        // By hand: "ab" (-4) gives a+b; "abc" (-5) gives a+bc and ab+c, the longer left piece first; "bc" and "ba"
        // (-6, pieces of equal length) keep their file order; single characters and "<unk>" give none.
        let want = [("a", "b"), ("ab", "c"), ("a", "bc"), ("b", "c"), ("b", "a")];
        let got = merges_from_scores(&tokens, &scores);
        assert_eq!(got, want.map(|(l, r)| (l.to_string(), r.to_string())));
    }

    #[test]
    fn byte_alphabet_is_gpt2s() {
        let a = byte_alphabet();
        // Hand-checked against GPT-2's table: space is Ġ (U+0120), newline Ċ (U+010A), 'A' itself, 0xAD is Ń.
        assert_eq!((a[b' ' as usize], a[b'\n' as usize], a[b'A' as usize]), ('\u{120}', '\u{10A}', 'A'));
        assert_eq!((a[0], a[0xAD], a[0xFF]), ('\u{100}', '\u{143}', '\u{FF}'));
        let distinct: std::collections::HashSet<char> = a.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
