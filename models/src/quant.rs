//! A quantized frozen base: the projections' weights kept as NF4 (QLoRA), int8 or GGUF
//! blocks, and dequantized on the fly, one projection (or one fused q/k/v, gate/up
//! group) at a time, right before its GEMM. Embeddings and lm_head stay in the compute
//! dtype, as in QLoRA.
//!
//! With gradient checkpointing (`crate::checkpointing`) a dequantized weight lives only
//! for its GEMM in the forward and again in the layer's recompute: peak memory is the
//! quantized model plus one layer's dense weights. Without checkpointing the autograd
//! graph keeps every dequantized weight for the input gradient (so the whole base ends
//! up dense by the end of the forward); `Model::needs_checkpointing` says so.
//!
//! NF4 follows bitsandbytes 0.50 exactly (`bitsandbytes.functional.quantize_4bit` with
//! `quant_type="nf4"`, `blocksize=64`, `compress_statistics=True`; the golden test
//! compares every byte): the codes, the 8-bit double-quantized absmax (blocks of 256 over
//! `absmax - mean(absmax)`, bitsandbytes' dynamic map) and the dequantized values.
//! int8 is bitsandbytes' `int8_vectorwise_quant` of the f16 weight (what `load_in_8bit`
//! stores: one absmax per output row); bitsandbytes' int8 matmul also quantizes the
//! activations, which we do not (the frozen GEMM runs on the dequantized weight).
use anyhow::{bail, Result};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use std::sync::Arc;

/// How the frozen base is stored (`--base-quant`).
/// In a TOML config or run.json it is a string read by [`BaseQuant::parse`], so PEFT's
/// words (`load_in_4bit`) work there too.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum BaseQuant {
    /// GGUF models keep their blocks; safetensors models are stored dense.
    #[default]
    Auto,
    /// Dense in `--base-dtype` (a GGUF base is dequantized at load, as before).
    None,
    /// QLoRA's 4-bit NormalFloat with double-quantized absmax (`load_in_4bit`,
    /// `bnb_4bit_quant_type="nf4"`, `bnb_4bit_use_double_quant=True`).
    Nf4,
    /// 8-bit row-wise absmax (`load_in_8bit`).
    Int8,
}

impl BaseQuant {
    /// Accepts our names and the PEFT/transformers words users know.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "auto" => Self::Auto,
            "none" | "no" | "off" | "bf16" | "dense" => Self::None,
            "nf4" | "4bit" | "load_in_4bit" | "qlora" => Self::Nf4,
            "int8" | "8bit" | "load_in_8bit" | "llm.int8" => Self::Int8,
            other => bail!("unknown base quantization `{other}` (choose nf4, int8, none or auto; load_in_4bit and load_in_8bit are accepted)"),
        })
    }
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::None => "none",
            Self::Nf4 => "nf4",
            Self::Int8 => "int8",
        }
    }
}

impl TryFrom<String> for BaseQuant {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        Self::parse(&s).map_err(|e| e.to_string())
    }
}

impl From<BaseQuant> for String {
    fn from(q: BaseQuant) -> String {
        q.as_str().to_string()
    }
}

impl std::fmt::Display for BaseQuant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// NF4 block size (bitsandbytes' default, QLoRA's).
pub const NF4_BLOCK: usize = 64;
/// Block size of the second (8-bit) quantization of the NF4 absmax values.
pub const NF4_ABSMAX_BLOCK: usize = 256;

