"""The server's router: prompt features from the frozen reference policy, and the
fusion rules that turn them into N x K weights.

Fusion rules, selected by name (`weights_for`):

    "mor"        the learned router g(x, o) (secure_mor.routing.Router)
    "uniform"    1/K for every client
    "single:j"   all the mass on client j, except the floor w_min on every other client
    "by-family"  by the question's true family (evaluation only: the server does not know the
                 clients' specialities): a map family -> client index; the mapped client gets
                 1 - (K - 1) w_min, families outside the map get uniform

Every rule returns float64 rows on the simplex with every entry >= w_min, checked
with the same rule the key authority applies (crypto.fusion.validate_weights).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from secure_mor.crypto.fusion import WeightError, validate_weights
from secure_mor.data import ClientDataConfig, user_prompt
from secure_mor.routing import Router, RouterError

FUSIONS = ("mor", "uniform", "single:<j>", "by-family")
# All but the floor on one client for every item: each release reveals that client's score to
# within crypto.params.score_half_width (a deployment runs them only when allowed explicitly).
ONE_CLIENT_FUSIONS = ("single", "by-family")
_MASK_POSITION_MODELS = {"llava"}


# ---------------------------------------------------------------- prompt features


def family_features(families: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """The router's input under route-by "family": each prompt's question family, one-hot in the
    order of `names` (public: the question says what it asks). float64 [N, len(names)]."""
    index = {name: i for i, name in enumerate(names)}
    unknown = sorted(set(families) - set(index))
    if unknown:
        raise ValueError(f"question families {unknown} are not among the run's {list(names)}")
    out = np.zeros((len(families), len(names)))
    out[np.arange(len(families)), [index[f] for f in families]] = 1.0
    return out


def _rows(rows: Any) -> tuple[list[Any], list[str]]:
    """(images, questions) from a datasets.Dataset or a sequence of {"image", "question"} mappings."""
    if hasattr(rows, "column_names"):
        return list(rows["image"]), list(rows["question"])
    return [r["image"] for r in rows], [r["question"] for r in rows]


def prompt_features(model: Any, processor: Any, rows: Any, batch_size: int = 16) -> np.ndarray:
    """Pooled prompt features of the frozen reference policy: the mean of the last hidden
    layer over the non-pad tokens (image tokens included) of the rendered prompt
    `USER: <image> question ASSISTANT:`. float64 [N, hidden].

    No gradient; the model's train/eval mode is restored. For LLaVA-style models (1-D
    rotary positions) the position ids are derived from the attention mask, so left padding
    does not change a row's features (the result does not depend on the batch size beyond
    float rounding); other models compute their own positions."""
    images, questions = _rows(rows)
    if len(images) != len(questions):
        raise ValueError("rows must have as many images as questions")
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    was_training = model.training
    model.eval()
    out: list[np.ndarray] = []
    try:
        with torch.no_grad():
            for start in range(0, len(questions), batch_size):
                chunk_q = questions[start : start + batch_size]
                chunk_i = [image.convert("RGB") for image in images[start : start + batch_size]]
                prompts = [
                    processor.apply_chat_template(user_prompt(q), add_generation_prompt=True, tokenize=False)
                    for q in chunk_q
                ]
                inputs = processor(text=prompts, images=chunk_i, return_tensors="pt", padding=True).to(model.device)
                mask = inputs["attention_mask"]
                extra = {}
                if getattr(model.config, "model_type", "") in _MASK_POSITION_MODELS:
                    extra["position_ids"] = (mask.cumsum(dim=1) - 1).clamp(min=0)
                result = model(**inputs, **extra, output_hidden_states=True)
                hidden = result.hidden_states[-1].to(torch.float64)
                weights = mask.to(torch.float64).unsqueeze(-1)
                pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
                out.append(pooled.cpu().numpy())
    finally:
        model.train(was_training)
    if not out:
        hidden_size = getattr(getattr(model.config, "text_config", model.config), "hidden_size", 0)
        return np.zeros((0, hidden_size))
    features = np.concatenate(out).astype(np.float64)
    if not np.all(np.isfinite(features)):
        raise ValueError("the reference model produced non-finite features")
    return features


# ---------------------------------------------------------------- fusion rules


def parse_fusion(fusion: str, k: int) -> tuple[str, int | None]:
    """("mor" | "uniform" | "single" | "by-family", client index for single)."""
    if fusion in ("mor", "uniform", "by-family"):
        return fusion, None
    if fusion.startswith("single:"):
        try:
            j = int(fusion.removeprefix("single:"))
        except ValueError as err:
            raise RouterError(f"bad fusion {fusion!r}: expected single:<client index>") from err
        if not 0 <= j < k:
            raise RouterError(f"fusion {fusion!r}: client index must lie in [0, {k})")
        return "single", j
    raise RouterError(f"unknown fusion {fusion!r}; known: {list(FUSIONS)}")


def one_client_weights(n: int, k: int, j: int, w_min: float) -> np.ndarray:
    """Every row: 1 - (K - 1) w_min on client j, w_min elsewhere."""
    w = np.full((n, k), w_min, dtype=np.float64)
    w[:, j] = 1.0 - (k - 1) * w_min
    return w


def family_map(clients: Sequence[ClientDataConfig]) -> dict[str, int]:
    """family -> the first client specialised in it (evaluation only: the server does not
    know the clients' specialities in a real deployment)."""
    out: dict[str, int] = {}
    for j, client in enumerate(clients):
        out.setdefault(client.family, j)
    return out


def weights_for(
    fusion: str,
    *,
    n: int,
    k: int,
    w_min: float,
    router: Router | None = None,
    features: np.ndarray | None = None,
    objective_ids: np.ndarray | None = None,
    families: Sequence[str] | None = None,
    family_clients: Mapping[str, int] | None = None,
) -> np.ndarray:
    """N x K float64 weights of a fusion rule (see the module docstring); always valid rows."""
    kind, j = parse_fusion(fusion, k)
    if k < 1 or n < 0 or not 0.0 <= w_min < 1.0 / k:
        raise RouterError(f"need k >= 1, n >= 0 and w_min in [0, 1/k), got n={n}, k={k}, w_min={w_min}")
    if kind == "uniform":
        w = np.full((n, k), 1.0 / k)
    elif kind == "single":
        w = one_client_weights(n, k, j, w_min)
    elif kind == "by-family":
        if families is None or family_clients is None:
            raise RouterError("the by-family fusion needs the items' families and a family -> client map")
        if len(families) != n:
            raise RouterError(f"{len(families)} families for {n} items")
        bad = {f: c for f, c in family_clients.items() if not 0 <= int(c) < k}
        if bad:
            raise RouterError(f"by-family maps families to clients outside [0, {k}): {bad}")
        w = np.full((n, k), 1.0 / k)
        for i, family in enumerate(families):
            if family in family_clients:
                w[i] = one_client_weights(1, k, int(family_clients[family]), w_min)[0]
    else:
        if router is None or features is None or objective_ids is None:
            raise RouterError("the mor fusion needs the router, the features and the objective ids")
        if router.config.num_clients != k or router.config.w_min < w_min:
            raise RouterError(
                f"router has K={router.config.num_clients}, w_min={router.config.w_min}; asked for K={k}, "
                f"w_min >= {w_min}"
            )
        w = router.weights(features, objective_ids)
    try:
        return validate_weights(w, n, k, w_min)
    except WeightError as err:
        raise RouterError(f"fusion {fusion!r} produced invalid weights: {err}") from err
