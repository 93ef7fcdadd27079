//! graft against mergekit 0.1.5 itself: `fixtures/expected/<case>/` holds mergekit's output on the committed fixtures
//! and the YAML it ran (written by `tools/mergekit-parity`). graft runs the same YAML, by default (f32 arithmetic)
//! and with `--compat mergekit`, and every element is compared in bf16 ulps.
//!
//! Bounds: linear, slerp, passthrough and everything computed by mergekit in f32: every element within 1 bf16 ulp.
//! TIES and breadcrumbs: torch's unstable sort keeps an arbitrary subset of equal magnitudes at the trim boundary,
//! so elements where a task vector's magnitude equals a boundary value may differ; every other element is within
//! 1 ulp. With `dtype: bfloat16` mergekit does the task-vector arithmetic in bf16: `--compat mergekit` reproduces it
//! (task arithmetic bit for bit); the default f32 arithmetic is more accurate, and the fraction of elements within
//! 1 ulp of mergekit's is reported and bounded.

use std::collections::HashSet;
use std::path::Path;

use graft::checkpoint::Checkpoint;
use half::bf16;

const EXPECTED: &str = "fixtures/expected";

/// Distance in bf16 ulps (ordered bit patterns; +0 and -0 coincide).
fn ulps(a: f32, b: f32) -> u32 {
    let ord = |x: f32| {
        let bits = bf16::from_f32(x).to_bits() as i32;
        if bits & 0x8000 != 0 {
            -(bits & 0x7fff)
        } else {
            bits
        }
    };
    (ord(a) - ord(b)).unsigned_abs()
}

fn run_graft(case: &str, compat: bool, out: &Path) -> serde_json::Value {
    let cfg = format!("{EXPECTED}/{case}/config.yml");
    let mut args = vec!["merge", cfg.as_str(), "-o", out.to_str().unwrap()];
    if compat {
        args.extend(["--compat", "mergekit"]);
    }
    let o = crate::support::command(&[]).args(&args).output().unwrap();
    assert!(o.status.success(), "{case}: {}", String::from_utf8_lossy(&o.stderr));
    let plan = crate::support::command(&[]).args(&args).args(["--dry-run", "--json"]).output().unwrap();
    serde_json::from_str(&String::from_utf8(plan.stdout).unwrap()).unwrap()
}

/// How a trim picks entries, to find the positions where ties make the choice arbitrary.
#[derive(Clone, Copy)]
enum Trim {
    None,
    Magnitude,
    Outliers,
}

/// Element positions (per tensor) whose task-vector magnitude equals a trim-boundary value for some input.
fn tie_positions(
    plan: &serde_json::Value,
    models: &[Checkpoint],
    trim: Trim,
    bf16_deltas: bool,
) -> HashSet<(String, usize)> {
    let mut out = HashSet::new();
    if matches!(trim, Trim::None) {
        return out;
    }
    for t in plan["tensors"].as_array().unwrap() {
        if t["op"] != "merge" {
            continue;
        }
        let inputs = t["inputs"].as_array().unwrap();
        let base = t["base"].as_u64().unwrap() as usize;
        let read = |k: usize| {
            let s = &inputs[k];
            models[s["model"].as_u64().unwrap() as usize]
                .tensor(s["tensor"].as_str().unwrap())
                .unwrap()
                .to_f32()
                .unwrap()
        };
        let b = read(base);
        for (k, p) in t["params"]["inputs"].as_array().unwrap().iter().enumerate() {
            if k == base {
                continue;
            }
            let density = p["density"].as_f64().unwrap();
            if density >= 1.0 {
                continue;
            }
            let mut mags: Vec<f32> = read(k)
                .iter()
                .zip(&b)
                .map(|(x, y)| {
                    let d = x - y;
                    if bf16_deltas {
                        bf16::from_f32(d).to_f32().abs()
                    } else {
                        d.abs()
                    }
                })
                .collect();
            let n = mags.len();
            let keep = (density * n as f64) as usize;
            let boundaries: Vec<(usize, usize)> = match trim {
                Trim::Magnitude => vec![(n - keep.max(1), n)],
                Trim::Outliers => {
                    let top = (p["gamma"].as_f64().unwrap() * n as f64) as usize;
                    let bot = n.saturating_sub(keep + top);
                    vec![(bot, bot + keep)]
                }
                Trim::None => unreachable!(),
            };
            let orig = mags.clone();
            mags.sort_by(|a, b| a.partial_cmp(b).unwrap());
            let mut values = Vec::new();
            for (lo, hi) in boundaries {
                if hi > lo {
                    values.push(mags[lo]);
                    values.push(mags[hi - 1]);
                }
            }
            for (i, m) in orig.iter().enumerate() {
                if values.contains(m) {
                    out.insert((t["name"].as_str().unwrap().to_string(), i));
                }
            }
        }
    }
    out
}

