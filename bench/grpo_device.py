"""GRPO seconds per optimizer step on a device, measured in one run.

    python bench/grpo_device.py [--device auto|cpu|cuda] [--model PATH] [--steps 8]

Runs `run_grpo` with the main job's geometry (server.pipeline.DEFAULT_GRPO: 32 prompts x 4 answers a
step) on the easy-VQA prompt pool with a plaintext reward (short answers score higher), on the tiny
policy built here or on `--model`, and prints the median seconds of an optimizer step on the chosen
device and, when that is CUDA, on the CPU too with their ratio. No assertions: the numbers depend on
the machine.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from secure_mor.data import SplitConfig, build_federated_data, vocabulary_texts  # noqa: E402
from secure_mor.device import resolve_device  # noqa: E402
from secure_mor.server.grpo import run_grpo  # noqa: E402
from secure_mor.server.pipeline import DEFAULT_GRPO  # noqa: E402
from secure_mor.vlm import build_tiny_vlm, load_policy, save_policy  # noqa: E402


def short_answers(prompts, completions, completion_ids, **kwargs):
    return [1.0 / len(ids) for ids in completion_ids]


def seconds_per_step(policy: Path, prompts, steps: int, device: str, out: Path) -> float:
    settings = replace(DEFAULT_GRPO, max_steps=steps, save_steps=0, warmup_steps=0)
    history = run_grpo(policy, prompts, short_answers, settings, out, device=device)["history"]
    return statistics.median(e["step_time"] for e in history if "step_time" in e)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="auto")
    parser.add_argument("--model", default="", help="a saved VLM (default: the tiny LLaVA built here)")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    device = resolve_device(args.device)
    data = build_federated_data(SplitConfig())
    prompts = data.prompt_pool.shuffle(seed=0).select(range(512))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, processor = load_policy(args.model) if args.model else build_tiny_vlm(vocabulary_texts(data))
        policy = save_policy(model, processor, root / "policy")
        measured = {device: seconds_per_step(policy, prompts, args.steps, device, root / device)}
        if device != "cpu":
            measured["cpu"] = seconds_per_step(policy, prompts, args.steps, "cpu", root / "cpu")
        for name, seconds in measured.items():
            print(f"GRPO on {name}: {seconds:.3f} s per optimizer step "
                  f"({DEFAULT_GRPO.prompts_per_round} prompts x {DEFAULT_GRPO.num_generations} answers)")
        if "cuda" in measured:
            print(f"ratio cpu / cuda: {measured['cpu'] / measured['cuda']:.2f}")


if __name__ == "__main__":
    main()
