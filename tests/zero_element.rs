//! Zero-element tensors (a 0 in the shape, data offsets begin == end, as the reference `safetensors` library writes
//! them) driven through every command that reads or writes tensors: inspect, convert (with and without `--dtype`),
//! diff, apply, similarity, snr, merge with every registered method, and interpolate. Each output keeps the empty
//! tensors' shapes with zero bytes, the ordinary tensor beside them is computed right (plain f64 references), and
//! nothing divides 0 by 0: similarity reports undefined ratios over zero elements as null, snr lists empty tensors
//! with status "empty" instead of scoring them.

use crate::support::st::{empty, f32t, header, read_f32, write_st};
use crate::support::{run_ok, s, tmp};
use std::path::{Path, PathBuf};

const BASE_W: [f32; 6] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];

/// base, a = base + 0.5, b = base + 1.0, each with an F32 [0, 4] and a BF16 [4, 0] tensor beside `w`.
fn models(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let paths = ["base", "a", "b"].map(|n| dir.join(format!("{n}.safetensors")));
    for (p, shift) in paths.iter().zip([0.0f32, 0.5, 1.0]) {
        let w: Vec<f32> = BASE_W.iter().map(|x| x + shift).collect();
        write_st(p, &[f32t("w", &[2, 3], &w), empty("empty", "F32", &[0, 4]), empty("empty16", "BF16", &[4, 0])]);
    }
    let [base, a, b] = paths;
    (base, a, b)
}

/// The output keeps both empty tensors with their shapes and no bytes; `dtype` is the float dtype expected for them
/// (None: as stored).
fn assert_empties_kept(path: &Path, dtype: Option<&str>) {
    let h = header(path);
    for (name, shape, stored) in [("empty", [0, 4], "F32"), ("empty16", [4, 0], "BF16")] {
        let t = &h[name];
        assert_eq!(t["shape"], serde_json::json!(shape), "{}: {name}: {t}", path.display());
        assert_eq!(t["dtype"], dtype.unwrap_or(stored), "{}: {name}", path.display());
        assert_eq!(t["data_offsets"][0], t["data_offsets"][1], "{}: {name}: {t}", path.display());
    }
}

fn assert_close(got: &[f32], want: &[f64], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        assert!((*g as f64 - w).abs() < 1e-5, "{what}: got {got:?}, want {want:?}");
    }
}

#[test]
fn inspect_and_convert_keep_zero_element_tensors() {
    let dir = tmp("zero", "convert");
    let (_, a, _) = models(&dir);
    let out = run_ok(&["inspect", &s(&a)]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("empty16") && text.contains("[4, 0]"), "{text}");
    let plain = dir.join("plain.safetensors");
    run_ok(&["convert", &s(&a), "-o", &s(&plain)]);
    assert_empties_kept(&plain, None);
    assert_close(&read_f32(&plain, "w"), &BASE_W.map(|x| x as f64 + 0.5), "convert w");
    let f16 = dir.join("f16.safetensors");
    run_ok(&["convert", &s(&a), "--dtype", "f16", "-o", &s(&f16)]);
    assert_empties_kept(&f16, Some("F16"));
    assert_eq!(header(&f16)["w"]["data_offsets"][1], 12, "six f16 values");
}

#[test]
fn diff_and_apply_keep_zero_element_tensors() {
    let dir = tmp("zero", "diff");
    let (base, a, _) = models(&dir);
    let tv = dir.join("tv.safetensors");
    // A zero-element tensor equals its base trivially: --keep-equal keeps it, as it keeps any unchanged tensor.
    run_ok(&["diff", "--base", &s(&base), &s(&a), "--keep-equal", "-o", &s(&tv)]);
    // Deltas are written in f32 by default (`diff --dtype`), empty ones included.
    assert_empties_kept(&tv, Some("F32"));
    assert_close(&read_f32(&tv, "w"), &[0.5; 6], "task vector");
    let applied = dir.join("applied.safetensors");
    run_ok(&["apply", &s(&base), "--vector", &format!("{}:0.5", s(&tv)), "-o", &s(&applied)]);
    assert_empties_kept(&applied, None);
    assert_close(&read_f32(&applied, "w"), &BASE_W.map(|x| x as f64 + 0.25), "base + 0.5 tv");
}

