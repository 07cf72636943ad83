"""PMET (Li et al., AAAI 2024): precise targets for the FFN, written with MEMIT's solve.

PMET optimises two deltas together at the subject's last token of the last edited layer
``L``: one added to the attention output and one to the FFN output, both *of* ``L``
(:data:`PMET_TARGETS`, the site ``"pmet"`` of :func:`intattn_analysis.targets.compute_z`;
each clamped and decayed relative to its own module's output, the attention delta
optimised only while ``hparams.attn_targets`` is true). Its steps start at ``L`` itself
(the attention delta passes through the layer's MLP), so ``L`` must be at least 1. Its
targets are computed once for a batch and shared, and not cached on disk. Only the FFN target is written: for each edited
layer ``l`` in ascending order, the residual ``R = (z*_FFN − m_L) / sqrt(L − i)``, where
``m_L`` is the FFN output of ``L`` at the subject's last token of the bare prompt, read
again after the earlier layers were written, goes into the down-projection of ``l`` by
MEMIT's least-squares update (the closed-form loop of
:mod:`intattn_analysis.editors.methods.closed_form` with the square-root spread and the
current value read at the FFN output). The attention target only shapes the FFN target,
as in the reference code's Llama configurations, which list the FFN module alone.

Departures from the reference code (EasyEdit ``easyeditor/models/pmet``):

* The reference lowers the NLL's weight to a tenth once every target token is the
  argmax and then stops when the KL term is at most 0.01; here the stop rule is
  MEMIT's (a loss below ``stop_loss``, at most ``v_steps − 1`` updates).
* Rows are right-padded (EasyEdit runs PMET with left padding on Llama while placing the
  targets as if the padding were on the right, which misaligns them).
* On post-norm models the FFN target is converted into the down-projection's own output
  space by the shell projection (:func:`intattn_analysis.editors.keys.module_space`).

PMET runs the closed-form loop, so it takes the loop's ``projection="null_space"`` as the
other members do (a combination no published editor has); its defaults leave it off.
"""

from __future__ import annotations

from ...hparams import PMETHparams
from ...targets import TargetSite, register_target_site
from ..protocol import Editor, register
from ..result import EditError
from . import closed_form

__all__ = ["PMET", "PMET_TARGETS"]

#: PMET's targets: the FFN output's delta (the target written) and the attention output's.
PMET_TARGETS = register_target_site(TargetSite(
    "pmet", deltas=(("mlp_out", "mlp_out"), ("attn_out", "attn_out")),
    learned=lambda hp: (True, getattr(hp, "attn_targets", True)), cached=False, shared=True,
))


def _writes(model, hp: PMETHparams) -> list[tuple[str, int]]:
    return [("mlp", l) for l in hp.layers]


def _prepare(model, hp: PMETHparams, alpha_given: bool):
    if alpha_given:
        raise EditError("method 'pmet' writes the FFN only; alpha does not apply (use method='intattn')")
    if max(hp.layers) < 1:
        raise EditError("PMET optimises the attention and FFN outputs of its last layer starting from the "
                        "residual stream before it: its last edited layer must be at least 1")
    return hp, {l: 0.0 for l in hp.layers}


PMET = register(Editor(
    name="pmet",
    hparams_type=PMETHparams,
    apply=closed_form.apply,
    writes=_writes,
    moments=_writes,
    targets="pmet",
    carries_state=True,
    prepare=_prepare,
    description="PMET: attention and FFN targets optimised together, the FFN's written with a sqrt spread",
    reference="Li et al., AAAI 2024; EasyEdit easyeditor/models/pmet (pmet_main.py, compute_zs.py)",
    label="PMET",
    generic=closed_form.generic_rule(cls=PMETHparams),
))
