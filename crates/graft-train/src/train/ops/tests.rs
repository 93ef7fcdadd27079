//! The fused ops against candle's generic ops and plain loops, forward and backward.

use super::batchnorm::batch_norm_train_generic;
use super::*;
use candle_core::{Device, Var};

fn rand_tensor(shape: &[usize], seed: u64) -> Tensor {
    let mut r = crate::rng::Rng::new(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f64> = (0..n).map(|_| r.normal()).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(a.len(), b.len());
    a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0, f64::max)
}

/// The fused ops against candle's generic ops (forward and every gradient), in f64.
fn compare(fused: impl Fn(&[Tensor]) -> Tensor, generic: impl Fn(&[Tensor]) -> Tensor, inputs: &[Tensor], tol: f64) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let weights = rand_tensor(fused(&ts).dims(), 99);
    let yf = fused(&ts);
    let yg = generic(&ts);
    assert!(max_abs_diff(&yf, &yg) < tol, "forward differs by {}", max_abs_diff(&yf, &yg));
    let gf = (yf * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    let gg = (yg * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, t) in ts.iter().enumerate() {
        let (a, b) = (gf.get(t).unwrap(), gg.get(t).unwrap());
        let d = max_abs_diff(a, b);
        assert!(d < tol, "gradient of input {i} differs by {d}");
    }
}

#[test]
fn depthwise_conv_matches_candle_grouped_conv() {
    for k in [3, 5] {
        let inputs = [rand_tensor(&[2, 3, 5, 6], 1), rand_tensor(&[3, 1, k, k], 2), rand_tensor(&[3], 3)];
        compare(
            |t| depthwise_conv(&t[0], &t[1], &t[2]).unwrap(),
            |t| {
                t[0].conv2d(&t[1], k / 2, 1, 1, 3).unwrap().broadcast_add(&t[2].reshape((1, 3, 1, 1)).unwrap()).unwrap()
            },
            &inputs,
            1e-10,
        );
    }
}

#[test]
fn pointwise_conv_matches_candle_conv() {
    let inputs = [rand_tensor(&[3, 4, 2, 5], 11), rand_tensor(&[6, 4, 1, 1], 12), rand_tensor(&[6], 13)];
    compare(
        |t| pointwise_conv(&t[0], &t[1], &t[2]).unwrap(),
        |t| t[0].conv2d(&t[1], 0, 1, 1, 1).unwrap().broadcast_add(&t[2].reshape((1, 6, 1, 1)).unwrap()).unwrap(),
        &inputs,
        1e-10,
    );
}

#[test]
fn batch_norm_matches_generic_formula() {
    for shape in [vec![4, 3, 2, 5], vec![6, 4]] {
        let c = shape[1];
        let inputs = [rand_tensor(&shape, 4), rand_tensor(&[c], 5), rand_tensor(&[c], 6)];
        compare(
            |t| batch_norm_train(&t[0], &t[1], &t[2], 1e-5).unwrap().0,
            |t| batch_norm_train_generic(&t[0], &t[1], &t[2], 1e-5).unwrap().0,
            &inputs,
            1e-9,
        );
    }
}

#[test]
fn softmax_matches_candle_generic() {
    let inputs = [rand_tensor(&[2, 3, 5], 9)];
    compare(|t| softmax_last_dim(&t[0]).unwrap(), |t| candle_nn::ops::softmax(&t[0], 2).unwrap(), &inputs, 1e-12);
}

#[test]
fn relu_matches_candle() {
    let inputs = [rand_tensor(&[2, 3, 4, 6], 7)];
    compare(|t| relu(&t[0]).unwrap(), |t| t[0].relu().unwrap(), &inputs, 1e-12);
}

/// Max pooling against a plain loop. (candle 0.11's own max_pool2d backward scales the gradient by 1/k^2 at the
/// maximum instead of passing it through, so it cannot serve as the reference.)
#[test]
fn max_pool_matches_plain_loop() {
    let x = Var::from_tensor(&rand_tensor(&[2, 3, 4, 6], 7)).unwrap();
    let y = max_pool(x.as_tensor(), 2).unwrap();
    let w = rand_tensor(&[2, 3, 2, 3], 8);
    let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let dx = g.get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let xv = x.as_tensor().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let yv = y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let wv = w.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let mut want = vec![0.0; xv.len()];
    for p in 0..6 {
        for i in 0..2 {
            for j in 0..3 {
                let cells: Vec<usize> = (0..4).map(|q| p * 24 + (2 * i + q / 2) * 6 + 2 * j + q % 2).collect();
                let best = *cells.iter().max_by(|a, b| xv[**a].total_cmp(&xv[**b])).unwrap();
                assert_eq!(yv[p * 6 + i * 3 + j], xv[best]);
                want[best] += wv[p * 6 + i * 3 + j];
            }
        }
    }
    assert_eq!(dx, want);
}

