"""What an edit wrote, and how to undo it: :class:`EditResult`, saved deltas, model state.

Every method of the family (:mod:`intattn_analysis.editors.methods`) returns an
:class:`EditResult`. It keeps copies of the original weights of every matrix the method
may write, taken before the first write, so :meth:`EditResult.restore` puts the model
back bit for bit (subtraction is never used), and anything that fails in the middle of an
edit (an exception, ``KeyboardInterrupt``) restores the originals before it propagates:
an edit never leaves weights half-written.

Edits on one model form a stack (``model.applied_edits``), and the model's
:attr:`~intattn_analysis.ModelHandle.state_id` names the weights as loaded plus the
fingerprints of the edits on that stack, so every cache keyed on it (traces, targets,
second moments, context prefixes) tells an edited model from the unedited one.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor

from ..architectures import MODULES, layer_indices
from ..loading import ModelHandle

__all__ = ["DELTAS_FORMAT", "EditError", "EditResult", "apply_deltas"]

#: Format version of saved deltas.
DELTAS_FORMAT = 1

Key = tuple[str, int]


class EditError(ValueError):
    """An edit cannot be computed; the message names the input and what would work."""


@dataclass
class EditResult:
    """What an edit wrote, and how to undo it.

    Attributes:
        method: the method's name.
        layers: the edited layers.
        alphas: the attention share used at each layer (methods that split a residual
            between ``o_proj`` and ``down_proj``; 0 for MLP-only methods, empty for the
            fine-tuning baselines).
        hparams: the settings used (the method's hyperparameter dataclass).
        deltas: ``{(module, layer): ΔW}`` in the weight's own layout and dtype: what was
            added to the weight. For a method that writes a matrix once (the closed-form
            family) it is exactly the float32 addition made; for one that writes it
            several times (ROME over a batch, fine-tuning) it is the final weight minus
            the original, so :func:`apply_deltas` repeats the edit to float rounding.
        timings: seconds per phase (``targets``, ``moments``, ``solve``, ``total``).
        z_diagnostics: one dict per fact from the target optimisation (or the
            fine-tuning loop).
        residuals: ``{(module, layer): [facts, d_model]}`` the residual-stream change each
            write was asked for (closed-form family; before any post-norm conversion).
        context_templates: the prefixes the targets and keys were read under.
        state: what the method carries to the next edit of a sequence (AlphaEdit: the
            second moment of the keys edited so far); ``None`` for methods without state.
        details: what a method reports about itself (the null-space projection: the
            dimension of the null space per matrix, ``{(module, layer): (dims, d_in)}``).

    Used as a context manager the edit is undone on exit; :meth:`restore` undoes it at
    any time (idempotent).
    """

    model: ModelHandle = field(repr=False)
    method: str
    layers: tuple[int, ...]
    alphas: dict[int, float]
    hparams: Any
    deltas: dict[Key, Tensor] = field(default_factory=dict, repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    z_diagnostics: list[dict] = field(default_factory=list, repr=False)
    residuals: dict[Key, Tensor] = field(default_factory=dict, repr=False)
    context_templates: list[str] = field(default_factory=list, repr=False)
    state: Any = field(default=None, repr=False)
    details: dict = field(default_factory=dict, repr=False)
    _originals: dict[Key, Tensor] = field(default_factory=dict, repr=False)
    _open: bool = field(default=False, repr=False)
    _digest: str | None = field(default=None, repr=False)
    _rewritten: set = field(default_factory=set, repr=False)
    _applying: bool = field(default=False, repr=False)
    restored: bool = False

    # ------------------------------------------------------------------ undo
    def restore(self) -> None:
        """Copy the original weights back (bit for bit). Safe to call twice: once
        restored, a second call does nothing.

        Edits on one model form a stack (``model.applied_edits``). The originals an edit
        keeps are the weights as they were before it, so restoring it under a later edit
        of the same matrices would wipe that later edit too. That raises an
        :class:`EditError` naming the later edits; restore them first (newest first, as
        nested ``with`` blocks do). An edit whose matrices no later edit touches restores
        in any order.
        """
        if not self._open:
            self.restored = True
            return
        stack = self.model.applied_edits
        position = next((i for i, e in enumerate(stack) if e is self), None)
        if position is None:
            raise EditError(f"{self.describe()} is not on {self.model.name}'s stack of applied edits; "
                            "it cannot be restored from here")
        blocking = [e for e in stack[position + 1:] if set(e._originals) & set(self._originals)]
        if blocking:
            raise EditError(
                f"cannot restore {self.describe()} while later edits of the same matrices are "
                f"applied on top of it: {'; '.join(e.describe() for e in blocking)}. Restore "
                "those first (the newest first); restoring this one now would undo them too"
            )
        restore_weights(self.model, self._originals)
        del stack[position]
        self._open = False
        self.restored = True

    def describe(self) -> str:
        """One line naming the edit: method, matrices written, facts."""
        modules = ", ".join(f"{m}@{l}" for m, l in sorted(self._originals, key=lambda k: (k[1], k[0])))
        facts = f"of {len(self.z_diagnostics)} fact(s) " if self.z_diagnostics else "(applied deltas) "
        return f"edit {self.method!r} {facts}writing [{modules}]"

    def fingerprint(self) -> str:
        """A hash of the deltas as written (computed once, when first asked for)."""
        if self._digest is None:
            self._digest = fingerprint(self.deltas)
        return self._digest

    def _opened(self, originals: dict[Key, Tensor]) -> None:
        """Keep the originals and put the edit on the model's stack until it is restored."""
        self._originals = originals
        if not self._open:
            self.model.applied_edits.append(self)
            self._open = True

    def _write(self, key: Key, delta: Tensor) -> Tensor:
        """Add ``delta`` (``[d_out, d_in]``, any float dtype) to one of the matrices this
        edit snapshotted, and record it; returns what was added, in the weight's dtype."""
        self._check_declared(key)
        applied = write_weight(self.model, key, delta)
        if key in self.deltas:
            self._rewritten.add(key)
        else:
            self.deltas[key] = applied
        self._digest = None
        return applied

    def _changed_in_place(self, key: Key) -> None:
        """Note a matrix that a method changed itself (an optimiser step)."""
        self._check_declared(key)
        self._rewritten.add(key)

    def _check_declared(self, key: Key) -> None:
        if key not in self._originals:
            raise EditError(
                f"method {self.method!r} wrote {key}, which it did not declare; declared: "
                f"{sorted(self._originals, key=lambda k: (k[1], k[0]))}"
            )

    def _settle(self) -> None:
        """The delta of a matrix written more than once, or changed in place, is the final
        weight minus the original, in the weight's dtype."""
        for key in sorted(self._rewritten, key=lambda k: (k[1], k[0])):
            weight = self.model.weight(*key).detach()
            original = self._originals[key].to(weight.device)
            self.deltas[key] = (weight.double() - original.double()).to(weight.dtype)
        self._rewritten = set()
        self._digest = None

    def __enter__(self) -> "EditResult":
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.restore()
        return False

    # ------------------------------------------------------------------ views
    @property
    def modules(self) -> list[Key]:
        return sorted(self.deltas, key=lambda k: (k[1], k[0]))

    def z_table(self):
        """The target diagnostics as a DataFrame (one row per fact)."""
        import pandas as pd

        return pd.DataFrame(self.z_diagnostics)

    def delta_norms(self) -> dict[Key, float]:
        return {k: float(v.double().norm()) for k, v in self.deltas.items()}

    # ------------------------------------------------------------------ files
    def save(self, path: str | Path) -> Path:
        """Write the deltas as safetensors, with the model id, method, layers, alphas and
        hparams (JSON) in the metadata; :func:`apply_deltas` reads it back."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{m}.{l}": d.detach().to("cpu").contiguous() for (m, l), d in self.deltas.items()}
        metadata = {
            "format": str(DELTAS_FORMAT),
            "cache_id": self.model.cache_id,
            "architecture": self.model.spec.name,
            "weight_layout": self.model.spec.weight_layout,
            "method": self.method,
            "layers": json.dumps(list(self.layers)),
            "alpha": json.dumps({str(l): a for l, a in self.alphas.items()}),
            "hparams_type": type(self.hparams).__name__ if self.hparams is not None else "",
            "hparams": self.hparams.to_json() if self.hparams is not None else "null",
        }
        save_file(tensors, str(path), metadata=metadata)
        return path

    def __repr__(self) -> str:
        alphas = {l: round(a, 4) for l, a in self.alphas.items()}
        state = "restored" if self.restored else "applied"
        return (
            f"EditResult(method={self.method!r}, layers={list(self.layers)}, alphas={alphas}, "
            f"writes={len(self.deltas)}, facts={len(self.z_diagnostics)}, {state}, "
            f"timings={ {k: round(v, 2) for k, v in self.timings.items()} })"
        )


# =========================================================================== weights
def snapshot(model: ModelHandle, keys: Iterable[Key]) -> dict[Key, Tensor]:
    """Copies of the original weights (on the CPU), taken before anything is written."""
    return {key: model.weight(*key).detach().to("cpu", copy=True) for key in keys}


@torch.no_grad()
def restore_weights(model: ModelHandle, originals: Mapping[Key, Tensor]) -> None:
    for key, original in originals.items():
        model.weight(*key).copy_(original)


@torch.no_grad()
def write_weight(model: ModelHandle, key: Key, delta: Tensor) -> Tensor:
    """Add ``delta`` (``[d_out, d_in]``) to the weight, in the weight's layout and dtype;
    return exactly what was added."""
    weight = model.weight(*key)
    if model.spec.weight_layout == "in_out":
        delta = delta.T
    if tuple(delta.shape) != tuple(weight.shape):
        raise EditError(
            f"update for {key} has shape {tuple(delta.shape)} but the weight is "
            f"{tuple(weight.shape)} (layout {model.spec.weight_layout!r})"
        )
    applied = delta.to(device=weight.device, dtype=weight.dtype).contiguous()
    weight.add_(applied)
    return applied


def fingerprint(deltas: Mapping[Key, Tensor]) -> str:
    """A hash of the deltas' keys and exact values (their float32 bytes)."""
    digest = hashlib.sha256()
    for key in sorted(deltas):
        digest.update(repr(key).encode())
        digest.update(deltas[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_layers(model: ModelHandle, layers) -> tuple[int, ...]:
    try:
        return layer_indices(layers, model.n_layers)
    except ValueError as error:
        raise EditError(f"{error} (model {model.name!r})") from None


# =========================================================================== files
def apply_deltas(
    model: ModelHandle, source: str | Path | Mapping[Key, Tensor], *, strict: bool = True,
    allow_repeat: bool = False,
) -> EditResult:
    """Add saved deltas (a file from :meth:`EditResult.save`, or a ``{(module, layer):
    ΔW}`` mapping) to the model's weights; the returned :class:`EditResult` restores them.

    The file's model id must equal ``model.cache_id`` (``strict=False`` accepts another id
    with a warning, for the same architecture), every delta must have its weight's shape
    and finite values, and a file that is not a deltas file raises an :class:`EditError`.
    Deltas equal to an edit that is still applied (the same file twice, or the file of an
    edit not yet restored) are refused, since adding them again doubles the edit;
    ``allow_repeat=True`` stacks them anyway.
    """
    started = time.perf_counter()
    meta: dict[str, str] = {}
    if isinstance(source, Mapping):
        deltas = {(str(m), int(l)): t for (m, l), t in source.items()}
    else:
        from safetensors import SafetensorError, safe_open

        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"no deltas file at {path}")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
                deltas = {}
                for name in fh.keys():
                    module, _, layer = name.rpartition(".")
                    deltas[(module, int(layer))] = fh.get_tensor(name).clone()
        except (SafetensorError, OSError, ValueError) as error:
            raise EditError(
                f"{path} is not a readable deltas file ({type(error).__name__}: {error}); "
                "write one with EditResult.save"
            ) from None
        if meta.get("cache_id") != model.cache_id:
            message = (
                f"the deltas in {path} were computed on {meta.get('cache_id')!r} but the model "
                f"is {model.cache_id!r}"
            )
            if strict:
                raise EditError(message + "; load that model, or pass strict=False to apply anyway")
            warnings.warn(message, stacklevel=2)
        if meta.get("weight_layout", model.spec.weight_layout) != model.spec.weight_layout:
            raise EditError(
                f"the deltas in {path} are in layout {meta['weight_layout']!r}, the model's "
                f"weights in {model.spec.weight_layout!r}"
            )
    for (module, layer), delta in deltas.items():
        if module not in MODULES:
            raise EditError(f"delta for unknown module {module!r}; modules: {MODULES}")
        check_layers(model, [layer])
        shape = tuple(model.weight(module, layer).shape)
        if tuple(delta.shape) != shape:
            raise EditError(
                f"delta for ({module!r}, {layer}) has shape {tuple(delta.shape)}; the model's "
                f"weight is {shape}"
            )
        if not bool(torch.isfinite(delta).all()):
            raise EditError(f"delta for ({module!r}, {layer}) has NaN or infinite entries; nothing was applied")
    # compared as they would be added: in the weights' dtype
    deltas = {key: d.to(device=model.weight(*key).device, dtype=model.weight(*key).dtype)
              for key, d in deltas.items()}
    digest = fingerprint(deltas)
    repeated = [e for e in model.applied_edits if e.fingerprint() == digest]
    if repeated and not allow_repeat:
        raise EditError(
            f"these deltas are already applied ({repeated[0].describe()}); applying them again "
            "would double the edit. Restore it first, or pass allow_repeat=True to stack them"
        )
    try:
        hp = _saved_hparams(meta)
        alphas = {int(l): float(a) for l, a in json.loads(meta.get("alpha", "{}")).items()}
        layers = (tuple(int(l) for l in json.loads(meta["layers"])) if "layers" in meta
                  else tuple(sorted({l for _, l in deltas})))
    except (ValueError, TypeError, AttributeError) as error:
        raise EditError(
            f"the metadata of {source} is damaged ({type(error).__name__}: {error}); write the "
            "file again with EditResult.save"
        ) from None
    result = EditResult(
        model=model, method=meta.get("method", "applied"), layers=layers, alphas=alphas, hparams=hp,
    )
    result._opened(snapshot(model, deltas))
    try:
        with torch.no_grad():
            for key, delta in deltas.items():
                model.weight(*key).add_(delta)
                result.deltas[key] = delta
    except BaseException:
        result.restore()
        raise
    result.timings["apply"] = time.perf_counter() - started
    return result


def _saved_hparams(meta: Mapping[str, str]):
    """The hparams recorded in a deltas file (``None`` when there are none), read with
    the dataclass the file names (files without the name hold :class:`EditHparams`)."""
    if meta.get("hparams") in (None, "null"):
        return None
    from .. import hparams as hparams_module

    cls = getattr(hparams_module, meta.get("hparams_type") or "EditHparams", None)
    if cls is None or not hasattr(cls, "from_json"):
        raise ValueError(f"unknown hparams type {meta.get('hparams_type')!r}")
    return cls.from_json(meta["hparams"])
