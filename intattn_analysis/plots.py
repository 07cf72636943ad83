"""Figures. Every function returns its matplotlib Figure; :func:`save_figure` writes it
as PNG and PDF under ``figures/`` with fixed metadata, so reruns give identical files.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.ticker import MaxNLocator

from .facts import Fact

__all__ = [
    "figures_dir",
    "results_dir",
    "plot_aie_curves",
    "plot_attribution_curves",
    "plot_alpha_sweep",
    "plot_alphas",
    "plot_known_by_relation",
    "plot_batch_scaling",
    "plot_main_table",
    "plot_outdated_flow",
    "plot_severed",
    "plot_sweep_intervals",
    "plot_trace_heatmaps",
    "save_figure",
    "settings_note",
]


_REPOSITORY_FIGURES = Path(__file__).resolve().parents[1] / "figures"


def figures_dir() -> Path:
    """Where the notebooks write their figures and CSVs: ``$INTATTN_FIGURES``, else the
    repository's ``figures/`` folder. The test session points it at a temporary folder, so
    that running the notebooks under test leaves the checkout as it was."""
    override = os.environ.get("INTATTN_FIGURES")
    path = Path(override) if override else _REPOSITORY_FIGURES
    path.mkdir(parents=True, exist_ok=True)
    return path


def results_dir() -> Path:
    """Where the committed paper-scale results are read and written: ``$INTATTN_RESULTS``,
    else the repository's ``figures/`` folder (its ``paper/`` tables and store, ``tuning/``
    grids). Apart from :func:`figures_dir`, so that notebooks writing their figures
    elsewhere still show the paper-scale results."""
    override = os.environ.get("INTATTN_RESULTS")
    return Path(override) if override else _REPOSITORY_FIGURES


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


def settings_note(fig: plt.Figure, table) -> None:
    """Write, under ``fig``, the settings ids of the rows it draws (a tidy table's
    ``settings_id`` column, :mod:`intattn_analysis.experiments.settings`), so that a saved
    figure says which settings its numbers were computed at; nothing for a table without
    the column."""
    if not hasattr(table, "columns") or "settings_id" not in table.columns:
        return
    ids = sorted({part for text in table["settings_id"].dropna() for part in str(text).split("+")})
    if ids:
        fig.text(0.0, 0.0, "settings: " + ", ".join(ids) + " (the experiment's _settings.csv)", fontsize=6,
                 color="0.35", ha="left", va="top", wrap=True)


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


# =========================================================================== localization
#: ROME's colours: residual stream purple, MLP green, attention red.
KIND_COLORS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
MODULE_COLORS = {"attn": "tab:red", "mlp": "tab:green", "resid": "tab:purple"}
KIND_LABELS = {"resid": "single restored layer", "mlp": "MLP", "attn": "attention"}


def plot_trace_heatmaps(result, fact=None, *, kinds: Sequence[str] | None = None) -> plt.Figure:
    """ROME's causal-trace picture for one fact: one heatmap per kind, tokens x layers.

    Each cell is ``p(answer)`` when that state is restored in the corrupted run; darker
    means the state carries more of the fact. Subject tokens are starred and drawn in bold.
    For ``attn``/``mlp`` the column is the centre of the restored window. ``fact`` is a
    :class:`~intattn_analysis.facts.Fact`, a fact key, or ``None`` for the first fact
    traced. The colour scale starts at the corrupted run's probability, as in ROME.
    """
    table = result.to_dataframe()
    key = _fact_key(result, fact)
    part = table[table["fact"] == key]
    kinds = [k for k in (kinds or ("resid", "mlp", "attn")) if k in set(part["kind"])]
    if not kinds:
        raise ValueError(f"fact {key} has no traced kinds in this result")
    first = part.iloc[0]
    fig, axes = plt.subplots(1, len(kinds), figsize=(4.2 * len(kinds), 0.36 * part["token"].nunique() + 1.8), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        rows = part[part["kind"] == kind]
        grid = rows.pivot_table(index="token", columns="layer", values="p_restored")
        labels = (
            rows.drop_duplicates("token").set_index("token").loc[grid.index]
        )
        is_subject = labels["token_class"].str.startswith("subject").to_numpy()
        names = [
            f"{text!r}*" if subject else repr(text)
            for text, subject in zip(labels["token_text"], is_subject)
        ]
        image = ax.imshow(
            grid.to_numpy(), cmap=KIND_COLORS[kind], aspect="auto",
            vmin=float(first["p_corrupted"]), interpolation="nearest",
        )
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for tick, subject in zip(ax.get_yticklabels(), is_subject):
            tick.set_fontweight("bold" if subject else "normal")
        layers = list(grid.columns)
        step = max(1, len(layers) // 8)
        ax.set_xticks(range(0, len(layers), step), [layers[i] for i in range(0, len(layers), step)])
        ax.set_xlabel("layer" if kind == "resid" else f"centre of {result.settings['window']}-layer window")
        ax.set_title(f"restored: {KIND_LABELS[kind]}", fontsize=10)
        fig.colorbar(image, ax=ax, fraction=0.05, pad=0.02).set_label("p(answer)", fontsize=8)
    fact_obj = next(f for f in result.facts if f.key == key)
    fig.suptitle(
        f"{result.settings['model'].split('@')[0]}: {fact_obj.text!r} -> {fact_obj.target_true!r}  "
        f"(p clean {float(first['p_clean']):.2f}, corrupted {float(first['p_corrupted']):.2f})",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def _fact_key(result, fact) -> str:
    keys = [f.key for f in result.facts]
    if fact is None:
        return keys[0]
    key = fact if isinstance(fact, str) else fact.key
    if key not in keys:
        raise ValueError(f"fact {key!r} is not in this result; traced facts: {keys[:10]}")
    return key


def plot_aie_curves(results, tokens: Sequence[str] = ("subject_last", "last")) -> plt.Figure:
    """Average indirect effect per layer, attention vs MLP, with 95% confidence bands.

    ``results`` is one :class:`~intattn_analysis.tracing.TraceResult` or a mapping
    ``{label: TraceResult}`` (one row of panels per label, e.g. per model); one panel per
    token class in ``tokens``. Bands are ``aie +/- 1.96 sem`` over facts.
    """
    results = _labelled(results)
    fig, axes = plt.subplots(
        len(results), len(tokens), figsize=(4.6 * len(tokens), 2.9 * len(results)), squeeze=False
    )
    for row, (label, result) in enumerate(results.items()):
        for col, token in enumerate(tokens):
            ax = axes[row][col]
            curves = result.contributions(token)
            for module, part in curves.groupby("module", sort=False):
                color = MODULE_COLORS[module]
                ax.plot(part["layer"], part["aie"], color=color, label=KIND_LABELS[module], lw=1.6)
                ax.fill_between(part["layer"], part["ci_low"], part["ci_high"], color=color, alpha=0.18, lw=0)
            ax.axhline(0, color="0.6", lw=0.6)
            n = int(curves["n_facts"].max())
            ax.set_title(f"{label}: {token} token (n={n})", fontsize=10)
            ax.set_xlabel(f"centre of {result.settings['window']}-layer window")
            ax.set_ylabel("AIE")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_attribution_curves(table, label: str = "") -> plt.Figure:
    """Exact tracing against attribution patching, AIE per layer.

    ``table`` is :func:`~intattn_analysis.attribution.attribution_curves` (with a
    ``model`` column for several models), or ``localization_attribution_aie.csv`` for one
    ``compared`` method. One row of panels per (model, window), one panel per token class;
    attention and the MLP in their colours, exact tracing solid and the estimate dashed,
    each with its 95% interval over facts.
    """
    table = table.assign(model=table["model"] if "model" in table else "")
    methods = [m for m in dict.fromkeys(table["method"]) if m != "exact"]
    if len(methods) != 1 or "exact" not in set(table["method"]):
        raise ValueError(f"table must hold exact tracing and one attribution method; it holds {sorted(set(table['method']))}")
    panels = list(dict.fromkeys(zip(table["model"], table["window"])))
    tokens = list(dict.fromkeys(table["token"]))
    fig, axes = plt.subplots(len(panels), len(tokens), figsize=(4.6 * len(tokens), 2.9 * len(panels)),
                             squeeze=False)
    for row, (model, window) in enumerate(panels):
        for col, token in enumerate(tokens):
            ax = axes[row][col]
            part = table[(table["model"] == model) & (table["window"] == window) & (table["token"] == token)]
            for (method, module), curve in part.groupby(["method", "module"], sort=False):
                exact = method == "exact"
                color = MODULE_COLORS[module]
                ax.plot(curve["layer"], curve["aie"], color=color, lw=1.6 if exact else 1.2,
                        ls="-" if exact else "--", label=f"{KIND_LABELS[module]}, {method}")
                ax.fill_between(curve["layer"], curve["ci_low"], curve["ci_high"], color=color,
                                alpha=0.18 if exact else 0.08, lw=0)
            ax.axhline(0, color="0.6", lw=0.6)
            n = int(part["n_facts"].max())
            title = f"{model}: " if model else ""
            ax.set_title(f"{title}{token} token, window {window} (n={n})", fontsize=10)
            ax.set_xlabel(f"centre of {window}-layer window" if window > 1 else "layer")
            ax.set_ylabel("AIE")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(frameon=False, fontsize=7)
    if label:
        fig.suptitle(label, fontsize=11)
    fig.tight_layout()
    settings_note(fig, table)
    return fig


def plot_aie_table(aie, severed=None, label: str = "") -> plt.Figure:
    """The paper-scale localization from its tables: per model, the AIE of attention and
    the MLP per layer at each token class, with the 95% interval over facts, and (with
    ``severed``) the residual stream's AIE at the last subject token with how much
    severing each path lowers it.

    ``aie`` is the tidy table ``localization_aie.csv`` (model, token, module, layer, aie,
    ci_low, ci_high, n_facts); ``severed`` is ``localization_severed.csv`` (layer, aie,
    drop_mlp, drop_attn, model), drawn as the residual AIE and the AIE left once each path
    is severed.
    """
    models = list(dict.fromkeys(aie["model"]))
    tokens = list(dict.fromkeys(aie["token"]))
    columns = len(tokens) + (severed is not None)
    fig, axes = plt.subplots(len(models), columns, figsize=(4.6 * columns, 2.9 * len(models)), squeeze=False)
    for row, model in enumerate(models):
        for col, token in enumerate(tokens):
            ax = axes[row][col]
            part = aie[(aie["model"] == model) & (aie["token"] == token)]
            for module, curve in part.groupby("module", sort=False):
                color = MODULE_COLORS[module]
                ax.plot(curve["layer"], curve["aie"], color=color, label=KIND_LABELS[module], lw=1.6)
                ax.fill_between(curve["layer"], curve["ci_low"], curve["ci_high"], color=color, alpha=0.18, lw=0)
            ax.axhline(0, color="0.6", lw=0.6)
            prefix = f"{label}: " if label else ""
            ax.set_title(f"{prefix}{model}, {token} token (n={int(part['n_facts'].max())})", fontsize=10)
            ax.set_xlabel("centre of the restored window")
            ax.set_ylabel("AIE")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(frameon=False, fontsize=8)
        if severed is not None:
            ax = axes[row][-1]
            part = severed[severed["model"] == model].sort_values("layer")
            ax.plot(part["layer"], part["aie"], color=MODULE_COLORS["resid"], lw=1.6, label="no severing")
            for module in ("mlp", "attn"):
                ax.plot(part["layer"], part["aie"] - part[f"drop_{module}"], color=MODULE_COLORS[module], lw=1.4,
                        ls="--", label=f"{KIND_LABELS[module]} severed")
            ax.axhline(0, color="0.6", lw=0.6)
            ax.set_title(f"{model}: severed paths, subject_last token", fontsize=10)
            ax.set_xlabel("restored layer")
            ax.set_ylabel("AIE of the residual stream")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    settings_note(fig, aie)
    return fig


def plot_severed(plain, severed: dict, token: str = "subject_last", label: str = "") -> plt.Figure:
    """ROME's severed-path comparison: the residual-stream AIE at ``token`` restored
    normally vs with the later MLP (or attention) outputs at that token held corrupted.

    ``plain`` is a trace of kind ``resid``; ``severed`` maps ``"mlp"`` / ``"attn"`` to
    traces made with ``severed=...``. The gap between the plain curve and a severed one is
    the part of the effect that flows through that module.
    """
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    curves = {"none": plain, **severed}
    for which, result in curves.items():
        aie = result.average_indirect_effect()
        part = aie[(aie["kind"] == "resid") & (aie["token_class"] == token)]
        if part.empty:
            raise ValueError(f"the {which!r} trace has no resid rows at token class {token!r}")
        color = {"none": MODULE_COLORS["resid"], "mlp": MODULE_COLORS["mlp"], "attn": MODULE_COLORS["attn"]}[which]
        name = "no severing" if which == "none" else f"{KIND_LABELS[which]} severed"
        ax.plot(part["layer"], part["aie"], color=color, label=name, lw=1.6,
                ls="-" if which == "none" else "--")
        ax.fill_between(part["layer"], part["ci_low"], part["ci_high"], color=color, alpha=0.15, lw=0)
    ax.axhline(0, color="0.6", lw=0.6)
    ax.set_xlabel("restored layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("AIE of the residual stream")
    ax.set_title(f"{label + ': ' if label else ''}severed paths at the {token} token", fontsize=10)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    return fig


def plot_alphas(alphas: dict, edit_layers: dict | None = None) -> plt.Figure:
    """Alpha per layer for each model (``{label: LayerAlphas}``), its global alpha as a
    dashed line and, where given, the suggested edit layers shaded."""
    fig, axes = plt.subplots(1, len(alphas), figsize=(5.2 * len(alphas), 3.0), squeeze=False)
    for ax, (label, per_layer) in zip(axes[0], alphas.items()):
        layers = sorted(per_layer)
        ax.bar(layers, [per_layer[l] for l in layers], color=MODULE_COLORS["attn"], alpha=0.75,
               label="alpha (attention share)")
        global_alpha = getattr(per_layer, "global_alpha", float("nan"))
        ax.axhline(global_alpha, color="0.2", ls="--", lw=1, label=f"global alpha {global_alpha:.2f}")
        if edit_layers and label in edit_layers:
            chosen = list(edit_layers[label])
            ax.axvspan(min(chosen) - 0.5, max(chosen) + 0.5, color="0.85", zorder=0, label="edit layers")
        ax.set_ylim(0, 1)
        ax.set_xlabel("layer")
        ax.set_ylabel("alpha")
        ax.set_title(label, fontsize=10)
        ax.legend(frameon=False, fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def _labelled(results) -> dict:
    from .tracing import TraceResult

    if isinstance(results, TraceResult):
        return {results.settings["model"].split("@")[0]: results}
    return dict(results)


# =========================================================================== editing
METHOD_COLORS = {"memit": "tab:green", "intattn": "tab:purple", "attn": "tab:red", "pre-edit": "0.6"}


def plot_main_table(table, metrics: Sequence[str] = ("Edit Succ.", "Portability", "Locality")) -> plt.Figure:
    """Bars per method for each metric: one panel per (model, dataset), error bars the
    standard deviation over batches. ``table`` is :func:`intattn_analysis.reporting.main_table`."""
    import numpy as np

    groups = list(dict.fromkeys((m, d) for m, d, _ in table.index))
    fig, axes = plt.subplots(1, len(groups), figsize=(4.3 * len(groups), 3.2), squeeze=False, sharey=True)
    for ax, (model, dataset) in zip(axes[0], groups):
        part = table.loc[(model, dataset)]
        methods = list(part.index)
        width = 0.8 / max(1, len(methods))
        for i, method in enumerate(methods):
            means = [part.loc[method, (m, "mean")] * 100 for m in metrics]
            stds = [np.nan_to_num(part.loc[method, (m, "std")] * 100) for m in metrics]
            ax.bar(np.arange(len(metrics)) + (i - (len(methods) - 1) / 2) * width, means, width,
                   yerr=stds, capsize=2, label=method, color=METHOD_COLORS.get(method))
        ax.set_xticks(range(len(metrics)), metrics, fontsize=8)
        ax.set_ylim(0, 105)
        ax.set_title(f"{model}: {dataset}", fontsize=10)
    axes[0][0].set_ylabel("%")
    axes[0][-1].legend(frameon=False, fontsize=8, loc="upper right")
    fig.tight_layout()
    settings_note(fig, table)
    return fig


def plot_alpha_sweep(sweep, metrics: Sequence[str] = ("Edit Succ.", "Rephrase", "Portability", "Locality"),
                     label: str = "") -> plt.Figure:
    """Each metric against alpha (the paper's Figure 4). ``sweep`` has a column ``alpha``
    and one column per metric (values in [0, 1]); with a ``panel`` column, one panel per
    value (for example one per model), titled by it."""
    panels = list(dict.fromkeys(sweep["panel"])) if "panel" in sweep.columns else [None]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 3.2), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        part = (sweep if panel is None else sweep[sweep["panel"] == panel]).sort_values("alpha")
        for metric in metrics:
            if metric in part.columns and part[metric].notna().any():
                ax.plot(part["alpha"], part[metric] * 100, marker="o", label=metric, lw=1.5)
        ax.set_xlabel("alpha (attention share of the update)")
        ax.set_ylabel("%")
        ax.set_ylim(0, 105)
        title = ": ".join(str(t) for t in (label, panel) if t is not None and t != "")
        ax.set_title(f"alpha sweep{': ' + title if title else ''}", fontsize=10)
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    settings_note(fig, sweep)
    return fig


def plot_sweep_intervals(intervals, metrics: Sequence[str] = ("Edit Succ.", "Rephrase", "Portability", "Locality"),
                         label: str = "") -> plt.Figure:
    """Figure 4 with intervals: each metric's mean over facts against a fixed alpha, with
    its 95% confidence band, one panel per (model, dataset, protocol).

    ``intervals`` is the tidy table of :func:`intattn_analysis.experiments.alpha_sweep.summarise`
    (columns model, dataset, setting, metric, mean, ci_low, ci_high, n_edits; percent; a
    table without a ``protocol`` column is teacher-forced). Settings that are not a number
    (``traced``, ``pre-edit``) are left out of the curves.
    """
    fixed = intervals[pd.to_numeric(intervals["setting"], errors="coerce").notna()].copy()
    fixed["x"] = fixed["setting"].astype(float)
    if "protocol" not in fixed.columns:
        fixed["protocol"] = "teacher-forced"
    panels = list(dict.fromkeys(zip(fixed["model"], fixed["dataset"], fixed["protocol"])))
    if not panels:
        raise ValueError("intervals holds no fixed-alpha settings to plot")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.4 * len(panels), 3.4), squeeze=False)
    for ax, (model, dataset, protocol) in zip(axes[0], panels):
        part = fixed[(fixed["model"] == model) & (fixed["dataset"] == dataset) & (fixed["protocol"] == protocol)]
        n = 0
        for metric in metrics:
            curve = part[part["metric"] == metric].sort_values("x")
            if curve.empty:
                continue
            line, = ax.plot(curve["x"], curve["mean"], marker="o", ms=3.5, lw=1.5, label=metric)
            ax.fill_between(curve["x"], curve["ci_low"], curve["ci_high"], color=line.get_color(),
                            alpha=0.15, lw=0)
            n = max(n, int(curve["n_edits"].min()))
        ax.set_xlabel("alpha (attention share of the update)")
        ax.set_ylabel("% (mean, 95% interval over facts)")
        ax.set_ylim(0, 105)
        prefix = f"{label}: " if label else ""
        ax.set_title(f"{prefix}{model}, {dataset}, {protocol} (n={n} edits)", fontsize=10)
        ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    settings_note(fig, fixed[fixed["metric"].isin(metrics)])  # the rows drawn, not the traced alpha's
    return fig


def plot_sequential(intervals, metrics: Sequence[str] = ("Edit Succ.", "Rephrase", "Locality", "Known kept"),
                    label: str = "") -> plt.Figure:
    """Each metric against the number of rounds of edits applied, one line per method with
    its 95% interval over facts, one panel per metric.

    ``intervals`` is the tidy table of :func:`intattn_analysis.experiments.sequential.summarise`
    (columns model, dataset, setting, round, metric, mean, ci_low, ci_high, n_edits).
    """
    return _metric_curves(intervals, metrics, "round", "rounds of edits applied", label)


def plot_batch_scaling(intervals, metrics: Sequence[str] = ("Edit Succ.", "Rephrase", "Locality"),
                       label: str = "") -> plt.Figure:
    """Each metric against the batch size (log scale), one line per method with its 95%
    interval over facts, one panel per metric.

    ``intervals`` is the tidy table of
    :func:`intattn_analysis.experiments.batch_scaling.summarise` (columns model, dataset,
    batch_size, setting, metric, mean, ci_low, ci_high, n_edits); the unedited model's
    rows are left out.
    """
    intervals = intervals[intervals["setting"] != "pre-edit"]
    return _metric_curves(intervals, metrics, "batch_size", "facts written at once", label, log_x=True)


def _metric_curves(intervals, metrics: Sequence[str], x: str, xlabel: str, label: str,
                   log_x: bool = False) -> plt.Figure:
    """One panel per metric (percent): each setting's mean against column ``x``, with its
    95% interval shaded; the layout :func:`plot_sequential` and
    :func:`plot_batch_scaling` share."""
    metrics = [m for m in metrics if (intervals["metric"] == m).any()]
    if not metrics:
        raise ValueError("intervals holds none of the metrics to plot")
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        part = intervals[intervals["metric"] == metric]
        for setting, curve in part.groupby("setting", sort=False):
            curve = curve.sort_values(x)
            line, = ax.plot(curve[x], curve["mean"], marker="o", ms=3, lw=1.4, label=setting)
            ax.fill_between(curve[x], curve["ci_low"], curve["ci_high"], color=line.get_color(),
                            alpha=0.15, lw=0)
        if log_x:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{metric} (%)")
        ax.set_ylim(0, 105)
        prefix = f"{label}: " if label else ""
        ax.set_title(f"{prefix}{metric}", fontsize=10)
    axes[0][0].legend(frameon=False, fontsize=8)
    fig.tight_layout()
    settings_note(fig, intervals[intervals["metric"].isin(metrics)])
    return fig


def plot_outdated_flow(aie, settings: Sequence[str] | None = None, label: str = "") -> plt.Figure:
    """Where the old answer still flows: the indirect effect on ``p(target_true)`` per
    layer, for attention and MLP (columns) at the last subject token and the last token
    (rows), one line per model state (the unedited model and each method) with its 95%
    interval over the traced facts.

    ``aie`` is the ``aie`` table of :func:`intattn_analysis.experiments.outdated.summarise`
    (columns model, dataset, setting, module, token_class, layer, mean, ci_low, ci_high).
    """
    if settings is not None:
        aie = aie[aie["setting"].isin(list(settings))]
    if aie.empty:
        raise ValueError("aie holds no rows to plot")
    tokens = [t for t in ("subject_last", "last") if (aie["token_class"] == t).any()]
    modules = [m for m in ("attn", "mlp") if (aie["module"] == m).any()]
    fig, axes = plt.subplots(len(tokens), len(modules), figsize=(4.2 * len(modules), 2.9 * len(tokens)),
                             squeeze=False, sharex=True)
    for i, token in enumerate(tokens):
        for j, module in enumerate(modules):
            ax = axes[i][j]
            part = aie[(aie["token_class"] == token) & (aie["module"] == module)]
            for setting, curve in part.groupby("setting", sort=False):
                curve = curve.sort_values("layer")
                style = dict(color="black", lw=2.0, ls="--") if setting == "pre-edit" else dict(lw=1.3)
                line, = ax.plot(curve["layer"], curve["mean"], label=setting, **style)
                ax.fill_between(curve["layer"], curve["ci_low"], curve["ci_high"], color=line.get_color(),
                                alpha=0.12, lw=0)
            prefix = f"{label}: " if label else ""
            ax.set_title(f"{prefix}{'attention' if module == 'attn' else 'MLP'}, {token.replace('_', ' ')} token",
                         fontsize=10)
            ax.set_ylabel("effect on p(old answer)")
            if i == len(tokens) - 1:
                ax.set_xlabel("layer (window centre)")
    axes[0][0].legend(frameon=False, fontsize=7)
    fig.tight_layout()
    settings_note(fig, aie)
    return fig


def plot_protocols(intervals, metrics: Sequence[str] = ("Edit Succ.", "Rephrase", "Portability", "Locality"),
                   label: str = "") -> plt.Figure:
    """Each editor's metric under teacher forcing and under generation, side by side with
    their 95% intervals, one panel per metric (one model and dataset).

    ``intervals`` is a tidy interval table with a ``protocol`` column
    (:func:`intattn_analysis.experiments.editors.summarise`); the unedited model is shown
    as the first group.
    """
    protocols = ("teacher-forced", "generation")
    if "protocol" not in intervals.columns or not set(protocols) <= set(intervals["protocol"]):
        raise ValueError("intervals must hold rows of both protocols (a run with protocol='both')")
    if intervals[["model", "dataset"]].drop_duplicates().shape[0] != 1:
        raise ValueError("intervals must be of one model and one dataset; select them first")
    metrics = [m for m in metrics if (intervals["metric"] == m).any()]
    settings = list(dict.fromkeys(intervals["setting"]))
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.4 * len(metrics), 3.4), squeeze=False, sharey=True)
    width = 0.4
    for ax, metric in zip(axes[0], metrics):
        for k, protocol in enumerate(protocols):
            part = (intervals[(intervals["metric"] == metric) & (intervals["protocol"] == protocol)]
                    .set_index("setting").reindex(settings))
            x = np.arange(len(settings)) + (k - 0.5) * width
            error = np.vstack([part["mean"] - part["ci_low"], part["ci_high"] - part["mean"]])
            ax.bar(x, part["mean"], width, yerr=error, capsize=2, label=protocol,
                   color=("#4C72B0", "#DD8452")[k], error_kw={"lw": 0.8})
        ax.set_xticks(np.arange(len(settings)), settings, rotation=60, ha="right", fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.set_ylim(0, 100)
    axes[0][0].set_ylabel("percent of edits")
    axes[0][0].legend(fontsize=7, loc="upper right")
    model, dataset = intervals[["model", "dataset"]].iloc[0]
    fig.suptitle(f"{model} / {dataset}: teacher-forced vs generation" + (f" ({label})" if label else ""), fontsize=10)
    fig.tight_layout()
    settings_note(fig, intervals)
    return fig
