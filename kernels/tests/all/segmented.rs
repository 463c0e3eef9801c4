//! The segmented multi-adapter LoRA op against its composite version and against
//! `lora_linear`: forward and the gradient of x and of every adapter's A and B, with
//! gaps (rows with no adapter), two segments naming one adapter, ranks 4/8/16, an
//! adapter with no rows, f32 and bf16 x/W with f32 master A/B; bad tables are Errs.
use candle_core::{DType, Result, Tensor, Var};
use lora_kernels::{self as k, reference as r, AdapterWeights, RowSegment};

use crate::common::{max_abs, randn, rel_err};

type SegFn = fn(&Tensor, &Tensor, Option<&Tensor>, &[AdapterWeights], &[RowSegment]) -> Result<Tensor>;

fn seg(start: usize, len: usize, adapter: usize) -> RowSegment {
    RowSegment { start, len, adapter }
}

/// Inputs of one case; x/W/bias are cast to the run's dtype, A/B stay f32.
struct Case {
    x: Tensor,
    w: Tensor,
    bias: Option<Tensor>,
    /// (A [r, in], B [out, r], scale)
    adapters: Vec<(Tensor, Tensor, f64)>,
    segments: Vec<RowSegment>,
}

impl Case {
    fn new(lead: &[usize], inp: usize, out: usize, bias: bool, ranks_scales: &[(usize, f64)], segments: Vec<RowSegment>) -> Case {
        let mut xs = lead.to_vec();
        xs.push(inp);
        let adapters = ranks_scales
            .iter()
            .map(|&(rank, s)| ((randn(&[rank, inp]) * 0.2).unwrap(), (randn(&[out, rank]) * 0.2).unwrap(), s))
            .collect();
        Case { x: randn(&xs), w: randn(&[out, inp]), bias: bias.then(|| randn(&[out])), adapters, segments }
    }
}

/// Output and gradients of one run (`None`: that tensor got no gradient).
struct Run {
    y: Tensor,
    dx: Tensor,
    da: Vec<Option<Tensor>>,
    db: Vec<Option<Tensor>>,
}

/// Run `f` on the case with x/W/bias in `dtype` (A/B in f32) and backprop `sum(y * proj)`.
fn run(f: SegFn, c: &Case, dtype: DType, proj: &Tensor) -> Run {
    let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
    let x = Var::from_tensor(&cast(&c.x)).unwrap();
    let (w, bias) = (cast(&c.w), c.bias.as_ref().map(cast));
    let vars: Vec<(Var, Var)> =
        c.adapters.iter().map(|(a, b, _)| (Var::from_tensor(a).unwrap(), Var::from_tensor(b).unwrap())).collect();
    let adapters: Vec<AdapterWeights> = vars
        .iter()
        .zip(&c.adapters)
        .map(|((a, b), (_, _, scale))| AdapterWeights { a: a.as_tensor(), b: b.as_tensor(), scale: *scale })
        .collect();
    let y = f(x.as_tensor(), &w, bias.as_ref(), &adapters, &c.segments).unwrap();
    assert_eq!(y.dtype(), dtype, "output dtype");
    let g = (y.to_dtype(DType::F32).unwrap() * proj).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(g.get(&w).is_none(), "the frozen weight received a gradient");
    let dx = g.get(x.as_tensor()).expect("x got no gradient").clone();
    assert_eq!(dx.dtype(), dtype, "dX dtype");
    let grad = |v: &Var| g.get(v.as_tensor()).cloned();
    Run { y, dx, da: vars.iter().map(|(a, _)| grad(a)).collect(), db: vars.iter().map(|(_, b)| grad(b)).collect() }
}

fn projection(c: &Case) -> Tensor {
    let mut dims = c.x.dims().to_vec();
    *dims.last_mut().unwrap() = c.w.dim(0).unwrap();
    randn(&dims)
}

/// Whether adapter `j` owns at least one row.
fn routed(c: &Case, j: usize) -> bool {
    c.segments.iter().any(|s| s.adapter == j && s.len > 0)
}

