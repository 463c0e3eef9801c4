//! The GEMM ceilings and the frozen-projection shapes of a SmolLM2 step, f32 sgemm
//! (`gemm` crate) vs the AVX512-BF16 kernel (`lora_kernels::gemm_bf16`, packing
//! included). Prints one JSON line per shape.
//!
//!     gemm_bench [--reps 3] [--tokens 1024]
//!     gemm_bench --decode 1 [--reps 3]
//!
//! `--decode 1`: the decode-step shapes instead, for R = 1..256 token rows: the
//! many-row decode path (`lora_kernels::ops::gemv`, W read in place: the AVX-512 tile
//! and the portable path) against the general path: sgemm (W packed per call), for
//! bf16 weights a widened f32 copy of W first, and for bf16 x bf16 the vdpbf16ps GEMM.
use lora_benches::{time_best, cpu_info};
use lora_kernels::gemm_bf16::{self, AnyMat, Src};

#[allow(clippy::too_many_arguments)] // the gemm crate's own strided interface
fn sgemm(c: &mut [f32], m: usize, k: usize, n: usize, a: &[f32], a_rs: usize, a_cs: usize, b: &[f32], b_rs: usize, b_cs: usize) {
    let threads = rayon::current_num_threads();
    let par = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: all buffers are sized for the given shapes and strides.
    unsafe {
        gemm::gemm(m, n, k, c.as_mut_ptr(), 1, n as isize, false, a.as_ptr(), a_cs as isize, a_rs as isize, b.as_ptr(), b_cs as isize, b_rs as isize, 0.0, 1.0, false, false, false, par);
    }
}

fn main() {
    lora_benches::init_threads();
    let mut reps = 3;
    let mut tokens = 1024;
    let mut decode = false;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v: usize = it.next().and_then(|v| v.parse().ok()).expect("a number");
        match k.as_str() {
            "--reps" => reps = v,
            "--tokens" => tokens = v,
            "--decode" => decode = v != 0,
            _ => panic!("unknown argument {k}"),
        }
    }
    println!("{}", serde_json::json!({"cpu": cpu_info(), "bf16_dot": gemm_bf16::available()}));
    if decode {
        return decode_rows(reps);
    }
    // (name, m, k, n, weight transposed): forward y = x W^T (W [n, k]); dX = dY W (W [k, n]).
    let shapes = [
        ("square 2048", 2048, 2048, 2048, false),
        ("fwd q/o 576->576", tokens, 576, 576, true),
        ("fwd k/v 576->192", tokens, 576, 192, true),
        ("fwd gate/up 576->1536", tokens, 576, 1536, true),
        ("fwd down 1536->576", tokens, 1536, 576, true),
        ("dX gate/up 1536->576", tokens, 1536, 576, false),
        ("dX down 576->1536", tokens, 576, 1536, false),
        ("lm_head 576->49152 (170 rows)", 170, 576, 49152, true),
    ];
    for (name, m, k, n, wt) in shapes {
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.01).collect();
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.01).collect();
        let wb: Vec<half::bf16> = w.iter().map(|v| half::bf16::from_f32(*v)).collect();
        let mut c = vec![0f32; m * n];
        // W stored [n, k] (forward, used transposed) or [k, n] (dX).
        let (b_rs, b_cs) = if wt { (1, k) } else { (n, 1) };
        let f32_s = time_best(reps, || sgemm(&mut c, m, k, n, &x, k, 1, &w, b_rs, b_cs));
        // Today's bf16 path: widen W to f32 per call, then sgemm.
        let widen_s = time_best(reps, || {
            let wf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
            sgemm(&mut c, m, k, n, &x, k, 1, &wf, b_rs, b_cs)
        });
        let bf16_s = gemm_bf16::available().then(|| {
            time_best(reps, || {
                let xm = AnyMat::new(Src::F32(&x), m, k);
                if wt {
                    // The forward entry point: W read in place, x packed.
                    gemm_bf16::matmul_xwt(&mut c, n, false, xm, &wb, n, 1.0)
                } else {
                    let bm = AnyMat { data: Src::Bf16(&wb), rows: k, cols: n, rs: b_rs, cs: b_cs };
                    gemm_bf16::matmul(&mut c, n, false, xm, bm, 1.0)
                }
            })
        });
        let pack_s = gemm_bf16::available().then(|| {
            time_best(reps, || {
                let bm = AnyMat { data: Src::Bf16(&wb), rows: k, cols: n, rs: b_rs, cs: b_cs };
                std::hint::black_box(gemm_bf16::PackedB::new(&bm));
            })
        });
        let gf = |s: f64| 2.0 * (m * k * n) as f64 / s / 1e9;
        println!(
            "{}",
            serde_json::json!({"shape": name, "m": m, "k": k, "n": n,
                "f32_gflops": gf(f32_s), "bf16_widen_f32_gflops": gf(widen_s), "bf16_dot_gflops": bf16_s.map(gf),
                "bf16_pack_b_share": bf16_s.zip(pack_s).map(|(t, p)| p / t)})
        );
    }
}

