//! `graft report` end to end: a results file built here (a baseline, merge experiments over methods, top-p and freeze
//! policies, several seeds, zero-shot eval lines, interpolation curves) -> tables, CSV/JSON, charts, HTML.

use crate::support::png;
use crate::support::{graft, succeeded};

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

/// A deterministic "noise" in [-1, 1] so the values are irregular but written out by the test.
fn wiggle(i: usize) -> f64 {
    ((i * 7919 % 101) as f64 / 50.0) - 1.0
}

struct Study {
    lines: Vec<Value>,
}

impl Study {
    fn new() -> Study {
        let mut lines = Vec::new();
        let mut k = 0;
        for seed in 0..3 {
            k += 1;
            lines.push(json!({
                "kind": "train", "run_id": format!("base-{seed}"), "experiment": "base + full FT", "seed": seed,
                "config": {"freeze": "full", "lr": 5e-5, "out": format!("runs/base-{seed}")},
                "metrics": {"accuracy": 0.82 + 0.004 * wiggle(k), "f1_weighted": 0.81 + 0.004 * wiggle(k + 1),
                            "time_s": 100.0 + wiggle(k + 2), "peak_memory_bytes": 2.0e9 + 1e7 * wiggle(k + 3),
                            "zero_shot_accuracy": 0.75},
                "baseline": true
            }));
            for method in ["lerp", "ties"] {
                for top_p in [0.1, 0.15, 1.0] {
                    k += 1;
                    let zs = if top_p < 1.0 { 0.76 + 0.003 * wiggle(k) } else { 0.40 + 0.01 * wiggle(k) };
                    lines.push(json!({
                        "kind": "eval", "run_id": format!("{method}-{top_p}-{seed}-zs"),
                        "experiment": format!("{method} top-{}%", (top_p * 100.0) as u32), "seed": seed,
                        "config": {"method": method, "top_p": top_p}, "metrics": {"accuracy": zs, "f1_weighted": zs - 0.01}
                    }));
                    for (freeze, acc, time, mem) in
                        [("head", 0.79, 45.0, 0.3e9), ("selected", 0.81, 80.0, 1.5e9), ("full", 0.818, 100.0, 2.0e9)]
                    {
                        k += 3;
                        lines.push(json!({
                            "kind": "train", "run_id": format!("{method}-{top_p}-{freeze}-{seed}"),
                            "experiment": format!("{method} top-{}% / {freeze}", (top_p * 100.0) as u32), "seed": seed,
                            "config": {"method": method, "top_p": top_p, "freeze": freeze, "out": format!("r/{k}")},
                            "metrics": {"accuracy": acc + 0.004 * wiggle(k), "f1_weighted": acc - 0.003 + 0.004 * wiggle(k + 1),
                                        "time_s": time * (1.0 + 0.1 * top_p) + wiggle(k + 2),
                                        "peak_memory_bytes": mem + 1e7 * wiggle(k + 3), "zero_shot_accuracy": zs},
                            "epochs": [{"epoch": 1, "train_loss": 0.9, "val_accuracy": 0.7}]
                        }));
                    }
                }
            }
            for (pair, height) in [("A-B aligned", 0.05), ("A-B naive", 0.3)] {
                for lambda in [0.0, 0.25, 0.5, 0.75, 1.0] {
                    k += 1;
                    let bump = height * 4.0 * lambda * (1.0 - lambda);
                    lines.push(json!({
                        "kind": "interpolate", "run_id": format!("{pair}-{seed}"), "experiment": pair, "seed": seed,
                        "config": {"lambda": lambda},
                        "metrics": {"loss": 0.5 + 0.1 * lambda + bump + 0.01 * wiggle(k), "accuracy": 0.8 - bump / 2.0}
                    }));
                }
            }
        }
        Study { lines }
    }

    fn write(&self, path: &Path) {
        let text: String = self.lines.iter().map(|l| l.to_string() + "\n").collect();
        std::fs::write(path, text).unwrap();
    }

    /// Values of one metric over the runs of a (kind, experiment), in line order.
    fn values(&self, kind: &str, experiment: &str, metric: &str) -> Vec<f64> {
        self.lines
            .iter()
            .filter(|l| l["kind"] == kind && l["experiment"] == experiment)
            .filter_map(|l| l["metrics"][metric].as_f64())
            .collect()
    }
}

fn setup() -> (tempfile::TempDir, PathBuf, Study) {
    let dir = tempfile::tempdir().unwrap();
    let study = Study::new();
    let results = dir.path().join("results.jsonl");
    study.write(&results);
    (dir, results, study)
}