/// bitsandbytes' NF4 code (`get_4bit_type("nf4")`): the 16 quantiles of N(0, 1) scaled
/// to [-1, 1], sorted.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_800_998_687_7,
    -0.525_073_051_452_636_7,
    -0.394_917_488_098_144_53,
    -0.284_441_381_692_886_35,
    -0.184_773_430_228_233_34,
    -0.091_050_036_251_544_95,
    0.0,
    0.079_580_299_556_255_34,
    0.160_930_201_411_247_25,
    0.246_112_301_945_686_34,
    0.337_915_241_718_292_24,
    0.440_709_829_330_444_34,
    0.562_617_003_917_694_1,
    0.722_956_836_223_602_3,
    1.0,
];

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True)`), the
/// table `quantize_blockwise` quantizes NF4's absmax values with. Copied as bit patterns
/// from bitsandbytes 0.50.2 (tests/golden/quant): torch computes it with a vectorised
/// `linspace` whose rounding a recomputation here would not reproduce to the last bit.
const DYNAMIC_MAP_BITS: [u32; 256] = [
    0xbf7e3333, 0xbf7a999a, 0xbf770000, 0xbf736666, 0xbf6fcccd, 0xbf6c3333, 0xbf68999a, 0xbf650000,
    0xbf616666, 0xbf5dcccd, 0xbf5a3333, 0xbf56999a, 0xbf530000, 0xbf4f6666, 0xbf4bcccd, 0xbf483333,
    0xbf44999a, 0xbf410000, 0xbf3d6666, 0xbf39cccd, 0xbf363334, 0xbf32999a, 0xbf2f0000, 0xbf2b6666,
    0xbf27cccd, 0xbf243334, 0xbf20999a, 0xbf1d0000, 0xbf196666, 0xbf15cccd, 0xbf123334, 0xbf0e999a,
    0xbf0b0000, 0xbf076666, 0xbf03cccc, 0xbf003333, 0xbef93332, 0xbef20000, 0xbeeacccc, 0xbee3999a,
    0xbedc6666, 0xbed53333, 0xbece0000, 0xbec6cccc, 0xbebf999a, 0xbeb86666, 0xbeb13333, 0xbeaa0000,
    0xbea2cccc, 0xbe9b999a, 0xbe946666, 0xbe8d3334, 0xbe860000, 0xbe7d9999, 0xbe6f3333, 0xbe60cccd,
    0xbe526666, 0xbe440000, 0xbe35999a, 0xbe273333, 0xbe18cccd, 0xbe0a6666, 0xbdf80000, 0xbddb3334,
    0xbdc9eb85, 0xbdc428f7, 0xbdbe6667, 0xbdb8a3d7, 0xbdb2e148, 0xbdad1eb8, 0xbda75c2a, 0xbda1999a,
    0xbd9bd70a, 0xbd96147b, 0xbd9051eb, 0xbd8a8f5d, 0xbd84cccd, 0xbd7e147b, 0xbd728f5d, 0xbd670a3d,
    0xbd5b851f, 0xbd500000, 0xbd447ae1, 0xbd38f5c3, 0xbd2d70a3, 0xbd21eb85, 0xbd166667, 0xbd0ae148,
    0xbcfeb852, 0xbce7ae15, 0xbcd0a3d7, 0xbcb9999a, 0xbca28f5d, 0xbc8b851f, 0xbc68f5c3, 0xbc3ae148,
    0xbc1f3b64, 0xbc160418, 0xbc0ccccd, 0xbc039581, 0xbbf4bc6a, 0xbbe24dd3, 0xbbcfdf3b, 0xbbbd70a4,
    0xbbab020d, 0xbb989374, 0xbb8624dd, 0xbb676c8a, 0xbb428f5c, 0xbb1db22d, 0xbaf1a9fc, 0xbaa7ef9d,
    0xba7765ff, 0xba59e83e, 0xba3c6a80, 0xba1eecc1, 0xba016f01, 0xb9c7e283, 0xb98ce705, 0xb923d70b,
    0xb8ba1f4b, 0xb88aefb3, 0xb8378034, 0xb7b24206, 0xb70205ff, 0xb65a1a94, 0xb513a3b7, 0x00000000,
    0x3513a3b7, 0x365a1a94, 0x370205ff, 0x37b24206, 0x38378034, 0x388aefb3, 0x38ba1f4b, 0x3923d70b,
    0x398ce705, 0x39c7e283, 0x3a016f01, 0x3a1eecc1, 0x3a3c6a80, 0x3a59e83e, 0x3a7765ff, 0x3aa7ef9d,
    0x3af1a9fc, 0x3b1db22d, 0x3b428f5c, 0x3b676c8a, 0x3b8624dd, 0x3b989374, 0x3bab020d, 0x3bbd70a4,
    0x3bcfdf3b, 0x3be24dd3, 0x3bf4bc6a, 0x3c039581, 0x3c0ccccd, 0x3c160418, 0x3c1f3b64, 0x3c3ae148,
    0x3c68f5c3, 0x3c8b851f, 0x3ca28f5d, 0x3cb9999a, 0x3cd0a3d7, 0x3ce7ae15, 0x3cfeb852, 0x3d0ae148,
    0x3d166667, 0x3d21eb85, 0x3d2d70a3, 0x3d38f5c3, 0x3d447ae1, 0x3d500000, 0x3d5b851f, 0x3d670a3d,
    0x3d728f5d, 0x3d7e147b, 0x3d84cccd, 0x3d8a8f5d, 0x3d9051eb, 0x3d96147b, 0x3d9bd70a, 0x3da1999a,
    0x3da75c2a, 0x3dad1eb8, 0x3db2e148, 0x3db8a3d7, 0x3dbe6667, 0x3dc428f7, 0x3dc9eb85, 0x3ddb3334,
    0x3df80000, 0x3e0a6666, 0x3e18cccd, 0x3e273333, 0x3e35999a, 0x3e440000, 0x3e526666, 0x3e60cccd,
    0x3e6f3333, 0x3e7d9999, 0x3e860000, 0x3e8d3334, 0x3e946666, 0x3e9b999a, 0x3ea2cccc, 0x3eaa0000,
    0x3eb13333, 0x3eb86666, 0x3ebf999a, 0x3ec6cccc, 0x3ece0000, 0x3ed53333, 0x3edc6666, 0x3ee3999a,
    0x3eeacccc, 0x3ef20000, 0x3ef93332, 0x3f003333, 0x3f03cccc, 0x3f076666, 0x3f0b0000, 0x3f0e999a,
    0x3f123334, 0x3f15cccd, 0x3f196666, 0x3f1d0000, 0x3f20999a, 0x3f243334, 0x3f27cccd, 0x3f2b6666,
    0x3f2f0000, 0x3f32999a, 0x3f363334, 0x3f39cccd, 0x3f3d6666, 0x3f410000, 0x3f44999a, 0x3f483333,
    0x3f4bcccd, 0x3f4f6666, 0x3f530000, 0x3f56999a, 0x3f5a3333, 0x3f5dcccd, 0x3f616666, 0x3f650000,
    0x3f68999a, 0x3f6c3333, 0x3f6fcccd, 0x3f736666, 0x3f770000, 0x3f7a999a, 0x3f7e3333, 0x3f800000,
];

pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    MAP.get_or_init(|| DYNAMIC_MAP_BITS.map(f32::from_bits))
}

/// Index of the nearest entry of the sorted 256-entry map (bitsandbytes' CPU
/// `quantize_block`: the binary search's left neighbour, moved right when the right one
/// is strictly closer).
fn nearest_dynamic(map: &[f32; 256], x: f32) -> u8 {
    // Largest i with map[i] <= x (0 when x < map[0]).
    let mut idx = map.partition_point(|&c| c <= x).saturating_sub(1);
    if idx < 255 {
        let left = (x - map[idx]).abs();
        let right = (x - map[idx + 1]).abs();
        if right < left {
            idx += 1;
        }
    }
    idx as u8
}

/// An NF4 matrix as bitsandbytes stores it with double quantization.
#[derive(Clone, Debug)]
pub struct Nf4Matrix {
    pub rows: usize,
    pub cols: usize,
    /// Two codes a byte, the first element in the high nibble (row-major order).
    pub packed: Vec<u8>,
    /// The 64-blocks' absmax, quantized with [`dynamic_map`] after subtracting `offset`.
    pub qabsmax: Vec<u8>,
    /// One f32 scale per 256 absmax values.
    pub absmax_scale: Vec<f32>,
    /// Mean of the 64-blocks' absmax values.
    pub offset: f32,
}

impl Nf4Matrix {
    /// Quantize a row-major `[rows, cols]` matrix (values widened to f32 first).
    pub fn quantize(values: &[f32], rows: usize, cols: usize) -> Result<Self> {
        let n = rows * cols;
        if values.len() != n {
            bail!("NF4: {} values for a {rows} x {cols} matrix", values.len());
        }
        if n % NF4_BLOCK != 0 {
            bail!("NF4 needs a multiple of {NF4_BLOCK} values, got {rows} x {cols}");
        }
        // Midpoints between neighbouring codes, computed in f32 as bitsandbytes does;
        // a value's code is the number of midpoints strictly below it (torch.bucketize).
        let mids: Vec<f32> = NF4_CODE.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
        let blocks = n / NF4_BLOCK;
        let mut absmax = vec![0f32; blocks];
        let mut packed = vec![0u8; n / 2];
        packed
            .par_chunks_mut(NF4_BLOCK / 2)
            .zip(absmax.par_iter_mut())
            .zip(values.par_chunks(NF4_BLOCK))
            .for_each(|((out, am), block)| {
                let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                *am = m;
                let inv = 1.0f32 / m.max(1e-38);
                let code = |v: f32| -> u8 {
                    let s = (v * inv).clamp(-1.0, 1.0);
                    mids.partition_point(|&b| b < s) as u8
                };
                for (o, pair) in out.iter_mut().zip(block.chunks_exact(2)) {
                    *o = (code(pair[0]) << 4) | code(pair[1]);
                }
            });
        let offset = mean_f32(&absmax);
        let map = dynamic_map();
        let centered: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let mut qabsmax = vec![0u8; blocks];
        let mut absmax_scale = vec![0f32; blocks.div_ceil(NF4_ABSMAX_BLOCK)];
        qabsmax
            .par_chunks_mut(NF4_ABSMAX_BLOCK)
            .zip(absmax_scale.par_iter_mut())
            .zip(centered.par_chunks(NF4_ABSMAX_BLOCK))
            .for_each(|((out, scale), block)| {
                let m = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                *scale = m;
                for (o, v) in out.iter_mut().zip(block) {
                    *o = nearest_dynamic(map, v / m);
                }
            });
        Ok(Self { rows, cols, packed, qabsmax, absmax_scale, offset })
    }

    /// The 64-blocks' absmax as bitsandbytes dequantizes them (`code[q] * scale + offset`).
    pub fn absmax(&self) -> Vec<f32> {
        let map = dynamic_map();
        self.qabsmax.iter().enumerate().map(|(i, &q)| map[q as usize] * self.absmax_scale[i / NF4_ABSMAX_BLOCK] + self.offset).collect()
    }

    /// Dequantize into `out` (row-major, `rows * cols` values).
    pub fn dequantize_into(&self, out: &mut [f32]) {
        let absmax = self.absmax();
        out.par_chunks_mut(NF4_BLOCK).zip(self.packed.par_chunks(NF4_BLOCK / 2)).zip(absmax.par_iter()).for_each(|((o, p), &am)| {
            for (pair, &byte) in o.chunks_exact_mut(2).zip(p) {
                pair[0] = NF4_CODE[(byte >> 4) as usize] * am;
                pair[1] = NF4_CODE[(byte & 0xF) as usize] * am;
            }
        });
    }

    pub fn storage_bytes(&self) -> usize {
        self.packed.len() + self.qabsmax.len() + 4 * self.absmax_scale.len() + 4
    }
}

/// `torch.mean` of a float32 vector on CPU. ATen sums float32 with a cascade of
/// float32 partial sums; for the lengths a weight's absmax vector has, a float64 sum
/// rounded once agrees with it on the tests' matrices (the golden test checks `offset`
/// bit for bit, so a difference would show).
fn mean_f32(v: &[f32]) -> f32 {
    (v.iter().map(|&x| x as f64).sum::<f64>() / v.len().max(1) as f64) as f32
}

/// An int8 matrix as bitsandbytes' `int8_vectorwise_quant` stores it: one absmax per row.
#[derive(Clone, Debug)]
pub struct Int8Matrix {
    pub rows: usize,
    pub cols: usize,
    pub codes: Vec<i8>,
    pub row_absmax: Vec<f32>,
}

impl Int8Matrix {
    /// Quantize `[rows, cols]`; the values are first rounded to f16 as `Int8Params` does.
    pub fn quantize(values: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if values.len() != rows * cols || cols == 0 {
            bail!("int8: {} values for a {rows} x {cols} matrix", values.len());
        }
        let mut codes = vec![0i8; rows * cols];
        let mut row_absmax = vec![0f32; rows];
        codes.par_chunks_mut(cols).zip(row_absmax.par_iter_mut()).zip(values.par_chunks(cols)).for_each(|((out, am), row)| {
            let row16: Vec<f32> = row.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
            let m = row16.iter().fold(0f32, |m, v| m.max(v.abs()));
            *am = m;
            // torch evaluates `127.0 / row_stats` as `reciprocal(row_stats) * 127`
            // (Tensor.__rtruediv__), which rounds differently from a division.
            let scale = (1.0f32 / m) * 127.0;
            for (o, v) in out.iter_mut().zip(&row16) {
                // torch.round: half to even; a zero row gives NaN -> 0 as torch's cast does on x86.
                let q = (v * scale).round_ties_even();
                *o = if q.is_nan() { 0 } else { q.clamp(-127.0, 127.0) as i8 };
            }
        });
        Ok(Self { rows, cols, codes, row_absmax })
    }

    pub fn dequantize_into(&self, out: &mut [f32]) {
        out.par_chunks_mut(self.cols).zip(self.codes.par_chunks(self.cols)).zip(self.row_absmax.par_iter()).for_each(|((o, c), &am)| {
            let s = am / 127.0;
            for (o, &c) in o.iter_mut().zip(c) {
                *o = c as f32 * s;
            }
        });
    }

    pub fn storage_bytes(&self) -> usize {
        self.codes.len() + 4 * self.row_absmax.len()
    }
}

/// The stored form of one quantized projection weight.
pub enum QuantizedData {
    Nf4(Nf4Matrix),
    Int8(Int8Matrix),
    /// GGUF blocks as loaded (rows already in HF order: see `weights::GgufSource`).
    Gguf(QTensor),
    /// NF4 or int8 kept in GPU memory and dequantized there by a kernel before each use
    /// (`lora_kernels::cuda::ops::{nf4,int8}_dequantize`): nothing crosses PCIe per step.
    #[cfg(feature = "cuda")]
    OnDevice(device::DeviceQuant),
}

/// Quantized weights resident on a CUDA device.
#[cfg(feature = "cuda")]
pub mod device {
    use candle_core::{DType, Device, Tensor};

    use super::{dynamic_map, Int8Matrix, Nf4Matrix, NF4_CODE};

    pub enum DeviceQuant {
        Nf4 { packed: Tensor, qabsmax: Tensor, absmax_scale: Tensor, dmap: Tensor, code16: Tensor, offset: f32 },
        /// The i8 codes as their bytes (candle has no i8 dtype; the kernel reads them signed).
        Int8 { codes: Tensor, row_absmax: Tensor },
    }

    impl DeviceQuant {
        pub fn nf4(m: &Nf4Matrix, device: &Device) -> candle_core::Result<Self> {
            Ok(DeviceQuant::Nf4 {
                packed: Tensor::from_slice(&m.packed, m.packed.len(), device)?,
                qabsmax: Tensor::from_slice(&m.qabsmax, m.qabsmax.len(), device)?,
                absmax_scale: Tensor::from_slice(&m.absmax_scale, m.absmax_scale.len(), device)?,
                dmap: Tensor::from_slice(dynamic_map(), 256, device)?,
                code16: Tensor::from_slice(&NF4_CODE, 16, device)?,
                offset: m.offset,
            })
        }

        pub fn int8(m: &Int8Matrix, device: &Device) -> candle_core::Result<Self> {
            let bytes: Vec<u8> = m.codes.iter().map(|&c| c as u8).collect();
            Ok(DeviceQuant::Int8 { codes: Tensor::from_vec(bytes, m.codes.len(), device)?, row_absmax: Tensor::from_slice(&m.row_absmax, m.rows, device)? })
        }

        pub fn kind(&self) -> &'static str {
            match self {
                DeviceQuant::Nf4 { .. } => "nf4",
                DeviceQuant::Int8 { .. } => "int8",
            }
        }

        pub fn storage_bytes(&self) -> usize {
            match self {
                DeviceQuant::Nf4 { packed, qabsmax, absmax_scale, .. } => packed.elem_count() + qabsmax.elem_count() + 4 * absmax_scale.elem_count() + 4,
                DeviceQuant::Int8 { codes, row_absmax } => codes.elem_count() + 4 * row_absmax.elem_count(),
            }
        }

        pub fn dequantize(&self, rows: usize, cols: usize, dtype: DType) -> candle_core::Result<Tensor> {
            use lora_kernels::cuda::ops;
            match self {
                DeviceQuant::Nf4 { packed, qabsmax, absmax_scale, dmap, code16, offset } => {
                    ops::nf4_dequantize(packed, qabsmax, absmax_scale, dmap, code16, *offset, rows, cols, dtype)
                }
                DeviceQuant::Int8 { codes, row_absmax } => ops::int8_dequantize(codes, row_absmax, rows, cols, dtype),
            }
        }
    }
}

/// A quantized `[rows, cols]` weight and the dtype/device its dense form takes.
pub struct QuantizedMatrix {
    pub rows: usize,
    pub cols: usize,
    pub data: QuantizedData,
    /// dtype of the dequantized weight (the model's `--base-dtype`).
    pub dtype: DType,
    pub device: Device,
}

impl QuantizedMatrix {
    pub fn kind(&self) -> String {
        match &self.data {
            QuantizedData::Nf4(_) => "nf4".into(),
            QuantizedData::Int8(_) => "int8".into(),
            QuantizedData::Gguf(q) => format!("gguf {:?}", q.dtype()),
            #[cfg(feature = "cuda")]
            QuantizedData::OnDevice(d) => d.kind().into(),
        }
    }

    pub fn storage_bytes(&self) -> usize {
        match &self.data {
            QuantizedData::Nf4(m) => m.storage_bytes(),
            QuantizedData::Int8(m) => m.storage_bytes(),
            QuantizedData::Gguf(q) => q.storage_size_in_bytes(),
            #[cfg(feature = "cuda")]
            QuantizedData::OnDevice(d) => d.storage_bytes(),
        }
    }

    /// Dequantize into `out` (row-major f32), for the matrices kept on the host.
    fn dequantize_host(&self, out: &mut [f32]) -> Result<()> {
        match &self.data {
            QuantizedData::Nf4(m) => m.dequantize_into(out),
            QuantizedData::Int8(m) => m.dequantize_into(out),
            QuantizedData::Gguf(q) => gguf_blocks_to(q, out)?,
            #[cfg(feature = "cuda")]
            QuantizedData::OnDevice(d) => {
                let t = d.dequantize(self.rows, self.cols, DType::F32)?.to_device(&Device::Cpu)?.flatten_all()?;
                out.copy_from_slice(&t.to_vec1::<f32>()?);
            }
        }
        Ok(())
    }

    /// The dense weight, `[rows, cols]` in `dtype` on `device`.
    pub fn dequantize(&self) -> candle_core::Result<Tensor> {
        dequantize_rows(&[self])
    }
}

/// An element type GGUF blocks dequantize into: f32 (each block type's own `to_float`),
/// or bf16 / f16 (`to_float` into a task-sized f32 buffer, then narrowed there: a bf16
/// model's kept blocks used to be dequantized to a whole f32 matrix and then narrowed by
/// candle's `to_dtype` on one thread, every projection of every decode step).
trait DequantInto: lora_kernels::dequant::DequantOut {
    fn from_blocks<T: candle_core::quantized::k_quants::GgmlType>(blocks: &[T], out: &mut [Self]);
}

impl DequantInto for f32 {
    fn from_blocks<T: candle_core::quantized::k_quants::GgmlType>(blocks: &[T], out: &mut [f32]) {
        T::to_float(blocks, out)
    }
}

/// bf16 and f16: `to_float` into a task-sized f32 buffer, narrowed there.
macro_rules! dequant_narrowed {
    ($($t:ty),*) => {$(
        impl DequantInto for $t {
            fn from_blocks<T: candle_core::quantized::k_quants::GgmlType>(blocks: &[T], out: &mut [$t]) {
                let mut wide = lora_kernels::cpu::uninit::<f32>(out.len());
                T::to_float(blocks, &mut wide);
                <$t as lora_kernels::dequant::DequantOut>::narrow_into(out, &wide);
            }
        }
    )*};
}
dequant_narrowed!(half::bf16, half::f16);

/// A GGUF tensor's blocks dequantized straight into `out`, chunks of blocks in parallel.
///
/// A decode step dequantizes every projection of a GGUF base kept in blocks (`--base-quant
/// auto`), so this runs once per projection per token: candle's `QTensor::dequantize`
/// zero-fills a fresh buffer, converts on one thread, and the result was then copied twice
/// more (to a Vec, then into the fused projection's buffer). Same values: each block type's
/// own `to_float` (then rounded to `O` as candle's `to_dtype` rounds).
fn gguf_blocks_to<O: DequantInto>(q: &QTensor, out: &mut [O]) -> Result<()> {
    use candle_core::quantized::k_quants::{
        BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K, BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType,
    };
    use candle_core::quantized::GgmlDType;
    use lora_kernels::dequant::SimpleBlocks;
    use rayon::prelude::*;
    fn convert<T: GgmlType, O: DequantInto>(bytes: &[u8], out: &mut [O]) -> Result<()> {
        let size = std::mem::size_of::<T>();
        let blocks = bytes.len() / size;
        if bytes.len() % size != 0 || blocks * T::BLCK_SIZE != out.len() || bytes.as_ptr() as usize % std::mem::align_of::<T>() != 0 {
            bail!("{:?} tensor of {} bytes does not hold {} values", T::DTYPE, bytes.len(), out.len());
        }
        // SAFETY: size, count and alignment checked above; the bytes are the tensor's own
        // storage of `T` blocks (candle's `QStorage::data` borrows its `Vec<T>`).
        let xs = unsafe { std::slice::from_raw_parts(bytes.as_ptr().cast::<T>(), blocks) };
        // About 8k values per task: enough to amortise scheduling, fine enough to balance.
        let per_task = (8192 / T::BLCK_SIZE).max(1);
        // Q4_0/Q4_1/Q8_0 (SmolLM2's GGUF is Q4_1 + Q8_0) and Q4_K/Q6_K (a "Q4_K_M" file) in
        // vector registers, straight to the output type, with `to_float`'s arithmetic
        // (`lora_kernels::dequant`).
        let simple = match T::DTYPE {
            GgmlDType::Q4_0 => Some(SimpleBlocks::Q4_0),
            GgmlDType::Q4_1 => Some(SimpleBlocks::Q4_1),
            GgmlDType::Q8_0 => Some(SimpleBlocks::Q8_0),
            GgmlDType::Q4K => Some(SimpleBlocks::Q4K),
            GgmlDType::Q5K => Some(SimpleBlocks::Q5K),
            GgmlDType::Q6K => Some(SimpleBlocks::Q6K),
            _ => None,
        };
        match simple {
            Some(kind) if kind.block_bytes() == size => bytes
                .par_chunks(per_task * size)
                .zip(out.par_chunks_mut(per_task * T::BLCK_SIZE))
                .for_each(|(b, y)| lora_kernels::dequant::dequantize(kind, b, y)),
            _ => xs.par_chunks(per_task).zip(out.par_chunks_mut(per_task * T::BLCK_SIZE)).for_each(|(x, y)| O::from_blocks(x, y)),
        }
        Ok(())
    }
    let bytes = q.data()?;
    match q.dtype() {
        GgmlDType::F32 => convert::<f32, O>(&bytes, out),
        GgmlDType::F16 => convert::<half::f16, O>(&bytes, out),
        GgmlDType::BF16 => convert::<half::bf16, O>(&bytes, out),
        GgmlDType::Q4_0 => convert::<BlockQ4_0, O>(&bytes, out),
        GgmlDType::Q4_1 => convert::<BlockQ4_1, O>(&bytes, out),
        GgmlDType::Q5_0 => convert::<BlockQ5_0, O>(&bytes, out),
        GgmlDType::Q5_1 => convert::<BlockQ5_1, O>(&bytes, out),
        GgmlDType::Q8_0 => convert::<BlockQ8_0, O>(&bytes, out),
        GgmlDType::Q8_1 => convert::<BlockQ8_1, O>(&bytes, out),
        GgmlDType::Q2K => convert::<BlockQ2K, O>(&bytes, out),
        GgmlDType::Q3K => convert::<BlockQ3K, O>(&bytes, out),
        GgmlDType::Q4K => convert::<BlockQ4K, O>(&bytes, out),
        GgmlDType::Q5K => convert::<BlockQ5K, O>(&bytes, out),
        GgmlDType::Q6K => convert::<BlockQ6K, O>(&bytes, out),
        GgmlDType::Q8K => convert::<BlockQ8K, O>(&bytes, out),
    }
}

