"""Experiment ``localization``: causal traces of every fact a model knows, at scale.

The paper's claim 1 is that attention modules store facts, especially in early layers.
Notebook 01 traces 8 facts per model; this experiment traces every built-in fact the
model answers correctly (312 for SmolLM2, 309 for Gemma-3) with 10 noise draws and
notebook 01's windows, in four *variants*:

* ``modules``: attention and MLP states restored (window), at the last subject token and
  the last token: the per-layer AIE behind alpha estimators (a) and (b);
* ``severed-none``, ``severed-mlp``, ``severed-attn``: the residual stream restored at
  the last subject token, plainly and with the MLP or attention path severed (ROME's
  frozen-module experiment): the drops behind estimator (c);
* ``modules-window1``: as ``modules``, one layer restored at a time, the yardstick for
  attribution patching's per-layer estimates.

With ``method="attribution"`` or ``"attribution*"`` (:mod:`intattn_analysis.attribution`)
the same facts, draws and windows are estimated by attribution patching instead, in the
variants that have an attribution form (:data:`ATTRIBUTION_VARIANTS`: no severed path).
Their units sit beside the exact ones in the same store, keyed by method, and
:func:`summarise` compares the two: per-fact rank agreement and top-k recall
(:func:`intattn_analysis.attribution.attribution_agreement`), the AIE curves side by side,
claim 1's verdict from each, and the seconds each method took per fact.

Facts are traced in chunks of 16; each (variant, chunk) is one stored unit, so a killed
run resumes and shards split the chunks. Each fact's trace is also cached by
:func:`intattn_analysis.trace` itself. :func:`summarise` rebuilds the traces from the
store and gives the AIE per layer with intervals over facts, the claim-1 numbers
(:func:`intattn_analysis.early_attention_finding`) and the alphas the traces imply.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from ..cache import kind_folder
from ..datasets import load_facts
from ..known import known_facts
from ..loading import ModelHandle
from ..localization import early_attention_finding
from ..tracing import COLUMNS, TraceResult, trace
from .common import check_scale
from .runner import PRE_EDIT, Cell, Unit, run_cells
from .settings import with_settings
from .store import STORE_FORMAT, MissingResultsError, ResultStore
from .units import facts_digest, shard_batches

__all__ = ["NAME", "SCALES", "VARIANTS", "LocalizationScale", "TraceMeasure", "run", "summarise", "trace_cells",
           "traces"]

NAME = "localization"

#: Restore settings of each variant: (kinds, tokens, severed).
VARIANTS: dict[str, tuple[tuple[str, ...], tuple[str, ...], str | None]] = {
    "modules": (("attn", "mlp"), ("subject_last", "last"), None),
    "severed-none": (("resid",), ("subject_last",), None),
    "severed-mlp": (("resid",), ("subject_last",), "mlp"),
    "severed-attn": (("resid",), ("subject_last",), "attn"),
    "modules-window1": (("attn", "mlp"), ("subject_last", "last"), None),
}
#: Variants traced one layer at a time whatever the model's window.
WINDOW_ONE = frozenset({"modules-window1"})
#: The units each table reads where its columns do not say, by their labels (exact traces
#: only; the module traces, not the severed ones): its settings ids are those units' alone.
TABLE_UNITS = {"aie": {"variant": "modules", "method": "exact"}, "claim": {"variant": "modules", "method": "exact"},
               "severed": {"variant": ("severed-none", "severed-mlp", "severed-attn"), "method": "exact"},
               "coverage": {"method": "exact"},
               **{f"attribution_{name}": {"variant": ("modules", "modules-window1")}
                  for name in ("agreement", "aie", "paired")},
               "attribution_claim": {"variant": "modules"}}
#: The variants attribution patching can estimate (a severed path is not first order).
ATTRIBUTION_VARIANTS = ("modules", "modules-window1", "severed-none")
#: How each method is spelt in unit labels (``*`` is no character for a file name).
METHOD_LABELS = {"exact": "", "attribution": "attribution-", "attribution*": "attribution-star-"}
#: Layers restored together around each centre (notebook 01); ROME's 10 for other models,
#: at most the model's depth (:func:`window_for`).
WINDOWS = {"smollm2-135m": 6, "gemma-3-270m": 4}
DEFAULT_WINDOW = 10
CHUNK = 16


def window_for(model: ModelHandle) -> int:
    """The trace window of ``model``: :data:`WINDOWS`, else :data:`DEFAULT_WINDOW` clipped
    to the model's depth."""
    return min(WINDOWS.get(model.name, DEFAULT_WINDOW), model.n_layers)


