"""Where the policy runs: SFT, GRPO, prompt features and evaluation (`--device cpu|cuda|auto`).

The clients' reward models choose their own device (they train on CPU here)."""

from __future__ import annotations

import torch

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(name: str) -> str:
    """"cpu" or "cuda": `auto` takes CUDA when a device is visible, the CPU otherwise."""
    if name not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {name!r}")
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA device (use --device cpu or auto)")
    return name


def trainer_arguments(device: str) -> dict[str, bool]:
    """TRL/transformers TrainingArguments for `device`: the CPU in float32, CUDA in bf16 where it is supported."""
    if device == "cpu":
        return {"use_cpu": True, "bf16": False}
    return {"use_cpu": False, "bf16": bool(torch.cuda.is_bf16_supported())}
