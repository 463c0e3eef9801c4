//! The decoder: Llama, Qwen2 (q/k/v biases) and Qwen3 (per-head q/k RMSNorm,
//! free head_dim), grouped-query attention, LoRA on any projection.
//! Written here rather than reused from candle-transformers, whose models have
//! private Linear fields, last-token-only logits and no-backward ops (ARCHITECTURE.md, Pitfalls).
use crate::config::{Architecture, ModelConfig};
use crate::lora::{Linear, LoraSwitch};
use crate::quant::{BaseQuant, FrozenWeight};
use crate::rope::RotaryTables;
use crate::weights::{load_checked, WeightSource};
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use std::sync::Arc;

/// Frozen weights of projections that read the same input (q/k/v; gate/up),
/// concatenated once at load ([sum of outs, in]); each member `Linear`'s weight and
/// bias are views of its rows, so nothing is stored twice. One GEMM over the
/// concatenation replaces one per projection (fewer, bigger GEMMs: BENCHMARKS.md);
/// adapters stay per projection, PEFT-shaped.
#[derive(Clone)]
pub struct FusedWeights {
    /// The concatenated dense weight; None when the members are quantized (their
    /// dequantized rows are concatenated for each GEMM instead: a quantized base keeps
    /// each projection quantized on its own, as bitsandbytes and GGUF store them).
    pub weight: Option<Tensor>,
    pub bias: Option<Tensor>,
}

impl FusedWeights {
    /// Concatenate the members' weights (and biases: all or none) and point each
    /// member at its rows. None when the members cannot share one GEMM.
    fn fuse(members: &mut [&mut Linear]) -> Result<Option<Self>> {
        let with_bias = members.iter().filter(|l| l.bias.is_some()).count();
        if members.len() < 2 || (with_bias != 0 && with_bias != members.len()) {
            return Ok(None);
        }
        let bias = if with_bias > 0 { Some(Tensor::cat(&members.iter().map(|l| l.bias.as_ref().expect("checked")).collect::<Vec<_>>(), 0)?) } else { None };
        let quantized = members.iter().filter(|l| l.weight.quantized().is_some()).count();
        if quantized == members.len() {
            let mut off = 0;
            for l in members.iter_mut() {
                let out = l.out_features();
                l.bias = bias.as_ref().map(|b| b.narrow(0, off, out)).transpose()?;
                off += out;
            }
            return Ok(Some(Self { weight: None, bias }));
        }
        if quantized != 0 {
            return Ok(None);
        }
        let dense: Vec<Tensor> = members.iter().map(|l| l.weight.dense()).collect::<candle_core::Result<_>>()?;
        let weight = Tensor::cat(&dense, 0)?;
        let mut off = 0;
        for l in members.iter_mut() {
            let out = l.out_features();
            l.weight = FrozenWeight::Dense(weight.narrow(0, off, out)?);
            l.bias = bias.as_ref().map(|b| b.narrow(0, off, out)).transpose()?;
            off += out;
        }
        Ok(Some(Self { weight: Some(weight), bias }))
    }

    /// The dense concatenated weight (dequantized from the members when they are quantized).
    fn dense(&self, members: &[&Linear]) -> candle_core::Result<Tensor> {
        match &self.weight {
            Some(w) => Ok(w.clone()),
            None => {
                let q: Vec<&crate::quant::QuantizedMatrix> = members.iter().filter_map(|l| l.weight.quantized()).collect();
                crate::quant::dequantize_rows(&q)
            }
        }
    }

    /// The members' outputs on `x`, concatenated along the last dim (callers take
    /// views, so no per-member copy stays in the graph), from one GEMM over the concatenated weight plus
    /// each member's LoRA term: `x W_cat^T + (x A_cat^T) B_bd^T`, with A_cat the
    /// members' A stacked and B_bd block-diagonal (member i's `scale_i B_i` in its
    /// rows and rank columns). None when a member needs another path (several
    /// adapters, partial rows, dropout): then each projection runs on its own.
    fn forward(&self, members: &[&Linear], x: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let mut paths = Vec::with_capacity(members.len());
        for l in members {
            match l.plain_path(x)? {
                Some(p) => paths.push(p),
                None => return Ok(None),
            }
        }
        let rank: usize = paths.iter().flatten().map(|(a, _, _)| a.dim(0)).sum::<candle_core::Result<usize>>()?;
        let weight = self.dense(members)?;
        let y = if rank == 0 {
            lora_kernels::frozen_linear(x, &weight, self.bias.as_ref())?
        } else {
            let a_cat = Tensor::cat(&paths.iter().flatten().map(|(a, _, _)| a).collect::<Vec<_>>(), 0)?;
            let mut col = 0;
            let mut blocks = Vec::with_capacity(members.len());
            for (l, p) in members.iter().zip(&paths) {
                blocks.push(match p {
                    Some((a, b, scale)) => {
                        let r = a.dim(0)?;
                        let blk = (b * *scale)?.pad_with_zeros(1, col, rank - col - r)?;
                        col += r;
                        blk
                    }
                    None => Tensor::zeros((l.out_features(), rank), DType::F32, x.device())?,
                });
            }
            let b_bd = Tensor::cat(&blocks, 0)?;
            lora_kernels::lora_linear(x, &weight, self.bias.as_ref(), &a_cat, &b_bd, 1.0)?
        };
        Ok(Some(y))
    }
}