struct Comparison {
    total: usize,
    exact: usize,
    within1: usize,
    /// Elements more than 1 ulp away that are not at a trim tie.
    unexplained: Vec<String>,
    at_ties: usize,
}

fn compare(case: &str, compat: bool, trim: Trim) -> Comparison {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let plan = run_graft(case, compat, &out);
    let models: Vec<Checkpoint> =
        plan["models"].as_array().unwrap().iter().map(|m| Checkpoint::open(m.as_str().unwrap()).unwrap()).collect();
    let bf16_work = compat && case.ends_with("_bf16");
    let ties = tie_positions(&plan, &models, trim, bf16_work);
    let ours = Checkpoint::open(&out).unwrap();
    let theirs = Checkpoint::open(format!("{EXPECTED}/{case}/model.safetensors")).unwrap();
    let mut c = Comparison { total: 0, exact: 0, within1: 0, unexplained: Vec::new(), at_ties: 0 };
    let mut names: Vec<&str> = theirs.names().collect();
    names.sort();
    let mut ours_names: Vec<&str> = ours.names().collect();
    ours_names.sort();
    assert_eq!(ours_names, names, "{case}: tensor sets differ");
    for name in names {
        let (a, b) = (ours.tensor(name).unwrap(), theirs.tensor(name).unwrap());
        assert_eq!((a.dtype, a.shape), (b.dtype, b.shape), "{case}: {name}");
        for (i, (x, y)) in a.to_f32().unwrap().iter().zip(b.to_f32().unwrap()).enumerate() {
            let u = ulps(*x, y);
            c.total += 1;
            c.exact += (u == 0) as usize;
            c.within1 += (u <= 1) as usize;
            if u > 1 {
                if ties.contains(&(name.to_string(), i)) {
                    c.at_ties += 1;
                } else if c.unexplained.len() < 5 {
                    c.unexplained.push(format!("{name}[{i}]: graft {x} mergekit {y} ({u} ulps)"));
                } else {
                    c.unexplained.push(String::new());
                }
            }
        }
    }
    let f = |n: usize| n as f64 / c.total as f64;
    eprintln!(
        "{case:32} {:8} exact {:.4}  within 1 ulp {:.4}  >1 ulp at ties {}  other >1 ulp {}",
        if compat { "compat" } else { "f32" },
        f(c.exact),
        f(c.within1),
        c.at_ties,
        c.unexplained.len()
    );
    c
}

fn all_within_one_ulp(case: &str, compat: bool, trim: Trim) {
    let c = compare(case, compat, trim);
    assert!(
        c.unexplained.is_empty(),
        "{case} ({}): {:?}",
        if compat { "compat" } else { "f32" },
        &c.unexplained[..c.unexplained.len().min(5)]
    );
}

