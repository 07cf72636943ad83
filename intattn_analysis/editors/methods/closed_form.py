"""The closed-form family: MEMIT, IntAttn-Edit, attention-only and AlphaEdit, one loop.

A linear map ``W`` (key ``k`` in, value out) can take new key/value pairs while keeping
its answers on the keys of a text corpus (second moment ``C = E[k kᵀ]``) by the
least-squares update ``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹``
(:func:`intattn_analysis.editors.solvers.solve_update`). MEMIT writes it into the MLP
down-projection of several layers; IntAttn-Edit (arXiv 2510.27400) writes it into *both*
the down-projection and the attention output projection of each layer, giving the
attention a share ``alpha_l``; attention-only gives it all.

The loop, for facts with targets ``z*`` at the output of the last edited layer ``L``
(:func:`intattn_analysis.targets.compute_z`), for each edited layer ``l`` in ascending
order:

1. read ``h_L``, the current residual at the subject's last token at the output of
   ``L`` in the bare prompt (where ``z*`` was set), with the weights written so far;
2. ``R = (z* − h_L) · spread(layers left)`` (MEMIT ``1/(L−i)``, PMET ``1/sqrt(L−i)``);
3. if ``alpha_l > 0``: keys ``K_a`` = the ``o_proj`` input (concatenated heads) at the
   subject's last token, averaged over the prefixes as MEMIT's ``compute_ks`` does
   (first within each context type, then over types:
   :func:`intattn_analysis.targets.context_weights`); write ``ΔW_a`` for the residual
   ``alpha_l · R``;
4. if ``alpha_l < 1``: keys ``K_m`` = the ``down_proj`` input, read again (the attention
   write changed them); write ``ΔW_m`` for ``(1 − alpha_l) · R``.

With ``alpha_l = 0`` step 3 is skipped entirely, so ``intattn`` with alpha 0 computes
exactly (bit for bit) what ``memit`` computes.

**Projection** (``hparams.projection``). ``"none"`` solves with ``λ C`` as above.
``"null_space"`` is AlphaEdit's update (Fang et al., ICLR 2025, reference code
jianghoucheng/AlphaEdit ``AlphaEdit_main.py``): ``λ C`` is replaced by a projector ``P``
onto the eigenvectors of ``C`` whose eigenvalues are below ``nullspace_threshold``, so the
update cannot move the outputs of keys in the preserved subspace at all, and the keys of
the earlier edits of a sequence (carried as the state ``{(module, layer): Σ k kᵀ}``) join
the system (:func:`intattn_analysis.editors.solvers.solve_projected`). After the batch the
keys are read again on the edited model and added to the state, as the reference code
does. The ``alphaedit`` method is this loop with the projection on by default; with
``projection="none"`` it is MEMIT bit for bit. Any method of the family takes the
projection: IntAttn-Edit with a null-space projection on both modules is a combination no
published editor has.

**Post-norm architectures** (Gemma 2/3). There a module's output ``x`` goes through an
RMSNorm before it joins the residual stream, ``y = g ⊙ x / rms(x)``, so a residual target
``R`` is not the module's own target. The first-order inversion (holding ``rms(x)``
fixed, ``Δx = R ⊙ rms(x) / g``) overshoots badly on Gemma-3-270M: a few gains are in the
hundreds and some are near zero, so ``R / g`` explodes, and a normed output has a fixed
size, so any sizeable ``Δx`` renormalises the whole output. A damped version of it that
stays where the first-order model holds moves the residual only a tenth of the way. The
norm's outputs form a shell (``g ⊙ u`` with ``rms(u) = 1``), so
:func:`intattn_analysis.editors.keys.module_space` takes the point of that shell closest to
the wanted output, exactly, and asks the module for the ``Δx`` that gives it; the later
layers re-read ``h_L`` and take up what one layer's norm cannot express. The test suite
measures the residual change achieved against the requested one on Gemma-3.

Departures from the reference code (kmeng01/memit ``memit_main.py``; AlphaEdit's
``AlphaEdit_main.py``): the keys and the residual state are read through TransformerLens
hooks rather than module hooks, one forward per layer and module; the solves run in
float64 and are checked for singular systems (:mod:`intattn_analysis.editors.solvers`);
AlphaEdit's projector comes from ``torch.linalg.eigh`` of the symmetric moment rather than
an SVD (the same decomposition for a positive semi-definite matrix).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ...architectures import hook
from ...facts import SUBJECT_SLOT
from ...hparams import GENERIC_ALPHA, SPREADS, EditHparams, generic_layers, hparams_for
from ...targets import context_weights, prompt_rows, read_at_subject
from ..keys import key_hook, mean_over_contexts, module_space, post_norm, value_hook
from ..protocol import EditJob, Editor, register
from ..result import EditError
from ..solvers import null_space_projector, solve_projected, solve_update

__all__ = ["ALPHAEDIT", "ATTN", "INTATTN", "MEMIT", "closed_form_editor"]


def _writes(model, hp: EditHparams) -> list[tuple[str, int]]:
    """Every matrix the loop writes for these hparams (``hp.alpha`` already resolved)."""
    return [(m, l) for l in hp.layers for m in ("attn", "mlp")
            if (m == "attn" and hp.alpha_at(l) > 0) or (m == "mlp" and hp.alpha_at(l) < 1)]


def _prepare(share: float | str):
    """Resolve the attention share per layer: IntAttn-Edit reads ``alpha`` (from the call,
    the hparams, or the model's defaults); the fixed-share methods write ``share``, and an
    explicit alpha that contradicts it is an error."""

    def prepare(model, hp: EditHparams, alpha_given: bool) -> tuple[EditHparams, dict[int, float]]:
        if share != "alpha":
            fixed = float(share)
            if alpha_given:
                values = [hp.alpha_at(l) for l in hp.layers]
                if any(v is not None and v != fixed for v in values):
                    raise EditError(
                        f"this method writes a fixed attention share of {fixed}; alpha "
                        f"{hp.alpha!r} does not apply (use method='intattn' to set alpha)"
                    )
            alphas = {l: fixed for l in hp.layers}
        else:
            if hp.alpha is None:
                hp = hp.replace(alpha=hparams_for(model, "intattn").alpha)
            alphas = {}
            for l in hp.layers:
                try:
                    value = hp.alpha_at(l)
                except ValueError as error:  # a {layer: alpha} mapping that misses a layer
                    raise EditError(str(error)) from None
                if value is None or not 0.0 <= value <= 1.0:
                    raise EditError(f"alpha at layer {l} must lie in [0, 1], got {value!r}")
                alphas[l] = float(value)
        single = len(set(alphas.values())) == 1
        hp = hp.replace(alpha=next(iter(alphas.values())) if single else dict(alphas))
        return hp, alphas

    return prepare


def apply(job: EditJob) -> None:
    """The solver loop of the module notes, writing as it goes."""
    model, hp, alphas, templates = job.model, job.hparams, job.alphas, job.templates
    rows = prompt_rows(model, job.facts, templates)
    n_ctx = len(templates)
    weights = torch.tensor(context_weights(templates), dtype=torch.float64)
    bare = list(templates).index(SUBJECT_SLOT)
    last = max(hp.layers)
    z = job.targets.z.double()
    # the state z* is compared with: the residual stream after L (MEMIT), or the MLP
    # output of L where the targets are set for it (PMET)
    site = hook("resid_post", last) if job.targets.site == "residual" else hook("mlp_out", last)
    spread = SPREADS[hp.spread]
    projected = hp.projection == "null_space"
    edited = dict(job.state or {}) if projected else {}
    for i, layer in enumerate(tqdm(hp.layers, desc="solving", disable=not job.progress)):
        share = alphas[layer]
        order = [m for m in ("attn", "mlp") if (share > 0 if m == "attn" else share < 1)]
        residual = None
        for step, module in enumerate(order):
            names = [key_hook(module, layer)]
            if post_norm(model, module, layer) is not None:
                names.append(value_hook(module, layer))
            if step == 0:  # h_L is read once per layer, with the weights written so far
                names.append(site)
            read = read_at_subject(model, rows, names)
            if step == 0:
                # z* = h + δ with h read in the bare prompt, so the state it is compared
                # with is read there too (MEMIT's cur_zs); the keys are weighted context
                # averages (MEMIT's compute_ks)
                h_last = read[site].double().view(-1, n_ctx, z.shape[-1])[:, bare]
                residual = (z - h_last) * spread(len(hp.layers) - i)
            part = residual * (share if module == "attn" else 1.0 - share)
            job.result.residuals[(module, layer)] = part.float().cpu()
            target = part
            if value_hook(module, layer) in read:
                target = module_space(model, module, layer, part, read[value_hook(module, layer)], weights)
            keys = mean_over_contexts(read[key_hook(module, layer)], weights)
            key = (module, layer)
            if projected:
                update = solve_projected(
                    keys, target, _projector(job, key), hp.nullspace_l2, edited.get(key),
                    module=module, layer=layer,
                )
            else:
                update = solve_update(keys, target, job.moments[key], hp.lambda_for(module),
                                      module=module, layer=layer)
            job.write(key, update)
    if projected:
        job.result.state = _carried_keys(job, rows, weights, edited)


#: Projectors computed so far: ``{(id(moment), threshold): (weak reference to the moment,
#: P)}``. The edits of a sequence, and the rows of a table that share a moment tensor, reuse
#: its eigendecomposition; an entry whose moment is gone is never served (the weak
#: reference no longer points at it) and is dropped when the next one is stored.
_PROJECTORS: dict[tuple[int, float], tuple[weakref.ref, Tensor]] = {}


def _projector(job: EditJob, key: tuple[str, int]) -> Tensor:
    """The null-space projector of one matrix, computed once per moment tensor and
    threshold; the size of the null space is recorded in ``result.details``."""
    moment = job.moments[key]
    threshold = job.hparams.nullspace_threshold
    entry = (id(moment), threshold)
    cached = _PROJECTORS.get(entry)
    if cached is None or cached[0]() is not moment:
        for stale in [k for k, (ref, _) in _PROJECTORS.items() if ref() is None]:
            del _PROJECTORS[stale]
        cached = (weakref.ref(moment), null_space_projector(moment, threshold))
        _PROJECTORS[entry] = cached
    projector = cached[1]
    dims = job.result.details.setdefault("null_space_dims", {})
    dims[key] = (int(round(float(projector.diagonal().sum()))), int(projector.shape[0]))
    return projector


def _carried_keys(job: EditJob, rows, weights, edited: dict) -> dict:
    """The state after the batch: ``Σ k kᵀ`` of the keys edited so far, the batch's keys
    read again on the edited model (AlphaEdit's ``cache_c`` update)."""
    keys = sorted(job.result._originals, key=lambda k: (k[1], k[0]))
    read = read_at_subject(job.model, rows, [key_hook(m, l) for m, l in keys])
    state = dict(edited)
    for module, layer in keys:
        K = mean_over_contexts(read[key_hook(module, layer)], weights).cpu()
        previous = state.get((module, layer))
        gram = K.T @ K
        state[(module, layer)] = gram if previous is None else previous.to(torch.float64) + gram
    return state


def _moments_needed(model, hp: EditHparams) -> list[tuple[str, int]]:
    return _writes(model, hp)


def generic_rule(projection: str = "none", cls=EditHparams):
    """The settings of a model without a defaults file: five consecutive layers from an
    eighth of the depth (MEMIT's 4-8 of 32), alpha :data:`~intattn_analysis.hparams.GENERIC_ALPHA`,
    MEMIT's Llama-family settings otherwise (AlphaEdit adds its reference projection)."""

    def rule(n_layers: int):
        layers = generic_layers(n_layers)
        extra = {"projection": projection} if projection != "none" else {}
        text = (f"5 consecutive layers from round(n_layers/8) -> layers {list(layers)} of {n_layers}, "
                f"alpha {GENERIC_ALPHA}, MEMIT's Llama-family settings otherwise")
        return cls(layers=layers, alpha=GENERIC_ALPHA, **extra), text

    return rule


def closed_form_editor(name: str, share: float | str, description: str, reference: str, *, label: str,
                       compared: bool = True, projection: str = "none") -> Editor:
    """One member of the family: the loop with a fixed or balanced attention share."""
    return Editor(
        name=name,
        hparams_type=EditHparams,
        apply=apply,
        writes=_writes,
        moments=_moments_needed,
        targets="residual",
        reads_alpha=share == "alpha",
        carries_state=True,
        prepare=_prepare(share),
        description=description,
        reference=reference,
        label=label,
        compared=compared,
        generic=generic_rule(projection),
    )


MEMIT = register(closed_form_editor(
    "memit", 0.0, "MEMIT: MLP down-projections only",
    "Meng et al., ICLR 2023; kmeng01/memit memit_main.py", label="MEMIT",
))
INTATTN = register(closed_form_editor(
    "intattn", "alpha",
    "IntAttn-Edit: o_proj takes alpha_l of each layer's update, down_proj the rest",
    "arXiv 2510.27400", label="IntAttn-Edit",
))
ATTN = register(closed_form_editor(
    "attn", 1.0, "attention only (o_proj), an ablation", "this package", label="Attention only", compared=False,
))
ALPHAEDIT = register(closed_form_editor(
    "alphaedit", 0.0,
    "AlphaEdit: MEMIT's update projected onto the null space of the preserved keys",
    "Fang et al., ICLR 2025; jianghoucheng/AlphaEdit AlphaEdit_main.py", label="AlphaEdit",
    projection="null_space",
))