/// Several quantized weights with the same column count, dequantized into one dense
/// `[sum of rows, cols]` tensor (the fused q/k/v or gate/up GEMM).
pub fn dequantize_rows(members: &[&QuantizedMatrix]) -> candle_core::Result<Tensor> {
    let first = members.first().ok_or_else(|| candle_core::Error::Msg("dequantize_rows: no matrices".into()))?;
    let cols = first.cols;
    let rows: usize = members.iter().map(|m| m.rows).sum();
    // NF4 / int8 resident on the GPU dequantize there, one projection at a time.
    #[cfg(feature = "cuda")]
    if members.iter().all(|m| matches!(m.data, QuantizedData::OnDevice(_))) {
        let mut parts = Vec::with_capacity(members.len());
        for m in members {
            if m.cols != cols {
                candle_core::bail!("dequantize_rows: {} columns next to {cols}", m.cols);
            }
            if let QuantizedData::OnDevice(d) = &m.data {
                parts.push(d.dequantize(m.rows, m.cols, m.dtype)?);
            }
        }
        return if parts.len() == 1 { Ok(parts.remove(0)) } else { Tensor::cat(&parts, 0) };
    }
    // GGUF blocks on an accelerator dequantize there.
    if let [one] = members {
        if let QuantizedData::Gguf(q) = &one.data {
            if !one.device.is_cpu() {
                return q.dequantize(&one.device)?.to_dtype(one.dtype);
            }
        }
    }
    for m in members {
        if m.cols != cols {
            candle_core::bail!("dequantize_rows: {} columns next to {cols}", m.cols);
        }
    }
    let host = |e: anyhow::Error| candle_core::Error::Msg(format!("{e:#}"));
    // A bf16 / f16 base whose members are all GGUF blocks: straight to that dtype.
    let all_gguf = members.iter().all(|m| matches!(m.data, QuantizedData::Gguf(_)) && m.dtype == first.dtype);
    let t = match first.dtype {
        DType::BF16 if all_gguf => gguf_rows::<half::bf16>(members, rows * cols).map_err(host)?,
        DType::F16 if all_gguf => gguf_rows::<half::f16>(members, rows * cols).map_err(host)?,
        dtype => {
            // Every element is written below (each member's rows, in order), so no zero fill.
            let mut out = lora_kernels::cpu::uninit::<f32>(rows * cols);
            let mut start = 0;
            for m in members {
                let n = m.rows * cols;
                m.dequantize_host(&mut out[start..start + n]).map_err(host)?;
                start += n;
            }
            // Narrowed in parallel: candle's `to_dtype` runs on one thread (an NF4 base in
            // bf16 dequantizes every projection of every forward).
            match dtype {
                DType::BF16 => narrowed::<half::bf16>(&out)?,
                DType::F16 => narrowed::<half::f16>(&out)?,
                _ => Tensor::from_vec(out, rows * cols, &Device::Cpu)?.to_dtype(dtype)?,
            }
        }
    };
    t.reshape((rows, cols))?.to_device(&first.device)
}

