//! The CUDA C sources of lora-kernels and how NVRTC compiles them. Plain Rust with no
//! dependencies: the runtime compiler (`cuda::nvrtc`, feature `cuda`) and the GPU-less CI
//! compile check (`tools/cuda-check`) include this same file, so CI checks exactly the
//! sources and options the trainer compiles at run time.

/// Helpers prepended to every module (type conversions, vector loads, mma.sync wrappers).
pub const COMMON: &str = include_str!("src/common.cuh");

/// One NVRTC compilation unit and the `extern "C"` kernels it defines.
pub struct KernelModule {
    pub name: &'static str,
    pub source: &'static str,
    pub kernels: &'static [&'static str],
}

macro_rules! per_dtype {
    ($($k:literal),*) => { &[$(concat!($k, "_bf16"), concat!($k, "_f16")),*] };
}

pub const MODULES: &[KernelModule] = &[
    KernelModule {
        name: "lora_linear",
        source: include_str!("src/lora_linear.cu"),
        kernels: per_dtype!("lora_fwd", "lora_fwd_f32out", "lora_bwd_dx", "lora_bwd_dx_f32out", "lora_wgrad_tf", "lora_wgrad_ft"),
    },
    KernelModule {
        name: "lora_f32",
        source: include_str!("src/lora_f32.cu"),
        kernels: &["lora_fwd_float", "lora_fwd_f32out_float", "lora_bwd_dx_float", "lora_bwd_dx_f32out_float", "lora_wgrad_float"],
    },
    KernelModule { name: "lora_tf32", source: include_str!("src/lora_tf32.cu"), kernels: &["lora_fwd_tf32", "lora_bwd_dx_tf32"] },
    KernelModule {
        name: "rms_norm",
        source: include_str!("src/rms_norm.cu"),
        kernels: &[
            "rms_norm_fwd_bf16", "rms_norm_fwd_f16", "rms_norm_fwd_float",
            "rms_norm_bwd_bf16", "rms_norm_bwd_f16", "rms_norm_bwd_float",
            "rms_norm_bwd_dw_bf16", "rms_norm_bwd_dw_f16", "rms_norm_bwd_dw_float",
        ],
    },
    KernelModule { name: "rope", source: include_str!("src/rope.cu"), kernels: &["rope_bf16", "rope_f16", "rope_float"] },
    KernelModule {
        name: "softmax",
        source: include_str!("src/softmax.cu"),
        kernels: &["softmax_fwd_bf16", "softmax_fwd_f16", "softmax_fwd_float", "softmax_bwd_bf16", "softmax_bwd_f16", "softmax_bwd_float"],
    },
    KernelModule {
        name: "swiglu",
        source: include_str!("src/swiglu.cu"),
        kernels: &["swiglu_fwd_bf16", "swiglu_fwd_f16", "swiglu_fwd_float", "swiglu_bwd_bf16", "swiglu_bwd_f16", "swiglu_bwd_float"],
    },
    KernelModule {
        name: "cross_entropy",
        source: include_str!("src/cross_entropy.cu"),
        kernels: &["ce_rows_bf16", "ce_rows_f16", "ce_rows_float"],
    },
    KernelModule {
        name: "sgmv",
        source: include_str!("src/sgmv.cu"),
        kernels: &[
            "sgmv_shrink_bf16", "sgmv_shrink_f16", "sgmv_shrink_float", "sgmv_expand",
            "sgmv_wgrad_a_bf16", "sgmv_wgrad_a_f16", "sgmv_wgrad_a_float",
            "sgmv_wgrad_b_bf16", "sgmv_wgrad_b_f16", "sgmv_wgrad_b_float",
        ],
    },
    KernelModule {
        name: "attention",
        source: include_str!("src/attention.cu"),
        kernels: &[
            "attn_fwd_bf16_d64", "attn_fwd_bf16_d128", "attn_fwd_bf16_d256",
            "attn_bwd_bf16_d64", "attn_bwd_bf16_d128", "attn_bwd_bf16_d256", "attn_bwd_dot_bf16",
            "attn_fwd_f16_d64", "attn_fwd_f16_d128", "attn_fwd_f16_d256",
            "attn_bwd_f16_d64", "attn_bwd_f16_d128", "attn_bwd_f16_d256", "attn_bwd_dot_f16",
            "attn_fwd_float_d64", "attn_fwd_float_d128", "attn_fwd_float_d256",
            "attn_bwd_float_d64", "attn_bwd_float_d128", "attn_bwd_float_d256", "attn_bwd_dot_float",
            "attn_seg_starts",
            "attn_fwd_tc_bf16_d64", "attn_fwd_tc_bf16_d128", "attn_fwd_tc_f16_d64", "attn_fwd_tc_f16_d128",
            "attn_prefix_fwd_bf16_d64", "attn_prefix_fwd_bf16_d128", "attn_prefix_fwd_bf16_d256",
            "attn_prefix_fwd_f16_d64", "attn_prefix_fwd_f16_d128", "attn_prefix_fwd_f16_d256",
            "attn_prefix_fwd_float_d64", "attn_prefix_fwd_float_d128", "attn_prefix_fwd_float_d256",
        ],
    },
    KernelModule { name: "adamw", source: include_str!("src/adamw.cu"), kernels: &["adamw_multi", "sqnorm_multi"] },
    KernelModule {
        name: "dequant",
        source: include_str!("src/dequant.cu"),
        kernels: &["nf4_dequant_bf16", "nf4_dequant_f16", "nf4_dequant_float", "int8_dequant_bf16", "int8_dequant_f16", "int8_dequant_float"],
    },
];

/// Architectures CI compiles for (Ampere, Hopper). At run time the device's own
/// `sm_XY` is used.
pub const CI_ARCHS: &[&str] = &["sm_80", "sm_90"];

/// The full text NVRTC compiles for `module`.
pub fn full_source(module: &KernelModule) -> String {
    format!("{COMMON}\n#line 1 \"{}.cu\"\n{}", module.name, module.source)
}

/// NVRTC options for an architecture such as `sm_80`. No include paths: the sources
/// use no CUDA headers.
pub fn nvrtc_options(arch: &str) -> Vec<String> {
    vec![
        format!("--gpu-architecture={arch}"),
        "--std=c++17".to_string(),
        "--use_fast_math".to_string(),
        "-default-device".to_string(),
        "-DLORA_KERNELS_NVRTC=1".to_string(),
    ]
}

/// FNV-1a 64 of everything that determines the PTX: source, options, compiler version.
/// Used as the on-disk cache key.
pub fn cache_key(module: &KernelModule, arch: &str, nvrtc_version: (i32, i32)) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut feed = |bytes: &[u8]| {
        for b in bytes {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    feed(full_source(module).as_bytes());
    for o in nvrtc_options(arch) {
        feed(o.as_bytes());
    }
    feed(format!("{}.{}", nvrtc_version.0, nvrtc_version.1).as_bytes());
    format!("{}-{arch}-{h:016x}", module.name)
}
