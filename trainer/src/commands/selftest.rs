//! `lora-train selftest --device cuda:0`: every CUDA kernel against the CPU
//! implementation on fresh random inputs of several shapes (forward and every gradient,
//! relative L2 error with a per-dtype threshold, pass/fail), then the fused LoRA linear
//! (bf16 and f32) and the flash attention timed against the unfused composite paths. The one command a GPU user runs to trust the
//! build. Without a GPU (or without the `cuda` feature) it says so and exits non-zero.
use crate::device;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The GPU to test.
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Print one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
    /// Skip the timing part.
    #[arg(long)]
    pub no_bench: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    match device::parse_spec(&args.device)? {
        device::DeviceSpec::Cuda(_) | device::DeviceSpec::Auto => {}
        device::DeviceSpec::Cpu => anyhow::bail!("selftest checks the CUDA kernels: give --device cuda:N"),
    }
    if !device::CUDA_BUILT {
        anyhow::bail!("selftest needs a GPU: {}", device::NOT_BUILT);
    }
    let n = device::cuda_device_count().map_err(|e| anyhow::anyhow!("selftest needs a GPU: {e}"))?;
    if n == 0 {
        anyhow::bail!("selftest needs a GPU: no CUDA GPU found on this machine");
    }
    let dev = device::parse_device(&args.device)?;
    if !dev.is_cuda() {
        anyhow::bail!("selftest needs a GPU: --device {} resolved to the CPU", args.device);
    }
    #[cfg(feature = "cuda")]
    {
        gpu::run(&dev, &args)
    }
    #[cfg(not(feature = "cuda"))]
    {
        unreachable!("CUDA_BUILT is false without the cuda feature")
    }
}

#[cfg(feature = "cuda")]
mod gpu {
    use super::Args;
    use anyhow::Result;
    use candle_core::{DType, Device, Tensor, Var};
    use lora_kernels::cuda::ops as cu;
    use std::time::Instant;

    struct Check {
        op: String,
        shape: String,
        dtype: DType,
        what: String,
        rel_err: f64,
        tol: f64,
    }

    fn tol(dt: DType) -> f64 {
        match dt {
            DType::F32 => 1e-4,
            DType::F16 => 5e-3,
            _ => 3e-2,
        }
    }

    fn rel_err(got: &Tensor, want: &Tensor) -> Result<f64> {
        let g = got.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?;
        let w = want.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?;
        let num = (&g - &w)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
        let den = w.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt().max(1e-12);
        let e = num / den;
        Ok(if e.is_finite() { e } else { f64::INFINITY })
    }

    type OpFn<'a> = &'a dyn Fn(&[Tensor]) -> candle_core::Result<Tensor>;

