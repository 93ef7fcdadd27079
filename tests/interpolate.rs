//! `graft interpolate --eval-data`: every point of the path between two trained models is evaluated; the end points
//! must score exactly what `graft eval` gives the two models, and the results lines feed `graft report`.

use crate::support::graft;

use std::path::Path;

const DIGITS: &str = concat!("idx:", env!("CARGO_MANIFEST_DIR"), "/fixtures/data/digits");

fn train(out: &Path, seed: &str) {
    let o = out.to_str().unwrap();
    graft(&[
        "train", "--arch", "mlp", "--hidden", "32", "--data", DIGITS, "--epochs", "2", "--seed", seed, "-o", o,
        "--quiet",
    ]);
}

#[test]
fn evaluated_path_ends_match_graft_eval_and_feed_the_report() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    train(&a, "1");
    train(&b, "2");
    let dir = tmp.path().join("path");
    let results = tmp.path().join("r.jsonl");
    let o = graft(&[
        "interpolate",
        a.to_str().unwrap(),
        b.to_str().unwrap(),
        "--steps",
        "5",
        "-o",
        dir.to_str().unwrap(),
        "--eval-data",
        DIGITS,
        "--results",
        results.to_str().unwrap(),
        "--json",
    ]);
    let manifest: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let points = manifest["points"].as_array().unwrap();
    assert_eq!(points.len(), 5);
    let eval = |ck: &Path| -> serde_json::Value {
        serde_json::from_slice(&graft(&["eval", ck.to_str().unwrap(), "--data", DIGITS, "--json"]).stdout).unwrap()
    };
    let (ea, eb) = (eval(&a), eval(&b));
    assert_eq!(points[0]["metrics"]["accuracy"], ea["accuracy"]);
    assert_eq!(points[0]["metrics"]["loss"], ea["loss"]);
    assert_eq!(points[4]["metrics"]["accuracy"], eb["accuracy"]);
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&results).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let lambdas: Vec<f64> = lines.iter().map(|l| l["config"]["lambda"].as_f64().unwrap()).collect();
    assert_eq!(lambdas, vec![0.0, 0.25, 0.5, 0.75, 1.0]);
    assert!(lines.iter().all(|l| l["kind"] == "interpolate"));
    // The report turns them into a barrier table and a curve.
    let report = tmp.path().join("report");
    graft(&["report", results.to_str().unwrap(), "-o", report.to_str().unwrap(), "--resamples", "200"]);
    assert!(std::fs::read_to_string(report.join("barriers.csv")).unwrap().lines().count() >= 2);
}
