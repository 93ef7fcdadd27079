//! Opening checkpoints: one `.safetensors` file, or a directory with `model.safetensors` or shards plus
//! `model.safetensors.index.json`. Every file is memory-mapped; tensors are exposed as zero-copy views. A directory is
//! opened once, under a shared lock, and its files are resolved relative to that handle (`DirHandle`).
//!
//! A `.gguf` file (llama.cpp) opens as the Hugging Face checkpoint `graft convert` would write from it: Hugging Face
//! names and layouts (`gguf::map_llama`, `gguf::hf_bytes`), F32/F16/BF16 tensors as stored and quantised ones as
//! their f32 values dequantised by candle. Tensors whose bytes are the stored ones (float types other than the
//! permuted query/key projections) are zero-copy views into the memory-mapped file like safetensors ones. The others
//! are decoded on first access into a buffer owned by the checkpoint (`OnceLock`, so concurrent readers share one
//! decode): memory cost is the f32 (or F16/BF16) size of every such tensor a command touches, held until the
//! checkpoint is dropped, because views borrow it. `release` drops the mapped pages of the stored (quantised) bytes
//! only. `dir()` of a GGUF is a private directory with the `config.json` and tokenizer files convert would write
//! (`gguf::side`).
//!
//! A tensor may be given a low-rank update (`set_update`, a LoRA adapter's `B @ A`): its views then read the updated
//! values range by range (`super::low_rank`), while their `data` stays the stored bytes, which page release acts on.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};
#[cfg(feature = "gguf")]
use std::sync::OnceLock;

use memmap2::Mmap;

use super::dtype::{self, Dtype};
use super::header;
use super::low_rank::LowRankUpdate;
use crate::error::{Arg, Error, Result};

pub const INDEX_NAME: &str = "model.safetensors.index.json";
pub const SINGLE_NAME: &str = "model.safetensors";

/// A zero-copy view of one tensor inside a memory-mapped file, possibly with a low-rank update applied on read.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    /// The stored bytes. For a view with an `update` these are the weight before the update: what page release acts
    /// on, never the values read (those come from the reading methods).
    pub data: &'a [u8],
    pub file: &'a Path,
    /// A low-rank update every read applies (`super::low_rank`); None for a tensor read as stored.
    pub update: Option<&'a LowRankUpdate>,
}

