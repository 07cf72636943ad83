"""Settings ids: which settings each row of a tidy table was computed at.

A unit's key names everything its rows depend on. A row of a tidy table pools units: every
batch of one (model, dataset, setting), under one protocol. Those units must have been
computed at one setting, and the row says which: its ``settings_id``, 8 hex digits of the
hash of the unit's *settings*:

* for an edit: the model's weights (its state id) and dtype, the method, and every
  effective hyperparameter (target steps and KL weight, λ, layers, alpha, the second
  moments' sample size), plus the alpha, layers, value site and editing protocol an
  experiment sets beside them;
* for the unedited model (``pre-edit``): the model's weights and dtype;
* for a localization trace: the model's weights and dtype and the trace's settings
  (method, kinds, tokens, window, noise, draws, seed, severed paths).

What a unit is *of* (its batch, its facts, its chunk, its part of a measurement) and how it
is scored (the metric sets, the fluency length, the generation settings, the trace of an
edited model) is not in the id: it names the edit or the trace a row stands for, and
``intattn status`` compares every field of a unit's key with today's plan. So the parts of
one outdated edit (its scores, its trace) share the edit's id. :func:`settings_table`
lists every id with its fields, the table ``intattn run`` writes beside an experiment's
others (``<experiment>_settings.csv``); :func:`label` gives a table its ``settings_id``
column and refuses units of one label computed at two settings. A row that pools units of
several labels (one row per model over every variant) names every id it pools, joined by
``+``.

A paired row (a setting against a ``baseline`` setting) names both: ``settings_id`` and
``baseline_settings_id``. The same edit stored by two experiments under keys of another
shape (an alpha at the top of the key, as the alpha sweep writes it, or inside the
hyperparameters, as the editor family does) has one id: :func:`settings_of` puts an edit's
settings in one shape.
"""

from __future__ import annotations

import hashlib
from typing import Any, Mapping, Sequence

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
        return _edit_settings(key)
    fields = TRACE_FIELDS if _is_trace(key) else MODEL_FIELDS
    return {name: key[name] for name in fields if name in key}


def _edit_settings(key: Mapping[str, Any]) -> dict:
    """An edit's :data:`EDIT_FIELDS` in one shape, whichever shape its key has: an alpha
    set beside the hyperparameters (the alpha sweep's keys) goes into them, as the edit
    applies it; a single alpha becomes one per edited layer; ``hparams_type`` (implied by
    the method) is dropped. So one edit has one id in every experiment."""
    settings = {name: key[name] for name in EDIT_FIELDS if name in key and name != "hparams_type"}
    hparams = dict(settings.get("hparams") or {})
    if "alpha" in settings:
        hparams["alpha"] = settings.pop("alpha")
    alpha, layers = hparams.get("alpha"), settings.get("layers", hparams.get("layers"))
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and layers:
        hparams["alpha"] = {str(layer): float(alpha) for layer in layers}
    elif isinstance(alpha, Mapping):
        hparams["alpha"] = {str(layer): float(value) for layer, value in alpha.items()}
    if settings.get("hparams") is not None or hparams:
        settings["hparams"] = hparams
    return settings


def _is_trace(key: Mapping[str, Any]) -> bool:
    """Whether a unit's key is that of a localization trace of the unedited model."""
    return "hparams" not in key and "window" in key and "chunk" in key


def settings_id(settings: Mapping[str, Any]) -> str:
    """:data:`ID_DIGITS` hex digits of the hash of ``settings`` (the cache's key recipe):
    the first run of them that cannot be read as a number, so that a CSV reader keeps the
    id as text (``44e73976`` would be read as 4.4e73977, ``00123456`` as 123456)."""
    # the cache key's 16 digits first (most ids are their first 8), then a longer hash's
    digest = cache_key(settings) + hashlib.sha256(canonical_json(settings).encode()).hexdigest()
    for start in range(len(digest) - ID_DIGITS + 1):
        candidate = digest[start:start + ID_DIGITS]
        if not _reads_as_number(candidate):
            return candidate
    raise ValueError(f"every run of {ID_DIGITS} digits of {digest} reads as a number")


def _reads_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


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


def settings_table(store: ResultStore | pd.DataFrame) -> pd.DataFrame:
    """One row per settings id of ``store``: the model (its weights' id) and dtype, the
    method, the hyperparameters of :data:`SHOWN` it has (target steps, learning rate and KL
    weight, λ, layers, alpha, the second moments' size) and the moments' source where it
    reads them, a trace's settings, the labels of the rows computed at it (``row_labels``),
    how many units were, and every setting as canonical JSON (``settings``: what tells
    two ids apart where the columns shown do not). ``store`` may be units already read
    (:func:`unit_settings`)."""
    import json

    units = store if isinstance(store, pd.DataFrame) else unit_settings(store)
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
        row["settings"] = group["settings"].iloc[0]
        out.append(row)
    return pd.DataFrame(out)


