"""The solvers of the closed-form editors, written once.

* :func:`solve_update`: the least-squares update of MEMIT and IntAttn-Edit,
  ``ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹``: the new keys ``K`` map to ``W K + R`` while the keys of a
  text corpus (second moment ``C = E[k kᵀ]``) keep their outputs as far as λ asks.
* :func:`rank_one_update`: ROME's update ``ΔW = r (C⁻¹k̄)ᵀ / ((C⁻¹k̄)ᵀ k)``, which moves
  the output at one key ``k`` by ``r`` and leaves every key ``x`` with
  ``xᵀ C⁻¹ k̄ = 0`` alone.
* :func:`null_space_projector` and :func:`solve_projected`: AlphaEdit's update
  ``ΔW = R Kᵀ P (P (K Kᵀ + K_e K_eᵀ) + l₂ I)⁻¹`` in the reference code's form, where
  ``P`` projects onto the eigenvectors of ``C`` whose eigenvalues fall below a
  threshold, so every key in the span of the others (the preserved knowledge) keeps its
  output exactly, and ``K_e`` are the keys of earlier edits in a sequence.

Keys and residuals are rows (one per fact); every solve runs in float64 and returns
``[d_out, d_in]``.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from .result import EditError

__all__ = [
    "CONDITION_LIMIT",
    "SOLVE_TOLERANCE",
    "null_space_projector",
    "rank_one_update",
    "solve_projected",
    "solve_update",
]

#: Largest relative residual ``||A X − B|| / ||B||`` accepted from the solve.
SOLVE_TOLERANCE = 1e-6
#: Smallest ratio of the system's smallest to largest squared Cholesky pivot accepted.
CONDITION_LIMIT = 1e-13


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
    L = _cholesky(A, f"the system for {where} is singular or ill-conditioned (λ={lam}; the second "
                     "moment is rank-deficient in the keys' directions); use a larger lambda or second "
                     "moments from more tokens")
    X = torch.cholesky_solve(B, L)
    _check_solution(A, X, B, f"the system for {where} is singular or ill-conditioned (λ={lam}, relative "
                             "residual {misfit}); use a larger lambda or second moments from more tokens")
    return X.T


def _cholesky(A: Tensor, error: str) -> Tensor:
    """The Cholesky factor of the symmetric positive (semi)definite ``A``; a failed or
    vanishing pivot (squared pivot ratio at most :data:`CONDITION_LIMIT`, which bounds the
    condition) raises :class:`EditError` with ``error``."""
    L, info = torch.linalg.cholesky_ex(A)
    pivots = L.diagonal() ** 2 if int(info) == 0 else None
    if pivots is None or not torch.isfinite(pivots).all() or pivots.min() <= CONDITION_LIMIT * pivots.max():
        raise EditError(error)
    return L


def _check_solution(A: Tensor, X: Tensor, B: Tensor, error: str) -> None:
    """Raise :class:`EditError` (``error`` with ``{misfit}`` filled in) when ``X`` is not
    finite or its relative residual ``||A X − B|| / ||B||`` exceeds :data:`SOLVE_TOLERANCE`."""
    scale = B.norm()
    misfit = (A @ X - B).norm() / scale if scale > 0 else (A @ X - B).norm()
    if not torch.isfinite(X).all() or misfit > SOLVE_TOLERANCE:
        raise EditError(error.format(misfit=f"{float(misfit):.3g}"))



def null_space_projector(moment: Tensor, threshold: float) -> Tensor:
    """AlphaEdit's projector ``P = Û Ûᵀ`` onto the eigenvectors of the second moment
    ``C = E[k kᵀ]`` whose eigenvalues are below ``threshold`` (absolute, as in the
    reference code: it depends on the scale of the keys, so it is set per model).

    ``C`` is symmetric positive semi-definite, so its eigendecomposition (float64,
    ``torch.linalg.eigh``) is its SVD, which the reference code takes. A key ``k`` in the
    span of the kept-out eigenvectors (the preserved subspace) has ``P k = 0``.
    """
    C = moment.double()
    if C.ndim != 2 or C.shape[0] != C.shape[1]:
        raise EditError(f"the second moment must be square, got shape {tuple(C.shape)}")
    if not bool(torch.isfinite(C).all()):
        raise EditError("the second moment has NaN/inf entries; recompute the second moments")
    values, vectors = torch.linalg.eigh((C + C.T) / 2)
    kept = int((values < threshold).sum())
    if kept == 0:
        raise EditError(
            f"no eigenvalue of the second moment is below nullspace_threshold={threshold:g} (they "
            f"run from {float(values.min()):.3g} to {float(values.max()):.3g}): the null space is "
            "empty and every update would be 0. Choose a threshold inside that range"
        )
    if kept == C.shape[0]:
        warnings.warn(
            f"every eigenvalue of the second moment is below nullspace_threshold={threshold:g} (the "
            f"largest is {float(values.max()):.3g}): the projection preserves nothing",
            stacklevel=2,
        )
    small = vectors[:, values < threshold]
    return small @ small.T


def solve_projected(
    keys: Tensor,  # [n, d_in]
    residuals: Tensor,  # [n, d_out]
    projector: Tensor,  # [d_in, d_in]
    l2: float,
    edited: Tensor | None = None,  # [d_in, d_in], sum of K_e K_eᵀ over earlier edits
    *,
    module: str = "",
    layer: int = -1,
) -> Tensor:
    """AlphaEdit's update ``ΔW = Xᵀ`` with ``(P (Kᵀ K + E) + l₂ I) X = P Kᵀ R``.

    The solution lies in the range of ``P`` (``l₂ X = P (Kᵀ R − (KᵀK + E) X)``), so
    ``ΔW k = 0`` for every key with ``P k = 0``: the preserved keys' outputs do not move,
    whatever the new keys ask. ``E`` (``edited``) is the sum of ``k kᵀ`` over the keys of
    earlier edits of a sequence, which the update must also leave alone (as far as ``P``
    lets it). The system is not symmetric, so it is solved by LU (``torch.linalg.solve``)
    and checked like :func:`solve_update`.
    """
    where = f"{module} layer {layer}"
    P = projector.double()
    K = keys.to(device=P.device, dtype=torch.float64)
    R = residuals.to(device=P.device, dtype=torch.float64)
    gram = K.T @ K
    if edited is not None:
        gram = gram + edited.to(device=P.device, dtype=torch.float64)
    A = P @ gram + l2 * torch.eye(P.shape[0], dtype=torch.float64, device=P.device)
    B = P @ (K.T @ R)
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise EditError(f"the projected system for {where} has NaN/inf entries; check the keys and targets")
    X = torch.linalg.solve(A, B)
    _check_solution(A, X, B, f"the projected system for {where} is singular (l2={l2}, relative residual "
                             "{misfit}); use a larger nullspace_l2")
    return X.T


def rank_one_update(
    residual: Tensor,  # [d_out]: the wanted change of the output at `key`
    key: Tensor,  # [d_in]: the key the change is made at (ROME's cur_input)
    left: Tensor,  # [d_in]: the averaged key k̄ (ROME's compute_u input)
    moment: Tensor | None,  # [d_in, d_in] E[k kᵀ], or None for no C⁻¹ (mom2_adjustment off)
    *,
    module: str = "",
    layer: int = -1,
) -> Tensor:
    """ROME's rank-one update ``ΔW = r uᵀ / (uᵀ k)`` with ``u = C⁻¹ k̄ / ||C⁻¹ k̄||``.

    Then ``(W + ΔW) k = W k + r`` exactly, and ``ΔW x = 0`` for every ``x`` with
    ``xᵀ C⁻¹ k̄ = 0``. ``C⁻¹ k̄`` is a solve in float64 (Cholesky, checked like
    :func:`solve_update`), not an explicit inverse.
    """
    where = f"{module} layer {layer}"
    k_bar = left.double()
    if moment is None:
        u = k_bar
    else:
        C = moment.to(device=k_bar.device, dtype=torch.float64)
        L = _cholesky(C, f"the second moment at {where} is singular, so C⁻¹k cannot be formed; use "
                         "second moments from more tokens, or mom2_adjustment=False")
        u = torch.cholesky_solve(k_bar[:, None], L)[:, 0]
    u = u / u.norm()
    denominator = u @ key.double().to(u.device)
    if not torch.isfinite(denominator) or abs(float(denominator)) < 1e-12 * float(key.double().norm()):
        raise EditError(
            f"the key at {where} is (nearly) orthogonal to C⁻¹k̄, so a rank-one update cannot "
            "reach the target; check the fact's subject and prompt"
        )
    return residual.double().to(u.device)[:, None] * (u / denominator)[None, :]
