//! The vocabulary-wide pass of sampling a token: the softmax weights of one row of
//! logits, with the sums a draw, the log-probability and the entropy need.
//!
//! Why here: a 4 x 8 rollout over SmolLM2's 49152-token vocabulary takes 1.6 M
//! exponentials per decode step. In f64 with libm's `exp`, one at a time, that was 6% of
//! a rollout (`perf`, BENCHMARKS.md); this pass computes them in f32 with
//! [`crate::cpu::fast_exp`] (~2 ulp) 16 lanes at a time, and sums in f64.
//!
//! The weights are grouped in chunks of [`CHUNK`]: each chunk's sum is kept, so a draw
//! finds its chunk by walking V / 16 sums and then walks at most 16 weights, and the
//! total the draw is scaled by is exactly the sum of those chunk sums in order (a draw
//! therefore always ends inside the vocabulary, never on rounding).
use crate::cpu::{fast_exp, max_f32};
use crate::simd::isa_dispatch;

/// Weights per chunk sum.
pub const CHUNK: usize = 16;

/// The softmax weights of one row of logits at temperature `1 / inv_t`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Weighed {
    /// The largest logit (the weights are exp((logit - max) * inv_t)).
    pub max: f32,
    /// The sum of the weights: the sum of the chunk sums, in order.
    pub total: f64,
    /// The sum of weight x (logit - max) * inv_t (the entropy is ln(total) - this / total).
    pub weighted: f64,
}

isa_dispatch! {
    /// `weights[i] = exp((logits[i] - max) * inv_t)` (f32, `fast_exp`) and
    /// `chunk_sums[c]` = the f64 sum of weights `16c..16c + 16` (the last chunk may be
    /// shorter). A logit of -inf weighs 0 and adds nothing to `weighted`. `weights` must
    /// hold `logits.len()` and `chunk_sums` `logits.len().div_ceil(CHUNK)` entries.
    pub fn weigh(logits: &[f32], inv_t: f32, weights: &mut [f32], chunk_sums: &mut [f64]) -> Weighed {
        let max = max_f32(logits);
        let n = logits.len();
        assert!(weights.len() >= n && chunk_sums.len() >= n.div_ceil(CHUNK), "weigh: scratch too small for {n} logits");
        let mut weighted = [0f64; CHUNK];
        let mut total = 0f64;
        for ((l, w), cs) in logits.chunks(CHUNK).zip(weights.chunks_mut(CHUNK)).zip(chunk_sums.iter_mut()) {
            if l.len() == CHUNK {
                let mut e = [0f32; CHUNK];
                let mut es = [0f32; CHUNK];
                for i in 0..CHUNK {
                    let s = (l[i] - max) * inv_t;
                    e[i] = fast_exp(s);
                    // 0 * -inf would be NaN: a weight of 0 contributes nothing.
                    es[i] = if e[i] > 0.0 { e[i] * s } else { 0.0 };
                }
                w[..CHUNK].copy_from_slice(&e);
                let mut sum = [0f64; CHUNK];
                for i in 0..CHUNK {
                    sum[i] = e[i] as f64;
                    weighted[i] += es[i] as f64;
                }
                // A pairwise tree over the lanes (vectorises; a left-to-right sum would not).
                for width in [8, 4, 2, 1] {
                    for i in 0..width {
                        sum[i] += sum[i + width];
                    }
                }
                *cs = sum[0];
            } else {
                let mut sum = 0f64;
                for (i, (&v, w)) in l.iter().zip(w.iter_mut()).enumerate() {
                    let s = (v - max) * inv_t;
                    *w = fast_exp(s);
                    sum += *w as f64;
                    if *w > 0.0 {
                        weighted[i] += (*w * s) as f64;
                    }
                }
                *cs = sum;
            }
            total += *cs;
        }
        Weighed { max, total, weighted: weighted.iter().sum() }
    }
}

