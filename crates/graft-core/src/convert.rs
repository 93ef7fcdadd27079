//! Re-writing a checkpoint: re-sharding, changing the dtype of float tensors, renaming nothing; and turning a GGUF
//! file into a Hugging Face checkpoint (`convert_gguf`, renaming and un-permuting through `gguf`). The simplest user
//! of the pipeline (open -> plan -> stream -> write), and the round trip that proves reader and writer agree.
//!
//! `graft convert` is a typed `Request`: `validate` checks it without opening a file, `run` picks the GGUF or the
//! safetensors path, keeps the input's metadata, and carries its side files into a directory output.

use std::path::PathBuf;

use crate::checkpoint::{hf_config, Checkpoint, CheckpointWriter, Dtype, TensorDecl, WriterOptions, Written};
use crate::error::{Arg, Error, Result};
use crate::exec::{Executor, Produce};

/// One conversion.
#[derive(Clone, Debug)]
pub struct Request {
    /// A checkpoint (file, index file or directory), or a `.gguf` file.
    pub input: PathBuf,
    /// A directory (Hugging Face layout) or a single `.safetensors` file.
    pub output: PathBuf,
    /// Store float tensors as this float dtype; other tensors keep theirs. GGUF: default f32 for quantised tensors.
    pub dtype: Option<Dtype>,
    /// Copy config.json, tokenizer and generation files from the input directory (into a directory output).
    pub carry: bool,
    /// Shard size, metadata and overwrite policy; the input's files are added to `inputs`.
    pub writer: WriterOptions,
}

impl Request {
    /// The checks that need no file.
    pub fn validate(&self) -> Result<()> {
        match self.dtype {
            Some(d) if !d.is_float() => {
                Err(Error::usage(format!("{} '{d}' is not a float dtype (bf16, f16, f32, f64)", Arg::Dtype)))
            }
            _ => Ok(()),
        }
    }
}

/// Carries out a conversion (see the module header).
pub fn run(request: &Request, exec: &Executor) -> Result<Written> {
    request.validate()?;
    let mut opts = request.writer.clone();
    if crate::checkpoint::is_gguf_path(&request.input) {
        // A GGUF file becomes a Hugging Face checkpoint: nothing to carry, the config is rebuilt from its metadata.
        opts.inputs.push(request.input.clone());
        return from_gguf(request, opts, exec);
    }
    let ck = Checkpoint::open(&request.input)?;
    opts.inputs.extend(ck.files());
    // Converting keeps the model what it was: its metadata is preserved, with the caller's entries added.
    for (k, v) in ck.metadata() {
        opts.metadata.entry(k.clone()).or_insert_with(|| v.clone());
    }
    let is_dir_output = request.output.extension().is_none_or(|e| e != "safetensors");
    if request.carry && is_dir_output {
        opts.carry_from = ck.dir().map(|d| d.to_path_buf());
    }
    convert(&ck, &request.output, request.dtype, opts, exec)
}

#[cfg(feature = "gguf")]
fn from_gguf(request: &Request, opts: WriterOptions, exec: &Executor) -> Result<Written> {
    let g = crate::gguf::GgufFile::open(&request.input)?;
    convert_gguf(&g, &request.output, request.dtype, opts, exec)
}

#[cfg(not(feature = "gguf"))]
fn from_gguf(request: &Request, _: WriterOptions, _: &Executor) -> Result<Written> {
    Err(Error::format(&request.input, "reading GGUF needs graft-core's `gguf` feature, which this build leaves out"))
}

/// Plans `ck`'s tensors in storage order; float tensors take `dtype` when given, others keep theirs.
pub fn plan(ck: &Checkpoint, dtype: Option<Dtype>) -> Vec<TensorDecl> {
    ck.infos()
        .iter()
        .map(|t| {
            let d = match dtype {
                Some(d) if t.dtype.is_float() => d,
                _ => t.dtype,
            };
            TensorDecl::new(t.name.clone(), d, t.shape.clone())
        })
        .collect()
}

