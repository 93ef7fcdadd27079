//! Training data from local files: the formats (`idx`, `sprite`, `arrays`, `text`), class subsets with label
//! remapping, deterministic splits and normalisation (`subset`), and batches as candle tensors.
//!
//! `--data` is `FORMAT:PATH` or a bare path whose format is recognised from what it holds (IDX files, the MNIST PNG
//! sprite, an arrays `meta.json`, SpamAssassin folders, a `.tsv`/`.txt` file of `label<TAB>text` lines).
//! Dense samples keep their source type (u8 pixels stay u8, a quarter of the f32 size) and are scaled and
//! normalised when a batch is assembled.

mod arrays;
pub mod idx;
mod sprite;
pub mod subset;
mod text;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Arg, Error, Result};
pub use subset::{Normalize, NormalizeSpec, SplitOptions, Splits};

/// Per-sample features.
#[derive(Clone, Debug)]
pub enum Features {
    /// Pixels 0..=255, scaled to [0, 1] when batched.
    U8(Vec<u8>),
    F32(Vec<f32>),
}

#[derive(Clone, Debug)]
pub enum Samples {
    /// Fixed-shape samples (e.g. (1, 28, 28) images), sample-major.
    Dense { features: Features, shape: Vec<usize> },
    /// Raw texts.
    Text(Vec<String>),
    /// Token ids per text (after tokenisation).
    Tokens(Vec<Vec<u32>>),
}

impl Samples {
    pub fn sample_shape(&self) -> Vec<usize> {
        match self {
            Samples::Dense { shape, .. } => shape.clone(),
            _ => Vec::new(),
        }
    }
}

/// A labelled sample pool (a file's worth of data).
#[derive(Clone, Debug)]
pub struct Dataset {
    pub samples: Samples,
    pub labels: Vec<u32>,
    pub class_names: Vec<String>,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.labels.len()
    }
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }
    pub fn classes(&self) -> usize {
        self.class_names.len()
    }
}

/// What a data source yields: a training pool and, when the source has one, a separate test pool.
pub struct Source {
    pub train: Dataset,
    pub test: Option<Dataset>,
    /// The format that read it (for results lines).
    pub format: &'static str,
    pub path: PathBuf,
}

/// A format `--data FORMAT:PATH` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Idx,
    Sprite,
    Arrays,
    /// Labelled texts (`label<TAB>text` lines) as `tsv` reads them; for a causal LM, plain text.
    Text,
    Spam,
    Tsv,
}

impl Format {
    pub const ALL: [Format; 6] = [Format::Idx, Format::Sprite, Format::Arrays, Format::Text, Format::Spam, Format::Tsv];

    /// The prefix in `FORMAT:PATH`.
    pub fn name(self) -> &'static str {
        match self {
            Format::Idx => "idx",
            Format::Sprite => "sprite",
            Format::Arrays => "arrays",
            Format::Text => "text",
            Format::Spam => "spam",
            Format::Tsv => "tsv",
        }
    }
}

/// `--data`: `FORMAT:PATH`, or a bare path whose format is recognised from what it holds. A prefix that names no
/// format is part of the path. It displays as it was written (results lines and summaries show it so).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DataSpec {
    pub format: Option<Format>,
    pub path: PathBuf,
}

impl DataSpec {
    /// Never fails: text that starts with no format name is a path.
    pub fn parse(spec: &str) -> DataSpec {
        let named = spec.split_once(':').and_then(|(f, p)| Some((Format::ALL.into_iter().find(|x| x.name() == f)?, p)));
        match named {
            Some((format, path)) => DataSpec { format: Some(format), path: PathBuf::from(path) },
            None => DataSpec { format: None, path: PathBuf::from(spec) },
        }
    }
}

impl std::str::FromStr for DataSpec {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<DataSpec, Self::Err> {
        Ok(DataSpec::parse(s))
    }
}

impl std::fmt::Display for DataSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.format {
            Some(format) => write!(f, "{}:{}", format.name(), self.path.display()),
            None => write!(f, "{}", self.path.display()),
        }
    }
}

impl serde::Serialize for DataSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Reads the data `spec` names.
pub fn open(spec: &DataSpec) -> Result<Source> {
    let path = spec.path.clone();
    if !path.exists() {
        return Err(Error::usage(format!("{}: no such file or directory ({})", path.display(), Arg::Data)));
    }
    let format = match spec.format {
        Some(f) => f,
        None => detect(&path)?,
    };
    let (train, test, name) = match format {
        Format::Idx => {
            let (a, b) = idx::read_dir(&path)?;
            (a, b, "idx")
        }
        Format::Sprite => {
            let (a, b) = sprite::read_dir(&path)?;
            (a, Some(b), "sprite")
        }
        Format::Arrays => {
            let (a, b) = arrays::read_dir(&path)?;
            (a, b, "arrays")
        }
        Format::Spam => (text::read_spam_folders(&path)?, None, "spam"),
        Format::Text | Format::Tsv => {
            let (a, b) = text::read_tsv(&path)?;
            (a, b, "tsv")
        }
    };
    Ok(Source { train, test, format: name, path })
}

