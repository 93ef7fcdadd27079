//! Times graft's linear assignment solver on square f64 matrices read from raw files, for `tools/bench-lap.py`,
//! which writes the matrices, times SciPy's `linear_sum_assignment` on the same ones and compares.
//!
//! Usage: `cargo run --release --example bench-lap -- REPS FILE N [FILE N ...]`; each FILE holds N*N little-endian
//! f64 values in row-major order. Prints one JSON line per file: `{"n", "seconds": [...], "value", "assignment"}`
//! (the minimising assignment, as SciPy's default).

use std::time::Instant;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let reps: usize = args.first().and_then(|r| r.parse().ok()).expect("usage: bench-lap REPS FILE N [FILE N ...]");
    for pair in args[1..].chunks(2) {
        let (file, n): (&str, usize) = (&pair[0], pair[1].parse().expect("N"));
        let bytes = std::fs::read(file).expect("read matrix");
        assert_eq!(bytes.len(), n * n * 8, "{file}: expected {n}x{n} f64");
        let cost: Vec<f64> = bytes.chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect();
        let mut seconds = Vec::new();
        let mut assignment = Vec::new();
        for _ in 0..reps {
            let t = Instant::now();
            assignment = graft::align::lap::minimize(n, &cost, "bench").expect("solve");
            seconds.push(t.elapsed().as_secs_f64());
        }
        let value = graft::align::lap::value(n, &cost, &assignment);
        println!("{}", serde_json::json!({ "n": n, "seconds": seconds, "value": value, "assignment": assignment }));
    }
}
