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
