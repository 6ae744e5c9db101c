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

    /// `(p', m', v')` from `(p, g, m, v)`; `first`: no moments yet (`m`, `v` unread).
    #[cube(launch)]
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_kernel<F: Float>(
        p: &Tensor<F>,
        g: &Tensor<F>,
        m: &Tensor<F>,
        v: &Tensor<F>,
        p_out: &mut Tensor<F>,
        m_out: &mut Tensor<F>,
        v_out: &mut Tensor<F>,
        beta_1: InputScalar,
        beta_2: InputScalar,
        factor_1: InputScalar,
        factor_2: InputScalar,
        correction_1: InputScalar,
        correction_2: InputScalar,
        epsilon: InputScalar,
        lr: InputScalar,
        decay: InputScalar,
        #[comptime] first: bool,
        #[define(F)] _dtype: StorageType,
    ) {
        let i = ABSOLUTE_POS;
        if i >= p_out.len() {
            terminate!();
        }
        let gi = g[i];
        let mut m1 = gi * factor_1.get::<F>();
        let mut m2 = gi * gi * factor_2.get::<F>();
        if !first {
            m1 = m[i] * beta_1.get::<F>() + m1;
            m2 = v[i] * beta_2.get::<F>() + m2;
        }
        m_out[i] = m1;
        v_out[i] = m2;
        let corrected_1 = m1 / correction_1.get::<F>();
        let corrected_2 = m2 / correction_2.get::<F>();
        let delta = corrected_1 / (F::sqrt(corrected_2) + epsilon.get::<F>());
        p_out[i] = p[i] * decay.get::<F>() - delta * lr.get::<F>();
    }
}

#[cfg(cube_kernels)]
mod cube {
    use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::ops::numeric::empty_device_dtype;
    use burn_cubecl::tensor::CubeTensor;
    use cubecl::prelude::InputScalar;
    use cubecl::{calculate_cube_count_elemwise, CubeDim};

    use super::AdamWHyper;
    use crate::engine::model::cube::block::Plain;

    type Out<P, const D: usize> = (Tensor<P, D>, Tensor<P, D>, Tensor<P, D>, usize);

    pub fn step<P: Plain, const D: usize>(
        lr: f64,
        h: AdamWHyper,
        param: Tensor<P, D>,
        grad: Tensor<P, D>,
        moments: Option<(Tensor<P, D>, Tensor<P, D>, usize)>,
    ) -> Out<P, D> {
        let prim = |t: Tensor<P, D>| into_contiguous(P::cube(t.into_primitive().tensor()));
        let wrap = |t: CubeTensor<P::Runtime>| -> Tensor<P, D> {
            Tensor::from_primitive(TensorPrimitive::Float(P::float(t)))
        };
        let (p, g) = (prim(param), prim(grad));
        let empty = |shape| empty_device_dtype(p.client.clone(), p.device.clone(), shape, p.dtype);
        let time = moments.as_ref().map_or(0, |s| s.2) + 1;
        let first = moments.is_none();
        let (m, v) = match moments {
            Some((m, v, _)) => (prim(m), prim(v)),
            None => (empty([1].into()), empty([1].into())),
        };
        let (p_out, m_out, v_out) = (empty(p.shape()), empty(p.shape()), empty(p.shape()));
        let t = time as i32;
        let decay = (1.0 - lr * h.weight_decay as f64) as f32;
        let scalar = |value: f32| InputScalar::new(value, p.dtype);
        let scalars = [
            h.beta_1,
            h.beta_2,
            1.0 - h.beta_1,
            1.0 - h.beta_2,
            1.0 - h.beta_1.powi(t),
            1.0 - h.beta_2.powi(t),
            h.epsilon,
            lr as f32,
            decay,
        ]
        .map(scalar);
        let [b1, b2, f1, f2, c1, c2, eps, lr, decay] = scalars;
        let n = p.shape().num_elements();
        let dim = CubeDim::new(&p.client, n);
        let count = calculate_cube_count_elemwise(&p.client, n, dim);
        let dtype = p.dtype;
        super::kernel::adamw_kernel::launch::<P::Runtime>(
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
            b1,
            b2,
            f1,
            f2,
            c1,
            c2,
            eps,
            lr,
            decay,
            first,
            dtype.into(),
        );
        (wrap(p_out), wrap(m_out), wrap(v_out), time)
    }
}
