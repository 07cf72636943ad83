"""intattn: locate and edit factual knowledge in the attention and MLP modules of LLMs.

Reproduces and extends *Balancing Knowledge Updates: Toward Unified Modular Editing in
LLMs* (IntAttn-Edit, arXiv 2510.27400). Typical use::

    import intattn_analysis as ia
    model = ia.load_model()            # SmolLM2-135M, embedded, offline
    facts = ia.load_facts("builtin")   # or a KnowEdit / CounterFact / ZsRE / MQuAKE file
"""

from .architectures import ARCHITECTURES, HOOKS, ArchSpec, LayerSpec, UnknownArchitectureError
from .datasets import DatasetError, load_facts
from .facts import Fact, FactError, Probe
from .loading import EMBEDDED_MODELS, ModelHandle, ModelLoadError, load_model

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "EMBEDDED_MODELS",
    "HOOKS",
    "ArchSpec",
    "DatasetError",
    "Fact",
    "FactError",
    "LayerSpec",
    "ModelHandle",
    "ModelLoadError",
    "Probe",
    "UnknownArchitectureError",
    "load_facts",
    "load_model",
]
