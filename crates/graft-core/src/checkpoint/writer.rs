//! The one streaming checkpoint writer.
//!
//! The caller declares every output tensor (name, dtype, shape) up front, then supplies data tensor by tensor, in
//! declared order, whole or in pieces (zero-element tensors need no data). Headers are known from the declarations,
//! so each byte goes straight to disk and the writer never holds more than its I/O buffer.
//!
//! Outputs are whole or absent (`docs/outputs.md`): `create` takes the output's lock; a checkpoint directory is
//! built as a hidden sibling of the destination and swapped in by `finish` in one rename (`commit::exchange`),
//! carrying along, as hard links, the files of the old directory that are not part of the checkpoint it replaces;
//! a single file is written beside its destination and renamed over it. Dropping an unfinished writer (an error, a
//! panic) and SIGINT/SIGTERM delete the temporaries; what a SIGKILLed writer left is swept by the next writer.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use super::commit;
use super::dtype::{self, Dtype};
use super::reader::{INDEX_NAME, SINGLE_NAME};
use super::shard_file::{ShardFile, DIRECT_FROM_BYTES};
use crate::error::{Arg, Error, Result};

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
    /// Replace a checkpoint already at the destination: only its own files (index and listed shards, or its single
    /// file, and its carried files) go; everything else in the directory stays.
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
    /// The file as the user will see it, for messages.
    shown: PathBuf,
    file: ShardFile,
}

/// Where the output is committed, after following symlinks.
struct Destination {
    /// The real directory the output is renamed into (its lock and temporaries live there too).
    parent: PathBuf,
    /// The output's name in `parent`: the `.safetensors` file, or the checkpoint directory.
    name: OsString,
    /// A directory is swapped in as a whole; a single file is renamed over.
    is_dir: bool,
    /// The directory as the user named it (for messages and `Written::files`).
    shown_dir: PathBuf,
    /// Replacing a checkpoint keeps its config and tokenizer files (a single file replacing a sharded checkpoint:
    /// the user addressed the weights only).
    keep_carried: bool,
}

impl Destination {
    fn target(&self) -> PathBuf {
        self.parent.join(&self.name)
    }
}

pub struct CheckpointWriter {
    out: PathBuf,
    dest: Destination,
    decls: Vec<TensorDecl>,
    shards: Vec<ShardPlan>,
    shard_of: Vec<usize>,
    headers: Vec<Vec<u8>>,
    opts: WriterOptions,
    /// Held from `create` until the writer is finished or dropped: one writer per output at a time.
    lock: Option<commit::OutputLock>,
    /// A single file's directory, locked shared: no writer of the whole directory runs meanwhile.
    dir_lock: Option<commit::OutputLock>,
    /// The new checkpoint directory, built beside the destination (directory outputs).
    staging_dir: Option<commit::TempDir>,
    /// The new file, written beside the destination (single-file outputs).
    staging_file: Option<commit::TempFile>,
    open: Option<Open>,
    /// Shards opened so far (they are opened in order).
    opened: usize,
    next: usize,
    remaining: u64,
    finished: bool,
    /// Directories `create` made for the output's parent: an unfinished writer removes them again (when empty).
    created_dirs: Vec<PathBuf>,
    /// Files given by `add_file`, committed with the checkpoint.
    extra_files: Vec<(String, Vec<u8>)>,
}

impl CheckpointWriter {
    /// Plans the output, takes its lock and checks it against the inputs and what is already at the destination.
    /// `out` ending in `.safetensors` is a single file; anything else is a checkpoint directory. Nothing appears
    /// under `out` before `finish`.
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
        if single_file {
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
        }
        let (user_parent, _) = commit::split(&named_path(&out))?;
        let created_dirs = create_missing_dirs(&user_parent, &out)?;
        let mut w = CheckpointWriter {
            dest: Destination {
                parent: PathBuf::new(),
                name: OsString::new(),
                is_dir: !single_file,
                shown_dir: if single_file { user_parent } else { out.clone() },
                keep_carried: false,
            },
            out,
            decls,
            shards,
            shard_of,
            headers: Vec::new(),
            opts,
            lock: None,
            dir_lock: None,
            staging_dir: None,
            staging_file: None,
            open: None,
            opened: 0,
            next: 0,
            remaining: 0,
            finished: false,
            created_dirs,
            extra_files: Vec::new(),
        };
        w.resolve_destination()?;
        for (k, s) in w.shards.iter_mut().enumerate() {
            s.file_name = if !w.dest.is_dir {
                w.dest.name.to_string_lossy().to_string()
            } else if n == 1 {
                SINGLE_NAME.to_string()
            } else {
                format!("model-{:05}-of-{:05}.safetensors", k + 1, n)
            };
        }
        let mut metadata = w.opts.metadata.clone();
        metadata.entry("format".into()).or_insert_with(|| "pt".into());
        w.headers = w.shards.iter().map(|s| build_header(&w.decls, s, &metadata)).collect::<Result<Vec<_>>>()?;

