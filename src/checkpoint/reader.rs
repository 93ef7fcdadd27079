//! Opening checkpoints: one `.safetensors` file, or a directory with `model.safetensors` or shards plus
//! `model.safetensors.index.json`. Every file is memory-mapped; tensors are exposed as zero-copy views. A directory is
//! opened once, under a shared lock, and its files are resolved relative to that handle (`DirHandle`).

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::dtype::{self, Dtype};
use super::header;
use crate::error::{Error, Result};

pub const INDEX_NAME: &str = "model.safetensors.index.json";
pub const SINGLE_NAME: &str = "model.safetensors";

/// A zero-copy view of one tensor inside a memory-mapped file.
#[derive(Clone, Copy, Debug)]
pub struct TensorView<'a> {
    pub name: &'a str,
    pub dtype: Dtype,
    pub shape: &'a [usize],
    pub data: &'a [u8],
    pub file: &'a Path,
}

impl<'a> TensorView<'a> {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_float(&self) -> bool {
        self.dtype.is_float()
    }

    /// The whole tensor widened to f32. Errors for non-float dtypes, naming file and tensor.
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        self.check_float()?;
        Ok(dtype::to_f32_vec(self.dtype, self.data))
    }

    /// Elements `range` widened to f32 into `out` (`out.len() == range.len()`).
    pub fn read_f32_range(&self, range: std::ops::Range<usize>, out: &mut [f32]) -> Result<()> {
        self.check_float()?;
        let s = self.dtype.size();
        if range.end > self.numel() || out.len() != range.len() {
            return Err(Error::tensor(self.file, self.name, format!("element range {range:?} outside the tensor")));
        }
        // Counting non-finite values in the same blocks as the conversion keeps the check free of an extra pass.
        if dtype::to_f32_counting(self.dtype, &self.data[range.start * s..range.end * s], out) > 0 {
            self.nonfinite_found()?;
        }
        Ok(())
    }

    /// Called when a read found non-finite values: counts them over the whole tensor once, then errors or (with the
    /// `guard` policy set to allow them) warns once for this tensor and lets the values through.
    pub fn nonfinite_found(&self) -> Result<()> {
        let mut count = 0usize;
        let mut buf = vec![0f32; dtype::CONVERT_CHUNK];
        let width = self.dtype.size();
        for bytes in self.data.chunks(dtype::CONVERT_CHUNK * width) {
            let out = &mut buf[..bytes.len() / width];
            count += dtype::to_f32_counting(self.dtype, bytes, out);
        }
        let what = format!(
            "{count} of {} values are NaN or infinite{}",
            self.numel(),
            if self.dtype == Dtype::F64 { " (in f32, which graft computes in)" } else { "" }
        );
        if !super::guard::allow_nonfinite() {
            return Err(Error::tensor(
                self.file,
                self.name,
                format!("{what}; pass --allow-nonfinite to use them anyway"),
            ));
        }
        let line = format!("{}: tensor '{}': {what}; let through", self.file.display(), self.name);
        super::guard::warn_once(self.file, self.name, &line);
        Ok(())
    }

    /// For float tensors copied as stored bytes (no widening to scan on the way): counts non-finite values in the
    /// stored bits and applies the same policy as a widening read.
    pub fn check_stored_finite(&self) -> Result<()> {
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
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
            // GGUF tensors are dequantised per tensor into owned buffers, which the zero-copy views cannot hold yet.
            return Err(Error::format(
                path,
                "a GGUF file: convert it first with `graft convert FILE.gguf -o DIR` (docs/gguf.md)",
            ));
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

    /// The checkpoint directory, where config and tokenizer files live (None for a bare file).
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
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
        TensorView {
            name: &t.name,
            dtype: t.dtype,
            shape: &t.shape,
            data: &s.map[s.data_start + t.begin..s.data_start + t.end],
            file: &s.path,
        }
    }

    /// Drops this process's mapping of tensor `name`'s pages once a streaming pass is done with it (see
    /// `release_bytes`). Unknown names are ignored.
    pub fn release(&self, name: &str) {
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