fn row<'a>(doc: &'a Value, kind: &str, experiment: &str) -> &'a Value {
    let table = doc["tables"].as_array().unwrap().iter().find(|t| t["kind"] == kind).expect("table of kind");
    table["rows"].as_array().unwrap().iter().find(|r| r["experiment"] == experiment).expect("row")
}

#[test]
fn end_to_end_report() {
    let (dir, results, study) = setup();
    let out_dir = dir.path().join("report");
    let stdout = succeeded(&graft(&["report", results.to_str().unwrap(), "-o", out_dir.to_str().unwrap()]), "graft");

    // The markdown table: headers, the baseline, every method and freeze policy, best marks, file locations.
    assert!(stdout.contains("## Fine-tuning runs (train)"), "{stdout}");
    assert!(
        stdout.contains("| experiment | zero-shot accuracy | accuracy | F1 (weighted) | time (s) | peak memory (GB) |")
    );
    assert!(stdout.contains("| base + full FT (baseline) |"));
    for name in ["lerp top-10% / head", "ties top-15% / selected", "ties top-100% / full", "lerp top-100%"] {
        assert!(stdout.contains(&format!("| {name} |")), "{name} missing");
    }
    assert!(stdout.contains("## Interpolation barriers"));
    assert!(stdout.contains("| A-B aligned |"));
    assert!(stdout.contains(&format!("report: {}/index.html", out_dir.display())));

    // A hand check of one row against the input values: n, mean and the cell text.
    let base_acc = study.values("train", "base + full FT", "accuracy");
    let mean: f64 = base_acc.iter().sum::<f64>() / 3.0;
    let sd = (base_acc.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / 2.0).sqrt();
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap()).unwrap();
    let cell = &row(&doc, "train", "base + full FT")["cells"]["accuracy"];
    assert_eq!(cell["n"], 3);
    assert!((cell["mean"].as_f64().unwrap() - mean).abs() < 1e-9);
    // n = 3: the bootstrap SE estimates sd * sqrt((n-1)/n) / sqrt(n); Monte Carlo error ~1%.
    let se = cell["se"].as_f64().unwrap();
    let plug_in = sd * (2.0f64 / 3.0).sqrt() / 3f64.sqrt();
    assert!((se / plug_in - 1.0).abs() < 0.05, "se {se} vs {plug_in}");
    let text = format!("{mean:.3} +- {se:.3} (n=3)");
    assert!(stdout.contains(&text), "{text} not in the table");

    // Best marks: highest accuracy, lowest time, in bold, one column each.
    let train = doc["tables"].as_array().unwrap().iter().find(|t| t["kind"] == "train").unwrap();
    let rows = train["rows"].as_array().unwrap();
    let best_of = |metric: &str, higher: bool| {
        let mut v: Vec<(f64, &str)> = rows
            .iter()
            .map(|r| {
                ((r["cells"][metric]["mean"].as_f64().unwrap() * 1000.0).round(), r["experiment"].as_str().unwrap())
            })
            .collect();
        v.sort_by(|a, b| a.0.total_cmp(&b.0));
        if higher {
            v.last().unwrap().1.to_string()
        } else {
            v[0].1.to_string()
        }
    };
    let best_acc = best_of("accuracy", true);
    assert_eq!(row(&doc, "train", &best_acc)["cells"]["accuracy"]["best"], true);
    let best_time = best_of("time_s", false);
    assert_eq!(row(&doc, "train", &best_time)["cells"]["time_s"]["best"], true);
    assert!(best_time.ends_with("/ head"), "{best_time}");
    let md_row = stdout.lines().find(|l| l.starts_with(&format!("| {best_time} |"))).unwrap();
    assert_eq!(md_row.matches("**").count() % 2, 0);
    assert!(md_row.split('|').nth(5).unwrap().trim().starts_with("**"), "{md_row}");

    // Files.
    for f in ["index.html", "report.md", "summary.csv", "summary.json", "barriers.csv"] {
        assert!(out_dir.join(f).is_file(), "{f} missing");
    }
    let csv = std::fs::read_to_string(out_dir.join("summary.csv")).unwrap();
    assert!(csv.starts_with("kind,experiment,baseline,group,runs,zero_shot_accuracy_mean,"));
    assert_eq!(csv.lines().count(), 1 + 19 + 6);

    // Every chart: a decodable PNG of the planned size that is not blank, and a well-formed SVG.
    let plots = doc["plots"].as_array().unwrap();
    let names: Vec<&str> = plots.iter().map(|p| p["name"].as_str().unwrap()).collect();
    for want in [
        "train_bars_accuracy",
        "train_bars_f1_weighted",
        "train_bars_time_s",
        "train_bars_peak_memory_bytes",
        "train_change_accuracy",
        "train_change_f1_weighted",
        "train_saving_time_s",
        "train_saving_peak_memory_bytes",
        "train_accuracy_vs_top_p",
        "train_accuracy_by_parameter",
        "train_efficiency_accuracy",
        "eval_accuracy_vs_top_p",
        "interpolate_loss",
        "interpolate_accuracy",
    ] {
        assert!(names.contains(&want), "chart {want} missing from {names:?}");
    }
    for p in plots {
        let png_path = out_dir.join(p["png"].as_str().unwrap());
        let bytes = std::fs::read(&png_path).unwrap();
        let (w, h) = png::dimensions(&bytes).unwrap();
        let img = png::decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", png_path.display()));
        assert_eq!((img.width, img.height), (w, h));
        assert!(w >= 1800 && h >= 640, "{}: {w}x{h}", png_path.display());
        let background = img.pixel(0, 0).to_vec();
        assert_eq!(&background[..3], &[255, 255, 255]);
        let mut colours = std::collections::HashSet::new();
        let mut ink = 0usize;
        for y in 0..h {
            for x in 0..w {
                let px = img.pixel(x, y);
                if px != background.as_slice() {
                    ink += 1;
                }
                if colours.len() < 64 {
                    colours.insert(px.to_vec());
                }
            }
        }
        assert!(colours.len() >= 8, "{}: only {} colours", png_path.display(), colours.len());
        assert!(ink as f64 / (w * h) as f64 > 0.01, "{}: nearly blank", png_path.display());

        let svg_path = out_dir.join(p["svg"].as_str().unwrap());
        let svg = std::fs::read_to_string(&svg_path).unwrap();
        let elements = png::check_svg(&svg, 30).unwrap_or_else(|e| panic!("{}: {e}", svg_path.display()));
        assert!(elements >= 30);
        // The PNG at print resolution: twice the SVG's (layout) size, the same picture.
        assert!(w % 2 == 0 && h % 2 == 0, "{w}x{h}");
        assert!(svg.contains(&format!("width=\"{}\"", w / 2)) && svg.contains(&format!("height=\"{}\"", h / 2)));
        let title = p["title"].as_str().unwrap();
        assert!(svg.contains(&title.replace('&', "&amp;")), "{}: no title", svg_path.display());
    }
    check_chart_rules(plots);
    for p in plots {
        let svg = std::fs::read_to_string(out_dir.join(p["svg"].as_str().unwrap())).unwrap();
        check_text_does_not_overlap(&svg, p["name"].as_str().unwrap());
    }
    // Bar charts: groups coloured by method with the method's own Okabe-Ito colour (lerp blue, ties orange), the
    // same colours in the violins (points by method) and the efficiency scatter.
    let bars = std::fs::read_to_string(out_dir.join("plots/train_bars_accuracy.svg")).unwrap();
    assert!(bars.contains("fill=\"#0072B2\"") && bars.contains("fill=\"#E69F00\""), "groups not coloured");
    for chart in ["train_accuracy_by_parameter", "train_efficiency_accuracy"] {
        let svg = std::fs::read_to_string(out_dir.join(format!("plots/{chart}.svg"))).unwrap();
        assert!(svg.contains("#0072B2") && svg.contains("#E69F00"), "{chart}: methods change colour between charts");
    }
    assert!(bars.contains("baseline (base + full FT)"));

    // index.html: every table and chart, nothing from a network, every referenced file present.
    let html = std::fs::read_to_string(out_dir.join("index.html")).unwrap();
    assert!(!html.contains("http:") && !html.contains("https:") && !html.contains("src=\"//"));
    assert!(!html.contains("<script") && !html.contains("<link"));
    assert!(html.contains("<td>base + full FT (baseline)</td>"));
    assert!(html.contains("class=\"best\""));
    let mut refs = 0;
    for attr in ["src=\"", "href=\""] {
        for part in html.split(attr).skip(1) {
            let target = &part[..part.find('"').unwrap()];
            assert!(out_dir.join(target).is_file(), "index.html refers to missing {target}");
            refs += 1;
        }
    }
    assert_eq!(refs, 2 * plots.len());
    browser_check(&out_dir);
}