@dataclass(frozen=True)
class LocalizationScale:
    n_facts: int | None  # None: every known fact
    samples: int
    noise: float = 3.0
    seed: int = 0
    # AtP* runs one backward per layer (about 13x AtP's time): the first this many of the
    # facts (whole chunks), None for all
    star_facts: int | None = None


SCALES = {"ci": LocalizationScale(n_facts=4, samples=3, star_facts=2),
          "paper": LocalizationScale(n_facts=None, samples=10, star_facts=2 * CHUNK)}


def _facts(model: ModelHandle, dataset: str, n_facts: int | None):
    if dataset != "builtin":
        raise ValueError(f"localization traces the built-in facts the model knows; got dataset "
                         f"{dataset!r}, use --dataset builtin")
    known = known_facts(load_facts("builtin"), model.name)
    return known if n_facts is None else known[:n_facts]


@dataclass(frozen=True)
class TraceMeasure:
    """Causal traces of the unedited model (:func:`intattn_analysis.trace`), one part per
    variant of :data:`VARIANTS`: the trace's rows, and a row per fact it left out with the
    reason."""

    scale: LocalizationScale
    window: int
    method: str = "exact"
    # whether rows carry their unit's ``seconds`` (the time per method of :func:`summarise`):
    # the exact traces of the paper's variants keep the per-fact trace cache they were
    # computed with, and no timing (a rerun's seconds would time the cache); the window-1
    # yardstick and attribution are traced without that cache, and timed
    timed: bool = False

    def wants_pre(self, cells, missing) -> bool:
        return False

    def pre(self, model, facts):
        return None

    def rows(self, model, facts, part, pre, setting):
        kinds, tokens, severed = VARIANTS[part]
        window = _variant_window(part, self.window)
        cache = None if self.timed else kind_folder("traces")
        result = trace(model, list(facts), kinds=kinds, tokens=list(tokens), window=window,
                       samples=self.scale.samples, noise=self.scale.noise, severed=severed, seed=self.scale.seed,
                       method=self.method, cache_dir=cache, progress=False)
        rows = result.to_dataframe().to_dict(orient="records")
        rows += [{"fact": f.key, "subject": f.subject, "skip_reason": reason}
                 for f, reason in zip(result.skipped, result.skip_reasons)]
        return rows, None


def _variant_window(variant: str, window: int) -> int:
    """The layers a variant restores together: 1 for :data:`WINDOW_ONE`, else ``window``."""
    return 1 if variant in WINDOW_ONE else window


def trace_cells(model: ModelHandle, facts, scale: LocalizationScale, *, dataset: str, window: int,
                variants=tuple(VARIANTS), shard=None, method: str = "exact") -> list[Cell]:
    """One unit per (variant, chunk of :data:`CHUNK` facts) of this shard (label
    ``<variant>-c000``, ``attribution-<variant>-c000`` for an attribution method),
    variant by variant, so that a run stopped early has whole variants (``modules``
    first). Rows carry ``model``, ``variant``, ``chunk``, ``window`` and ``samples``, and
    ``method`` where it is not exact tracing (which keeps the keys and rows it had before
    methods existed)."""
    chunks = [facts[i:i + CHUNK] for i in range(0, len(facts), CHUNK)]
    cells = []
    for variant in variants:
        kinds, tokens, severed = VARIANTS[variant]
        restored = _variant_window(variant, window)
        for c in shard_batches(len(chunks), shard):
            chunk = chunks[c]
            key = {"format": STORE_FORMAT, "model": model.state_id, "model_dtype": str(model.dtype),
                   "dataset": dataset, "chunk": c, "facts": facts_digest(chunk), "variant": variant,
                   "kinds": list(kinds), "tokens": list(tokens), "severed": severed,
                   "window": restored, "samples": scale.samples, "noise": scale.noise, "seed": scale.seed}
            extra = {"model": model.name, "variant": variant, "chunk": c, "window": restored,
                     "samples": scale.samples}
            if method != "exact":
                key["method"] = extra["method"] = method
            unit = Unit(key, f"{METHOD_LABELS[method]}{variant}-c{c:03d}", extra)
            # every cell is a batch of its own: traces share nothing across units
            cells.append(Cell(len(cells), chunk, PRE_EDIT, {variant: unit}))
    return cells