    /// Run `cpu` on f32 CPU inputs and `gpu` on the same inputs cast to `dt` on `dev`;
    /// compare the output and the gradients of inputs flagged in `grad`, through a
    /// random projection of the output (so every gradient element matters).
    #[allow(clippy::too_many_arguments)]
    fn compare(
        out: &mut Vec<Check>, dev: &Device, op: &str, shape: &str, dt: DType, inputs: &[Tensor], grad: &[bool],
        cpu: OpFn, gpu: OpFn,
    ) -> Result<()> {
        let mk = |t: &Tensor, d: &Device, dt: DType, g: bool| -> Result<Tensor> {
            let t = t.to_device(d)?.to_dtype(dt)?;
            Ok(if g { Var::from_tensor(&t)?.as_tensor().clone() } else { t })
        };
        let ci: Vec<Tensor> = inputs.iter().zip(grad).map(|(t, g)| mk(t, &Device::Cpu, t.dtype(), *g)).collect::<Result<_>>()?;
        let gi: Vec<Tensor> = inputs
            .iter()
            .zip(grad)
            .map(|(t, g)| mk(t, dev, if t.dtype() == DType::F32 && *g || t.dtype() == DType::F32 && t.rank() > 1 { dt } else { t.dtype() }, *g))
            .collect::<Result<_>>()?;
        let co = cpu(&ci)?;
        let go = gpu(&gi)?;
        let probe = Tensor::randn(0f32, 1f32, co.shape(), &Device::Cpu)?;
        let cl = (&co * &probe)?.sum_all()?;
        let gl = (go.to_dtype(DType::F32)? * probe.to_device(dev)?)?.sum_all()?;
        out.push(Check { op: op.into(), shape: shape.into(), dtype: dt, what: "forward".into(), rel_err: rel_err(&go, &co)?, tol: tol(dt) });
        if grad.iter().any(|g| *g) {
            let cg = cl.backward()?;
            let gg = gl.backward()?;
            for (i, g) in grad.iter().enumerate() {
                if !*g {
                    continue;
                }
                let (Some(a), Some(b)) = (gg.get(&gi[i]), cg.get(&ci[i])) else {
                    out.push(Check { op: op.into(), shape: shape.into(), dtype: dt, what: format!("grad {i} missing"), rel_err: f64::INFINITY, tol: tol(dt) });
                    continue;
                };
                out.push(Check { op: op.into(), shape: shape.into(), dtype: dt, what: format!("grad input {i}"), rel_err: rel_err(a, b)?, tol: tol(dt) });
            }
        }
        Ok(())
    }

    fn randn(shape: &[usize], std: f32) -> Result<Tensor> {
        Ok(Tensor::randn(0f32, std, shape, &Device::Cpu)?)
    }