/// The chart rules: legend entries distinct and in words (no `key=-` placeholder), at most 8 series per line panel
/// (plus the endpoints' chord on interpolation charts).
fn check_chart_rules(plots: &[Value]) {
    for p in plots {
        let name = p["name"].as_str().unwrap();
        let legend: Vec<&str> = p["legend"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
        let mut distinct = legend.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), legend.len(), "{name}: repeated legend entries {legend:?}");
        for label in &legend {
            assert!(!label.contains("=-") && label.trim() != "-" && !label.contains('='), "{name}: label {label:?}");
        }
        assert!(legend.len() <= 9, "{name}: {} legend entries", legend.len());
    }
}

/// No two texts of a chart overlap: every horizontal `<text>` of the SVG gets its box from its anchor (x, y,
/// text-anchor, the vertical offset plotters writes as dy) and its width measured with the chart font, and no two
/// boxes may intersect by more than a pixel. (Rotated axis titles are left out: they sit alone beside the axis.)
fn check_text_does_not_overlap(svg: &str, name: &str) {
    graft::report::render::ensure_font().unwrap();
    let mut boxes: Vec<([f64; 4], String)> = Vec::new();
    for part in svg.split("<text ").skip(1) {
        let head = &part[..part.find('>').unwrap()];
        if head.contains("rotate(") {
            continue;
        }
        let attr = |key: &str| -> Option<&str> {
            let at = head
                .find(&format!(" {key}=\""))
                .map(|i| i + 1)
                .or_else(|| head.starts_with(&format!("{key}=\"")).then_some(0))?;
            let rest = &head[at + key.len() + 2..];
            Some(&rest[..rest.find('"').unwrap()])
        };
        let num = |key: &str| attr(key).unwrap().parse::<f64>().unwrap();
        let text = part[part.find('>').unwrap() + 1..part.find("</text>").unwrap()].trim().to_string();
        if text.is_empty() {
            continue;
        }
        // plotters writes font-size as the requested size / 1.24.
        let size = (num("font-size") * 1.24).round();
        let w = graft::report::render::text_width(
            &text.replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">"),
            size as u32,
        ) as f64;
        let (x, y) = (num("x"), num("y"));
        let x0 = match attr("text-anchor") {
            Some("middle") => x - w / 2.0,
            Some("end") => x - w,
            _ => x,
        };
        let y0 = match attr("dy") {
            Some("0.76em") => y,
            Some("0.5ex") => y - size / 2.0,
            Some("-0.5ex") => y - size,
            _ => y - 0.76 * size,
        };
        boxes.push(([x0 + 1.0, y0 + 1.0, x0 + w - 1.0, y0 + size - 1.0], text));
    }
    assert!(boxes.len() >= 5, "{name}: {} texts", boxes.len());
    for i in 0..boxes.len() {
        for j in 0..i {
            let (a, b) = (&boxes[i].0, &boxes[j].0);
            let overlap = a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3];
            assert!(!overlap, "{name}: text {:?} at {a:?} overlaps {:?} at {b:?}", boxes[i].1, boxes[j].1);
        }
    }
}

