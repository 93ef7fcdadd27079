//! The one tensor-streaming executor: every command that reads tensors, computes, and writes or reduces goes
//! through here, so parallelism, memory bounds, determinism, page release and the progress bar live in one place.
//!
//! Small tensors are computed several at a time (a window bounded by count and bytes) and written in declared order.
//! Large tensors are split into fixed-size element chunks computed in parallel and written in order, so memory
//! stays at a few chunks per thread instead of the whole tensor. Chunk boundaries never depend on the thread
//! count, which is what makes every result bit-identical whatever `--threads` says.
//!
//! The read side is the executor's too. An output that is an input tensor written as it is (`Produce::Input`) is
//! copied byte for byte when the dtypes match and converted through `checkpoint::dtype` chunk by chunk otherwise
//! (always for a view that applies a low-rank update: its stored bytes are not its values).
//! Every input an output reads (a `Read`) has its mapped pages released once used: chunk by chunk for inputs the
//! size of the output, and whole once the output tensor is done. Without that every page ever read stays mapped and
//! counts towards resident memory, and a command passing a model through would hold the whole model. Kernels still
//! read their own element ranges from the views (that is what lets them stream and run pre-passes); the executor
//! decides when the pages of the merge pass go. A merge method's pre-pass (slerp's norms, the TIES rank pass) reads
//! the whole tensor before the first chunk is computed, so for a large tensor it releases what it has read itself,
//! chunk by chunk, through the same `Read`s (`merge::method::TensorInputs::release_pages`).

use std::io::IsTerminal;
use std::ops::Range;
use std::sync::mpsc::SyncSender;

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::checkpoint::{dtype, guard, Checkpoint, CheckpointWriter, TensorDecl, TensorView, Written};
use crate::error::{Error, Result};

/// Elements per chunk of a large tensor (4 MiB of f32).
pub const CHUNK_ELEMS: usize = 1 << 20;

/// Upper bound on the f32 bytes of one window of small tensors computed together.
pub const WINDOW_BYTES: u64 = 256 << 20;

/// One input tensor that an output reads: where its bytes are mapped, so their pages can be released once used.
#[derive(Clone, Copy, Debug)]
pub struct Read<'a> {
    pub checkpoint: &'a Checkpoint,
    pub tensor: TensorView<'a>,
}

impl<'a> Read<'a> {
    /// Tensor `name` of `checkpoint` (an error naming both when it is missing).
    pub fn new(checkpoint: &'a Checkpoint, name: &str) -> Result<Read<'a>> {
        Ok(Read { checkpoint, tensor: checkpoint.tensor(name)? })
    }

    /// Drops the mapped pages of elements `range` (clamped to the tensor). The bytes stay in the page cache; reading
    /// them again maps them again, so releasing early costs a page fault, never a wrong value.
    pub fn release_range(&self, range: Range<usize>) {
        let s = self.tensor.dtype.size();
        let end = range.end.min(self.tensor.numel());
        if range.start < end {
            self.checkpoint.release_bytes(&self.tensor.data[range.start * s..end * s]);
        }
    }

    /// Drops the mapped pages of the whole tensor.
    pub fn release(&self) {
        self.checkpoint.release_bytes(self.tensor.data);
    }

    /// Elements `range` widened to f32, their pages released: for reduction passes that read each range once.
    pub fn take_f32(&self, range: Range<usize>) -> Result<Vec<f32>> {
        let v = self.tensor.f32_range(range.clone())?;
        self.release_range(range);
        Ok(v)
    }
}

/// An elementwise computation: any element range can be computed on its own.
pub type Compute<'a> = Box<dyn Fn(Range<usize>) -> Result<Vec<f32>> + Send + Sync + 'a>;

/// An elementwise computation that hands the values of a range to its sink in consecutive pieces, in order.
pub type ComputePieces<'a> = Box<dyn Fn(Range<usize>, &mut dyn FnMut(&[f32])) -> Result<()> + Send + Sync + 'a>;

/// How the executor obtains one output tensor.
pub enum Produce<'a> {
    /// Computed bytes already in the declared dtype.
    Owned(Vec<u8>),
    /// The whole tensor as f32; the executor narrows it to the declared dtype.
    F32(Vec<f32>),
    /// An input tensor written as it is: its bytes when its dtype is the declared one (and the view applies no update),
    /// otherwise its values converted
    /// (float to float only, round to nearest even when narrowing). Its pages are released once written.
    Input(Read<'a>),
    /// An elementwise computation, called per chunk, and the inputs it reads, released as described in the header.
    Elementwise { compute: Compute<'a>, reads: Vec<Read<'a>> },
    /// Like `Elementwise`, for a computation that works in cache-sized pieces: each piece is narrowed to the
    /// declared dtype as it is handed over, while it is still in cache, instead of being copied into a chunk-sized
    /// f32 vector that is then read again (the copy alone was 5-7% of a merge's CPU time).
    Pieces { compute: ComputePieces<'a>, reads: Vec<Read<'a>> },
}

impl<'a> Produce<'a> {
    /// Tensor `name` of `checkpoint` written as it is (see `Produce::Input`).
    pub fn input(checkpoint: &'a Checkpoint, name: &str) -> Result<Produce<'a>> {
        Ok(Produce::Input(Read::new(checkpoint, name)?))
    }

    /// `compute` run per chunk, reading `reads`.
    pub fn elementwise(
        reads: Vec<Read<'a>>,
        compute: impl Fn(Range<usize>) -> Result<Vec<f32>> + Send + Sync + 'a,
    ) -> Produce<'a> {
        Produce::Elementwise { compute: Box::new(compute), reads }
    }

