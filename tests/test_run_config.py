"""The run settings have one source of truth: AlignConfig and its sections (server.run_config)."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from secure_mor.cli import app
from secure_mor.protocol import ClientTrainingSettings
from secure_mor.server.pipeline import AlignConfig, AlignError
from secure_mor.server.run_config import APP_KEYS, align_config, run_config_defaults, run_config_keys, toml_table

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


def test_pyproject_declares_every_setting_with_the_dataclass_default():
    declared = tomllib.loads(PYPROJECT.read_text())["tool"]["flwr"]["app"]["config"]
    declared = {k: v for k, v in declared.items() if k not in APP_KEYS}
    expected = run_config_defaults()
    assert declared == expected, f"pyproject.toml's [tool.flwr.app.config] should read:\n{toml_table()}"


def test_no_run_config_is_the_default_job():
    assert align_config({"run-dir": "runs/x"}) == AlignConfig()


def test_every_setting_reaches_its_field():
    config = align_config({"grpo-temperature": 0.7, "router-learning-rate": 0.1, "sft-examples": 10,
                           "client-epochs": 2, "epsilon": "inf", "num-clients": 4, "family-gate": False})  # fmt: skip
    assert config.grpo.temperature == 0.7 and config.router.learning_rate == 0.1 and config.sft.examples == 10
    assert config.client_training == ClientTrainingSettings(epochs=2) and math.isinf(config.epsilon)
    assert config.num_clients == 4 and config.family_gate is False
    assert config.grpo.max_steps == AlignConfig().grpo.max_steps  # what is not named keeps its default


def test_every_scalar_field_has_a_key():
    keys = {(section, name) for section, name, _ in run_config_keys().values()}
    defaults = AlignConfig()
    for f in dataclasses.fields(AlignConfig):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                if isinstance(getattr(value, g.name), int | float | str) and g.name != "seed":
                    assert (f.name, g.name) in keys, f"{f.name}.{g.name} cannot be set"
        else:
            assert (None, f.name) in keys, f"{f.name} cannot be set"


@pytest.mark.parametrize(
    "run_config, message",
    [
        ({"grpo-tempreature": 0.7}, "did you mean 'grpo-temperature'"),
        ({"grpo-max-steps": 2.5}, "grpo-max-steps = 2.5: expected int"),
        ({"family-gate": "yes"}, "family-gate = 'yes': expected bool"),
        ({"epsilon": "lots"}, "epsilon = 'lots': expected float"),
        ({"grpo-num-generations": 1}, "num_generations must be >= 2"),
        ({"client-epochs": -1}, "client training settings must be >= 0"),
    ],
)
def test_a_bad_setting_is_an_error_that_names_it(run_config, message):
    with pytest.raises(AlignError, match=message):
        align_config(run_config)


def test_align_refuses_an_unknown_setting_before_flower_starts(tmp_path):
    result = CliRunner().invoke(app, ["align", "--out", str(tmp_path / "run"), "--config", "router-stpes=3"])
    assert result.exit_code != 0 and "did you mean 'router-steps'" in result.output, result.output
    assert not (tmp_path / "run").exists()
