//! Everything about checkpoint files: reading (memory-mapped, validated), dtype conversion, the one streaming
//! writer and the way its shards reach the disk (`shard_file`), and the commit protocol that makes every output whole
//! or absent (`commit`). Nothing outside this module opens a safetensors file.

pub mod commit;
pub mod dtype;
pub mod guard;
pub(crate) mod header;
pub mod hf_config;
pub(crate) mod low_rank;
pub(crate) mod reader;
pub(crate) mod shard_file;
pub(crate) mod writer;

pub use commit::write_atomic;
pub use dtype::Dtype;
pub use low_rank::LowRankUpdate;
pub use reader::{is_gguf_path, Checkpoint, TensorInfo, TensorView, INDEX_NAME, SINGLE_NAME};
pub use writer::{CheckpointWriter, TensorDecl, WriterOptions, Written, CARRIED_FILES, DEFAULT_MAX_SHARD_SIZE};

/// Parses a size such as `5GB`, `500MB`, `2GiB` or a plain byte count (Hugging Face's decimal/binary units).
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1.0,
        "KB" => 1e3,
        "MB" => 1e6,
        "GB" => 1e9,
        "TB" => 1e12,
        "KIB" => 1024.0,
        "MIB" => 1024.0 * 1024.0,
        "GIB" => 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v = num * mult;
    (v.is_finite() && v >= 1.0).then_some(v as u64)
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes() {
        assert_eq!(super::parse_size("5GB"), Some(5_000_000_000));
        assert_eq!(super::parse_size("2MiB"), Some(2 * 1024 * 1024));
        assert_eq!(super::parse_size("1000"), Some(1000));
        assert_eq!(super::parse_size("0.5KB"), Some(500));
        assert_eq!(super::parse_size("lots"), None);
        assert_eq!(super::parse_size("0"), None);
    }
}
