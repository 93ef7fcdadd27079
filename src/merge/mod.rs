//! `graft merge`: mergekit-compatible model merging, streamed tensor by tensor.
//!
//! This module is the registry (method name -> implementation). The pieces: `method` (the interface), one file per
//! method, `sparsify` (trim/keep masks), `params` (per-tensor parameter resolution), `config` (mergekit YAML and
//! flags), `plan` (which inputs feed which output tensor), `select` (SNR top-p selection), `execute` (streaming the
//! plan through the executor and writer).

pub mod breadcrumbs;
pub mod config;
pub mod dare;
pub mod della;
pub mod execute;
pub mod linear;
pub mod method;
pub mod model_stock;
pub mod output;
pub mod params;
pub mod passthrough;
pub mod plan;
pub mod select;
pub mod slerp;
pub mod sparsify;
pub mod task_arithmetic;
pub mod ties;

pub use method::{Arithmetic, MergeMethod};

use crate::error::{Error, Result};

static METHODS: &[&dyn MergeMethod] = &[
    &linear::Linear,
    &slerp::Slerp,
    &task_arithmetic::TASK_ARITHMETIC,
    &ties::Ties,
    &dare::DARE_TIES,
    &dare::DARE_LINEAR,
    &breadcrumbs::BREADCRUMBS,
    &breadcrumbs::BREADCRUMBS_TIES,
    &della::DELLA,
    &della::DELLA_LINEAR,
    &model_stock::ModelStock,
    &passthrough::Passthrough,
];

/// Every registered method.
pub fn methods() -> &'static [&'static dyn MergeMethod] {
    METHODS
}

/// The method registered under `name`, or a usage error listing the ones graft has.
pub fn method(name: &str) -> Result<&'static dyn MergeMethod> {
    METHODS.iter().copied().find(|m| m.name() == name).ok_or_else(|| {
        let names: Vec<&str> = METHODS.iter().map(|m| m.name()).collect();
        Error::usage(format!("unsupported merge method '{name}' (graft has: {})", names.join(", ")))
    })
}

/// Whether `method` weighs its input models one by one (a per-model `weight`): the linear and task-vector family.
/// Flags give such a method weight 1 per model by default, and `--alpha snr` sets those weights.
pub fn weighs_inputs(method: &dyn MergeMethod) -> bool {
    method.params().iter().any(|p| p.name == "weight" && p.scope != params::Scope::Shared)
}

#[cfg(test)]
mod tests {
    #[test]
    fn registry_names_are_unique_and_resolve() {
        let names: Vec<&str> = super::methods().iter().map(|m| m.name()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), names.len());
        for n in names {
            assert_eq!(super::method(n).unwrap().name(), n);
        }
        assert!(super::method("nuslerp").err().unwrap().to_string().contains("unsupported merge method 'nuslerp'"));
    }

    #[test]
    fn the_weighted_methods_are_the_linear_and_task_vector_family() {
        let weighted: Vec<&str> =
            super::methods().iter().filter(|m| super::weighs_inputs(**m)).map(|m| m.name()).collect();
        let expected = [
            "linear",
            "task_arithmetic",
            "ties",
            "dare_ties",
            "dare_linear",
            "breadcrumbs",
            "breadcrumbs_ties",
            "della",
            "della_linear",
        ];
        assert_eq!(weighted, expected);
    }
}
