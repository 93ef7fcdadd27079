//! The one streaming checkpoint writer.
//!
//! The caller declares every output tensor (name, dtype, shape) up front, then supplies data tensor by tensor, in
//! declared order, whole or in pieces. Headers are known from the declarations, so each byte goes straight to disk
//! and the writer never holds more than its I/O buffer. Files are written under hidden temporary names in the
//! destination directory and renamed into place only by `finish`, shards first and the index last; dropping an
//! unfinished writer (an error, a panic, an interrupted run) deletes the temporaries, so a half-written checkpoint
//! never appears under a real name.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use super::dtype::{self, Dtype};
use super::reader::{INDEX_NAME, SINGLE_NAME};
use crate::error::{Error, Result};

/// Hugging Face's default `max_shard_size` ("5GB", decimal).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;

/// Config, tokenizer and generation files carried over from a source checkpoint directory.
pub const CARRIED_FILES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
];

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDecl {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorDecl {
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> Self {
        TensorDecl { name: name.into(), dtype, shape }
    }
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    pub fn nbytes(&self) -> u64 {
        self.numel() as u64 * self.dtype.size() as u64
    }
}

#[derive(Clone, Debug)]
pub struct WriterOptions {
    /// Shard size limit in bytes of tensor data; a tensor larger than the limit gets a shard of its own.
    pub max_shard_size: u64,
    /// `__metadata__` for every shard (`format: pt` is added when absent, as transformers expects it).
    pub metadata: BTreeMap<String, String>,
    /// Copy `CARRIED_FILES` found in this directory next to the output.
    pub carry_from: Option<PathBuf>,
    /// Files that must never be overwritten (the inputs of the operation).
    pub inputs: Vec<PathBuf>,
    /// Replace a checkpoint already at the destination (its stale shards are removed after the new ones are in place).
    pub overwrite: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            max_shard_size: DEFAULT_MAX_SHARD_SIZE,
            metadata: BTreeMap::new(),
            carry_from: None,
            inputs: Vec::new(),
            overwrite: false,
        }
    }
}

/// What `finish` wrote.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Written {
    /// The checkpoint's path: the `.safetensors` file or the directory.
    pub path: PathBuf,
    pub files: Vec<PathBuf>,
    pub shards: usize,
    pub tensors: usize,
    pub total_bytes: u64,
}

struct ShardPlan {
    file_name: String,
    /// Indices into `decls`.
    members: Vec<usize>,
    data_bytes: u64,
}

struct Open {
    shard: usize,
    file: BufWriter<File>,
}

pub struct CheckpointWriter {
    out: PathBuf,
    dir: PathBuf,
    single_file: bool,
    decls: Vec<TensorDecl>,
    shards: Vec<ShardPlan>,
    shard_of: Vec<usize>,
    headers: Vec<Vec<u8>>,
    opts: WriterOptions,
    /// Temporaries created so far (final path, temporary path).
    temps: Vec<(PathBuf, PathBuf)>,
    open: Option<Open>,
    /// Shards opened so far (they are opened in order).
    opened: usize,
    next: usize,
    remaining: u64,
    finished: bool,
    /// The destination directory did not exist before: an unfinished writer removes it again.
    created_dir: bool,
}

impl CheckpointWriter {
    /// Plans the output and checks it against the inputs and what is already at the destination. `out` ending in
    /// `.safetensors` is a single file; anything else is a checkpoint directory (created if missing).
    pub fn create(out: impl AsRef<Path>, decls: Vec<TensorDecl>, opts: WriterOptions) -> Result<Self> {
        let out = out.as_ref().to_path_buf();
        let single_file = out.extension().is_some_and(|e| e == "safetensors");
        let mut seen = BTreeSet::new();
        for d in &decls {
            if !seen.insert(d.name.as_str()) {
                return Err(Error::invalid(format!("output tensor '{}' is declared twice", d.name)));
            }
        }
        let mut shards: Vec<ShardPlan> = Vec::new();
        let mut shard_of = vec![0; decls.len()];
        for (i, d) in decls.iter().enumerate() {
            let fits =
                shards.last().is_some_and(|s| s.members.is_empty() || s.data_bytes + d.nbytes() <= opts.max_shard_size);
            if !fits {
                shards.push(ShardPlan { file_name: String::new(), members: Vec::new(), data_bytes: 0 });
            }
            let s = shards.last_mut().unwrap();
            s.members.push(i);
            s.data_bytes += d.nbytes();
            shard_of[i] = shards.len() - 1;
        }
        if shards.is_empty() {
            shards.push(ShardPlan { file_name: String::new(), members: Vec::new(), data_bytes: 0 });
        }
        let n = shards.len();
        let dir = if single_file {
            if n > 1 {
                return Err(Error::usage(format!(
                    "{}: the output needs {n} shards at a {} byte shard limit; give a directory as output",
                    out.display(),
                    opts.max_shard_size
                )));
            }
            if opts.carry_from.is_some() {
                return Err(Error::usage(format!(
                    "{}: carrying config and tokenizer files needs a directory as output",
                    out.display()
                )));
            }
            match out.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            }
        } else {
            out.clone()
        };
        for (k, s) in shards.iter_mut().enumerate() {
            s.file_name = if single_file {
                out.file_name().unwrap().to_string_lossy().to_string()
            } else if n == 1 {
                SINGLE_NAME.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
            };
        }