/// `LORA_TRAIN_FUSED_PROJECTIONS=0` keeps one GEMM per projection on CPU. The fused path
/// rounds differently (the LoRA scale is folded into B, the gradients of the stacked
/// adapters come out of one product), so a run alone and the same candidate packed in a
/// sweep (which routes rows per adapter, per projection) agree to ~1e-4 after training
/// instead of ~1e-6; the switch lets a comparison take the same path on both sides.
fn fused_projections_enabled() -> bool {
    std::env::var("LORA_TRAIN_FUSED_PROJECTIONS").map_or(true, |v| v.trim() != "0")
}

#[derive(Clone)]
pub struct Attention {
    /// q/k/v concatenated (CPU only; see [`FusedWeights`]).
    pub qkv: Option<FusedWeights>,
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    pub q_norm: Option<Tensor>,
    pub k_norm: Option<Tensor>,
}

#[derive(Clone)]
pub struct Mlp {
    /// gate/up concatenated (CPU only; see [`FusedWeights`]).
    pub gate_up: Option<FusedWeights>,
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

/// One decoder layer. Cloning is cheap (tensor handles): a checkpointed layer keeps a
/// clone to rerun in the backward.
#[derive(Clone)]
pub struct Layer {
    pub input_layernorm: Tensor,
    pub self_attn: Attention,
    pub post_attention_layernorm: Tensor,
    pub mlp: Mlp,
}

impl Layer {
    pub fn linears(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
    }
    pub fn linears_mut(&mut self) -> [&mut Linear; 7] {
        let (a, m) = (&mut self.self_attn, &mut self.mlp);
        [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj, &mut a.o_proj, &mut m.gate_proj, &mut m.up_proj, &mut m.down_proj]
    }
}

/// Keys and values of the positions seen so far, per layer: [b, kv_heads, T, d].
///
/// [`KvCache::with_capacity`] allocates each layer's buffers once, at the first step,
/// as [b, kv_heads, capacity, d], writes every step's positions in place and hands
/// attention a view of the filled part. [`KvCache::new`] grows by concatenation,
/// which reallocates and copies the whole cache every step.
///
/// A cache made by [`KvCache::share_prompts`] holds prompts once: each row's keys are its
/// prompt's (one row of a shared per-prompt cache, prefilled once) followed by its own
/// (the completion, appended in place). This is the two-block case of a paged KV cache
/// (a block table of two entries per row: the prompt block, shared and never written,
/// and the row's own block): rollouts append to every row in lockstep, so one own block
/// per row, preallocated to the longest completion, is as small as fixed-size pages
/// would be and needs no page table or gather in the attention kernel. Rows that join a
/// running stream later ([`KvCache::join_prompt`]) start their own block at the current
/// position (`own_start`); the positions no row needs are cut off when a group leaves
/// ([`KvCache::retain_rows`]). ARCHITECTURE.md, "Rollouts: one prompt KV per group".
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
    capacity: Option<usize>,
    prompts: Option<SharedPrompts>,
}

/// The prompt part of a shared-prompt cache: per layer, the prompts' keys and values
/// [p, kv_heads, len, d] (left-padded to the longest prompt), and which prompt each
/// batch row continues.
struct SharedPrompts {
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    of_row: Vec<u32>,
    /// Per row, its first own position (rows that joined a running batch start later).
    own_start: Vec<u32>,
}

/// One layer's shared prompts as attention reads them.
pub struct PromptKv<'a> {
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    /// The prompt row of each batch row.
    pub of_row: &'a [u32],
    /// The first own position each row reads.
    pub own_start: &'a [u32],
}

/// One layer's keys and values; with a capacity, only the first `len` positions
/// of the buffers are filled.
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

