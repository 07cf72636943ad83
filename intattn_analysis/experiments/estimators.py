"""Experiment ``alpha-estimators``: the balance factor derived six ways, each evaluated.

The paper derives alpha from causal tracing at the subject's last token and says the
result keeps editing "within the optimal range across settings". Whether that holds
depends on how the contribution is measured, so alpha is derived here six ways, per
edited layer ``l``:

(a) ``a-subject-aie``: ``AIE_attn / (AIE_attn + AIE_mlp)`` at the last subject token
    (the paper's estimator and the package's default, :func:`intattn_analysis.balance`);
(b) ``b-last-aie``: the same at the last token of the prompt;
(c) ``c-severed``: the drops of the residual stream's AIE at the last subject token when
    the attention or the MLP path is severed (ROME's frozen-module experiment):
    ``drop_attn / (drop_attn + drop_mlp)``, negative drops clipped at 0;
(d) ``d-activation``: the size of each module's contribution to the residual stream at
    the last subject token of the known facts' prompts, ``mean ||attn_out|| /
    (mean ||attn_out|| + mean ||mlp_out||)`` (the hooks' outputs, after any post-norm);
(e) ``e-train``: chosen on *train* records: first the best single alpha of a grid for
    every layer, then one pass over the layers, each trying every grid value with the
    others held, keeping what raises the criterion: the mean of Edit Succ. and Locality
    over the train facts;
(f) ``f-attribution``: estimator (a)'s formula on attribution patching's estimates of the
    same AIEs (:mod:`intattn_analysis.attribution`, AtP), which cost two forwards and a
    backward per fact instead of a forward row per site and draw.

(a)-(c) and (f) read the ``localization`` experiment's store (run it first); (e) stores its train
units in this experiment's store, so it resumes too. Each estimator's alpha and MEMIT
(alpha 0) are then evaluated on the same test batches as the sweep, and
:func:`summarise` pairs each estimator with MEMIT on the same facts and says whether its
alpha lies inside the sweep's best range (:func:`intattn_analysis.experiments.alpha_sweep.best_range`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import pandas as pd
import torch

from ..answers import GenerationSettings
from ..architectures import hook
from ..datasets import load_facts
from ..facts import SUBJECT_SLOT
from ..hparams import EditHparams, hparams_for
from ..intervals import tidy_intervals
from ..known import known_facts
from ..loading import ModelHandle
from ..targets import prompt_rows, read_at_subject
from ..tracing import balance
from . import alpha_sweep, localization
from .alpha_settings import alpha_cells, run_alpha_settings
from .common import (
    check_scale, dataset_batches, dataset_label, edit_moments, metric_columns, resolve_scale, targets_cache,
)
from .planning import PlanIncomplete, active
from .settings import with_settings
from .store import MissingResultsError, ResultStore, check_unique
from .runner import Unit
from .units import alpha_label, batch_key, with_protocol

__all__ = ["ESTIMATORS", "NAME", "SCALES", "EstimatorScale", "estimate_alphas", "run", "summarise"]

NAME = "alpha-estimators"
ESTIMATORS = ("a-subject-aie", "b-last-aie", "c-severed", "d-activation", "e-train", "f-attribution")
#: The train-selection criterion of estimator (e).
TRAIN_CRITERION = ("Edit Succ.", "Locality")
#: The fluency setting in the train units' keys (they measure no fluency; the runner's
#: default, kept so that stored train units keep their keys).
TRAIN_FLUENCY_TOKENS = 50


#: How far a mean alpha may lie outside the best range's bounds and count as inside: the
#: float rounding of an average of a few alphas, nothing more.
RANGE_TOLERANCE = 1e-9


@dataclass(frozen=True)
class EstimatorScale:
    test: alpha_sweep.SweepScale  # test batches, as in the sweep (its alphas are unused)
    train_dataset: str
    train_batch_size: int
    train_grid: tuple[float, ...]
    activation_facts: int  # known facts whose activations estimator (d) averages
    coordinate_pass: bool = True


SCALES = {
    "ci": EstimatorScale(test=alpha_sweep.SCALES["ci"], train_dataset="zsre-train",
                         train_batch_size=3, train_grid=(0.0, 0.5), activation_facts=8,
                         coordinate_pass=False),
    "paper": EstimatorScale(test=alpha_sweep.SCALES["paper"], train_dataset="zsre-train",
                            train_batch_size=100, train_grid=(0.0, 0.1, 0.2, 0.3, 0.5),
                            activation_facts=128),
}


def activation_alphas(model: ModelHandle, layers: Sequence[int], n_facts: int,
                      batch_size: int = 32) -> dict[int, float]:
    """Estimator (d), computed: each module's mean output norm at the last subject token of
    the first ``n_facts`` known built-in facts, as a share. Its sums of float32 norms
    differ in the eighth digit between machines, thread counts and batchings, so the
    experiment stores the value once (:func:`stored_activation_alphas`) and every run
    reads it back: the alpha is part of every unit's key."""
    facts = _activation_facts(model, n_facts)
    names = {(m, l): hook(f"{m}_out", l) for m in ("attn", "mlp") for l in layers}
    totals = {key: 0.0 for key in names}
    rows = prompt_rows(model, facts, [SUBJECT_SLOT])
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            read = read_at_subject(model, rows[start:start + batch_size], list(names.values()))
            for key, name in names.items():
                totals[key] += float(read[name].double().norm(dim=-1).sum())
    return {l: totals[("attn", l)] / (totals[("attn", l)] + totals[("mlp", l)]) for l in layers}