def run(model: ModelHandle, dataset: str, scale, root, *, shard=None, progress: bool = True,
        variants=None, method: str | None = None) -> ResultStore:
    """Trace (or resume tracing) this shard's chunks of facts in each variant
    (:func:`trace_cells`, :func:`.runner.run_cells`) with ``method``, or with every
    method when ``None`` (exact tracing first): every variant for exact tracing,
    :data:`ATTRIBUTION_VARIANTS` for attribution patching."""
    from ..attribution import METHODS, check_method

    methods = METHODS if method is None else (check_method(method),)
    chosen = {}
    for name in methods:
        chosen[name] = tuple(variants) if variants is not None else (
            tuple(VARIANTS) if name == "exact" else ATTRIBUTION_VARIANTS)
        for variant in chosen[name]:
            if variant not in VARIANTS:
                raise ValueError(f"unknown variant {variant!r}; variants are {list(VARIANTS)}")
            if name != "exact" and variant not in ATTRIBUTION_VARIANTS:
                raise ValueError(f"variant {variant!r} has no attribution form (a severed path is not first "
                                 f"order); attribution estimates {list(ATTRIBUTION_VARIANTS)}")
    scale = check_scale(scale, SCALES) if isinstance(scale, str) else scale
    store = ResultStore(root, NAME)
    facts = _facts(model, dataset, scale.n_facts)
    window = window_for(model)
    for name, names_variants in chosen.items():
        label = "tracing" if name == "exact" else name
        traced = facts[:scale.star_facts] if name == "attribution*" and scale.star_facts else facts
        for timed in (False, True):
            part = [v for v in names_variants if _timed(name, v) == timed]
            if not part:
                continue
            cells = trace_cells(model, traced, scale, dataset=dataset, window=window, variants=part, shard=shard,
                                method=name)
            run_cells(model, cells, TraceMeasure(scale, window, name, timed), store,
                      desc=f"{label} {model.name}", progress=progress)
    return store


def _timed(method: str, variant: str) -> bool:
    """Whether units of ``variant`` traced with ``method`` are timed (see :class:`TraceMeasure`)."""
    return method != "exact" or variant in WINDOW_ONE


def _methods(rows: pd.DataFrame) -> pd.Series:
    """Each row's method (rows of exact traces carry none)."""
    if "method" not in rows:
        return pd.Series("exact", index=rows.index)
    return rows["method"].fillna("exact")


def traces(store: ResultStore, model: str, method: str = "exact",
           rows: pd.DataFrame | None = None) -> dict[str, TraceResult]:
    """The stored traces of ``model`` made with ``method``, one
    :class:`~intattn_analysis.TraceResult` per variant (from ``rows``, the store's rows
    when already read, so that a summary reads the store once)."""
    rows = store.rows(model=model) if rows is None else rows[rows["model"] == model]
    if not rows.empty:
        rows = rows[_methods(rows) == method]
    if rows.empty:
        raise MissingResultsError(f"{store!r} holds no {method} traces of {model!r}; run the localization "
                                  f"experiment{'' if method == 'exact' else f' with --method {method}'}")
    out = {}
    for variant, group in rows.groupby("variant", sort=False):
        kinds, tokens, severed = VARIANTS[variant]
        traced = group[group["skip_reason"].isna()] if "skip_reason" in group else group
        settings = {"kinds": list(kinds), "tokens": list(tokens), "severed": severed,
                    "window": int(group["window"].iloc[0]), "samples": int(group["samples"].iloc[0])}
        if method != "exact":
            settings["method"] = method
        out[variant] = TraceResult.from_rows(traced[list(COLUMNS)].to_dict(orient="records"), settings, ())
    return out


def severed_drops(results: dict[str, TraceResult], token: str = "subject_last") -> pd.DataFrame:
    """Per layer: the residual AIE, and how much severing the MLP or attention lowers it
    (``drop_mlp``, ``drop_attn``; negative drops are kept here and clipped by the alpha)."""
    plain = _resid_aie(results["severed-none"], token)
    out = pd.DataFrame({"layer": plain.index, "aie": plain.values})
    for module in ("mlp", "attn"):
        severed = _resid_aie(results[f"severed-{module}"], token)
        out[f"drop_{module}"] = (plain - severed.reindex(plain.index)).values
    return out


def _resid_aie(result: TraceResult, token: str) -> pd.Series:
    aie = result.average_indirect_effect()
    part = aie[(aie["kind"] == "resid") & (aie["token_class"] == token)]
    return part.set_index("layer")["aie"]


