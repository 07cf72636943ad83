"""Editing hyperparameters: a frozen dataclass per method family, defaults as data files.

The closed-form editors (MEMIT, IntAttn-Edit, attention-only, AlphaEdit) read
:class:`EditHparams`, which has two groups of settings:

* the **target** (MEMIT's ``compute_z``): how hard to push the residual stream of the
  last edited layer towards the new answer: Adam learning rate and steps, a weight decay
  and a norm clamp on the residual delta, a KL term that keeps what the model says about
  the subject in general, and the short context prefixes the target must work under;
* the **solve**: which layers are written, how the residual is spread over them, how
  much each module takes (IntAttn-Edit's balance factor alpha), how strongly the keys of
  a text corpus are preserved (lambda, one per module, times the corpus second moment
  ``E[k kᵀ]``) or whether the update is projected onto their null space instead
  (AlphaEdit), with the size of that corpus sample.

ROME reads :class:`RomeHparams` (the target fields, one layer, ``mom2_adjustment``), PMET
:class:`PMETHparams` and the fine-tuning baselines :class:`FTHparams`.

Defaults are data files, one per (method, model), under :func:`defaults_dir`
(``<method>/<model>.json``), each with a ``source`` field that says where its values come
from; :func:`hparams_for` reads them. The two 7B entries start from MEMIT's published
settings for Llama-family models (EasyEdit's ``hparams/MEMIT/qwen2.5-7b.yaml`` and
``mistral-7b.yaml``). The entries of the embedded models take their per-layer alpha from
causal tracing (notebooks 01 and 02, :func:`intattn_analysis.balance`) and their edit
layers and lambda from comparisons on ZsRE train records.

Any other model gets :func:`generic_hparams` for the method: the rule its editor declares
(for the closed-form family: five consecutive layers starting at an eighth of the depth,
MEMIT's layers 4-8 of 32, the Llama-family settings otherwise) and a
:class:`GenericHparamsWarning` that names the rule. Each editor declares its dataclass,
its defaults folder and its rule when it is registered (:func:`register_defaults`, called
by :func:`intattn_analysis.register_editor`), so a method defined outside the package
reads its own files the same way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from .architectures import layer_indices

__all__ = [
    "EditHparams",
    "FTHparams",
    "HPARAMS_TYPES",
    "METHOD_DEFAULTS",
    "MethodDefaults",
    "PMETHparams",
    "RomeHparams",
    "default_models",
    "defaults_dir",
    "GenericHparamsWarning",
    "MODEL_DEFAULTS",
    "SPREADS",
    "generic_hparams",
    "generic_layers",
    "hparams_for",
    "register_defaults",
]

#: How the residual still missing at the last edited layer is shared out: layer ``i`` of
#: ``n`` edited layers (``left = n - i`` layers still to write, this one included) takes
#: ``1/left`` (MEMIT) or ``1/sqrt(left)`` (PMET) of it.
SPREADS: dict[str, Any] = {
    "memit": lambda left: 1.0 / left,
    "pmet": lambda left: 1.0 / math.sqrt(left),
}

#: The closed-form family's solves: least squares with ``λ C``, or AlphaEdit's projection.
PROJECTIONS = ("none", "null_space")

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


class GenericHparamsWarning(UserWarning):
    """:func:`hparams_for` had no entry for the model and used the generic rule."""


def _set_layers(hp) -> None:
    """Check that ``hp.layers`` names distinct layers and store them as a sorted tuple."""
    layers = hp.layers
    if not isinstance(layers, int) and hasattr(layers, "__len__") and len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct, got {list(layers)}")
    object.__setattr__(hp, "layers", layer_indices(layers))


def _check_counts(hp, names: Sequence[str], minimum: int) -> None:
    """Each named field must be an integer (not a bool) of at least ``minimum``."""
    for name in names:
        value = getattr(hp, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _set_amounts(hp, names: Sequence[str]) -> None:
    """Each named field must be a finite number >= 0 (not a bool); stored as a float."""
    for name in names:
        value = getattr(hp, name)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        object.__setattr__(hp, name, float(value))


@dataclass(frozen=True)
class EditHparams:
    """Every setting of a MEMIT-family edit (see the module notes for the two groups).

    Attributes:
        layers: the edited layers, ascending. The target is set at the output of the last.
        alpha: the attention share of each layer's update (IntAttn-Edit's balance factor):
            a number in [0, 1], a ``{layer: alpha}`` mapping (for example
            :func:`intattn_analysis.balance`'s result), or ``None`` for the model's default.
            Only methods that split the update read it.
        spread: ``"memit"`` (``1/(L-i)``) or ``"pmet"`` (``1/sqrt(L-i)``).
        v_lr, v_steps: Adam learning rate, and how many times the target loss is evaluated
            (MEMIT's ``v_num_grad_steps``: the last evaluation takes no step, so at most
            ``v_steps - 1`` updates).
        v_weight_decay: weight of ``||delta|| / ||h||²`` in the target loss (MEMIT's form).
        clamp_norm_factor: after each step ``||delta||`` is clipped to this times ``||h||``.
        kl_factor: weight of the KL term on ``"{subject} is a"``.
        kl_position: where that KL term is taken: ``"subject_last"`` (the subject's last
            token, as MEMIT's code does) or ``"last"`` (the prompt's last token, this
            project's rule before it matched the reference).
        n_context_templates, context_template_length: how many short prefixes (generated
            greedily by the model) the target must hold under, and their length in tokens;
            the bare prompt is always used as well.
        stop_loss: a fact's target optimisation stops once its loss is below this
            (MEMIT: 0.05); the others go on.
        stop_on: which loss ``stop_loss`` applies to: ``"loss"`` (NLL + KL + weight
            decay, as MEMIT's code does) or ``"nll"`` (the NLL alone, this project's rule
            before it matched the reference).
        lambda_mlp, lambda_attn: weight of the corpus second moment in each module's
            solve, ``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹`` (MEMIT's ``mom2_update_weight``).
        mom2_n_tokens, mom2_max_len, mom2_dtype: corpus sample for the second moments:
            tokens in all, tokens per sequence, accumulation dtype.
        projection: ``"none"`` (the least-squares update with ``λ C``) or
            ``"null_space"`` (AlphaEdit's update: projected onto the eigenvectors of ``C``
            whose eigenvalues are below ``nullspace_threshold``, with ``nullspace_l2``
            in place of ``λ C``; see :mod:`intattn_analysis.editors.methods.closed_form`).
        nullspace_threshold: AlphaEdit's absolute eigenvalue threshold (reference: 2e-2
            for Llama3-8B); it depends on the scale of the keys, so it belongs to each
            model's defaults file (today every file holds the reference's value, untuned).
        nullspace_l2: AlphaEdit's ridge term ``L2`` (reference code: 10); it must be above 0
            (the projected system is singular without it).
        source: where these values come from (free text, shown in reports).
    """

    layers: tuple[int, ...]
    alpha: float | Mapping[int, float] | None = None
    spread: str = "memit"
    v_lr: float = 0.5
    v_steps: int = 25
    v_weight_decay: float = 1e-3
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    n_context_templates: int = 5
    context_template_length: int = 10
    stop_loss: float = 0.05
    stop_on: str = "loss"
    kl_position: str = "subject_last"
    lambda_mlp: float = 15000.0
    lambda_attn: float = 15000.0
    mom2_n_tokens: int = 100_000
    mom2_max_len: int = 256
    mom2_dtype: str = "float32"
    projection: str = "none"
    nullspace_threshold: float = 2e-2
    nullspace_l2: float = 10.0
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        _set_layers(self)
        alpha = self.alpha
        if alpha is not None:
            if isinstance(alpha, Mapping):
                alpha = {int(l): float(a) for l, a in alpha.items()}
                values = list(alpha.values())
            else:
                alpha = float(alpha)
                values = [alpha]
            bad = [a for a in values if not 0.0 <= a <= 1.0]  # NaN fails too
            if bad:
                raise ValueError(
                    f"alpha must lie in [0, 1] (0: MLP only, 1: attention only), got {bad[0]}"
                )
            object.__setattr__(self, "alpha", alpha)
        if self.spread not in SPREADS:
            raise ValueError(f"spread must be one of {sorted(SPREADS)}, got {self.spread!r}")
        if self.stop_on not in ("loss", "nll"):
            raise ValueError(f"stop_on must be 'loss' (MEMIT) or 'nll', got {self.stop_on!r}")
        if self.kl_position not in ("subject_last", "last"):
            raise ValueError(
                f"kl_position must be 'subject_last' (MEMIT) or 'last', got {self.kl_position!r}"
            )
        if self.projection not in PROJECTIONS:
            raise ValueError(f"projection must be one of {PROJECTIONS}, got {self.projection!r}")
        if self.mom2_dtype not in _DTYPES:
            raise ValueError(f"mom2_dtype must be one of {sorted(_DTYPES)}, got {self.mom2_dtype!r}")
        _check_counts(self, ("v_steps", "n_context_templates"), minimum=0)
        _check_counts(self, ("context_template_length", "mom2_n_tokens", "mom2_max_len"), minimum=1)
        if not isinstance(self.nullspace_l2, (int, float)) or not self.nullspace_l2 > 0:
            raise ValueError(f"nullspace_l2 must be a number above 0, got {self.nullspace_l2!r}")
        _set_amounts(self, ("v_lr", "v_weight_decay", "clamp_norm_factor", "kl_factor", "stop_loss",
                            "lambda_mlp", "lambda_attn", "nullspace_threshold", "nullspace_l2"))

    # ------------------------------------------------------------------ views
    def replace(self, **changes: Any) -> "EditHparams":
        """A copy with ``changes`` applied (and validated)."""
        unknown = set(changes) - set(self.__dataclass_fields__)
        if unknown:
            raise TypeError(
                f"unknown hyperparameter(s) {sorted(unknown)}; known: {sorted(self.__dataclass_fields__)}"
            )
        return dataclasses.replace(self, **changes)

    def effective_dict(self) -> dict[str, Any]:
        """The settings that change what an edit computes, for keys of stored results:
        :meth:`to_dict` without ``source``, and without the null-space settings while
        ``projection`` is ``"none"`` (they are not read then, and leaving them out keeps
        the keys of results stored before they existed)."""
        record = self.to_dict()
        record.pop("source", None)
        if record.get("projection") == "none":
            for name in ("projection", "nullspace_threshold", "nullspace_l2"):
                record.pop(name, None)
        return record

    @property
    def torch_mom2_dtype(self) -> torch.dtype:
        return _DTYPES[self.mom2_dtype]

    def lambda_for(self, module: str) -> float:
        return {"mlp": self.lambda_mlp, "attn": self.lambda_attn}[module]

    def alpha_at(self, layer: int) -> float | None:
        """The alpha of one layer (``None`` when no alpha is set)."""
        if isinstance(self.alpha, Mapping):
            if layer not in self.alpha:
                raise ValueError(
                    f"alpha has no value for edited layer {layer}; it covers "
                    f"{sorted(self.alpha)}. Give one alpha per edited layer or a single number."
                )
            return self.alpha[layer]
        return self.alpha

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["layers"] = list(self.layers)
        if isinstance(self.alpha, Mapping):
            # JSON keys are strings; from_dict turns them back into ints
            record["alpha"] = {str(l): a for l, a in self.alpha.items()}
        return record

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "EditHparams":
        unknown = set(record) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown hyperparameter(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        record = dict(record)
        if isinstance(record.get("alpha"), Mapping):
            record["alpha"] = {int(l): float(a) for l, a in record["alpha"].items()}
        return cls(**record)

    @classmethod
    def from_json(cls, text: str) -> "EditHparams":
        return cls.from_dict(json.loads(text))


# --------------------------------------------------------------------------- other methods
@dataclass(frozen=True)
class RomeHparams(EditHparams):
    """ROME's settings (Meng et al. 2022; kmeng01/rome ``hparams/ROME``): the target
    fields of :class:`EditHparams` (``v*`` is optimised as ``z*`` is, at the MLP output
    of the one edited layer, with the clamp and weight decay relative to that output),
    the context prefixes, the second-moment sample, and

    Attributes:
        layers: exactly one layer.
        mom2_adjustment: build the rank-one update with ``C⁻¹ k̄`` (ROME's
            ``mom2_adjustment``; off, the update direction is ``k̄`` itself).

    ``alpha``, ``spread``, ``lambda_*`` and the projection settings are not read.
    """

    mom2_adjustment: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.layers) != 1:
            raise ValueError(f"ROME edits exactly one layer, got layers {list(self.layers)}")
        if not isinstance(self.mom2_adjustment, bool):
            raise ValueError(f"mom2_adjustment must be true or false, got {self.mom2_adjustment!r}")


@dataclass(frozen=True)
class PMETHparams(EditHparams):
    """PMET's settings (Li et al., AAAI 2024; EasyEdit ``hparams/PMET``): those of the
    closed-form family (the FFN targets are written with MEMIT's solve, spread by
    ``1/sqrt``), and

    Attributes:
        attn_targets: optimise the attention-output delta together with the FFN one
            (PMET's joint optimisation). The attention target is not written: PMET updates
            the FFN weights only.

    ``alpha`` and ``lambda_attn`` are not read; the projection settings are read as by the
    rest of the closed-form family (off by default).
    """

    spread: str = "pmet"
    attn_targets: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.attn_targets, bool):
            raise ValueError(f"attn_targets must be true or false, got {self.attn_targets!r}")


#: The fine-tuning objectives: ROME's FT loss at the prompt's last position
#: (``"prompt_last"``, FT-L) and EasyEdit's teacher-forced loss masked to the target
#: tokens (``"target_new"``, FT-M).
FT_OBJECTIVES = ("prompt_last", "target_new")


@dataclass(frozen=True)
class FTHparams:
    """Fine-tuning baselines: gradient steps on one or more weight matrices.

    Attributes:
        layers: the layers whose matrix is trained.
        module: which matrix: ``"mlp"`` (the down-projection, ROME's and EasyEdit's
            choice) or ``"attn"`` (the attention output projection).
        objective: see :data:`FT_OBJECTIVES`.
        lr, steps: Adam learning rate and number of epochs over the batch.
        batch_size: facts per optimiser step.
        norm_constraint: the L∞ box ``|W − W₀| ≤ norm_constraint`` applied after every
            step (ROME's FT-L); ``None`` for none (EasyEdit's FT-M).
        weight_decay: Adam's weight decay.
        stop_loss: a step is taken only while the chunk's loss is at least this, and the
            epochs stop once the epoch's mean loss is below it (ROME's ``1e-2``).
        source: where these values come from.
    """

    layers: tuple[int, ...]
    module: str = "mlp"
    objective: str = "prompt_last"
    lr: float = 5e-4
    steps: int = 25
    batch_size: int = 1
    norm_constraint: float | None = 5e-4
    weight_decay: float = 0.0
    stop_loss: float = 1e-2
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        _set_layers(self)
        if self.module not in ("mlp", "attn"):
            raise ValueError(f"module must be 'mlp' or 'attn', got {self.module!r}")
        if self.objective not in FT_OBJECTIVES:
            raise ValueError(f"objective must be one of {FT_OBJECTIVES}, got {self.objective!r}")
        _check_counts(self, ("steps", "batch_size"), minimum=1)
        _set_amounts(self, ("lr", "weight_decay", "stop_loss")
                     + (("norm_constraint",) if self.norm_constraint is not None else ()))

    replace = EditHparams.replace
    to_json = EditHparams.to_json
    from_json = classmethod(EditHparams.from_json.__func__)

    def to_dict(self) -> dict[str, Any]:
        record = dataclasses.asdict(self)
        record["layers"] = list(self.layers)
        return record

    def effective_dict(self) -> dict[str, Any]:
        record = self.to_dict()
        record.pop("source", None)
        return record

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "FTHparams":
        unknown = set(record) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(
                f"unknown hyperparameter(s) {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}"
            )
        return cls(**record)


# --------------------------------------------------------------------------- defaults
@dataclass(frozen=True)
class MethodDefaults:
    """Where a method's defaults come from (declared by its editor, see
    :class:`intattn_analysis.Editor`): the dataclass its files hold, the folder of its
    ``<model>.json`` files, and the rule for a model without one.

    Attributes:
        hparams_type: the hyperparameter dataclass.
        folder: the folder of ``<model>.json`` files (the model's name with ``/`` spelt
            ``--``); default ``<package data>/hparams/<method>``.
        generic: ``n_layers -> (hparams, rule)``: the settings for a model without a file,
            from its depth, and one line naming the rule; ``None``: such a model has no
            defaults (pass ``hparams=``).
    """

    hparams_type: type
    folder: Path
    generic: Callable[[int], tuple[Any, str]] | None = None


#: Every method's defaults, by method name (filled as editors are registered).
METHOD_DEFAULTS: dict[str, MethodDefaults] = {}


def register_defaults(method: str, hparams_type: type, *, folder: str | Path | None = None,
                      generic: Callable[[int], tuple[Any, str]] | None = None) -> MethodDefaults:
    """Declare where ``method``'s defaults come from (:class:`MethodDefaults`); called when
    an editor is registered."""
    entry = MethodDefaults(hparams_type, Path(folder) if folder is not None else defaults_dir() / method, generic)
    METHOD_DEFAULTS[method] = entry
    _read_defaults.cache_clear()
    return entry


class _HparamsTypes(Mapping):
    """``{method: hparams dataclass}``, as registered (a live view of :data:`METHOD_DEFAULTS`)."""

    def __getitem__(self, method: str) -> type:
        return METHOD_DEFAULTS[method].hparams_type

    def __iter__(self):
        return iter(METHOD_DEFAULTS)

    def __len__(self) -> int:
        return len(METHOD_DEFAULTS)

    def __repr__(self) -> str:
        return repr(dict(self))


#: Which dataclass each method's files hold.
HPARAMS_TYPES: Mapping[str, type] = _HparamsTypes()


def defaults_dir() -> Path:
    """The folder of the package's per-(method, model) defaults: ``<method>/<model>.json``,
    the model's name with ``/`` spelt ``--``. Each file holds one hparams record with a
    ``source`` field saying where its values come from."""
    return Path(__file__).parent / "data" / "hparams"


def _file_name(name: str) -> str:
    return name.replace("/", "--") + ".json"


def _folder(method: str) -> Path:
    entry = METHOD_DEFAULTS.get(method)
    return entry.folder if entry is not None else defaults_dir() / method


@functools.lru_cache(maxsize=None)
def _read_defaults(method: str, name: str):
    path = _folder(method) / _file_name(name)
    if not path.exists():
        return None
    entry = METHOD_DEFAULTS.get(method)
    cls = entry.hparams_type if entry is not None else EditHparams
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict):
            raise ValueError(f"a {type(record).__name__}, not an hparams record")
        if not record.get("source"):
            raise ValueError("no 'source' field saying where the values come from")
        return cls.from_dict(record)
    except (OSError, ValueError, TypeError) as error:
        raise ValueError(f"the defaults file {method}/{path.name} is damaged: {error}") from None


def default_models(method: str = "intattn") -> list[str]:
    """The models that have a defaults file for ``method``."""
    folder = _folder(method)
    names = sorted(p.stem.replace("--", "/") for p in folder.glob("*.json")) if folder.is_dir() else []
    return names


def _model_defaults() -> dict[str, EditHparams]:
    return {name: _read_defaults("intattn", name) for name in default_models("intattn")}


#: IntAttn-Edit's per-model defaults, read from the data files (``intattn/<model>.json``);
#: see each entry's ``source``.
MODEL_DEFAULTS: dict[str, EditHparams] = _model_defaults()

#: The attention share used where neither the call nor the model's entry sets one.
GENERIC_ALPHA = 0.3


def generic_layers(n_layers: int) -> tuple[int, ...]:
    """Five consecutive layers from ``round(n_layers / 8)`` (MEMIT's 4-8 of 32), clipped
    to the model (fewer for a model of fewer than five layers)."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    count = min(5, n_layers)
    start = min(max(round(n_layers / 8), 0), n_layers - count)
    return tuple(range(start, start + count))


def generic_hparams(n_layers: int, *, warn: bool = True, name: str = "model", method: str = "intattn"):
    """The fallback for a model without a defaults file for ``method``: the rule its
    editor declares (:attr:`MethodDefaults.generic`; each method's module documents its
    own), with a :class:`GenericHparamsWarning` that names it."""
    if n_layers < 1:
        raise ValueError(f"n_layers must be >= 1, got {n_layers}")
    entry = METHOD_DEFAULTS.get(method)
    if entry is None:
        raise ValueError(f"unknown method {method!r}; methods with defaults: {sorted(METHOD_DEFAULTS)}")
    if entry.generic is None:
        raise ValueError(f"no {method} defaults for {name!r} in {entry.folder}, and the method has no generic "
                         "rule; pass hparams= or write the file")
    hp, rule = entry.generic(n_layers)
    hp = hp.replace(source="generic rule: " + rule)
    message = (f"no {method} defaults for {name!r}; using the generic rule: {rule}. "
               "Pass hparams= or overrides to change it.")
    if warn:
        warnings.warn(message, GenericHparamsWarning, stacklevel=3)
    return hp


def hparams_for(model: Any, method: str = "intattn", *, n_layers: int | None = None):
    """Default hyperparameters of ``method`` for a model (a :class:`ModelHandle` or its
    name), from the data file ``<method>/<model>.json`` (:func:`defaults_dir`).

    Each method reads its own dataclass (:data:`HPARAMS_TYPES`), from the folder its
    editor declares (:data:`METHOD_DEFAULTS`). A model without a file gets
    :func:`generic_hparams`, which needs its depth: pass a handle, or ``n_layers=`` with a
    name.
    """
    name = getattr(model, "name", model)
    if not isinstance(name, str):
        raise TypeError(f"model must be a ModelHandle or a model name, got {type(model).__name__}")
    if method not in METHOD_DEFAULTS:
        raise ValueError(f"unknown method {method!r}; methods with defaults: {sorted(METHOD_DEFAULTS)}")
    if n_layers is None and hasattr(model, "n_layers"):
        n_layers = int(model.n_layers)
    hp = _read_defaults(method, name)
    if hp is not None:
        if n_layers is not None and max(hp.layers) >= n_layers:
            raise ValueError(
                f"the {method} defaults for {name!r} edit layers {list(hp.layers)} but the model has "
                f"{n_layers} layers"
            )
        return hp
    if n_layers is None:
        raise ValueError(
            f"no {method} defaults for {name!r} (known: {default_models(method)}); pass the loaded "
            "ModelHandle or n_layers= so that the generic rule can choose layers"
        )
    return generic_hparams(n_layers, name=name, method=method)
