"""What router training reveals about the clients' private margins.

Every release is a linear function of the margin matrix D (B x K) with coefficients the
server knows, so the server's best attack is linear algebra: these tests run it. They show
why per-item logit gradients are never released, why a calibration item is used in one step
only, and why the router must stay small (the clients' QueryLimits)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from secure_mor.routing import (
    QueryLimits,
    Router,
    RouterConfig,
    RouterQueryError,
    bt_coefficients,
    client_gradient_term,
    coefficient_range,
    parameter_count,
)
from secure_mor.server.router_training import coordinate_leverage, release_functionals

torch.set_num_threads(1)
K, B, R, W_MIN = 3, 128, 10.0, 0.02
RELEASE_NOISE = 1e-5  # the key authority's flooding sigma


def _batch(seed: int = 0):
    rng = np.random.default_rng(seed)
    family = rng.integers(0, K, B)
    x = np.concatenate([np.eye(K)[family] + 0.3 * rng.normal(size=(B, K)), rng.normal(size=(B, 3))], axis=1)
    d = np.clip(rng.normal(0.0, 2.0, size=(B, K)), -R, R)
    return x, np.zeros(B, dtype=np.int64), d


def _router(x: np.ndarray, seed: int = 0, **kw) -> Router:
    config = RouterConfig(
        feature_dim=x.shape[1],
        objectives=("correctness",),
        num_clients=K,
        w_min=W_MIN,
        seed=seed,
        **{"input_dim": None, **kw},
    )
    router = Router(config).fit_input_projection(x)
    with torch.no_grad():  # a router some way into training, not at its near-uniform start
        router.out.weight.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(seed))
    return router


def _lstsq(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Minimum-norm least squares (torch, one thread: numpy's threaded OpenBLAS crawls here)."""
    return (
        torch.linalg.lstsq(torch.as_tensor(rows), torch.as_tensor(values)[:, None], driver="gelsd", rcond=1e-10)
        .solution[:, 0]
        .numpy()
    )


def _rank(rows: np.ndarray) -> int:
    return int(torch.linalg.matrix_rank(torch.as_tensor(rows)))


