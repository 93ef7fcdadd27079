//! graft-core: the layer every other graft crate stands on.
//!
//! It owns how checkpoints are read and written (`checkpoint`: safetensors files, sharded directories, the commit
//! protocol that makes every output whole or absent; GGUF files behind the `gguf` feature), how stored dtypes become
//! f32 and back (`checkpoint::dtype`), the one tensor-streaming executor that reads inputs, computes in f32 and hands
//! chunks to the writer (`exec`), small whole files written atomically and read as JSON (`files`), the results-line schema that runs write
//! and reports read (`results`), checkpoint conversion (`convert`), the error type and its exit codes (`error`),
//! deterministic randomness (`rng`), the layer and module naming rules (`names`), work partitions for sharded batch
//! runs (`shard`) and the process allocator (`alloc`). Nothing here knows about merge methods, training or reports.
//!
//! ```
//! use graft_core::checkpoint::dtype::{from_f32_vec, to_f32_vec};
//! use graft_core::checkpoint::Dtype;
//!
//! // bf16 keeps 7 stored mantissa bits, so 1 + 2^-8 lies halfway between 1 and 1 + 2^-7 and 1 + 3 * 2^-8 halfway
//! // between 1 + 2^-7 and 1 + 2^-6: both round to the neighbour whose last bit is even.
//! let stored = from_f32_vec(Dtype::BF16, &[1.0 + 2f32.powi(-8), 1.0 + 3.0 * 2f32.powi(-8)]);
//! assert_eq!(to_f32_vec(Dtype::BF16, &stored), vec![1.0, 1.0 + 2f32.powi(-6)]);
//! ```

pub mod alloc;
pub mod checkpoint;
pub mod convert;
pub mod error;
pub mod exec;
pub mod files;
#[cfg(feature = "gguf")]
pub mod gguf;
pub mod names;
pub mod results;
pub mod rng;
pub mod shard;

pub use error::{Arg, Error, Result};
