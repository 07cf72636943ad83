"""A resumable, mergeable store of experiment results: one gzipped JSON-lines file per unit.

An experiment is cut into *units* of work (one batch edited with one alpha, one chunk of
facts traced, ...). Each unit is described by a key: a JSON object naming everything its
result depends on (model and revision, dataset file and its hash, the facts of the batch,
method, alpha, every hyperparameter, the metric settings, the store format). The unit's
result is a list of rows, one per fact; it is written as one file
``<root>/<experiment>/<unit id>.jsonl.gz`` whose every line is a complete row (the unit's
labels, the fact, the values; the first line also carries the key, as ``unit_key``), so
``pandas.read_json(path, lines=True, dtype=False)`` reads any file (``dtype=False`` keeps
labels such as the setting ``"0"`` as text) and a folder of them is a table.

* **Compressed, and still plain JSON lines.** Each file is gzip (level 9, no name or
  time in its header, so the same rows give the same bytes), about a tenth of the text.
  Uncompressed ``.jsonl`` files, as stores written before compression hold, are read
  alike; :func:`compress_store` converts a store in place.

* **Resuming.** A unit's file appears whole or not at all (written to a staging file and
  renamed), so a killed run leaves only finished units. Before computing a unit the
  runner asks :meth:`ResultStore.has`; a restarted run computes only what is missing.
* **Sharding and merging.** The unit id is a hash of the key, so the same unit has the
  same file name in every process and on every machine. Shards writing into one folder
  merge by themselves; folders written elsewhere merge by copying their files together
  (:func:`merge_stores`). Reading several folders (:class:`ResultStore` with several
  roots) is the same as reading their merge.
* **Honest keys.** A file whose stored key differs from the key asked for (a hash
  collision, or a file edited by hand) is an error, not a hit.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import os
import shutil
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pandas as pd

from ..cache import canonical_json, entry_name, json_default
from ..loading import write_atomic

__all__ = ["KEY_FIELD", "STORE_FORMAT", "SUFFIX", "MissingResultsError", "ResultStore", "StoreError", "StoreWarning",
           "check_unique", "compress_store", "merge_stores", "read_unit_file", "unit_files", "unit_id", "unit_of"]

#: Format version of unit files; part of every key, so a new format never reads old files.
STORE_FORMAT = 2
#: Columns every row carries besides the key's labels and the unit's own values.
UNIT_COLUMNS = ("unit", "experiment")
#: The field of a unit's first line that holds its key (a name no row may use).
KEY_FIELD = "unit_key"
#: The suffix of the unit files written; ``.jsonl`` files (uncompressed) are read alike.
SUFFIX = ".jsonl.gz"
#: Every suffix a unit file may have, the one written first (it wins over an old copy).
SUFFIXES = (SUFFIX, ".jsonl")


class StoreError(ValueError):
    """A unit file is malformed or does not belong to the key that names it."""


class MissingResultsError(ValueError):
    """An experiment needs another experiment's stored results; the message names the
    command that makes them."""


class StoreWarning(UserWarning):
    """Two copies of one unit differ (see :func:`merge_stores`)."""


def unit_id(key: Mapping[str, Any], label: str = "") -> str:
    """The file name stem of a unit: a readable label and 16 hex digits of the key's hash.

    The hash covers the canonical JSON of the whole key (sorted fields), so two processes
    that build the same key name the same file; it is the disk cache's key recipe
    (:func:`intattn_analysis.cache.entry_name`).
    """
    return entry_name(key, label)


def unit_of(path: str | os.PathLike) -> str | None:
    """The unit id of a unit file's path (its name less the suffix), or ``None`` when the
    name has neither unit-file suffix."""
    name = Path(path).name
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def unit_files(folder: str | os.PathLike) -> dict[str, Path]:
    """``{unit id: path}`` of the unit files directly in ``folder`` (an experiment's
    folder), in unit-id order; where a unit has both a compressed and a plain file the
    compressed one is taken."""
    found: dict[str, Path] = {}
    folder = Path(folder)
    for suffix in reversed(SUFFIXES):  # the preferred suffix last, so that it overrides
        for path in folder.glob(f"*{suffix}"):
            uid = unit_of(path)
            if uid is not None and path.name == uid + suffix:
                found[uid] = path
    return {uid: found[uid] for uid in sorted(found)}


def _open_text(path: Path):
    """A unit file opened for reading text, decompressed when it is gzip."""
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def _gzip_bytes(text: str) -> bytes:
    """``text`` as gzip with a fixed header (no file name, time 0): the same text gives the
    same bytes on every machine and at every time."""
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as handle:
        handle.write(text.encode("utf-8"))
    return buffer.getvalue()


def _clean(value: Any) -> Any:
    """A JSON-safe value: NaN and infinities become null (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item") and not isinstance(value, (list, dict, str)):
        return _clean(value.item())
    return value


class ResultStore:
    """The units of one experiment, stored under one or more folders.

    Args:
        roots: the folder (or folders, to read several shards' outputs together) that
            hold ``<experiment>/<unit id>.jsonl.gz`` files (or ``.jsonl``). Units are
            written to the first.
        experiment: the experiment's name (the subfolder).

    Rows read back carry the columns ``unit`` (the unit id) and ``experiment`` beside the
    labels and values the runner stored.
    """

    def __init__(self, roots: str | os.PathLike | Sequence[str | os.PathLike], experiment: str) -> None:
        if isinstance(roots, (str, os.PathLike)):
            roots = [roots]
        if not roots:
            raise ValueError("roots is empty; give the folder the store lives in")
        if not experiment or "/" in experiment:
            raise ValueError(f"experiment must be a plain name, got {experiment!r}")
        self.roots = [Path(r) for r in roots]
        self.experiment = experiment

    @property
    def folder(self) -> Path:
        """Where new units are written."""
        return self.roots[0] / self.experiment

    def _paths(self, uid: str) -> list[Path]:
        """Where the unit ``uid`` may be, in the order it is looked for: each root, the
        compressed file before the plain one. The first is where it is written."""
        return [root / self.experiment / f"{uid}{suffix}" for root in self.roots for suffix in SUFFIXES]

    def has(self, key: Mapping[str, Any], label: str = "") -> bool:
        """Whether the unit is stored in any root (its file is checked against the key)."""
        return self.read_unit(key, label) is not None

    def read_unit(self, key: Mapping[str, Any], label: str = "") -> list[dict] | None:
        """The rows of one unit, or ``None`` if it is not stored."""
        uid = unit_id(key, label)
        for path in self._paths(uid):
            if path.exists():
                rows = _read_lines(path)
                stored = rows[0].get(KEY_FIELD) if rows else None
                if stored != json.loads(canonical_json(key)):
                    raise StoreError(
                        f"{path} does not hold the unit it is named for (its key differs); "
                        "remove the file so that the unit is computed again"
                    )
                return rows
        return None

    def write_unit(
        self, key: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], label: str = "",
        labels: Mapping[str, Any] | None = None,
    ) -> Path:
        """Store a unit's rows, each with ``labels`` (the columns a table groups by), the
        unit id and the key. The file appears whole or not at all."""
        if not rows:
            raise ValueError(f"unit {label or key!r} has no rows; a unit stores at least one")
        uid = unit_id(key, label)
        key_json = json.loads(canonical_json(key))
        reserved = {KEY_FIELD, *UNIT_COLUMNS} & {k for row in rows for k in row}
        if reserved:
            raise ValueError(f"rows may not use the store's own column names {sorted(reserved)}; "
                             "rename them")
        lines = []
        for i, row in enumerate(rows):
            record = {"unit": uid, "experiment": self.experiment, **(labels or {}),
                      **{k: _clean(v) for k, v in row.items()}}
            if i == 0:  # the key once per file: it identifies the unit, not a row
                record[KEY_FIELD] = key_json
            lines.append(json.dumps(record, default=json_default, allow_nan=False))
        path = self._paths(uid)[0]
        data = _gzip_bytes("\n".join(lines) + "\n")
        write_atomic(path, lambda staging: Path(staging).write_bytes(data))
        return path

    def files(self) -> list[Path]:
        """Every unit file, deduplicated by unit id (the first root wins)."""
        seen: dict[str, Path] = {}
        for root in self.roots:
            for uid, path in unit_files(root / self.experiment).items():
                seen.setdefault(uid, path)
        return [seen[uid] for uid in sorted(seen)]

    def remove(self, uid: str) -> list[Path]:
        """Delete every file of the unit ``uid`` (in every root, either suffix); returns
        the paths removed."""
        removed = [path for path in self._paths(uid) if path.exists()]
        for path in removed:
            path.unlink()
        return removed

    def first_rows(self) -> dict[str, dict]:
        """``{unit id: its first row}`` (the key included) for every unit file, in unit-id
        order: what a unit is (its labels, key and timing) without reading its rows, for
        tools that survey a store (``intattn status``, the settings tables of the pages)."""
        out = {}
        for path in self.files():
            try:
                with _open_text(path) as handle:
                    line = handle.readline()
            except (OSError, EOFError, zlib.error, UnicodeDecodeError) as error:
                raise _unreadable(path, error) from None
            if not line.strip():
                raise ValueError(f"{path}: an empty unit file; remove it and run the experiment again")
            out[unit_of(path)] = json.loads(line)
        return out

    def rows(self, **where: Any) -> pd.DataFrame:
        """All stored rows as one table (the key dropped), in unit-id order, then row
        order; ``where`` keeps rows whose columns equal the given values.

        Every unit file is read, whatever configuration made it: a store that holds the
        same facts under one setting twice (say, after the defaults changed) gives
        duplicated rows, which :func:`check_unique` finds."""
        frames = []
        for path in self.files():
            records = _read_lines(path)
            frames.append(pd.DataFrame([{k: v for k, v in r.items() if k != KEY_FIELD} for r in records]))
        if not frames:
            return pd.DataFrame(columns=list(UNIT_COLUMNS))
        frame = pd.concat(frames, ignore_index=True)
        for column, value in where.items():
            if column not in frame.columns:
                raise KeyError(f"no column {column!r} in the store; it has {list(frame.columns)}")
            frame = frame[frame[column] == value]
        return frame.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.files())

    def __repr__(self) -> str:
        return f"ResultStore({[str(r) for r in self.roots]}, {self.experiment!r}: {len(self)} units)"


