"""The second moments an edit reads, gathered one way for every caller.

The closed-form editors preserve the keys of a text corpus through their second moment
``E[k kᵀ]`` at each matrix they write (MEMIT's ``C``); ROME reads it at its one layer.
Which corpus sample is used is part of the method's hyperparameters
(``mom2_n_tokens``, ``mom2_max_len``, ``mom2_dtype``: :func:`corpus_sample`). ``ia.edit``,
``ia.edit_sequence`` and the experiments' runner all gather them with
:func:`moments_for`: one streaming pass over the sample for every matrix asked for,
cached on disk by :func:`intattn_analysis.second_moments`.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

from ..architectures import MODULES
from ..covariance import second_moments
from ..loading import ModelHandle

__all__ = ["corpus_sample", "moments_for"]

Key = tuple[str, int]


def corpus_sample(hparams: Any) -> tuple | None:
    """The corpus sample a method's second moments come from, ``(n_tokens, max_len,
    dtype)``; ``None`` for hyperparameters without one (fine-tuning reads no moments)."""
    if not hasattr(hparams, "mom2_n_tokens"):
        return None
    return (hparams.mom2_n_tokens, hparams.mom2_max_len, hparams.mom2_dtype)


def moments_for(model: ModelHandle, keys: Iterable[Key], hparams: Any, *, progress: bool = True
                ) -> Mapping[Key, Any]:
    """``{(module, layer): E[k kᵀ]}`` for every key, from the corpus sample ``hparams``
    names (:func:`corpus_sample`), in one pass; every module asked for is read at every
    layer asked for. An empty mapping when no key is asked for."""
    keys = list(keys)
    if not keys:
        return {}
    layers = sorted({layer for _, layer in keys})
    modules = tuple(m for m in MODULES if any(k[0] == m for k in keys))
    return second_moments(model, layers, modules=modules, n_tokens=hparams.mom2_n_tokens,
                          max_len=hparams.mom2_max_len, dtype=hparams.torch_mom2_dtype, progress=progress)
