"""Experiment ``localization``: causal traces of every fact a model knows, at scale.

The paper's claim 1 is that attention modules store facts, especially in early layers.
Notebook 01 traces 8 facts per model; this experiment traces every built-in fact the
model answers correctly (312 for SmolLM2, 309 for Gemma-3) with 10 noise draws and
notebook 01's windows, in four *variants*:

* ``modules``: attention and MLP states restored (window), at the last subject token and
  the last token: the per-layer AIE behind alpha estimators (a) and (b);
* ``severed-none``, ``severed-mlp``, ``severed-attn``: the residual stream restored at
  the last subject token, plainly and with the MLP or attention path severed (ROME's
  frozen-module experiment): the drops behind estimator (c).

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
}
#: Layers restored together around each centre (notebook 01); ROME's 10 for other models.
WINDOWS = {"smollm2-135m": 6, "gemma-3-270m": 4}
DEFAULT_WINDOW = 10
CHUNK = 16


@dataclass(frozen=True)
class LocalizationScale:
    n_facts: int | None  # None: every known fact
    samples: int
    noise: float = 3.0
    seed: int = 0


SCALES = {"ci": LocalizationScale(n_facts=4, samples=3),
          "paper": LocalizationScale(n_facts=None, samples=10)}


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
    timed = False  # trace rows are read back as traces; they carry no timing

    def wants_pre(self, cells, missing) -> bool:
        return False

    def pre(self, model, facts):
        return None

    def rows(self, model, facts, part, pre, setting):
        kinds, tokens, severed = VARIANTS[part]
        result = trace(model, list(facts), kinds=kinds, tokens=list(tokens), window=self.window,
                       samples=self.scale.samples, noise=self.scale.noise, severed=severed, seed=self.scale.seed,
                       cache_dir=kind_folder("traces"), progress=False)
        rows = result.to_dataframe().to_dict(orient="records")
        rows += [{"fact": f.key, "subject": f.subject, "skip_reason": reason}
                 for f, reason in zip(result.skipped, result.skip_reasons)]
        return rows, None


def trace_cells(model: ModelHandle, facts, scale: LocalizationScale, *, dataset: str, window: int,
                variants=tuple(VARIANTS), shard=None) -> list[Cell]:
    """One unit per (variant, chunk of :data:`CHUNK` facts) of this shard (label
    ``<variant>-c000``), variant by variant, so that a run stopped early has whole
    variants (``modules`` first). Rows carry ``model``, ``variant``, ``chunk``,
    ``window`` and ``samples``."""
    chunks = [facts[i:i + CHUNK] for i in range(0, len(facts), CHUNK)]
    cells = []
    for variant in variants:
        kinds, tokens, severed = VARIANTS[variant]
        for c in shard_batches(len(chunks), shard):
            chunk = chunks[c]
            key = {"format": STORE_FORMAT, "model": model.state_id, "model_dtype": str(model.dtype),
                   "dataset": dataset, "chunk": c, "facts": facts_digest(chunk), "variant": variant,
                   "kinds": list(kinds), "tokens": list(tokens), "severed": severed,
                   "window": window, "samples": scale.samples, "noise": scale.noise, "seed": scale.seed}
            unit = Unit(key, f"{variant}-c{c:03d}", {"model": model.name, "variant": variant, "chunk": c,
                                                    "window": window, "samples": scale.samples})
            # every cell is a batch of its own: traces share nothing across units
            cells.append(Cell(len(cells), chunk, PRE_EDIT, {variant: unit}))
    return cells


def run(model: ModelHandle, dataset: str, scale, root, *, shard=None, progress: bool = True,
        variants=tuple(VARIANTS)) -> ResultStore:
    """Trace (or resume tracing) this shard's chunks of facts in each variant
    (:func:`trace_cells`, :func:`.runner.run_cells`)."""
    scale = check_scale(scale, SCALES) if isinstance(scale, str) else scale
    store = ResultStore(root, NAME)
    facts = _facts(model, dataset, scale.n_facts)
    window = WINDOWS.get(model.name, DEFAULT_WINDOW)
    cells = trace_cells(model, facts, scale, dataset=dataset, window=window, variants=variants, shard=shard)
    run_cells(model, cells, TraceMeasure(scale, window), store, desc=f"tracing {model.name}", progress=progress)
    return store


def traces(store: ResultStore, model: str) -> dict[str, TraceResult]:
    """The stored traces of ``model``, one :class:`~intattn_analysis.TraceResult` per variant."""
    rows = store.rows(model=model)
    if rows.empty:
        raise MissingResultsError(f"{store!r} holds no traces of {model!r}; run the localization experiment")
    out = {}
    for variant, group in rows.groupby("variant", sort=False):
        kinds, tokens, severed = VARIANTS[variant]
        traced = group[group["skip_reason"].isna()] if "skip_reason" in group else group
        settings = {"kinds": list(kinds), "tokens": list(tokens), "severed": severed,
                    "window": int(group["window"].iloc[0]), "samples": int(group["samples"].iloc[0])}
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
        results = traces(store, model)
        for variant, result in results.items():
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
            "coverage": pd.DataFrame(coverage)}


def tables(root) -> dict[str, pd.DataFrame]:
    """:func:`summarise` of the store under ``root``."""
    return summarise(ResultStore(root, NAME))
