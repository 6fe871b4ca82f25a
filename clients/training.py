"""DP-SGD training of a reward model with Opacus, and the client's privacy budget.

Privacy unit: one annotation (an annotator's ranking of answers to one question
about one image: the answer it ranks first and those it ranks below it;
`data.make_annotations`). A dataset row holds the whole annotation and the model
scores all its candidates in one forward pass (`answers` of shape [B, C, ...]),
so Opacus' per-sample gradient of a row is the gradient of the annotation's
listwise loss -log softmax(r)[chosen] (`listwise_loss`), and clipping bounds each
annotation's total contribution. A preference pair is an annotation with one
rejected answer (its loss is then Bradley-Terry's).

Budget semantics. A client holds a total budget (epsilon_B, delta_B). A run asks
to spend `epsilon` at `delta` (<= delta_B): Opacus calibrates the noise of this
run alone to (epsilon, delta) (`make_private_with_epsilon`). The run's mechanism
(noise multiplier, sample rate, steps) is then composed with every earlier
run's (the accountant history persisted next to the model), and the planned
total epsilon at delta_B must not exceed epsilon_B; otherwise the run is
refused with `BudgetExceeded` before any step. Composition with PRV or RDP is
tighter than adding the runs' epsilons.

A non-private run (epsilon = inf) uses the same loop without the engine, for
ablations. It leaves the client with no DP guarantee (total epsilon inf), so it
is allowed only for a client whose budget epsilon is inf.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from secure_mor.clients.models import images_to_tensor
from secure_mor.clients.text import TextEncoder, trim_padding
from secure_mor.files import write_atomic
from secure_mor.ledger import Budget

if TYPE_CHECKING:
    from datasets import Dataset

ACCOUNTANTS = ("prv", "rdp")
PRIVACY_UNIT = "annotation (one question about one image: the answer ranked first and those below it)"
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew")  # Opacus' per-sample gradient modes; "ew" = expanded weights

Mechanism = tuple[float, float, int]  # (noise_multiplier, sample_rate, steps), Opacus' history form


class BudgetExceeded(RuntimeError):
    """A training run would take the client's composed epsilon over its budget.
    Raised before any training step; nothing is written."""


@dataclass(frozen=True)
class TrainConfig:
    """One training run.

    epsilon: what this run may spend (math.inf: non-private, no Opacus engine).
    delta: the run's delta, at most the client's budget delta.
    batch_size: expected batch size; Poisson sampling rate = 1 / ceil(N / batch_size).
    max_grad_norm: per-annotation clipping norm C.
    accountant: "prv" (default) or "rdp", for calibration and composition.
    grad_sample_mode: how Opacus computes per-annotation gradients (same gradients, different
        speed): "hooks", "functorch" or "ew" (expanded weights, the fastest here).

    The field defaults are generic; `default_train_config` gives an
    architecture's own (`ARCH_TRAIN_DEFAULTS`).
    """

    epsilon: float
    delta: float = 1e-5
    epochs: int = 40
    batch_size: int = 200
    lr: float = 1e-2
    max_grad_norm: float = 0.3
    accountant: str = "prv"
    grad_sample_mode: str = "ew"
    seed: int = 0

    def __post_init__(self) -> None:
        if not (self.epsilon > 0):
            raise ValueError(f"epsilon must be > 0 (inf for non-private), got {self.epsilon}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {self.grad_sample_mode!r}")
        if self.epochs < 1 or self.batch_size < 1 or self.max_grad_norm <= 0 or self.lr <= 0:
            raise ValueError("epochs, batch_size, max_grad_norm and lr must be positive")

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)


# Each architecture's default training hyper-parameters (TrainConfig fields),
# used by `default_train_config` and so by `secure-mor client train` and the
# client nodes for every option not given. Chosen by the held-out top-1 of the
# architecture's own question family (architecture k trains client k of
# `data.default_clients`: cnn-gru colour, vit-xattn shape, minilm-head presence;
# default split, 800 listwise annotations, 200 held-out questions) at epsilon 4,
# delta 1e-5, seed 0, and by bench/dp_overhead.py for the grad-sample mode:
# - cnn-gru: 0.61 (seed 1: 0.845) with the generic values (kept).
# - vit-xattn: 0.495 with the generic values; batch 400 and lr 2e-2 (half the
#   steps, each with twice the signal against the same noise) 0.635.
# - minilm-head: 0.775 with the generic values (the question prior is 0.765); after the public warm
#   start (PUBLIC_WARM_START) lr 1e-2 undid it (0.67), 3e-3 kept it (0.78). Session 14, with its
#   two-layer head and 100-pass warm start: DP lr 3e-3 took presence from the warm start's 0.91 to
#   0.805, 1e-3 kept 0.90.
# - grad_sample_mode "ew" (expanded weights) is the fastest for all three
#   (private / non-private time 1.30, 1.08, 1.20 vs 1.98, 1.35, 1.49 with hooks).
ARCH_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {
    "cnn-gru": {"epochs": 40, "batch_size": 200, "lr": 1e-2, "max_grad_norm": 0.3, "grad_sample_mode": "ew"},
    "vit-xattn": {"epochs": 40, "batch_size": 400, "lr": 2e-2, "max_grad_norm": 0.3, "grad_sample_mode": "ew"},
    "minilm-head": {"epochs": 40, "batch_size": 200, "lr": 1e-3, "max_grad_norm": 0.3, "grad_sample_mode": "ew"},
}


# Each architecture's public warm start (RewardClient.warm_start, on the public questions) before DP
# training, non-private (public data). Measured at epsilon 4, seed 0, own-family top-1 without / with it:
# cnn-gru colour 0.52 / 0.96, vit-xattn shape 0.50 / 0.72, minilm-head presence 0.60 / 0.78 (with its
# fine-tuning lr 3e-3: at 1e-2 the DP noise undid the warm start, 0.67). Session 14, minilm-head: a
# presence question is answered by comparing the asked colour or shape with the image's, which its
# head learns only slowly and from many rows (a non-private probe on its inputs stays at the question
# prior for ~50 passes over 1,100 questions, then reaches 0.88; over 5,600 questions 0.995): at lr 1e-2
# it never did (image dependence 0.01-0.03 for 10 to 100 passes, 1,500 to 5,000 questions); 100 passes
# at lr 1e-3 over every public question reach presence 0.91 before any private row.
PUBLIC_WARM_START: dict[str, dict[str, Any]] = {
    "cnn-gru": {"epochs": 10, "batch_size": 200, "lr": 1e-2},
    "vit-xattn": {"epochs": 10, "batch_size": 200, "lr": 1e-2},
    "minilm-head": {"epochs": 100, "batch_size": 200, "lr": 1e-3},
}


def public_warm_start_config(arch: str, seed: int = 0, epochs: int | None = None) -> TrainConfig:
    """The non-private run of `arch`'s public warm start (PUBLIC_WARM_START; `epochs` None: its own)."""
    if arch not in PUBLIC_WARM_START:
        raise ValueError(f"unknown architecture {arch!r}; known: {sorted(PUBLIC_WARM_START)}")
    settings = {**PUBLIC_WARM_START[arch], **({} if epochs is None else {"epochs": epochs})}
    return TrainConfig(epsilon=math.inf, seed=seed, **settings)


