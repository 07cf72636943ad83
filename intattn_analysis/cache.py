"""The disk cache of expensive results: one key recipe, one layout, one way to store an entry.

Traces, targets ``z*``, second moments, the corpus samples they are collected over and
the context prefixes of the targets are all cached the same way.

**Key.** Each cached result is described by its *fields*: a JSON object naming everything
its numbers depend on. :func:`cache_entry` always adds the model's ``state_id`` (field
``"model"``: the weights file and the edits applied to it) and its dtype (field
``"dtype"``, :func:`entry_fields`); the caller adds the rest (a format version, the fact, the layer, every
setting that changes the result). :func:`cache_key` hashes the fields' canonical JSON
(sorted fields, no spaces, sets as sorted lists, tuples as lists, numpy and torch scalars
as numbers) with sha256 and keeps 16 hex digits. The experiments' result store names its
unit files with the same recipe (:func:`entry_name`), so a unit and a cache entry of the
same fields carry the same digits.

**Layout.** An entry of kind ``<kind>`` is the file

    <cache root>/<kind>/<model cache folder>/<label>-<key>.<ext>

where the cache root is :func:`~intattn_analysis.loading.cache_root`
(``$INTATTN_CACHE`` or ``~/.cache/intattn``), a function's ``cache_dir`` argument stands
in for ``<cache root>/<kind>`` (:func:`kind_folder`), the model cache folder is
:attr:`~intattn_analysis.loading.ModelHandle.cache_folder` (the weights file: an edited
state shares its folder, and its key tells it apart), and the label says what the entry
holds for a reader of the folder (``trace-<fact>-<kind>``, ``z-layer<L>-<fact>``,
``mom2-<module>-layer<L>-...``, ``samples-seed<S>-...``, ``templates-n<N>-len<L>``). The
kinds are ``traces``, ``targets``, ``moments`` (whose ``corpora`` subfolder holds the
sampled corpora), ``context_templates`` and ``known`` (whether a model state knows a
fact, :func:`~intattn_analysis.known.is_known_cached`).

**Entries.** A JSON entry is an object ``{"key": <fields>, ...}``; a tensor entry is a
safetensors file whose metadata ``"key"`` holds the fields' canonical JSON. Entries are
written atomically (:func:`~intattn_analysis.loading.write_atomic`): a reader sees a
whole entry or none. A read gives ``None`` when there is no entry; an entry that cannot
be read, fails the caller's check (cut short, the wrong shape, non-finite numbers), or
whose stored key is not the key asked for (a hash collision, a file edited or copied by
hand) is reported with :class:`~intattn_analysis.loading.CacheWarning` and also read as
``None``, and the caller recomputes and replaces it.

Entries written under another layout are not read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from .loading import cache_root, warn_damaged, write_atomic, write_json_atomic

if TYPE_CHECKING:
    from torch import Tensor

    from .loading import ModelHandle

__all__ = [
    "KEY_DIGITS",
    "MODEL_FIELDS",
    "CacheEntry",
    "cache_entry",
    "cache_key",
    "canonical_json",
    "entry_fields",
    "entry_name",
    "json_default",
    "kind_folder",
]

#: Hex digits of the sha256 kept in a key.
KEY_DIGITS = 16
#: The fields :func:`cache_entry` fills from the model: its ``state_id`` and its dtype.
MODEL_FIELDS = ("model", "dtype")
#: The exceptions a damaged entry raises while it is read or checked.
DAMAGE_ERRORS = (OSError, ValueError, KeyError, TypeError, IndexError, RuntimeError, EOFError)


def json_default(value: Any) -> Any:
    """The JSON form of a value ``json`` does not write by itself: a set as a sorted list,
    a tuple as a list, a numpy or torch scalar as its number."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"cannot write a {type(value).__name__} as JSON: {value!r}; give numbers, "
                    "strings, lists, sets or dicts of them")


def canonical_json(fields: Mapping[str, Any]) -> str:
    """``fields`` as one canonical JSON text: sorted fields, no spaces (the text a key
    hashes, so two processes that build the same fields get the same text)."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=json_default)


def cache_key(fields: Mapping[str, Any]) -> str:
    """The key of ``fields``: 16 hex digits of the sha256 of their canonical JSON."""
    return hashlib.sha256(canonical_json(fields).encode()).hexdigest()[:KEY_DIGITS]


def entry_name(fields: Mapping[str, Any], label: str = "") -> str:
    """A file name stem: the readable ``label`` (characters other than letters, digits and
    ``-_.`` turned into ``-``), a ``-`` and the key of ``fields``; the key alone for no
    label."""
    label = "".join(c if c.isalnum() or c in "-_." else "-" for c in label).strip("-")
    key = cache_key(fields)
    return f"{label}-{key}" if label else key


def kind_folder(kind: str) -> Path:
    """The default folder of one kind of entry: ``<cache root>/<kind>``."""
    if not kind or "/" in kind or kind.startswith("."):
        raise ValueError(f"kind must be a plain folder name such as 'targets', got {kind!r}")
    return cache_root() / kind


def entry_fields(model: "ModelHandle", fields: Mapping[str, Any]) -> dict:
    """The full fields of an entry of ``model``'s result: ``fields`` and the model's own,
    ``"model"`` (its ``state_id``) and ``"dtype"``, as JSON gives them back (tuples as
    lists, and so on). ``fields`` may not use the model's field names."""
    taken = [name for name in MODEL_FIELDS if name in fields]
    if taken:
        raise ValueError(f"the fields {taken} of a cache entry are the model's own (its state_id "
                         "and dtype, added from the model); give the setting another name")
    return json.loads(canonical_json({"model": model.state_id, "dtype": str(model.dtype), **fields}))


