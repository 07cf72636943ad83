"""ROME (Meng et al., NeurIPS 2022): a rank-one update of one MLP down-projection per fact.

For each fact, one after another on the model as the earlier facts left it (as the
reference code's ``apply_rome_to_model`` does for a list of requests):

1. the key ``k̄``: the down-projection's input at the subject's last token, read under
   the bare prompt and every context prefix, and averaged with a plain mean
   (``rome/compute_u.py``);
2. the target ``v* = o + δ``: ``δ`` is optimised at the MLP output ``o`` of the edited
   layer (:func:`intattn_analysis.targets.compute_z` with ``site="mlp_output"``: the
   same loss as MEMIT's targets, with the clamp and weight decay relative to ``||o||``,
   as ``rome/compute_v.py`` has them);
3. the update ``ΔW = δ uᵀ / (uᵀ k)`` with ``u = C⁻¹ k̄ / ||C⁻¹ k̄||`` and ``k`` the key
   of the bare prompt (ROME's ``cur_input``), so that ``(W + ΔW) k = W k + δ = v*``
   exactly, and ``ΔW x = 0`` for every ``x`` with ``xᵀ C⁻¹ k̄ = 0``
   (:func:`intattn_analysis.editors.solvers.rank_one_update`).

Departures from the reference code (kmeng01/rome, and EasyEdit's copy):

* The context prefixes are the package's greedy ones (``n_context_templates`` of about
  ``context_template_length`` tokens, :func:`intattn_analysis.targets.context_templates`)
  rather than 20 prefixes sampled with top-k 5 (10 of 5 tokens and 10 of 10).
* The target optimisation is the package's batched one (:mod:`intattn_analysis.targets`)
  run on one fact at a time; it is the same loss and stop rule (NLL + KL at the subject's
  last token of "{subject} is a" + weight decay, stop at a loss below 0.05, no update at
  the last evaluation).
* ``C⁻¹ k̄`` is a Cholesky solve in float64 rather than an explicit float32 inverse.
* On post-norm models (Gemma 2/3) ``δ`` is a change of the residual stream after the
  MLP's norm, and the change of the down-projection's output that gives it is found by
  the shell projection of :func:`intattn_analysis.editors.keys.module_space`.
"""

from __future__ import annotations

import time

import torch
from tqdm import tqdm

from ...facts import SUBJECT_SLOT
from ...hparams import RomeHparams
from ...targets import compute_z, prompt_rows, read_at_subject
from ..keys import key_hook, module_space, post_norm, value_hook
from ..protocol import EditJob, Editor, register
from ..result import EditError
from ..solvers import rank_one_update

__all__ = ["ROME"]


def _writes(model, hp: RomeHparams) -> list[tuple[str, int]]:
    return [("mlp", hp.layers[0])]


def _moments(model, hp: RomeHparams) -> list[tuple[str, int]]:
    return [("mlp", hp.layers[0])] if hp.mom2_adjustment else []


def apply(job: EditJob) -> None:
    model, hp, templates = job.model, job.hparams, job.templates
    layer = hp.layers[0]
    key = ("mlp", layer)
    bare = templates.index(SUBJECT_SLOT)
    moment = job.moments[key] if hp.mom2_adjustment else None
    names = [key_hook("mlp", layer)]
    normed = post_norm(model, "mlp", layer) is not None
    if normed:
        names.append(value_hook("mlp", layer))
    seconds = 0.0
    for fact in tqdm(job.facts, desc="ROME, fact by fact", disable=not job.progress):
        start = time.perf_counter()
        target = compute_z(model, [fact], hp, layer=layer, templates=templates, site="mlp_output",
                           batch_size=1, progress=False)
        seconds += time.perf_counter() - start
        job.result.z_diagnostics.append(target.diagnostics[0])
        read = read_at_subject(model, prompt_rows(model, [fact], templates), names)
        keys = read[key_hook("mlp", layer)].double()
        residual = target.delta[0].double()
        if normed:
            one = torch.ones(1, dtype=torch.float64)
            residual = module_space(model, "mlp", layer, residual[None],
                                    read[value_hook("mlp", layer)][bare:bare + 1], one)[0]
        update = rank_one_update(residual, keys[bare], keys.mean(0), moment, module="mlp", layer=layer)
        job.write(key, update)
    job.result.timings["targets"] = seconds


def _prepare(model, hp: RomeHparams, alpha_given: bool):
    if alpha_given:
        raise EditError("method 'rome' writes one MLP down-projection; alpha does not apply "
                        "(use method='intattn')")
    return hp, {}


ROME = register(Editor(
    name="rome",
    hparams_type=RomeHparams,
    apply=apply,
    writes=_writes,
    moments=_moments,
    targets="mlp_output",
    prepare=_prepare,
    description="ROME: a rank-one update of one MLP down-projection, fact after fact",
    reference="Meng et al., NeurIPS 2022; kmeng01/rome rome/rome_main.py, compute_u.py, compute_v.py",
))