impl<'a> TensorView<'a> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_float(&self) -> bool {
        self.dtype.is_float()
    }

    /// Whether the stored bytes are the values read (no update): byte copies and fast paths on the stored bits
    /// need that.
    pub fn is_stored(&self) -> bool {
        self.update.is_none()
    }

    /// The whole tensor widened to f32. Errors for non-float dtypes, naming file and tensor.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.check_float()?;
        if self.update.is_none() {
            return Ok(dtype::to_f32_vec(self.dtype, self.data));
        }
        let mut out = vec![0f32; self.numel()];
        for (c, o) in out.chunks_mut(dtype::CONVERT_CHUNK).enumerate() {
            let start = c * dtype::CONVERT_CHUNK;
            self.read_counting(start..start + o.len(), o);
        }
        Ok(out)
    }

    /// Elements `range` widened to f32 into `out` (`out.len() == range.len()`).
    pub fn read_f32_range(&self, range: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        self.check_float()?;
        if range.end > self.numel() || out.len() != range.len() {
            return Err(Error::tensor(self.file, self.name, format!("element range {range:?} outside the tensor")));
        }
        // Counting non-finite values in the same blocks as the conversion keeps the check free of an extra pass.
        if self.read_counting(range, out) > 0 {
            self.nonfinite_found()?;
        }
        Ok(())
    }

    /// Elements `range` (within the tensor) as f32 into `out`, returning how many are NaN or infinite. With an
    /// update: `W`'s elements widened, the update added (`LowRankUpdate::add_to`), then rounded to the stored dtype
    /// and widened again, as storing the updated weight and reading it would.
    fn read_counting(&self, range: std::ops::Range<usize>, out: &mut [f32]) -> usize {
        let s = self.dtype.size();
        let stored = &self.data[range.start * s..range.end * s];
        let Some(update) = self.update else { return dtype::to_f32_counting(self.dtype, stored, out) };
        dtype::to_f32(self.dtype, stored, out);
        update.add_to(range, out);
        if self.dtype == Dtype::F32 {
            return dtype::count_nonfinite(out);
        }
        let mut narrowed = Vec::with_capacity(stored.len());
        dtype::from_f32(self.dtype, out, &mut narrowed);
        dtype::to_f32_counting(self.dtype, &narrowed, out)
    }

    /// Called when a read found non-finite values: counts them over the whole tensor once, then errors or (with the
    /// `guard` policy set to allow them) warns once for this tensor and lets the values through.
    pub fn nonfinite_found(&self) -> Result<()> {
        let mut count = 0usize;
        let mut buf = vec![0f32; dtype::CONVERT_CHUNK];
        let n = self.numel();
        for start in (0..n).step_by(dtype::CONVERT_CHUNK) {
            let end = (start + dtype::CONVERT_CHUNK).min(n);
            count += self.read_counting(start..end, &mut buf[..end - start]);
        }
        let what = format!(
            "{count} of {} values are NaN or infinite{}{}",
            self.numel(),
            if self.dtype == Dtype::F64 { " (in f32, which graft computes in)" } else { "" },
            match self.update {
                Some(u) => format!(" with the LoRA update from {} applied", u.origin().display()),
                None => String::new(),
            }
        );
        if !super::guard::allow_nonfinite() {
            return Err(Error::tensor(
                self.file,
                self.name,
                format!("{what}; pass {} to use them anyway", Arg::AllowNonfinite),
            ));
        }
        let line = format!("{}: tensor '{}': {what}; let through", self.file.display(), self.name);
        super::guard::warn_once(self.file, self.name, &line);
        Ok(())
    }

    /// For float tensors copied as stored bytes (no widening to scan on the way): counts non-finite values in the
    /// stored bits and applies the same policy as a widening read.
    pub fn check_stored_finite(&self) -> Result<()> {
        if self.update.is_some() {
            return Err(Error::tensor(self.file, self.name, "internal: a copy of stored bytes of an updated tensor"));
        }
        if self.is_float() && dtype::count_nonfinite_stored(self.dtype, self.data) > 0 {
            return self.nonfinite_found();
        }
        Ok(())
    }

    /// Elements `range` widened to a fresh f32 vector.
    pub fn f32_range(&self, range: std::ops::Range<usize>) -> Result<Vec<f32>> {
        let mut out = vec![0f32; range.len()];
        self.read_f32_range(range, &mut out)?;
        Ok(out)
    }

    fn check_float(&self) -> Result<()> {
        if self.dtype.is_float() {
            Ok(())
        } else {
            Err(Error::tensor(self.file, self.name, format!("dtype {} is not a float type", self.dtype)))
        }
    }
}

#[derive(Debug)]
struct Shard {
    path: PathBuf,
    map: Mmap,
    data_start: usize,
}

#[derive(Clone, Debug)]
pub struct TensorInfo {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    shard: usize,
    begin: usize,
    end: usize,
}

impl TensorInfo {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> usize {
        self.end - self.begin
    }
}

/// An opened, validated checkpoint. Tensors are ordered by (shard, offset): the order in which streaming them
/// reads each file front to back.
#[derive(Debug)]
pub struct Checkpoint {
    path: PathBuf,
    dir: Option<PathBuf>,
    index: Option<PathBuf>,
    shards: Vec<Shard>,
    tensors: Vec<TensorInfo>,
    by_name: HashMap<String, usize>,
    metadata: BTreeMap<String, String>,
    /// For a GGUF file: how each tensor is made from it (parallel to `tensors`) and its side-file directory.
    gguf: Option<GgufTensors>,
    /// Low-rank updates applied when tensors are read (index into `tensors` -> update; `set_update`).
    updates: HashMap<usize, LowRankUpdate>,
}