impl KvCache {
    /// A cache that grows by concatenation (no bound on its length).
    pub fn new() -> Self {
        Self::default()
    }
    /// A cache for at most `capacity` positions, preallocated at the first step.
    pub fn with_capacity(capacity: usize) -> Self {
        Self { layers: Vec::new(), capacity: Some(capacity), prompts: None }
    }
    /// Rows that continue the prompts of `prefilled` (one row per prompt, as prefilled):
    /// row r continues prompt `of_row[r]`, whose keys and values are held once and read
    /// in place by every row continuing it (never copied); each row appends its own
    /// positions, at most `capacity` of them. Decoding only (attention on such a cache
    /// has no backward).
    pub fn share_prompts(prefilled: KvCache, of_row: Vec<u32>, capacity: usize) -> candle_core::Result<Self> {
        if prefilled.prompts.is_some() {
            candle_core::bail!("share_prompts: the prefilled cache already shares prompts");
        }
        let (p, len) = (prefilled.rows(), prefilled.len());
        if let Some(bad) = of_row.iter().find(|&&r| r as usize >= p) {
            candle_core::bail!("share_prompts: row continues prompt {bad} of {p}");
        }
        let mut layers = Vec::with_capacity(prefilled.layers.len());
        for entry in prefilled.layers {
            let Some(e) = entry else { candle_core::bail!("share_prompts: a layer of the prefilled cache holds no keys") };
            // The filled part only: a buffer with spare capacity is copied once to its
            // length (a prefill sized to its prompts, as `rollouts` makes it, is not).
            let filled = e.len;
            let fit = |t: Tensor| -> candle_core::Result<Tensor> { if t.dim(2)? == filled { Ok(t) } else { t.narrow(2, 0, filled)?.contiguous() } };
            layers.push((fit(e.k)?, fit(e.v)?));
        }
        let own_start = vec![0; of_row.len()];
        Ok(Self { layers: Vec::new(), capacity: Some(capacity), prompts: Some(SharedPrompts { layers, len, of_row, own_start }) })
    }

    /// An empty shared-prompt cache that rows join with [`KvCache::join_prompt`] (own
    /// positions preallocated for `capacity`, grown by [`KvCache::reserve`]).
    pub fn shared_prompts(capacity: usize) -> Self {
        Self { layers: Vec::new(), capacity: Some(capacity), prompts: Some(SharedPrompts { layers: Vec::new(), len: 0, of_row: Vec::new(), own_start: Vec::new() }) }
    }

    /// Positions of the rows' own part (all rows write the next one in lockstep).
    pub fn own_len(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map(|l| l.len).unwrap_or(0)
    }

    /// Prompt positions every row's keys begin with (shorter prompts left-padded).
    pub fn prompt_len(&self) -> usize {
        self.prompts.as_ref().map_or(0, |s| s.len)
    }

    /// Each row's first own position.
    pub fn own_starts(&self) -> &[u32] {
        self.prompts.as_ref().map_or(&[], |s| &s.own_start)
    }

