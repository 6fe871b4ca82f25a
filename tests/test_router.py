"""The router network, its flattening, the clients' gradient term, the fusion rules and the
prompt features of the tiny policy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from secure_mor.crypto.fusion import validate_weights
from secure_mor.data import FAMILIES, assign_families, column, default_clients
from secure_mor.routing import (
    GradientQuery,
    ItemUseLimiter,
    QueryLimits,
    Router,
    RouterConfig,
    RouterError,
    RouterQueryError,
    RouterSetup,
    RouterState,
    answer_gradient_query,
    bt_coefficients,
    bt_loss,
    check_query,
    client_gradient_term,
    coefficient_range,
    encode_gradient_term,
    flatten_gradients,
    pair_margins,
    parameter_count,
    parameter_layout,
    unflatten,
)
from secure_mor.server.router import family_features, family_map, prompt_features, weights_for

torch.set_num_threads(1)
W_MIN = 0.02
R = 10.0


def _config(**kw) -> RouterConfig:
    base = dict(
        feature_dim=6,
        objectives=("correctness", "style"),
        num_clients=3,
        hidden=5,
        objective_dim=3,
        input_dim=4,
        w_min=W_MIN,
    )
    return RouterConfig(**{**base, **kw})


def _router(seed: int = 0, **kw) -> tuple[Router, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(40, 6)) * np.array([5, 1, 1, 0.1, 3, 1])
    o = rng.integers(0, 2, 40)
    return Router(_config(**kw)).fit_input_projection(x), x, o


# ---------------------------------------------------------------- network and flattening


@pytest.mark.parametrize("hidden", [0, 5])
def test_layout_flatten_unflatten_round_trip(hidden: int) -> None:
    router, x, o = _router(hidden=hidden)
    layout = parameter_layout(router.config)
    assert [(n, tuple(p.shape)) for n, p in router.named_parameters()] == layout
    assert layout[0][0] == "objective_embedding.weight" and layout[-1][0] == "out.bias"
    theta = router.flat_parameters()
    assert theta.dtype == np.float64 and theta.shape == (parameter_count(router.config),)
    pieces = unflatten(theta, layout)
    assert np.array_equal(pieces["out.bias"], router.out.bias.detach().numpy())
    other = Router(_config(hidden=hidden, seed=7))
    assert not np.allclose(other.flat_parameters(), theta)
    state = RouterState.from_bytes(router.state().to_bytes())  # what travels to the clients
    restored = Router.from_state(state)
    assert np.array_equal(restored.flat_parameters(), theta)
    assert np.array_equal(restored.weights(x, o), router.weights(x, o))
    with pytest.raises(RouterError, match="layout needs"):
        router.load_flat_parameters(theta[:-1])
    with pytest.raises(RouterError, match="not finite"):
        router.load_flat_parameters(np.full_like(theta, np.nan))


def test_config_and_input_validation() -> None:
    with pytest.raises(RouterError, match="w_min"):
        _config(w_min=0.34)
    with pytest.raises(RouterError, match="distinct"):
        _config(objectives=("a", "a"))
    assert _config(input_dim=99).projected_dim == 6  # capped at the feature width
    router, x, o = _router()
    with pytest.raises(RouterError, match="features must be"):
        router.weights(x[:, :5], o)
    with pytest.raises(RouterError, match="objective ids"):
        router.weights(x, np.full(40, 2))
    with pytest.raises(RouterError, match="unknown objective"):
        router.config.objective_id("helpfulness")
    assert RouterConfig.from_json(router.config.to_json()) == router.config


def test_input_projection_is_whitened_pca() -> None:
    router, x, _ = _router()
    u = ((torch.as_tensor(x) - router.input_mean) @ router.input_projection).numpy()
    assert np.allclose(u.mean(axis=0), 0, atol=1e-12)
    assert np.allclose(np.cov(u, rowvar=False), np.eye(4), atol=1e-9)


@pytest.mark.parametrize("seed", range(5))
def test_weights_are_always_valid_rows(seed: int) -> None:
    router, x, o = _router(seed, hidden=5 * (seed % 2))
    with torch.no_grad():  # extreme parameters: saturated softmax, logits ~ 1e3
        for p in router.parameters():
            p.mul_(300.0)
    w = router.weights(x * 100, o)
    assert w.shape == (40, 3) and np.all(w >= W_MIN) and np.allclose(w.sum(axis=1), 1.0, atol=1e-12)
    assert np.max(w) > 0.9  # saturated rows exist and still keep the floor
    validate_weights(w, 40, 3, W_MIN)  # the key authority's own rule


# ---------------------------------------------------------------- the clients' gradient term


def test_client_terms_sum_to_the_bradley_terry_gradient() -> None:
    router, x, o = _router(3)
    rng = np.random.default_rng(3)
    d = pair_margins(rng.normal(0, 4, (40, 3)), rng.normal(0, 4, (40, 3)), value_bound=10.0)
    w = router.weights(x, o)
    m = (w * d).sum(axis=1)
    c = bt_coefficients(m)
    assert np.all((c < 0) & (c > -1 / 40))
    state = router.state()
    terms = [client_gradient_term(state, x, o, c, d[:, k], k) for k in range(3)]
    # Reference: autograd on the loss itself.
    router.zero_grad()
    weights = router(x, o)
    loss = torch.nn.functional.softplus(-(weights * torch.as_tensor(d)).sum(dim=1)).mean()
    loss.backward()
    assert abs(float(loss.detach()) - bt_loss(m)) < 1e-12
    assert np.allclose(sum(terms), flatten_gradients(router), atol=1e-14, rtol=1e-10)
    assert all(t.shape == (parameter_count(router.config),) and t.dtype == np.float64 for t in terms)
    # Each term depends on its own client's margins only.
    assert not np.allclose(terms[0], terms[1])
    d2 = d.copy()
    d2[:, 1] += 1.0
    assert np.array_equal(client_gradient_term(state, x, o, c, d2[:, 0], 0), terms[0])


def _query(router: Router, x: np.ndarray, o: np.ndarray, items: np.ndarray, c: np.ndarray, **kw) -> GradientQuery:
    fields = {"step": 2, "nonce": "0" * 32, "state": router.state(), "items": items, "features": x[items],
              "objective_ids": o[items], "coefficients": c, "scale": 1.0, **kw}  # fmt: skip
    return GradientQuery(**fields)


def test_clients_refuse_queries_that_release_too_much() -> None:
    router, x, o = _router()
    setup, p = RouterSetup.of(router, x, o), parameter_count(router.config)
    setup.validate(40)
    lo, hi = coefficient_range(20, R)
    assert lo == pytest.approx(-(1 - 4.54e-5) / 20, rel=1e-4) and hi == pytest.approx(-4.54e-5 / 20, rel=1e-3)
    items, c, d = np.arange(20, 40), np.full(20, -0.5 / 20), np.ones(40)
    loose = QueryLimits(min_items=16, max_release_ratio=10.0)
    assert answer_gradient_query(_query(router, x, o, items, c), d, 1, value_bound=R, setup=setup,
                                 limits=loose).shape == (p,)  # fmt: skip
    with pytest.raises(RouterQueryError, match="below the minimum"):
        check_query(_query(router, x, o, items[:8], c[:8]), setup, value_bound=R, limits=QueryLimits(min_items=16))
    with pytest.raises(RouterQueryError, match="exceeds the ratio"):  # 20 + P values about 60 margins
        check_query(_query(router, x, o, items, c), setup, value_bound=R, limits=QueryLimits(min_items=16))
    assert 20 + p > 0.8 * 60
    zero_one = np.where(np.arange(20) == 0, -1.0 / 20, 0.0)  # one item singled out, the others switched off
    for bad in (np.full(20, 0.01), np.full(20, -1.0 / 20), zero_one, np.full(20, -1e-9)):
        with pytest.raises(RouterQueryError, match="coefficients outside .*none may be 0"):
            check_query(_query(router, x, o, items, bad), setup, value_bound=R, limits=loose)
    for scale in (100.0, 0.0, -1.0):
        with pytest.raises(RouterQueryError, match="scale"):
            check_query(_query(router, x, o, items, c, scale=scale), setup, value_bound=R, limits=loose)
    with pytest.raises(RouterQueryError, match="client column"):
        client_gradient_term(router.state(), x, o, np.full(40, -0.5 / 40), d, 3)
    with pytest.raises(RouterQueryError, match="exceeds the bound"):
        encode_gradient_term(np.array([0.5, -20.0]), 1.0, 10.0)


def test_clients_refuse_queries_that_are_not_the_pinned_setups() -> None:
    """Review e5: the server's own router state (identity projection, zero mean), features that are
    basis vectors, c = -1/B and scale 100 gave every client's margins of 32 pairs. Each part is refused."""
    router, x, o = _router()
    setup = RouterSetup.of(router, x, o)
    items, c = np.arange(20), np.full(20, -0.5 / 20)
    loose = QueryLimits(min_items=16, max_release_ratio=10.0)
    check_query(_query(router, x, o, items, c), setup, value_bound=R, limits=loose)  # the honest query
    crafted = Router(router.config)  # identity projection, zero mean
    with pytest.raises(RouterQueryError, match="input normalisation is not the pinned"):
        check_query(_query(crafted, x, o, items, c), setup, value_bound=R, limits=loose)
    other = Router(RouterConfig(**{**router.config.to_json(), "w_min": 0.0})).fit_input_projection(x)
    with pytest.raises(RouterQueryError, match="configuration .* not the pinned"):
        check_query(_query(other, x, o, items, c), setup, value_bound=R, limits=loose)
    basis = _query(router, x, o, items, c)
    basis = GradientQuery(**{**basis.__dict__, "features": np.eye(20, 6)})
    with pytest.raises(RouterQueryError, match="features or objectives are not the pinned ones"):
        check_query(basis, setup, value_bound=R, limits=loose)
    with pytest.raises(RouterQueryError, match="not calibration pairs"):
        check_query(_query(router, np.vstack([x, x]), np.concatenate([o, o]), np.arange(30, 50), c), setup,
                    value_bound=R, limits=loose)  # fmt: skip
    # What the clients pin must be the normalisation the features determine, not one of the server's choosing.
    with pytest.raises(RouterQueryError, match="not the one its features determine"):
        RouterSetup.of(crafted, x, o).validate(40)
    with pytest.raises(RouterQueryError, match="for the 41 calibration pairs"):
        setup.validate(41)
    assert RouterSetup.from_bytes(setup.to_bytes()).digest == setup.digest
    assert RouterSetup.of(router, x + 1e-9, o).digest != setup.digest


