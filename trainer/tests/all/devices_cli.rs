//! `lora-train devices`: the CPU part (vector code of our kernels, bf16 dot product)
//! follows the machine and the switches that cap it.
use std::process::Command;

use crate::common::*;

fn devices_json(env: &[(&str, &str)]) -> serde_json::Value {
    let mut cmd = Command::new(bin());
    cmd.args(["devices", "--json"]).env_remove("LORA_KERNELS_ISA").env_remove("LORA_KERNELS_NO_BF16_DOT");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("spawn lora-train");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    stdout_json(&out)
}

#[test]
fn devices_reports_the_cpu_vector_code_and_its_caps() {
    let native = devices_json(&[]);
    let isa = native["cpu_vector_isa"].as_str().unwrap().to_string();
    assert!(["avx512", "avx2", "baseline"].contains(&isa.as_str()), "{native}");
    assert!(native["cpu_threads"].as_u64().unwrap() >= 1);
    let has_bf16_dot = native["cpu_bf16_dot"].as_bool().unwrap();
    if has_bf16_dot {
        assert_eq!(isa, "avx512", "AVX512-BF16 implies AVX-512");
    }
    let capped = devices_json(&[("LORA_KERNELS_ISA", "baseline"), ("LORA_KERNELS_NO_BF16_DOT", "1")]);
    assert_eq!(capped["cpu_vector_isa"], "baseline");
    assert_eq!(capped["cpu_bf16_dot"], false);
    if isa != "baseline" {
        assert_eq!(devices_json(&[("LORA_KERNELS_ISA", "avx2")])["cpu_vector_isa"], "avx2");
    }
}
