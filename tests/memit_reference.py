"""A small port of MEMIT's key averaging and update (kmeng01/memit ``compute_ks.py`` and
``memit_main.execute_memit``), written for the tests.

It works on the Hugging Face model directly, with plain PyTorch forward hooks (as the
reference's ``nethook.Trace`` does), and shares no code with :mod:`intattn_analysis.editing`: the
keys, the residual states and the subject positions are read here again, so that a test
can check the package's MEMIT against this independent account of the reference
algorithm. Given the same targets ``z*``, second moments and context prefixes, both must
write the same ``ΔW``.

The reference, for each edited layer ``l`` in ascending order:

1. keys: the ``down_proj`` input at the subject's last token of every prompt under every
   context; averaged within each context *type* (``["{}"]``, then the generated prefixes)
   and then over the types;
2. ``cur_zs``: the residual stream at the output of the last edited layer, at the
   subject's last token of the bare prompt; ``targets = z* − cur_zs``;
3. ``adj_k = solve(λ C + K Kᵀ, K)``, ``resid = targets / (layers left)``,
   ``ΔW = resid adj_kᵀ``, in float64, added to the weight in its own dtype.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def subject_last_position(tokenizer, text: str, subject_end: int) -> int:
    """The index of the subject's last token: the number of tokens of the text up to the
    subject's end, minus one (the tokenizer must split at the subject's edge)."""
    return len(tokenizer(text[:subject_end])["input_ids"]) - 1


def _prompt(fact, template: str) -> tuple[str, int]:
    """``template`` filled with the fact's prompt, filled with its subject; and the
    character offset where the subject ends."""
    prompt = template.replace("{}", fact.prompt)
    start = prompt.index("{}")
    return prompt.replace("{}", fact.subject, 1), start + len(fact.subject)


@torch.no_grad()
def _read(hf_model, tokenizer, texts: Sequence[tuple[str, int]], module, block=None):
    """Per text (one forward each, no padding): the input of ``module`` and, with
    ``block``, that decoder layer's output, both at the subject's last token."""
    keys, states = [], []
    for text, end in texts:
        position = subject_last_position(tokenizer, text, end)
        seen = {}
        handles = [module.register_forward_hook(lambda m, args, out: seen.update(key=args[0]))]
        if block is not None:
            handles.append(block.register_forward_hook(
                lambda m, args, out: seen.update(state=out[0] if isinstance(out, tuple) else out)
            ))
        try:
            hf_model(torch.tensor([tokenizer(text)["input_ids"]]))
        finally:
            for handle in handles:
                handle.remove()
        keys.append(seen["key"][0, position])
        if block is not None:
            states.append(seen["state"][0, position])
    return torch.stack(keys), (torch.stack(states) if states else None)


def compute_ks(hf_model, tokenizer, facts, down_proj, context_types: Sequence[Sequence[str]]) -> Tensor:
    """MEMIT's ``compute_ks``: ``[facts, d_in]`` keys, averaged within each context type
    and then across types."""
    per_fact = []
    for fact in facts:
        type_means = []
        for group in context_types:
            keys, _ = _read(hf_model, tokenizer, [_prompt(fact, t) for t in group], down_proj)
            type_means.append(keys.mean(0))
        per_fact.append(torch.stack(type_means).mean(0))
    return torch.stack(per_fact)


def execute_memit(hf_model, tokenizer, facts, zs: Tensor, layers: Sequence[int],
                  moments: dict[int, Tensor], lam: float, context_types, down_proj_of,
                  block_of) -> dict[int, Tensor]:
    """MEMIT's update loop on ``hf_model`` (weights are written, as the reference does).

    ``down_proj_of(layer)`` gives the ``nn.Linear`` written at a layer, ``block_of(layer)``
    the decoder layer whose output ``z*`` lives at; ``moments[layer]`` is the written
    module's key second moment. Returns ``{layer: ΔW}`` as added to the weight.
    """
    last = max(layers)
    deltas = {}
    for i, layer in enumerate(layers):
        module = down_proj_of(layer)
        layer_ks = compute_ks(hf_model, tokenizer, facts, module, context_types).T  # [d_in, n]
        _, cur_zs = _read(hf_model, tokenizer, [_prompt(f, "{}") for f in facts], module, block_of(last))
        targets = (zs - cur_zs).T  # [d_model, n]
        layer_ks, targets = layer_ks.double(), targets.double()
        adj_k = torch.linalg.solve(lam * moments[layer].double() + layer_ks @ layer_ks.T, layer_ks)
        resid = targets / (len(layers) - i)
        upd_matrix = resid @ adj_k.T
        with torch.no_grad():
            applied = upd_matrix.to(module.weight.dtype)
            module.weight.add_(applied)
        deltas[layer] = applied
    return deltas
