"""What names a unit of work: the keys, file labels and row columns experiments build.

A unit's *key* is a JSON object naming everything its rows depend on (see
:mod:`.store`); its *label* is the readable start of its file name. Every experiment
builds its keys from the pieces below, so that the same batch of facts, edited with the
same method and settings on the same model state, is named the same way wherever it is
run: :func:`batch_key` (the model state and the facts), :func:`method_key` (the method,
its hyperparameters and any code path the architecture selects) or :func:`alpha_value`
(IntAttn-Edit's balance factor, for the experiments that vary only alpha).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Mapping, Sequence

from ..editors import editor
from ..facts import Fact
from ..loading import ModelHandle
from .store import STORE_FORMAT

__all__ = ["alpha_label", "alpha_value", "batch_key", "fact_rows", "facts_digest", "method_key",
           "shard_batches", "slug"]


def facts_digest(facts: Sequence[Fact]) -> str:
    """A hash of everything in the facts: subject, prompt, answers, every probe (rephrases,
    portability, locality, neighbourhood), relation and record id; not the ``known``
    flags, which describe models, not the facts."""
    payload = []
    for fact in facts:
        record = dataclasses.asdict(fact)
        record.pop("known", None)
        payload.append(record)
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def batch_key(model: ModelHandle, dataset: str, batch: int, facts: Sequence[Fact]) -> dict[str, Any]:
    """What identifies a batch: the model's weights, the dataset, the batch number and the
    whole content of its facts (:func:`facts_digest`)."""
    return {"format": STORE_FORMAT, "model": model.state_id, "model_dtype": str(model.dtype),
            "dataset": dataset, "batch": batch, "n_facts": len(facts), "facts": facts_digest(facts)}


def method_key(model: ModelHandle, method: str, hp) -> dict[str, Any]:
    """What a stored result of ``method`` with ``hp`` on ``model`` depends on besides
    the facts: the method, its hyperparameters, and any code path the architecture
    selects (:meth:`intattn_analysis.editors.protocol.Editor.variant_of`)."""
    return {"method": method, "hparams_type": type(hp).__name__, "hparams": hp.effective_dict(),
            **editor(method).variant_of(model, hp)}


def alpha_label(alpha: float | Mapping[int, float]) -> str:
    """A setting's short name: ``"0.3"`` for a number, ``"3:0.01,4:0,5:0"`` per layer."""
    if isinstance(alpha, Mapping):
        return ",".join(f"{l}:{float(a):.4g}" for l, a in sorted(alpha.items()))
    return f"{float(alpha):g}"


def alpha_value(alpha: float | Mapping[int, float]) -> float | dict[str, float]:
    """The exact alpha, as it goes into a key (JSON object keys are strings)."""
    if isinstance(alpha, Mapping):
        return {str(l): float(a) for l, a in sorted(alpha.items())}
    return float(alpha)


def slug(name: str) -> str:
    """A row name as it appears in a unit's file label (``IntAttn-Edit+NS``: ``intattn-edit-ns``)."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def shard_batches(n_batches: int, shard: tuple[int, int] | None) -> list[int]:
    """The batch numbers shard ``(i, n)`` (1-based ``i``) runs: every ``n``-th from ``i-1``.

    Interleaving keeps the shards' sizes within one batch of each other and gives each
    shard early and late batches alike.
    """
    if shard is None:
        return list(range(n_batches))
    index, count = shard
    if not (isinstance(index, int) and isinstance(count, int) and 1 <= index <= count):
        raise ValueError(f"shard must be (i, n) with 1 <= i <= n, got {shard!r}")
    return [b for b in range(n_batches) if b % count == index - 1]


def fact_rows(evaluation) -> list[dict]:
    """The per-fact metrics of an evaluation as stored rows: ``position`` (the fact's place
    in its batch, the key that pairs a fact across settings, since record ids may be
    missing or repeated), ``Fact.key`` as ``fact_key``, and every metric; the greedy
    continuation behind Fluency is left out."""
    frame = evaluation.per_fact.drop(columns=["generation"], errors="ignore")
    frame = frame.rename(columns={"key": "fact_key"})
    frame.insert(0, "position", range(len(frame)))
    return frame.to_dict(orient="records")
