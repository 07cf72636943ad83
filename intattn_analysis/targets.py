"""The edit target: MEMIT's ``compute_z``, batched over requests.

For each fact the editor needs a vector ``z*``: the residual stream at the subject's
last token, at the output of the last edited layer ``L`` (hook
``blocks.{L}.hook_resid_post``), such that the rest of the network, reading ``z*`` there,
predicts ``target_new``. It is found by gradient descent on a delta ``δ`` added to that
one state, ``z* = h + δ``, where ``h`` is the unedited state in the bare prompt.

The same ``δ`` must work under several short context prefixes (``"{}"`` and N sentences
the model itself writes greedily from fixed starts such as ``"The"`` or ``"Because"``),
so that the edit is not tied to the exact prompt. Keys read under these contexts are
averaged as MEMIT's ``compute_ks`` does (:func:`context_weights`). Each training row is one
``context + prompt`` followed by the first ``n-1`` tokens of ``" " + target_new``
(teacher forcing; the answer is tokenised with its leading space, as
:func:`intattn_analysis.predictions.first_answer_token` does). The loss of a fact is

    mean over its rows of the mean NLL of target_new's tokens
    + kl_factor * KL(p(. | "{subject} is a") with δ || without δ)   (subject's last token)
    + v_weight_decay * ||δ|| / ||h||²

and after every Adam step ``||δ||`` is clipped to ``clamp_norm_factor * ||h||``. The loss
is evaluated ``v_steps`` times; a fact stops as soon as its whole loss is below
``stop_loss``, and the last evaluation takes no step, so at most ``v_steps − 1`` updates
are made. All of this is the reference code's rule (kmeng01/memit ``compute_z.py``: KL at
the lookup index of the KL prompt, ``if loss < 5e-2: break``, no update at the last
iteration). Two of this module's earlier rules remain as named settings, to measure what
they change: ``kl_position="last"`` (the KL at the last token of "{subject} is a") and
``stop_on="nll"`` (stop on the NLL alone). Together with the earlier weight decay
(``||δ||²/||h||²``) and one more update, which are not kept, they made a shorter
optimisation than the reference rule (15.3 against 19.0 updates per fact on 24 held-out
facts) and a smaller ``δ`` (norm 84 against 94).

Departures from the reference code (kmeng01/memit ``compute_z.py``), on purpose:

* All facts are optimised together: every fact's rows go into one right-padded batch
  per step, each fact with its own ``δ``. Rows do not interact (causal attention; pads
  only follow real tokens) and the total loss is a sum of per-fact losses, so each ``δ``
  gets exactly the gradient it would get alone. A fact that meets the stop rule is
  frozen and its rows leave the batch (MEMIT stops each request on its own), so the
  batch shrinks as facts converge.
* Layers ``0..L`` do not depend on ``δ``: they run once, and every step starts at block
  ``L + 1`` from the stored residual stream.
* Positions before the subject's last token do not depend on ``δ`` either (attention is
  causal), in any layer. Their keys and values in blocks ``L + 1..`` are stored by the
  same first forward, and every step runs only each row's *suffix*: from the subject's
  last token to its last scored position (the KL row of "{subject} is a" is one token
  long). A forward takes rows of similar suffix lengths (:func:`length_groups`); each
  row reads the stored keys and values of its own earlier positions, left-padded to the
  longest prefix and masked, and its positions count on from where its prefix ends.
  ``suffix=False`` runs whole rows instead, the earlier path, kept to check this one
  against (and used where the bridge cannot resume with a key-value prefix).
* Context prefixes are greedy, one per start word (MEMIT samples with top-k 5), so they
  are deterministic and cached per model.
* Only the positions that are scored are unembedded (the final norm's output is cut to
  them), which saves most of a small model's compute.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .architectures import hook
from .facts import SUBJECT_SLOT, Fact
from .cache import CacheEntry, cache_entry, entry_fields, kind_folder
from .loading import ModelHandle
from .model_access import (
    FINAL_NORM_HOOK,
    initial_loss_scale,
    key_value_hooks,
    key_values,
    padded_prefix_kwargs,
    read_hooks,
    resume,
    resume_engine,
)

__all__ = [
    "CONTEXT_STARTS",
    "KL_PROMPT",
    "TARGET_SITES",
    "TargetSite",
    "ZTargets",
    "compute_z",
    "context_templates",
    "context_weights",
    "length_groups",
    "register_target_site",
    "target_key",
]

#: The words MEMIT starts its context prefixes from, then a few more for N > 5.
CONTEXT_STARTS: tuple[str, ...] = (
    "The", "Therefore", "Because", "I", "You", "It", "In", "We", "This", "A", "When", "She",
)
#: The prompt whose next-token distribution the KL term keeps (MEMIT's ``kl_prompts``).
KL_PROMPT = "{} is a"
#: Facts optimised together by :func:`compute_z` (a memory bound, see there).
DEFAULT_Z_BATCH = 16
#: Padded positions per forward when activations are read at the subject (memory and
#: speed only: every row's result is the same in any grouping, up to float rounding).
READ_MAX_TOKENS = 8192
#: Version of the cached context prefixes; bump it when their generation changes.
TEMPLATES_CACHE_FORMAT = 1
_TEMPLATES: dict[tuple[str, str, int, int], list[str]] = {}


# =========================================================================== contexts
def context_templates(model: ModelHandle, n: int = 5, length: int = 10) -> list[str]:
    """``["{}"]`` plus ``n`` prefixes ``"<greedy text>. {}"`` of about ``length`` tokens.

    Generated greedily from :data:`CONTEXT_STARTS` by the model as it is now, then cached
    in memory and on disk (``<cache root>/context_templates``, the layout of
    :mod:`intattn_analysis.cache`) under the model's ``state_id`` and dtype: an edited
    model writes its own prefixes. A sequence of edits that
    should keep the unedited model's prefixes passes them explicitly (as
    :func:`intattn_analysis.edit_sequence` does).
    """
    if not 0 <= n <= len(CONTEXT_STARTS):
        raise ValueError(
            f"n_context_templates must be in [0, {len(CONTEXT_STARTS)}] (one per start word "
            f"of CONTEXT_STARTS), got {n}"
        )
    key = (model.state_id, str(model.dtype), n, length)
    if key in _TEMPLATES:
        return list(_TEMPLATES[key])
    fields = {"format": TEMPLATES_CACHE_FORMAT, "starts": list(CONTEXT_STARTS[:n]), "length": length}
    entry = cache_entry(kind_folder("context_templates"), model, f"templates-n{n}-len{length}", fields,
                        what="context prefixes")

    def check(stored: dict) -> None:
        if not _valid_templates(stored["templates"], n):
            raise ValueError("not the bare prompt and prefixes")

    stored = entry.read_json(check)
    templates = None if stored is None else stored["templates"]
    if templates is None:
        from .known import greedy_continuation

        templates = [SUBJECT_SLOT]
        for start in CONTEXT_STARTS[:n]:
            text = start + greedy_continuation(model, start, max(length - 1, 1))
            text = " ".join(text.replace("{", " ").replace("}", " ").split())
            templates.append(text + ". " + SUBJECT_SLOT)
        _write_entry(entry, {"templates": templates})
    _TEMPLATES[key] = list(templates)
    return list(templates)


def _valid_templates(templates: Any, n: int) -> bool:
    """``["{}", "<text>. {}", ...]``: the bare prompt and ``n`` prefixes, strings all."""
    return (
        isinstance(templates, list) and len(templates) == n + 1
        and all(isinstance(t, str) for t in templates)
        and templates[0] == SUBJECT_SLOT
        and all(t.endswith(". " + SUBJECT_SLOT) and t.count(SUBJECT_SLOT) == 1 for t in templates[1:])
    )


def context_weights(templates: Sequence[str]) -> list[float]:
    """The weight of each context in a key average, as MEMIT's ``compute_ks`` gives it.

    MEMIT groups its contexts by type (the bare prompt ``"{}"``; the generated prefixes of
    one length), averages the keys within each type and then over the types. With the
    bare prompt and five prefixes the bare prompt weighs 1/2 and each prefix 1/10, not
    1/6 each. Without prefixes the bare prompt weighs 1.
    """
    templates = list(templates)
    if not templates:
        raise ValueError("templates is empty; the bare prompt '{}' at least is needed")
    groups = [
        [i for i, t in enumerate(templates) if t == SUBJECT_SLOT],
        [i for i, t in enumerate(templates) if t != SUBJECT_SLOT],
    ]
    groups = [g for g in groups if g]
    weights = [0.0] * len(templates)
    for group in groups:
        for i in group:
            weights[i] = 1.0 / (len(groups) * len(group))
    return weights


def _write_entry(entry: CacheEntry, payload: dict) -> None:
    try:
        entry.write_json(payload)
    except OSError:  # a read-only cache only costs a regeneration next time
        pass


# =========================================================================== rows
@dataclass(frozen=True)
class Row:
    """One sequence of a batch: its fact, token ids, and the subject's last position."""

    fact_index: int
    ids: tuple[int, ...]
    subject_last: int
    scored: tuple[int, ...] = ()  # positions whose logits are scored
    answers: tuple[int, ...] = ()  # the token each scored position must predict
    kind: str = "prompt"  # "prompt" (context + prompt [+ answer]) or "kl"