/// Compare `f` against `oracle` (run in f32 on the same rounded values): output, dX,
/// and every dA_j / dB_j; routed adapters must get a non-zero f32 gradient, the
/// others an all-zero one.
fn compare(name: &str, c: &Case, dtype: DType, f: SegFn, oracle: SegFn, tol: f32) {
    let rounded = Case {
        x: c.x.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap(),
        w: c.w.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap(),
        bias: c.bias.as_ref().map(|b| b.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()),
        adapters: c.adapters.clone(),
        segments: c.segments.clone(),
    };
    let proj = projection(c);
    let got = run(f, c, dtype, &proj);
    let want = run(oracle, &rounded, DType::F32, &proj);
    let check = |what: String, g: &Tensor, w: &Tensor| {
        let e = rel_err(g, w);
        assert!(e <= tol, "{name} {dtype:?}: {what} rel err {e} > {tol}");
    };
    check("forward".into(), &got.y, &want.y);
    check("dX".into(), &got.dx, &want.dx);
    for j in 0..c.adapters.len() {
        for (which, g, w) in [("dA", &got.da[j], &want.da[j]), ("dB", &got.db[j], &want.db[j])] {
            let g = g.as_ref().unwrap_or_else(|| panic!("{name}: adapter {j} {which} missing"));
            assert_eq!(g.dtype(), DType::F32, "{name}: adapter {j} {which} dtype");
            if routed(c, j) {
                assert!(max_abs(g) > 0.0, "{name}: routed adapter {j} {which} is all zero");
                check(format!("adapter {j} {which}"), g, w.as_ref().expect("oracle gradient"));
            } else {
                assert_eq!(max_abs(g), 0.0, "{name}: adapter {j} has no rows but a non-zero {which}");
            }
        }
    }
}

/// Three adapters (ranks 4/8/16, distinct scales) plus one with no rows; adapter 0
/// owns two segments; rows 5..9, 24..30 and 41.. have no adapter. Listed out of order.
fn mixed_case(lead: &[usize], bias: bool) -> Case {
    let segments = vec![seg(30, 11, 0), seg(0, 5, 1), seg(20, 4, 2), seg(9, 11, 0), seg(26, 0, 3)];
    Case::new(lead, 40, 36, bias, &[(4, 2.0), (8, 0.5), (16, 1.25), (8, 1.0)], segments)
}

#[test]
fn matches_reference_f32() {
    for (lead, bias) in [(vec![2, 23], true), (vec![46], false)] {
        compare("mixed", &mixed_case(&lead, bias), DType::F32, k::segmented_lora_linear, r::segmented_lora_linear, 1e-5);
    }
    // One segment ending on the last row, one adapter.
    let c = Case::new(&[3, 7], 17, 9, true, &[(5, 3.0)], vec![seg(13, 8, 0)]);
    compare("tail", &c, DType::F32, k::segmented_lora_linear, r::segmented_lora_linear, 1e-5);
}

#[test]
fn matches_reference_bf16_with_f32_masters() {
    for (lead, bias) in [(vec![2, 23], true), (vec![46], false)] {
        compare("mixed", &mixed_case(&lead, bias), DType::BF16, k::segmented_lora_linear, r::segmented_lora_linear, 2e-2);
    }
}

#[test]
fn rows_without_adapter_are_the_base_exactly() {
    for dtype in [DType::F32, DType::BF16] {
        let c = mixed_case(&[46], true);
        let proj = projection(&c);
        let got = run(k::segmented_lora_linear, &c, dtype, &proj);
        let cast = |t: &Tensor| t.to_dtype(dtype).unwrap();
        let base = k::frozen_linear(&cast(&c.x), &cast(&c.w), c.bias.as_ref().map(cast).as_ref()).unwrap();
        for (start, len) in [(5, 4), (24, 6), (41, 5)] {
            let diff = (got.y.narrow(0, start, len).unwrap().to_dtype(DType::F32).unwrap()
                - base.narrow(0, start, len).unwrap().to_dtype(DType::F32).unwrap())
            .unwrap();
            assert_eq!(max_abs(&diff), 0.0, "{dtype:?}: rows {start}..{} differ from the base", start + len);
        }
    }
}

