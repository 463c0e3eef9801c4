//! The sweep's scheduler: what each candidate costs (memory, FLOPs, time) and where it
//! runs. Candidates that share a base (model, dtypes, sequence length, device) are
//! packed into groups that train in one process over one copy of the base; groups are
//! placed on devices first-fit-decreasing by memory, and a group that does not fit now
//! waits for its device (and for `--max-parallel` active candidates) to free up.
use anyhow::{bail, Context, Result};
use lora_models::ModelConfig;
use serde::Serialize;

use crate::config::TrainConfig;

pub const GIB: f64 = (1u64 << 30) as f64;

/// A device the planner places groups on.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct DeviceSlot {
    /// `cpu` or `cuda:N` (what `--device` of a run takes).
    pub name: String,
    pub memory_bytes: u64,
    /// Sustained training FLOP/s assumed for time estimates.
    pub flops_per_s: f64,
    /// From `--simulate-devices`: planned only, never trained on.
    pub simulated: bool,
}

/// `cuda:0=24GiB,cuda:1=80GiB[@150TFLOPS]` -> devices.
pub fn parse_simulated(spec: &str) -> Result<Vec<DeviceSlot>> {
    spec.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|part| {
            let (name, rest) = part.split_once('=').with_context(|| format!("--simulate-devices: `{part}` is not NAME=MEMORY (e.g. cuda:0=24GiB)"))?;
            let (mem, rate) = match rest.split_once('@') {
                Some((m, r)) => (m, Some(r)),
                None => (rest, None),
            };
            Ok(DeviceSlot {
                name: name.trim().to_string(),
                memory_bytes: parse_bytes(mem).with_context(|| format!("--simulate-devices: `{mem}`"))?,
                flops_per_s: match rate {
                    Some(r) => parse_flops(r).with_context(|| format!("--simulate-devices: `{r}`"))?,
                    None => DEFAULT_GPU_FLOPS,
                },
                simulated: true,
            })
        })
        .collect()
}

/// Sustained bf16 training throughput assumed for a GPU whose rate is not given:
/// about a third of an A100's dense peak, what LoRA steps reach in practice.
pub const DEFAULT_GPU_FLOPS: f64 = 100e12;

pub(crate) fn parse_bytes(s: &str) -> Result<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().with_context(|| format!("`{s}` is not a size like 24GiB"))?;
    let mult = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" | "kib" => 1024.0,
        "m" | "mb" | "mib" => 1024.0 * 1024.0,
        "g" | "gb" | "gib" => GIB,
        "t" | "tb" | "tib" => GIB * 1024.0,
        u => bail!("unknown size unit `{u}` in `{s}`"),
    };
    Ok((v * mult) as u64)
}

fn parse_flops(s: &str) -> Result<f64> {
    let lower = s.trim().to_ascii_lowercase();
    let (num, mult) = if let Some(n) = lower.strip_suffix("tflops") {
        (n, 1e12)
    } else if let Some(n) = lower.strip_suffix("gflops") {
        (n, 1e9)
    } else {
        (lower.as_str(), 1.0)
    };
    Ok(num.trim().parse::<f64>().with_context(|| format!("`{s}` is not a rate like 150TFLOPS"))? * mult)
}

/// Bytes per element of a dtype name.
fn dtype_bytes(d: crate::config::DTypeArg) -> f64 {
    match d {
        crate::config::DTypeArg::F32 => 4.0,
        crate::config::DTypeArg::Bf16 => 2.0,
    }
}

/// A candidate's cost.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Estimate {
    /// The frozen base weights and the process around them (shared by a packed group).
    pub base_bytes: u64,
    /// LoRA weights + gradients + AdamW moments (f32) and activations of one micro-batch.
    pub own_bytes: u64,
    pub lora_parameters: u64,
    /// Training FLOPs of the whole run (forward + backward, base frozen).
    pub flops: f64,
    pub tokens: u64,
}