        let mut metadata = opts.metadata.clone();
        metadata.entry("format".into()).or_insert_with(|| "pt".into());
        let headers = shards.iter().map(|s| build_header(&decls, s, &metadata)).collect::<Result<Vec<_>>>()?;

        let mut w = CheckpointWriter {
            out,
            dir,
            single_file,
            decls,
            shards,
            shard_of,
            headers,
            opts,
            temps: Vec::new(),
            open: None,
            opened: 0,
            next: 0,
            remaining: 0,
            finished: false,
            created_dir: false,
        };
        w.check_destination()?;
        w.created_dir = !w.dir.exists();
        std::fs::create_dir_all(&w.dir).map_err(|e| Error::io(&w.dir, e))?;
        sweep_dead_temporaries(&w.dir);
        w.skip_empty();
        Ok(w)
    }

    /// Fails as `create` would when `out` is taken (a checkpoint there without `overwrite`, or an input), and
    /// leaves nothing behind: lets a long computation refuse its destination before it starts, not after.
    pub fn check_destination_free(out: impl AsRef<Path>, opts: &WriterOptions) -> Result<()> {
        Self::create(out, Vec::new(), opts.clone()).map(drop)
    }

    pub fn decls(&self) -> &[TensorDecl] {
        &self.decls
    }

    /// The files `finish` will create, in the order they are renamed into place.
    pub fn final_files(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = self.shards.iter().map(|s| self.dir.join(&s.file_name)).collect();
        if self.shards.len() > 1 {
            v.push(self.dir.join(INDEX_NAME));
        }
        if let Some(src) = &self.opts.carry_from {
            for f in CARRIED_FILES {
                if src.join(f).is_file() {
                    v.push(self.dir.join(f));
                }
            }
        }
        v
    }

    fn check_destination(&self) -> Result<()> {
        let canon = |p: &Path| -> PathBuf {
            if let Ok(c) = p.canonicalize() {
                return c;
            }
            match (p.parent(), p.file_name()) {
                (Some(par), Some(f)) => {
                    let par = if par.as_os_str().is_empty() { Path::new(".") } else { par };
                    par.canonicalize().map(|c| c.join(f)).unwrap_or_else(|_| p.to_path_buf())
                }
                _ => p.to_path_buf(),
            }
        };
        let inputs: Vec<PathBuf> = self.opts.inputs.iter().map(|p| canon(p)).collect();
        let out_canon = canon(&self.out);
        for f in self.final_files() {
            let c = canon(&f);
            if inputs.contains(&c) {
                return Err(Error::usage(format!("{}: refusing to overwrite an input of this command", f.display())));
            }
        }
        if !self.single_file && inputs.iter().any(|i| i.parent() == Some(out_canon.as_path())) {
            return Err(Error::usage(format!(
                "{}: the output directory holds an input checkpoint; choose another output",
                self.out.display()
            )));
        }
        if self.opts.overwrite {
            return Ok(());
        }
        if self.single_file {
            if self.out.exists() {
                return Err(Error::usage(format!(
                    "{}: already exists; pass --force to replace it",
                    self.out.display()
                )));
            }
        } else if let Some(existing) = self.existing_checkpoint_files().first() {
            return Err(Error::usage(format!(
                "{}: already holds a checkpoint ({}); pass --force to replace it",
                self.out.display(),
                existing.file_name().unwrap_or_default().to_string_lossy()
            )));
        }
        Ok(())
    }

    fn existing_checkpoint_files(&self) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        let mut v: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().unwrap_or_default().to_string_lossy();
                !n.starts_with('.') && (n.ends_with(".safetensors") || n == INDEX_NAME)
            })
            .collect();
        v.sort();
        v
    }

    /// Supplies the whole data of the next declared tensor, which must be `name`.
    pub fn write_tensor(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.expect(name)?;
        if bytes.len() as u64 != self.remaining {
            return Err(Error::invalid(format!(
                "tensor '{name}': {} bytes supplied, {} declared",
                bytes.len(),
                self.remaining
            )));
        }
        self.write_data(bytes)
    }

    /// Supplies the next declared tensor as f32 values, narrowed to its declared dtype.
    pub fn write_f32(&mut self, name: &str, values: &[f32]) -> Result<()> {
        self.expect(name)?;
        let d = &self.decls[self.next];
        if !d.dtype.is_float() {
            return Err(Error::invalid(format!("tensor '{name}': f32 values for a {} tensor", d.dtype)));
        }
        let bytes = dtype::from_f32_vec(d.dtype, values);
        self.write_tensor(name, &bytes)
    }

    /// The name of the tensor whose bytes are expected next.
    pub fn next_name(&self) -> Option<&str> {
        self.decls.get(self.next).map(|d| d.name.as_str())
    }

    fn expect(&self, name: &str) -> Result<()> {
        match self.next_name() {
            Some(n) if n == name => Ok(()),
            Some(n) => Err(Error::invalid(format!("tensor '{name}' supplied while '{n}' is due next"))),
            None => Err(Error::invalid(format!("tensor '{name}' supplied after every declared tensor"))),
        }
    }

    /// Appends bytes to the current tensor; a piece may complete it and run into the next ones.
    pub fn write_data(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            if self.next >= self.decls.len() {
                return Err(Error::invalid("more tensor data supplied than declared"));
            }
            self.ensure_open()?;
            let take = (self.remaining.min(bytes.len() as u64)) as usize;
            let open = self.open.as_mut().unwrap();
            let path = &self.temps.last().unwrap().1;
            open.file.write_all(&bytes[..take]).map_err(|e| Error::io(path, e))?;
            self.remaining -= take as u64;
            bytes = &bytes[take..];
            if self.remaining == 0 {
                self.next += 1;
                self.skip_empty();
            }
        }
        Ok(())
    }

    /// Zero-byte tensors need no data: step over them so they never wait for a write.
    fn skip_empty(&mut self) {
        while self.next < self.decls.len() {
            let n = self.decls[self.next].nbytes();
            if n > 0 {
                self.remaining = n;
                return;
            }
            self.next += 1;
        }
        self.remaining = 0;
    }

    fn ensure_open(&mut self) -> Result<()> {
        let shard = self.shard_of[self.next];
        if self.open.as_ref().is_some_and(|o| o.shard == shard) {
            return Ok(());
        }
        self.close_open()?;
        // Shards whose every tensor is empty still need their file.
        for s in self.opened..shard {
            self.open_shard(s)?;
            self.close_open()?;
        }
        self.open_shard(shard)
    }

    fn open_shard(&mut self, shard: usize) -> Result<()> {
        let final_path = self.dir.join(&self.shards[shard].file_name);
        let tmp = temp_name(&final_path);
        let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        self.temps.push((final_path, tmp.clone()));
        self.opened = shard + 1;
        let mut file = BufWriter::with_capacity(8 << 20, f);
        file.write_all(&self.headers[shard]).map_err(|e| Error::io(&tmp, e))?;
        self.open = Some(Open { shard, file });
        Ok(())
    }

    fn close_open(&mut self) -> Result<()> {
        if let Some(open) = self.open.take() {
            let path = self.temps.last().unwrap().1.clone();
            let f = open.file.into_inner().map_err(|e| Error::io(&path, e.into_error()))?;
            f.sync_all().map_err(|e| Error::io(&path, e))?;
        }
        Ok(())
    }

    /// Completes the checkpoint: every declared tensor must have been supplied. Renames shards into place, then
    /// carried files, then the index (whose presence marks a sharded checkpoint as complete).
    pub fn finish(mut self) -> Result<Written> {
        if self.next < self.decls.len() {
            return Err(Error::invalid(format!(
                "{}: tensor '{}' and {} more were declared but never supplied",
                self.out.display(),
                self.decls[self.next].name,
                self.decls.len() - self.next - 1
            )));
        }
        // A checkpoint of only empty tensors (or none) still gets its files.
        for s in self.opened..self.shards.len() {
            self.close_open()?;
            self.open_shard(s)?;
        }
        self.close_open()?;

        if let Some(src) = self.opts.carry_from.clone() {
            for f in CARRIED_FILES {
                let from = src.join(f);
                if from.is_file() {
                    let to = self.dir.join(f);
                    let tmp = temp_name(&to);
                    std::fs::copy(&from, &tmp).map_err(|e| Error::io(&from, e))?;
                    self.temps.push((to, tmp));
                }
            }
        }
        let sharded = self.shards.len() > 1;
        if sharded {
            let index = self.index_json();
            let to = self.dir.join(INDEX_NAME);
            let tmp = temp_name(&to);
            std::fs::write(&tmp, index).map_err(|e| Error::io(&tmp, e))?;
            self.temps.push((to, tmp));
        }
        let stale: Vec<PathBuf> = if self.opts.overwrite && !self.single_file {
            let new: Vec<PathBuf> = self.temps.iter().map(|(f, _)| f.clone()).collect();
            self.existing_checkpoint_files().into_iter().filter(|p| !new.contains(p)).collect()
        } else {
            Vec::new()
        };
        // An index left from an old sharded checkpoint would shadow a new single file: remove it before renaming.
        for p in stale.iter().filter(|p| p.ends_with(INDEX_NAME)) {
            std::fs::remove_file(p).map_err(|e| Error::io(p, e))?;
        }
        let temps = std::mem::take(&mut self.temps);
        let mut files = Vec::new();
        for (i, (to, tmp)) in temps.iter().enumerate() {
            if let Err(e) = std::fs::rename(tmp, to) {
                self.temps = temps[i..].to_vec();
                return Err(Error::io(to, e));
            }
            files.push(to.clone());
        }
        for p in stale.iter().filter(|p| !p.ends_with(INDEX_NAME)) {
            std::fs::remove_file(p).map_err(|e| Error::io(p, e))?;
        }
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.finished = true;
        Ok(Written {
            path: self.out.clone(),
            files,
            shards: self.shards.len(),
            tensors: self.decls.len(),
            total_bytes: self.decls.iter().map(|d| d.nbytes()).sum(),
        })
    }

    fn index_json(&self) -> String {
        let mut weight_map = BTreeMap::new();
        for (i, d) in self.decls.iter().enumerate() {
            weight_map.insert(d.name.clone(), self.shards[self.shard_of[i]].file_name.clone());
        }
        let total: u64 = self.decls.iter().map(|d| d.nbytes()).sum();
        let v = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
        serde_json::to_string_pretty(&v).unwrap() + "\n"
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.open = None;
            for (_, tmp) in &self.temps {
                let _ = std::fs::remove_file(tmp);
            }
            if self.created_dir {
                // Only succeeds when empty: nothing else is ever removed.
                let _ = std::fs::remove_dir(&self.dir);
            }
        }
    }
}

