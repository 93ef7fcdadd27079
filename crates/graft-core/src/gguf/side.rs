//! The Hugging Face side files of a GGUF input, as a directory: the `config.json` and tokenizer files that
//! `graft convert` would write beside the weights (`gguf::hf_side_files`, the one code path for both), so that every
//! consumer of a checkpoint's directory (merge and apply carrying the base's files, eval and train reading the config
//! and tokenizer, align reading the config) finds them for a `.gguf` as it does for a converted directory.
//!
//! The files are written once per GGUF per process into a private temporary directory (under the system temporary
//! directory, a few MB at most: the tokenizer is the largest) and removed when the process exits, or is interrupted
//! (the commit module's cleanup list). They are never written next to the input.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::GgufFile;
use crate::checkpoint::commit::TempDir;
use crate::checkpoint::Dtype;
use crate::error::{Error, Result};

/// Side directories made by this process, by the GGUF's canonical path.
static DIRS: Mutex<Option<HashMap<PathBuf, TempDir>>> = Mutex::new(None);

/// The directory holding the side files of GGUF `gguf`, made on first use in this process.
pub fn dir(gguf: &Path) -> Result<PathBuf> {
    let key = std::fs::canonicalize(gguf).map_err(|e| Error::io(gguf, e))?;
    let mut dirs = DIRS.lock().unwrap_or_else(|e| e.into_inner());
    let dirs = dirs.get_or_insert_with(|| {
        remove_at_exit();
        HashMap::new()
    });
    if let Some(d) = dirs.get(&key) {
        return Ok(d.path.clone());
    }
    let g = GgufFile::open(gguf)?;
    let (family, _) = super::map_llama(&g)?;
    let files = super::hf_side_files(&g, family, Dtype::F32)?;
    let stem = gguf.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let tmp = std::env::temp_dir();
    let made = TempDir::create(&tmp, &OsString::from(format!("gguf-side-{stem}"))).map_err(|e| Error::io(&tmp, e))?;
    for (name, bytes) in files {
        let path = made.path.join(&name);
        std::fs::write(&path, bytes).map_err(|e| Error::io(&path, e))?;
    }
    let path = made.path.clone();
    dirs.insert(key, made);
    Ok(path)
}

/// Registers, once, the removal of every side directory when the process exits normally (`std::process::exit`
/// and returning from `main` both run C `atexit` handlers; Rust drops no statics).
fn remove_at_exit() {
    #[cfg(unix)]
    {
        extern "C" fn remove_all() {
            // A thread still holding the lock at exit keeps its directories; the interrupt list does not apply, so
            // they are left in the temporary directory (small) rather than risking a deadlock here.
            if let Ok(mut dirs) = DIRS.try_lock() {
                dirs.take();
            }
        }
        // SAFETY: registers a plain function without captured state; failure only means the files are left behind.
        unsafe {
            libc::atexit(remove_all);
        }
    }
}