    fn checks(dev: &Device) -> Result<Vec<Check>> {
        let mut out = Vec::new();
        for &dt in &[DType::BF16, DType::F16, DType::F32] {
            for &(rows, d) in &[(37usize, 64usize), (128, 576), (9, 100)] {
                let x = randn(&[rows, d], 1.0)?;
                let w = (randn(&[d], 0.1)? + 1.0)?;
                compare(&mut out, dev, "rms_norm", &format!("[{rows},{d}]"), dt, &[x, w], &[true, false],
                    &|t| lora_kernels::rms_norm(&t[0], &t[1], 1e-6),
                    &|t| cu::rms_norm(&t[0], &t[1], 1e-6))?;
            }
            for &(b, h, t, d) in &[(2usize, 3usize, 17usize, 64usize), (1, 4, 33, 128), (2, 2, 5, 24)] {
                let x = randn(&[b, h, t, d], 1.0)?;
                let ang = randn(&[b, t, d / 2], 3.0)?;
                let (c, s) = (ang.cos()?, ang.sin()?);
                compare(&mut out, dev, "rope", &format!("[{b},{h},{t},{d}]"), dt, &[x, c, s], &[true, false, false],
                    &|t| lora_kernels::rope(&t[0], &t[1], &t[2]),
                    &|t| cu::rope(&t[0], &t[1].to_dtype(DType::F32)?, &t[2].to_dtype(DType::F32)?))?;
            }
            for &(rows, cols) in &[(48usize, 64usize), (16, 1000), (7, 333)] {
                let x = randn(&[rows, cols], 2.0)?;
                compare(&mut out, dev, "softmax", &format!("[{rows},{cols}]"), dt, &[x], &[true],
                    &|t| lora_kernels::softmax_last_dim(&t[0]),
                    &|t| cu::softmax_last_dim(&t[0]))?;
            }
            // causal softmax over [.., tq, tk] scores (query i at position i + tk - tq)
            for &(tq, tk) in &[(20usize, 30usize), (64, 64)] {
                let x = randn(&[2, 3, tq, tk], 2.0)?;
                let mask = lora_kernels::reference::causal_mask(1, tq, tk, None, &Device::Cpu)?;
                compare(&mut out, dev, "causal_softmax", &format!("[2,3,{tq},{tk}]"), dt, &[x], &[true],
                    &|t| lora_kernels::softmax_last_dim(&t[0].affine(0.125, 0.0)?.broadcast_add(&mask)?),
                    &|t| cu::causal_softmax(&t[0], 0.125))?;
            }
            for &(rows, cols) in &[(33usize, 256usize), (5, 77)] {
                let g = randn(&[rows, cols], 2.0)?;
                let u = randn(&[rows, cols], 1.0)?;
                compare(&mut out, dev, "swiglu", &format!("[{rows},{cols}]"), dt, &[g, u], &[true, true],
                    &|t| lora_kernels::swiglu(&t[0], &t[1]),
                    &|t| cu::swiglu(&t[0], &t[1]))?;
            }
        }
        for &dt in &[DType::BF16, DType::F16, DType::F32] {
            // ranks 4..256: above 64 the kernels run in 64-rank chunks
            for &(m, k, n, r) in &[(37usize, 96usize, 80usize, 8usize), (256, 512, 384, 16), (130, 200, 72, 64), (64, 100, 50, 4), (70, 160, 136, 128), (33, 300, 96, 256)] {
                let x = randn(&[m, k], 1.0)?;
                let w = randn(&[n, k], 1.0 / (k as f32).sqrt())?;
                let a = randn(&[r, k], 1.0 / (k as f32).sqrt())?;
                let b = randn(&[n, r], 0.5 / (r as f32).sqrt())?;
                let shape = format!("M{m} K{k} N{n} r{r}");
                compare(&mut out, dev, "lora_linear", &shape, dt, &[x.clone(), w.clone(), a, b], &[true, false, true, true],
                    &|t| lora_kernels::lora_linear(&t[0], &t[1], None, &t[2], &t[3], 2.0),
                    &|t| cu::lora_linear(&t[0], &t[1], None, &t[2], &t[3], 2.0))?;
                let bias = randn(&[n], 1.0)?;
                compare(&mut out, dev, "frozen_linear", &shape, dt, &[x, w, bias], &[true, false, false],
                    &|t| lora_kernels::frozen_linear(&t[0], &t[1], Some(&t[2])),
                    &|t| cu::frozen_linear(&t[0], &t[1], Some(&t[2])))?;
            }
            for &(n, h, v) in &[(50usize, 64usize, 1000usize), (300, 128, 5003)] {
                let hid = randn(&[n, h], 1.0)?;
                let lm = randn(&[v, h], 0.2)?;
                let tg: Vec<u32> = (0..n).map(|i| ((i * 7919) % v) as u32).collect();
                let wt: Vec<f32> = (0..n).map(|i| if i % 5 == 0 { 0.0 } else { 1.0 }).collect();
                let tgc = Tensor::new(tg.as_slice(), &Device::Cpu)?;
                let wtc = Tensor::new(wt.as_slice(), &Device::Cpu)?;
                let (tgg, wtg) = (tgc.to_device(dev)?, wtc.to_device(dev)?);
                compare(&mut out, dev, "linear_cross_entropy", &format!("n{n} h{h} v{v}"), dt, &[hid.clone(), lm.clone()], &[true, false],
                    &|t| lora_kernels::linear_cross_entropy(&t[0], &t[1], &tgc, &wtc),
                    &|t| cu::linear_cross_entropy(&t[0], &t[1], &tgg, &wtg))?;
                compare(&mut out, dev, "linear_ce_rows", &format!("n{n} h{h} v{v}"), dt, &[hid, lm], &[true, false],
                    &|t| lora_kernels::linear_cross_entropy_rows(&t[0], &t[1], &tgc),
                    &|t| cu::linear_cross_entropy_rows(&t[0], &t[1], &tgg))?;
            }
            attention_checks(dev, dt, &mut out)?;
            prefix_attention_checks(dev, dt, &mut out)?;
            segmented_checks(dev, dt, &mut out)?;
        }
        tf32_checks(dev, &mut out)?;
        adamw_check(dev, &mut out)?;
        dequant_checks(dev, &mut out)?;
        Ok(out)
    }