    /// `compute` run per chunk, reading `reads`, handing over its values in pieces (see `Produce::Pieces`).
    pub fn pieces(
        reads: Vec<Read<'a>>,
        compute: impl Fn(Range<usize>, &mut dyn FnMut(&[f32])) -> Result<()> + Send + Sync + 'a,
    ) -> Produce<'a> {
        Produce::Pieces { compute: Box::new(compute), reads }
    }
}

/// Bytes ready for the writer.
enum Ready<'a> {
    Owned(Vec<u8>),
    /// A piece of an input's memory map, written without a copy and released once written.
    Mapped {
        bytes: &'a [u8],
        from: &'a Checkpoint,
    },
}

/// What the writer thread is handed, in output order.
enum Pending<'a> {
    /// A whole tensor.
    Tensor(String, Ready<'a>),
    /// The next chunk of the large tensor being written.
    Data(Ready<'a>),
}

impl Ready<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Ready::Owned(v) => v,
            Ready::Mapped { bytes, .. } => bytes,
        }
    }

    /// Called once the bytes are written: releases mapped pages, returns the byte count.
    fn written(self) -> usize {
        match self {
            Ready::Owned(v) => v.len(),
            Ready::Mapped { bytes, from } => {
                from.release_bytes(bytes);
                bytes.len()
            }
        }
    }
}

pub struct Executor {
    pool: rayon::ThreadPool,
    threads: usize,
    progress: bool,
}