/// Writes `ck` to `out`: every tensor is an input written as it is (`Produce::Input`), so same dtypes are copied byte
/// for byte from the memory map, float conversions go through f32 (exact when widening, round to nearest even when
/// narrowing), and each tensor's pages are released once written.
pub fn convert(
    ck: &Checkpoint,
    out: &std::path::Path,
    dtype: Option<Dtype>,
    opts: WriterOptions,
    exec: &Executor,
) -> Result<Written> {
    let carried_config = opts.carry_from.as_ref().map(|dir| dir.join("config.json"));
    let mut writer = CheckpointWriter::create(out, plan(ck, dtype), opts)?;
    // A dtype change must show in the carried config.json too: transformers loads with `dtype="auto"` from it.
    if let (Some(d), Some(config)) = (dtype, carried_config) {
        let patch = hf_config::Patch { dtype: Some(d), ..Default::default() };
        if let Some(text) = hf_config::patched_text(&config, &patch)? {
            writer.add_file("config.json", text.into_bytes())?;
        }
    }
    exec.write(writer, "convert", |_, decl| Produce::input(ck, &decl.name))
}

/// Plans the Hugging Face checkpoint of GGUF `g`: each tensor under its Hugging Face name, in `dtype` when given,
/// otherwise F16/BF16 as stored and f32 for quantised ones (their exact dequantised values).
#[cfg(feature = "gguf")]
pub fn plan_gguf(mapped: &[crate::gguf::Mapped], dtype: Option<Dtype>) -> Vec<TensorDecl> {
    mapped
        .iter()
        .map(|m| TensorDecl::new(m.hf.clone(), dtype.unwrap_or(crate::gguf::natural_dtype(m.ggml)), m.shape.clone()))
        .collect()
}

/// Writes GGUF `g` as a Hugging Face checkpoint directory (or single file) at `out`: tensors renamed, query/key rows
/// put back in Hugging Face's rotary layout (`gguf::hf_bytes`, the bytes `Checkpoint::open` serves for a GGUF too),
/// `config.json` and tokenizer files from the metadata (`gguf::hf_side_files`). Each tensor is read and dequantised
/// when the executor asks for it, so memory holds a few tensors at a time, not the model.
#[cfg(feature = "gguf")]
pub fn convert_gguf(
    g: &crate::gguf::GgufFile,
    out: &std::path::Path,
    dtype: Option<Dtype>,
    opts: WriterOptions,
    exec: &Executor,
) -> Result<Written> {
    let (family, mapped) = crate::gguf::map_llama(g)?;
    let decls = plan_gguf(&mapped, dtype);
    let mut writer = CheckpointWriter::create(out, decls, opts)?;
    if out.extension().is_none_or(|e| e != "safetensors") {
        for (name, bytes) in crate::gguf::hf_side_files(g, family, dtype.unwrap_or(Dtype::F32))? {
            writer.add_file(&name, bytes)?;
        }
    }
    exec.write(writer, "convert", |i, decl| {
        let m = &mapped[i];
        let bytes = crate::gguf::hf_bytes(m, &g.raw(&m.gguf)?);
        let stored = crate::gguf::natural_dtype(m.ggml);
        if stored == decl.dtype && stored != Dtype::F32 {
            // F16/BF16 as stored. Dequantised (f32) values go through the writer's narrowing, which also refuses
            // non-finite values the way any computed tensor is refused.
            return Ok(Produce::Owned(bytes));
        }
        Ok(Produce::F32(crate::checkpoint::dtype::to_f32_vec(stored, &bytes)))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(input: &str, dtype: Option<Dtype>) -> Request {
        Request {
            input: PathBuf::from("/nonexistent/graft-convert-test").join(input),
            output: PathBuf::from("/nonexistent/graft-convert-test/out"),
            dtype,
            carry: true,
            writer: WriterOptions::default(),
        }
    }

    #[test]
    fn a_non_float_dtype_is_refused_before_the_input_is_opened() {
        let exec = Executor::new(Some(1)).unwrap();
        for input in ["model.safetensors", "model.gguf"] {
            let e = run(&request(input, Some(Dtype::I32)), &exec).unwrap_err();
            assert!(matches!(e, Error::Usage(_)) && e.to_string().contains("is not a float dtype"), "{e:?}");
            for dtype in [None, Some(Dtype::BF16)] {
                assert!(request(input, dtype).validate().is_ok());
                let e = run(&request(input, dtype), &exec).unwrap_err();
                assert!(!matches!(e, Error::Usage(_)), "a valid request opens its input: {e:?}");
            }
        }
    }
}
