//! `graft align` end to end on the fixtures: permutation invariance of every built-in spec (checked with plain f64
//! forward passes), exact recovery of randomly permuted copies, objective gains and determinism on independently
//! initialised models, spec errors, cycle consistency, and `graft interpolate`.

use crate::support::forward;
use crate::support::{graft, ok};

use std::path::{Path, PathBuf};

use forward::{max_abs_diff, Map, Weights};
use graft::align::{builtin, permute, Arch, Perms, Resolved};
use graft::checkpoint::{Checkpoint, CheckpointWriter, WriterOptions};
use graft::exec::Executor;
use graft::rng::Rng;

fn fixture(family: &str, variant: &str) -> PathBuf {
    crate::support::fixture(family).join(variant)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The built-in spec of `arch` for `ck`, resolved.
fn spec(ck: &Checkpoint, arch: Arch, residual: bool) -> Resolved {
    builtin::infer(arch, ck, builtin::Options { permute_residual: residual }).unwrap().resolve(ck).unwrap()
}

/// Writes `src` permuted by random permutations of its built-in spec to `out`; returns the spec and permutations.
fn scramble(src: &Path, arch: Arch, residual: bool, seed: u64, out: &Path) -> (Resolved, Perms) {
    let ck = Checkpoint::open(src).unwrap();
    let res = spec(&ck, arch, residual);
    let perms = permute::random(&res, seed);
    assert!(perms.iter().any(|p| !permute::is_identity(p)), "random permutations are all identities");
    let opts = WriterOptions { carry_from: ck.dir().map(Path::to_path_buf), ..Default::default() };
    let writer = CheckpointWriter::create(out, permute::same_decls(&ck), opts).unwrap();
    permute::write_permuted(&ck, &res, &perms, writer, &Executor::new(Some(2)).unwrap().quiet(), "test").unwrap();
    (res, perms)
}

/// Asserts two checkpoints hold the same tensors with identical bytes.
fn assert_bit_identical(a: &Path, b: &Path) {
    let (x, y) = (Checkpoint::open(a).unwrap(), Checkpoint::open(b).unwrap());
    assert_eq!(x.len(), y.len());
    for v in x.iter() {
        let w = y.tensor(v.name).unwrap();
        assert_eq!((v.dtype, v.shape), (w.dtype, w.shape), "{}", v.name);
        assert!(v.data == w.data, "tensor {} differs between {} and {}", v.name, a.display(), b.display());
    }
}

/// Whether any tensor's bytes differ (a permutation that changes nothing would make invariance trivial).
fn any_tensor_differs(a: &Path, b: &Path) -> bool {
    let (x, y) = (Checkpoint::open(a).unwrap(), Checkpoint::open(b).unwrap());
    let differs = x.iter().any(|v| y.tensor(v.name).unwrap().data != v.data);
    differs
}

fn random_vec(rng: &mut Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.normal()).collect()
}

const TOL: f64 = 1e-5;

// ------------------------------------------------------------------------------------------------------------
// Invariance: a randomly permuted model computes the same function.

#[test]
fn mlp_is_invariant_under_its_builtin_specs() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("mlp", "base");
    let w0 = Weights::load(&base);
    let mut rng = Rng::new(1);
    let inputs: Vec<Vec<f64>> = (0..4).map(|_| random_vec(&mut rng, 784)).collect();
    // The cnn built-in follows a Linear chain the same way, so it must preserve the MLP's function too.
    for (k, arch) in [Arch::Mlp, Arch::Cnn].into_iter().enumerate() {
        let out = tmp.path().join(format!("p{k}"));
        scramble(&base, arch, false, 100 + k as u64, &out);
        assert!(any_tensor_differs(&base, &out));
        let w1 = Weights::load(&out);
        for x in &inputs {
            let (a, b) = (forward::mlp(&w0, x), forward::mlp(&w1, x));
            assert!(max_abs_diff(&a, &b) < TOL, "{arch:?}: {a:?} vs {b:?}");
        }
    }
}

#[test]
fn sepcnn_is_invariant_under_the_cnn_spec() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("sepcnn", "base");
    let out = tmp.path().join("p");
    let (_, perms) = scramble(&base, Arch::Cnn, false, 7, &out);
    assert!(perms.iter().filter(|p| !permute::is_identity(p)).count() >= 8);
    assert!(any_tensor_differs(&base, &out));
    let (w0, w1) = (Weights::load(&base), Weights::load(&out));
    let mut rng = Rng::new(2);
    for _ in 0..3 {
        let image = Map { c: 3, h: 8, w: 8, v: random_vec(&mut rng, 3 * 64) };
        let (a, b) = (forward::sepcnn(&w0, &image), forward::sepcnn(&w1, &image));
        assert_eq!(a.len(), 10);
        assert!(max_abs_diff(&a, &b) < TOL, "{a:?} vs {b:?}");
    }
}

