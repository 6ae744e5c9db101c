//! One AdamW step of one parameter as one kernel: burn's `AdamW` launches 15 (each moment's
//! scalings and sum, the bias corrections, the square root, the decay, the update), for each
//! of the model's ~200 parameter tensors. Same maths, in burn's order of operations:
//!
//! ```text
//! m' = β₁·m + (1−β₁)·g          v' = β₂·v + (1−β₂)·g²        (first step: m = v = 0)
//! p' = p·(1 − lr·λ) − lr · (m'/(1−β₁ᵗ)) / (√(v'/(1−β₂ᵗ)) + ε)
//! ```

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// AdamW's constants (burn's `AdamWConfig`).
#[derive(Clone, Copy, Debug)]
pub struct AdamWHyper {
    pub beta_1: f32,
    pub beta_2: f32,
    pub epsilon: f32,
    pub weight_decay: f32,
}

/// The moments of one parameter and the step count `t` they have seen.
pub struct Moments<B: Backend, const D: usize> {
    pub m: Tensor<B, D>,
    pub v: Tensor<B, D>,
    pub time: usize,
}

/// Whether [`step`] runs on `B` for parameters of `dtype`: a plain cube backend (the
/// optimizer works on the inner backend), f32, fused operations not switched off.
pub fn applies<B: Backend>(dtype: burn::tensor::DType) -> bool {
    !B::ad_enabled(&Default::default())
        && super::is_cube::<B>()
        && dtype == burn::tensor::DType::F32
        && !super::super::fused::disabled()
}

/// One AdamW step with learning rate `lr`: the new parameter and moments. Call only where
/// [`applies`] holds for `B`.
pub fn step<B: Backend, const D: usize>(
    lr: f64,
    h: AdamWHyper,
    param: Tensor<B, D>,
    grad: Tensor<B, D>,
    moments: Option<Moments<B, D>>,
) -> (Tensor<B, D>, Moments<B, D>) {
    super::CALLS.with(|c| c.set(c.get() + 1));
    #[cfg(cube_kernels)]
    {
        use super::same_type as same;
        let moments = moments.map(|s| (same(s.m), same(s.v), s.time));
        let back = |(p, m, v, time)| {
            let m = Moments {
                m: same(m),
                v: same(v),
                time,
            };
            (same(p), m)
        };
        // The optimizer steps on the inner (plain) backend.
        super::dispatch!(B, P => back(cube::step::<P, D>(lr, h, same(param), same(grad), moments)))
    }
    #[cfg(not(cube_kernels))]
    {
        let _ = (lr, h, param, grad, moments);
        unreachable!("applies only with a cube backend")
    }
}

#[cfg(cube_kernels)]
mod kernel {
    use cubecl::prelude::*;

    /// The step's constants: β₁, β₂, 1−β₁, 1−β₂, the bias corrections 1−β₁ᵗ and 1−β₂ᵗ, ε,
    /// the learning rate and the decay factor 1 − lr·λ.
    #[derive(CubeType, CubeLaunch)]
    pub struct AdamWArgs {
        pub beta_1: f32,
        pub beta_2: f32,
        pub factor_1: f32,
        pub factor_2: f32,
        pub correction_1: f32,
        pub correction_2: f32,
        pub epsilon: f32,
        pub lr: f32,
        pub decay: f32,
    }

    /// `(p', m', v')` from `(p, g, m, v)`; `first`: no moments yet (`m`, `v` unread).
    #[cube(launch)]
    pub fn adamw_kernel<F: Float>(
        p: &Tensor<F>,
        g: &Tensor<F>,
        m: &Tensor<F>,
        v: &Tensor<F>,
        p_out: &mut Tensor<F>,
        m_out: &mut Tensor<F>,
        v_out: &mut Tensor<F>,
        a: AdamWArgs,
        #[comptime] first: bool,
        #[define(F)] _dtype: StorageType,
    ) {
        let i = ABSOLUTE_POS;
        if i >= p_out.len() {
            terminate!();
        }
        let gi = g[i];
        let mut m1 = gi * F::cast_from(a.factor_1);
        let mut m2 = gi * gi * F::cast_from(a.factor_2);
        if !first {
            m1 = m[i] * F::cast_from(a.beta_1) + m1;
            m2 = v[i] * F::cast_from(a.beta_2) + m2;
        }
        m_out[i] = m1;
        v_out[i] = m2;
        let corrected_1 = m1 / F::cast_from(a.correction_1);
        let corrected_2 = m2 / F::cast_from(a.correction_2);
        let delta = corrected_1 / (F::sqrt(corrected_2) + F::cast_from(a.epsilon));
        p_out[i] = p[i] * F::cast_from(a.decay) - delta * F::cast_from(a.lr);
    }
}

#[cfg(cube_kernels)]
mod cube {
    use burn::tensor::{Tensor, TensorMetadata};
    use burn_cubecl::kernel::into_contiguous;

    use super::kernel::{adamw_kernel, AdamWArgsLaunch};
    use super::AdamWHyper;
    use crate::engine::model::cube::ops::{empty, grid};
    use crate::engine::model::cube::{prim, wrap, Plain};

    type Out<P, const D: usize> = (Tensor<P, D>, Tensor<P, D>, Tensor<P, D>, usize);

    pub fn step<P: Plain, const D: usize>(
        lr: f64,
        h: AdamWHyper,
        param: Tensor<P, D>,
        grad: Tensor<P, D>,
        moments: Option<(Tensor<P, D>, Tensor<P, D>, usize)>,
    ) -> Out<P, D> {
        let contiguous = |t: Tensor<P, D>| into_contiguous(prim(t));
        let (p, g) = (contiguous(param), contiguous(grad));
        let time = moments.as_ref().map_or(0, |s| s.2) + 1;
        let first = moments.is_none();
        let (m, v) = match moments {
            Some((m, v, _)) => (contiguous(m), contiguous(v)),
            None => (empty(&p, [1]), empty(&p, [1])),
        };
        let (p_out, m_out, v_out) = (
            empty(&p, p.shape()),
            empty(&p, p.shape()),
            empty(&p, p.shape()),
        );
        let t = time as i32;
        let args = AdamWArgsLaunch::new(
            h.beta_1,
            h.beta_2,
            1.0 - h.beta_1,
            1.0 - h.beta_2,
            1.0 - h.beta_1.powi(t),
            1.0 - h.beta_2.powi(t),
            h.epsilon,
            lr as f32,
            (1.0 - lr * h.weight_decay as f64) as f32,
        );
        let (count, dim) = grid(&p, p.shape().num_elements());
        let dtype = p.dtype;
        adamw_kernel::launch::<P::Runtime>(
            &p.client.clone(),
            count,
            dim,
            p.into_tensor_arg(),
            g.into_tensor_arg(),
            m.into_tensor_arg(),
            v.into_tensor_arg(),
            p_out.clone().into_tensor_arg(),
            m_out.clone().into_tensor_arg(),
            v_out.clone().into_tensor_arg(),
            args,
            first,
            dtype.into(),
        );
        (wrap(p_out), wrap(m_out), wrap(v_out), time)
    }
}
