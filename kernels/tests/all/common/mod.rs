//! Helpers shared by the kernel test files (random inputs, error measures).
#![allow(dead_code)]
use candle_core::{DType, Device, Tensor};

pub const CPU: Device = Device::Cpu;

pub fn randn(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1f32, shape, &CPU).unwrap()
}

/// max |a - b| / max |b| (f32 views).
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let diff = (&a - &b).unwrap().abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap().max(1e-6);
    diff / scale
}

pub fn max_abs(t: &Tensor) -> f32 {
    t.to_dtype(DType::F32).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}
