"""Settings ids: which settings each row of a tidy table was computed at.

A unit's key names everything its rows depend on. A row of a tidy table pools units: every
batch of one (model, dataset, setting), under one protocol. Those units must have been
computed at one setting, and the row says which: its ``settings_id``, 8 hex digits of the
hash of the unit's *settings*:

* for an edit: the model's weights (its state id) and dtype, the method, and every
  effective hyperparameter (target steps and KL weight, λ, layers, alpha, the second
  moments' sample size), plus the alpha and layers an experiment sets beside them;
* for the unedited model (``pre-edit``): the model's weights and dtype;
* for a localization trace: the model's weights and dtype and the trace's settings
  (method, kinds, tokens, window, noise, draws, seed, severed paths).

What a unit is *of* (its batch, its facts, its chunk, its part of a measurement) and how it
is scored (the metric sets, the protocol's settings, the trace of an edited model) is not a
setting: tables are split by those already. :func:`settings_table` lists every id with its
fields, the table ``intattn run`` writes beside an experiment's others
(``<experiment>_settings.csv``);
:func:`label` gives a table its ``settings_id`` column and refuses a row that pools units
of two settings. A table that pools settings on purpose (one row per model over every
variant) gets the ids it pools, joined by ``+``.
"""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from ..cache import cache_key, canonical_json
from ..corpus import ModelSamples
from .store import KEY_FIELD, ResultStore

__all__ = ["EDIT_FIELDS", "ID_DIGITS", "JOIN_COLUMNS", "MODEL_FIELDS", "MOMENTS_SOURCE", "MixedSettingsError",
           "TRACE_FIELDS", "label", "label_tables", "settings_id", "settings_of", "settings_table", "unit_settings",
           "with_settings"]

#: Hex digits of a settings id.
ID_DIGITS = 8
#: Key fields that set an edit: the model's weights and dtype, the editor and its effective
#: hyperparameters, and the alpha, layers, value site and editing protocol an experiment sets
#: beside them. A unit that edits is at the settings these fields name, whatever it measures.
EDIT_FIELDS = ("model", "model_dtype", "method", "hparams_type", "hparams", "alpha", "layers", "v_site", "protocol")
#: Key fields that set a trace of the unedited model: its weights and dtype and how it is
#: traced (the method of attribution patching, the noise, its draws and seed, the window,
#: the severed paths, the kinds of module and the tokens).
TRACE_FIELDS = ("model", "model_dtype", "method", "kinds", "tokens", "window", "noise", "samples", "seed",
                "severed")
#: Key fields of the unedited model's evaluation: its weights and dtype.
MODEL_FIELDS = ("model", "model_dtype")
#: Row columns a table's rows may be told apart by, in the order they are joined on.
JOIN_COLUMNS = ("model", "dataset", "protocol", "dtype", "setting", "variant", "batch_size", "window", "method")
#: Columns that identify one setting's rows (a table with one of them pools no settings).
SETTING_COLUMNS = ("setting", "variant")
#: Hyperparameters shown in the settings table, where a unit has them.
SHOWN = ("layers", "alpha", "v_steps", "v_lr", "kl_factor", "lambda_mlp", "lambda_attn", "mom2_n_tokens",
         "mom2_max_len", "projection", "nullspace_threshold", "lr", "steps", "norm_constraint")


#: Where the experiments' second moments come from: the default corpus, text the model
#: samples itself (:class:`~intattn_analysis.corpus.ModelSamples`); its size is the
#: ``mom2_n_tokens`` and ``mom2_max_len`` of each unit's hyperparameters.
MOMENTS_SOURCE = ModelSamples().corpus_id


class MixedSettingsError(ValueError):
    """A row of a table would pool units computed at different settings."""


def settings_of(key: Mapping[str, Any]) -> dict:
    """The settings in a unit's key. A unit that edits (its key has ``hparams``) is at its
    :data:`EDIT_FIELDS`, whether it scores the edit or traces the edited model: what it
    measures and of which facts are its rows' labels, not its settings. A trace of the
    unedited model is at its :data:`TRACE_FIELDS`; anything else (the unedited model
    scored) at its :data:`MODEL_FIELDS`."""
    if "hparams" in key:
        fields = EDIT_FIELDS
    elif _is_trace(key):
        fields = TRACE_FIELDS
    else:
        fields = MODEL_FIELDS
    return {name: key[name] for name in fields if name in key}


def _is_trace(key: Mapping[str, Any]) -> bool:
    """Whether a unit's key is that of a localization trace of the unedited model."""
    return "hparams" not in key and "window" in key and "chunk" in key


def settings_id(settings: Mapping[str, Any]) -> str:
    """:data:`ID_DIGITS` hex digits of the hash of ``settings`` (the cache's key recipe)."""
    return cache_key(settings)[:ID_DIGITS]


def unit_settings(store: ResultStore) -> pd.DataFrame:
    """One row per unit of ``store``: the :data:`JOIN_COLUMNS` its rows carry, its
    ``settings_id`` and its settings (``settings``, canonical JSON)."""
    rows = []
    for uid, first in store.first_rows().items():
        key = first.get(KEY_FIELD) or {}
        settings = settings_of(key)
        labels = {c: first.get(c) for c in JOIN_COLUMNS if c in first}
        if _is_trace(key):
            labels.setdefault("method", "exact")  # an exact trace's rows name no method
        if "protocol" in labels or "setting" in labels:
            labels["protocol"] = labels.get("protocol") or "teacher-forced"
        rows.append({"uid": uid, **labels, "settings_id": settings_id(settings),
                     "settings": canonical_json(settings)})
    return pd.DataFrame(rows)


