"""A client as it lives in a run directory: what the CLI and the Flower ClientApp call.

Layout (K = client id):

    RUN_DIR/ledger.jsonl                         the shared privacy ledger
    RUN_DIR/keys/client-K.pub                    public key registry (hex)
    RUN_DIR/clients/client-K/client.json         ClientConfig (architecture, budget, split)
    RUN_DIR/clients/client-K/model.safetensors   reward-model parameters
    RUN_DIR/clients/client-K/text_encoder.json   tokenizer / vocabulary
    RUN_DIR/clients/client-K/privacy.json        budget + accountant history (composition)
    RUN_DIR/clients/client-K/metrics.json        one record per training run, last evaluation
    RUN_DIR/clients/client-K/keys/client-K.key   Ed25519 signing key, 0600, optionally encrypted

API: `RewardClient.load(run_dir, k)` / `RewardClient.new(run_dir, config, annotations)`,
then `.train(annotations, TrainConfig)` (budget-checked, ledgered), `.score(items)`,
`.evaluate(held_out)`; `train_client(...)` loads or creates and trains.

Ledger representation of a non-private run (JSON has no inf): mechanism
`NonPrivateDpEvent`, `epsilon` and `total_epsilon` = `UNBOUNDED_EPSILON` (the
largest float, 1.7976931348623157e308, which any budget comparison treats as
over budget), and `details.non_private = true`. An unbounded budget is written
the same way.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from secure_mor.clients.models import architecture
from secure_mor.clients.scoring import ScoreItem, score
from secure_mor.clients.text import TextEncoder, encoder_from_json
from secure_mor.clients.training import (
    PRIVACY_UNIT,
    PrivacyState,
    ProgressFn,
    TrainConfig,
    TrainResult,
    encode_annotations,
    train_reward_model,
)
from secure_mor.crypto.params import ReleaseConfig
from secure_mor.crypto.signing import Signer, key_passphrase, load_or_create_signer, publish_public_key
from secure_mor.files import write_atomic
from secure_mor.ledger import KIND_DP_TRAINING, Budget, Ledger, dp_sgd_event, non_private_event

if TYPE_CHECKING:
    from datasets import Dataset

    from secure_mor.data import FederatedData

UNBOUNDED_EPSILON = sys.float_info.max


class ClientError(RuntimeError):
    """The run directory does not hold the requested client, or disagrees with a request."""


@dataclass(frozen=True)
class ClientConfig:
    """A client's fixed settings, written once to client.json.

    family/style: its annotations (from the data split), used for evaluation.
    budget_epsilon/budget_delta: the total DP budget (epsilon inf only for ablations).
    reward_clip: scores are clipped to [-reward_clip, reward_clip]: half the release bound R, so that a
    calibration margin (a difference of two scores) is within R too (crypto.wire clips every released
    value to R: the bound the key authority's range check relies on, whatever a model outputs).
    split: the SplitConfig fields its data came from (seed, skew, pairs_per_client, num_clients).
    """

    client_id: int
    arch: str
    family: str
    style: str
    budget_epsilon: float = 8.0
    budget_delta: float = 1e-5
    reward_clip: float = ReleaseConfig().value_bound / 2
    split: Mapping[str, Any] = field(default_factory=dict)

    @property
    def party(self) -> str:
        return f"client-{self.client_id}"

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["budget_epsilon"] = self.budget_epsilon if math.isfinite(self.budget_epsilon) else None
        out["split"] = dict(self.split)
        return out

    @classmethod
    def from_json(cls, state: dict[str, Any]) -> ClientConfig:
        state = dict(state)
        state["budget_epsilon"] = math.inf if state["budget_epsilon"] is None else state["budget_epsilon"]
        return cls(**state)


def client_dir(run_dir: Path, client_id: int) -> Path:
    return Path(run_dir) / "clients" / f"client-{client_id}"


def _ledger_epsilon(epsilon: float) -> float:
    return epsilon if math.isfinite(epsilon) else UNBOUNDED_EPSILON


class RewardClient:
    """One client's reward model, text encoder and privacy state."""

    def __init__(
        self,
        run_dir: Path,
        config: ClientConfig,
        model: nn.Module,
        encoder: TextEncoder,
        privacy: PrivacyState,
        key_dir: Path | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.config = config
        self.model = model
        self.encoder = encoder
        self.privacy = privacy
        self.key_dir = Path(key_dir) if key_dir else self.directory / "keys"  # the signing key's directory
        self.public_warm_start: dict[str, Any] | None = None  # set by warm_start, recorded by the next train
        self._signer: Signer | None = None

    @property
    def directory(self) -> Path:
        return client_dir(self.run_dir, self.config.client_id)

    @property
    def party(self) -> str:
        return self.config.party

    @classmethod
    def exists(cls, run_dir: Path, client_id: int) -> bool:
        return (client_dir(run_dir, client_id) / "model.safetensors").exists()

    @classmethod
    def new(cls, run_dir: Path, config: ClientConfig, annotations: Dataset, key_dir: Path | None = None,
            public: Dataset | None = None) -> RewardClient:
        """A fresh client in memory; its text encoder is built from its own annotations' texts (and
        those of the `public` annotations it will warm-start on).
        Nothing is written until a training run succeeds."""
        if cls.exists(run_dir, config.client_id):
            raise ClientError(f"{config.party} already exists in {run_dir}: load it instead")
        arch = architecture(config.arch)
        texts = [t for rows in (annotations, public) if rows is not None
                 for t in [*rows["question"], *rows["chosen_text"], *(x for xs in rows["rejected_texts"] for x in xs)]]
        encoder = arch.build_encoder(texts)
        privacy = PrivacyState(Budget(config.budget_epsilon, config.budget_delta))
        return cls(run_dir, config, arch.build_model(encoder), encoder, privacy, key_dir)

    @classmethod
    def load(cls, run_dir: Path, client_id: int, key_dir: Path | None = None) -> RewardClient:
        directory = client_dir(run_dir, client_id)
        if not cls.exists(run_dir, client_id):
            raise ClientError(f"no trained client-{client_id} in {run_dir} (train it first)")
        config = ClientConfig.from_json(json.loads((directory / "client.json").read_text()))
        encoder = encoder_from_json(json.loads((directory / "text_encoder.json").read_text()), cache_dir=directory)
        model = architecture(config.arch).build_model(encoder)
        model.load_state_dict(load_tensors((directory / "model.safetensors").read_bytes()))
        model.eval()
        return cls(run_dir, config, model, encoder, PrivacyState.load(directory / "privacy.json"), key_dir)

    def signer(self, passphrase: str | None = None) -> Signer:
        """The client's Ed25519 key (created on first use, 0600; encrypted under `passphrase`, by
        default $SECURE_MOR_KEY_PASSPHRASE when set), its public half published in RUN_DIR/keys. Loaded and
        published once per object: every scoring round signs with it."""
        if self._signer is None:
            self._signer = load_or_create_signer(self.party, self.key_dir, passphrase or key_passphrase())
            publish_public_key(self._signer, self.run_dir / "keys")
        return self._signer

    def train(
        self,
        annotations: Dataset,
        config: TrainConfig,
        passphrase: str | None = None,
        progress: ProgressFn | None = None,
    ) -> TrainResult:
        """One training run on `annotations`, continuing from the current parameters.

        Raises BudgetExceeded (nothing written) if the composed total would pass
        the budget. On success: records the mechanism in privacy.json, appends a
        signed ledger entry, and saves model, encoder and metrics."""
        result = train_reward_model(self.model, encode_annotations(annotations, self.encoder), config, self.privacy,
                                    progress)
        signer = self.signer(passphrase)
        self.directory.mkdir(parents=True, exist_ok=True)
        model_bytes = save_tensors({k: v.contiguous() for k, v in self.model.state_dict().items()})
        warm = self.public_warm_start
        details = {
            "client_id": self.config.client_id,
            "arch": self.config.arch,
            "privacy_unit": PRIVACY_UNIT,
            "sampling": "poisson",
            "annotations": result.annotations,
            "epochs": config.epochs,
            "expected_batch_size": config.batch_size,
            "max_grad_norm": config.max_grad_norm,
            "grad_sample_mode": config.grad_sample_mode,
            "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
            **({"public_warm_start": warm} if warm else {}),
        }
        if result.mechanism is None:
            self.privacy.non_private = True
            mechanism, details["non_private"] = non_private_event(), True
        else:
            self.privacy.history.append(result.mechanism)
            mechanism = dp_sgd_event(*result.mechanism)
        # Spending is recorded before the model is saved: a crash in between
        # over-counts the budget, never under-counts it.
        self.privacy.save(self.directory / "privacy.json")
        Ledger(self.run_dir / "ledger.jsonl").append(
            signer,
            KIND_DP_TRAINING,
            mechanism=mechanism,
            epsilon=_ledger_epsilon(result.epsilon),
            delta=config.delta,
            accountant=config.accountant,
            total_epsilon=_ledger_epsilon(result.total_epsilon),
            budget=Budget(_ledger_epsilon(self.privacy.budget.epsilon), self.privacy.budget.delta),
            details=details,
        )
        write_atomic(self.directory / "model.safetensors", model_bytes)
        write_atomic(self.directory / "text_encoder.json", json.dumps(self.encoder.to_json()).encode())
        write_atomic(self.directory / "client.json", json.dumps(self.config.to_json(), indent=2).encode())
        metrics = self.metrics()
        if warm:
            metrics["public_warm_start"] = warm
            self.public_warm_start = None
        metrics.setdefault("runs", []).append(result.to_json())
        self.save_metrics(metrics)
        return result

    def warm_start(self, public: Dataset, seed: int = 0, epochs: int | None = None,
                   progress: ProgressFn | None = None) -> TrainResult:
        """Non-private training on public annotations (`data.public_annotations`) before any private
        run. It spends no budget (public data), so nothing goes to the privacy state or the ledger;
        metrics.json records it, and the first DP run's ledger entry says the model started from it."""
        from secure_mor.clients.training import public_warm_start_config

        if self.privacy.history or self.privacy.non_private:
            raise ClientError(f"{self.party} has trained on private data already: a warm start comes first")
        config = public_warm_start_config(self.config.arch, seed, epochs)
        settings = {"epochs": config.epochs, "batch_size": config.batch_size, "lr": config.lr}
        public_data = PrivacyState(Budget(math.inf, self.privacy.budget.delta))  # no budget: the client's is untouched
        result = train_reward_model(self.model, encode_annotations(public, self.encoder), config, public_data, progress)
        self.public_warm_start = {"annotations": len(public), **settings, "seconds": round(result.seconds, 1)}
        return result

    def score(self, items: Sequence[ScoreItem]) -> np.ndarray:
        """Clipped rewards, float32 [N]; spends no budget (post-processing)."""
        return score(self.model, self.encoder, items, self.config.reward_clip)

    def evaluate(self, data: FederatedData, seed: int = 0) -> dict[str, dict[str, float]]:
        """Top-1 among all answers, image dependence and pairwise accuracy per family on the
        held-out set (`clients.evaluation`); spends no budget."""
        from secure_mor.clients.evaluation import evaluate_model  # needs datasets; scoring does not

        return evaluate_model(self.model, self.encoder, data, self.config.style, seed, self.config.reward_clip)

    def metrics(self) -> dict[str, Any]:
        path = self.directory / "metrics.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def save_metrics(self, metrics: dict[str, Any]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(self.directory / "metrics.json", json.dumps(metrics, indent=2, allow_nan=False).encode())


def train_client(
    run_dir: Path,
    config: ClientConfig,
    annotations: Dataset,
    train_config: TrainConfig,
    passphrase: str | None = None,
    progress: ProgressFn | None = None,
    key_dir: Path | None = None,
    public: Dataset | None = None,
    public_epochs: int | None = None,
) -> tuple[RewardClient, TrainResult]:
    """Load the client (its stored config must agree with `config`) or create it, then train.
    A new client's initial parameters are drawn with the run's seed (reproducible runs), and with
    `public` annotations it first warm-starts on them (`RewardClient.warm_start`, `public_epochs`
    passes; None: the default)."""
    if RewardClient.exists(run_dir, config.client_id):
        client = RewardClient.load(run_dir, config.client_id, key_dir)
        if client.config != config:
            raise ClientError(
                f"{config.party} in {run_dir} was created with {client.config}; "
                f"this request differs ({config}): architecture, budget and split are fixed at creation"
            )
    else:
        torch.manual_seed(train_config.seed)
        client = RewardClient.new(run_dir, config, annotations, key_dir, public)
        if public is not None:
            client.warm_start(public, train_config.seed, public_epochs)
    return client, client.train(annotations, train_config, passphrase, progress)