def label(table: pd.DataFrame, units: pd.DataFrame, name: str = "table",
          where: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """``table`` with a ``settings_id`` column from ``units`` (:func:`unit_settings`),
    joined on the :data:`JOIN_COLUMNS` both have, over the units whose labels are
    ``where``'s (a value, or a tuple of values; a missing label is ``""``): the units a
    table reads where its own columns do not say, exact traces only, say.

    Units that carry the same labels (every :data:`JOIN_COLUMNS` they have: one model,
    dataset, protocol, setting, variant, window, method) must be at one setting, whatever
    the table does with them; else a :class:`MixedSettingsError` names the labels and the
    ids (a stale batch beside today's). A table row that pools units of several labels (one
    row per model over every variant; a comparison of methods) names every id it pools,
    joined by ``+``. A paired row (a ``baseline`` column naming another setting) also names
    its baseline's, ``baseline_settings_id``. Rows no unit matches get none."""
    if table.empty or units.empty or "settings_id" in table.columns:
        return table
    for column, value in dict(where or {}).items():
        own_labels = units[column] if column in units.columns else pd.Series("", index=units.index)
        allowed = {_text(v) for v in value} if isinstance(value, (list, tuple, set, frozenset)) else {_text(value)}
        units = units[own_labels.map(_text).isin(allowed)]
    on = [c for c in JOIN_COLUMNS if c in table.columns and c in units.columns]
    if "model" not in on:
        return table
    labels = [c for c in JOIN_COLUMNS if c in units.columns]
    own = units[labels + ["settings_id"]].copy()
    for column in labels:  # compare as text: a CSV's "0.3" and a row's 0.3 are one setting
        own[column] = own[column].map(_text)
    per_label = own.groupby(labels, sort=False)["settings_id"].agg(lambda s: sorted(set(s))).reset_index()
    mixed = per_label[per_label["settings_id"].map(len) > 1]
    if len(mixed):
        first = mixed.iloc[0]
        named = ", ".join(f"{c}={first[c]}" for c in labels if first[c] != "")
        raise MixedSettingsError(
            f"{name}: the units of {named} were computed at {len(first['settings_id'])} settings "
            f"({', '.join(first['settings_id'])}), and a row would pool them; remove the stale ones (`intattn "
            "status`, `intattn reproduce --prune-stale`) or run them again at one setting")
    ids = own.groupby(on, sort=False)["settings_id"].agg(lambda s: "+".join(sorted(set(s)))).reset_index()
    keys = table[on].copy()
    for column in on:
        keys[column] = keys[column].map(_text)
    merged = keys.merge(ids, on=on, how="left")
    out = table.copy()
    out["settings_id"] = merged["settings_id"].to_numpy()
    if "baseline" in table.columns and "setting" in on:
        # a paired row: its baseline is another setting's row of the same model and dataset
        keys["setting"] = table["baseline"].map(_text).to_numpy()
        out["baseline_settings_id"] = keys.merge(ids, on=on, how="left")["settings_id"].to_numpy()
    return out


def _text(value: Any) -> str:
    """A join value as text: numbers without a trailing ``.0``, missing values empty."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def label_tables(tables: Mapping[str, pd.DataFrame], *stores: ResultStore,
                 where: Mapping[str, Mapping[str, Any]] | None = None,
                 reads: Mapping[str, Sequence[ResultStore]] | None = None) -> dict[str, pd.DataFrame]:
    """Every table of ``tables`` labelled (:func:`label`) from the units of ``stores``
    (the experiment's), or of the stores ``reads`` names for it (a table that reads
    another experiment's units beside its own); ``where`` gives a table's unit selection
    by its name."""
    return _labelled(tables, stores, _read_units(stores, reads), where, reads)


def with_settings(tables: Mapping[str, pd.DataFrame], *stores: ResultStore,
                  where: Mapping[str, Mapping[str, Any]] | None = None,
                  reads: Mapping[str, Sequence[ResultStore]] | None = None) -> dict[str, pd.DataFrame]:
    """An experiment's tables as it shows them: each labelled with its rows' settings ids
    (:func:`label_tables`, ``where`` and ``reads`` as there), and ``settings``, the table of
    the ids of every store read (:func:`settings_table`), beside them. Each store's units
    are read once."""
    read = _read_units(stores, reads)
    labelled = _labelled(tables, stores, read, where, reads)
    units = pd.concat(list(read.values()), ignore_index=True)
    if not units.empty:
        labelled["settings"] = settings_table(units)
    return labelled


def _read_units(stores: Sequence[ResultStore], reads: Mapping[str, Sequence[ResultStore]] | None
                ) -> dict[int, pd.DataFrame]:
    """:func:`unit_settings` of every store named, by the store's ``id``."""
    every = [*stores, *(store for chosen in (reads or {}).values() for store in chosen)]
    return {id(store): unit_settings(store) for store in {id(s): s for s in every}.values()}


def _labelled(tables: Mapping[str, pd.DataFrame], stores: Sequence[ResultStore], read: Mapping[int, pd.DataFrame],
              where: Mapping[str, Mapping[str, Any]] | None, reads: Mapping[str, Sequence[ResultStore]] | None
              ) -> dict[str, pd.DataFrame]:
    where, reads = where or {}, reads or {}
    out = {}
    for name, frame in tables.items():
        chosen = reads.get(name, stores)
        units = pd.concat([read[id(store)] for store in chosen], ignore_index=True)
        out[name] = label(frame, units, name, where.get(name)) if frame is not None else None
    return out