/// Whether `path` names a GGUF file (by its extension, as llama.cpp names them).
pub fn is_gguf_path(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The GGUF part of a checkpoint: the one shard is the GGUF file's map.
#[cfg(feature = "gguf")]
#[derive(Debug)]
struct GgufTensors {
    slots: Vec<GgufSlot>,
    side_dir: OnceLock<Option<PathBuf>>,
}

/// Built without the `gguf` feature no checkpoint has a GGUF part: the type has no values.
#[cfg(not(feature = "gguf"))]
#[derive(Debug)]
enum GgufTensors {}

#[cfg(feature = "gguf")]
struct GgufSlot {
    mapped: crate::gguf::Mapped,
    /// The stored bytes' range in the map.
    raw: std::ops::Range<usize>,
    /// The stored bytes are the Hugging Face bytes: view them in place.
    in_place: bool,
    /// Otherwise the decoded bytes, made on first access.
    decoded: OnceLock<Box<[u8]>>,
}

#[cfg(feature = "gguf")]
impl std::fmt::Debug for GgufSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufSlot")
            .field("gguf", &self.mapped.gguf)
            .field("raw", &self.raw)
            .field("in_place", &self.in_place)
            .field("decoded", &self.decoded.get().map(|d| d.len()))
            .finish()
    }
}