/// Writes `lines` as DIR/results.jsonl, reports them into DIR/report (50 resamples) and returns that directory and
/// its summary.json, whose charts have passed the chart rules.
fn report_of(dir: &Path, lines: &[Value]) -> (PathBuf, Value) {
    let results = dir.join("results.jsonl");
    std::fs::write(&results, lines.iter().map(|l| l.to_string() + "\n").collect::<String>()).unwrap();
    let out_dir = dir.join("report");
    succeeded(
        &graft(&["report", results.to_str().unwrap(), "-o", out_dir.to_str().unwrap(), "--resamples", "50"]),
        "graft",
    );
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap()).unwrap();
    check_chart_rules(doc["plots"].as_array().unwrap());
    (out_dir, doc)
}

/// Opens the page in headless Chromium with tools/check-report-page when Chromium is installed (CI installs it).
fn browser_check(report: &Path) {
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/check-report-page");
    let shot = report.join("screenshot.png");
    let out = Command::new(&tool).arg(report).arg(&shot).output().expect("tools/check-report-page runs");
    match out.status.code() {
        Some(3) => eprintln!("skipping the browser check of the report page: no Chromium installed"),
        Some(0) => assert!(std::fs::metadata(&shot).unwrap().len() > 10_000, "blank screenshot"),
        _ => panic!("report page check failed: {}", String::from_utf8_lossy(&out.stderr)),
    }
}

