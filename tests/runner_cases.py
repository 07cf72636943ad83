"""The runs whose rows ``tests/data/runner_rows.json`` holds, and how rows are compared.

Every experiment's unit loop on a tiny random Llama with hand-made facts: the alpha
settings of the sweep and the estimators, the editor family (with ROME each alone),
batch scaling, sequential rounds, outdated knowledge (survival and traces), the
localization experiment's traces, and the in-memory runs of ``intattn evaluate`` and notebook 03. ``data/runner_rows.json`` holds
what the experiments' code at commit fe02946 (the code that wrote the committed store)
gave for them; ``test_runner_equality.py`` runs the same units through today's code and
compares.

A row set is ``{unit label: {"key": key, "rows": rows, "timing_columns": names}}``: the
key exactly as it was stored (with the model's temporary directory replaced by
``<model>``, since the tiny model lives in a fresh folder each run), the rows without the
columns that time the run, and the names of those columns.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

import intattn_analysis as ia
from intattn_analysis.experiments.store import read_unit_file, unit_of
from intattn_analysis.hparams import EditHparams, FTHparams, PMETHparams, RomeHparams

FACTS = [
    ia.Fact.from_text("w10 w11 w20 w21 w22", "w10 w11", "w40", target_true="w50"),
    ia.Fact.from_text("w30 w12 w13 w23 w24", "w12 w13", "w41", target_true="w51"),
    ia.Fact.from_text("w14 w25 w26 w27", "w14", "w42 w43", target_true="w52"),
    ia.Fact.from_text("w15 w16 w28 w29", "w15 w16", "w44", target_true="w53"),
]
ALIASED = [
    ia.Fact.from_text("w10 w11 w20 w21 w22", "w10 w11", "w40", target_true="w50",
                      paraphrases=["w33 {} w21"], portability=[("w34 w35 w21", "w40", "Subject_Aliasing"),
                                                                    ("w36 w10 w11", "w45", "Reasoning")],
                      locality=[("w37 w38 w39", "w46")]),
    ia.Fact.from_text("w30 w12 w13 w23 w24", "w12 w13", "w41", target_true="w51"),
]
#: The prompts of :data:`FACTS` with the tiny model's own greedy answers as ``target_true``
#: (what causal tracing needs: facts the model knows).
KNOWN = [
    ia.Fact.from_text("w10 w11 w20 w21 w22", "w10 w11", "w40", target_true="w7"),
    ia.Fact.from_text("w30 w12 w13 w23 w24", "w12 w13", "w41", target_true="w70"),
    ia.Fact.from_text("w14 w25 w26 w27", "w14", "w42 w43", target_true="w46"),
    ia.Fact.from_text("w15 w16 w28 w29", "w15 w16", "w44", target_true="w43"),
]
#: Columns that measure the run, not its result.
TIMING_COLUMNS = ("seconds", "edit_seconds", "targets_s", "moments", "targets", "solve", "total")


def tiny_setting(model) -> tuple[EditHparams, dict]:
    """The closed-form hparams and seeded second moments every case uses."""
    hp = EditHparams(layers=(1, 2), alpha=0.0, lambda_mlp=4.0, lambda_attn=4.0,
                     n_context_templates=2, context_template_length=3, v_steps=3)
    generator = torch.Generator().manual_seed(0)
    moments = {}
    for module in ("mlp", "attn"):
        for layer in hp.layers:
            d_in = model.weight(module, layer).shape[1]
            basis = torch.randn(4 * d_in, d_in, generator=generator)
            moments[(module, layer)] = basis.T @ basis / basis.shape[0]
    return hp, moments


def family(hp: EditHparams) -> dict[str, tuple[str, Any]]:
    """``{row name: (method, hparams)}``: one row of each kind of editor."""
    short = dict(n_context_templates=hp.n_context_templates, context_template_length=hp.context_template_length,
                 v_steps=hp.v_steps)
    return {
        "MEMIT": ("memit", hp.replace(alpha=0.0)),
        "AlphaEdit": ("alphaedit", hp.replace(alpha=0.0, projection="null_space", nullspace_threshold=1.0)),
        "IntAttn-Edit+NS": ("intattn", hp.replace(alpha=0.5, projection="null_space", nullspace_threshold=1.0)),
        "ROME": ("rome", RomeHparams(layers=(hp.layers[0],), **short)),
        "ROME, each alone": ("rome", RomeHparams(layers=(hp.layers[0],), **short)),
        "PMET": ("pmet", PMETHparams(layers=hp.layers, lambda_mlp=hp.lambda_mlp, **short)),
        "FT-M": ("ft-m", FTHparams(layers=(1,), objective="target_new", steps=2, norm_constraint=None)),
    }


def normalise(value: Any, model) -> Any:
    """``value`` with the tiny model's folder (its name and cache id) replaced by
    ``<model>``, recursively."""
    if isinstance(value, str):
        for name in (model.cache_id, model.name):
            value = value.replace(name, "<model>")
        return value
    if isinstance(value, dict):
        return {normalise(k, model): normalise(v, model) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [normalise(v, model) for v in value]
    return value


def store_rows(store, model) -> dict[str, dict]:
    """A store's units as ``{label: {"key", "rows"}}`` (the label is the unit id without
    its hash, which covers the model's folder)."""
    out = {}
    for path in store.files():
        records = read_unit_file(path)
        key = records[0]["unit_key"]
        label = unit_of(path).rsplit("-", 1)[0]
        rows = [{k: v for k, v in r.items() if k not in ("unit_key", "unit", *TIMING_COLUMNS)} for r in records]
        timed = sorted({k for r in records for k in r if k in TIMING_COLUMNS})
        out[label] = {"key": normalise(key, model), "rows": normalise(rows, model), "timing_columns": timed}
    return out


