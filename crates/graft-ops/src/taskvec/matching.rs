//! Pairing the tensors of a checkpoint with those of its base by name, shape and kind (float or not).
//!
//! A tensor present in only one of the two, with another shape, or float in one and not the other cannot take part
//! in task arithmetic, and neither can an integer tensor against another integer type. Those are errors that list every offending name (the first few and a count), unless the caller
//! allows skipping them, in which case they come back as `Skipped` entries for the command to warn about.

use std::collections::HashSet;

use serde::Serialize;

use super::name_list;
use crate::checkpoint::Checkpoint;
use crate::error::{Arg, Error, Result};

/// Which tensors the other checkpoint must have.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Coverage {
    /// Exactly the base's tensors (fine-tuned models, merges, experts).
    Full,
    /// A subset of the base's tensors (task vectors: a tensor left out is a zero delta).
    Subset,
}

/// A tensor left out of the computation, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

#[derive(Clone, Debug, Default)]
pub struct Pairing {
    /// Tensors present in both with the same shape and kind, in the base's storage order.
    pub common: Vec<String>,
    /// Tensors left out because skipping was allowed.
    pub skipped: Vec<Skipped>,
}

/// Pairs `other` (a fine-tuned model, a task vector, a merge) with `base`.
pub fn pair(base: &Checkpoint, other: &Checkpoint, coverage: Coverage, allow_missing: bool) -> Result<Pairing> {
    let other_name = other.path().display().to_string();
    let mut only_other = Vec::new();
    let mut only_base = Vec::new();
    let mut shape = Vec::new();
    let mut kind = Vec::new();
    let mut skipped = Vec::new();
    for t in other.infos() {
        if !base.contains(&t.name) {
            only_other.push(t.name.clone());
            skipped.push(Skipped { name: t.name.clone(), reason: format!("only in {other_name}, not in the base") });
        }
    }
    let mut common = Vec::new();
    for b in base.infos() {
        let Some(o) = other.info(&b.name) else {
            if coverage == Coverage::Full {
                only_base.push(b.name.clone());
                skipped.push(Skipped { name: b.name.clone(), reason: format!("missing from {other_name}") });
            }
            continue;
        };
        if o.shape != b.shape {
            shape.push(format!("{} {:?} vs {:?} in the base", b.name, o.shape, b.shape));
            skipped.push(Skipped {
                name: b.name.clone(),
                reason: format!("shape {:?} in {other_name}, {:?} in the base", o.shape, b.shape),
            });
        } else if o.dtype.is_float() != b.dtype.is_float() || (!o.dtype.is_float() && o.dtype != b.dtype) {
            // Float dtypes mix (widened to f32); an integer tensor pairs only with the same integer dtype.
            kind.push(format!("{} {} vs {} in the base", b.name, o.dtype, b.dtype));
            skipped.push(Skipped {
                name: b.name.clone(),
                reason: format!("dtype {} in {other_name}, {} in the base", o.dtype, b.dtype),
            });
        } else {
            common.push(b.name.clone());
        }
    }
    let bad = only_other.len() + only_base.len() + shape.len() + kind.len();
    if bad > 0 && !allow_missing {
        let mut parts = Vec::new();
        if !only_other.is_empty() {
            parts.push(format!("{} only in {other_name} ({})", count(only_other.len()), name_list(&only_other)));
        }
        if !only_base.is_empty() {
            parts.push(format!("{} only in the base ({})", count(only_base.len()), name_list(&only_base)));
        }
        if !shape.is_empty() {
            parts.push(format!("{} with another shape ({})", count(shape.len()), name_list(&shape)));
        }
        if !kind.is_empty() {
            parts.push(format!(
                "{} float in one and not the other, or of two integer types ({})",
                count(kind.len()),
                name_list(&kind)
            ));
        }
        return Err(Error::invalid(format!(
            "{other_name} does not match the base {}: {}; pass {} to skip them",
            base.path().display(),
            parts.join("; "),
            Arg::AllowMissing
        )));
    }
    Ok(Pairing { common, skipped })
}

/// Pairs several checkpoints with `base` at once: the common tensors are those every one of them pairs with.
pub fn pair_all(base: &Checkpoint, others: &[&Checkpoint], allow_missing: bool) -> Result<Pairing> {
    let mut pairings = Vec::new();
    for o in others {
        pairings.push(pair(base, o, Coverage::Full, allow_missing)?);
    }
    let sets: Vec<HashSet<&str>> = pairings.iter().map(|p| p.common.iter().map(String::as_str).collect()).collect();
    let common =
        base.names().filter(|n| sets.iter().all(|s| s.contains(n))).map(str::to_string).collect::<Vec<String>>();
    let skipped = pairings.into_iter().flat_map(|p| p.skipped).collect();
    Ok(Pairing { common, skipped })
}

fn count(n: usize) -> String {
    if n == 1 {
        "1 tensor".to_string()
    } else {
        format!("{n} tensors")
    }
}