    /// NF4 and int8 weights dequantized on the GPU (kept there by `--base-quant`) against
    /// the CPU dequantization: equal bit for bit in f32 (tolerance 0), and bf16 as that
    /// f32 rounded once.
    fn dequant_checks(dev: &Device, out: &mut Vec<Check>) -> Result<()> {
        use lora_models::quant::{quantize_weight, BaseQuant};
        let (rows, cols) = (192, 576);
        let w = randn(&[rows, cols], 0.05)?;
        for quant in [BaseQuant::Nf4, BaseQuant::Int8] {
            for dt in [DType::F32, DType::BF16] {
                let cpu = quantize_weight("selftest", &w, quant, dt, &Device::Cpu)?.dequantize()?;
                let gpu = quantize_weight("selftest", &w, quant, dt, dev)?.dequantize()?;
                let tol = if dt == DType::F32 { 0.0 } else { 1e-7 };
                out.push(Check { op: format!("{quant}_dequantize"), shape: format!("{rows}x{cols}"), dtype: dt, what: "weights".into(), rel_err: rel_err(&gpu, &cpu)?, tol });
            }
        }
        Ok(())
    }

    /// Causal attention (flash kernels) against the CPU op: GQA, head dims 64 / 80 / 128 /
    /// 256, packed segments, KV-cache queries (tq < tk) read from a strided cache view.
    fn attention_checks(dev: &Device, dt: DType, out: &mut Vec<Check>) -> Result<()> {
        // (b, hq, hkv, tq, tk, d, segment run lengths per row (empty = none), strided kv)
        let cases: &[(usize, usize, usize, usize, usize, usize, &[usize], bool)] = &[
            (2, 4, 2, 37, 37, 64, &[], false),
            (2, 6, 2, 70, 70, 64, &[20, 30, 20], false),
            (1, 3, 3, 50, 50, 80, &[1, 48, 1], false),
            (2, 4, 1, 129, 129, 128, &[64, 65], false),
            (1, 4, 2, 5, 45, 128, &[30, 15], true),
            (2, 2, 1, 1, 40, 64, &[], true),
            (1, 2, 1, 33, 33, 256, &[10, 23], false),
        ];
        for &(b, hq, hkv, tq, tk, d, runs, strided) in cases {
            let q = randn(&[b, hq, tq, d], 1.0)?;
            let k = randn(&[b, hkv, tk, d], 1.0)?;
            let v = randn(&[b, hkv, tk, d], 1.0)?;
            let seg: Option<Tensor> = if runs.is_empty() {
                None
            } else {
                let row: Vec<u32> = runs.iter().enumerate().flat_map(|(i, &n)| std::iter::repeat(i as u32 + 7).take(n)).collect();
                let all: Vec<u32> = (0..b).flat_map(|_| row.iter().copied()).collect();
                Some(Tensor::from_vec(all, (b, tk), &Device::Cpu)?)
            };
            let segg = seg.as_ref().map(|s| s.to_device(dev)).transpose()?;
            let scale = 1.0 / (d as f64).sqrt();
            let shape = format!("b{b} h{hq}/{hkv} t{tq}/{tk} d{d}{}{}", if runs.is_empty() { "" } else { " seg" }, if strided { " cache" } else { "" });
            // A KV-cache view: the planes of a longer buffer, narrowed (read in place).
            let view = |t: &Tensor| -> candle_core::Result<Tensor> {
                if !strided {
                    return Ok(t.clone());
                }
                let pad = Tensor::zeros((b, hkv, 7, d), t.dtype(), t.device())?;
                Tensor::cat(&[t, &pad], 2)?.narrow(2, 0, tk)
            };
            compare(out, dev, "causal_attention", &shape, dt, &[q, k, v], &[true, true, true],
                &|t| lora_kernels::causal_attention(&t[0], &view(&t[1])?, &view(&t[2])?, seg.as_ref(), scale),
                &|t| lora_kernels::cuda::attention::causal_attention(&t[0], &view(&t[1])?, &view(&t[2])?, segg.as_ref(), scale))?;
        }
        Ok(())
    }

