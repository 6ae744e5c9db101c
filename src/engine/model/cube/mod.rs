//! Fused operations for burn's cube backends without fusion (wgpu; CUDA built without
//! `cuda-fusion`), written in CubeCL with their own backward, like the CPU's
//! [`super::fused`]: where burn's composition launches one kernel per tensor operation, the
//! attention block here is 8 or 9 launches forward (burn's products included) and about 16
//! backward. On a GPU a TLB step is launch-bound (small tensors, a recurrence over chunks), so
//! launches saved are time saved.
//!
//! The model code stays generic: each operation is chosen by comparing `TypeId`s with the
//! backends it is written for ([`is_cube`]), and falls back to burn's composition elsewhere.

pub mod adamw;
#[cfg(cube_kernels)]
mod attention;
#[cfg(cube_kernels)]
pub(crate) mod block;
pub mod gelu;
#[cfg(cube_kernels)]
mod kernels;
#[cfg(cube_kernels)]
mod ops;

pub use gelu::{applies as gelu_applies, bias_gelu};

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use super::fused::BlockInputs;
#[cfg(cube_kernels)]
use super::same_type;
#[cfg(cube_kernels)]
pub(crate) use plain::{prim, wrap, Cube, Plain};

/// The cube backends' tensors as the kernels take them.
#[cfg(cube_kernels)]
mod plain {
    use burn::tensor::backend::Backend;
    use burn::tensor::{Tensor, TensorPrimitive};
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

    /// A cube backend without fusion: its float tensors are the `CubeTensor`s kernels take.
    pub trait Plain: Backend {
        type Runtime: CubeRuntime;
        fn cube(t: Self::FloatTensorPrimitive) -> CubeTensor<Self::Runtime>;
        fn float(t: CubeTensor<Self::Runtime>) -> Self::FloatTensorPrimitive;
    }

    impl<R: CubeRuntime, F: FloatElement, I: IntElement, BT: BoolElement> Plain
        for CubeBackend<R, F, I, BT>
    {
        type Runtime = R;
        fn cube(t: Self::FloatTensorPrimitive) -> CubeTensor<R> {
            t
        }
        fn float(t: CubeTensor<R>) -> Self::FloatTensorPrimitive {
            t
        }
    }

    pub type Cube<B> = CubeTensor<<B as Plain>::Runtime>;

    /// `t`'s `CubeTensor`.
    pub fn prim<B: Plain, const D: usize>(t: Tensor<B, D>) -> Cube<B> {
        B::cube(t.into_primitive().tensor())
    }

    /// `t` as a tensor of `B`.
    pub fn wrap<B: Plain, const D: usize>(t: Cube<B>) -> Tensor<B, D> {
        Tensor::from_primitive(TensorPrimitive::Float(B::float(t)))
    }
}

