"""Shared pytest fixtures. The test tiers are assigned in the repository's root
``conftest.py``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


@pytest.fixture(autouse=True)
def _tiny_model_caches_apart(request, tmp_path_factory, monkeypatch):
    """Tests on tiny random models cache their context templates, targets and moments in
    the test session's folder, not in the user's cache (each tiny model lives in a fresh
    temporary directory, so nothing there could ever be read again). Tests of the embedded
    models keep the user's cache, where their converted weights are."""
    names = set(request.fixturenames)
    if "tiny_tokenizer_dir" in names and not names & {"smollm2", "gemma3"}:
        monkeypatch.setenv("INTATTN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="module", autouse=True)
def _tiny_module_caches_apart(request, tmp_path_factory):
    """The same for a module whose tests all use tiny models and none an embedded one:
    its module-scoped fixtures (which run before any test's own fixtures, so before
    :func:`_tiny_model_caches_apart`) cache in the session's folder too."""
    items = [item for item in request.session.items if getattr(item, "module", None) is request.module]
    names = set().union(*(set(getattr(item, "fixturenames", ())) for item in items)) if items else set()
    if "tiny_tokenizer_dir" not in names or names & {"smollm2", "gemma3"}:
        yield
        return
    patch = pytest.MonkeyPatch()
    patch.setenv("INTATTN_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))
    try:
        yield
    finally:
        patch.undo()
