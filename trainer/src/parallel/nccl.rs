//! NCCL for data-parallel training on several GPUs of one node, loaded at run time.
//!
//! Why not cudarc's `nccl` feature: candle links cudarc with `dynamic-linking`, so that
//! feature would make every CUDA build of lora-train need libnccl at start, even on a
//! one-GPU machine. Loading `libnccl.so.2` (or `$LORA_TRAIN_NCCL`) with libloading when a
//! run asks for several GPUs keeps it optional; when it cannot be loaded,
//! `parallel::communicators` says why once and sums through host memory instead.
//!
//! The collectives run on the CUDA stream of the tensor's candle device, so they are
//! ordered after the kernels that produced the gradients and before those that use the
//! result, with no extra synchronisation. Every call works on a fresh copy of the tensor
//! (NCCL writes its result in place).
use std::ffi::{c_char, c_int, c_void, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::cuda_backend::cudarc::driver::{sys::CUstream, DevicePtr};
use candle_core::{DType, Device, Storage, Tensor};

use super::{Communicator, ABORTED};

type RawComm = *mut c_void;
type NcclResult = c_int;
/// `ncclFloat32` and `ncclSum` in nccl.h.
const NCCL_FLOAT32: c_int = 7;
const NCCL_SUM: c_int = 0;

struct Nccl {
    _lib: libloading::Library,
    init_all: unsafe extern "C" fn(*mut RawComm, c_int, *const c_int) -> NcclResult,
    all_reduce: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, CUstream) -> NcclResult,
    broadcast: unsafe extern "C" fn(*const c_void, *mut c_void, usize, c_int, c_int, RawComm, CUstream) -> NcclResult,
    abort: unsafe extern "C" fn(RawComm) -> NcclResult,
    destroy: unsafe extern "C" fn(RawComm) -> NcclResult,
    error_string: unsafe extern "C" fn(NcclResult) -> *const c_char,
}

fn library() -> Result<&'static Nccl> {
    static NCCL: OnceLock<std::result::Result<Nccl, String>> = OnceLock::new();
    NCCL.get_or_init(|| load().map_err(|e| format!("{e:#}"))).as_ref().map_err(|e| anyhow!("{e}"))
}

fn load() -> Result<Nccl> {
    let names: Vec<String> = match std::env::var("LORA_TRAIN_NCCL") {
        Ok(path) if !path.is_empty() => vec![path],
        _ => vec!["libnccl.so.2".into(), "libnccl.so".into()],
    };
    let mut errors = Vec::new();
    for name in &names {
        // SAFETY: loading NCCL runs its initialisers, which have no preconditions.
        match unsafe { libloading::Library::new(name) } {
            Ok(lib) => {
                // SAFETY: the signatures are those of nccl.h (2.x), resolved by name; the
                // function pointers stay valid while `lib` is held (it moves into `Nccl`).
                let (init_all, all_reduce, broadcast, abort, destroy, error_string) = unsafe {
                    (
                        *lib.get(b"ncclCommInitAll\0")?,
                        *lib.get(b"ncclAllReduce\0")?,
                        *lib.get(b"ncclBroadcast\0")?,
                        *lib.get(b"ncclCommAbort\0")?,
                        *lib.get(b"ncclCommDestroy\0")?,
                        *lib.get(b"ncclGetErrorString\0")?,
                    )
                };
                return Ok(Nccl { _lib: lib, init_all, all_reduce, broadcast, abort, destroy, error_string });
            }
            Err(e) => errors.push(format!("{name}: {e}")),
        }
    }
    bail!("libnccl could not be loaded ({}); install NCCL (pip install nvidia-nccl-cu12 and add its lib directory to LD_LIBRARY_PATH) or set LORA_TRAIN_NCCL to the library's path", errors.join("; "))
}

fn check(lib: &Nccl, what: &str, r: NcclResult) -> Result<()> {
    if r == 0 {
        return Ok(());
    }
    // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
    let msg = unsafe { CStr::from_ptr((lib.error_string)(r)) }.to_string_lossy().into_owned();
    bail!("{what}: NCCL error {r}: {msg}")
}

/// One rank of a communicator made by `ncclCommInitAll` over the GPUs of this process.
pub struct NcclComm {
    lib: &'static Nccl,
    comm: RawComm,
    rank: usize,
    world: usize,
    /// This rank's GPU, for host tensors (control words, counts) that take part.
    device: Device,
    aborted: AtomicBool,
}

