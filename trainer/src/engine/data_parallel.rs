//! One run trained by several replicas of the model (`sft --device cuda:0,cuda:1`, or
//! `cpu,cpu` in tests): the engine's side of `crate::parallel`.
//!
//! The global batch does not change with the devices: a step still takes
//! `--gradient-accumulation-steps` micro-batches of `--batch-size`, and each replica computes
//! a contiguous block of them ([`share`]). So a run gives the same adapter on one device
//! or on several, up to the order of floating-point sums (each block is summed first;
//! a test checks 1e-5), and a run may resume on a different number of devices. Use an
//! accumulation that is a multiple of the device count, or some replicas sit idle part of
//! each step.
//!
//! Per step: the leader (rank 0, the thread that owns the [`Run`]) broadcasts a control
//! word `[go, step]` and the adapter's weights; every replica computes its micro-batches;
//! the gradients and the counts are summed across replicas; the leader clips, updates,
//! logs, evaluates and checkpoints as a single-device run would. `go = 0` releases the
//! followers at the end (or on a signal). A replica that fails aborts the group, so the
//! others return instead of waiting for it forever.
use anyhow::{bail, Result};
use candle_core::{Device, Tensor, Var};
use lora_models::Model;

use super::run::StepSums;
use super::{into_summary, micro_batch, train_replicated, Member, Method, Run, RunSummary};
use crate::parallel::{all_reduce_tensors, broadcast_tensors, is_abort, Communicator};
use crate::training::{derive_seed, GradAccumulator};

/// Train `run` on `model` (rank 0) with `followers` more replicas, each built inside its
/// own thread by `make_replica(rank)` (its own model on its own device with the run's
/// adapter added under the same name, and the same method over the same data), talking
/// through `comms` (one per rank, rank 0 first).
pub fn train_one_data_parallel<M, F>(model: &Model, run: Run<M>, comms: Vec<Box<dyn Communicator>>, make_replica: F) -> Result<RunSummary>
where
    M: Method,
    F: Fn(usize) -> Result<(Model, M)> + Sync,
{
    let mut comms = comms.into_iter();
    let Some(leader) = comms.next() else { bail!("data-parallel training needs at least one replica") };
    let mut runs = vec![run];
    // Every replica checkpoints as the leader decided (their gradients are summed).
    let checkpointing = super::fit_before_training(model, &runs)?;
    let (name, seed) = (runs[0].name.clone(), runs[0].cfg.seed);
    let (led, followed) = std::thread::scope(|scope| {
        let handles: Vec<_> = comms
            .map(|comm| {
                let (make_replica, name) = (&make_replica, name.as_str());
                std::thread::Builder::new()
                    .name(format!("replica-{}", comm.rank()))
                    .spawn_scoped(scope, move || {
                        let outcome = make_replica(comm.rank()).and_then(|(model, method)| {
                            model.set_gradient_checkpointing(checkpointing);
                            follow(&model, name, &method, seed, comm.as_ref())
                        });
                        if outcome.is_err() {
                            comm.abort();
                        }
                        outcome
                    })
            })
            .collect();
        let led = train_replicated(model, &mut runs, Some(leader.as_ref()));
        if led.is_err() {
            leader.abort();
        }
        let followed: Vec<Result<()>> = handles
            .into_iter()
            .map(|h| match h {
                Ok(h) => h.join().unwrap_or_else(|_| Err(anyhow::anyhow!("a data-parallel replica panicked"))),
                Err(e) => Err(anyhow::anyhow!("starting a data-parallel replica thread: {e}")),
            })
            .collect();
        (led, followed)
    });
    // Report the failing replica's own error, not the "another replica failed" it caused.
    let mut errors: Vec<anyhow::Error> = std::iter::once(led).chain(followed).filter_map(Result::err).collect();
    if !errors.is_empty() {
        let own = errors.iter().position(|e| !is_abort(e)).unwrap_or(0);
        return Err(errors.swap_remove(own));
    }
    into_summary(runs.pop().expect("one run"))
}

/// The micro-batches (of `n` in the step) that replica `rank` of `world` computes: a
/// contiguous block, the first ones the largest.
pub fn share(rank: usize, world: usize, n: usize) -> std::ops::Range<usize> {
    let per = n.div_ceil(world.max(1));
    (rank * per).min(n)..((rank + 1) * per).min(n)
}

