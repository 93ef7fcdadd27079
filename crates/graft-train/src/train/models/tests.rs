//! Model tests: gradients against central finite differences in f64, the fixtures loading into graft's models,
//! the sepcnn forward pass against a plain-loop implementation, and the study network's parameter count.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::checkpoint::Checkpoint;
use crate::rng::Rng;
use crate::train::checkpoint_io;
use crate::train::params::{ParamStore, Slot};

fn model(spec: &ArchSpec, dtype: DType, seed: u64) -> Box<dyn Model> {
    build(spec, ParamStore::new(dtype, Device::Cpu, seed)).unwrap()
}

fn normal(shape: &[usize], seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    let v: Vec<f64> = (0..shape.iter().product()).map(|_| r.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn loss(m: &dyn Model, x: &Input, y: &Tensor, ctx: &Ctx) -> Tensor {
    candle_nn::loss::cross_entropy(&m.forward(x, ctx).unwrap(), y).unwrap()
}

/// Every parameter tensor: a few entries' analytic gradients against (L(p + h) - L(p - h)) / 2h.
fn check_gradients(m: &dyn Model, x: &Input, y: &Tensor, train: bool) {
    let ctx = Ctx { train, seed: 5, step: 1 };
    let grads = loss(m, x, y, &ctx).backward().unwrap();
    let h = 1e-6;
    let mut checked = 0;
    for (name, p) in m.store().params().filter(|(_, p)| p.trainable()) {
        let Some(g) = grads.get(p.var.as_tensor()) else {
            panic!("no gradient for {name}");
        };
        let g: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
        let base: Vec<f64> = p.var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
        let mut r = Rng::for_label(1, name);
        for _ in 0..3.min(base.len()) {
            let i = r.below(base.len());
            let eval = |delta: f64| {
                let mut v = base.clone();
                v[i] += delta;
                p.var.set(&Tensor::from_vec(v, p.var.shape(), &Device::Cpu).unwrap()).unwrap();
                let l = crate::train::trainer::scalar(&loss(m, x, y, &ctx));
                p.var.set(&Tensor::from_vec(base.clone(), p.var.shape(), &Device::Cpu).unwrap()).unwrap();
                l
            };
            let fd = (eval(h) - eval(-h)) / (2.0 * h);
            let err = (fd - g[i]).abs();
            if std::env::var("GRAD_DEBUG").is_ok() {
                eprintln!("{name}[{i}]: analytic {} vs finite difference {fd}", g[i]);
                continue;
            }
            assert!(
                err <= 1e-6 + 1e-5 * fd.abs().max(g[i].abs()),
                "{name}[{i}]: analytic {} vs finite difference {fd}",
                g[i]
            );
            checked += 1;
        }
    }
    assert!(checked > 10);
}

#[test]
fn mlp_gradients_match_finite_differences() {
    let m = model(&ArchSpec::Mlp(mlp::MlpSpec { sizes: vec![6, 5, 4, 3] }), DType::F64, 1);
    let x = Input::Dense(normal(&[4, 6], 2));
    let y = Tensor::new(&[0u32, 1, 2, 1], &Device::Cpu).unwrap();
    check_gradients(&*m, &x, &y, true);
}

#[test]
fn sepcnn_gradients_match_finite_differences() {
    let spec = ArchSpec::Sepcnn(sepcnn::SepcnnSpec {
        in_channels: 2,
        widths: vec![2, 3],
        depths: vec![1, 1],
        fc: vec![4, 3],
        num_classes: 3,
    });
    let m = model(&spec, DType::F64, 3);
    let x = Input::Dense(normal(&[4, 2, 4, 4], 4));
    let y = Tensor::new(&[0u32, 1, 2, 1], &Device::Cpu).unwrap();
    // Training mode: batch-statistics BatchNorm and dropout (fixed mask for the step) are part of the function.
    check_gradients(&*m, &x, &y, true);
}

#[test]
fn resnet20_gradients_match_finite_differences() {
    let spec =
        ArchSpec::Resnet20(resnet20::Resnet20Spec { in_channels: 3, widths: vec![2, 4, 6], blocks: 1, num_classes: 3 });
    let m = model(&spec, DType::F64, 5);
    let x = Input::Dense(normal(&[3, 3, 8, 8], 6));
    let y = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
    check_gradients(&*m, &x, &y, true);
}

fn tiny_bert(pooling: Pooling) -> ArchSpec {
    ArchSpec::Bert(bert::BertSpec {
        config: bert::BertConfig {
            vocab_size: 20,
            hidden_size: 8,
            num_hidden_layers: 2,
            num_attention_heads: 2,
            intermediate_size: 12,
            max_position_embeddings: 10,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_act: "gelu".into(),
        },
        pooling,
        head_hidden: 5,
        num_classes: 2,
    })
}

#[test]
fn bert_gradients_match_finite_differences() {
    for pooling in [Pooling::Mean, Pooling::Cls, Pooling::Max] {
        let m = model(&tiny_bert(pooling), DType::F64, 7);
        // The pooler is kept for interchange but unused: it has no gradient.
        for (n, p) in m.store().params() {
            if n.starts_with("pooler") {
                assert!(!p.trainable());
            }
        }
        let ids = Tensor::new(&[[1u32, 5, 7, 2, 0], [1, 9, 3, 4, 2]], &Device::Cpu).unwrap();
        let mask = Tensor::new(&[[1u32, 1, 1, 1, 0], [1, 1, 1, 1, 1]], &Device::Cpu).unwrap();
        let y = Tensor::new(&[0u32, 1], &Device::Cpu).unwrap();
        check_gradients(&*m, &Input::Tokens { ids, mask }, &y, true);
    }
}

#[test]
fn study_network_has_944494_parameters() {
    let m = model(&sepcnn::spec(3, 1.0, &sepcnn::DEFAULT_DEPTHS, 10), DType::F32, 0);
    // Trainable parameters only (BatchNorm buffers are not parameters), as the study counted them.
    assert_eq!(m.store().param_count(), 944_494);
}

fn fixture(name: &str) -> Checkpoint {
    Checkpoint::open(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(name).join("base")).unwrap()
}

fn load_fixture(name: &str) -> Box<dyn Model> {
    let ck = fixture(name);
    let spec = checkpoint_io::arch_of(&ck).unwrap().expect("fixture config names its architecture");
    let m = model(&spec, DType::F32, 0);
    checkpoint_io::load(m.store(), &ck, &|_| false).unwrap();
    // Every fixture tensor lands in the model, bit for bit.
    for e in m.store().entries() {
        let view = ck.tensor(&e.name).unwrap();
        match &e.slot {
            Slot::Counter(c) => assert_eq!(c.load(std::sync::atomic::Ordering::Relaxed), 100),
            _ => {
                let want: Vec<f64> = view.to_f32().unwrap().into_iter().map(|v| v as f64).collect();
                assert_eq!(m.store().values_f64(&e.name).unwrap(), want, "{}", e.name);
            }
        }
    }
    assert_eq!(m.store().entries().len(), ck.len(), "model and fixture have the same tensors");
    m
}

#[test]
fn mlp_fixture_loads() {
    let m = load_fixture("mlp");
    let x = Input::Dense(normal(&[2, 784], 1).to_dtype(DType::F32).unwrap());
    assert_eq!(m.forward(&x, &Ctx::eval()).unwrap().dims(), &[2, 10]);
}

/// The sepcnn fixture's eval-mode forward pass against a plain-loop f64 implementation of the network.
#[test]
fn sepcnn_fixture_forward_matches_plain_loops() {
    let m = load_fixture("sepcnn");
    let ck = fixture("sepcnn");
    let get = |n: &str| -> Vec<f64> { ck.tensor(n).unwrap().to_f32().unwrap().into_iter().map(|v| v as f64).collect() };
    let (n, h, w) = (2usize, 8usize, 8usize);
    let x = normal(&[n, 3, h, w], 11);
    let xv: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();

    // Feature maps as (channels, h, w) per sample: Vec<Vec<f64>> planes.
    type Map = (usize, usize, usize, Vec<f64>);
    let bn = |m: &mut Map, name: &str| {
        let (g, b, rm, rv) = (
            get(&format!("{name}.weight")),
            get(&format!("{name}.bias")),
            get(&format!("{name}.running_mean")),
            get(&format!("{name}.running_var")),
        );
        let (c, hh, ww, v) = m;
        for ch in 0..*c {
            for p in 0..*hh * *ww {
                let i = ch * *hh * *ww + p;
                v[i] = (v[i] - rm[ch]) / (rv[ch] + 1e-5).sqrt() * g[ch] + b[ch];
            }
        }
    };
    let sepconv = |inp: &Map, name: &str| -> Map {
        let (c, hh, ww, v) = inp;
        let (c, hh, ww) = (*c, *hh, *ww);
        let dw = get(&format!("{name}.depthwise.weight"));
        let db = get(&format!("{name}.depthwise.bias"));
        let mut d = vec![0.0; c * hh * ww];
        for ch in 0..c {
            for i in 0..hh {
                for j in 0..ww {
                    let mut s = db[ch];
                    for di in 0..3 {
                        for dj in 0..3 {
                            let (si, sj) = (i as isize + di as isize - 1, j as isize + dj as isize - 1);
                            if si >= 0 && sj >= 0 && (si as usize) < hh && (sj as usize) < ww {
                                s += dw[ch * 9 + di * 3 + dj] * v[ch * hh * ww + si as usize * ww + sj as usize];
                            }
                        }
                    }
                    d[ch * hh * ww + i * ww + j] = s;
                }
            }
        }
        let mut dm = (c, hh, ww, d);
        bn(&mut dm, &format!("{name}.bn_depthwise"));
        let pw = get(&format!("{name}.pointwise.weight"));
        let pb = get(&format!("{name}.pointwise.bias"));
        let cout = pb.len();
        let mut o = vec![0.0; cout * hh * ww];
        for co in 0..cout {
            for p in 0..hh * ww {
                let mut s = pb[co];
                for ci in 0..c {
                    s += pw[co * c + ci] * dm.3[ci * hh * ww + p];
                }
                o[co * hh * ww + p] = s;
            }
        }
        let mut om = (cout, hh, ww, o);
        bn(&mut om, &format!("{name}.bn_pointwise"));
        om
    };
    let relu = |m: &mut Map| m.3.iter_mut().for_each(|v| *v = v.max(0.0));
    let pool = |m: &Map| -> Map {
        let (c, hh, ww, v) = m;
        let (oh, ow) = (hh / 2, ww / 2);
        let mut o = vec![f64::NEG_INFINITY; c * oh * ow];
        for ch in 0..*c {
            for i in 0..oh {
                for j in 0..ow {
                    for q in 0..4 {
                        let val = v[ch * hh * ww + (2 * i + q / 2) * ww + 2 * j + q % 2];
                        let t = &mut o[ch * oh * ow + i * ow + j];
                        *t = t.max(val);
                    }
                }
            }
        }
        (*c, oh, ow, o)
    };
    let ArchSpec::Sepcnn(sepcnn::SepcnnSpec { widths, depths, fc, .. }) = m.spec().clone() else { unreachable!() };
    let mut want = Vec::new();
    for s in 0..n {
        let mut cur: Map = (3, h, w, xv[s * 3 * h * w..(s + 1) * 3 * h * w].to_vec());
        cur = sepconv(&cur, "stem");
        relu(&mut cur);
        for (st, &d) in depths.iter().enumerate() {
            if st > 0 {
                cur = sepconv(&pool(&cur), &format!("transition{st}"));
            }
            for i in 0..d {
                let mut y = sepconv(&cur, &format!("stage{}.{i}.conv1", st + 1));
                relu(&mut y);
                let y = sepconv(&y, &format!("stage{}.{i}.conv2", st + 1));
                for (a, b) in cur.3.iter_mut().zip(&y.3) {
                    *a = (*a + b).max(0.0);
                }
            }
        }
        let c = widths[widths.len() - 1];
        let plane = cur.1 * cur.2;
        let mut f: Vec<f64> =
            (0..c).map(|ch| cur.3[ch * plane..(ch + 1) * plane].iter().sum::<f64>() / plane as f64).collect();
        for (i, _) in fc.iter().enumerate() {
            let (lw, lb) = (get(&format!("mlp.{i}.linear.weight")), get(&format!("mlp.{i}.linear.bias")));
            let mut o: Vec<f64> =
                (0..lb.len()).map(|r| lb[r] + (0..f.len()).map(|k| lw[r * f.len() + k] * f[k]).sum::<f64>()).collect();
            let mut om = (o.len(), 1, 1, std::mem::take(&mut o));
            bn(&mut om, &format!("mlp.{i}.bn"));
            f = om.3.into_iter().map(|v| v.max(0.0)).collect();
        }
        let (cw, cb) = (get("classifier.weight"), get("classifier.bias"));
        want.extend((0..cb.len()).map(|r| cb[r] + (0..f.len()).map(|k| cw[r * f.len() + k] * f[k]).sum::<f64>()));
    }
    let got: Vec<f64> = m
        .forward(&Input::Dense(x.to_dtype(DType::F32).unwrap()), &Ctx::eval())
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert_eq!(got.len(), want.len());
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "graft {a} vs plain loops {b}");
    }
}

