"""GRPO goldens from TRL's own code (trl pinned in requirements.txt).

1. The loss of every loss type (dapo, grpo, bnpo, dr_grpo, cispo, sapo, luspo, vespo),
   with and without the k3 KL term, at token and sequence (GSPO) importance-sampling
   level, with `delta` and with `top_entropy_quantile`, from `GRPOTrainer._compute_loss`
   itself: the model forward is replaced by fixed per-token log-probs (a leaf tensor) and
   entropies, so the gradient with respect to them comes from TRL's formula through
   autograd, and the logged metrics are TRL's (`clip_ratio/*`, `cispo_clip_ratio`,
   `vespo/phi_seq_mean`, `kl`, `entropy`). Old-policy log-probs differ from the policy's,
   so the ratio clips on some tokens; the last completion is fully masked (a truncated
   completion under mask_truncated_completions).
2. Advantages as `GRPOTrainer._generate_and_score_completions` computes them (TRL's
   nanstd, nan_to_num), for scale_rewards group / batch / none and the booleans GRPOConfig
   maps onto them, including a group whose rewards are all equal and unscorable (None)
   completions.

Writes tests/golden/grpo.json. Run from the repository root:
    ~/.venvs/golden/bin/python scripts/golden/make_grpo_golden.py
"""
import json
import tempfile
import types
from collections import defaultdict

import torch
import trl
from trl import GRPOConfig
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd

torch.manual_seed(0)
B, T = 5, 6
MAX_COMPLETION_LENGTH = 8
mask = torch.tensor(
    [
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
    ],
    dtype=torch.int64,
)
logps = (-torch.rand(B, T, dtype=torch.float64) * 3.0).float()
old = (logps + torch.randn(B, T) * 0.3).float()
ref = (logps + torch.randn(B, T) * 0.2).float()
entropies = (torch.rand(B, T) * 2.0).float()
advantages = torch.tensor([1.2, -0.7, 0.4, -1.5, 0.9])


class FakeAccelerator:
    num_processes = 1

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def pad_across_processes(self, x, dim=0, pad_index=0):
        return x


DEFAULTS = {
    "importance_sampling_level": "token",
    "delta": None,
    "sapo_temperature_pos": 1.0,
    "sapo_temperature_neg": 1.05,
    "vespo_k_pos": 2.0,
    "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0,
    "vespo_lambda_neg": 2.0,
    "top_entropy_quantile": 1.0,
}


def trl_loss(loss_type, beta, epsilon_low, epsilon_high, **options):
    o = {**DEFAULTS, **options}
    leaf = logps.clone().requires_grad_(True)
    self = types.SimpleNamespace(
        top_entropy_quantile=o["top_entropy_quantile"],
        off_policy_mask_threshold=None,
        importance_sampling_level=o["importance_sampling_level"],
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon_low,
        epsilon_high=epsilon_high,
        args=types.SimpleNamespace(
            delta=o["delta"],
            use_bias_correction_kl=False,
            steps_per_generation=1,
            sapo_temperature_pos=o["sapo_temperature_pos"],
            sapo_temperature_neg=o["sapo_temperature_neg"],
            vespo_k_pos=o["vespo_k_pos"],
            vespo_lambda_pos=o["vespo_lambda_pos"],
            vespo_k_neg=o["vespo_k_neg"],
            vespo_lambda_neg=o["vespo_lambda_neg"],
        ),
        use_vllm=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=MAX_COMPLETION_LENGTH,
        accelerator=FakeAccelerator(),
        _metrics={"train": defaultdict(list)},
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        get_gamma_weights=GRPOTrainer.get_gamma_weights,
    )
    self.get_high_entropy_mask = types.MethodType(GRPOTrainer.get_high_entropy_mask, self)
    self._get_per_token_logps_and_entropies = lambda *a, **k: (leaf, entropies, None)
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
    case = {"loss_type": loss_type, "beta": beta, "epsilon_low": epsilon_low, "epsilon_high": epsilon_high, **o}
    return {**case, "loss": loss.item(), "grad": leaf.grad.tolist(), "metrics": metrics}


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
            cases.append(trl_loss(loss_type, beta, eps_low, eps_high))
# GSPO: one importance weight per sequence (the paper's clip range, and a wider one).
for loss_type in ["grpo", "dapo", "bnpo", "dr_grpo", "luspo"]:
    for beta in [0.0, 0.04]:
        cases.append(trl_loss(loss_type, beta, 3e-4, 4e-4, importance_sampling_level="sequence"))
    cases.append(trl_loss(loss_type, 0.0, 0.2, 0.28, importance_sampling_level="sequence"))
cases.append(trl_loss("luspo", 0.04, 0.2, 0.28))
# CISPO: epsilon_high is the weight's cap (the paper's 5.0, and 1.1 so that it caps).
for level in ["token", "sequence"]:
    for eps_high in [5.0, 1.1, 0.9]:
        for beta in [0.0, 0.04]:
            cases.append(trl_loss("cispo", beta, 0.2, eps_high, importance_sampling_level=level))
# SAPO's gate temperatures.
for level in ["token", "sequence"]:
    for pos, neg in [(1.0, 1.05), (0.5, 2.0)]:
        for beta in [0.0, 0.04]:
            cases.append(trl_loss("sapo", beta, 0.2, 0.2, importance_sampling_level=level, sapo_temperature_pos=pos, sapo_temperature_neg=neg))
# VESPO's gamma weights.
for vespo in [{}, {"vespo_k_pos": 1.5, "vespo_lambda_pos": 0.7, "vespo_k_neg": 4.0, "vespo_lambda_neg": 1.2}]:
    for beta in [0.0, 0.04]:
        cases.append(trl_loss("vespo", beta, 0.2, 0.2, **vespo))
# Two-sided clipping.
for loss_type in ["dapo", "grpo"]:
    cases.append(trl_loss(loss_type, 0.0, 0.2, 0.28, delta=1.1))
# The high-entropy mask.
for q in [0.0, 0.2, 0.5]:
    for loss_type in ["dapo", "grpo", "sapo"]:
        cases.append(trl_loss(loss_type, 0.04, 0.2, 0.28, top_entropy_quantile=q))
    cases.append(trl_loss("grpo", 0.0, 3e-4, 4e-4, importance_sampling_level="sequence", top_entropy_quantile=q))

rewards = [1.0, 0.0, 1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 0.2, None, 0.9, None, None, 0.7, None, None]
advantage_cases = []
with tempfile.TemporaryDirectory() as tmp:
    for given in ["group", "batch", "none", True, False]:
        # GRPOConfig maps the booleans onto the strings (True -> group, False -> none).
        scale = GRPOConfig(output_dir=tmp, scale_rewards=given, report_to=[], use_cpu=True, bf16=False).scale_rewards
        adv, zero_std = trl_advantages(rewards, 4, scale)
        advantage_cases.append({"scale_rewards": given, "resolved": scale, "advantages": adv, "frac_reward_zero_std": zero_std})

out = {
    "trl_version": trl.__version__,
    "max_completion_length": MAX_COMPLETION_LENGTH,
    "mask": mask.tolist(),
    "logps": logps.tolist(),
    "old_logps": old.tolist(),
    "ref_logps": ref.tolist(),
    "advantages": advantages.tolist(),
    "entropies": entropies.tolist(),
    "losses": cases,
    "rewards": rewards,
    "num_generations": 4,
    "advantage_cases": advantage_cases,
}
with open("tests/golden/grpo.json", "w") as f:
    json.dump(out, f, indent=1)
print(f"wrote tests/golden/grpo.json ({len(cases)} loss cases, trl {trl.__version__})")