impl Checkpoint {
    /// Opens a `.safetensors` file, an index file, or a checkpoint directory.
    ///
    /// A directory is opened once and its index and shards are resolved relative to that handle, under a shared
    /// lock on it: a writer swapping a new checkpoint into its place meanwhile cannot hand this reader half of each
    /// (`docs/outputs.md`).
    pub fn open(path: impl AsRef<Path>) -> Result<Checkpoint> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        super::guard::refuse_special_file(path, &meta)?;
        if meta.is_dir() {
            let dir = DirHandle::open(path)?;
            if dir.is_file(INDEX_NAME) {
                return Self::open_index(path, &dir, &path.join(INDEX_NAME));
            }
            if dir.is_file(SINGLE_NAME) {
                return Self::open_files(path, Some(&dir), None, vec![path.join(SINGLE_NAME)], None);
            }
            let mut found: Vec<String> = dir
                .list()
                .map_err(|e| Error::io(path, e))?
                .into_iter()
                .filter(|n| n.ends_with(".safetensors") && !n.starts_with('.'))
                .collect();
            found.sort();
            return Err(match found.as_slice() {
                [] => Error::format(path, format!("directory holds neither {SINGLE_NAME} nor {INDEX_NAME}")),
                [one] => Error::format(
                    path,
                    format!(
                        "directory holds {one} but neither {SINGLE_NAME} nor {INDEX_NAME}, so it is not a whole \
                         checkpoint; open {one} itself if it is one"
                    ),
                ),
                many => Error::format(
                    path,
                    format!(
                        "directory holds {} .safetensors files but no {INDEX_NAME} saying how they fit together",
                        many.len()
                    ),
                ),
            });
        }
        if is_gguf_path(path) {
            return Self::open_gguf(path);
        }
        if path.to_string_lossy().ends_with(".index.json") {
            let dir_path = match path.parent() {
                Some(p) if !p.as_os_str().is_empty() => p,
                _ => Path::new("."),
            };
            let dir = DirHandle::open(dir_path)?;
            return Self::open_index(dir_path, &dir, path);
        }
        Self::open_files(path, None, None, vec![path.to_path_buf()], None)
    }

    /// Built without the `gguf` feature (a merge-only build), a GGUF input is refused with the reason.
    #[cfg(not(feature = "gguf"))]
    fn open_gguf(path: &Path) -> Result<Checkpoint> {
        Err(Error::format(path, "this build of graft reads no GGUF files (graft-core's `gguf` feature is off)"))
    }

    /// Opens GGUF file `path` as the Hugging Face checkpoint convert would make of it (see the header).
    #[cfg(feature = "gguf")]
    fn open_gguf(path: &Path) -> Result<Checkpoint> {
        let g = crate::gguf::GgufFile::open(path)?;
        let (_, mapped) = crate::gguf::map_llama(&g)?;
        let f = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: as for safetensors shards: read-only, and graft never writes its inputs.
        let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        let data_start = g.data_offset() as usize;
        let mut ck = Checkpoint {
            path: path.to_path_buf(),
            dir: None,
            index: None,
            shards: Vec::new(),
            tensors: Vec::new(),
            by_name: HashMap::new(),
            metadata: BTreeMap::new(),
            gguf: None,
            updates: HashMap::new(),
        };
        let mut slots = Vec::with_capacity(mapped.len());
        // Looked up by name: a GGUF tensor that becomes configuration (`rope_freqs`) has no mapped entry.
        for (m, t) in mapped.into_iter().filter_map(|m| g.tensor_info(&m.gguf).cloned().map(|t| (m, t))) {
            // `GgufFile::open` checked the range against the file's length; the map is of the same file.
            let begin = data_start + t.offset as usize;
            let raw = begin..begin + t.bytes as usize;
            if raw.end > map.len() {
                return Err(Error::tensor(path, &t.name, "data lies past the end of the file (it shrank?)"));
            }
            if let Some(&prev) = ck.by_name.get(&m.hf) {
                let other: &GgufSlot = &slots[prev];
                return Err(Error::tensor(
                    path,
                    &t.name,
                    format!("maps to '{}' as '{}' does", m.hf, other.mapped.gguf),
                ));
            }
            let dtype = crate::gguf::natural_dtype(m.ggml);
            let nbytes = m.shape.iter().product::<usize>() * dtype.size();
            ck.by_name.insert(m.hf.clone(), ck.tensors.len());
            ck.tensors.push(TensorInfo {
                name: m.hf.clone(),
                dtype,
                shape: m.shape.clone(),
                shard: 0,
                begin: 0,
                end: nbytes,
            });
            let in_place = crate::gguf::is_stored_as_is(&m);
            slots.push(GgufSlot { mapped: m, raw, in_place, decoded: OnceLock::new() });
        }
        ck.shards.push(Shard { path: path.to_path_buf(), map, data_start });
        ck.gguf = Some(GgufTensors { slots, side_dir: OnceLock::new() });
        Ok(ck)
    }

    fn open_index(dir_path: &Path, dir: &DirHandle, index: &Path) -> Result<Checkpoint> {
        let index_name = index.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
        let text = dir.read_to_string(&index_name).map_err(|e| Error::io(index, e))?;
        let json: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(index, format!("index is not valid JSON: {e}")))?;
        let map = json
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::format(index, "index has no \"weight_map\" object"))?;
        let mut shard_names: Vec<String> = Vec::new();
        let mut expected: BTreeMap<String, String> = BTreeMap::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| {
                Error::format(index, format!("weight_map entry for tensor '{tensor}' is not a file name"))
            })?;
            if file.contains('/') || file.contains('\\') || file == ".." || file == "." || file.is_empty() {
                return Err(Error::format(
                    index,
                    format!("weight_map places tensor '{tensor}' in '{file}', outside the directory"),
                ));
            }
            if !shard_names.iter().any(|s| s == file) {
                shard_names.push(file.to_string());
            }
            expected.insert(tensor.clone(), file.to_string());
        }
        if shard_names.is_empty() {
            return Err(Error::format(index, "index weight_map is empty"));
        }
        shard_names.sort();
        let mut files = Vec::new();
        for s in &shard_names {
            let p = dir_path.join(s);
            if !dir.is_file(s) {
                let tensor = expected.iter().find(|(_, f)| *f == s).map(|(t, _)| t.as_str()).unwrap_or("?");
                return Err(Error::format(
                    index,
                    format!(
                        "index names shard '{s}' (for tensor '{tensor}' and others) but {} does not exist",
                        p.display()
                    ),
                ));
            }
            files.push(p);
        }
        Self::open_files(dir_path, Some(dir), Some(index.to_path_buf()), files, Some(expected))
    }

    /// Opens and validates `files` (through `dir`'s handle when given: their names are taken relative to it).
    fn open_files(
        path: &Path,
        dir: Option<&DirHandle>,
        index: Option<PathBuf>,
        files: Vec<PathBuf>,
        expected: Option<BTreeMap<String, String>>,
    ) -> Result<Checkpoint> {
        let mut ck = Checkpoint {
            path: path.to_path_buf(),
            dir: dir.map(|d| d.path.clone()),
            index: index.clone(),
            shards: Vec::new(),
            tensors: Vec::new(),
            by_name: HashMap::new(),
            metadata: BTreeMap::new(),
            gguf: None,
            updates: HashMap::new(),
        };
        for (si, file) in files.iter().enumerate() {
            let f = match dir {
                Some(d) => d.open_file(&file.file_name().unwrap_or_default().to_string_lossy()),
                None => File::open(file),
            }
            .map_err(|e| Error::io(file, e))?;
            let len = f.metadata().map_err(|e| Error::io(file, e))?.len();
            if len < 8 {
                return Err(Error::format(
                    file,
                    format!("file is {len} bytes, too short for the 8-byte safetensors header length"),
                ));
            }
            // SAFETY: the map is read-only; graft never writes to its inputs (the writer refuses them as outputs).
            // Another process truncating the file while we read is outside what any mmap-based reader can guard.
            let map = unsafe { Mmap::map(&f) }.map_err(|e| Error::io(file, e))?;
            let h = header::parse(file, &map)?;
            for (k, v) in &h.metadata {
                ck.metadata.entry(k.clone()).or_insert_with(|| v.clone());
            }
            for e in h.entries {
                if let Some(&prev) = ck.by_name.get(&e.name) {
                    let other = &ck.shards[ck.tensors[prev].shard].path;
                    return Err(Error::tensor(file, &e.name, format!("also present in {}", other.display())));
                }
                if let Some(exp) = &expected {
                    let fname = file.file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
                    match exp.get(&e.name) {
                        Some(s) if *s == fname => {}
                        Some(s) => {
                            return Err(Error::tensor(
                                file,
                                &e.name,
                                format!("the index places it in '{s}', not in this shard"),
                            ))
                        }
                        None => {
                            return Err(Error::tensor(file, &e.name, "present in the shard but missing from the index"))
                        }
                    }
                }
                ck.by_name.insert(e.name.clone(), ck.tensors.len());
                ck.tensors.push(TensorInfo {
                    name: e.name,
                    dtype: e.dtype,
                    shape: e.shape,
                    shard: si,
                    begin: e.begin,
                    end: e.end,
                });
            }
            ck.shards.push(Shard { path: file.clone(), map, data_start: h.data_start });
        }
        if let (Some(exp), Some(index)) = (&expected, &index) {
            if let Some((t, s)) = exp.iter().find(|(t, _)| !ck.by_name.contains_key(*t)) {
                return Err(Error::tensor(
                    index,
                    t,
                    format!("the index places it in '{s}' but that shard has no such tensor"),
                ));
            }
        }
        Ok(ck)
    }

    /// The path the checkpoint was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The checkpoint directory, where config and tokenizer files live (None for a bare file). For a GGUF file, the
    /// directory of the files convert would write beside it, made on first call (a warning says why when it cannot
    /// be).
    pub fn dir(&self) -> Option<&Path> {
        match &self.gguf {
            None => self.dir.as_deref(),
            #[cfg(not(feature = "gguf"))]
            Some(g) => match *g {},
            #[cfg(feature = "gguf")]
            Some(g) => g
                .side_dir
                .get_or_init(|| match crate::gguf::side::dir(&self.path) {
                    Ok(d) => Some(d),
                    Err(e) => {
                        eprintln!("graft: warning: no config or tokenizer files for it: {e}");
                        None
                    }
                })
                .as_deref(),
        }
    }

    /// Whether this checkpoint was opened from a GGUF file.
    pub fn is_gguf(&self) -> bool {
        self.gguf.is_some()
    }

    /// Every file this checkpoint consists of (shards and index), for refusing to overwrite inputs.
    pub fn files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.shards.iter().map(|s| s.path.clone()).collect();
        v.extend(self.index.clone());
        v
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The `__metadata__` string map (merged over shards, the first shard winning).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Tensor descriptions in storage order.
    pub fn infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    pub fn info(&self, name: &str) -> Option<&TensorInfo> {
        self.by_name.get(name).map(|&i| &self.tensors[i])
    }

    pub fn get(&self, name: &str) -> Option<TensorView<'_>> {
        self.by_name.get(name).map(|&i| self.view(i))
    }

    /// The view of `name`, or an error naming this checkpoint and the missing tensor.
    pub fn tensor(&self, name: &str) -> Result<TensorView<'_>> {
        self.get(name).ok_or_else(|| Error::tensor(&self.path, name, "no such tensor in this checkpoint"))
    }

    /// The view of the i-th tensor in storage order.
    pub fn view(&self, i: usize) -> TensorView<'_> {
        let t = &self.tensors[i];
        let s = &self.shards[t.shard];
        let data = match &self.gguf {
            None => &s.map[s.data_start + t.begin..s.data_start + t.end],
            #[cfg(not(feature = "gguf"))]
            Some(g) => match *g {},
            #[cfg(feature = "gguf")]
            Some(g) => {
                let slot = &g.slots[i];
                let raw = &s.map[slot.raw.clone()];
                if slot.in_place {
                    raw
                } else {
                    slot.decoded.get_or_init(|| crate::gguf::hf_bytes(&slot.mapped, raw).into_boxed_slice())
                }
            }
        };
        TensorView { name: &t.name, dtype: t.dtype, shape: &t.shape, data, file: &s.path, update: self.updates.get(&i) }
    }

    /// From now on, tensor `name` reads as itself with `update` applied (see `super::low_rank`); its stored bytes,
    /// and so byte copies and page release, stay the original's. Errors when the tensor is missing, not a float, or
    /// not of the update's 2-D shape.
    pub fn set_update(&mut self, name: &str, update: LowRankUpdate) -> Result<()> {
        let i = *self
            .by_name
            .get(name)
            .ok_or_else(|| Error::tensor(&self.path, name, "no such tensor in this checkpoint"))?;
        let t = &self.tensors[i];
        if !t.dtype.is_float() || t.shape != update.shape() {
            return Err(Error::tensor(
                &self.path,
                name,
                format!(
                    "is {} {:?}; the update from {} is for a float {:?}",
                    t.dtype,
                    t.shape,
                    update.origin().display(),
                    update.shape()
                ),
            ));
        }
        self.updates.insert(i, update);
        Ok(())
    }

    /// Whether tensor `name` is read with an update applied.
    pub fn has_update(&self, name: &str) -> bool {
        self.by_name.get(name).is_some_and(|i| self.updates.contains_key(i))
    }

    /// Drops this process's mapping of tensor `name`'s pages once a streaming pass is done with it (see
    /// `release_bytes`). Unknown names are ignored. For a GGUF tensor decoded into a buffer, the stored bytes' pages
    /// are released; the buffer stays until the checkpoint is dropped (views may still borrow it).
    pub fn release(&self, name: &str) {
        #[cfg(feature = "gguf")]
        if let (Some(g), Some(&i)) = (&self.gguf, self.by_name.get(name)) {
            let s = &self.shards[0];
            self.release_bytes(&s.map[g.slots[i].raw.clone()]);
            return;
        }
        if let Some(v) = self.get(name) {
            self.release_bytes(v.data);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = TensorView<'_>> {
        (0..self.tensors.len()).map(|i| self.view(i))
    }

    /// Drops this process's mapping of `bytes` (a sub-slice of one of this checkpoint's tensor views) once a
    /// streaming pass is done with it. Without this, every page ever read stays mapped and counts towards resident
    /// memory, so streaming a 3 GB checkpoint would show 3 GB of RSS. The pages stay in the page cache; touching them
    /// again maps them again. Slices from elsewhere are ignored; failures are ignored (this is only advice).
    pub fn release_bytes(&self, bytes: &[u8]) {
        let (start, len) = (bytes.as_ptr() as usize, bytes.len());
        if len == 0 {
            return;
        }
        for s in &self.shards {
            let base = s.map.as_ptr() as usize;
            if start >= base && start + len <= base + s.map.len() {
                // SAFETY: the mapping is read-only and shared with the file, so dropping its pages loses nothing:
                // a later access re-reads the same bytes from the page cache or the file. memmap2 widens the range
                // to whole pages; neighbouring data on those pages is re-read the same way.
                #[cfg(unix)]
                let _ = unsafe { s.map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start - base, len) };
                return;
            }
        }
    }

    /// Sum of tensor data bytes.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.nbytes() as u64).sum()
    }

    pub fn total_params(&self) -> u64 {
        self.tensors.iter().map(|t| t.numel() as u64).sum()
    }
}