/// The GGUF members' blocks dequantized straight to `O`, one after another (`len`
/// values in all), as a flat CPU tensor.
fn gguf_rows<O: DequantInto + candle_core::WithDType>(members: &[&QuantizedMatrix], len: usize) -> Result<Tensor> {
    let mut out = lora_kernels::cpu::uninit::<O>(len);
    let mut start = 0;
    for m in members {
        let n = m.rows * m.cols;
        if let QuantizedData::Gguf(q) = &m.data {
            gguf_blocks_to(q, &mut out[start..start + n])?;
        }
        start += n;
    }
    Ok(Tensor::from_vec(out, len, &Device::Cpu)?)
}

/// `v` narrowed to `O` in parallel, as a flat CPU tensor.
fn narrowed<O: lora_kernels::dequant::DequantOut + candle_core::WithDType>(v: &[f32]) -> candle_core::Result<Tensor> {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    let mut o = lora_kernels::cpu::uninit::<O>(v.len());
    o.par_chunks_mut(CHUNK).zip(v.par_chunks(CHUNK)).for_each(|(o, i)| O::narrow_into(o, i));
    Tensor::from_vec(o, v.len(), &Device::Cpu)
}

/// A frozen projection weight: dense, or quantized and dequantized when used.
#[derive(Clone)]
pub enum FrozenWeight {
    Dense(Tensor),
    Quantized(Arc<QuantizedMatrix>),
}

