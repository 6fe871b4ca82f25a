"""Preference accuracy of reward models on held-out pairs.

Held-out pairs are made from the test split (`FederatedData.evaluation`,
stratified per family) in the evaluated client's own answer style, without
label noise. A pair counts as correct when r(chosen) > r(rejected) (a tie
counts one half). Evaluation is post-processing of the trained model: it spends
no budget (and uses no training data).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from datasets import Dataset
from rich.table import Table
from torch import nn

from secure_mor.clients.text import TextEncoder
from secure_mor.clients.training import encode_pairs, pair_margins
from secure_mor.data import FAMILIES, FederatedData, make_preference_pairs


def held_out_pairs(data: FederatedData, style: str, seed: int = 0) -> dict[str, Dataset]:
    """Noise-free held-out pairs in `style`, per family."""
    pairs = make_preference_pairs(data.evaluation, data.answers, style=style, noise_rate=0.0, seed=seed)
    families = np.asarray(pairs["family"])
    return {f: pairs.select(np.flatnonzero(families == f)) for f in FAMILIES if (families == f).any()}


def preference_accuracy(model: nn.Module, encoder: TextEncoder, pairs: Dataset, batch_size: int = 256) -> float:
    rows = encode_pairs(pairs, encoder)
    model.eval()
    margins = []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            margins.append(pair_margins(model, *rows[start : start + batch_size]))
    m = torch.cat(margins)
    return float(((m > 0).float() + 0.5 * (m == 0).float()).mean())


def evaluate_model(model: nn.Module, encoder: TextEncoder, held_out: Mapping[str, Dataset]) -> dict[str, float]:
    """Accuracy per family on `held_out` (from `held_out_pairs`)."""
    return {family: preference_accuracy(model, encoder, pairs) for family, pairs in held_out.items()}


def accuracy_table(rows: Sequence[tuple[str, str, Mapping[str, float]]], title: str = "Preference accuracy") -> Table:
    """A rich table; each row is (label, the client's own family, accuracy per family).
    Own-family cells are bold; "other" is the mean over the other families."""
    table = Table(title=title)
    table.add_column("client")
    families = [f for f in FAMILIES if any(f in r[2] for r in rows)]
    for family in families:
        table.add_column(family, justify="right")
    table.add_column("own", justify="right")
    table.add_column("other", justify="right")
    for label, own, accuracy in rows:
        cells = [f"[bold]{accuracy[f]:.3f}[/bold]" if f == own else f"{accuracy[f]:.3f}" for f in families]
        others = [v for f, v in accuracy.items() if f != own]
        own_cell = f"{accuracy[own]:.3f}" if own in accuracy else "-"
        other_cell = f"{np.mean(others):.3f}" if others else "-"
        table.add_row(label, *cells, own_cell, other_cell)
    return table
