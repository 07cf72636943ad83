"""What a model predicts after a prompt: next-token distributions and answer probabilities.

Every prompt is run on its own, unpadded, so a probability here is exactly the one a user
gets from a single forward pass of the prompt. The forward goes through the bridge, the
same path the tracing and editing code hooks into.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .facts import Fact
from .loading import ModelHandle

__all__ = ["answer_probability", "next_token_probs", "top_predictions"]


@torch.no_grad()
def next_token_probs(model: ModelHandle, text: str) -> torch.Tensor:
    """Softmax over the vocabulary for the token that follows ``text``."""
    tokens = torch.tensor([model.tokenize(text)[0]], device=model.device)
    logits = model.bridge(tokens)[0, -1]
    return torch.softmax(logits.float(), dim=-1)


def first_answer_token(model: ModelHandle, answer: str) -> int:
    """The first token of ``answer`` as it follows a prompt (with its leading space)."""
    if not answer or not answer.strip():
        raise ValueError(f"answer must be a non-empty string, got {answer!r}")
    ids = model.tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
    return int(ids[0])


def answer_probability(model: ModelHandle, text: str, answer: str) -> float:
    """p(first token of ``answer`` | ``text``)."""
    return float(next_token_probs(model, text)[first_answer_token(model, answer)])


def top_predictions(model: ModelHandle, facts: Sequence[Fact], k: int = 3):
    """A DataFrame: each fact's prompt, true answer, its probability, and the top-k tokens."""
    import pandas as pd

    rows = []
    for fact in facts:
        probs = next_token_probs(model, fact.text)
        top = torch.topk(probs, k)
        row = {"prompt": fact.text, "target_true": fact.target_true}
        if fact.target_true is not None:
            row["p(target_true)"] = round(float(probs[first_answer_token(model, fact.target_true)]), 3)
        for rank, (p, token) in enumerate(zip(top.values, top.indices), start=1):
            row[f"top{rank}"] = model.tokenizer.decode([int(token)])
            row[f"p{rank}"] = round(float(p), 3)
        rows.append(row)
    return pd.DataFrame(rows)
