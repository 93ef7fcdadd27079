//! `graft snr` end to end on the fixtures and on small checkpoints written here with known answers.

use crate::support::png;
use crate::support::{graft, ok};

use std::path::{Path, PathBuf};

use graft::checkpoint::{CheckpointWriter, Dtype, TensorDecl, WriterOptions};
use serde_json::Value;

fn fixture(p: &str) -> String {
    crate::support::fixture(p).display().to_string()
}

fn json(args: &[&str]) -> Value {
    serde_json::from_str(&ok(args)).expect("JSON document")
}

/// A checkpoint of F32 tensors with known answers.
fn write_checkpoint(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
    let decls = tensors.iter().map(|(n, s, _)| TensorDecl::new(*n, Dtype::F32, s.clone())).collect();
    let mut w = CheckpointWriter::create(path, decls, WriterOptions::default()).unwrap();
    for (n, _, v) in tensors {
        w.write_f32(n, v).unwrap();
    }
    w.finish().unwrap();
}

fn diag(rows: usize, cols: usize, d: &[f32]) -> Vec<f32> {
    let mut w = vec![0f32; rows * cols];
    for (i, &x) in d.iter().enumerate() {
        w[i * cols + i] = x;
    }
    w
}

fn known_checkpoint(dir: &Path) -> PathBuf {
    let path = dir.join("known.safetensors");
    let rank1: Vec<f32> = (0..4).flat_map(|i| (0..6).map(move |j| (i as f32 + 1.0) * (j as f32 - 2.5))).collect();
    let mut nan = diag(3, 3, &[1.0, 2.0, 3.0]);
    nan[4] = f32::NAN;
    write_checkpoint(
        &path,
        &[
            // S = 10 5 4 3 2 1 on a 6 x 8: (19 / 6) / 10 (see the unit test for the derivation).
            ("model.layers.0.mlp.weight", vec![6, 8], diag(6, 8, &[10.0, 5.0, 4.0, 3.0, 2.0, 1.0])),
            // S = 8 4 2 1 0.5 on 5 x 5: asc .5 1 2 4 8; q75 at 3: 4; q25 at 1: 1; sigma 3/1.349 = 2.224;
            // threshold 2 sigma = 4.448: signal 8, noise 7.5 -> (8 / 7.5) / 8.
            ("model.layers.1.mlp.weight", vec![5, 5], diag(5, 5, &[8.0, 4.0, 2.0, 1.0, 0.5])),
            ("model.layers.2.mlp.weight", vec![4, 6], rank1),
            ("model.layers.3.mlp.weight", vec![3, 3], nan),
            ("model.layers.4.mlp.weight", vec![2, 3], vec![0.0; 6]),
            // A conv weight 2 x 1 x 2 x 2 reshaped to 2 x 4 rows [3 0 0 0] and [0 0 0 4]: S = 4 3.
            ("model.layers.0.conv.weight", vec![2, 1, 2, 2], vec![3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 4.0]),
            ("model.layers.0.norm.weight", vec![4], vec![3.0, 4.0, 0.0, 0.0]),
        ],
    );
    path
}

fn tensor<'a>(doc: &'a Value, name: &str) -> &'a Value {
    doc["tensors"].as_array().unwrap().iter().find(|t| t["name"] == name).unwrap_or_else(|| panic!("no {name}"))
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * a.abs().max(b.abs())
}