    /// The decode attention over shared prompts (`attn_prefix_fwd_*`, forward only: what
    /// rollouts decode with) against the CPU op: GQA, prompts of different lengths (left
    /// padding of segment 0), rows continuing the same prompt, a row that joined later
    /// (`own_start` 3: its first own positions are not read), one and two queries per row.
    fn prefix_attention_checks(dev: &Device, dt: DType, out: &mut Vec<Check>) -> Result<()> {
        // (rows, prompts, hq, hkv, tq, lp, n, d)
        let cases: &[(usize, usize, usize, usize, usize, usize, usize, usize)] = &[(4, 2, 4, 2, 1, 40, 9, 64), (3, 2, 6, 2, 2, 70, 20, 128)];
        for &(b, p, hq, hkv, tq, lp, n, d) in cases {
            let of_row: Vec<u32> = (0..b).map(|r| (r * p / b) as u32).collect();
            let own_start: Vec<u32> = (0..b).map(|r| if r + 1 == b { 3 } else { 0 }).collect();
            // Prompt j is 7 j positions shorter than the longest: left-padded with segment 0.
            let seg: Vec<u32> = of_row.iter().flat_map(|&j| (0..lp + n).map(move |i| u32::from(i >= 7 * j as usize))).collect();
            let segc = Tensor::from_vec(seg, (b, lp + n), &Device::Cpu)?;
            let segg = segc.to_device(dev)?;
            let inputs = [randn(&[b, hq, tq, d], 1.0)?, randn(&[b, hkv, n, d], 1.0)?, randn(&[b, hkv, n, d], 1.0)?, randn(&[p, hkv, lp, d], 1.0)?, randn(&[p, hkv, lp, d], 1.0)?];
            let scale = 1.0 / (d as f64).sqrt();
            let shape = format!("b{b}/p{p} h{hq}/{hkv} t{tq} lp{lp} n{n} d{d}");
            compare(out, dev, "prefix_causal_attention", &shape, dt, &inputs, &[false; 5],
                &|t| lora_kernels::prefix_causal_attention(&t[0], &t[1], &t[2], &t[3], &t[4], &of_row, &own_start, &segc, scale),
                &|t| lora_kernels::cuda::attention::prefix_causal_attention(&t[0], &t[1], &t[2], &t[3], &t[4], &of_row, &own_start, &segg, scale))?;
        }
        Ok(())
    }

    /// The segmented multi-adapter op (SGMV forward and backward) against the CPU op: three adapters
    /// of ranks 8 / 16 / 4, a gap of base-only rows, one adapter used twice.
    fn segmented_checks(dev: &Device, dt: DType, out: &mut Vec<Check>) -> Result<()> {
        use lora_kernels::{AdapterWeights, RowSegment};
        let (m, k, n) = (90usize, 128usize, 72usize);
        let ranks = [8usize, 16, 4];
        let mut inputs = vec![randn(&[m, k], 1.0)?, randn(&[n, k], 1.0 / (k as f32).sqrt())?];
        for &r in &ranks {
            inputs.push(randn(&[r, k], 1.0 / (k as f32).sqrt())?);
            inputs.push(randn(&[n, r], 0.5)?);
        }
        let segs = vec![
            RowSegment { start: 0, len: 20, adapter: 1 },
            RowSegment { start: 20, len: 30, adapter: 0 },
            RowSegment { start: 60, len: 25, adapter: 2 },
            RowSegment { start: 85, len: 5, adapter: 1 },
        ];
        let grad = [true, false, true, true, true, true, true, true];
        let run = |t: &[Tensor]| -> candle_core::Result<Tensor> {
            let ad: Vec<AdapterWeights> = (0..ranks.len()).map(|j| AdapterWeights { a: &t[2 + 2 * j], b: &t[3 + 2 * j], scale: 1.5 + j as f64 }).collect();
            lora_kernels::segmented_lora_linear(&t[0], &t[1], None, &ad, &segs)
        };
        compare(out, dev, "segmented_lora", &format!("M{m} K{k} N{n} r8/16/4"), dt, &inputs, &grad, &run, &run)
    }