def summarise(store: ResultStore) -> dict[str, pd.DataFrame]:
    """``aie``: per (model, token, module, layer) the AIE with its 95% interval over facts;
    ``claim``: per (model, token) the early-attention verdict and its numbers;
    ``severed``: per (model, layer) the residual AIE and the drops when a path is severed
    (once the three severed variants cover the same facts);
    ``coverage``: facts traced per (model, variant)."""
    rows = store.rows()
    if rows.empty:
        raise ValueError(f"{store!r} holds no traces yet; run the experiment first")
    aie, claims, severed, coverage = [], [], [], []
    for model in dict.fromkeys(rows["model"]):
        results = traces(store, model, rows=rows)
        for variant, result in results.items():
            if variant in WINDOW_ONE:
                continue  # the yardstick of attribution, summarised with it
            coverage.append({"model": model, "variant": variant,
                             "n_facts": result.table["fact"].nunique()})
        if "modules" in results:
            result = results["modules"]
            n_layers = int(result.table["layer"].max()) + 1
            for token in ("subject_last", "last"):
                contributions = result.contributions(token)
                aie.append(contributions.assign(model=model, token=token))
                holds, numbers = early_attention_finding(contributions, n_layers)
                claims.append({"model": model, "token": token, "holds": holds, "numbers": numbers})
        severed_variants = [f"severed-{m}" for m in ("none", "mlp", "attn")]
        if all(v in results for v in severed_variants) and len(
                {frozenset(results[v].table["fact"]) for v in severed_variants}) == 1:
            # only over the same facts: a drop between two fact sets would measure the sets
            severed.append(severed_drops(results).assign(model=model))
    aie_table = (pd.concat(aie, ignore_index=True)[["model", "token", "module", "layer", "aie",
                                                    "ci_low", "ci_high", "n_facts"]]
                 if aie else pd.DataFrame())
    return {"aie": aie_table, "claim": pd.DataFrame(claims),
            "severed": pd.concat(severed, ignore_index=True) if severed else pd.DataFrame(),
            "coverage": pd.DataFrame(coverage), **attribution_tables(store, rows)}


def attribution_tables(store: ResultStore, rows: pd.DataFrame | None = None) -> dict[str, pd.DataFrame]:
    """Attribution patching against exact tracing, over the facts both traced:

    * ``attribution_agreement``: per (model, method, window, kind) the mean over facts of
      each agreement measure (Spearman's rho over sites, top-5 and top-10 recall, sign
      agreement) with its 95% interval;
    * ``attribution_aie``: per (model, method, window, token, module, layer) the AIE of
      each method with its interval;
    * ``attribution_claim``: claim 1's verdict (:func:`~intattn_analysis.early_attention_finding`)
      at the notebooks' window from exact tracing and from each attribution method;
    * ``attribution_paired``: where both methods ran, AtP* against AtP on the facts both
      traced, both held to the exact effects' magnitudes (AtP* estimates a magnitude, so
      AtP's estimates enter as absolute values): per (model, window, kind, measure) each
      method's mean, the mean per-fact difference AtP* minus AtP with its bootstrap 95%
      interval and p-value, Holm-adjusted over the kinds and measures of a model and window;
    * ``timing``: per (model, method, variant) the facts, seconds and seconds per fact, for
      the units traced without the per-fact cache (attribution, and exact tracing of
      ``modules-window1``), so that each time is a computation's.

    Empty where no attribution units are stored."""
    from ..attribution import attribution_agreement, attribution_curves

    rows = store.rows() if rows is None else rows
    empty = {"attribution_agreement": pd.DataFrame(), "attribution_aie": pd.DataFrame(),
             "attribution_claim": pd.DataFrame(), "attribution_paired": pd.DataFrame(), "timing": pd.DataFrame()}
    if rows.empty or (_methods(rows) == "exact").all():
        return empty
    agreement, curves, claims, paired = [], [], [], []
    for model in dict.fromkeys(rows["model"]):
        methods = [m for m in dict.fromkeys(_methods(rows[rows["model"] == model])) if m != "exact"]
        results = {method: traces(store, model, method, rows) for method in ("exact", *methods)}
        exact = results["exact"]
        if {"attribution", "attribution*"} <= set(methods):
            paired.append(_star_against_plain(exact, results["attribution"], results["attribution*"])
                          .assign(model=model))
        for method in methods:
            estimated = results[method]
            for variant in ("modules", "modules-window1"):
                if variant not in exact or variant not in estimated:
                    continue
                shared = set(exact[variant].table["fact"]) & set(estimated[variant].table["fact"])
                pair = [_only(exact[variant], shared), _only(estimated[variant], shared)]
                window = int(exact[variant].settings["window"])
                _, summary = attribution_agreement(*pair)
                agreement.append(summary.assign(model=model, method=method, window=window))
                side_by_side = attribution_curves(*pair)
                curves.append(side_by_side.assign(model=model, compared=method))
                if variant != "modules":
                    continue
                n_layers = int(pair[0].table["layer"].max()) + 1
                for (name, token), part in side_by_side.groupby(["method", "token"], sort=False):
                    holds, numbers = early_attention_finding(part, n_layers)
                    claims.append({"model": model, "method": name, "compared": method, "token": token,
                                   "n_facts": len(shared), "holds": holds, "numbers": numbers})
    out = dict(empty)
    if agreement:
        table = pd.concat(agreement, ignore_index=True)
        out["attribution_agreement"] = table[["model", "method", "window", "kind", "measure", "mean", "ci_low",
                                              "ci_high", "n_facts"]]
    if curves:
        table = pd.concat(curves, ignore_index=True)
        out["attribution_aie"] = table[["model", "compared", "method", "window", "token", "module", "layer", "aie",
                                        "ci_low", "ci_high", "n_facts"]]
    if claims:
        out["attribution_claim"] = pd.DataFrame(claims)
    if paired:
        table = pd.concat(paired, ignore_index=True)
        out["attribution_paired"] = table[["model", "window", "kind", "measure", "attribution", "attribution*",
                                           "diff", "ci_low", "ci_high", "p_value", "p_holm", "n_facts"]]
    out["timing"] = _timing(rows)
    return out