#[test]
fn linear_slerp_passthrough_are_within_one_ulp() {
    for case in [
        "linear_llama",
        "linear_mlp_filters",
        "slerp_llama_gradients",
        "slerp_llama_slices",
        "slerp_mlp",
        "passthrough_llama_stack",
    ] {
        for compat in [false, true] {
            let c = compare(case, compat, Trim::None);
            assert_eq!(c.within1, c.total, "{case}: {:?}", c.unexplained);
        }
    }
}

#[test]
fn task_arithmetic_family_in_f32_is_within_one_ulp_outside_trim_ties() {
    for (case, trim) in [
        ("task_arithmetic_llama_f32", Trim::None),
        ("ties_llama_f32", Trim::Magnitude),
        ("ties_mlp_f32", Trim::Magnitude),
        ("breadcrumbs_llama_f32", Trim::Outliers),
    ] {
        all_within_one_ulp(case, false, trim);
        all_within_one_ulp(case, true, trim);
    }
}

#[test]
fn compat_mode_reproduces_mergekit_bf16_arithmetic() {
    // Task arithmetic has no sort: bit for bit.
    let c = compare("task_arithmetic_llama_bf16", true, Trim::None);
    assert_eq!(c.exact, c.total);
    all_within_one_ulp("ties_llama_bf16", true, Trim::Magnitude);
    all_within_one_ulp("breadcrumbs_llama_bf16", true, Trim::Outliers);
}

#[test]
fn default_f32_arithmetic_on_bf16_configs_is_mostly_within_one_ulp() {
    // graft's f32 arithmetic differs from mergekit's step-by-step bf16 rounding: a few elements (near cancellations,
    // and trims whose selection the rounding changes) move further. Measured on these fixtures: 0.9917, 0.9644,
    // 0.9744 (bounds leave a little room).
    for (case, bound) in
        [("task_arithmetic_llama_bf16", 0.985), ("ties_llama_bf16", 0.955), ("breadcrumbs_llama_bf16", 0.965)]
    {
        let c = compare(case, false, Trim::None);
        let f = c.within1 as f64 / c.total as f64;
        assert!(f >= bound, "{case}: {f} of elements within 1 ulp, bound {bound}");
    }
}

#[test]
fn sce_and_multislerp_in_f32_match_mergekit() {
    // Measured on these fixtures: multislerp bit-exact; sce 0.9952 of elements within 1 bf16 ulp (128 further off).
    // The task vectors are differences of bf16 values, so many variances are equal at the top-k boundary: graft keeps
    // every tied one, torch's topk an arbitrary subset (not yet confirmed element by element).
    for compat in [false, true] {
        all_within_one_ulp("multislerp_llama_f32", compat, Trim::None);
        let c = compare("sce_llama_f32", compat, Trim::None);
        let f = c.within1 as f64 / c.total as f64;
        assert!(f >= 0.99, "sce_llama_f32: {f} of elements within 1 ulp, bound 0.99");
    }
}

#[test]
fn base_optional_methods_and_the_newer_methods_in_f32_match_mergekit() {
    // Every element within 1 bf16 ulp of mergekit's, in f32 and in compat mode (these methods compute in f32 in
    // mergekit too). Arcee Fusion's mask depends on which importances reach the threshold: an importance within
    // float rounding of it may fall either side (graft's KL is accumulated in f64, torch's in f32), so its bound is
    // a share (measured in docs/merge.md).
    for case in [
        "multislerp_llama_nobase_f32",
        "karcher_llama_f32",
        "nuslerp_llama_f32",
        "nuslerp_llama_rows_nobase_f32",
        "nuslerp_llama_columns_f32",
        "ram_llama_f32",
        "ramplus_tl_llama_f32",
    ] {
        for compat in [false, true] {
            all_within_one_ulp(case, compat, Trim::None);
        }
    }
    for compat in [false, true] {
        let c = compare("arcee_fusion_llama_f32", compat, Trim::None);
        let f = c.within1 as f64 / c.total as f64;
        assert!(f >= 0.99, "arcee_fusion_llama_f32: {f} of elements within 1 ulp, bound 0.99");
    }
}