    /// `rows` new rows that continue the prompt of `prefilled` (one row, prefilled alone),
    /// which is stored once; the rows' own positions start at the current own length. A
    /// prompt shorter than the stored ones is left-padded to their length; a longer one
    /// pads them instead (one copy of each stored prompt, not of its rows).
    pub fn join_prompt(&mut self, prefilled: KvCache, rows: usize) -> candle_core::Result<()> {
        if prefilled.prompts.is_some() || prefilled.rows() != 1 {
            candle_core::bail!("join_prompt: takes one prefilled prompt row");
        }
        let own = self.own_len() as u32;
        let Some(s) = self.prompts.as_mut() else { candle_core::bail!("join_prompt: not a shared-prompt cache") };
        let len = prefilled.len();
        let pad = |t: &Tensor, n: usize| -> candle_core::Result<Tensor> {
            if n == 0 {
                return Ok(t.clone());
            }
            let (b, h, _, d) = t.dims4()?;
            Tensor::cat(&[&Tensor::zeros((b, h, n, d), t.dtype(), t.device())?, t], 2)
        };
        let longest = s.len.max(len);
        let mut layers = Vec::with_capacity(prefilled.layers.len());
        for (l, entry) in prefilled.layers.into_iter().enumerate() {
            let Some(e) = entry else { candle_core::bail!("join_prompt: a layer of the prefilled cache holds no keys") };
            let (k, v) = (pad(&e.k.narrow(2, 0, e.len)?, longest - len)?, pad(&e.v.narrow(2, 0, e.len)?, longest - len)?);
            layers.push(match s.layers.get(l) {
                Some((sk, sv)) => (Tensor::cat(&[&pad(sk, longest - s.len)?, &k], 0)?, Tensor::cat(&[&pad(sv, longest - s.len)?, &v], 0)?),
                None => (k.contiguous()?, v.contiguous()?),
            });
        }
        let prompt = s.layers.first().map_or(Ok(0), |(k, _)| k.dim(0))? as u32;
        s.layers = layers;
        s.len = longest;
        s.of_row.extend(std::iter::repeat_n(prompt, rows));
        s.own_start.extend(std::iter::repeat_n(own, rows));
        // The new rows' own buffers: zeros, never read (they start at `own`).
        for entry in self.layers.iter_mut().flatten() {
            let (_, h, c, d) = entry.k.dims4()?;
            let z = Tensor::zeros((rows, h, c, d), entry.k.dtype(), entry.k.device())?;
            entry.k = Tensor::cat(&[&entry.k, &z], 0)?;
            entry.v = Tensor::cat(&[&entry.v, &z], 0)?;
        }
        Ok(())
    }
    /// Layer `layer`'s shared prompts, if this cache shares prompts.
    pub fn prompts(&self, layer: usize) -> Option<PromptKv<'_>> {
        let s = self.prompts.as_ref()?;
        let (k, v) = s.layers.get(layer)?;
        Some(PromptKv { k, v, of_row: &s.of_row, own_start: &s.own_start })
    }
    pub fn capacity(&self) -> Option<usize> {
        self.capacity
    }
    /// Positions per row: the shared prompt's (if any) and the row's own.
    pub fn len(&self) -> usize {
        self.prompts.as_ref().map_or(0, |s| s.len) + self.layers.first().and_then(|l| l.as_ref()).map(|l| l.len).unwrap_or(0)
    }
    /// Bytes of keys and values held (buffers at their capacity; shared prompts once).
    pub fn bytes(&self) -> usize {
        let size = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        let own: usize = self.layers.iter().flatten().map(|l| size(&l.k) + size(&l.v)).sum();
        own + self.prompts.as_ref().map_or(0, |s| s.layers.iter().map(|(k, v)| size(k) + size(v)).sum())
    }
    /// Refuses what a shared-prompt cache cannot do (its rows' positions are split in two).
    fn own_rows_only(&self, what: &str) -> candle_core::Result<()> {
        if self.prompts.is_some() {
            candle_core::bail!("{what}: not supported on a cache that shares prompts");
        }
        Ok(())
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A one-row cache holding, per layer, the keys and values [1, kv_heads, len, d] of a
    /// prompt prefix prefilled earlier (`PrefixCache`); it grows by concatenation, so
    /// a forward over the rest of the prompt appends to it.
    pub fn from_layers(layers: Vec<(Tensor, Tensor)>) -> candle_core::Result<Self> {
        let mut entries = Vec::with_capacity(layers.len());
        for (k, v) in layers {
            if k.dim(0)? != 1 || k.dims() != v.dims() {
                candle_core::bail!("from_layers: keys {:?} and values {:?} are not one row of the same shape", k.dims(), v.dims());
            }
            entries.push(Some(into_buffers(k, v, None)?));
        }
        Ok(Self { layers: entries, capacity: None, prompts: None })
    }

    /// Layers that hold keys.
    pub fn layer_count(&self) -> usize {
        self.layers.iter().flatten().count()
    }

    /// Row 0's keys and values of layer `layer` at positions `start..start + len`, as
    /// fresh tensors (they keep nothing else of the cache alive).
    pub fn row_positions(&self, layer: usize, start: usize, len: usize) -> candle_core::Result<(Tensor, Tensor)> {
        self.own_rows_only("row_positions")?;
        let Some(Some(e)) = self.layers.get(layer) else { candle_core::bail!("row_positions: layer {layer} holds no keys") };
        if start + len > e.len {
            candle_core::bail!("row_positions: positions {start}..{} of {}", start + len, e.len);
        }
        let copy = |t: &Tensor| -> candle_core::Result<Tensor> { t.narrow(0, 0, 1)?.narrow(2, start, len)?.force_contiguous() };
        Ok((copy(&e.k)?, copy(&e.v)?))
    }

    /// Copy every row `n` times in place of the cache (row r becomes rows r*n..r*n+n):
    /// a prompt prefilled once then continues as `n` independent samples. The buffers
    /// keep their capacity.
    pub fn repeat_rows(&mut self, n: usize) -> candle_core::Result<()> {
        self.own_rows_only("repeat_rows")?;
        for entry in self.layers.iter_mut().flatten() {
            let b = entry.k.dim(0)?;
            let index: Vec<u32> = (0..b as u32).flat_map(|r| std::iter::repeat_n(r, n)).collect();
            let index = Tensor::from_vec(index, b * n, entry.k.device())?;
            // A concatenation-grown cache may hold views (v is a transposed projection).
            entry.k = entry.k.contiguous()?.index_select(&index, 0)?;
            entry.v = entry.v.contiguous()?.index_select(&index, 0)?;
        }
        Ok(())
    }

    /// Batch rows held (0 before the first step; a shared-prompt cache: its rows).
    pub fn rows(&self) -> usize {
        if let Some(s) = &self.prompts {
            return s.of_row.len();
        }
        self.layers.first().and_then(|l| l.as_ref()).and_then(|l| l.k.dim(0).ok()).unwrap_or(0)
    }

    /// Keep rows `keep`, in that order (a row may be dropped, moved or repeated): the
    /// rows that continue a continuous batch after some finished, regrouped by adapter.
    pub fn retain_rows(&mut self, keep: &[usize]) -> candle_core::Result<()> {
        if keep.is_empty() {
            self.layers.clear();
            if let Some(s) = self.prompts.as_mut() {
                (s.of_row, s.own_start, s.layers, s.len) = (Vec::new(), Vec::new(), Vec::new(), 0);
            }
            return Ok(());
        }
        let rows = self.rows();
        if let Some(bad) = keep.iter().find(|&&r| r >= rows) {
            candle_core::bail!("retain_rows: row {bad} of a cache of {rows} rows");
        }
        let index: Vec<u32> = keep.iter().map(|&r| r as u32).collect();
        let mut drop = 0;
        if let Some(s) = self.prompts.as_mut() {
            // The rows' own positions move; prompts no kept row continues are dropped and
            // own positions before every kept row's start are cut off.
            let used: Vec<u32> = {
                let mut u: Vec<u32> = keep.iter().map(|&r| s.of_row[r]).collect();
                u.sort_unstable();
                u.dedup();
                u
            };
            s.of_row = keep.iter().map(|&r| used.binary_search(&s.of_row[r]).unwrap_or(0) as u32).collect();
            s.own_start = keep.iter().map(|&r| s.own_start[r]).collect();
            if used.len() < s.layers.first().map_or(Ok(0), |(k, _)| k.dim(0))? {
                let at = Tensor::from_slice(&used, used.len(), &Device::Cpu)?;
                for (k, v) in s.layers.iter_mut() {
                    let at = at.to_device(k.device())?;
                    (*k, *v) = (k.index_select(&at, 0)?, v.index_select(&at, 0)?);
                }
            }
            drop = s.own_start.iter().copied().min().unwrap_or(0) as usize;
            s.own_start.iter_mut().for_each(|x| *x -= drop as u32);
        }
        let len = self.own_len();
        self.rebuild(None, |t| t.index_select(&Tensor::from_slice(&index, index.len(), t.device())?, 0)?.narrow(2, drop, len - drop))
    }

    /// Append the rows of `other` (same length, same layers) after this cache's rows.
    pub fn append_rows(&mut self, other: KvCache) -> candle_core::Result<()> {
        self.own_rows_only("append_rows")?;
        other.own_rows_only("append_rows")?;
        if self.layers.iter().all(Option::is_none) {
            let capacity = self.capacity;
            self.layers = other.layers;
            self.capacity = other.capacity;
            return match capacity {
                Some(c) => self.reserve(c),
                None => Ok(()),
            };
        }
        if other.len() != self.len() || other.layers.len() != self.layers.len() {
            candle_core::bail!("append_rows: a cache of {} positions x {} layers onto one of {} x {}", other.len(), other.layers.len(), self.len(), self.layers.len());
        }
        let filled = |l: &LayerKv| -> candle_core::Result<(Tensor, Tensor)> { Ok((l.k.narrow(2, 0, l.len)?, l.v.narrow(2, 0, l.len)?)) };
        let capacity = self.capacity;
        for (mine, theirs) in self.layers.iter_mut().zip(&other.layers) {
            let (Some(m), Some(o)) = (mine.as_mut(), theirs.as_ref()) else { candle_core::bail!("append_rows: a layer holds no keys") };
            let ((mk, mv), (ok, ov)) = (filled(m)?, filled(o)?);
            let (k, v) = (Tensor::cat(&[&mk.contiguous()?, &ok.contiguous()?], 0)?, Tensor::cat(&[&mv.contiguous()?, &ov.contiguous()?], 0)?);
            *m = into_buffers(k, v, capacity)?;
        }
        Ok(())
    }

    /// Insert `n` empty positions before every row's first (the rows' real positions
    /// must then be marked with segment 0 there): aligns a shorter cache with a longer
    /// one before [`KvCache::append_rows`].
    pub fn pad_front(&mut self, n: usize) -> candle_core::Result<()> {
        self.own_rows_only("pad_front")?;
        if n == 0 {
            return Ok(());
        }
        let capacity = self.capacity.map(|c| c + n);
        self.capacity = capacity;
        self.rebuild(capacity, |t| {
            let (b, h, _, d) = t.dims4()?;
            Tensor::cat(&[&Tensor::zeros((b, h, n, d), t.dtype(), t.device())?, t], 2)
        })
    }

    /// Drop the first `n` positions of every row (padding no row needs any more).
    pub fn drop_front(&mut self, n: usize) -> candle_core::Result<()> {
        self.own_rows_only("drop_front")?;
        if n == 0 {
            return Ok(());
        }
        let len = self.len();
        if n > len {
            candle_core::bail!("drop_front: {n} of {len} positions");
        }
        self.rebuild(None, |t| t.narrow(2, n, len - n))
    }

    /// Room for at least `capacity` positions (a capacity-less cache gets one).
    pub fn reserve(&mut self, capacity: usize) -> candle_core::Result<()> {
        if self.capacity.is_some_and(|c| c >= capacity) {
            return Ok(());
        }
        self.capacity = Some(capacity);
        self.rebuild(Some(capacity), |t| Ok(t.clone()))
    }

    /// Apply `f` to every layer's filled keys and values, into fresh buffers of
    /// `capacity` (default: the cache's own).
    fn rebuild(&mut self, capacity: Option<usize>, f: impl Fn(&Tensor) -> candle_core::Result<Tensor>) -> candle_core::Result<()> {
        let capacity = capacity.or(self.capacity);
        for entry in self.layers.iter_mut().flatten() {
            let k = f(&entry.k.narrow(2, 0, entry.len)?.contiguous()?)?;
            let v = f(&entry.v.narrow(2, 0, entry.len)?.contiguous()?)?;
            *entry = into_buffers(k, v, capacity)?;
        }
        Ok(())
    }

    /// Add layer `layer`'s new keys and values [b, kv_heads, t, d]; returns those of
    /// every position so far.
    pub fn append(&mut self, layer: usize, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        if self.layers.len() <= layer {
            self.layers.resize_with(layer + 1, || None);
        }
        let slot = &mut self.layers[layer];
        match self.capacity {
            Some(capacity) => append_in_place(slot, capacity, k, v),
            None => append_cat(slot, k, v),
        }
    }
}