def _activation_facts(model: ModelHandle, n_facts: int) -> list:
    facts = known_facts(load_facts("builtin"), model.name)[:n_facts]
    if not facts:
        raise ValueError(f"{model.name} knows none of the built-in facts; estimator (d) needs some")
    return facts


def activation_unit(model: ModelHandle, layers: Sequence[int], n_facts: int) -> Unit:
    """The stored unit that holds estimator (d)'s alphas: one row per layer."""
    facts = _activation_facts(model, n_facts)
    key = {**batch_key(model, "builtin", 0, facts), "unit": "activation-alphas", "layers": list(layers)}
    return Unit(key, "d-activation-alphas", {"model": model.name, "dataset": "builtin", "split": "estimate",
                                             "setting": "d-activation", "batch": 0})


def stored_activation_alphas(model: ModelHandle, store: ResultStore, layers: Sequence[int],
                             n_facts: int) -> dict[int, float]:
    """Estimator (d)'s alphas as stored in ``store`` (computed and stored on the first run).
    While a plan is recorded, a missing unit is a plan that waits on it."""
    unit = activation_unit(model, layers, n_facts)
    plan = active()
    if plan is not None:
        plan.record(store, unit.key, unit.label, unit.labels)
    rows = store.read_unit(unit.key, unit.label)
    if rows is None:
        if plan is not None:
            raise PlanIncomplete(f"waits on estimator (d)'s alphas (`intattn run alpha-estimators --model "
                                 f"{model.name}`)")
        alphas = activation_alphas(model, layers, n_facts)
        store.write_unit(unit.key, [{"position": i, "layer": l, "alpha": alphas[l]} for i, l in enumerate(layers)],
                         unit.label, dict(unit.labels))
        return alphas
    return {int(row["layer"]): float(row["alpha"]) for row in rows}


def traced_alphas(store_root, model: ModelHandle, layers: Sequence[int]) -> dict[str, dict[int, float]]:
    """Estimators (a)-(c) and (f) from the localization experiment's store under ``store_root``."""
    store = ResultStore(store_root, localization.NAME)
    if not len(store):
        raise MissingResultsError(f"no localization results under {store.folder}; run `intattn run "
                         f"localization --model {model.name} --dataset builtin` with the same --out first")
    results = localization.traces(store, model.name)
    missing = [v for v in ("modules", "severed-none", "severed-mlp", "severed-attn") if v not in results]
    if missing:
        raise MissingResultsError(f"the localization store lacks the variants {missing} for {model.name}; "
                         "run the localization experiment to the end")
    modules = results["modules"]
    try:
        attributed = localization.traces(store, model.name, "attribution")["modules"]
    except (MissingResultsError, KeyError):
        raise MissingResultsError(
            f"the localization store lacks the attribution traces of {model.name} (estimator (f)); run `intattn "
            f"run localization --model {model.name} --dataset builtin --method attribution` with the same "
            "--out first") from None
    drops = localization.severed_drops(results).set_index("layer")
    severed = pd.DataFrame(
        [{"layer": l, "module": m, "aie": float(drops.loc[l, f"drop_{m}"])}
         for l in layers for m in ("attn", "mlp")])
    return {
        "a-subject-aie": dict(balance(modules.contributions("subject_last"), layers)),
        "b-last-aie": dict(balance(modules.contributions("last"), layers)),
        "c-severed": dict(balance(severed, layers)),
        "f-attribution": dict(balance(attributed.contributions("subject_last"), layers)),
    }


