"""ROME (Meng et al., NeurIPS 2022): a rank-one update of one MLP down-projection per fact.

For each fact, one after another on the model as the earlier facts left it (as the
reference code's ``apply_rome_to_model`` does for a list of requests):

1. the key ``k̄``: the down-projection's input at the subject's last token, read under
   the bare prompt and every context prefix, and averaged with a plain mean
   (``rome/compute_u.py``);
2. the target ``v* = o + δ``: ``δ`` is optimised at the MLP output ``o`` of the edited
   layer (:func:`intattn_analysis.targets.compute_z` with ``site="mlp_output"``: the
   same loss as MEMIT's targets, with the clamp and weight decay relative to ``||o||``,
   as ``rome/compute_v.py`` has them). On post-norm models (Gemma 2/3) ``o`` is the
   down-projection's output before the MLP's norm (``site="mlp_value"``): ``δ`` is added
   there and the forward applies the norm to ``o + δ``, so every ``v*`` the optimisation
   finds is an output the rank-one write gives exactly;
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
* On post-norm models (Gemma 2/3), which the reference code does not cover, ``v*`` is
  optimised before the MLP's norm (see 2). A residual change optimised after the norm, as
  on pre-norm models, and converted by the shell projection of
  :func:`intattn_analysis.editors.keys.module_space` loses most of its effect: on
  Gemma-3-270M at layer 4 the targets reached p(new) 0.89-0.995 with ``||δ||`` 0.7-2.6
  times the MLP output's, yet after the write p(new) was 0.000-0.003 (3 facts, each
  edited alone), since the norm keeps the size of what the MLP adds to the residual.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm

from ...facts import SUBJECT_SLOT
from ...hparams import RomeHparams, generic_layers
from ...targets import compute_z, prompt_rows, read_at_subject
from ..keys import key_hook, post_norm
from ..protocol import EditJob, Editor, register
from ..result import EditError
from ..solvers import rank_one_update

__all__ = ["ROME"]


def _writes(model, hp: RomeHparams) -> list[tuple[str, int]]:
    return [("mlp", hp.layers[0])]


def _moments(model, hp: RomeHparams) -> list[tuple[str, int]]:
    return [("mlp", hp.layers[0])] if hp.mom2_adjustment else []


def target_site(model, layer: int) -> str:
    """Where ROME's ``v*`` is optimised (:func:`intattn_analysis.targets.compute_z`):
    the MLP output, or, where the layer's MLP has a post-norm, the down-projection's
    output before it (the two are the same vector on models without one)."""
    return "mlp_value" if post_norm(model, "mlp", layer) is not None else "mlp_output"


def apply(job: EditJob) -> None:
    model, hp, templates = job.model, job.hparams, job.templates
    layer = hp.layers[0]
    key = ("mlp", layer)
    bare = templates.index(SUBJECT_SLOT)
    moment = job.moments[key] if hp.mom2_adjustment else None
    names = [key_hook("mlp", layer)]
    site = target_site(model, layer)
    seconds = 0.0
    for fact in tqdm(job.facts, desc="ROME, fact by fact", disable=not job.progress):
        start = time.perf_counter()
        target = compute_z(model, [fact], hp, layer=layer, templates=templates, site=site,
                           batch_size=1, progress=False)
        seconds += time.perf_counter() - start
        job.result.z_diagnostics.append(target.diagnostics[0])
        read = read_at_subject(model, prompt_rows(model, [fact], templates), names)
        keys = read[key_hook("mlp", layer)].double()
        change = target.delta[0].double()  # of the down-projection's output, on every model
        update = rank_one_update(change, keys[bare], keys.mean(0), moment, module="mlp", layer=layer)
        job.write(key, update)
    job.result.timings["targets"] = seconds


def _prepare(model, hp: RomeHparams, alpha_given: bool):
    if alpha_given:
        raise EditError("method 'rome' writes one MLP down-projection; alpha does not apply "
                        "(use method='intattn')")
    return hp, {}


def _variant(model, hp: RomeHparams) -> dict:
    # the site enters result keys only where it is not the MLP output, so that results on
    # pre-norm models keep their keys
    site = target_site(model, hp.layers[0])
    return {} if site == "mlp_output" else {"v_site": site}


def _generic(n_layers: int):
    """The second of MEMIT's generic block of five layers (EasyEdit's layer 5 of 32 for
    Llama), with C⁻¹."""
    layers = generic_layers(n_layers)
    chosen = (layers[min(1, len(layers) - 1)],)
    return RomeHparams(layers=chosen), f"layer {chosen[0]} (the second of MEMIT's generic block {list(layers)})"


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
    variant=_variant,
    label="ROME",
    generic=_generic,
))
