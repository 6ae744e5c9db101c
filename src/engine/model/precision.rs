//! Mixed precision: f32 parameters (the optimiser's master weights and state stay f32), the
//! forward pass computed in bf16. The cast of each parameter is an autodiff operation, so the
//! backward pass runs in bf16 too and casts each gradient back to f32 at its parameter.

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// The floating-point type the forward and backward passes compute in.
#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Serialize,
    Deserialize,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
    strum::Display,
    strum::EnumIter,
)]
#[serde(rename_all = "kebab-case")]
#[strum(serialize_all = "kebab-case", parse_err_ty = String, parse_err_fn = unknown)]
pub enum Precision {
    /// Everything in f32.
    #[default]
    F32,
    /// Activations, weights and gradients in bf16 inside the pass; parameters, optimiser
    /// state, loss and logits in f32.
    Bf16,
}

impl Precision {
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }
}

fn unknown(name: &str) -> String {
    crate::names::unknown::<Precision>("precision", name)
}

/// Casts every float parameter, keeping its id (the cast is tracked by autodiff).
struct CastParams(DType);

impl<B: Backend> ModuleMapper<B> for CastParams {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let dtype = self.0;
        param.map(|t| if t.dtype() == dtype { t } else { t.cast(dtype) })
    }
}

/// A copy of `module` whose float parameters are in `dtype`.
pub fn cast_params<B: Backend, M: Module<B>>(module: M, dtype: DType) -> M {
    module.map(&mut CastParams(dtype))
}

/// A tensor's values read back to the host as f32, whatever its dtype.
pub fn host_f32<B: Backend, const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .expect("a float tensor converts to f32")
}