    /// The f32 linears on TF32 tensor cores (what `LORA_TRAIN_TF32=1` selects), against the
    /// exact CPU result with a TF32-sized tolerance (10-bit mantissa operands).
    fn tf32_checks(dev: &Device, out: &mut Vec<Check>) -> Result<()> {
        cu::set_tf32_override(Some(true));
        let res = (|| -> Result<()> {
            for &(m, k, n, r) in &[(256usize, 512usize, 384usize, 16usize), (70, 160, 136, 128)] {
                let x = randn(&[m, k], 1.0)?;
                let w = randn(&[n, k], 1.0 / (k as f32).sqrt())?;
                let a = randn(&[r, k], 1.0 / (k as f32).sqrt())?;
                let b = randn(&[n, r], 0.5 / (r as f32).sqrt())?;
                let shape = format!("M{m} K{k} N{n} r{r}");
                let first = out.len();
                compare(out, dev, "lora_linear_tf32", &shape, DType::F32, &[x.clone(), w.clone(), a, b], &[true, false, true, true],
                    &|t| lora_kernels::lora_linear(&t[0], &t[1], None, &t[2], &t[3], 2.0),
                    &|t| cu::lora_linear(&t[0], &t[1], None, &t[2], &t[3], 2.0))?;
                let bias = randn(&[n], 1.0)?;
                compare(out, dev, "frozen_linear_tf32", &shape, DType::F32, &[x, w, bias], &[true, false, false],
                    &|t| lora_kernels::frozen_linear(&t[0], &t[1], Some(&t[2])),
                    &|t| cu::frozen_linear(&t[0], &t[1], Some(&t[2])))?;
                for c in &mut out[first..] {
                    c.tol = 5e-3;
                }
            }
            Ok(())
        })();
        cu::set_tf32_override(None);
        res
    }

