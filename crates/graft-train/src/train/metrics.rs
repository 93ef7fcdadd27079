//! Classification metrics as scikit-learn defines them: accuracy, per-class precision/recall/F1 (0 where a
//! denominator is 0, sklearn's `zero_division` result), macro F1 (unweighted mean over the labels present in the
//! true or predicted labels, sklearn's `unique_labels`), weighted F1 (mean weighted by true support), confusion
//! matrix (rows = true class, columns = predicted).

use serde::Serialize;

#[derive(Clone, Debug, Serialize)]
pub struct ClassMetrics {
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub support: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Metrics {
    pub samples: usize,
    pub accuracy: f64,
    pub f1_weighted: f64,
    pub f1_macro: f64,
    /// Mean cross-entropy, when logits were available.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f64>,
    pub per_class: Vec<ClassMetrics>,
    pub confusion: Vec<Vec<u64>>,
}

/// Metrics of predictions `pred` against `truth`, labels in `0..classes`.
pub fn compute(truth: &[u32], pred: &[u32], classes: usize, loss: Option<f64>) -> Metrics {
    assert_eq!(truth.len(), pred.len());
    let k = classes.max(truth.iter().chain(pred).map(|&c| c as usize + 1).max().unwrap_or(0));
    let mut confusion = vec![vec![0u64; k]; k];
    for (&t, &p) in truth.iter().zip(pred) {
        confusion[t as usize][p as usize] += 1;
    }
    let n = truth.len();
    let correct: u64 = (0..k).map(|c| confusion[c][c]).sum();
    let mut per_class = Vec::with_capacity(k);
    let (mut macro_sum, mut macro_n, mut weighted) = (0f64, 0usize, 0f64);
    #[allow(clippy::needless_range_loop)] // c indexes rows and columns of the matrix alike
    for c in 0..k {
        let tp = confusion[c][c] as f64;
        let support: u64 = confusion[c].iter().sum();
        let predicted: u64 = (0..k).map(|r| confusion[r][c]).sum();
        let div = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
        let precision = div(tp, predicted as f64);
        let recall = div(tp, support as f64);
        let f1 = div(2.0 * tp, (support + predicted) as f64);
        if support > 0 || predicted > 0 {
            macro_sum += f1;
            macro_n += 1;
        }
        weighted += f1 * support as f64;
        per_class.push(ClassMetrics { precision, recall, f1, support });
    }
    Metrics {
        samples: n,
        accuracy: if n > 0 { correct as f64 / n as f64 } else { 0.0 },
        f1_weighted: if n > 0 { weighted / n as f64 } else { 0.0 },
        f1_macro: if macro_n > 0 { macro_sum / macro_n as f64 } else { 0.0 },
        loss,
        per_class,
        confusion,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sklearn_documentation_example() {
        // sklearn.metrics.f1_score docs: y_true = [0, 1, 2, 0, 1, 2], y_pred = [0, 2, 1, 0, 0, 1]
        // -> macro 0.26666..., weighted 0.26666..., per class [0.8, 0, 0].
        let m = compute(&[0, 1, 2, 0, 1, 2], &[0, 2, 1, 0, 0, 1], 3, None);
        assert!((m.f1_macro - 0.8 / 3.0).abs() < 1e-12);
        assert!((m.f1_weighted - 0.8 / 3.0).abs() < 1e-12);
        assert!((m.accuracy - 2.0 / 6.0).abs() < 1e-12);
        assert_eq!(m.confusion, vec![vec![2, 0, 0], vec![1, 0, 1], vec![0, 2, 0]]);
        assert!((m.per_class[0].precision - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn macro_skips_labels_absent_from_truth_and_predictions() {
        // Class 2 of 3 never occurs: sklearn's macro average is over {0, 1} only.
        // Class 0: tp 2, fp 1, fn 0 -> f1 = 4/5; class 1: tp 1, fp 0, fn 1 -> f1 = 2/3.
        let m = compute(&[0, 0, 1, 1], &[0, 0, 1, 0], 3, None);
        assert!((m.f1_macro - (0.8 + 2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert!((m.f1_weighted - (0.8 * 2.0 + 2.0 / 3.0 * 2.0) / 4.0).abs() < 1e-12);
        assert_eq!(m.per_class[2].support, 0);
    }
}