def subject_last(model: ModelHandle, fact: Fact, template: str = SUBJECT_SLOT) -> tuple[list[int], int]:
    """Token ids of ``template`` filled with the fact's prompt, and the position of the
    subject's last token (see :func:`intattn_analysis.tracing.subject_span`)."""
    from .tracing import subject_span

    prompt = template.replace(SUBJECT_SLOT, fact.prompt)
    probe = Fact(subject=fact.subject, prompt=prompt, target_true=None, target_new=fact.target_new)
    try:
        _, end = subject_span(model, probe)
    except ValueError as error:
        raise ValueError(
            f"fact {fact.key} ({fact.text!r}): the subject {fact.subject!r} covers no token "
            f"of the prompt {probe.text!r}; spell the subject exactly as it appears in the prompt"
        ) from error
    return model.tokenize(probe.text)[0], end - 1


def answer_ids(model: ModelHandle, answer: str) -> list[int]:
    """Tokens of ``" " + answer`` as they follow a prompt (no special tokens)."""
    ids = model.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"answer {answer!r} tokenises to nothing")
    return list(ids)


def prompt_rows(model: ModelHandle, facts: Sequence[Fact], templates: Sequence[str]) -> list[Row]:
    """``len(facts) * len(templates)`` rows, fact-major: each fact in each context."""
    rows = []
    for i, fact in enumerate(facts):
        for template in templates:
            ids, last = subject_last(model, fact, template)
            rows.append(Row(i, tuple(ids), last))
    return rows


def _training_rows(
    model: ModelHandle, facts: Sequence[Fact], templates: Sequence[str],
    kl_position: str = "subject_last",
) -> list[Row]:
    rows = []
    for i, fact in enumerate(facts):
        target = answer_ids(model, fact.target_new)
        for template in templates:
            ids, last = subject_last(model, fact, template)
            n = len(ids)
            rows.append(Row(
                i, tuple(ids + target[:-1]), last,
                scored=tuple(range(n - 1, n - 1 + len(target))), answers=tuple(target),
            ))
    for i, fact in enumerate(facts):
        kl_fact = Fact(subject=fact.subject, prompt=KL_PROMPT, target_true=None, target_new=fact.target_new)
        ids, last = subject_last(model, kl_fact)
        at = last if kl_position == "subject_last" else len(ids) - 1
        rows.append(Row(i, tuple(ids), last, scored=(at,), kind="kl"))
    return rows


def pad_rows(model: ModelHandle, rows: Sequence[Row]) -> Tensor:
    """Right-padded ``[rows, max_len]`` token ids.

    Right padding needs no attention mask: with causal attention a real token never sees
    the pads that follow it, and positions stay ``0..n-1``.
    """
    pad = model.tokenizer.pad_token_id
    if pad is None:
        pad = model.tokenizer.eos_token_id or 0
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    for j, row in enumerate(rows):
        ids[j, : len(row.ids)] = torch.tensor(row.ids)
    return ids.to(model.device)