def _star_against_plain(exact: dict, plain: dict, star: dict) -> pd.DataFrame:
    """AtP* minus AtP per fact on the facts all three traced, every measure held to the
    exact effects' magnitudes (see :func:`attribution_tables`)."""
    from ..attribution import attribution_agreement
    from ..intervals import holm_within, paired_difference

    out = []
    for variant in ("modules", "modules-window1"):
        if not all(variant in results for results in (exact, plain, star)):
            continue
        shared = (set(exact[variant].table["fact"]) & set(plain[variant].table["fact"])
                  & set(star[variant].table["fact"]))
        magnitudes = _only(plain[variant], shared)
        magnitudes = TraceResult(magnitudes.table.assign(ie=magnitudes.table["ie"].abs()), magnitudes.settings)
        per_method = {}
        for name, estimate in (("attribution", magnitudes), ("attribution*", _only(star[variant], shared))):
            per_fact, _ = attribution_agreement(_only(exact[variant], shared), estimate, magnitude=True)
            per_method[name] = per_fact.drop(columns=["sites", "sign_agreement"]).melt(
                id_vars=["fact", "kind"], var_name="measure", value_name=name)
        both = per_method["attribution"].merge(per_method["attribution*"], on=["fact", "kind", "measure"])
        rows = []
        for (kind, measure), group in both.groupby(["kind", "measure"], sort=False):
            group = group.dropna(subset=["attribution", "attribution*"])
            difference = paired_difference(group["attribution*"], group["attribution"])
            n_facts = difference.pop("n_edits")
            rows.append({"kind": kind, "measure": measure, "attribution": group["attribution"].mean(),
                         "attribution*": group["attribution*"].mean(), **difference, "n_facts": n_facts})
        table = pd.DataFrame(rows).assign(window=int(exact[variant].settings["window"]))
        out.append(holm_within(table, ["window"]))  # one family per window: every kind and measure
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def _only(result: TraceResult, facts: set) -> TraceResult:
    table = result.table[result.table["fact"].isin(facts)]
    return TraceResult(table.reset_index(drop=True), result.settings)


def _timing(rows: pd.DataFrame) -> pd.DataFrame:
    """Seconds per fact of each (model, method, variant), from timed units only."""
    if "seconds" not in rows:
        return pd.DataFrame()
    rows = rows.assign(method=_methods(rows))
    timed = rows[rows["seconds"].notna()]
    if timed.empty:
        return pd.DataFrame()
    per_unit = timed.groupby(["model", "method", "variant", "unit"], sort=False).agg(
        seconds=("seconds", "first"), n_facts=("fact", "nunique")).reset_index()
    out = per_unit.groupby(["model", "method", "variant"], sort=False).agg(
        n_units=("unit", "count"), n_facts=("n_facts", "sum"), seconds=("seconds", "sum")).reset_index()
    out["seconds_per_fact"] = out["seconds"] / out["n_facts"]
    return out


def tables(root) -> dict[str, pd.DataFrame]:
    """:func:`summarise` of the store under ``root``."""
    store = ResultStore(root, NAME)
    return with_settings(summarise(store), store, where=TABLE_UNITS)
