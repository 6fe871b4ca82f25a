"""Recompute every epsilon in the privacy ledger with dp-accounting, independently
of the accountant (Opacus) that claimed it.

API:

    event_from_json(d) -> dp_accounting.DpEvent
        The ledger's mechanism (dp-accounting's named-tuple JSON form) as a DpEvent.
        Strict: only classes of `dp_accounting.dp_event` are built (looked up by
        name in that module; no module named in the JSON is ever imported), every
        field must be present with the right JSON type, unknown fields are refused.
        Anything else raises RecomputeError.

    recompute(ledger_entries, tolerance=0.05) -> Report
        For each entry with a mechanism: epsilon at the entry's delta by
        dp-accounting's RDP accountant and its PLD accountant. The tighter of the
        two (both are upper bounds) is "the recomputed epsilon". Per party: the
        running composition (ComposedDpEvent of all the party's mechanisms so far)
        at the budget's delta, checked against every entry's claimed total_epsilon,
        and the final total against the budget epsilon.

Statuses (anything but "ok" makes `Report.ok` false):

    entry  "ok"
           "under-claimed"   claim below the recomputed (tighter) epsilon: the
                             real privacy loss is larger than reported
           "mismatch"        claim differs from the matching accountant: RDP for
                             an "rdp" claim, PLD for "prv"/"pld" claims (PRV and
                             PLD are both numerically tight), the tighter of RDP/PLD
                             otherwise
    party  "ok", "under-claimed"/"mismatch" (of a running total, same rules),
           "over budget"     the recomputed or claimed total exceeds the budget

"Differs" means by more than `tolerance`, absolute for epsilons up to 1 and
relative above (allowed = tolerance * max(1, reference)).

Infinities: JSON has no inf, so clients log an unbounded epsilon (a non-private
run, an unbounded budget) as the largest float (`UNBOUNDED_EPSILON`, as
`clients.client` does); it is read back as inf. NonPrivateDpEvent recomputes to
inf (and so does every later running total of that party), NoOpDpEvent to 0.
A party whose total is inf is over budget unless its budget is unbounded too.
"""

from __future__ import annotations

import collections.abc
import inspect
import logging
import math
import sys
import typing
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import attr
import dp_accounting
from dp_accounting import dp_event

from secure_mor.ledger import DP_EVENT_MODULE

UNBOUNDED_EPSILON = sys.float_info.max  # same representation as clients.client.UNBOUNDED_EPSILON
MAX_DEPTH = 32
PLD_DISCRETIZATION = 1e-3  # differs from 1e-4 by < 0.002 on DP-SGD mechanisms, 10x faster

STATUS_OK = "ok"
STATUS_UNDER = "under-claimed"
STATUS_MISMATCH = "mismatch"
STATUS_OVER_BUDGET = "over budget"


class RecomputeError(ValueError):
    """A mechanism is not a well-formed dp-accounting DpEvent, or an entry's
    numbers (epsilon, delta, budget) are malformed. Messages name the ledger line
    when raised by `recompute`."""