def read_unit_file(path: str | os.PathLike) -> list[dict]:
    """Every row of one unit file, compressed or not, the first with its key
    (``unit_key``)."""
    return _read_lines(Path(path))


def _read_lines(path: Path) -> list[dict]:
    rows = []
    try:
        with _open_text(path) as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise StoreError(f"{path}, line {number}: not JSON ({error.msg}); remove the "
                                     "file so that its unit is computed again") from None
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as error:  # a truncated or corrupt stream
        if isinstance(error, FileNotFoundError):
            raise
        raise _unreadable(path, error) from None
    return rows


def _unreadable(path: Path, error: BaseException) -> StoreError:
    return StoreError(f"{path}: not a readable unit file ({type(error).__name__}: {error}); remove the file so "
                      "that its unit is computed again")


def compress_store(root: str | os.PathLike) -> int:
    """Rewrite every plain ``.jsonl`` unit file under ``root`` (a store root, the folder of
    ``<experiment>/`` folders) as ``.jsonl.gz`` with the same lines, and remove the plain
    file once the compressed one reads back to the same rows; returns how many files were
    converted. A unit that already has a compressed file keeps it, and its plain copy is
    removed only if the two hold the same rows (otherwise a :class:`StoreError`)."""
    converted = 0
    for folder in sorted(p for p in Path(root).iterdir() if p.is_dir()):
        for uid in unit_files(folder):
            plain, packed = folder / f"{uid}.jsonl", folder / f"{uid}{SUFFIX}"
            if not plain.exists():
                continue
            rows = _read_lines(plain)
            if packed.exists():
                if _read_lines(packed) != rows:
                    raise StoreError(f"{plain} and {packed} hold different rows for one unit; keep one of them")
            else:
                data = _gzip_bytes(plain.read_text(encoding="utf-8"))
                write_atomic(packed, lambda staging, data=data: Path(staging).write_bytes(data))
                if _read_lines(packed) != rows:
                    packed.unlink()
                    raise StoreError(f"{packed} did not read back as {plain}; the plain file is kept")
                converted += 1
            plain.unlink()
    return converted