/// A checkpoint directory opened once. Index and shards are opened relative to this handle (`openat`), so a writer
/// that swaps another directory into the same path meanwhile cannot mix two checkpoints. The handle holds a shared
/// `flock` on the directory until dropped: a writer that has just swapped this directory out waits for it before
/// deleting its files.
struct DirHandle {
    path: PathBuf,
    file: File,
}

impl DirHandle {
    fn open(path: &Path) -> Result<DirHandle> {
        for _ in 0..10 {
            let file = File::open(path).map_err(|e| Error::io(path, e))?;
            super::commit::flock_wait_shared(&file);
            // Swapped out between our open and our lock: its files may be going; take the directory there now.
            if same_inode(&file, path) {
                return Ok(DirHandle { path: path.to_path_buf(), file });
            }
        }
        Err(Error::format(path, "the directory kept being replaced while opening it; try again"))
    }

    #[cfg(unix)]
    fn open_file(&self, name: &str) -> std::io::Result<File> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let c = std::ffi::CString::new(name).map_err(std::io::Error::other)?;
        // SAFETY: openat on the directory descriptor we own, with a NUL-terminated name; the new descriptor is
        // owned by the returned File.
        let fd = unsafe { libc::openat(self.file.as_raw_fd(), c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    #[cfg(not(unix))]
    fn open_file(&self, name: &str) -> std::io::Result<File> {
        File::open(self.path.join(name))
    }

    #[cfg(unix)]
    fn is_file(&self, name: &str) -> bool {
        use std::os::fd::AsRawFd;
        let Ok(c) = std::ffi::CString::new(name) else { return false };
        // SAFETY: fstatat fills a zeroed stat struct for a NUL-terminated name relative to our descriptor.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            libc::fstatat(self.file.as_raw_fd(), c.as_ptr(), &mut st, 0) == 0
                && (st.st_mode & libc::S_IFMT) == libc::S_IFREG
        }
    }

    #[cfg(not(unix))]
    fn is_file(&self, name: &str) -> bool {
        self.path.join(name).is_file()
    }

    fn read_to_string(&self, name: &str) -> std::io::Result<String> {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut self.open_file(name)?, &mut s)?;
        Ok(s)
    }

    /// The names in the directory (through the handle where `/proc` allows it).
    fn list(&self) -> std::io::Result<Vec<String>> {
        #[cfg(target_os = "linux")]
        let through = {
            use std::os::fd::AsRawFd;
            PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
        };
        #[cfg(not(target_os = "linux"))]
        let through = self.path.clone();
        let rd = std::fs::read_dir(&through).or_else(|_| std::fs::read_dir(&self.path))?;
        rd.map(|e| e.map(|e| e.file_name().to_string_lossy().to_string())).collect()
    }
}

#[cfg(unix)]
fn same_inode(file: &File, path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), std::fs::metadata(path)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn same_inode(_: &File, _: &Path) -> bool {
    true
}