def default_train_config(arch: str, epsilon: float, **overrides: Any) -> TrainConfig:
    """The run configuration for architecture `arch` at `epsilon`: TrainConfig's
    generic defaults, then the architecture's `ARCH_TRAIN_DEFAULTS`, then
    `overrides`. An override of None means "the default" (the CLI passes the
    options the user did not give as None)."""
    if arch not in ARCH_TRAIN_DEFAULTS:
        raise ValueError(f"no training defaults for architecture {arch!r}; known: {sorted(ARCH_TRAIN_DEFAULTS)}")
    unknown = set(overrides) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise TypeError(f"unknown training option(s) {sorted(unknown)}")
    given = {k: v for k, v in overrides.items() if v is not None}
    return TrainConfig(epsilon=epsilon, **{**ARCH_TRAIN_DEFAULTS[arch], **given})


def compose_epsilon(history: list[Mechanism], delta: float, accountant: str) -> float:
    """Epsilon at `delta` of all mechanisms in `history`, composed by Opacus' accountant."""
    if not history:
        return 0.0
    from opacus.accountants import create_accountant  # Opacus costs ~2 s to import: only where used

    acc = create_accountant(mechanism=accountant)
    acc.history = [(float(s), float(q), int(n)) for s, q, n in history]
    with warnings.catch_warnings():  # RDP's "optimal order is the largest alpha" is only a looseness hint
        warnings.simplefilter("ignore", UserWarning)
        return float(acc.get_epsilon(delta=delta))


