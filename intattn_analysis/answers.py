"""Answers as a user meets them: free greedy generation, a natural stop, and scores.

Teacher-forced metrics feed the target's tokens in and check each for being the argmax,
so they know the answer's length and content in advance (*The Mirage of Model Editing*,
Yang et al., ACL 2025). The generation protocol asks the model instead, and scores what
it says:

**Prompt form** (:data:`PROMPT_FORMS`). ``"plain"``: the probe's text as it is, the
input teacher forcing scores the target after. ``"qa"``: the probe inside a short
question-answer frame (``Q: <probe>\\nA:``), for models that continue a bare question
with nothing. ``"chat"``: the probe as the user's turn of the tokenizer's own chat
template, with the assistant's turn opened, for instruction models (SmolLM2-Instruct is
one; a tokenizer without a template is refused by name).

**Decoding.** Greedy, from the prompt, with no knowledge of the target's length, with
the package's key-value-cached batched loop
(:func:`intattn_analysis.metrics.greedy_generations`). A row stops at the first of:

* the end-of-sequence token;
* a newline after the answer has begun (whitespace and newlines before the first
  visible character are skipped: a bare question is often continued on a new line);
* the end of a sentence: ``.``, ``!`` or ``?`` followed by whitespace, except after a
  single letter (an initial, ``D.C.``) or a common abbreviation (:data:`ABBREVIATIONS`);
* ``max_new_tokens`` new tokens (default 32; the reference code of the Mirage paper
  stops at 50, with ``.`` alone ending a sentence).

The answer is the text up to the stop, without the newline or the sentence's final
punctuation, stripped.

**Scores** of an answer against a target and its aliases (the best over them):

* ``exact``: normalised exact match (SQuAD's normalisation: lower case, punctuation and
  the articles *a*, *an*, *the* removed, whitespace collapsed), the protocol's headline;
* ``prefix``: the normalised answer's words begin with the normalised target's words
  (" Brazil that has been making waves" begins with "Brazil"; "Parisian" does not begin
  with "Paris");
* ``f1``: SQuAD's token F1 between the normalised answer and target.

A locality probe is *kept* when the normalised answer is the same as the unedited
model's.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = [
    "ABBREVIATIONS",
    "PROMPT_FORMS",
    "AnswerMatch",
    "GenerationSettings",
    "answer_text",
    "match_answer",
    "normalize_answer",
    "render_prompts",
    "stopped",
]

#: The prompt forms of the generation protocol (see the module docstring).
PROMPT_FORMS = ("plain", "qa", "chat")

#: Words after which a full stop does not end a sentence (compared without case).
ABBREVIATIONS = frozenset({
    "mr", "mrs", "ms", "dr", "prof", "st", "mt", "ft", "jr", "sr", "no", "vs", "etc", "inc", "ltd",
    "co", "corp", "gen", "col", "lt", "sgt", "rev", "hon", "gov", "sen", "rep", "ave", "blvd", "jan",
    "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec", "approx", "ca",
})

_QA_FRAME = "Q: {prompt}\nA:"
_SENTENCE_END = re.compile(r"([.!?])\s")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


@dataclass(frozen=True)
class GenerationSettings:
    """How the generation protocol asks and stops.

    Attributes:
        max_new_tokens: the cap on new tokens per answer (the natural stop usually comes
            first).
        prompt_form: ``"plain"``, ``"qa"`` or ``"chat"`` (:data:`PROMPT_FORMS`).
    """

    max_new_tokens: int = 32
    prompt_form: str = "plain"

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or self.max_new_tokens < 1:
            raise ValueError(f"GenerationSettings.max_new_tokens must be a positive integer, "
                             f"got {self.max_new_tokens!r}")
        if self.prompt_form not in PROMPT_FORMS:
            raise ValueError(f"GenerationSettings.prompt_form must be one of {list(PROMPT_FORMS)}, "
                             f"got {self.prompt_form!r}")

    def key(self) -> dict[str, Any]:
        """What a stored generation result depends on besides the model and the facts."""
        return {"max_new_tokens": self.max_new_tokens, "prompt_form": self.prompt_form, "stop": "eos,newline,sentence"}


# --------------------------------------------------------------------------- prompts
def render_prompts(tokenizer, prompts: Sequence[str], form: str) -> list[str]:
    """The texts the model is given for ``prompts`` in prompt form ``form``."""
    if form == "plain":
        return list(prompts)
    if form == "qa":
        return [_QA_FRAME.format(prompt=p.strip()) for p in prompts]
    if form == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "prompt_form='chat' needs a tokenizer with a chat template, and this model's has none "
                "(a base model); use prompt_form='plain' or 'qa'"
            )
        return [tokenizer.apply_chat_template([{"role": "user", "content": p.strip()}], tokenize=False,
                                               add_generation_prompt=True) for p in prompts]
    raise ValueError(f"prompt_form must be one of {list(PROMPT_FORMS)}, got {form!r}")


# --------------------------------------------------------------------------- stop rule
def _sentence_end(text: str) -> int | None:
    """The index of the punctuation that ends the first sentence of ``text``, or ``None``."""
    for found in _SENTENCE_END.finditer(text):
        at = found.start(1)
        if found.group(1) == ".":
            word = re.search(r"([A-Za-z]+)$", text[:at])
            if word and (len(word.group(1)) == 1 or word.group(1).lower() in ABBREVIATIONS):
                continue
        return at
    return None


def answer_text(generated: str) -> str:
    """The answer in a generated continuation: the text before the natural stop (see
    the module docstring), stripped. A sentence end at the very end of the text counts."""
    text = generated.lstrip()
    newline = text.find("\n")
    if newline >= 0:
        text = text[:newline]
    end = _sentence_end(text + " ")
    if end is not None:
        text = text[:end]
    return text.strip()


def stopped(generated: str) -> bool:
    """Whether decoding can stop: the answer in ``generated`` has reached its natural end
    (a newline after it began, or a sentence end followed by whitespace)."""
    text = generated.lstrip()
    return "\n" in text or _sentence_end(text) is not None


# --------------------------------------------------------------------------- scores
def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, punctuation and articles removed, whitespace
    collapsed."""
    text = text.lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


@dataclass(frozen=True)
class AnswerMatch:
    """The three scores of one answer (see the module docstring), each 0 to 1."""

    exact: float
    prefix: float
    f1: float


def _f1(answer: list[str], target: list[str]) -> float:
    common = sum((Counter(answer) & Counter(target)).values())
    if not answer or not target or common == 0:
        return float(answer == target)
    precision, recall = common / len(answer), common / len(target)
    return 2 * precision * recall / (precision + recall)


def match_answer(answer: str, targets: Sequence[str]) -> AnswerMatch:
    """The scores of ``answer`` against the best of ``targets`` (the target and its
    aliases), each score maximised on its own."""
    if isinstance(targets, str):
        targets = [targets]
    words = normalize_answer(answer).split()
    exact = prefix = f1 = 0.0
    for target in targets:
        wanted = normalize_answer(target).split()
        if not wanted:
            continue
        exact = max(exact, float(words == wanted))
        prefix = max(prefix, float(words[: len(wanted)] == wanted))
        f1 = max(f1, _f1(words, wanted))
    return AnswerMatch(exact, prefix, f1)
