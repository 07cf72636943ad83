"""Shared pytest fixtures, and the test tiers.

Every test belongs to one tier, chosen here from what it uses, so that ``pytest -m TIER``
selects it:

* ``unit``: pure functions and tiny randomly initialised models (minutes in all);
* ``models``: tests that load an embedded model (SmolLM2-135M, Gemma-3-270M);
* ``notebooks``: nbval over ``notebooks/`` (each cell of each notebook).

A test that loads an embedded model without one of the fixtures below carries
``@pytest.mark.models`` itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TIERS = ("unit", "models", "notebooks")
#: Fixtures that load an embedded model: a test that uses one is in the ``models`` tier.
MODEL_FIXTURES = {"smollm2", "gemma3", "embedded"}


def _uses_a_model(item) -> bool:
    """Whether a test asks for a model fixture, directly or as a parameter that it looks
    up with ``request.getfixturevalue``."""
    if MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    params = getattr(getattr(item, "callspec", None), "params", {})
    return any(isinstance(v, str) and v in MODEL_FIXTURES for v in params.values())


def pytest_terminal_summary(terminalreporter):
    """One line with each tier's time: setup, call and teardown of its tests, summed from
    the session's reports (a conftest's runtest hooks would only see tests below it)."""
    seconds: dict[str, float] = {}
    counts: dict[str, int] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            keywords = getattr(report, "keywords", None)
            if keywords is None or not hasattr(report, "duration"):
                continue
            tier = next((t for t in TIERS if t in keywords), None)
            if tier is None:
                continue
            seconds[tier] = seconds.get(tier, 0.0) + report.duration
            counts[tier] = counts.get(tier, 0) + (report.when == "call")
    if seconds:
        parts = [f"{t} {seconds[t]:.0f} s ({counts[t]} tests)" for t in TIERS if t in seconds]
        terminalreporter.write_line("time per tier: " + ", ".join(parts))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        if str(getattr(item, "path", "")).endswith(".ipynb"):
            item.add_marker(pytest.mark.notebooks)
        elif _uses_a_model(item):
            item.add_marker(pytest.mark.models)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The benchmark data directory described in ``../shared/data/README.md``.

    ``INTATTN_DATA_DIR`` overrides the default ``<repo root>/../shared/data``. Where the
    directory does not exist the test is skipped, unless ``INTATTN_REQUIRE_DATA=1``, which
    makes it fail instead (for machines that must run the data tests).
    """
    from intattn_analysis.datasets import benchmark_root

    path = benchmark_root()
    if not path.is_dir():
        reason = (
            f"benchmark data directory {path} not found; set INTATTN_DATA_DIR to a copy of "
            "shared/data (INTATTN_REQUIRE_DATA=1 turns this skip into a failure)"
        )
        if os.environ.get("INTATTN_REQUIRE_DATA") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


# ----------------------------------------------------------------------------- models
@pytest.fixture(scope="session")
def smollm2():
    """The default embedded model, loaded once per test session."""
    import intattn_analysis as ia

    return ia.load_model("smollm2-135m", device="cpu")


@pytest.fixture(scope="session")
def gemma3():
    """The second embedded model (Gemma3 architecture), loaded once per test session."""
    import intattn_analysis as ia

    return ia.load_model("gemma-3-270m", device="cpu")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
    """A saved word-level tokenizer of 128 tokens, for tiny random models."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, 128)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
        pad_token="</s>",
    )
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tiny_tokenizer_dir):
    """A tiny random Llama (3 layers, d_model 64, d_mlp 96) loaded through
    ``ia.load_model(directory)``, for tests of the editing engine's arithmetic. Tests that
    edit it restore it."""
    import torch
    import transformers

    import intattn_analysis as ia

    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(directory)
    return ia.load_model(str(directory), device="cpu")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's duration: on a shared 2-core machine an OpenMP team
    of 2 waits on a busy core at every op, so small forwards run faster on one thread."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
