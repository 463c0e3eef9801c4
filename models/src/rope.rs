//! Rotary position tables, computed like transformers (f32 throughout).
use crate::config::ModelConfig;
use candle_core::{Device, Result, Tensor};

pub struct RotaryTables {
    inv_freq: Vec<f32>,
}

impl RotaryTables {
    pub fn new(cfg: &ModelConfig) -> Self {
        let d = cfg.head_dim;
        let base = cfg.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..d / 2).map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32)).collect();
        if let Some(s) = &cfg.rope_llama3 {
            // transformers' `_compute_llama3_parameters`.
            let (factor, low, high, old) = (s.factor as f32, s.low_freq_factor as f32, s.high_freq_factor as f32, s.original_max_position_embeddings as f32);
            let (low_wavelen, high_wavelen) = (old / low, old / high);
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (old / wavelen - low) / (high - low);
                    *f = (1.0 - smooth) * *f / factor + smooth * *f;
                }
            }
        }
        Self { inv_freq }
    }

    /// cos and sin, each [b, t, d/2], for integer positions `positions` ([b, t]).
    pub fn tables(&self, positions: &[u32], b: usize, t: usize, device: &Device) -> Result<(Tensor, Tensor)> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(b * t * half);
        let mut sin = Vec::with_capacity(b * t * half);
        for &p in positions {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        Ok((Tensor::from_vec(cos, (b, t, half), device)?, Tensor::from_vec(sin, (b, t, half), device)?))
    }
}
