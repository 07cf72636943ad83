"""Experiment ``precision``: the same edits with the model loaded in bfloat16 and in float32, paired.

A 7B model fits one GPU in bfloat16, so that is how the paper's models are edited in
practice; this experiment says what the lower precision costs. For each dtype of the
scale (float32, the reference, and bfloat16; float16 on request) the model is loaded in
that dtype, and the closed-form editors of :data:`ROWS` write the same batch of test
edits with the model's defaults, are evaluated with the ``editors`` experiment's metrics
and are restored: the ``editors`` experiment's units (:func:`.editors.run_methods`) with
the dtype as a row column. A unit's key names the model's dtype already
(:func:`.units.batch_key`), so the float32 units are the very units of the ``editors``
experiment and give its rows.

Every step runs in the model's dtype except where the precision policy says otherwise
(``docs/design.md``, "Precision"): second moments are sums of float32 products in
float64, the solves are float64, ``z*`` and its residual delta are float32, the update
is cast once to the weight's dtype, and a restore puts back the saved weights bit for
bit. The corpus text of the moments is the checkpoint's float32 samples for every dtype
(:class:`intattn_analysis.corpus.ModelSamples`); the context prefixes of the targets are
generated greedily by the model as loaded, so they may differ between dtypes.

:func:`summarise` pairs each dtype with float32 fact by fact, the unedited model too
(``pre-edit``: what the precision alone moves), with Holm's correction over each dtype's
family (every row on the four KnowEdit metrics).

Scales: the ``editors`` experiment's, so that the float32 units are its own: ``ci``, 3
ZsRE test facts, second moments from 20,000 tokens, short generations; ``paper``, 1 batch
of 100 with the models' own settings. On a CPU without bfloat16 matrix instructions
PyTorch emulates bfloat16, and its backward passes are far slower than float32's
(``benchmarks/bench_precision.py`` prints the ratio).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import pandas as pd
import torch

from ..answers import GenerationSettings
from ..intervals import holm_within, paired_against, tidy_intervals
from ..loading import EMBEDDED_MODELS, ModelHandle, load_model
from ..reporting import GENERATION_SCORES, MAIN_METRICS, VERDICT_METRICS
from .common import dataset_batches, dataset_label, metric_columns, resolve_scale
from .editors import method_settings, run_methods
from .settings import with_settings
from .store import ResultStore, check_unique
from .units import with_protocol

__all__ = ["DTYPES", "NAME", "REFERENCE", "ROWS", "SCALES", "PrecisionScale", "model_in", "run", "summarise",
           "tables"]

NAME = "precision"

#: The rows compared: the closed-form editors whose arithmetic the precision policy
#: governs (second moments, float64 solves, float32 targets).
ROWS: tuple[str, ...] = ("MEMIT", "IntAttn-Edit", "AlphaEdit")
#: The dtype every other is paired with.
REFERENCE = "float32"
#: The dtypes a scale may name.
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class PrecisionScale:
    """How much to run: ``dtypes`` (the reference first), the batches, the metrics, and
    the corpus sample of the second moments (``None``: each method's default)."""

    batch_size: int
    n_batches: int
    dtypes: tuple[str, ...] = (REFERENCE, "bfloat16")
    mom2_n_tokens: int | None = None
    fluency_tokens: int = 50
    metrics: tuple[str, ...] = ("knowedit", "residue", "fluency")
    methods: tuple[str, ...] = ROWS
    protocol: str = "teacher-forced"
    generation: GenerationSettings = GenerationSettings()

    def __post_init__(self) -> None:
        unknown = [d for d in self.dtypes if d not in DTYPES]
        if unknown:
            raise ValueError(f"PrecisionScale dtypes {unknown} are not among {list(DTYPES)}")
        if not self.dtypes or self.dtypes[0] != REFERENCE:
            raise ValueError(f"PrecisionScale dtypes must start with the reference {REFERENCE!r}, "
                             f"got {list(self.dtypes)}")


SCALES: dict[str, PrecisionScale] = {
    "ci": PrecisionScale(batch_size=3, n_batches=1, mom2_n_tokens=20_000, fluency_tokens=20),
    "paper": PrecisionScale(batch_size=100, n_batches=1),
}


def model_in(model: ModelHandle, dtype: str) -> ModelHandle:
    """``model`` itself where it is loaded in ``dtype``, else the same checkpoint loaded
    again in ``dtype`` on the same device. An edited model is refused: the reload would
    not carry its edits."""
    if model.dtype == getattr(torch, dtype):
        return model
    if model.open_edits:
        raise ValueError(f"{model.name} has {model.open_edits} edit(s) applied; a copy in {dtype} would be "
                         "the unedited checkpoint. Restore the edits first")
    revision = None if model.name in EMBEDDED_MODELS else model.revision
    return load_model(model.name, dtype=dtype, device=model.device, revision=revision)


def run(
    model: ModelHandle, dataset: str, scale: str | PrecisionScale, root, *,
    shard: tuple[int, int] | None = None, protocol: str | None = None,
    generation: GenerationSettings | None = None, progress: bool = True,
) -> ResultStore:
    """Run (or resume) this shard's units in every dtype of the scale: ``model`` itself
    for its own dtype and one more loaded copy at a time for the others; returns the
    store. ``protocol`` and ``generation`` override the scale's evaluation protocol."""
    scale = resolve_scale(scale, SCALES, protocol, generation)
    store = ResultStore(root, NAME)
    batches = dataset_batches(dataset, scale.batch_size, scale.n_batches)
    for dtype in scale.dtypes:
        handle = model_in(model, dtype)
        run_methods(handle, batches, method_settings(handle, scale.methods, scale.mom2_n_tokens), store,
                    dataset=dataset_label(dataset), metrics=scale.metrics, fluency_tokens=scale.fluency_tokens, shard=shard,
                    protocol=scale.protocol, generation=scale.generation, columns={"dtype": dtype},
                    progress=progress)
        if handle is not model:  # one extra copy at a time
            del handle
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return store


#: The columns of the paired table.
PAIRED_COLUMNS = ["model", "dataset", "protocol", "dtype", "reference", "setting", "metric", "diff", "ci_low",
                  "ci_high", "p_value", "n_edits"]


def summarise(store: ResultStore, reference: str = REFERENCE) -> dict[str, pd.DataFrame]:
    """The comparison from whatever the store holds.

    Returns:
        ``intervals``: per (model, dataset, protocol, dtype, setting, metric): ``mean``,
        ``ci_low``, ``ci_high`` (percent for shares) and ``n_edits``;
        ``paired``: per (model, dataset, protocol, dtype other than ``reference``,
        setting, metric): the mean per-fact difference dtype minus ``reference`` on the
        same facts, its 95% interval, p-value and ``p_holm`` (Holm over each (model,
        dataset, protocol, dtype): every setting, ``pre-edit`` included, on the four
        KnowEdit metrics of :data:`~intattn_analysis.reporting.VERDICT_METRICS`; the other
        metrics another family);
        ``seconds``: mean seconds per batch edit (the edit alone, then with its
        evaluation) per (model, dataset, dtype, setting), teacher-forced units.
    """
    rows = store.rows()
    if rows.empty:
        raise ValueError(f"{store!r} holds no results yet; run the experiment first")
    rows = with_protocol(rows)
    check_unique(rows, ["model", "dataset", "protocol", "dtype", "setting", "batch", "position"])
    metrics = metric_columns(rows, MAIN_METRICS + GENERATION_SCORES)
    intervals = tidy_intervals(rows, ["model", "dataset", "protocol", "dtype", "setting"], metrics)
    swapped = rows.rename(columns={"setting": "row", "dtype": "setting"})
    paired = pd.DataFrame(paired_against(swapped, metrics, reference, groups=["model", "dataset", "protocol", "row"],
                                         on=["batch", "position"]))
    if paired.empty:
        paired = pd.DataFrame(columns=PAIRED_COLUMNS)
    else:
        paired = paired.rename(columns={"setting": "dtype", "baseline": "reference", "row": "setting"})
        paired = paired[PAIRED_COLUMNS]
    paired = holm_within(paired, ["model", "dataset", "protocol", "dtype"], VERDICT_METRICS)
    edited = rows[(rows["setting"] != "pre-edit") & (rows["protocol"] == "teacher-forced")]
    seconds = (edited.groupby(["model", "dataset", "dtype", "setting", "batch"], sort=False)[["edit_seconds", "seconds"]]
               .first().groupby(["model", "dataset", "dtype", "setting"], sort=False).mean().reset_index())
    return {"intervals": intervals, "paired": paired, "seconds": seconds}


def tables(root) -> dict[str, pd.DataFrame]:
    """:func:`summarise` of the store under ``root`` (what ``intattn run`` writes as CSVs), each row
    labelled with its settings id, and the table of those ids (:func:`.settings.with_settings`)."""
    store = ResultStore(root, NAME)
    return with_settings(summarise(store), store)

