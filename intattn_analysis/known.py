"""Which facts a model knows.

A fact is *known* by a model when the model's greedy continuation of the filled-in
prompt starts with ``target_true`` as a whole word (``" Paris"`` counts for ``Paris``,
``" Parisian"`` does not). Causal tracing only makes sense on known facts: the indirect
effect measures how much of the correct answer's probability a restored state brings
back. The built-in fact set stores these flags per embedded model; ``intattn known
--write`` recomputes them.

The continuation is decoded one prompt at a time, without padding, so the flag is exactly
what a user sees when calling ``generate`` on the prompt.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .facts import Fact
from .loading import ModelHandle

__all__ = ["greedy_continuation", "is_known", "known_facts", "mark_known", "starts_with_answer"]


def starts_with_answer(continuation: str, answer: str) -> bool:
    """Whether ``continuation`` (leading whitespace ignored) begins with the word(s) ``answer``."""
    text = continuation.lstrip()
    if not text.startswith(answer):
        return False
    return len(text) == len(answer) or not text[len(answer)].isalnum()


@torch.no_grad()
def greedy_continuation(model: ModelHandle, text: str, max_new_tokens: int) -> str:
    """The model's greedy continuation of ``text``, decoded without special tokens."""
    ids = torch.tensor([model.tokenize(text)[0]], device=model.device)
    tokenizer = model.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.hf_model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def is_known(model: ModelHandle, fact: Fact) -> tuple[bool, str]:
    """``(known, continuation)`` for one fact; a fact with no ``target_true`` is not known."""
    if fact.target_true is None:
        return False, ""
    answer_tokens = len(model.tokenizer(" " + fact.target_true, add_special_tokens=False)["input_ids"])
    continuation = greedy_continuation(model, fact.text, max_new_tokens=answer_tokens + 2)
    return starts_with_answer(continuation, fact.target_true), continuation


def mark_known(
    model: ModelHandle, facts: Sequence[Fact], *, progress: bool = True
) -> list[Fact]:
    """Copies of ``facts`` with ``known[model.name]`` set."""
    marked = []
    for fact in tqdm(facts, desc=f"known by {model.name}", disable=not progress):
        known, _ = is_known(model, fact)
        marked.append(fact.with_known(model.name, known))
    return marked


def known_facts(facts: Iterable[Fact], model_name: str) -> list[Fact]:
    """The facts flagged as known by ``model_name`` (raises if none carry a flag for it)."""
    facts = list(facts)
    if not any(model_name in f.known for f in facts):
        raise ValueError(
            f"no fact carries a 'known' flag for model {model_name!r}; flags exist for "
            f"{sorted({m for f in facts for m in f.known})}. Compute them with "
            "intattn_analysis.known.mark_known(model, facts)."
        )
    return [f for f in facts if f.known.get(model_name)]
