"""The editing engine: one associative-memory solver loop, several methods.

A linear map ``W`` (key ``k`` in, value out) can take new key/value pairs ``(K, V)`` while
keeping its answers on the keys of a text corpus (second moment ``C = E[k kᵀ]``) by the
least-squares update

    ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹,        R = V − W K,

solved here in float64. MEMIT writes it into the MLP down-projection of several layers;
IntAttn-Edit (arXiv 2510.27400) writes it into *both* the down-projection and the
attention output projection of each layer, giving the attention a share ``alpha_l``.

The loop (:func:`edit`), for facts with targets ``z*`` at the output of the last edited
layer ``L`` (:func:`intattn_analysis.targets.compute_z`), for each edited layer ``l`` in
ascending order:

1. read ``h_L``, the current residual at the subject's last token at the output of
   ``L`` in the bare prompt (where ``z*`` was set), with the weights written so far;
2. ``R = (z* − h_L) · spread(layers left)`` (MEMIT ``1/(L−i)``, PMET ``1/sqrt(L−i)``);
3. if ``alpha_l > 0``: keys ``K_a`` = the ``o_proj`` input (concatenated heads) at the
   subject's last token, averaged over the prefixes as MEMIT's ``compute_ks`` does
   (first within each context type, then over types:
   :func:`intattn_analysis.targets.context_weights`);
   write ``ΔW_a`` for the residual ``alpha_l · R`` with ``λ_attn C_attn``;
4. if ``alpha_l < 1``: keys ``K_m`` = the ``down_proj`` input, read again (the attention
   write changed them); write ``ΔW_m`` for ``(1 − alpha_l) · R`` with ``λ_mlp C_mlp``.

With ``alpha_l = 0`` step 3 is skipped entirely, so ``intattn`` with alpha 0 computes
exactly (bit for bit) what ``memit`` computes.

**Post-norm architectures** (Gemma 2/3). There a module's output ``x`` goes through an
RMSNorm before it joins the residual stream, ``y = g ⊙ x / rms(x)``, so a residual target
``R`` is not the module's own target. The first-order inversion (holding ``rms(x)``
fixed, ``Δx = R ⊙ rms(x) / g``) overshoots badly on Gemma-3-270M: a few gains are in the
hundreds and some are near zero, so ``R / g`` explodes, and a normed output has a fixed
size, so any sizeable ``Δx`` renormalises the whole output. A damped version of it that
stays where the first-order model holds moves the residual only a tenth of the way. The
norm's outputs form a shell (``g ⊙ u`` with ``rms(u) = 1``), so :func:`_module_space`
takes the point of that shell closest to the wanted output, exactly (a one-multiplier
problem), and asks the module for the ``Δx`` that gives it; the later layers re-read
``h_L`` and take up what one layer's norm cannot express. The test suite measures the
residual change achieved against the requested one on Gemma-3.

Every edit is reversible: :class:`EditResult` keeps copies of the original weights,
taken before the first write, and :meth:`EditResult.restore` copies them back, so the
model is restored bit for bit (subtraction is never used). Anything that fails in the
middle of an edit (an exception, ``KeyboardInterrupt``) restores the originals before it
propagates.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor
from tqdm import tqdm

from .architectures import MODULES, hook, layer_indices
from .facts import SUBJECT_SLOT, Fact
from .hparams import SPREADS, EditHparams, hparams_for
from .loading import ModelHandle
from .targets import (
    DEFAULT_Z_BATCH,
    ZTargets,
    compute_z,
    context_templates,
    context_weights,
    prompt_rows,
    read_at_subject,
)

__all__ = [
    "METHODS",
    "EditError",
    "EditResult",
    "Method",
    "apply_deltas",
    "edit",
    "solve_update",
]

#: Format version of saved deltas.
DELTAS_FORMAT = 1
#: Largest relative residual ``||A X − B|| / ||B||`` accepted from the solve.
SOLVE_TOLERANCE = 1e-6
#: Smallest ratio of the system's smallest to largest squared Cholesky pivot accepted.
CONDITION_LIMIT = 1e-13


class EditError(ValueError):
    """An edit cannot be computed; the message names the input and what would work."""


# =========================================================================== methods
@dataclass(frozen=True)
class Method:
    """One editing method as data: which modules take how much of each layer's update.

    Attributes:
        name: the registry key.
        attn_share: ``"alpha"`` (the balance factor, per layer) or a fixed number in
            [0, 1]: the share of each layer's residual written into ``o_proj``; the rest
            goes to ``down_proj``.
        modules: the modules the method may write (for documentation and checks).
        spread: ``"memit"`` / ``"pmet"``, or ``None`` to take ``hparams.spread``.
        description: one line for tables.
    """

    name: str
    attn_share: float | str
    modules: tuple[str, ...]
    spread: str | None = None
    description: str = ""

    def share(self, alpha: float | None) -> float:
        if self.attn_share == "alpha":
            if alpha is None:
                raise EditError(f"method {self.name!r} needs an alpha")
            return float(alpha)
        return float(self.attn_share)


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("memit", 0.0, ("mlp",), description="MEMIT: MLP down-projections only"),
        Method(
            "intattn",
            "alpha",
            ("mlp", "attn"),
            description="IntAttn-Edit: o_proj takes alpha_l of each layer's update, down_proj the rest",
        ),
        Method("attn", 1.0, ("attn",), description="attention only (o_proj), an ablation"),
    )
}


def _method(method: str | Method) -> Method:
    if isinstance(method, Method):
        return method
    if method not in METHODS:
        raise EditError(f"unknown method {method!r}; known methods: {sorted(METHODS)}")
    return METHODS[method]


# =========================================================================== result
@dataclass
class EditResult:
    """What an edit wrote, and how to undo it.

    Attributes:
        method: the method's name.
        layers: the edited layers.
        alphas: the attention share used at each layer.
        hparams: the settings used.
        deltas: ``{(module, layer): ΔW}`` in the weight's own layout and dtype, exactly
            what was added to the weight.
        timings: seconds per phase (``targets``, ``moments``, ``solve``, ``total``).
        z_diagnostics: one dict per fact from the target optimisation.
        residuals: ``{(module, layer): [facts, d_model]}`` the residual-stream change each
            write was asked for (before any post-norm conversion).
        context_templates: the prefixes the targets and keys were read under.

    Used as a context manager the edit is undone on exit; :meth:`restore` undoes it at
    any time (idempotent).
    """

    model: ModelHandle = field(repr=False)
    method: str
    layers: tuple[int, ...]
    alphas: dict[int, float]
    hparams: EditHparams | None
    deltas: dict[tuple[str, int], Tensor] = field(default_factory=dict, repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    z_diagnostics: list[dict] = field(default_factory=list, repr=False)
    residuals: dict[tuple[str, int], Tensor] = field(default_factory=dict, repr=False)
    context_templates: list[str] = field(default_factory=list, repr=False)
    _originals: dict[tuple[str, int], Tensor] = field(default_factory=dict, repr=False)
    _open: bool = field(default=False, repr=False)
    _digest: str | None = field(default=None, repr=False)
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
        _restore(self.model, self._originals)
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
            self._digest = _fingerprint(self.deltas)
        return self._digest

    def _opened(self, originals: dict[tuple[str, int], Tensor]) -> None:
        """Keep the originals and put the edit on the model's stack until it is restored."""
        self._originals = originals
        if not self._open:
            self.model.applied_edits.append(self)
            self._open = True

    def __enter__(self) -> "EditResult":
        return self

    def __exit__(self, *exc: Any) -> bool:
        self.restore()
        return False

    # ------------------------------------------------------------------ views
    @property
    def modules(self) -> list[tuple[str, int]]:
        return sorted(self.deltas, key=lambda k: (k[1], k[0]))

    def z_table(self):
        """The target diagnostics as a DataFrame (one row per fact)."""
        import pandas as pd

        return pd.DataFrame(self.z_diagnostics)

    def delta_norms(self) -> dict[tuple[str, int], float]:
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


