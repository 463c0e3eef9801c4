//! Where base weights come from: Hugging Face safetensors (single or sharded, any
//! float dtype) or a GGUF file (dequantized on load). Both are addressed by the
//! Hugging Face tensor name, so the decoder does not care which it reads.
use anyhow::{bail, Context, Result};
use crate::quant::{quantize_weight, BaseQuant, FrozenWeight, QuantizedData, QuantizedMatrix};
use candle_core::quantized::{gguf_file, GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

pub trait WeightSource {
    /// The tensor called `name` (HF naming), or None when the file lacks it.
    fn try_get(&self, name: &str, device: &Device) -> Result<Option<Tensor>>;
    /// Human-readable origin, for error messages.
    fn origin(&self) -> String;
    /// The tensor as stored when the file keeps it in GGUF blocks (rows in HF order),
    /// for a base that stays quantized. None when the source stores it dense.
    fn try_get_blocks(&self, _name: &str, _device: &Device) -> Result<Option<QTensor>> {
        Ok(None)
    }
}

/// A projection weight for a base stored as `quant`, and how it ended up stored:
/// `Auto` keeps GGUF blocks and loads everything else dense; `Nf4`/`Int8` quantize the
/// tensor as soon as it is read (one tensor dense at a time, never the whole model).
pub fn load_frozen(src: &dyn WeightSource, name: &str, shape: &[usize], dtype: DType, device: &Device, quant: BaseQuant) -> Result<(FrozenWeight, BaseQuant)> {
    let [rows, cols] = shape else { bail!("load_frozen: `{name}` is not a matrix") };
    if quant == BaseQuant::Auto {
        if let Some(q) = src.try_get_blocks(name, device)? {
            if q.shape().dims() != shape {
                bail!("{}: tensor `{name}` has shape {:?}, expected {:?}", src.origin(), q.shape().dims(), shape);
            }
            let m = QuantizedMatrix { rows: *rows, cols: *cols, data: QuantizedData::Gguf(q), dtype, device: device.clone() };
            return Ok((FrozenWeight::Quantized(std::sync::Arc::new(m)), BaseQuant::Auto));
        }
    }
    let dense = load_checked(src, name, shape, dtype, device)?;
    match quant {
        BaseQuant::Auto | BaseQuant::None => Ok((FrozenWeight::Dense(dense), BaseQuant::None)),
        BaseQuant::Nf4 | BaseQuant::Int8 => {
            let m = quantize_weight(name, &dense, quant, dtype, device).with_context(|| src.origin())?;
            Ok((FrozenWeight::Quantized(std::sync::Arc::new(m)), quant))
        }
    }
}

/// Load `name`, check its shape, convert to `dtype`.
pub fn load_checked(src: &dyn WeightSource, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    let t = src
        .try_get(name, device)?
        .with_context(|| format!("{}: missing tensor `{name}`", src.origin()))?;
    check_loaded(src, name, t, shape, dtype)
}

/// `t`, read from `src` as `name`: check its shape, convert to `dtype`.
pub fn check_loaded(src: &dyn WeightSource, name: &str, t: Tensor, shape: &[usize], dtype: DType) -> Result<Tensor> {
    if t.dims() != shape {
        bail!("{}: tensor `{name}` has shape {:?}, expected {:?}", src.origin(), t.dims(), shape);
    }
    Ok(t.to_dtype(dtype)?)
}

/// Safetensors shards, mapped one tensor at a time: every page of a mapping that a
/// read touched counts in the process's resident set until the mapping goes, so keeping
/// all shards mapped while the decoder loads would hold the whole checkpoint resident
/// (16 GB of bf16 for an 8B model, whatever the base is quantized to). `try_get` maps
/// the tensor's shard, copies the tensor out and unmaps it again.
pub struct SafetensorsSource {
    files: Vec<PathBuf>,
    /// Tensor name -> index into `files`.
    shard_of: std::collections::HashMap<String, usize>,
}

impl SafetensorsSource {
    /// `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files = if single.exists() {
            vec![single]
        } else if index.exists() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("{}: cannot read", index.display()))?;
            let json: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: invalid JSON", index.display()))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .with_context(|| format!("{}: no `weight_map` object", index.display()))?;
            let mut shards: Vec<String> = map.values().filter_map(|v| v.as_str().map(String::from)).collect();
            shards.sort();
            shards.dedup();
            let files: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
            for f in &files {
                if !f.exists() {
                    bail!("{}: shard `{}` listed in the index is missing", index.display(), f.display());
                }
            }
            files
        } else {
            bail!("{}: neither model.safetensors nor model.safetensors.index.json found", dir.display());
        };
        let mut shard_of = std::collections::HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for (name, _) in map_shard(f)?.tensors() {
                shard_of.insert(name, i);
            }
        }
        Ok(Self { files, shard_of })
    }
}

