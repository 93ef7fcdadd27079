//! Checkpoint reading and writing end to end: round trips of every fixture, the corrupt-file matrix, interrupted
//! writers, refusal to overwrite inputs, and `graft inspect` on hand-counted fixtures.

use crate::support::{fixture, graft};

use std::path::Path;

use graft::checkpoint::{dtype, Checkpoint, CheckpointWriter, Dtype, TensorDecl, WriterOptions};
use graft::convert::convert;
use graft::exec::Executor;

const FIXTURES: &[&str] = &[
    "mlp/base",
    "mlp/ft_a",
    "sepcnn/base",
    "sepcnn/indep",
    "bert/base",
    "bert/ft_b",
    "llama/base",
    "llama/base-sharded",
];

fn assert_same_tensors(a: &Checkpoint, b: &Checkpoint) {
    assert_eq!(a.len(), b.len());
    for va in a.iter() {
        let vb = b.tensor(va.name).unwrap();
        assert_eq!(va.dtype, vb.dtype, "{}", va.name);
        assert_eq!(va.shape, vb.shape, "{}", va.name);
        assert!(va.data == vb.data, "tensor data of {} differs", va.name);
    }
}

#[test]
fn every_fixture_round_trips_byte_for_byte_single_and_sharded() {
    let exec = Executor::new(Some(2)).unwrap().quiet();
    for rel in FIXTURES {
        let ck = Checkpoint::open(fixture(rel)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let single = tmp.path().join("single.safetensors");
        convert(&ck, &single, None, WriterOptions::default(), &exec).unwrap();
        assert_same_tensors(&ck, &Checkpoint::open(&single).unwrap());

        let sharded = tmp.path().join("sharded");
        let opts = WriterOptions { max_shard_size: 4096, ..Default::default() };
        let w = convert(&ck, &sharded, None, opts, &exec).unwrap();
        assert!(w.shards > 1, "{rel}: expected several shards at 4 KB");
        let back = Checkpoint::open(&sharded).unwrap();
        assert_eq!(back.shard_count(), w.shards);
        assert_same_tensors(&ck, &back);
    }
}

#[test]
fn sharded_index_matches_hugging_face_layout() {
    let ck = Checkpoint::open(fixture("llama/base")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let exec = Executor::new(Some(1)).unwrap().quiet();
    let opts = WriterOptions { max_shard_size: 10_000, ..Default::default() };
    let w = convert(&ck, &out, None, opts, &exec).unwrap();
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("model.safetensors.index.json")).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_size"].as_u64().unwrap(), ck.total_bytes());
    let map = index["weight_map"].as_object().unwrap();
    assert_eq!(map.len(), ck.len());
    for (name, file) in map {
        let file = file.as_str().unwrap();
        assert!(file.starts_with("model-") && file.ends_with(&format!("-of-{:05}.safetensors", w.shards)), "{file}");
        let shard = Checkpoint::open(out.join(file)).unwrap();
        assert!(shard.contains(name), "{name} not in {file}");
    }
    // Every shard respects the limit unless it holds a single larger tensor.
    for f in &w.files {
        if f.extension().is_some_and(|e| e == "safetensors") {
            let shard = Checkpoint::open(f).unwrap();
            assert!(shard.total_bytes() <= 10_000 || shard.len() == 1);
        }
    }
}

#[test]
fn output_is_identical_whatever_the_thread_count() {
    // A tensor of 2.5 executor chunks between small ones: conversion then runs the chunked parallel path, not only
    // windows of small tensors (every fixture tensor fits in one chunk).
    let tmp = tempfile::tempdir().unwrap();
    let n = 2 * graft::exec::CHUNK_ELEMS + graft::exec::CHUNK_ELEMS / 2;
    let value = |i: usize| ((i * 7919 % 10007) as f32 - 5003.0) * 1.0e-3 + i as f32 * 1.0e-7;
    let large: Vec<f32> = (0..n).map(value).collect();
    let input = tmp.path().join("input.safetensors");
    let decls = vec![
        TensorDecl::new("a.bias", Dtype::F32, vec![1000]),
        TensorDecl::new("b.weight", Dtype::F32, vec![n / 1024, 1024]),
        TensorDecl::new("c.ids", Dtype::I64, vec![3]),
    ];
    let mut w = CheckpointWriter::create(&input, decls, WriterOptions::default()).unwrap();
    w.write_f32("a.bias", &large[..1000]).unwrap();
    w.write_f32("b.weight", &large).unwrap();
    w.write_tensor("c.ids", &[7u8; 24]).unwrap();
    w.finish().unwrap();
    let ck = Checkpoint::open(&input).unwrap();
    let mut outputs = Vec::new();
    for threads in [1, 2, 3] {
        let out = tmp.path().join(format!("t{threads}.safetensors"));
        let exec = Executor::new(Some(threads)).unwrap().quiet();
        convert(&ck, &out, Some(Dtype::BF16), WriterOptions::default(), &exec).unwrap();
        outputs.push(std::fs::read(&out).unwrap());
    }
    assert!(outputs.windows(2).all(|w| w[0] == w[1]));
    // And the large tensor is the textbook rounding of every value (round to nearest even on the f32 bits).
    let back = Checkpoint::open(tmp.path().join("t3.safetensors")).unwrap();
    let want: Vec<u8> = large
        .iter()
        .flat_map(|x| {
            let b = x.to_bits();
            (((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16).to_le_bytes()
        })
        .collect();
    assert!(back.tensor("b.weight").unwrap().data == want.as_slice());
    assert_eq!(back.tensor("c.ids").unwrap().data, &[7u8; 24]);
}

#[test]
fn dtype_conversion_rounds_to_nearest_even_and_keeps_integers() {
    let ck = Checkpoint::open(fixture("sepcnn/base")).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("bf16.safetensors");
    let exec = Executor::new(Some(2)).unwrap().quiet();
    convert(&ck, &out, Some(Dtype::BF16), WriterOptions::default(), &exec).unwrap();
    let back = Checkpoint::open(&out).unwrap();
    for v in ck.iter() {
        let b = back.tensor(v.name).unwrap();
        if v.dtype.is_float() {
            assert_eq!(b.dtype, Dtype::BF16);
            // Independent reference: round-to-nearest-even on the f32 bit pattern (no NaNs in fixtures).
            for (x, y) in v.to_f32().unwrap().iter().zip(b.to_f32().unwrap()) {
                let bits = x.to_bits();
                let rounded = (bits + 0x7fff + ((bits >> 16) & 1)) & 0xffff_0000;
                assert_eq!(f32::from_bits(rounded), y);
            }
        } else {
            assert_eq!(b.dtype, v.dtype);
            assert!(b.data == v.data);
        }
    }
}

#[test]
fn dropping_an_unfinished_writer_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    for sharded in [false, true] {
        let out = tmp.path().join(format!("out-{sharded}"));
        let decls = vec![
            TensorDecl::new("a", Dtype::F32, vec![4]),
            TensorDecl::new("b", Dtype::F32, vec![4]),
            TensorDecl::new("c", Dtype::F32, vec![4]),
        ];
        let opts = WriterOptions { max_shard_size: if sharded { 16 } else { 1 << 30 }, ..Default::default() };
        let mut w = CheckpointWriter::create(&out, decls, opts).unwrap();
        w.write_f32("a", &[1.0; 4]).unwrap();
        w.write_f32("b", &[2.0; 4]).unwrap();
        drop(w);
        assert!(!out.exists(), "the writer left {}", out.display());
    }
    // An existing directory keeps its other files and gets no checkpoint files.
    let out = tmp.path().join("existing");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "keep").unwrap();
    let mut w =
        CheckpointWriter::create(&out, vec![TensorDecl::new("a", Dtype::F32, vec![2])], WriterOptions::default())
            .unwrap();
    w.write_data(&[0u8; 4]).unwrap();
    drop(w);
    let left: Vec<_> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("notes.txt")]);
}

