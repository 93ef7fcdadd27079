//! GGUF (llama.cpp) checkpoints as an input: opening and validating a file through candle-core's GGUF reader, its
//! metadata and tensor table in storage order, per-tensor dequantisation (candle's decoders, never our own), and the
//! llama-family mapping to Hugging Face: tensor names, the inverse of llama.cpp's rotary row permutation of the query
//! and key projections, and `config.json` from the metadata. `graft convert MODEL.gguf -o DIR` is built on this
//! (`convert::convert_gguf`); `graft inspect MODEL.gguf` on `GgufFile::summary`. The tokenizer files are rebuilt
//! from the vocabulary in `tokenizer`; rotary scaling (metadata, Llama 3's `rope_freqs` tensor) becomes the config's
//! `rope_scaling` in `rope`.

pub mod rope;
pub mod side;
pub(crate) mod tokenizer;

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::GgmlDType;
use candle_core::Device;
use serde::Serialize;

use crate::checkpoint::Dtype;
use crate::error::{Error, Result};

/// One tensor of the file, in torch order (candle reverses GGUF's innermost-first dims on read).
#[derive(Clone, Debug, Serialize)]
pub struct GgufTensor {
    pub name: String,
    /// The stored type as llama.cpp names it (F32, F16, Q4_1, Q6_K, ...).
    pub quant: String,
    pub shape: Vec<usize>,
    pub offset: u64,
    pub bytes: u64,
    #[serde(skip)]
    pub ggml: GgmlDType,
}

/// An opened GGUF file whose every tensor was checked to lie inside it.
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    content: Content,
    tensors: Vec<GgufTensor>,
}

/// llama.cpp's name of a ggml type.
pub fn quant_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::F32 => "F32",
        GgmlDType::F16 => "F16",
        GgmlDType::BF16 => "BF16",
        GgmlDType::Q4_0 => "Q4_0",
        GgmlDType::Q4_1 => "Q4_1",
        GgmlDType::Q5_0 => "Q5_0",
        GgmlDType::Q5_1 => "Q5_1",
        GgmlDType::Q8_0 => "Q8_0",
        GgmlDType::Q8_1 => "Q8_1",
        GgmlDType::Q2K => "Q2_K",
        GgmlDType::Q3K => "Q3_K",
        GgmlDType::Q4K => "Q4_K",
        GgmlDType::Q5K => "Q5_K",
        GgmlDType::Q6K => "Q6_K",
        GgmlDType::Q8K => "Q8_K",
    }
}

/// Runs `f`, turning a candle panic on malformed input into an error for `path`.
fn guarded<T>(path: &Path, what: &str, f: impl FnOnce() -> candle_core::Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Error::format(path, format!("{what}: {e}"))),
        Err(_) => Err(Error::format(path, format!("{what}: the GGUF reader failed on malformed input"))),
    }
}

impl GgufFile {
    /// Reads the header, metadata and tensor table, and checks every tensor's data range against the file's length.
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        let len = file.metadata().map_err(|e| Error::io(path, e))?.len();
        let mut r = BufReader::new(file);
        let content = guarded(path, "not a readable GGUF file", || Content::read(&mut r)).map_err(|e| {
            // candle names an unknown ggml type as "unknown dtype for tensor N": say what that means.
            let s = e.to_string();
            if s.contains("unknown dtype") {
                Error::format(path, format!("unsupported quantisation type ({})", s.rsplit(": ").next().unwrap_or(&s)))
            } else {
                e
            }
        })?;
        let mut tensors: Vec<GgufTensor> = content
            .tensor_infos
            .iter()
            .map(|(name, info)| {
                let numel = info.shape.elem_count();
                let bytes = (numel / info.ggml_dtype.block_size() * info.ggml_dtype.type_size()) as u64;
                GgufTensor {
                    name: name.clone(),
                    quant: quant_name(info.ggml_dtype).to_string(),
                    shape: info.shape.dims().to_vec(),
                    offset: info.offset,
                    bytes,
                    ggml: info.ggml_dtype,
                }
            })
            .collect();
        tensors.sort_by(|a, b| (a.offset, &a.name).cmp(&(b.offset, &b.name)));
        for t in &tensors {
            let block = t.ggml.block_size();
            let numel: usize = t.shape.iter().product();
            if !numel.is_multiple_of(block) {
                return Err(Error::tensor(
                    path,
                    &t.name,
                    format!("{numel} elements are not a whole number of {} blocks of {block}", t.quant),
                ));
            }
            let end = content.tensor_data_offset.saturating_add(t.offset).saturating_add(t.bytes);
            if end > len {
                return Err(Error::tensor(
                    path,
                    &t.name,
                    format!("data ends at byte {end} but the file has {len} bytes (truncated?)"),
                ));
            }
        }
        Ok(GgufFile { path: path.to_path_buf(), content, tensors })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Tensors in storage order.
    pub fn tensors(&self) -> &[GgufTensor] {
        &self.tensors
    }

