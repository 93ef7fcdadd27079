//! DELLA: magnitude-ranked random pruning. Along axis 1 of each task vector (the rows of a matrix; a vector is one
//! row), entries are ranked by magnitude and kept with probability `density - epsilon + 2 epsilon rank / (len - 1)`,
//! the task vector is rescaled to its L1 norm (`rescale` true by default), and the task vectors are combined with
//! TIES's sign consensus (`della`) or linearly (`della_linear`).

use super::params::{Default, Kind, ParamDef, Scope};
use super::task_arithmetic::{gta_params, Consensus, Gta, Sparsification, EPSILON};

pub const DELLA: Gta = Gta {
    name: "della",
    about: "DELLA magnitude-ranked random drop + rescale, TIES sign consensus",
    sparsification: Sparsification::Della,
    consensus: Consensus::Sum,
    params: gta_params!(true, true, EPSILON),
};

pub const DELLA_LINEAR: Gta = Gta {
    name: "della_linear",
    about: "DELLA magnitude-ranked random drop + rescale, linear combination",
    sparsification: Sparsification::Della,
    consensus: Consensus::None,
    params: gta_params!(false, true, EPSILON),
};

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::method::testing::*;
    use crate::merge::method::Arithmetic;
    use crate::merge::params::Scalar;

    #[test]
    fn larger_entries_survive_more_often_and_rows_are_chunking_independent() {
        let (rows, cols) = (530, 2000); // 1.06M elements: more than one executor chunk, rows straddle the boundary
        let n = rows * cols;
        let b = randn(1, n, 1.0);
        let x: Vec<f32> = b.iter().zip(randn(2, n, 0.1)).map(|(a, d)| a + d).collect();
        let p = params(
            &[
                ("normalize", Scalar::Bool(false)),
                ("rescale", Scalar::Bool(false)),
                ("lambda", Scalar::Num(1.0)),
                ("int8_mask", Scalar::Bool(false)),
            ],
            vec![vec![], vec![("weight", 1.0), ("density", 0.5), ("epsilon", 0.3)]],
        );
        let go = |threads| {
            run_full(&DELLA_LINEAR, &[b.clone(), x.clone()], &[rows, cols], Some(0), &p, Arithmetic::F32, 1, threads)
                .unwrap()
        };
        // threads 0: the whole tensor in one kernel call, the single-chunk reference for the chunked runs.
        let out = go(3);
        assert_eq!(out, go(1));
        assert_eq!(out, go(0));
        // Per row, the top fifth of magnitudes is kept with mean probability 0.74, the bottom fifth 0.26.
        let (mut top, mut bottom, mut count) = (0usize, 0usize, 0usize);
        for r in 0..rows {
            let d: Vec<f32> = (0..cols).map(|c| x[r * cols + c] - b[r * cols + c]).collect();
            let mut idx: Vec<usize> = (0..cols).collect();
            idx.sort_by(|&i, &j| d[i].abs().partial_cmp(&d[j].abs()).unwrap());
            for &i in &idx[..cols / 5] {
                bottom += (out[r * cols + i] != b[r * cols + i]) as usize;
            }
            for &i in &idx[cols - cols / 5..] {
                top += (out[r * cols + i] != b[r * cols + i]) as usize;
            }
            count += cols / 5;
        }
        let (ft, fb) = (top as f64 / count as f64, bottom as f64 / count as f64);
        assert!((ft - 0.74).abs() < 0.01 && (fb - 0.26).abs() < 0.01, "top {ft} bottom {fb}");
    }

    #[test]
    fn density_and_epsilon_out_of_range_is_an_error() {
        let p = params(
            &[
                ("normalize", Scalar::Bool(true)),
                ("rescale", Scalar::Bool(true)),
                ("lambda", Scalar::Num(1.0)),
                ("int8_mask", Scalar::Bool(false)),
            ],
            vec![vec![], vec![("weight", 1.0), ("density", 0.9), ("epsilon", 0.15)]],
        );
        let x = randn(1, 10, 1.0);
        let e = run_full(&DELLA, &[x.clone(), x], &[10], Some(0), &p, Arithmetic::F32, 0, 1).unwrap_err();
        assert!(e.to_string().contains("epsilon"), "{e}");
    }
}