def frame_rows(frame, model) -> list[dict]:
    """A table's rows as JSON-able dicts, timing columns dropped, NaN as None."""
    frame = frame.drop(columns=[c for c in TIMING_COLUMNS if c in frame.columns])
    rows = []
    for record in frame.to_dict(orient="records"):
        rows.append({k: (None if isinstance(v, float) and math.isnan(v) else
                         v.item() if hasattr(v, "item") else v) for k, v in record.items()})
    return normalise(rows, model)


def differences(got: Any, want: Any, where: str = "", rel: float = 1e-6) -> list[str]:
    """Where ``got`` differs from ``want``: every key, label and discrete value exactly,
    floats to ``rel`` (relative, with the same absolute floor): the stored rows were made
    on one machine, and another CPU's float32 kernels may round the last bits
    differently, while a runner fault (a unit run on the wrong batch, setting or model
    state) moves values by far more."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}: keys {sorted(set(got) ^ set(want))} on one side only"] if set(got) != set(want) else []
        for k in sorted(set(got) & set(want), key=str):
            out += differences(got[k], want[k], f"{where}/{k}", rel)
        return out
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{where}: {len(got)} items, stored {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in differences(g, w, f"{where}[{i}]", rel)]
    if isinstance(want, float) and isinstance(got, (int, float)) and not isinstance(got, bool):
        if math.isclose(got, want, rel_tol=rel, abs_tol=rel):
            return []
        return [f"{where}: {got!r}, stored {want!r}"]
    return [] if got == want else [f"{where}: {got!r}, stored {want!r}"]


def row_sets(model, root) -> dict[str, Any]:
    """Every case's rows on ``model`` (the tiny Llama), stores under ``root``."""
    from intattn_analysis import runs
    from intattn_analysis.experiments import batch_scaling, editors, outdated, sequential
    from intattn_analysis.experiments.alpha_settings import run_alpha_settings
    from intattn_analysis.experiments.store import ResultStore

    hp, moments = tiny_setting(model)
    rows = family(hp)
    out: dict[str, Any] = {}

    store = ResultStore(root, "alpha-sweep")
    run_alpha_settings(model, [FACTS[:2], FACTS[2:]], {"0": 0.0, "0.5": 0.5, "per-layer": {1: 0.25, 2: 0.75}}, hp,
                       store, dataset="hand", moments=moments, metrics=("knowedit", "residue"), fluency_tokens=4,
                       progress=False, labels={"estimator": "x"})
    out["alpha-settings"] = store_rows(store, model)

    store = ResultStore(root, "editors")
    editors.run_methods(model, [FACTS[:2], FACTS[2:]], rows, store, dataset="hand", moments=moments,
                        metrics=("knowedit", "residue", "fluency"), fluency_tokens=4, progress=False)
    out["editors"] = store_rows(store, model)

    store = ResultStore(root, "batch-scaling")
    scale = batch_scaling.ScalingScale(sizes=(1, 2), n_facts=2,
                                       methods=("MEMIT", "ROME", "IntAttn-Edit+NS, train alpha"),
                                       metrics=("knowedit",), fluency_tokens=4)
    settings = {"MEMIT": rows["MEMIT"], "ROME": rows["ROME"], "IntAttn-Edit+NS, train alpha": rows["IntAttn-Edit+NS"]}
    batch_scaling.run_sizes(model, FACTS, scale, settings, store, dataset="hand", moments=moments, progress=False)
    out["batch-scaling"] = store_rows(store, model)

    store = ResultStore(root, "sequential")
    settings = {k: rows[k] for k in ("MEMIT", "AlphaEdit", "ROME", "FT-M")}
    sequential.run_sequences(model, [FACTS[:1], FACTS[1:2], FACTS[2:3]], settings, store, dataset="hand",
                             known=FACTS[3:], fluency_rounds=(3,), fluency_tokens=4, moments=moments, progress=False)
    out["sequential"] = store_rows(store, model)

    store = ResultStore(root, "outdated")
    settings = {"MEMIT": rows["MEMIT"], "IntAttn-Edit, train alpha": ("intattn", hp.replace(alpha=0.5))}
    outdated.run_batches(model, [ALIASED], settings, store, dataset="hand", n_traced=1, samples=2, moments=moments,
                         progress=False)
    out["outdated"] = store_rows(store, model)

    out["localization"] = localization_rows(model, root)

    run = runs.edit_batches(model, [FACTS[:2], FACTS[2:]], ["memit", "intattn", "rome"],
                            {"memit": hp, "intattn": hp.replace(alpha=0.5), "rome": rows["ROME"][1]},
                            moments=moments, dataset="hand", metrics=("knowedit", "counterfact", "residue", "fluency"),
                            fluency_tokens=4, progress=False)
    out["edit_batches"] = json.loads(json.dumps({
        "records": frame_rows(run.records, model), "per_fact": frame_rows(run.per_fact, model),
        "timings": sorted(run.timings.columns.tolist()), "targets": [t.diagnostics for t in run.targets],
    }, default=str))
    return out


def localization_rows(model, root) -> dict[str, dict]:
    """The localization experiment's four variants on :data:`KNOWN` (traced as the facts
    the model knows), two noise draws each, windows of 2 layers."""
    from intattn_analysis.experiments import localization
    from intattn_analysis.experiments.store import ResultStore

    chosen = localization._facts
    localization._facts = lambda model, dataset, n_facts: list(KNOWN)
    localization.WINDOWS[model.name] = 2
    try:
        localization.run(model, "builtin", localization.LocalizationScale(n_facts=None, samples=2), root,
                         progress=False, method="exact",
                         variants=("modules", "severed-none", "severed-mlp", "severed-attn"))
    finally:
        localization._facts = chosen
        del localization.WINDOWS[model.name]
    return store_rows(ResultStore(root, localization.NAME), model)
