//! Guards on what graft reads and writes: inputs that are not regular files (FIFOs, devices, sockets) are refused
//! before any read, and non-finite values (NaN, +-Inf) in inputs or in rounded outputs are refused or, with
//! `--allow-nonfinite`, let through with one warning line per tensor.
//!
//! The non-finite policy is process-wide, set once by the CLI before any tensor is read (the reader's views apply it
//! to inputs: `TensorView::nonfinite_found`, `TensorView::check_stored_finite`). Why not a field on
//! `Checkpoint`: the check sits in `TensorView::read_f32_range`, which every algorithm reaches through views of
//! many checkpoints opened in a dozen places (and the executor's narrowing knows no checkpoint at all); one setting
//! the CLI owns keeps every opener and kernel unchanged and cannot be forgotten on one code path. The default
//! (refuse) is what a library user gets without calling anything.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use super::dtype::Dtype;
use crate::error::{Arg, Error, Result};

static ALLOW_NONFINITE: AtomicBool = AtomicBool::new(false);

/// Tensors already warned about, so a tensor read in many chunks (or by several passes) warns once.
static WARNED: Mutex<Option<HashSet<(PathBuf, String)>>> = Mutex::new(None);

/// Sets the process-wide policy: `true` lets NaN/Inf through with a warning per tensor, `false` (the default)
/// makes them an error naming file, tensor and count.
pub fn set_allow_nonfinite(allow: bool) {
    ALLOW_NONFINITE.store(allow, Ordering::Relaxed);
}

pub fn allow_nonfinite() -> bool {
    ALLOW_NONFINITE.load(Ordering::Relaxed)
}

/// Refuses a path that is neither a directory nor a regular file: reading a FIFO blocks until a writer appears,
/// a device may never end, and neither can be memory-mapped. Checked from metadata alone, before any read.
pub fn refuse_special_file(path: &Path, meta: &std::fs::Metadata) -> Result<()> {
    if meta.is_dir() || meta.is_file() {
        return Ok(());
    }
    let kind = special_kind(meta);
    Err(Error::usage(format!("{}: is a {kind}, not a checkpoint file or directory", path.display())))
}

#[cfg(unix)]
fn special_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_fifo() {
        "FIFO (named pipe)"
    } else if t.is_socket() {
        "socket"
    } else if t.is_block_device() || t.is_char_device() {
        "device"
    } else {
        "special file"
    }
}

#[cfg(not(unix))]
fn special_kind(_meta: &std::fs::Metadata) -> &'static str {
    "special file"
}

/// Called once per output tensor with the number of its values that are NaN or infinite after rounding to its
/// stored dtype (an f32 sum that overflowed, an f32 -> f16 conversion beyond 65504, a NaN input let through).
pub fn nonfinite_output(name: &str, dtype: Dtype, numel: usize, count: usize) -> Result<()> {
    if count == 0 {
        return Ok(());
    }
    let what =
        format!("output tensor '{name}': {count} of {numel} values are NaN or infinite after rounding to {dtype}");
    if !allow_nonfinite() {
        return Err(Error::invalid(format!(
            "{what} (overflow of the output dtype, or non-finite inputs); pass {} to write them anyway",
            Arg::AllowNonfinite
        )));
    }
    warn_once(Path::new(""), name, &format!("{what}; written as they are"));
    Ok(())
}

/// Prints `line` as a warning the first time it is called for (`file`, `tensor`).
pub(crate) fn warn_once(file: &Path, tensor: &str, line: &str) {
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned.get_or_insert_with(HashSet::new).insert((file.to_path_buf(), tensor.to_string())) {
        eprintln!("graft: warning: {}", crate::error::bounded(line));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regular_files_and_directories_pass() {
        let dir = std::env::temp_dir();
        refuse_special_file(&dir, &std::fs::metadata(&dir).unwrap()).unwrap();
        let exe = std::env::current_exe().unwrap();
        refuse_special_file(&exe, &std::fs::metadata(&exe).unwrap()).unwrap();
    }

    #[cfg(unix)]
    #[test]
    fn devices_are_refused_with_a_usage_error() {
        let p = Path::new("/dev/null");
        let e = refuse_special_file(p, &std::fs::metadata(p).unwrap()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("/dev/null: is a device"), "{e}");
    }

    #[test]
    fn output_without_nonfinite_values_passes_and_with_them_is_refused() {
        // The policy is process-wide and no unit test sets it, so the default (refuse) holds here.
        nonfinite_output("w", Dtype::F16, 4, 0).unwrap();
        let e = nonfinite_output("w", Dtype::F16, 4, 3).unwrap_err().to_string();
        assert!(e.contains("'w'") && e.contains("3 of 4") && e.contains("F16"), "{e}");
    }
}