/// Filled keys and values [b, h, len, d] as a layer entry: copied into buffers of
/// `capacity` positions when the cache has one (so decode steps write in place).
fn into_buffers(k: Tensor, v: Tensor, capacity: Option<usize>) -> candle_core::Result<LayerKv> {
    let (b, h, len, d) = k.dims4()?;
    match capacity {
        Some(c) => {
            let c = c.max(len);
            let kb = Tensor::zeros((b, h, c, d), k.dtype(), k.device())?;
            let vb = Tensor::zeros((b, h, c, d), v.dtype(), v.device())?;
            kb.slice_set(&k.contiguous()?, 2, 0)?;
            vb.slice_set(&v.contiguous()?, 2, 0)?;
            Ok(LayerKv { k: kb, v: vb, len })
        }
        None => Ok(LayerKv { k: k.contiguous()?, v: v.contiguous()?, len }),
    }
}

fn append_cat(slot: &mut Option<LayerKv>, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let (k, v) = match slot.take() {
        Some(past) => (Tensor::cat(&[&past.k, k], 2)?, Tensor::cat(&[&past.v, v], 2)?),
        None => (k.clone(), v.clone()),
    };
    *slot = Some(LayerKv { k: k.clone(), v: v.clone(), len: k.dim(2)? });
    Ok((k, v))
}

