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