def read_at_subject(
    model: ModelHandle, rows: Sequence[Row], names: Sequence[str],
    max_tokens: int = READ_MAX_TOKENS,
) -> dict[str, Tensor]:
    """The activations ``names`` at each row's subject-last position, ``[rows, d]``.

    Each row runs only up to its subject's last token (a causal model's activations
    there do not depend on the tokens after it), and the rows run shortest first in
    forwards of at most ``max_tokens`` padded positions cut by :func:`length_groups`,
    each stopped as soon as every hook has fired; the result is in the order of ``rows``. One padded forward of every
    row would cost rows times the *longest* row: for a batch of 500 facts in six
    contexts that was 23 times the time of these forwards, memory traffic included.
    Head-split activations (``attn.o.hook_in``: ``[batch, pos, head, d_head]``) are
    flattened to the concatenated-heads vector that ``o_proj`` reads.
    """
    if not rows:
        raise ValueError("rows is empty; pass at least one Row")
    cut = [Row(r.fact_index, r.ids[: r.subject_last + 1], r.subject_last) for r in rows]
    groups = length_groups([len(r.ids) for r in cut], max_positions=max_tokens)
    parts = []
    for group in groups:
        ids = pad_rows(model, [cut[j] for j in group])
        index = torch.arange(len(group), device=ids.device)
        positions = torch.tensor([cut[j].subject_last for j in group], device=ids.device)
        parts.append(read_hooks(model, ids, names, lambda x: x[index, positions].flatten(1)))
    order = [j for group in groups for j in group]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return {name: torch.cat([part[name] for part in parts])[inverse.to(parts[0][name].device)]
            for name in parts[0]}


# =========================================================================== cache
#: Version of the cached target files; bump it when the optimisation changes.
TARGETS_CACHE_FORMAT = 2


@dataclass(frozen=True)
class TargetSite:
    """Where a target is set, as :func:`compute_z` reads it.

    Attributes:
        name: the site's name (``compute_z(site=name)``, ``Editor.targets``).
        deltas: one ``(read, inject)`` pair per optimised delta, the target's own first:
            ``read`` is the hook kind (:data:`intattn_analysis.architectures.HOOKS`) whose
            output at the subject's last token is the delta's ``h`` (``None``: the
            residual stream after the layer), ``inject`` the hook kind of the layer where
            the delta is added (``None``: added to the residual stream after the layer).
            A site that injects inside the layer starts its steps at the layer itself.
        learned: ``hparams -> flags``: which deltas are optimised (default: all); the
            others stay zero.
        cached: whether targets at this site may be cached on disk (per fact).
        shared: whether they are computed once for a batch before anything is written,
            so that the methods compared on a batch can share them
            (:func:`intattn_analysis.editors.api.batch_targets`); a site whose targets
            are set fact after fact on the model as the earlier facts left it (ROME's) is
            not.
    """

    name: str
    deltas: tuple[tuple[str | None, str | None], ...]
    learned: Any = None
    cached: bool = True
    shared: bool = False

    @property
    def inside(self) -> bool:
        """Whether a delta is injected inside the layer (its steps start at the layer)."""
        return any(inject is not None for _, inject in self.deltas)


#: What a target can be set for, by name (see :func:`compute_z`, :func:`register_target_site`).
TARGET_SITES: dict[str, TargetSite] = {}


def register_target_site(site: TargetSite) -> TargetSite:
    """Declare a site :func:`compute_z` can set targets for (a second site of one name
    is an error)."""
    if site.name in TARGET_SITES and TARGET_SITES[site.name] != site:
        raise ValueError(f"a target site named {site.name!r} is already registered")
    TARGET_SITES[site.name] = site
    return site


#: MEMIT's ``z*``: the residual stream after the layer (shared by the closed-form family).
RESIDUAL = register_target_site(TargetSite("residual", ((None, None),), shared=True))
#: ROME's ``v*``: the MLP output of the layer, its delta added to the residual stream.
MLP_OUTPUT = register_target_site(TargetSite("mlp_output", (("mlp_out", None),)))
#: ROME's ``v*`` on post-norm models: the down-projection's output before the MLP's norm.
MLP_VALUE = register_target_site(TargetSite("mlp_value", (("mlp_value", "mlp_value"),)))
#: The hyperparameters a target depends on (the solve's settings do not enter).
TARGET_FIELDS = ("v_lr", "v_steps", "v_weight_decay", "clamp_norm_factor", "kl_factor", "stop_loss",
                 "stop_on", "kl_position")


def target_key(model: ModelHandle, fact: Fact, hparams, layer: int, templates: Sequence[str],
               site: str = "residual") -> dict:
    """Everything one fact's ``z*`` depends on: the model's weights (its ``state_id``,
    which names the edits applied to it, and dtype), the fact's content, the layer and
    site, the context prefixes, the KL prompt and the target hyperparameters; the fields
    of the fact's cache entry (:mod:`intattn_analysis.cache`)."""
    return entry_fields(model, _target_fields(fact, hparams, layer, templates, site))


def _target_fields(fact: Fact, hparams, layer: int, templates: Sequence[str], site: str) -> dict:
    return {
        "format": TARGETS_CACHE_FORMAT,
        "fact": fact.key,
        "subject": fact.subject,
        "prompt": fact.prompt,
        "target_new": fact.target_new,
        "layer": int(layer),
        "site": site,
        "templates": list(templates),
        "kl_prompt": KL_PROMPT,
        **{name: getattr(hparams, name) for name in TARGET_FIELDS},
    }


def _target_entry(cache_dir: Path, model: ModelHandle, fact: Fact, hparams, layer: int,
                  templates: Sequence[str], site: str) -> CacheEntry:
    """Where one fact's target is cached: under the model's :attr:`~ModelHandle.cache_folder`
    (the weights file, edited or not: the key tells edited states apart)."""
    fields = _target_fields(fact, hparams, layer, templates, site)
    return cache_entry(cache_dir, model, f"z-layer{int(layer)}-{fact.key}", fields, what="target")