fn append_in_place(slot: &mut Option<LayerKv>, capacity: usize, k: &Tensor, v: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    // The buffers are written in place, which autograd cannot see: gradients would
    // silently stop at the cache.
    if k.track_op() || v.track_op() {
        candle_core::bail!("a preallocated KV cache records no autograd graph: run under Model::inference() or use KvCache::new()");
    }
    let (b, h, t, d) = k.dims4()?;
    let entry = match slot {
        Some(e) => e,
        None => {
            let buffer = || Tensor::zeros((b, h, capacity, d), k.dtype(), k.device());
            slot.insert(LayerKv { k: buffer()?, v: buffer()?, len: 0 })
        }
    };
    if entry.len + t > capacity {
        candle_core::bail!("KV cache full: {} cached + {t} new positions exceed its capacity of {capacity}", entry.len);
    }
    // slice_set needs contiguous sources; v arrives as a transposed view of the
    // projection (this copies only the new positions).
    entry.k.slice_set(&k.contiguous()?, 2, entry.len)?;
    entry.v.slice_set(&v.contiguous()?, 2, entry.len)?;
    entry.len += t;
    Ok((entry.k.narrow(2, 0, entry.len)?, entry.v.narrow(2, 0, entry.len)?))
}

pub struct Decoder {
    pub cfg: ModelConfig,
    pub embed_tokens: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// None when tied to `embed_tokens`.
    pub lm_head: Option<Tensor>,
    pub rotary: RotaryTables,
    pub switch: Arc<LoraSwitch>,
    pub device: Device,
    /// Storage dtype of the frozen weights.
    pub dtype: DType,
    /// dtype of activations (f32 compute over bf16-stored weights halves weight memory).
    pub compute_dtype: DType,
    /// How the projections' weights are stored (resolved: never `Auto`).
    pub base_quant: BaseQuant,
    /// Keep only each layer's input for the backward and rerun the layer there (set
    /// through a shared reference: the engine decides it before the first step).
    pub gradient_checkpointing: std::sync::atomic::AtomicBool,
    /// Gradients of LoRA weights that the layers' reruns computed during a backward.
    pub checkpoint_grads: Arc<crate::checkpointing::CheckpointGrads>,
}

