//! Every fused op against its composite version (`lora_kernels::reference`), on
//! fresh random inputs of several shapes (odd sizes, batch > 1), f32 and bf16:
//! the forward and the gradient of every input. The loss is `sum(out * R)` with a
//! random R so every output element matters. Trainable inputs are `Var`s and must
//! get a non-zero gradient; frozen inputs are plain tensors and must get none.
use candle_core::{DType, Result, Tensor, Var};
use lora_kernels as k;
use lora_kernels::reference as r;

use crate::common::{max_abs, randn, rel_err, CPU};

/// Thresholds (forward, gradients) by compute dtype.
fn tol(dtype: DType) -> (f32, f32) {
    match dtype {
        DType::F32 => (2e-5, 1e-4),
        _ => (2e-2, 3e-2),
    }
}

struct Input {
    value: Tensor,
    trainable: bool,
    /// Cast to the test dtype (false: keep f32, e.g. LoRA master weights, cos/sin).
    cast: bool,
}

fn inp(value: Tensor, trainable: bool) -> Input {
    Input { value, trainable, cast: true }
}

/// Run `fused` on the inputs in `dtype` and `reference` on the same (rounded) values in
/// f32; compare the outputs and every input gradient.
fn check(
    name: &str,
    dtype: DType,
    inputs: Vec<Input>,
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    reference: impl Fn(&[Tensor]) -> Result<Tensor>,
) {
    let (tf, tg) = tol(dtype);
    let rounded: Vec<Tensor> = inputs
        .iter()
        .map(|i| if i.cast { i.value.to_dtype(dtype).unwrap() } else { i.value.clone() })
        .collect();
    let build = |to_f32: bool| -> (Vec<Tensor>, Vec<Option<Var>>) {
        let mut ts = vec![];
        let mut vars = vec![];
        for (i, v) in inputs.iter().zip(&rounded) {
            let v = if to_f32 { v.to_dtype(DType::F32).unwrap() } else { v.clone() };
            if i.trainable {
                let var = Var::from_tensor(&v).unwrap();
                ts.push(var.as_tensor().clone());
                vars.push(Some(var));
            } else {
                ts.push(v);
                vars.push(None);
            }
        }
        (ts, vars)
    };
    let (ft, fv) = build(false);
    let (rt, rv) = build(true);
    let fo = fused(&ft).unwrap();
    let ro = reference(&rt).unwrap();
    assert_eq!(fo.dims(), ro.dims(), "{name}: output shape");
    let e = rel_err(&fo, &ro);
    assert!(e <= tf, "{name} {dtype:?}: forward rel err {e} > {tf}");
    let proj = randn(ro.dims());
    let fl = (fo.to_dtype(DType::F32).unwrap() * &proj).unwrap().sum_all().unwrap();
    let rl = (ro.to_dtype(DType::F32).unwrap() * &proj).unwrap().sum_all().unwrap();
    let fg = fl.backward().unwrap();
    let rg = rl.backward().unwrap();
    for (idx, ((i, fv), (rv, ft))) in inputs.iter().zip(&fv).zip(rv.iter().zip(&ft)).enumerate() {
        match (fv, rv) {
            (Some(fv), Some(rv)) => {
                let g = fg.get(fv.as_tensor()).unwrap_or_else(|| panic!("{name}: input {idx} got no gradient"));
                let gr = rg.get(rv.as_tensor()).expect("reference gradient");
                assert_eq!(g.dtype(), fv.dtype(), "{name}: input {idx} gradient dtype");
                assert!(max_abs(g) > 0.0, "{name}: input {idx} gradient is all zero");
                let e = rel_err(g, gr);
                assert!(e <= tg, "{name} {dtype:?}: input {idx} gradient rel err {e} > {tg}");
            }
            _ => {
                assert!(!i.trainable);
                assert!(fg.get(ft).is_none(), "{name}: frozen input {idx} received a gradient");
            }
        }
    }
}

const DTYPES: [DType; 2] = [DType::F32, DType::BF16];

#[test]
fn rms_norm_matches_reference() {
    for dtype in DTYPES {
        for (shape, train_w) in [(vec![3, 17, 40], false), (vec![2, 5, 64], true), (vec![7, 33], false)] {
            let d = *shape.last().unwrap();
            let w = randn(&[d]).affine(0.3, 1.0).unwrap();
            check(
                "rms_norm",
                dtype,
                vec![inp(randn(&shape), true), inp(w, train_w)],
                |t| k::rms_norm(&t[0], &t[1], 1e-5),
                |t| r::rms_norm(&t[0], &t[1], 1e-5),
            );
        }
    }
}

