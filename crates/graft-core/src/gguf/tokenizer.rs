//! The Hugging Face tokenizer files of a GGUF checkpoint, rebuilt from its `tokenizer.ggml.*` metadata so that the
//! converted directory tokenises exactly as transformers does when it reads the GGUF itself.
//!
//! Supported: byte-level BPE vocabularies (`tokenizer.ggml.model = gpt2`: SmolLM2, Llama 3, Qwen2, most BPE models).
//! transformers' rules for such a file, which this follows:
//! - a token spelled outside GPT-2's byte alphabet is respelled byte by byte in it;
//! - merges are the file's, in order;
//! - the pre-tokenizer is byte-level with GPT-2's split, or, for the `tokenizer.ggml.pre` families it knows
//!   (`llama3`/`llama-bpe`..., `qwen2`...), that family's split regex followed by a byte-level mapping;
//! - tokens typed CONTROL (3) whose spelling is in the byte alphabet are special added tokens, USER_DEFINED (4)
//!   ones are plain added tokens;
//! - BOS is prepended when `tokenizer.ggml.add_bos_token` says so.
//!
//! Sentencepiece vocabularies (`llama`), unigram ones (`t5`) and others are not rebuilt: `convert` says so and writes
//! the weights and config only.

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

/// The tokenizer files for the converted directory (`tokenizer.json`, `tokenizer_config.json`), or the reason
/// none can be written.
pub fn hf_tokenizer_files(g: &GgufFile) -> Result<std::result::Result<SideFiles, String>> {
    let model = g.metadata().get("tokenizer.ggml.model").and_then(|v| v.to_string().ok()).cloned();
    match model.as_deref() {
        Some("gpt2") => {}
        Some(other) => {
            return Ok(Err(format!("its tokenizer type '{other}' is not rebuilt (only byte-level BPE, 'gpt2')")))
        }
        None => return Ok(Err("it carries no tokenizer (no tokenizer.ggml.model)".into())),
    }
    let tokens = strings(g, "tokenizer.ggml.tokens")?
        .ok_or_else(|| Error::format(g.path(), "tokenizer.ggml.model is gpt2 but tokenizer.ggml.tokens is missing"))?;
    let merges = strings(g, "tokenizer.ggml.merges")?
        .ok_or_else(|| Error::format(g.path(), "a byte-level BPE vocabulary without tokenizer.ggml.merges"))?;
    let types = token_types(g);
    let alphabet = byte_alphabet();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));

    let mut vocab = Map::new();
    for (id, token) in tokens.iter().enumerate() {
        let spelled =
            if in_alphabet(token) { token.clone() } else { token.bytes().map(|b| alphabet[b as usize]).collect() };
        vocab.insert(spelled, json!(id));
    }
    let merge_pairs: Vec<serde_json::Value> = merges
        .iter()
        .map(|m| {
            let (a, b) = m.split_once(' ').unwrap_or((m.as_str(), ""));
            json!([a, b])
        })
        .collect();
    let mut added = Vec::new();
    for (id, token) in tokens.iter().enumerate() {
        let special = match types.get(id) {
            Some(3) if in_alphabet(token) => true,
            Some(4) => false,
            _ => continue,
        };
        added.push(json!({
            "id": id, "content": token, "single_word": false, "lstrip": false, "rstrip": false,
            "normalized": false, "special": special,
        }));
    }
    let token_at = |key: &str| g.meta_u64(key).and_then(|i| tokens.get(i as usize).cloned());
    let bos = token_at("tokenizer.ggml.bos_token_id");
    let add_bos = flag(g, "tokenizer.ggml.add_bos_token").unwrap_or(false);
    let pre = g.metadata().get("tokenizer.ggml.pre").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
    let pre_tokenizer = match family_split(&pre) {
        Some(regex) => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false},
        ]}),
        None => json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true}),
    };
    let a = json!({"Sequence": {"id": "A", "type_id": 0}});
    let b = json!({"Sequence": {"id": "B", "type_id": 1}});
    let post_processor = match (&bos, add_bos) {
        (Some(bos), true) => {
            let id = g.meta_u64("tokenizer.ggml.bos_token_id").unwrap_or(0);
            let st = |type_id: u32| json!({"SpecialToken": {"id": bos, "type_id": type_id}});
            json!({"type": "TemplateProcessing", "single": [st(0), a], "pair": [st(0), a, st(1), b],
                   "special_tokens": {bos.clone(): {"id": bos, "ids": [id], "tokens": [bos]}}})
        }
        _ => json!({"type": "TemplateProcessing", "single": [a], "pair": [a, b], "special_tokens": {}}),
    };
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": pre_tokenizer, "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merge_pairs},
    });
    let mut config = Map::new();
    config.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    config.insert("add_bos_token".into(), json!(add_bos));
    for (name, key) in [
        ("bos_token", "tokenizer.ggml.bos_token_id"),
        ("eos_token", "tokenizer.ggml.eos_token_id"),
        ("unk_token", "tokenizer.ggml.unknown_token_id"),
        ("pad_token", "tokenizer.ggml.padding_token_id"),
    ] {
        if let Some(t) = token_at(key) {
            config.insert(name.into(), json!(t));
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

#[cfg(test)]
mod tests {
    use super::*;

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
