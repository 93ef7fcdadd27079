//! Text to token ids with the Hugging Face `tokenizers` crate (the checkpoint's own `tokenizer.json`), truncated to
//! `max_len` tokens including the special tokens.

use std::path::{Path, PathBuf};

use super::data::{Dataset, Samples};
use crate::error::{Arg, Error, Result};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
}

/// The tokenizer file: `--tokenizer` (a `tokenizer.json` or a directory holding one) or the checkpoint's directory.
pub fn find(explicit: Option<&Path>, checkpoint_dir: Option<&Path>) -> Result<PathBuf> {
    let cand = match (explicit, checkpoint_dir) {
        (Some(p), _) => p.to_path_buf(),
        (None, Some(d)) => d.to_path_buf(),
        (None, None) => {
            return Err(Error::usage(format!(
                "text data needs a tokenizer: pass {} FILE or a checkpoint directory",
                Arg::Tokenizer
            )))
        }
    };
    let file = if cand.is_dir() { cand.join("tokenizer.json") } else { cand };
    if !file.is_file() {
        return Err(Error::usage(format!("{}: no tokenizer.json (pass {})", file.display(), Arg::Tokenizer)));
    }
    Ok(file)
}

impl Tokenizer {
    /// Texts cut to `max_len` tokens (classifier inputs).
    pub fn open(path: &Path, max_len: usize) -> Result<Self> {
        Self::open_with(path, Some(tokenizers::TruncationParams { max_length: max_len.max(2), ..Default::default() }))
    }

    /// Whole texts, as `tokenizer(text)` gives them (language-model streams, cut into windows afterwards).
    pub fn open_whole(path: &Path) -> Result<Self> {
        Self::open_with(path, None)
    }

    fn open_with(path: &Path, trunc: Option<tokenizers::TruncationParams>) -> Result<Self> {
        let mut inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::format(path, format!("cannot read tokenizer: {e}")))?;
        inner.with_truncation(trunc).map_err(|e| Error::format(path, format!("truncation: {e}")))?;
        inner.with_padding(None);
        Ok(Tokenizer { inner, path: path.to_path_buf() })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| Error::format(&self.path, format!("cannot tokenize a text: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Replaces the texts of `ds` by their token ids.
    pub fn tokenize(&self, ds: &mut Dataset) -> Result<()> {
        if let Samples::Text(texts) = &ds.samples {
            use rayon::prelude::*;
            let ids: Vec<Vec<u32>> = texts.par_iter().map(|t| self.encode(t)).collect::<Result<_>>()?;
            ds.samples = Samples::Tokens(ids);
        }
        Ok(())
    }
}
