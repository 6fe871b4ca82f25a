"""GRPO on the tiny policy: cost per optimizer step, measured in one run.

    python bench/grpo_smoke.py [--steps 12]

Runs `run_grpo` on the untrained tiny VLM (easy-VQA prompt pool, a trivial
plaintext reward) under a few batch geometries and prints, per geometry: the
median wall time of an optimizer step that generates a round (sampling,
reference and old log-probs, reward, loss) and of one that reuses it, the time
per optimizer step, and how many reward calls (federated scoring rounds) each
optimizer step costs. Then the cost of the KL term (beta > 0 against beta = 0).
Single-threaded torch. No assertions: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from secure_mor.data import SplitConfig, build_federated_data, vocabulary_texts  # noqa: E402
from secure_mor.server.grpo import GRPOSettings, run_grpo  # noqa: E402
from secure_mor.vlm import build_tiny_vlm, save_policy  # noqa: E402


class CountingReward:
    """Rewards short answers; counts calls and the time spent in them."""

    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        start = time.perf_counter()
        self.calls += 1
        rewards = [1.0 / len(ids) for ids in completion_ids]
        self.seconds += time.perf_counter() - start
        return rewards


def measure(policy: Path, prompts, settings: GRPOSettings, root: Path, name: str) -> dict[str, float]:
    reward = CountingReward()
    start = time.perf_counter()
    result = run_grpo(policy, prompts, reward, settings, root / name)
    wall = time.perf_counter() - start
    steps = [e for e in result["history"] if "step_time" in e]
    generating = [e["step_time"] for e in steps if "reward" in e]
    reusing = [e["step_time"] for e in steps if "reward" not in e]
    return {
        "generate": statistics.median(generating),
        "reuse": statistics.median(reusing) if reusing else float("nan"),
        "per_step": statistics.fmean(e["step_time"] for e in steps),
        "calls_per_step": reward.calls / settings.max_steps,
        "wall": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = build_federated_data(SplitConfig())
    prompts = data.prompt_pool.shuffle(seed=0).select(range(512))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, processor = build_tiny_vlm(vocabulary_texts(data))
        policy = save_policy(model, processor, root / "policy")
        base = GRPOSettings(max_steps=args.steps, save_steps=0)

        print(f"== batch geometry (G = {base.num_generations}, {args.steps} optimizer steps, beta = {base.beta})")
        print(
            f"{'batch':>5} {'steps/gen':>9} {'N/round':>7} | {'gen step s':>10} {'reuse step s':>12} "
            f"{'s/opt step':>10} {'reward calls/step':>17}"
        )
        rows = []
        for batch, per_round in [(32, 1), (16, 2), (8, 4)]:
            settings = replace(base, batch_size=batch, steps_per_generation=per_round)
            m = measure(policy, prompts, settings, root, f"geom-{batch}-{per_round}")
            rows.append(m)
            print(
                f"{batch:>5} {per_round:>9} {settings.generation_batch_size:>7} | {m['generate']:>10.3f} "
                f"{m['reuse']:>12.3f} {m['per_step']:>10.3f} {m['calls_per_step']:>17.2f}"
            )
        print(
            f"ratio s/opt step, 4 steps per round vs 1: {rows[2]['per_step'] / rows[0]['per_step']:.2f} "
            f"(at 1/4 of the completions per optimizer step)"
        )

        print("== KL to the reference (batch 16, 2 steps per round)")
        with_kl = measure(policy, prompts, base, root, "kl")
        without = measure(policy, prompts, replace(base, beta=0.0), root, "nokl")
        print(
            f"s/opt step beta={base.beta}: {with_kl['per_step']:.3f}, beta=0: {without['per_step']:.3f}, "
            f"ratio {with_kl['per_step'] / without['per_step']:.2f}"
        )


if __name__ == "__main__":
    main()