impl Decoder {
    /// `dtype`: how the frozen weights are stored; `compute_dtype`: the activations'.
    /// `quant`: how the projections are stored (embeddings, norms and lm_head stay
    /// dense in `dtype`); a tensor is quantized as soon as it is read, so the dense
    /// model is never held (a GGUF tensor keeps its blocks under `Auto`).
    pub fn load(cfg: ModelConfig, src: &dyn WeightSource, device: &Device, dtype: DType, compute_dtype: DType, quant: BaseQuant) -> Result<Self> {
        let switch = Arc::new(LoraSwitch::default());
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (nh, nkv) = (cfg.num_attention_heads, cfg.num_key_value_heads);
        let get = |name: &str, shape: &[usize]| load_checked(src, name, shape, dtype, device);
        let mut index = 0usize;
        let mut stored = BaseQuant::None;
        let mut linear = |name: String, out: usize, inp: usize, bias: bool| -> Result<Linear> {
            let (weight, kind) = crate::weights::load_frozen(src, &format!("{name}.weight"), &[out, inp], dtype, device, quant)?;
            stored = kind;
            let bias = if bias { Some(get(&format!("{name}.bias"), &[out])?) } else { None };
            index += 1;
            Ok(Linear { name, index, weight, bias, adapters: Vec::new(), switch: switch.clone() })
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let qkv_bias = cfg.attention_bias;
            let mut self_attn = Attention {
                qkv: None,
                q_proj: linear(format!("{p}.self_attn.q_proj"), nh * hd, h, qkv_bias)?,
                k_proj: linear(format!("{p}.self_attn.k_proj"), nkv * hd, h, qkv_bias)?,
                v_proj: linear(format!("{p}.self_attn.v_proj"), nkv * hd, h, qkv_bias)?,
                o_proj: linear(format!("{p}.self_attn.o_proj"), h, nh * hd, cfg.architecture == Architecture::Llama && cfg.attention_bias)?,
                q_norm: if cfg.qk_norm { Some(get(&format!("{p}.self_attn.q_norm.weight"), &[hd])?) } else { None },
                k_norm: if cfg.qk_norm { Some(get(&format!("{p}.self_attn.k_norm.weight"), &[hd])?) } else { None },
            };
            let mut mlp = Mlp {
                gate_up: None,
                gate_proj: linear(format!("{p}.mlp.gate_proj"), i, h, false)?,
                up_proj: linear(format!("{p}.mlp.up_proj"), i, h, false)?,
                down_proj: linear(format!("{p}.mlp.down_proj"), h, i, false)?,
            };
            // On CPU one GEMM per group; other devices keep one kernel per projection.
            if device.is_cpu() && fused_projections_enabled() {
                let a = &mut self_attn;
                a.qkv = FusedWeights::fuse(&mut [&mut a.q_proj, &mut a.k_proj, &mut a.v_proj])?;
                mlp.gate_up = FusedWeights::fuse(&mut [&mut mlp.gate_proj, &mut mlp.up_proj])?;
            }
            layers.push(Layer {
                input_layernorm: get(&format!("{p}.input_layernorm.weight"), &[h])?,
                self_attn,
                post_attention_layernorm: get(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                mlp,
            });
        }
        let embed_tokens = get("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            // The tensor read here is the one kept (reading it again would hold two
            // copies of the largest tensor at once: 1 GB in bf16 for an 8B model).
            match src.try_get("lm_head.weight", device)? {
                Some(t) => Some(crate::weights::check_loaded(src, "lm_head.weight", t, &[cfg.vocab_size, h], dtype)?),
                // Some exports omit lm_head although the config says untied: treat as
                // tied (`load_model_mixed` warns, naming the model).
                None => None,
            }
        };
        Ok(Self {
            rotary: RotaryTables::new(&cfg),
            norm: get("model.norm.weight", &[h])?,
            cfg,
            embed_tokens,
            layers,
            lm_head,
            switch,
            device: device.clone(),
            dtype,
            compute_dtype,
            base_quant: stored,
            gradient_checkpointing: Default::default(),
            checkpoint_grads: Arc::default(),
        })
    }

    pub fn lm_head_weight(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed_tokens)
    }

    /// Hidden states after the final norm, [b, tq, hidden].
    /// `positions`: [b*tq] rotary positions of the new tokens; `segments`: [b*total]
    /// segment ids of every position (cached + new): a query attends earlier keys of
    /// its own contiguous run of equal ids (causal + padding + packing in one rule).
    pub fn forward(&self, input_ids: &Tensor, positions: &[u32], segments: &[u32], cache: Option<&mut KvCache>) -> candle_core::Result<Tensor> {
        let (b, tq) = input_ids.dims2()?;
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let total = past + tq;
        let (cos, sin) = self.rotary.tables(positions, b, tq, &self.device)?;
        // Segment ids of every key position (0 = padding, packed samples 1, 2, ..): the
        // fused attention lets a query see only earlier keys of its own segment.
        let segment_ids = Tensor::from_slice(segments, (b, total), &self.device)?;
        let mut h = self
            .embed_tokens
            .index_select(&input_ids.flatten_all()?, 0)?
            .reshape((b, tq, self.cfg.hidden_size))?
            .to_dtype(self.compute_dtype)?;
        let mut cache = cache;
        // Checkpoint only what a backward will run through: a training forward without a
        // KV cache. Inference and decoding record no graph, so there is nothing to save.
        let checkpoint = self.gradient_checkpointing.load(std::sync::atomic::Ordering::Relaxed) && cache.is_none() && !self.switch.inference();
        let ctx = LayerInputs { cfg: &self.cfg, cos: &cos, sin: &sin, segment_ids: &segment_ids };
        for (l, layer) in self.layers.iter().enumerate() {
            h = if checkpoint {
                crate::checkpointing::checkpointed_layer(&h, layer, &ctx, &self.switch, &self.checkpoint_grads)?
            } else {
                let slot = cache.as_deref_mut().map(|c| (c, l));
                layer_forward(layer, &ctx, &h, slot)?
            };
        }
        lora_kernels::rms_norm(&h, &self.norm, self.cfg.rms_norm_eps)
    }
}