def test_item_uses_count_over_every_run_id_of_a_context() -> None:
    limiter = ItemUseLimiter(max_uses=1)
    limiter.admit("run-a", 0, range(20))
    limiter.admit("run-a", 0, range(20))  # the gradient round of the same step
    with pytest.raises(RouterQueryError, match="already used"):
        limiter.admit("run-a", 1, range(15, 35))
    with pytest.raises(RouterQueryError, match="already used"):  # review H1: another run id is no way around
        limiter.admit("run-b", 0, range(20))
    with pytest.raises(RouterQueryError, match="different batch"):
        limiter.admit("run-a", 0, range(21))
    restored = ItemUseLimiter.from_json(1, limiter.to_json())
    with pytest.raises(RouterQueryError, match="already used"):
        restored.admit("run-c", 0, [3])
    restored.admit("run-a", 0, range(20))


def test_a_query_digest_covers_every_field() -> None:
    router, x, o = _router()
    query = _query(router, x, o, np.arange(20), np.full(20, -0.5 / 20))
    changed = [
        {"step": 3}, {"nonce": "1" * 32}, {"items": np.arange(1, 21)}, {"features": x[:20] + 1e-12},
        {"objective_ids": 1 - o[:20]}, {"coefficients": np.full(20, -0.4 / 20)}, {"scale": 0.5},
        {"state": RouterState(router.config, router.state().theta + 1e-12, router.state().buffers)},
    ]  # fmt: skip
    digests = {GradientQuery(**{**query.__dict__, **change}).digest for change in changed}
    assert len(digests) == len(changed) and query.digest not in digests
    assert GradientQuery(**query.__dict__).digest == query.digest