impl Executor {
    /// An executor with `threads` workers (all cores when None).
    pub fn new(threads: Option<usize>) -> Result<Self> {
        let threads =
            threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)).max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .map_err(|e| Error::invalid(format!("cannot start {threads} worker threads: {e}")))?;
        Ok(Executor { pool, threads, progress: std::io::stderr().is_terminal() })
    }

    /// Turns the progress bar off (it is on only when stderr is a terminal to begin with).
    pub fn quiet(mut self) -> Self {
        self.progress = false;
        self
    }

    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Runs `f` inside the worker pool, so nested rayon calls use its threads.
    pub fn install<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        self.pool.install(f)
    }

    fn bar(&self, total: u64, label: &str) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{msg:>10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .unwrap()
                .progress_chars("=> "),
        );
        bar.set_message(label.to_string());
        bar
    }

    /// Streams every tensor declared in `writer`: `produce(i, decl)` says how to obtain tensor `i`.
    ///
    /// A dedicated thread writes while the workers compute the next chunks: writing is a kernel copy of every output
    /// byte, and done in turn with the computation it left the workers idle for a third of a merge.
    pub fn write<'a, P>(&self, writer: CheckpointWriter, label: &str, produce: P) -> Result<Written>
    where
        P: Fn(usize, &TensorDecl) -> Result<Produce<'a>> + Sync,
    {
        let decls = writer.decls().to_vec();
        let bar = self.bar(decls.iter().map(|d| d.nbytes()).sum(), label);
        // Bounded: at most a few chunks per worker wait for the disk.
        let (tx, rx) = std::sync::mpsc::sync_channel::<Pending<'a>>(2 * self.threads);
        let writer_bar = bar.clone();
        let (produced, written) = std::thread::scope(|scope| {
            let writer_thread = scope.spawn(move || -> Result<CheckpointWriter> {
                let mut writer = writer;
                for pending in rx {
                    let n = match pending {
                        Pending::Tensor(name, r) => {
                            writer.write_tensor(&name, r.bytes())?;
                            r.written()
                        }
                        Pending::Data(r) => {
                            writer.write_data(r.bytes())?;
                            r.written()
                        }
                    };
                    writer_bar.inc(n as u64);
                }
                Ok(writer)
            });
            let produced = self.produce_all(&decls, &produce, &tx);
            drop(tx);
            let written = writer_thread.join().unwrap_or_else(|_| Err(Error::invalid("the writer thread panicked")));
            (produced, written)
        });
        // A failed write stops the producer with a send error: the writer's own error is the one to report.
        let writer = written?;
        produced?;
        bar.finish_and_clear();
        writer.finish()
    }

    fn produce_all<'a, P>(&self, decls: &[TensorDecl], produce: &P, tx: &SyncSender<Pending<'a>>) -> Result<()>
    where
        P: Fn(usize, &TensorDecl) -> Result<Produce<'a>> + Sync,
    {
        let send = |p: Pending<'a>| tx.send(p).map_err(|_| Error::invalid("the checkpoint writer stopped"));
        let mut i = 0;
        while i < decls.len() {
            if decls[i].numel() > CHUNK_ELEMS {
                let d = &decls[i];
                let p = self.pool.install(|| produce(i, d))?;
                self.produce_large(d, p, &send)?;
                i += 1;
                continue;
            }
            let small_cost = |k: usize| (decls[k].numel() <= CHUNK_ELEMS).then(|| 4 * decls[k].numel() as u64);
            let end = window_end(i, decls.len(), 4 * self.threads, WINDOW_BYTES, small_cost);
            let ready: Vec<Result<Ready<'a>>> = self.pool.install(|| {
                (i..end).into_par_iter().map(|k| finish_small(&decls[k], produce(k, &decls[k])?)).collect()
            });
            for (k, r) in (i..end).zip(ready) {
                send(Pending::Tensor(decls[k].name.clone(), r?))?;
            }
            i = end;
        }
        Ok(())
    }

    fn produce_large<'a>(
        &self,
        d: &TensorDecl,
        p: Produce<'a>,
        send: &dyn Fn(Pending<'a>) -> Result<()>,
    ) -> Result<()> {
        match p {
            Produce::Input(read) if check_input(d, &read)? => {
                // Same dtype: the mapped bytes go to the writer chunk by chunk, each released once written.
                read.tensor.check_stored_finite()?;
                let s = d.dtype.size();
                for r in chunk_ranges(d.numel()) {
                    let bytes = &read.tensor.data[r.start * s..r.end * s];
                    send(Pending::Data(Ready::Mapped { bytes, from: read.checkpoint }))?;
                }
                Ok(())
            }
            Produce::Input(read) => {
                let chunk = |r: Range<usize>| narrow_whole(d, r.len(), read.tensor.f32_range(r)?);
                self.produce_chunks(d, &chunk, std::slice::from_ref(&read), send)
            }
            Produce::Elementwise { compute, reads } => {
                self.produce_chunks(d, &|r: Range<usize>| narrow_whole(d, r.len(), compute(r)?), &reads, send)
            }
            Produce::Pieces { compute, reads } => {
                let chunk = |r: Range<usize>| {
                    let mut bytes = Vec::with_capacity(r.len() * d.dtype.size());
                    let (mut values, mut nonfinite) = (0usize, 0usize);
                    compute(r.clone(), &mut |piece| {
                        values += piece.len();
                        nonfinite += dtype::from_f32_counting(d.dtype, piece, &mut bytes);
                    })?;
                    check_len(d, r.len(), values)?;
                    Ok((bytes, nonfinite))
                };
                self.produce_chunks(d, &chunk, &reads, send)
            }
            other => send(Pending::Tensor(d.name.clone(), finish_small(d, other)?)),
        }
    }

    /// Computes a large tensor's chunks in parallel windows and sends them in order, releasing each input's pages
    /// of a chunk once it is computed (inputs the size of the output) and every input once the tensor is done.
    /// `chunk(r)` returns the bytes of elements `r` in the declared dtype and how many of them are non-finite.
    fn produce_chunks<'a>(
        &self,
        d: &TensorDecl,
        chunk: &(dyn Fn(Range<usize>) -> Result<(Vec<u8>, usize)> + Sync),
        reads: &[Read<'a>],
        send: &dyn Fn(Pending<'a>) -> Result<()>,
    ) -> Result<()> {
        float_needed(d)?;
        let aligned: Vec<&Read> = reads.iter().filter(|r| r.tensor.numel() == d.numel()).collect();
        let ranges: Vec<Range<usize>> = chunk_ranges(d.numel()).collect();
        // Non-finite values after rounding, counted over every chunk and reported once for the tensor.
        let mut nonfinite = 0usize;
        for window in ranges.chunks(2 * self.threads) {
            let parts: Vec<Result<(Vec<u8>, usize)>> = self.pool.install(|| {
                window
                    .par_iter()
                    .map(|r| {
                        let narrowed = chunk(r.clone())?;
                        aligned.iter().for_each(|read| read.release_range(r.clone()));
                        Ok(narrowed)
                    })
                    .collect()
            });
            for part in parts {
                let (bytes, bad) = part?;
                nonfinite += bad;
                send(Pending::Data(Ready::Owned(bytes)))?;
            }
        }
        reads.iter().for_each(Read::release);
        guard::nonfinite_output(&d.name, d.dtype, d.numel(), nonfinite)
    }

    /// Computes `compute(i)` for every `i in 0..costs.len()` in parallel windows (at most a few items per thread and
    /// `budget` summed cost per window, but always at least one item) and hands the results to `sink` in order.
    pub fn map_ordered<T, C, S>(&self, costs: &[u64], budget: u64, label: &str, compute: C, mut sink: S) -> Result<()>
    where
        T: Send,
        C: Fn(usize) -> Result<T> + Sync,
        S: FnMut(usize, T) -> Result<()>,
    {
        let bar = self.bar(costs.iter().sum(), label);
        let mut i = 0;
        while i < costs.len() {
            let end = window_end(i, costs.len(), 2 * self.threads, budget, |k| Some(costs[k]));
            let out: Vec<Result<T>> = self.pool.install(|| (i..end).into_par_iter().map(&compute).collect());
            for (k, r) in (i..end).zip(out) {
                sink(k, r?)?;
                bar.inc(costs[k]);
            }
            i = end;
        }
        bar.finish_and_clear();
        Ok(())
    }

    /// Runs `f` over the fixed chunks of `0..n` in parallel and returns the per-chunk results in order, for
    /// reductions that must combine partial sums in a thread-count-independent order.
    pub fn chunked<T: Send>(&self, n: usize, f: impl Fn(Range<usize>) -> Result<T> + Sync) -> Result<Vec<T>> {
        let ranges: Vec<Range<usize>> = chunk_ranges(n).collect();
        self.pool.install(|| ranges.into_par_iter().map(&f).collect())
    }
}