/// The index drawn by `u` in [0, 1) from the weights [`weigh`] wrote: the first index at
/// which `u * total` minus the running sum drops below zero, the running sum taken over
/// chunk sums, then within the chunk. Rounding never walks past the end: the last index
/// with a positive weight is the fallback.
pub fn draw(weights: &[f32], chunk_sums: &[f64], total: f64, u: f64) -> usize {
    let mut r = u * total;
    let chunks = weights.len().div_ceil(CHUNK);
    for (c, &cs) in chunk_sums[..chunks].iter().enumerate() {
        if r - cs < 0.0 {
            let start = c * CHUNK;
            for (i, &w) in weights[start..(start + CHUNK).min(weights.len())].iter().enumerate() {
                r -= w as f64;
                if r < 0.0 {
                    return start + i;
                }
            }
            // The chunk's weights, summed one by one, fell short of its tree sum.
            return last_positive(weights, (start + CHUNK).min(weights.len()));
        }
        r -= cs;
    }
    last_positive(weights, weights.len())
}

/// The last index below `end` with a positive weight (0 if none).
fn last_positive(weights: &[f32], end: usize) -> usize {
    weights[..end].iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(logits: &[f32], inv_t: f64) -> (f64, f64) {
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) as f64;
        let z: f64 = logits.iter().map(|&v| ((v as f64 - max) * inv_t).exp()).sum();
        let h = z.ln() - logits.iter().map(|&v| { let s = (v as f64 - max) * inv_t; s.exp() * s }).sum::<f64>() / z;
        (z, h)
    }

    #[test]
    fn weights_sums_and_entropy_match_f64() {
        for n in [1, 5, 16, 17, 1000, 49152] {
            let logits: Vec<f32> = (0..n).map(|i| ((i * 7919) % 1013) as f32 * 0.021 - 9.0).collect();
            for inv_t in [1.0f32, 1.0 / 0.7] {
                let (mut w, mut cs) = (vec![0f32; n], vec![0f64; n.div_ceil(CHUNK)]);
                let got = weigh(&logits, inv_t, &mut w, &mut cs);
                let (z, h) = exact(&logits, inv_t as f64);
                assert!((got.total - z).abs() <= 1e-6 * z, "n {n}: total {} vs {z}", got.total);
                let entropy = got.total.ln() - got.weighted / got.total;
                assert!((entropy - h).abs() <= 1e-5, "n {n}: entropy {entropy} vs {h}");
                assert_eq!(got.total, cs.iter().sum::<f64>());
            }
        }
    }

    #[test]
    fn minus_infinity_weighs_nothing() {
        let logits = [0.0f32, f32::NEG_INFINITY, 1.0, f32::NEG_INFINITY];
        let (mut w, mut cs) = (vec![0f32; 4], vec![0f64; 1]);
        let got = weigh(&logits, 1.0, &mut w, &mut cs);
        assert!(got.weighted.is_finite() && got.total.is_finite());
        assert_eq!((w[1], w[3]), (0.0, 0.0));
        for u in [0.0, 0.3, 0.999999] {
            let i = draw(&w, &cs, got.total, u);
            assert!(i == 0 || i == 2, "u {u} drew {i}");
        }
    }

    #[test]
    fn draws_follow_the_cumulative_weights() {
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let (mut w, mut cs) = (vec![0f32; 100], vec![0f64; 7]);
        let got = weigh(&logits, 1.0, &mut w, &mut cs);
        let mut acc = 0f64;
        for (i, &wi) in w.iter().enumerate() {
            // u just past the start of token i's interval draws token i.
            let u = (acc + wi as f64 * 0.5) / got.total;
            assert_eq!(draw(&w, &cs, got.total, u), i);
            acc += wi as f64;
        }
        // u of almost 1 stays inside the vocabulary.
        assert_eq!(draw(&w, &cs, got.total, 1.0 - f64::EPSILON), 99);
    }
}