#[test]
fn channel_affine_matches_broadcast() {
    let x = rand_tensor(&[2, 3, 2, 2], 8);
    let (sc, sh) = ([0.5, -1.0, 2.0], [0.1, 0.2, -0.3]);
    let y = channel_affine_const(&x, &sc, &sh).unwrap();
    let xv = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let yv = y.flatten_all().unwrap().to_vec1::<f64>().unwrap();
    for (i, (&a, &b)) in xv.iter().zip(&yv).enumerate() {
        let ch = (i / 4) % 3;
        assert!((a * sc[ch] + sh[ch] - b).abs() < 1e-12);
    }
}

#[test]
fn target_logprobs_match_log_softmax_and_gather() {
    let targets = Tensor::from_vec(vec![3u32, 0, 6, 6, 1], 5, &Device::Cpu).unwrap();
    let generic = |t: &[Tensor]| {
        let lp = candle_nn::ops::log_softmax(&t[0], 1).unwrap();
        lp.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap()
    };
    compare(|t| target_logprobs(&t[0], &targets).unwrap(), generic, &[(rand_tensor(&[5, 7], 7) * 4.0).unwrap()], 1e-12);
}

/// The gradient of `sum(f(inputs) * weights)` by central differences in f64 against autograd, at the entry of each
/// input with the largest gradient and a few others.
fn finite_differences(f: impl Fn(&[Tensor]) -> Tensor, inputs: &[Tensor]) {
    let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let weights = rand_tensor(f(&ts).dims(), 77);
    let loss = |xs: &[Tensor]| (f(xs) * &weights).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap();
    let grads = (f(&ts) * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    let h = 1e-6;
    for (i, t) in inputs.iter().enumerate() {
        let g = grads.get(&ts[i]).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let values = t.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let top = (0..g.len()).max_by(|&a, &b| g[a].abs().total_cmp(&g[b].abs())).unwrap();
        for k in [top, 0, g.len() / 2, g.len() - 1] {
            let at = |delta: f64| {
                let mut v = values.clone();
                v[k] += delta;
                let mut xs = inputs.to_vec();
                xs[i] = Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap();
                loss(&xs)
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            assert!(
                (numeric - g[k]).abs() <= 1e-6 * g[k].abs().max(1e-2),
                "input {i}[{k}]: autograd {} finite difference {numeric}",
                g[k]
            );
        }
    }
}

/// Checks a fused op against its unfused composition (forward, every gradient) and by finite differences.
fn check_fused(fused: impl Fn(&[Tensor]) -> Tensor + Copy, generic: impl Fn(&[Tensor]) -> Tensor, inputs: &[Tensor]) {
    compare(fused, generic, inputs, 1e-12);
    finite_differences(fused, inputs);
}

#[test]
fn rms_norm_matches_the_unfused_formula() {
    let inputs = [rand_tensor(&[2, 5, 12], 21), rand_tensor(&[12], 22)];
    let generic = |t: &[Tensor]| {
        let variance = t[0].sqr().unwrap().mean_keepdim(2).unwrap();
        let normed = t[0].broadcast_div(&(variance + 1e-5).unwrap().sqrt().unwrap()).unwrap();
        normed.broadcast_mul(&t[1]).unwrap()
    };
    check_fused(|t| rms_norm(&t[0], &t[1], 1e-5).unwrap(), generic, &inputs);
}

/// More rows than one block of the scale's gradient, and a frozen scale: the input's gradient only.
#[test]
fn rms_norm_weight_gradient_spans_blocks_and_a_frozen_scale_gets_none() {
    let x = Var::from_tensor(&rand_tensor(&[70, 6], 23)).unwrap();
    let w = Var::from_tensor(&rand_tensor(&[6], 24)).unwrap();
    let generic = |w: &Tensor| {
        let variance = x.sqr().unwrap().mean_keepdim(1).unwrap();
        x.broadcast_div(&(variance + 1e-6).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(w).unwrap()
    };
    let weights = rand_tensor(&[70, 6], 25);
    let gf = (rms_norm(&x, &w, 1e-6).unwrap() * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    let gg = (generic(&w) * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(max_abs_diff(gf.get(&w).unwrap(), gg.get(&w).unwrap()) < 1e-12);
    let frozen = w.as_tensor().detach();
    // A loss with no constant operand of its own (candle's product would keep a gradient for `weights`).
    let gf = rms_norm(&x, &frozen, 1e-6).unwrap().sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let gg = generic(&frozen).sqr().unwrap().sum_all().unwrap().backward().unwrap();
    assert!(max_abs_diff(gf.get(&x).unwrap(), gg.get(&x).unwrap()) < 1e-12);
    assert_eq!(gf.get_ids().count(), 1, "only the input's gradient is kept");
}

#[test]
fn swiglu_matches_silu_times_up() {
    let inputs = [rand_tensor(&[3, 4, 10], 31), rand_tensor(&[3, 4, 10], 32)];
    let generic = |t: &[Tensor]| {
        let sigmoid = (t[0].neg().unwrap().exp().unwrap() + 1.0).unwrap().recip().unwrap();
        (&t[0] * sigmoid).unwrap().mul(&t[1]).unwrap()
    };
    check_fused(|t| swiglu(&t[0], &t[1]).unwrap(), generic, &inputs);
}

/// Tables for `t` positions of head_dim `2 * half` with arbitrary angles.
fn tables(t: usize, half: usize) -> std::sync::Arc<RopeTables> {
    let angles: Vec<f64> = (0..t * half).map(|i| 0.3 * i as f64 + 0.1).collect();
    std::sync::Arc::new(RopeTables {
        positions: t,
        half,
        cos: angles.iter().map(|a| a.cos()).collect(),
        sin: angles.iter().map(|a| a.sin()).collect(),
    })
}

#[test]
fn rope_to_heads_matches_transpose_and_rotate_half() {
    let (b, t, h, half) = (2, 5, 3, 4);
    let tab = tables(t, half);
    // The `rotate_half` layout: each angle's cos and sin for element i and i + half.
    let full = |v: &[f64]| {
        let rows: Vec<f64> = v.chunks(half).flat_map(|r| r.iter().chain(r.iter()).copied()).collect();
        Tensor::from_vec(rows, (t, 2 * half), &Device::Cpu).unwrap()
    };
    let (cos, sin) = (full(&tab.cos), full(&tab.sin));
    let generic = |x: &[Tensor]| {
        let x = x[0].transpose(1, 2).unwrap().contiguous().unwrap();
        let (x1, x2) = (x.narrow(3, 0, half).unwrap(), x.narrow(3, half, half).unwrap());
        let rotated = Tensor::cat(&[&x2.neg().unwrap(), &x1], 3).unwrap();
        (x.broadcast_mul(&cos).unwrap() + rotated.broadcast_mul(&sin).unwrap()).unwrap()
    };
    check_fused(|x| rope_to_heads(&x[0], &tab).unwrap(), generic, &[rand_tensor(&[b, t, h, 2 * half], 41)]);
}

/// Scores of two groups of three query heads stacked along the rows (group * t, t): row r is at position r % t.
#[test]
fn causal_softmax_matches_scale_mask_and_softmax() {
    let t = 5;
    let mask: Vec<f64> =
        (0..3 * t).flat_map(|r| (0..t).map(move |j| if j <= r % t { 0.0 } else { f64::NEG_INFINITY })).collect();
    let mask = Tensor::from_vec(mask, (3 * t, t), &Device::Cpu).unwrap();
    let generic = |x: &[Tensor]| softmax_last_dim(&(&x[0] * 0.35).unwrap().broadcast_add(&mask).unwrap()).unwrap();
    check_fused(|x| causal_softmax(&x[0], 0.35).unwrap(), generic, &[rand_tensor(&[2, 2, 3 * t, t], 51)]);
}

/// `log softmax(x W^T)[row, target]` the unfused way: candle's product, log-softmax and gather.
fn head_reference(x: &Tensor, w: &Tensor, targets: &Tensor) -> Tensor {
    let lp = candle_nn::ops::log_softmax(&x.matmul(&w.t().unwrap()).unwrap(), 1).unwrap();
    lp.gather(&targets.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap()
}

fn seeded_targets(rows: usize, vocab: usize, seed: u64) -> Tensor {
    let mut r = crate::rng::Rng::new(seed);
    let t: Vec<u32> = (0..rows).map(|_| r.below(vocab) as u32).collect();
    Tensor::from_vec(t, rows, &Device::Cpu).unwrap()
}

/// Small blocks: 11 rows in chunks of 4 (the last one short), 37 tokens in blocks of 8 (the last one short), the
/// first and last tokens among the targets.
#[test]
fn head_logprobs_match_product_log_softmax_and_gather() {
    let mut t = seeded_targets(11, 37, 61).to_vec1::<u32>().unwrap();
    (t[0], t[10]) = (0, 36);
    let targets = Tensor::from_vec(t, 11, &Device::Cpu).unwrap();
    let blocks = head::Blocks { rows: 4, vocab: 8 };
    let inputs = [rand_tensor(&[11, 6], 62), (rand_tensor(&[37, 6], 63) * 2.0).unwrap()];
    check_fused(
        |t| head::head_logprobs_blocked(&t[0], &t[1], &targets, blocks).unwrap(),
        |t| head_reference(&t[0], &t[1], &targets),
        &inputs,
    );
}

/// The default chunk and block sizes: 300 rows (three chunks) over 4,500 tokens (three blocks, the last one short).
#[test]
fn head_logprobs_match_the_reference_with_the_default_blocks() {
    let targets = seeded_targets(300, 4500, 64);
    let inputs = [rand_tensor(&[300, 8], 65), rand_tensor(&[4500, 8], 66)];
    compare(
        |t| head_logprobs(&t[0], &t[1], &targets).unwrap(),
        |t| head_reference(&t[0], &t[1], &targets),
        &inputs,
        1e-12,
    );
}

/// A tied head: the embedding is both the table the rows come from and the head; its gradient sums both uses.
#[test]
fn tied_head_gradient_sums_the_embedding_and_head_uses() {
    let emb = Var::from_tensor(&rand_tensor(&[37, 6], 67)).unwrap();
    let ids = seeded_targets(11, 37, 68);
    let targets = seeded_targets(11, 37, 69);
    let scale = rand_tensor(&[6], 70);
    let blocks = head::Blocks { rows: 4, vocab: 8 };
    let rows = |e: &Tensor| e.index_select(&ids, 0).unwrap().broadcast_mul(&scale).unwrap().tanh().unwrap();
    let weights = rand_tensor(&[11], 71);
    let ours = head::head_logprobs_blocked(&rows(&emb), &emb, &targets, blocks).unwrap();
    let reference = head_reference(&rows(&emb), &emb, &targets);
    assert!(max_abs_diff(&ours, &reference) < 1e-12);
    let go = (ours * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (reference * &weights).unwrap().sum_all().unwrap().backward().unwrap();
    let d = max_abs_diff(go.get(&emb).unwrap(), gr.get(&emb).unwrap());
    assert!(d < 1e-12, "the tied embedding's gradient differs by {d}");
    // A mean loss: the forward pass's gradient of the head, added to the lookup's.
    let go = head::head_logprobs_blocked(&rows(&emb), &emb, &targets, blocks).unwrap().mean_all().unwrap();
    let gr = head_reference(&rows(&emb), &emb, &targets).mean_all().unwrap();
    let (go, gr) = (go.backward().unwrap(), gr.backward().unwrap());
    let d = max_abs_diff(go.get(&emb).unwrap(), gr.get(&emb).unwrap());
    assert!(d < 1e-12, "the tied embedding's gradient under a mean loss differs by {d}");
    // Finite differences on the embedding through both of its uses.
    finite_differences(
        |t| head::head_logprobs_blocked(&rows(&t[0]), &t[0], &targets, blocks).unwrap(),
        &[emb.as_tensor().clone()],
    );
}

/// A frozen head differentiates the rows alone; rows from frozen layers differentiate the head alone.
#[test]
fn frozen_head_or_rows_get_no_gradient() {
    let x = Var::from_tensor(&rand_tensor(&[11, 6], 72)).unwrap();
    let w = Var::from_tensor(&rand_tensor(&[37, 6], 73)).unwrap();
    let targets = seeded_targets(11, 37, 74);
    let blocks = head::Blocks { rows: 4, vocab: 8 };
    // Upstream gradients equal for every row (the forward pass's gradients serve) and different per row (the
    // backward pass computes them again); a loss with no constant operand of its own in the first case.
    let per_row = rand_tensor(&[11], 79);
    let loss = |lp: Tensor, uniform: bool| match uniform {
        true => lp.sum_all().unwrap(),
        false => (lp * &per_row).unwrap().sum_all().unwrap(),
    };
    for uniform in [true, false] {
        let reference = loss(head_reference(&x, &w, &targets), uniform).backward().unwrap();

        let frozen_w = w.as_tensor().detach();
        let g =
            loss(head::head_logprobs_blocked(&x, &frozen_w, &targets, blocks).unwrap(), uniform).backward().unwrap();
        assert!(max_abs_diff(g.get(&x).unwrap(), reference.get(&x).unwrap()) < 1e-12);
        assert!(g.get(&w).is_none(), "the frozen head got a gradient");
        if uniform {
            assert_eq!(g.get_ids().count(), 1, "only the rows' gradient is kept");
        }

        let frozen_x = x.as_tensor().detach();
        let g =
            loss(head::head_logprobs_blocked(&frozen_x, &w, &targets, blocks).unwrap(), uniform).backward().unwrap();
        assert!(max_abs_diff(g.get(&w).unwrap(), reference.get(&w).unwrap()) < 1e-12);
        assert!(g.get(&frozen_x).is_none() && g.get(&x).is_none(), "the constant rows got a gradient");
        if uniform {
            assert_eq!(g.get_ids().count(), 1, "only the head's gradient is kept");
        }
    }
}

/// A training loss (the mean NLL: the same upstream gradient for every row), where the forward pass's gradients
/// serve: both gradients against the unfused composition, and by central differences in f64.
#[test]
fn head_gradients_for_a_mean_loss_match_the_reference_and_finite_differences() {
    let targets = seeded_targets(11, 37, 80);
    let blocks = head::Blocks { rows: 4, vocab: 8 };
    let x0 = rand_tensor(&[11, 6], 81);
    let w0 = (rand_tensor(&[37, 6], 82) * 2.0).unwrap();
    let mean_nll = |lp: Tensor| (lp.sum_all().unwrap().neg().unwrap() / 11.0).unwrap();
    let (x, w) = (Var::from_tensor(&x0).unwrap(), Var::from_tensor(&w0).unwrap());
    let ours = mean_nll(head::head_logprobs_blocked(&x, &w, &targets, blocks).unwrap()).backward().unwrap();
    let reference = mean_nll(head_reference(&x, &w, &targets)).backward().unwrap();
    for (name, v) in [("rows", &x), ("head", &w)] {
        let d = max_abs_diff(ours.get(v).unwrap(), reference.get(v).unwrap());
        assert!(d < 1e-12, "the {name}' gradient differs by {d}");
    }
    let loss_at = |x: &Tensor, w: &Tensor| {
        mean_nll(head::head_logprobs_blocked(x, w, &targets, blocks).unwrap()).to_scalar::<f64>().unwrap()
    };
    let h = 1e-6;
    for (which, base) in [(0, &x0), (1, &w0)] {
        let g = ours.get(if which == 0 { &x } else { &w }).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let values = base.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        for k in [0, 7, values.len() / 2, values.len() - 1] {
            let at = |delta: f64| {
                let mut v = values.clone();
                v[k] += delta;
                let t = Tensor::from_vec(v, base.shape(), &Device::Cpu).unwrap();
                if which == 0 {
                    loss_at(&t, &w0)
                } else {
                    loss_at(&x0, &t)
                }
            };
            let numeric = (at(h) - at(-h)) / (2.0 * h);
            assert!((numeric - g[k]).abs() <= 1e-6 * g[k].abs().max(1e-2), "input {which}[{k}]: {} vs {numeric}", g[k]);
        }
    }
}

/// f32, the default blocks, several chunks and blocks: the values and both gradients are the same bits whatever the
/// number of threads that runs the blocks.
#[test]
fn head_logprobs_are_bit_identical_for_any_thread_count() {
    let x = Var::from_tensor(&rand_tensor(&[300, 16], 75).to_dtype(candle_core::DType::F32).unwrap()).unwrap();
    let w = Var::from_tensor(&rand_tensor(&[5000, 16], 76).to_dtype(candle_core::DType::F32).unwrap()).unwrap();
    let targets = seeded_targets(300, 5000, 77);
    let weights = rand_tensor(&[300], 78).to_dtype(candle_core::DType::F32).unwrap();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let bits = |t: &Tensor| {
                t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect::<Vec<_>>()
            };
            // Per-row upstream gradients (the backward pass computes the gradients) and a sum (the forward pass does).
            let lp = head_logprobs(&x, &w, &targets).unwrap();
            let g = (&lp * &weights).unwrap().sum_all().unwrap().backward().unwrap();
            let per_row = (bits(&lp), bits(g.get(&x).unwrap()), bits(g.get(&w).unwrap()));
            let g = head_logprobs(&x, &w, &targets).unwrap().sum_all().unwrap().backward().unwrap();
            (per_row, bits(g.get(&x).unwrap()), bits(g.get(&w).unwrap()))
        })
    };
    let one = run(1);
    for threads in [2, 3] {
        assert!(one == run(threads), "{threads} threads differ from 1");
    }
}
