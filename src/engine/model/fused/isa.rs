//! Which SIMD width the host kernels run at: the widest the CPU has among those they are
//! compiled for, held lower on a thread by [`with_isa_at_most`] (tests run the AVX2 and the
//! baseline paths on an AVX-512 host that way, in the same build).

use std::cell::Cell;
use std::sync::OnceLock;

/// The instruction sets the host kernels are compiled for, narrowest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// Plain x86-64 (SSE2) or another architecture.
    Baseline,
    /// AVX2 with FMA (x86-64-v3).
    Avx2,
    /// AVX-512F and VL (x86-64-v4); only with the `avx512` cargo feature.
    Avx512,
}

thread_local! {
    static CAP: Cell<Isa> = const { Cell::new(Isa::Avx512) };
}

/// The widest instruction set this CPU has that the kernels are compiled for.
pub fn detected() -> Isa {
    static DETECTED: OnceLock<Isa> = OnceLock::new();
    *DETECTED.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if cfg!(feature = "avx512") && has!("avx512f") && has!("avx512vl") {
                return Isa::Avx512;
            }
            if has!("avx2") && has!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Baseline
    })
}

/// The instruction set the kernels use on this thread now: [`detected`], at most the cap.
#[inline]
pub fn isa() -> Isa {
    detected().min(CAP.with(Cell::get))
}

/// Runs `f` with this thread's host kernels held to `cap` or narrower (the fused block, its
/// GELU and dropout masks; `gemm`'s own dispatch is not affected). The previous cap comes
/// back afterwards, also when `f` panics.
pub fn with_isa_at_most<T>(cap: Isa, f: impl FnOnce() -> T) -> T {
    struct Restore(Isa);
    impl Drop for Restore {
        fn drop(&mut self) {
            CAP.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(CAP.with(|c| c.replace(cap)));
    f()
}

/// Defines `fn` so that its body is compiled three times (baseline x86-64, AVX2+FMA,
/// AVX-512 with the `avx512` feature) and the one [`isa`] names is run.
/// The bodies are plain loops the compiler vectorises for each width.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn body($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                use $crate::engine::model::fused::isa::{isa, Isa};
                #[cfg(feature = "avx512")]
                #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { body($($arg),*) }
                let isa = isa();
                #[cfg(feature = "avx512")]
                if isa == Isa::Avx512 {
                    // SAFETY: the CPU has the features v4 is compiled for (`detected`).
                    return unsafe { v4($($arg),*) };
                }
                if isa >= Isa::Avx2 {
                    // SAFETY: the CPU has the features v3 is compiled for (`detected`).
                    return unsafe { v3($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}
pub(crate) use multiversion;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_holds_inside_and_comes_back_after() {
        let widest = detected();
        assert_eq!(isa(), widest);
        with_isa_at_most(Isa::Baseline, || {
            assert_eq!(isa(), Isa::Baseline);
            // A wider cap inside a narrower one widens again, never past the CPU.
            with_isa_at_most(Isa::Avx512, || assert_eq!(isa(), widest));
            assert_eq!(isa(), Isa::Baseline);
        });
        assert_eq!(isa(), widest);
        let caught = std::panic::catch_unwind(|| with_isa_at_most(Isa::Avx2, || panic!("boom")));
        assert!(caught.is_err());
        assert_eq!(isa(), widest, "restored after a panic");
        // Another thread starts uncapped.
        with_isa_at_most(Isa::Baseline, || {
            assert_eq!(std::thread::spawn(isa).join().unwrap(), widest)
        });
    }
}
