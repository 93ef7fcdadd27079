//! Output vocabularies: the `tokenizer:` block (`source: base | union | <model>`, per-token `tokens:` embedding
//! sources, `pad_to_multiple_of`) and `tokenizer_source: base | union | <model>` (mergekit reads it as the block's
//! `source`), with mergekit's rules, and the remapping of every model's vocabulary-indexed rows (`embed_tokens`,
//! `lm_head`, ...) onto the output vocabulary.
//!
//! The output vocabulary (read and written with the `tokenizers` crate, from each model's `tokenizer.json`):
//! - `base`: the base's (else the first model's) tokens with ids below its config's `vocab_size`;
//! - `<model>`: that model's whole vocabulary;
//! - `union`: the base's, then every other model's ordinary tokens it lacks (models in config order, tokens in id
//!   order; mergekit walks a hash map here, so its ids for these tokens vary from run to run), then every model's
//!   added tokens (the first model's settings win);
//! - then every token named under `tokens:` that is still missing.
//!
//! The rows of a token a model lacks (mergekit's rule): a token held by one model takes that model's row; by none,
//! zeros; by the base among others, the base's; otherwise the mean of the rows of the models that hold it. A token
//! under `tokens:` takes its configured source instead (a model's row for that token, `model_token` a given row of a
//! model, `zero`) for models that lack it, and for every model with `force: true`. Rows added by
//! `pad_to_multiple_of` are the mean of the model's remapped rows. Means are computed in f64 and rounded once.
//!
//! `prepare` builds the vocabulary, and for each model whose rows do not already line up with it writes the
//! remapped tensors (in the config's `dtype`, else their stored one: mergekit's working dtype) to a temporary safetensors file beside the output; the plan
//! (`super::plan::build_with`) then reads those tensors in place of the originals, so every method and
//! `--snr-select` see remapped rows. Tied embeddings stay tied: both tensors get the same remapping. A model whose
//! tokens already sit at the output's ids is read as it is; mergekit truncates embeddings padded beyond the
//! tokenizer even when no row moves, graft keeps every model's rows, padding included, when no model's rows move
//! and all have one row count. The output's `tokenizer.json` is the source's own file unless tokens were added.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tokenizers::{AddedToken, Tokenizer};

use super::substitute::Substitutes;
use crate::checkpoint::dtype::{from_f32_vec, round_in_place};
use crate::checkpoint::{hf_config, Checkpoint, Dtype};
use crate::error::{Error, Result};

/// Vocabulary-indexed tensors (rows = token ids), by name suffix.
pub const VOCAB_TENSOR_SUFFIXES: &[&str] = &[
    "embed_tokens.weight",
    "word_embeddings.weight",
    "wte.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
    "shared.weight",
    "lm_head.weight",
    "embed_out.weight",
];

/// Where the output vocabulary comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum VocabSource {
    Base,
    Union,
    Model(PathBuf),
}

/// Where a configured token's row comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum EmbedSource {
    /// That model's row for the same token.
    Model(PathBuf),
    /// A given row of a model: by id, or by the id the model's tokenizer gives a token.
    ModelToken {
        model: PathBuf,
        token: TokenRef,
    },
    Zero,
}

