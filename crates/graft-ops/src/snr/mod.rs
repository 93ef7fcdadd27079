//! Spectrum's signal-to-noise ratio of weight matrices (Hartford et al., "Spectrum"), exactly as its reference
//! implementation computes it, plus the layer-type ranking, the top-percent selection and the files other tools read.
//!
//! For one matrix W (n x m; conv weights and other N-D tensors reshaped to (first dim, rest), vectors to 1 x d):
//! S = singular values (descending); sigma = (q75 - q25) / 1.349 with linearly interpolated quantiles of S;
//! threshold = sigma * (1 + sqrt(min(n,m)/max(n,m))); signal = sum of S > threshold (0 if none); noise = sum of the
//! rest (1 if none); snr = signal / noise; the reported value is snr / S[0].
//!
//! Owns: the formula (`matrix_snr`), the scan of a checkpoint (`scan`), ranking and selection per layer type
//! (`rank_and_select`), the Spectrum JSON / axolotl YAML / selection file formats (`formats`), and the scan of a
//! model or a zoo as one typed request (`zoo`: globs, shards, resume files, per-model files). The singular values
//! themselves come from `svals`.

pub mod formats;
mod rank;
pub mod svals;
pub(crate) mod symeig;
pub mod zoo;

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Checkpoint, Dtype};
use crate::error::{Error, Result};
use crate::exec::{Executor, Read};
use crate::names::{layer_of, type_of};

pub use rank::{available_types, rank_and_select, selected_count, sort_types, Ranked, Selection, TypeRanking};

/// Singular values below `S[0] * sqrt(max(n, m)) * eps_f32` are not determined by any f32-accurate solver (they are
/// rounding noise of the solver itself), so they count as exact zeros. Without this, a matrix of exact low rank
/// scores 1 / (rounding noise), a number that changes from one solver to the next; with it, it scores infinity
/// (`NoiseZero`), which is what the formula says for it.
pub fn zero_tolerance(s_max: f64, rows: usize, cols: usize) -> f64 {
    s_max * (rows.max(cols) as f64).sqrt() * f32::EPSILON as f64
}

/// The IQR-to-sigma constant of a normal distribution, as Spectrum writes it.
pub const IQR_TO_SIGMA: f64 = 1.349;

/// What happened to one tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnrStatus {
    /// A finite score.
    Ok,
    /// Every entry is zero: no singular values to speak of, no score.
    AllZero,
    /// The tensor holds NaN or infinite entries: no score.
    NonFinite,
    /// The noise sum is exactly zero (the matrix is exactly low rank): the score is infinite and ranks first.
    NoiseZero,
    /// A 1-D (or 0-D) tensor, not scored (it would score exactly 1.0); `--include-vectors` scores it.
    #[serde(rename = "skipped_1d")]
    Skipped1d,
    /// A tensor with no elements: no score.
    Empty,
}

impl SnrStatus {
    /// The name used in JSON and tables.
    pub fn as_str(self) -> &'static str {
        match self {
            SnrStatus::Ok => "ok",
            SnrStatus::AllZero => "all_zero",
            SnrStatus::NonFinite => "non_finite",
            SnrStatus::NoiseZero => "noise_zero",
            SnrStatus::Skipped1d => "skipped_1d",
            SnrStatus::Empty => "empty",
        }
    }

    /// Whether the tensor takes part in rankings (a finite or infinite score).
    pub fn is_scored(self) -> bool {
        matches!(self, SnrStatus::Ok | SnrStatus::NoiseZero)
    }
}

/// The Spectrum quantities of one matrix. For statuses other than `Ok`/`NoiseZero` the numbers that do not exist
/// are NaN (serialised as JSON `null`); `status` says why.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MatrixSnr {
    /// The reported value: (signal / noise) / S[0]. Infinite for `NoiseZero`.
    pub snr: f64,
    /// S[0], the largest singular value.
    pub s_max: f64,
    /// (q75 - q25) / 1.349 of the singular values.
    pub sigma: f64,
    /// sigma * (1 + sqrt(beta)), the Marchenko-Pastur edge.
    pub threshold: f64,
    /// How many singular values lie strictly above the threshold.
    pub n_signal: usize,
    /// signal / noise before the division by S[0].
    pub ratio: f64,
    pub status: SnrStatus,
}

