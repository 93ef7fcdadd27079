//! The one tensor-streaming executor: every command that reads tensors, computes, and writes or reduces goes
//! through here, so parallelism, memory bounds, determinism and the progress bar live in one place.
//!
//! Small tensors are computed several at a time (a window bounded by count and bytes) and written in declared order.
//! Large tensors are split into fixed-size element chunks computed in parallel and written in order, so memory
//! stays at a few chunks per thread instead of the whole tensor. Chunk boundaries never depend on the thread
//! count, which is what makes every result bit-identical whatever `--threads` says.

use std::io::IsTerminal;
use std::ops::Range;
use std::sync::mpsc::SyncSender;

use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::checkpoint::{dtype, guard, CheckpointWriter, TensorDecl, Written};
use crate::error::{Error, Result};

/// Elements per chunk of a large tensor (4 MiB of f32).
pub const CHUNK_ELEMS: usize = 1 << 20;

/// Upper bound on the f32 bytes of one window of small tensors computed together.
pub const WINDOW_BYTES: u64 = 256 << 20;

/// How the executor obtains one output tensor.
pub enum Produce<'a> {
    /// Bytes already in the declared dtype, typically a zero-copy view of an input (pass-through).
    Bytes(&'a [u8]),
    /// Computed bytes already in the declared dtype.
    Owned(Vec<u8>),
    /// The whole tensor as f32; the executor narrows it to the declared dtype.
    F32(Vec<f32>),
    /// An elementwise computation: any element range can be computed on its own. The executor calls it per chunk.
    Elementwise(Box<dyn Fn(Range<usize>) -> Result<Vec<f32>> + Send + Sync + 'a>),
}

enum Ready<'a> {
    Borrowed(&'a [u8]),
    Owned(Vec<u8>),
}

/// What the writer thread is handed, in output order.
enum Pending<'a> {
    /// A whole tensor.
    Tensor(String, Ready<'a>),
    /// The next chunk of the large tensor being written.
    Data(Vec<u8>),
}

impl Ready<'_> {
    fn bytes(&self) -> &[u8] {
        match self {
            Ready::Borrowed(b) => b,
            Ready::Owned(v) => v,
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
                            r.bytes().len()
                        }
                        Pending::Data(v) => {
                            writer.write_data(&v)?;
                            v.len()
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
            let mut end = i;
            let mut bytes = 0u64;
            while end < decls.len()
                && decls[end].numel() <= CHUNK_ELEMS
                && end - i < 4 * self.threads
                && (end == i || bytes + 4 * decls[end].numel() as u64 <= WINDOW_BYTES)
            {
                bytes += 4 * decls[end].numel() as u64;
                end += 1;
            }
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
            Produce::Elementwise(f) => {
                if !d.dtype.is_float() {
                    return Err(Error::invalid(format!(
                        "tensor '{}': computed values for a {} tensor",
                        d.name, d.dtype
                    )));
                }
                let ranges: Vec<Range<usize>> = chunk_ranges(d.numel()).collect();
                // Non-finite values after rounding, counted over every chunk and reported once for the tensor.
                let mut nonfinite = 0usize;
                for window in ranges.chunks(2 * self.threads) {
                    let parts: Vec<Result<(Vec<u8>, usize)>> = self.pool.install(|| {
                        window
                            .par_iter()
                            .map(|r| {
                                let v = f(r.clone())?;
                                check_len(d, r.len(), v.len())?;
                                Ok(dtype::from_f32_vec_counting(d.dtype, &v))
                            })
                            .collect()
                    });
                    for part in parts {
                        let (bytes, bad) = part?;
                        nonfinite += bad;
                        send(Pending::Data(bytes))?;
                    }
                }
                guard::nonfinite_output(&d.name, d.dtype, d.numel(), nonfinite)
            }
            other => send(Pending::Tensor(d.name.clone(), finish_small(d, other)?)),
        }
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
            let mut end = i;
            let mut used = 0u64;
            while end < costs.len() && end - i < 2 * self.threads && (end == i || used + costs[end] <= budget) {
                used += costs[end];
                end += 1;
            }
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

fn check_len(d: &TensorDecl, want: usize, got: usize) -> Result<()> {
    if want == got {
        Ok(())
    } else {
        Err(Error::invalid(format!("tensor '{}': computed {got} values where {want} were expected", d.name)))
    }
}

/// Narrows a whole computed tensor to its declared dtype, refusing (or warning about) values that are NaN or
/// infinite after rounding.
fn narrow_checked<'a>(d: &TensorDecl, v: &[f32]) -> Result<Ready<'a>> {
    let (bytes, nonfinite) = dtype::from_f32_vec_counting(d.dtype, v);
    guard::nonfinite_output(&d.name, d.dtype, d.numel(), nonfinite)?;
    Ok(Ready::Owned(bytes))
}

fn finish_small<'a>(d: &TensorDecl, p: Produce<'a>) -> Result<Ready<'a>> {
    let float_needed = || -> Result<()> {
        if d.dtype.is_float() {
            Ok(())
        } else {
            Err(Error::invalid(format!("tensor '{}': computed values for a {} tensor", d.name, d.dtype)))
        }
    };
    let bytes_ok = |n: usize| -> Result<()> {
        if n as u64 == d.nbytes() {
            Ok(())
        } else {
            Err(Error::invalid(format!("tensor '{}': {n} bytes produced, {} declared", d.name, d.nbytes())))
        }
    };
    match p {
        Produce::Bytes(b) => {
            bytes_ok(b.len())?;
            Ok(Ready::Borrowed(b))
        }
        Produce::Owned(v) => {
            bytes_ok(v.len())?;
            Ok(Ready::Owned(v))
        }
        Produce::F32(v) => {
            float_needed()?;
            check_len(d, d.numel(), v.len())?;
            narrow_checked(d, &v)
        }
        Produce::Elementwise(f) => {
            float_needed()?;
            let mut v = Vec::with_capacity(d.numel());
            for r in chunk_ranges(d.numel()) {
                let part = f(r.clone())?;
                check_len(d, r.len(), part.len())?;
                v.extend(part);
            }
            narrow_checked(d, &v)
        }
    }
}
