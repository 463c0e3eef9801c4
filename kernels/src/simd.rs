//! Which vector instructions our own loops are compiled for.
//!
//! The crate is built for the baseline x86-64 target (SSE2), so a plain loop such as
//! the softmax rows of attention runs 4 lanes wide even on an AVX-512 CPU. The GEMMs
//! dispatch inside the `gemm` crate; for our loops, [`isa_dispatch!`] compiles one
//! function body three times (baseline, AVX2+FMA, AVX-512) and picks one at run time.
//!
//! `LORA_KERNELS_ISA=avx2` or `=baseline` caps the choice: `benches/run.sh --isa avx2`
//! uses it to measure the AVX2 code paths on an AVX-512 host.
use std::sync::OnceLock;

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Isa {
    Baseline,
    Avx2,
    Avx512,
}

/// The widest instruction set this CPU has, capped by `LORA_KERNELS_ISA`.
pub fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let cap = match std::env::var("LORA_KERNELS_ISA").ok().as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("") | Some("native") => Isa::Avx512,
            Some("avx2") => Isa::Avx2,
            Some("baseline") | Some("sse2") => Isa::Baseline,
            Some(other) => {
                eprintln!("warning: LORA_KERNELS_ISA={other} is not one of native, avx2, baseline; using native");
                Isa::Avx512
            }
        };
        detected().min(cap)
    })
}

#[cfg(target_arch = "x86_64")]
fn detected() -> Isa {
    if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Isa::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Isa::Avx2
    } else {
        Isa::Baseline
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detected() -> Isa {
    Isa::Baseline
}

/// Defines `fn name(args) -> ret { body }` (or `fn name<T: Bound>(...)`, one type
/// parameter) whose body is compiled for baseline x86-64,
/// AVX2+FMA and AVX-512 and chosen by [`isa`] at each call (a cached load). The body
/// must be safe code; everything it calls that is `#[inline]` is compiled with the
/// wider instructions too, but a closure it passes elsewhere is not (measured: the
/// attention forward ran 20% slower with its softmax rows in a closure), so keep hot
/// loops in the body itself.
macro_rules! isa_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident $(<$g:ident: $bound:path>)? ($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name $(<$g: $bound>)? ($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp $(<$g: $bound>)? ($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,fma")]
                unsafe fn avx512 $(<$g: $bound>)? ($($arg: $ty),*) $(-> $ret)? { imp $(::<$g>)? ($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2 $(<$g: $bound>)? ($($arg: $ty),*) $(-> $ret)? { imp $(::<$g>)? ($($arg),*) }
                match $crate::simd::isa() {
                    // SAFETY: isa() only reports instruction sets the CPU has.
                    $crate::simd::Isa::Avx512 => return unsafe { avx512 $(::<$g>)? ($($arg),*) },
                    $crate::simd::Isa::Avx2 => return unsafe { avx2 $(::<$g>)? ($($arg),*) },
                    $crate::simd::Isa::Baseline => {}
                }
            }
            imp $(::<$g>)? ($($arg),*)
        }
    };
}
pub(crate) use isa_dispatch;
