//! GGUF block formats dequantized in vector registers, straight to f32, bf16 or f16: the
//! simple ones (Q4_0, Q4_1, Q8_0: 32 values, one or two f16 scales) and the two K-quants
//! most published GGUFs are made of and Q5_K (256 values in sub-blocks with their own 6-
//! or 8-bit scales; a "Q4_K_M" file is Q4_K with some Q6_K, "Q5_K_M" Q5_K with Q6_K).
//!
//! Why here: a GGUF base kept in its blocks (`--base-quant auto`, the default for a .gguf)
//! is dequantized every decode step, every projection (`models/src/quant.rs`). candle's
//! `to_float` for these blocks is a scalar loop compiled for baseline x86-64; this one is
//! compiled for the CPU's widest instructions (`isa_dispatch!`) and narrows in the same
//! pass. The arithmetic is candle's (and llama.cpp's) exactly: `q * d` (Q8_0), `(q - 8) *
//! d` (Q4_0), `q * d + m` (Q4_1, a multiply then an add, never fused), then rounded to the
//! output type to nearest even, so the values are bit for bit those of `to_float`
//! followed by candle's `to_dtype`.
use crate::cpu::Elem;
use crate::simd::isa_dispatch;
use half::{bf16, f16};


/// A block format this module dequantizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimpleBlocks {
    /// f16 d, 16 bytes of nibbles: (q - 8) * d.
    Q4_0,
    /// f16 d, f16 m, 16 bytes of nibbles: q * d + m.
    Q4_1,
    /// f16 d, 32 signed bytes: q * d.
    Q8_0,
    /// 256 values: f16 d and dmin, 12 bytes of 6-bit sub-block scales and mins, 128 bytes
    /// of nibbles.
    Q4K,
    /// As Q4_K plus a fifth bit per value (32 bytes of high bits before the nibbles).
    Q5K,
    /// 256 values: 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 signed sub-block
    /// scales, then f16 d.
    Q6K,
}

impl SimpleBlocks {
    /// Bytes per block (ggml's layout, little-endian).
    pub fn block_bytes(self) -> usize {
        match self {
            SimpleBlocks::Q4_0 => 18,
            SimpleBlocks::Q4_1 => 20,
            SimpleBlocks::Q8_0 => 34,
            SimpleBlocks::Q4K => 144,
            SimpleBlocks::Q5K => 176,
            SimpleBlocks::Q6K => 210,
        }
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            SimpleBlocks::Q4_0 | SimpleBlocks::Q4_1 | SimpleBlocks::Q8_0 => 32,
            SimpleBlocks::Q4K | SimpleBlocks::Q5K | SimpleBlocks::Q6K => 256,
        }
    }
}

/// An output element type of [`dequantize`]: f32, bf16 or f16.
pub trait DequantOut: Copy + Send + Sync + 'static {
    /// Rounded to nearest even (as candle's `to_dtype`).
    fn from_f32(v: f32) -> Self;
    /// `o[i] = from_f32(i[i])` on the calling thread, vectorised: for callers that narrow
    /// inside their own parallel tasks.
    fn narrow_into(o: &mut [Self], i: &[f32]);
}

macro_rules! dequant_out {
    ($($t:ty),*) => {$(
        impl DequantOut for $t {
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                <$t as Elem>::from_f32(v)
            }
            fn narrow_into(o: &mut [Self], i: &[f32]) {
                crate::cpu::narrow_chunk(o, i)
            }
        }
    )*};
}
dequant_out!(f32, bf16, f16);

/// Dequantize whole blocks of `kind` from `bytes` into `out`, on the calling thread.
/// Panics unless `bytes` holds exactly `out.len() / kind.block_values()` blocks.
pub fn dequantize<O: DequantOut>(kind: SimpleBlocks, bytes: &[u8], out: &mut [O]) {
    let per = kind.block_values();
    assert!(
        out.len() % per == 0 && bytes.len() == out.len() / per * kind.block_bytes(),
        "dequantize {kind:?}: {} bytes for {} values",
        bytes.len(),
        out.len()
    );
    match kind {
        SimpleBlocks::Q4_0 => q4_0(bytes, out),
        SimpleBlocks::Q4_1 => q4_1(bytes, out),
        SimpleBlocks::Q8_0 => q8_0(bytes, out),
        SimpleBlocks::Q4K => q4k(bytes, out),
        SimpleBlocks::Q5K => q5k(bytes, out),
        SimpleBlocks::Q6K => q6k(bytes, out),
    }
}

/// Sub-block `j`'s 6-bit scale and min from Q4_K's 12 packed bytes (ggml's
/// `get_scale_min_k4`).
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4))
    }
}