@dataclass
class PrivacyState:
    """The client's budget and spending, saved as JSON next to the model.

    history: every DP-SGD run's mechanism, in Opacus' accountant-history form.
    non_private: a non-private run happened; the total is then unbounded.
    """

    budget: Budget
    history: list[Mechanism] = field(default_factory=list)
    non_private: bool = False

    def total_epsilon(self, accountant: str, extra: list[Mechanism] | None = None) -> float:
        if self.non_private:
            return math.inf
        return compose_epsilon(self.history + (extra or []), self.budget.delta, accountant)

    def check(self, planned_total: float, request: str) -> None:
        if planned_total > self.budget.epsilon:
            raise BudgetExceeded(
                f"{request} would bring the total epsilon to {planned_total:.3f} (at delta "
                f"{self.budget.delta:g}), over the budget epsilon {self.budget.epsilon:g} "
                f"({len(self.history)} earlier DP run(s)). Nothing was trained or written."
            )

    def to_json(self) -> dict:
        # JSON has no inf: an unbounded budget is written as null.
        eps = self.budget.epsilon if math.isfinite(self.budget.epsilon) else None
        return {
            "budget": {"epsilon": eps, "delta": self.budget.delta},
            "history": [list(m) for m in self.history],
            "non_private": self.non_private,
        }

    @classmethod
    def from_json(cls, state: dict) -> PrivacyState:
        eps = state["budget"]["epsilon"]
        return cls(
            Budget(math.inf if eps is None else float(eps), float(state["budget"]["delta"])),
            [(float(s), float(q), int(n)) for s, q, n in state["history"]],
            bool(state["non_private"]),
        )

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(self.to_json(), indent=2, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> PrivacyState:
        return cls.from_json(json.loads(path.read_text()))


def encode_annotations(annotations: Dataset, encoder: TextEncoder) -> TensorDataset:
    """One row per annotation: (image, question, answers [C, ...], mask [C]), answers[0] the chosen
    one and answers[1:] the rejected ones, padded to the longest row (mask False on padding)."""
    rejected = annotations["rejected_texts"]
    width = 1 + max((len(texts) for texts in rejected), default=1)
    texts, mask = [], torch.zeros((len(annotations), width), dtype=torch.bool)
    for row, (chosen, others) in enumerate(zip(annotations["chosen_text"], rejected, strict=True)):
        texts += [chosen, *others] + [""] * (width - 1 - len(others))
        mask[row, : 1 + len(others)] = True
    images = images_to_tensor(annotations["image"])
    question = encoder.encode(annotations["question"])
    answers = encoder.encode(texts).reshape(len(annotations), width, -1)
    return TensorDataset(images, question, answers, mask)


def candidate_rewards(
    model: nn.Module, image: torch.Tensor, question: torch.Tensor, answers: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Rewards [B, C] of every candidate, -inf where `mask` is False (padding)."""
    rewards = model(image, trim_padding(question), trim_padding(answers))
    return rewards.masked_fill(~mask, -math.inf)


# Weight of the reward-size term of `listwise_loss`. The softmax sees neither a constant added to
# every candidate of a question nor how far apart they are once the order is right, so without it
# rewards grow without bound: measured, the presence model scored "yes" and "no" at +15 to +31 (and
# non-answers at -28), and clipping at the release (+-5, what GRPO sees) left "yes" and "no" equal.
# The term keeps a question's rewards within a few units of 0, inside the clip.
REWARD_SIZE = 0.05


def listwise_loss(rewards: torch.Tensor) -> torch.Tensor:
    """Mean over annotations of -log softmax(rewards)[chosen] (chosen = column 0; padding is -inf):
    the Plackett-Luce probability that the annotator ranks its answer first (with one rejected
    answer, the Bradley-Terry loss -log sigmoid(r(chosen) - r(rejected))), plus REWARD_SIZE times
    the mean squared reward of the annotation's candidates. Both are per annotation, so DP-SGD's
    per-row clipping still bounds each annotation's contribution. 0 for an empty batch (Poisson
    sampling can draw one, and its step must still run: it adds noise)."""
    real = torch.isfinite(rewards)
    size = torch.where(real, rewards, 0.0).square().sum(-1) / real.sum(-1).clamp(min=1)
    per_row = -torch.log_softmax(rewards, dim=-1)[:, 0] + REWARD_SIZE * size
    return per_row.sum() / max(len(rewards), 1)


@dataclass(frozen=True)
class TrainResult:
    """What a run did. For a non-private run the mechanism fields are None and
    both epsilons are inf."""

    config: TrainConfig
    annotations: int
    steps: int
    noise_multiplier: float | None
    sample_rate: float | None
    epsilon: float  # this run alone, at config.delta
    total_epsilon: float  # all runs composed, at the budget's delta
    epoch_losses: list[float]
    seconds: float

    @property
    def mechanism(self) -> Mechanism | None:
        if self.noise_multiplier is None or self.sample_rate is None:
            return None
        return (self.noise_multiplier, self.sample_rate, self.steps)

    def to_json(self) -> dict:
        def finite(x: float) -> float | None:
            return x if math.isfinite(x) else None  # JSON has no inf: null = unbounded

        out = asdict(self)
        out["config"]["epsilon"] = finite(self.config.epsilon)
        out["epsilon"], out["total_epsilon"] = finite(self.epsilon), finite(self.total_epsilon)
        return out


ProgressFn = Callable[[int, int, float], None]  # (step done, total steps, running loss)


def train_reward_model(
    model: nn.Module,
    data: TensorDataset,
    config: TrainConfig,
    privacy: PrivacyState,
    progress: ProgressFn | None = None,
) -> TrainResult:
    """Train `model` in place on annotation rows `data` (from `encode_annotations`).

    Raises BudgetExceeded, before any step, when the composed total would exceed
    the budget. Does not change `privacy` and writes nothing: the caller records
    the returned mechanism once the run has succeeded.
    """
    if config.delta > privacy.budget.delta:
        raise BudgetExceeded(f"run delta {config.delta:g} exceeds the budget delta {privacy.budget.delta:g}")
    request = f"training at epsilon {config.epsilon:g}"
    # Cheap refusal first: the composed total is at least the run alone and at least what is spent.
    privacy.check(max(config.epsilon, privacy.total_epsilon(config.accountant)), request)

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(data, batch_size=config.batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    model.train()
    trained: nn.Module = model
    engine = None
    if config.private:
        from opacus import PrivacyEngine  # imported here: a process that only scores never needs it

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # secure-RNG and RDP-order hints
            engine = PrivacyEngine(accountant=config.accountant)
            trained, optimizer, loader = engine.make_private_with_epsilon(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                target_epsilon=config.epsilon,
                target_delta=config.delta,
                epochs=config.epochs,
                max_grad_norm=config.max_grad_norm,
                poisson_sampling=True,
                grad_sample_mode=config.grad_sample_mode,
            )
        mechanism = (float(optimizer.noise_multiplier), 1.0 / len(loader), config.epochs * len(loader))
        planned_total = privacy.total_epsilon(config.accountant, [mechanism])
        try:
            privacy.check(planned_total, request)
        except BudgetExceeded:
            trained.to_standard_module()  # remove Opacus' hooks: the model is left as it was
            raise
    total_steps = config.epochs * len(loader)

    start, step, losses = time.perf_counter(), 0, []
    try:
        with warnings.catch_warnings():
            # Opacus' hook on the first layer fires although images need no gradient: harmless.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            for _ in range(config.epochs):
                epoch_loss, epoch_rows = 0.0, 0
                for image, question, answers, mask in loader:
                    optimizer.zero_grad(set_to_none=True)
                    if engine is not None and len(image) == 0:
                        # An empty Poisson batch: no annotation's gradient, but the step still adds
                        # noise. Set the (empty) per-row gradients directly: expanded weights
                        # cannot run a forward pass on zero rows.
                        for param in model.parameters():
                            if param.requires_grad:
                                param.grad_sample = param.new_zeros((0, *param.shape))
                        loss = torch.zeros(())
                    else:
                        loss = listwise_loss(candidate_rewards(trained, image, question, answers, mask))
                        loss.backward()
                    optimizer.step()
                    epoch_loss += loss.item() * len(image)
                    epoch_rows += len(image)
                    step += 1
                    if progress:
                        progress(step, total_steps, epoch_loss / max(epoch_rows, 1))
                losses.append(epoch_loss / max(epoch_rows, 1))
    finally:
        if engine is not None:
            trained.to_standard_module()
    model.eval()
    seconds = time.perf_counter() - start

    if engine is None:
        return TrainResult(config, len(data), step, None, None, math.inf, math.inf, losses, seconds)
    noise_multiplier, sample_rate, planned_steps = mechanism
    if step != planned_steps:
        raise RuntimeError(f"ran {step} steps, planned {planned_steps}: the accounting would be wrong")
    return TrainResult(
        config,
        len(data),
        step,
        noise_multiplier,
        sample_rate,
        epsilon=engine.get_epsilon(config.delta),
        total_epsilon=planned_total,
        epoch_losses=losses,
        seconds=seconds,
    )
