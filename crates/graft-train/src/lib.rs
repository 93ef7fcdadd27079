//! graft-train: training and evaluation on candle, over graft-core's checkpoint reader and writer (and graft-ops,
//! whose interpolation paths `train::path` evaluates).
//!
//! `train` holds the models (mlp, sepcnn, resnet20, bert, llama-family causal LMs), the datasets, selective freezing
//! from SNR selections, AdamW, the classifier and causal-LM trainers, evaluation (accuracy, F1, perplexity; along an
//! interpolation path too), memory metering and the results lines of training runs. The `cuda` feature turns on candle's CUDA backend.
//!
//! ```
//! use graft_train::train::metrics::compute;
//!
//! // Three of four right; class 1 has precision 1 and recall 1/2, so F1 2/3; class 0 precision 2/3, recall 1, F1 4/5.
//! let m = compute(&[0, 0, 1, 1], &[0, 0, 1, 0], 2, None);
//! assert_eq!(m.accuracy, 0.75);
//! assert!((m.f1_macro - (0.8 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
//! ```

// graft-core's modules under the names this crate's code has always used (`crate::checkpoint`, `crate::exec`...).
use graft_core::{alloc, checkpoint, error, exec, files, gguf, names, rng};

pub mod train;