impl FrozenWeight {
    pub fn dims2(&self) -> (usize, usize) {
        match self {
            Self::Dense(t) => (t.dims()[0], t.dims()[1]),
            Self::Quantized(q) => (q.rows, q.cols),
        }
    }
    /// The dense weight (a cheap handle when stored dense; a fresh dequantized tensor
    /// otherwise, freed when its last user drops it).
    pub fn dense(&self) -> candle_core::Result<Tensor> {
        match self {
            Self::Dense(t) => Ok(t.clone()),
            Self::Quantized(q) => q.dequantize(),
        }
    }
    pub fn quantized(&self) -> Option<&QuantizedMatrix> {
        match self {
            Self::Dense(_) => None,
            Self::Quantized(q) => Some(q),
        }
    }
    /// Bytes this weight holds (dense views of a fused tensor count their own rows).
    pub fn storage_bytes(&self) -> usize {
        match self {
            Self::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Self::Quantized(q) => q.storage_bytes(),
        }
    }
}

/// Quantize one dense weight for `--base-quant` (nf4 or int8). `name` names the tensor in
/// the error a shape that the format cannot take gets.
pub fn quantize_weight(name: &str, w: &Tensor, quant: BaseQuant, dtype: DType, device: &Device) -> Result<QuantizedMatrix> {
    let (rows, cols) = w.dims2()?;
    let values = w.to_device(&Device::Cpu)?.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let data = match quant {
        BaseQuant::Nf4 => {
            if (rows * cols) % NF4_BLOCK != 0 {
                bail!("`{name}` ({rows} x {cols}) cannot be stored as nf4: its size is not a multiple of the {NF4_BLOCK}-value block");
            }
            QuantizedData::Nf4(Nf4Matrix::quantize(&values, rows, cols)?)
        }
        BaseQuant::Int8 => QuantizedData::Int8(Int8Matrix::quantize(&values, rows, cols)?),
        BaseQuant::None | BaseQuant::Auto => bail!("quantize_weight: `{quant}` is not a quantized format"),
    };
    // On a GPU the quantized weight moves there once; the host copy is dropped.
    #[cfg(feature = "cuda")]
    let data = match (&data, device.is_cuda()) {
        (QuantizedData::Nf4(m), true) => QuantizedData::OnDevice(device::DeviceQuant::nf4(m, device)?),
        (QuantizedData::Int8(m), true) => QuantizedData::OnDevice(device::DeviceQuant::int8(m, device)?),
        _ => data,
    };
    Ok(QuantizedMatrix { rows, cols, data, dtype, device: device.clone() })
}

