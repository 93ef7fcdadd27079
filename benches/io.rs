//! I/O benchmarks (run: `tools/bench-io`, or `cargo bench --bench io` with GRAFT_BENCH_CKPT set).
//!
//! - dtype conversion throughput (bf16 -> f32, f32 -> bf16 with round-to-nearest-even), against a plain scalar loop
//!   doing the same conversion in the same run;
//! - `graft inspect --json` of a large sharded checkpoint (GRAFT_BENCH_CKPT), warm, as a whole process, against
//!   `graft --version` (the process start-up floor) in the same run.
//!
//! Every figure is the median of several repeats.

use std::hint::black_box;
use std::process::Command;
use std::time::Instant;

use graft::checkpoint::{dtype, Dtype};

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time<F: FnMut()>(repeats: usize, mut f: F) -> f64 {
    f(); // warm caches and page tables
    median(
        (0..repeats)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn main() {
    // ---- dtype conversion --------------------------------------------------------------------------------------
    let n = 64 << 20; // 64 Mi elements: 128 MB of bf16, 256 MB of f32
    let mut rng = graft::rng::Rng::new(5);
    let src: Vec<f32> = (0..n).map(|_| rng.next_f32() * 2.0 - 1.0).collect();
    let bf16 = dtype::from_f32_vec(Dtype::BF16, &src);
    let mut out = vec![0f32; n];

    let widen = time(7, || dtype::to_f32(Dtype::BF16, black_box(&bf16), black_box(&mut out)));
    let widen_ref = time(7, || {
        for (o, b) in out.iter_mut().zip(bf16.chunks_exact(2)) {
            *o = f32::from_bits((u16::from_le_bytes([b[0], b[1]]) as u32) << 16);
        }
        black_box(&out);
    });
    let mut bytes = Vec::with_capacity(n * 2);
    let narrow = time(7, || {
        bytes.clear();
        dtype::from_f32(Dtype::BF16, black_box(&src), &mut bytes);
    });
    let narrow_ref = time(7, || {
        bytes.clear();
        for x in &src {
            let b = x.to_bits();
            let r = ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16;
            bytes.extend_from_slice(&r.to_le_bytes());
        }
        black_box(&bytes);
    });
    let gb = |secs: f64, b: usize| b as f64 / secs / 1e9;
    println!(
        "bf16 -> f32: {:.2} GB/s of f32 out ({:.2} GB/s bf16 in), scalar loop {:.2} GB/s out: ratio {:.2}x",
        gb(widen, n * 4),
        gb(widen, n * 2),
        gb(widen_ref, n * 4),
        widen_ref / widen
    );
    println!(
        "f32 -> bf16 (round to nearest even): {:.2} GB/s of f32 in, scalar loop {:.2} GB/s: ratio {:.2}x",
        gb(narrow, n * 4),
        gb(narrow_ref, n * 4),
        narrow_ref / narrow
    );

    // ---- inspect of a large sharded checkpoint -------------------------------------------------------------------
    let Ok(ckpt) = std::env::var("GRAFT_BENCH_CKPT") else {
        println!("GRAFT_BENCH_CKPT not set: skipping the inspect benchmark (tools/bench-io sets it)");
        return;
    };
    let bin = std::env::var("GRAFT_BIN").unwrap_or_else(|_| "target/release/graft".into());
    let run = |args: &[&str]| {
        let o = Command::new(&bin).args(args).output().expect("run graft");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        o.stdout.len()
    };
    let out_len = run(&["inspect", "--json", &ckpt]);
    let inspect = time(21, || {
        black_box(run(&["inspect", "--json", &ckpt]));
    });
    let floor = time(21, || {
        black_box(run(&["--version"]));
    });
    println!(
        "inspect --json {ckpt}: {:.1} ms median warm ({} bytes of JSON); process start-up floor {:.1} ms: ratio {:.2}x",
        inspect * 1e3,
        out_len,
        floor * 1e3,
        inspect / floor
    );
}