def cache_entry(
    folder: str | Path,
    model: "ModelHandle",
    label: str,
    fields: Mapping[str, Any],
    *,
    what: str,
    suffix: str = "json",
) -> "CacheEntry":
    """The entry of ``model``'s result described by ``fields`` under ``folder`` (a kind's
    folder: :func:`kind_folder`, or a ``cache_dir`` a function was given).

    ``fields`` names everything the result depends on besides the model's weights and
    dtype, which :func:`entry_fields` adds. ``label`` starts the file name, ``what`` names
    the result in warnings (``"the cached <what> <path> is damaged"``), ``suffix`` is the
    file's extension (``"json"`` or ``"safetensors"``).
    """
    full = entry_fields(model, fields)
    name = f"{entry_name(full, label)}.{suffix.lstrip('.')}"
    return CacheEntry(Path(folder) / model.cache_folder / name, full, what)


@dataclass(frozen=True)
class CacheEntry:
    """One cached result: where it lives, the fields its key hashes, and what it is.

    Attributes:
        path: the file (see the module notes for the layout).
        fields: the key's fields as JSON gives them back (tuples as lists, and so on),
            the form in which they are stored inside the entry and compared on reading.
        what: the result's name in warnings (``"trace"``, ``"target"``, ...).
    """

    path: Path
    fields: dict
    what: str

    @property
    def key(self) -> str:
        """The 16 hex digits of :func:`cache_key` (the end of the file name)."""
        return cache_key(self.fields)

    def _damaged(self, error: BaseException | str) -> None:
        warn_damaged(self.path, self.what, error, stacklevel=4)

    def _wrong_key(self, stored: Any) -> str:
        return (f"it holds the entry of another key ({_difference(stored, self.fields)}), not of "
                "the one its name is made from")

    # ------------------------------------------------------------------ JSON
    def read_json(self, check: Callable[[dict], None] | None = None) -> dict | None:
        """The stored object (with its ``"key"``), or ``None`` when there is none or it is
        damaged: not a JSON object, another key's, or refused by ``check`` (which raises
        ``ValueError``, ``KeyError`` or ``TypeError`` naming what is wrong)."""
        if not self.path.exists():
            return None
        try:
            with open(self.path) as handle:
                stored = json.load(handle)
            if not isinstance(stored, dict):
                raise ValueError(f"a {type(stored).__name__}, not an object with a key")
        except DAMAGE_ERRORS as error:
            self._damaged(error)
            return None
        if stored.get("key") != self.fields:
            self._damaged(self._wrong_key(stored.get("key")))
            return None
        try:
            if check is not None:
                check(stored)
        except DAMAGE_ERRORS as error:
            self._damaged(error)
            return None
        return stored

    def write_json(self, payload: Mapping[str, Any]) -> None:
        """Store ``payload`` (a JSON object without a ``"key"`` field) with the key, atomically."""
        if "key" in payload:
            raise ValueError("the field 'key' of a cache entry holds its key; name the value otherwise")
        write_json_atomic(self.path, {"key": self.fields, **payload})

    # ------------------------------------------------------------------ tensors
    def read_tensors(
        self, check: Callable[[dict, dict], None] | None = None
    ) -> "tuple[dict[str, Tensor], dict[str, str]] | None":
        """The stored tensors (copies on the CPU) and the metadata written with them, or
        ``None`` when there is no entry or it is damaged: unreadable, another key's, or
        refused by ``check(tensors, metadata)``."""
        from safetensors import SafetensorError, safe_open

        if not self.path.exists():
            return None
        try:
            with safe_open(str(self.path), framework="pt", device="cpu") as handle:
                metadata = dict(handle.metadata() or {})
                stored = json.loads(metadata.pop("key", "null"))
                tensors = {name: handle.get_tensor(name).clone() for name in handle.keys()}
        except (*DAMAGE_ERRORS, SafetensorError) as error:
            self._damaged(error)
            return None
        if stored != self.fields:
            self._damaged(self._wrong_key(stored))
            return None
        try:
            if check is not None:
                check(tensors, metadata)
        except DAMAGE_ERRORS as error:
            self._damaged(error)
            return None
        return tensors, metadata

    def write_tensors(self, tensors: "Mapping[str, Tensor]", metadata: Mapping[str, str] | None = None) -> None:
        """Store ``tensors`` as safetensors, the key and ``metadata`` (strings) in the
        file's metadata, atomically."""
        from safetensors.torch import save_file

        metadata = dict(metadata or {})
        if "key" in metadata:
            raise ValueError("the metadata 'key' of a cache entry holds its key; name the value otherwise")
        metadata["key"] = canonical_json(self.fields)
        stored = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
        write_atomic(self.path, lambda staging: save_file(stored, staging, metadata=metadata))


def _difference(stored: Any, asked: dict) -> str:
    """A short account of how a stored key differs from the key asked for."""
    if not isinstance(stored, dict):
        return f"the stored key is {type(stored).__name__}"
    names = sorted(n for n in set(stored) | set(asked) if stored.get(n) != asked.get(n))
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return f"fields {shown} differ"
