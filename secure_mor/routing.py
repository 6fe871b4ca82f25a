"""The Mixture-of-Rewards router, shared by the server and the clients.

The router g(x, o) maps public features x of an item (the server's choice, pinned at setup: the
question family one-hot, or the pooled prompt features of the starting policy) and an
alignment objective o to weights over the K clients' rewards:

    z = g_theta(x, o) in R^K,   w = w_min + (1 - K w_min) softmax(z),

so every row lies on the simplex and every weight is >= w_min (the key
authority refuses any fusion whose weights break either rule).

Network (float64 throughout, so the server and every client compute the same
numbers and the CKKS precision is the only source of disagreement)::

    u = (x - input_mean) @ input_projection         fixed, public, not trained
    e = objective_embedding[o]                       trained
    h = tanh(hidden(concat(u, e)))                   trained; a small MLP when hidden > 0
    z = out(h)          (hidden == 0: z = out(concat(u, e)), a linear gate)

`input_mean` and `input_projection` are buffers the server fits on the public
calibration features (`Router.fit_input_projection`: PCA to `input_dim`
dimensions, whitened, or plain standardisation when `input_dim` is None). They
are public and travel with the parameters in a `RouterState`, but they are not
trained and have no gradient.

Default size. The release budget below caps P at roughly B (max_release_ratio K - 1)
per batch of B, and each calibration item serves in one step only, so the
router must learn from a few disjoint batches. Measured on the tiny policy's
features of 1,477 easy-VQA calibration pairs (synthetic clients, each right on
one question family; 15 steps of B = 96): the linear gate on 32 whitened PCA
directions (P = 119 with two objectives) puts 0.73-0.89 on the right client
per family and 0.96 for a "style" objective; an MLP on 16 directions with
H = 4 (P = 107) only 0.59-0.72. Hence the default hidden = 0, input_dim = 32
(the family signal of those features lies beyond the first 8 principal
directions: nearest-centroid accuracy 0.68 with 8, 0.86 with 16, 0.98 with 32).

Parameter flattening (`parameter_layout`, `flatten_parameters`,
`unflatten_parameters`): the trainable tensors in `Router.named_parameters()`
order, i.e.

    objective_embedding.weight [O, E], hidden.weight [H, D_in + E], hidden.bias [H],
    out.weight [K, H], out.bias [K]                  (hidden == 0: out.weight [K, D_in + E])

each flattened row-major (C order) and concatenated into one float64 vector of
P = `parameter_count(config)` values. Gradients use the same order.

Training without seeing any client's scores (docs/architecture.md). For calibration pairs
i = 1..B with client k's private margin d_ik = clip(R_k(chosen_i) -
R_k(rejected_i), -R, R), fused margin m_i = sum_k w_ik d_ik and the
Bradley-Terry loss L = -(1/B) sum_i log sigmoid(m_i),

    dL/dtheta = sum_k G_k,   G_k = sum_i c_i d_ik dw_ik/dtheta,   c_i = -(1/B) (1 - sigmoid(m_i)).

(The server may take the loss of s m_i, s > 0: then c_i = -(1/B) sigmoid(-s m_i), clipped into the same
range, and dL/dtheta = s sum_k G_k; server/router_training.py.)

The coefficients c_i depend only on the fused margins (a normal fused release),
so client k computes its own term G_k (`client_gradient_term`), encrypts it, and
the key authority decrypts only the sum over clients. See
`secure_mor.server.router_training` for the protocol.

Leakage (what the releases reveal about the clients' margins). Every release is
a linear function of the unknown margin matrix D (B x K) with coefficients the
server knows: the fused margins give B functionals (one per item, by design),
the summed parameter gradient P more. Hence:

* Per-item logit gradients sum_k c_i d_ik dw_ik/dz_i are never released: with
  the fused margins they give K independent equations per item and every d_ik
  can be solved for exactly (tests/test_router_privacy.py demonstrates it).
  Only the parameter gradient, summed over items and clients, is released.
* A release of B + P functionals about B * K unknowns is solvable once
  B + P >= B * K, and releases about the *same* items accumulate: a router whose
  weights change between steps, fused over the same calibration items K times,
  identifies every margin from the fused margins alone. So (a) the router is
  kept small (P well below B (K - 1)), (b) each calibration item takes part in
  a bounded number of steps (default: one, over every run id of the key
  authority's context), and (c) clients refuse queries that break the counting
  rule (`QueryLimits`): uses * (B + P) <= max_release_ratio * B * K.
  The rule is necessary, not sufficient, for non-identifiability; the tests
  measure the actual per-coordinate leverage of what is released.
* The counting rule bounds the average exposure, not each item's: the most
  exposed margin of a batch (largest leverage, `coordinate_leverage`) measured
  0.77 for a linear gate on 6 standardised features (P = 37, B = 128, K = 3) and
  0.96 for an MLP with H = 8 (P = 119), output weights of std 0.1. For route-by prompt
  (linear gate on 32 PCA directions, two objectives, P = 119; B = 96,
  tests/test_router_privacy.py): 0.83-0.88 at a near-uniform router (output
  weights of std 0.01; least-squares recovery of the margins, std 2, with the
  release noise: median error 0.9-1.0), 0.95-0.98 at std 0.1, and 1.000 for a
  confident router (std 1.0): 43% of the batch's margins then come out within
  0.1. (Under the main job's route-by family, P = 32 and dw_ik/dtheta
  is the same for every item of one family and objective, so a gradient release is a linear function of
  each client's per-(family, objective) sums of c_i d_ik: it cannot single out one item of a group.)
  Router training hides the margins of a confident router poorly, even
  from an honest server; it is confidentiality of a weak kind, bounded by the
  DP guarantee of the models below.
* A deviating server's queries. Every client pins the public router parts and
  calibration features at setup (`RouterSetup`) and refuses a query that
  differs from them, coefficients outside `coefficient_range` (c_i = 0
  included) and a scale above `QueryLimits.max_scale` (`check_query`); its
  reply commits to the query's digest and the key authority sums only replies
  that answer one query over the step's margin items. What remains is the
  server's choice of theta and of c within the range, which spans a factor
  e^R = 2.2e4: giving 20 items the largest coefficient and the rest the
  smallest concentrates a default step's gradient on them and recovers all
  K margins of those 20 pairs within 2.5e-3 (measured, same test file). The
  clients cannot check c against the fused margins, which only the server
  can unmask.
* The fused margins themselves: once the router is confident, a row such as
  (1 - (K-1) w_min, w_min, ...) makes m_i the dominant client's margin up to
  (K-1) w_min R / (1 - (K-1) w_min) (0.42 at w_min = 0.02, R = 10, K = 3;
  0.20 over k_min = 2 contributors; crypto.params.min_score_half_width). This
  holds for every fused release, GRPO rewards included: the floor w_min, not
  the encryption, bounds what one fused value hides about its dominant client.
* This is confidentiality of the evaluation signal, not differential privacy:
  the clients' training data is protected by DP-SGD, and any function of the
  DP-trained reward models (scores, margins, these gradients) is
  post-processing that costs no further budget.
* Clients receive the coefficients c_i, hence the fused margins m_i. With K = 2
  client k can then solve for the other client's margins (m_i - w_ik d_ik);
  with K >= 3 it learns one weighted sum of the others' margins per item.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from secure_mor.crypto.fusion import WeightError, validate_weights
from secure_mor.crypto.params import DEFAULT_W_MIN
from secure_mor.protocol import Payload, ProtocolError, array_bytes, bytes_array

DTYPE = torch.float64


class RouterError(ValueError):
    """A router configuration, state or weight matrix is invalid."""


class RouterQueryError(ValueError):
    """A client refuses a router-gradient query: it would release too much about its margins."""


# ---------------------------------------------------------------- configuration


@dataclass(frozen=True)
class RouterConfig:
    """Shape of the gating network.

    feature_dim: D, the width of the router's input features (pooled prompt features or a family one-hot);
    objectives: the objective names, in embedding-row order;
    num_clients: K, the number of reward models (router columns, in client order);
    hidden: H, the hidden width (0: a linear router);
    objective_dim: E, the width of the learned objective embedding;
    input_dim: D_in, the public PCA projection's width, capped at D (None: D, standardised only);
    w_min: the floor every weight keeps (the key authority's w_min, which it announces at setup);
    seed: initialisation seed.
    """

    feature_dim: int
    objectives: tuple[str, ...]
    num_clients: int
    hidden: int = 0
    objective_dim: int = 4
    input_dim: int | None = 32
    w_min: float = DEFAULT_W_MIN
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "objectives", tuple(self.objectives))
        if self.feature_dim < 1 or self.num_clients < 1 or self.hidden < 0 or self.objective_dim < 1:
            raise RouterError(f"invalid router sizes: {self}")
        if not self.objectives or len(set(self.objectives)) != len(self.objectives):
            raise RouterError(f"objectives must be distinct and non-empty, got {self.objectives}")
        if self.input_dim is not None and self.input_dim < 1:
            raise RouterError(f"input_dim must be >= 1 or None, got {self.input_dim}")
        if not (0.0 <= self.w_min < 1.0 / self.num_clients):
            raise RouterError(f"w_min={self.w_min} must lie in [0, 1/K) = [0, {1 / self.num_clients:.4g})")

    @property
    def projected_dim(self) -> int:
        return self.feature_dim if self.input_dim is None else min(self.input_dim, self.feature_dim)

    def objective_id(self, name: str) -> int:
        try:
            return self.objectives.index(name)
        except ValueError as err:
            raise RouterError(f"unknown objective {name!r}; known: {list(self.objectives)}") from err

    def objective_ids(self, names: Sequence[str]) -> np.ndarray:
        return np.array([self.objective_id(n) for n in names], dtype=np.int64)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "objectives": list(self.objectives)}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> RouterConfig:
        return cls(**{**raw, "objectives": tuple(raw["objectives"])})


def parameter_layout(config: RouterConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every trainable tensor, in flattening order."""
    d_in, e, h, k = config.projected_dim, config.objective_dim, config.hidden, config.num_clients
    layout = [("objective_embedding.weight", (len(config.objectives), e))]
    if h:
        layout += [("hidden.weight", (h, d_in + e)), ("hidden.bias", (h,)), ("out.weight", (k, h))]
    else:
        layout += [("out.weight", (k, d_in + e))]
    return [*layout, ("out.bias", (k,))]


def parameter_count(config: RouterConfig) -> int:
    return int(sum(np.prod(shape) for _, shape in parameter_layout(config)))


# ---------------------------------------------------------------- weights


def simplex_weights(logits: torch.Tensor, w_min: float) -> torch.Tensor:
    """w = w_min + (1 - K w_min) softmax(z), row-wise (differentiable)."""
    k = logits.shape[-1]
    return w_min + (1.0 - k * w_min) * torch.softmax(logits, dim=-1)


# ---------------------------------------------------------------- the network


class Router(nn.Module):
    """The gating network g(x, o) -> N x K weights (see the module docstring)."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        d, d_in, e, h, k = (config.feature_dim, config.projected_dim, config.objective_dim, config.hidden,
                            config.num_clients)
        generator = torch.Generator().manual_seed(config.seed)
        self.register_buffer("input_mean", torch.zeros(d, dtype=DTYPE))
        self.register_buffer("input_projection", torch.eye(d, d_in, dtype=DTYPE))
        self.objective_embedding = nn.Embedding(len(config.objectives), e, dtype=DTYPE)
        self.hidden = nn.Linear(d_in + e, h, dtype=DTYPE) if h else None
        self.out = nn.Linear(h or d_in + e, k, dtype=DTYPE)
        with torch.no_grad():
            self.objective_embedding.weight.normal_(0.0, 1.0, generator=generator)
            if self.hidden is not None:
                bound = 1.0 / np.sqrt(d_in + e)
                self.hidden.weight.uniform_(-bound, bound, generator=generator)
                self.hidden.bias.zero_()
            # Small output layer: the router starts near uniform fusion.
            self.out.weight.normal_(0.0, 0.01, generator=generator)
            self.out.bias.zero_()

    # -- inputs

    def fit_input_projection(self, features: np.ndarray) -> Router:
        """Fit the public input normalisation on public features (the calibration set's):
        centre, then PCA to `input_dim` whitened directions (or standardise when input_dim
        is None). Deterministic (signs fixed)."""
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.config.feature_dim or len(x) < 2 or not np.all(np.isfinite(x)):
            raise RouterError(f"need finite features of shape (N >= 2, {self.config.feature_dim}), got {x.shape}")
        mean = x.mean(axis=0)
        centred = x - mean
        if self.config.input_dim is None:
            projection = np.diag(1.0 / np.maximum(centred.std(axis=0), 1e-8))
        else:
            # torch's SVD (one thread): numpy's threaded OpenBLAS crawls on a busy 2-core machine.
            _, s, vt = (t.numpy() for t in torch.linalg.svd(torch.as_tensor(centred), full_matrices=False))
            d_in = self.config.projected_dim
            components = np.zeros((d_in, x.shape[1]))
            rank = min(d_in, len(s))
            components[:rank] = vt[:rank]
            signs = np.sign(components[np.arange(d_in), np.argmax(np.abs(components), axis=1)])
            components *= np.where(signs == 0, 1.0, signs)[:, None]
            scale = np.zeros(d_in)
            scale[:rank] = np.sqrt(len(x) - 1) / np.maximum(s[:rank], 1e-8)
            projection = components.T * scale[None, :]
        with torch.no_grad():
            self.input_mean.copy_(torch.as_tensor(mean, dtype=DTYPE))
            self.input_projection.copy_(torch.as_tensor(projection, dtype=DTYPE))
        return self

    def _inputs(self, features: np.ndarray | torch.Tensor, objective_ids: np.ndarray | torch.Tensor):
        x = torch.as_tensor(np.asarray(features, dtype=np.float64)) if not torch.is_tensor(features) else features
        o = torch.as_tensor(np.asarray(objective_ids, dtype=np.int64)) if not torch.is_tensor(objective_ids) \
            else objective_ids
        x, o = x.to(DTYPE), o.to(torch.int64)
        if x.ndim != 2 or x.shape[1] != self.config.feature_dim:
            raise RouterError(f"features must be (N, {self.config.feature_dim}), got {tuple(x.shape)}")
        if o.shape != (x.shape[0],):
            raise RouterError(f"objective ids must be ({x.shape[0]},), got {tuple(o.shape)}")
        if len(o) and (int(o.min()) < 0 or int(o.max()) >= len(self.config.objectives)):
            raise RouterError(f"objective ids must lie in [0, {len(self.config.objectives)})")
        if not torch.isfinite(x).all():
            raise RouterError("features contain NaN or infinity")
        return x, o

    # -- forward

    def logits(self, features: np.ndarray | torch.Tensor, objective_ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        x, o = self._inputs(features, objective_ids)
        u = (x - self.input_mean) @ self.input_projection
        h = torch.cat([u, self.objective_embedding(o)], dim=1)
        if self.hidden is not None:
            h = torch.tanh(self.hidden(h))
        return self.out(h)

    def forward(self, features: np.ndarray | torch.Tensor, objective_ids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """N x K weights (differentiable): rows on the simplex, every entry >= w_min."""
        return simplex_weights(self.logits(features, objective_ids), self.config.w_min)

    def weights(self, features: np.ndarray, objective_ids: np.ndarray) -> np.ndarray:
        """N x K float64 weights, no gradient, checked valid."""
        with torch.no_grad():
            w = self(features, objective_ids).numpy().astype(np.float64)
        try:  # the one check of W, as the key authority applies it (crypto.fusion)
            return validate_weights(w, *w.shape, self.config.w_min)
        except WeightError as err:
            raise RouterError(str(err)) from err

    # -- state

    def flat_parameters(self) -> np.ndarray:
        return flatten_parameters(self)

    def load_flat_parameters(self, theta: np.ndarray) -> Router:
        unflatten_parameters(self, theta)
        return self

    def state(self) -> RouterState:
        return RouterState(
            self.config,
            self.flat_parameters(),
            {name: buf.detach().numpy().copy() for name, buf in self.named_buffers()},
        )

    @classmethod
    def from_state(cls, state: RouterState) -> Router:
        router = cls(state.config)
        router.load_flat_parameters(state.theta)
        with torch.no_grad():
            for name, buf in router.named_buffers():
                if name not in state.buffers or state.buffers[name].shape != tuple(buf.shape):
                    raise RouterError(f"router state lacks buffer {name!r} of shape {tuple(buf.shape)}")
                value = np.asarray(state.buffers[name], dtype=np.float64)
                if not np.all(np.isfinite(value)):
                    raise RouterError(f"router buffer {name!r} is not finite")
                buf.copy_(torch.as_tensor(value))
        return router


def _check_layout(router: nn.Module, config: RouterConfig) -> list[nn.Parameter]:
    params = list(router.named_parameters())
    expected = parameter_layout(config)
    got = [(name, tuple(p.shape)) for name, p in params]
    if got != expected:
        raise RouterError(f"router parameters {got} differ from the documented layout {expected}")
    return [p for _, p in params]


def flatten_parameters(router: Router) -> np.ndarray:
    """The trainable parameters as one float64 vector in the documented order."""
    params = _check_layout(router, router.config)
    return torch.cat([p.detach().reshape(-1) for p in params]).numpy().astype(np.float64)


def flatten_gradients(router: Router) -> np.ndarray:
    """The parameters' .grad in the same order (zeros where a gradient is None)."""
    params = _check_layout(router, router.config)
    return torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1) for p in params]
    ).numpy().astype(np.float64)


