//! Times graft's singular-value route on every matrix of a safetensors file (run through `tools/bench-snr`).
//!
//! `cargo run --release --example bench-svals -- FILE [--repeats N] [--threads N] [--route graft|gram-parts|one-stage|faer-svd-f32]
//! [--dump DIR]` prints one JSON line per 2-D tensor: name, shape, the seconds of each repeat and their median.
//! The matrix is widened to f32 before timing starts (both sides of the comparison time only the decomposition).
//! `--dump DIR` writes the singular values of the first repeat as little-endian f64 (`DIR/<name>.f64`) so the
//! script can compare their accuracy with numpy's and torch's.

use std::path::PathBuf;
use std::time::Instant;

use faer::MatRef;
use graft::checkpoint::Checkpoint;
use graft::snr::svals::singular_values;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut file = None;
    let mut repeats = 3usize;
    let mut threads = None;
    let mut route = "graft".to_string();
    let mut dump: Option<PathBuf> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--repeats" => repeats = args.next().and_then(|v| v.parse().ok()).expect("--repeats N"),
            "--threads" => threads = args.next().and_then(|v| v.parse().ok()),
            "--route" => route = args.next().expect("--route NAME"),
            "--dump" => dump = args.next().map(PathBuf::from),
            _ => file = Some(PathBuf::from(a)),
        }
    }
    let file = file.expect("usage: bench-svals FILE [--repeats N] [--threads N] [--route graft|gram-parts|one-stage|faer-svd-f32] [--dump DIR]");
    let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
    let ck = Checkpoint::open(&file).unwrap_or_else(|e| panic!("{e}"));
    for view in ck.iter() {
        if view.shape.len() != 2 {
            continue;
        }
        let (rows, cols) = (view.shape[0], view.shape[1]);
        let values = view.to_f32().unwrap_or_else(|e| panic!("{e}"));
        let mut times = Vec::new();
        let mut first: Option<Vec<f64>> = None;
        for _ in 0..repeats {
            let t = Instant::now();
            let s = pool.install(|| match route.as_str() {
                "graft" => singular_values(&values, rows, cols),
                "faer-svd-f32" => {
                    let m = MatRef::from_row_major_slice(&values, rows, cols);
                    faer::set_global_parallelism(faer::Par::rayon(threads));
                    m.singular_values().expect("svd").into_iter().map(|x| x as f64).collect()
                }
                "gram-parts" => {
                    let par = graft::snr::svals::par_for(rows.min(cols), rows.max(cols));
                    let t0 = Instant::now();
                    let g = graft::snr::svals::gram_lower(&values, rows, cols, par);
                    let t1 = Instant::now();
                    let e = graft::snr::svals::eigenvalues_lower(g, par);
                    eprintln!(
                        "{}: gram {:.3} s, eigenvalues {:.3} s",
                        view.name,
                        (t1 - t0).as_secs_f64(),
                        t1.elapsed().as_secs_f64()
                    );
                    e
                }
                "one-stage" => {
                    let par = graft::snr::svals::par_for(rows.min(cols), rows.max(cols));
                    let g = graft::snr::svals::gram_lower(&values, rows, cols, par);
                    graft::snr::svals::one_stage_eigenvalues_lower(g)
                }
                other => panic!("unknown route {other}"),
            });
            times.push(t.elapsed().as_secs_f64());
            first.get_or_insert(s);
        }
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let median = sorted[sorted.len() / 2];
        if let (Some(dir), Some(s)) = (&dump, &first) {
            let bytes: Vec<u8> = s.iter().flat_map(|x| x.to_le_bytes()).collect();
            std::fs::write(dir.join(format!("{}.f64", view.name)), bytes).expect("dump");
        }
        println!(
            "{}",
            serde_json::json!({"name": view.name, "rows": rows, "cols": cols, "route": route, "threads": threads,
                               "times": times, "median": median})
        );
    }
}