/// The fixed chunking of `0..n` into `CHUNK_ELEMS`-sized ranges (one empty range for n = 0 is not produced).
pub fn chunk_ranges(n: usize) -> impl Iterator<Item = Range<usize>> {
    (0..n.div_ceil(CHUNK_ELEMS)).map(move |c| c * CHUNK_ELEMS..((c + 1) * CHUNK_ELEMS).min(n))
}

/// The end of the window of items that starts at `start` (of `len`): items join while the window holds fewer than
/// `max_items` and their summed cost stays within `budget`, the first one always; an item costing None joins no
/// window (it is handled on its own).
fn window_end(start: usize, len: usize, max_items: usize, budget: u64, cost: impl Fn(usize) -> Option<u64>) -> usize {
    let mut end = start;
    let mut used = 0u64;
    while end < len && end - start < max_items {
        let Some(c) = cost(end) else { break };
        if end > start && used + c > budget {
            break;
        }
        used += c;
        end += 1;
    }
    end
}

/// `v` (computed for `want` elements) narrowed to `d`'s dtype, with its count of non-finite values.
fn narrow_whole(d: &TensorDecl, want: usize, v: Vec<f32>) -> Result<(Vec<u8>, usize)> {
    check_len(d, want, v.len())?;
    Ok(dtype::from_f32_vec_counting(d.dtype, &v))
}

