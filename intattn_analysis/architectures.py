"""Architectures as data: where the two editable matrices live in each model family.

IntAttn-Edit writes into two linear maps per layer: the MLP down-projection (the
"value" matrix of the MLP as an associative memory, ROME/MEMIT's edit site) and the
attention output projection (``o_proj`` / ``W_O``). To edit them the package needs, per
model class, only the Hugging Face module path of each and the layout of its weight.

The TransformerLens ``TransformerBridge`` gives every supported architecture the same
hook vocabulary, so hook names are not part of an entry: :data:`HOOKS` is the one table
of names used everywhere in the package, and :data:`OPTIONAL_HOOKS` holds the few more
that only some bridges have (the package checks for them before it uses them);
:func:`hook` spells a name of either table, and :mod:`intattn_analysis.model_access`
uses them to read and run a model. Adding an architecture means adding one
:class:`ArchSpec` to :data:`ARCHITECTURES`; no algorithm looks at the model class.

Two facts about an architecture change how an edit must be aimed:

* ``weight_layout``: ``torch.nn.Linear`` stores ``W`` as ``[out, in]``; GPT-2's
  ``Conv1D`` stores it as ``[in, out]``.
* ``post_norms``: Gemma 2/3 apply an RMSNorm to the attention and MLP outputs *before*
  they are added to the residual stream (``post_attention_layernorm``,
  ``post_feedforward_layernorm``). There ``blocks.{l}.hook_attn_out`` is the normed
  output while ``o_proj`` writes before the norm, so a residual-stream target cannot be
  used as the module's target as it is. The entry records the norms' module paths so
  the editor can aim at the module's own output space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = [
    "ARCHITECTURES",
    "HOOKS",
    "OPTIONAL_HOOKS",
    "ArchSpec",
    "LayerSpec",
    "UnknownArchitectureError",
    "arch_for",
    "hook",
    "layer_indices",
]

Module = Literal["mlp", "attn"]
MODULES: tuple[Module, ...] = ("mlp", "attn")

#: The package's one vocabulary of TransformerLens hook names (``{l}``: layer index).
HOOKS: dict[str, str] = {
    "embed": "hook_embed",
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_post": "blocks.{l}.hook_resid_post",
    "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "z": "blocks.{l}.attn.hook_z",
    "attn_key": "blocks.{l}.attn.o.hook_in",  # o_proj input, [batch, pos, head, d_head]
    "attn_value": "blocks.{l}.attn.o.hook_out",  # o_proj output, before any post-norm
    "mlp_key": "blocks.{l}.mlp.out.hook_in",  # down_proj input, [batch, pos, d_mlp]
    "mlp_value": "blocks.{l}.mlp.out.hook_out",  # down_proj output, before any post-norm
}

#: Hook names that not every bridge has; code that uses one looks it up in the bridge's
#: ``hook_dict`` first and takes a slower path where it is missing. The attention keys
#: (after the rotary embedding where the model has one, ``attn_rot_k``, else ``attn_k``)
#: and values are ``[batch, pos, kv_heads, d_head]``; the final norm's output is what
#: the unembedding reads.
OPTIONAL_HOOKS: dict[str, str] = {
    "attn_rot_k": "blocks.{l}.attn.hook_rot_k",
    "attn_k": "blocks.{l}.attn.hook_k",
    "attn_v": "blocks.{l}.attn.hook_v",
    "final_norm": "ln_final.hook_out",
}


def hook(name: str, layer: int | None = None) -> str:
    """The full hook name for ``name`` (a key of :data:`HOOKS` or :data:`OPTIONAL_HOOKS`)
    at ``layer``."""
    try:
        template = HOOKS[name] if name in HOOKS else OPTIONAL_HOOKS[name]
    except KeyError:
        known = sorted(HOOKS) + sorted(OPTIONAL_HOOKS)
        raise KeyError(f"unknown hook {name!r}; known: {known}") from None
    if "{l}" in template:
        if layer is None:
            raise ValueError(f"hook {name!r} needs a layer")
        return template.format(l=layer)
    return template


def layer_indices(layers, n_layers: int | None = None, *, name: str = "layers") -> tuple[int, ...]:
    """``layers`` (one index or an iterable of them) as a sorted tuple of distinct ints.

    Only integers are layer indices: a float such as ``1.7`` (or ``3.0``), a bool or a
    string raises rather than being truncated. With ``n_layers`` every index must lie in
    ``[0, n_layers)``. Raises ``ValueError`` naming the argument.
    """
    import operator

    if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
        items = [layers]  # one index (an int or a numpy integer); checked below
    else:
        items = list(layers)
    out = []
    for item in items:
        if isinstance(item, bool) or isinstance(item, float):
            raise ValueError(f"{name} must hold integer layer indices, got {item!r} in {layers!r}")
        try:
            out.append(operator.index(item))
        except TypeError:
            raise ValueError(f"{name} must hold integer layer indices, got {item!r} in {layers!r}") from None
    if not out:
        raise ValueError(f"{name} is empty; name at least one layer")
    bad = [l for l in out if l < 0 or (n_layers is not None and l >= n_layers)]
    if bad:
        where = f"[0, {n_layers - 1}]" if n_layers is not None else ">= 0"
        raise ValueError(f"{name}: layer {bad[0]} is outside the model; layers must be in {where}")
    return tuple(sorted(set(out)))


class UnknownArchitectureError(ValueError):
    """The model class has no entry in :data:`ARCHITECTURES`."""


@dataclass(frozen=True)
class LayerSpec:
    """One layer's editable matrices: module paths and the hooks that see them."""

    layer: int
    mlp_module: str
    attn_module: str
    mlp_key_hook: str
    mlp_value_hook: str
    attn_key_hook: str
    attn_value_hook: str
    mlp_out_hook: str
    attn_out_hook: str
    mlp_post_norm: str | None
    attn_post_norm: str | None

    def module(self, which: Module) -> str:
        return {"mlp": self.mlp_module, "attn": self.attn_module}[_check_module(which)]

    def key_hook(self, which: Module) -> str:
        return {"mlp": self.mlp_key_hook, "attn": self.attn_key_hook}[_check_module(which)]

    def value_hook(self, which: Module) -> str:
        return {"mlp": self.mlp_value_hook, "attn": self.attn_value_hook}[_check_module(which)]