        if !w.dest.is_dir {
            if let Ok((grand, dir_name)) = commit::split(&w.dest.parent) {
                w.dir_lock = commit::OutputLock::acquire_shared(&grand, &dir_name, &w.out)?;
            }
        }
        let lock = commit::OutputLock::acquire(&w.dest.parent, &w.dest.name, &w.out)?;
        // Sweep first: an old checkpoint a dead writer moved aside goes back in place before it is judged.
        commit::sweep_dead(&w.dest.parent, &w.dest.name, &lock);
        w.lock = Some(lock);
        w.check_destination()?;
        if w.dest.is_dir {
            let staging = commit::TempDir::create(&w.dest.parent, &w.dest.name).map_err(|e| Error::io(&w.out, e))?;
            w.staging_dir = Some(staging);
        }
        w.enter();
        Ok(w)
    }

    /// Follows symlinks to the real place of the output, and decides what a single file inside a directory that
    /// holds a sharded checkpoint means.
    fn resolve_destination(&mut self) -> Result<()> {
        let (user_parent, user_name) = commit::split(&named_path(&self.out))?;
        let parent = user_parent.canonicalize().map_err(|e| Error::io(&user_parent, e))?;
        let mut path = parent.join(&user_name);
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            // A symlinked output is written where it points, so that the link keeps working.
            path = path.canonicalize().map_err(|e| Error::io(&self.out, e))?;
        }
        let (parent, name) = commit::split(&path)?;
        self.dest.parent = parent;
        self.dest.name = name;
        if self.dest.is_dir {
            return Ok(());
        }
        let dir = self.dest.parent.clone();
        let Some(index) = read_index_shards(&dir) else { return Ok(()) };
        let file_name = self.dest.name.to_string_lossy().to_string();
        if index.contains(&file_name) {
            return Err(Error::usage(format!(
                "{}: is a shard of the sharded checkpoint in {} ({INDEX_NAME} lists it); write elsewhere",
                self.out.display(),
                self.dest.shown_dir.display()
            )));
        }
        if file_name != SINGLE_NAME {
            return Ok(());
        }
        if !self.opts.overwrite {
            return Err(Error::usage(format!(
                "{}: {} holds a sharded checkpoint ({INDEX_NAME}); a {SINGLE_NAME} beside it would be a second \
                 checkpoint in one directory; pass {} to replace the sharded checkpoint",
                self.out.display(),
                self.dest.shown_dir.display(),
                Arg::Force
            )));
        }
        // Replace the sharded checkpoint as a whole: the directory is swapped, its config files kept.
        let (grand, dir_name) = commit::split(&dir)?;
        self.dest = Destination {
            parent: grand,
            name: dir_name,
            is_dir: true,
            shown_dir: self.dest.shown_dir.clone(),
            keep_carried: true,
        };
        Ok(())
    }

    /// Fails as `create` would when `out` is taken (a checkpoint there without `overwrite`, an input, another
    /// writer), and leaves nothing behind: lets a long computation refuse its destination before it starts.
    pub fn check_destination_free(out: impl AsRef<Path>, opts: &WriterOptions) -> Result<()> {
        Self::create(out, Vec::new(), opts.clone()).map(drop)
    }

    pub fn decls(&self) -> &[TensorDecl] {
        &self.decls
    }

    /// Adds a small file (a config whose contents the command changed, a manifest) to a directory output: it is
    /// committed with the checkpoint, in the same swap, replacing a carried file of the same name. Writing such a
    /// file after `finish` instead would leave a moment (or, after a crash, for good) where the new weights sit
    /// beside the old file.
    pub fn add_file(&mut self, name: &str, bytes: Vec<u8>) -> Result<()> {
        if !self.dest.is_dir {
            return Err(Error::usage(format!("{}: a single-file output cannot hold {name}", self.out.display())));
        }
        let plain = Path::new(name).file_name().is_some_and(|f| f == name) && !name.starts_with('.');
        if !plain || self.shards.iter().any(|s| s.file_name == name) || name == INDEX_NAME {
            return Err(Error::invalid(format!("{}: '{name}' cannot be added to the checkpoint", self.out.display())));
        }
        self.extra_files.retain(|(n, _)| n != name);
        self.extra_files.push((name.to_string(), bytes));
        self.check_destination()
    }

    /// The names the new checkpoint consists of, in its directory: shards, index, carried and added files.
    fn new_names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.shards.iter().map(|s| s.file_name.clone()).collect();
        if self.shards.len() > 1 {
            v.push(INDEX_NAME.to_string());
        }
        if let Some(src) = &self.opts.carry_from {
            for f in CARRIED_FILES {
                if src.join(f).is_file() {
                    v.push(f.to_string());
                }
            }
        }
        for (name, _) in &self.extra_files {
            if !v.contains(name) {
                v.push(name.clone());
            }
        }
        v
    }

    /// The files `finish` will create, as the user will see them.
    pub fn final_files(&self) -> Vec<PathBuf> {
        if !self.dest.is_dir {
            return vec![self.out.clone()];
        }
        self.new_names().iter().map(|n| self.dest.shown_dir.join(n)).collect()
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
        let target = self.dest.target();
        let finals: Vec<PathBuf> = if self.dest.is_dir {
            self.new_names().iter().map(|n| target.join(n)).collect()
        } else {
            vec![target.clone()]
        };
        for (f, shown) in finals.iter().zip(self.final_files()) {
            if inputs.contains(f) {
                return Err(Error::usage(format!(
                    "{}: refusing to overwrite an input of this command",
                    shown.display()
                )));
            }
        }
        let meta = std::fs::symlink_metadata(&target).ok();
        if !self.dest.is_dir {
            if meta.as_ref().is_some_and(|m| m.is_dir()) {
                return Err(Error::usage(format!("{}: is a directory, not a .safetensors file", self.out.display())));
            }
            if meta.is_some() && !self.opts.overwrite {
                return Err(Error::usage(format!(
                    "{}: already exists; pass {} to replace it",
                    self.out.display(),
                    Arg::Force
                )));
            }
            return Ok(());
        }
        let Some(meta) = meta else { return Ok(()) };
        let shown = &self.dest.shown_dir;
        if !meta.is_dir() {
            return Err(Error::usage(format!("{}: exists and is not a directory", shown.display())));
        }
        if inputs.iter().any(|i| i.parent() == Some(target.as_path())) {
            return Err(Error::usage(format!(
                "{}: the output directory holds an input checkpoint; choose another output",
                shown.display()
            )));
        }
        if is_mount_point(&target) {
            return Err(Error::usage(format!(
                "{}: is a mount point; graft replaces a checkpoint directory by swapping in a new one beside it, \
                 which a mount point cannot be; write to a directory inside it",
                shown.display()
            )));
        }
        let old = self.old_checkpoint(&target);
        if !self.opts.overwrite {
            if let Some(existing) = old.first() {
                return Err(Error::usage(format!(
                    "{}: already holds a checkpoint ({existing}); pass {} to replace it",
                    shown.display(),
                    Arg::Force
                )));
            }
        }
        let new = self.new_names();
        for name in list_dir(&target).map_err(|e| Error::io(shown, e))? {
            if new.contains(&name) && !old.contains(&name) {
                return Err(Error::usage(format!(
                    "{}: is not part of the checkpoint there, and the new checkpoint needs its name; move it away",
                    shown.join(&name).display()
                )));
            }
        }
        Ok(())
    }

    /// The files of the checkpoint in `dir` that a replacement removes: its index and the shards it lists, or its
    /// `model.safetensors`, and (unless kept) the config and tokenizer files graft carries. Nothing else there
    /// belongs to it; an index is listed first.
    fn old_checkpoint(&self, dir: &Path) -> Vec<String> {
        let mut v = Vec::new();
        if let Some(shards) = read_index_shards(dir) {
            v.push(INDEX_NAME.to_string());
            v.extend(shards.into_iter().filter(|s| dir.join(s).is_file()));
        } else if dir.join(INDEX_NAME).is_file() {
            // An unreadable index: it is the checkpoint's, the shards it might list are unknown and stay.
            v.push(INDEX_NAME.to_string());
        }
        if dir.join(SINGLE_NAME).is_file() && !v.iter().any(|s| s == SINGLE_NAME) {
            v.push(SINGLE_NAME.to_string());
        }
        if !v.is_empty() && !self.dest.keep_carried {
            v.extend(CARRIED_FILES.iter().filter(|f| dir.join(f).is_file()).map(|f| f.to_string()));
        }
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
        if bytes.is_empty() {
            // A zero-element tensor: its header entry is all there is.
            self.next += 1;
            self.enter();
            return Ok(());
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

    /// Checks that `name` is due; zero-byte tensors before it need no data and are stepped over.
    fn expect(&mut self, name: &str) -> Result<()> {
        while self.next < self.decls.len() && self.decls[self.next].name != name && self.remaining == 0 {
            self.next += 1;
            self.enter();
        }
        match self.next_name() {
            Some(n) if n == name => Ok(()),
            Some(n) => Err(Error::invalid(format!("tensor '{name}' supplied while '{n}' is due next"))),
            None => Err(Error::invalid(format!("tensor '{name}' supplied after every declared tensor"))),
        }
    }

    /// Appends bytes to the current tensor; a piece may complete it and run into the next ones.
    pub fn write_data(&mut self, mut bytes: &[u8]) -> Result<()> {
        while !bytes.is_empty() {
            while self.remaining == 0 && self.next < self.decls.len() {
                self.next += 1;
                self.enter();
            }
            if self.next >= self.decls.len() {
                return Err(Error::invalid("more tensor data supplied than declared"));
            }
            self.ensure_open()?;
            let take = (self.remaining.min(bytes.len() as u64)) as usize;
            let open = self.open.as_mut().unwrap();
            open.file.write_all(&bytes[..take]).map_err(|e| Error::io(&open.shown, e))?;
            self.remaining -= take as u64;
            bytes = &bytes[take..];
            if self.remaining == 0 {
                self.next += 1;
                self.enter();
            }
        }
        Ok(())
    }

    /// Makes tensor `next` the current one: its byte count is what is due.
    fn enter(&mut self) {
        self.remaining = self.decls.get(self.next).map_or(0, |d| d.nbytes());
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

    fn shown(&self, file_name: &str) -> PathBuf {
        if self.dest.is_dir {
            self.dest.shown_dir.join(file_name)
        } else {
            self.out.clone()
        }
    }

    fn open_shard(&mut self, shard: usize) -> Result<()> {
        let shown = self.shown(&self.shards[shard].file_name);
        let f = match &self.staging_dir {
            Some(dir) => {
                let p = dir.path.join(&self.shards[shard].file_name);
                std::fs::OpenOptions::new().write(true).create_new(true).open(&p).map_err(|e| Error::io(&shown, e))?
            }
            None => {
                let (tmp, f) =
                    commit::TempFile::create(&self.dest.parent, &self.dest.name).map_err(|e| Error::io(&shown, e))?;
                self.staging_file = Some(tmp);
                f
            }
        };
        self.opened = shard + 1;
        let size = self.headers[shard].len() as u64 + self.shards[shard].data_bytes;
        let mut file = ShardFile::new(f, size >= DIRECT_FROM_BYTES);
        file.write_all(&self.headers[shard]).map_err(|e| Error::io(&shown, e))?;
        self.open = Some(Open { shard, shown, file });
        Ok(())
    }

    fn close_open(&mut self) -> Result<()> {
        if let Some(open) = self.open.take() {
            open.file.finish().map_err(|e| Error::io(&open.shown, e))?;
        }
        Ok(())
    }

    /// Completes the checkpoint: every declared tensor must have been supplied. The new checkpoint (shards, index,
    /// carried files, and hard links to the files of the destination directory that are not part of the checkpoint
    /// it replaces) is complete and synced beside the destination, then takes its place in one step.
    pub fn finish(mut self) -> Result<Written> {
        // Trailing zero-byte tensors need no data either.
        while self.next < self.decls.len() && self.decls[self.next].nbytes() == 0 {
            self.next += 1;
            self.enter();
        }
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

        let files = self.final_files();
        if self.dest.is_dir {
            self.commit_dir()?;
        } else {
            let target = self.dest.target();
            let tmp = self.staging_file.take().expect("a single-file output has its file open");
            tmp.commit(&target).map_err(|e| Error::io(&self.out, e))?;
        }
        self.finished = true;
        self.lock.take();
        self.dir_lock.take();
        Ok(Written {
            path: self.out.clone(),
            files,
            shards: self.shards.len(),
            tensors: self.decls.len(),
            total_bytes: self.decls.iter().map(|d| d.nbytes()).sum(),
        })
    }

    fn commit_dir(&mut self) -> Result<()> {
        let staging = self.staging_dir.as_ref().expect("a directory output has its staging directory").path.clone();
        if self.shards.len() > 1 {
            let index = self.index_json();
            let shown = self.shown(INDEX_NAME);
            write_new_synced(&staging.join(INDEX_NAME), index.as_bytes()).map_err(|e| Error::io(&shown, e))?;
        }
        if let Some(src) = self.opts.carry_from.clone() {
            for f in CARRIED_FILES {
                let from = src.join(f);
                if from.is_file() {
                    commit::copy_synced(&from, &staging.join(f)).map_err(|e| Error::io(self.shown(f), e))?;
                }
            }
        }
        for (name, bytes) in &self.extra_files {
            let path = staging.join(name);
            let shown = self.shown(name);
            if path.exists() {
                std::fs::remove_file(&path).map_err(|e| Error::io(&shown, e))?;
            }
            write_new_synced(&path, bytes).map_err(|e| Error::io(&shown, e))?;
        }
        let target = self.dest.target();
        let shown_dir = self.dest.shown_dir.clone();
        if std::fs::symlink_metadata(&target).is_err() {
            commit::sync_dir(&staging);
            std::fs::rename(&staging, &target).map_err(|e| Error::io(&shown_dir, e))?;
            self.staging_dir.take().unwrap().committed();
            commit::sync_dir(&self.dest.parent);
            return Ok(());
        }
        // Replacing: everything in the old directory that is not the old checkpoint comes along, as hard links, so
        // that whichever directory a crash leaves in place still has it.
        self.check_destination()?;
        let old = self.old_checkpoint(&target);
        for name in list_dir(&target).map_err(|e| Error::io(&shown_dir, e))? {
            if old.contains(&name) || commit::is_graft_temporary(&name) {
                continue;
            }
            commit::link_into(&target.join(&name), &staging.join(&name))
                .map_err(|e| Error::io(shown_dir.join(&name), e))?;
        }
        commit::sync_dir(&staging);
        let old_handle = File::open(&target).ok();
        commit::exchange(&staging, &target).map_err(|e| Error::io(&shown_dir, e))?;
        commit::sync_dir(&self.dest.parent);
        // `staging` now names the old checkpoint. Readers that opened it just before the swap are still mapping
        // its files: they hold a shared lock on it until they are done, so wait for them before deleting it.
        if let Some(h) = old_handle {
            commit::flock_wait(&h, true);
        }
        self.staging_dir.take();
        Ok(())
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
        self.open = None;
        if !self.finished {
            self.staging_dir.take();
            self.staging_file.take();
        }
        self.lock.take();
        self.dir_lock.take();
        if !self.finished {
            for d in self.created_dirs.iter().rev() {
                // Only succeeds when empty: nothing else is ever removed.
                let _ = std::fs::remove_dir(d);
            }
        }
    }
}

/// `out` with a last component that names something: `.`, `..` and `dir/..` are resolved (they exist, being
/// directories); anything else is taken as written.
fn named_path(out: &Path) -> PathBuf {
    let unnamed = matches!(
        out.components().next_back(),
        Some(std::path::Component::CurDir | std::path::Component::ParentDir) | None
    );
    if unnamed {
        out.canonicalize().unwrap_or_else(|_| out.to_path_buf())
    } else {
        out.to_path_buf()
    }
}

/// Creates `dir` and its missing ancestors; returns those it created, outermost first. Errors name the output.
fn create_missing_dirs(dir: &Path, out: &Path) -> Result<Vec<PathBuf>> {
    let mut missing = Vec::new();
    let mut p = dir.to_path_buf();
    while !p.as_os_str().is_empty() && std::fs::symlink_metadata(&p).is_err() {
        missing.push(p.clone());
        if !p.pop() {
            break;
        }
    }
    missing.reverse();
    for d in &missing {
        std::fs::create_dir(d).map_err(|e| Error::io(out, e))?;
    }
    Ok(missing)
}

/// The shard names the index in `dir` lists, or None without a readable index.
fn read_index_shards(dir: &Path) -> Option<Vec<String>> {
    let text = std::fs::read_to_string(dir.join(INDEX_NAME)).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    let map = json.get("weight_map")?.as_object()?;
    let mut v: Vec<String> = map
        .values()
        .filter_map(|f| f.as_str())
        .filter(|f| !f.contains('/') && !f.contains('\\') && *f != ".." && *f != ".")
        .map(str::to_string)
        .collect();
    v.sort();
    v.dedup();
    Some(v)
}

fn list_dir(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        v.push(e?.file_name().to_string_lossy().to_string());
    }
    v.sort();
    Ok(v)
}

fn write_new_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(unix)]
fn is_mount_point(dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(dir), std::fs::metadata(dir.join(".."))) {
        (Ok(a), Ok(b)) => a.dev() != b.dev(),
        _ => false,
    }
}

#[cfg(not(unix))]
fn is_mount_point(_: &Path) -> bool {
    false
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
