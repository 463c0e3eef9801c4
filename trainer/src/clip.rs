//! Global gradient-norm clipping, as `torch.nn.utils.clip_grad_norm_`.
use anyhow::Result;
use candle_core::{DType, Tensor};

/// L2 norm over all gradients together (computed in f64 from per-tensor f32 sums).
pub fn global_norm(grads: &[Tensor]) -> Result<f64> {
    let mut sq = 0.0f64;
    for g in grads {
        sq += g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(sq.sqrt())
}

/// Scales `grads` in place so that their global norm is at most `max_norm` (no-op when
/// `max_norm <= 0` or the norm is not finite) and returns the norm before clipping.
pub fn clip_grad_norm(grads: &mut [Tensor], max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if max_norm > 0.0 && norm.is_finite() {
        let coef = max_norm / (norm + 1e-6);
        if coef < 1.0 {
            for g in grads.iter_mut() {
                *g = (&*g * coef)?;
            }
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn clips_to_max_norm_and_returns_pre_clip_norm() -> Result<()> {
        let dev = Device::Cpu;
        let mut g = vec![Tensor::new(&[3.0f32, 0.0], &dev)?, Tensor::new(&[[4.0f32]], &dev)?];
        let n = clip_grad_norm(&mut g, 1.0)?;
        assert!((n - 5.0).abs() < 1e-9);
        assert!((global_norm(&g)? - 1.0).abs() < 1e-5);
        let mut g = vec![Tensor::new(&[0.3f32, 0.4], &dev)?];
        let n = clip_grad_norm(&mut g, 1.0)?;
        assert!((n - 0.5).abs() < 1e-6);
        assert_eq!(g[0].to_vec1::<f32>()?, vec![0.3, 0.4]);
        Ok(())
    }
}