def _check_module(which: str) -> Module:
    if which not in MODULES:
        raise ValueError(f"module must be one of {MODULES}, got {which!r}")
    return which  # type: ignore[return-value]


@dataclass(frozen=True)
class ArchSpec:
    """Where the editable matrices of one model family live.

    Module paths are templates with ``{l}`` for the layer index, relative to the
    Hugging Face ``*ForCausalLM`` model.
    """

    name: str
    hf_classes: tuple[str, ...]
    mlp_module: str
    attn_module: str
    weight_layout: Literal["out_in", "in_out"] = "out_in"
    mlp_post_norm: str | None = None
    attn_post_norm: str | None = None
    parallel_attn_mlp: bool = False
    n_layers_attr: str = "num_hidden_layers"

    @property
    def post_norms(self) -> bool:
        return self.mlp_post_norm is not None or self.attn_post_norm is not None

    def layer(self, layer: int) -> LayerSpec:
        def fill(template: str | None) -> str | None:
            return None if template is None else template.format(l=layer)

        return LayerSpec(
            layer=layer,
            mlp_module=fill(self.mlp_module),
            attn_module=fill(self.attn_module),
            mlp_key_hook=hook("mlp_key", layer),
            mlp_value_hook=hook("mlp_value", layer),
            attn_key_hook=hook("attn_key", layer),
            attn_value_hook=hook("attn_value", layer),
            mlp_out_hook=hook("mlp_out", layer),
            attn_out_hook=hook("attn_out", layer),
            mlp_post_norm=fill(self.mlp_post_norm),
            attn_post_norm=fill(self.attn_post_norm),
        )


_LLAMA_LIKE = dict(
    mlp_module="model.layers.{l}.mlp.down_proj",
    attn_module="model.layers.{l}.self_attn.o_proj",
)

ARCHITECTURES: dict[str, ArchSpec] = {
    spec.name: spec
    for spec in (
        ArchSpec("llama", ("LlamaForCausalLM",), **_LLAMA_LIKE),
        ArchSpec("mistral", ("MistralForCausalLM",), **_LLAMA_LIKE),
        ArchSpec("qwen2", ("Qwen2ForCausalLM",), **_LLAMA_LIKE),
        ArchSpec(
            "gemma3",
            ("Gemma3ForCausalLM",),
            **_LLAMA_LIKE,
            mlp_post_norm="model.layers.{l}.post_feedforward_layernorm",
            attn_post_norm="model.layers.{l}.post_attention_layernorm",
        ),
        ArchSpec(
            "gpt2",
            ("GPT2LMHeadModel",),
            mlp_module="transformer.h.{l}.mlp.c_proj",
            attn_module="transformer.h.{l}.attn.c_proj",
            weight_layout="in_out",
            n_layers_attr="n_layer",
        ),
        ArchSpec(
            "gptj",
            ("GPTJForCausalLM",),
            mlp_module="transformer.h.{l}.mlp.fc_out",
            attn_module="transformer.h.{l}.attn.out_proj",
            parallel_attn_mlp=True,
            n_layers_attr="n_layer",
        ),
    )
}


def arch_for(model_or_class: object) -> ArchSpec:
    """The :class:`ArchSpec` for a Hugging Face model, its class, or its class name."""
    if isinstance(model_or_class, str):
        class_name = model_or_class
    elif isinstance(model_or_class, type):
        class_name = model_or_class.__name__
    else:
        class_name = type(model_or_class).__name__
    for spec in ARCHITECTURES.values():
        if class_name in spec.hf_classes:
            return spec
    supported = sorted(c for spec in ARCHITECTURES.values() for c in spec.hf_classes)
    raise UnknownArchitectureError(
        f"model class {class_name!r} has no architecture entry; supported: {supported}. "
        "Add an ArchSpec to intattn_analysis.architectures.ARCHITECTURES with the module "
        "paths of its MLP down-projection and attention output projection."
    )
