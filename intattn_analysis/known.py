"""Which facts a model knows.

A fact is *known* by a model when the model's greedy continuation of the filled-in
prompt starts with ``target_true`` as a whole word (``" Paris"`` counts for ``Paris``,
``" Parisian"`` does not). Causal tracing only makes sense on known facts: the indirect
effect measures how much of the correct answer's probability a restored state brings
back. The built-in fact set stores these flags per embedded model; ``intattn known
--write`` recomputes them.

The continuation is decoded one prompt at a time, without padding, so the flag is exactly
what greedy decoding of the prompt gives.
"""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .facts import Fact
from .loading import ModelHandle

__all__ = ["greedy_continuation", "is_known", "is_known_cached", "known_facts", "mark_known", "starts_with_answer"]

#: Format of the cached flags of :func:`is_known_cached` (part of their key).
KNOWN_FORMAT = 1


def starts_with_answer(continuation: str, answer: str) -> bool:
    """Whether ``continuation`` (leading whitespace ignored) begins with the word(s) ``answer``."""
    text = continuation.lstrip()
    if not text.startswith(answer):
        return False
    return len(text) == len(answer) or not text[len(answer)].isalnum()


@torch.no_grad()
def greedy_continuation(
    model: ModelHandle,
    text: str,
    max_new_tokens: int,
    stop: Callable[[str], bool] | None = None,
) -> str:
    """The model's greedy continuation of ``text``, decoded without special tokens.

    Each step is a full forward of the bridge on the prompt and the tokens chosen so far,
    with no key-value cache: ``generate`` on a Hugging Face model whose modules the bridge
    has wrapped reuses its cache incorrectly (the tokens after the first come out as
    garbage), and a fact's answer is a few tokens long, so recomputation costs little.
    Decoding ends at the end-of-sequence token, or early once ``stop(continuation)`` is
    true.
    """
    ids = torch.tensor([model.tokenize(text)[0]], device=model.device)
    prompt_length = ids.shape[1]
    eos = model.tokenizer.eos_token_id
    continuation = ""
    for _ in range(max_new_tokens):
        next_token = model.bridge(ids)[0, -1].argmax()
        ids = torch.cat([ids, next_token.view(1, 1)], dim=1)
        continuation = model.tokenizer.decode(ids[0, prompt_length:], skip_special_tokens=True)
        if (eos is not None and int(next_token) == eos) or (stop is not None and stop(continuation)):
            break
    return continuation


def _answer_decided(answer: str) -> Callable[[str], bool]:
    """Whether a partial continuation already settles :func:`starts_with_answer`."""

    def decided(continuation: str) -> bool:
        # a partly decoded multi-byte character shows as U+FFFD; judge only what is final
        text = continuation.lstrip().rstrip("\ufffd")
        return len(text) > len(answer) or not answer.startswith(text)

    return decided


def is_known(model: ModelHandle, fact: Fact) -> tuple[bool, str]:
    """``(known, continuation)`` for one fact; a fact with no ``target_true`` is not known.

    Greedy decoding stops as soon as the answer is decided: when the continuation can no
    longer begin with ``target_true``, or already does and shows the next character. The
    flag is therefore the same as :func:`starts_with_answer` on the full
    ``len(answer tokens) + 2``-token greedy continuation, at a fraction of the cost.
    """
    if fact.target_true is None:
        return False, ""
    answer = fact.target_true
    answer_tokens = len(model.tokenizer(" " + answer, add_special_tokens=False)["input_ids"])
    continuation = greedy_continuation(
        model, fact.text, answer_tokens + 2, stop=_answer_decided(answer)
    )
    return starts_with_answer(continuation, answer), continuation


def is_known_cached(model: ModelHandle, fact: Fact, cache_dir=None) -> bool:
    """:func:`is_known`'s flag, cached on disk per model state and fact (the cache kind
    ``known``; ``cache_dir`` stands in for its folder). The experiments that choose the
    facts a model knows ask again on every run and every ``intattn status``; the greedy
    decoding behind each answer is what the cache spares."""
    from .cache import cache_entry, kind_folder

    entry = cache_entry(cache_dir or kind_folder("known"), model, f"known-{fact.key}",
                        {"format": KNOWN_FORMAT, "prompt": fact.text, "answer": fact.target_true},
                        what="known flag")

    def check(stored: dict) -> None:
        if not isinstance(stored["known"], bool):
            raise TypeError(f"known is {type(stored['known']).__name__}, not a bool")

    stored = entry.read_json(check)
    if stored is not None:
        return stored["known"]
    known, continuation = is_known(model, fact)
    entry.write_json({"known": known, "continuation": continuation})
    return known


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