/// The leader's message at the start of a step: `Some((step, adapter weights))` to go on,
/// `None` to release the followers.
pub(super) fn lead_step(comm: &dyn Communicator, step: Option<(usize, &[(String, Var)])>) -> Result<()> {
    let control = match step {
        Some((step, _)) => [1.0, step as f32],
        None => [0.0, 0.0],
    };
    comm.broadcast(&Tensor::new(&control, &Device::Cpu)?, 0)?;
    if let Some((_, params)) = step {
        broadcast_tensors(comm, &params.iter().map(|(_, v)| v.as_tensor().clone()).collect::<Vec<_>>(), 0)?;
    }
    Ok(())
}

/// A follower's loop: wait for the leader's step, take its weights, compute this rank's
/// micro-batches, add them into the group's sums; until the leader says stop.
pub fn follow<M: Method>(model: &Model, name: &str, method: &M, seed: u64, comm: &dyn Communicator) -> Result<()> {
    let params = model.adapter_parameters(name)?;
    let tensors: Vec<Tensor> = params.iter().map(|(_, v)| v.as_tensor().clone()).collect();
    loop {
        let control = comm.broadcast(&Tensor::zeros(2, candle_core::DType::F32, &Device::Cpu)?, 0)?.to_vec1::<f32>()?;
        if control[0] == 0.0 {
            return Ok(());
        }
        let step = control[1] as usize;
        for ((_, var), value) in params.iter().zip(broadcast_tensors(comm, &tensors, 0)?) {
            var.set(&value.to_device(var.device())?)?;
        }
        let batches = method.step_batches(step)?;
        let denominator = method.denominator(&batches).max(f64::MIN_POSITIVE);
        let mut sums = StepSums::new(params.len());
        for m in share(comm.rank(), comm.world_size(), batches.len()) {
            let mut member = [Member {
                name,
                method,
                params: &params,
                dropout_seed: derive_seed(seed, step as u64, m as u64),
                batch: &batches[m],
                denominator,
                sums: &mut sums,
            }];
            micro_batch(model, &mut member)?;
        }
        reduce_sums(comm, sums, &params)?;
    }
}

/// The step's sums of every replica: gradients summed element-wise, counts and the loss
/// added. Every replica gets the total (only the leader uses it).
pub(super) fn reduce_sums(comm: &dyn Communicator, sums: StepSums, params: &[(String, Var)]) -> Result<StepSums> {
    if !sums.metric_sums.is_empty() {
        // Replicas that computed no micro-batch have no keys to line up with the others'.
        bail!("data-parallel training of a method with per-micro-batch metrics ({}) is not supported", sums.metric_sums.keys().cloned().collect::<Vec<_>>().join(", "));
    }
    let grads = all_reduce_tensors(comm, &sums.grads.finish(params)?)?;
    // f32 on the wire: the loss is only logged (never fed back into the update), and the
    // counts of one step are far below 2^24, where f32 stops being exact.
    let counts = Tensor::new(&[sums.loss_sum as f32, sums.tokens as f32, sums.loss_tokens as f32, sums.micro_batches as f32], &Device::Cpu)?;
    let c = comm.all_reduce_sum(&counts)?.to_vec1::<f32>()?;
    Ok(StepSums {
        grads: GradAccumulator::from_sums(grads),
        loss_sum: c[0] as f64,
        metric_sums: Default::default(),
        tokens: c[1].round() as usize,
        loss_tokens: c[2].round() as usize,
        micro_batches: c[3].round() as usize,
    })
}

#[cfg(test)]
mod tests {
    use super::share;

    #[test]
    fn shares_cover_every_micro_batch_once_in_order() {
        for world in 1..5 {
            for n in 0..9 {
                let all: Vec<usize> = (0..world).flat_map(|r| share(r, world, n)).collect();
                assert_eq!(all, (0..n).collect::<Vec<_>>(), "world {world}, n {n}");
            }
        }
        assert_eq!((share(0, 2, 3), share(1, 2, 3)), (0..2, 2..3));
    }
}