def _snapshot(model: ModelHandle, keys: Iterable[tuple[str, int]]) -> dict[tuple[str, int], Tensor]:
    """Copies of the original weights (on the CPU), taken before anything is written."""
    return {key: model.weight(*key).detach().to("cpu", copy=True) for key in keys}


@torch.no_grad()
def _restore(model: ModelHandle, originals: Mapping[tuple[str, int], Tensor]) -> None:
    for key, original in originals.items():
        model.weight(*key).copy_(original)


@torch.no_grad()
def _write(model: ModelHandle, key: tuple[str, int], delta: Tensor) -> Tensor:
    """Add ``delta`` ([d_out, d_in], float64) to the weight, in the weight's layout and
    dtype; return exactly what was added."""
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


# =========================================================================== solve
def solve_update(
    keys: Tensor,  # [n, d_in]
    residuals: Tensor,  # [n, d_out]
    moment: Tensor,  # [d_in, d_in], E[k kᵀ]
    lam: float,
    *,
    module: str = "",
    layer: int = -1,
) -> Tensor:
    """``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹`` as ``[d_out, d_in]`` in float64.

    Keys and residuals are rows (one per fact). Raises :class:`EditError` when the system
    has non-finite entries or is singular (relative residual above
    :data:`SOLVE_TOLERANCE`).
    """
    where = f"{module} layer {layer}"
    device = moment.device
    K = keys.to(device=device, dtype=torch.float64)
    R = residuals.to(device=device, dtype=torch.float64)
    A = lam * moment.to(torch.float64) + K.T @ K
    B = K.T @ R
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise EditError(
            f"the system for {where} has NaN/inf entries (keys finite: "
            f"{bool(torch.isfinite(K).all())}, residuals finite: {bool(torch.isfinite(R).all())}, "
            f"moment finite: {bool(torch.isfinite(moment).all())}); check the second moments "
            "and the targets"
        )
    # Key dimensions that are zero in the corpus and in the new keys alike (dead units,
    # heads that output exactly 0) carry no information: they are left out of the solve
    # and their columns of ΔW stay 0, the minimum-norm answer.
    active = A.diagonal() > 1e-12 * A.diagonal().max().clamp(min=1e-300)
    if not bool(active.all()):
        X_active = solve_update(
            keys[:, active.to(keys.device)], residuals, moment[active][:, active], lam,
            module=module, layer=layer,
        )
        full = torch.zeros(R.shape[1], K.shape[1], dtype=torch.float64, device=device)
        full[:, active] = X_active
        return full
    # A is symmetric positive (semi)definite: Cholesky both solves and tells a singular
    # system apart (a failed or vanishing pivot); squared pivot ratios bound the condition
    L, info = torch.linalg.cholesky_ex(A)
    pivots = L.diagonal() ** 2 if int(info) == 0 else None
    if pivots is None or not torch.isfinite(pivots).all() or pivots.min() <= CONDITION_LIMIT * pivots.max():
        raise EditError(
            f"the system for {where} is singular or ill-conditioned (λ={lam}; the second "
            "moment is rank-deficient in the keys' directions); use a larger lambda or second "
            "moments from more tokens"
        )
    X = torch.cholesky_solve(B, L)
    scale = B.norm()
    misfit = (A @ X - B).norm() / scale if scale > 0 else (A @ X - B).norm()
    if not torch.isfinite(X).all() or misfit > SOLVE_TOLERANCE:
        raise EditError(
            f"the system for {where} is singular or ill-conditioned (λ={lam}, relative "
            f"residual {float(misfit):.3g}); use a larger lambda or second moments from more tokens"
        )
    return X.T


