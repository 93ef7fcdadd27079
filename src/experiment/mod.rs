//! `graft experiment`: the SNR-selective merging study as a plan of steps (train base and experts, align, SNR,
//! merge, consistency, zero-shot evaluation, selective fine-tuning), run resumably over seeds, with one results line
//! per fine-tuning run for `graft report`.

pub mod plan;
pub mod runner;

pub use plan::{Freeze, Plan, Stage};
