"""Small ports of the published editors' update rules, written for the tests.

Each follows the reference code's own formulation and orientation (keys as *columns*,
explicit inverses where the reference takes them) and shares no code with
:mod:`intattn_analysis.editors`, so that agreement is evidence, not tautology.

* :func:`rome_update`: kmeng01/rome ``compute_u.py`` / ``compute_v.py`` / ``rome_main.py``:
  ``u = inverse(C) @ k̄``, ``u /= ||u||``, ``right = (v* − W k) / (k · u)``,
  ``ΔW = right ⊗ u`` (the reference builds ``u ⊗ right`` for GPT-2's Conv1D layout and
  transposes it for a Linear).
* :func:`alphaedit_projector` and :func:`alphaedit_update`: jianghoucheng/AlphaEdit
  ``get_project`` (SVD of the covariance, singular values below an absolute threshold)
  and ``AlphaEdit_main.py`` (``solve(P @ (K Kᵀ + cache_c) + L2 I, P @ K @ Rᵀ)``, then its
  transpose is added to the weight).
* :func:`execute_pmet`: EasyEdit ``pmet_main.py``: the FFN targets against the
  down-projection's output of the last edited layer, spread by ``1/sqrt``, solved with
  an explicit inverse (it reuses the MEMIT port's key reads in ``tests/memit_reference.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rome_update(weight: Tensor, moment: Tensor, k_bar: Tensor, k: Tensor, v_star: Tensor) -> Tensor:
    """ROME's ``ΔW`` (``[d_out, d_in]``) for one fact, in float64."""
    W, C = weight.double(), moment.double()
    u = torch.inverse(C) @ k_bar.double()
    u = u / u.norm()
    right = (v_star.double() - W @ k.double()) / torch.dot(k.double(), u)
    return torch.outer(u, right).T


def alphaedit_projector(moment: Tensor, threshold: float) -> Tensor:
    """``U[:, S < threshold] U[:, S < threshold]ᵀ`` from the SVD of the covariance."""
    U, S, _ = torch.linalg.svd(moment.double(), full_matrices=False)
    small = (S < threshold).nonzero(as_tuple=True)[0]
    return U[:, small] @ U[:, small].T


def alphaedit_update(keys_as_columns: Tensor, resid_as_columns: Tensor, projector: Tensor,
                     l2: float, cache_c: Tensor | None = None) -> Tensor:
    """AlphaEdit's ``ΔW`` (``[d_out, d_in]``) for keys ``[d_in, n]`` and residuals
    ``[d_out, n]``."""
    K, R, P = keys_as_columns.double(), resid_as_columns.double(), projector.double()
    cache = torch.zeros_like(P) if cache_c is None else cache_c.double()
    upd = torch.linalg.solve(P @ (K @ K.T + cache) + l2 * torch.eye(P.shape[0], dtype=torch.float64),
                             P @ K @ R.T)
    return upd.T


def execute_pmet(hf_model, tokenizer, facts, zs_mlp: Tensor, layers, moments: dict[int, Tensor],
                 lam: float, context_types, down_proj_of) -> dict[int, Tensor]:
    """PMET's update loop (EasyEdit ``pmet_main.execute_pmet``) on ``hf_model``: for each
    layer, ``targets = z*_FFN − cur_zs`` with ``cur_zs`` the down-projection's *output* of
    the last edited layer at the subject's last token of the bare prompt, and
    ``ΔW = targets / sqrt(L − i) · Kᵀ · inverse(K Kᵀ + λ C)`` (keys as columns), written
    layer by layer. Returns ``{layer: ΔW}`` as added."""
    from memit_reference import _prompt, _read, compute_ks

    last = max(layers)
    deltas = {}
    for i, layer in enumerate(layers):
        module = down_proj_of(layer)
        K = compute_ks(hf_model, tokenizer, facts, module, context_types).T.double()  # [d_in, n]
        _, cur = _read(hf_model, tokenizer, [_prompt(f, "{}") for f in facts], module, down_proj_of(last))
        targets = (zs_mlp - cur).T.double()  # [d_model, n]
        upd = (targets / (len(layers) - i) ** 0.5) @ K.T @ torch.inverse(K @ K.T + lam * moments[layer].double())
        with torch.no_grad():
            applied = upd.to(module.weight.dtype)
            module.weight.add_(applied)
        deltas[layer] = applied
    return deltas
