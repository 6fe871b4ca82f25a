"""The one-run empirical privacy audit (audits.empirical): the bound on known inputs,
its soundness and power on randomized response, and on real DP-SGD training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

from secure_mor.audits.empirical import (
    SCHEMA,
    EmpiricalAuditConfig,
    count_correct,
    epsilon_lower_bound,
    p_value,
    write_result,
)
from secure_mor.cli import app
from secure_mor.experiments.audit import run_empirical_audit

DELTA = 1e-5


def _p_value_by_hand(v: int, r: int, m: int, eps: float, delta: float) -> float:
    """The paper's bound written out with math.comb: f(v) + 2 m delta max_i (f(v - i) - f(v)) / i."""
    q = math.exp(eps) / (1 + math.exp(eps))

    def f(k: int) -> float:
        return sum(math.comb(r, j) * q**j * (1 - q) ** (r - j) for j in range(max(k, 0), r + 1))

    slack = max(((f(v - i) - f(v)) / i for i in range(1, v + 1)), default=0.0)
    return min(f(v) + 2 * m * delta * slack, 1.0)


@pytest.mark.parametrize("v, r, m, eps, delta", [(9, 10, 20, 1.0, 0.0), (40, 50, 100, 0.7, 1e-3), (3, 3, 3, 2.0, 0.01)])
def test_p_value_is_the_papers_formula(v, r, m, eps, delta):
    assert p_value(v, r, m, eps, delta) == pytest.approx(_p_value_by_hand(v, r, m, eps, delta), rel=1e-9)


@pytest.mark.parametrize("r", [10, 50, 200])
def test_all_guesses_right_gives_the_analytic_bound(r):
    # delta = 0: P[Binomial(r, q) >= r] = q^r <= 0.05 exactly when q >= 0.05^(1/r)
    q = 0.05 ** (1 / r)
    assert epsilon_lower_bound(r, r, r, 0.0, 0.95) == pytest.approx(math.log(q / (1 - q)), abs=1e-6)
    # delta > 0 can only weaken the bound
    assert epsilon_lower_bound(r, r, r, 1e-3, 0.95) < epsilon_lower_bound(r, r, r, 0.0, 0.95)


def test_bound_is_zero_without_evidence_and_monotone_in_correct_guesses():
    assert epsilon_lower_bound(0, 100, 200, DELTA) == 0.0
    assert epsilon_lower_bound(50, 100, 200, DELTA) == 0.0  # chance level refutes nothing
    bounds = [epsilon_lower_bound(v, 100, 200, DELTA) for v in range(50, 101, 5)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False)) and bounds[-1] > bounds[0]
    assert epsilon_lower_bound(90, 100, 200, DELTA, 0.99) < epsilon_lower_bound(90, 100, 200, DELTA, 0.9)


def test_count_correct_guesses_the_extremes_and_abstains_in_between():
    scores = [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]
    included = [True, False, True, False, True, False]
    assert count_correct(scores, included, 2) == 2  # "in" for 5.0 (right), "out" for 0.0 (right)
    assert count_correct(scores, included, 4) == 2  # adds "in" for 4.0 (wrong), "out" for 1.0 (wrong)
    assert count_correct(scores, included, 6) == 4  # in: 5, 4, 3 (2 right); out: 2, 1, 0 (2 right)
    with pytest.raises(ValueError):
        count_correct(scores, included, 7)


@pytest.mark.parametrize("eps", [0.5, 2.0])
def test_randomized_response_bound_is_sound_and_tight_for_many_canaries(eps):
    """Each canary's bit through eps-DP randomized response: the guesses are the outputs.
    The bound must stay below eps in (at least) 95% of runs, and come close with many canaries."""
    rng = np.random.default_rng(0)
    m, keep = 5000, math.exp(eps) / (1 + math.exp(eps))
    bounds = []
    for _ in range(40):
        correct = int((rng.random(m) < keep).sum())
        bounds.append(epsilon_lower_bound(correct, m, m, 0.0, 0.95))
    assert np.mean(np.array(bounds) > eps) <= 0.1  # expected <= 0.05
    assert np.median(bounds) > 0.85 * eps