#[test]
fn a_spec_that_breaks_the_residual_stream_changes_the_function() {
    // The check above can fail: permuting the residual stream's blocks independently (each block's output its own
    // group) breaks the skip connections, and the reference forward sees it.
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("sepcnn", "base");
    let ck = Checkpoint::open(&base).unwrap();
    let mut yaml = builtin::infer(Arch::Cnn, &ck, Default::default()).unwrap();
    for t in &mut yaml.tensors {
        if t.name.starts_with("stage1.1.conv2.") {
            for a in t.axes.iter_mut().flatten().flatten() {
                if a.group == "stage1.residual" {
                    a.group = "broken".into();
                }
            }
        }
    }
    yaml.groups.push(graft::align::spec::GroupDecl { name: "broken".into(), size: 4 });
    let res = yaml.resolve(&ck).unwrap();
    let mut perms = permute::identity(&res);
    let g = res.groups.iter().position(|g| g.name == "broken").unwrap();
    perms[g] = vec![1, 0, 3, 2];
    let out = tmp.path().join("broken");
    let writer = CheckpointWriter::create(&out, permute::same_decls(&ck), WriterOptions::default()).unwrap();
    permute::write_permuted(&ck, &res, &perms, writer, &Executor::new(Some(1)).unwrap().quiet(), "t").unwrap();
    std::fs::copy(base.join("config.json"), out.join("config.json")).unwrap();
    let (w0, w1) = (Weights::load(&base), Weights::load(&out));
    let image = Map { c: 3, h: 8, w: 8, v: random_vec(&mut Rng::new(3), 3 * 64) };
    let (a, b) = (forward::sepcnn(&w0, &image), forward::sepcnn(&w1, &image));
    assert!(max_abs_diff(&a, &b) > 1e-3, "a broken spec went unnoticed: {a:?} vs {b:?}");
}

#[test]
fn bert_is_invariant_with_and_without_the_residual_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("bert", "base");
    let w0 = Weights::load(&base);
    let ids = [3usize, 17, 5, 90, 42, 0, 64];
    let (h0, pooled0) = forward::bert(&w0, &ids);
    for residual in [false, true] {
        let out = tmp.path().join(format!("r{residual}"));
        let (res, perms) = scramble(&base, Arch::Bert, residual, 11, &out);
        assert!(any_tensor_differs(&base, &out));
        let (h1, pooled1) = forward::bert(&Weights::load(&out), &ids);
        assert!(max_abs_diff(&pooled0, &pooled1) < TOL, "residual {residual}");
        // The hidden states come out permuted by the residual group (unit i of the copy is unit p[i] of the original).
        let p: Vec<usize> = match res.groups.iter().position(|g| g.name == "residual") {
            Some(g) => perms[g].clone(),
            None => (0..h0[0].len()).collect(),
        };
        assert_eq!(residual, !permute::is_identity(&p));
        for (a, b) in h0.iter().zip(&h1) {
            let a_perm: Vec<f64> = p.iter().map(|&j| a[j]).collect();
            assert!(max_abs_diff(&a_perm, b) < TOL, "residual {residual}");
        }
    }
}

#[test]
fn llama_is_invariant_with_and_without_the_residual_stream() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("llama", "base");
    let w0 = Weights::load(&base);
    let ids = [1usize, 100, 7, 64, 3, 127];
    let logits0 = forward::llama(&w0, &ids);
    for residual in [false, true] {
        let out = tmp.path().join(format!("r{residual}"));
        let (res, perms) = scramble(&base, Arch::Llama, residual, 12, &out);
        // The kv-head groups have 2 units: make sure at least one layer swaps its heads, so GQA is exercised.
        let swapped = res
            .groups
            .iter()
            .zip(&perms)
            .filter(|(g, p)| g.name.ends_with("kv_heads") && !permute::is_identity(p))
            .count();
        assert!(swapped >= 1, "no kv-head group was permuted with this seed");
        let logits1 = forward::llama(&Weights::load(&out), &ids);
        for (a, b) in logits0.iter().zip(&logits1) {
            assert!(max_abs_diff(a, b) < TOL, "residual {residual}: {}", max_abs_diff(a, b));
        }
    }
}