fn cos_sin(b: usize, t: usize, half: usize) -> (Tensor, Tensor) {
    let ang = (randn(&[b, t, half]) * 3.0).unwrap();
    (ang.cos().unwrap(), ang.sin().unwrap())
}

#[test]
fn rope_matches_reference() {
    for dtype in DTYPES {
        for (b, h, t, d) in [(2, 3, 13, 8), (1, 4, 70, 64), (3, 2, 5, 6)] {
            let (cos, sin) = cos_sin(b, t, d / 2);
            check(
                "rope",
                dtype,
                vec![
                    inp(randn(&[b, h, t, d]), true),
                    Input { value: cos, trainable: false, cast: false },
                    Input { value: sin, trainable: false, cast: false },
                ],
                |t| k::rope(&t[0], &t[1], &t[2]),
                |t| r::rope(&t[0], &t[1], &t[2]),
            );
        }
    }
}

#[test]
fn rope_accepts_shared_tables_and_strided_input() {
    let (b, h, t, d) = (2, 3, 9, 8);
    let (cos, sin) = cos_sin(1, t, d / 2);
    let x = randn(&[b, t, h, d]).transpose(1, 2).unwrap(); // as the decoder produces it
    let got = k::rope(&x, &cos.squeeze(0).unwrap(), &sin.squeeze(0).unwrap()).unwrap();
    let want = r::rope(&x, &cos.expand((b, t, d / 2)).unwrap(), &sin.expand((b, t, d / 2)).unwrap()).unwrap();
    assert!(rel_err(&got, &want) < 1e-6);
}

#[test]
fn softmax_matches_reference() {
    for dtype in DTYPES {
        for shape in [vec![4, 7, 19], vec![2, 130], vec![3, 1, 5, 64]] {
            let x = (randn(&shape) * 3.0).unwrap();
            check("softmax", dtype, vec![inp(x, true)], |t| k::softmax_last_dim(&t[0]), |t| r::softmax_last_dim(&t[0]));
        }
    }
}

#[test]
fn swiglu_matches_reference() {
    for dtype in DTYPES {
        for shape in [vec![2, 9, 37], vec![5, 96], vec![1, 3, 1536]] {
            check(
                "swiglu",
                dtype,
                vec![inp((randn(&shape) * 2.0).unwrap(), true), inp(randn(&shape), true)],
                |t| k::swiglu(&t[0], &t[1]),
                |t| r::swiglu(&t[0], &t[1]),
            );
        }
    }
}

#[test]
fn frozen_linear_matches_reference() {
    frozen_linear_cases(&DTYPES);
}

fn frozen_linear_cases(dtypes: &[DType]) {
    for &dtype in dtypes {
        for (lead, i, o, bias) in [(vec![2, 13], 24, 40, false), (vec![37], 17, 5, true), (vec![3, 4, 5], 64, 33, true)] {
            let mut x_shape = lead.clone();
            x_shape.push(i);
            let mut inputs = vec![inp(randn(&x_shape), true), inp(randn(&[o, i]), false)];
            if bias {
                inputs.push(inp(randn(&[o]), false));
            }
            check(
                "frozen_linear",
                dtype,
                inputs,
                |t| k::frozen_linear(&t[0], &t[1], t.get(2)),
                |t| r::frozen_linear(&t[0], &t[1], t.get(2)),
            );
        }
    }
}

#[test]
fn lora_linear_matches_reference() {
    lora_linear_cases(&DTYPES);
}

fn lora_linear_cases(dtypes: &[DType]) {
    for &dtype in dtypes {
        for (lead, i, o, rank, bias) in [(vec![2, 11], 24, 40, 4, false), (vec![53], 17, 31, 16, true), (vec![3, 2, 5], 64, 18, 8, true)] {
            let mut x_shape = lead.clone();
            x_shape.push(i);
            // A/B stay f32 (master weights) while x/W follow the dtype: the mixed case.
            let mut inputs = vec![
                inp(randn(&x_shape), true),
                inp(randn(&[o, i]), false),
                Input { value: (randn(&[rank, i]) * 0.2).unwrap(), trainable: true, cast: false },
                Input { value: (randn(&[o, rank]) * 0.2).unwrap(), trainable: true, cast: false },
            ];
            if bias {
                inputs.push(inp(randn(&[o]), false));
            }
            check(
                "lora_linear",
                dtype,
                inputs,
                |t| k::lora_linear(&t[0], &t[1], t.get(4), &t[2], &t[3], 2.0),
                |t| r::lora_linear(&t[0], &t[1], t.get(4), &t[2], &t[3], 2.0),
            );
        }
    }
}