def test_config_rejects_bad_input():
    with pytest.raises(ValueError, match="guesses"):
        EmpiricalAuditConfig(canaries=10, guesses=(20,))
    with pytest.raises(ValueError, match="confidence"):
        EmpiricalAuditConfig(confidence=1.0)
    with pytest.raises(ValueError, match="epsilon"):
        EmpiricalAuditConfig(epsilon=0.0)


# A small real setting: client-0's cnn-gru on 200 of its pairs plus a random half of 100
# canaries (measured: non-private 0.95, DP at epsilon 1: 0.0).
SMALL = {"arch": "cnn-gru", "canaries": 100, "guesses": (10, 25, 50), "pairs": 200,
         "train": {"epochs": 40, "batch_size": 50}}  # fmt: skip


def _audit(epsilon: float, **overrides) -> object:
    return run_empirical_audit(EmpiricalAuditConfig(epsilon=epsilon, **{**SMALL, **overrides}))


def test_non_private_training_is_caught_and_dp_training_is_not(tmp_path):
    non_private, private = _audit(math.inf), _audit(1.0)
    assert non_private.included_mask == private.included_mask  # the same canaries, the same draw
    assert non_private.mechanism is None and math.isinf(non_private.epsilon_claimed)
    assert non_private.epsilon_lower_bound > 0.5  # memorised canaries refute epsilon 0.5
    # soundness: the claim is what Opacus' accountant reports for the run
    assert private.mechanism is not None and private.epsilon_claimed == pytest.approx(1.0, abs=0.05)
    assert private.epsilon_lower_bound <= private.epsilon_claimed
    assert non_private.epsilon_lower_bound > private.epsilon_lower_bound + 0.5

    path = write_result(private, tmp_path)
    assert path == tmp_path / "audits" / "empirical-cnn-gru-eps1-seed0.json"
    report = json.loads(path.read_text())
    assert report["schema"] == SCHEMA and report["canaries"] == 100 and report["confidence"] == 0.95
    assert report["included"] == sum(report["included_mask"]) and 0 < report["included"] < 100
    assert set(report["mechanism"]) == {"noise_multiplier", "sample_rate", "steps"}
    assert report["epsilon_lower_bound"] == max(o["epsilon_lower_bound"] for o in report["guess_sweep"]["outcomes"])
    assert json.loads(json.dumps(write_result(non_private, tmp_path).read_text()))
    assert json.loads((tmp_path / "audits" / "empirical-cnn-gru-epsinf-seed0.json").read_text())["mechanism"] is None


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_default_setting_power_and_soundness(seed):
    """The default audit (200 canaries, client-0's 800 pairs, the architecture's training defaults)."""
    non_private = run_empirical_audit(EmpiricalAuditConfig(epsilon=math.inf, seed=seed))
    assert non_private.epsilon_lower_bound > 1.0
    for eps in (2.0, 8.0):
        private = run_empirical_audit(EmpiricalAuditConfig(epsilon=eps, seed=seed))
        assert private.epsilon_lower_bound <= private.epsilon_claimed
        assert private.epsilon_lower_bound < non_private.epsilon_lower_bound


runner = CliRunner()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--guesses", "10,x"], "comma-separated integers"),
        (["--canaries", "10", "--guesses", "20"], "guesses"),
        (["--arch", "nope"], "unknown reward architecture"),
        (["--confidence", "1.5"], "confidence"),
    ],
)
def test_cli_bad_input_is_a_clean_error(tmp_path, args, message):
    result = runner.invoke(app, ["audit", "empirical", "--out", str(tmp_path), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception, SystemExit)
    assert not (tmp_path / "audits").exists()


def test_cli_writes_the_result(tmp_path):
    args = ["audit", "empirical", "--out", str(tmp_path), "--epsilon", "inf", "--canaries", "20", "--guesses", "10",
            "--pairs", "40", "--epochs", "2", "--batch-size", "20"]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "empirical epsilon >=" in result.output and "non-private" in result.output
    report = json.loads((tmp_path / "audits" / "empirical-cnn-gru-epsinf-seed0.json").read_text())
    assert report["canaries"] == 20 and report["guesses"] == 10 and report["epsilon_claimed"] is None