fn check_len(d: &TensorDecl, want: usize, got: usize) -> Result<()> {
    if want == got {
        Ok(())
    } else {
        Err(Error::invalid(format!("tensor '{}': computed {got} values where {want} were expected", d.name)))
    }
}

fn float_needed(d: &TensorDecl) -> Result<()> {
    if d.dtype.is_float() {
        Ok(())
    } else {
        Err(Error::invalid(format!("tensor '{}': computed values for a {} tensor", d.name, d.dtype)))
    }
}

/// Checks that `read` can be written as output `d`; true when its bytes can be copied as they are (same dtype),
/// false when its values are to be converted.
fn check_input(d: &TensorDecl, read: &Read) -> Result<bool> {
    let t = &read.tensor;
    if t.numel() != d.numel() {
        return Err(Error::tensor(
            t.file,
            t.name,
            format!("{} elements, but output tensor '{}' is declared with {}", t.numel(), d.name, d.numel()),
        ));
    }
    // A view with an update reads other values than its stored bytes: it is converted, never copied.
    if t.dtype == d.dtype && t.is_stored() {
        return Ok(true);
    }
    if !(t.dtype.is_float() && d.dtype.is_float()) {
        return Err(Error::tensor(
            t.file,
            t.name,
            format!("stored as {}, which cannot be converted to {} (output tensor '{}')", t.dtype, d.dtype, d.name),
        ));
    }
    Ok(false)
}

/// Narrows a whole computed tensor to its declared dtype, refusing (or warning about) values that are NaN or
/// infinite after rounding.
fn narrow_checked<'a>(d: &TensorDecl, v: &[f32]) -> Result<Ready<'a>> {
    let (bytes, nonfinite) = dtype::from_f32_vec_counting(d.dtype, v);
    guard::nonfinite_output(&d.name, d.dtype, d.numel(), nonfinite)?;
    Ok(Ready::Owned(bytes))
}