/// Memory and FLOPs of training `cfg` on `tokens` training tokens, with micro-batch rows
/// of `row_len` tokens (the sequence length with packing, else the longest sample).
///
/// Activations kept for the backward per token and layer, in compute-dtype values: the
/// two normed inputs, residual and attention/MLP outputs (6 hidden), q and attention
/// output (2 x heads*head_dim), k and v (2 x kv_heads*head_dim), gate, up and their
/// product (3 x intermediate). On SmolLM2 at 4 x 256 (f32) this gives 1.2 GB for
/// activations and 2.0 GB in all; `sft` measured 2.2 GB peak RSS (BENCHMARKS.md).
pub fn estimate(m: &ModelConfig, cfg: &TrainConfig, tokens: u64, row_len: usize) -> Estimate {
    use crate::config::CheckpointingArg;
    use crate::memory::{self, BaseStorage, Workload};
    let (h, l) = (m.hidden_size as f64, m.num_hidden_layers as f64);
    let q = (m.num_attention_heads * m.head_dim) as f64;
    let per_layer_matmul = memory::projection_parameters(m) / l;
    let vocab = m.vocab_size as f64 * h;
    let seq = row_len.min(cfg.max_sequence_length);
    let workload = Workload { rows: cfg.batch_size, row_len: seq, adapters: 1, rollout_rows: 0, rollout_len: 0 };
    let storage = BaseStorage::from_quant(cfg.base_quant, dtype_bytes(cfg.base_dtype));
    // `auto` checkpoints a quantized base; the run's own check may also turn it on when
    // memory is short, which this estimate (made before devices are chosen) cannot know.
    let checkpointing = match cfg.gradient_checkpointing {
        CheckpointingArg::On => true,
        CheckpointingArg::Off => false,
        CheckpointingArg::Auto => matches!(cfg.base_quant, lora_models::BaseQuant::Nf4 | lora_models::BaseQuant::Int8),
    };
    let p = memory::plan(m, storage, dtype_bytes(cfg.dtype), cfg.lora_rank, &cfg.target_modules, &workload, checkpointing);
    let lora_params = p.lora_parameters as f64;
    let own_bytes = p.lora_bytes + p.activation_bytes + p.workspace_bytes;

    // Forward 2 and backward-to-input 2 FLOPs per frozen matmul weight and token, 6 for
    // LoRA weights; attention 2 x 2 t d per token and layer forward (half of it causal),
    // three times that with the backward; checkpointing adds one forward (2 per weight).
    let seq = seq as f64;
    let t = tokens as f64;
    let recompute = if checkpointing { 2.0 * l * per_layer_matmul } else { 0.0 };
    let flops = t * (4.0 * (l * per_layer_matmul + vocab) + recompute + 6.0 * lora_params + l * 6.0 * seq * q);
    Estimate { base_bytes: p.base_bytes + p.process_bytes, own_bytes, lora_parameters: p.lora_parameters, flops, tokens }
}

/// Parameters of the frozen base (embeddings counted once when tied).
pub fn base_parameters(m: &ModelConfig) -> f64 {
    crate::memory::base_parameters(m)
}

/// What the packer needs of a candidate.
#[derive(Clone, Debug)]
pub struct Item {
    pub name: String,
    /// Candidates with equal keys can share one base in one process.
    pub pack_key: String,
    pub estimate: Estimate,
}

/// Candidates that train together in one process on one device.
#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Group {
    pub device: String,
    pub candidates: Vec<String>,
    pub memory_bytes: u64,
    pub est_seconds: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, serde::Deserialize)]
pub struct Plan {
    pub devices: Vec<DeviceSlot>,
    /// In launch order; a device runs its groups one after another.
    pub groups: Vec<Group>,
    pub max_parallel: usize,
    /// Estimated wall time: the busiest device's queue.
    pub est_seconds: f64,
}

