//! GGUF's simplest block formats (Q4_0, Q4_1, Q8_0: 32 values, one or two f16 scales)
//! dequantized in vector registers, straight to f32, bf16 or f16.
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

/// Values per block (all three formats).
pub const BLOCK_VALUES: usize = 32;

/// A block format this module dequantizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimpleBlocks {
    /// f16 d, 16 bytes of nibbles: (q - 8) * d.
    Q4_0,
    /// f16 d, f16 m, 16 bytes of nibbles: q * d + m.
    Q4_1,
    /// f16 d, 32 signed bytes: q * d.
    Q8_0,
}

impl SimpleBlocks {
    /// Bytes per block (ggml's layout: the scales first, little-endian).
    pub fn block_bytes(self) -> usize {
        match self {
            SimpleBlocks::Q4_0 => 18,
            SimpleBlocks::Q4_1 => 20,
            SimpleBlocks::Q8_0 => 34,
        }
    }
}

/// An output element type of [`dequantize`]: f32, bf16 or f16.
pub trait DequantOut: Copy + Send + Sync + 'static {
    /// Rounded to nearest even (as candle's `to_dtype`).
    fn from_f32(v: f32) -> Self;
}

macro_rules! dequant_out {
    ($($t:ty),*) => {$(
        impl DequantOut for $t {
            #[inline(always)]
            fn from_f32(v: f32) -> Self {
                <$t as Elem>::from_f32(v)
            }
        }
    )*};
}
dequant_out!(f32, bf16, f16);

/// Dequantize whole blocks of `kind` from `bytes` into `out` (32 values a block), on the
/// calling thread. Panics unless `bytes` holds exactly `out.len() / 32` blocks.
pub fn dequantize<O: DequantOut>(kind: SimpleBlocks, bytes: &[u8], out: &mut [O]) {
    assert!(
        out.len() % BLOCK_VALUES == 0 && bytes.len() == out.len() / BLOCK_VALUES * kind.block_bytes(),
        "dequantize {kind:?}: {} bytes for {} values",
        bytes.len(),
        out.len()
    );
    match kind {
        SimpleBlocks::Q4_0 => q4_0(bytes, out),
        SimpleBlocks::Q4_1 => q4_1(bytes, out),
        SimpleBlocks::Q8_0 => q8_0(bytes, out),
    }
}

#[inline(always)]
fn scale(b: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

isa_dispatch! {
    fn q8_0<O: DequantOut>(bytes: &[u8], out: &mut [O]) {
        for (b, o) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(BLOCK_VALUES)) {
            let d = scale(b, 0);
            let qs = &b[2..34];
            for j in 0..BLOCK_VALUES {
                o[j] = O::from_f32(qs[j] as i8 as f32 * d);
            }
        }
    }
}

isa_dispatch! {
    fn q4_0<O: DequantOut>(bytes: &[u8], out: &mut [O]) {
        for (b, o) in bytes.chunks_exact(18).zip(out.chunks_exact_mut(BLOCK_VALUES)) {
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
        for (b, o) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(BLOCK_VALUES)) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::k_quants::{BlockQ4_0, BlockQ4_1, BlockQ8_0, GgmlType};

    /// Random blocks as raw bytes: random quants, scales of many magnitudes and both signs
    /// (finite f16: no NaN/inf scale, which no GGUF holds).
    fn random_blocks(kind: SimpleBlocks, blocks: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 33) as u32
        };
        let scales = match kind {
            SimpleBlocks::Q4_1 => 2,
            _ => 1,
        };
        let mut bytes = Vec::new();
        for _ in 0..blocks {
            for _ in 0..scales {
                let v = (next() % 2000) as f32 * 1e-3 - 1.0;
                let v = v * 10f32.powi((next() % 9) as i32 - 6);
                bytes.extend(f16::from_f32(v).to_le_bytes());
            }
            for _ in 0..kind.block_bytes() - 2 * scales {
                bytes.push(next() as u8);
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
        }
    }

    #[test]
    fn dequantized_values_are_candles_bit_for_bit_in_every_output_type() {
        for kind in [SimpleBlocks::Q4_0, SimpleBlocks::Q4_1, SimpleBlocks::Q8_0] {
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
