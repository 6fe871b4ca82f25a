"""Run configuration and the run directory every command reads and writes.

A run directory (`runs/<name>` by default) holds everything one run produces:
`data.json` (which dataset, which split), `policy/base` and `policy/sft`
(saved with `save_pretrained`), `eval/*.json`, and, as later stages add them,
client models, keys, the privacy ledger and `results.json`. Commands that
follow `policy build` reuse the data spec saved there, so every stage of a run
sees the same split.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from secure_mor.data import (
    ClientDataConfig,
    DatasetError,
    FederatedData,
    SplitConfig,
    build_federated_data,
    default_clients,
    load_hf_vqa,
)
from secure_mor.files import write_json

EASY_VQA = "easy-vqa"


@dataclass(frozen=True)
class DataSpec:
    """Which dataset (`easy-vqa` or a local Hugging Face dataset path) and how it is split."""

    dataset: str = EASY_VQA
    split: SplitConfig = field(default_factory=SplitConfig)

    @classmethod
    def of_run(cls, num_clients: int, seed: int, pairs_per_client: int, calibration_pairs: int,
               dataset: str = EASY_VQA) -> DataSpec:
        """The split of an alignment run (its run config's keys of the same names)."""
        return cls(dataset=dataset, split=SplitConfig(clients=default_clients(num_clients), seed=seed,
                                                      pairs_per_client=pairs_per_client,
                                                      calibration_pairs=calibration_pairs))

    def to_json(self) -> dict[str, Any]:
        return {"dataset": self.dataset, "split": asdict(self.split)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> DataSpec:
        split = dict(raw["split"])
        split["clients"] = tuple(ClientDataConfig(**c) for c in split["clients"])
        return cls(dataset=raw["dataset"], split=SplitConfig(**split))

    def load(self) -> FederatedData:
        if self.dataset == EASY_VQA:
            return build_federated_data(self.split)
        train = load_hf_vqa(self.dataset, "train")
        try:
            test = load_hf_vqa(self.dataset, "test")
        except DatasetError as err:
            raise DatasetError(f"{self.dataset}: a 'test' split is needed for evaluation ({err})") from err
        return build_federated_data(self.split, train, test)


class RunDir:
    """Paths of one run's outputs."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    @property
    def data_spec_path(self) -> Path:
        return self.path / "data.json"

    @property
    def base_policy(self) -> Path:
        return self.path / "policy" / "base"

    @property
    def sft_policy(self) -> Path:
        return self.path / "policy" / "sft"

    @property
    def policy_source_path(self) -> Path:
        """`policy/source.json`: which VLM the base policy is (`{"model": path or hub id}`, "" = the tiny LLaVA
        built here)."""
        return self.path / "policy" / "source.json"

    def policy_source(self) -> str:
        """The run's VLM ("" = the tiny LLaVA built here; so is a run written before source.json existed)."""
        if not self.policy_source_path.exists():
            return ""
        return str(json.loads(self.policy_source_path.read_text())["model"])

    def save_policy_source(self, model: str) -> None:
        self.write_json(self.policy_source_path, {"model": model})

    def eval_path(self, tag: str) -> Path:
        return self.path / "eval" / f"{tag}.json"

    def save_data_spec(self, spec: DataSpec) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.data_spec_path.write_text(json.dumps(spec.to_json(), indent=2))

    def data_spec(self) -> DataSpec:
        if not self.data_spec_path.exists():
            raise DatasetError(
                f"{self.data_spec_path} is missing: run `secure-mor policy build --out {self.path}` first"
            )
        return DataSpec.from_json(json.loads(self.data_spec_path.read_text()))

    def write_json(self, path: Path, payload: Any) -> Path:
        return write_json(path, payload, indent=2)  # atomic: a killed command never leaves half a file
