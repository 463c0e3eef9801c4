"""GRPO goldens from TRL's own code (trl pinned in requirements.txt).

1. The loss of every loss type (dapo, grpo, bnpo, dr_grpo), with and without the k3 KL
   term, from `GRPOTrainer._compute_loss` itself: the model forward is replaced by fixed
   per-token log-probs (a leaf tensor), so the gradient with respect to them comes from
   TRL's formula through autograd. Old-policy log-probs differ from the policy's, so the
   ratio clips on some tokens.
2. Advantages as `GRPOTrainer._generate_and_score_completions` computes them (TRL's
   nanstd, nan_to_num), for scale_rewards group / batch / none, including a group whose
   rewards are all equal and unscorable (None) completions.

Writes tests/golden/grpo.json. Run from the repository root:
    ~/.venvs/golden/bin/python scripts/golden/make_grpo_golden.py
"""
import json
import types
from collections import defaultdict

import torch
import trl
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd

torch.manual_seed(0)
B, T = 4, 6
MAX_COMPLETION_LENGTH = 8
mask = torch.tensor(
    [
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 0, 0, 0, 0, 0],
    ],
    dtype=torch.int64,
)
logps = (-torch.rand(B, T, dtype=torch.float64) * 3.0).float()
old = (logps + torch.randn(B, T) * 0.3).float()
ref = (logps + torch.randn(B, T) * 0.2).float()
advantages = torch.tensor([1.2, -0.7, 0.4, -1.5])


class FakeAccelerator:
    num_processes = 1

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def trl_loss(loss_type, beta, epsilon_low, epsilon_high):
    leaf = logps.clone().requires_grad_(True)
    self = types.SimpleNamespace(
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        args=types.SimpleNamespace(delta=None, use_bias_correction_kl=False),
        use_vllm=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION_LENGTH,
        accelerator=FakeAccelerator(),
        _metrics={"train": defaultdict(list)},
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
    )
    self.args.steps_per_generation = 1
    self._get_per_token_logps_and_entropies = lambda *a, **k: (leaf, torch.zeros(B, T), None)
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.int64),
        "prompt_mask": torch.ones(B, 1, dtype=torch.int64),
        "completion_ids": torch.zeros(B, T, dtype=torch.int64),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum().float(),
    }
    loss = GRPOTrainer._compute_loss(self, None, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in self._metrics["train"].items()}
    return loss.item(), leaf.grad.tolist(), metrics


def trl_advantages(rewards, num_generations, scale_rewards):
    """The sum_then_normalize branch of _generate_and_score_completions, one evaluator."""
    rewards = torch.tensor([float("nan") if r is None else r for r in rewards], dtype=torch.float32)
    mean_grouped = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    if scale_rewards in ["group", "none"]:
        std = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
    else:
        std = nanstd(rewards).expand_as(rewards)
    adv = rewards - mean_grouped
    if scale_rewards != "none":
        adv = adv / (std + 1e-4)
    zero_std = torch.isclose(std, torch.zeros_like(std)).float().mean().item()
    return torch.nan_to_num(adv, nan=0.0).tolist(), zero_std


cases = []
for loss_type in ["dapo", "grpo", "bnpo", "dr_grpo"]:
    for beta in [0.0, 0.04]:
        for eps_low, eps_high in [(0.2, 0.2), (0.2, 0.28)]:
            loss, grad, metrics = trl_loss(loss_type, beta, eps_low, eps_high)
            cases.append(
                {
                    "loss_type": loss_type,
                    "beta": beta,
                    "epsilon_low": eps_low,
                    "epsilon_high": eps_high,
                    "loss": loss,
                    "grad": grad,
                    "clip_ratio_low": metrics["clip_ratio/low_mean"],
                    "clip_ratio_high": metrics["clip_ratio/high_mean"],
                    "clip_ratio_region": metrics["clip_ratio/region_mean"],
                    "kl": metrics.get("kl"),
                }
            )

rewards = [1.0, 0.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 0.2, None, 0.9, None, None, 0.7, None, None]
advantage_cases = []
for scale in ["group", "batch", "none"]:
    adv, zero_std = trl_advantages(rewards, 4, scale)
    advantage_cases.append({"scale_rewards": scale, "advantages": adv, "frac_reward_zero_std": zero_std})

out = {
    "trl_version": trl.__version__,
    "max_completion_length": MAX_COMPLETION_LENGTH,
    "mask": mask.tolist(),
    "logps": logps.tolist(),
    "old_logps": old.tolist(),
    "ref_logps": ref.tolist(),
    "advantages": advantages.tolist(),
    "losses": cases,
    "rewards": rewards,
    "num_generations": 4,
    "advantage_cases": advantage_cases,
}
with open("tests/golden/grpo.json", "w") as f:
    json.dump(out, f, indent=1)
print(f"wrote tests/golden/grpo.json ({len(cases)} loss cases, trl {trl.__version__})")