#[test]
fn permuting_query_heads_apart_from_their_kv_head_breaks_llama() {
    // GQA: query heads 0-1 read kv head 0 and 2-3 read kv head 1. Swapping query heads 1 and 2 (and o_proj's
    // columns) without touching k/v moves a query head to the other kv head: the function changes, which is why
    // the llama spec permutes query heads only in blocks of rep = heads / kv.
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("llama", "base");
    let ck = Checkpoint::open(&base).unwrap();
    let text = format!(
        "groups: {{qh: 4}}\ntensors:\n{}",
        ck.names()
            .map(|n| match n {
                "model.layers.0.self_attn.q_proj.weight" => format!("  {n}: [{{group: qh, block: 8}}, null]\n"),
                "model.layers.0.self_attn.o_proj.weight" => format!("  {n}: [null, {{group: qh, block: 8}}]\n"),
                _ => format!("  {n}: null\n"),
            })
            .collect::<String>()
    );
    let res = graft::align::Spec::parse(&text, false, "t").unwrap().resolve(&ck).unwrap();
    let out = tmp.path().join("q");
    let opts = WriterOptions { carry_from: Some(base.clone()), ..Default::default() };
    let writer = CheckpointWriter::create(&out, permute::same_decls(&ck), opts).unwrap();
    let within = vec![vec![1, 0, 2, 3]]; // stays within kv group 0: harmless
    let across = vec![vec![0, 2, 1, 3]]; // crosses kv groups: harmful
    let exec = Executor::new(Some(1)).unwrap().quiet();
    permute::write_permuted(&ck, &res, &across, writer, &exec, "t").unwrap();
    let ids = [5usize, 9, 2];
    let (a, b) = (forward::llama(&Weights::load(&base), &ids), forward::llama(&Weights::load(&out), &ids));
    assert!(max_abs_diff(&a[2], &b[2]) > 1e-3);
    let out2 = tmp.path().join("q2");
    let opts = WriterOptions { carry_from: Some(base.clone()), ..Default::default() };
    let writer = CheckpointWriter::create(&out2, permute::same_decls(&ck), opts).unwrap();
    permute::write_permuted(&ck, &res, &within, writer, &exec, "t").unwrap();
    let c = forward::llama(&Weights::load(&out2), &ids);
    for (x, y) in a.iter().zip(&c) {
        assert!(max_abs_diff(x, y) < TOL);
    }
}

// ------------------------------------------------------------------------------------------------------------
// Recovery: aligning a permuted copy to the original gives the original back, bit for bit.

fn recovery(family: &str, arch: &str, residual: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture(family, "base");
    let a = match arch {
        "mlp" => Arch::Mlp,
        "cnn" => Arch::Cnn,
        "bert" => Arch::Bert,
        _ => Arch::Llama,
    };
    let scrambled = tmp.path().join("scrambled");
    scramble(&base, a, residual, 21, &scrambled);
    assert!(any_tensor_differs(&base, &scrambled));
    let out = tmp.path().join("aligned");
    let mut args = vec!["align", s(&base), s(&scrambled), "-o", s(&out), "--arch", arch, "--json"];
    if residual {
        args.push("--permute-residual");
    }
    let report: serde_json::Value = serde_json::from_str(&ok(&args)).unwrap();
    assert_bit_identical(&base, &out);
    assert!(report["converged"].as_bool().unwrap());
    assert!(report["objective_after"].as_f64().unwrap() > report["objective_before"].as_f64().unwrap());
    // Carried config: the aligned model is a loadable checkpoint directory.
    assert!(out.join("config.json").is_file());
}

#[test]
fn recovery_mlp() {
    recovery("mlp", "mlp", false);
}

#[test]
fn recovery_sepcnn() {
    recovery("sepcnn", "cnn", false);
}

#[test]
fn recovery_bert() {
    recovery("bert", "bert", false);
    recovery("bert", "bert", true);
}

#[test]
fn recovery_llama() {
    recovery("llama", "llama", false);
    recovery("llama", "llama", true);
}

