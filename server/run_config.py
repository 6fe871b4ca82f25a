"""The main job's Flower run config, derived from AlignConfig: the dataclasses are the one source of truth.

One key per setting: AlignConfig's own fields in kebab case (`num-clients`, `k-min`, `reply-timeout`), the
fields of its sections as `<section>-<field>` (`grpo-max-steps`, `grpo-temperature`, `router-learning-rate`,
`sft-examples`, `client-epochs`), every field of type int, float, bool or str (the sections' seeds are the
run's `seed`). `run-dir` is the app's own. pyproject.toml's `[tool.flwr.app.config]` lists every key with
its default (Flower drops a `--run-config` key the app does not declare; tests/test_run_config.py checks the
table against `run_config_defaults()`). An unknown key or a value of the wrong type is an AlignError that
names the key.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping
from typing import Any

from secure_mor.server.pipeline import AlignConfig, AlignError

APP_KEYS = ("run-dir",)  # the ServerApp's own, not a setting of the job
SECTIONS = {"grpo": "grpo", "router": "router", "sft": "sft", "client_training": "client"}  # field -> key prefix
SCALARS = {"int": int, "float": float, "bool": bool, "str": str}


def _kebab(name: str) -> str:
    return name.replace("_", "-")


def run_config_keys() -> dict[str, tuple[str | None, str, type]]:
    """{key: (section field or None, field, type)} of every setting."""
    keys: dict[str, tuple[str | None, str, type]] = {}
    defaults = AlignConfig()
    for f in dataclasses.fields(AlignConfig):
        if f.name in SECTIONS:
            for g in dataclasses.fields(getattr(defaults, f.name)):
                if g.type in SCALARS and g.name != "seed":
                    keys[f"{SECTIONS[f.name]}-{_kebab(g.name)}"] = (f.name, g.name, SCALARS[g.type])
        elif f.type in SCALARS:
            keys[_kebab(f.name)] = (None, f.name, SCALARS[f.type])
    return keys


def run_config_defaults() -> dict[str, Any]:
    """Every key with AlignConfig's default (what pyproject.toml declares)."""
    defaults = AlignConfig()
    return {key: getattr(getattr(defaults, section) if section else defaults, name)
            for key, (section, name, _) in run_config_keys().items()}  # fmt: skip


def _value(key: str, value: Any, kind: type) -> Any:
    if kind is bool and isinstance(value, bool) or kind is str and isinstance(value, str):
        return value
    if kind is float and isinstance(value, int | float | str) and not isinstance(value, bool):
        try:
            return float(value)  # also "inf" (a non-private epsilon)
        except ValueError:
            pass
    if kind is int and isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    raise AlignError(f"run config {key} = {value!r}: expected {kind.__name__}")


def check_run_config(run_config: Mapping[str, Any]) -> None:
    """AlignError naming the first key that is not a setting (with the closest one)."""
    keys = run_config_keys()
    for key in run_config:
        if key not in keys and key not in APP_KEYS:
            close = difflib.get_close_matches(key, list(keys), n=1)
            raise AlignError(f"run config {key!r} is not a setting" + (f" (did you mean {close[0]!r}?)" if close else
                                                                         "; pyproject.toml lists them"))


def align_config(run_config: Mapping[str, Any]) -> AlignConfig:
    """The AlignConfig of a Flower run config: AlignConfig's defaults, with every key given set."""
    check_run_config(run_config)
    keys = run_config_keys()
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in run_config.items():
        if key in APP_KEYS:
            continue
        section, name, kind = keys[key]
        (sections.setdefault(section, {}) if section else top)[name] = _value(key, value, kind)
    defaults = AlignConfig()
    try:
        for section, changed in sections.items():
            top[section] = dataclasses.replace(getattr(defaults, section), **changed)
        return dataclasses.replace(defaults, **top)
    except (ValueError, TypeError) as err:  # a section's own checks (GRPOSettings.__post_init__, ...)
        raise AlignError(f"run config: {err}") from err


def toml_table() -> str:
    """The `[tool.flwr.app.config]` body of run_config_defaults() (to paste into pyproject.toml)."""
    from secure_mor.federation import toml_value

    return "\n".join(f"{key} = {toml_value(value)}" for key, value in run_config_defaults().items())
