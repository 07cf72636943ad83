"""The disk cache (intattn_analysis.cache): one key recipe, one layout, atomic writes and
validated reads, keyed on the model's state."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import intattn_analysis as ia
from intattn_analysis.cache import CacheEntry, cache_entry, cache_key, canonical_json, entry_name, kind_folder
from intattn_analysis.corpus import SHIPPED_SAMPLES, ModelSamples
from intattn_analysis.experiments.store import read_unit_file, unit_files, unit_id
from intattn_analysis.loading import CacheWarning, ModelHandle

STORE = Path(__file__).resolve().parent.parent / "figures" / "paper" / "store"
UNIT_STEM = re.compile(r"^(?:(?P<label>.+)-)?(?P<key>[0-9a-f]{16})$")


def _model(state_id: str = "tiny@abc", cache_folder: str = "tiny@abc", dtype=torch.float32):
    """What an entry needs of a model: its state, its dtype and its cache folder."""
    return SimpleNamespace(state_id=state_id, dtype=dtype, cache_folder=cache_folder)


# ----------------------------------------------------------------------------- one recipe
def test_the_stores_unit_ids_are_unchanged():
    """Every 20th unit file of the committed store is still found under its key."""
    files = sorted((uid, path) for folder in STORE.iterdir() if folder.is_dir()
                   for uid, path in unit_files(folder).items())
    assert len(files) >= 1000, f"the committed store under {STORE} is missing"
    sample = files[::20]
    for uid, path in sample:
        key = read_unit_file(path)[0]["unit_key"]
        match = UNIT_STEM.match(uid)
        assert match, path.name
        label = match["label"] or ""
        assert unit_id(key, label) == uid, path
        assert cache_key(key) == match["key"] == entry_name(key, label)[-16:]
    assert len(sample) >= 60


def test_the_key_is_sha256_of_canonical_json():
    fields = {"b": (1, 2), "a": {"y": np.float32(0.5), "x": {3, 1, 2}}, "c": torch.tensor(7)}
    text = canonical_json(fields)
    assert text == '{"a":{"x":[1,2,3],"y":0.5},"b":[1,2],"c":7}'
    assert cache_key(fields) == hashlib.sha256(text.encode()).hexdigest()[:16]
    assert cache_key({"a": 1, "b": 2}) == cache_key({"b": 2, "a": 1})  # field order is not part of it
    assert cache_key({"a": 1}) != cache_key({"a": 1.5})
    assert entry_name({"a": 1}, "z/layer 3") == f"z-layer-3-{cache_key({'a': 1})}"
    assert entry_name({"a": 1}) == cache_key({"a": 1})
    with pytest.raises(TypeError, match="cannot write a object as JSON"):
        cache_key({"a": object()})


def test_one_layout_for_every_kind(tmp_path, monkeypatch):
    monkeypatch.setenv("INTATTN_CACHE", str(tmp_path))
    assert kind_folder("targets") == tmp_path / "targets"
    with pytest.raises(ValueError, match="plain folder name"):
        kind_folder("../targets")
    model = _model()
    entry = cache_entry(kind_folder("traces"), model, "trace-abc-mlp", {"format": 1}, what="trace")
    full = {"model": "tiny@abc", "dtype": "torch.float32", "format": 1}
    assert entry.fields == full
    assert entry.path == tmp_path / "traces" / "tiny@abc" / f"trace-abc-mlp-{cache_key(full)}.json"
    tensors = cache_entry(tmp_path, model, "mom2", {"format": 1}, what="moment", suffix="safetensors")
    assert tensors.path.name.endswith(".safetensors")
    with pytest.raises(ValueError, match=r"\[.dtype.\] of a cache entry are the model.s own"):
        cache_entry(tmp_path, model, "x", {"dtype": "float64"}, what="x")


# ----------------------------------------------------------------------------- writing
def test_an_entry_is_written_atomically(tmp_path):
    entry = cache_entry(tmp_path, _model(), "thing", {"n": 1}, what="thing")
    entry.write_json({"value": [1, 2]})
    assert json.loads(entry.path.read_text()) == {"key": entry.fields, "value": [1, 2]}
    assert entry.read_json() == {"key": entry.fields, "value": [1, 2]}
    # a writer that fails part way leaves the entry as it was and no staging file
    with pytest.raises(TypeError):
        entry.write_json({"value": [1, 2], "broken": object()})
    assert entry.read_json()["value"] == [1, 2]
    assert [p.name for p in entry.path.parent.iterdir()] == [entry.path.name]
    with pytest.raises(ValueError, match="'key' of a cache entry holds its key"):
        entry.write_json({"key": 1})

    moment = cache_entry(tmp_path, _model(), "mom2", {"n": 1}, what="moment", suffix="safetensors")
    moment.write_tensors({"mom2": torch.eye(3, dtype=torch.float64)}, {"counted": "5"})
    tensors, metadata = moment.read_tensors()
    assert torch.equal(tensors["mom2"], torch.eye(3, dtype=torch.float64)) and metadata == {"counted": "5"}


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("content", ["", "{", "[]", "null", "NO_ROWS", "CHECK"])
def test_a_damaged_entry_is_read_as_missing_with_a_warning(tmp_path, content):
    entry = cache_entry(tmp_path, _model(), "thing", {"n": 1}, what="thing")
    assert entry.read_json() is None  # none yet: no warning

    def check(stored):
        if stored["rows"] != [1]:
            raise ValueError("rows are not [1]")

    entry.write_json({"rows": [1]})
    assert entry.read_json(check)["rows"] == [1]
    if content == "NO_ROWS":
        content = json.dumps({"key": entry.fields})
    elif content == "CHECK":
        content = json.dumps({"key": entry.fields, "rows": [2]})
    entry.path.write_text(content)
    with pytest.warns(CacheWarning, match="cached thing .* is damaged"):
        assert entry.read_json(check) is None


def test_a_damaged_tensor_entry_is_read_as_missing_with_a_warning(tmp_path):
    entry = cache_entry(tmp_path, _model(), "mom2", {"n": 1}, what="second moment", suffix="safetensors")
    entry.write_tensors({"mom2": torch.ones(2, 2)})
    entry.path.write_bytes(entry.path.read_bytes()[:40])
    with pytest.warns(CacheWarning, match="cached second moment .* is damaged"):
        assert entry.read_tensors() is None


def test_a_damaged_target_is_recomputed_with_a_warning(tiny_llama, tmp_path):
    hp = ia.EditHparams(layers=(1,), n_context_templates=0, v_steps=2)
    fact = ia.Fact.from_text("w10 w11 w20", "w10", "w40", target_true="w50")
    first = ia.compute_z(tiny_llama, [fact], hp, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.rglob("z-layer1-*.json")
    assert path.parent == tmp_path / tiny_llama.cache_folder
    assert json.loads(path.read_text())["key"]["model"] == tiny_llama.state_id
    path.write_text("{")
    with pytest.warns(CacheWarning, match="cached target .* is damaged"):
        again = ia.compute_z(tiny_llama, [fact], hp, cache_dir=tmp_path, progress=False)
    assert torch.equal(again.z, first.z)
    assert json.loads(path.read_text())["z"] == first.z[0].tolist()  # replaced on disk


def test_an_entry_whose_stored_key_differs_is_not_served(tmp_path):
    one = cache_entry(tmp_path, _model(), "thing", {"n": 1}, what="thing")
    other = cache_entry(tmp_path, _model(), "thing", {"n": 2}, what="thing")
    one.write_json({"rows": [1]})
    other.path.write_bytes(one.path.read_bytes())  # a copy under the other key's name
    with pytest.warns(CacheWarning, match=r"another key \(fields n differ\)"):
        assert other.read_json() is None
    assert one.read_json()["rows"] == [1]
    # a hand-made entry: the right name, the wrong key inside
    forged = CacheEntry(one.path, {**one.fields, "n": 3}, "thing")
    with pytest.warns(CacheWarning, match="another key"):
        assert forged.read_json() is None

    tensors = cache_entry(tmp_path, _model(), "mom2", {"n": 1}, what="moment", suffix="safetensors")
    tensors.write_tensors({"mom2": torch.ones(2, 2)})
    elsewhere = cache_entry(tmp_path, _model(), "mom2", {"n": 2}, what="moment", suffix="safetensors")
    elsewhere.path.write_bytes(tensors.path.read_bytes())
    with pytest.warns(CacheWarning, match="another key"):
        assert elsewhere.read_tensors() is None


# ----------------------------------------------------------------------------- model state
def test_an_entry_of_one_model_state_is_not_read_for_another(tmp_path):
    plain = _model("tiny@abc")
    edited = _model("tiny@abc+edits-0123456789abcdef")  # the same weights file, edited
    for_plain = cache_entry(tmp_path, plain, "thing", {"n": 1}, what="thing")
    for_edited = cache_entry(tmp_path, edited, "thing", {"n": 1}, what="thing")
    assert for_plain.path.parent == for_edited.path.parent and for_plain.path != for_edited.path
    for_plain.write_json({"rows": [1]})
    assert for_edited.read_json() is None  # another file: a miss, not a warning
    for_edited.path.write_bytes(for_plain.path.read_bytes())
    with pytest.warns(CacheWarning, match="fields model differ"):
        assert for_edited.read_json() is None
    half = _model("tiny@abc", dtype=torch.float16)
    assert cache_entry(tmp_path, half, "thing", {"n": 1}, what="thing").path != for_plain.path


def test_an_edited_model_has_entries_of_its_own(tiny_llama, tmp_path):
    before = cache_entry(tmp_path, tiny_llama, "thing", {"n": 1}, what="thing")
    before.write_json({"rows": [1]})
    generator = torch.Generator().manual_seed(5)
    weight = tiny_llama.weight("mlp", 0)
    with ia.apply_deltas(tiny_llama, {("mlp", 0): torch.randn(weight.shape, generator=generator)}):
        during = cache_entry(tmp_path, tiny_llama, "thing", {"n": 1}, what="thing")
        assert during.fields["model"] == tiny_llama.state_id != before.fields["model"]
        assert during.path != before.path and during.read_json() is None
    after = cache_entry(tmp_path, tiny_llama, "thing", {"n": 1}, what="thing")
    assert after == before and after.read_json()["rows"] == [1]


# ----------------------------------------------------------------------------- shipped samples
@pytest.mark.parametrize("path", sorted(SHIPPED_SAMPLES.glob("*.json.gz")), ids=lambda p: p.name.split("--")[0])
def test_the_shipped_samples_are_found(path):
    with gzip.open(path, "rt") as handle:
        key = json.load(handle)["key"]
    name, revision = key["model"].split("@")
    model = ModelHandle(name=name, bridge=None, hf_model=None, tokenizer=None, spec=None, revision=revision)
    samples = ModelSamples()
    assert samples.corpus_id == key["corpus"]
    assert samples.shipped_file(model, key["max_len"]) == path
    assert samples._cache_key(model, key["max_len"]) == key
    # samples not shipped would be shipped under the name of their cache entry
    entry = samples._cache_file(Path("corpora"), model, key["max_len"] + 1)
    assert samples.shipped_file(model, key["max_len"] + 1) == SHIPPED_SAMPLES / f"{model.cache_folder}--{entry.name}.gz"
