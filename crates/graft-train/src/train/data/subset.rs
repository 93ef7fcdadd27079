//! Class subsets with label remapping, deterministic train/validation/test splits, and normalisation.
//!
//! `--classes 0,1,8,9` keeps those classes and renumbers them 0..3 in the order given (the reference study's
//! expert A). Splits are drawn from a permutation of the training pool seeded by `--seed` (the same seed always
//! gives the same split): the first `val_fraction` validate; when the source has no test pool, the next
//! `test_fraction` test. Normalisation maps a [0, 1] value `x` of channel `c` to `(x - mean[c]) / std[c]`.

use std::sync::Arc;

use super::{Dataset, Features, Part, Samples, Source};
use crate::error::{Arg, Error, Result};
use crate::rng::Rng;

#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Normalize {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// `--normalize`: statistics given on the command line, or `auto` (fitted to the training split).
#[derive(Clone, Debug, PartialEq)]
pub enum NormalizeSpec {
    Fixed(Normalize),
    Auto,
}

impl NormalizeSpec {
    /// `none`, `auto`, `M,S` or `M1,M2,..:S1,S2,..` (see `Normalize::parse`).
    pub fn parse(s: &str) -> Result<NormalizeSpec> {
        Ok(Normalize::parse(s)?.map_or(NormalizeSpec::Auto, NormalizeSpec::Fixed))
    }
}

impl Normalize {
    pub fn none() -> Self {
        Normalize { mean: vec![0.0], std: vec![1.0] }
    }

    /// `none`, `auto` (per-channel statistics of the training split), `M,S` (every channel) or
    /// `M1,M2,M3:S1,S2,S3` (per channel). `auto` returns None: the caller computes it.
    pub fn parse(s: &str) -> Result<Option<Normalize>> {
        let nums = |p: &str| -> Result<Vec<f32>> {
            p.split(',')
                .map(|x| {
                    x.trim()
                        .parse::<f32>()
                        .map_err(|_| Error::usage(format!("{} '{s}': '{x}' is not a number", Arg::Normalize)))
                })
                .collect()
        };
        match s {
            "none" => Ok(Some(Normalize::none())),
            "auto" => Ok(None),
            _ => {
                let (mean, std) = if let Some((m, sd)) = s.split_once(':') {
                    (nums(m)?, nums(sd)?)
                } else {
                    let v = nums(s)?;
                    if v.len() != 2 {
                        return Err(Error::usage(format!(
                            "{} '{s}': expected MEAN,STD or M1,M2..:S1,S2..",
                            Arg::Normalize
                        )));
                    }
                    (vec![v[0]], vec![v[1]])
                };
                if mean.len() != std.len() || std.iter().any(|&x| x <= 0.0) {
                    return Err(Error::usage(format!(
                        "{} '{s}': as many means as stds, stds positive",
                        Arg::Normalize
                    )));
                }
                Ok(Some(Normalize { mean, std }))
            }
        }
    }

    pub fn apply(&self, sample: &mut [f32], channels: usize, plane: usize) {
        if self.mean.len() == 1 && self.mean[0] == 0.0 && self.std[0] == 1.0 {
            return;
        }
        for c in 0..channels {
            let k = if self.mean.len() == 1 { 0 } else { c.min(self.mean.len() - 1) };
            let (m, inv) = (self.mean[k], 1.0 / self.std[k]);
            for v in &mut sample[c * plane..(c + 1) * plane] {
                *v = (*v - m) * inv;
            }
        }
    }

    /// Per-channel mean and standard deviation of `part` (values scaled to [0, 1]), accumulated in f64.
    pub fn fit(part: &Part) -> Normalize {
        let Samples::Dense { features, shape } = &part.data.samples else { return Normalize::none() };
        let per: usize = shape.iter().product();
        let channels = if shape.len() == 3 { shape[0] } else { 1 };
        let plane = per / channels;
        let mut sum = vec![0f64; channels];
        let mut sq = vec![0f64; channels];
        for &i in &part.indices {
            for c in 0..channels {
                let r = i * per + c * plane..i * per + (c + 1) * plane;
                let it: Box<dyn Iterator<Item = f64>> = match features {
                    Features::U8(v) => Box::new(v[r].iter().map(|&x| x as f64 / 255.0)),
                    Features::F32(v) => Box::new(v[r].iter().map(|&x| x as f64)),
                };
                for x in it {
                    sum[c] += x;
                    sq[c] += x * x;
                }
            }
        }
        let n = (part.len() * plane).max(1) as f64;
        let mean: Vec<f64> = sum.iter().map(|s| s / n).collect();
        let std: Vec<f32> = sq.iter().zip(&mean).map(|(q, m)| ((q / n - m * m).max(1e-12)).sqrt() as f32).collect();
        Normalize { mean: mean.into_iter().map(|m| m as f32).collect(), std }
    }
}

