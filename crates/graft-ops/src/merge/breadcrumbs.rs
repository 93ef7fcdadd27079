//! Model breadcrumbs: each task vector loses its smallest entries and its `gamma` fraction of largest ones (keeping
//! ascending magnitude ranks `[n_bot, n_bot + int(density * n))`, see `sparsify`), then the task vectors are combined
//! linearly (`breadcrumbs`) or with TIES's sign consensus (`breadcrumbs_ties`).

use super::params::{Default, Kind, ParamDef, Scope};
use super::task_arithmetic::{gta_params, Consensus, Gta, Sparsification, GAMMA};

pub const BREADCRUMBS: Gta = Gta {
    name: "breadcrumbs",
    about: "drop the smallest and the largest task-vector entries, linear combination",
    sparsification: Sparsification::Outliers,
    consensus: Consensus::None,
    params: gta_params!(false, false, GAMMA),
};

pub const BREADCRUMBS_TIES: Gta = Gta {
    name: "breadcrumbs_ties",
    about: "drop the smallest and the largest task-vector entries, TIES sign consensus",
    sparsification: Sparsification::Outliers,
    consensus: Consensus::Sum,
    params: gta_params!(false, false, GAMMA),
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::method::testing::*;
    use crate::merge::params::Scalar;

    #[test]
    fn matches_an_f64_reference() {
        let n = 4000;
        let b = randn(1, n, 1.0);
        let x: Vec<f32> = b.iter().zip(randn(2, n, 0.1)).map(|(a, d)| a + d).collect();
        let (density, gamma, w) = (0.4, 0.05, 0.9);
        let p = params(
            &[
                ("normalize", Scalar::Bool(false)),
                ("rescale", Scalar::Bool(false)),
                ("lambda", Scalar::Num(1.0)),
                ("int8_mask", Scalar::Bool(false)),
            ],
            vec![vec![], vec![("weight", w), ("density", density), ("gamma", gamma)]],
        );
        let got = run(&BREADCRUMBS, &[b.clone(), x.clone()], Some(0), &p);
        // Reference: sort |d| ascending (stable), keep ranks [n - 1600 - 200, n - 200).
        let d: Vec<f64> = x.iter().zip(&b).map(|(a, c)| *a as f64 - *c as f64).collect();
        let mut idx: Vec<usize> = (0..n).collect();
        idx.sort_by(|&i, &j| d[i].abs().partial_cmp(&d[j].abs()).unwrap());
        let mut keep = vec![false; n];
        for &i in &idx[2200..3800] {
            keep[i] = true;
        }
        for e in 0..n {
            let r = b[e] as f64 + if keep[e] { w * d[e] } else { 0.0 };
            assert!((got[e] as f64 - r).abs() <= 1e-6 * (1.0 + r.abs()), "{e}");
        }
    }
}
