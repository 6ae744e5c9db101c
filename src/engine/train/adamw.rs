//! The optimizer tlb trains with: burn's AdamW (its maths, its state, its checkpoint records),
//! each parameter's step one fused kernel on the cube backends (`model::cube::adamw`) instead
//! of burn's 15 launches.

use burn::module::AutodiffModule;
use burn::optim::adaptor::OptimizerAdaptor;
use burn::optim::{
    AdamW, AdamWConfig, AdamWState, AdaptiveMomentumState, LearningRate, SimpleOptimizer,
};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;

use crate::engine::model::cube::adamw::{self, AdamWHyper, Moments};

/// AdamW as [`adamw`] builds it.
#[derive(Clone)]
pub struct TlbAdamW {
    burn: AdamW,
    hyper: AdamWHyper,
}

/// AdamW with β = (0.9, 0.999) (burn's defaults), `weight_decay` and `epsilon`, for
/// module `M`.
pub fn adamw<B: AutodiffBackend, M: AutodiffModule<B>>(
    weight_decay: f32,
    epsilon: f32,
) -> OptimizerAdaptor<TlbAdamW, M, B> {
    let hyper = AdamWHyper {
        beta_1: 0.9,
        beta_2: 0.999,
        epsilon,
        weight_decay,
    };
    let config = AdamWConfig::new()
        .with_beta_1(hyper.beta_1)
        .with_beta_2(hyper.beta_2)
        .with_weight_decay(weight_decay)
        .with_epsilon(epsilon);
    OptimizerAdaptor::from(TlbAdamW {
        burn: config.build(),
        hyper,
    })
}

impl<B: Backend> SimpleOptimizer<B> for TlbAdamW {
    type State<const D: usize> = AdamWState<B, D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<B, D>,
        grad: Tensor<B, D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<B, D>, Option<Self::State<D>>) {
        if !adamw::applies::<B>(tensor.dtype()) {
            return self.burn.step(lr, tensor, grad, state);
        }
        let moments = state.map(|s| Moments {
            m: s.momentum.moment_1,
            v: s.momentum.moment_2,
            time: s.momentum.time,
        });
        let (tensor, m) = adamw::step(lr, self.hyper, tensor, grad, moments);
        let momentum = AdaptiveMomentumState::new(m.time, m.m, m.v);
        (tensor, Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &B::Device) -> Self::State<D> {
        <AdamW as SimpleOptimizer<B>>::to_device(state, device)
    }
}