# ---------------------------------------------------------------- fusion rules


def test_fusion_baselines() -> None:
    n, k = 7, 3
    families = ["color", "shape", "presence", "other", "color", "shape", "presence"]
    uniform = weights_for("uniform", n=n, k=k, w_min=W_MIN)
    assert np.allclose(uniform, 1 / 3)
    single = weights_for("single:2", n=n, k=k, w_min=W_MIN)
    assert np.allclose(single[:, 2], 1 - 2 * W_MIN) and np.allclose(single[:, :2], W_MIN)
    mapping = family_map(assign_families(default_clients(3), FAMILIES))
    assert mapping == {"color": 0, "shape": 1, "presence": 2}
    by_family = weights_for("by-family", n=n, k=k, w_min=W_MIN, families=families, family_clients=mapping)
    for i, family in enumerate(families):
        expected = (
            np.full(3, 1 / 3) if family == "other" else np.where(np.arange(3) == mapping[family], 1 - 2 * W_MIN, W_MIN)
        )
        assert np.allclose(by_family[i], expected)
    router, x, o = _router()
    learned = weights_for("mor", n=40, k=3, w_min=W_MIN, router=router, features=x, objective_ids=o)
    assert np.array_equal(learned, router.weights(x, o))
    for w in (uniform, single, by_family, learned):
        validate_weights(w, len(w), k, W_MIN)
    for bad in ("single:3", "single:x", "average", "by-family"):
        with pytest.raises(RouterError):
            weights_for(bad, n=n, k=k, w_min=W_MIN)
    with pytest.raises(RouterError, match="w_min"):
        weights_for("mor", n=40, k=3, w_min=0.05, router=router, features=x, objective_ids=o)


