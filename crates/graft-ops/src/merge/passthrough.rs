//! Passthrough: the one input tensor unchanged, or multiplied by `scale`. With `slices`, this is how layers of
//! different models are stacked (frankenmerges); the plan does the layer bookkeeping.

use std::ops::Range;

use super::method::{BaseRole, Contract, Ctx, Kernel, MergeMethod, TensorInputs};
use super::params::{Default, Kind, ParamDef, Scope, TensorParams};
use crate::error::Result;

pub struct Passthrough;

const PARAMS: &[ParamDef] =
    &[ParamDef::new("scale", Kind::Float, Scope::Input, Default::Absent, "multiply the tensor by this factor")];

struct PassKernel<'a> {
    inputs: TensorInputs<'a>,
    scale: Option<f32>,
}

impl Kernel for PassKernel<'_> {
    fn compute(&self, range: Range<usize>) -> Result<Vec<f32>> {
        let mut x = self.inputs.read(0, range)?;
        if let Some(s) = self.scale {
            for v in x.iter_mut() {
                *v *= s;
            }
            self.inputs.arithmetic.round(&mut x);
        }
        Ok(x.into_vec())
    }
}

impl MergeMethod for Passthrough {
    fn name(&self) -> &'static str {
        "passthrough"
    }
    fn about(&self) -> &'static str {
        "copy one model's tensors (optionally scaled); with slices, stack layers"
    }
    fn params(&self) -> &'static [ParamDef] {
        PARAMS
    }
    fn contract(&self) -> Contract {
        Contract { base: BaseRole::Ignored, min_inputs: 1, max_inputs: Some(1) }
    }
    /// Without `scale` the output is the input itself: the plan copies its bytes instead of computing them.
    fn copies_unchanged(&self, p: &TensorParams) -> bool {
        !p.inputs.first().is_some_and(|m| m.contains_key("scale"))
    }
    fn prepare<'a>(&self, inputs: TensorInputs<'a>, p: &TensorParams, _ctx: &Ctx) -> Result<Box<dyn Kernel + 'a>> {
        let scale = p.input_opt_f64(0, "scale").map(|s| s as f32);
        Ok(Box::new(PassKernel { inputs, scale }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::merge::method::testing::*;

    #[test]
    fn copies_or_scales() {
        let x = randn(1, 100, 1.0);
        assert_eq!(run(&Passthrough, std::slice::from_ref(&x), None, &params(&[], vec![vec![]])), x);
        let got = run(&Passthrough, std::slice::from_ref(&x), None, &params(&[], vec![vec![("scale", 0.5)]]));
        assert_eq!(got, x.iter().map(|v| v * 0.5).collect::<Vec<_>>());
    }
}