/// More series than a panel holds: four methods x three freeze policies against top-p are drawn one panel per
/// method, each with its freeze policies in words.
#[test]
fn crowded_line_charts_are_faceted_by_method() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = Vec::new();
    let mut k = 0;
    for method in ["lerp", "ties", "slerp", "task_arithmetic"] {
        for top_p in [0.1, 0.5, 1.0] {
            for freeze in ["head", "selected", "full"] {
                k += 1;
                lines.push(json!({
                    "kind": "train", "run_id": format!("{method}-{top_p}-{freeze}"),
                    "experiment": format!("{method} top-{}% / {freeze}", (top_p * 100.0) as u32), "seed": 0,
                    "config": {"method": method, "top_p": top_p, "freeze": freeze},
                    "metrics": {"accuracy": 0.8 + 0.01 * wiggle(k)}
                }));
            }
        }
    }
    let (_, doc) = report_of(dir.path(), &lines);
    let plots = doc["plots"].as_array().unwrap();
    let facets: Vec<&Value> =
        plots.iter().filter(|p| p["name"].as_str().unwrap().starts_with("accuracy_vs_top_p")).collect();
    assert_eq!(facets.len(), 4, "{facets:?}");
    for method in ["lerp", "ties", "slerp", "task_arithmetic"] {
        let p = facets.iter().find(|p| p["title"].as_str().unwrap().ends_with(&format!("({method})"))).unwrap();
        let legend: Vec<&str> = p["legend"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
        assert_eq!(legend, ["freeze head", "freeze selected", "freeze full"].map(|f| format!("{method}, {f}")));
    }
}

/// An LLM study's results (perplexity and gain kept per domain, the base as the baseline, two seeds): a grouped bar
/// chart of perplexity per domain with a bar per model and a chart of the gain kept per merge with a bar per domain,
/// drawn (not blank, both domains' colours, the reference line), their legends in words, the page loading.
#[test]
fn llm_study_gets_perplexity_and_gain_kept_charts_per_domain() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = vec![json!({
        "kind": "eval", "run_id": "seed0/base", "experiment": "base", "seed": 0, "baseline": true,
        "config": {"model": "base"}, "metrics": {"perplexity_spam": 30.0, "perplexity_reviews": 60.0}
    })];
    let mut k = 0;
    for seed in 0..2 {
        for (id, label, ppl_spam, ppl_reviews) in
            [("expert-a", "expert on spam", 15.0, 66.0), ("expert-b", "expert on reviews", 34.0, 25.0)]
        {
            k += 1;
            lines.push(json!({
                "kind": "eval", "run_id": format!("seed{seed}/{id}"), "experiment": label, "seed": seed,
                "config": {"model": id},
                "metrics": {"perplexity_spam": ppl_spam + wiggle(k), "perplexity_reviews": ppl_reviews + wiggle(k + 1)}
            }));
        }
        for method in ["linear", "task_arithmetic", "ties"] {
            for top_p in [0.25, 1.0] {
                k += 1;
                lines.push(json!({
                    "kind": "eval", "run_id": format!("seed{seed}/{method}-{top_p}"),
                    "experiment": format!("{method} top-{}%", (top_p * 100.0) as u32), "seed": seed,
                    "config": {"model": format!("{method}-{top_p}"), "method": method, "top_p": top_p},
                    "metrics": {"perplexity_spam": 20.0 + 2.0 * wiggle(k), "perplexity_reviews": 40.0 + wiggle(k),
                                "gain_kept_spam": 0.6 + 0.2 * wiggle(k), "gain_kept_reviews": 0.5 + 0.3 * wiggle(k + 3)}
                }));
            }
        }
    }
    let (out_dir, doc) = report_of(dir.path(), &lines);
    let plots = doc["plots"].as_array().unwrap();
    let plot = |name: &str| plots.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no chart {name}"));
    let legend = |name: &str| -> Vec<String> {
        plot(name)["legend"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_string()).collect()
    };
    // Eight models besides the base: one panel, each in its own colour, the base as the reference.
    let ppl = legend("perplexity_per_domain");
    assert_eq!(ppl.len(), 9, "{ppl:?}");
    assert_eq!(ppl[0], "expert on spam");
    assert!(ppl[8].starts_with("base "), "{ppl:?}");
    assert_eq!(legend("gain_kept_per_merge"), ["on reviews", "on spam", "1: the expert's own gain on its domain"]);
    for name in ["perplexity_per_domain", "gain_kept_per_merge"] {
        let png_path = out_dir.join(plot(name)["png"].as_str().unwrap());
        let img = png::decode(&std::fs::read(&png_path).unwrap()).unwrap();
        let background = img.pixel(0, 0).to_vec();
        let mut ink = 0usize;
        let mut colours = std::collections::HashSet::new();
        for y in 0..img.height {
            for x in 0..img.width {
                let px = img.pixel(x, y);
                if px != background.as_slice() {
                    ink += 1;
                }
                colours.insert(px.to_vec());
            }
        }
        assert!(ink as f64 / (img.width * img.height) as f64 > 0.02, "{name}: nearly blank");
        assert!(colours.len() >= 8, "{name}: {} colours", colours.len());
        let svg = std::fs::read_to_string(out_dir.join(plot(name)["svg"].as_str().unwrap())).unwrap();
        // The first two series' Okabe-Ito colours, and every category named under the axis.
        assert!(svg.contains("fill=\"#0072B2\"") && svg.contains("fill=\"#E69F00\""), "{name}: bars not coloured");
        let categories: &[&str] =
            if name == "perplexity_per_domain" { &["spam", "reviews"] } else { &["linear top-25%", "ties top-100%"] };
        for c in categories {
            assert!(svg.lines().any(|l| l.trim() == *c), "{name}: no category {c}");
        }
    }
    browser_check(&out_dir);
}

