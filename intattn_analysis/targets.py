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
from tqdm import tqdm

from .architectures import hook
from .facts import SUBJECT_SLOT, Fact
from .cache import CacheEntry, cache_entry, entry_fields, kind_folder
from .loading import ModelHandle
from .model_access import (
    FINAL_NORM_HOOK,
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
    "ZTargets",
    "compute_z",
    "context_templates",
    "context_weights",
    "length_groups",
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
#: What a target can be set for (see :func:`compute_z`).
TARGET_SITES = ("residual", "mlp_output", "mlp_value", "pmet")
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

    ``"pmet"`` (PMET's targets): two deltas, added at the subject's last token to the
    attention output and to the MLP output *of* ``layer`` (hooks ``attn_out`` and
    ``mlp_out``), optimised together (the attention delta only while
    ``hparams.attn_targets`` is true); each is clamped and decayed relative to its own
    module's output, the loss is otherwise the same. ``z`` is the MLP output target and
    ``attn_delta`` the attention one. Its steps start at ``layer`` itself (the attention
    delta passes through the layer's MLP), so ``layer`` must be at least 1.

    ``suffix`` (default) runs each step only on the positions from the subject's last
    token on, reading the earlier positions' stored keys and values; ``False`` runs whole
    rows. Both give the same ``z*`` up to float rounding (the tests hold them to a cosine
    of 0.9999); where the bridge cannot resume a forward with a key-value prefix, whole
    rows are run anyway.
    """
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if site not in TARGET_SITES:
        raise ValueError(f"site must be one of {TARGET_SITES}, got {site!r}")
    if site == "pmet" and cache_dir is not None:
        raise ValueError("PMET's targets (site='pmet') are not cached; pass cache_dir=None")
    start_time = time.perf_counter()
    facts = list(facts)
    if not facts:
        raise ValueError("facts is empty; pass at least one Fact")
    layer = max(hparams.layers) if layer is None else int(layer)
    if site in ("pmet", "mlp_value") and layer < 1:
        raise ValueError(f"targets at site {site!r} start their steps at the layer itself, from the "
                         "residual stream before it: the layer must be at least 1")
    if templates is None:
        templates = context_templates(
            model, hparams.n_context_templates, hparams.context_template_length
        )
    templates = list(templates)
    if cache_dir is not None:
        return _cached_z(model, facts, hparams, layer, templates, batch_size, progress,
                         Path(cache_dir), suffix, site)
    if len(facts) > batch_size:
        chunks = [facts[i : i + batch_size] for i in range(0, len(facts), batch_size)]
        parts = [
            compute_z(model, chunk, hparams, layer=layer, templates=templates,
                      batch_size=batch_size, progress=progress, suffix=suffix, site=site)
            for chunk in tqdm(chunks, desc="z* batches", disable=not progress or len(chunks) < 2)
        ]
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
            attn_h=torch.cat([p.attn_h for p in parts]) if site == "pmet" else None,
            attn_delta=torch.cat([p.attn_delta for p in parts]) if site == "pmet" else None,
            model_state=_state_of(model),
            settings=target_settings(hparams),
        )
    rows = _training_rows(model, facts, templates, hparams.kl_position)
    ids = pad_rows(model, rows)
    device = ids.device
    n_facts, d_model = len(facts), model.d_model
    subject_pos = torch.tensor([r.subject_last for r in rows], device=device)
    row_fact = torch.tensor([r.fact_index for r in rows], device=device)
    if SUBJECT_SLOT not in templates:
        raise ValueError(f"templates must include the bare prompt '{{}}', got {templates}")
    bare = templates.index(SUBJECT_SLOT)  # h is read in the bare prompt, as MEMIT does
    bare_rows = torch.tensor([i * len(templates) + bare for i in range(n_facts)], device=device)

    # Layers 0..L do not depend on delta: run them once, keep the residual stream at the
    # output of L for every row (and, for the suffix path, the keys and values of the
    # blocks above), and start every optimisation step at block L+1.
    # PMET injects into the attention and MLP outputs *of* the layer, so its steps start
    # at the layer itself, from the residual stream before it
    pmet = site == "pmet"
    inside = site in ("pmet", "mlp_value")  # injected inside the layer, not after it
    read_layer = layer - 1 if inside else layer
    engine = _suffix_engine(model, ids) if suffix else None
    if engine is not None:
        resid, kv = _resid_and_kv(model, ids, read_layer)
    else:
        resid, kv = _resid_after(model, ids, read_layer), None
    h = resid[bare_rows, subject_pos[bare_rows]].float().clone()
    h_attn = None
    if site in ("mlp_output", "mlp_value", "pmet"):  # the module outputs there (ROME's target_init)
        bare = [rows[int(j)] for j in bare_rows]
        output = hook("mlp_value" if site == "mlp_value" else "mlp_out", layer)
        names = [output] + ([hook("attn_out", layer)] if pmet else [])
        outputs = read_at_subject(model, bare, names)
        h = outputs[output].float().clone()
        if pmet:
            h_attn = outputs[hook("attn_out", layer)].float().clone()
    delta = torch.zeros(n_facts, d_model, device=device, dtype=torch.float32, requires_grad=True)
    # PMET's attention delta is optimised only when its attention targets are on
    delta_attn = torch.zeros(n_facts, d_model, device=device, dtype=torch.float32,
                             requires_grad=pmet and getattr(hparams, "attn_targets", True))
    learned = [delta] + ([delta_attn] if delta_attn.requires_grad else [])
    optimizer = torch.optim.Adam(learned, lr=hparams.v_lr)
    cut = FINAL_NORM_HOOK in model.bridge.hook_dict
    # each row runs from the subject's last token (the whole row without the suffix path)
    # to its last scored position
    starts = [r.subject_last if engine is not None else 0 for r in rows]
    ends = [max(r.scored) + 1 for r in rows]
    work = {"forwards": 0, "positions": 0, "needed_positions": 0}

    def group_logits(members: list[int]) -> Tensor:
        """Logits ``[entries, vocab]`` at the scored positions of rows ``members`` (one
        forward), with each row's fact delta added at its subject position.

        Each row runs its own positions ``starts .. ends``: the suffixes are right-padded
        to the longest, and the stored keys and values of each row's earlier positions
        are left-padded to the longest prefix, the pads masked out of attention."""
        index = torch.tensor(members, device=device)
        first = torch.tensor([starts[j] for j in members], device=device)
        lengths = torch.tensor([ends[j] - starts[j] for j in members], device=device)
        t0, w = int(first.max()), int(lengths.max())
        take = (first[:, None] + torch.arange(w, device=device)).clamp(max=resid.shape[1] - 1)
        x = resid[index[:, None], take]
        local = torch.arange(len(members), device=device)
        at = subject_pos[index] - first

        def injection(d: Tensor):
            def inject(y: Tensor, hook=None) -> Tensor:
                add = torch.zeros_like(y)
                add[local, at] = d[row_fact[index]].to(y.dtype)
                return y + add
            return inject

        if pmet:
            hooks = [(hook("attn_out", layer), injection(delta_attn)),
                     (hook("mlp_out", layer), injection(delta))]
        elif inside:
            hooks = [(hook("mlp_value", layer), injection(delta))]
        else:
            x, hooks = injection(delta)(x), []
        entry_row = torch.tensor([k for k, j in enumerate(members) for _ in rows[j].scored],
                                 device=device)
        entry_pos = torch.tensor([p - starts[j] for j in members for p in rows[j].scored],
                                 device=device)

        def keep_scored(y: Tensor, hook=None) -> Tensor:
            return y[entry_row, entry_pos][None]

        prefix = None
        if t0 > 0 and read_layer + 1 < model.n_layers:
            prefix = padded_prefix_kwargs(model, engine, kv, index, first, lengths, t0, w)
        if cut:
            logits = resume(model, x, read_layer + 1, hooks + [(FINAL_NORM_HOOK, keep_scored)], prefix)[0]
        else:
            logits = resume(model, x, read_layer + 1, hooks, prefix)[entry_row, entry_pos]
        work["forwards"] += 1
        work["positions"] += len(members) * w
        work["needed_positions"] += int(lengths.sum())
        return logits

    def forward(members: list[int]) -> Tensor:
        """Logits at the scored positions of rows ``members``, row after row in that
        order; rows of similar lengths share a forward (:func:`length_groups`)."""
        groups = length_groups([ends[j] - starts[j] for j in members])
        parts = {}
        for group in groups:
            logits = group_logits([members[k] for k in group])
            sizes = [len(rows[members[k]].scored) for k in group]
            parts.update(zip(group, torch.split(logits, sizes)))
        return torch.cat([parts[k] for k in range(len(members))])

    def losses(active: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """NLL and KL of the facts ``active`` (in that order), and their KL log-probs."""
        wanted = set(active)
        chosen = [j for j, r in enumerate(rows) if r.fact_index in wanted]
        local_fact = {f: i for i, f in enumerate(active)}
        sub_rows = [rows[j] for j in chosen]
        sub_fact = torch.tensor([local_fact[r.fact_index] for r in sub_rows], device=device)
        logits = forward(chosen)
        init = None if kl_init is None else kl_init[active]
        return _losses(logits, sub_rows, sub_fact, len(active), init)

    # Each fact stops on its own once its loss is below stop_loss (MEMIT's per-request
    # rule): its delta is frozen and its rows leave the batch, so the result for a fact
    # does not depend on which other facts share the batch. As in MEMIT the loss is
    # evaluated v_steps times and the last evaluation takes no step.
    # A fact's final loss is that of its last evaluation: its delta does not move after
    # it (it met the stop rule, or it was the evaluation without a step).
    kl_init = None
    nll_first = loss_first = None
    nll_final = torch.zeros(n_facts, device=device)
    loss_final = torch.zeros(n_facts, device=device)
    active = list(range(n_facts))
    steps = [0] * n_facts
    bar = tqdm(range(hparams.v_steps), desc=f"z* at layer {layer}", disable=not progress)
    for step in bar:
        optimizer.zero_grad()
        with torch.enable_grad():
            nll, kl, kl_lp = losses(active)
            if kl_init is None:
                kl_init = kl_lp.detach()
            decay = _decay(delta[active], h[active])
            if pmet:  # PMET decays both deltas, each relative to its own module's output
                decay = decay + _decay(delta_attn[active], h_attn[active])
            loss = nll + hparams.kl_factor * kl + hparams.v_weight_decay * decay
            if nll_first is None:
                nll_first, loss_first = nll.detach().clone(), loss.detach().clone()
            nll_final[active], loss_final[active] = nll.detach(), loss.detach()
            stopping = loss if hparams.stop_on == "loss" else nll
            keep = [i for i, d in enumerate((stopping < hparams.stop_loss).tolist()) if not d]
            if not keep or step == hparams.v_steps - 1:
                break
            loss[keep].sum().backward()
        if not all(torch.isfinite(d.grad).all() for d in learned):
            raise FloatingPointError(
                f"the target optimisation at layer {layer} produced a non-finite gradient at "
                f"step {step}; lower v_lr (now {hparams.v_lr})"
            )
        active = [active[i] for i in keep]
        frozen = [d.detach().clone() for d in learned]
        optimizer.step()
        with torch.no_grad():
            moving = torch.zeros(n_facts, dtype=torch.bool, device=device)
            moving[active] = True
            for d, before, base in zip(learned, frozen, (h, h_attn)):
                # Adam's momentum would move a frozen delta even with a zero gradient
                d.copy_(torch.where(moving[:, None], d, before))
                limit = hparams.clamp_norm_factor * base.norm(dim=-1)
                norm = d.norm(dim=-1)
                d.mul_(torch.where(norm > limit, limit / norm.clamp(min=1e-12), 1.0)[:, None])
        for i in active:
            steps[i] += 1
        bar.set_postfix(nll=f"{float(nll.detach().mean()):.3f}", active=len(active))

    if nll_first is None:  # v_steps == 0: no evaluation yet, and the KL is 0
        with torch.no_grad():
            nll_final, _, _ = losses(list(range(n_facts)))
            decay = _decay(delta, h) + (_decay(delta_attn, h_attn) if pmet else 0.0)
            loss_final = nll_final + hparams.v_weight_decay * decay
        nll_first, loss_first = nll_final, loss_final
    first = (loss_first, nll_first)
    delta = delta.detach()
    delta_attn = delta_attn.detach()
    diagnostics = []
    for i, fact in enumerate(facts):
        diagnostics.append({
            "fact": fact.key,
            "subject": fact.subject,
            "target_new": fact.target_new,
            "loss_initial": float(first[0][i]),
            "loss_final": float(loss_final[i]),
            "nll_initial": float(first[1][i]),
            "nll_final": float(nll_final[i]),
            "p_target_before": float(torch.exp(-first[1][i])),
            "p_target_after": float(torch.exp(-nll_final[i])),
            "delta_norm": float(delta[i].norm()),
            "h_norm": float(h[i].norm()),
            "steps": steps[i],
            **({"attn_delta_norm": float(delta_attn[i].norm()), "attn_h_norm": float(h_attn[i].norm())}
               if pmet else {}),
        })
    return ZTargets(
        z=(h + delta).detach(),
        h=h,
        delta=delta,
        layer=layer,
        context_templates=templates,
        diagnostics=diagnostics,
        seconds=time.perf_counter() - start_time,
        work=work,
        site=site,
        attn_h=h_attn,
        attn_delta=delta_attn if pmet else None,
        model_state=_state_of(model),
        settings=target_settings(hparams),
    )