#[test]
fn lora_linear_with_frozen_input_gives_adapter_grads_only() {
    let x = randn(&[6, 10]);
    let w = randn(&[7, 10]);
    let a = Var::from_tensor(&randn(&[4, 10])).unwrap();
    let b = Var::from_tensor(&randn(&[7, 4])).unwrap();
    let y = k::lora_linear(&x, &w, None, a.as_tensor(), b.as_tensor(), 0.5).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&x).is_none() && g.get(&w).is_none());
    assert!(max_abs(g.get(a.as_tensor()).unwrap()) > 0.0);
    assert!(max_abs(g.get(b.as_tensor()).unwrap()) > 0.0);
}

#[test]
fn causal_attention_matches_reference() {
    for dtype in DTYPES {
        // (b, hq, hkv, tq, tk, d, packed)
        for (b, hq, hkv, tq, tk, d, packed) in [
            (2, 4, 2, 37, 37, 16, false),
            (1, 3, 1, 130, 130, 8, false),
            (2, 2, 2, 70, 70, 12, true),
            (2, 4, 1, 5, 69, 16, false),
            // Several key tiles (256 keys at head dim 16): the online softmax across
            // tiles, segments starting inside a tile, and a query offset (KV cache).
            (1, 2, 1, 600, 600, 16, true),
            (1, 2, 2, 70, 650, 16, false),
            // Decode steps (one query per row: `decode_attention`): grouped heads,
            // segments, a head dim with a tail past 16 lanes, two keys, 650 keys.
            (3, 6, 2, 1, 37, 16, true),
            (2, 4, 2, 1, 70, 12, true),
            (2, 2, 2, 1, 2, 8, false),
            (1, 4, 1, 1, 650, 64, false),
        ] {
            let seg = packed.then(|| {
                let ids: Vec<u32> = (0..b * tk).map(|i| ((i % tk) as u32 * 3) / tk as u32 + (i / tk) as u32).collect();
                Tensor::from_vec(ids, (b, tk), &CPU).unwrap()
            });
            let scale = 1.0 / (d as f64).sqrt();
            let s1 = seg.clone();
            check(
                "causal_attention",
                dtype,
                vec![inp(randn(&[b, hq, tq, d]), true), inp(randn(&[b, hkv, tk, d]), true), inp(randn(&[b, hkv, tk, d]), true)],
                move |t| k::causal_attention(&t[0], &t[1], &t[2], s1.as_ref(), scale),
                |t| r::causal_attention(&t[0], &t[1], &t[2], seg.as_ref(), scale),
            );
        }
    }
}

/// k and v of one position cut from a fused QKV projection (a one-token prefill):
/// [1, 2, 1, 8] with strides [64, 8, 64, 1], a layout candle calls contiguous.
#[test]
fn causal_attention_takes_one_position_views_of_a_fused_projection() {
    let (hq, hkv, d) = (4, 2, 8);
    let qkv = randn(&[1, 1, (hq + 2 * hkv) * d]);
    let heads = qkv.reshape((1, 1, hq + 2 * hkv, d)).unwrap();
    let split = |from: usize, n: usize| heads.narrow(2, from, n).unwrap().transpose(1, 2).unwrap();
    let (q, kk, v) = (split(0, hq), split(hq, hkv), split(hq + hkv, hkv));
    assert_eq!(kk.stride(), &[64, 8, 64, 1]);
    let got = k::causal_attention(&q, &kk, &v, None, 0.3).unwrap();
    let packed = |x: &Tensor| Tensor::from_vec(x.flatten_all().unwrap().to_vec1::<f32>().unwrap(), x.dims(), &CPU).unwrap();
    let want = r::causal_attention(&packed(&q), &packed(&kk), &packed(&v), None, 0.3).unwrap();
    assert!(max_abs(&(got - want).unwrap()) < 1e-5);
}