# =========================================================================== inputs
def _facts(facts: Any) -> list[Fact]:
    if isinstance(facts, Fact):
        facts = [facts]
    elif isinstance(facts, (str, bytes)) or not isinstance(facts, Iterable):
        raise EditError(f"facts must be a Fact or a list of Facts, got {type(facts).__name__}")
    facts = [Fact.from_dict(f) if isinstance(f, Mapping) else f for f in facts]
    if not facts:
        raise EditError("facts is empty; pass at least one Fact to edit")
    for i, fact in enumerate(facts):
        if not isinstance(fact, Fact):
            raise EditError(f"facts[{i}] is a {type(fact).__name__}, not a Fact")
        if not fact.changes_answer:
            raise EditError(
                f"facts[{i}] ({fact.text!r}): target_new {fact.target_new!r} equals target_true; "
                "an edit must change the answer"
            )
    # one batch cannot write two answers for one key: the least-squares solve would settle
    # on some compromise and one of the requests would be lost without a word
    seen: dict[tuple[str, str], int] = {}
    for i, fact in enumerate(facts):
        first = seen.setdefault((fact.subject, fact.prompt), i)
        if first != i and facts[first].target_new.strip() != fact.target_new.strip():
            raise EditError(
                f"facts[{first}] and facts[{i}] ask {fact.text!r} for two answers "
                f"({facts[first].target_new!r} and {fact.target_new!r}); one batch can write "
                "only one. Keep one of them, or edit them in separate batches"
            )
    return facts


