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

__all__ = ["GENERATION_PART", "aliases_digest", "alpha_label", "alpha_value", "batch_key", "fact_rows",
           "facts_digest", "generation_metrics", "method_key", "part_protocol", "protocol_units", "protocols_of",
           "shard_batches", "slug", "with_protocol"]


def facts_digest(facts: Sequence[Fact]) -> str:
    """A hash of everything in the facts: subject, prompt, answers, every probe (rephrases,
    portability, locality, neighbourhood), relation and record id; not the ``known``
    flags, which describe models, not the facts, and not the probes' aliases, which only
    the generation protocol reads (its units add :func:`aliases_digest`)."""
    payload = []
    for fact in facts:
        record = dataclasses.asdict(fact)
        record.pop("known", None)
        for name in ("neighborhood", "portability", "locality"):
            record[name] = [[p.prompt, p.answer, p.kind] for p in getattr(fact, name)]
        payload.append(record)
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def aliases_digest(facts: Sequence[Fact]) -> str:
    """A hash of the probes' aliases (what the generation protocol scores besides the
    answers that :func:`facts_digest` covers)."""
    payload = [[list(p.aliases) for name in ("portability", "locality", "neighborhood") for p in getattr(f, name)]
               for f in facts]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


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


# --------------------------------------------------------------------------- protocols
#: The part of a cell measured under the generation protocol (the teacher-forced part is
#: the cell's usual part, so that its units keep the keys they had before the generation
#: protocol existed).
GENERATION_PART = "generation"


def protocols_of(protocol: str) -> tuple[str, ...]:
    """The single protocols that ``protocol`` (``"teacher-forced"``, ``"generation"`` or
    ``"both"``) measures."""
    from ..metrics import PROTOCOLS

    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
    return ("teacher-forced", "generation") if protocol == "both" else (protocol,)


def part_protocol(part: str) -> str:
    """The protocol a cell's part is measured under."""
    return "generation" if part == GENERATION_PART else "teacher-forced"


def generation_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    """The metric sets measured in a generation part: those with a generation form, less
    fluency (the same greedy continuation under both protocols, stored once with the
    teacher-forced part)."""
    return tuple(m for m in metrics if m in ("knowedit", "residue"))


def protocol_units(unit, protocol: str, generation, facts: Sequence[Fact], part: str = "") -> dict:
    """``{part: unit}`` for one teacher-forced unit under ``protocol``: the unit itself
    where the teacher-forced protocol is measured, and a generation unit where the
    generation protocol is: the same key with the protocol's settings
    (:meth:`~intattn_analysis.answers.GenerationSettings.key`) and the probes' aliases,
    the label ending ``-gen``, and rows labelled ``protocol: generation`` and the
    ``prompt_form`` (teacher-forced
    rows carry no ``protocol`` column; :func:`with_protocol` fills it in)."""
    units = {}
    protocols = protocols_of(protocol)
    if "teacher-forced" in protocols:
        units[part] = unit
    if "generation" in protocols:
        key = {**unit.key, "evaluation": "generation", "generation": generation.key(), "aliases": aliases_digest(facts)}
        units[GENERATION_PART] = dataclasses.replace(unit, key=key, label=f"{unit.label}-gen",
                                                     labels={**unit.labels, "protocol": "generation",
                                                             "prompt_form": generation.prompt_form})
    return units


def with_protocol(rows):
    """``rows`` (a store's table) with a ``protocol`` column, ``"teacher-forced"`` where a
    row has none (every row stored before the generation protocol, and every
    teacher-forced row since)."""
    rows = rows.copy()
    if "protocol" not in rows.columns:
        rows["protocol"] = "teacher-forced"
    else:
        rows["protocol"] = rows["protocol"].fillna("teacher-forced")
    return rows