#[test]
fn attention_with_bias_has_gradients() {
    for dtype in DTYPES {
        let (b, h, t, d) = (2, 3, 21, 8);
        let mask = r::causal_mask(b, t, t, None, &CPU).unwrap();
        let m2 = mask.clone();
        check(
            "attention",
            dtype,
            vec![inp(randn(&[b, h, t, d]), true), inp(randn(&[b, h, t, d]), true), inp(randn(&[b, h, t, d]), true)],
            move |x| k::attention(&x[0], &x[1], &x[2], Some(&mask), 0.3),
            |x| r::attention(&x[0], &x[1], &x[2], Some(&m2), 0.3),
        );
    }
}

#[test]
fn linear_cross_entropy_matches_reference() {
    cross_entropy_cases(&DTYPES);
}

fn cross_entropy_cases(dtypes: &[DType]) {
    for &dtype in dtypes {
        for (n, h, v) in [(37, 24, 101), (64, 16, 2000), (5, 8, 33)] {
            let targets: Vec<u32> = (0..n).map(|i| ((i * 7919 + 13) % v) as u32).collect();
            let targets = Tensor::from_vec(targets, n, &CPU).unwrap();
            let weights: Vec<f32> = (0..n).map(|i| if i % 3 == 0 { 0.0 } else { 0.5 + (i % 2) as f32 }).collect();
            let weights = Tensor::from_vec(weights, n, &CPU).unwrap();
            let (t1, w1) = (targets.clone(), weights.clone());
            check(
                "linear_cross_entropy",
                dtype,
                vec![inp(randn(&[n, h]), true), inp(randn(&[v, h]), false)],
                move |x| k::linear_cross_entropy(&x[0], &x[1], &t1, &w1),
                |x| r::linear_cross_entropy(&x[0], &x[1], &targets, &weights),
            );
            let t2 = Tensor::from_vec((0..n as u32).map(|i| i % v as u32).collect::<Vec<_>>(), n, &CPU).unwrap();
            let t3 = t2.clone();
            check(
                "linear_cross_entropy_rows",
                dtype,
                vec![inp(randn(&[n, h]), true), inp(randn(&[v, h]), false)],
                move |x| k::linear_cross_entropy_rows(&x[0], &x[1], &t2),
                |x| r::linear_cross_entropy_rows(&x[0], &x[1], &t3),
            );
        }
    }
}

/// The bf16 cases of the matmul ops with the AVX512-BF16 kernel switched off on this
/// thread: the f32 path every CPU without the instructions runs. (The tests above
/// run the kernel wherever the CPU has it.)
#[test]
fn bf16_matmul_ops_on_the_f32_fallback() {
    lora_kernels::gemm_bf16::force_fallback(|| {
        assert!(!lora_kernels::gemm_bf16::available());
        frozen_linear_cases(&[DType::BF16]);
        lora_linear_cases(&[DType::BF16]);
        cross_entropy_cases(&[DType::BF16]);
    });
}

/// The same cases on the AVX512-BF16 kernel, checked to have run it.
#[test]
fn bf16_matmul_ops_on_the_bf16_kernel() {
    if !lora_kernels::gemm_bf16::available() {
        eprintln!("SKIPPED bf16_matmul_ops_on_the_bf16_kernel: no AVX512-BF16 on this CPU (or LORA_KERNELS_NO_BF16_DOT set)");
        return;
    }
    let before = lora_kernels::gemm_bf16::calls();
    frozen_linear_cases(&[DType::BF16]);
    lora_linear_cases(&[DType::BF16]);
    cross_entropy_cases(&[DType::BF16]);
    // frozen fwd + dX (3 shapes), lora fwd + dX (3 shapes), cross-entropy logits + dh.
    assert!(lora_kernels::gemm_bf16::calls() >= before + 14, "the bf16 kernel did not run");
}

#[test]
fn cross_entropy_without_grad_needs_no_backward_state() {
    let h = randn(&[9, 8]);
    let lm = randn(&[50, 8]);
    let t = Tensor::from_vec((0..9u32).collect::<Vec<_>>(), 9, &CPU).unwrap();
    let w = Tensor::ones(9, DType::F32, &CPU).unwrap();
    let got = k::linear_cross_entropy(&h, &lm, &t, &w).unwrap().to_scalar::<f32>().unwrap();
    let want = r::linear_cross_entropy(&h, &lm, &t, &w).unwrap().to_scalar::<f32>().unwrap();
    assert!((got - want).abs() <= 1e-4 * want.abs());
}