def _state_of(model: ModelHandle) -> str:
    """The model's ``state_id``, or ``""`` while an edit is being written (targets a method
    computes for itself in the middle of its edit, as ROME does fact after fact, are its
    own and never shared)."""
    try:
        return model.state_id
    except RuntimeError:
        return ""


def target_settings(hparams) -> dict:
    """The hyperparameters a target depends on (:data:`TARGET_FIELDS`, and PMET's
    ``attn_targets`` where the hparams have it)."""
    out = {name: getattr(hparams, name) for name in TARGET_FIELDS}
    if hasattr(hparams, "attn_targets"):
        out["attn_targets"] = hparams.attn_targets
    return out


def _read_target(entry: CacheEntry, d_model: int) -> dict | None:
    """One fact's cached target, or ``None``: no entry, or an entry that cannot be read, is
    another key's or holds something else than a target (``[]``, ``null``, vectors of the
    wrong length or with non-finite entries), which is reported with a warning; the caller
    recomputes and replaces it."""

    def check(stored: dict) -> None:
        for name in ("z", "h", "delta"):
            vector = stored[name]
            if not (isinstance(vector, list) and len(vector) == d_model
                    and all(isinstance(v, (int, float)) and math.isfinite(v) for v in vector)):
                raise ValueError(f"{name!r} is not {d_model} finite numbers")
        if not isinstance(stored["diagnostics"], dict):
            raise ValueError("'diagnostics' is not an object")

    return entry.read_json(check)


def _cached_z(model, facts, hparams, layer, templates, batch_size, progress, cache_dir,
              suffix=True, site="residual") -> "ZTargets":
    """:func:`compute_z` through the per-fact cache (``layer`` and ``templates`` resolved)."""
    start_time = time.perf_counter()
    entries = [_target_entry(cache_dir, model, fact, hparams, layer, templates, site) for fact in facts]
    found: dict[int, dict] = {}
    for i, entry in enumerate(entries):
        stored = _read_target(entry, model.d_model)
        if stored is not None:
            found[i] = stored
    missing = [i for i in range(len(facts)) if i not in found]
    # one batch at a time, each written as soon as it is done: an interrupted run keeps
    # every finished batch
    chunks = [missing[k : k + batch_size] for k in range(0, len(missing), batch_size)]
    work: dict = {}
    for chunk in tqdm(chunks, desc="z* batches", disable=not progress or len(chunks) < 2):
        fresh = compute_z(model, [facts[i] for i in chunk], hparams, layer=layer,
                          templates=templates, batch_size=batch_size, progress=progress,
                          suffix=suffix, site=site)
        for name, value in fresh.work.items():
            work[name] = work.get(name, 0) + value
        for j, i in enumerate(chunk):
            found[i] = {
                "z": fresh.z[j].tolist(), "h": fresh.h[j].tolist(), "delta": fresh.delta[j].tolist(),
                "diagnostics": fresh.diagnostics[j],
            }
            _write_entry(entries[i], found[i])

    def stack(name: str) -> Tensor:
        return torch.tensor([found[i][name] for i in range(len(facts))], dtype=torch.float32,
                            device=model.device)

    return ZTargets(
        z=stack("z"), h=stack("h"), delta=stack("delta"), layer=layer,
        context_templates=templates,
        diagnostics=[found[i]["diagnostics"] for i in range(len(facts))],
        seconds=time.perf_counter() - start_time,
        work=work,
        site=site,
        model_state=_state_of(model),
        settings=target_settings(hparams),
    )


# =========================================================================== targets
@dataclass
class ZTargets:
    """The result of :func:`compute_z`.

    Attributes:
        z: ``[facts, d_model]`` target residual states ``h + δ`` (float32).
        h: the unedited states at the subject's last token of the bare prompt.
        delta: the optimised ``δ``.
        layer: the layer at whose output the target is set.
        context_templates: the prefixes used (``"{}"`` first).
        diagnostics: one dict per fact: initial/final loss and NLL, geometric-mean
            probability of target_new's tokens before and after (over the contexts),
            ``||δ||``, ``||h||``, steps run.
        seconds: wall time.
        work: what the optimisation ran: ``forwards`` (one per group of rows per
            evaluation), ``positions`` (row-positions run, padding included) and
            ``needed_positions`` (the suffix positions that had to run); empty for
            targets read from the cache.
        site: what the target is set for (see :func:`compute_z`): ``z`` is the residual
            state (``"residual"``), the MLP output (``"mlp_output"``, ``"pmet"``) or the
            down-projection's output before the MLP's post-norm (``"mlp_value"``).
        attn_h, attn_delta: PMET's attention output at the subject and its optimised
            delta (``site="pmet"`` only).
        model_state: the ``state_id`` of the model they were computed on.
        settings: the target hyperparameters they were computed with
            (:func:`target_settings`).
    """

    z: Tensor
    h: Tensor
    delta: Tensor
    layer: int
    context_templates: list[str]
    diagnostics: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    work: dict = field(default_factory=dict)
    site: str = "residual"
    attn_h: Tensor | None = None
    attn_delta: Tensor | None = None
    model_state: str = ""
    settings: dict = field(default_factory=dict)


#: A forward's fixed cost, in row-positions, when :func:`length_groups` weighs a cut
#: (the per-forward overhead of the bridge's Python hooks on a small model on CPU).
GROUP_OVERHEAD_POSITIONS = 64


