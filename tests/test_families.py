"""The Qwen2 and Mistral paths: a tiny random model of each family runs every experiment at
CI scale, so that a GPU user's first run on Qwen2.5-7B or Mistral-7B does not discover a
missing branch. The models are random, so the facts they "know" are made for them: built-in
facts whose answer is set to the model's own greedy next token."""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import pytest
import torch

import intattn_analysis as ia
from intattn_analysis.experiments import EXPERIMENTS
from intattn_analysis.experiments.store import ResultStore

#: The experiments in an order that serves each one's inputs (estimators read the traces).
ORDER = ("localization", "alpha-sweep", "alpha-estimators", "editors", "sequential", "batch-scaling", "outdated",
         "precision")
#: Known facts given to the localization and estimator experiments (their CI scales use 4 and 8).
KNOWN = 12


def _tokenizer(texts):
    """A byte-level BPE of 512 tokens trained on ``texts``: every text tokenizes, as with
    the real models' tokenizers, and the vocabulary stays tiny."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module", params=["qwen2", "mistral"])
def family_model(request, tmp_path_factory, data_dir):
    """A tiny random model of the family (4 layers, d_model 64), loaded by directory."""
    import transformers

    from intattn_analysis.experiments.common import dataset_facts

    facts = ia.load_facts("builtin")
    texts = [f"{f.text} {f.target_true} {f.target_new}" for f in facts]
    texts += [f"{f.text} {f.target_new}" for f in dataset_facts("zsre")[:300]]
    tokenizer = _tokenizer(texts)
    config_type = {"qwen2": transformers.Qwen2Config, "mistral": transformers.MistralConfig}[request.param]
    config = config_type(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, bos_token_id=None,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    directory = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    handle = ia.load_model(str(directory), device="cpu")
    assert handle.spec.name == request.param
    return handle


def _answered(model, facts):
    """Facts whose answer is the model's greedy next token (a whole word after a space, as
    answers are tokenized), so that the random model answers them."""
    out = []
    for fact in facts:
        ids = torch.tensor(model.tokenize(fact.text))
        with torch.no_grad():
            top = int(model.hf_model(ids).logits[0, -1].argmax())
        text = model.tokenizer.decode([top])
        if text.startswith(" ") and text.strip() and "\ufffd" not in text and \
                model.tokenizer.encode(text, add_special_tokens=False) == [top]:
            out.append(replace(fact, target_true=text[1:]))
        if len(out) == KNOWN:
            break
    return out


def test_every_experiment_runs_at_ci_scale(family_model, tmp_path, monkeypatch):
    from intattn_analysis.experiments import estimators, localization, outdated

    model = family_model
    monkeypatch.setenv("INTATTN_CACHE", str(tmp_path / "cache"))  # its targets and moments stay out of the user's cache
    known = _answered(model, ia.load_facts("builtin"))
    assert len(known) == KNOWN, "the tiny model answers too few built-in facts to trace"
    real = localization.known_facts

    def known_facts(facts, name):
        return known if name == model.name else real(facts, name)

    monkeypatch.setattr(localization, "known_facts", known_facts)
    monkeypatch.setattr(estimators, "known_facts", known_facts)
    monkeypatch.setattr(outdated, "is_known_cached", lambda handle, fact: True)
    before = {k: v.clone() for k, v in model.hf_model.state_dict().items()}
    for name in ORDER:
        module = EXPERIMENTS[name]
        dataset = "builtin" if name in ("localization", "outdated") else "zsre"
        module.run(model, dataset, "ci", tmp_path / "store", progress=False)
        tables = module.tables(tmp_path / "store")
        assert len(ResultStore(tmp_path / "store", module.NAME)) > 0, f"{name}: no unit stored on {model.spec.name}"
        shown = {key: len(frame) for key, frame in tables.items() if frame is not None}
        assert shown and any(shown.values()), f"{name}: no table rows on {model.spec.name}"
        _labelled(name, tables)
    after = model.hf_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "an experiment left the weights edited"
    _precision_float32_is_editors(tmp_path / "store")
    _batch_of_three_is_editors(tmp_path / "store")


def _labelled(name, tables):
    """Every non-empty table with model rows names each row's settings, and each id it
    names is one of the experiment's settings table."""
    listed = set(tables["settings"]["settings_id"])
    for key, frame in tables.items():
        if frame is None or frame.empty or key == "settings" or "model" not in frame.columns:
            continue
        assert "settings_id" in frame.columns, f"{name}: table {key} names no settings"
        assert frame["settings_id"].notna().all(), f"{name}: rows of table {key} name no settings"
        ids = {part for text in frame["settings_id"] for part in text.split("+")}
        if "baseline_settings_id" in frame.columns:
            ids |= {part for text in frame["baseline_settings_id"].dropna() for part in text.split("+")}
        assert ids <= listed, f"{name}: table {key} names settings {sorted(ids - listed)} not listed"


def _precision_float32_is_editors(root):
    """The precision experiment's float32 units are the editors experiment's own (a unit's
    key names the model's dtype, and the CI scales agree): the same files, the same rows
    but the timing and the experiment's name."""
    precision, editors = ResultStore(root, "precision"), ResultStore(root, "editors")
    names = {path.name for path in editors.files()}
    ours = precision.rows()
    float32 = ours[ours["dtype"] == "float32"].drop(columns="dtype")
    half = ours[ours["dtype"] != "float32"]
    assert len(float32) and len(half), "the precision experiment stored no float32 or no bfloat16 rows"
    shared = [path.name for path in precision.files() if path.name in names]
    assert len(shared) == len(precision.files()) // 2, "the float32 units are not the editors experiment's"
    theirs = editors.rows()
    theirs = theirs[theirs["setting"].isin(set(float32["setting"]))]
    timing = ["seconds", "edit_seconds", "experiment"]
    order = ["setting", "batch", "position"]
    left = float32.drop(columns=timing, errors="ignore").sort_values(order).reset_index(drop=True)
    right = theirs.drop(columns=timing, errors="ignore").sort_values(order).reset_index(drop=True)
    pd.testing.assert_frame_equal(left, right[left.columns])


def _batch_of_three_is_editors(root):
    """The same unit in two experiments gives the same rows: batch-scaling's batch of 3 is
    the editors experiment's batch (the same facts, methods and settings; the keys differ
    in the batch size label and in the metric sets), so every score both measure is
    equal, fact by fact, ROME's fact-after-fact edits included."""
    scaling, editors = ResultStore(root, "batch-scaling").rows(), ResultStore(root, "editors").rows()
    three = scaling[scaling["batch_size"] == 3]
    shared = sorted(set(three["setting"]) & set(editors["setting"]))
    assert {"ROME", "MEMIT", "AlphaEdit", "pre-edit"} <= set(shared)
    scores = [c for c in ("Edit Succ.", "Rephrase", "Portability", "Locality", "p_new", "p_true")
              if c in three.columns and c in editors.columns]
    order = ["setting", "position"]
    left = three[three["setting"].isin(shared)].sort_values(order).reset_index(drop=True)
    right = editors[editors["setting"].isin(shared)].sort_values(order).reset_index(drop=True)
    pd.testing.assert_frame_equal(left[order + scores], right[order + scores])