#[test]
fn recovery_from_a_sharded_checkpoint_to_a_single_file() {
    let tmp = tempfile::tempdir().unwrap();
    let scrambled = tmp.path().join("scrambled");
    scramble(&fixture("llama", "base-sharded"), Arch::Llama, true, 5, &scrambled);
    let out = tmp.path().join("aligned.safetensors");
    ok(&[
        "align",
        s(&fixture("llama", "base-sharded")),
        s(&scrambled),
        "-o",
        s(&out),
        "--arch",
        "llama",
        "--permute-residual",
    ]);
    assert_bit_identical(&fixture("llama", "base"), &out);
}

// ------------------------------------------------------------------------------------------------------------
// Independent models: the objective grows; results are deterministic for a seed and any thread count.

#[test]
fn independent_models_gain_and_runs_are_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    for (family, extra) in
        [("mlp", None), ("sepcnn", None), ("bert", Some("--permute-residual")), ("llama", Some("--permute-residual"))]
    {
        let (base, indep) = (fixture(family, "base"), fixture(family, "indep"));
        let mut reports = Vec::new();
        for threads in ["1", "2"] {
            let out = tmp.path().join(format!("{family}-{threads}"));
            let mut args =
                vec!["align", s(&base), s(&indep), "-o", s(&out), "--seed", "3", "--threads", threads, "--json"];
            args.extend(extra);
            reports.push(ok(&args));
        }
        assert_eq!(reports[0], reports[1].replace(&format!("{family}-2"), &format!("{family}-1")), "{family}");
        assert_bit_identical(&tmp.path().join(format!("{family}-1")), &tmp.path().join(format!("{family}-2")));
        let r: serde_json::Value = serde_json::from_str(&reports[0]).unwrap();
        let (before, after) = (r["objective_before"].as_f64().unwrap(), r["objective_after"].as_f64().unwrap());
        assert!(after > before, "{family}: {before} -> {after}");
        for g in r["groups"].as_array().unwrap() {
            assert!(g["objective_after"].as_f64().unwrap() >= g["objective_before"].as_f64().unwrap() - 1e-9, "{g}");
        }
        // The report's objective is the inner product <W_ref, W_aligned> over the permuted tensors: recompute it
        // from the files.
        let (rck, ack) =
            (Checkpoint::open(&base).unwrap(), Checkpoint::open(tmp.path().join(format!("{family}-1"))).unwrap());
        let res =
            spec(&rck, builtin::detect(&rck, &graft::train::models::alignment_families()).unwrap(), extra.is_some());
        let mut dot = 0.0;
        for t in &res.tensors {
            let (x, y) = (rck.tensor(&t.name).unwrap(), ack.tensor(&t.name).unwrap());
            if x.is_float() {
                let (x, y) = (x.to_f32().unwrap(), y.to_f32().unwrap());
                dot += x.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>();
            }
        }
        assert!((dot - after).abs() <= 1e-9 * after.abs().max(1.0), "{family}: file objective {dot} vs report {after}");
    }
}

// ------------------------------------------------------------------------------------------------------------
// Specs: printing, files, errors.

#[test]
fn printed_specs_load_back_and_align_like_the_builtin() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("sepcnn", "base");
    let yaml = ok(&["align", "--print-spec", s(&base)]);
    assert!(yaml.contains("stage1.residual: 4"), "{yaml}");
    let file = tmp.path().join("spec.yaml");
    std::fs::write(&file, &yaml).unwrap();
    let json_file = tmp.path().join("spec.json");
    std::fs::write(&json_file, ok(&["align", "--print-spec", "--json", s(&base)])).unwrap();
    let indep = fixture("sepcnn", "indep");
    let (o1, o2, o3) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("c"));
    ok(&["align", s(&base), s(&indep), "-o", s(&o1)]);
    ok(&["align", s(&base), s(&indep), "-o", s(&o2), "--spec", s(&file)]);
    ok(&["align", s(&base), s(&indep), "-o", s(&o3), "--spec", s(&json_file)]);
    assert_bit_identical(&o1, &o2);
    assert_bit_identical(&o1, &o3);
}