def _criterion(rows: pd.DataFrame, criterion: Sequence[str]) -> float:
    return float(sum(rows[m].mean() for m in criterion))


def train_alpha(model, hp: EditHparams, store: ResultStore, scale: EstimatorScale, moments,
                progress: bool = True) -> tuple[dict[int, float], pd.DataFrame]:
    """Estimator (e): the per-layer alpha chosen on train records (see the module notes).
    Returns the alpha and the table of every setting tried with its criterion."""
    batch = dataset_batches(scale.train_dataset, scale.train_batch_size, 1)
    label = dataset_label(scale.train_dataset)
    tried: dict[str, tuple[dict[int, float], float]] = {}

    def score(alphas: dict[int, dict[int, float]]) -> None:
        named = {f"train-{alpha_label(a)}": a for a in alphas.values()}
        settings = dict(metrics=("knowedit",), labels={"split": "train"}, fluency_tokens=TRAIN_FLUENCY_TOKENS)
        run_alpha_settings(model, batch, named, hp, store, dataset=label, moments=moments,
                           targets_cache=targets_cache(), progress=progress, **settings)
        # each setting's own unit, read by its key: a unit of the same name stored at other
        # settings (stale) must not enter the choice
        cells = alpha_cells(model, batch, named, hp, dataset=label, **settings)
        for cell in cells:
            if cell.setting.name not in named:
                continue  # the unedited model
            unit = cell.units[""]
            stored = store.read_unit(unit.key, unit.label)
            if stored is None:
                if active() is not None:
                    raise PlanIncomplete(f"waits on estimator (e)'s train units (`intattn run alpha-estimators "
                                         f"--model {model.name}`)")
                raise MissingResultsError(f"the train unit {unit.label} was not stored; run the experiment again")
            a = named[cell.setting.name]
            tried[alpha_label(a)] = (a, _criterion(pd.DataFrame(stored), TRAIN_CRITERION))

    grid = {i: {l: float(g) for l in hp.layers} for i, g in enumerate(scale.train_grid)}
    score(grid)
    best = max(tried.values(), key=lambda t: t[1])[0]
    if scale.coordinate_pass:
        for layer in hp.layers:
            options = {i: {**best, layer: float(g)} for i, g in enumerate(scale.train_grid)}
            score(options)
            best = max((tried[alpha_label(a)] for a in options.values()), key=lambda t: t[1])[0]
    table = pd.DataFrame([{"alpha": k, "criterion": v[1]} for k, v in tried.items()])
    return best, table


def estimate_alphas(model: ModelHandle, root, scale: EstimatorScale, hp: EditHparams, moments,
                    store: ResultStore, progress: bool = True,
                    traced: dict[str, dict[int, float]] | None = None) -> dict[str, dict[int, float]]:
    """``{estimator: {layer: alpha}}`` for the six estimators (``traced``: (a)-(c) and (f) when
    already read from the localization store)."""
    alphas = dict(traced) if traced is not None else traced_alphas(root, model, hp.layers)
    alphas["d-activation"] = stored_activation_alphas(model, store, hp.layers, scale.activation_facts)
    alphas["e-train"], _ = train_alpha(model, hp, store, scale, moments, progress)
    return {name: alphas[name] for name in ESTIMATORS}