    fn adamw_check(dev: &Device, out: &mut Vec<Check>) -> Result<()> {
        let sizes = [16 * 576usize, 576 * 16, 1001, 3];
        let (lr, b1, b2, eps, wd) = (1e-3f64, 0.9f64, 0.999f64, 1e-8f64, 0.01f64);
        let mut opt = cu::AdamW { lr, beta1: b1, beta2: b2, eps, weight_decay: wd, step: 0 };
        let mut cpu_state = Vec::new();
        let mut gpu_state = Vec::new();
        for &n in &sizes {
            let p = randn(&[n], 1.0)?;
            let g = randn(&[n], 1.0)?;
            let m = randn(&[n], 0.1)?;
            let v = randn(&[n], 0.1)?.abs()?;
            cpu_state.push([p.to_vec1::<f32>()?, g.to_vec1::<f32>()?, m.to_vec1::<f32>()?, v.to_vec1::<f32>()?]);
            gpu_state.push([p.to_device(dev)?, g.to_device(dev)?, m.to_device(dev)?, v.to_device(dev)?]);
        }
        {
            let refs: Vec<(&Tensor, &Tensor, &Tensor, &Tensor)> = gpu_state.iter().map(|s| (&s[0], &s[1], &s[2], &s[3])).collect();
            let got = cu::AdamW::grad_norm(&refs)? as f64;
            let want = cpu_state.iter().flat_map(|s| s[1].iter()).map(|g| (*g as f64) * (*g as f64)).sum::<f64>().sqrt();
            out.push(Check { op: "grad_norm".into(), shape: format!("{} tensors", sizes.len()), dtype: DType::F32, what: "global L2".into(), rel_err: (got - want).abs() / want.max(1e-12), tol: 1e-5 });
        }
        for step in 1..=3 {
            let refs: Vec<(&Tensor, &Tensor, &Tensor, &Tensor)> = gpu_state.iter().map(|s| (&s[0], &s[1], &s[2], &s[3])).collect();
            opt.step(&refs, 0.5)?;
            let (bc1, bc2) = (1.0 - b1.powi(step), 1.0 - b2.powi(step));
            for s in cpu_state.iter_mut() {
                for i in 0..s[0].len() {
                    let g = 0.5 * s[1][i] as f64;
                    let m = b1 * s[2][i] as f64 + (1.0 - b1) * g;
                    let v = b2 * s[3][i] as f64 + (1.0 - b2) * g * g;
                    let p = s[0][i] as f64 * (1.0 - lr * wd) - lr * (m / bc1) / ((v / bc2).sqrt() + eps);
                    s[0][i] = p as f32;
                    s[2][i] = m as f32;
                    s[3][i] = v as f32;
                }
            }
        }
        for (k, (c, g)) in cpu_state.iter().zip(&gpu_state).enumerate() {
            for (slot, name) in [(0, "param"), (2, "m"), (3, "v")] {
                let want = Tensor::new(c[slot].as_slice(), &Device::Cpu)?;
                out.push(Check { op: "adamw".into(), shape: format!("tensor {k} [{}]", sizes[k]), dtype: DType::F32, what: name.into(), rel_err: rel_err(&g[slot], &want)?, tol: 1e-5 });
            }
        }
        Ok(())
    }

    fn time_it(dev: &Device, iters: usize, f: &dyn Fn() -> Result<()>) -> Result<f64> {
        for _ in 0..3 {
            f()?;
        }
        dev.synchronize()?;
        let t = Instant::now();
        for _ in 0..iters {
            f()?;
        }
        dev.synchronize()?;
        Ok(t.elapsed().as_secs_f64() * 1e3 / iters as f64)
    }

    struct Bench {
        shape: String,
        fused_ms: f64,
        unfused_ms: f64,
    }