/// One shard memory-mapped (only its header is read here); unmapped when dropped.
fn map_shard(path: &Path) -> Result<candle_core::safetensors::MmapedSafetensors> {
    // SAFETY: the file is memory-mapped read-only; modifying it while we run is the
    // user's problem, as with every mmap-based loader.
    unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.with_context(|| format!("{}: not a readable safetensors file", path.display()))
}

impl WeightSource for SafetensorsSource {
    fn try_get(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        let Some(&shard) = self.shard_of.get(name) else { return Ok(None) };
        // The copy out of the mapping is the tensor's own storage; the mapping goes here.
        Ok(Some(map_shard(&self.files[shard])?.load(name, device)?))
    }
    fn origin(&self) -> String {
        match self.files.as_slice() {
            [one] => one.display().to_string(),
            many => format!("{} (+{} shards)", many[0].display(), many.len() - 1),
        }
    }
}

pub struct GgufSource {
    path: PathBuf,
    content: gguf_file::Content,
    /// llama.cpp's converter permutes the rows of q/k for the `llama` arch (its RoPE
    /// pairs adjacent dims); HF pairs halves. We undo it so adapters are in HF layout.
    unpermute_qk: Option<(usize, usize)>, // (n_head, n_kv_head)
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<Self> {
        let mut file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let content = gguf_file::Content::read(&mut file).with_context(|| format!("{}: not a readable GGUF file", path.display()))?;
        Ok(Self { path: path.to_path_buf(), content, unpermute_qk: None })
    }
    pub fn content(&self) -> &gguf_file::Content {
        &self.content
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn set_unpermute_qk(&mut self, heads: Option<(usize, usize)>) {
        self.unpermute_qk = heads;
    }
}

/// HF tensor name -> llama.cpp's GGUF tensor name (`model.layers.3.self_attn.q_proj.weight`
/// -> `blk.3.attn_q.weight`), for the decoders we load; None for any other name.
pub fn gguf_tensor_name(name: &str) -> Option<String> {
    if name == "model.embed_tokens.weight" {
        return Some("token_embd.weight".into());
    }
    if name == "model.norm.weight" {
        return Some("output_norm.weight".into());
    }
    if name == "lm_head.weight" {
        return Some("output.weight".into());
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, kind) = rest.rsplit_once('.')?; // kind: weight | bias
    let g = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

/// llama.cpp's `LlamaModel.permute(w, n_head)` (convert_hf_to_gguf, `llama` arch only): its
/// RoPE rotates adjacent dims, HF's rotates halves, so rows [n_head, 2, d/2] are stored as
/// [n_head, d/2, 2]. Works on any [out, ..] tensor whose rows are q/k outputs (a weight or a
/// LoRA B).
pub fn permute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / n_head / 2;
    Ok(w.reshape((n_head, 2, half, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// Inverse of llama.cpp's `permute(w, n_head)`:
/// HF [n_head, 2, d/2, in] was stored as [n_head, d/2, 2, in].
fn unpermute_rows(w: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = w.dims2()?;
    let half = out / n_head / 2;
    Ok(w.reshape((n_head, half, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

impl WeightSource for GgufSource {
    fn try_get(&self, name: &str, device: &Device) -> Result<Option<Tensor>> {
        let Some(gname) = gguf_tensor_name(name) else { return Ok(None) };
        if !self.content.tensor_infos.contains_key(&gname) {
            return Ok(None);
        }
        let mut file = std::fs::File::open(&self.path)?;
        let q = self
            .content
            .tensor(&mut file, &gname, device)
            .with_context(|| format!("{}: cannot read tensor `{gname}`", self.path.display()))?;
        let mut t = q
            .dequantize(device)
            .with_context(|| format!("{}: cannot dequantize `{gname}` ({:?})", self.path.display(), q.dtype()))?;
        if let Some((n_head, n_kv)) = self.unpermute_qk {
            if gname.ends_with("attn_q.weight") {
                t = unpermute_rows(&t, n_head)?;
            } else if gname.ends_with("attn_k.weight") {
                t = unpermute_rows(&t, n_kv)?;
            } else if gname.ends_with("attn_q.bias") || gname.ends_with("attn_k.bias") {
                bail!("{}: q/k biases with permuted llama rows are not supported", self.path.display());
            }
        }
        Ok(Some(t))
    }
    fn origin(&self) -> String {
        self.path.display().to_string()
    }
    fn try_get_blocks(&self, name: &str, device: &Device) -> Result<Option<QTensor>> {
        let Some(gname) = gguf_tensor_name(name) else { return Ok(None) };
        let Some(info) = self.content.tensor_infos.get(&gname) else { return Ok(None) };
        let ty = info.ggml_dtype;
        // Dense tensors inside a GGUF load dense, as from safetensors.
        if matches!(ty, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
            return Ok(None);
        }
        if !crate::quant::gguf_type_supported(ty) {
            bail!("{}: tensor `{gname}` is stored as {ty:?}, which cannot be kept quantized (use --base-quant none to dequantize at load)", self.path.display());
        }
        let mut file = std::fs::File::open(&self.path)?;
        let q = self
            .content
            .tensor(&mut file, &gname, &Device::Cpu)
            .with_context(|| format!("{}: cannot read tensor `{gname}`", self.path.display()))?;
        let heads = match self.unpermute_qk {
            Some((n_head, _)) if gname.ends_with("attn_q.weight") => Some(n_head),
            Some((_, n_kv)) if gname.ends_with("attn_k.weight") => Some(n_kv),
            _ => None,
        };
        let q = match heads {
            Some(n_head) => unpermute_block_rows(&q, n_head).with_context(|| format!("{}: tensor `{gname}`", self.path.display()))?,
            None => q,
        };
        // Read on the host (the rows move there); the blocks then live on the device.
        let q = if device.is_cpu() { q } else { QTensor::new(QStorage::from_data(q.data()?, device, ty)?, q.shape().clone())? };
        Ok(Some(q))
    }
}

/// [`unpermute_rows`] on GGUF blocks: a row is a whole number of blocks, so the rows'
/// bytes move as they are (the values are not touched).
fn unpermute_block_rows(q: &QTensor, n_head: usize) -> Result<QTensor> {
    let (out, inp) = q.shape().dims2()?;
    let ty = q.dtype();
    if inp % ty.block_size() != 0 || out % (2 * n_head) != 0 {
        bail!("{out} x {inp} {ty:?} rows cannot be reordered block-wise");
    }
    let row_bytes = inp / ty.block_size() * ty.type_size();
    let data = q.data()?;
    let half = out / n_head / 2;
    let mut moved = vec![0u8; data.len()];
    // HF row (h, j, r) [n_head, 2, half] was stored at llama.cpp row (h, r, j).
    for h in 0..n_head {
        for j in 0..2 {
            for r in 0..half {
                let dst = (h * 2 + j) * half + r;
                let src = (h * half + r) * 2 + j;
                moved[dst * row_bytes..(dst + 1) * row_bytes].copy_from_slice(&data[src * row_bytes..(src + 1) * row_bytes]);
            }
        }
    }
    Ok(QTensor::new(QStorage::from_data(std::borrow::Cow::Owned(moved), &Device::Cpu, ty)?, q.shape().clone())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permute() -> Result<()> {
        // llama.cpp: w.reshape(n_head, 2, d/2, in).swapaxes(1, 2).reshape(out, in)
        let (n_head, d, inp) = (3, 4, 2);
        let w = Tensor::arange(0f32, (n_head * d * inp) as f32, &Device::Cpu)?.reshape((n_head * d, inp))?;
        let permuted = permute_rows(&w, n_head)?;
        let back = unpermute_rows(&permuted, n_head)?;
        assert_eq!(back.to_vec2::<f32>()?, w.to_vec2::<f32>()?);
        Ok(())
    }

    /// The lines of /proc/self/maps that map `path` (Linux: where the resident set is).
    fn mappings_of(path: &Path) -> Vec<String> {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        maps.lines().filter(|l| l.ends_with(&*path.to_string_lossy())).map(String::from).collect()
    }

    #[test]
    fn sharded_safetensors_are_mapped_only_while_a_tensor_is_read() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let dev = Device::Cpu;
        let a = Tensor::arange(0f32, 6., &dev)?.reshape((2, 3))?;
        let b = Tensor::arange(10f32, 14., &dev)?.reshape((4, 1))?.to_dtype(DType::BF16)?;
        candle_core::safetensors::save(&std::collections::HashMap::from([("a".to_string(), a.clone())]), dir.path().join("model-00001.safetensors"))?;
        candle_core::safetensors::save(&std::collections::HashMap::from([("b".to_string(), b.clone())]), dir.path().join("model-00002.safetensors"))?;
        let index = r#"{"metadata": {}, "weight_map": {"a": "model-00001.safetensors", "b": "model-00002.safetensors"}}"#;
        std::fs::write(dir.path().join("model.safetensors.index.json"), index)?;
        let src = SafetensorsSource::open_dir(dir.path())?;
        let shards = [dir.path().join("model-00001.safetensors"), dir.path().join("model-00002.safetensors")];
        assert!(shards.iter().all(|s| mappings_of(s).is_empty()), "open_dir keeps a shard mapped");
        assert_eq!(src.try_get("a", &dev)?.expect("a").to_vec2::<f32>()?, a.to_vec2::<f32>()?);
        let got = src.try_get("b", &dev)?.expect("b");
        assert_eq!(got.dtype(), DType::BF16);
        assert_eq!(got.to_dtype(DType::F32)?.to_vec2::<f32>()?, b.to_dtype(DType::F32)?.to_vec2::<f32>()?);
        assert!(src.try_get("c", &dev)?.is_none());
        // A read leaves no mapping behind: loading a checkpoint holds one tensor of it at a time.
        for s in &shards {
            assert!(mappings_of(s).is_empty(), "{} still mapped after try_get: {:?}", s.display(), mappings_of(s));
        }
        Ok(())
    }
}
