//! graft's integration tests, one binary: each module tests one command or concern through the graft binary and
//! the library, against independent references (`support`). Run one module with `cargo test --release --test
//! integration MODULE::`; tests that need real data or external tools are `#[ignore]`d and say what they need.

mod support;

mod align;
mod checkpoint_io;
mod commit;
mod demo;
mod experiment_llm;
mod fuzz_headers;
mod gguf;
mod interpolate;
mod llm;
mod merge;
mod merge_corpus;
mod merge_hf_load;
mod merge_layout;
mod merge_lora;
mod merge_multi;
mod merge_parity;
mod merge_vocab;
mod report;
mod robust;
mod shard;
mod slurm;
mod snr;
mod taskvec;
mod train;
mod train_memory;
mod train_real;
mod zero_element;
