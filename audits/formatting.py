"""Formatting untrusted values for the report: numbers, epsilons, times, hashes, mechanisms."""

from __future__ import annotations

import json
import math
import time
from typing import Any

from secure_mor.audits.recompute import UNBOUNDED_EPSILON
from secure_mor.ledger import line_hash


def field_of(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def num(value: Any, digits: int = 3) -> str:
    """A number for a table; "-" when absent, the value as text when it is not a number."""
    if value is None:
        return "-"
    if not is_number(value):
        return str(value)
    if math.isinf(value) or value >= UNBOUNDED_EPSILON:
        return "inf"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def general(value: Any) -> str:
    """A small number such as a delta or a learning rate: 1e-05, not 0.000010."""
    return f"{value:g}" if is_number(value) else num(value)


def ordered(keys: Any) -> list[str]:
    """Distinct keys in the order first seen (question families keep the data's order)."""
    return list(dict.fromkeys(keys))


def eps(value: Any) -> str:
    """An epsilon as the ledger logs it (the largest float means unbounded)."""
    return num(value, 4)


def when(value: Any) -> str:
    if not is_number(value) or not 0 <= value < 1e11:
        return num(value)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value))


def short(text: Any, limit: int = 80) -> str:
    text = str(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def short_hash(line: dict) -> str:
    """The line's SHA-256 (what the next line's prev_hash holds); "-" when it has no canonical form (NaN)."""
    try:
        return line_hash(line)
    except (ValueError, TypeError):
        return "-"


def mechanism_summary(mechanism: Any, depth: int = 0) -> str:
    """A DpEvent (named-tuple JSON form) in a few words, e.g. "160 x Poisson(q=0.25) Gaussian(sigma=3.584)"."""
    if mechanism is None:
        return "-"
    if not isinstance(mechanism, dict):
        return f"malformed ({type(mechanism).__name__})"
    if depth > 6:
        return "…"
    name, event = mechanism.get("class_name"), mechanism.get("event")
    if name == "GaussianDpEvent":
        return f"Gaussian(sigma={num(mechanism.get('noise_multiplier'))})"
    if name == "LaplaceDpEvent":
        return f"Laplace(b={num(mechanism.get('noise_multiplier'))})"
    if name == "PoissonSampledDpEvent":
        return f"Poisson(q={num(mechanism.get('sampling_probability'), 4)}) {mechanism_summary(event, depth + 1)}"
    if name == "SelfComposedDpEvent":
        return f"{num(mechanism.get('count'))} x {mechanism_summary(event, depth + 1)}"
    if name == "ComposedDpEvent" and isinstance(mechanism.get("events"), list):
        return "[" + "; ".join(mechanism_summary(e, depth + 1) for e in mechanism["events"]) + "]"
    if name == "NoOpDpEvent":
        return "post-processing (no cost)"
    if name == "NonPrivateDpEvent":
        return "NON-PRIVATE"
    fields = {k: v for k, v in mechanism.items() if k not in ("module_name", "class_name")}
    return short(f"{name}({json.dumps(fields, default=str)})", 80)