    pub fn tensor_info(&self, name: &str) -> Option<&GgufTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        match self.content.metadata.get("general.architecture") {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    pub fn metadata(&self) -> &std::collections::HashMap<String, Value> {
        &self.content.metadata
    }

    /// Metadata as display strings, sorted by key; arrays longer than 8 show their length and first items only.
    pub fn metadata_strings(&self) -> BTreeMap<String, String> {
        self.content.metadata.iter().map(|(k, v)| (k.clone(), value_string(v))).collect()
    }

    /// A metadata number as u64 (any integer type).
    pub fn meta_u64(&self, key: &str) -> Option<u64> {
        let v = self.content.metadata.get(key)?;
        v.to_u64().ok().or_else(|| v.to_u32().ok().map(u64::from)).or_else(|| {
            v.to_i32()
                .ok()
                .and_then(|x| u64::try_from(x).ok())
                .or_else(|| v.to_i64().ok().and_then(|x| x.try_into().ok()))
        })
    }

    /// A metadata number as f64 (float or integer).
    pub fn meta_f64(&self, key: &str) -> Option<f64> {
        let v = self.content.metadata.get(key)?;
        // An f32 is widened through its shortest decimal form, so 1e-5 stays 1e-5 in config.json.
        v.to_f32()
            .ok()
            .and_then(|x| x.to_string().parse::<f64>().ok())
            .or_else(|| v.to_f64().ok())
            .or_else(|| self.meta_u64(key).map(|x| x as f64))
    }

    fn read_qtensor(&self, name: &str) -> Result<candle_core::quantized::QTensor> {
        let file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let mut r = BufReader::new(file);
        guarded(&self.path, &format!("tensor '{name}'"), || self.content.tensor(&mut r, name, &Device::Cpu))
    }

    /// Tensor `name` dequantised to f32 by candle (exact for F32, F16 and BF16).
    pub fn dequantize(&self, name: &str) -> Result<Vec<f32>> {
        let q = self.read_qtensor(name)?;
        guarded(&self.path, &format!("tensor '{name}': dequantising"), || {
            q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()
        })
    }

    /// The stored bytes of tensor `name` (little-endian values for F32, F16 and BF16), read from the file.
    pub fn raw(&self, name: &str) -> Result<Vec<u8>> {
        use std::io::{Read, Seek, SeekFrom};
        let t = self
            .tensor_info(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "no such tensor in this GGUF file"))?;
        let mut file = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
        let mut raw = vec![0u8; t.bytes as usize];
        file.seek(SeekFrom::Start(self.data_offset() + t.offset))
            .and_then(|_| file.read_exact(&mut raw))
            .map_err(|e| Error::io(&self.path, e))?;
        Ok(raw)
    }

    /// Where the tensor data section starts in the file (tensor offsets count from here).
    pub fn data_offset(&self) -> u64 {
        self.content.tensor_data_offset
    }