#[derive(Clone, Debug)]
pub struct SplitOptions {
    /// Keep these classes, renumbered 0.. in this order.
    pub classes: Option<Vec<u32>>,
    pub val_fraction: f64,
    /// Used only when the source has no test pool.
    pub test_fraction: f64,
    pub seed: u64,
    /// Use at most this many training samples (after the split; for quick runs).
    pub limit: Option<usize>,
}

pub struct Splits {
    pub train: Part,
    pub val: Part,
    pub test: Part,
    pub class_names: Vec<String>,
}

impl Splits {
    pub fn classes(&self) -> usize {
        self.class_names.len()
    }
}

/// Parses a class list, `0,1,8,9`: distinct class indices (an empty list is an empty index). The error is the reason alone; the front
/// end names the argument (the command line's `--classes` value parser).
pub fn parse_classes(s: &str) -> std::result::Result<Vec<u32>, String> {
    let v: Vec<u32> = s
        .split(',')
        .map(|x| x.trim().parse::<u32>().map_err(|_| format!("'{x}' is not a class index")))
        .collect::<std::result::Result<_, _>>()?;
    let mut seen = std::collections::BTreeSet::new();
    if let Some(d) = v.iter().find(|c| !seen.insert(**c)) {
        return Err(format!("class {d} is listed twice"));
    }
    Ok(v)
}

/// Keeps the samples of `classes` and renumbers their labels (in place).
fn remap(ds: &mut Dataset, classes: &[u32]) -> Result<Vec<usize>> {
    let n = ds.classes() as u32;
    if let Some(c) = classes.iter().find(|&&c| c >= n) {
        return Err(Error::usage(format!("{}: class {c} does not exist (the data has {n} classes)", Arg::Classes)));
    }
    let mut map = vec![u32::MAX; n as usize];
    for (new, &old) in classes.iter().enumerate() {
        map[old as usize] = new as u32;
    }
    let keep: Vec<usize> = (0..ds.len()).filter(|&i| map[ds.labels[i] as usize] != u32::MAX).collect();
    for l in ds.labels.iter_mut() {
        *l = map[*l as usize];
    }
    ds.class_names = classes.iter().map(|&c| ds.class_names[c as usize].clone()).collect();
    Ok(keep)
}