impl MatrixSnr {
    fn without_score(status: SnrStatus) -> Self {
        MatrixSnr {
            snr: f64::NAN,
            s_max: f64::NAN,
            sigma: f64::NAN,
            threshold: f64::NAN,
            n_signal: 0,
            ratio: f64::NAN,
            status,
        }
    }

    /// The ranking key: Some(score) for scored tensors (infinite for `NoiseZero`), None otherwise.
    pub fn score(&self) -> Option<f64> {
        self.status.is_scored().then_some(self.snr)
    }
}

/// Spectrum's SNR of the row-major `rows x cols` matrix `values`.
pub fn matrix_snr(values: &[f32], rows: usize, cols: usize) -> MatrixSnr {
    assert_eq!(values.len(), rows * cols, "matrix_snr: {} values for a {rows} x {cols} matrix", values.len());
    if values.is_empty() {
        return MatrixSnr::without_score(SnrStatus::Empty);
    }
    if values.iter().any(|v| !v.is_finite()) {
        return MatrixSnr::without_score(SnrStatus::NonFinite);
    }
    if values.iter().all(|&v| v == 0.0) {
        return MatrixSnr::without_score(SnrStatus::AllZero);
    }
    let s = svals::singular_values(values, rows, cols);
    snr_from_singular_values(&s, rows, cols)
}

/// The formula applied to singular values `s` (descending) of an n x m matrix. Exposed so that tests and other
/// solvers can check the formula on its own.
pub fn snr_from_singular_values(s: &[f64], rows: usize, cols: usize) -> MatrixSnr {
    if s.is_empty() {
        return MatrixSnr::without_score(SnrStatus::Empty);
    }
    if s.iter().any(|v| !v.is_finite()) {
        return MatrixSnr::without_score(SnrStatus::NonFinite);
    }
    let s_max = s[0];
    if s_max <= 0.0 {
        return MatrixSnr::without_score(SnrStatus::AllZero);
    }
    let tol = zero_tolerance(s_max, rows, cols);
    let s: Vec<f64> = s.iter().map(|&v| if v < tol { 0.0 } else { v }).collect();

    let sigma = (quantile_desc(&s, 0.75) - quantile_desc(&s, 0.25)) / IQR_TO_SIGMA;
    let (small, large) = (rows.min(cols) as f64, rows.max(cols) as f64);
    let beta = small / large;
    let threshold = sigma * (1.0 + beta.sqrt());

    let mut signal = 0.0f64;
    let mut noise = 0.0f64;
    let mut n_signal = 0usize;
    let mut n_noise = 0usize;
    for &v in &s {
        if v > threshold {
            signal += v;
            n_signal += 1;
        } else {
            noise += v;
            n_noise += 1;
        }
    }
    if n_noise == 0 {
        noise = 1.0;
    }
    let (ratio, status) =
        if noise == 0.0 { (f64::INFINITY, SnrStatus::NoiseZero) } else { (signal / noise, SnrStatus::Ok) };
    MatrixSnr { snr: ratio / s_max, s_max, sigma, threshold, n_signal, ratio, status }
}

/// The q-quantile of values sorted in descending order, with numpy's/torch's default linear interpolation between
/// the two neighbours of position (len - 1) * q in ascending order.
fn quantile_desc(desc: &[f64], q: f64) -> f64 {
    let n = desc.len();
    let asc = |i: usize| desc[n - 1 - i];
    let pos = (n - 1) as f64 * q;
    let lo = pos.floor() as usize;
    let hi = pos.ceil() as usize;
    let frac = pos - lo as f64;
    asc(lo) + (asc(hi) - asc(lo)) * frac
}

/// The matrix shape Spectrum scores a tensor as: (first dim, rest) for 2-D and more, 1 x d for vectors and scalars.
pub fn matrix_shape(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [d] => (1, *d),
        [first, rest @ ..] => (*first, rest.iter().product()),
    }
}

/// The Spectrum module name of a tensor: its name without a trailing `.weight`.
pub fn module_name(tensor: &str) -> &str {
    tensor.strip_suffix(".weight").unwrap_or(tensor)
}

/// The Spectrum layer type of a tensor: the part of its module name after the first all-digit component.
pub fn layer_type(tensor: &str) -> &str {
    type_of(module_name(tensor))
}

