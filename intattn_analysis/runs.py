"""Edit-and-evaluate runs: batches of facts, several methods, one results table.

The paper's tables come from one procedure, repeated per batch of edits: evaluate the
unedited model, compute the shared targets ``z*`` once, then for each method write the
batch, evaluate, and restore the weights. :func:`edit_batches` does exactly that and returns
one metrics row per (batch, method), ready for :func:`intattn_analysis.reporting.main_table`.
:func:`editable_batches` cuts a benchmark into batches, leaving out (and listing) the
records that ask for no change. Notebook 03 and ``intattn evaluate`` both use them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import pandas as pd
from tqdm import tqdm

from . import reporting
from .datasets import DatasetWarning
from .editors import edit, editor
from .editors.api import asks_another_answer, batch_targets
from .facts import Fact
from .hparams import EditHparams, hparams_for
from .loading import ModelHandle, cache_root
from .metrics import evaluate
from .targets import ZTargets

__all__ = ["BatchRun", "edit_batches", "editable_batches"]


def editable_batches(
    facts: Sequence[Fact], batch_size: int, n_batches: int | None = None, *, offset: int = 0
) -> tuple[list[list[Fact]], list[Fact]]:
    """Consecutive batches of ``batch_size`` facts that change an answer.

    Records whose ``target_new`` equals ``target_true`` (nothing to write; KnowEdit's
    ZsRE test split has 43) are left out and returned as the second value so that the
    caller can report them. ``offset`` skips that many editable facts first;
    ``n_batches=None`` takes every full batch.

    A batch never asks one prompt for two answers (one solve cannot write both, and
    :func:`intattn_analysis.edit` refuses such a batch): a record that asks the same
    subject and prompt as an earlier record *of the same batch* for another answer moves
    to the next batch, and the batch is filled by the records after it, with a
    :class:`~intattn_analysis.datasets.DatasetWarning` naming both. Batches without such
    a pair are exactly the consecutive slices. (KnowEdit's ZsRE test split asks ten of
    its questions twice with different answers; two such pairs fall in its first 500
    editable records.)
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if n_batches is not None and (not isinstance(n_batches, int) or n_batches < 1):
        raise ValueError(f"n_batches must be an integer >= 1 or None, got {n_batches!r}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, got {offset}")
    unchanged = [f for f in facts if not f.changes_answer]
    editable = [f for f in facts if f.changes_answer][offset:]
    if len(editable) < batch_size:
        raise ValueError(
            f"{len(editable)} editable fact(s) after offset {offset}: not one batch of "
            f"{batch_size}; lower batch_size or offset"
        )
    batches = _conflict_free_batches(editable, batch_size, n_batches)
    if n_batches is not None and len(batches) < n_batches:
        raise ValueError(
            f"{n_batches} batches of {batch_size} asked for, but only {len(batches)} full "
            f"batch(es) of editable facts are left after offset {offset}"
        )
    return batches, unchanged


def _conflict_free_batches(editable: list[Fact], batch_size: int,
                           n_batches: int | None) -> list[list[Fact]]:
    """Full batches taken in order from ``editable``; a record whose (subject, prompt) an
    earlier record of the batch asks for another answer waits for the next batch."""
    pending, batches = editable, []
    while len(pending) >= batch_size and (n_batches is None or len(batches) < n_batches):
        batch: list[Fact] = []
        answers: dict[tuple[str, str], Fact] = {}
        deferred: list[Fact] = []
        for i, fact in enumerate(pending):
            if len(batch) == batch_size:
                deferred.extend(pending[i:])
                break
            first = answers.setdefault((fact.subject, fact.prompt), fact)
            if asks_another_answer(first, fact):
                warnings.warn(
                    f"{fact.text!r} is asked for {first.target_new!r} and, later, for "
                    f"{fact.target_new!r}; one batch can write only one answer, so batch "
                    f"{len(batches)} leaves the later record to the next batch",
                    DatasetWarning, stacklevel=3,
                )
                deferred.append(fact)
                continue
            batch.append(fact)
        if len(batch) < batch_size:
            break
        batches.append(batch)
        pending = deferred
    return batches


@dataclass
class BatchRun:
    """What :func:`edit_batches` measured.

    Attributes:
        records: one row per (batch, method), ``"pre-edit"`` included: the labels and
            every summary metric (:func:`intattn_analysis.reporting.record`).
        timings: one row per (batch, method): seconds for targets, solve and the edit.
        targets: the shared ``z*`` of each batch (index = batch number).
        per_fact: the per-fact metrics of every evaluation, labelled like ``records``.
    """

    records: pd.DataFrame
    timings: pd.DataFrame
    targets: list[ZTargets] = field(default_factory=list)
    per_fact: pd.DataFrame | None = None

    def table(self, metrics: Sequence[str] = reporting.MAIN_METRICS) -> pd.DataFrame:
        """Mean, std and batch count per (model, dataset, method)."""
        return reporting.main_table(self.records, metrics=metrics)


