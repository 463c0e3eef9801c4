//! Data-parallel training: the collectives that replicas of one run (one per device)
//! use to sum their LoRA gradients and share the leader's weights. How a step is split
//! among the replicas is the engine's (`engine/data_parallel.rs`): the global batch stays
//! `--batch-size x --gradient-accumulation-steps`, each replica computes a contiguous block
//! of the step's micro-batches, and the leader (replica 0) owns the run.
//!
//! The reduction goes through a [`Communicator`]: [`ThreadComm`] in-process on CPU (what
//! the tests run), NCCL on CUDA (`nccl.rs`, loaded at run time so that a CUDA build never
//! needs libnccl unless it trains on several GPUs).
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};

#[cfg(feature = "cuda")]
pub mod nccl;

/// Collective operations among the replicas of one data-parallel run. Every replica calls
/// the same operations in the same order.
pub trait Communicator: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The element-wise sum of `t` over all replicas (f32, any shape), on `t`'s device.
    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor>;
    /// Replica `root`'s `t` (same shape on every replica), on `t`'s device.
    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor>;
    /// This replica failed: make every pending and later collective of the group fail
    /// instead of waiting forever for it.
    fn abort(&self);
}

/// What a collective returns once a replica of the group has failed.
pub const ABORTED: &str = "another data-parallel replica failed";

/// True when `e` is only the echo of another replica's failure (the caller reports that
/// replica's own error instead).
pub fn is_abort(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.to_string() == ABORTED)
}

/// Replicas as threads of one process, exchanging host buffers. Sums are taken in rank
/// order on every replica, so all of them get bit-identical results. Works for tensors on
/// any device (they travel through host memory): the CPU path, the tests, and CUDA
/// replicas when NCCL is not available.
pub struct ThreadComm {
    rank: usize,
    shared: Arc<Shared>,
}

struct Shared {
    world: usize,
    state: Mutex<ExchangeState>,
    changed: Condvar,
}

struct ExchangeState {
    slots: Vec<Option<Vec<f32>>>,
    /// Replicas waiting at the current barrier.
    arrived: usize,
    /// Barriers passed so far: a waiter leaves when it moves on.
    generation: u64,
    /// A replica failed: every wait, now and later, fails instead of hanging.
    aborted: bool,
}

impl ThreadComm {
    /// One communicator per replica, to move into its thread.
    pub fn group(world: usize) -> Vec<ThreadComm> {
        let state = ExchangeState { slots: vec![None; world], arrived: 0, generation: 0, aborted: false };
        let shared = Arc::new(Shared { world, state: Mutex::new(state), changed: Condvar::new() });
        (0..world).map(|rank| ThreadComm { rank, shared: shared.clone() }).collect()
    }

    /// Put `data` in this rank's slot, wait for all, read every slot, wait again (so no
    /// slot is overwritten by the next exchange before everyone has read it).
    fn exchange<R>(&self, data: Vec<f32>, read: impl FnOnce(&[Option<Vec<f32>>]) -> R) -> Result<R> {
        let mut st = self.lock()?;
        st.slots[self.rank] = Some(data);
        st = self.barrier(st)?;
        let out = read(&st.slots);
        drop(self.barrier(st)?);
        Ok(out)
    }

    fn barrier<'a>(&'a self, mut st: MutexGuard<'a, ExchangeState>) -> Result<MutexGuard<'a, ExchangeState>> {
        if st.aborted {
            bail!("{ABORTED}");
        }
        st.arrived += 1;
        if st.arrived == self.shared.world {
            st.arrived = 0;
            st.generation += 1;
            self.shared.changed.notify_all();
            return Ok(st);
        }
        let generation = st.generation;
        while st.generation == generation && !st.aborted {
            st = self.shared.changed.wait(st).map_err(|_| anyhow::anyhow!("{ABORTED}"))?;
        }
        if st.aborted {
            bail!("{ABORTED}");
        }
        Ok(st)
    }

    fn lock(&self) -> Result<MutexGuard<'_, ExchangeState>> {
        // A replica that panicked while holding the lock poisons it: say so instead of hanging.
        self.shared.state.lock().map_err(|_| anyhow::anyhow!("{ABORTED}"))
    }
}

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

impl Communicator for ThreadComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let n = t.elem_count();
        let sum = self.exchange(host_f32(t)?, |slots| -> Result<Vec<f32>> {
            let mut acc = vec![0f32; n];
            for (r, slot) in slots.iter().enumerate() {
                let Some(v) = slot.as_ref().filter(|v| v.len() == n) else { bail!("replica {r} sent no buffer of {n} values") };
                acc.iter_mut().zip(v).for_each(|(a, b)| *a += b);
            }
            Ok(acc)
        })??;
        Ok(Tensor::from_vec(sum, t.shape(), t.device())?)
    }

    fn abort(&self) {
        // Even a poisoned lock holds the state: mark it and wake every waiter.
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        st.aborted = true;
        self.shared.changed.notify_all();
    }

    fn broadcast(&self, t: &Tensor, root: usize) -> Result<Tensor> {
        let n = t.elem_count();
        let mine = if self.rank == root { host_f32(t)? } else { Vec::new() };
        let got = self.exchange(mine, |slots| slots[root].clone())?;
        let Some(v) = got.filter(|v| v.len() == n) else { bail!("replica {root} broadcast no buffer of {n} values") };
        Ok(Tensor::from_vec(v, t.shape(), t.device())?)
    }
}