#[test]
fn cnn_spec_does_not_depend_on_storage_order() {
    // safetensors writers usually store tensors sorted by name; the cnn built-in must infer the same spec.
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("sepcnn", "base");
    let ck = Checkpoint::open(&base).unwrap();
    let mut decls = permute::same_decls(&ck);
    decls.sort_by(|a, b| a.name.cmp(&b.name));
    let out = tmp.path().join("sorted");
    let opts = WriterOptions { carry_from: Some(base.clone()), ..Default::default() };
    let mut w = CheckpointWriter::create(&out, decls.clone(), opts).unwrap();
    for d in &decls {
        w.write_tensor(&d.name, ck.tensor(&d.name).unwrap().data).unwrap();
    }
    w.finish().unwrap();
    let sorted = Checkpoint::open(&out).unwrap();
    assert_ne!(sorted.names().next(), ck.names().next());
    let a = builtin::infer(Arch::Cnn, &ck, Default::default()).unwrap();
    let b = builtin::infer(Arch::Cnn, &sorted, Default::default()).unwrap();
    assert_eq!(a.groups, b.groups);
    for t in &a.tensors {
        assert_eq!(Some(t), b.tensors.iter().find(|u| u.name == t.name), "{}", t.name);
    }
}

fn spec_error(spec_text: &str, needle: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("spec.yaml");
    std::fs::write(&file, spec_text).unwrap();
    let base = fixture("mlp", "base");
    let out_dir = tmp.path().join("out");
    for args in [
        vec!["align", "--print-spec", "--spec", s(&file), s(&base)],
        vec!["align", s(&base), s(&fixture("mlp", "indep")), "--spec", s(&file), "-o", s(&out_dir)],
    ] {
        let out = graft(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(needle) && err.contains("spec.yaml"), "{args:?}: expected '{needle}' in: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
    assert!(!out_dir.exists(), "an invalid spec left output behind");
}

const MLP_SPEC: &str = "groups: {h0: 64, h1: 64}
tensors:
  layers.0.weight: [h0, null]
  layers.0.bias: [h0]
  layers.1.weight: [h1, h0]
  layers.1.bias: [h1]
  layers.2.weight: [null, h1]
  layers.2.bias: [null]
";

#[test]
fn a_valid_hand_written_spec_works() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("spec.yaml");
    std::fs::write(&file, MLP_SPEC).unwrap();
    let (o1, o2) = (tmp.path().join("a"), tmp.path().join("b"));
    let (base, indep) = (fixture("mlp", "base"), fixture("mlp", "indep"));
    ok(&["align", s(&base), s(&indep), "-o", s(&o1), "--spec", s(&file)]);
    ok(&["align", s(&base), s(&indep), "-o", s(&o2), "--arch", "mlp"]);
    assert_bit_identical(&o1, &o2);
}

#[test]
fn spec_missing_a_tensor_is_an_error() {
    spec_error(&MLP_SPEC.replace("  layers.2.bias: [null]\n", ""), "does not cover tensor 'layers.2.bias'");
}

#[test]
fn spec_with_unequal_group_sizes_on_an_axis_is_an_error() {
    spec_error(&MLP_SPEC.replace("h1: 64", "h1: 32"), "axis 0 has length 64 but group 'h1' has 32 units");
}

#[test]
fn spec_errors_name_the_problem() {
    spec_error(&MLP_SPEC.replace("[h1, h0]", "[h1, h9]"), "group 'h9' is not declared");
    spec_error(&MLP_SPEC.replace("[h1, h0]", "[h1]"), "tensor 'layers.1.weight' has 2 axes");
    spec_error(
        &format!("{MLP_SPEC}  layers.9.weight: null\n"),
        "'layers.9.weight' is in the spec but not in the checkpoint",
    );
    spec_error(&MLP_SPEC.replace("h1: 64}", "h1: 64, unused: 3}"), "group 'unused' is declared but permutes no axis");
}

#[test]
fn builtin_that_does_not_fit_is_a_clear_error() {
    for (arch, family, needle) in [
        ("mlp", "sepcnn", "use --arch cnn"),
        ("llama", "mlp", "num_attention_heads"),
        ("bert", "llama", "not a BERT checkpoint"),
    ] {
        let out = graft(&["align", "--print-spec", "--arch", arch, s(&fixture(family, "base"))]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(needle), "{arch} on {family}: {err}");
    }
}

// ------------------------------------------------------------------------------------------------------------
// Cycle consistency.

#[test]
fn cycle_report_round_trips_and_loops() {
    let tmp = tempfile::tempdir().unwrap();
    let base = fixture("mlp", "base");
    let scrambled = tmp.path().join("scrambled");
    scramble(&base, Arch::Mlp, false, 8, &scrambled);
    let (ft, indep) = (fixture("mlp", "ft_a"), fixture("mlp", "indep"));
    let r: serde_json::Value =
        serde_json::from_str(&ok(&["align", "--cycle", s(&base), s(&ft), s(&indep), s(&scrambled), "--json"])).unwrap();
    let pairs = r["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 3);
    for p in pairs {
        // An exact permuted copy always comes back: the round trip is the identity at distance 0.
        let rt = &p["round_trip"];
        assert_eq!(rt["identity_groups"], rt["groups"], "{p}");
        assert_eq!(rt["relative_distance"].as_f64(), Some(0.0));
        assert_eq!(rt["mse_sum"].as_f64(), Some(0.0));
    }
    // A fine-tune of the base aligns to the identity; the scrambled copy to a non-identity.
    assert!(pairs[0]["forward"]["groups"].as_array().unwrap().iter().all(|g| g["identity"] == true));
    assert!(pairs[2]["forward"]["groups"].as_array().unwrap().iter().all(|g| g["identity"] == false));
    let looped = &r["loop"]["composed"];
    let d = looped["relative_distance"].as_f64().unwrap();
    assert!((0.0..=2.0).contains(&d), "{looped}");
    // Base <- scrambled <- base alone is an exact loop: it composes to the identity.
    let r2: serde_json::Value =
        serde_json::from_str(&ok(&["align", "--cycle", s(&base), s(&scrambled), "--json"])).unwrap();
    assert_eq!(r2["loop"]["composed"]["relative_distance"].as_f64(), Some(0.0));
    assert_eq!(r2["loop"]["composed"]["fixed_units"].as_f64(), Some(1.0));
    let text = ok(&["align", "--cycle", s(&base), s(&indep)]);
    assert!(text.contains("round trip") && text.contains("loop"), "{text}");
}

// ------------------------------------------------------------------------------------------------------------
// Interpolation.

#[test]
fn interpolate_writes_the_path_with_exact_end_points() {
    let tmp = tempfile::tempdir().unwrap();
    for family in ["mlp", "llama"] {
        let (a, b) = (fixture(family, "base"), fixture(family, "ft_a"));
        let dir = tmp.path().join(family);
        let manifest: serde_json::Value =
            serde_json::from_str(&ok(&["interpolate", s(&a), s(&b), "--steps", "5", "-o", s(&dir), "--json"])).unwrap();
        let points = manifest["points"].as_array().unwrap();
        assert_eq!(points.len(), 5);
        assert_eq!(points[2]["lambda"].as_f64(), Some(0.5));
        assert_bit_identical(&a, &dir.join("step-000"));
        assert_bit_identical(&b, &dir.join("step-004"));
        assert!(dir.join("interpolation.json").is_file() && dir.join("step-002/config.json").is_file());
        let (ca, cb, cm) = (
            Checkpoint::open(&a).unwrap(),
            Checkpoint::open(&b).unwrap(),
            Checkpoint::open(dir.join("step-001")).unwrap(),
        );
        for v in ca.iter() {
            let (x, y, z) = (
                v.to_f32().unwrap(),
                cb.tensor(v.name).unwrap().to_f32().unwrap(),
                cm.tensor(v.name).unwrap().to_f32().unwrap(),
            );
            // f32 arithmetic (error a few 2^-24 of the terms' magnitudes), then one rounding to the stored dtype
            // (half an ulp: 2^-9 relative for BF16, nothing more for F32).
            let store = if v.dtype == graft::checkpoint::Dtype::BF16 { 2f64.powi(-8) } else { 0.0 };
            for ((&p, &q), &r) in x.iter().zip(&y).zip(&z) {
                let (t1, t2) = (0.75 * p as f64, 0.25 * q as f64);
                let want = t1 + t2;
                let tol = store * want.abs() + 4.0 * 2f64.powi(-24) * (t1.abs() + t2.abs());
                assert!((r as f64 - want).abs() <= tol, "{}: {r} vs {want}", v.name);
            }
        }
    }
    let out = graft(&[
        "interpolate",
        s(&fixture("mlp", "base")),
        s(&fixture("mlp", "ft_a")),
        "--steps",
        "1",
        "-o",
        s(&tmp.path().join("x")),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let out = graft(&[
        "interpolate",
        s(&fixture("mlp", "base")),
        s(&fixture("bert", "base")),
        "-o",
        s(&tmp.path().join("y")),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such tensor"));
}

// ------------------------------------------------------------------------------------------------------------
// The cnn built-in beyond the fixture: residual shortcuts that change width, and a Linear over a flattened map.

/// Writes a checkpoint of random tensors (BatchNorm variances positive) in name-sorted order, as safetensors
/// writers store them, with a config.json.
fn write_random_net(dir: &Path, tensors: &[(&str, Vec<usize>)], seed: u64) {
    let mut rng = Rng::new(seed);
    let mut sorted: Vec<&(&str, Vec<usize>)> = tensors.iter().collect();
    sorted.sort_by_key(|t| t.0);
    let decls: Vec<graft::checkpoint::TensorDecl> = sorted
        .iter()
        .map(|(n, s)| graft::checkpoint::TensorDecl::new(*n, graft::checkpoint::Dtype::F32, s.clone()))
        .collect();
    let mut w = CheckpointWriter::create(dir, decls, WriterOptions::default()).unwrap();
    for (name, shape) in sorted {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                let x = rng.normal() as f32;
                if name.ends_with("running_var") {
                    0.5 + x.abs()
                } else {
                    x * 0.5
                }
            })
            .collect();
        w.write_f32(name, &v).unwrap();
    }
    w.finish().unwrap();
    std::fs::write(dir.join("config.json"), "{\"graft_arch\": \"cnn\", \"in_channels\": 3}\n").unwrap();
}

fn bn(prefix: &str, c: usize) -> Vec<(String, Vec<usize>)> {
    ["weight", "bias", "running_mean", "running_var"].iter().map(|p| (format!("{prefix}.{p}"), vec![c])).collect()
}

#[test]
fn cnn_builtin_handles_resnet_shortcuts_and_flattened_linears() {
    let tmp = tempfile::tempdir().unwrap();
    let mut resnet: Vec<(String, Vec<usize>)> = vec![("conv1.weight".into(), vec![4, 3, 3, 3])];
    resnet.extend(bn("bn1", 4));
    for (p, cin, c, down) in [("layer1.0", 4, 4, false), ("layer2.0", 4, 6, true), ("layer2.1", 6, 6, false)] {
        resnet.push((format!("{p}.conv1.weight"), vec![c, cin, 3, 3]));
        resnet.extend(bn(&format!("{p}.bn1"), c));
        resnet.push((format!("{p}.conv2.weight"), vec![c, c, 3, 3]));
        resnet.extend(bn(&format!("{p}.bn2"), c));
        if down {
            resnet.push((format!("{p}.downsample.0.weight"), vec![c, cin, 1, 1]));
            resnet.extend(bn(&format!("{p}.downsample.1"), c));
        }
    }
    resnet.push(("fc.weight".into(), vec![5, 6]));
    resnet.push(("fc.bias".into(), vec![5]));
    let mut vgg: Vec<(String, Vec<usize>)> =
        vec![("features.0.weight".into(), vec![4, 3, 3, 3]), ("features.0.bias".into(), vec![4])];
    vgg.extend(bn("features.1", 4));
    vgg.push(("features.3.weight".into(), vec![6, 4, 3, 3]));
    vgg.push(("features.3.bias".into(), vec![6]));
    vgg.extend(bn("features.4", 6));
    vgg.extend([
        ("classifier.0.weight".into(), vec![7, 6 * 2 * 2]),
        ("classifier.0.bias".into(), vec![7]),
        ("classifier.2.weight".into(), vec![3, 7]),
        ("classifier.2.bias".into(), vec![3]),
    ]);
    type Forward = fn(&Weights, &Map) -> Vec<f64>;
    type Tensors = Vec<(String, Vec<usize>)>;
    let nets: [(&str, Tensors, Forward); 2] = [("resnet", resnet, forward::resnet), ("vgg", vgg, forward::vgg)];
    for (name, tensors, fwd) in nets {
        let base = tmp.path().join(name);
        let list: Vec<(&str, Vec<usize>)> = tensors.iter().map(|(n, s)| (n.as_str(), s.clone())).collect();
        write_random_net(&base, &list, 1);
        let ck = Checkpoint::open(&base).unwrap();
        let res = spec(&ck, Arch::Cnn, false);
        let group_of =
            |t: &str, axis: usize| res.get(t).and_then(|p| p.axes[axis]).map(|a| res.groups[a.group].name.clone());
        if name == "resnet" {
            // The stem output is layer1's stream; the downsample maps it to layer2's stream, which layer2.0's conv2
            // and layer2.1 share; each block's inner channels are a group of their own.
            assert_eq!(group_of("conv1.weight", 0).as_deref(), Some("layer1.residual"));
            assert_eq!(group_of("layer1.0.conv2.weight", 0).as_deref(), Some("layer1.residual"));
            assert_eq!(group_of("layer2.0.downsample.0.weight", 1).as_deref(), Some("layer1.residual"));
            for (t, axis) in [
                ("layer2.0.downsample.0.weight", 0),
                ("layer2.0.conv2.weight", 0),
                ("layer2.1.conv1.weight", 1),
                ("layer2.1.bn2.bias", 0),
                ("fc.weight", 1),
            ] {
                assert_eq!(group_of(t, axis).as_deref(), Some("layer2.residual"), "{t}");
            }
            assert_eq!(group_of("layer2.0.conv1.weight", 1).as_deref(), Some("layer1.residual"));
            assert_eq!(group_of("layer2.1.conv1.weight", 0).as_deref(), Some("layer2.1.conv1"));
            assert_eq!(res.groups.len(), 5);
        } else {
            let p = res.get("classifier.0.weight").unwrap();
            assert_eq!(p.axes[1].map(|a| a.block), Some(4), "flattened 6 x 2 x 2 map: channel blocks of 4");
            assert_eq!(group_of("classifier.0.weight", 1).as_deref(), Some("features.3"));
        }
        let scrambled = tmp.path().join(format!("{name}-scrambled"));
        scramble(&base, Arch::Cnn, false, 4, &scrambled);
        let (w0, w1) = (Weights::load(&base), Weights::load(&scrambled));
        let image = Map { c: 3, h: 4, w: 4, v: random_vec(&mut Rng::new(6), 48) };
        let (a, b) = (fwd(&w0, &image), fwd(&w1, &image));
        assert!(max_abs_diff(&a, &b) < TOL, "{name}: {a:?} vs {b:?}");
        let out = tmp.path().join(format!("{name}-aligned"));
        ok(&["align", s(&base), s(&scrambled), "-o", s(&out)]);
        assert_bit_identical(&base, &out);
    }
}

#[test]
fn large_tensors_are_streamed_in_chunks_and_recovered_exactly() {
    // 17000 x 64 and 64 x 17000 BF16 matrices exceed the executor's chunk (2^20 elements), so permuting them goes
    // through the chunked path, by rows (axis 0) and by columns (the last axis).
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base");
    let (wide, hidden) = (17_000usize, 64usize);
    let shapes = [
        ("layers.0.weight", vec![hidden, wide]),
        ("layers.0.bias", vec![hidden]),
        ("layers.1.weight", vec![wide, hidden]),
    ];
    let decls: Vec<graft::checkpoint::TensorDecl> = shapes
        .iter()
        .map(|(n, s)| graft::checkpoint::TensorDecl::new(*n, graft::checkpoint::Dtype::BF16, s.clone()))
        .collect();
    let mut w = CheckpointWriter::create(&base, decls, WriterOptions::default()).unwrap();
    let mut rng = Rng::new(10);
    for (name, shape) in &shapes {
        let v: Vec<f32> = (0..shape.iter().product::<usize>()).map(|_| rng.normal() as f32).collect();
        w.write_f32(name, &v).unwrap();
    }
    w.finish().unwrap();
    std::fs::write(base.join("config.json"), "{\"graft_arch\": \"mlp\"}\n").unwrap();
    let scrambled = tmp.path().join("scrambled");
    let (_, perms) = scramble(&base, Arch::Mlp, false, 3, &scrambled);
    let p = &perms[0];
    let (b, sc) = (Checkpoint::open(&base).unwrap(), Checkpoint::open(&scrambled).unwrap());
    let (b0, s0) = (b.tensor("layers.0.weight").unwrap().data, sc.tensor("layers.0.weight").unwrap().data);
    for i in 0..hidden {
        assert!(s0[i * wide * 2..(i + 1) * wide * 2] == b0[p[i] * wide * 2..(p[i] + 1) * wide * 2], "row {i}");
    }
    let (b1, s1) = (b.tensor("layers.1.weight").unwrap().data, sc.tensor("layers.1.weight").unwrap().data);
    for r in (0..wide).step_by(997) {
        for (i, &pi) in p.iter().enumerate() {
            let (x, y) = ((r * hidden + i) * 2, (r * hidden + pi) * 2);
            assert_eq!(s1[x..x + 2], b1[y..y + 2], "row {r} column {i}");
        }
    }
    let out = tmp.path().join("aligned");
    ok(&["align", s(&base), s(&scrambled), "-o", s(&out), "--threads", "2"]);
    assert_bit_identical(&base, &out);
}
