"""Batches of facts to edit: consecutive, every record changing an answer, and no batch
asking one prompt for two answers."""

from __future__ import annotations

import warnings
from typing import Sequence

from .datasets import DatasetWarning
from .editors.api import asks_another_answer
from .facts import Fact

__all__ = ["editable_batches"]


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