#[derive(Clone, Debug, PartialEq)]
pub enum TokenRef {
    Id(usize),
    Text(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct TokenSetting {
    pub source: Option<EmbedSource>,
    pub force: bool,
}

/// The `tokenizer:` block (or `tokenizer_source: union`).
#[derive(Clone, Debug, PartialEq)]
pub struct TokenizerSpec {
    pub source: VocabSource,
    /// In config order.
    pub tokens: Vec<(String, TokenSetting)>,
    pub pad_to_multiple_of: Option<usize>,
}

/// One model's tokenizer, restricted to the ids its embeddings cover.
struct ModelVocab {
    tokenizer: Tokenizer,
    /// token -> id, ids below `size` only.
    ids: HashMap<String, usize>,
    /// The config's `vocab_size`, else the tokenizer's size.
    size: usize,
}

fn load_vocab(dir: &Path) -> Result<ModelVocab> {
    let file = dir.join("tokenizer.json");
    if !file.is_file() {
        return Err(Error::usage(format!(
            "{}: no tokenizer.json; building an output vocabulary needs each model's tokenizer.json",
            dir.display()
        )));
    }
    let tokenizer = Tokenizer::from_file(&file).map_err(|e| Error::format(&file, format!("not a tokenizer: {e}")))?;
    let all = tokenizer.get_vocab(true);
    let config_size = hf_config::read(&dir.join("config.json"))?
        .and_then(|c| c.get("vocab_size").and_then(|v| v.as_u64()))
        .map(|n| n as usize);
    let size = config_size.unwrap_or(all.len());
    let ids = all.into_iter().map(|(t, i)| (t, i as usize)).filter(|(_, i)| *i < size).collect();
    Ok(ModelVocab { tokenizer, ids, size })
}

/// Tokens in id order.
fn by_id(ids: &HashMap<String, usize>) -> Vec<(&str, usize)> {
    let mut v: Vec<(&str, usize)> = ids.iter().map(|(t, &i)| (t.as_str(), i)).collect();
    v.sort_by_key(|&(t, i)| (i, t));
    v
}

/// The output vocabulary and the file-level facts the output needs.
#[derive(Clone, Debug, PartialEq)]
pub struct Vocabulary {
    /// The output tokenizer, serialised (`tokenizer.json`); None when no token was added to the source's, whose
    /// file is then copied as it is.
    pub tokenizer_json: Option<String>,
    /// Added tokens of the output tokenizer by id, as `tokenizer_config.json`'s `added_tokens_decoder` lists them.
    pub added: BTreeMap<usize, serde_json::Value>,
    /// The model whose other tokenizer files (configs, special tokens map) go with it.
    pub files_from: PathBuf,
    /// Rows written: the vocabulary, padded.
    pub rows: usize,
}

/// What `prepare` made: the vocabulary, and the remapped tensors that replace inputs' originals.
pub struct Remap {
    pub vocabulary: Vocabulary,
    pub substitutes: Substitutes,
}

/// Per output row of one model: where its values come from.
#[derive(Clone, Debug, PartialEq)]
enum Row {
    /// A row of the same model.
    Own(usize),
    /// The shared default of a token (index into the defaults).
    Default(usize),
    Zero,
    /// Padding: the mean of the model's remapped rows.
    Mean,
}

/// How a token's default row is made, shared by every model that takes it.
#[derive(Clone, Debug, PartialEq)]
enum Default {
    /// Mean of these (model, row)s.
    Mean(Vec<(usize, usize)>),
    Row(usize, usize),
    Zero,
}

/// Builds the output vocabulary of a merge config's `tokenizer:` setting `spec` and remaps the vocabulary tensors of
/// every model (`models[i]` opened from `paths[i]`; `base_model` one of them) whose rows do not line up with it;
/// float rows are written in `out_dtype` when the config sets one. Substitute files are
/// written in a temporary directory beside `out`.
pub fn prepare(
    spec: &TokenizerSpec,
    paths: &[PathBuf],
    label: &dyn Fn(&Path) -> String,
    base_model: Option<&PathBuf>,
    out_dtype: Option<Dtype>,
    models: &[Checkpoint],
    out: &Path,
) -> Result<Remap> {
    let dir_of = |i: usize| -> Result<PathBuf> {
        models[i].dir().map(Path::to_path_buf).ok_or_else(|| {
            Error::usage(format!(
                "tokenizer: {} is not a model directory, so it has no tokenizer to merge",
                label(&paths[i])
            ))
        })
    };
    let index_of = |p: &PathBuf, what: &str| -> Result<usize> {
        paths
            .iter()
            .position(|q| q == p)
            .ok_or_else(|| Error::usage(format!("tokenizer: {what} {} is not one of the merged models", label(p))))
    };
    let base = match base_model {
        Some(b) => index_of(b, "base")?,
        None => 0,
    };
    let vocabs: Vec<ModelVocab> =
        (0..models.len()).map(|i| dir_of(i).and_then(|d| load_vocab(&d))).collect::<Result<_>>()?;

    // The output tokenizer.
    let (mut tokenizer, files_from) = match &spec.source {
        VocabSource::Base | VocabSource::Union => (vocabs[base].tokenizer.clone(), dir_of(base)?),
        VocabSource::Model(p) => {
            let dir = match paths.iter().position(|q| q == p) {
                Some(i) => dir_of(i)?,
                None => p.clone(),
            };
            (load_vocab(&dir)?.tokenizer, dir)
        }
    };
    if matches!(spec.source, VocabSource::Base | VocabSource::Union)
        && tokenizer.get_vocab_size(true) > vocabs[base].size
    {
        return Err(Error::usage(format!(
            "tokenizer: {} has tokens beyond its config's vocab_size {}; graft does not strip them",
            label(&paths[base]),
            vocabs[base].size
        )));
    }
    let source_tokens = tokenizer.get_vocab_size(true);
    let add = |tokenizer: &mut Tokenizer, tokens: Vec<AddedToken>| -> Result<()> {
        tokenizer.add_tokens(tokens).map(|_| ()).map_err(|e| Error::invalid(format!("tokenizer: adding tokens: {e}")))
    };
    if spec.source == VocabSource::Union {
        let order: Vec<usize> = std::iter::once(base).chain((0..models.len()).filter(|&i| i != base)).collect();
        let mut ordinary: Vec<String> = Vec::new();
        let mut added: Vec<AddedToken> = Vec::new();
        for &i in &order {
            let decoder = vocabs[i].tokenizer.get_added_tokens_decoder();
            for (token, id) in by_id(&vocabs[i].ids) {
                if !decoder.contains_key(&(id as u32)) && !ordinary.iter().any(|t| t == token) {
                    ordinary.push(token.to_string());
                }
            }
            let mut ids: Vec<u32> = decoder.keys().copied().filter(|&id| (id as usize) < vocabs[i].size).collect();
            ids.sort();
            for id in ids {
                let t = &decoder[&id];
                if !added.iter().any(|a| a.content == t.content) {
                    added.push(t.clone());
                }
            }
        }
        let present = tokenizer.get_vocab(true);
        let new: Vec<AddedToken> = ordinary
            .into_iter()
            .filter(|t| !present.contains_key(t) && !added.iter().any(|a| &a.content == t))
            .map(|t| AddedToken::from(t, false))
            .collect();
        add(&mut tokenizer, new)?;
        let present = tokenizer.get_vocab(true);
        add(&mut tokenizer, added.into_iter().filter(|a| !present.contains_key(&a.content)).collect())?;
    }
    for (token, _) in &spec.tokens {
        if !tokenizer.get_vocab(true).contains_key(token) {
            add(&mut tokenizer, vec![AddedToken::from(token.clone(), false)])?;
        }
    }
    let out_vocab: HashMap<String, usize> =
        tokenizer.get_vocab(true).into_iter().map(|(t, i)| (t, i as usize)).collect();
    let n = out_vocab.len();
    if let Some((t, &i)) = out_vocab.iter().find(|(_, &i)| i >= n) {
        return Err(Error::usage(format!(
            "tokenizer: the output vocabulary (from {}) has {n} tokens but '{t}' has id {i}; graft needs contiguous ids",
            files_from.join("tokenizer.json").display()
        )));
    }
    let rows = match spec.pad_to_multiple_of {
        Some(m) if m > 0 && !n.is_multiple_of(m) => (n / m + 1) * m,
        _ => n,
    };
    let tokens_in_order = {
        let mut v: Vec<(&str, usize)> = out_vocab.iter().map(|(t, &i)| (t.as_str(), i)).collect();
        v.sort_by_key(|&(_, i)| i);
        v
    };

    // Which model row feeds each output row (mergekit's `permutations`).
    let perm: Vec<Vec<Option<usize>>> =
        vocabs.iter().map(|v| tokens_in_order.iter().map(|(t, _)| v.ids.get(*t).copied()).collect()).collect();
    let configured: HashMap<&str, &TokenSetting> = spec.tokens.iter().map(|(t, s)| (t.as_str(), s)).collect();
    let mut defaults: Vec<Default> = Vec::new();
    let mut default_of: HashMap<usize, usize> = HashMap::new();
    for &(token, id) in &tokens_in_order {
        let holders: Vec<usize> = (0..models.len()).filter(|&m| perm[m][id].is_some()).collect();
        let setting = configured.get(token);
        let forced = setting.is_some_and(|s| s.force);
        if !forced && holders.len() == models.len() {
            continue;
        }
        let d = match setting {
            Some(s) => match &s.source {
                None => {
                    return Err(Error::usage(format!("tokenizer.tokens['{token}']: needs a source (a model, or kind)")))
                }
                Some(EmbedSource::Zero) => Default::Zero,
                Some(EmbedSource::Model(p)) => {
                    let m = index_of(p, &format!("tokens['{token}'] source"))?;
                    let row = perm[m][id].ok_or_else(|| {
                        Error::usage(format!("tokenizer.tokens['{token}']: {} has no such token", p.display()))
                    })?;
                    Default::Row(m, row)
                }
                Some(EmbedSource::ModelToken { model, token: r }) => {
                    let m = index_of(model, &format!("tokens['{token}'] source"))?;
                    let row = match r {
                        TokenRef::Id(i) => *i,
                        TokenRef::Text(t) => *vocabs[m].ids.get(t).ok_or_else(|| {
                            Error::usage(format!(
                                "tokenizer.tokens['{token}']: token '{t}' is not in {}'s vocabulary",
                                model.display()
                            ))
                        })?,
                    };
                    Default::Row(m, row)
                }
            },
            None if holders.is_empty() => Default::Zero,
            None if holders.len() == 1 => Default::Row(holders[0], perm[holders[0]][id].unwrap()),
            None if holders.contains(&base) => Default::Row(base, perm[base][id].unwrap()),
            None => Default::Mean(holders.iter().map(|&m| (m, perm[m][id].unwrap())).collect()),
        };
        default_of.insert(id, defaults.len());
        defaults.push(d);
    }
    let plans: Vec<Vec<Row>> = (0..models.len())
        .map(|m| {
            let mut rows_of: Vec<Row> = tokens_in_order
                .iter()
                .map(|&(token, id)| {
                    let forced = configured.get(token).is_some_and(|s| s.force);
                    match (perm[m][id], default_of.get(&id)) {
                        (Some(r), _) if !forced => Row::Own(r),
                        (_, Some(&d)) => Row::Default(d),
                        _ => Row::Zero,
                    }
                })
                .collect();
            rows_of.resize(rows, Row::Mean);
            rows_of
        })
        .collect();

    // Remap the vocabulary tensors of every model whose rows move.
    let mut substitutes = Substitutes::default();
    let vocab_tensors: Vec<String> = models[base]
        .infos()
        .iter()
        .filter(|t| t.shape.len() == 2 && VOCAB_TENSOR_SUFFIXES.iter().any(|s| t.name.ends_with(s)))
        .map(|t| t.name.clone())
        .collect();
    let in_place = |m: usize| plans[m].iter().enumerate().all(|(i, r)| *r == Row::Own(i));
    // When every model's tokens already sit at the output's ids and all their vocabulary tensors have one row
    // count (padding past the tokenizer included, as Qwen ships it), nothing moves: every model is read as it is.
    let stored_rows: std::collections::BTreeSet<usize> = (0..models.len())
        .flat_map(|m| vocab_tensors.iter().filter_map(move |t| models[m].info(t)).map(|i| i.shape[0]))
        .collect();
    let all_in_place = rows == n
        && stored_rows.len() == 1
        && stored_rows.first().is_some_and(|&r| r >= n)
        && (0..models.len()).all(in_place);
    let rows = if all_in_place { *stored_rows.first().expect("one row count") } else { rows };
    for m in 0..models.len() {
        let identity =
            in_place(m) && vocab_tensors.iter().all(|t| models[m].info(t).is_none_or(|i| i.shape[0] == rows));
        if all_in_place || identity {
            continue;
        }
        let mut tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
        for name in &vocab_tensors {
            let Some(info) = models[m].info(name) else { continue };
            if !info.dtype.is_float() {
                continue;
            }
            let read = |k: usize| -> Result<(Vec<f32>, usize, usize)> {
                let v = models[k].tensor(name)?;
                let (r, w) = (v.shape[0], v.shape.iter().skip(1).product::<usize>());
                Ok((v.to_f32()?, r, w))
            };
            let (own, own_rows, width) = read(m)?;
            let mut cache: HashMap<usize, (Vec<f32>, usize)> = HashMap::new();
            let mut row_of = |k: usize, r: usize| -> Result<Vec<f32>> {
                if k == m {
                    check_row(&paths[m], name, r, own_rows)?;
                    return Ok(own[r * width..(r + 1) * width].to_vec());
                }
                if let std::collections::hash_map::Entry::Vacant(slot) = cache.entry(k) {
                    let (v, rk, wk) = read(k)?;
                    if wk != width {
                        return Err(Error::tensor(
                            &paths[k],
                            name,
                            format!("rows of {wk} values, but {} has {width}", label(&paths[m])),
                        ));
                    }
                    slot.insert((v, rk));
                }
                let (v, rk) = &cache[&k];
                check_row(&paths[k], name, r, *rk)?;
                Ok(v[r * width..(r + 1) * width].to_vec())
            };
            let mut data = vec![0f32; rows * width];
            for (i, row) in plans[m].iter().enumerate() {
                let values = match row {
                    Row::Own(r) => row_of(m, *r)?,
                    Row::Zero | Row::Mean => continue,
                    Row::Default(d) => match &defaults[*d] {
                        Default::Zero => continue,
                        Default::Row(k, r) => row_of(*k, *r)?,
                        Default::Mean(from) => {
                            let mut sum = vec![0f64; width];
                            for &(k, r) in from {
                                for (s, x) in sum.iter_mut().zip(row_of(k, r)?) {
                                    *s += x as f64;
                                }
                            }
                            sum.iter().map(|s| (s / from.len() as f64) as f32).collect()
                        }
                    },
                };
                data[i * width..(i + 1) * width].copy_from_slice(&values);
            }
            if rows > n {
                // Padding rows: the mean of the vocabulary's rows (mergekit follows Hewitt's vocabulary expansion).
                let mut mean = vec![0f64; width];
                for i in 0..n {
                    for (s, x) in mean.iter_mut().zip(&data[i * width..(i + 1) * width]) {
                        *s += *x as f64;
                    }
                }
                let mean: Vec<f32> = mean.iter().map(|s| (s / n as f64) as f32).collect();
                for i in n..rows {
                    data[i * width..(i + 1) * width].copy_from_slice(&mean);
                }
            }
            // Kept in mergekit's working dtype: the config's `dtype`, else the stored one.
            let dtype = out_dtype.filter(|d| d.is_float()).unwrap_or(info.dtype);
            round_in_place(dtype, &mut data);
            let mut shape = info.shape.clone();
            shape[0] = rows;
            tensors.push((name.clone(), dtype, shape, from_f32_vec(dtype, &data)));
        }
        if !tensors.is_empty() {
            substitutes.add(m, tensors, out, "vocab")?;
        }
    }
    let added = tokenizer
        .get_added_tokens_decoder()
        .into_iter()
        .map(|(i, t)| {
            let entry = serde_json::json!({"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special});
            (i as usize, entry)
        })
        .collect();
    let tokenizer_json = if tokenizer.get_vocab_size(true) == source_tokens {
        None
    } else {
        Some(tokenizer.to_string(true).map_err(|e| Error::invalid(format!("tokenizer: serialising the output: {e}")))?)
    };
    Ok(Remap { vocabulary: Vocabulary { tokenizer_json, added, files_from, rows }, substitutes })
}

fn check_row(model: &Path, tensor: &str, row: usize, rows: usize) -> Result<()> {
    if row >= rows {
        return Err(Error::tensor(model, tensor, format!("token id {row} is past its {rows} rows")));
    }
    Ok(())
}

/// `tokenizer_config.json` with `added_tokens_decoder` listing every added token of the output tokenizer (when the
/// file keeps such a list), so transformers sees the same added tokens as `tokenizer.json` declares.
pub fn patch_tokenizer_config(
    path: &Path,
    bytes: &[u8],
    added: &BTreeMap<usize, serde_json::Value>,
) -> Result<Vec<u8>> {
    let mut config: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
    if let Some(decoder) = config.get_mut("added_tokens_decoder").and_then(|d| d.as_object_mut()) {
        for (id, entry) in added {
            decoder.entry(id.to_string()).or_insert_with(|| entry.clone());
        }
        return Ok(serde_json::to_vec_pretty(&config).expect("JSON values serialise"));
    }
    Ok(bytes.to_vec())
}
