"""What an experiment would compute, asked of the experiment itself: units done, missing, stale.

Inside :func:`planning`, :func:`.runner.run_cells` and :func:`.runner.run_sequence` record
each unit they are handed (and whether the store holds it) and compute none, and the
second moments are not gathered (:func:`.common.edit_moments`). So an experiment's own
``run`` function, called inside :func:`planning`, lists exactly the units a real run of
it would look for: the plan cannot drift from the code, because it is the code. What
decides which units exist is still worked out as a run would: which built-in facts the
unedited model knows (cached on disk, :func:`intattn_analysis.known.is_known_cached`) and
the traced alphas (read from the localization store); estimator (d)'s alphas are read
from the store, and a plan without them waits on them.

An experiment whose later units depend on results not stored yet (the train choice of
estimator (e), which batch scaling, sequential editing and outdated knowledge read)
raises :class:`PlanIncomplete` once the units it can name are recorded: those are
listed, and the rest is said to wait on them.

:mod:`.status` turns plans into counts of units done, stale and missing.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

__all__ = ["Plan", "PlanIncomplete", "PlannedUnit", "active", "planning"]


class PlanIncomplete(RuntimeError):
    """The rest of an experiment's units depend on results that are not stored yet."""


@dataclass(frozen=True)
class PlannedUnit:
    """One unit a run would look for: the store folder's experiment, the file stem, the
    row labels, and whether the store holds it."""

    experiment: str
    uid: str
    labels: Mapping[str, Any]
    done: bool


@dataclass
class Plan:
    """The units recorded while :func:`planning` is active, in the order asked."""

    units: list[PlannedUnit] = field(default_factory=list)

    def record(self, store, key: Mapping[str, Any], label: str, labels: Mapping[str, Any]) -> None:
        from .store import unit_id

        self.units.append(PlannedUnit(getattr(store, "experiment", ""), unit_id(key, label), dict(labels),
                                      bool(store.has(key, label))))


_ACTIVE: contextvars.ContextVar[Plan | None] = contextvars.ContextVar("intattn_plan", default=None)


def active() -> Plan | None:
    """The plan being recorded, or ``None`` outside :func:`planning` (a real run)."""
    return _ACTIVE.get()


@contextmanager
def planning() -> Iterator[Plan]:
    """Record the units the code inside asks for instead of computing them."""
    plan = Plan()
    token = _ACTIVE.set(plan)
    try:
        yield plan
    finally:
        _ACTIVE.reset(token)
