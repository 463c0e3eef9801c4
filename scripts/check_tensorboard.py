"""Checks lora-train's TensorBoard event files with TensorBoard's EventAccumulator.

  check_tensorboard.py --write-data DIR   small train.jsonl / pairs.jsonl / prompts.jsonl in DIR
  check_tensorboard.py RUN_DIR...         every metrics.jsonl value is in RUN_DIR/runs/default,
                                          once per step (a resumed run's rewritten steps too)
"""
import json
import math
import sys
from pathlib import Path

# metrics.jsonl key -> the name transformers' Trainer / TRL logs (the rest keep theirs).
TRL_NAMES = {
    "lr": "learning_rate",
    "tokens": "num_tokens",
    "rewards_accuracy": "rewards/accuracies",
    "rewards_margin": "rewards/margins",
    "rewards_chosen": "rewards/chosen",
    "rewards_rejected": "rewards/rejected",
    "logps_chosen": "logps/chosen",
    "logps_rejected": "logps/rejected",
    "completion_length_mean": "completions/mean_length",
    "completion_length_min": "completions/min_length",
    "completion_length_max": "completions/max_length",
    "clipped_ratio": "completions/clipped_ratio",
    "clip_ratio_low": "clip_ratio/low_mean",
    "clip_ratio_high": "clip_ratio/high_mean",
    "clip_ratio_region": "clip_ratio/region_mean",
}


def trl_name(key):
    if key in TRL_NAMES:
        return TRL_NAMES[key]
    # GRPO's per-evaluator reward: TRL's rewards/<reward function>/mean.
    return f"rewards/{key[8:]}/mean" if key.startswith("rewards_") else key


def tag(key):
    if key.startswith("eval_"):
        return "eval/" + trl_name(key[5:])
    return "train/" + trl_name(key)


def write_data(out):
    out = Path(out)
    with open(out / "train.jsonl", "w") as f:
        for i in range(12):
            msgs = [{"role": "user", "content": f"Say the code word number {i}."}, {"role": "assistant", "content": f"The code word is w{i}."}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    with open(out / "prompts.jsonl", "w") as f:
        for i in range(8):
            msgs = [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": f"What is {i} + {i + 2}?"}]
            f.write(json.dumps({"messages": msgs, "ground_truth": str(2 * i + 2)}) + "\n")
    with open(out / "pairs.jsonl", "w") as f:
        for i in range(8):
            f.write(json.dumps({"prompt": f"Say the code word number {i}.", "chosen": f"The code word is w{i}.", "rejected": "I would rather not say."}) + "\n")


def check(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run) / "runs" / "default"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    scalars = {}
    for t in acc.Tags()["scalars"]:
        steps = [e.step for e in acc.Scalars(t)]
        # A resumed run rewrote the killed run's last steps: TensorBoard must show them once.
        assert len(steps) == len(set(steps)), f"{run}: {t} has steps twice: {sorted(s for s in steps if steps.count(s) > 1)[:5]}"
        scalars[t] = {e.step: e.value for e in acc.Scalars(t)}
    rows = [json.loads(line) for line in open(Path(run) / "metrics.jsonl") if line.strip()]
    checked = 0
    for row in rows:
        for key, value in row.items():
            if key == "step" or not isinstance(value, (int, float)):
                continue
            t = tag(key)
            got = scalars.get(t, {}).get(row["step"])
            assert got is not None, f"{run}: {t} missing at step {row['step']}"
            assert math.isclose(got, value, rel_tol=1e-6, abs_tol=1e-30), f"{run}: {t} at step {row['step']}: {got} != {value}"
            checked += 1
    args = acc.Tensors("args/text_summary")
    text = args[0].tensor_proto.string_val[0].decode()
    assert "learning_rate" in json.loads(text), text
    print(f"{run}: {len(rows)} steps, {checked} values under {len(scalars)} tags read back by TensorBoard's EventAccumulator; args text present")


if __name__ == "__main__":
    if sys.argv[1] == "--write-data":
        write_data(sys.argv[2])
    else:
        for run in sys.argv[1:]:
            check(run)
        print("check_tensorboard: OK")
