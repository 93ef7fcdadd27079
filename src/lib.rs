//! graft: offline model surgery on safetensors checkpoints.
//!
//! The flow of every command is one pipeline: open checkpoints (`checkpoint`) -> plan the output tensors -> for each
//! output tensor read its inputs, compute in f32, convert (`exec`) -> write (`checkpoint::writer`). Algorithms take
//! and return plain f32 slices and small structs, never files, so they can be tested with plain vectors; the CLI
//! (`cli`) only parses arguments, calls the library and prints.

pub mod align;
pub mod alloc;
pub mod checkpoint;
pub mod cli;
pub mod convert;
pub mod error;
pub mod exec;
pub mod experiment;
pub mod gguf;
pub mod hub;
pub mod inspect;
pub mod interpolate;
pub mod merge;
pub mod names;
pub mod report;
pub mod rng;
pub mod shard;
pub mod snr;
pub mod taskvec;
pub mod train;

pub use error::{Error, Result};
