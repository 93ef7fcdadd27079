//! graft-ops: the operations graft performs on checkpoints, over graft-core's reader, executor and writer.
//!
//! `merge` (mergekit's methods, each one file behind `merge::method::MergeMethod`, registered by name; the planner
//! in `merge::plan`, YAML configs, SNR-selective top-p merging), `snr` (Spectrum's per-matrix signal-to-noise ratio
//! and rankings), `align` (Git Re-Basin weight matching), `taskvec` (task vectors, task arithmetic, consistency),
//! `interpolate` (checkpoints along a straight path), `inspect` (what a checkpoint holds) and `hub` (Hugging Face ids
//! resolved from the local cache). Nothing here trains, evaluates or draws. Commands with logic beyond one call are
//! typed requests with one entry point each, checked before any file is read and printing nothing (`merge::request`,
//! `merge::job`, `snr::zoo`, `align::request`, `taskvec::compare`, `taskvec::diff`, `taskvec::apply`, `inspect`,
//! `interpolate`). The `gguf` feature lets `inspect` describe GGUF files. Modules that only serve these (the method
//! files but slerp's, scratch buffers, rank selection, the planner's internals) are private to the crate.
//!
//! ```
//! use graft_ops::merge::slerp::coefficients;
//!
//! // Halfway between two orthogonal unit vectors the angle is pi/2, so each weight is sin(pi/4) / sin(pi/2).
//! let (s0, s1) = coefficients(0.5, 1.0, 1.0, 0.0);
//! assert!((s0 - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-12);
//! assert!((s1 - std::f64::consts::FRAC_1_SQRT_2).abs() < 1e-12);
//! ```

// graft-core's modules under the names this crate's code has always used (`crate::checkpoint`, `crate::exec`...).
use graft_core::{checkpoint, error, exec, files, names, rng, shard};

pub mod align;
pub mod hub;
pub mod inspect;
pub mod interpolate;
pub mod merge;
pub mod snr;
pub mod taskvec;