/// What every layer of one forward reads besides its input: the model's shape, the
/// rotary tables of the batch's positions and the segment ids of every key position.
#[derive(Clone, Copy)]
pub struct LayerInputs<'a> {
    pub cfg: &'a ModelConfig,
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
    pub segment_ids: &'a Tensor,
}

/// One decoder layer on the hidden state `h` [b, t, hidden]: pre-norm attention and
/// SwiGLU MLP, each with its residual.
pub fn layer_forward(layer: &Layer, ctx: &LayerInputs, h: &Tensor, cache: Option<(&mut KvCache, usize)>) -> candle_core::Result<Tensor> {
    let eps = ctx.cfg.rms_norm_eps;
    let x = lora_kernels::rms_norm(h, &layer.input_layernorm, eps)?;
    let attn = attention(&layer.self_attn, ctx, &x, cache)?;
    let h = (h + attn)?;
    let x = lora_kernels::rms_norm(&h, &layer.post_attention_layernorm, eps)?;
    let mlp = &layer.mlp;
    let fused = match &mlp.gate_up {
        Some(f) => f.forward(&[&mlp.gate_proj, &mlp.up_proj], &x)?,
        None => None,
    };
    let act = match fused {
        // [gate | up] read in place by the op.
        Some(y) => lora_kernels::swiglu_cat(&y)?,
        None => lora_kernels::swiglu(&mlp.gate_proj.forward(&x)?, &mlp.up_proj.forward(&x)?)?,
    };
    h + mlp.down_proj.forward(&act)?
}

fn attention(attn: &Attention, ctx: &LayerInputs, x: &Tensor, cache: Option<(&mut KvCache, usize)>) -> candle_core::Result<Tensor> {
    let cfg = ctx.cfg;
    let (b, t, _) = x.dims3()?;
    let (nh, nkv, hd) = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let heads = |y: Tensor, n: usize| y.reshape((b, t, n, hd))?.transpose(1, 2);
    let fused = match &attn.qkv {
        Some(f) => f.forward(&[&attn.q_proj, &attn.k_proj, &attn.v_proj], x)?,
        None => None,
    };
    let (mut q, mut k, v) = match fused {
        // [b, t, nh + 2 nkv, hd] is a view of the fused output; q/k/v are strided
        // views of it ([b, heads, t, hd] with unit stride in hd, which rope and
        // attention read in place).
        Some(y) => {
            let y = y.reshape((b, t, nh + 2 * nkv, hd))?;
            (y.narrow(2, 0, nh)?.transpose(1, 2)?, y.narrow(2, nh, nkv)?.transpose(1, 2)?, y.narrow(2, nh + nkv, nkv)?.transpose(1, 2)?)
        }
        None => (heads(attn.q_proj.forward(x)?, nh)?, heads(attn.k_proj.forward(x)?, nkv)?, heads(attn.v_proj.forward(x)?, nkv)?),
    };
    if let (Some(qn), Some(kn)) = (&attn.q_norm, &attn.k_norm) {
        q = lora_kernels::rms_norm(&q, qn, cfg.rms_norm_eps)?;
        k = lora_kernels::rms_norm(&k, kn, cfg.rms_norm_eps)?;
    }
    let q = lora_kernels::rope(&q, ctx.cos, ctx.sin)?;
    let k = lora_kernels::rope(&k, ctx.cos, ctx.sin)?;
    let scale = 1.0 / (hd as f64).sqrt();
    let y = match cache {
        Some((c, layer)) => {
            let (k, v) = c.append(layer, &k, &v)?;
            match c.prompts(layer) {
                // Each row reads its prompt's shared keys, then its own.
                Some(p) => lora_kernels::prefix_causal_attention(&q, &k, &v, p.k, p.v, p.of_row, p.own_start, ctx.segment_ids, scale)?,
                None => lora_kernels::causal_attention(&q, &k, &v, Some(ctx.segment_ids), scale)?,
            }
        }
        None => lora_kernels::causal_attention(&q, &k, &v, Some(ctx.segment_ids), scale)?,
    };
    let y = y.transpose(1, 2)?.reshape((b, t, nh * hd))?;
    attn.o_proj.forward(&y)
}