/// Removes temporaries left by writers that were killed (SIGKILL, power loss) before their `Drop` could run. Only
/// files named like ours whose process no longer exists are touched; without `/proc` nothing is removed.
fn sweep_dead_temporaries(dir: &Path) {
    if !Path::new("/proc/self").exists() {
        return;
    }
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let Some(pid) = name.strip_prefix('.').and_then(|n| n.rsplit_once(".graft-tmp-")).map(|(_, pid)| pid) else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn temp_name(final_path: &Path) -> PathBuf {
    let name = final_path.file_name().unwrap_or_default().to_string_lossy();
    final_path.with_file_name(format!(".{name}.graft-tmp-{}", std::process::id()))
}

fn build_header(decls: &[TensorDecl], shard: &ShardPlan, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut obj = serde_json::Map::new();
    obj.insert("__metadata__".into(), serde_json::to_value(metadata).unwrap());
    let mut offset = 0u64;
    for &i in &shard.members {
        let d = &decls[i];
        let end = offset + d.nbytes();
        obj.insert(
            d.name.clone(),
            serde_json::json!({ "dtype": d.dtype.name(), "shape": d.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut json = serde_json::to_vec(&serde_json::Value::Object(obj)).unwrap();
    // Pad with spaces so the data section starts 8-byte aligned, as the reference implementation does.
    while !json.len().is_multiple_of(8) {
        json.push(b' ');
    }
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json);
    Ok(out)
}