def merge_stores(sources: Iterable[str | os.PathLike], target: str | os.PathLike) -> int:
    """Copy every unit file of ``sources`` (store roots, e.g. one per shard) into
    ``target``; returns how many files were copied. A unit already in ``target`` is kept;
    if the copy differs in a result (not a timing), a warning names both files: the same
    key gave different numbers, for example on two machines whose float arithmetic
    differs in the last bits."""
    target = Path(target)
    copied = 0
    for source in sources:
        source = Path(source)
        folders = sorted(p for p in source.iterdir() if p.is_dir()) if source.is_dir() else []
        files = [path for folder in folders for path in unit_files(folder).values()]
        if not files:
            raise StoreError(f"{source} holds no unit files; give a store root, the folder "
                             "that holds <experiment>/<unit>.jsonl.gz (the --out of `intattn run`)")
        for path in files:
            present = [p for p in (target / path.parent.name / f"{unit_of(path)}{s}" for s in SUFFIXES) if p.exists()]
            destination = present[0] if present else target / path.parent.name / path.name
            if present:
                if _without_timing(_read_lines(destination)) != _without_timing(_read_lines(path)):
                    warnings.warn(f"{path} and {destination} hold different results for the same "
                                  f"unit; kept {destination}", StoreWarning, stacklevel=2)
                continue
            write_atomic(destination, lambda staging, path=path: shutil.copyfile(path, staging))
            copied += 1
    return copied


#: Row fields that measure the run rather than the result (ignored when units are compared).
TIMING_FIELDS = ("seconds",)


def _without_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in rows]


def check_unique(rows: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """``rows`` unchanged if no two rows share ``columns``; otherwise a :class:`StoreError`
    naming the duplicated labels and the unit files that hold them (results of two
    configurations under one name, which would be counted twice)."""
    present = [c for c in columns if c in rows.columns]
    duplicated = rows[rows.duplicated(present, keep=False)]
    if len(duplicated):
        first = {k: (v.item() if hasattr(v, "item") else v) for k, v in duplicated.iloc[0][present].items()}
        units = sorted(set(duplicated["unit"]))
        units = units[:6] + (["..."] if len(units) > 6 else [])
        raise StoreError(
            f"{len(duplicated)} rows share their labels with another row, e.g. {first}: "
            f"units {units} hold the same facts under the same setting, made with different "
            "configurations. Remove the files of the configuration you do not want (or use "
            "another store folder)")
    return rows
