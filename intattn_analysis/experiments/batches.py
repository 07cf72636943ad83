"""Edit batches of facts under several named alpha settings, one stored unit per result.

Both the alpha sweep (alpha 0, 0.1, ..., 1 and the traced alpha) and the comparison of
alpha estimators (one alpha per estimator) are the same procedure: for each batch,
evaluate the unedited model, compute the targets ``z*`` once (they do not depend on
alpha), then for each setting write the batch with IntAttn-Edit, evaluate, and restore
the weights bit for bit. :func:`run_alpha_settings` does it with a
:class:`~intattn_analysis.experiments.store.ResultStore`: every (batch, setting) and
each batch's pre-edit evaluation is a unit, written as soon as it is done, and skipped
when it is already stored, so a killed run resumes and shards split the batches.

Alpha 0 is MEMIT exactly (the solver skips the attention write; tested bit for bit), so
the setting ``"0"`` is the MLP-only baseline every other setting is paired against.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from typing import Any, Mapping, Sequence

from tqdm import tqdm

from ..editors import edit
from ..facts import Fact
from ..hparams import EditHparams
from ..loading import ModelHandle
from ..metrics import evaluate
from ..targets import compute_z
from .store import STORE_FORMAT, ResultStore

__all__ = ["alpha_label", "alpha_value", "batch_key", "facts_digest", "run_alpha_settings",
           "shard_batches"]

#: Hyperparameter fields that only the targets read (the same z* serves every alpha).
_SOLVE_ONLY = ("alpha",)


def alpha_label(alpha: float | Mapping[int, float]) -> str:
    """A setting's short name: ``"0.3"`` for a number, ``"3:0.01,4:0,5:0"`` per layer."""
    if isinstance(alpha, Mapping):
        return ",".join(f"{l}:{float(a):.4g}" for l, a in sorted(alpha.items()))
    return f"{float(alpha):g}"


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


def alpha_value(alpha: float | Mapping[int, float]) -> float | dict[str, float]:
    """The exact alpha, as it goes into a key (JSON object keys are strings)."""
    if isinstance(alpha, Mapping):
        return {str(l): float(a) for l, a in sorted(alpha.items())}
    return float(alpha)


def _fact_rows(evaluation) -> list[dict]:
    """The per-fact metrics; ``Fact.key`` is stored as ``fact_key``."""
    frame = evaluation.per_fact.drop(columns=["generation"], errors="ignore")
    frame = frame.rename(columns={"key": "fact_key"})
    frame.insert(0, "position", range(len(frame)))  # the fact's place in its batch: the pairing key
    return frame.to_dict(orient="records")


def run_alpha_settings(
    model: ModelHandle,
    batches: Sequence[Sequence[Fact]],
    settings: Mapping[str, float | Mapping[int, float]],
    hparams: EditHparams,
    store: ResultStore,
    *,
    dataset: str,
    moments: Mapping | None = None,
    metrics: Sequence[str] = ("knowedit", "residue", "fluency"),
    fluency_tokens: int = 50,
    shard: tuple[int, int] | None = None,
    targets_cache=None,
    labels: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> int:
    """Evaluate IntAttn-Edit with each named alpha setting on each batch of this shard.

    Args:
        batches: every batch of the experiment (the shard picks its own by number, so
            that all shards agree on what batch ``b`` is).
        settings: ``{name: alpha}``; an alpha is a number or ``{layer: alpha}``.
        hparams: the edit's settings; each setting replaces only ``alpha``.
        store: where units are read and written.
        dataset: the dataset's name, a label and part of every key.
        labels: extra columns for every row (e.g. ``{"estimator": ...}`` is not needed:
            the setting's name is the ``setting`` column).

    Returns the number of units computed in this call (0 when everything was stored).
    Rows carry ``model``, ``dataset``, ``batch``, ``setting`` (``"pre-edit"`` for the
    unedited model), ``alpha`` (the label of the alpha used), ``position`` (the fact's
    place in its batch; ``(batch, position)`` pairs a fact across settings, since record
    ids may be missing or repeated), ``fact_key`` and the per-fact metrics.
    """
    if not settings:
        raise ValueError("settings is empty; name at least one alpha setting")
    metrics = tuple(metrics)
    mine = shard_batches(len(batches), shard)
    base = {k: v for k, v in hparams.effective_dict().items() if k not in _SOLVE_ONLY}
    eval_key = {"metrics": list(metrics), "fluency_tokens": fluency_tokens}
    row_labels = {"model": model.name, "dataset": dataset, **(labels or {})}

    def units_of(b: int) -> dict[str, tuple[dict, str]]:
        """``{setting: (key, file label)}`` of batch ``b``, the pre-edit unit first."""
        bkey = batch_key(model, dataset, b, batches[b])
        units = {"pre-edit": ({**bkey, "unit": "pre-edit", **eval_key}, f"b{b:03d}-pre")}
        for name, alpha in settings.items():
            units[name] = ({**bkey, "unit": "edit", "method": "intattn", "hparams": base,
                            "alpha": alpha_value(alpha), **eval_key}, f"b{b:03d}-{name}")
        return units

    todo = []
    for b in mine:
        units = units_of(b)
        stored = {name for name, (key, label) in units.items() if store.has(key, label)}
        if len(stored) < len(units):
            todo.append((b, units, stored, [n for n in settings if n not in stored]))
    computed = 0
    steps = tqdm(total=sum(1 + len(m) for *_, m in todo), desc=f"{model.name} {dataset}",
                 disable=not progress)
    try:
        for b, units, stored, missing in todo:
            batch = list(batches[b])
            start = time.perf_counter()
            pre = evaluate(model, batch, metrics=metrics, fluency_tokens=fluency_tokens, progress=False)
            if "pre-edit" not in stored:
                key, label = units["pre-edit"]
                store.write_unit(key, _with_seconds(_fact_rows(pre), time.perf_counter() - start),
                                 label, {**row_labels, "batch": b, "setting": "pre-edit", "alpha": None})
                computed += 1
            steps.update()
            if not missing:
                continue
            targets = compute_z(model, batch, hparams, progress=False, cache_dir=targets_cache)
            for name in missing:
                alpha = settings[name]
                start = time.perf_counter()
                with edit(model, batch, method="intattn", hparams=hparams.replace(alpha=alpha),
                          moments=moments, targets=targets, progress=False):
                    post = evaluate(model, batch, pre=pre, metrics=metrics,
                                    fluency_tokens=fluency_tokens, progress=False)
                key, label = units[name]
                store.write_unit(key, _with_seconds(_fact_rows(post), time.perf_counter() - start),
                                 label,
                                 {**row_labels, "batch": b, "setting": name,
                                  "alpha": alpha_label(alpha)})
                computed += 1
                steps.update()
    finally:
        steps.close()
    return computed


def _with_seconds(rows: list[dict], seconds: float) -> list[dict]:
    return [{**row, "seconds": seconds} for row in rows]