#[test]
fn a_killed_writers_temporaries_are_swept_by_the_next_write() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    // What SIGKILLed writers of `out` leave beside it: a half-built checkpoint directory and a half-written file.
    // Whoever holds `out`'s lock next knows their writers are dead (a live one would hold the lock).
    let dead_dir = tmp.path().join(".out.graft-tmp-4242-1f-0");
    std::fs::create_dir(&dead_dir).unwrap();
    std::fs::write(dead_dir.join("model.safetensors"), b"half").unwrap();
    let dead_file = tmp.path().join(".out.graft-tmp-4242-1f-1");
    std::fs::write(&dead_file, b"half").unwrap();
    // Another output's temporary is not ours to judge.
    let other = tmp.path().join(".other.graft-tmp-4242-1f-2");
    std::fs::write(&other, b"busy").unwrap();
    let exec = Executor::new(Some(1)).unwrap().quiet();
    let base = Checkpoint::open(fixture("mlp/base")).unwrap();
    convert(&base, &out, None, WriterOptions::default(), &exec).unwrap();
    assert!(!dead_dir.exists() && !dead_file.exists());
    assert!(other.exists());
    let mut names: Vec<String> =
        std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
    names.sort();
    assert_eq!(names, vec![".other.graft-tmp-4242-1f-2", "out"]);

    // A writer killed between moving the old checkpoint aside and moving the new one in (the fallback where the
    // filesystem refuses an atomic exchange): the next writer puts the old checkpoint back before anything else.
    let aside = tmp.path().join(".out.graft-old-4242-1f-3");
    std::fs::rename(&out, &aside).unwrap();
    let o = graft(&["convert", fixture("mlp/ft_a").to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds a checkpoint"));
    assert!(!aside.exists());
    assert_same_tensors(&base, &Checkpoint::open(&out).unwrap());
}

#[test]
fn writer_rejects_out_of_order_and_wrong_sized_data() {
    let tmp = tempfile::tempdir().unwrap();
    let decls = vec![TensorDecl::new("a", Dtype::F32, vec![2]), TensorDecl::new("b", Dtype::BF16, vec![2])];
    let mut w = CheckpointWriter::create(tmp.path().join("o"), decls, WriterOptions::default()).unwrap();
    let e = w.write_f32("b", &[1.0, 2.0]).unwrap_err().to_string();
    assert_eq!(e, "tensor 'b' supplied while 'a' is due next");
    let e = w.write_tensor("a", &[0u8; 7]).unwrap_err().to_string();
    assert_eq!(e, "tensor 'a': 7 bytes supplied, 8 declared");
    w.write_f32("a", &[1.0, 2.0]).unwrap();
    let e = w.finish().unwrap_err().to_string();
    assert!(e.ends_with("tensor 'b' and 0 more were declared but never supplied"), "{e}");
    assert!(!tmp.path().join("o").exists());
}

#[test]
fn refuses_to_overwrite_inputs_and_existing_outputs_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let o = graft(&["convert", fixture("mlp/base").to_str().unwrap(), "-o", src.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let before = std::fs::read(src.join("model.safetensors")).unwrap();

    let o = graft(&["convert", src.to_str().unwrap(), "-o", src.join("model.safetensors").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("refusing to overwrite an input of this command"));
    let o = graft(&["convert", src.to_str().unwrap(), "-o", src.to_str().unwrap(), "--force"]);
    assert_eq!(o.status.code(), Some(2));
    assert_eq!(std::fs::read(src.join("model.safetensors")).unwrap(), before);

    // An existing output needs --force; with it, stale shards of the old checkpoint disappear.
    let out = tmp.path().join("out");
    let o = graft(&["convert", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--max-shard-size", "50KB"]);
    assert!(o.status.success());
    assert!(out.join("model.safetensors.index.json").exists());
    let o = graft(&["convert", src.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("already holds a checkpoint"));
    let o = graft(&["convert", src.to_str().unwrap(), "-o", out.to_str().unwrap(), "--force"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mut names: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().to_string()).collect();
    names.sort();
    assert_eq!(names, vec!["config.json", "model.safetensors"]);
    assert_same_tensors(&Checkpoint::open(&src).unwrap(), &Checkpoint::open(&out).unwrap());
}

#[test]
fn a_large_output_written_around_the_page_cache_holds_every_byte() {
    // Over 64 MiB a shard is written with O_DIRECT (checkpoint::shard_file): aligned buffers, the last one padded
    // and cut back. A header of odd length puts every tensor off the block boundaries; written whole, then copied by
    // `convert` at 1 and 3 threads, the bytes must come back exactly.
    let tmp = tempfile::tempdir().unwrap();
    let n = (70 << 20) / 4 + 777;
    let value = |i: usize| (i as f32).sin() * 1.0e-2 + (i % 4099) as f32;
    let large: Vec<f32> = (0..n).map(value).collect();
    let input = tmp.path().join("big.safetensors");
    let decls = vec![
        TensorDecl::new("a_bias_with_a_long_name_for_an_odd_header", Dtype::F32, vec![3]),
        TensorDecl::new("b.weight", Dtype::F32, vec![n]),
    ];
    let want: Vec<u8> = large.iter().flat_map(|x| x.to_le_bytes()).collect();
    let mut w = CheckpointWriter::create(&input, decls, WriterOptions::default()).unwrap();
    w.write_f32("a_bias_with_a_long_name_for_an_odd_header", &[1.0, 2.0, 3.0]).unwrap();
    // In pieces that are not multiples of the block either.
    for piece in want.chunks(4_000_003) {
        w.write_data(piece).unwrap();
    }
    w.finish().unwrap();
    let back = Checkpoint::open(&input).unwrap();
    assert!(back.tensor("b.weight").unwrap().data == want.as_slice());
    let small: Vec<u8> = [1.0f32, 2.0, 3.0].iter().flat_map(|x| x.to_le_bytes()).collect();
    assert_eq!(back.tensor("a_bias_with_a_long_name_for_an_odd_header").unwrap().data, small.as_slice());
    for threads in [1, 3] {
        let out = tmp.path().join(format!("copy{threads}.safetensors"));
        let exec = Executor::new(Some(threads)).unwrap().quiet();
        convert(&back, &out, None, WriterOptions::default(), &exec).unwrap();
        assert!(std::fs::read(&out).unwrap() == std::fs::read(&input).unwrap(), "{threads} threads");
    }
}

#[test]
fn written_files_are_readable_by_others() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m.safetensors");
    let exec = Executor::new(Some(1)).unwrap().quiet();
    convert(&Checkpoint::open(fixture("mlp/base")).unwrap(), &out, None, WriterOptions::default(), &exec).unwrap();
    let mode = std::fs::metadata(&out).unwrap().permissions().mode();
    assert_ne!(mode & 0o044, 0, "mode {mode:o} hides the checkpoint from group and others");
}

// ---- the corrupt-file matrix --------------------------------------------------------------------------------------

/// A safetensors file from a literal header and data section.
fn st_bytes(header: &str, data_len: usize) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend(header.as_bytes());
    v.extend(std::iter::repeat_n(0u8, data_len));
    v
}

fn raw(len_field: u64, rest: &[u8]) -> Vec<u8> {
    let mut v = len_field.to_le_bytes().to_vec();
    v.extend(rest);
    v
}

/// Runs `graft convert` on a corrupt input and checks the one-line message, the exit code and that no output exists.
fn expect_rejected(input: &Path, fragments: &[&str]) {
    let out = input.parent().unwrap().join("never-written");
    let o = graft(&["convert", input.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{}: {stderr}", input.display());
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    assert!(stderr.starts_with("graft: error: "), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for f in fragments {
        assert!(stderr.contains(f), "expected '{f}' in: {stderr}");
    }
    assert!(!out.exists(), "output written despite the error");
    // inspect fails the same way.
    let o = graft(&["inspect", input.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
}

fn case(dir: &Path, name: &str, bytes: Vec<u8>, fragments: &[&str]) {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    let mut f = vec![name];
    f.extend_from_slice(fragments);
    expect_rejected(&p, &f);
}

#[test]
fn corrupt_single_files_are_rejected_with_specific_messages() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    case(
        d,
        "short.safetensors",
        vec![1, 2, 3],
        &["file is 3 bytes, too short for the 8-byte safetensors header length"],
    );
    case(d, "absurd.safetensors", raw(200_000_000, b"{}"), &["header length 200000000 is absurd (over 100 MB)"]);
    case(
        d,
        "truncated.safetensors",
        raw(1000, b"{\"a\":1}"),
        &["header length 1000 is larger than the 7 bytes that follow it"],
    );
    case(d, "notjson.safetensors", st_bytes("{not json", 0), &["header is not valid JSON"]);
    case(d, "notutf8.safetensors", raw(2, &[0xff, 0xfe]), &["header is not valid UTF-8 JSON"]);
    case(d, "array.safetensors", st_bytes("[1, 2]", 0), &["header is not a JSON object of tensors"]);
    case(d, "entry.safetensors", st_bytes(r#"{"a": 5}"#, 0), &["tensor 'a': entry is not an object"]);
    case(
        d,
        "dtype.safetensors",
        st_bytes(r#"{"w": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}"#, 1),
        &["tensor 'w': unknown dtype 'Q4'"],
    );
    case(
        d,
        "shape.safetensors",
        st_bytes(r#"{"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}"#, 20),
        &["tensor 'w': shape [2, 3] of F32 needs 24 bytes but data_offsets [0, 20) span 20"],
    );
    case(
        d,
        "negative.safetensors",
        st_bytes(r#"{"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}"#, 4),
        &["tensor 'w': shape [-1] is not a list of non-negative integers"],
    );
    case(
        d,
        "outside.safetensors",
        st_bytes(r#"{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}"#, 4),
        &["tensor 'w': data_offsets [0, 8) lie outside the data section of 4 bytes"],
    );
    case(
        d,
        "overlap.safetensors",
        st_bytes(
            r#"{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}"#,
            12,
        ),
        &["tensor 'b': data_offsets [4, 12) overlap tensor 'a' at [0, 8)"],
    );
    case(
        d,
        "gap.safetensors",
        st_bytes(
            r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                "b": {"dtype": "F32", "shape": [1], "data_offsets": [8, 12]}}"#,
            12,
        ),
        &["tensor 'b': 4 bytes before its data_offsets start (8) belong to no tensor"],
    );
    case(
        d,
        "trailing.safetensors",
        st_bytes(r#"{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}"#, 8),
        &["tensor 'a': 4 bytes after offset 4 at the end of the data section belong to no tensor"],
    );
    case(
        d,
        "metadata.safetensors",
        st_bytes(r#"{"__metadata__": {"k": 1}}"#, 0),
        &["__metadata__ entry 'k' is not a string"],
    );
}

/// A valid one-tensor file holding `names` (F32 scalars).
fn shard_bytes(names: &[&str]) -> Vec<u8> {
    let entries: Vec<String> = names
        .iter()
        .enumerate()
        .map(|(i, n)| format!(r#""{n}": {{"dtype": "F32", "shape": [], "data_offsets": [{}, {}]}}"#, 4 * i, 4 * i + 4))
        .collect();
    st_bytes(&format!("{{{}}}", entries.join(", ")), 4 * names.len())
}

fn sharded_case(name: &str, shards: &[(&str, &[&str])], weight_map: &str, fragments: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for (file, names) in shards {
        std::fs::write(dir.join(file), shard_bytes(names)).unwrap();
    }
    std::fs::write(dir.join("model.safetensors.index.json"), format!(r#"{{"weight_map": {weight_map}}}"#)).unwrap();
    expect_rejected(&dir, fragments);
}

#[test]
fn corrupt_sharded_checkpoints_are_rejected_with_specific_messages() {
    sharded_case(
        "duplicate",
        &[("s1.safetensors", &["a", "b"]), ("s2.safetensors", &["a", "c"])],
        r#"{"a": "s1.safetensors", "b": "s1.safetensors", "c": "s2.safetensors"}"#,
        &["s2.safetensors: tensor 'a': also present in", "s1.safetensors"],
    );
    sharded_case(
        "missing-shard",
        &[("s1.safetensors", &["a"])],
        r#"{"a": "s1.safetensors", "b": "s2.safetensors"}"#,
        &["model.safetensors.index.json: index names shard 's2.safetensors' (for tensor 'b'", "does not exist"],
    );
    sharded_case(
        "missing-tensor",
        &[("s1.safetensors", &["a"])],
        r#"{"a": "s1.safetensors", "b": "s1.safetensors"}"#,
        &["tensor 'b': the index places it in 's1.safetensors' but that shard has no such tensor"],
    );
    sharded_case(
        "unlisted",
        &[("s1.safetensors", &["a", "b"])],
        r#"{"a": "s1.safetensors"}"#,
        &["s1.safetensors: tensor 'b': present in the shard but missing from the index"],
    );
    sharded_case(
        "escape",
        &[("s1.safetensors", &["a"])],
        r#"{"a": "../s1.safetensors"}"#,
        &["weight_map places tensor 'a' in '../s1.safetensors', outside the directory"],
    );

    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("badindex");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("model.safetensors.index.json"), "{oops").unwrap();
    expect_rejected(&dir, &["index is not valid JSON"]);
    std::fs::write(dir.join("model.safetensors.index.json"), r#"{"metadata": {}}"#).unwrap();
    expect_rejected(&dir, &["index has no \"weight_map\" object"]);
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    expect_rejected(&empty, &["directory holds neither model.safetensors nor model.safetensors.index.json"]);
    expect_rejected(&tmp.path().join("nothing-here"), &["nothing-here", "No such file or directory"]);
}

#[test]
fn random_corruptions_never_panic() {
    // Mutate bytes of a real file's header and length field: every outcome must be Ok or a clean error.
    let original = std::fs::read(fixture("mlp/base/model.safetensors")).unwrap();
    let header_end = 8 + u64::from_le_bytes(original[..8].try_into().unwrap()) as usize;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("m.safetensors");
    let mut rng = graft::rng::Rng::new(99);
    let mut rejected = 0;
    for round in 0..400 {
        let mut bytes = original.clone();
        match round % 4 {
            0 => bytes.truncate(rng.below(header_end + 64)),
            1 => {
                let i = rng.below(8);
                bytes[i] = rng.next_u64() as u8;
            }
            _ => {
                for _ in 0..1 + rng.below(4) {
                    let i = 8 + rng.below(header_end - 8);
                    bytes[i] = b"0123456789{}[],:\"ae -"[rng.below(21)];
                }
            }
        }
        std::fs::write(&path, &bytes).unwrap();
        match Checkpoint::open(&path) {
            Ok(ck) => {
                // Whatever parsed must be fully readable.
                for v in ck.iter() {
                    if v.dtype.is_float() {
                        let _ = dtype::to_f32_vec(v.dtype, v.data);
                    }
                }
            }
            Err(e) => {
                rejected += 1;
                assert!(!e.to_string().contains('\n'));
            }
        }
    }
    assert!(rejected > 300, "only {rejected} of 400 corruptions were detected");
}

// ---- inspect ------------------------------------------------------------------------------------------------------

#[test]
fn inspect_json_counts_match_hand_computed_values() {
    let o = graft(&["inspect", "--json", fixture("mlp/base").to_str().unwrap()]);
    assert!(o.status.success());
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // 784-64-64-10 with biases: 784*64 + 64 + 64*64 + 64 + 64*10 + 10.
    assert_eq!(r["totals"]["params"], 55050);
    assert_eq!(r["totals"]["bytes"], 55050 * 4);
    assert_eq!(r["totals"]["tensors"], 6);
    let types: Vec<(String, u64)> = r["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["type"].as_str().unwrap().to_string(), t["params"].as_u64().unwrap()))
        .collect();
    assert_eq!(types, vec![("weight".to_string(), 50176 + 4096 + 640), ("bias".to_string(), 64 + 64 + 10)]);
    assert_eq!(r["types"][0]["layers"], serde_json::json!([0, 1, 2]));
    assert_eq!(r["tensors"][0]["name"], "layers.0.weight");
    assert_eq!(r["tensors"][0]["shape"], serde_json::json!([64, 784]));
    assert_eq!(r["metadata"]["format"], "pt");
}

#[test]
fn inspect_several_paths_prints_one_record_each_and_reports_bad_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.safetensors");
    std::fs::write(&bad, b"junk").unwrap();
    let o = graft(&[
        "inspect",
        "--json",
        "--filter",
        r"self_attn\.q_proj",
        fixture("llama/base").to_str().unwrap(),
        bad.to_str().unwrap(),
        fixture("llama/base-sharded").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    // Two layers of q_proj, 32x32 each, BF16; the sharded copy reports the same tensors from 3 files + index.
    assert_eq!(lines[0]["totals"]["params"], 2 * 32 * 32);
    assert_eq!(lines[0]["totals"]["bytes"], 2 * 32 * 32 * 2);
    assert!(lines[1]["error"].as_str().unwrap().contains("too short"));
    assert_eq!(lines[2]["totals"], lines[0]["totals"]);
    assert_eq!(lines[2]["files"].as_array().unwrap().len(), 4);
    assert_eq!(lines[2]["shards"], 3);
    let o = graft(&["inspect", "--filter", "(", fixture("mlp/base").to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--filter '(' is not a valid regular expression"));
}

#[test]
fn inspect_of_several_checkpoints_reports_a_bad_one_and_goes_on() {
    let d = tempfile::tempdir().unwrap();
    let bad = d.path().join("bad.safetensors");
    std::fs::write(&bad, raw(u64::MAX, b"")).unwrap();
    let (good_a, good_b) = (fixture("mlp/base"), fixture("llama/base"));
    let out = graft(&["inspect", "--json", good_a.to_str().unwrap(), bad.to_str().unwrap(), good_b.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let lines: Vec<serde_json::Value> =
        String::from_utf8(out.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3, "a record per checkpoint, the bad one included");
    assert!(lines[0]["tensors"].is_array() && lines[2]["tensors"].is_array());
    assert_eq!(lines[1]["path"], bad.to_str().unwrap());
    assert!(lines[1]["error"].as_str().unwrap().contains("bad.safetensors"), "{}", lines[1]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().last(), Some("graft: error: 1 of 3 checkpoints could not be read"), "{err}");
    // One checkpoint: its own error, as it is.
    let one = graft(&["inspect", bad.to_str().unwrap()]);
    let err = String::from_utf8(one.stderr).unwrap();
    assert!(!one.status.success() && err.lines().count() == 1 && err.contains("bad.safetensors"), "{err}");
}

#[test]
fn a_dtype_change_is_stated_in_the_carried_config() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("f16");
    let o = graft(&["convert", fixture("llama/base").to_str().unwrap(), "-o", out.to_str().unwrap(), "--dtype", "f16"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    // The fixture says bfloat16; every float tensor is now F16, and so must the config say (`dtype` for current
    // transformers, `torch_dtype` where the source had it), everything else unchanged.
    assert_eq!(config["dtype"], "float16");
    assert_eq!(config["torch_dtype"], "float16");
    assert_eq!(config["num_hidden_layers"], 2);
    let ck = Checkpoint::open(&out).unwrap();
    assert!(ck.infos().iter().filter(|t| t.dtype.is_float()).all(|t| t.dtype == Dtype::F16));
    // Without a dtype change the config is carried byte for byte.
    let same = tmp.path().join("same");
    let o = graft(&["convert", fixture("llama/base").to_str().unwrap(), "-o", same.to_str().unwrap()]);
    assert!(o.status.success());
    assert_eq!(
        std::fs::read(same.join("config.json")).unwrap(),
        std::fs::read(fixture("llama/base").join("config.json")).unwrap()
    );
}