#[test]
fn known_values_statuses_and_ranking() {
    let dir = tempfile::tempdir().unwrap();
    let ck = known_checkpoint(dir.path());
    let doc = json(&["snr", ck.to_str().unwrap(), "--json", "--top-percent", "50"]);
    let t0 = tensor(&doc, "model.layers.0.mlp.weight");
    assert!(close(t0["snr"].as_f64().unwrap(), 19.0 / 6.0 / 10.0), "{t0}");
    assert_eq!(t0["n_signal"], 3);
    assert_eq!(t0["type"], "mlp");
    assert_eq!(t0["module"], "model.layers.0.mlp");
    let t1 = tensor(&doc, "model.layers.1.mlp.weight");
    assert!(close(t1["snr"].as_f64().unwrap(), 8.0 / 7.5 / 8.0), "{t1}");
    assert!(close(t1["threshold"].as_f64().unwrap(), 2.0 * 3.0 / 1.349), "{t1}");
    let t2 = tensor(&doc, "model.layers.2.mlp.weight");
    assert_eq!(t2["status"], "noise_zero");
    assert!(t2["snr"].is_null());
    assert_eq!(tensor(&doc, "model.layers.3.mlp.weight")["status"], "non_finite");
    assert_eq!(tensor(&doc, "model.layers.4.mlp.weight")["status"], "all_zero");
    let conv = tensor(&doc, "model.layers.0.conv.weight");
    assert_eq!(conv["matrix"], serde_json::json!([2, 4]));
    // S = 4 3: q75 = 3.75, q25 = 3.25, sigma = 0.5/1.349, threshold = sigma (1 + sqrt(1/2)): both signal, no noise.
    assert!(close(conv["snr"].as_f64().unwrap(), 7.0 / 1.0 / 4.0), "{conv}");
    assert_eq!(tensor(&doc, "model.layers.0.norm.weight")["status"], "skipped_1d");
    // Type "mlp": 3 scored (the infinite one first), floor(3 * 50 / 100) = 1 selected.
    let ranks: Vec<(String, Value)> = doc["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["type"] == "mlp")
        .map(|t| (t["name"].as_str().unwrap().to_string(), t["rank"].clone()))
        .collect();
    let rank_of = |n: &str| ranks.iter().find(|(x, _)| x == n).unwrap().1.clone();
    assert_eq!(rank_of("model.layers.2.mlp.weight"), 1);
    assert_eq!(rank_of("model.layers.0.mlp.weight"), 2); // 0.3167 > 0.1333
    assert_eq!(rank_of("model.layers.1.mlp.weight"), 3);
    assert!(rank_of("model.layers.3.mlp.weight").is_null());
    assert_eq!(doc["selected"], serde_json::json!(["model.layers.2.mlp.weight"]));

    // --include-vectors: the vector scores exactly 1.0.
    let doc = json(&["snr", ck.to_str().unwrap(), "--json", "--include-vectors"]);
    assert_eq!(tensor(&doc, "model.layers.0.norm.weight")["snr"].as_f64(), Some(1.0));
}

#[test]
fn rankings_identical_across_thread_counts() {
    for fam in ["llama/base", "sepcnn/base", "bert/base", "llama/base-sharded"] {
        let p = fixture(fam);
        let one = ok(&["snr", &p, "--json", "--threads", "1", "--top-percent", "30"]);
        let two = ok(&["snr", &p, "--json", "--threads", "2", "--top-percent", "30"]);
        let four = ok(&["snr", &p, "--json", "--threads", "4", "--top-percent", "30"]);
        assert_eq!(one, two, "{fam}");
        assert_eq!(one, four, "{fam}");
    }
    // The sharded copy holds the same tensors: same scores and ranks, same selection.
    let a = json(&["snr", &fixture("llama/base"), "--json"]);
    let b = json(&["snr", &fixture("llama/base-sharded"), "--json"]);
    assert_eq!(a["selected"], b["selected"]);
    for t in a["tensors"].as_array().unwrap() {
        let u = tensor(&b, t["name"].as_str().unwrap());
        assert_eq!(t["snr"], u["snr"]);
        assert_eq!(t["rank"], u["rank"]);
    }
}

#[test]
fn selection_counts_follow_spectrum_rule() {
    let doc = json(&["snr", &fixture("sepcnn/base"), "--json", "--top-percent", "25"]);
    let tensors = doc["tensors"].as_array().unwrap();
    let mut types: Vec<&str> = tensors.iter().map(|t| t["type"].as_str().unwrap()).collect();
    types.sort();
    types.dedup();
    let mut total = 0;
    for ty in types {
        let of: Vec<&Value> = tensors.iter().filter(|t| t["type"] == ty).collect();
        let scored: Vec<&&Value> = of.iter().filter(|t| !t["rank"].is_null()).collect();
        let selected = of.iter().filter(|t| t["selected"] == true).count();
        assert_eq!(selected, scored.len() * 25 / 100, "{ty}");
        total += selected;
        // Selected tensors are the top of the ranking, and ranks follow the scores.
        for a in &scored {
            for b in &scored {
                if a["rank"].as_u64() < b["rank"].as_u64() {
                    assert!(a["snr"].as_f64() >= b["snr"].as_f64());
                }
                if a["selected"] == true && b["selected"] == false {
                    assert!(a["rank"].as_u64() < b["rank"].as_u64());
                }
            }
        }
    }
    assert!(total > 0);
    assert_eq!(doc["selected"].as_array().unwrap().len(), total);
}

#[test]
fn output_files_parse_back_and_match_the_selection() {
    let dir = tempfile::tempdir().unwrap();
    let (sj, yaml, sel) = (dir.path().join("snr.json"), dir.path().join("unfrozen.yaml"), dir.path().join("sel.json"));
    let model = fixture("llama/base");
    let doc = json(&[
        "snr",
        &model,
        "--json",
        "--top-percent",
        "50",
        "--spectrum-json",
        sj.to_str().unwrap(),
        "--unfrozen-yaml",
        yaml.to_str().unwrap(),
        "--selection-json",
        sel.to_str().unwrap(),
    ]);
    let scored: Vec<&Value> = doc["tensors"].as_array().unwrap().iter().filter(|t| !t["rank"].is_null()).collect();
    let selected: Vec<&Value> = scored.iter().copied().filter(|t| t["selected"] == true).collect();
    assert!(!selected.is_empty());

    // Spectrum's JSON: every scored module, its score and type.
    let spectrum: serde_json::Map<String, Value> =
        serde_json::from_str(&std::fs::read_to_string(&sj).unwrap()).unwrap();
    assert_eq!(spectrum.len(), scored.len());
    for t in &scored {
        let e = &spectrum[t["module"].as_str().unwrap()];
        assert_eq!(e["snr"], t["snr"]);
        assert_eq!(e["type"], t["type"]);
    }

    // axolotl's YAML: the two always-unfrozen regexes (both present in this Llama), then the selected modules.
    #[derive(serde::Deserialize)]
    struct Unfrozen {
        unfrozen_parameters: Vec<String>,
    }
    let text = std::fs::read_to_string(&yaml).unwrap();
    let y: Unfrozen = yaml_serde::from_str(&text).unwrap();
    let mut want = vec!["^lm_head.weight$".to_string(), "^model.embed_tokens.weight$".to_string()];
    let mut modules: Vec<String> = selected.iter().map(|t| t["module"].as_str().unwrap().to_string()).collect();
    let mut got_modules = y.unfrozen_parameters[2..].to_vec();
    modules.sort();
    got_modules.sort();
    assert_eq!(got_modules, modules);
    want.extend(y.unfrozen_parameters[2..].iter().cloned());
    assert_eq!(y.unfrozen_parameters, want);
    assert!(text.contains("# self_attn.q_proj layers\n"));

    // graft's selection file.
    let f = graft::snr::formats::SelectionFile::read(&sel).unwrap();
    assert_eq!(serde_json::to_value(&f.selected).unwrap(), doc["selected"]);
    assert_eq!(f.selected.len(), f.modules.len());
    assert_eq!(f.scores.len(), scored.len());
    assert_eq!(f.top_percent, 50.0);
}

#[test]
fn types_restrict_the_scan() {
    let model = fixture("llama/base");
    let doc = json(&["snr", &model, "--json", "--types", "self_attn.q_proj,mlp.down_proj", "--top-percent", "100"]);
    let tensors = doc["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), 4);
    assert!(tensors.iter().all(|t| t["selected"] == true));
    assert_eq!(doc["types"], serde_json::json!(["mlp.down_proj", "self_attn.q_proj"]));
    let out = graft(&["snr", &model, "--types", "self_attn.nope"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("self_attn.nope") && err.contains("self_attn.q_proj"), "{err}");
    assert_eq!(err.trim().lines().count(), 1);
}

#[test]
fn zoo_jsonl_glob_and_resume() {
    let pattern = fixture("mlp/*");
    let out = ok(&["snr", &pattern, "--jsonl"]);
    let lines: Vec<Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 4); // base ft_a ft_b indep, sorted
    assert!(lines[0]["model"].as_str().unwrap().ends_with("mlp/base"));
    assert!(lines[3]["model"].as_str().unwrap().ends_with("mlp/indep"));

    let dir = tempfile::tempdir().unwrap();
    let resume = dir.path().join("zoo.jsonl");
    let r = resume.to_str().unwrap();
    ok(&["snr", &fixture("mlp/base"), "--resume", r]);
    // A crash in the middle of a line leaves a partial line: it is dropped, not parsed.
    let mut text = std::fs::read_to_string(&resume).unwrap();
    text.push_str("{\"model\": \"cut sho");
    std::fs::write(&resume, text).unwrap();
    let out = graft(&["snr", &fixture("mlp/base"), &fixture("mlp/ft_a"), "--resume", r, "--jsonl"]);
    assert!(out.status.success());
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "only ft_a is scanned");
    assert!(String::from_utf8_lossy(&out.stderr).contains("already in the resume file"));
    let recorded: Vec<Value> =
        std::fs::read_to_string(&resume).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(recorded.len(), 2);
    assert_eq!(recorded[1], serde_json::from_str::<Value>(stdout.trim()).unwrap());
}

#[test]
fn per_model_files_need_a_placeholder() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (fixture("mlp/base"), fixture("mlp/ft_a"));
    let plain = dir.path().join("x.yaml");
    let out = graft(&["snr", &a, &b, "--unfrozen-yaml", plain.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let templ = dir.path().join("{model}.yaml");
    ok(&["snr", &a, &b, "--unfrozen-yaml", templ.to_str().unwrap()]);
    let written: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(written.len(), 2, "{written:?}");
}

#[test]
fn bad_inputs_fail_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.safetensors");
    let out = graft(&["snr", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing.safetensors") && err.trim().lines().count() == 1, "{err}");
    let out = graft(&["snr", &fixture("mlp/base"), "--top-percent", "150"]);
    assert_eq!(out.status.code(), Some(2));
    let out = graft(&["snr", &fixture("mlp/base"), "--filter", "("]);
    assert_eq!(out.status.code(), Some(2));
    // In a zoo a bad model is reported and the others still scanned.
    let out = graft(&["snr", missing.to_str().unwrap(), &fixture("mlp/base"), "--jsonl"]);
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert!(lines[0]["error"].is_string());
    assert!(lines[1]["tensors"].is_array());
}

/// How many PNG pixels a pixel of the SVG's layout is (the PNG is drawn at print resolution).
fn png_scale(svg: &str, png_width: u32) -> u32 {
    let at = svg.find("width=\"").unwrap() + 7;
    let w: u32 = svg[at..at + svg[at..].find('"').unwrap()].parse().unwrap();
    assert_eq!(png_width % w, 0, "PNG {png_width} wide, SVG {w}");
    png_width / w
}

/// The SVG's text elements as (x, y, text).
fn svg_texts(svg: &str) -> Vec<(i64, i64, String)> {
    let mut out = Vec::new();
    for part in svg.split("<text ").skip(1) {
        let attr = |name: &str| -> i64 {
            let at = part.find(&format!(" {name}=\"")).or_else(|| part.find(&format!("{name}=\""))).unwrap();
            let rest = &part[at..];
            let start = rest.find('"').unwrap() + 1;
            let end = start + rest[start..].find('"').unwrap();
            rest[start..end].parse::<f64>().unwrap() as i64
        };
        let body = &part[part.find('>').unwrap() + 1..part.find("</text>").unwrap()];
        out.push((attr("x"), attr("y"), body.trim().to_string()));
    }
    out
}

/// `--plot`: a heatmap with a coloured cell for every scored (layer, type) of the scan and an empty (grey) one
/// elsewhere, located by the SVG's row and column labels and read back from the PNG; a ranking chart per type.
#[test]
fn plot_draws_every_layer_and_type_cell_and_a_ranking_per_type() {
    let dir = tempfile::tempdir().unwrap();
    let model = fixture("llama/base");
    let out = dir.path().join("plots");
    let doc = json(&["snr", &model, "--json", "--top-percent", "50", "--plot", out.to_str().unwrap()]);
    // Types with a scored matrix (1-D norms are listed but skipped by default).
    let types: Vec<String> = doc["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap().to_string())
        .filter(|t| doc["tensors"].as_array().unwrap().iter().any(|x| x["type"] == *t && x["rank"].is_u64()))
        .collect();
    assert!(types.len() >= 7, "{types:?}");
    let svg = std::fs::read_to_string(out.join("heatmap.svg")).unwrap();
    assert!(svg.contains("base: SNR of every weight matrix by layer and type"));
    png::check_svg(&svg, 30).unwrap_or_else(|e| panic!("heatmap.svg: {e}"));
    let texts = svg_texts(&svg);
    let img = png::decode(&std::fs::read(out.join("heatmap.png")).unwrap()).unwrap();
    let column = |t: &str| -> i64 {
        let (a, b) = t.rsplit_once('.').unwrap_or(("", t));
        texts
            .iter()
            .filter(|(_, _, s)| s == b)
            .find(|(x, _, _)| a.is_empty() || texts.iter().any(|(x2, _, s2)| x2 == x && s2 == a))
            .unwrap_or_else(|| panic!("no column for {t}"))
            .0
    };
    let row = |label: &str| texts.iter().find(|(_, _, s)| s == label).unwrap_or_else(|| panic!("no row {label}")).1;
    let (mut coloured, mut empty) = (0, 0);
    let tensors = doc["tensors"].as_array().unwrap();
    let layers: std::collections::BTreeSet<u64> =
        tensors.iter().filter(|t| t["rank"].is_u64()).filter_map(|t| t["layer"].as_u64()).collect();
    assert!(layers.len() >= 2);
    for layer in &layers {
        for t in &types {
            let scored =
                tensors.iter().any(|x| x["layer"].as_u64() == Some(*layer) && x["type"] == *t && x["rank"].is_u64());
            let k = png_scale(&svg, img.width);
            let px = img.pixel(column(t) as u32 * k, row(&format!("layer {layer}")) as u32 * k).to_vec();
            if scored {
                assert!(px[..3] != [255, 255, 255] && px[..3] != [0xF2, 0xF2, 0xF2], "layer {layer} {t}: {px:?}");
                coloured += 1;
            } else {
                assert_eq!(px[..3], [0xF2, 0xF2, 0xF2], "layer {layer} {t}: a cell without a matrix is drawn");
                empty += 1;
            }
        }
    }
    let scored_in_layers = tensors.iter().filter(|t| t["rank"].is_u64() && t["layer"].is_u64()).count();
    assert_eq!(coloured, scored_in_layers, "{empty} empty cells");
    // Selected cells are framed: as many thick black frames as selected tensors.
    let selected = doc["selected"].as_array().unwrap().len();
    assert!(selected > 0);
    assert_eq!(svg.matches("fill=\"none\" stroke=\"#000000\"").count(), selected + 1, "frames + key");
    for t in &types {
        let stem = format!("ranking_{}", t.to_lowercase().replace(['.', '-'], "_"));
        let bytes = std::fs::read(out.join(format!("{stem}.png"))).unwrap_or_else(|_| panic!("{stem}.png missing"));
        let img = png::decode(&bytes).unwrap();
        let bg = img.pixel(0, 0).to_vec();
        let ink = (0..img.height)
            .flat_map(|y| (0..img.width).map(move |x| (x, y)))
            .filter(|&(x, y)| img.pixel(x, y) != bg.as_slice())
            .count();
        assert!(ink as f64 / (img.width * img.height) as f64 > 0.01, "{stem}: nearly blank");
        assert!(out.join(format!("{stem}.svg")).is_file());
    }
}

/// `--plot` on several models also draws the zoo picture: a panel per layer type, a row per model, a column per
/// layer. Every (model, type, layer) cell is found through the SVG's panel title, row label and layer number, and
/// its pixel read back from the PNG: coloured where the model's scan scored that matrix, empty grey elsewhere.
#[test]
fn zoo_plot_has_a_row_per_model_and_every_cell() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plots");
    let models = [fixture("llama/base"), fixture("llama/ft_a")];
    let stdout = ok(&["snr", &models[0], &models[1], "--jsonl", "--plot", out.to_str().unwrap()]);
    let docs: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(docs.len(), 2);
    let per_model =
        std::fs::read_dir(&out).unwrap().flatten().filter(|e| e.path().join("heatmap.png").is_file()).count();
    assert_eq!(per_model, 2, "a heatmap directory per model");
    let svg = std::fs::read_to_string(out.join("zoo.svg")).unwrap();
    png::check_svg(&svg, 30).unwrap_or_else(|e| panic!("zoo.svg: {e}"));
    let texts = svg_texts(&svg);
    let img = png::decode(&std::fs::read(out.join("zoo.png")).unwrap()).unwrap();
    let mut checked = 0;
    let mut coloured = 0;
    let types: Vec<String> = docs[0]["types"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().into()).collect();
    for t in &types {
        // Layers by index; matrices without one (the head) in a column "-".
        let scored = |doc: &Value, layer: Option<u64>| {
            doc["tensors"]
                .as_array()
                .unwrap()
                .iter()
                .any(|x| x["type"] == *t && x["layer"].as_u64() == layer && x["rank"].is_u64())
        };
        let layers: std::collections::BTreeSet<Option<u64>> = docs
            .iter()
            .flat_map(|d| d["tensors"].as_array().unwrap().iter().filter(|x| x["type"] == *t && x["rank"].is_u64()))
            .map(|x| x["layer"].as_u64())
            .collect();
        if layers.is_empty() {
            // Types with nothing scored (norms) get no panel.
            assert!(!texts.iter().any(|(_, _, s)| s == t), "{t}: a panel without a scored matrix");
            continue;
        }
        let panel_y = texts.iter().find(|(_, _, s)| s == t).unwrap_or_else(|| panic!("no panel for {t}")).1;
        // The next panel's title bounds this one.
        let next_y = texts
            .iter()
            .filter(|(_, y, s)| *y > panel_y && types.contains(s))
            .map(|(_, y, _)| *y)
            .min()
            .unwrap_or(i64::MAX);
        for layer in layers {
            let label = layer.map(|l| l.to_string()).unwrap_or_else(|| "-".into());
            let x = texts
                .iter()
                .find(|(_, y, s)| *y > panel_y && *y < panel_y + 50 && *s == label)
                .unwrap_or_else(|| panic!("{t}: no column for layer {label}"))
                .0;
            for (doc, name) in docs.iter().zip(["base", "ft_a"]) {
                let y = texts
                    .iter()
                    .find(|(_, y, s)| *y > panel_y && *y < next_y && s == name)
                    .unwrap_or_else(|| panic!("{t}: no row {name}"))
                    .1;
                let k = png_scale(&svg, img.width);
                let px = img.pixel(x as u32 * k, y as u32 * k).to_vec();
                if scored(doc, layer) {
                    assert!(px[..3] != [255, 255, 255] && px[..3] != [0xF2, 0xF2, 0xF2], "{name} {t} {label}: {px:?}");
                    coloured += 1;
                } else {
                    assert_eq!(px[..3], [0xF2, 0xF2, 0xF2], "{name} {t} {label}: drawn without a matrix");
                }
                checked += 1;
            }
        }
    }
    let scored_total: usize =
        docs.iter().map(|d| d["tensors"].as_array().unwrap().iter().filter(|x| x["rank"].is_u64()).count()).sum();
    assert_eq!(coloured, scored_total, "{checked} cells checked");
    // One frame per selected matrix of either model, plus the key's.
    let selected: usize = docs.iter().map(|d| d["selected"].as_array().unwrap().len()).sum();
    assert!(selected > 0);
    assert_eq!(svg.matches("fill=\"none\" stroke=\"#000000\"").count(), selected + 1, "frames + key");
}