/// `lora_linear` with the single adapter of `c` (the segment covers every row).
fn as_lora_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, ad: &[AdapterWeights], _: &[RowSegment]) -> Result<Tensor> {
    k::lora_linear(x, w, bias, ad[0].a, ad[0].b, ad[0].scale)
}

#[test]
fn one_segment_over_all_rows_is_lora_linear() {
    let c = Case::new(&[3, 11], 24, 40, true, &[(8, 2.0)], vec![seg(0, 33, 0)]);
    compare("all-rows", &c, DType::F32, k::segmented_lora_linear, as_lora_linear, 1e-6);
}

#[test]
fn no_segments_is_the_base_with_zero_adapter_gradients() {
    let c = Case::new(&[9], 12, 10, false, &[(4, 1.0), (8, 1.0)], vec![]);
    compare("no-segments", &c, DType::F32, k::segmented_lora_linear, r::segmented_lora_linear, 1e-6);
    let want = r::frozen_linear(&c.x, &c.w, None).unwrap();
    assert_eq!(rel_err(&run(k::segmented_lora_linear, &c, DType::F32, &projection(&c)).y, &want), 0.0);
}

#[test]
fn frozen_input_gives_adapter_gradients_only() {
    let c = mixed_case(&[46], true);
    let vars: Vec<(Var, Var)> =
        c.adapters.iter().map(|(a, b, _)| (Var::from_tensor(a).unwrap(), Var::from_tensor(b).unwrap())).collect();
    let ads: Vec<AdapterWeights> =
        vars.iter().map(|(a, b)| AdapterWeights { a: a.as_tensor(), b: b.as_tensor(), scale: 1.0 }).collect();
    let y = k::segmented_lora_linear(&c.x, &c.w, c.bias.as_ref(), &ads, &c.segments).unwrap();
    let g = y.sum_all().unwrap().backward().unwrap();
    assert!(g.get(&c.x).is_none());
    for (j, (a, b)) in vars.iter().enumerate().take(3) {
        assert!(max_abs(g.get(a.as_tensor()).unwrap()) > 0.0, "adapter {j} dA");
        assert!(max_abs(g.get(b.as_tensor()).unwrap()) > 0.0, "adapter {j} dB");
    }
}

#[test]
fn bad_segment_tables_are_errors() {
    let c = Case::new(&[2, 5], 8, 6, false, &[(4, 1.0), (2, 1.0)], vec![]);
    let ads: Vec<AdapterWeights> = c.adapters.iter().map(|(a, b, s)| AdapterWeights { a, b, scale: *s }).collect();
    let bad = [
        ("overlap", vec![seg(0, 4, 0), seg(3, 2, 1)]),
        ("overlap, same adapter, out of order", vec![seg(6, 3, 0), seg(2, 5, 0)]),
        ("past the end", vec![seg(8, 3, 0)]),
        ("start past the end", vec![seg(11, 0, 0)]),
        ("overflow", vec![seg(usize::MAX, 2, 0)]),
        ("no such adapter", vec![seg(0, 2, 2)]),
    ];
    for f in [k::segmented_lora_linear as SegFn, r::segmented_lora_linear] {
        for (what, segs) in &bad {
            assert!(f(&c.x, &c.w, None, &ads, segs).is_err(), "{what}: expected an error");
        }
        // A adapter whose B does not match its rank.
        let wrong = [AdapterWeights { a: ads[0].a, b: ads[1].b, scale: 1.0 }];
        assert!(f(&c.x, &c.w, None, &wrong, &[seg(0, 1, 0)]).is_err(), "rank mismatch: expected an error");
        assert!(f(&c.x, &c.w, None, &ads, &[seg(0, 10, 0)]).is_ok(), "a segment over every row is fine");
    }
}