#[test]
fn rope_strided_input_gradient() {
    for dtype in DTYPES {
        let (b, h, t, d) = (2, 3, 11, 16);
        let (cos, sin) = cos_sin(b, t, d / 2);
        let (c2, s2) = (cos.clone(), sin.clone());
        check(
            "rope_strided",
            dtype,
            vec![
                inp(randn(&[b, t, h, d]), true),
                Input { value: cos, trainable: false, cast: false },
                Input { value: sin, trainable: false, cast: false },
            ],
            |x| k::rope(&x[0].transpose(1, 2)?, &x[1], &x[2]),
            move |x| r::rope(&x[0].transpose(1, 2)?.contiguous()?, &c2, &s2),
        );
    }
}

#[test]
fn swiglu_cat_matches_reference() {
    for dtype in DTYPES {
        for shape in [vec![2, 9, 74], vec![5, 96], vec![1, 3, 3072]] {
            let i = shape[shape.len() - 1] / 2;
            check(
                "swiglu_cat",
                dtype,
                vec![inp((randn(&shape) * 2.0).unwrap(), true)],
                |t| k::swiglu_cat(&t[0]),
                move |t| {
                    let last = t[0].rank() - 1;
                    r::swiglu(&t[0].narrow(last, 0, i)?, &t[0].narrow(last, i, i)?)
                },
            );
        }
    }
}

