"""IntAttn-Edit under several named alpha settings on the same batches, one unit per result.

Both the alpha sweep (alpha 0, 0.1, ..., 1 and the traced alpha) and the comparison of
alpha estimators (one alpha per estimator) run the same units: for each batch, the
unedited model's evaluation (``pre-edit``), and IntAttn-Edit at each setting's alpha,
evaluated and restored (:func:`.runner.run_cells`). The targets ``z*`` do not depend on
alpha, so every setting of a batch shares them.

A setting's key names IntAttn-Edit's hyperparameters without ``alpha`` and the alpha
apart (:func:`.units.alpha_value`), so the units of one alpha are the same whichever
experiment asked for them.

Alpha 0 is MEMIT exactly (the solver skips the attention write; tested bit for bit), so
the setting ``"0"`` is the MLP-only baseline every other setting is paired against.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from ..answers import GenerationSettings
from ..facts import Fact
from ..hparams import EditHparams
from ..loading import ModelHandle
from .runner import PRE_EDIT, Cell, EvaluationMeasure, Setting, Unit, run_cells
from .units import alpha_label, alpha_value, batch_key, protocol_units, shard_batches

__all__ = ["alpha_cells", "run_alpha_settings"]

#: Hyperparameter fields that only the targets read (the same z* serves every alpha).
_SOLVE_ONLY = ("alpha",)


def alpha_cells(
    model: ModelHandle,
    batches: Sequence[Sequence[Fact]],
    settings: Mapping[str, float | Mapping[int, float]],
    hparams: EditHparams,
    *,
    dataset: str,
    metrics: Sequence[str],
    fluency_tokens: int,
    shard: tuple[int, int] | None = None,
    labels: Mapping[str, Any] | None = None,
    protocol: str = "teacher-forced",
    generation: GenerationSettings | None = None,
) -> list[Cell]:
    """The units of each batch of this shard: ``pre-edit`` (label ``b000-pre``), then
    each named alpha (``b000-<name>``). Rows carry ``model``, ``dataset``, ``batch``,
    ``setting``, ``alpha`` (the alpha's label; ``None`` before the edit) and ``labels``;
    ``labels`` do not enter the keys. Under ``protocol`` ``"generation"`` or ``"both"``
    each cell also (or only) has a generation unit (:func:`.units.protocol_units`)."""
    generation = generation or GenerationSettings()
    base = {k: v for k, v in hparams.effective_dict().items() if k not in _SOLVE_ONLY}
    eval_key = {"metrics": list(metrics), "fluency_tokens": fluency_tokens}
    columns = {"model": model.name, "dataset": dataset, **(labels or {})}
    cells = []
    for b in shard_batches(len(batches), shard):
        facts = list(batches[b])
        bkey = batch_key(model, dataset, b, facts)
        pre = Unit({**bkey, "unit": "pre-edit", **eval_key}, f"b{b:03d}-pre",
                   {**columns, "batch": b, "setting": "pre-edit", "alpha": None})
        cells.append(Cell(b, facts, PRE_EDIT, protocol_units(pre, protocol, generation, facts)))
        for name, alpha in settings.items():
            unit = Unit({**bkey, "unit": "edit", "method": "intattn", "hparams": base, "alpha": alpha_value(alpha),
                         **eval_key}, f"b{b:03d}-{name}",
                        {**columns, "batch": b, "setting": name, "alpha": alpha_label(alpha)})
            cells.append(Cell(b, facts, Setting(name, "intattn", hparams.replace(alpha=alpha)),
                              protocol_units(unit, protocol, generation, facts)))
    return cells


def run_alpha_settings(
    model: ModelHandle,
    batches: Sequence[Sequence[Fact]],
    settings: Mapping[str, float | Mapping[int, float]],
    hparams: EditHparams,
    store,
    *,
    dataset: str,
    moments: Mapping | None = None,
    metrics: Sequence[str] = ("knowedit", "residue", "fluency"),
    fluency_tokens: int = 50,
    shard: tuple[int, int] | None = None,
    targets_cache=None,
    labels: Mapping[str, Any] | None = None,
    protocol: str = "teacher-forced",
    generation: GenerationSettings | None = None,
    progress: bool = True,
) -> int:
    """Evaluate IntAttn-Edit with each named alpha setting on each batch of this shard
    (:func:`alpha_cells`); returns the number of units computed (0 when everything was
    stored).

    Args:
        batches: every batch of the experiment (the shard picks its own by number, so
            that all shards agree on what batch ``b`` is).
        settings: ``{name: alpha}``; an alpha is a number or ``{layer: alpha}``.
        hparams: the edit's settings; each setting replaces only ``alpha``.
        store: where units are read and written.
        dataset: the dataset's name, a label and part of every key.
        labels: extra columns for every row (the estimators' ``split``).
        protocol, generation: the evaluation protocol (:func:`intattn_analysis.evaluate`).
    """
    generation = generation or GenerationSettings()
    if not settings:
        raise ValueError("settings is empty; name at least one alpha setting")
    cells = alpha_cells(model, batches, settings, hparams, dataset=dataset, metrics=tuple(metrics),
                        fluency_tokens=fluency_tokens, shard=shard, labels=labels, protocol=protocol,
                        generation=generation)
    measure = EvaluationMeasure(tuple(metrics), fluency_tokens, protocol, generation)
    return run_cells(model, cells, measure, store, moments=moments,
                     targets_cache=targets_cache, desc=f"{model.name} {dataset}", progress=progress)
