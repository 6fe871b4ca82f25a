"""Training the router without seeing any client's scores (docs/architecture.md).

Setup, once per key-authority context (before step 0): the server sends every client the
`RouterSetup` (the router's configuration and public input normalisation, the public features
and objective ids of every calibration pair); each client checks it (the normalisation must be
the one those features determine: whitened PCA, or standardisation for the family one-hot) and
pins it, and the server logs its digest (ledger
`router_setup`). Every later gradient query must agree with it.

Per router step t (batch of B calibration pairs, router parameters theta, P of them):

  round 1, fused margins (purpose "reward", B values)
    server -> clients   step t, fresh nonce n1, the round key of the masks, the batch's item indices
    client k -> server  seal_reply(d_k) for the batch: its margins
                        d_ik = clip(R_k(chosen_i) - R_k(rejected_i), -R, R), masked at the source,
                        CKKS-encrypted, signed, committing to the batch's calibration-pair digests
    server              verifies every reply, W = g_theta(x, o) (B x K)
    server -> authority decryption request (the replies, W, the items' digests), signed
    authority -> server the authority fuses sum_k W[:, k] ct_k itself; signed release of the masked
                        values; logged in the ledger
    server              removes the masks: fused margins m (B values), clipped to [-R, R] (the
                        release's own error); coefficients c_i = -(1/B) sigmoid(-clip(s m_i, -R, R)), s the
                        loss's sharpness (RouterTrainingConfig)

  round 2, summed gradient (purpose "router_gradient", P values)
    server -> clients   step t, fresh nonce n2, the round key, GradientQuery: RouterState (theta and
                        the public input normalisation), the batch's items, features and objective
                        ids, c, scale
    client k -> server  seal_reply(scale * G_k), G_k = sum_i c_i d_ik dw_ik/dtheta (routing.py),
                        after its own checks (ItemUseLimiter; check_query: the pinned setup, c_i
                        in coefficient_range, scale <= QueryLimits.max_scale, the counting
                        rule), masked at the source, committing to the batch's items and to
                        the query's digest
    server -> authority decryption request (the replies, no weights), signed; the authority sums
                        only the terms of the step's margin contributors, over the items of
                        their margins, answering one query
    authority -> server signed release of the masked sum; logged in the ledger
    server              removes the masks: g = s sum_k G_k = dL/dtheta for L = mean softplus(-s m)
                        (up to the release noise, ~1e-5 per value, times s); optimizer step

Both rounds go through `server.secure_round.SecureRound`, as GRPO scoring does. So the
server-side function only ever receives client reply bytes (ciphertexts of masked values
and signed statements) and the authority's responses about masked fused or summed values.
If a client's reply is missing or invalid in either round, the step is skipped (no
update; round-2 never asks the authority): the Bradley-Terry gradient needs every column
of W. A refusal by the key authority or a response that does not verify is not a dropout
and aborts training (RoundRefused).

The transport is injected, so the Flower app can carry the messages (`fields`: run id,
step, nonce and round key, `SecureRound.fields`; each returns {client party: reply bytes}):

    get_encrypted_margins(fields, items) -> {party: reply}
    get_encrypted_gradients(fields, query: GradientQuery) -> {party: reply}

Release budget (see secure_mor/routing.py, "Leakage"): every release is a
linear function of the clients' margins, so the schedule uses each calibration
item in at most `limits.item_uses` steps (default one: disjoint batches) and
checks item_uses * (B + P) <= max_release_ratio * B * K before anything is
asked; the clients check the same rule and count every item's uses over all run ids of the
key authority's context, and the authority, which keeps one W row per calibration pair for
the life of its context, refuses a pair's second margin release under a router that has
changed since. `release_functionals` and
`coordinate_leverage` measure what one step reveals (an audit helper).

Use a run id of its own for router training (e.g. "<run>:router"): the key
authority requires strictly increasing steps per (run id, purpose). A router training that
stopped part-way cannot be repeated over the same items in the same context (the clients and
the authority refuse them): it needs a new context.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch

from secure_mor.crypto.wire import ClientReply, Expected, new_nonce
from secure_mor.protocol import Payload, calibration_digests
from secure_mor.routing import (
    DEFAULT_QUERY_LIMITS,
    GradientQuery,
    QueryLimits,
    Router,
    RouterError,
    bt_coefficients,
    bt_loss,
    flatten_gradients,
    load_flat_gradients,
    parameter_count,
    parameter_layout,
)
from secure_mor.server.secure_round import SecureRound

MarginTransport = Callable[[Payload, np.ndarray], Mapping[str, bytes]]
GradientTransport = Callable[[Payload, GradientQuery], Mapping[str, bytes]]


class RouterTrainingError(RuntimeError):
    """Router training cannot proceed (bad inputs, or the release budget forbids it)."""


@dataclass(frozen=True)
class RouterTrainingConfig:
    """steps: at most this many router steps (fewer if the item budget runs out);
    batch_size: B calibration pairs per step; optimizer: "adam" or "sgd";
    adam_eps: Adam's epsilon, kept well above the release noise (~1e-5 per gradient
    value) so that noise alone never moves a parameter by a full learning rate;
    gradient_scale: clients release scale * G_k (each value must stay within R; at most
    limits.max_scale, which the clients enforce);
    sharpness: the Bradley-Terry loss is taken of sharpness * fused margin. At 1 the loss is won by the
    client with the largest margins rather than the one that ranks the most pairs right, which is what
    GRPO needs (tests/test_router_training.py, the scale trap). The clients are sent
    c_i = -(1/B) sigmoid(-clip(sharpness * m_i, -R, R)), inside their coefficient range whatever the
    sharpness (past R, sigmoid(-R) < 5e-5), and the server multiplies the released sum by sharpness;
    limits: the release budget (item uses, ratio, minimum batch), as the clients check it."""

    steps: int = 50
    batch_size: int = 128
    # 0.2: the main job's 15 steps are all its calibration set allows (each pair in one step), and at
    # 0.05 the router was still near uniform after them (measured, plaintext, the clients' real margins)
    learning_rate: float = 0.2
    optimizer: str = "adam"
    adam_eps: float = 1e-3
    momentum: float = 0.0
    gradient_scale: float = 1.0
    sharpness: float = 1.0
    limits: QueryLimits = DEFAULT_QUERY_LIMITS
    seed: int = 0

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise RouterTrainingError(f"optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if (self.steps < 0 or self.batch_size < 1 or not self.learning_rate > 0 or not self.gradient_scale > 0
                or not 0 < self.sharpness < math.inf):
            raise RouterTrainingError(f"invalid router training settings: {self}")
        if self.gradient_scale > self.limits.max_scale:
            raise RouterTrainingError(f"gradient_scale {self.gradient_scale} exceeds what clients accept "
                                      f"({self.limits.max_scale})")  # fmt: skip


@dataclass
class StepRecord:
    step: int
    items: np.ndarray
    fused_margins: np.ndarray | None = None
    loss: float | None = None
    gradient: np.ndarray | None = None
    skipped: str | None = None


@dataclass
class RouterTrainingResult:
    router: Router
    history: list[StepRecord] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [r.loss for r in self.history if r.loss is not None]

    @property
    def steps_taken(self) -> int:
        return sum(r.skipped is None for r in self.history)


# ---------------------------------------------------------------- schedule and optimizer


def batch_schedule(
    n_items: int, config: RouterTrainingConfig, parameters: int, clients: int
) -> list[np.ndarray]:
    """The batches of a run: up to `limits.item_uses` passes over a seeded permutation of the
    items, B per batch (a pass's remainder is left out), at most `steps` batches. Raises
    RouterTrainingError if the release budget forbids the batch size for this router."""
    limits = config.limits
    try:
        limits.check(config.batch_size, parameters, clients)
    except ValueError as err:
        raise RouterTrainingError(f"release budget: {err}") from err
    per_pass = n_items // config.batch_size
    if per_pass < 1:
        raise RouterTrainingError(f"{n_items} calibration items cannot fill one batch of {config.batch_size}")
    rng = np.random.default_rng(config.seed)
    batches: list[np.ndarray] = []
    for _ in range(limits.item_uses):
        order = rng.permutation(n_items)
        batches += [np.sort(order[j * config.batch_size : (j + 1) * config.batch_size]) for j in range(per_pass)]
    return batches[: config.steps]


class _Optimizer:
    """torch's Adam or SGD (with momentum) over the router's parameters, stepped with a flat gradient."""

    def __init__(self, router: Router, config: RouterTrainingConfig) -> None:
        self.router, self.size = router, parameter_count(router.config)
        lr = config.learning_rate
        self.torch = (torch.optim.Adam(router.parameters(), lr=lr, eps=config.adam_eps) if config.optimizer == "adam"
                      else torch.optim.SGD(router.parameters(), lr=lr, momentum=config.momentum))  # fmt: skip

    def step(self, gradient: np.ndarray) -> None:
        g = np.asarray(gradient, dtype=np.float64)
        if g.shape != (self.size,) or not np.all(np.isfinite(g)):
            raise RouterTrainingError(f"gradient must be finite of shape {(self.size,)}, got {g.shape}")
        load_flat_gradients(self.router, g)
        self.torch.step()


def _check_inputs(router: Router, features: np.ndarray, objective_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(features, dtype=np.float64)
    o = np.asarray(objective_ids, dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != router.config.feature_dim or o.shape != (len(x),):
        raise RouterTrainingError(f"features {x.shape} / objective ids {o.shape} do not match the router")
    router.weights(x[:1], o[:1])  # validates ranges
    return x, o


# ---------------------------------------------------------------- the secure trainer


def _every_client(rounds: SecureRound, replies: Mapping[str, bytes], expected: Expected, items: list[bytes]
                  ) -> tuple[list[ClientReply] | None, str]:
    """The verified replies (committing to the batch's `items`) in router column order, or None
    and the reason (a column is missing)."""
    good, problems = rounds.verify(replies, expected, {c: items for c in rounds.clients})
    missing = [c for c in rounds.clients if c not in good]
    if missing or problems:
        return None, f"missing {missing}; refused: {problems}"
    return list(good.values()), ""


def train_router_securely(
    router: Router,
    features: np.ndarray,
    objective_ids: np.ndarray,
    *,
    rounds: SecureRound,
    get_encrypted_margins: MarginTransport,
    get_encrypted_gradients: GradientTransport,
    config: RouterTrainingConfig | None = None,
    start_step: int = 0,
) -> RouterTrainingResult:
    """Train `router` (in place) on the public calibration features with the clients' margins,
    seeing only fused margins and summed gradients (module docstring). `rounds.clients` lists the
    client ids in router column order; `rounds.run_id` is this training's run id.

    start_step: the first authority step number (steps must grow per run id and purpose).
    The item budget is per call: a second call over the same calibration items spends it
    again, which the clients' persisted ItemUseLimiter and the key authority refuse."""
    config = config or RouterTrainingConfig()
    x, o = _check_inputs(router, features, objective_ids)
    k, p = router.config.num_clients, parameter_count(router.config)
    clients = list(rounds.clients)
    if len(clients) != k or len(set(clients)) != k:
        raise RouterTrainingError(f"need {k} distinct client ids in router column order, got {clients}")
    if router.config.w_min < rounds.w_min:
        raise RouterTrainingError(f"the router's floor {router.config.w_min} is below the authority's {rounds.w_min}")
    optimizer = _Optimizer(router, config)
    result = RouterTrainingResult(router)
    run_id = rounds.run_id
    for offset, items in enumerate(batch_schedule(len(x), config, p, k)):
        step, record = start_step + offset, StepRecord(start_step + offset, items)
        result.history.append(record)
        b = len(items)
        weights = router.weights(x[items], o[items])
        digests = calibration_digests(items.tolist())
        nonce = new_nonce()
        replies, why = _every_client(rounds, get_encrypted_margins(rounds.fields(step, nonce), items.copy()),
                                     Expected(run_id, step, nonce, "reward", b), digests)  # fmt: skip
        if replies is None:
            record.skipped = f"margin round: {why}"
            continue
        record.fused_margins = rounds.release(replies, weights, "reward", step, nonce, [digests] * len(replies))
        record.loss = bt_loss(config.sharpness * record.fused_margins)
        bound = rounds.release_config.value_bound
        coefficients = bt_coefficients(np.clip(config.sharpness * record.fused_margins, -bound, bound))
        nonce = new_nonce()
        query = GradientQuery(step, nonce, router.state(), items.copy(), x[items], o[items], coefficients,
                              config.gradient_scale)
        replies, why = _every_client(rounds, get_encrypted_gradients(rounds.fields(step, nonce), query),
                                     Expected(run_id, step, nonce, "router_gradient", p), digests)  # fmt: skip
        if replies is None:
            record.skipped = f"gradient round: {why}"
            continue
        released = rounds.release(replies, None, "router_gradient", step, nonce)
        record.gradient = released * config.sharpness / config.gradient_scale
        optimizer.step(record.gradient)
    return result


# ---------------------------------------------------------------- the plaintext reference (INSECURE)


def train_router_plaintext(
    router: Router,
    features: np.ndarray,
    objective_ids: np.ndarray,
    margins: np.ndarray,
    config: RouterTrainingConfig | None = None,
) -> RouterTrainingResult:
    """INSECURE reference trainer: it reads every client's plaintext margins [N, K]. For tests
    (the secure path must reach the same parameters) and ablations only; never in a deployment.

    Same schedule and optimizer as `train_router_securely`, but the gradient comes from
    autograd on the Bradley-Terry loss itself, not from the per-client decomposition."""
    config = config or RouterTrainingConfig()
    x, o = _check_inputs(router, features, objective_ids)
    d = np.asarray(margins, dtype=np.float64)
    k = router.config.num_clients
    if d.shape != (len(x), k) or not np.all(np.isfinite(d)):
        raise RouterTrainingError(f"margins must be finite of shape ({len(x)}, {k}), got {d.shape}")
    optimizer = _Optimizer(router, config)
    result = RouterTrainingResult(router)
    for offset, items in enumerate(batch_schedule(len(x), config, parameter_count(router.config), k)):
        record = StepRecord(offset, items)
        router.zero_grad(set_to_none=True)
        fused = (router(x[items], o[items]) * torch.as_tensor(d[items])).sum(dim=1)
        loss = torch.nn.functional.softplus(-config.sharpness * fused).mean()
        loss.backward()
        record.fused_margins = fused.detach().numpy().copy()
        record.loss = float(loss.detach())
        record.gradient = flatten_gradients(router)
        optimizer.step(record.gradient)
        result.history.append(record)
    return result


# ---------------------------------------------------------------- exposure analysis (audit helper)


def weight_jacobian(router: Router, features: np.ndarray, objective_ids: np.ndarray) -> np.ndarray:
    """dw_ik / dtheta for every item and client: float64 [B, K, P] (the documented order)."""
    names = [name for name, _ in parameter_layout(router.config)]
    params = {name: p.detach() for name, p in router.named_parameters()}
    buffers = {name: b for name, b in router.named_buffers()}
    x = torch.as_tensor(np.asarray(features, dtype=np.float64))
    ids = torch.as_tensor(np.asarray(objective_ids, dtype=np.int64))

    def weights_of(theta: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(router, {**theta, **buffers}, (x, ids))

    jac = torch.func.jacrev(weights_of)(params)
    b, k = len(x), router.config.num_clients
    return torch.cat([jac[name].reshape(b, k, -1) for name in names], dim=2).numpy()


def release_functionals(
    router: Router, features: np.ndarray, objective_ids: np.ndarray, coefficients: np.ndarray
) -> np.ndarray:
    """The linear map from a batch's private margins D (B x K, flattened row-major) to what one
    step releases: B fused margins, then P summed gradient values. [(B + P), B * K]. The server
    knows every coefficient of it, which is why its rank matters."""
    w = router.weights(features, objective_ids)
    b, k = w.shape
    jac = weight_jacobian(router, features, objective_ids)  # [B, K, P]
    margin_rows = np.zeros((b, b * k))
    for i in range(b):
        margin_rows[i, i * k : (i + 1) * k] = w[i]
    c = np.asarray(coefficients, dtype=np.float64)
    gradient_rows = (c[:, None, None] * jac).reshape(b * k, -1).T  # [P, B*K]
    return np.vstack([margin_rows, gradient_rows])


def coordinate_leverage(functionals: np.ndarray, rtol: float = 1e-9) -> np.ndarray:
    """For each unknown margin, the squared norm of its unit vector's projection onto the row
    space of the released functionals: 1 means the released values determine it exactly
    (up to the release noise), 0 that they say nothing about it in isolation."""
    a = np.asarray(functionals, dtype=np.float64)
    if a.ndim != 2:
        raise RouterError("functionals must be a 2-D matrix")
    # torch's SVD: numpy's multi-threaded OpenBLAS is pathologically slow on a busy 2-core machine.
    _, s, vt = torch.linalg.svd(torch.as_tensor(a), full_matrices=False)
    s, vt = s.numpy(), vt.numpy()
    rank = int(np.sum(s > rtol * (s[0] if len(s) else 0.0)))
    return np.sum(vt[:rank] ** 2, axis=0)


def released_budget(config: RouterTrainingConfig, router: Router) -> dict[str, float]:
    """The counting rule's numbers for a run, for reports: values released per step, unknown
    margins per batch, and their ratio times the item uses."""
    b, p, k = config.batch_size, parameter_count(router.config), router.config.num_clients
    uses = config.limits.item_uses
    return {"batch": b, "parameters": p, "clients": k, "item_uses": uses,
            "released_per_step": b + p, "unknown_per_batch": b * k, "ratio": uses * (b + p) / (b * k)}

