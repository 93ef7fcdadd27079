//! graft: offline model surgery on safetensors checkpoints.
//!
//! The flow of every command is one pipeline: open checkpoints (`checkpoint`) -> plan the output tensors -> for each
//! output tensor read its inputs, compute in f32, convert (`exec`) -> write (`checkpoint::writer`). Algorithms take
//! and return plain f32 slices and small structs, never files, so they can be tested with plain vectors; the CLI
//! (`cli`) only parses arguments, calls the library and prints.
//!
//! The library lives in the workspace's crates, one layer each (see `Cargo.toml`): graft-core, graft-ops,
//! graft-train, graft-study. This crate holds the command line and re-exports their modules under one name, so that
//! `graft::merge`, `graft::checkpoint` and the rest read as one library to tools and tests.

pub use graft_core::{alloc, checkpoint, convert, error, exec, files, gguf, names, rng, shard, Error, Result};
pub use graft_ops::{align, hub, inspect, interpolate, merge, snr, taskvec};
pub use graft_study::{experiment, report};
pub use graft_train::train;

pub mod cli;