def settings_table(store: ResultStore) -> pd.DataFrame:
    """One row per settings id of ``store``: the model (its weights' id) and dtype, the
    method, the hyperparameters of :data:`SHOWN` it has (target steps, learning rate and KL
    weight, λ, layers, alpha, the second moments' size) and the moments' source where it
    reads them, a trace's settings, the labels of the rows computed at it (``row_labels``)
    and how many units were."""
    import json

    units = unit_settings(store)
    if units.empty:
        return pd.DataFrame(columns=["settings_id", "model", "model_dtype", "method", "units"])
    out = []
    for ident, group in units.groupby("settings_id", sort=False):
        settings = json.loads(group["settings"].iloc[0])
        hparams = settings.get("hparams") or {}
        trace = "window" in settings and "hparams" not in settings
        row = {"settings_id": ident, "model": settings.get("model"), "model_dtype": settings.get("model_dtype"),
               "method": settings.get("method") or ("exact" if trace else "unedited")}
        for name in SHOWN:
            value = settings.get(name, hparams.get(name))
            if value is not None:
                row[name] = canonical_json(value) if isinstance(value, (dict, list)) else value
        if "mom2_n_tokens" in hparams and hparams.get("mom2_adjustment", True) is not False:
            row["moments_source"] = MOMENTS_SOURCE
        if trace:
            row.update({n: settings.get(n) for n in ("window", "samples", "noise", "seed", "severed")})
        labels = sorted({str(s) for s in group.get("setting", group.get("variant", pd.Series(dtype=str))).dropna()})
        row["row_labels"] = ", ".join(labels)
        row["units"] = len(group)
        out.append(row)
    return pd.DataFrame(out)


def label(table: pd.DataFrame, units: pd.DataFrame, name: str = "table",
          where: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """``table`` with a ``settings_id`` column from ``units`` (:func:`unit_settings`),
    joined on the :data:`JOIN_COLUMNS` both have, over the units whose labels are
    ``where``'s (a value, or a tuple of values; a missing label is ``""``): the units a
    table reads where its own columns do not say, exact traces only, say.

    A row of a table with a :data:`SETTING_COLUMNS` column (or whose ``where`` names one
    value of one) must pool one setting, else a :class:`MixedSettingsError` names the row and its ids; a
    row of a table without one pools on purpose and gets its ids joined by ``+``. Rows no
    unit matches get none."""
    if table.empty or units.empty or "settings_id" in table.columns:
        return table
    where = dict(where or {})
    for column, value in where.items():
        own_labels = units[column] if column in units.columns else pd.Series("", index=units.index)
        allowed = {_text(v) for v in value} if isinstance(value, (list, tuple, set, frozenset)) else {_text(value)}
        units = units[own_labels.map(_text).isin(allowed)]
    on = [c for c in JOIN_COLUMNS if c in table.columns and c in units.columns]
    if "model" not in on:
        return table
    own = units[on + ["settings_id"]].copy()
    for column in on:  # compare as text: a CSV's "0.3" and a row's 0.3 are one setting
        own[column] = own[column].map(_text)
    ids = own.groupby(on, sort=False)["settings_id"].agg(lambda s: sorted(set(s))).reset_index()
    one_setting = [c for c in SETTING_COLUMNS
                   if c in on or (c in where and not isinstance(where[c], (list, tuple, set, frozenset)))]
    pooled = not one_setting
    if not pooled:
        mixed = ids[ids["settings_id"].map(len) > 1]
        if len(mixed):
            first = mixed.iloc[0]
            where = ", ".join(f"{c}={first[c]}" for c in on)
            raise MixedSettingsError(
                f"{name}: the row {where} would pool units of {len(first['settings_id'])} settings "
                f"({', '.join(first['settings_id'])}); remove the stale ones (`intattn status`, `intattn reproduce "
                "--prune-stale`) or run them again at one setting")
    ids["settings_id"] = ids["settings_id"].map("+".join)
    keys = table[on].copy()
    for column in on:
        keys[column] = keys[column].map(_text)
    merged = keys.merge(ids, on=on, how="left")
    out = table.copy()
    out["settings_id"] = merged["settings_id"].to_numpy()
    return out


def _text(value: Any) -> str:
    """A join value as text: numbers without a trailing ``.0``, missing values empty."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def label_tables(tables: Mapping[str, pd.DataFrame], *stores: ResultStore,
                 where: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, pd.DataFrame]:
    """Every table of ``tables`` labelled (:func:`label`) from one reading of ``stores``
    (the experiment's, and any whose units its tables read beside them); ``where`` gives
    a table's unit selection by its name."""
    units = pd.concat([unit_settings(store) for store in stores], ignore_index=True)
    where = where or {}
    return {name: (label(frame, units, name, where.get(name)) if frame is not None else None)
            for name, frame in tables.items()}


def with_settings(tables: Mapping[str, pd.DataFrame], *stores: ResultStore,
                  where: Mapping[str, Mapping[str, Any]] | None = None) -> dict[str, pd.DataFrame]:
    """An experiment's tables as it shows them: each labelled with its rows' settings ids
    (:func:`label_tables`, ``where`` as there), and ``settings``, the table of those ids
    (:func:`settings_table`), beside them."""
    labelled = label_tables(tables, *stores, where=where)
    listed = pd.concat([settings_table(store) for store in stores], ignore_index=True)
    if not listed.empty:
        labelled["settings"] = listed.drop_duplicates("settings_id").reset_index(drop=True)
    return labelled

