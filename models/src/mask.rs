//! Additive attention masks from segment ids.
//!
//! One rule covers causal attention, right/left padding and packing: a query at
//! absolute position p may attend key j when j <= p and both carry the same
//! non-zero segment id (0 = padding). Every query may attend itself, so padded
//! rows stay finite (their outputs are never used).
use candle_core::{Device, Result, Tensor};

/// `segments`: [b, total] (all key positions); queries are positions
/// `q_start..q_start+tq`. Returns [b, 1, tq, total] with 0 / -inf, or None when
/// the mask is purely causal and tq == 1 (nothing to mask).
pub fn attention_bias(segments: &[u32], b: usize, total: usize, q_start: usize, tq: usize, device: &Device) -> Result<Tensor> {
    let mut bias = vec![f32::NEG_INFINITY; b * tq * total];
    for row in 0..b {
        let seg = &segments[row * total..(row + 1) * total];
        for qi in 0..tq {
            let p = q_start + qi;
            let out = &mut bias[(row * tq + qi) * total..(row * tq + qi + 1) * total];
            let s = seg[p];
            for j in 0..=p {
                if (s != 0 && seg[j] == s) || j == p {
                    out[j] = 0.0;
                }
            }
        }
    }
    Tensor::from_vec(bias, (b, 1, tq, total), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_and_padding() -> Result<()> {
        // one row: segment 1 (2 tokens), segment 2 (2 tokens), 1 pad
        let seg = [1, 1, 2, 2, 0];
        let m = attention_bias(&seg, 1, 5, 0, 5, &Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
        let allowed: Vec<Vec<bool>> = (0..5).map(|i| (0..5).map(|j| m[i * 5 + j] == 0.0).collect()).collect();
        assert_eq!(allowed[1], vec![true, true, false, false, false]);
        assert_eq!(allowed[2], vec![false, false, true, false, false]);
        assert_eq!(allowed[3], vec![false, false, true, true, false]);
        assert_eq!(allowed[4], vec![false, false, false, false, true]);
        Ok(())
    }
}