    fn bench(dev: &Device) -> Result<Vec<Bench>> {
        let mut out = Vec::new();
        // bf16 on the tensor-core kernel; f32 on the FMA kernel against cuBLAS (which may use
        // TF32 if the build allows).
        for &(m, k, n, r, dt) in &[
            (4096usize, 2048usize, 2048usize, 16usize, DType::BF16),
            (4096, 4096, 4096, 16, DType::BF16),
            (8192, 2048, 8192, 64, DType::BF16),
            (4096, 2048, 2048, 16, DType::F32),
        ] {
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (m, k), dev)?.to_dtype(dt)?)?;
            let w = Tensor::randn(0f32, 0.02, (n, k), dev)?.to_dtype(dt)?;
            let a = Var::from_tensor(&Tensor::randn(0f32, 0.02, (r, k), dev)?.to_dtype(dt)?)?;
            let b = Var::from_tensor(&Tensor::randn(0f32, 0.02, (n, r), dev)?.to_dtype(dt)?)?;
            let step = |fused: bool| -> Result<()> {
                let y = if fused {
                    cu::lora_linear(x.as_tensor(), &w, None, a.as_tensor(), b.as_tensor(), 2.0)?
                } else {
                    lora_kernels::reference::lora_linear(x.as_tensor(), &w, None, a.as_tensor(), b.as_tensor(), 2.0)?
                };
                let _ = y.sum_all()?.backward()?;
                Ok(())
            };
            let fused_ms = time_it(dev, 10, &|| step(true))?;
            let unfused_ms = time_it(dev, 10, &|| step(false))?;
            let name = if dt == DType::F32 { "f32" } else { "bf16" };
            out.push(Bench { shape: format!("lora_linear M{m} K{k} N{n} r{r} {name} fwd+bwd"), fused_ms, unfused_ms });
        }
        // Flash attention against the composite (host mask + full scores) path.
        for &(b, hq, hkv, t, d) in &[(4usize, 32usize, 8usize, 2048usize, 128usize), (8, 9, 3, 512, 64)] {
            let dt = DType::BF16;
            let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, hq, t, d), dev)?.to_dtype(dt)?)?;
            let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, hkv, t, d), dev)?.to_dtype(dt)?)?;
            let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, hkv, t, d), dev)?.to_dtype(dt)?)?;
            let seg = Tensor::zeros((b, t), DType::U32, dev)?;
            let scale = 1.0 / (d as f64).sqrt();
            let step = |fused: bool| -> Result<()> {
                let y = if fused {
                    lora_kernels::cuda::attention::causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), Some(&seg), scale)?
                } else {
                    lora_kernels::reference::causal_attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), Some(&seg), scale)?
                };
                let _ = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
                Ok(())
            };
            let fused_ms = time_it(dev, 5, &|| step(true))?;
            let unfused_ms = time_it(dev, 5, &|| step(false))?;
            out.push(Bench { shape: format!("attention b{b} h{hq}/{hkv} t{t} d{d} bf16 fwd+bwd"), fused_ms, unfused_ms });
        }
        Ok(out)
    }

    pub fn run(dev: &Device, args: &Args) -> Result<()> {
        let gpus = crate::device::list_gpus().unwrap_or_default();
        let idx = match dev.location() {
            candle_core::DeviceLocation::Cuda { gpu_id } => gpu_id,
            _ => 0,
        };
        let name = gpus.get(idx).map(|g| format!("{} (sm_{}{})", g.name, g.compute_capability.0, g.compute_capability.1)).unwrap_or_default();
        if !args.json {
            eprintln!("selftest on cuda:{idx} {name}: kernels vs CPU on random inputs");
        }
        let checks = checks(dev)?;
        let failed = checks.iter().filter(|c| !(c.rel_err <= c.tol)).count();
        let benches = if args.no_bench { Vec::new() } else { bench(dev)? };
        if args.json {
            let obj = serde_json::json!({
                "device": format!("cuda:{idx}"),
                "gpu": name,
                "passed": failed == 0,
                "failed": failed,
                "checks": checks.iter().map(|c| serde_json::json!({
                    "op": c.op, "shape": c.shape, "dtype": format!("{:?}", c.dtype).to_lowercase(),
                    "what": c.what, "rel_err": c.rel_err, "tol": c.tol, "pass": c.rel_err <= c.tol,
                })).collect::<Vec<_>>(),
                "bench": benches.iter().map(|b| serde_json::json!({
                    "shape": b.shape, "fused_ms": b.fused_ms, "unfused_ms": b.unfused_ms,
                    "speedup": b.unfused_ms / b.fused_ms,
                })).collect::<Vec<_>>(),
            });
            println!("{obj}");
        } else {
            println!("{:<22} {:<22} {:<5} {:<14} {:>10} {:>8}  result", "op", "shape", "dtype", "check", "rel err", "tol");
            for c in &checks {
                println!("{:<22} {:<22} {:<5} {:<14} {:>10.2e} {:>8.0e}  {}", c.op, c.shape, format!("{:?}", c.dtype).to_lowercase(), c.what, c.rel_err, c.tol,
                    if c.rel_err <= c.tol { "pass" } else { "FAIL" });
            }
            println!("\n{} checks, {} failed", checks.len(), failed);
            for b in &benches {
                println!("{}: fused {:.3} ms, unfused {:.3} ms, speed-up {:.2}x", b.shape, b.fused_ms, b.unfused_ms, b.unfused_ms / b.fused_ms);
            }
        }
        if failed > 0 {
            anyhow::bail!("selftest: {failed} check(s) failed");
        }
        Ok(())
    }
}