    /// What `graft inspect` shows of the file.
    pub fn summary(&self) -> GgufSummary {
        let mut quants: BTreeMap<String, QuantTotals> = BTreeMap::new();
        for t in &self.tensors {
            let q = quants.entry(t.quant.clone()).or_default();
            q.tensors += 1;
            q.params += t.shape.iter().product::<usize>() as u64;
            q.bytes += t.bytes;
        }
        GgufSummary {
            path: self.path.display().to_string(),
            format: "gguf".into(),
            version: format!("{:?}", self.content.magic),
            architecture: self.architecture().map(str::to_string),
            tensors_count: self.tensors.len(),
            params: self.tensors.iter().map(|t| t.shape.iter().product::<usize>() as u64).sum(),
            bytes: self.tensors.iter().map(|t| t.bytes).sum(),
            quants,
            metadata: self.metadata_strings(),
            tensors: self.tensors.clone(),
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct QuantTotals {
    pub tensors: usize,
    pub params: u64,
    pub bytes: u64,
}

/// The `graft inspect` record of a GGUF file.
#[derive(Debug, Serialize)]
pub struct GgufSummary {
    pub path: String,
    pub format: String,
    pub version: String,
    pub architecture: Option<String>,
    #[serde(rename = "tensor_count")]
    pub tensors_count: usize,
    pub params: u64,
    pub bytes: u64,
    pub quants: BTreeMap<String, QuantTotals>,
    pub metadata: BTreeMap<String, String>,
    pub tensors: Vec<GgufTensor>,
}

fn value_string(v: &Value) -> String {
    match v {
        Value::U8(x) => x.to_string(),
        Value::I8(x) => x.to_string(),
        Value::U16(x) => x.to_string(),
        Value::I16(x) => x.to_string(),
        Value::U32(x) => x.to_string(),
        Value::I32(x) => x.to_string(),
        Value::U64(x) => x.to_string(),
        Value::I64(x) => x.to_string(),
        Value::F32(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        Value::Bool(x) => x.to_string(),
        Value::String(s) if s.chars().count() > 200 => {
            format!("{:?}... ({} chars)", s.chars().take(80).collect::<String>(), s.chars().count())
        }
        Value::String(s) => format!("{s:?}"),
        Value::Array(a) if a.len() > 8 => {
            let head: Vec<String> = a.iter().take(4).map(value_string).collect();
            format!("[{}, ...] ({} items)", head.join(", "), a.len())
        }
        Value::Array(a) => format!("[{}]", a.iter().map(value_string).collect::<Vec<_>>().join(", ")),
    }
}

/// The dtype a GGUF tensor is written as by default: F16 and BF16 as stored, everything else as f32 (the exact
/// dequantised values).
pub fn natural_dtype(t: GgmlDType) -> Dtype {
    match t {
        GgmlDType::F16 => Dtype::F16,
        GgmlDType::BF16 => Dtype::BF16,
        _ => Dtype::F32,
    }
}

/// The llama-family architectures graft maps, and what differs between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// `llama` (Llama, Mistral, SmolLM2 are all written as `llama` by llama.cpp): q/k rows permuted for rotary.
    Llama,
    /// `qwen2`: rotary in the NeoX layout, so llama.cpp leaves q/k alone; q/k/v carry biases.
    Qwen2,
}

impl Family {
    pub fn of(arch: &str) -> Option<Family> {
        match arch {
            "llama" => Some(Family::Llama),
            "qwen2" => Some(Family::Qwen2),
            _ => None,
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Qwen2 => "qwen2",
        }
    }

    fn permutes_qk(self) -> bool {
        self == Family::Llama
    }
}

/// The Hugging Face name of GGUF tensor `name` in the llama family, or None when it has none.
pub fn hf_name(name: &str) -> Option<String> {
    let (stem, suffix) = name.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let top = match stem {
        "token_embd" => Some("model.embed_tokens"),
        "output_norm" => Some("model.norm"),
        "output" => Some("lm_head"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(format!("{t}.{suffix}"));
    }
    let rest = stem.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// llama.cpp's converter's permutation of a query/key projection's rows (`LlamaModel.permute`): within each of
/// `n_head` heads of `head_dim` rows, HF row `i * head_dim/2 + j` (i in 0..2, j in 0..head_dim/2) moves to row
/// `2 * j + i`, interleaving the two rotary halves. `row_len` elements make a row (1 for a bias).
pub fn permute_rows<T: Clone>(data: &[T], row_len: usize, n_head: usize) -> Vec<T> {
    move_rows(data, row_len, n_head, true)
}

/// The inverse of `permute_rows`: GGUF's interleaved rotary rows back to Hugging Face's two halves.
pub fn unpermute_rows<T: Clone>(data: &[T], row_len: usize, n_head: usize) -> Vec<T> {
    move_rows(data, row_len, n_head, false)
}

fn move_rows<T: Clone>(data: &[T], row_len: usize, n_head: usize, forward: bool) -> Vec<T> {
    let rows = data.len() / row_len;
    let head_dim = rows / n_head;
    let half = head_dim / 2;
    let mut out = Vec::with_capacity(data.len());
    for dst in 0..rows {
        let (h, r) = (dst / head_dim, dst % head_dim);
        // forward: dst is a GGUF row 2j+i, taking HF row i*half+j; inverse: dst is HF row i*half+j, taking 2j+i.
        let src_in_head = if forward { (r % 2) * half + r / 2 } else { (r % half) * 2 + r / half };
        let src = h * head_dim + src_in_head;
        out.extend_from_slice(&data[src * row_len..(src + 1) * row_len]);
    }
    out
}

/// How one output tensor is made from the GGUF.
#[derive(Clone, Debug)]
pub struct Mapped {
    pub gguf: String,
    pub hf: String,
    pub shape: Vec<usize>,
    pub ggml: GgmlDType,
    /// Undo the rotary permutation over this many heads.
    pub unpermute_heads: Option<usize>,
}

/// The llama-family plan of `g`: every tensor mapped to its Hugging Face name, or an error naming the first that
/// graft cannot place, or the architecture when it is not one graft maps.
pub fn map_llama(g: &GgufFile) -> Result<(Family, Vec<Mapped>)> {
    let arch = g.architecture().ok_or_else(|| Error::format(g.path(), "no general.architecture in the metadata"))?;
    let family = Family::of(arch).ok_or_else(|| {
        Error::format(
            g.path(),
            format!("architecture '{arch}' is not supported (graft maps the llama family: llama, qwen2)"),
        )
    })?;
    let key = |k: &str| format!("{}.{k}", family.prefix());
    let n_head = g
        .meta_u64(&key("attention.head_count"))
        .ok_or_else(|| Error::format(g.path(), format!("metadata has no {}", key("attention.head_count"))))?
        as usize;
    let n_kv = g.meta_u64(&key("attention.head_count_kv")).map(|x| x as usize).unwrap_or(n_head);
    // `rope_freqs.weight` becomes the config's rope_scaling, not a tensor; it is checked here, so that no command
    // reads a model whose scaling would be lost.
    rope::rope_scaling(g, family)?;
    let mut out = Vec::new();
    for t in g.tensors().iter().filter(|t| t.name != "rope_freqs.weight") {
        let hf = hf_name(&t.name).ok_or_else(|| {
            Error::tensor(g.path(), &t.name, format!("no Hugging Face counterpart in the {arch} mapping"))
        })?;
        let heads = if !family.permutes_qk() {
            None
        } else if t.name.contains(".attn_q.") {
            Some(n_head)
        } else if t.name.contains(".attn_k.") {
            Some(n_kv)
        } else {
            None
        };
        if let Some(h) = heads {
            let rows = t.shape.first().copied().unwrap_or(0);
            if h == 0 || !rows.is_multiple_of(h) || !(rows / h).is_multiple_of(2) {
                return Err(Error::tensor(
                    g.path(),
                    &t.name,
                    format!("{rows} rows do not split into {h} heads of an even size"),
                ));
            }
        }
        out.push(Mapped { gguf: t.name.clone(), hf, shape: t.shape.clone(), ggml: t.ggml, unpermute_heads: heads });
    }
    Ok((family, out))
}

/// `config.json` for the Hugging Face checkpoint, from the metadata (`dtype` is the dtype the weights are written
/// in).
pub fn hf_config(g: &GgufFile, family: Family, dtype: Dtype) -> Result<serde_json::Value> {
    let p = family.prefix();
    let need_u = |k: &str| {
        g.meta_u64(&format!("{p}.{k}")).ok_or_else(|| Error::format(g.path(), format!("metadata has no {p}.{k}")))
    };
    let n_head = need_u("attention.head_count")?;
    let hidden = need_u("embedding_length")?;
    let vocab = g
        .tensor_info("token_embd.weight")
        .map(|t| t.shape[0] as u64)
        .ok_or_else(|| Error::format(g.path(), "no token_embd.weight tensor"))?;
    let tied = g.tensor_info("output.weight").is_none();
    let mut c = serde_json::json!({
        "architectures": [match family { Family::Llama => "LlamaForCausalLM", Family::Qwen2 => "Qwen2ForCausalLM" }],
        "model_type": p,
        "hidden_size": hidden,
        "intermediate_size": need_u("feed_forward_length")?,
        "num_hidden_layers": need_u("block_count")?,
        "num_attention_heads": n_head,
        "num_key_value_heads": g.meta_u64(&format!("{p}.attention.head_count_kv")).unwrap_or(n_head),
        "head_dim": hidden / n_head,
        "hidden_act": "silu",
        "rms_norm_eps": g.meta_f64(&format!("{p}.attention.layer_norm_rms_epsilon")).unwrap_or(1e-6),
        "rope_theta": g.meta_f64(&format!("{p}.rope.freq_base")).unwrap_or(10000.0),
        "max_position_embeddings": g.meta_u64(&format!("{p}.context_length")).unwrap_or(2048),
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "torch_dtype": match dtype { Dtype::F16 => "float16", Dtype::BF16 => "bfloat16", Dtype::F64 => "float64", _ => "float32" },
    });
    if let Some(k) = g.meta_u64(&format!("{p}.attention.key_length")) {
        c["head_dim"] = k.into();
    }
    for (key, field) in
        [("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")]
    {
        if let Some(v) = g.meta_u64(key) {
            c[field] = v.into();
        }
    }
    if family == Family::Qwen2 {
        c["attention_bias"] = true.into();
    }
    if let Some(scaling) = rope::rope_scaling(g, family)? {
        c["rope_scaling"] = scaling;
    }
    Ok(c)
}

/// Elements of a quantised tensor decoded to f32 by candle's decoder for its block type (`GgmlType::to_float`),
/// from `raw`, the tensor's stored bytes (a whole number of blocks: `GgufFile::open` checks it). Plain float types
/// are widened exactly.
pub fn dequantize_raw(ggml: GgmlDType, raw: &[u8]) -> Vec<f32> {
    use candle_core::quantized::k_quants::*;
    match ggml {
        GgmlDType::F32 => crate::checkpoint::dtype::to_f32_vec(Dtype::F32, raw),
        GgmlDType::F16 => crate::checkpoint::dtype::to_f32_vec(Dtype::F16, raw),
        GgmlDType::BF16 => crate::checkpoint::dtype::to_f32_vec(Dtype::BF16, raw),
        GgmlDType::Q4_0 => decode_blocks::<BlockQ4_0>(raw),
        GgmlDType::Q4_1 => decode_blocks::<BlockQ4_1>(raw),
        GgmlDType::Q5_0 => decode_blocks::<BlockQ5_0>(raw),
        GgmlDType::Q5_1 => decode_blocks::<BlockQ5_1>(raw),
        GgmlDType::Q8_0 => decode_blocks::<BlockQ8_0>(raw),
        GgmlDType::Q8_1 => decode_blocks::<BlockQ8_1>(raw),
        GgmlDType::Q2K => decode_blocks::<BlockQ2K>(raw),
        GgmlDType::Q3K => decode_blocks::<BlockQ3K>(raw),
        GgmlDType::Q4K => decode_blocks::<BlockQ4K>(raw),
        GgmlDType::Q5K => decode_blocks::<BlockQ5K>(raw),
        GgmlDType::Q6K => decode_blocks::<BlockQ6K>(raw),
        GgmlDType::Q8K => decode_blocks::<BlockQ8K>(raw),
    }
}

fn decode_blocks<T: candle_core::quantized::k_quants::GgmlType>(raw: &[u8]) -> Vec<f32> {
    let size = std::mem::size_of::<T>();
    let n = raw.len() / size;
    // The stored bytes are copied into a vector of blocks because a block's fields (f16 scales, f32 in Q8_K) need
    // an alignment a byte slice of the file does not promise.
    let mut blocks: Vec<T> = Vec::with_capacity(n);
    // SAFETY: candle's blocks are `repr(C)` structs of integers and f16/f32 fields, for which every bit pattern is a
    // value, and `size_of::<T>()` is the type's stored block size (candle reads files the same way); exactly
    // `n * size` bytes are copied into the vector's capacity before its length is set.
    unsafe {
        std::ptr::copy_nonoverlapping(raw.as_ptr(), blocks.as_mut_ptr() as *mut u8, n * size);
        blocks.set_len(n);
    }
    let mut out = vec![0f32; n * T::BLCK_SIZE];
    T::to_float(&blocks, &mut out);
    out
}

/// Tensor `m` as Hugging Face stores it, from its GGUF bytes `raw`: the little-endian bytes of
/// `natural_dtype(m.ggml)` (F16, BF16 and F32 exactly as stored, quantised types dequantised by candle), with the
/// query/key rows moved back to Hugging Face's rotary layout. `graft convert` writes these bytes, and
/// `Checkpoint::open` serves them.
pub fn hf_bytes(m: &Mapped, raw: &[u8]) -> Vec<u8> {
    let row_len = m.shape.iter().skip(1).product::<usize>().max(1);
    let stored = natural_dtype(m.ggml);
    let bytes: Vec<u8> = if is_float_storage(m.ggml) {
        raw.to_vec()
    } else {
        dequantize_raw(m.ggml, raw).iter().flat_map(|x| x.to_le_bytes()).collect()
    };
    match m.unpermute_heads {
        Some(h) => unpermute_rows(&bytes, row_len * stored.size(), h),
        None => bytes,
    }
}

/// Whether `hf_bytes` of `m` are its stored bytes unchanged (a float type, no rows to move): such a tensor can be
/// read in place from the file.
pub fn is_stored_as_is(m: &Mapped) -> bool {
    is_float_storage(m.ggml) && m.unpermute_heads.is_none()
}

fn is_float_storage(t: GgmlDType) -> bool {
    matches!(t, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

/// The files `graft convert` writes beside the weights of GGUF `g` (weights in `dtype`): `config.json` from the
/// metadata and, where the vocabulary can be rebuilt, the tokenizer files (otherwise a warning says why there are
/// none). A GGUF opened as a checkpoint offers the same files (`side::dir`).
pub fn hf_side_files(g: &GgufFile, family: Family, dtype: Dtype) -> Result<Vec<(String, Vec<u8>)>> {
    let config = hf_config(g, family, dtype)?;
    let mut files =
        vec![("config.json".to_string(), (serde_json::to_string_pretty(&config).unwrap() + "\n").into_bytes())];
    match tokenizer::hf_tokenizer_files(g)? {
        Ok(tok) => files.extend(tok.into_iter().map(|(n, b)| (n.to_string(), b))),
        Err(reason) => eprintln!("graft: warning: {}: no tokenizer files: {reason}", g.path().display()),
    }
    Ok(files)
}
