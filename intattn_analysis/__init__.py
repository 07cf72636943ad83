"""intattn: locate and edit factual knowledge in the attention and MLP modules of LLMs.

Reproduces and extends *Balancing Knowledge Updates: Toward Unified Modular Editing in
LLMs* (IntAttn-Edit, arXiv 2510.27400). Typical use::

    import intattn_analysis as ia
    model = ia.load_model()            # SmolLM2-135M, embedded, offline
    facts = ia.load_facts("builtin")   # or a KnowEdit / CounterFact / ZsRE / MQuAKE file

Importing the package pins PyTorch's CPU kernels to one float path on every x86-64
machine (:mod:`intattn_analysis.numerics`; ``INTATTN_NATIVE_NUMERICS=1`` opts out).
"""

from .numerics import pin_cpu_numerics

pin_cpu_numerics()  # before any torch operation runs: the kernels are chosen at the first

from .architectures import ARCHITECTURES, HOOKS, ArchSpec, LayerSpec, UnknownArchitectureError
from .editors import (EDITORS, METHODS, EditError, EditResult, EditSequence, Editor, apply_deltas, edit, edit_sequence,
                      register_editor, unregister_editor)
from .datasets import DatasetError, DatasetWarning, benchmark_path, facts_table, load_facts
from .benchmarks import BENCHMARKS, benchmark_status, resolve_benchmark
from .facts import Fact, FactError, Probe, sample_by_relation
from .hparams import EditHparams, FTHparams, RomeHparams, hparams_for
from .known import known_facts, mark_known
from .covariance import SecondMoments, second_moments
from .loading import EMBEDDED_MODELS, ModelHandle, ModelLoadError, cache_root, load_model
from .localization import (
    attention_share_by_depth,
    early_attention_finding,
    layer_ranges,
    suggest_edit_layers,
)
from .answers import GenerationSettings
from .metrics import METRICS, PROTOCOLS, Evaluation, Evaluations, evaluate
from .targets import ZTargets, compute_z
from .predictions import answer_probability, top_predictions
from .runs import BatchRun, edit_batches, editable_batches
from .tracing import Noise, TraceResult, balance, trace
from .attribution import attribution_agreement, attribution_curves

__version__ = "0.1.0"

__all__ = [
    "BENCHMARKS",
    "DatasetWarning",
    "benchmark_status",
    "resolve_benchmark",
    "ARCHITECTURES",
    "BatchRun",
    "EMBEDDED_MODELS",
    "EDITORS",
    "EditError",
    "EditHparams",
    "EditResult",
    "EditSequence",
    "Editor",
    "FTHparams",
    "RomeHparams",
    "HOOKS",
    "ArchSpec",
    "DatasetError",
    "Evaluation",
    "Evaluations",
    "GenerationSettings",
    "PROTOCOLS",
    "Fact",
    "FactError",
    "LayerSpec",
    "METHODS",
    "METRICS",
    "ModelHandle",
    "ModelLoadError",
    "Noise",
    "Probe",
    "SecondMoments",
    "TraceResult",
    "UnknownArchitectureError",
    "ZTargets",
    "answer_probability",
    "apply_deltas",
    "attention_share_by_depth",
    "attribution_agreement",
    "attribution_curves",
    "balance",
    "benchmark_path",
    "cache_root",
    "compute_z",
    "early_attention_finding",
    "edit",
    "edit_batches",
    "edit_sequence",
    "editable_batches",
    "evaluate",
    "facts_table",
    "hparams_for",
    "known_facts",
    "layer_ranges",
    "load_facts",
    "load_model",
    "mark_known",
    "register_editor",
    "sample_by_relation",
    "second_moments",
    "suggest_edit_layers",
    "top_predictions",
    "trace",
    "unregister_editor",
]
