//! `gelu(u + bias)`, exact GELU (`x·Φ(x)`, Φ through erf) fused with the FFN's bias, as one
//! CubeCL kernel forward and one backward (`dx = g·(Φ(x) + x·φ(x))`; the bias gradient is
//! `dx` summed over rows). erf is the rational fit the CPU's fused block uses (Eigen's and
//! XLA's), so the GPU and the CPU compute the same function.

use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

/// Whether [`bias_gelu`] runs fused on `B` for tensors of `dtype`: a cube backend without
/// fusion (plain and under autodiff, [`super::is_cube`]), f32, unless switched off on this
/// thread (`fused::with_unfused`).
pub fn applies<B: Backend>(dtype: burn::tensor::DType) -> bool {
    super::is_cube::<B>() && dtype == burn::tensor::DType::F32 && !super::super::fused::disabled()
}

/// `gelu(u + bias)` over the last dimension of `u` (`[.., f]`, bias `[f]`): one fused kernel
/// where [`applies`] holds, burn's composition elsewhere.
pub fn bias_gelu<B: Backend>(u: Tensor<B, 3>, bias: Tensor<B, 1>) -> Tensor<B, 3> {
    if !applies::<B>(u.dtype()) {
        return gelu(u + bias.unsqueeze::<3>());
    }
    super::CALLS.with(|c| c.set(c.get() + 1));
    #[cfg(cube_kernels)]
    {
        use super::same_type as same;
        super::dispatch!(B, P => same(cube::plain::<P>(same(u), same(bias))),
            same(cube::tracked::<P>(same(u), same(bias))))
    }
    #[cfg(not(cube_kernels))]
    unreachable!("applies only with a cube backend")
}

/// The kernels (CubeCL: compiled for the backend's device at first use).
#[cfg(cube_kernels)]
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

/// The launches, and the autodiff node (any cube backend without fusion).
#[cfg(cube_kernels)]
pub(super) use cube::{backward, forward};

#[cfg(cube_kernels)]
mod cube {
    use burn::backend::autodiff::checkpoint::base::Checkpointer;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::autodiff::grads::Gradients;
    use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
    use burn::backend::Autodiff;
    use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};
    use burn_cubecl::kernel::into_contiguous;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::CubeRuntime;

    use super::kernels::{bias_gelu_kernel, gelu_backward_kernel};
    use crate::engine::model::cube::ops::{empty, grid};
    use crate::engine::model::cube::{prim, wrap, Plain};

    /// The kernel: `(x, gelu(x))` for `x = u + bias`.
    pub fn forward<R: CubeRuntime>(
        u: CubeTensor<R>,
        bias: CubeTensor<R>,
    ) -> (CubeTensor<R>, CubeTensor<R>) {
        let (u, bias) = (into_contiguous(u), into_contiguous(bias));
        let (x, out) = (empty(&u, u.shape()), empty(&u, u.shape()));
        let (count, dim) = grid(&u, u.shape().num_elements());
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
    pub fn backward<R: CubeRuntime>(x: CubeTensor<R>, g: CubeTensor<R>) -> CubeTensor<R> {
        let g = into_contiguous(g);
        let dx = empty(&x, x.shape());
        let (count, dim) = grid(&x, x.shape().num_elements());
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

    pub fn plain<B: Plain>(u: Tensor<B, 3>, bias: Tensor<B, 1>) -> Tensor<B, 3> {
        wrap(forward(prim(u), prim(bias)).1)
    }

    #[derive(Debug)]
    struct BiasGelu;

    /// `x = u + bias`, and the bias's length.
    struct State<B: Plain>(CubeTensor<B::Runtime>, usize);

    impl<B: Plain> Clone for State<B> {
        fn clone(&self) -> Self {
            Self(self.0.clone(), self.1)
        }
    }

    impl<B: Plain> std::fmt::Debug for State<B> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "State({:?})", self.0.shape())
        }
    }

    impl<B: Plain> Backward<B, 2> for BiasGelu {
        type State = State<B>;

        fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
            let State(x, f) = ops.state;
            let g = B::cube(grads.consume::<B>(&ops.node));
            let dx = backward(x, g);
            let [pu, pbias] = ops.parents;
            if let Some(node) = pbias {
                // Summed over every row: [rows, f] → [1, f] → [f].
                let dx: Tensor<B, 3> = wrap(dx.clone());
                let rows = dx.shape().num_elements() / f;
                let db = dx.reshape([rows, f]).sum_dim(0).reshape([f]);
                grads.register::<B>(node.id, db.into_primitive().tensor());
            }
            if let Some(node) = pu {
                grads.register::<B>(node.id, B::float(dx));
            }
        }
    }

    pub fn tracked<B: Plain>(
        u: Tensor<Autodiff<B>, 3>,
        bias: Tensor<Autodiff<B>, 1>,
    ) -> Tensor<Autodiff<B>, 3> {
        let (u, bias) = (u.into_primitive().tensor(), bias.into_primitive().tensor());
        let f = bias.primitive.shape().num_elements();
        let (up, bp) = (B::cube(u.primitive), B::cube(bias.primitive));
        let out = match BiasGelu
            .prepare::<NoCheckpointing>([u.node.clone(), bias.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, out) = forward(up, bp);
                prep.finish(State::<B>(x, f), B::float(out))
            }
            OpsKind::UnTracked(prep) => prep.finish(B::float(forward(up, bp).1)),
        };
        Tensor::from_primitive(TensorPrimitive::Float(out))
    }
}