#[test]
fn reports_are_deterministic_and_replace_earlier_reports() {
    let (dir, results, _) = setup();
    let r = results.to_str().unwrap();
    let a = dir.path().join("a");
    let b = dir.path().join("b");
    succeeded(&graft(&["--threads", "1", "report", r, "-o", a.to_str().unwrap(), "--resamples", "2000"]), "graft");
    succeeded(&graft(&["--threads", "2", "report", r, "-o", b.to_str().unwrap(), "--resamples", "2000"]), "graft");
    let files = |d: &Path| {
        let mut v: Vec<PathBuf> = Vec::new();
        for sub in [d.to_path_buf(), d.join("plots")] {
            for e in std::fs::read_dir(&sub).unwrap() {
                let p = e.unwrap().path();
                if p.is_file() {
                    v.push(p.strip_prefix(d).unwrap().to_path_buf());
                }
            }
        }
        v.sort();
        v
    };
    assert_eq!(files(&a), files(&b));
    for f in files(&a) {
        assert!(std::fs::read(a.join(&f)).unwrap() == std::fs::read(b.join(&f)).unwrap(), "{} differs", f.display());
    }

    // Another seed moves the standard errors, never the means (balanced bootstrap).
    let c = dir.path().join("c");
    succeeded(&graft(&["report", r, "-o", c.to_str().unwrap(), "--resamples", "2000", "--seed", "7"]), "graft");
    let doc = |d: &Path| -> Value {
        serde_json::from_str(&std::fs::read_to_string(d.join("summary.json")).unwrap()).unwrap()
    };
    let (da, dc) = (doc(&a), doc(&c));
    let (ca, cc) =
        (&row(&da, "train", "lerp top-10% / head")["cells"], &row(&dc, "train", "lerp top-10% / head")["cells"]);
    assert!((ca["accuracy"]["mean"].as_f64().unwrap() - cc["accuracy"]["mean"].as_f64().unwrap()).abs() < 1e-12);
    assert_ne!(ca["accuracy"]["se"], cc["accuracy"]["se"]);

    // Rerunning into an existing report replaces it whole (a stray old chart does not survive).
    std::fs::write(a.join("plots/stale.png"), b"old").unwrap();
    succeeded(&graft(&["report", r, "-o", a.to_str().unwrap(), "--resamples", "2000"]), "graft");
    assert!(!a.join("plots/stale.png").exists());
    assert!(a.join("index.html").is_file());

    // A directory that is not a report is refused and left alone.
    let other = dir.path().join("notes");
    std::fs::create_dir(&other).unwrap();
    std::fs::write(other.join("keep.txt"), b"mine").unwrap();
    let out = graft(&["report", r, "-o", other.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a graft report"));
    assert_eq!(std::fs::read(other.join("keep.txt")).unwrap(), b"mine");
    assert_eq!(std::fs::read_dir(&other).unwrap().count(), 1);
    // No staging directories are left behind.
    let leftovers: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn bad_lines_are_file_line_errors_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let good = r#"{"kind":"train","run_id":"a","experiment":"e","seed":0,"config":{},"metrics":{"accuracy":0.5}}"#;
    let cases = [
        ("{not json", "not valid JSON"),
        ("42", "expected a JSON object, found the number 42"),
        (r#"{"kind":"train","run_id":"b","seed":0,"config":{},"metrics":{}}"#, "missing field 'experiment'"),
        (&good.replace("0.5", "50"), "metrics.accuracy = 50 is outside [0, 1]"),
        (&good.replace(r#""config":{}"#, r#""config":[]"#), "field 'config' must be an object, found an array"),
    ];
    for (i, (bad, want)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("r{i}.jsonl"));
        std::fs::write(&path, format!("{good}\n\n{bad}\n{good}\n")).unwrap();
        let out_dir = dir.path().join(format!("out{i}"));
        let out = graft(&["report", path.to_str().unwrap(), "-o", out_dir.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&out.stderr);
        let prefix = format!("{}:3: ", path.display());
        assert!(stderr.contains(&prefix) && stderr.contains(want), "{stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
        assert!(!out_dir.exists());
    }
    let missing = graft(&["report", dir.path().join("nope.jsonl").to_str().unwrap(), "-o", "x"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("nope.jsonl"));
}

#[test]
fn json_output_and_superseded_lines() {
    let (dir, results, study) = setup();
    // A second file re-records one run (a rerun of the same configuration): the later line wins.
    let rerun = dir.path().join("rerun.jsonl");
    let mut line = study.lines.iter().find(|l| l["run_id"] == "lerp-0.1-head-0").unwrap().clone();
    line["metrics"]["accuracy"] = json!(0.5);
    std::fs::write(&rerun, line.to_string() + "\n").unwrap();
    let out_dir = dir.path().join("r");
    let out = graft(&[
        "report",
        results.to_str().unwrap(),
        rerun.to_str().unwrap(),
        "-o",
        out_dir.to_str().unwrap(),
        "--json",
        "--resamples",
        "1000",
    ]);
    let doc: Value = serde_json::from_str(&succeeded(&out, "graft")).unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(&format!("{}:1 (same run)", rerun.display())), "{stderr}");
    assert_eq!(doc["generator"], "graft report");
    assert_eq!(doc["dir"], out_dir.display().to_string());
    assert_eq!(doc["superseded"], 1);
    assert_eq!(doc["resamples"], 1000);
    let values = row(&doc, "train", "lerp top-10% / head")["cells"]["accuracy"]["values"].clone();
    let mut want = study.values("train", "lerp top-10% / head", "accuracy");
    want[0] = 0.5;
    assert_eq!(values, json!(want));
    // Barriers: the naive pair has the higher loss barrier (0.3 bump vs 0.05), and the aligned one is marked best.
    let curves = doc["curves"].as_array().unwrap();
    let barrier =
        |e: &str| curves.iter().find(|c| c["experiment"] == e && c["metric"] == "loss").unwrap()["barrier"].clone();
    let (aligned, naive) = (barrier("A-B aligned"), barrier("A-B naive"));
    assert!((aligned["mean"].as_f64().unwrap() - 0.05).abs() < 0.02, "{aligned}");
    assert!((naive["mean"].as_f64().unwrap() - 0.3).abs() < 0.02, "{naive}");
    assert_eq!(aligned["best"], true);
    assert_eq!(naive["best"], false);
}

/// The efficiency scatter's Pareto fronts (accuracy against training time, against peak memory) equal fronts found
/// here by brute force from the results file's own numbers: an experiment is on the front when no other experiment
/// has cost <= and accuracy >= with one strict. Legend entries distinct; the chart has ink.
#[test]
fn efficiency_scatter_front_matches_brute_force() {
    let (dir, results, study) = setup();
    let out_dir = dir.path().join("report");
    succeeded(&graft(&["report", results.to_str().unwrap(), "-o", out_dir.to_str().unwrap(), "--json"]), "graft");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap()).unwrap();
    let plot =
        doc["plots"].as_array().unwrap().iter().find(|p| p["name"] == "train_efficiency_accuracy").expect("chart");
    let mut experiments: Vec<String> = Vec::new();
    for l in &study.lines {
        let e = l["experiment"].as_str().unwrap().to_string();
        if l["kind"] == "train" && !experiments.contains(&e) {
            experiments.push(e);
        }
    }
    let mean = |v: Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
    let fronts = plot["pareto_front"].as_array().unwrap();
    assert_eq!(fronts.len(), 2);
    for (front, cost) in fronts.iter().zip(["time_s", "peak_memory_bytes"]) {
        let pts: Vec<(f64, f64)> = experiments
            .iter()
            .map(|e| (mean(study.values("train", e, cost)), mean(study.values("train", e, "accuracy"))))
            .collect();
        let mut want: Vec<&str> = experiments
            .iter()
            .enumerate()
            .filter(|&(i, _)| {
                !pts.iter()
                    .enumerate()
                    .any(|(j, q)| j != i && q.0 <= pts[i].0 && q.1 >= pts[i].1 && (q.0 < pts[i].0 || q.1 > pts[i].1))
            })
            .map(|(_, e)| e.as_str())
            .collect();
        let mut got: Vec<&str> = front["experiments"].as_array().unwrap().iter().map(|e| e.as_str().unwrap()).collect();
        assert!(!got.is_empty());
        // By increasing cost.
        let cost_of = |e: &str| pts[experiments.iter().position(|x| x == e).unwrap()].0;
        assert!(got.windows(2).all(|w| cost_of(w[0]) <= cost_of(w[1])), "{cost}: {got:?}");
        want.sort();
        got.sort();
        assert_eq!(got, want, "{cost}");
    }
    let legend: Vec<&str> = plot["legend"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
    for want in ["lerp", "ties", "head only", "SNR-selected layers", "full fine-tuning", "baseline (base + full FT)"] {
        assert!(legend.contains(&want), "{want} not in {legend:?}");
    }
    check_chart_rules(std::slice::from_ref(plot));
    let img = png::decode(&std::fs::read(out_dir.join("plots/train_efficiency_accuracy.png")).unwrap()).unwrap();
    let ink = (0..img.height)
        .flat_map(|y| (0..img.width).map(move |x| (x, y)))
        .filter(|&(x, y)| img.pixel(x, y)[..3] != [255, 255, 255])
        .count();
    assert!(ink as f64 / (img.width * img.height) as f64 > 0.01, "nearly blank");
}

/// A study directory with SNR scans (`seed-N/snr-*.json`, as graft's studies keep them) gets the SNR picture on its
/// page: one heatmap row per scan, with a caption naming the scans; the page passes the browser check.
#[test]
fn study_snr_scans_are_on_the_page() {
    let (dir, results, _) = setup();
    let fixture = |p: &str| Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(p).display().to_string();
    for (seed, model) in [("seed-0", "mlp/base"), ("seed-0", "mlp/ft_a"), ("seed-1", "mlp/ft_b")] {
        let out = graft(&["snr", &fixture(model), "--json"]);
        let sub = dir.path().join(seed);
        std::fs::create_dir_all(&sub).unwrap();
        let name = model.rsplit('/').next().unwrap();
        std::fs::write(sub.join(format!("snr-{name}.json")), succeeded(&out, "graft")).unwrap();
    }
    let out_dir = dir.path().join("report");
    succeeded(&graft(&["report", results.to_str().unwrap(), "-o", out_dir.to_str().unwrap()]), "graft");
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap()).unwrap();
    let plot = doc["plots"].as_array().unwrap().iter().find(|p| p["name"] == "snr_heatmap").expect("SNR figure");
    assert_eq!(plot["section"], "snr");
    let svg = std::fs::read_to_string(out_dir.join("plots/snr_heatmap.svg")).unwrap();
    // The models are named by their paths as the scans record them (fixtures: their directory names).
    for name in ["base", "ft_a", "ft_b"] {
        assert!(svg.contains(&format!(">\n{name}\n</text>")), "no row {name}");
    }
    let img = png::decode(&std::fs::read(out_dir.join("plots/snr_heatmap.png")).unwrap()).unwrap();
    let ink = (0..img.height)
        .flat_map(|y| (0..img.width).map(move |x| (x, y)))
        .filter(|&(x, y)| img.pixel(x, y)[..3] != [255, 255, 255])
        .count();
    assert!(ink as f64 / (img.width * img.height) as f64 > 0.05, "nearly blank");
    let html = std::fs::read_to_string(out_dir.join("index.html")).unwrap();
    assert!(html.contains("<h2>SNR of the study&#39;s models</h2>"), "no SNR section");
    assert!(html.contains("src=\"plots/snr_heatmap.png\"") && html.contains("snr-ft_b.json"));
    browser_check(&out_dir);
}