/// First-fit-decreasing: candidates by memory, largest first, each into the first open
/// group (same pack key, under `max_parallel`, fitting its device), else a new group on
/// the device with the least queued time among those it fits.
pub fn pack(items: &[Item], devices: &[DeviceSlot], max_parallel: usize, packing: bool) -> Result<Plan> {
    if devices.is_empty() {
        bail!("no device to plan on");
    }
    let max_parallel = max_parallel.max(1);
    let mut order: Vec<&Item> = items.iter().collect();
    order.sort_by(|a, b| b.estimate.own_bytes.cmp(&a.estimate.own_bytes).then(a.name.cmp(&b.name)));
    struct Open {
        device: usize,
        key: String,
        members: Vec<String>,
        memory: u64,
        seconds: f64,
    }
    let mut groups: Vec<Open> = Vec::new();
    let mut queued = vec![0.0f64; devices.len()];
    for item in order {
        let e = &item.estimate;
        let secs_on = |d: &DeviceSlot| e.flops / d.flops_per_s.max(1.0);
        let fits = groups.iter().position(|g| {
            packing && g.key == item.pack_key && g.members.len() < max_parallel && g.memory + e.own_bytes <= devices[g.device].memory_bytes
        });
        match fits {
            Some(gi) => {
                let g = &mut groups[gi];
                g.members.push(item.name.clone());
                g.memory += e.own_bytes;
                // A packed group's time is the sum of its members' work (they share the
                // device), the same as running them one after another minus the base
                // traffic they share.
                let s = secs_on(&devices[g.device]);
                g.seconds += s;
                queued[g.device] += s;
            }
            None => {
                let need = e.base_bytes + e.own_bytes;
                let device = (0..devices.len())
                    .filter(|&d| devices[d].memory_bytes >= need)
                    .min_by(|&a, &b| queued[a].total_cmp(&queued[b]).then(a.cmp(&b)))
                    .with_context(|| {
                        let largest = devices.iter().map(|d| d.memory_bytes).max().unwrap_or(0);
                        format!(
                            "candidate {} needs about {:.1} GiB but the largest device has {:.1} GiB: lower --batch-size or --max-sequence-length, or use --base-dtype bf16",
                            item.name,
                            need as f64 / GIB,
                            largest as f64 / GIB
                        )
                    })?;
                let s = secs_on(&devices[device]);
                queued[device] += s;
                groups.push(Open { device, key: item.pack_key.clone(), members: vec![item.name.clone()], memory: need, seconds: s });
            }
        }
    }
    let est_seconds = queued.iter().copied().fold(0.0, f64::max);
    Ok(Plan {
        devices: devices.to_vec(),
        groups: groups
            .into_iter()
            .map(|g| Group { device: devices[g.device].name.clone(), candidates: g.members, memory_bytes: g.memory, est_seconds: g.seconds })
            .collect(),
        max_parallel,
        est_seconds,
    })
}

/// The CPU as a device: available memory, and a sustained rate from a short in-process
/// f32 GEMM (the same gemm crate the training step uses) at 60% of its speed, the
/// fraction of the GEMM ceiling a training step reached (BENCHMARKS.md).
pub fn cpu_device() -> DeviceSlot {
    DeviceSlot { name: "cpu".into(), memory_bytes: available_memory(), flops_per_s: 0.6 * measure_cpu_flops(), simulated: false }
}

fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("MemAvailable:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map(|kib| kib * 1024)
        .unwrap_or(8 << 30)
}

fn measure_cpu_flops() -> f64 {
    let n = 512usize;
    let dev = candle_core::Device::Cpu;
    let run = || -> candle_core::Result<f64> {
        let a = candle_core::Tensor::ones((n, n), candle_core::DType::F32, &dev)?;
        let b = candle_core::Tensor::ones((n, n), candle_core::DType::F32, &dev)?;
        a.matmul(&b)?; // warm up the thread pool
        let t0 = std::time::Instant::now();
        let reps = 4;
        for _ in 0..reps {
            a.matmul(&b)?;
        }
        Ok(reps as f64 * 2.0 * (n * n * n) as f64 / t0.elapsed().as_secs_f64().max(1e-9))
    };
    run().unwrap_or(50e9)
}

