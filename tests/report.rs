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
        "train_bars_time_s",
        "train_bars_peak_memory_bytes",
        "train_change_accuracy",
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
    // F1 tells the story accuracy tells: the tables keep it, no chart of its own.
    assert!(names.iter().all(|n| !n.contains("f1_")), "{names:?}");
    // Every chart says what it shows, on the page too.
    let page = std::fs::read_to_string(out_dir.join("index.html")).unwrap();
    for p in plots {
        let caption = p["caption"].as_str().unwrap();
        assert!(caption.len() > 60, "{}: caption {caption:?}", p["name"]);
        let escaped = caption.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('\'', "&#39;");
        assert!(page.contains(&escaped), "{}: caption not on the page", p["name"]);
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
    let fixture = |p: &str| crate::support::fixture(p).display().to_string();
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

/// Ink share of a PNG: the pixels that are not white.
fn ink(path: &Path) -> f64 {
    let img = png::decode(&std::fs::read(path).unwrap()).unwrap();
    let ink = (0..img.height)
        .flat_map(|y| (0..img.width).map(move |x| (x, y)))
        .filter(|&(x, y)| img.pixel(x, y)[..3] != [255, 255, 255])
        .count();
    ink as f64 / (img.width * img.height) as f64
}

fn plot<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["plots"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no chart {name}"))
}

fn legend(plot: &Value) -> Vec<String> {
    plot["legend"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_string()).collect()
}

/// A study's consistency numbers as `graft experiment` writes them (each fine-tuning line of a merge carries its
/// merge's numbers; the selected-layers runs name a selection file per seed) and interpolation paths as `graft
/// interpolate --results` writes them (named by their end models, `a` in the config): grouped consistency bars per
/// top-p with a bar per method and variant and the all-tensors value as a tick; barrier curves with the path before
/// alignment told apart and each barrier's height, checked against the height built into the data; the freeze
/// policy carried in words by the summary.
#[test]
fn consistency_bars_and_barrier_curves() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = Vec::new();
    for seed in 0..3usize {
        lines.push(json!({
            "kind": "train", "run_id": format!("base-{seed}"), "experiment": "base / full", "seed": seed,
            "config": {"freeze": "none", "method": "none"}, "metrics": {"accuracy": 0.95}, "baseline": true
        }));
        for (method, snr_from) in [("lerp", "base"), ("lerp", "avg"), ("ties", "base")] {
            for top_p in [0.1, 1.0] {
                if snr_from == "avg" && top_p == 1.0 {
                    continue;
                }
                let merged = if method == "lerp" { 1.0 } else { 0.70 + 0.01 * seed as f64 + 0.02 * top_p };
                let all = merged - 0.2;
                for freeze in ["all-but-head".to_string(), format!("selected:runs/seed-{seed}/merge-{method}-p{top_p}")]
                {
                    let policy = if freeze.starts_with("selected") { "selected" } else { "head" };
                    let variant = if snr_from == "avg" { " (SNR avg)" } else { "" };
                    lines.push(json!({
                        "kind": "train", "run_id": format!("{method}-{snr_from}-{top_p}-{policy}-{seed}"),
                        "experiment": format!("{method} top-{}%{variant} / {policy}", top_p * 100.0), "seed": seed,
                        "config": {"method": method, "top_p": top_p, "snr_from": snr_from, "aligned": "true",
                                   "freeze": freeze},
                        "metrics": {"accuracy": 0.9 + 0.01 * wiggle(seed + lines.len()),
                                    "consistency_merged": merged, "consistency_all": all}
                    }));
                }
            }
        }
        // Loss along two paths from one start: a bump of height h (times 1 + seed / 10) over a straight rise.
        for (b, h) in [("s1/base", 0.4), ("s1/aligned-b", 0.05)] {
            for i in 0..=4 {
                let lambda = i as f64 / 4.0;
                let bump = h * (1.0 + seed as f64 / 10.0) * 4.0 * lambda * (1.0 - lambda);
                lines.push(json!({
                    "kind": "interpolate", "run_id": format!("{b}-{seed}-{i}"),
                    "experiment": format!("interpolate s0/base -> {b}"), "seed": seed,
                    "config": {"a": "s0/base", "b": b, "lambda": lambda},
                    "metrics": {"loss": 0.3 + 0.1 * lambda + bump}
                }));
            }
        }
    }
    let (out_dir, doc) = report_of(dir.path(), &lines);

    let consistency = plot(&doc, "consistency");
    assert_eq!(consistency["section"], "consistency");
    assert_eq!(legend(consistency), ["lerp", "lerp, SNR avg", "ties", "over all tensors", "1: fully consistent"]);
    assert!(ink(&out_dir.join("plots/consistency.png")) > 0.05, "consistency chart nearly blank");
    let svg = std::fs::read_to_string(out_dir.join("plots/consistency.svg")).unwrap();
    assert!(svg.contains("#0072B2") && svg.contains("#E69F00"), "methods not in their colours");
    assert!(svg.contains(">\ntop-10%\n</text>") && svg.contains(">\nall layers\n</text>"), "top-p groups");
    // ties at top-10%: 0.702, 0.712, 0.722 over the seeds, mean 0.712 as the bar's label.
    assert!(svg.contains(">\n0.712\n</text>"), "ties top-10% bar label");

    // Each seed names its own selection file: the summary carries the policy in words.
    let r = row(&doc, "train", "lerp top-10% / selected");
    assert_eq!(r["params"]["freeze"], "selected");
    assert_eq!(row(&doc, "train", "ties top-100% / head")["params"]["freeze"], "head");
    assert_eq!(row(&doc, "train", "base / full")["params"]["freeze"], "full");

    let barrier = plot(&doc, "interpolate_loss");
    let entries = legend(barrier);
    let height = |b: &str| -> f64 {
        let e = entries.iter().find(|e| e.starts_with(&format!("interpolate s0/base -> {b}"))).unwrap();
        e.split("barrier ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap()
    };
    // The mean of h, 1.1 h, 1.2 h: 1.1 h, printed to 3 significant digits.
    assert!((height("s1/base") - 0.44).abs() < 0.001, "{entries:?}");
    assert!((height("s1/aligned-b") - 0.055).abs() < 0.0005, "{entries:?}");
    assert!(entries[0].contains("(before alignment)") && !entries[1].contains("before"), "{entries:?}");
    assert!(entries.iter().any(|e| e.starts_with("barrier:")), "{entries:?}");
    assert!(ink(&out_dir.join("plots/interpolate_loss.png")) > 0.02, "barrier chart nearly blank");
    // One pair, one colour (the first of the palette) before and after alignment; line styles: see render's tests.
    let svg = std::fs::read_to_string(out_dir.join("plots/interpolate_loss.svg")).unwrap();
    assert!(svg.contains("#0072B2") && !svg.contains("#E69F00"), "the pair changes colour");
    for p in doc["plots"].as_array().unwrap() {
        let svg = std::fs::read_to_string(out_dir.join(p["svg"].as_str().unwrap())).unwrap();
        check_text_does_not_overlap(&svg, p["name"].as_str().unwrap());
    }
}

/// `--dpi` sets the PNG's pixels per layout pixel (1, 2 or 3) and leaves the SVG as it is, for `graft report` and
/// `graft snr --plot`; other values are usage errors.
#[test]
fn dpi_scales_the_png_and_not_the_svg() {
    let dir = tempfile::tempdir().unwrap();
    let lines: Vec<Value> = (0..4)
        .map(|i| {
            json!({"kind": "train", "run_id": format!("r{i}"), "experiment": format!("lerp {i}"), "seed": 0,
                   "config": {"method": "lerp"}, "metrics": {"accuracy": 0.8 + 0.01 * i as f64}})
        })
        .collect();
    let results = dir.path().join("results.jsonl");
    std::fs::write(&results, lines.iter().map(|l| l.to_string() + "\n").collect::<String>()).unwrap();
    let mut svgs = Vec::new();
    for scale in [1u32, 3] {
        let out = dir.path().join(format!("report{scale}"));
        succeeded(
            &graft(&["report", results.to_str().unwrap(), "-o", out.to_str().unwrap(), "--dpi", &scale.to_string()]),
            "graft",
        );
        let svg = std::fs::read_to_string(out.join("plots/bars_accuracy.svg")).unwrap();
        let (w, h) = png::dimensions(&std::fs::read(out.join("plots/bars_accuracy.png")).unwrap()).unwrap();
        assert!(
            svg.contains(&format!("width=\"{}\"", w / scale)) && svg.contains(&format!("height=\"{}\"", h / scale))
        );
        assert_eq!((w % scale, h % scale), (0, 0));
        svgs.push(svg);
    }
    assert_eq!(svgs[0], svgs[1], "the SVG depends on --dpi");
    let bad =
        graft(&["report", results.to_str().unwrap(), "-o", dir.path().join("bad").to_str().unwrap(), "--dpi", "4"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--dpi"));
    assert!(!dir.path().join("bad").exists());

    let model = crate::support::fixture("mlp/base");
    let plots = dir.path().join("snr");
    succeeded(&graft(&["snr", model.to_str().unwrap(), "--plot", plots.to_str().unwrap(), "--dpi", "1"]), "graft");
    let svg = std::fs::read_to_string(plots.join("heatmap.svg")).unwrap();
    let (w, h) = png::dimensions(&std::fs::read(plots.join("heatmap.png")).unwrap()).unwrap();
    assert!(svg.contains(&format!("width=\"{w}\"")) && svg.contains(&format!("height=\"{h}\"")), "{w}x{h}");
}

/// A crowded efficiency scatter: thirty experiments at nearly one cost and accuracy. Names that find no free spot
/// beside their point become numbers listed in the key; no two texts overlap; every experiment is named somewhere.
#[test]
fn crowded_scatter_numbers_labels_without_overlap() {
    let dir = tempfile::tempdir().unwrap();
    let mut lines = vec![json!({
        "kind": "train", "run_id": "base", "experiment": "base / full", "seed": 0, "baseline": true,
        "config": {"freeze": "none"}, "metrics": {"accuracy": 0.8, "time_s": 100.0, "peak_memory_bytes": 1.0e9}
    })];
    let mut names = Vec::new();
    for i in 0..30usize {
        let method = ["lerp", "ties", "slerp"][i % 3];
        let freeze = ["head", "selected", "none"][i / 3 % 3];
        let name = format!("{method} variant {i} / {}", ["head", "selected", "full"][i / 3 % 3]);
        lines.push(json!({
            "kind": "train", "run_id": format!("r{i}"), "experiment": name, "seed": 0,
            "config": {"method": method, "freeze": freeze},
            "metrics": {"accuracy": 0.8 + 0.002 * wiggle(i), "time_s": 100.0 + 0.5 * wiggle(i + 1),
                        "peak_memory_bytes": 1.0e9 + 1.0e6 * wiggle(i + 2)}
        }));
        names.push(name);
    }
    let (out_dir, _) = report_of(dir.path(), &lines);
    let svg = std::fs::read_to_string(out_dir.join("plots/efficiency_accuracy.svg")).unwrap();
    check_text_does_not_overlap(&svg, "efficiency_accuracy");
    assert!(svg.contains(">\n1\n</text>"), "no numbered label: the crowded case was not exercised");
    for name in &names {
        assert!(svg.contains(&format!(">\n{name}\n</text>")), "{name} is named nowhere");
    }
    assert!(ink(&out_dir.join("plots/efficiency_accuracy.png")) > 0.02);
}