/// Which tensors a scan covers.
#[derive(Clone, Debug, Default)]
pub struct ScanOptions {
    /// Only tensors whose name matches.
    pub filter: Option<Regex>,
    /// Score 1-D tensors too (they score exactly 1.0) instead of listing them as skipped.
    pub include_vectors: bool,
    /// Only tensors of these layer types (Spectrum's `--types`); None scans every type.
    pub types: Option<Vec<String>>,
}

/// One scanned tensor.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TensorSnr {
    pub name: String,
    /// The Spectrum module name (tensor name without `.weight`): the key of Spectrum's JSON and axolotl's YAML.
    pub module: String,
    /// Spectrum's layer type of the module name.
    #[serde(rename = "type")]
    pub layer_type: String,
    /// The layer index (first all-digit component), if any.
    pub layer: Option<usize>,
    pub dtype: String,
    pub shape: Vec<usize>,
    /// The (rows, cols) the tensor was scored as.
    pub matrix: [usize; 2],
    #[serde(flatten)]
    pub result: MatrixSnr,
}

/// The float tensors of `ck` a scan with `opts` covers, as (index into `ck.infos()`), in storage order.
pub fn scan_targets(ck: &Checkpoint, opts: &ScanOptions) -> Vec<usize> {
    ck.infos()
        .iter()
        .enumerate()
        .filter(|(_, t)| t.dtype.is_float())
        .filter(|(_, t)| opts.filter.as_ref().is_none_or(|f| f.is_match(&t.name)))
        .filter(|(_, t)| opts.types.as_ref().is_none_or(|ts| ts.iter().any(|x| x == layer_type(&t.name))))
        .map(|(i, _)| i)
        .collect()
}

/// Peak working memory of scoring one tensor: its f32 copy, the f64 Gram matrix, the eigensolver's copy of it and
/// one f64 panel.
fn working_bytes(rows: usize, cols: usize) -> u64 {
    let k = rows.min(cols) as u64;
    4 * (rows * cols) as u64 + 3 * 8 * k * k + 8 * k * 256
}

/// Memory budget of one window of tensors scored together (always at least one tensor).
const WINDOW_BUDGET: u64 = 1 << 30;

/// Scores every float tensor of `ck` selected by `opts`, in storage order, reading one tensor at a time from the
/// memory map (a window of them in parallel on `exec`'s threads) and releasing its pages once it is widened to f32,
/// so a scan holds a window of tensors in memory, not the model. Non-float tensors are not listed.
pub fn scan(ck: &Checkpoint, exec: &Executor, opts: &ScanOptions) -> Result<Vec<TensorSnr>> {
    let targets = scan_targets(ck, opts);
    let costs: Vec<u64> = targets
        .iter()
        .map(|&i| {
            let t = &ck.infos()[i];
            let (r, c) = matrix_shape(&t.shape);
            if t.shape.len() < 2 && !opts.include_vectors {
                0
            } else {
                working_bytes(r, c)
            }
        })
        .collect();
    let mut out = Vec::with_capacity(targets.len());
    exec.map_ordered(
        &costs,
        WINDOW_BUDGET,
        "snr",
        |k| {
            let read = Read { checkpoint: ck, tensor: ck.view(targets[k]) };
            let view = read.tensor;
            let (rows, cols) = matrix_shape(view.shape);
            let result = if view.shape.len() < 2 && !opts.include_vectors {
                MatrixSnr::without_score(SnrStatus::Skipped1d)
            } else {
                let values = view.to_f32()?;
                read.release();
                if values.len() != rows * cols {
                    return Err(Error::tensor(view.file, view.name, "data size does not match its shape"));
                }
                matrix_snr(&values, rows, cols)
            };
            Ok(TensorSnr {
                name: view.name.to_string(),
                module: module_name(view.name).to_string(),
                layer_type: layer_type(view.name).to_string(),
                layer: layer_of(module_name(view.name)),
                dtype: dtype_name(view.dtype),
                shape: view.shape.to_vec(),
                matrix: [rows, cols],
                result,
            })
        },
        |_, t| {
            out.push(t);
            Ok(())
        },
    )?;
    Ok(out)
}

fn dtype_name(d: Dtype) -> String {
    d.to_string()
}

#[cfg(test)]
mod tests;