/// The GPUs this build sees, at their free memory.
pub fn gpu_devices() -> Vec<DeviceSlot> {
    crate::device::list_gpus()
        .unwrap_or_default()
        .into_iter()
        .map(|g| DeviceSlot { name: format!("cuda:{}", g.index), memory_bytes: g.free_memory as u64, flops_per_s: DEFAULT_GPU_FLOPS, simulated: false })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(name: &str, key: &str, base_gib: f64, own_gib: f64, tflop: f64) -> Item {
        Item {
            name: name.into(),
            pack_key: key.into(),
            estimate: Estimate { base_bytes: (base_gib * GIB) as u64, own_bytes: (own_gib * GIB) as u64, lora_parameters: 0, flops: tflop * 1e12, tokens: 0 },
        }
    }

    #[test]
    fn simulated_devices_parse() {
        let d = parse_simulated("cuda:0=24GiB, cuda:1=80GiB@150TFLOPS").unwrap();
        assert_eq!(d.len(), 2);
        assert_eq!(d[0].memory_bytes, 24 << 30);
        assert_eq!(d[1].flops_per_s, 150e12);
        assert!(d.iter().all(|d| d.simulated));
        assert!(parse_simulated("cuda:0").is_err());
        assert!(parse_simulated("cuda:0=24XB").is_err());
    }

    #[test]
    fn candidates_sharing_a_base_pack_into_one_group_per_device() {
        let devs = parse_simulated("cuda:0=80GiB").unwrap();
        let items: Vec<Item> = (0..3).map(|i| item(&format!("c{i}"), "m", 16.0, 10.0, 100.0)).collect();
        let plan = pack(&items, &devs, 6, true).unwrap();
        assert_eq!(plan.groups.len(), 1);
        assert_eq!(plan.groups[0].candidates.len(), 3);
        assert_eq!(plan.groups[0].memory_bytes, (46.0 * GIB) as u64, "one base + three candidates");
        let unpacked = pack(&items, &devs, 6, false).unwrap();
        assert_eq!(unpacked.groups.len(), 3);
    }

    #[test]
    fn what_does_not_fit_opens_a_group_on_the_least_loaded_device_that_fits() {
        let devs = parse_simulated("cuda:0=24GiB,cuda:1=80GiB").unwrap();
        let items = vec![item("big", "m", 16.0, 30.0, 10.0), item("a", "m", 16.0, 4.0, 10.0), item("b", "m", 16.0, 4.0, 10.0), item("c", "m", 16.0, 4.0, 10.0)];
        let plan = pack(&items, &devs, 6, true).unwrap();
        // big only fits the 80 GiB device; a and b join it (16+30+4+4 = 54 GiB), c too.
        assert_eq!(plan.groups.len(), 1);
        assert_eq!(plan.groups[0].device, "cuda:1");
        let tight = pack(&items, &devs, 2, true).unwrap();
        // max_parallel 2: groups of two; the second group goes to the idle 24 GiB device.
        assert_eq!(tight.groups.iter().map(|g| g.candidates.len()).collect::<Vec<_>>(), vec![2, 2]);
        assert_eq!(tight.groups[1].device, "cuda:0");
    }

    #[test]
    fn different_bases_never_share_a_group_and_oversized_candidates_fail_clearly() {
        let devs = parse_simulated("cuda:0=80GiB").unwrap();
        let plan = pack(&[item("a", "m1", 10.0, 5.0, 1.0), item("b", "m2", 10.0, 5.0, 1.0)], &devs, 6, true).unwrap();
        assert_eq!(plan.groups.len(), 2);
        let err = pack(&[item("huge", "m", 70.0, 20.0, 1.0)], &devs, 6, true).unwrap_err();
        assert!(format!("{err:#}").contains("huge needs about 90.0 GiB"), "{err:#}");
    }

    #[test]
    fn the_memory_model_matches_the_measured_smollm2_step() {
        let m = ModelConfig {
            architecture: lora_models::Architecture::Llama,
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            head_dim: 64,
            rms_norm_eps: 1e-5,
            rope_theta: 1e5,
            rope_llama3: None,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
            attention_bias: false,
            qk_norm: false,
            bos_token_id: None,
            eos_token_ids: vec![],
            raw: None,
        };
        let opts = crate::config::TrainOptions { model: Some("m".into()), dataset: Some("d".into()), output: Some("o".into()), lora_rank: Some(16), max_sequence_length: Some(256), ..Default::default() };
        let cfg = opts.resolve().unwrap();
        let e = estimate(&m, &cfg, 20 * 4 * 256, 256);
        let total = (e.base_bytes + e.own_bytes) as f64 / GIB;
        assert!((1.6..2.6).contains(&total), "{total} GiB");
        let base_params = (e.base_bytes as f64 - crate::memory::PROCESS_OVERHEAD) / 4.0;
        assert!((134e6..136e6).contains(&base_params), "{base_params} base params");
        assert_eq!(e.lora_parameters, 30 * 16 * (576 + 576 + 2 * (576 + 192) + 576 + 576 + 3 * (576 + 1536)));
    }
}