# The instantiable DpEvent classes of dp_accounting.dp_event, by class name.
EVENT_CLASSES: dict[str, type[dp_event.DpEvent]] = {
    name: cls
    for name, cls in vars(dp_event).items()
    if inspect.isclass(cls) and issubclass(cls, dp_event.DpEvent) and cls is not dp_event.DpEvent and attr.has(cls)
}


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RecomputeError(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _integer(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise RecomputeError(f"{where}: expected an integer, got {value!r}")
    return int(value)


def _is_event_type(tp: Any) -> bool:
    return inspect.isclass(tp) and issubclass(tp, dp_event.DpEvent)


def _convert(value: Any, tp: Any, where: str, depth: int) -> Any:
    """`value` (JSON) as an instance of the annotated attrs field type `tp`."""
    if _is_event_type(tp):
        return _event(value, where, depth + 1)
    if tp is float:
        return _number(value, where)
    if tp is int:
        return _integer(value, where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:
        errors = []
        for option in args:
            try:
                return _convert(value, option, where, depth)
            except RecomputeError as err:
                errors.append(str(err))
        raise RecomputeError(f"{where}: {value!r} matches none of {tp} ({'; '.join(errors)})")
    if origin in (list, collections.abc.Sequence):
        if not isinstance(value, list):
            raise RecomputeError(f"{where}: expected a list, got {type(value).__name__}")
        (item_tp,) = args or (Any,)
        return [_convert(v, item_tp, f"{where}[{i}]", depth) for i, v in enumerate(value)]
    raise RecomputeError(f"{where}: field type {tp} is not supported by this auditor")


def _event(d: Any, where: str, depth: int) -> dp_event.DpEvent:
    if depth > MAX_DEPTH:
        raise RecomputeError(f"{where}: mechanism nested deeper than {MAX_DEPTH} levels")
    if not isinstance(d, Mapping):
        raise RecomputeError(f"{where}: expected a DpEvent object, got {type(d).__name__}")
    if d.get("module_name") != DP_EVENT_MODULE:
        raise RecomputeError(f"{where}: module_name must be {DP_EVENT_MODULE!r}, got {d.get('module_name')!r}")
    name = d.get("class_name")
    cls = EVENT_CLASSES.get(name) if isinstance(name, str) else None
    if cls is None:
        raise RecomputeError(f"{where}: unknown DpEvent class {name!r}")
    label = f"{where} ({name})"
    fields = {k: v for k, v in d.items() if k not in ("module_name", "class_name")}
    declared = {a.name: a for a in attr.fields(cls)}
    unknown = sorted(set(fields) - set(declared))
    if unknown:
        raise RecomputeError(f"{label}: unknown field(s) {unknown}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for fname, a in declared.items():
        if fname not in fields:
            if a.default is attr.NOTHING:
                raise RecomputeError(f"{label}: missing field {fname!r}")
            continue
        kwargs[fname] = _convert(fields[fname], hints.get(fname, a.type), f"{where}.{fname}", depth)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise RecomputeError(f"{label}: {err}") from err


def event_from_json(d: Any) -> dp_event.DpEvent:
    """A dp-accounting DpEvent from its named-tuple JSON form (see module docs).
    Raises RecomputeError on anything that is not exactly such a form."""
    return _event(d, "mechanism", 0)


# ---------------------------------------------------------------------------
# Accounting


def _rdp() -> dp_accounting.rdp.RdpAccountant:
    return dp_accounting.rdp.RdpAccountant()


def _pld() -> dp_accounting.pld.PLDAccountant:
    return dp_accounting.pld.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)


def _compose(accountant: Any, event: dp_event.DpEvent, where: str) -> None:
    if not accountant.supports(event):
        raise RecomputeError(f"{where}: {type(event).__name__} is not supported by {type(accountant).__name__}")
    try:
        accountant.compose(event)
    except (TypeError, ValueError) as err:
        raise RecomputeError(f"{where}: cannot account for the mechanism ({err})") from err


def _epsilon(accountant: Any, delta: float) -> float:
    try:
        eps = float(accountant.get_epsilon(delta))
    except (ValueError, ArithmeticError) as err:
        raise RecomputeError(f"{type(accountant).__name__} cannot compute epsilon at delta {delta:g} ({err})") from err
    return max(eps, 0.0)


def _allowed(tolerance: float, reference: float) -> float:
    return tolerance * max(1.0, abs(reference)) if math.isfinite(reference) else 0.0


def _differs(a: float, b: float, tolerance: float) -> bool:
    if math.isinf(a) or math.isinf(b):
        return a != b
    return abs(a - b) > _allowed(tolerance, b)


def _ledger_value(value: Any, where: str, *, unbounded: bool = True) -> float:
    """A logged epsilon: the largest float (or above) means inf."""
    if unbounded and isinstance(value, (int, float)) and not isinstance(value, bool) and value >= UNBOUNDED_EPSILON:
        return math.inf
    return _number(value, where)


def _delta(value: Any, where: str) -> float:
    """Delta 0 is pure DP: the key authority logs its post-processing releases (epsilon 0) at
    delta 0; a Gaussian mechanism then recomputes to inf, so a finite claim is flagged."""
    delta = _number(value, where)
    if not 0.0 <= delta < 1.0:
        raise RecomputeError(f"{where}: delta must be in [0, 1), got {delta!r}")
    return delta


def _judge(claimed: float, rdp: float, pld: float, accountant: str, tolerance: float) -> tuple[float, str, str]:
    """(recomputed, status, reason) of a claim."""
    recomputed = min(rdp, pld)
    reference_name = {"rdp": "RDP", "prv": "PLD", "pld": "PLD"}.get(str(accountant).lower(), "tighter")
    reference = {"RDP": rdp, "PLD": pld}.get(reference_name, recomputed)
    if claimed < recomputed and _differs(claimed, recomputed, tolerance):
        return recomputed, STATUS_UNDER, f"claimed {claimed:.4g} < recomputed {recomputed:.4g}"
    if _differs(claimed, reference, tolerance):
        return recomputed, STATUS_MISMATCH, f"claimed {claimed:.4g} ({accountant}) vs {reference_name} {reference:.4g}"
    return recomputed, STATUS_OK, ""


@dataclass(frozen=True)
class EntryCheck:
    """One ledger line with a mechanism. line: 1-based; epsilons at `delta`."""

    line: int
    party: str
    kind: str
    accountant: str
    delta: float
    claimed: float
    rdp: float
    pld: float
    recomputed: float  # min(rdp, pld)
    claimed_total: float
    total: float  # recomputed running total of the party at its budget delta (min of RDP/PLD)
    status: str
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


@dataclass(frozen=True)
class PartyCheck:
    """A party's composition of all its mechanisms at `delta` (its budget's)."""

    party: str
    entries: int
    delta: float
    claimed_total: float
    rdp_total: float
    pld_total: float
    total: float  # min(rdp_total, pld_total)
    budget_epsilon: float | None  # None: no budget logged
    status: str
    reasons: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return self.status == STATUS_OK


@dataclass
class Report:
    tolerance: float
    entries: list[EntryCheck] = field(default_factory=list)
    parties: list[PartyCheck] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # lines without a mechanism

    @property
    def ok(self) -> bool:
        return all(e.ok for e in self.entries) and all(p.ok for p in self.parties)

    @property
    def problems(self) -> list[str]:
        out = [f"line {e.line} ({e.party}): {e.status}: {e.reason}" for e in self.entries if not e.ok]
        out += [f"{p.party}: {p.status}: {'; '.join(p.reasons)}" for p in self.parties if not p.ok]
        return out


@dataclass
class _PartyState:
    rdp: Any
    pld: Any
    delta: float
    budget_epsilon: float | None
    entries: int = 0
    claimed_total: float = 0.0
    rdp_total: float = 0.0
    pld_total: float = 0.0
    reasons: list[str] = field(default_factory=list)
    running_status: str = STATUS_OK


def _budget(entry: Mapping[str, Any], where: str, default_delta: float) -> tuple[float | None, float]:
    budget = entry.get("budget")
    if budget is None:
        return None, default_delta
    if not isinstance(budget, Mapping):
        raise RecomputeError(f"{where}: budget must be an object, got {budget!r}")
    return _ledger_value(budget.get("epsilon"), f"{where}: budget epsilon"), _delta(
        budget.get("delta"), f"{where}: budget delta"
    )


def recompute(ledger_entries: Iterable[Mapping[str, Any]], tolerance: float = 0.05) -> Report:
    """Recompute every claimed epsilon and per-party total (see module docs).
    `ledger_entries`: the ledger's lines in order (e.g. `Ledger(path).entries()`);
    line numbers in the report are 1-based positions in it. Raises RecomputeError
    (naming the line) on a malformed mechanism or number."""
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise ValueError(f"tolerance must be a finite non-negative number, got {tolerance!r}")
    report = Report(tolerance)
    states: dict[str, _PartyState] = {}
    parsed: list[tuple[int, Mapping[str, Any], dp_event.DpEvent]] = []
    for number, entry in enumerate(ledger_entries, start=1):  # validate everything before any accounting
        where = f"line {number}"
        if not isinstance(entry, Mapping):
            raise RecomputeError(f"{where}: not a JSON object")
        mechanism = entry.get("mechanism")
        if mechanism is None:
            report.skipped.append(number)
            continue
        try:
            parsed.append((number, entry, event_from_json(mechanism)))
        except RecomputeError as err:
            raise RecomputeError(f"{where}: malformed {err}") from err
    for number, entry, event in parsed:
        where = f"line {number}"
        party = entry.get("party")
        if not isinstance(party, str):
            raise RecomputeError(f"{where}: party must be a string, got {party!r}")
        accountant = str(entry.get("accountant", ""))
        delta = _delta(entry.get("delta"), f"{where}: delta")
        claimed = _ledger_value(entry.get("epsilon"), f"{where}: epsilon")
        claimed_total = _ledger_value(entry.get("total_epsilon"), f"{where}: total_epsilon")
        budget_epsilon, budget_delta = _budget(entry, where, delta)
        state = states.get(party)
        if entry.get("budget") is None and state is not None:  # no budget logged: the party's earlier one holds
            budget_epsilon, budget_delta = state.budget_epsilon, state.delta

        # This release alone, at the entry's delta.
        rdp, pld = _rdp(), _pld()
        _compose(rdp, event, where)
        _compose(pld, event, where)
        rdp_eps, pld_eps = _epsilon(rdp, delta), _epsilon(pld, delta)
        recomputed, status, reason = _judge(claimed, rdp_eps, pld_eps, accountant, tolerance)

        # The party's running composition, at its budget's delta.
        if state is None:
            state = states[party] = _PartyState(_rdp(), _pld(), budget_delta, budget_epsilon)
        elif (budget_epsilon, budget_delta) != (state.budget_epsilon, state.delta):
            state.reasons.append(f"budget changed at line {number}")
            state.running_status = STATUS_MISMATCH
            state.budget_epsilon, state.delta = budget_epsilon, budget_delta
        if state.entries == 0 and state.delta == delta:  # the running total is this release alone
            state.rdp, state.pld = rdp, pld
            state.rdp_total, state.pld_total = rdp_eps, pld_eps
        else:
            _compose(state.rdp, event, where)
            _compose(state.pld, event, where)
            state.rdp_total, state.pld_total = _epsilon(state.rdp, state.delta), _epsilon(state.pld, state.delta)
        state.entries += 1
        state.claimed_total = claimed_total
        total, total_status, total_reason = _judge(
            claimed_total, state.rdp_total, state.pld_total, accountant, tolerance
        )
        if total_status != STATUS_OK:
            state.reasons.append(f"line {number}: total {total_status}: {total_reason}")
            state.running_status = total_status if state.running_status == STATUS_OK else state.running_status
            if status == STATUS_OK:
                status, reason = total_status, f"total_epsilon {total_reason}"
        report.entries.append(
            EntryCheck(
                number, party, str(entry.get("kind", "")), accountant, delta, claimed,
                rdp_eps, pld_eps, recomputed, claimed_total, total, status, reason,
            )
        )  # fmt: skip

    for party, s in states.items():
        total = min(s.rdp_total, s.pld_total)
        reasons, status = list(s.reasons), s.running_status
        if s.budget_epsilon is not None and (
            s.claimed_total > s.budget_epsilon or total > s.budget_epsilon + _allowed(tolerance, s.budget_epsilon)
        ):
            status = STATUS_OVER_BUDGET
            reasons.append(
                f"total {total:.4g} (claimed {s.claimed_total:.4g}) over the budget {s.budget_epsilon:.4g} "
                f"at delta {s.delta:g}"
            )
        report.parties.append(
            PartyCheck(
                party, s.entries, s.delta, s.claimed_total, s.rdp_total, s.pld_total, total,
                s.budget_epsilon, status, tuple(reasons),
            )
        )  # fmt: skip
    return report


def recompute_quietly(ledger_entries: Iterable[Mapping[str, Any]], tolerance: float = 0.05) -> Report:
    """`recompute` without dp-accounting's warnings and RDP's order-convergence log chatter."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        level = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            return recompute(ledger_entries, tolerance=tolerance)
        finally:
            logging.disable(level)