// SAFETY: an NCCL communicator may be used from any one thread at a time; each rank's
// `NcclComm` is moved into its replica's thread and used only there (abort excepted,
// which NCCL allows from another thread).
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

/// One communicator per GPU in `gpus`, rank i on `gpus[i]`.
pub fn group(gpus: &[usize]) -> Result<Vec<Box<dyn Communicator>>> {
    let lib = library()?;
    let mut comms: Vec<RawComm> = vec![std::ptr::null_mut(); gpus.len()];
    let devlist: Vec<c_int> = gpus.iter().map(|&g| g as c_int).collect();
    // SAFETY: `comms` has room for one handle per device of `devlist`.
    check(lib, "ncclCommInitAll", unsafe { (lib.init_all)(comms.as_mut_ptr(), devlist.len() as c_int, devlist.as_ptr()) })?;
    let world = gpus.len();
    let mut out: Vec<Box<dyn Communicator>> = Vec::with_capacity(world);
    for (rank, (&gpu, comm)) in gpus.iter().zip(comms).enumerate() {
        let device = crate::device::parse_device(&format!("cuda:{gpu}"))?;
        out.push(Box::new(NcclComm { lib, comm, rank, world, device, aborted: AtomicBool::new(false) }));
    }
    Ok(out)
}

impl NcclComm {
    /// Run `op(pointer, element count, stream)` on a fresh f32 copy of `t` on a GPU (`t`'s
    /// own when it is on one), and return that copy on `t`'s device.
    fn in_place(&self, t: &Tensor, what: &str, op: impl FnOnce(*mut c_void, usize, CUstream) -> NcclResult) -> Result<Tensor> {
        if self.aborted.load(Ordering::SeqCst) {
            bail!("{ABORTED}");
        }
        let home = t.device().clone();
        let on_gpu = if home.is_cuda() { t.clone() } else { t.to_device(&self.device)? };
        // `copy` gives a buffer no other tensor shares: NCCL overwrites it.
        let buf = on_gpu.to_dtype(DType::F32)?.contiguous()?.copy()?;
        let n = buf.elem_count();
        {
            let (storage, layout) = buf.storage_and_layout();
            let Storage::Cuda(cs) = &*storage else { bail!("{what}: the tensor is not on a GPU") };
            let stream = cs.device.cuda_stream();
            stream.context().bind_to_thread().map_err(|e| anyhow!("{what}: binding the CUDA context: {e:?}"))?;
            let slice = cs.as_cuda_slice::<f32>()?;
            let (ptr, _sync) = slice.device_ptr(&stream);
            let ptr = (ptr as usize + layout.start_offset() * std::mem::size_of::<f32>()) as *mut c_void;
            check(self.lib, what, op(ptr, n, stream.cu_stream()))?;
        }
        let out = buf.reshape(t.shape())?;
        Ok(if home.is_cuda() { out } else { out.to_device(&home)? })
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let (lib, comm) = (self.lib, self.comm);
        // SAFETY: `ptr` holds `n` f32 on this rank's GPU, ordered on `stream`.
        self.in_place(t, "ncclAllReduce", |ptr, n, stream| unsafe { (lib.all_reduce)(ptr, ptr, n, NCCL_FLOAT32, NCCL_SUM, comm, stream) })
            .context("summing gradients across GPUs")
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let (lib, comm) = (self.lib, self.comm);
        // SAFETY: as above; the root's buffer is read, every other rank's written.
        self.in_place(t, "ncclBroadcast", |ptr, n, stream| unsafe { (lib.broadcast)(ptr, ptr, n, NCCL_FLOAT32, root as c_int, comm, stream) })
            .context("broadcasting across GPUs")
    }

    fn abort(&self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: the handle is valid until dropped; abort frees it and unblocks peers.
            let r = unsafe { (self.lib.abort)(self.comm) };
            if r != 0 {
                tracing::warn!("ncclCommAbort: NCCL error {r}");
            }
        }
    }
}

impl Drop for NcclComm {
    fn drop(&mut self) {
        if !self.aborted.load(Ordering::SeqCst) {
            // SAFETY: the handle is valid and used by no one else any more.
            unsafe { (self.lib.destroy)(self.comm) };
        }
    }
}