/// One communicator per replica of `devices` (rank order, as `--device` lists them):
/// NCCL when they are GPUs and libnccl loads, host memory otherwise (said once).
pub fn communicators(devices: &[String]) -> Result<Vec<Box<dyn Communicator>>> {
    use crate::device::{parse_spec, DeviceSpec};
    let list = devices.join(",");
    let specs = devices.iter().map(|d| parse_spec(d)).collect::<Result<Vec<_>>>()?;
    let gpus: Vec<usize> = specs.iter().filter_map(|s| if let DeviceSpec::Cuda(i) = s { Some(*i) } else { None }).collect();
    if !gpus.is_empty() && gpus.len() != specs.len() {
        bail!("--device {list}: the replicas of a data-parallel run are all GPUs or all the CPU");
    }
    if (1..gpus.len()).any(|i| gpus[..i].contains(&gpus[i])) {
        bail!("--device {list}: each GPU can hold one replica");
    }
    #[cfg(feature = "cuda")]
    if !gpus.is_empty() {
        match nccl::group(&gpus) {
            Ok(comms) => return Ok(comms),
            Err(e) => tracing::warn!("--device {list}: NCCL is not usable ({e:#}); the gradients are summed through host memory instead (slower)"),
        }
    }
    if gpus.is_empty() {
        tracing::warn!("--device {list}: CPU replicas share this machine's cores, so this trains no faster than one device; it is meant for testing data-parallel runs");
    }
    Ok(ThreadComm::group(devices.len()).into_iter().map(|c| Box::new(c) as Box<dyn Communicator>).collect())
}

/// `tensors` (any shapes) summed over all replicas, as one flat exchange.
pub fn all_reduce_tensors(comm: &dyn Communicator, tensors: &[Tensor]) -> Result<Vec<Tensor>> {
    let flat = flatten(tensors)?;
    unflatten(&comm.all_reduce_sum(&flat)?, tensors)
}

/// Replica `root`'s `tensors`, as one flat exchange.
pub fn broadcast_tensors(comm: &dyn Communicator, tensors: &[Tensor], root: usize) -> Result<Vec<Tensor>> {
    let flat = flatten(tensors)?;
    unflatten(&comm.broadcast(&flat, root)?, tensors)
}

fn flatten(tensors: &[Tensor]) -> Result<Tensor> {
    let parts: Vec<Tensor> = tensors.iter().map(|t| t.to_dtype(DType::F32)?.flatten_all()).collect::<candle_core::Result<_>>()?;
    Tensor::cat(&parts, 0).context("flattening tensors for a collective")
}

fn unflatten(flat: &Tensor, like: &[Tensor]) -> Result<Vec<Tensor>> {
    let mut offset = 0;
    like.iter()
        .map(|t| {
            let n = t.elem_count();
            let part = flat.narrow(0, offset, n)?.reshape(t.shape())?.to_dtype(t.dtype())?;
            offset += n;
            Ok(part)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn thread_comm_sums_in_rank_order_and_broadcasts() {
        let comms = ThreadComm::group(3);
        let handles: Vec<_> = comms
            .into_iter()
            .map(|comm| {
                std::thread::spawn(move || -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
                    let r = comm.rank() as f32;
                    let a = Tensor::new(&[[r, 1.0], [2.0 * r, 0.5]], &Device::Cpu)?;
                    let b = Tensor::new(&[r + 10.0], &Device::Cpu)?;
                    let summed = all_reduce_tensors(&comm, &[a.clone(), b])?;
                    let root = broadcast_tensors(&comm, &[a], 2)?;
                    Ok((summed[0].flatten_all()?.to_vec1()?, summed[1].to_vec1()?, root[0].flatten_all()?.to_vec1()?))
                })
            })
            .collect();
        for h in handles {
            let (a, b, root) = h.join().unwrap().unwrap();
            assert_eq!(a, [3.0, 3.0, 6.0, 1.5]);
            assert_eq!(b, [33.0]);
            assert_eq!(root, [2.0, 1.0, 4.0, 0.5]);
        }
    }

    #[test]
    fn a_failed_replica_releases_the_others() {
        let mut comms = ThreadComm::group(3);
        let failing = comms.pop().unwrap();
        let waiting: Vec<_> = comms
            .into_iter()
            .map(|comm| std::thread::spawn(move || all_reduce_tensors(&comm, &[Tensor::new(&[1f32], &Device::Cpu).unwrap()]).map(|_| ())))
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(50));
        failing.abort();
        for h in waiting {
            let e = h.join().unwrap().unwrap_err();
            assert!(is_abort(&e), "{e:#}");
        }
        // Later collectives fail at once too.
        assert!(failing.broadcast(&Tensor::new(&[1f32], &Device::Cpu).unwrap(), 0).is_err());
    }
}