def run(model: ModelHandle, dataset: str, scale, root, *, shard=None, protocol: str | None = None,
        generation: GenerationSettings | None = None, progress: bool = True) -> ResultStore:
    """Estimate the alphas (from the localization store and train records), then evaluate
    MEMIT and each estimator's IntAttn-Edit on this shard's test batches. ``protocol`` and
    ``generation`` choose the test evaluation's protocol (the scale's test protocol by
    default); estimator (e) is chosen on train records by teacher-forced metrics under
    every protocol, so that the alpha evaluated is the same."""
    scale = check_scale(scale, SCALES) if isinstance(scale, str) else scale
    scale = replace(scale, test=resolve_scale(scale.test, alpha_sweep.SCALES, protocol, generation))
    store = ResultStore(root, NAME)
    hp = hparams_for(model)
    if scale.test.mom2_n_tokens is not None:
        hp = hp.replace(mom2_n_tokens=scale.test.mom2_n_tokens)
    traced = traced_alphas(root, model, hp.layers)  # before any work: the traces must be there
    moments = edit_moments(model, hp, progress=progress)
    alphas = estimate_alphas(model, root, scale, hp, moments, store, progress, traced=traced)
    named = {"memit": 0.0, **alphas}
    batches = dataset_batches(dataset, scale.test.batch_size, scale.test.n_batches)
    run_alpha_settings(model, batches, named, hp, store, dataset=dataset_label(dataset),
                       moments=moments, metrics=scale.test.metrics,
                       fluency_tokens=scale.test.fluency_tokens, shard=shard,
                       targets_cache=targets_cache(), progress=progress, labels={"split": "test"},
                       protocol=scale.test.protocol, generation=scale.test.generation)
    return store


def summarise(store: ResultStore, sweep: ResultStore | None = None) -> dict[str, pd.DataFrame]:
    """``alphas``: each estimator's alpha per layer (and its mean over layers);
    ``intervals``: per (model, dataset, protocol, estimator, metric) the mean and 95%
    interval over test facts; ``paired``: each estimator minus MEMIT on the same facts,
    per protocol (Holm-adjusted per model, dataset and protocol); ``range``: with the
    sweep's store, whether each estimator's mean alpha lies in the sweep's best range
    under each protocol the sweep holds."""
    rows = store.rows()
    if rows.empty:
        raise ValueError(f"{store!r} holds no results yet; run the experiment first")
    rows = with_protocol(rows)
    check_unique(rows, ["model", "dataset", "split", "protocol", "setting", "batch", "position"])
    test = rows[rows["split"] == "test"]
    metrics = metric_columns(test, alpha_sweep.MAIN_METRICS + alpha_sweep.GENERATION_SCORES)
    settings = test[test["setting"] != "pre-edit"]
    alphas = []
    for (model, dataset, setting), group in settings.groupby(["model", "dataset", "setting"], sort=False):
        label = group["alpha"].iloc[0]
        values = _parse_alpha(label)
        alphas.append({"model": model, "dataset": dataset, "estimator": setting, "alpha": label,
                       "mean_alpha": sum(values.values()) / len(values) if values else 0.0})
    alphas = pd.DataFrame(alphas)
    by = ["model", "dataset", "protocol", "setting"]
    intervals = tidy_intervals(test, by, metrics)
    paired = alpha_sweep.paired_table(settings, "memit", alpha_sweep.BEST_CRITERION, metrics)
    out = {"alphas": alphas, "intervals": intervals, "paired": paired.drop(columns="best")}
    if sweep is not None and len(sweep):
        ranges = alpha_sweep.best_range(sweep)
        merged = alphas.merge(ranges, on=["model", "dataset"], how="left")
        # the mean of per-layer alphas carries float rounding (0.1 three times averages to
        # 0.10000000000000002): the bounds are compared to 1e-9
        inside = ((merged["mean_alpha"] >= merged["range_low"] - RANGE_TOLERANCE)
                  & (merged["mean_alpha"] <= merged["range_high"] + RANGE_TOLERANCE))
        merged["inside"] = inside.astype("boolean").mask(merged["range_low"].isna())  # NA: no sweep
        out["range"] = merged
    return out


def _parse_alpha(label: str) -> dict[int, float]:
    if ":" not in str(label):
        return {0: float(label)}
    return {int(k): float(v) for k, v in (part.split(":") for part in str(label).split(","))}


def tables(root) -> dict[str, pd.DataFrame]:
    """:func:`summarise` of the store under ``root``, with the sweep's store beside it.
    A row of ``alphas`` names the settings of the edits made at its estimator's alpha
    (the units whose ``setting`` is the estimator)."""
    store, sweep = ResultStore(root, NAME), ResultStore(root, alpha_sweep.NAME)
    summary = summarise(store, sweep)
    if summary.get("alphas") is not None:
        summary["alphas"] = summary["alphas"].rename(columns={"estimator": "setting"})
    out = with_settings(summary, store, reads={"range": (store, sweep)})
    if out.get("alphas") is not None:
        out["alphas"] = out["alphas"].rename(columns={"setting": "estimator"})
    return out