/// GGUF block types whose blocks we keep and dequantize on the fly (those candle reads).
pub fn gguf_type_supported(t: GgmlDType) -> bool {
    matches!(
        t,
        GgmlDType::Q4_0
            | GgmlDType::Q4_1
            | GgmlDType::Q5_0
            | GgmlDType::Q5_1
            | GgmlDType::Q8_0
            | GgmlDType::Q2K
            | GgmlDType::Q3K
            | GgmlDType::Q4K
            | GgmlDType::Q5K
            | GgmlDType::Q6K
            | GgmlDType::F16
            | GgmlDType::BF16
            | GgmlDType::F32
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dynamic_map_is_sorted_and_spans_the_unit_range() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(m[255], 1.0);
        assert!((m[0] + 0.993).abs() < 1e-3, "{}", m[0]);
        assert!(m.contains(&0.0));
    }

    #[test]
    fn nf4_round_trip_error_is_bounded_by_half_a_code_step() -> Result<()> {
        let values: Vec<f32> = (0..4 * 256).map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 0.05).collect();
        let m = Nf4Matrix::quantize(&values, 4, 256)?;
        let mut back = vec![0f32; values.len()];
        m.dequantize_into(&mut back);
        let absmax = m.absmax();
        for (i, (v, b)) in values.iter().zip(&back).enumerate() {
            // The widest gap between NF4 codes is 0.304 (of the block's absmax).
            assert!((v - b).abs() <= 0.16 * absmax[i / NF4_BLOCK] + 1e-6, "{i}: {v} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn nf4_refuses_sizes_that_are_not_whole_blocks() {
        let w = Tensor::zeros((3, 10), DType::F32, &Device::Cpu).unwrap();
        let err = quantize_weight("model.layers.0.mlp.up_proj.weight", &w, BaseQuant::Nf4, DType::F32, &Device::Cpu).err().expect("not whole blocks");
        let msg = format!("{err:#}");
        assert!(msg.contains("up_proj") && msg.contains("nf4"), "{msg}");
    }

    #[test]
    fn int8_rounds_half_to_even_per_row() -> Result<()> {
        // 127 / 2 * 0.5 = 31.75 -> 32; a row of zeros stays zero.
        let m = Int8Matrix::quantize(&[2.0, 0.5, -2.0, 0.0, 0.0, 0.0], 2, 3)?;
        assert_eq!(m.codes, vec![127, 32, -127, 0, 0, 0]);
        assert_eq!(m.row_absmax, vec![2.0, 0.0]);
        Ok(())
    }

    /// Kept GGUF blocks of a bf16 / f16 base dequantize straight to that dtype with the
    /// values of the f32 path rounded as candle's `to_dtype` rounds (two members of
    /// different block types, as a fused q/k/v would have).
    #[test]
    fn gguf_blocks_dequantize_to_bf16_and_f16_as_f32_then_rounded() -> Result<()> {
        use candle_core::quantized::{GgmlDType, QTensor};
        let cols = 64;
        let data = |rows: usize, seed: u32| -> Result<Tensor> {
            let v: Vec<f32> = (0..rows * cols).map(|i| (((i as u32).wrapping_mul(2654435761u32) ^ seed) % 2001) as f32 * 1e-3 - 1.0).collect();
            Ok(Tensor::from_vec(v, (rows, cols), &Device::Cpu)?)
        };
        let (d41, d80) = (data(3, 7)?, data(5, 11)?);
        for dtype in [DType::BF16, DType::F16] {
            let m = |x: &Tensor, kind: GgmlDType| -> Result<QuantizedMatrix> {
                let (rows, cols) = x.dims2()?;
                Ok(QuantizedMatrix { rows, cols, data: QuantizedData::Gguf(QTensor::quantize(x, kind)?), dtype, device: Device::Cpu })
            };
            let (a, b) = (m(&d41, GgmlDType::Q4_1)?, m(&d80, GgmlDType::Q8_0)?);
            let got = dequantize_rows(&[&a, &b])?;
            assert_eq!(got.dtype(), dtype);
            let f32_of = |m: &QuantizedMatrix| match &m.data {
                QuantizedData::Gguf(q) => q.dequantize(&Device::Cpu),
                _ => unreachable!(),
            };
            let want = Tensor::cat(&[f32_of(&a)?, f32_of(&b)?], 0)?.to_dtype(dtype)?;
            let (g, w) = (got.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
            assert!(g.iter().zip(&w).all(|(x, y)| x.to_bits() == y.to_bits()), "{dtype:?}");
            // A GGUF member next to an int8 one takes the f32 path, narrowed in parallel.
            let values = d41.flatten_all()?.to_vec1::<f32>()?;
            let int8 = QuantizedMatrix { rows: 3, cols, data: QuantizedData::Int8(Int8Matrix::quantize(&values, 3, cols)?), dtype, device: Device::Cpu };
            let mixed = dequantize_rows(&[&a, &int8])?;
            let mut wide = vec![0f32; 3 * cols];
            int8.dequantize_host(&mut wide)?;
            let want = Tensor::cat(&[f32_of(&a)?, Tensor::from_vec(wide, (3, cols), &Device::Cpu)?], 0)?.to_dtype(dtype)?;
            assert_eq!(mixed.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, want.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, "{dtype:?} mixed");
        }
        Ok(())
    }

    #[test]
    fn base_quant_accepts_peft_words() -> Result<()> {
        assert_eq!(BaseQuant::parse("load_in_4bit")?, BaseQuant::Nf4);
        assert_eq!(BaseQuant::parse("load-in-8bit")?, BaseQuant::Int8);
        assert_eq!(BaseQuant::parse("NF4")?, BaseQuant::Nf4);
        assert!(BaseQuant::parse("fp4").is_err());
        Ok(())
    }
}
