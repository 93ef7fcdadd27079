//! Seeded fuzzing of the safetensors reader: mutations of a valid file's header and bytes (bit flips, truncations,
//! header-length edits, JSON edits) and of sharded index files, each opened by the library
//! (`Checkpoint::open`) and by `graft inspect` and `graft convert`. Asserted: no panic (library: no unwind; binary:
//! exit 0, 1 or 2, never 101 or a signal), no hang, a failure is one line naming the file, and a failed convert leaves
//! its output directory empty. `GRAFT_FUZZ_CASES` / `GRAFT_FUZZ_SEED` raise the count (see `tools/fuzz-headers`).

use crate::support::st::{empty, f32t, st_bytes, T};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        // splitmix64: seeded, so reruns are identical.
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn valid_tensors() -> Vec<T> {
    vec![
        f32t("a.weight", &[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
        empty("a.empty", "F32", &[0, 3]),
        f32t("b.bias", &[3], &[0.5, -0.5, 0.25]),
    ]
}

/// A header (JSON text) and data, reassembled with a correct length field.
fn with_header(json: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend(json.as_bytes());
    out.extend(data);
    out
}

const DATA_LEN: usize = 36;

fn json_edit(rng: &mut Rng) -> Vec<u8> {
    let data = st_bytes(&valid_tensors());
    let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let body = data[8 + n..].to_vec();
    let e = |dtype: &str, shape: &str, offs: &str| {
        format!(r#"{{"dtype":"{dtype}","shape":{shape},"data_offsets":{offs}}}"#)
    };
    let json = match rng.below(12) {
        0 => format!(r#"{{"x":{},"y":{}}}"#, e("F32", "[2,3]", "[0,24]"), e("F32", "[3]", "[12,24]")), // overlap
        1 => format!(r#"{{"x":{}}}"#, e("F32", "[2,3]", &format!("[0,{}]", DATA_LEN + 1 + rng.below(1000)))),
        2 => format!(r#"{{"x":{}}}"#, e("F32", "[3]", "[12,0]")), // reversed
        3 => format!(r#"{{"x":{}}}"#, e("F32", &format!("[{},{}]", u64::MAX, 2 + rng.below(9)), "[0,24]")),
        4 => format!(r#"{{"x":{}}}"#, e("F32", "[4,4]", "[0,24]")), // shape vs data length
        5 => format!(r#"{{"x":{}}}"#, e(["F33", "", "Q4", "f32", "I128"][rng.below(5)], "[6]", "[0,24]")),
        6 => format!(r#"{{"x":{},"x":{}}}"#, e("F32", "[6]", "[0,24]"), e("F32", "[3]", "[24,36]")), // duplicate
        7 => ["[]", "1", "\"s\"", "null", "true", "[{}]"][rng.below(6)].to_string(),
        8 => format!(r#"{{"x":{}}}"#, e("F32", "[-1]", "[0,4]")),
        9 => r#"{"x":{"dtype":"F32","shape":[6]}}"#.to_string(),
        10 => format!(r#"{{"x":{}}}"#, e("F32", "[6]", &format!("[{},{}]", u64::MAX - 3, u64::MAX))),
        _ => format!(r#"{{"__metadata__":{{"k":{}}},"x":{}}}"#, rng.below(9), e("F32", "[6]", "[0,24]")),
    };
    with_header(&json, &body)
}

/// One mutated single-file input.
fn mutate(rng: &mut Rng) -> (String, Vec<u8>) {
    let mut bytes = st_bytes(&valid_tensors());
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    match rng.below(5) {
        0 => {
            for _ in 0..1 + rng.below(8) {
                let i = rng.below(bytes.len());
                bytes[i] ^= 1 << rng.below(8);
            }
            ("bitflip".into(), bytes)
        }
        1 => {
            // Length classes: inside the length field, inside the header, inside the data.
            let cut = match rng.below(3) {
                0 => rng.below(8),
                1 => 8 + rng.below(n),
                _ => 8 + n + rng.below(bytes.len() - 8 - n),
            };
            bytes.truncate(cut);
            ("truncate".into(), bytes)
        }
        2 => {
            let len: u64 = match rng.below(6) {
                0 => 0,
                1 => u64::MAX - rng.below(16) as u64,
                2 => (n + 1 + rng.below(64)) as u64,
                3 => n.saturating_sub(1 + rng.below(8)) as u64,
                4 => 1 << (32 + rng.below(31)),
                _ => bytes.len() as u64,
            };
            bytes[..8].copy_from_slice(&len.to_le_bytes());
            ("header-length".into(), bytes)
        }
        _ => ("json".into(), json_edit(rng)),
    }
}

/// Writes one case under `dir`; returns its kind and the path to open (a file, or a sharded checkpoint directory).
fn write_case(rng: &mut Rng, dir: &Path) -> (String, PathBuf) {
    if rng.below(6) != 0 {
        let (kind, bytes) = mutate(rng);
        let p = dir.join("model.safetensors");
        std::fs::write(&p, bytes).unwrap();
        return (kind, p);
    }
    // A sharded checkpoint whose index is wrong.
    let ck = dir.join("ck");
    std::fs::create_dir_all(&ck).unwrap();
    std::fs::write(ck.join("model-00001-of-00001.safetensors"), st_bytes(&valid_tensors())).unwrap();
    let shard = match rng.below(5) {
        0 => "../outside.safetensors".to_string(),
        1 => "missing.safetensors".to_string(),
        2 => "/etc/passwd".to_string(),
        _ => "model-00001-of-00001.safetensors".to_string(),
    };
    if shard.starts_with("..") {
        std::fs::write(dir.join("outside.safetensors"), st_bytes(&valid_tensors())).unwrap();
    }
    let name = if rng.below(2) == 0 { "not.in.shard" } else { "a.weight" };
    let index = match rng.below(4) {
        0 => "[1,2]".to_string(),
        1 => r#"{"metadata":{}}"#.to_string(),
        _ => format!(r#"{{"metadata":{{}},"weight_map":{{"{name}":"{shard}","b.bias":"{shard}"}}}}"#),
    };
    std::fs::write(ck.join("model.safetensors.index.json"), index).unwrap();
    ("index".into(), ck)
}

/// Runs graft with a hang guard; returns (exit code or None for a signal, stderr).
fn run(args: &[&str]) -> (Option<i32>, String) {
    let mut child =
        crate::support::command(&[]).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.code(), err);
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            panic!("graft {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn names_a_file(err: &str, dir: &Path) -> bool {
    let mut names = vec![];
    // The case's own files and folders, not `dir` itself (its name, "in", would match any sentence).
    for e in walk(dir).into_iter().skip(1) {
        names.push(e.file_name().unwrap().to_string_lossy().to_string());
    }
    names.iter().any(|n| err.contains(n.as_str()))
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![dir.to_path_buf()];
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn mutated_headers_and_indexes_fail_cleanly() {
    let count: usize = std::env::var("GRAFT_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(300);
    let seed: u64 = std::env::var("GRAFT_FUZZ_SEED").ok().and_then(|v| v.parse().ok()).unwrap_or(13);
    let root = crate::support::tmp("fuzz", &seed.to_string());
    let mut findings = Vec::new();
    let mut refused = 0usize;
    for case in 0..count {
        let mut rng = Rng(seed.wrapping_mul(1_000_003).wrapping_add(case as u64));
        let dir = root.join(format!("case-{case}"));
        let input_dir = dir.join("in");
        let out_dir = dir.join("out");
        std::fs::create_dir_all(&input_dir).unwrap();
        std::fs::create_dir_all(&out_dir).unwrap();
        let (kind, input) = write_case(&mut rng, &input_dir);
        let what = format!("case {case} ({kind}, seed {seed})");
        let input_s = input.display().to_string();

        let opened = std::panic::catch_unwind(|| graft::checkpoint::Checkpoint::open(&input).map(|_| ()));
        match opened {
            Err(_) => findings.push(format!("{what}: Checkpoint::open panicked")),
            Ok(Err(e)) => {
                let m = e.to_string();
                if m.lines().count() != 1 || !names_a_file(&m, &input_dir) {
                    findings.push(format!("{what}: library error not one line naming the file: {m}"));
                }
            }
            Ok(Ok(())) => {}
        }
        let out_file = out_dir.join("o.safetensors").display().to_string();
        for args in [vec!["inspect", input_s.as_str()], vec!["convert", input_s.as_str(), "-o", out_file.as_str()]] {
            let (code, err) = run(&args);
            match code {
                Some(0) => {}
                Some(1) | Some(2) => {
                    refused += 1;
                    if err.lines().count() != 1 || !names_a_file(&err, &input_dir) {
                        findings.push(format!("{what}: {}: error not one line naming the file: {err}", args[0]));
                    }
                    let left: Vec<_> = std::fs::read_dir(&out_dir).unwrap().flatten().map(|e| e.path()).collect();
                    if !left.is_empty() {
                        findings.push(format!("{what}: {}: left {left:?} behind", args[0]));
                    }
                }
                other => findings.push(format!("{what}: {}: exit {other:?}: {err}", args[0])),
            }
        }
        if findings.is_empty() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    eprintln!("fuzz_headers: {count} cases, seed {seed}: {refused} refusals, {} findings", findings.len());
    assert!(refused > count / 2, "most mutations must be refused: {refused} of {count}");
    assert!(findings.is_empty(), "{} findings:\n{}", findings.len(), findings.join("\n"));
}
