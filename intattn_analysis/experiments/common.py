"""What the experiments share: datasets by name, batches, second moments, settings.

Every experiment is run on one model and one dataset at one *scale*: ``"ci"`` (small
enough for the test suite and notebooks) or ``"paper"`` (the sizes that decide the
paper's claims). Each experiment module defines its own :class:`Scale` values.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Sequence

from ..architectures import MODULES
from ..batching import editable_batches
from ..cache import kind_folder
from ..datasets import benchmark_path, load_facts
from ..editors.moments import moments_for
from ..facts import Fact
from ..hparams import EditHparams
from ..loading import ModelHandle

__all__ = ["DATASETS", "dataset_facts", "dataset_label", "edit_moments", "parse_shard",
           "resolve_scale", "targets_cache"]

#: Short names for the benchmark files the experiments use (any path works as well).
DATASETS: dict[str, str] = {
    "zsre": "knowedit/ZsRE-test-all.json",
    "counterfact": "knowedit/wiki_counterfact_test_cf.json",
    "zsre-train": "zsre/zsre_mend_train-1k.json",
}


def dataset_label(dataset: str) -> str:
    """The name a dataset is stored under: its short name, ``builtin`` or the file stem."""
    if dataset in DATASETS or dataset == "builtin":
        return dataset
    return Path(dataset).stem


def _dataset_path(dataset: str) -> Path | str:
    if dataset == "builtin":
        return "builtin"
    relative = DATASETS.get(dataset, dataset)
    path = Path(relative)
    return path if path.exists() else benchmark_path(relative)


def dataset_facts(dataset: str) -> list[Fact]:
    """The facts of ``dataset`` (a short name of :data:`DATASETS`, ``"builtin"``, a
    benchmark-relative name or a path). Malformed records are skipped with a warning that
    counts them (MEND's ZsRE train file has two records whose subject is not in the
    question); a test split is read strictly."""
    path = _dataset_path(dataset)
    strict = not str(path).endswith("zsre_mend_train-1k.json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        facts = load_facts(path, strict=strict)
    for warning in caught:  # passed on, naming the file rather than where it lies
        text = str(warning.message).replace(str(path), Path(path).name)
        warnings.warn(text, warning.category, stacklevel=2)
    return facts


def dataset_batches(dataset: str, batch_size: int, n_batches: int | None,
                    offset: int = 0) -> list[list[Fact]]:
    """The first ``n_batches`` batches of editable facts (records asking for no change are
    left out, as :func:`intattn_analysis.editable_batches` does)."""
    batches, _ = editable_batches(dataset_facts(dataset), batch_size, n_batches, offset=offset)
    return batches


def edit_moments(model: ModelHandle, hparams: EditHparams, progress: bool = True):
    """The corpus second moments of both modules at the edited layers (cached on disk;
    :func:`intattn_analysis.editors.moments.moments_for`); ``None`` while a plan is
    recorded (:func:`.planning.planning`), where nothing is edited."""
    from .planning import active

    if active() is not None:
        return None
    return moments_for(model, [(m, l) for m in MODULES for l in hparams.layers], hparams, progress=progress)


def targets_cache() -> Path:
    """Where targets are cached (shared with ``intattn evaluate`` and notebook 03): the
    folder of the kind ``targets`` (:func:`intattn_analysis.cache.kind_folder`)."""
    return kind_folder("targets")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` as ``(I, N)``; ``None`` for no sharding. Errors name the form expected."""
    if text is None:
        return None
    try:
        index, count = (int(part) for part in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard must look like I/N (for example 2/4), got {text!r}") from None
    if not 1 <= index <= count:
        raise ValueError(f"--shard {text}: need 1 <= I <= N")
    return index, count


def check_scale(scale: str, scales: dict[str, Any]) -> Any:
    if scale not in scales:
        raise ValueError(f"unknown scale {scale!r}; choose from {sorted(scales)}")
    return scales[scale]


def resolve_scale(scale: Any, scales: dict[str, Any], protocol: str | None = None, generation: Any = None) -> Any:
    """The scale named ``scale`` in ``scales`` (or ``scale`` itself, a scale object), with
    the protocol and generation settings given (``None`` keeps its own)."""
    from dataclasses import replace

    scale = check_scale(scale, scales) if isinstance(scale, str) else scale
    if protocol is not None:
        scale = replace(scale, protocol=protocol)
    if generation is not None:
        scale = replace(scale, generation=generation)
    return scale


def metric_columns(frame, names: Sequence[str]) -> list[str]:
    """The metrics of ``names`` the frame has values for."""
    return [m for m in names if m in frame.columns and frame[m].notna().any()]