def _layers(model: ModelHandle, layers: Sequence[int]) -> tuple[int, ...]:
    try:
        return layer_indices(layers, model.n_layers)
    except ValueError as error:
        raise EditError(f"{error} (model {model.name!r})") from None


def _alphas(model, spec: Method, hp: EditHparams, alpha_given: bool) -> dict[int, float]:
    if spec.attn_share != "alpha":
        fixed = float(spec.attn_share)
        if alpha_given:
            values = [hp.alpha_at(l) for l in hp.layers]
            if any(v is not None and v != fixed for v in values):
                raise EditError(
                    f"method {spec.name!r} writes a fixed attention share of {fixed}; alpha "
                    f"{hp.alpha!r} does not apply (use method='intattn' to set alpha)"
                )
        return {l: fixed for l in hp.layers}
    if hp.alpha is None:
        fallback = hparams_for(model, spec.name).alpha
        hp = hp.replace(alpha=fallback)
    alphas = {}
    for l in hp.layers:
        try:
            value = hp.alpha_at(l)
        except ValueError as error:  # a {layer: alpha} mapping that misses an edited layer
            raise EditError(str(error)) from None
        if value is None or not 0.0 <= value <= 1.0:
            raise EditError(f"alpha at layer {l} must lie in [0, 1], got {value!r}")
        alphas[l] = float(value)
    return alphas


def _moments(model, needed, hp: EditHparams, moments, progress: bool):
    if moments is None:
        try:
            from .covariance import second_moments
        except ImportError as error:
            raise EditError(
                "no second moments given and intattn_analysis.covariance is not available; "
                "pass moments={(module, layer): E[k kᵀ]}"
            ) from error
        layers = sorted({l for _, l in needed})
        modules = tuple(m for m in MODULES if any(k[0] == m for k in needed))
        moments = second_moments(
            model, layers, modules=modules, n_tokens=hp.mom2_n_tokens,
            max_len=hp.mom2_max_len, dtype=hp.torch_mom2_dtype, progress=progress,
        )
    missing = [k for k in needed if k not in moments]
    if missing:
        raise EditError(
            f"missing second moments for {missing}; moments must cover every written "
            f"(module, layer): {sorted(needed, key=lambda k: (k[1], k[0]))}. Leave moments=None "
            "to compute them, or include these keys"
        )
    for key in needed:
        d_in = model.key_dim(*key)
        shape = tuple(moments[key].shape)
        if shape != (d_in, d_in):
            raise EditError(f"moments[{key}] has shape {shape}; expected ({d_in}, {d_in})")
    return moments


def _key_hook(module: str, layer: int) -> str:
    return hook("attn_key" if module == "attn" else "mlp_key", layer)


def _value_hook(module: str, layer: int) -> str:
    return hook("attn_value" if module == "attn" else "mlp_value", layer)


def _post_norm(model: ModelHandle, module: str, layer: int) -> torch.nn.Module | None:
    spec = model.layer(layer)
    path = spec.attn_post_norm if module == "attn" else spec.mlp_post_norm
    if path is None:
        return None
    norm = model.hf_model.get_submodule(path)
    return getattr(norm, "original_component", None) or norm


