"""Figures. Every function returns its matplotlib Figure; :func:`save_figure` writes it
as PNG and PDF under ``figures/`` with fixed metadata, so reruns give identical files.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import pandas as pd

from .facts import Fact

__all__ = ["figures_dir", "plot_known_by_relation", "save_figure"]


def figures_dir() -> Path:
    """``$INTATTN_FIGURES``, else the repository's ``figures/`` folder."""
    override = os.environ.get("INTATTN_FIGURES")
    path = Path(override) if override else Path(__file__).resolve().parents[1] / "figures"
    path.mkdir(parents=True, exist_ok=True)
    return path


def save_figure(fig: plt.Figure, name: str, directory: str | Path | None = None) -> list[Path]:
    """Write ``fig`` as ``name.png`` (150 dpi) and ``name.pdf``; returns the paths."""
    directory = Path(directory) if directory is not None else figures_dir()
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for suffix, metadata in ((".png", {"Software": None}), (".pdf", {"CreationDate": None, "Producer": None})):
        path = directory / f"{name}{suffix}"
        fig.savefig(path, dpi=150, bbox_inches="tight", metadata=metadata)
        paths.append(path)
    return paths


def plot_known_by_relation(facts: Sequence[Fact], models: Sequence[str]) -> plt.Figure:
    """Bars per relation: how many facts there are, and how many each model knows."""
    import seaborn as sns

    totals = Counter(f.relation for f in facts)
    relations = sorted(totals, key=lambda r: (-totals[r], str(r)))
    rows = [{"relation": r, "facts": "all", "count": totals[r]} for r in relations]
    for model in models:
        known = Counter(f.relation for f in facts if f.known.get(model))
        rows += [{"relation": r, "facts": f"known by {model}", "count": known[r]} for r in relations]
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(relations) + 1.2))
    sns.barplot(pd.DataFrame(rows), y="relation", x="count", hue="facts", ax=ax, orient="h")
    ax.set_xlabel("facts")
    ax.set_ylabel("")
    ax.set_title("Built-in facts per relation, and how many each model knows")
    ax.legend(loc="lower right", frameon=False)
    fig.tight_layout()
    return fig