# ---------------------------------------------------------------- prompt features


def test_prompt_features_of_the_tiny_policy(federated) -> None:
    from secure_mor.vlm import build_tiny_vlm

    rows = federated.calibration
    model, processor = build_tiny_vlm(column(rows, "question"))
    model.train()
    features = prompt_features(model, processor, rows, batch_size=64)
    assert model.training  # mode restored
    assert features.shape == (len(rows), model.config.text_config.hidden_size)
    assert features.dtype == np.float64 and np.all(np.isfinite(features))
    # Left padding does not change a row: batch size 7 (other padding) gives the same features.
    again = prompt_features(model, processor, rows.select(range(21)), batch_size=7)
    assert np.max(np.abs(again - features[:21])) < 1e-4
    # The image reaches the features: same question, different images.
    questions = column(rows, "question")
    pair = [i for i in range(len(rows)) if questions[i] == questions[0]][:2]
    if len(pair) == 2:
        assert not np.allclose(features[pair[0]], features[pair[1]])
    # The question family is recoverable from the whitened features (held-out nearest centroid).
    families = np.array(column(rows, "family"))
    router = Router(
        RouterConfig(feature_dim=features.shape[1], objectives=("correctness",), num_clients=3, input_dim=32)
    ).fit_input_projection(features)
    u = ((torch.as_tensor(features) - router.input_mean) @ router.input_projection).numpy()
    train, test = np.arange(len(u)) % 2 == 0, np.arange(len(u)) % 2 == 1
    names = sorted(set(families))
    centroids = np.stack([u[train & (families == f)].mean(axis=0) for f in names])
    predicted = np.array(names)[np.argmin(((u[test, None] - centroids[None]) ** 2).sum(-1), axis=1)]
    assert np.mean(predicted == families[test]) > 0.7
    w = weights_for(
        "mor",
        n=len(rows),
        k=3,
        w_min=W_MIN,
        router=router,
        features=features,
        objective_ids=np.zeros(len(rows), dtype=np.int64),
    )
    validate_weights(w, len(rows), 3, W_MIN)


def test_family_features_are_one_hot_in_the_runs_family_order() -> None:
    x = family_features(["shape", "color", "shape"], ("color", "shape", "presence"))
    assert x.tolist() == [[0, 1, 0], [1, 0, 0], [0, 1, 0]]
    with pytest.raises(ValueError, match="'size'"):
        family_features(["size"], ("color", "shape"))
