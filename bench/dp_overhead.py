"""DP-SGD overhead: the same reward model and data trained private vs non-private.

    python bench/dp_overhead.py [--arch minilm-head] [--epochs 10] [--repeats 3]

For each architecture, one process trains it on the pairs of the client it is
the default of (architecture k, client k of the default split) with its default
hyper-parameters (`training.default_train_config`): the non-private baseline
(no Opacus engine) and DP-SGD with each Opacus grad-sample mode, interleaved
`repeats` times. It prints the best time of each (the training loop only: noise
calibration is excluded), the private/non-private ratio (goal <= 1.5), the peak
resident memory above the pre-run baseline, and the architecture's default mode
(marked *). The RDP accountant is used, because calibration time is not what is
measured. Run it on an otherwise idle core (e.g. `taskset -c 1`), one thread.

Ghost clipping is not measured: Opacus refuses it for a layer used more than
once per forward pass (the GRU's recurrent weights), and its norm rule skips
nn.Linear inputs of more than 3 dimensions (the ViT's [B, C, T, D] tokens), so
it would compute wrong norms there.
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import threading
import warnings

import torch
from rich.console import Console
from rich.table import Table

from secure_mor.clients.models import DEFAULT_ARCHS, architecture
from secure_mor.clients.training import (
    GRAD_SAMPLE_MODES,
    PrivacyState,
    TrainConfig,
    default_train_config,
    encode_annotations,
    train_reward_model,
)
from secure_mor.data import SplitConfig, build_federated_data
from secure_mor.ledger import Budget

GOAL = 1.5


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every millisecond."""

    def __enter__(self) -> PeakMemory:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed memory, so each run starts from a low base
        self.base = self.peak = _rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())

    @property
    def megabytes(self) -> float:
        return (self.peak - self.base) / 2**20


def run(arch_name: str, annotations, config: TrainConfig) -> tuple[float, float]:
    arch = architecture(arch_name)
    encoder = arch.build_encoder([*annotations["question"], *annotations["chosen_text"],
                                  *(t for texts in annotations["rejected_texts"] for t in texts)])  # fmt: skip
    data = encode_annotations(annotations, encoder)  # one row per annotation: the privacy unit
    torch.manual_seed(0)
    model = arch.build_model(encoder)
    privacy = PrivacyState(Budget(math.inf if not config.private else 1e9, config.delta))
    with PeakMemory() as memory:
        result = train_reward_model(model, data, config, privacy)
    return result.seconds, memory.megabytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", action="append", help="architecture(s); default: all three")
    parser.add_argument("--client", type=int, help="whose pairs to train on (default: the architecture's client)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=UserWarning)  # Opacus' secure-RNG and autocast notices

    data = build_federated_data(SplitConfig())
    console = Console()
    table = Table(title=f"DP-SGD overhead ({args.epochs} epochs, best of {args.repeats}; * = default mode)")
    for column in ["architecture", "pairs", "batch", "mode", "seconds", "ratio", "peak MB"]:
        table.add_column(column, justify="left" if column in ("architecture", "mode") else "right")
    summary = []
    for arch_name in args.arch or list(DEFAULT_ARCHS):
        client = DEFAULT_ARCHS.index(arch_name) if args.client is None else args.client
        pairs = data.clients[client]
        default = default_train_config(arch_name, 4.0, epochs=args.epochs, accountant="rdp")
        configs = {"non-private": default_train_config(arch_name, math.inf, epochs=args.epochs)}
        for mode in GRAD_SAMPLE_MODES:
            configs[mode] = default_train_config(
                arch_name, 4.0, epochs=args.epochs, accountant="rdp", grad_sample_mode=mode
            )
        times: dict[str, list[float]] = {name: [] for name in configs}
        memory: dict[str, float] = {}
        for _ in range(args.repeats):  # interleaved, so that load from other processes hits all alike
            for name, config in configs.items():
                seconds, megabytes = run(arch_name, pairs, config)
                times[name].append(seconds)
                memory[name] = max(memory.get(name, 0.0), megabytes)
        base = min(times["non-private"])
        for name in configs:
            best = min(times[name])
            label = f"{name} *" if name == default.grad_sample_mode else name
            cells = [str(len(pairs)), str(default.batch_size), label, f"{best:.2f}", f"{best / base:.2f}"]
            table.add_row(arch_name, *cells, f"{memory[name]:.0f}")
        ratio = min(times[default.grad_sample_mode]) / base
        fastest = min(GRAD_SAMPLE_MODES, key=lambda m: min(times[m]))
        summary.append(
            f"{arch_name}: default mode {default.grad_sample_mode}, ratio {ratio:.2f} "
            f"({'meets' if ratio <= GOAL else 'misses'} the goal <= {GOAL}); fastest here: {fastest}"
        )
        console.print(f"{arch_name}: done")
    console.print(table)
    for line in summary:
        console.print(line)


if __name__ == "__main__":
    main()
