//! GGUF block dequantization, one thread: candle's `to_float` against
//! `lora_kernels::dequant` (what a kept GGUF base runs for every projection of every
//! decode step), f32 output, 7 M values (8 SmolLM2 gate projections) per format.
//!
//!     target/release/dequant_bench
use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType};
use lora_kernels::dequant::{dequantize, SimpleBlocks};
use std::time::Instant;

fn bench<T: GgmlType>(kind: SimpleBlocks) {
    let n = 576 * 1536 * 8;
    let xs: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 * 1e-3 - 0.5).collect();
    let mut blocks = vec![T::zeros(); n / T::BLCK_SIZE];
    T::from_float(&xs, &mut blocks);
    // SAFETY: the blocks are plain old data; the slice covers exactly their bytes.
    let bytes = unsafe { std::slice::from_raw_parts(blocks.as_ptr() as *const u8, std::mem::size_of_val(blocks.as_slice())) };
    let mut out = vec![0f32; n];
    let reps = 5;
    let t = Instant::now();
    for _ in 0..reps {
        T::to_float(&blocks, &mut out);
    }
    let candle = t.elapsed().as_secs_f64() / reps as f64;
    let t = Instant::now();
    for _ in 0..reps {
        dequantize(kind, bytes, &mut out);
    }
    let ours = t.elapsed().as_secs_f64() / reps as f64;
    let ns = |s: f64| s * 1e9 / n as f64;
    println!(
        "{{\"format\":\"{kind:?}\",\"candle_ns_per_value\":{:.3},\"ours_ns_per_value\":{:.3},\"speedup\":{:.2},\"isa\":\"{:?}\"}}",
        ns(candle),
        ns(ours),
        candle / ours,
        lora_kernels::simd::isa()
    );
}

fn main() {
    bench::<BlockQ4_0>(SimpleBlocks::Q4_0);
    bench::<BlockQ4_1>(SimpleBlocks::Q4_1);
    bench::<BlockQ8_0>(SimpleBlocks::Q8_0);
    bench::<BlockQ4K>(SimpleBlocks::Q4K);
    bench::<BlockQ5K>(SimpleBlocks::Q5K);
    bench::<BlockQ6K>(SimpleBlocks::Q6K);
}