def load_flat_gradients(router: Router, gradient: np.ndarray) -> None:
    """Set the parameters' .grad from one flat vector in the documented order (e.g. a released sum of the
    clients' gradients), for a torch optimizer's step."""
    params = _check_layout(router, router.config)
    for p, value in zip(params, unflatten(gradient, parameter_layout(router.config)).values(), strict=True):
        p.grad = torch.as_tensor(value, dtype=DTYPE).clone()


def unflatten(vector: np.ndarray, layout: Sequence[tuple[str, tuple[int, ...]]]) -> dict[str, np.ndarray]:
    """Split a flat vector into named arrays of the given shapes (RouterError on a size mismatch)."""
    v = np.asarray(vector, dtype=np.float64)
    total = int(sum(np.prod(shape) for _, shape in layout))
    if v.shape != (total,):
        raise RouterError(f"flat vector has shape {v.shape}, layout needs ({total},)")
    out, offset = {}, 0
    for name, shape in layout:
        size = int(np.prod(shape))
        out[name] = v[offset : offset + size].reshape(shape)
        offset += size
    return out


def unflatten_parameters(router: Router, theta: np.ndarray) -> None:
    """Load a flat parameter vector into the router (in place)."""
    params = _check_layout(router, router.config)
    pieces = unflatten(theta, parameter_layout(router.config))
    if not all(np.all(np.isfinite(p)) for p in pieces.values()):
        raise RouterError("router parameters are not finite")
    with torch.no_grad():
        for p, value in zip(params, pieces.values(), strict=True):
            p.copy_(torch.as_tensor(value, dtype=DTYPE))