/// Rows continuing shared prompts read the prompt's planes in place: the fused attention
/// over the prompt copied in front of each row (to float rounding: a tile ends where the
/// prompt ends), for decode steps and several queries, with padded prompts, a 256-key tile
/// (head dim 16) that would span prompt and row, grouped-query heads, f32 and bf16.
#[test]
fn prefix_attention_equals_attention_on_the_joined_rows() {
    for dtype in [DType::F32, DType::BF16] {
        // (prompts, rows per prompt, hq, hkv, prompt len, own len, queries, d)
        for (p, g, hq, hkv, lp, n, tq, d) in [(2, 3, 4, 2, 7, 1, 1, 16), (3, 2, 2, 1, 40, 300, 1, 16), (1, 4, 4, 4, 250, 20, 3, 16), (2, 2, 2, 2, 5, 9, 9, 8)] {
            let b = p * g;
            let cast = |t: Tensor| t.to_dtype(dtype).unwrap();
            let (q, kk, v) = (cast(randn(&[b, hq, tq, d])), cast(randn(&[b, hkv, n, d])), cast(randn(&[b, hkv, n, d])));
            let (pk, pv) = (cast(randn(&[p, hkv, lp, d])), cast(randn(&[p, hkv, lp, d])));
            let of_row: Vec<u32> = (0..b).map(|r| (r / g) as u32).collect();
            // Row r's prompt is left-padded by r % 3 positions (segment 0); the last
            // row's final query is a finished row's padding (segment 0 after 1s).
            let mut ids = Vec::new();
            for r in 0..b {
                let pad = (r % 3).min(lp - 1);
                ids.extend((0..lp + n).map(|j| u32::from(j >= pad)));
                if r == b - 1 {
                    *ids.last_mut().unwrap() = 0;
                }
            }
            let seg = Tensor::from_vec(ids, (b, lp + n), &CPU).unwrap();
            let got = k::prefix_causal_attention(&q, &kk, &v, &pk, &pv, &of_row, &[], &seg, 0.25).unwrap();
            let rows = Tensor::from_slice(&of_row, b, &CPU).unwrap();
            let join = |pre: &Tensor, own: &Tensor| Tensor::cat(&[&pre.index_select(&rows, 0).unwrap(), own], 2).unwrap();
            let want = k::causal_attention(&q, &join(&pk, &kk), &join(&pv, &v), Some(&seg), 0.25).unwrap();
            // And the tensor-op reference (the joined rows, the composite attention).
            let composite = r::prefix_causal_attention(&q, &kk, &v, &pk, &pv, &of_row, &[], &seg, 0.25).unwrap();
            let worst = max_abs(&(got.to_dtype(DType::F32).unwrap() - composite.to_dtype(DType::F32).unwrap()).unwrap());
            assert!(worst <= if dtype == DType::F32 { 2e-6 } else { 2e-2 }, "{dtype:?} p {p} g {g} lp {lp} n {n} tq {tq}: {worst} from the composite");
            let (got, want) = (got.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
            // A tile ends where the prompt ends: the same sums, grouped differently.
            let tol = if dtype == DType::F32 { 2e-6 } else { 1e-2 };
            let worst = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(worst <= tol, "{dtype:?} p {p} g {g} lp {lp} n {n} tq {tq}: {worst}");
        }
    }
}

#[test]
fn prefix_attention_refuses_a_graph_and_bad_rows() {
    let (q, kk, v) = (randn(&[2, 2, 1, 8]), randn(&[2, 2, 1, 8]), randn(&[2, 2, 1, 8]));
    let (pk, pv) = (randn(&[1, 2, 3, 8]), randn(&[1, 2, 3, 8]));
    let seg = Tensor::ones((2, 4), DType::U32, &CPU).unwrap();
    let err = k::prefix_causal_attention(&q, &kk, &v, &pk, &pv, &[0, 1], &[], &seg, 0.3).unwrap_err();
    assert!(format!("{err}").contains("prefix rows"), "{err}");
    let tracked = Var::from_tensor(&q).unwrap();
    let err = k::prefix_causal_attention(tracked.as_tensor(), &kk, &v, &pk, &pv, &[0, 0], &[], &seg, 0.3).unwrap_err();
    assert!(format!("{err}").contains("no backward"), "{err}");
}

/// Rows that joined late read their own positions from their start on: each row equals
/// the fused attention over its prompt followed by its own positions from that start.
#[test]
fn prefix_attention_skips_own_positions_before_a_rows_start() {
    let (b, hq, hkv, lp, n, d) = (3, 4, 2, 6, 300, 16);
    let (q, kk, v) = (randn(&[b, hq, 1, d]), randn(&[b, hkv, n, d]), randn(&[b, hkv, n, d]));
    let (pk, pv) = (randn(&[2, hkv, lp, d]), randn(&[2, hkv, lp, d]));
    let (of_row, own_start) = ([0u32, 1, 1], [0u32, 17, 299]);
    // Prompt row 1 is 4 tokens, left-padded by 2; skipped positions carry junk ids.
    let mut ids = Vec::new();
    for r in 0..b {
        ids.extend((0..lp).map(|j| u32::from(of_row[r] == 0 || j >= 2)));
        ids.extend((0..n).map(|j| if j < own_start[r] as usize { 7 } else { 1 }));
    }
    let seg = Tensor::from_vec(ids.clone(), (b, lp + n), &CPU).unwrap();
    let got = k::prefix_causal_attention(&q, &kk, &v, &pk, &pv, &of_row, &own_start, &seg, 0.25).unwrap();
    for r in 0..b {
        let s = own_start[r] as usize;
        let one = |t: &Tensor| t.narrow(0, r, 1).unwrap();
        let join = |pre: &Tensor, own: &Tensor| Tensor::cat(&[&pre.narrow(0, of_row[r] as usize, 1).unwrap(), &one(own).narrow(2, s, n - s).unwrap()], 2).unwrap();
        let row_ids: Vec<u32> = ids[r * (lp + n)..r * (lp + n) + lp].iter().chain(&ids[r * (lp + n) + lp + s..(r + 1) * (lp + n)]).copied().collect();
        let row_seg = Tensor::from_vec(row_ids, (1, lp + n - s), &CPU).unwrap();
        let want = k::causal_attention(&one(&q), &join(&pk, &kk), &join(&pv, &v), Some(&row_seg), 0.25).unwrap();
        let (g, w) = (one(&got).flatten_all().unwrap().to_vec1::<f32>().unwrap(), want.flatten_all().unwrap().to_vec1::<f32>().unwrap());
        let worst = g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst <= 2e-6, "row {r}: {worst}");
    }
    // The tensor-op path (other devices) gives the same.
    let joined = r::prefix_causal_attention(&q, &kk, &v, &pk, &pv, &of_row, &own_start, &seg, 0.25).unwrap();
    let (a, z) = (got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), joined.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    assert!(a.iter().zip(&z).all(|(x, y)| (x - y).abs() <= 2e-6));
    let err = k::prefix_causal_attention(&q, &kk, &v, &pk, &pv, &of_row, &[0, 0, 300], &seg, 0.25).unwrap_err();
    assert!(format!("{err}").contains("own starts"), "{err}");
}