/// Splits a source into train/validation/test parts.
pub fn split(mut src: Source, opts: &SplitOptions) -> Result<Splits> {
    if !(0.0..1.0).contains(&opts.val_fraction) || !(0.0..1.0).contains(&opts.test_fraction) {
        return Err(Error::usage(format!("{} and {} must be in [0, 1)", Arg::ValFraction, Arg::TestFraction)));
    }
    let mut train_keep: Vec<usize> = (0..src.train.len()).collect();
    let mut test_keep: Vec<usize> = src.test.as_ref().map(|t| (0..t.len()).collect()).unwrap_or_default();
    let mut class_names = src.train.class_names.clone();
    if let Some(test) = &src.test {
        if test.classes() > class_names.len() {
            class_names = test.class_names.clone();
            src.train.class_names = class_names.clone();
        }
    }
    if let Some(cl) = &opts.classes {
        train_keep = remap(&mut src.train, cl)?;
        if let Some(t) = src.test.as_mut() {
            t.class_names = class_names.clone();
            test_keep = remap(t, cl)?;
        }
        class_names = src.train.class_names.clone();
    }
    let mut rng = Rng::for_label(opts.seed, "graft-train/split");
    rng.shuffle(&mut train_keep);
    let n = train_keep.len();
    let n_val = (n as f64 * opts.val_fraction).round() as usize;
    let val_idx: Vec<usize> = train_keep[..n_val].to_vec();
    let train = Arc::new(src.train);
    let (test, rest_start) = match src.test {
        Some(t) => (Part { data: Arc::new(t), indices: test_keep }, n_val),
        None => {
            let n_test = (n as f64 * opts.test_fraction).round() as usize;
            let mut idx = train_keep[n_val..n_val + n_test].to_vec();
            idx.sort_unstable();
            (Part { data: train.clone(), indices: idx }, n_val + n_test)
        }
    };
    let mut train_idx: Vec<usize> = train_keep[rest_start..].to_vec();
    if let Some(l) = opts.limit {
        train_idx.truncate(l);
    }
    if train_idx.is_empty() {
        return Err(Error::usage("no training samples left after the class subset and splits"));
    }
    Ok(Splits {
        train: Part { data: train.clone(), indices: train_idx },
        val: Part { data: train, indices: val_idx },
        test,
        class_names,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_lists_are_distinct_indices() {
        assert_eq!(parse_classes("0,1,8,9"), Ok(vec![0, 1, 8, 9]));
        assert_eq!(parse_classes(" 3 , 1"), Ok(vec![3, 1]), "order is kept: it is the new numbering");
        assert_eq!(parse_classes("0,1,0"), Err("class 0 is listed twice".to_string()));
        assert_eq!(parse_classes("0,x"), Err("'x' is not a class index".to_string()));
        assert_eq!(parse_classes(""), Err("'' is not a class index".to_string()));
        assert_eq!(parse_classes("-1"), Err("'-1' is not a class index".to_string()));
    }

    fn source(labels: Vec<u32>) -> Source {
        let n = labels.len();
        Source {
            train: Dataset {
                samples: Samples::Dense { features: Features::U8((0..n as u8).collect()), shape: vec![1, 1, 1] },
                labels,
                class_names: (0..10).map(|c| c.to_string()).collect(),
            },
            test: None,
            format: "idx",
            path: "x".into(),
        }
    }

    #[test]
    fn classes_are_remapped_in_the_given_order() {
        let labels: Vec<u32> = (0..100).map(|i| i % 10).collect();
        let opts =
            SplitOptions { classes: Some(vec![8, 1]), val_fraction: 0.0, test_fraction: 0.0, seed: 1, limit: None };
        let s = split(source(labels), &opts).unwrap();
        assert_eq!(s.class_names, vec!["8", "1"]);
        assert_eq!(s.train.len(), 20);
        for &i in &s.train.indices {
            // Sample i had label i % 10; 8 -> 0, 1 -> 1.
            let want = if i % 10 == 8 { 0 } else { 1 };
            assert_eq!(s.train.data.labels[i], want);
        }
    }

    #[test]
    fn splits_are_disjoint_deterministic_and_seeded() {
        let labels: Vec<u32> = (0..200).map(|i| i % 10).collect();
        let opts = SplitOptions { classes: None, val_fraction: 0.1, test_fraction: 0.2, seed: 7, limit: None };
        let a = split(source(labels.clone()), &opts).unwrap();
        let b = split(source(labels.clone()), &opts).unwrap();
        assert_eq!(a.train.indices, b.train.indices);
        assert_eq!((a.train.len(), a.val.len(), a.test.len()), (140, 20, 40));
        let mut all: Vec<usize> =
            a.train.indices.iter().chain(&a.val.indices).chain(&a.test.indices).copied().collect();
        all.sort();
        assert_eq!(all, (0..200).collect::<Vec<_>>());
        let c = split(source(labels), &SplitOptions { seed: 8, ..opts }).unwrap();
        assert_ne!(a.val.indices, c.val.indices);
    }

    #[test]
    fn normalisation() {
        let n = Normalize::parse("0.5,0.5").unwrap().unwrap();
        let mut v = vec![0.0, 1.0, 0.5];
        n.apply(&mut v, 1, 3);
        assert_eq!(v, vec![-1.0, 1.0, 0.0]);
        assert!(Normalize::parse("auto").unwrap().is_none());
        assert!(Normalize::parse("1,2,3").is_err());
    }
}