@dataclass(frozen=True)
class RouterState:
    """What the server sends the clients: configuration, flat parameters, public buffers."""

    config: RouterConfig
    theta: np.ndarray
    buffers: dict[str, np.ndarray] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        """A portable encoding (npz without pickles; the configuration as JSON)."""
        buffer = io.BytesIO()
        arrays = {"theta": np.asarray(self.theta, dtype="<f8")}
        arrays.update({f"buffer:{k}": np.asarray(v, dtype="<f8") for k, v in self.buffers.items()})
        config = np.frombuffer(json.dumps(self.config.to_json(), sort_keys=True).encode(), dtype=np.uint8)
        np.savez(buffer, config=config, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> RouterState:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                config = RouterConfig.from_json(json.loads(npz["config"].tobytes().decode()))
                theta = npz["theta"].astype(np.float64)
                buffers = {k.removeprefix("buffer:"): npz[k].astype(np.float64) for k in npz.files
                           if k.startswith("buffer:")}
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise RouterError(f"router state does not decode: {err}") from err
        if theta.shape != (parameter_count(config),):
            raise RouterError(f"router state holds {theta.shape} parameters, config needs {parameter_count(config)}")
        return cls(config, theta, buffers)


def _digest(*parts: bytes) -> str:
    """SHA-256 hex of length-prefixed parts (no two part lists share a digest)."""
    h = hashlib.sha256()
    for part in parts:
        h.update(len(part).to_bytes(8, "big") + part)
    return h.hexdigest()


def _array_bytes(array: np.ndarray) -> bytes:
    """An array's dtype, shape and little-endian bytes: what its digest covers."""
    a = np.ascontiguousarray(array)
    a = a.astype(a.dtype.newbyteorder("<"))
    return f"{a.dtype.str}{a.shape}".encode() + a.tobytes()


def _config_bytes(config: RouterConfig) -> bytes:
    return json.dumps(config.to_json(), sort_keys=True).encode()


def _buffer_parts(buffers: Mapping[str, np.ndarray]) -> list[bytes]:
    return [part for name in sorted(buffers) for part in (name.encode(), _array_bytes(buffers[name]))]


@dataclass(frozen=True)
class RouterSetup:
    """What a router training commits to before its first step, and every client pins for the
    key authority's context (`router_setup`, logged): the router's configuration (w_min included),
    its public input normalisation, and the public features and objective ids of every
    calibration pair. A gradient query must agree with it (`check_query`): the server cannot
    craft per-step features, normalisations or routers of another shape for one client or step."""

    config: RouterConfig
    buffers: dict[str, np.ndarray]
    features: np.ndarray  # [N calibration pairs, feature_dim]
    objective_ids: np.ndarray  # [N]

    @classmethod
    def of(cls, router: Router, features: np.ndarray, objective_ids: np.ndarray) -> RouterSetup:
        state = router.state()
        return cls(state.config, state.buffers, np.asarray(features, dtype=np.float64),
                   np.asarray(objective_ids, dtype=np.int64))  # fmt: skip

    @property
    def digest(self) -> str:
        return _digest(b"router-setup v1", _config_bytes(self.config), *_buffer_parts(self.buffers),
                       _array_bytes(self.features), _array_bytes(self.objective_ids))  # fmt: skip

    def to_bytes(self) -> bytes:
        buffer = io.BytesIO()
        config = np.frombuffer(_config_bytes(self.config), dtype=np.uint8)
        arrays = {f"buffer:{k}": np.asarray(v, dtype="<f8") for k, v in self.buffers.items()}
        np.savez(buffer, config=config, features=np.asarray(self.features, dtype="<f8"),
                 objective_ids=np.asarray(self.objective_ids, dtype="<i8"), **arrays)  # fmt: skip
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> RouterSetup:
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as npz:
                config = RouterConfig.from_json(json.loads(npz["config"].tobytes().decode()))
                buffers = {k.removeprefix("buffer:"): npz[k].astype(np.float64) for k in npz.files
                           if k.startswith("buffer:")}
                return cls(config, buffers, npz["features"].astype(np.float64), npz["objective_ids"].astype(np.int64))
        except (ValueError, KeyError, TypeError, OSError) as err:
            raise RouterError(f"router setup does not decode: {err}") from err

    def validate(self, pairs: int) -> None:
        """A client's checks before it pins the setup: one finite feature row and a known objective
        per calibration pair, and the public normalisation the features determine (whitened PCA, or
        standardisation when input_dim is None: `Router.fit_input_projection`), not one of the server's choosing."""
        x, o = self.features, self.objective_ids
        if x.shape != (pairs, self.config.feature_dim) or o.shape != (pairs,) or not np.all(np.isfinite(x)):
            raise RouterQueryError(f"the router setup holds features {x.shape} and objectives {o.shape} for the "
                                   f"{pairs} calibration pairs of dimension {self.config.feature_dim}")  # fmt: skip
        if len(o) and (o.min() < 0 or o.max() >= len(self.config.objectives)):
            raise RouterQueryError("the router setup names an unknown objective")
        fitted = Router(self.config).fit_input_projection(x).state().buffers
        if fitted.keys() != self.buffers.keys() or not all(
            np.allclose(self.buffers[k], fitted[k], rtol=1e-9, atol=1e-12) for k in fitted
        ):
            raise RouterQueryError("the router setup's input normalisation is not the one its features determine")


# ---------------------------------------------------------------- the client's gradient term


def bt_coefficients(fused_margins: np.ndarray) -> np.ndarray:
    """c_i = -(1/B) (1 - sigmoid(m_i)) = -(1/B) sigmoid(-m_i): dL/dm_i of the mean BT loss."""
    m = np.asarray(fused_margins, dtype=np.float64)
    return -np.exp(-np.logaddexp(0.0, m)) / len(m)


def bt_loss(fused_margins: np.ndarray) -> float:
    """-(1/B) sum_i log sigmoid(m_i)."""
    return float(np.mean(np.logaddexp(0.0, -np.asarray(fused_margins, dtype=np.float64))))


# Every client's margins are divided by this (the same public constant for all): the router's
# Bradley-Terry loss then sees margins in units of MARGIN_TEMPERATURE. At 1 the loss saturates on
# the pairs every client gets right (most of them), so the router learnt no more than "avoid the
# worst client": measured (plaintext, the clients' real margins, 15 steps of 96), the colour
# specialist got 0.35 of the colour questions' weight at temperature 1 and 0.68 at 5 (shape and
# presence specialists 0.78 / 0.94 and 0.76 / 0.90). This fixes what the clients release (within R); the
# server's loss then multiplies the fused margin by RouterTrainingConfig.sharpness (10 in the main job).
MARGIN_TEMPERATURE = 5.0


def pair_margins(chosen_scores: np.ndarray, rejected_scores: np.ndarray, value_bound: float) -> np.ndarray:
    """A client's margins d = clip(R(chosen) - R(rejected), -R, R) / MARGIN_TEMPERATURE: what it
    encrypts (seal_reply clips to the bound R) and what it must use in its gradient term."""
    d = np.asarray(chosen_scores, dtype=np.float64) - np.asarray(rejected_scores, dtype=np.float64)
    if not np.all(np.isfinite(d)):
        raise ValueError("margins must be finite")
    return np.clip(d, -value_bound, value_bound) / MARGIN_TEMPERATURE


@dataclass(frozen=True)
class QueryLimits:
    """What a client checks before it computes and releases a gradient term.

    min_items: the smallest batch it contributes to;
    max_release_ratio: (B + P) * item_uses must stay <= ratio * B * K, where B + P is
    the number of values released per step (fused margins + summed gradient) and
    B * K the number of unknown margins of the batch (see the module docstring);
    item_uses: how many steps of router training an item may take part in, over every run id
    of the key authority's context (the server's schedule promises it; a client enforces it
    with `ItemUseLimiter`);
    max_scale: the largest scale a query may ask for (the release noise on G_k is sigma / scale:
    a larger scale would sharpen what the server learns, not what it needs).
    """

    min_items: int = 16
    max_release_ratio: float = 0.8
    item_uses: int = 1
    max_scale: float = 1.0

    def check(self, batch: int, parameters: int, clients: int) -> None:
        if batch < self.min_items:
            raise RouterQueryError(f"batch of {batch} items is below the minimum of {self.min_items}")
        released, unknown = self.item_uses * (batch + parameters), batch * clients
        if released > self.max_release_ratio * unknown:
            raise RouterQueryError(
                f"releasing {self.item_uses} x ({batch} fused margins + {parameters} gradient values) about "
                f"{batch} x {clients} private margins exceeds the ratio {self.max_release_ratio}: use a "
                f"smaller router or a larger batch"
            )


DEFAULT_QUERY_LIMITS = QueryLimits()


class ItemUseLimiter:
    """Client-side: counts in how many router steps each calibration item was used, over every
    run id of the key authority's context, and refuses a round that would exceed `max_uses` (a
    client cannot be made to release the same items' margins under many different weightings,
    in one run or in several). Both rounds of one step (margins, then gradients) name the same
    run, step and items and count once."""

    def __init__(self, max_uses: int = 1) -> None:
        self.max_uses = max_uses
        self.uses: dict[int, int] = {}
        self.steps: dict[tuple[str, int], tuple[int, ...]] = {}

    def admit(self, run_id: str, step: int, items: Sequence[int]) -> None:
        batch, key = tuple(int(i) for i in items), (str(run_id), int(step))
        if key in self.steps:
            if self.steps[key] != batch:
                raise RouterQueryError(f"step {step} of run {run_id!r} was already asked about a different batch")
            return
        if len(set(batch)) != len(batch):
            raise RouterQueryError("a batch lists an item twice")
        over = [i for i in batch if self.uses.get(i, 0) >= self.max_uses]
        if over:
            raise RouterQueryError(f"{len(over)} item(s) already used {self.max_uses} time(s), e.g. {over[0]}")
        for i in batch:
            self.uses[i] = self.uses.get(i, 0) + 1
        self.steps[key] = batch

    def to_json(self) -> dict[str, Any]:
        return {"uses": {str(i): n for i, n in self.uses.items()},
                "steps": [[run, step, list(batch)] for (run, step), batch in self.steps.items()]}  # fmt: skip

    @classmethod
    def from_json(cls, max_uses: int, state: Mapping[str, Any]) -> ItemUseLimiter:
        limiter = cls(max_uses)
        limiter.uses = {int(i): int(n) for i, n in state.get("uses", {}).items()}
        limiter.steps = {(str(run), int(step)): tuple(batch) for run, step, batch in state.get("steps", [])}
        return limiter


@dataclass(frozen=True)
class GradientQuery:
    """What the server sends every client in a router step's gradient round.

    items: indices of the calibration pairs in the batch (the clients' margins are
    looked up by them); features, objective_ids: the batch's public inputs (those the clients
    pinned, `RouterSetup`); coefficients: c_i from the released fused margins; scale: each
    client releases scale * G_k (clipped to the authority's value bound otherwise, so the client
    checks the bound instead, `encode_gradient_term`)."""

    step: int
    nonce: str
    state: RouterState
    items: np.ndarray
    features: np.ndarray
    objective_ids: np.ndarray
    coefficients: np.ndarray
    scale: float = 1.0

    @property
    def digest(self) -> str:
        """What every client's gradient reply commits to (wire "query"): the key authority sums
        only replies that answer one and the same query."""
        arrays = [(self.state.theta, np.float64), (self.items, np.int64), (self.features, np.float64),
                  (self.objective_ids, np.int64), (self.coefficients, np.float64)]  # fmt: skip
        return _digest(
            b"router-query v1", str(int(self.step)).encode(), self.nonce.encode(), _config_bytes(self.state.config),
            *_buffer_parts(self.state.buffers), *(_array_bytes(np.asarray(a, dtype=t)) for a, t in arrays),
            float(self.scale).hex().encode(),
        )


def coefficient_range(batch: int, value_bound: float) -> tuple[float, float]:
    """[lo, hi] of c_i = -(1/B) sigmoid(-m_i) over fused margins |m_i| <= R (a fused margin is a
    convex combination of margins clipped to R): never 0, never beyond -(1/B)."""
    return -1.0 / (1.0 + math.exp(-value_bound)) / batch, -1.0 / (1.0 + math.exp(value_bound)) / batch


def client_gradient_term(
    router_state: RouterState,
    features: np.ndarray,
    objective_ids: np.ndarray,
    coefficients: np.ndarray,
    own_margins: np.ndarray,
    k: int,
) -> np.ndarray:
    """Client k's term G_k = sum_i c_i d_ik dw_ik/dtheta (float64, P values, the documented order).

    Only the parameter gradient, summed over the batch, is returned: never per-item or per-logit
    gradients. The client's policy checks are `check_query`'s."""
    config = router_state.config
    x = np.asarray(features, dtype=np.float64)
    d = np.asarray(own_margins, dtype=np.float64)
    c = np.asarray(coefficients, dtype=np.float64)
    batch = len(x)
    if not 0 <= k < config.num_clients:
        raise RouterQueryError(f"client column {k} is outside [0, {config.num_clients})")
    if d.shape != (batch,) or c.shape != (batch,):
        raise RouterQueryError(f"margins {d.shape} and coefficients {c.shape} must both be ({batch},)")
    if not (np.all(np.isfinite(d)) and np.all(np.isfinite(c))):
        raise RouterQueryError("margins and coefficients must be finite")
    router = Router.from_state(router_state)
    router.zero_grad(set_to_none=True)
    weights = router(x, objective_ids)
    objective = torch.sum(torch.as_tensor(c * d, dtype=DTYPE) * weights[:, k])
    objective.backward()
    return flatten_gradients(router)


def encode_gradient_term(term: np.ndarray, scale: float, value_bound: float) -> np.ndarray:
    """scale * G_k, refused (RouterQueryError) rather than silently clipped by seal_reply when
    a value exceeds the authority's value bound R."""
    scaled = float(scale) * np.asarray(term, dtype=np.float64)
    if not np.all(np.isfinite(scaled)):
        raise RouterQueryError("gradient term is not finite")
    worst = float(np.max(np.abs(scaled))) if scaled.size else 0.0
    if worst > value_bound:
        raise RouterQueryError(f"scaled gradient value {worst:.3g} exceeds the bound R={value_bound}: lower the scale")
    return scaled


def check_query(
    query: GradientQuery, setup: RouterSetup, *, value_bound: float, limits: QueryLimits = DEFAULT_QUERY_LIMITS
) -> None:
    """A client's checks of a gradient query (RouterQueryError): it agrees with the pinned setup
    (configuration, input normalisation, the pinned features and objectives of its items), its
    coefficients lie in `coefficient_range`, its scale in (0, max_scale], and the release stays
    within the counting rule."""
    state, items = query.state, np.asarray(query.items)
    if state.config != setup.config or state.buffers.keys() != setup.buffers.keys() or not all(
        np.array_equal(state.buffers[k], setup.buffers[k]) for k in setup.buffers
    ):
        raise RouterQueryError("the query's router configuration or input normalisation is not the pinned setup's")
    if items.ndim != 1 or len(items) == 0 or items.min() < 0 or items.max() >= len(setup.features):
        raise RouterQueryError(f"the query's items are not calibration pairs 0..{len(setup.features) - 1}")
    if not (np.array_equal(query.features, setup.features[items])
            and np.array_equal(query.objective_ids, setup.objective_ids[items])):  # fmt: skip
        raise RouterQueryError("the query's features or objectives are not the pinned ones of its items")
    lo, hi = coefficient_range(len(items), value_bound)
    c = np.asarray(query.coefficients, dtype=np.float64)
    slack = 1e-12 / len(items)
    if c.shape != items.shape or not np.all((c >= lo - slack) & (c <= hi + slack)):
        raise RouterQueryError(f"coefficients outside [{lo:.3g}, {hi:.3g}], the range of -(1/B) sigmoid(-m) for "
                               f"|m| <= R (none may be 0)")  # fmt: skip
    if not 0 < query.scale <= limits.max_scale:
        raise RouterQueryError(f"scale {query.scale:g} is outside (0, {limits.max_scale:g}]")
    limits.check(len(items), parameter_count(state.config), state.config.num_clients)


def answer_gradient_query(
    query: GradientQuery,
    margins_by_item: np.ndarray,
    k: int,
    *,
    value_bound: float,
    setup: RouterSetup,
    limits: QueryLimits = DEFAULT_QUERY_LIMITS,
) -> np.ndarray:
    """Client side, after admitting the query's items (`ItemUseLimiter`): all checks
    (`check_query`), then the values to encrypt (purpose "router_gradient").

    margins_by_item: the client's clipped margins for every calibration pair (indexed by item)."""
    check_query(query, setup, value_bound=value_bound, limits=limits)
    items = np.asarray(query.items, dtype=np.int64)
    margins = np.asarray(margins_by_item, dtype=np.float64)[items]
    term = client_gradient_term(query.state, query.features, query.objective_ids, query.coefficients, margins, k)
    return encode_gradient_term(term, query.scale, value_bound)


# ---------------------------------------------------------------- the query on the wire


def encode_gradient_query(query: GradientQuery) -> Payload:
    return {
        "step": int(query.step),
        "nonce": query.nonce,
        "state": query.state.to_bytes(),
        "items": array_bytes(np.asarray(query.items, dtype=np.int64)),
        "features": array_bytes(np.asarray(query.features, dtype=np.float64)),
        "objective_ids": array_bytes(np.asarray(query.objective_ids, dtype=np.int64)),
        "coefficients": array_bytes(np.asarray(query.coefficients, dtype=np.float64)),
        "scale": float(query.scale),
    }


def decode_gradient_query(payload: Mapping[str, Any]) -> GradientQuery:
    try:
        return GradientQuery(
            step=int(payload["step"]),
            nonce=str(payload["nonce"]),
            state=RouterState.from_bytes(bytes(payload["state"])),
            items=bytes_array(payload["items"]).astype(np.int64),
            features=bytes_array(payload["features"]).astype(np.float64),
            objective_ids=bytes_array(payload["objective_ids"]).astype(np.int64),
            coefficients=bytes_array(payload["coefficients"]).astype(np.float64),
            scale=float(payload["scale"]),
        )
    except KeyError as err:
        raise ProtocolError(f"gradient query lacks {err}") from err