def edit_batches(
    model: ModelHandle,
    batches: Sequence[Sequence[Fact]],
    methods: Sequence[str],
    hparams: EditHparams | Mapping[str, object] | None = None,
    *,
    moments: Mapping | None = None,
    dataset: str = "",
    metrics: Sequence[str] = ("knowedit", "counterfact", "residue", "fluency"),
    fluency_tokens: int = 50,
    targets_cache: str | Path | None | bool = True,
    progress: bool = True,
) -> BatchRun:
    """Evaluate, edit with each method, evaluate again and restore, batch by batch.

    ``hparams`` is one :class:`EditHparams` for ``memit``, ``intattn`` and ``attn`` (the
    methods that split one residual), a ``{method: hparams}`` mapping, or ``None``; a
    method it does not cover runs with its own defaults
    (:func:`intattn_analysis.hparams_for`).

    The closed-form family's targets depend only on the unedited model, the facts, the
    last edited layer and the target settings, so the methods of a batch that agree on
    these share them (computed once per batch); ROME and fine-tuning work out their own. They are the
    expensive part (about 4 s per fact on a 2-core CPU with SmolLM2), so each fact's target is
    cached on disk (``targets_cache``: ``True`` for ``<cache root>/targets``, a folder,
    or ``False``/``None`` for no cache; see :func:`intattn_analysis.compute_z`). The
    weights are restored bit for bit after each method, so methods and batches do not
    see each other's edits. If a batch fails, the exception carries the rows recorded
    before the failure as ``error.partial_run`` (a :class:`BatchRun`).
    """
    if targets_cache is True:
        targets_cache = cache_root() / "targets"
    elif targets_cache is False:
        targets_cache = None
    if not batches:
        raise ValueError("batches is empty; pass at least one batch of facts")
    if not methods:
        raise ValueError("methods is empty; name at least one of intattn_analysis.METHODS")
    records, timings, per_fact, targets_of = [], [], [], []
    steps = tqdm(total=len(batches) * (len(methods) + 1), desc=f"{model.name} {dataset}".strip(),
                 disable=not progress)
    try:
        _run_batches(model, batches, methods, hparams, moments, dataset, metrics, fluency_tokens,
                     targets_cache, steps, records, timings, per_fact, targets_of)
    except BaseException as error:
        # what finished is not lost: it travels with the exception
        error.partial_run = BatchRun(  # type: ignore[attr-defined]
            records=pd.DataFrame(records), timings=pd.DataFrame(timings), targets=targets_of,
            per_fact=pd.concat(per_fact, ignore_index=True) if per_fact else None,
        )
        raise
    finally:
        steps.close()
    return BatchRun(
        records=pd.DataFrame(records),
        timings=pd.DataFrame(timings),
        targets=targets_of,
        per_fact=pd.concat(per_fact, ignore_index=True),
    )


def _run_batches(model, batches, methods, hparams, moments, dataset, metrics, fluency_tokens,
                 targets_cache, steps, records, timings, per_fact, targets_of) -> None:
    for b, batch in enumerate(batches):
        labels = {"model": model.name, "dataset": dataset, "batch": b}
        pre = evaluate(model, batch, pre=None, metrics=metrics, fluency_tokens=fluency_tokens,
                       progress=False)
        records.append(reporting.record(pre, **labels, method="pre-edit"))
        per_fact.append(pre.per_fact.assign(**labels, method="pre-edit"))
        shared: dict = {}
        steps.update()
        for method in methods:
            editor(method)  # an unknown name is an EditError naming the known ones
            hp = _method_hparams(model, method, hparams)
            known = len(shared)
            targets = batch_targets(model, batch, method, hp, shared, targets_cache)
            if len(shared) > known:
                targets_of.append(targets)
            with edit(model, batch, method=method, hparams=hp, moments=moments,
                      targets=targets, progress=False) as result:
                post = evaluate(model, batch, pre=pre, metrics=metrics,
                                fluency_tokens=fluency_tokens, progress=False)
            records.append(reporting.record(post, **labels, method=method))
            per_fact.append(post.per_fact.assign(**labels, method=method))
            timings.append({**labels, "method": method,
                            "targets_s": targets.seconds if targets is not None else result.timings["targets"],
                            **result.timings})
            steps.update()


#: The methods a single :class:`EditHparams` given to :func:`edit_batches` applies to.
SHARED_HPARAMS_METHODS = ("memit", "intattn", "attn")


def _method_hparams(model: ModelHandle, method: str, hparams):
    if isinstance(hparams, Mapping):
        return hparams[method] if method in hparams else hparams_for(model, method)
    if hparams is not None and method in SHARED_HPARAMS_METHODS:
        return hparams
    return hparams_for(model, method)