fn detect(path: &Path) -> Result<Format> {
    if path.is_file() {
        return Ok(Format::Tsv);
    }
    let names: Vec<String> = std::fs::read_dir(path)
        .map_err(|e| Error::io(path, e))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    if names.iter().any(|n| n.contains("idx") && n.contains("ubyte")) {
        Ok(Format::Idx)
    } else if names.iter().any(|n| n == sprite::IMAGES) {
        Ok(Format::Sprite)
    } else if names.iter().any(|n| n == arrays::META) {
        Ok(Format::Arrays)
    } else if names.iter().any(|n| n.contains("ham") || n.contains("spam")) {
        Ok(Format::Spam)
    } else if names.iter().any(|n| n.ends_with(".tsv") || n.ends_with(".txt")) {
        Ok(Format::Tsv)
    } else {
        Err(Error::usage(format!(
            "{}: cannot tell the data format (no IDX files, {}, {}, ham/spam folders or .tsv files); \
             write FORMAT:PATH (idx, sprite, arrays, spam, tsv)",
            path.display(),
            sprite::IMAGES,
            arrays::META
        )))
    }
}

/// A set of samples of one pool, in order (a split, or a shuffled epoch).
#[derive(Clone)]
pub struct Part {
    pub data: Arc<Dataset>,
    pub indices: Vec<usize>,
}

impl Part {
    pub fn len(&self) -> usize {
        self.indices.len()
    }
    pub fn is_empty(&self) -> bool {
        self.indices.is_empty()
    }
    pub fn labels(&self) -> Vec<u32> {
        self.indices.iter().map(|&i| self.data.labels[i]).collect()
    }
}

/// A batch ready for a model.
pub enum BatchInput {
    Dense(Tensor),
    Tokens { ids: Tensor, mask: Tensor },
}

/// Assembles samples `indices` of `data` into tensors of `dtype` on `device`, applying `norm` to dense features.
pub fn batch(
    data: &Dataset,
    indices: &[usize],
    norm: &Normalize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(BatchInput, Tensor)> {
    let labels: Vec<u32> = indices.iter().map(|&i| data.labels[i]).collect();
    let y = Tensor::from_vec(labels, indices.len(), device)?;
    let x = match &data.samples {
        Samples::Dense { features, shape } => {
            let per: usize = shape.iter().product();
            let channels = if shape.len() == 3 { shape[0] } else { 1 };
            let plane = per / channels.max(1);
            let mut out = vec![0f32; indices.len() * per];
            for (o, &i) in out.chunks_mut(per).zip(indices) {
                match features {
                    Features::U8(v) => {
                        for (d, &s) in o.iter_mut().zip(&v[i * per..(i + 1) * per]) {
                            *d = s as f32 / 255.0;
                        }
                    }
                    Features::F32(v) => o.copy_from_slice(&v[i * per..(i + 1) * per]),
                }
                norm.apply(o, channels, plane);
            }
            let mut dims = vec![indices.len()];
            dims.extend(shape);
            BatchInput::Dense(Tensor::from_vec(out, dims, device)?.to_dtype(dtype)?)
        }
        Samples::Tokens(toks) => {
            let len = indices.iter().map(|&i| toks[i].len()).max().unwrap_or(1).max(1);
            let mut ids = vec![0u32; indices.len() * len];
            let mut mask = vec![0u32; indices.len() * len];
            for (r, &i) in indices.iter().enumerate() {
                for (j, &t) in toks[i].iter().enumerate() {
                    ids[r * len + j] = t;
                    mask[r * len + j] = 1;
                }
            }
            BatchInput::Tokens {
                ids: Tensor::from_vec(ids, (indices.len(), len), device)?,
                mask: Tensor::from_vec(mask, (indices.len(), len), device)?,
            }
        }
        Samples::Text(_) => candle_core::bail!("texts must be tokenised before batching"),
    };
    Ok((x, y))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A known prefix is the format and the rest the path; any other text is a path; each displays as written.
    #[test]
    fn data_spec_parses_once_and_displays_as_written() {
        let cases = [
            ("idx:/d/mnist", Some(Format::Idx), "/d/mnist"),
            ("text:a:b.txt", Some(Format::Text), "a:b.txt"),
            ("tsv:x.tsv", Some(Format::Tsv), "x.tsv"),
            ("spam:", Some(Format::Spam), ""),
            ("/plain/path", None, "/plain/path"),
            ("csv:x.csv", None, "csv:x.csv"),
            ("C:/data", None, "C:/data"),
        ];
        for (text, format, path) in cases {
            let spec = DataSpec::parse(text);
            assert_eq!((spec.format, spec.path.to_str().unwrap()), (format, path), "{text}");
            assert_eq!(spec.to_string(), text);
            assert_eq!(serde_json::to_value(&spec).unwrap(), serde_json::json!(text));
        }
        for f in Format::ALL {
            assert_eq!(DataSpec::parse(&format!("{}:p", f.name())).format, Some(f));
        }
    }
}
