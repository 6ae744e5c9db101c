//! `gelu(u + bias)`, exact GELU (`x·Φ(x)`, Φ through erf) fused with the FFN's bias, as one
//! CubeCL kernel forward and one backward (`dx = g·(Φ(x) + x·φ(x))`; the bias gradient is
//! `dx` summed over rows). erf is the rational fit the CPU's fused block uses (Eigen's and
//! XLA's), so the GPU and the CPU compute the same function.

#[cfg(feature = "wgpu")]
use std::any::TypeId;

#[cfg(feature = "wgpu")]
use super::super::same_type as same;

use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Whether [`bias_gelu`] runs fused on `B` for tensors of `dtype`: the wgpu backend (plain
/// and under autodiff), f32, unless switched off on this thread (`fused::with_unfused`).
pub fn applies<B: Backend>(dtype: burn::tensor::DType) -> bool {
    #[cfg(feature = "wgpu")]
    {
        use crate::engine::backend::{Wgpu, WgpuAutodiff};
        let id = TypeId::of::<B>();
        (id == TypeId::of::<Wgpu>() || id == TypeId::of::<WgpuAutodiff>())
            && dtype == burn::tensor::DType::F32
            && !super::super::fused::disabled()
    }
    #[cfg(not(feature = "wgpu"))]
    {
        let _ = dtype;
        false
    }
}

/// `gelu(u + bias)` over the last dimension of `u` (`[.., f]`, bias `[f]`): one fused kernel
/// where [`applies`] holds, burn's composition elsewhere.
pub fn bias_gelu<B: Backend>(u: Tensor<B, 3>, bias: Tensor<B, 1>) -> Tensor<B, 3> {
    if !applies::<B>(u.dtype()) {
        return gelu(u + bias.unsqueeze::<3>());
    }
    super::CALLS.with(|c| c.set(c.get() + 1));
    #[cfg(feature = "wgpu")]
    {
        use crate::engine::backend::Wgpu;
        if TypeId::of::<B>() == TypeId::of::<Wgpu>() {
            return same(wgpu::plain(same(u), same(bias)));
        }
        same(wgpu::tracked(same(u), same(bias)))
    }
    #[cfg(not(feature = "wgpu"))]
    unreachable!("applies only with wgpu")
}

/// The kernels (CubeCL: compiled for the backend's device at first use).
#[cfg(feature = "wgpu")]
mod kernels {
    use cubecl::prelude::*;

    /// erf on [−4, 4] (±1 beyond): `x·P(x²) / Q(x²)`, the CPU's coefficients.
    #[cube]
    fn erf<F: Float>(x: F) -> F {
        let x = F::min(F::max(x, F::new(-4.0)), F::new(4.0));
        let x2 = x * x;
        let mut p = F::new(-2.726_142_3e-10);
        p = p * x2 + F::new(2.770_681_4e-8);
        p = p * x2 + F::new(-2.101_024e-6);
        p = p * x2 + F::new(-5.692_506_4e-5);
        p = p * x2 + F::new(-7.349_906_3e-4);
        p = p * x2 + F::new(-2.954_600_2e-3);
        p = p * x2 + F::new(-1.609_603_3e-2);
        let mut q = F::new(-1.456_607_2e-5);
        q = q * x2 + F::new(-2.133_740_6e-4);
        q = q * x2 + F::new(-1.682_827e-3);
        q = q * x2 + F::new(-7.373_329_2e-3);
        q = q * x2 + F::new(-1.426_474e-2);
        x * p / q
    }

    /// Φ(x), the standard normal's CDF.
    #[cube]
    fn normal_cdf<F: Float>(x: F) -> F {
        F::new(0.5) + F::new(0.5) * erf::<F>(x * F::new(std::f32::consts::FRAC_1_SQRT_2))
    }

    /// `x = u + bias` (the bias per column of rows of `f`), `out = x·Φ(x)`, and `x` kept for
    /// the backward.
    #[cube(launch)]
    pub fn bias_gelu_kernel<F: Float>(
        u: &Tensor<F>,
        bias: &Tensor<F>,
        x_out: &mut Tensor<F>,
        out: &mut Tensor<F>,
        #[define(F)] _dtype: StorageType,
    ) {
        let i = ABSOLUTE_POS;
        if i >= out.len() {
            terminate!();
        }
        let x = u[i] + bias[i % bias.len()];
        x_out[i] = x;
        out[i] = x * normal_cdf::<F>(x);
    }

    /// `dx = g·(Φ(x) + x·φ(x))`.
    #[cube(launch)]
    pub fn gelu_backward_kernel<F: Float>(
        x: &Tensor<F>,
        g: &Tensor<F>,
        dx: &mut Tensor<F>,
        #[define(F)] _dtype: StorageType,
    ) {
        let i = ABSOLUTE_POS;
        if i >= dx.len() {
            terminate!();
        }
        let v = x[i];
        let pdf = F::new(0.398_942_3) * F::exp(F::new(-0.5) * v * v);
        dx[i] = g[i] * (normal_cdf::<F>(v) + v * pdf);
    }
}

#[cfg(feature = "wgpu")]
mod wgpu {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::ops::numeric::empty_device_dtype;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::CubeRuntime;
    use cubecl::{calculate_cube_count_elemwise, CubeCount, CubeDim};

    use super::kernels::{bias_gelu_kernel, gelu_backward_kernel};
    use crate::engine::backend::{Wgpu, WgpuAutodiff};

    type Prim = CubeTensor<burn::backend::wgpu::WgpuRuntime>;

    fn empty_like<R: CubeRuntime>(t: &CubeTensor<R>) -> CubeTensor<R> {
        empty_device_dtype(t.client.clone(), t.device.clone(), t.shape(), t.dtype)
    }

    fn elementwise<R: CubeRuntime>(t: &CubeTensor<R>) -> (CubeCount, CubeDim) {
        let n = t.shape().num_elements();
        let dim = CubeDim::new(&t.client, n);
        (calculate_cube_count_elemwise(&t.client, n, dim), dim)
    }

    /// The kernel: `(x, gelu(x))` for `x = u + bias`.
    fn forward<R: CubeRuntime>(
        u: CubeTensor<R>,
        bias: CubeTensor<R>,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let (u, bias) = (into_contiguous(u), into_contiguous(bias));
        let (x, out) = (empty_like(&u), empty_like(&u));
        let (count, dim) = elementwise(&u);
        let dtype = u.dtype;
        bias_gelu_kernel::launch::<R>(
            &u.client.clone(),
            count,
            dim,
            u.into_tensor_arg(),
            bias.into_tensor_arg(),
            x.clone().into_tensor_arg(),
            out.clone().into_tensor_arg(),
            dtype.into(),
        );
        (x, out)
    }

    /// The backward kernel: `g·gelu'(x)`.
    fn backward<R: CubeRuntime>(x: CubeTensor<R>, g: CubeTensor<R>) -> CubeTensor<R> {
        let g = into_contiguous(g);
        let dx = empty_like(&x);
        let (count, dim) = elementwise(&x);
        let dtype = x.dtype;
        gelu_backward_kernel::launch::<R>(
            &x.client.clone(),
            count,
            dim,
            x.into_tensor_arg(),
            g.into_tensor_arg(),
            dx.clone().into_tensor_arg(),
            dtype.into(),
        );
        dx
    }

    fn prim<B: burn::tensor::backend::Backend, const D: usize>(
        t: Tensor<B, D>,
    ) -> B::FloatTensorPrimitive {
        t.into_primitive().tensor()
    }

    pub(super) fn plain(u: Tensor<Wgpu, 3>, bias: Tensor<Wgpu, 1>) -> Tensor<Wgpu, 3> {
        let (_, out) = forward(prim(u), prim(bias));
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }

    #[derive(Debug)]
    struct BiasGelu;

    impl Backward<Wgpu, 2> for BiasGelu {
        /// `x = u + bias`, and the bias's length.
        type State = (Prim, usize);

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let (x, f) = ops.state;
            let g = grads.consume::<Wgpu>(&ops.node);
            let dx = backward(x, g);
            let [pu, pbias] = ops.parents;
            if let Some(node) = pbias {
                // Summed over every row: [rows, f] → [1, f] → [f].
                let dx: Tensor<Wgpu, 3> =
                    Tensor::from_primitive(TensorPrimitive::Float(dx.clone()));
                let rows = dx.shape().num_elements() / f;
                let db = dx.reshape([rows, f]).sum_dim(0).reshape([f]);
                grads.register::<Wgpu>(node.id, prim(db));
            }
            if let Some(node) = pu {
                grads.register::<Wgpu>(node.id, dx);
            }
        }
    }

    pub(super) fn tracked(
        u: Tensor<WgpuAutodiff, 3>,
        bias: Tensor<WgpuAutodiff, 1>,
    ) -> Tensor<WgpuAutodiff, 3> {
        let (u, bias) = (prim(u), prim(bias));
        let f = bias.primitive.shape().num_elements();
        let out = match BiasGelu
            .prepare::<NoCheckpointing>([u.node.clone(), bias.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, out) = forward(u.primitive, bias.primitive);
                prep.finish((x, f), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(forward(u.primitive, bias.primitive).1),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}
