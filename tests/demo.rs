//! `graft demo` end to end (the README's first command): the whole study on the bundled digits, the report table's
//! contents, valid non-blank charts, and a rerun that redoes nothing.

use crate::support::graft;
use crate::support::png;

#[test]
fn demo_runs_the_whole_study_reports_it_and_resumes_without_redoing_steps() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let d = dir.to_str().unwrap();
    let o = graft(&["demo", "-o", d]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let table = String::from_utf8_lossy(&o.stdout);

    // The baseline, every method at every top-p, the SNR-average variant, and every freeze policy.
    assert!(table.contains("| base / full (baseline) |"), "{table}");
    for method in ["lerp", "slerp", "ties"] {
        for p in ["top-10%", "top-15%", "all layers"] {
            for freeze in ["head", "selected", "full"] {
                let row = format!("| {method} {p} / {freeze} |");
                assert!(table.contains(&row), "missing row {row}");
            }
        }
    }
    assert!(table.contains("| lerp top-10% (SNR avg) / selected |"));
    // 1 baseline + 3 methods x 3 top-p x 3 policies + 2 SNR-average merges x 3 policies, for each of 2 seeds.
    let results = std::fs::read_to_string(dir.join("results.jsonl")).unwrap();
    assert_eq!(results.lines().count(), 2 * (1 + 27 + 6));

    // The selective fine-tunes train fewer parameters than the full ones (the freeze policies took effect).
    let lines: Vec<serde_json::Value> = results.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let trainable = |exp: &str| -> f64 {
        lines.iter().find(|l| l["experiment"] == exp).unwrap()["config"]["trainable_params"].as_f64().unwrap()
    };
    assert!(trainable("lerp top-10% / head") < trainable("lerp top-10% / selected"));
    assert!(trainable("lerp top-10% / selected") < trainable("lerp top-10% / full"));

    // Charts: every PNG decodes, has a sensible size and is not one flat colour; every SVG has content.
    let plots = dir.join("report").join("plots");
    let mut pngs = 0;
    for entry in std::fs::read_dir(&plots).unwrap() {
        let p = entry.unwrap().path();
        let bytes = std::fs::read(&p).unwrap();
        match p.extension().and_then(|e| e.to_str()) {
            Some("png") => {
                let img = png::decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                assert!(img.width >= 300 && img.height >= 200, "{}: {}x{}", p.display(), img.width, img.height);
                let first = img.pixel(0, 0).to_vec();
                let distinct = (0..img.height)
                    .step_by(7)
                    .any(|y| (0..img.width).step_by(7).any(|x| img.pixel(x, y) != first.as_slice()));
                assert!(distinct, "{} is blank", p.display());
                pngs += 1;
            }
            Some("svg") => {
                png::check_svg(&String::from_utf8(bytes).unwrap(), 20)
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            }
            _ => {}
        }
    }
    assert!(pngs >= 8, "only {pngs} charts");
    // Every fine-tune of a merge carries that merge's consistency with its experts; the report draws it.
    for l in lines.iter().filter(|l| l["config"]["method"] != "none") {
        let c = l["metrics"]["consistency_merged"].as_f64().unwrap_or_else(|| panic!("no consistency in {l}"));
        assert!((-1.0..=1.0 + 1e-9).contains(&c), "{c}");
    }
    assert!(plots.join("consistency.png").is_file());
    assert!(dir.join("report").join("index.html").exists());

    // Resumability: a rerun finds every step finished and redoes none of them.
    let o = graft(&["demo", "-o", d]);
    assert!(o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!stderr.lines().any(|l| l.starts_with("done ")), "a finished step ran again:\n{stderr}");
    assert!(stderr.contains("skipped seed1/ft-ties-p1-full (already done)"), "{stderr}");
    // Losing one merged checkpoint redoes that merge and the steps that read it, nothing else.
    std::fs::remove_dir_all(dir.join("seed-0").join("merge-ties-p0.1")).unwrap();
    let o = graft(&["demo", "-o", d]);
    assert!(o.status.success());
    let stderr = String::from_utf8_lossy(&o.stderr);
    let redone: Vec<&str> = stderr.lines().filter(|l| l.starts_with("done ")).collect();
    assert_eq!(redone.len(), 5, "{redone:?}"); // the merge, its consistency, its 3 fine-tunes
    assert!(redone.iter().all(|l| l.contains("seed0/") && l.contains("ties-p0.1")), "{redone:?}");
}
