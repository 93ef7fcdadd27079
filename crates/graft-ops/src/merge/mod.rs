//! `graft merge`: mergekit-compatible model merging, streamed tensor by tensor.
//!
//! This module is the registry (method name -> implementation). The pieces: `method` (the interface), one file per
//! method, `scratch` (per-thread buffers and cache blocks), `rank` (the radix select behind every rank-based trim),
//! `sparsify` (trim/keep masks), `params` (per-tensor parameter resolution), `config` (mergekit YAML and flags), `plan`
//! (which inputs feed which output tensor), `select` (SNR top-p selection), `vocab` (output vocabularies, row
//! remapping), `lora` (`model+adapter` inputs), `multi` (multi-document configs: stages, order, stamps), `stages`
//! (running them), `batch` (batches of configs: globs, shards, results files), `execute` (streaming the plan through
//! the executor and writer), `request` (one merge as a typed request, validated before any I/O, and `request::run`
//! that carries it out; the options every merge of a job shares), `job` (what a front end asks for: one config, a
//! config file or a batch, validated before any I/O, and `job::run_job`).
//!
//! Adding a merge method is its file plus one line here:
//! 1. `merge/<name>.rs`: a unit struct implementing `MergeMethod` (`name`, `about`, `params`, `contract`, `prepare`
//!    returning a `Kernel` that computes any element range), with a unit test against a plain f64 reference written
//!    in the test (`method::testing::run` runs a method on `Vec<f32>`s).
//! 2. Here: `pub mod <name>;` and its entry in `METHODS`.
//!
//! Nothing else names methods. `--method`'s choices and help come from `METHODS` (`name`, `about`); its parameters
//! reach YAML and `--param`/`--model-param` from `params()`. Behaviour that differs between methods is a property
//! with a default in `MergeMethod`, overridden only where needed: `base_role` (slerp's first endpoint),
//! `snr_alpha` (what `--alpha snr` sets), `copies_unchanged` (passthrough), `global_pass` (whole-model statistics,
//! as TIES paper), `compat_conflict`, `recorded_as` (metadata name of a variant).

pub(crate) mod arcee_fusion;
pub mod batch;
pub(crate) mod breadcrumbs;
pub(crate) mod chat_template;
pub mod config;
pub(crate) mod dare;
pub(crate) mod della;
pub mod execute;
pub mod job;
pub(crate) mod karcher;
pub(crate) mod linear;
pub mod lora;
pub mod method;
pub(crate) mod model_stock;
pub(crate) mod multi;
pub(crate) mod multislerp;
pub(crate) mod nearswap;
pub(crate) mod nuslerp;
pub(crate) mod output;
pub mod params;
pub(crate) mod passthrough;
pub mod plan;
pub(crate) mod ram;
pub(crate) mod rank;
pub mod request;
pub(crate) mod sce;
pub(crate) mod scratch;
pub mod select;
pub mod slerp;
pub(crate) mod sparsify;
pub(crate) mod stages;
pub(crate) mod substitute;
pub(crate) mod task_arithmetic;
pub(crate) mod ties;
pub(crate) mod vocab;

pub use method::{Arithmetic, MergeMethod};

use crate::error::{Error, Result};

static METHODS: &[&dyn MergeMethod] = &[
    &linear::Linear,
    &slerp::Slerp,
    &task_arithmetic::TASK_ARITHMETIC,
    &ties::Ties,
    &ties::TiesPaper,
    &dare::DARE_TIES,
    &dare::DARE_LINEAR,
    &breadcrumbs::BREADCRUMBS,
    &breadcrumbs::BREADCRUMBS_TIES,
    &della::DELLA,
    &della::DELLA_LINEAR,
    &model_stock::ModelStock,
    &multislerp::MultiSlerp,
    &nearswap::NearSwap,
    &sce::Sce,
    &karcher::Karcher,
    &nuslerp::NuSlerp,
    &arcee_fusion::ArceeFusion,
    &ram::RAM,
    &ram::RAMPLUS_TL,
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

/// The registered variant `variant` of `method`'s family (as the metadata records them: `ties` + `paper` is
/// `ties_paper`), if there is one.
pub fn variant(method: &dyn MergeMethod, variant: &str) -> Option<&'static dyn MergeMethod> {
    let family = method.recorded_as().method;
    METHODS.iter().copied().find(|m| {
        let r = m.recorded_as();
        r.method == family && r.variant.is_some_and(|(_, v)| v == variant)
    })
}

#[cfg(test)]
mod tests {
    use super::method::{AlphaTarget, BaseRole};
    use super::params::{Kind, Scope};

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
        assert!(super::method("nope").err().unwrap().to_string().contains("unsupported merge method 'nope'"));
    }

    #[test]
    fn every_snr_alpha_target_is_a_float_parameter_of_the_right_scope() {
        // --alpha snr writes a number into the parameter the method names: it must exist, be a float, and be
        // shared (one t per tensor) or per model (one weight per expert) as the target says.
        for m in super::methods() {
            let Some(target) = m.snr_alpha() else { continue };
            let (name, shared) = match target {
                AlphaTarget::Shared(n) => (n, true),
                AlphaTarget::PerInput(n) => (n, false),
            };
            let def = m.params().iter().find(|p| p.name == name);
            let def = def.unwrap_or_else(|| panic!("{}: alpha target '{name}' is not a parameter", m.name()));
            assert_eq!(def.kind, Kind::Float, "{}", m.name());
            assert_eq!(def.scope == Scope::Shared, shared, "{}: scope of '{name}'", m.name());
        }
        // A first-endpoint method interpolates between two inputs; a per-model weight would be meaningless there.
        for m in super::methods().iter().filter(|m| m.base_role() == BaseRole::FirstEndpoint) {
            assert!(matches!(m.snr_alpha(), Some(AlphaTarget::Shared(_))), "{}", m.name());
            assert_eq!(m.contract().max_inputs, Some(2), "{}", m.name());
        }
    }

    #[test]
    fn variants_resolve_within_their_family() {
        let ties = super::method("ties").unwrap();
        assert_eq!(super::variant(ties, "paper").unwrap().name(), "ties_paper");
        assert_eq!(super::variant(super::method("ties_paper").unwrap(), "mergekit").unwrap().name(), "ties");
        assert!(super::variant(super::method("linear").unwrap(), "paper").is_none());
        // Every variant a method records resolves back to that method.
        for m in super::methods() {
            if let Some((_, v)) = m.recorded_as().variant {
                assert_eq!(super::variant(*m, v).unwrap().name(), m.name());
            }
        }
    }
}