def length_groups(lengths: Sequence[int], overhead: int | None = None,
                  max_positions: int | None = None) -> list[list[int]]:
    """Rows cut into forwards, each forward a list of row indices.

    Row ``i`` runs ``lengths[i]`` positions; a forward pads every member to its longest,
    so it costs ``members × longest`` row-positions plus ``overhead``. Rows are sorted by
    length and cut where the total cost is least (a dynamic programme, quadratic in the
    number of rows, which is a few hundred at most). One forward per row pads nothing
    but pays the overhead each time; one forward for all pads the one-token KL rows to
    the longest prompt row. ``overhead`` defaults to :data:`GROUP_OVERHEAD_POSITIONS`.
    ``max_positions`` bounds a forward's padded size (``members × longest``, a memory
    bound; a row longer than it runs alone); it also bounds the programme's work to
    about ``rows × max_positions / shortest`` steps.
    """
    if any(n < 1 for n in lengths):
        raise ValueError(f"every row needs at least one position, got lengths {list(lengths)}")
    overhead = GROUP_OVERHEAD_POSITIONS if overhead is None else overhead
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    n = len(order)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        longest = lengths[order[end - 1]]
        members = end if max_positions is None else max(1, max_positions // longest)
        for first in range(max(0, end - members), end):
            cost = best[first] + (end - first) * longest + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, first
    groups, end = [], n
    while end > 0:
        groups.append(order[cut[end]:end])
        end = cut[end]
    return groups[::-1]


def _suffix_engine(model: ModelHandle, ids: Tensor):
    """The resume engine of ``model`` (:func:`~intattn_analysis.model_access.resume_engine`)
    if it can resume a forward with a key-value prefix (checked once per model against a
    full forward), else ``None``."""
    engine = resume_engine(model, ids[:1])
    return engine if engine.prefix_cache else None


def _resid_after(model: ModelHandle, ids: Tensor, layer: int) -> Tensor:
    """The residual stream at the output of ``layer`` for every row (one forward that
    stops there)."""
    name = hook("resid_post", layer)
    return read_hooks(model, ids, [name])[name]


def _resid_and_kv(
    model: ModelHandle, ids: Tensor, layer: int
) -> tuple[Tensor, list[tuple[Tensor, Tensor]]]:
    """The residual stream at the output of ``layer`` and the attention keys and values
    ``[rows, pos, kv_heads, d_head]`` of blocks ``layer + 1 ..``, the ones a resumed
    forward reads (one forward, stopped after the last of them)."""
    above = range(layer + 1, model.n_layers)
    resid = hook("resid_post", layer)
    names = [resid, *key_value_hooks(model, above)]
    out = read_hooks(model, ids, names)
    kv = key_values(model, out, above)
    return out[resid], kv


def _losses(
    logits: Tensor,  # [entries, vocab]: each row's scored positions, row after row
    rows: Sequence[Row],
    row_fact: Tensor,
    n_facts: int,
    kl_init: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-fact mean NLL, per-fact KL, and the KL rows' log-probabilities."""
    device = logits.device
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    counts = torch.tensor([len(r.scored) for r in rows], device=device)
    owner = torch.repeat_interleave(torch.arange(len(rows), device=device), counts)
    answers = torch.tensor(
        [a for r in rows for a in (r.answers if r.kind == "prompt" else (0,) * len(r.scored))],
        device=device,
    )
    is_prompt = torch.tensor([r.kind == "prompt" for r in rows], device=device)
    token_lp = log_probs.gather(-1, answers[:, None])[:, 0] * is_prompt[owner]
    row_nll = -torch.zeros(len(rows), device=device).index_add(0, owner, token_lp) / counts
    facts_of = row_fact[is_prompt]
    nll = torch.zeros(n_facts, device=device).index_add(0, facts_of, row_nll[is_prompt])
    nll = nll / torch.bincount(facts_of, minlength=n_facts).clamp(min=1)
    kl_entries = torch.cumsum(counts, 0)[~is_prompt] - 1  # one scored position per KL row
    kl_lp = log_probs[kl_entries]  # [facts, vocab], KL rows are in fact order
    if kl_init is None:
        kl = torch.zeros(n_facts, device=device)
    else:
        kl = (kl_lp.exp() * (kl_lp - kl_init)).sum(-1)
    return nll, kl, kl_lp


def _decay(delta: Tensor, h: Tensor) -> Tensor:
    """MEMIT's weight decay per fact, ``||δ|| / ||h||²`` (not squared in ``δ``)."""
    return delta.norm(dim=-1) / (h ** 2).sum(-1)


def compute_z(
    model: ModelHandle,
    facts: Sequence[Fact],
    hparams,
    *,
    layer: int | None = None,
    templates: Sequence[str] | None = None,
    batch_size: int = DEFAULT_Z_BATCH,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    suffix: bool = True,
    site: str = "residual",
) -> ZTargets:
    """Target residual states ``z*`` for ``facts`` at the output of ``layer`` (default:
    the last of ``hparams.layers``); see the module notes for the loss and the batching.

    ``batch_size`` facts are optimised together (each with ``1 + n_context_templates``
    rows plus a KL row); larger batches hold more activations for the backward pass
    (about 25 MB per whole row on SmolLM2-135M, a third of that for a suffix) and, on 2
    CPU cores, run no faster per fact beyond 16 (measured: 16 and 32 alike). A fact's
    ``z*`` does not depend on which facts share its batch, so ``batch_size`` changes
    memory and speed only, not the result (up to float rounding: batches are padded to
    different widths).

    With ``cache_dir`` each fact's target is read from, or written to, one file there,
    under a key of everything it depends on (:func:`target_key`): a later run on the
    same fact, in any batch, reuses it. Files are written after each batch of
    ``batch_size`` facts, so an interrupted call loses at most the batch it was in.
    ``seconds`` then counts only the facts computed. The key names the
    model's weights by their ``state_id``, so an edited model has targets of its own.

    ``site`` names the vector the target is set for. ``"residual"`` (MEMIT's ``z*``):
    the residual stream at the output of ``layer``; ``h`` is that state. ``"mlp_output"``
    (ROME's ``v*``): the MLP output of ``layer``; ``h`` is that output, so the clamp and
    the weight decay are relative to its norm, as ROME's ``compute_v`` has them, and
    ``z = h + δ`` is the output the MLP must give. The optimisation is the same: the MLP
    output joins the residual stream by addition, so ``δ`` is added to the residual
    after ``layer`` in both cases (on post-norm models the MLP's own output is before its
    norm, and the editor converts the residual change; see
    :func:`intattn_analysis.editors.keys.module_space`).

    ``"mlp_value"`` (ROME's ``v*`` on post-norm models such as Gemma 2/3): the output of
    the MLP's down-projection at ``layer``, *before* the norm that follows it (hook
    ``mlp_value``); ``h`` is that output and ``δ`` is added to it at the subject's last
    token, so the forward applies the norm to ``h + δ``. Every target found there is one
    a change of the down-projection can write exactly, where a residual change (what
    ``"mlp_output"`` finds) may lie off the shell of outputs the norm can give. On models
    without a post-norm the two sites name the same vector. Its steps start at ``layer``
    itself, which must therefore be at least 1.

    Other sites are declared where the method that reads them lives
    (:func:`register_target_site`): ``"pmet"``, PMET's two deltas at the attention and
    MLP outputs of ``layer``, is declared in :mod:`intattn_analysis.editors.methods.pmet`.
    Every delta of a site is clamped and decayed relative to its own ``h``; ``z`` is the
    first delta's target, and a second delta's ``h`` and ``δ`` are ``attn_h`` and
    ``attn_delta``.

    ``suffix`` (default) runs each step only on the positions from the subject's last
    token on, reading the earlier positions' stored keys and values; ``False`` runs whole
    rows. Both give the same ``z*`` up to float rounding (the tests hold them to a cosine
    of 0.9999); where the bridge cannot resume a forward with a key-value prefix, whole
    rows are run anyway.
    """
    start_time = time.perf_counter()
    spec, facts, layer = _check_z_request(model, facts, hparams, layer, batch_size, site, cache_dir)
    if templates is None:
        templates = context_templates(model, hparams.n_context_templates, hparams.context_template_length)
    templates = list(templates)
    if cache_dir is not None:
        return _cached_z(model, facts, hparams, layer, templates, batch_size, progress, Path(cache_dir), suffix,
                         site)
    if len(facts) > batch_size:
        return _z_in_batches(model, facts, hparams, layer, templates, batch_size, progress, suffix, site,
                             start_time)
    problem = _target_problem(model, facts, hparams, layer, templates, spec, suffix)
    deltas, learned = _new_deltas(problem, spec, hparams)
    run = _optimise(problem, hparams, deltas, learned, progress)
    deltas = [d.detach() for d in deltas]
    h, delta = problem.h[0], deltas[0]
    second = len(deltas) > 1
    return ZTargets(
        z=(h + delta).detach(),
        h=h,
        delta=delta,
        layer=layer,
        context_templates=templates,
        diagnostics=_diagnostics(facts, problem, deltas, run),
        seconds=time.perf_counter() - start_time,
        work=problem.work,
        site=site,
        attn_h=problem.h[1] if second else None,
        attn_delta=deltas[1] if second else None,
        model_state=_state_of(model),
        settings=target_settings(hparams),
    )


def _check_z_request(model, facts, hparams, layer, batch_size, site, cache_dir) -> tuple["TargetSite", list, int]:
    """The site's declaration, the facts as a list and the layer, once the request is
    checked (clear errors for a bad batch size, site, cache request, empty batch, a layer
    the model lacks or one the site cannot start at)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if site not in TARGET_SITES:
        raise ValueError(f"site must be one of {tuple(TARGET_SITES)}, got {site!r}")
    spec = TARGET_SITES[site]
    if not spec.cached and cache_dir is not None:
        raise ValueError(f"targets at site {site!r} are not cached; pass cache_dir=None")
    facts = list(facts)
    if not facts:
        raise ValueError("facts is empty; pass at least one Fact")
    layer = max(hparams.layers) if layer is None else int(layer)
    if not 0 <= layer < model.n_layers:
        raise ValueError(f"layer {layer} is outside the model's layers 0..{model.n_layers - 1}; "
                         "give hparams whose layers the model has")
    if spec.inside and layer < 1:
        raise ValueError(f"targets at site {site!r} start their steps at the layer itself, from the "
                         "residual stream before it: the layer must be at least 1")
    return spec, facts, layer


def _z_in_batches(model, facts, hparams, layer, templates, batch_size, progress, suffix, site,
                  start_time) -> ZTargets:
    """:func:`compute_z` of ``batch_size`` facts at a time, the parts joined in order."""
    chunks = [facts[i : i + batch_size] for i in range(0, len(facts), batch_size)]
    parts = [
        compute_z(model, chunk, hparams, layer=layer, templates=templates,
                  batch_size=batch_size, progress=progress, suffix=suffix, site=site)
        for chunk in tqdm(chunks, desc="z* batches", disable=not progress or len(chunks) < 2)
    ]
    second = parts[0].attn_h is not None
    return ZTargets(
        z=torch.cat([p.z for p in parts]),
        h=torch.cat([p.h for p in parts]),
        delta=torch.cat([p.delta for p in parts]),
        layer=layer,
        context_templates=templates,
        diagnostics=[d for p in parts for d in p.diagnostics],
        seconds=time.perf_counter() - start_time,
        work={k: sum(p.work.get(k, 0) for p in parts) for k in parts[0].work},
        site=site,
        attn_h=torch.cat([p.attn_h for p in parts]) if second else None,
        attn_delta=torch.cat([p.attn_delta for p in parts]) if second else None,
        model_state=_state_of(model),
        settings=target_settings(hparams),
    )


@dataclass
class _TargetProblem:
    """What every step of one batch's optimisation reads: the training rows, the stored
    residual stream (and keys and values) at the layer the steps start after, each row's
    positions to run, and each delta's ``h``; ``work`` counts what the steps ran."""

    model: ModelHandle
    spec: "TargetSite"
    layer: int
    read_layer: int  # the steps start at block read_layer + 1
    rows: list
    subject_pos: Tensor
    row_fact: Tensor
    resid: Tensor
    kv: Any
    engine: Any
    starts: list[int]
    ends: list[int]
    h: list  # per delta: its module's output at the subject (or the residual state)
    cut: bool  # the final norm's output can be cut to the scored positions
    kl_init: Tensor | None = None
    work: dict = field(default_factory=lambda: {"forwards": 0, "positions": 0, "needed_positions": 0})

    @property
    def n_facts(self) -> int:
        return len(self.h[0])


def _target_problem(model, facts, hparams, layer, templates, spec, suffix) -> _TargetProblem:
    """The rows of the batch and everything that does not depend on the deltas.

    Layers below the steps do not depend on the deltas: they run once, keeping the
    residual stream at the output of ``read_layer`` for every row (and, for the suffix
    path, the keys and values of the blocks above), and every step starts at block
    ``read_layer + 1``. A site that injects inside the layer starts its steps at the layer
    itself, from the residual stream before it."""
    rows = _training_rows(model, facts, templates, hparams.kl_position)
    ids = pad_rows(model, rows)
    device = ids.device
    subject_pos = torch.tensor([r.subject_last for r in rows], device=device)
    row_fact = torch.tensor([r.fact_index for r in rows], device=device)
    if SUBJECT_SLOT not in templates:
        raise ValueError(f"templates must include the bare prompt '{{}}', got {templates}")
    bare = templates.index(SUBJECT_SLOT)  # h is read in the bare prompt, as MEMIT does
    bare_rows = torch.tensor([i * len(templates) + bare for i in range(len(facts))], device=device)
    read_layer = layer - 1 if spec.inside else layer
    engine = _suffix_engine(model, ids) if suffix else None
    if engine is not None:
        resid, kv = _resid_and_kv(model, ids, read_layer)
    else:
        resid, kv = _resid_after(model, ids, read_layer), None
    h = [resid[bare_rows, subject_pos[bare_rows]].float().clone()]
    read = [kind for kind, _ in spec.deltas if kind is not None]
    if read:  # the module outputs at the subject (ROME's target_init)
        outputs = read_at_subject(model, [rows[int(j)] for j in bare_rows], [hook(k, layer) for k in read])
        h = [outputs[hook(kind, layer)].float().clone() if kind is not None else h[0] for kind, _ in spec.deltas]
    # each row runs from the subject's last token (the whole row without the suffix
    # path) to its last scored position
    return _TargetProblem(
        model=model, spec=spec, layer=layer, read_layer=read_layer, rows=rows, subject_pos=subject_pos,
        row_fact=row_fact, resid=resid, kv=kv, engine=engine,
        starts=[r.subject_last if engine is not None else 0 for r in rows],
        ends=[max(r.scored) + 1 for r in rows], h=h, cut=FINAL_NORM_HOOK in model.bridge.hook_dict,
    )


def _new_deltas(problem: _TargetProblem, spec: "TargetSite", hparams) -> tuple[list[Tensor], list[Tensor]]:
    """The site's deltas, zero, and those of them that are optimised (a site may leave
    one at zero, as PMET without attention targets does)."""
    flags = spec.learned(hparams) if spec.learned is not None else (True,) * len(spec.deltas)
    device = problem.resid.device
    deltas = [torch.zeros(problem.n_facts, problem.model.d_model, device=device, dtype=torch.float32,
                          requires_grad=bool(flag)) for flag in flags]
    return deltas, [d for d in deltas if d.requires_grad]


def _group_logits(problem: _TargetProblem, deltas: Sequence[Tensor], members: list[int]) -> Tensor:
    """Logits ``[entries, vocab]`` at the scored positions of rows ``members`` (one
    forward), with each row's fact deltas added at its subject position.

    Each row runs its own positions ``starts .. ends``: the suffixes are right-padded to
    the longest, and the stored keys and values of each row's earlier positions are
    left-padded to the longest prefix, the pads masked out of attention."""
    p, model, rows = problem, problem.model, problem.rows
    device = p.resid.device
    index = torch.tensor(members, device=device)
    first = torch.tensor([p.starts[j] for j in members], device=device)
    lengths = torch.tensor([p.ends[j] - p.starts[j] for j in members], device=device)
    t0, w = int(first.max()), int(lengths.max())
    take = (first[:, None] + torch.arange(w, device=device)).clamp(max=p.resid.shape[1] - 1)
    x = p.resid[index[:, None], take]
    local = torch.arange(len(members), device=device)
    at = p.subject_pos[index] - first

    def injection(d: Tensor):
        def inject(y: Tensor, hook=None) -> Tensor:
            add = torch.zeros_like(y)
            add[local, at] = d[p.row_fact[index]].to(y.dtype)
            return y + add
        return inject

    hooks = []
    for (_, at_hook), d in zip(p.spec.deltas, deltas):
        if at_hook is None:  # added to the residual stream after the layer
            x = injection(d)(x)
        else:
            hooks.append((hook(at_hook, p.layer), injection(d)))
    entry_row = torch.tensor([k for k, j in enumerate(members) for _ in rows[j].scored], device=device)
    entry_pos = torch.tensor([q - p.starts[j] for j in members for q in rows[j].scored], device=device)

    def keep_scored(y: Tensor, hook=None) -> Tensor:
        return y[entry_row, entry_pos][None]

    prefix = None
    if t0 > 0 and p.read_layer + 1 < model.n_layers:
        prefix = padded_prefix_kwargs(model, p.engine, p.kv, index, first, lengths, t0, w)
    if p.cut:
        logits = resume(model, x, p.read_layer + 1, hooks + [(FINAL_NORM_HOOK, keep_scored)], prefix)[0]
    else:
        logits = resume(model, x, p.read_layer + 1, hooks, prefix)[entry_row, entry_pos]
    p.work["forwards"] += 1
    p.work["positions"] += len(members) * w
    p.work["needed_positions"] += int(lengths.sum())
    return logits


def _batch_losses(problem: _TargetProblem, deltas: Sequence[Tensor], active: list[int]
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """NLL and KL of the facts ``active`` (in that order), and their KL log-probs. Rows
    of similar lengths share a forward (:func:`length_groups`)."""
    p = problem
    wanted = set(active)
    chosen = [j for j, r in enumerate(p.rows) if r.fact_index in wanted]
    groups = length_groups([p.ends[j] - p.starts[j] for j in chosen])
    parts = {}
    for group in groups:
        logits = _group_logits(p, deltas, [chosen[k] for k in group])
        sizes = [len(p.rows[chosen[k]].scored) for k in group]
        parts.update(zip(group, torch.split(logits, sizes)))
    logits = torch.cat([parts[k] for k in range(len(chosen))])
    local_fact = {f: i for i, f in enumerate(active)}
    sub_rows = [p.rows[j] for j in chosen]
    sub_fact = torch.tensor([local_fact[r.fact_index] for r in sub_rows], device=p.resid.device)
    init = None if p.kl_init is None else p.kl_init[active]
    return _losses(logits, sub_rows, sub_fact, len(active), init)


def _site_decay(problem: _TargetProblem, deltas: Sequence[Tensor], facts=slice(None)) -> Tensor:
    """The weight decay of every delta of the site, each relative to its own ``h``."""
    decay = _decay(deltas[0][facts], problem.h[0][facts])
    for d, h in zip(deltas[1:], problem.h[1:]):
        decay = decay + _decay(d[facts], h[facts])
    return decay


@dataclass
class _Optimisation:
    """Each fact's loss and NLL at its first and last evaluation, and its steps taken."""

    loss_first: Tensor
    nll_first: Tensor
    loss_final: Tensor
    nll_final: Tensor
    steps: list[int]


def _optimise(problem: _TargetProblem, hparams, deltas: list[Tensor], learned: list[Tensor],
              progress: bool) -> _Optimisation:
    """Adam on the learned deltas, MEMIT's stop rule per fact.

    Each fact stops on its own once its loss is below ``stop_loss`` (MEMIT's per-request
    rule): its deltas are frozen and its rows leave the batch, so the result for a fact
    does not depend on which other facts share the batch. As in MEMIT the loss is
    evaluated ``v_steps`` times and the last evaluation takes no step. A fact's final loss
    is that of its last evaluation: its deltas do not move after it (it met the stop
    rule, or it was the evaluation without a step)."""
    p, n_facts = problem, problem.n_facts
    device = p.resid.device
    optimizer = torch.optim.Adam(learned, lr=hparams.v_lr)
    learned_h = [h for d, h in zip(deltas, p.h) if d.requires_grad]
    nll_first = loss_first = None
    nll_final = torch.zeros(n_facts, device=device)
    loss_final = torch.zeros(n_facts, device=device)
    active = list(range(n_facts))
    steps = [0] * n_facts
    scale = initial_loss_scale(p.model.dtype)
    bar = tqdm(total=hparams.v_steps, desc=f"z* at layer {p.layer}", disable=not progress)
    step = 0
    while step < hparams.v_steps:
        optimizer.zero_grad()
        with torch.enable_grad():
            nll, kl, kl_lp = _batch_losses(p, deltas, active)
            if p.kl_init is None:
                p.kl_init = kl_lp.detach()
            loss = nll + hparams.kl_factor * kl + hparams.v_weight_decay * _site_decay(p, deltas, active)
            if nll_first is None:
                nll_first, loss_first = nll.detach().clone(), loss.detach().clone()
            nll_final[active], loss_final[active] = nll.detach(), loss.detach()
            stopping = loss if hparams.stop_on == "loss" else nll
            keep = [i for i, d in enumerate((stopping < hparams.stop_loss).tolist()) if not d]
            if not keep or step == hparams.v_steps - 1:
                break
            (loss[keep].sum() * scale).backward()
        if not all(torch.isfinite(d.grad).all() for d in learned):
            if scale > 1:  # the scaled gradient overflowed float16: the same step at half the scale
                scale /= 2
                continue
            raise FloatingPointError(
                f"the target optimisation at layer {p.layer} produced a non-finite gradient at "
                f"step {step}; lower v_lr (now {hparams.v_lr})"
                + (", or load the model in bfloat16 or float32" if p.model.dtype == torch.float16 else "")
            )
        if scale != 1:
            for d in learned:
                d.grad.div_(scale)  # a power of two: exact
        active = [active[i] for i in keep]
        _step_and_clamp(optimizer, learned, learned_h, active, n_facts, hparams.clamp_norm_factor)
        for i in active:
            steps[i] += 1
        step += 1
        bar.update(1)
        bar.set_postfix(nll=f"{float(nll.detach().mean()):.3f}", active=len(active))
    bar.close()
    if nll_first is None:  # v_steps == 0: no evaluation yet, and the KL is 0
        with torch.no_grad():
            nll_final, _, _ = _batch_losses(p, deltas, list(range(n_facts)))
            loss_final = nll_final + hparams.v_weight_decay * _site_decay(p, deltas)
        nll_first, loss_first = nll_final, loss_final
    return _Optimisation(loss_first, nll_first, loss_final, nll_final, steps)


def _step_and_clamp(optimizer, learned: list[Tensor], learned_h: list[Tensor], active: list[int], n_facts: int,
                    clamp_norm_factor: float) -> None:
    """One Adam step for the facts still ``active`` (Adam's momentum would move a frozen
    delta even with a zero gradient, so the others are put back), then each delta's norm
    clipped to ``clamp_norm_factor`` times its ``h``'s."""
    frozen = [d.detach().clone() for d in learned]
    optimizer.step()
    with torch.no_grad():
        moving = torch.zeros(n_facts, dtype=torch.bool, device=learned[0].device)
        moving[active] = True
        for d, before, base in zip(learned, frozen, learned_h):
            d.copy_(torch.where(moving[:, None], d, before))
            limit = clamp_norm_factor * base.norm(dim=-1)
            norm = d.norm(dim=-1)
            d.mul_(torch.where(norm > limit, limit / norm.clamp(min=1e-12), 1.0)[:, None])


def _diagnostics(facts, problem: _TargetProblem, deltas: Sequence[Tensor], run: _Optimisation) -> list[dict]:
    """One dict per fact: its losses and NLL first and last, the target's probability
    before and after, the norms of its deltas and ``h``, and its steps."""
    out = []
    h, delta = problem.h[0], deltas[0]
    for i, fact in enumerate(facts):
        out.append({
            "fact": fact.key,
            "subject": fact.subject,
            "target_new": fact.target_new,
            "loss_initial": float(run.loss_first[i]),
            "loss_final": float(run.loss_final[i]),
            "nll_initial": float(run.nll_first[i]),
            "nll_final": float(run.nll_final[i]),
            "p_target_before": float(torch.exp(-run.nll_first[i])),
            "p_target_after": float(torch.exp(-run.nll_final[i])),
            "delta_norm": float(delta[i].norm()),
            "h_norm": float(h[i].norm()),
            "steps": run.steps[i],
            **({"attn_delta_norm": float(deltas[1][i].norm()), "attn_h_norm": float(problem.h[1][i].norm())}
               if len(deltas) > 1 else {}),
        })
    return out


