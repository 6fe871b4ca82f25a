"""Ranking measures shared by the roles: how often a reward puts the true answer first."""

from __future__ import annotations

import numpy as np


def top1(rewards: np.ndarray, truth: np.ndarray) -> float:
    """Mean chance that the best-rewarded column of each row is the true one (`truth`: column
    index per row), ties broken at random: a reward that is the same for every answer, as
    clipping can make it, tells GRPO nothing."""
    best = rewards == rewards.max(-1, keepdims=True)
    return float(np.mean(best[np.arange(len(truth)), truth] / best.sum(-1)))