/// Decode-step projections at R rows, as GFLOP/s: the many-row path (the AVX-512
/// register tile where the CPU has it, `tile_*`), the portable path it replaced
/// (`portable_*`: 4 rows of W against one token row, what ran up to 8 / 16 rows before),
/// and the general path past the row limit: sgemm (f32 W), widen W to f32 then sgemm
/// (bf16 W), and for bf16 rows x bf16 W the vdpbf16ps GEMM (`gemm_bf16::matmul_xwt`)
/// against the tile on vdpbf16ps.
fn decode_rows(reps: usize) {
    use lora_kernels::ops::gemv::{force_portable, gemv_rows, gemv_rows_bf16_dot, tile_available, Weights};
    println!("{}", serde_json::json!({"tile": tile_available(), "load_1min": load_avg()}));
    let shapes = [("q/o 576->576", 576, 576), ("gate/up 576->1536", 576, 1536), ("down 1536->576", 1536, 576), ("lm_head 576->49152", 576, 49152)];
    let r1 = |v: f64| (v * 10.0).round() / 10.0;
    for (name, k, n) in shapes {
        let w: Vec<f32> = (0..k * n).map(|i| ((i * 5 % 11) as f32 - 5.0) * 0.01).collect();
        let wb: Vec<half::bf16> = w.iter().map(|v| half::bf16::from_f32(*v)).collect();
        for m in [1, 2, 4, 8, 16, 32, 64, 128, 256] {
            let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 13) as f32 - 6.0) * 0.01).collect();
            let mut c = vec![0f32; m * n];
            let gf = |s: f64| r1(2.0 * (m * k * n) as f64 / s / 1e9);
            let tile_f32 = time_best(reps, || gemv_rows(&x, m, k, &Weights::F32(&w), n, &mut c, false));
            let portable_f32 = force_portable(|| time_best(reps, || gemv_rows(&x, m, k, &Weights::F32(&w), n, &mut c, false)));
            let sgemm_f32 = time_best(reps, || sgemm(&mut c, m, k, n, &x, k, 1, &w, 1, k));
            let tile_bf16 = time_best(reps, || gemv_rows(&x, m, k, &Weights::Bf16(&wb), n, &mut c, false));
            let portable_bf16 = force_portable(|| time_best(reps, || gemv_rows(&x, m, k, &Weights::Bf16(&wb), n, &mut c, false)));
            let widen_bf16 = time_best(reps, || {
                let wf: Vec<f32> = wb.iter().map(|v| v.to_f32()).collect();
                sgemm(&mut c, m, k, n, &x, k, 1, &wf, 1, k)
            });
            let (tile_dot, gemm_dot) = if gemm_bf16::available() {
                let t = time_best(reps, || gemv_rows_bf16_dot(&x, m, k, &wb, n, &mut c, false));
                let g = time_best(reps, || gemm_bf16::matmul_xwt(&mut c, n, false, AnyMat::new(Src::F32(&x), m, k), &wb, n, 1.0));
                (Some(gf(t)), Some(gf(g)))
            } else {
                (None, None)
            };
            println!(
                "{}",
                serde_json::json!({"shape": name, "rows": m,
                    "f32_tile": gf(tile_f32), "f32_portable": gf(portable_f32), "f32_sgemm": gf(sgemm_f32),
                    "bf16_tile": gf(tile_bf16), "bf16_portable": gf(portable_bf16), "bf16_widen_sgemm": gf(widen_bf16),
                    "dot_tile": tile_dot, "dot_gemm_bf16": gemm_dot, "load_1min": load_avg()})
            );
        }
    }
}

/// The 1-minute load average (the machine is shared), or -1 where unknown.
fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg").ok().and_then(|s| s.split_whitespace().next()?.parse().ok()).unwrap_or(-1.0)
}