/// Q4_K / Q5_K group `g` (64 values): the scale and the subtracted min of its low-nibble
/// half, then of its high-nibble half (`d * sc`, `min * m`, as candle computes them).
#[inline(always)]
fn group_scales(d: f32, min: f32, scales: &[u8], g: usize) -> [(f32, f32); 2] {
    [2 * g, 2 * g + 1].map(|j| {
        let (sc, m) = scale_min_k4(j, scales);
        (d * sc as f32, min * m as f32)
    })
}

#[inline(always)]
fn scale(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

isa_dispatch! {
    fn q8_0<O: DequantOut>(bytes: &[u8], out: &mut [O]) {
        for (b, o) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
            let d = scale(b, 0);
            let qs = &b[2..34];
            for j in 0..32 {
                o[j] = O::from_f32(qs[j] as i8 as f32 * d);
            }
        }
    }
}

isa_dispatch! {
    fn q4_0<O: DequantOut>(bytes: &[u8], out: &mut [O]) {
        for (b, o) in bytes.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
            let d = scale(b, 0);
            let qs = &b[2..18];
            let (lo, hi) = o.split_at_mut(16);
            for j in 0..16 {
                lo[j] = O::from_f32(((qs[j] & 0x0F) as i32 - 8) as f32 * d);
                hi[j] = O::from_f32(((qs[j] >> 4) as i32 - 8) as f32 * d);
            }
        }
    }
}

isa_dispatch! {
    fn q4_1<O: DequantOut>(bytes: &[u8], out: &mut [O]) {
        for (b, o) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
            let (d, m) = (scale(b, 0), scale(b, 2));
            let qs = &b[4..20];
            let (lo, hi) = o.split_at_mut(16);
            for j in 0..16 {
                lo[j] = O::from_f32((qs[j] & 0x0F) as f32 * d + m);
                hi[j] = O::from_f32((qs[j] >> 4) as f32 * d + m);
            }
        }
    }
}

isa_dispatch! {
    fn q4k<O: DequantOut>(bytes: &[u8], out: &mut [O]) {
        for (b, o) in bytes.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
            let (d, min) = (scale(b, 0), scale(b, 2));
            let (scales, qs) = (&b[4..16], &b[16..144]);
            // Four groups of 64 values: 32 bytes, low nibbles then high nibbles, each half
            // with its own sub-block scale and min.
            for (g, o) in o.chunks_exact_mut(64).enumerate() {
                let q = &qs[32 * g..32 * g + 32];
                let [(d1, m1), (d2, m2)] = group_scales(d, min, scales, g);
                let (lo, hi) = o.split_at_mut(32);
                for l in 0..32 {
                    lo[l] = O::from_f32(d1 * (q[l] & 0xF) as f32 - m1);
                    hi[l] = O::from_f32(d2 * (q[l] >> 4) as f32 - m2);
                }
            }
        }
    }
}

isa_dispatch! {
    fn q5k<O: DequantOut>(bytes: &[u8], out: &mut [O]) {
        for (b, o) in bytes.chunks_exact(176).zip(out.chunks_exact_mut(256)) {
            let (d, min) = (scale(b, 0), scale(b, 2));
            let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
            // As Q4_K; group g's low and high nibbles take bits 2g and 2g + 1 of qh as 16.
            for (g, o) in o.chunks_exact_mut(64).enumerate() {
                let q = &qs[32 * g..32 * g + 32];
                let (u1, u2) = (1u8 << (2 * g), 2u8 << (2 * g));
                let [(d1, m1), (d2, m2)] = group_scales(d, min, scales, g);
                let (lo, hi) = o.split_at_mut(32);
                for l in 0..32 {
                    let add1 = if qh[l] & u1 != 0 { 16f32 } else { 0f32 };
                    let add2 = if qh[l] & u2 != 0 { 16f32 } else { 0f32 };
                    lo[l] = O::from_f32(d1 * ((q[l] & 0xF) as f32 + add1) - m1);
                    hi[l] = O::from_f32(d2 * ((q[l] >> 4) as f32 + add2) - m2);
                }
            }
        }
    }
}

