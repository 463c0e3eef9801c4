//! AdamW over candle `Var`s, with the exact update rule of `torch.optim.AdamW`
//! (decoupled weight decay, bias-corrected moments, eps added after the sqrt).
//!
//! One `AdamW` holds the state of one set of parameters (one adapter). A sweep that trains
//! several adapters over one frozen base keeps one `AdamW` per adapter.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};

/// Hyper-parameters of AdamW (the learning rate comes per step from the schedule).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// transformers' `TrainingArguments` defaults (betas 0.9/0.999, eps 1e-8, no decay).
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

struct ParamState {
    name: String,
    var: Var,
    /// First and second moments, always f32 whatever the parameter dtype.
    m: Tensor,
    v: Tensor,
}

pub struct AdamW {
    cfg: AdamWConfig,
    params: Vec<ParamState>,
    /// Number of optimizer steps taken so far (torch's `state["step"]`).
    step: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, var)| {
                let m = Tensor::zeros(var.shape(), DType::F32, var.device())?;
                let v = m.clone();
                Ok(ParamState { name, var, m, v })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg, params, step: 0 })
    }

    pub fn config(&self) -> &AdamWConfig {
        &self.cfg
    }

    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    pub fn param_names(&self) -> impl Iterator<Item = &str> {
        self.params.iter().map(|p| p.name.as_str())
    }

    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        self.params.iter().map(|p| &p.var)
    }

    /// One update with learning rate `lr`; `grads[i]` is the gradient of the i-th
    /// parameter (same order as given to `new`).
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        if grads.len() != self.params.len() {
            bail!("AdamW::step: {} gradients for {} parameters", grads.len(), self.params.len());
        }
        #[cfg(feature = "cuda")]
        if self.params.first().is_some_and(|p| p.var.device().is_cuda()) {
            return self.step_cuda(grads, lr);
        }
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        let bias_correction1 = 1.0 - beta1.powi(self.step as i32);
        let bias_correction2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias_correction1;
        for (p, g) in self.params.iter_mut().zip(grads) {
            let g = g.to_dtype(DType::F32)?;
            let mut theta = p.var.as_tensor().to_dtype(DType::F32)?;
            if weight_decay != 0.0 {
                theta = (theta * (1.0 - lr * weight_decay))?;
            }
            p.m = ((&p.m * beta1)? + (&g * (1.0 - beta1))?)?;
            p.v = ((&p.v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let denom = ((p.v.sqrt()? / bias_correction2_sqrt)? + eps)?;
            let update = ((&p.m / denom)? * step_size)?;
            let theta = (theta - update)?;
            p.var.set(&theta.to_dtype(p.var.dtype())?)?;
        }
        Ok(())
    }

    /// The same update as one fused kernel launch over every tensor (kernels/src/cuda,
    /// `adamw_multi`), updating parameters and moments in place.
    #[cfg(feature = "cuda")]
    fn step_cuda(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.cfg;
        let grads = grads.iter().map(|g| g.to_dtype(DType::F32)?.contiguous()).collect::<candle_core::Result<Vec<_>>>()?;
        let mut kernel = lora_kernels::cuda::ops::AdamW { lr, beta1, beta2, eps, weight_decay, step: self.step };
        let tuples: Vec<_> = self.params.iter().zip(&grads).map(|(p, g)| (p.var.as_tensor(), g, &p.m, &p.v)).collect();
        kernel.step(&tuples, 1.0)?;
        self.step = kernel.step;
        Ok(())
    }

    /// Moments and step counter as named tensors (`exp_avg.<param>`, `exp_avg_sq.<param>`, `step`).
    pub fn state_tensors(&self) -> Result<HashMap<String, Tensor>> {
        let dev = self.params.first().map(|p| p.var.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let mut out = HashMap::new();
        for p in &self.params {
            out.insert(format!("exp_avg.{}", p.name), p.m.clone());
            out.insert(format!("exp_avg_sq.{}", p.name), p.v.clone());
        }
        out.insert("step".to_string(), Tensor::new(&[self.step as i64], &dev)?);
        Ok(out)
    }

    /// Restore moments and step counter saved by `state_tensors`.
    pub fn load_state_tensors(&mut self, mut state: HashMap<String, Tensor>) -> Result<()> {
        let step = state.remove("step").context("optimizer state has no `step`")?;
        self.step = step.to_vec1::<i64>()?[0] as u64;
        for p in &mut self.params {
            for (key, slot) in [("exp_avg", &mut p.m), ("exp_avg_sq", &mut p.v)] {
                let name = format!("{key}.{}", p.name);
                let t = state.remove(&name).with_context(|| format!("optimizer state has no `{name}`"))?;
                if t.dims() != p.var.dims() {
                    bail!("optimizer state `{name}` has shape {:?}, parameter has {:?}", t.dims(), p.var.dims());
                }
                *slot = t.to_dtype(DType::F32)?.to_device(p.var.device())?;
            }
        }
        Ok(())
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        candle_core::safetensors::save(&self.state_tensors()?, path)
            .with_context(|| format!("writing optimizer state {}", path.display()))
    }

    pub fn load(&mut self, path: &Path) -> Result<()> {
        let dev = self.params.first().map(|p| p.var.device().clone()).unwrap_or(candle_core::Device::Cpu);
        let state = candle_core::safetensors::load(path, &dev)
            .with_context(|| format!("reading optimizer state {}", path.display()))?;
        self.load_state_tensors(state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Reference AdamW in plain f64, transcribed from torch/optim/adamw.py (_single_tensor_adamw).
    fn reference(p0: &[f64], grads: &[Vec<f64>], lrs: &[f64], cfg: AdamWConfig) -> Vec<f64> {
        let mut p = p0.to_vec();
        let mut m = vec![0.0; p.len()];
        let mut v = vec![0.0; p.len()];
        for (t, (g, lr)) in grads.iter().zip(lrs).enumerate() {
            let t = (t + 1) as i32;
            let bc1 = 1.0 - cfg.beta1.powi(t);
            let bc2 = 1.0 - cfg.beta2.powi(t);
            for i in 0..p.len() {
                p[i] *= 1.0 - lr * cfg.weight_decay;
                m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * g[i];
                v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * g[i] * g[i];
                let denom = v[i].sqrt() / bc2.sqrt() + cfg.eps;
                p[i] -= lr / bc1 * m[i] / denom;
            }
        }
        p
    }

    #[test]
    fn matches_torch_update_rule() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = AdamWConfig { weight_decay: 0.1, ..Default::default() };
        let p0 = vec![0.5f64, -1.0, 2.0, 0.0];
        let grads = vec![vec![0.1, -0.2, 0.3, 1e-3], vec![-0.05, 0.4, 0.0, 2.0], vec![1.0, 1.0, -1.0, -1e-4]];
        let lrs = [1e-2, 5e-3, 1e-3];
        let var = Var::from_vec(p0.iter().map(|&x| x as f32).collect::<Vec<_>>(), 4, &dev)?;
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], cfg)?;
        for (g, lr) in grads.iter().zip(lrs) {
            let g = Tensor::from_vec(g.iter().map(|&x| x as f32).collect::<Vec<_>>(), 4, &dev)?;
            opt.step(&[g], lr)?;
        }
        let got = var.as_tensor().to_vec1::<f32>()?;
        let want = reference(&p0, &grads, &lrs, cfg);
        for (a, b) in got.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-6, "{got:?} vs {want:?}");
        }
        Ok(())
    }

    #[test]
    fn state_round_trip_continues_identically() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = AdamWConfig::default();
        let mk = || Var::from_vec(vec![1.0f32, 2.0, 3.0], 3, &dev);
        let g1 = Tensor::new(&[0.1f32, -0.3, 0.7], &dev)?;
        let g2 = Tensor::new(&[-0.4f32, 0.2, 0.05], &dev)?;
        // Uninterrupted.
        let a = mk()?;
        let mut oa = AdamW::new(vec![("p".into(), a.clone())], cfg)?;
        oa.step(std::slice::from_ref(&g1), 1e-2)?;
        oa.step(std::slice::from_ref(&g2), 1e-2)?;
        // Interrupted after one step, state through a file.
        let dir = tempfile::tempdir()?;
        let b = mk()?;
        let mut ob = AdamW::new(vec![("p".into(), b.clone())], cfg)?;
        ob.step(&[g1], 1e-2)?;
        ob.save(&dir.path().join("opt.safetensors"))?;
        let c = Var::from_tensor(b.as_tensor())?;
        let mut oc = AdamW::new(vec![("p".into(), c.clone())], cfg)?;
        oc.load(&dir.path().join("opt.safetensors"))?;
        assert_eq!(oc.steps_taken(), 1);
        oc.step(&[g2], 1e-2)?;
        assert_eq!(a.as_tensor().to_vec1::<f32>()?, c.as_tensor().to_vec1::<f32>()?);
        Ok(())
    }
}