#[test]
fn bert_fixture_loads_and_runs() {
    let ck = fixture("bert");
    let spec = checkpoint_io::arch_of(&ck).unwrap().unwrap();
    let m = model(&spec, DType::F32, 0);
    // The fixture is a bare encoder: the head is new, everything else loads.
    let r = checkpoint_io::load(m.store(), &ck, &|n| m.is_head(n)).unwrap();
    assert_eq!(r.skipped.len(), 4);
    let ids = Tensor::new(&[[1u32, 5, 7, 2]], &Device::Cpu).unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1]], &Device::Cpu).unwrap();
    assert_eq!(m.forward(&Input::Tokens { ids, mask }, &Ctx::eval()).unwrap().dims(), &[1, 2]);
}

/// The separable convolution as one graph node against its four operations one by one: output, every gradient and
/// the running statistics equal bit for bit, in f32 and f64.
#[test]
fn fused_separable_conv_equals_separate_operations() {
    for dtype in [DType::F32, DType::F64] {
        let run = |fused: bool| {
            let mut store = ParamStore::new(dtype, Device::Cpu, 11);
            let conv = super::layers::SepConv::new(&mut store, "c", 3, 5).unwrap();
            let x = normal(&[4, 3, 6, 7], 12).to_dtype(dtype).unwrap();
            let x = candle_core::Var::from_tensor(&x).unwrap();
            let ctx = Ctx { train: true, seed: 1, step: 1 };
            let y = if fused { conv.forward(x.as_tensor(), &ctx) } else { conv.forward_separate(x.as_tensor(), &ctx) };
            let y = y.unwrap();
            let weights = normal(y.dims(), 13).to_dtype(dtype).unwrap();
            let grads = (&y * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap();
            let mut values = vec![("output".to_string(), flat(&y)), ("d input".into(), flat(grads.get(&x).unwrap()))];
            for (name, p) in store.params() {
                values.push((format!("d {name}"), flat(grads.get(&p.var).expect(name))));
            }
            for bn in conv.batchnorms() {
                values.push((format!("{} running mean", bn.name), flat(bn.running_mean.as_tensor())));
                values.push((format!("{} running var", bn.name), flat(bn.running_var.as_tensor())));
            }
            values
        };
        let (fused, separate) = (run(true), run(false));
        assert_eq!(fused.len(), separate.len());
        for ((name, a), (_, b)) in fused.iter().zip(&separate) {
            let same = a.len() == b.len() && a.iter().zip(b).all(|(u, v)| u.to_bits() == v.to_bits());
            assert!(same, "{dtype:?} {name}: fused {a:?} vs separate {b:?}");
        }
    }
}

/// Alignment reads a trained checkpoint's family from the registry: the convolutional nets align with the `cnn`
/// spec (channels followed through convolutions and BatchNorm), the others with the spec of their own name
/// (docs/align.md).
#[test]
fn every_architecture_names_the_spec_that_aligns_it() {
    let families: Vec<(&str, &str)> = alignment_families().into_iter().map(|(a, f)| (a, f.name())).collect();
    assert_eq!(
        families,
        [("mlp", "mlp"), ("sepcnn", "cnn"), ("resnet20", "cnn"), ("bert", "bert"), ("llama", "llama")]
    );
}

/// The registry is the one list of architectures: names unique, each found by its name, each classifier's
/// `graft_arch` tag equal to its `--arch` name, and messages listing them in registry order.
#[test]
fn registry_lists_each_architecture_once() {
    let names: Vec<&str> = ARCHS.iter().map(|a| a.name()).collect();
    assert_eq!(names, ["mlp", "sepcnn", "resnet20", "bert", "llama"]);
    for a in ARCHS {
        assert_eq!(lookup(a.name()).map(|b| b.name()), Some(a.name()));
    }
    assert!(lookup("gpt2").is_none());
    assert_eq!(names_of(Task::Classifier), "mlp, sepcnn, resnet20 or bert");
    assert_eq!(names_of(Task::CausalLm), "llama");
    let opts = ArchOptions::default();
    let mut specs: Vec<ArchSpec> = ARCHS
        .iter()
        .filter(|a| a.task() == Task::Classifier)
        .filter_map(|a| a.fresh(&opts, &[3, 8, 8], 4).ok())
        .collect();
    specs.push(tiny_bert(Pooling::Cls));
    assert_eq!(specs.len(), 4, "mlp, sepcnn and resnet20 build fresh; bert needs a checkpoint");
    for spec in specs {
        let json = spec.to_json();
        assert_eq!(json["graft_arch"], spec.name());
        assert_eq!(lookup(spec.name()).map(|a| a.task()), Some(Task::Classifier));
        assert_eq!(spec.num_classes(), if spec.name() == "bert" { 2 } else { 4 });
        assert_eq!(spec.with_num_classes(7).num_classes(), 7);
        assert_eq!(ArchSpec::from_json(&json).unwrap(), spec, "{json}");
    }
    let llama = lookup("llama").unwrap();
    assert_eq!(llama.task(), Task::CausalLm);
    assert!(llama.reads_config(&serde_json::json!({ "model_type": "qwen2" })));
    assert!(reading_config(&serde_json::json!({ "model_type": "bert" }), Task::CausalLm).is_none());
    let err = llama.fresh(&opts, &[], 2).err().unwrap().to_string();
    assert!(err.contains("fine-tuned from a checkpoint"), "{err}");
}

/// The `graft_arch` JSON is the checkpoints' format: every fixture's `config.json` (written by
/// tools/gen_fixtures.rs) reads and writes back byte for byte, and a Hugging Face BERT config gets the spec the
/// enum of struct variants wrote before the registry (hand-derived: the tag, BertConfig's fields in declaration
/// order, then pooling, head_hidden, num_classes).
#[test]
fn fixture_specs_serialise_byte_for_byte() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures");
    for family in ["mlp", "sepcnn"] {
        for model in ["base", "ft_a", "ft_b", "indep"] {
            let path = root.join(family).join(model).join("config.json");
            let text = std::fs::read_to_string(&path).unwrap();
            let spec = ArchSpec::from_json(&serde_json::from_str(&text).unwrap()).unwrap();
            assert_eq!(spec.name(), family);
            assert_eq!(serde_json::to_string_pretty(&spec.to_json()).unwrap() + "\n", text, "{}", path.display());
        }
    }
    let text = std::fs::read_to_string(root.join("bert/base/config.json")).unwrap();
    let spec = ArchSpec::from_json(&serde_json::from_str(&text).unwrap()).unwrap();
    assert_eq!(
        spec.to_json().to_string(),
        r#"{"graft_arch":"bert","vocab_size":96,"hidden_size":32,"num_hidden_layers":2,"num_attention_heads":4,"#
            .to_string()
            + r#""intermediate_size":64,"max_position_embeddings":40,"type_vocab_size":2,"layer_norm_eps":1e-12,"#
            + r#""hidden_act":"gelu","pooling":"mean","head_hidden":32,"num_classes":2}"#
    );
    let resnet = resnet20::spec(3, 0.5, 10).to_json().to_string();
    assert_eq!(resnet, r#"{"graft_arch":"resnet20","in_channels":3,"widths":[8,16,32],"blocks":3,"num_classes":10}"#);
}