fn finish_small<'a>(d: &TensorDecl, p: Produce<'a>) -> Result<Ready<'a>> {
    let bytes_ok = |n: usize| -> Result<()> {
        if n as u64 == d.nbytes() {
            Ok(())
        } else {
            Err(Error::invalid(format!("tensor '{}': {n} bytes produced, {} declared", d.name, d.nbytes())))
        }
    };
    match p {
        Produce::Owned(v) => {
            bytes_ok(v.len())?;
            Ok(Ready::Owned(v))
        }
        Produce::F32(v) => {
            float_needed(d)?;
            check_len(d, d.numel(), v.len())?;
            narrow_checked(d, &v)
        }
        Produce::Input(read) => {
            if check_input(d, &read)? {
                read.tensor.check_stored_finite()?;
                return Ok(Ready::Mapped { bytes: read.tensor.data, from: read.checkpoint });
            }
            let v = read.tensor.f32_range(0..d.numel())?;
            read.release();
            narrow_checked(d, &v)
        }
        Produce::Elementwise { compute, reads } => {
            float_needed(d)?;
            let mut v = Vec::with_capacity(d.numel());
            for r in chunk_ranges(d.numel()) {
                let part = compute(r.clone())?;
                check_len(d, r.len(), part.len())?;
                v.extend(part);
            }
            reads.iter().for_each(Read::release);
            narrow_checked(d, &v)
        }
        Produce::Pieces { compute, reads } => {
            float_needed(d)?;
            let mut v = Vec::with_capacity(d.numel());
            for r in chunk_ranges(d.numel()) {
                let before = v.len();
                compute(r.clone(), &mut |piece| v.extend_from_slice(piece))?;
                check_len(d, r.len(), v.len() - before)?;
            }
            reads.iter().for_each(Read::release);
            narrow_checked(d, &v)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{Dtype, WriterOptions};
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// 2.5 chunks: two full chunks and a half one, so chunk windows, the chunk boundary and the ragged end all occur.
    const LARGE: usize = 2 * CHUNK_ELEMS + CHUNK_ELEMS / 2;

    /// A value per element that no chunking could reproduce by accident (it depends on the global index).
    fn value(i: usize) -> f32 {
        ((i.wrapping_mul(2_654_435_761) % 100_003) as f32 - 50_000.0) * 1.0e-3
    }

    /// bf16 bytes of `x` by the textbook rule (round to nearest even on the f32 bits; no NaNs here).
    fn bf16_reference(x: f32) -> [u8; 2] {
        let b = x.to_bits();
        (((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16).to_le_bytes()
    }

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    /// Writes `tensors` (name, dtype, shape, bytes) to a single file in `dir`, directly through the writer.
    fn write_input(dir: &std::path::Path, tensors: &[(&str, Dtype, Vec<usize>, Vec<u8>)]) -> Checkpoint {
        let path = dir.join("input.safetensors");
        let decls = tensors.iter().map(|(n, d, s, _)| TensorDecl::new(*n, *d, s.clone())).collect();
        let mut w = CheckpointWriter::create(&path, decls, WriterOptions::default()).unwrap();
        for (n, _, _, b) in tensors {
            w.write_tensor(n, b).unwrap();
        }
        w.finish().unwrap();
        Checkpoint::open(&path).unwrap()
    }

    fn exec(threads: usize) -> Executor {
        Executor::new(Some(threads)).unwrap().quiet()
    }

    #[test]
    fn a_large_tensor_is_written_the_same_with_one_two_and_three_threads() {
        let dir = tempfile::tempdir().unwrap();
        let small: Vec<f32> = (0..1000).map(value).collect();
        let decls = vec![
            TensorDecl::new("before", Dtype::F32, vec![10, 100]),
            TensorDecl::new("large", Dtype::BF16, vec![LARGE / 1024, 1024]),
            TensorDecl::new("after", Dtype::BF16, vec![1000]),
        ];
        let reference: Vec<u8> = (0..LARGE).flat_map(|i| bf16_reference(value(i))).collect();
        for threads in [1, 2, 3] {
            let out = dir.path().join(format!("t{threads}.safetensors"));
            let writer = CheckpointWriter::create(&out, decls.clone(), WriterOptions::default()).unwrap();
            exec(threads)
                .write(writer, "test", |i, _| {
                    Ok(match i {
                        0 => Produce::Owned(f32_bytes(&small)),
                        1 => Produce::elementwise(Vec::new(), |r: Range<usize>| Ok(r.map(value).collect())),
                        _ => Produce::F32(small.clone()),
                    })
                })
                .unwrap();
            let ck = Checkpoint::open(&out).unwrap();
            assert!(ck.tensor("large").unwrap().data == reference.as_slice(), "{threads} threads");
            assert_eq!(ck.tensor("before").unwrap().data, f32_bytes(&small).as_slice());
            let after: Vec<u8> = small.iter().flat_map(|&x| bf16_reference(x)).collect();
            assert_eq!(ck.tensor("after").unwrap().data, after.as_slice());
        }
    }

    #[test]
    fn pieces_are_narrowed_as_handed_over_the_same_with_one_two_and_three_threads() {
        let dir = tempfile::tempdir().unwrap();
        let decls =
            vec![TensorDecl::new("large", Dtype::BF16, vec![LARGE]), TensorDecl::new("small", Dtype::F16, vec![1000])];
        // Pieces of uneven sizes that cross nothing in particular: the executor must not care where they end.
        let pieces = |r: Range<usize>, sink: &mut dyn FnMut(&[f32])| -> Result<()> {
            let v: Vec<f32> = r.map(value).collect();
            let mut rest = &v[..];
            let mut size = 1;
            while !rest.is_empty() {
                let (piece, tail) = rest.split_at(size.min(rest.len()));
                sink(piece);
                rest = tail;
                size = size * 7 % 40_009 + 1;
            }
            Ok(())
        };
        let large: Vec<u8> = (0..LARGE).flat_map(|i| bf16_reference(value(i))).collect();
        let small: Vec<u8> = (0..1000).flat_map(|i| half::f16::from_f32(value(i)).to_bits().to_le_bytes()).collect();
        for threads in [1, 2, 3] {
            let out = dir.path().join(format!("p{threads}.safetensors"));
            let writer = CheckpointWriter::create(&out, decls.clone(), WriterOptions::default()).unwrap();
            exec(threads).write(writer, "test", |_, _| Ok(Produce::pieces(Vec::new(), pieces))).unwrap();
            let ck = Checkpoint::open(&out).unwrap();
            assert!(ck.tensor("large").unwrap().data == large.as_slice(), "{threads} threads");
            assert_eq!(ck.tensor("small").unwrap().data, small.as_slice(), "{threads} threads");
        }
        // A computation that hands over fewer values than its range is an error naming the tensor, large or small.
        for (name, n) in [("large", LARGE), ("small", 1000)] {
            let out = dir.path().join("short.safetensors");
            let decl = TensorDecl::new(name, Dtype::BF16, vec![n]);
            let writer = CheckpointWriter::create(&out, vec![decl], WriterOptions::default()).unwrap();
            let short = |r: Range<usize>, sink: &mut dyn FnMut(&[f32])| -> Result<()> {
                sink(&vec![1.0; r.len() - 1]);
                Ok(())
            };
            let err = exec(2).write(writer, "test", |_, _| Ok(Produce::pieces(Vec::new(), short))).unwrap_err();
            assert!(err.to_string().contains(&format!("'{name}'")) && err.to_string().contains("expected"), "{err}");
        }
    }

    #[test]
    fn windows_respect_the_item_count_and_the_budget() {
        let costs = [10u64, 10, 10, 50, 5, 5, 5, 5];
        let windows = |max_items, budget, cost: &dyn Fn(usize) -> Option<u64>| {
            let mut out = Vec::new();
            let mut i = 0;
            while i < costs.len() {
                let end = window_end(i, costs.len(), max_items, budget, cost).max(i + 1);
                out.push(i..end);
                i = end;
            }
            out
        };
        // Budget 25: two 10s fit, a third would make 30; 50 alone exceeds it but a window always takes one item.
        assert_eq!(windows(8, 25, &|k| Some(costs[k])), vec![0..2, 2..3, 3..4, 4..8]);
        // At most three items, whatever the budget.
        assert_eq!(windows(3, 1000, &|k| Some(costs[k])), vec![0..3, 3..6, 6..8]);
        // An item without a cost (a large tensor) joins no window: it ends the one before it.
        assert_eq!(window_end(0, costs.len(), 8, 1000, |k| (k != 3).then_some(costs[k])), 3);
        assert_eq!(window_end(3, costs.len(), 8, 1000, |k| (k != 3).then_some(costs[k])), 3);
    }

    #[test]
    fn map_ordered_computes_windows_and_sinks_in_order() {
        // Each compute records how many results had been sunk when it ran: equal for all items of one window (all
        // computed before any is sunk), and equal to the window's first index (everything before was sunk).
        let costs: Vec<u64> = vec![3, 3, 3, 9, 1, 1, 1, 1, 1, 2];
        for threads in [1, 2, 3] {
            let sunk = AtomicUsize::new(0);
            let seen: Vec<AtomicUsize> = costs.iter().map(|_| AtomicUsize::new(usize::MAX)).collect();
            let mut order = Vec::new();
            exec(threads)
                .map_ordered(
                    &costs,
                    6,
                    "test",
                    |k| {
                        seen[k].store(sunk.load(Ordering::SeqCst), Ordering::SeqCst);
                        Ok(k * 10)
                    },
                    |k, v| {
                        assert_eq!(v, k * 10);
                        order.push(k);
                        sunk.fetch_add(1, Ordering::SeqCst);
                        Ok(())
                    },
                )
                .unwrap();
            assert_eq!(order, (0..costs.len()).collect::<Vec<_>>());
            let starts: Vec<usize> = seen.iter().map(|s| s.load(Ordering::SeqCst)).collect();
            let mut k = 0;
            while k < costs.len() {
                let start = starts[k];
                assert_eq!(start, k, "{threads} threads: item {k} computed before its window began");
                let end = (k..costs.len()).find(|&j| starts[j] != start).unwrap_or(costs.len());
                let total: u64 = costs[k..end].iter().sum();
                assert!(end - k <= 2 * threads, "{threads} threads: window {k}..{end} too long");
                assert!(end - k == 1 || total <= 6, "{threads} threads: window {k}..{end} over budget");
                k = end;
            }
        }
    }

    #[test]
    fn a_writer_error_is_reported_instead_of_the_producers() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let decls: Vec<TensorDecl> = (0..40).map(|i| TensorDecl::new(format!("t{i}"), Dtype::F32, vec![4])).collect();
        // One tensor per shard: the writer opens a new file for every tensor, in a temporary directory beside the
        // output (the commit protocol), so removing the parent makes its next file fail.
        let opts = WriterOptions { max_shard_size: 16, ..WriterOptions::default() };
        let writer = CheckpointWriter::create(&out, decls, opts).unwrap();
        let parent = dir.path().to_path_buf();
        let err = exec(1)
            .write(writer, "test", |i, _| {
                if i == 1 {
                    // Before anything reaches the writer (a window is computed before it is sent): the writer fails
                    // on its first file.
                    std::fs::remove_dir_all(&parent).unwrap();
                }
                if i == 6 {
                    return Err(Error::invalid("the producer failed"));
                }
                Ok(Produce::F32(vec![1.0; 4]))
            })
            .unwrap_err();
        assert!(matches!(err, Error::Io { .. }), "the writer's I/O error should win: {err}");
    }

    #[test]
    fn inputs_are_copied_when_dtypes_match_and_converted_otherwise() {
        let dir = tempfile::tempdir().unwrap();
        let large: Vec<f32> = (0..LARGE).map(value).collect();
        let large_bf16: Vec<u8> = large.iter().flat_map(|&x| bf16_reference(x)).collect();
        let small: Vec<f32> = (0..300).map(|i| value(i) * 1.0e3).collect();
        let ints: Vec<u8> = (0..6i64).flat_map(|v| (v * 1_000_000_007).to_le_bytes()).collect();
        let ck = write_input(
            dir.path(),
            &[
                ("large", Dtype::BF16, vec![LARGE], large_bf16.clone()),
                ("small", Dtype::F32, vec![300], f32_bytes(&small)),
                ("ints", Dtype::I64, vec![2, 3], ints.clone()),
            ],
        );
        // Widening bf16 to f32 is exact: the upper half of the f32 bits.
        let large_f32: Vec<u8> = large_bf16
            .chunks(2)
            .flat_map(|b| f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16).to_le_bytes())
            .collect();
        let small_bf16: Vec<u8> = small.iter().flat_map(|&x| bf16_reference(x)).collect();
        for threads in [1, 3] {
            for (dtypes, want) in [
                ([Dtype::BF16, Dtype::F32], [&large_bf16, &f32_bytes(&small)]),
                ([Dtype::F32, Dtype::BF16], [&large_f32, &small_bf16]),
            ] {
                let out = dir.path().join(format!("{threads}-{}.safetensors", dtypes[0]));
                let decls = vec![
                    TensorDecl::new("large", dtypes[0], vec![LARGE]),
                    TensorDecl::new("small", dtypes[1], vec![300]),
                    TensorDecl::new("ints", Dtype::I64, vec![6]),
                ];
                let writer = CheckpointWriter::create(&out, decls, WriterOptions::default()).unwrap();
                exec(threads).write(writer, "test", |_, d| Produce::input(&ck, &d.name)).unwrap();
                let back = Checkpoint::open(&out).unwrap();
                assert!(back.tensor("large").unwrap().data == want[0].as_slice(), "large as {}", dtypes[0]);
                assert_eq!(back.tensor("small").unwrap().data, want[1].as_slice(), "small as {}", dtypes[1]);
                assert_eq!(back.tensor("ints").unwrap().data, ints.as_slice());
            }
        }
        // Integers do not convert; an input of another size does not fit. Both errors name the input tensor.
        for (decl, why) in [
            (TensorDecl::new("ints", Dtype::F32, vec![6]), "cannot be converted"),
            (TensorDecl::new("small", Dtype::F32, vec![301]), "elements"),
        ] {
            let out = dir.path().join("bad.safetensors");
            let writer = CheckpointWriter::create(&out, vec![decl.clone()], WriterOptions::default()).unwrap();
            let err = exec(2).write(writer, "test", |_, d| Produce::input(&ck, &d.name)).unwrap_err().to_string();
            assert!(err.contains(&format!("'{}'", decl.name)) && err.contains(why), "{err}");
        }
    }

    #[test]
    fn releasing_pages_never_changes_what_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let v: Vec<f32> = (0..5000).map(value).collect();
        let ck = write_input(dir.path(), &[("t", Dtype::F32, vec![5000], f32_bytes(&v))]);
        let read = Read::new(&ck, "t").unwrap();
        assert_eq!(read.take_f32(100..2100).unwrap(), v[100..2100]);
        read.release_range(4000..9000); // clamped to the tensor
        read.release();
        assert_eq!(read.tensor.f32_range(0..5000).unwrap(), v);
        assert!(Read::new(&ck, "missing").unwrap_err().to_string().contains("missing"));
    }
}