thread_local! {
    static CALLS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    static BLOCK_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with [`run_block`] switched off on this thread: burn's composition runs the
/// blocks, with the other fused operations (bias + GELU) still on, so that tests compare the
/// block's kernels with a composition computing the same GELU (burn's own erf is coarser).
pub fn without_block<T>(f: impl FnOnce() -> T) -> T {
    let before = BLOCK_OFF.with(|b| b.replace(true));
    let out = f();
    BLOCK_OFF.with(|b| b.set(before));
    out
}

/// How many fused cube operations this thread has run (tests check the path is taken).
pub fn calls() -> u64 {
    CALLS.with(std::cell::Cell::get)
}

/// Runs `$plain` with the type `$P` naming the plain cube backend `$B` is, or `$tracked`
/// (where given) where `$B` is that backend under autodiff, and returns from the enclosing
/// function; for any other backend, `$other` (default: unreachable). The one list of the
/// backends the kernels run on.
#[cfg(cube_kernels)]
macro_rules! dispatch {
    ($B:ty, $P:ident => $plain:expr $(, $tracked:expr)?; else $other:expr) => {{
        use std::any::TypeId;
        let id = TypeId::of::<$B>();
        #[cfg(feature = "wgpu")]
        {
            type $P = crate::engine::backend::Wgpu;
            if id == TypeId::of::<$P>() {
                return $plain;
            }
            $(if id == TypeId::of::<burn::backend::Autodiff<$P>>() {
                return $tracked;
            })?
        }
        #[cfg(all(feature = "cuda", not(feature = "cuda-fusion")))]
        {
            type $P = crate::engine::backend::Cuda;
            if id == TypeId::of::<$P>() {
                return $plain;
            }
            $(if id == TypeId::of::<burn::backend::Autodiff<$P>>() {
                return $tracked;
            })?
        }
        $other
    }};
    ($B:ty, $P:ident => $plain:expr $(, $tracked:expr)?) => {
        $crate::engine::model::cube::dispatch!(
            $B, $P => $plain $(, $tracked)?; else unreachable!("not a cube backend")
        )
    };
}
#[cfg(cube_kernels)]
pub(crate) use dispatch;

/// Whether `B` is a cube backend the kernels here run on (plain or under autodiff).
pub fn is_cube<B: Backend>() -> bool {
    #[cfg(cube_kernels)]
    {
        dispatch!(B, P => true, true; else false)
    }
    #[cfg(not(cube_kernels))]
    false
}

/// Whether blocks on `B` run as [`run_block`] on this thread: a cube backend, unless fused
/// operations are switched off (`fused::with_unfused`, `tlb bench --unfused`,
/// [`without_block`]).
pub fn block_applies<B: Backend>() -> bool {
    is_cube::<B>() && !super::fused::disabled() && !BLOCK_OFF.with(std::cell::Cell::get)
}

/// A block output's row standardisation (`std(x)` and `1/σ`), computed by the block's last
/// kernel together with the output: the next block that normalises the same tensor takes it
/// instead of launching its own pass. Opaque outside this module.
#[derive(Clone)]
pub struct Hat(#[allow(dead_code)] std::rc::Rc<dyn std::any::Any>);

/// The attention block (single head, f32) as the kernels of [`block`], and its output's
/// [`Hat`]; `hats`: those of the input and of the context where a block computed them. Call
/// only where [`block_applies`] holds for `B`.
pub fn run_block<B: Backend>(
    inputs: BlockInputs<B>,
    hats: [Option<&Hat>; 2],
) -> (Tensor<B, 3>, Hat) {
    CALLS.with(|c| c.set(c.get() + 1));
    #[cfg(cube_kernels)]
    {
        dispatch!(B, P => {
            let (t, hat) = block::run_plain::<P>(inputs.cast(), hats);
            (same_type(t), hat)
        }, {
            let (t, hat) = block::run_tracked::<P>(inputs.cast(), hats);
            (same_type(t), hat)
        })
    }
    #[cfg(not(cube_kernels))]
    {
        let _ = (inputs, hats);
        unreachable!("no cube backend in this build")
    }
}

/// The dropout mask of `key` (0 or `1/(1−p)`) shaped and placed like `x` (f32 on a cube
/// backend, [`is_cube`]): what burn's composition multiplies by, the values the block's
/// kernels compute where they need them.
pub fn dropout_mask<B: Backend, const D: usize>(
    x: &Tensor<B, D>,
    key: super::fused::mask::MaskKey,
) -> Tensor<B, D> {
    #[cfg(cube_kernels)]
    {
        fn on<P: Plain, const D: usize>(
            x: &Tensor<P, D>,
            key: super::fused::mask::MaskKey,
        ) -> Tensor<P, D> {
            wrap(ops::mask(&prim(x.clone()), x.shape(), key))
        }
        dispatch!(B, P => same_type(on::<P, D>(same_type(x.clone()), key)), {
            let x: Tensor<burn::backend::Autodiff<P>, D> = same_type(x.clone());
            let mask: Tensor<burn::backend::Autodiff<P>, D> =
                Tensor::from_inner(on::<P, D>(&x.inner(), key));
            same_type(mask)
        })
    }
    #[cfg(not(cube_kernels))]
    {
        let _ = (x, key);
        unreachable!("no cube backend in this build")
    }
}