#[test]
fn merge_with_every_registered_method_keeps_zero_element_tensors() {
    let dir = tmp("zero", "merge");
    let (base, a, b) = models(&dir);
    let (base, a, b) = (s(&base), s(&a), s(&b));
    for m in graft::merge::methods() {
        let name = m.name();
        let out = dir.join(format!("{name}.safetensors"));
        let o = s(&out);
        let mut args = vec!["merge", "--method", name, "-o", o.as_str()];
        match name {
            "passthrough" => args.push(&a),
            "slerp" => args.extend(["--t", "0.5", "--base", &base, &a, &b]),
            "nearswap" => args.extend(["--t", "0.5", "--base", &base, &a]),
            "arcee_fusion" => args.extend(["--base", &base, &a]),
            _ => args.extend(["--base", &base, &a, &b]),
        }
        run_ok(&args);
        assert_empties_kept(&out, None);
        let w = read_f32(&out, "w");
        assert!(w.len() == 6 && w.iter().all(|x| x.is_finite()), "{name}: {w:?}");
        // Methods whose result on these inputs is fixed by hand: every task vector is a constant shift of w.
        let want: Option<Vec<f64>> = match name {
            "passthrough" => Some(BASE_W.iter().map(|x| *x as f64 + 0.5).collect()),
            "linear" => Some(BASE_W.iter().map(|x| *x as f64 + 0.75).collect()), // mean of a and b (the base is not a term)
            "task_arithmetic" => Some(BASE_W.iter().map(|x| *x as f64 + 1.5).collect()), // base + 0.5 + 1.0
            _ => None,
        };
        if let Some(want) = want {
            assert_close(&w, &want, name);
        }
    }
}

#[test]
fn similarity_and_snr_report_empty_tensors_without_nan() {
    let dir = tmp("zero", "stats");
    let (base, a, b) = models(&dir);
    let out = run_ok(&["similarity", "--base", &s(&base), &s(&a), &s(&b), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("similarity prints JSON");
    // The empty tensors add no parameters: only w's six count, and the cosine of two parallel task vectors is 1.
    assert_eq!(v["total"]["params"], 6, "{v}");
    assert!((v["total"]["pairs"][0]["cosine"].as_f64().unwrap() - 1.0).abs() < 1e-12, "{v}");

    // Models made only of empty tensors: every ratio is 0/0, reported as null (undefined), never NaN.
    let only_empty = ["eb", "ea", "ec"].map(|n| dir.join(format!("{n}.safetensors")));
    for p in &only_empty {
        write_st(p, &[empty("empty", "F32", &[0, 4])]);
    }
    let out = run_ok(&["similarity", "--base", &s(&only_empty[0]), &s(&only_empty[1]), &s(&only_empty[2]), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("similarity prints JSON");
    assert_eq!(v["total"]["params"], 0, "{v}");
    assert!(v["total"]["pairs"][0]["cosine"].is_null(), "{v}");
    assert!(v["total"]["models"][0]["zero_fraction"].is_null(), "{v}");
    assert_eq!(v["total"]["models"][0]["l2_norm"], 0.0, "{v}");

    let out = run_ok(&["snr", &s(&a), "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("snr prints JSON");
    let text = v.to_string();
    assert!(!text.contains("NaN"), "{text}");
    let statuses: Vec<(String, String)> = text_entries(&v);
    assert!(statuses.contains(&("empty".into(), "empty".into())), "{statuses:?}");
    assert!(statuses.contains(&("empty16".into(), "empty".into())), "{statuses:?}");
    assert!(statuses.contains(&("w".into(), "ok".into())), "{statuses:?}");
}

/// (name, status) of every object in an snr document that has both.
fn text_entries(v: &serde_json::Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    match v {
        serde_json::Value::Object(m) => {
            if let (Some(n), Some(st)) =
                (m.get("name").and_then(|x| x.as_str()), m.get("status").and_then(|x| x.as_str()))
            {
                out.push((n.to_string(), st.to_string()));
            }
            m.values().for_each(|x| out.extend(text_entries(x)));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| out.extend(text_entries(x))),
        _ => {}
    }
    out
}

#[test]
fn interpolate_keeps_zero_element_tensors_at_every_step() {
    let dir = tmp("zero", "interpolate");
    let (_, a, b) = models(&dir);
    let out = dir.join("path");
    run_ok(&["interpolate", &s(&a), &s(&b), "--steps", "3", "-o", &s(&out)]);
    for (step, l) in [0.0f64, 0.5, 1.0].iter().enumerate() {
        let d = out.join(format!("step-{step:03}"));
        let file = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .unwrap_or_else(|| panic!("no safetensors in {}", d.display()));
        assert_empties_kept(&file, None);
        assert_close(&read_f32(&file, "w"), &BASE_W.map(|x| x as f64 + 0.5 + 0.5 * l), &format!("step {step}"));
    }
}