def _recover(rows: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The server's least-squares (minimum-norm) estimate of the margins from released values."""
    return _lstsq(rows, values).reshape(B, K)


def test_per_item_logit_gradients_would_reveal_every_margin() -> None:
    """Fused margins + per-item logit gradients sum_k c_i d_ik dw_ik/dz_i: K equations per item."""
    x, o, d = _batch()
    router = _router(x)
    w = router.weights(x, o)
    m = (w * d).sum(axis=1)
    c = bt_coefficients(m)
    s = (w - W_MIN) / (1 - K * W_MIN)  # the softmax
    jacobians = (1 - K * W_MIN) * (np.einsum("ij,jk->ijk", s, np.eye(K)) - np.einsum("ij,ik->ijk", s, s))
    logit_gradients = c[:, None] * np.einsum("ikj,ik->ij", jacobians, d)  # what we must NOT release
    rng = np.random.default_rng(1)
    exact, noisy = np.zeros((B, K)), np.zeros((B, K))
    for i in range(B):
        rows = np.vstack([w[i], c[i] * jacobians[i].T])
        values = np.concatenate([[m[i]], logit_gradients[i]])
        assert _rank(rows) == K
        exact[i] = _lstsq(rows, values)
        noisy[i] = _lstsq(rows, values + rng.normal(0, RELEASE_NOISE, K + 1))
    assert np.max(np.abs(exact - d)) < 1e-8  # every private margin
    error = np.abs(noisy - d)  # and with the authority's flooding noise still most of them (d has std 2)
    assert np.median(error) < 0.02 and np.max(error) < 0.5, (np.median(error), np.max(error))


@pytest.mark.parametrize("hidden", [0, 8])
def test_one_step_of_summed_parameter_gradients_does_not_determine_the_margins(hidden: int) -> None:
    x, o, d = _batch()
    router = _router(x, hidden=hidden)
    p = parameter_count(router.config)
    QueryLimits().check(B, p, K)  # a router the clients accept
    c = bt_coefficients((router.weights(x, o) * d).sum(axis=1))
    rows = release_functionals(router, x, o, c)  # fused margins, then the summed gradient
    assert rows.shape == (B + p, B * K)
    # The functionals are exactly what the protocol releases.
    state = router.state()
    summed = sum(client_gradient_term(state, x, o, c, d[:, k], k) for k in range(K))
    released = rows @ d.reshape(-1)
    assert np.allclose(released[B:], summed, atol=1e-12)
    assert _rank(rows) < B * K
    leverage = coordinate_leverage(rows)
    assert leverage.max() < 0.99, leverage.max()  # no single margin is pinned down
    error = np.abs(_recover(rows, released) - d)
    assert np.median(error) > 0.5, np.median(error)  # margins have std 2


def test_a_large_router_reveals_the_batch_in_one_step_and_clients_refuse_it() -> None:
    x, o, d = _batch()
    router = _router(x, hidden=64)  # P = 898 > B (K - 1) = 256
    p = parameter_count(router.config)
    c = bt_coefficients((router.weights(x, o) * d).sum(axis=1))
    rows = release_functionals(router, x, o, c)
    assert _rank(rows) == B * K
    assert np.max(np.abs(_recover(rows, rows @ d.reshape(-1)) - d)) < 1e-6
    with pytest.raises(RouterQueryError, match="exceeds the ratio"):  # what the clients' check_query refuses
        QueryLimits().check(B, p, K)
    assert p > B * (K - 1)


def test_fused_margins_of_the_same_items_under_k_weightings_reveal_them() -> None:
    """Why the schedule uses each calibration item once (and clients' ItemUseLimiter)."""
    x, o, d = _batch()
    rows, values = [], []
    for seed in range(K):  # the router changes between steps
        w = _router(x, seed=seed).weights(x, o)
        block = np.zeros((B, B * K))
        for i in range(B):
            block[i, i * K : (i + 1) * K] = w[i]
        rows.append(block)
        values.append((w * d).sum(axis=1))
    once = coordinate_leverage(rows[0])
    assert once.max() < 0.99
    stacked = np.vstack(rows)
    assert np.max(np.abs(_recover(stacked, np.concatenate(values)) - d)) < 1e-6


def _default_step(out_std: float, seed: int = 0):
    """One step of the default router (linear gate on 32 whitened PCA directions, two objectives,
    P = 119) over B = 96 pairs of 64-dimensional features, its output layer drawn at `out_std`."""
    rng = np.random.default_rng(seed)
    n, b = 1500, 96
    family = rng.integers(0, K, n)
    x = rng.normal(size=(n, 64))
    x[:, :K] += 3 * np.eye(K)[family]
    o = rng.integers(0, 2, n)
    router = Router(RouterConfig(feature_dim=64, objectives=("correctness", "sentences"), num_clients=K))
    router.fit_input_projection(x)
    with torch.no_grad():
        router.out.weight.normal_(0.0, out_std, generator=torch.Generator().manual_seed(seed))
    items = rng.choice(n, b, replace=False)
    d = np.clip(rng.normal(0.0, 2.0, size=(b, K)), -R, R)
    return router, x[items], o[items], d


def _noisy_recovery(rows: np.ndarray, d: np.ndarray, seed: int = 0) -> np.ndarray:
    values = rows @ d.reshape(-1) + np.random.default_rng(seed).normal(0.0, RELEASE_NOISE, len(rows))
    return np.abs(_lstsq(rows, values).reshape(d.shape) - d)


def test_what_one_step_of_the_default_router_reveals() -> None:
    """Measured for the docstring: honest coefficients at a near-uniform router pin no margin down;
    once the router is confident the release functionals identify many margins."""
    router, x, o, d = _default_step(0.01)
    assert parameter_count(router.config) == 119
    c = bt_coefficients((router.weights(x, o) * d).sum(axis=1))
    rows = release_functionals(router, x, o, c)
    assert coordinate_leverage(rows).max() < 0.95
    assert np.median(_noisy_recovery(rows, d)) > 0.5
    router, x, o, d = _default_step(1.0)
    c = bt_coefficients((router.weights(x, o) * d).sum(axis=1))
    rows = release_functionals(router, x, o, c)
    assert coordinate_leverage(rows).max() > 0.999
    assert np.sum(_noisy_recovery(rows, d) < 0.1) > 0.25 * d.size  # a quarter of the margins within 0.1


def test_coefficients_within_the_documented_range_can_single_items_out() -> None:
    """What the clients' coefficient check leaves: c_i may range over [-(1/B) sigmoid(R), -(1/B)
    sigmoid(-R)], a ratio of 2.2e4. A deviating server that gives 20 items the largest and the rest
    the smallest concentrates the step's gradient on them and learns their margins."""
    router, x, o, d = _default_step(0.01)
    lo, hi = coefficient_range(len(x), R)
    assert lo / hi == pytest.approx(np.exp(R), rel=1e-9)
    c = np.full(len(x), hi)
    c[:20] = lo
    error = _noisy_recovery(release_functionals(router, x, o, c), d)
    assert np.max(error[:20]) < 0.01  # all 3 clients' margins of the 20 singled-out pairs
    assert np.median(error[20:]) > 0.5
