//! DARE (drop and rescale): each task-vector entry is kept with probability `density`, then the task vector is
//! rescaled (mergekit 0.1.5: to its original L1 norm, `rescale` true by default) and combined linearly
//! (`dare_linear`) or with TIES's sign consensus (`dare_ties`). Masks are drawn from a stream per (seed, tensor,
//! input, block of 65536 elements), so results are identical whatever the thread count.

use super::params::{Default, Kind, ParamDef, Scope};
use super::task_arithmetic::{gta_params, Consensus, Gta, Sparsification};

pub const DARE_TIES: Gta = Gta {
    name: "dare_ties",
    about: "DARE random drop + rescale, TIES sign consensus",
    sparsification: Sparsification::Random,
    consensus: Consensus::Sum,
    params: gta_params!(false, true),
};

pub const DARE_LINEAR: Gta = Gta {
    name: "dare_linear",
    about: "DARE random drop + rescale, linear combination",
    sparsification: Sparsification::Random,
    consensus: Consensus::None,
    params: gta_params!(false, true),
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::method::testing::*;
    use crate::merge::method::Arithmetic;
    use crate::merge::params::Scalar;

    fn p(rescale: bool, density: f64) -> crate::merge::params::TensorParams {
        params(
            &[
                ("normalize", Scalar::Bool(false)),
                ("rescale", Scalar::Bool(rescale)),
                ("lambda", Scalar::Num(1.0)),
                ("int8_mask", Scalar::Bool(false)),
            ],
            vec![vec![], vec![("weight", 1.0), ("density", density)]],
        )
    }

    #[test]
    fn keeps_about_density_and_restores_the_l1_norm() {
        let n = 200_000;
        let b = randn(1, n, 1.0);
        let x: Vec<f32> = b.iter().zip(randn(2, n, 0.1)).map(|(a, d)| a + d).collect();
        let out = run_full(&DARE_LINEAR, &[b.clone(), x.clone()], &[n], Some(0), &p(true, 0.3), Arithmetic::F32, 7, 2)
            .unwrap();
        let d: Vec<f64> = x.iter().zip(&b).map(|(a, c)| (*a - *c) as f64).collect();
        let m: Vec<f64> = out.iter().zip(&b).map(|(a, c)| (*a - *c) as f64).collect();
        let kept = m.iter().filter(|v| v.abs() > 1e-12).count() as f64 / n as f64;
        assert!((kept - 0.3).abs() < 0.005, "{kept}");
        // Every kept entry is scaled by the same factor |d|_1 / |kept d|_1, and the L1 norm is restored.
        let l1 = |v: &[f64]| v.iter().map(|x| x.abs()).sum::<f64>();
        assert!((l1(&m) / l1(&d) - 1.0).abs() < 1e-3, "{}", l1(&m) / l1(&d));
        let ratio: Vec<f64> = m.iter().zip(&d).filter(|(a, _)| a.abs() > 1e-12).map(|(a, c)| a / c).collect();
        let r0 = ratio[0];
        assert!(ratio.iter().all(|r| (r - r0).abs() < 1e-3 * r0), "scale differs");
        assert!((r0 - 1.0 / 0.3).abs() < 0.05, "{r0}");
    }

    #[test]
    fn seeded_and_independent_of_chunking_and_thread_count() {
        // 2.5 executor chunks: the rescale pre-pass sums per chunk and the chunks are computed in parallel.
        let n = 2 * crate::exec::CHUNK_ELEMS + crate::exec::CHUNK_ELEMS / 2;
        let b = randn(1, n, 1.0);
        let x = randn(2, n, 1.0);
        let run_with = |seed, threads| {
            run_full(&DARE_TIES, &[b.clone(), x.clone()], &[n], Some(0), &p(true, 0.5), Arithmetic::F32, seed, threads)
                .unwrap()
        };
        // threads 0: the whole tensor in one kernel call, the single-chunk reference.
        let whole = run_with(3, 0);
        assert_eq!(whole, run_with(3, 1));
        assert_eq!(whole, run_with(3, 3));
        assert_ne!(whole, run_with(4, 3));
    }
}