@torch.no_grad()
def _module_space(
    model: ModelHandle, module: str, layer: int, residual: Tensor, outputs: Tensor,
    weights: Tensor,
) -> Tensor:
    """The module-output change ``Δx`` whose post-norm output comes closest to changing
    the residual by ``residual`` (see the module notes); ``outputs`` are the module
    outputs per row (``len(weights)`` rows per fact, averaged with the context weights
    the keys take), ``residual`` one row per fact.

    The norm maps ``x`` to ``y = g ⊙ u`` with ``u = x / rms(x)``, so every output it can
    give lies on the shell ``{g ⊙ u : ||u||² = d}``. The wanted output is
    ``t = ȳ + R`` (``ȳ``: the current normed output averaged over the contexts). The
    closest point of the shell, ``argmin ||g ⊙ u − t||`` subject to ``||u||² = d``, is
    ``u* = g ⊙ t / (g² + μ)`` with the multiplier ``μ > −min g²`` that puts ``u*`` on the
    sphere (a one-dimensional monotone equation, solved by bisection in float64). Then
    ``Δx = rms(x) u* − x``, averaged over the prefixes, keeps the size of ``x`` and
    changes only its direction. Where ``t`` is on the shell the write is exact; where it
    is not (a residual target larger than the norm can express) the write goes as far as
    the norm allows and the later layers, which re-read ``h_L``, take up the rest.
    """
    norm = _post_norm(model, module, layer)
    if norm is None:
        return residual
    d = outputs.shape[-1]
    eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
    ones = torch.ones(d, device=outputs.device, dtype=outputs.dtype)
    gain = (norm(ones).double() * math.sqrt(1.0 + eps)).to(residual.device)
    x = outputs.double().to(residual.device)
    rms = (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()  # [rows, 1]
    normed = _mean_over_contexts(gain * x / rms, weights)
    gt = gain * (normed + residual.double())
    g2 = gain.pow(2)

    def surplus(mu: Tensor) -> Tensor:  # ||u(mu)||² − d, decreasing in mu
        return (gt / (g2 + mu[:, None])).pow(2).sum(-1) - d

    # ||u(mu)|| <= ||g ⊙ t|| / mu for mu > 0, so mu = ||g ⊙ t|| / sqrt(d) is too large;
    # as mu falls to −min g² the norm grows without bound (unless g ⊙ t vanishes there)
    low = torch.full((gt.shape[0],), -float(g2.min()), dtype=torch.float64, device=gt.device)
    high = gt.norm(dim=-1) / math.sqrt(d) + 1e-12
    for _ in range(200):
        middle = (low + high) / 2
        long = surplus(middle) > 0
        low = torch.where(long, middle, low)
        high = torch.where(long, high, middle)
    shell = gt / (g2 + high[:, None])
    if not bool(torch.isfinite(shell).all()):
        raise EditError(
            f"the post-norm of {module} at layer {layer} could not be inverted (non-finite "
            "module target); check the model's norm weights and the edit targets"
        )
    size = _mean_over_contexts(rms, weights)
    return size * shell - _mean_over_contexts(x, weights)


def _mean_over_contexts(x: Tensor, weights: Tensor) -> Tensor:
    """Per fact, the weighted mean of its rows (``len(weights)`` consecutive rows per
    fact, one per context), in float64."""
    w = weights.to(device=x.device, dtype=torch.float64)
    return (x.double().view(-1, len(w), x.shape[-1]) * w[:, None]).sum(1)


# =========================================================================== edit
def edit(
    model: ModelHandle,
    facts: Fact | Sequence[Fact],
    *,
    method: str | Method = "intattn",
    layers: Sequence[int] | None = None,
    alpha: float | Mapping[int, float] | None = None,
    hparams: EditHparams | None = None,
    moments: Mapping[tuple[str, int], Tensor] | None = None,
    targets: ZTargets | None = None,
    z_batch_size: int = DEFAULT_Z_BATCH,
    progress: bool = True,
) -> EditResult:
    """Write ``facts`` (their ``target_new``) into the model's weights, in place.

    Args:
        model: a loaded model.
        facts: the facts to write (all in one batch).
        method: a key of :data:`METHODS` (``"memit"``, ``"intattn"``, ``"attn"``) or a
            :class:`Method`.
        layers: edited layers (overrides ``hparams.layers``).
        alpha: IntAttn-Edit's attention share: a number in [0, 1] or ``{layer: alpha}``
            (for example ``ia.balance(trace_result, layers)``); overrides ``hparams.alpha``;
            default the model's entry in :data:`intattn_analysis.hparams.MODEL_DEFAULTS`.
        hparams: all settings; default :func:`intattn_analysis.hparams.hparams_for`.
        moments: ``{(module, layer): E[k kᵀ]}`` for every written module; default computed
            by :func:`intattn_analysis.covariance.second_moments` (cached on disk).
        targets: the ``z*`` of these facts from :func:`intattn_analysis.targets.compute_z`
            with the same hparams. The targets depend only on the unedited model, the
            facts and the last edited layer, so methods compared on one batch (MEMIT,
            IntAttn-Edit at several alphas, attention-only) can share them; default
            computed here.
        z_batch_size: facts whose targets are optimised together (memory only; see
            :func:`intattn_analysis.targets.compute_z`).
        progress: show progress bars.

    Returns:
        an :class:`EditResult`; the weights stay edited until it is restored (use it as a
        context manager to edit temporarily).
    """
    started = time.perf_counter()
    spec = _method(method)
    facts = _facts(facts)
    hp = hparams if hparams is not None else hparams_for(model, spec.name)
    if not isinstance(hp, EditHparams):
        raise EditError(f"hparams must be an EditHparams, got {type(hp).__name__}")
    if layers is not None:
        if isinstance(layers, int):
            layers = [layers]
        hp = hp.replace(layers=tuple(_layers(model, list(layers))))
    else:
        _layers(model, list(hp.layers))
    if alpha is not None:
        if not isinstance(alpha, Mapping):
            try:
                value = float(alpha)
            except (TypeError, ValueError):
                raise EditError(f"alpha must be a number in [0, 1] or {{layer: alpha}}, got {alpha!r}") from None
            if not 0.0 <= value <= 1.0:
                raise EditError(
                    f"alpha must lie in [0, 1] (0: MLP only as MEMIT, 1: attention only), got {alpha!r}"
                )
        try:
            hp = hp.replace(alpha=alpha)
        except ValueError as error:
            raise EditError(str(error)) from None
    if spec.spread is not None:
        hp = hp.replace(spread=spec.spread)
    # an alpha in the hparams is a default: a fixed-share method ignores it; an explicit
    # alpha= argument that contradicts the method is an error
    alphas = _alphas(model, spec, hp, alpha_given=alpha is not None)
    hp = hp.replace(alpha=dict(alphas) if len(set(alphas.values())) > 1 else next(iter(alphas.values())))
    needed = [(m, l) for l in hp.layers for m in ("attn", "mlp")
              if (m == "attn" and alphas[l] > 0) or (m == "mlp" and alphas[l] < 1)]

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    moments = _moments(model, needed, hp, moments, progress)
    timings["moments"] = time.perf_counter() - t0

    templates = context_templates(model, hp.n_context_templates, hp.context_template_length)
    t0 = time.perf_counter()
    if targets is None:
        targets = compute_z(model, facts, hp, templates=templates, batch_size=z_batch_size,
                            progress=progress)
    else:
        _check_targets(targets, facts, hp, templates)
    timings["targets"] = time.perf_counter() - t0

    result = EditResult(
        model=model, method=spec.name, layers=hp.layers, alphas=alphas, hparams=hp,
        timings=timings, z_diagnostics=targets.diagnostics, context_templates=templates,
    )
    result._opened(_snapshot(model, needed))
    t0 = time.perf_counter()
    try:
        _solve_loop(model, facts, hp, alphas, targets, moments, templates, result, progress)
    except BaseException:
        result.restore()
        raise
    timings["solve"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    return result


def _check_targets(targets: ZTargets, facts: list[Fact], hp: EditHparams, templates) -> None:
    """Precomputed targets must belong to these facts, this last layer and these contexts."""
    if not isinstance(targets, ZTargets):
        raise EditError(f"targets must come from compute_z (a ZTargets), got {type(targets).__name__}")
    keys = [d["fact"] for d in targets.diagnostics]
    if keys != [f.key for f in facts]:
        raise EditError(
            f"targets were computed for {len(keys)} other facts (or another order); "
            "compute them with compute_z on exactly these facts"
        )
    if targets.layer != max(hp.layers):
        raise EditError(
            f"targets are set at layer {targets.layer} but the last edited layer is "
            f"{max(hp.layers)}; compute them with the same layers"
        )
    if list(targets.context_templates) != list(templates):
        raise EditError("targets were computed under other context templates; use the same hparams")


def _solve_loop(
    model: ModelHandle,
    facts: list[Fact],
    hp: EditHparams,
    alphas: dict[int, float],
    targets: ZTargets,
    moments: Mapping[tuple[str, int], Tensor],
    templates: list[str],
    result: EditResult,
    progress: bool,
) -> None:
    rows = prompt_rows(model, facts, templates)
    n_ctx = len(templates)
    weights = torch.tensor(context_weights(templates), dtype=torch.float64)
    bare = list(templates).index(SUBJECT_SLOT)
    last = max(hp.layers)
    z = targets.z.double()
    spread: Callable[[int], float] = SPREADS[hp.spread]
    for i, layer in enumerate(tqdm(hp.layers, desc="solving", disable=not progress)):
        share = alphas[layer]
        order = [m for m in ("attn", "mlp") if (share > 0 if m == "attn" else share < 1)]
        residual = None
        for step, module in enumerate(order):
            names = [_key_hook(module, layer)]
            if _post_norm(model, module, layer) is not None:
                names.append(_value_hook(module, layer))
            if step == 0:  # h_L is read once per layer, with the weights written so far
                names.append(hook("resid_post", last))
            read = read_at_subject(model, rows, names)
            if step == 0:
                # z* = h + δ with h read in the bare prompt, so the state it is compared
                # with is read there too (MEMIT's cur_zs); the keys are weighted context
                # averages (MEMIT's compute_ks)
                h_last = read[hook("resid_post", last)].double().view(-1, n_ctx, z.shape[-1])[:, bare]
                residual = (z - h_last) * spread(len(hp.layers) - i)
            part = residual * (share if module == "attn" else 1.0 - share)
            result.residuals[(module, layer)] = part.float().cpu()
            target = part
            if len(names) > 1 and _value_hook(module, layer) in read:
                target = _module_space(model, module, layer, part, read[_value_hook(module, layer)], weights)
            keys = _mean_over_contexts(read[_key_hook(module, layer)], weights)
            update = solve_update(
                keys, target, moments[(module, layer)], hp.lambda_for(module),
                module=module, layer=layer,
            )
            result.deltas[(module, layer)] = _write(model, (module, layer), update)


# =========================================================================== files
def _fingerprint(deltas: Mapping[tuple[str, int], Tensor]) -> str:
    """A hash of the deltas' keys and exact values (their float32 bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for key in sorted(deltas):
        digest.update(repr(key).encode())
        digest.update(deltas[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def apply_deltas(
    model: ModelHandle, source: str | Path | Mapping[tuple[str, int], Tensor], *, strict: bool = True,
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
        _layers(model, [layer])
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
    fingerprint = _fingerprint(deltas)
    repeated = [e for e in model.applied_edits if e.fingerprint() == fingerprint]
    if repeated and not allow_repeat:
        raise EditError(
            f"these deltas are already applied ({repeated[0].describe()}); applying them again "
            "would double the edit. Restore it first, or pass allow_repeat=True to stack them"
        )
    try:
        hp = None
        if meta.get("hparams") not in (None, "null"):
            hp = EditHparams.from_json(meta["hparams"])
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
    result._opened(_snapshot(model, deltas))
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