isa_dispatch! {
    fn q6k<O: DequantOut>(bytes: &[u8], out: &mut [O]) {
        for (b, o) in bytes.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
            let d = scale(b, 208);
            // Two halves of 128 values: 64 low-nibble bytes, 32 bytes of 2-bit high parts,
            // 8 scales (one per 16 values).
            for (h, o) in o.chunks_exact_mut(128).enumerate() {
                let (ql, qh, sc) = (&b[64 * h..64 * h + 64], &b[128 + 32 * h..128 + 32 * h + 32], &b[192 + 8 * h..192 + 8 * h + 8]);
                let (o1, rest) = o.split_at_mut(32);
                let (o2, rest) = rest.split_at_mut(32);
                let (o3, o4) = rest.split_at_mut(32);
                for l in 0..32 {
                    let is = l / 16;
                    let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                    let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                    let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                    let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                    o1[l] = O::from_f32(d * sc[is] as i8 as f32 * q1 as f32);
                    o2[l] = O::from_f32(d * sc[is + 2] as i8 as f32 * q2 as f32);
                    o3[l] = O::from_f32(d * sc[is + 4] as i8 as f32 * q3 as f32);
                    o4[l] = O::from_f32(d * sc[is + 6] as i8 as f32 * q4 as f32);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::{BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType};

    /// Random blocks as raw bytes: random quants and packed sub-block scales, f16 scales
    /// of many magnitudes and both signs (finite: no NaN/inf scale, which no GGUF holds).
    fn random_blocks(kind: SimpleBlocks, blocks: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        // Byte offsets of the f16 scales in a block.
        let f16_at: &[usize] = match kind {
            SimpleBlocks::Q4_0 | SimpleBlocks::Q8_0 => &[0],
            SimpleBlocks::Q4_1 | SimpleBlocks::Q4K | SimpleBlocks::Q5K => &[0, 2],
            SimpleBlocks::Q6K => &[208],
        };
        let mut bytes = Vec::new();
        for _ in 0..blocks {
            let start = bytes.len();
            for _ in 0..kind.block_bytes() {
                bytes.push(next() as u8);
            }
            for &at in f16_at {
                let v = (next() % 2000) as f32 * 1e-3 - 1.0;
                let v = v * 10f32.powi((next() % 9) as i32 - 6);
                bytes[start + at..start + at + 2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
            }
        }
        bytes
    }

    /// candle's `to_float` for the same bytes.
    fn reference(kind: SimpleBlocks, bytes: &[u8]) -> Vec<f32> {
        fn run<T: GgmlType>(bytes: &[u8]) -> Vec<f32> {
            assert_eq!(bytes.len() % std::mem::size_of::<T>(), 0);
            let n = bytes.len() / std::mem::size_of::<T>();
            // Copy into T-aligned storage first (a Vec<u8> is only 1-aligned).
            let mut blocks: Vec<T> = vec![T::zeros(); n];
            // SAFETY: `blocks` holds exactly bytes.len() bytes of plain-old-data blocks.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), blocks.as_mut_ptr() as *mut u8, bytes.len()) };
            let mut out = vec![0f32; n * T::BLCK_SIZE];
            T::to_float(&blocks, &mut out);
            out
        }
        match kind {
            SimpleBlocks::Q4_0 => run::<BlockQ4_0>(bytes),
            SimpleBlocks::Q4_1 => run::<BlockQ4_1>(bytes),
            SimpleBlocks::Q8_0 => run::<BlockQ8_0>(bytes),
            SimpleBlocks::Q4K => run::<BlockQ4K>(bytes),
            SimpleBlocks::Q5K => run::<BlockQ5K>(bytes),
            SimpleBlocks::Q6K => run::<BlockQ6K>(bytes),
        }
    }

    #[test]
    fn dequantized_values_are_candles_bit_for_bit_in_every_output_type() {
        for kind in [SimpleBlocks::Q4_0, SimpleBlocks::Q4_1, SimpleBlocks::Q8_0, SimpleBlocks::Q4K, SimpleBlocks::Q5K, SimpleBlocks::Q6K] {
            for seed in 0..4 {
                let bytes = random_blocks(kind, 37, seed);
                let want = reference(kind, &bytes);
                let mut got = vec![0f32; want.len()];
                dequantize(kind, &bytes, &mut got);
                assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == b.to_bits()), "{kind:?} f32");
                let mut got = vec![bf16::ZERO; want.len()];
                dequantize(kind, &bytes, &mut got);
                assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == bf16::from_f32(*b).to_bits()), "{kind:?} bf16");
                let mut got = vec![f16::ZERO; want.len()];
                dequantize(kind, &bytes, &mut got);
                assert!(got.iter().zip(&want).all(|(a, b)| a.to_bits() == f16::from_f32(*b).to_bits()), "{kind:?} f16");
            }
        }
    }

    #[test]
    #[should_panic(expected = "bytes for")]
    fn refuses_a_partial_block() {
        let mut out = vec![0f32; 32];
        dequantize(SimpleBlocks::Q8_0, &[0u8; 33], &mut out);
    }
}
