"""Reliability: what must never happen silently, kept as tests.

* Edits on one model form a stack: restoring out of order is either exact or refused
  with a message that names the edits in the way.
* A damaged cache file is reported and recomputed, never a crash that lasts until
  someone deletes it.
* Layer lists are integers, never truncated floats; a missing per-layer alpha, bad
  saved deltas (NaN, garbage, truncated, applied twice) and conflicting requests in one
  batch are named errors.
"""

from __future__ import annotations

import re

import pytest
import torch

import intattn_analysis as ia
from intattn_analysis.datasets import DatasetWarning
from intattn_analysis.editing import EditError


def _state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.hf_model.named_parameters()}


def _unchanged(model, before) -> bool:
    return all(torch.equal(p, before[n]) for n, p in model.hf_model.named_parameters())


def _random_delta(model, module: str, layer: int, seed: int) -> dict:
    weight = model.weight(module, layer)
    generator = torch.Generator().manual_seed(seed)
    return {(module, layer): 0.01 * torch.randn(weight.shape, generator=generator)}


def test_restoring_under_a_later_edit_of_the_same_matrix_refuses(tiny_llama):
    model, before = tiny_llama, _state(tiny_llama)
    a = ia.apply_deltas(model, _random_delta(model, "mlp", 1, seed=1))
    b = ia.apply_deltas(model, _random_delta(model, "mlp", 1, seed=2))
    assert model.open_edits == 2
    with pytest.raises(EditError, match=r"later edits of the same matrices.*mlp@1"):
        a.restore()
    assert a in model.applied_edits and not a.restored  # nothing was written
    b.restore()
    a.restore()
    assert model.open_edits == 0 and a.restored and b.restored
    assert _unchanged(model, before)
    a.restore()  # a second restore is a no-op, even after other edits came and went
    assert _unchanged(model, before)


def test_a_second_restore_does_not_wipe_a_newer_edit(tiny_llama):
    model, before = tiny_llama, _state(tiny_llama)
    a = ia.apply_deltas(model, _random_delta(model, "mlp", 2, seed=3))
    a.restore()
    b = ia.apply_deltas(model, _random_delta(model, "mlp", 2, seed=4))
    edited = model.weight("mlp", 2).detach().clone()
    a.restore()
    assert torch.equal(model.weight("mlp", 2), edited)  # b is still there
    b.restore()
    assert _unchanged(model, before)


def test_edits_of_other_matrices_restore_in_any_order(tiny_llama):
    model, before = tiny_llama, _state(tiny_llama)
    a = ia.apply_deltas(model, _random_delta(model, "mlp", 0, seed=5))
    b = ia.apply_deltas(model, _random_delta(model, "attn", 0, seed=6))
    with_b = model.weight("attn", 0).detach().clone()
    a.restore()  # b writes another matrix: restoring a first is exact
    assert torch.equal(model.weight("attn", 0), with_b)
    mlp_name = next(n for n, p in model.hf_model.named_parameters() if p is model.weight("mlp", 0))
    assert torch.equal(model.weight("mlp", 0), before[mlp_name])
    b.restore()
    assert _unchanged(model, before)


# ----------------------------------------------------------------------------- caches
TEXTS = [" ".join(f"w{3 + (7 * i + j) % 120}" for j in range(12)) for i in range(40)]


def _moments(model, cache_dir):
    from intattn_analysis.covariance import second_moments

    return second_moments(model, [1], modules=("mlp",), corpus=TEXTS, n_tokens=300, max_len=12,
                          cache_dir=cache_dir, progress=False)


@pytest.mark.parametrize("damage", ["truncated", "empty", "wrong shape", "not finite"])
def test_a_damaged_second_moment_file_is_recomputed(tiny_llama, tmp_path, damage):
    from safetensors import safe_open
    from safetensors.torch import save_file

    first = _moments(tiny_llama, tmp_path)[("mlp", 1)]
    (path,) = tmp_path.rglob("mom2-*.safetensors")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata()
        bad = torch.zeros(3, 3) if damage == "wrong shape" else torch.full_like(first.cpu(), float("nan"))
        save_file({"mom2": bad}, str(path), metadata=metadata)
    with pytest.warns(UserWarning, match="is damaged"):
        again = _moments(tiny_llama, tmp_path)[("mlp", 1)]
    assert torch.equal(again, first)  # the same tokens in the same batches: the same sums
    assert torch.equal(_moments(tiny_llama, tmp_path)[("mlp", 1)], first)  # replaced on disk


# ----------------------------------------------------------------------------- arguments
@pytest.mark.parametrize("layers", [[1.7], [3.0], [True], "1", [], [-1]])
def test_layer_lists_are_integers_never_truncated(layers):
    from intattn_analysis.architectures import layer_indices
    from intattn_analysis.hparams import EditHparams

    with pytest.raises(ValueError, match="layers"):
        layer_indices(layers)
    with pytest.raises(ValueError, match="layers"):
        EditHparams(layers=layers)
    assert layer_indices(5) == (5,) and layer_indices([4, 2, 4]) == (2, 4)
    with pytest.raises(ValueError, match=r"layer 3 is outside the model; layers must be in \[0, 2\]"):
        layer_indices([0, 3], n_layers=3)


def test_edit_and_trace_name_bad_layers_and_alphas(tiny_llama):
    hp = ia.EditHparams(layers=(1, 2), n_context_templates=0, v_steps=1)
    fact = ia.Fact.from_text("w10 w11 w20", "w10", "w40", target_true="w50")
    with pytest.raises(EditError, match="alpha has no value for edited layer 2"):
        ia.edit(tiny_llama, [fact], method="intattn", hparams=hp, alpha={1: 0.5}, moments={},
                progress=False)
    with pytest.raises(EditError, match="integer layer indices, got 1.7"):
        ia.edit(tiny_llama, [fact], hparams=hp, layers=[1.7], progress=False)
    with pytest.raises(ValueError, match="integer layer indices, got 1.7"):
        ia.trace(tiny_llama, [fact], layers=[1.7], window=1, progress=False)
    assert tiny_llama.open_edits == 0


# ----------------------------------------------------------------------------- saved deltas
def test_apply_deltas_refuses_bad_and_repeated_deltas(tiny_llama, tmp_path):
    model, before = tiny_llama, _state(tiny_llama)
    delta = _random_delta(model, "mlp", 1, seed=7)
    nan = {key: value.clone().fill_(float("nan")) for key, value in delta.items()}
    with pytest.raises(EditError, match="NaN or infinite"):
        ia.apply_deltas(model, nan)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(EditError, match="not a readable deltas file"):
        ia.apply_deltas(model, garbage)
    assert _unchanged(model, before) and model.open_edits == 0
    first = ia.apply_deltas(model, delta)
    path = first.save(tmp_path / "edit.safetensors")
    with pytest.raises(EditError, match="already applied"):
        ia.apply_deltas(model, path)  # the file of the edit that is still applied
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(path.read_bytes()[:200])
    with pytest.raises(EditError, match="not a readable deltas file"):
        ia.apply_deltas(model, truncated)
    second = ia.apply_deltas(model, path, allow_repeat=True)  # asked for explicitly
    second.restore()
    first.restore()
    assert _unchanged(model, before)
    again = ia.apply_deltas(model, path)  # once restored, the file applies again
    again.restore()
    assert _unchanged(model, before)


def test_conflicting_edits_in_one_batch_are_refused(tiny_llama):
    rome = ia.Fact.from_text("w10 w11 w20", "w10", "w40", target_true="w50")
    london = ia.Fact.from_text("w10 w11 w20", "w10", "w41", target_true="w50")
    with pytest.raises(EditError, match=r"facts\[0\] and facts\[1\] ask .* two answers"):
        ia.edit(tiny_llama, [rome, london], hparams=ia.EditHparams(layers=(1,)), moments={},
                progress=False)
    assert tiny_llama.open_edits == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(format=123), "format must be a format name"),
    (dict(limit=True), "limit must be a non-negative integer"),
    (dict(limit=-1), "limit must be a non-negative integer"),
])
def test_load_facts_names_bad_arguments(kwargs, match):
    with pytest.raises(ia.DatasetError, match=match):
        ia.load_facts("builtin", **kwargs)


# ----------------------------------------------------------------------------- datasets
def _write(tmp_path, records):
    import json

    path = tmp_path / "facts.json"
    path.write_text(json.dumps(records))
    return path


KNOWEDIT = {"subject": "Paris", "prompt": "Paris is the capital of", "target_new": "Italy",
            "ground_truth": ["France"], "rephrase_prompt": "Paris is a capital city in",
            "locality": {}, "portability": {}}
FLAT = {"subject": "Rome", "prompt": "Rome is the capital of", "target_new": "Spain",
        "ground_truth": "Italy", "rephrase_prompt": "Rome is a capital city in",
        "locality_prompt": "Madrid is the capital of", "locality_ground_truth": "Spain"}


def test_a_file_that_mixes_formats_is_refused(tmp_path):
    path = _write(tmp_path, [KNOWEDIT, FLAT])
    with pytest.raises(ia.DatasetError, match=r"record 1.*not those of the 'knowedit' format.*'counterfact-flat'"):
        ia.load_facts(path)
    with pytest.warns(DatasetWarning, match="skipped 1 bad record"):
        facts = ia.load_facts(path, strict=False)
    assert [f.subject for f in facts] == ["Paris"]


def test_a_misspelt_key_is_refused(tmp_path):
    record = dict(KNOWEDIT)
    record["rephrase_promt"] = record.pop("rephrase_prompt")
    with pytest.raises(ia.DatasetError, match=r"rephrase_promt.*did you mean 'rephrase_prompt'"):
        ia.load_facts(_write(tmp_path, [record]))
    with pytest.warns(DatasetWarning, match="skipped 1 bad record"):
        assert ia.load_facts(_write(tmp_path, [record]), strict=False) == []


def test_a_subject_inside_a_longer_word_is_refused(tmp_path):
    record = dict(KNOWEDIT, subject="Java", prompt="JavaScript was designed by the makers of Java and")
    (fact,) = ia.load_facts(_write(tmp_path, [record]))
    assert fact.prompt == "JavaScript was designed by the makers of {} and"  # the whole word
    record = dict(KNOWEDIT, subject="Java", prompt="JavaScript was designed by")
    with pytest.raises(ia.DatasetError, match="only inside a longer word"):
        ia.load_facts(_write(tmp_path, [record]))


@pytest.mark.parametrize("content", ["", "{", "[]", "null", "[1, 2, 3]", "WRONG_LENGTH", "NAN"])
def test_a_damaged_target_file_is_recomputed(tiny_llama, tmp_path, content):
    import json

    hp = ia.EditHparams(layers=(1,), n_context_templates=0, v_steps=3)
    fact = ia.Fact.from_text("w10 w11 w20", "w10", "w40", target_true="w50")
    first = ia.compute_z(tiny_llama, [fact], hp, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.rglob("z-*.json")
    stored = json.loads(path.read_text())
    if content == "WRONG_LENGTH":
        content = json.dumps(dict(stored, z=stored["z"][:5]))
    elif content == "NAN":
        content = json.dumps(dict(stored, z=[float("nan")] * len(stored["z"])))
    path.write_text(content)
    with pytest.warns(UserWarning, match="cached target .* is damaged"):
        again = ia.compute_z(tiny_llama, [fact], hp, cache_dir=tmp_path, progress=False)
    torch.testing.assert_close(again.z, first.z, rtol=0, atol=0)  # the same computation again
    assert json.loads(path.read_text())["z"] == stored["z"]  # replaced on disk


def test_an_interrupted_target_run_keeps_its_finished_batches(tiny_llama, tmp_path, monkeypatch):
    """Targets are written to the cache batch by batch: a failure in the second batch
    leaves the first batch's files, and the rerun computes only the rest."""
    from intattn_analysis import targets

    hp = ia.EditHparams(layers=(1,), n_context_templates=0, v_steps=3)
    facts = [ia.Fact.from_text("w10 w11 w20", "w10", "w40", target_true="w50"),
             ia.Fact.from_text("w12 w13 w21", "w12", "w41", target_true="w51")]
    real = targets.compute_z
    calls = []

    def failing_second(model, chunk, *args, **kwargs):
        calls.append([f.key for f in chunk])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(model, chunk, *args, **kwargs)

    monkeypatch.setattr(targets, "compute_z", failing_second)
    with pytest.raises(KeyboardInterrupt):
        real(tiny_llama, facts, hp, cache_dir=tmp_path, batch_size=1, progress=False)
    assert len(list(tmp_path.rglob("z-*.json"))) == 1
    calls.clear()
    monkeypatch.setattr(targets, "compute_z", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    again = real(tiny_llama, facts, hp, cache_dir=tmp_path, batch_size=1, progress=False)
    assert len(calls) == 1 and again.z.shape[0] == 2  # only the missing fact was computed
    assert len(list(tmp_path.rglob("z-*.json"))) == 2


@pytest.mark.parametrize("content", ["[1, 2, 3, 4]", '["{}", 5]', "null", "{"])
def test_damaged_context_prefixes_are_written_again(tiny_llama, tmp_path, monkeypatch, content):
    from intattn_analysis import targets

    monkeypatch.setenv("INTATTN_CACHE", str(tmp_path))
    monkeypatch.setattr(targets, "_TEMPLATES", {})
    first = targets.context_templates(tiny_llama, 1, 3)
    (path,) = (tmp_path / "context_templates").rglob("templates-*.json")
    path.write_text(content)
    monkeypatch.setattr(targets, "_TEMPLATES", {})
    with pytest.warns(UserWarning, match="context prefixes .* is damaged"):
        assert targets.context_templates(tiny_llama, 1, 3) == first


@pytest.mark.parametrize("content", ["", '{"rows": []}', '{"rows": null}', '{"rows": [1, 2]}',
                                     "OTHER_FACT", "NAN"])
def test_a_damaged_trace_file_is_reported(tmp_path, content):
    import json

    from intattn_analysis import tracing
    from intattn_analysis.cache import CacheEntry

    fact = ia.Fact.from_text("w10 w11 w20", "w10", "w40", target_true="w50")
    row = {"fact": fact.key, "subject": "w10", "kind": "mlp", "token": 0, "token_text": "w10",
           "token_class": "subject_first", "layer": 1, "p_clean": 0.5, "p_corrupted": 0.1,
           "p_restored": 0.3, "ie": 0.2, "severed": "none"}
    entry = CacheEntry(tmp_path / "trace.json", {"fact": fact.key, "kind": "mlp"}, "trace")
    entry.write_json({"rows": [row]})
    assert tracing._read_cached(entry, fact, "mlp") == [row]
    if content == "OTHER_FACT":
        content = json.dumps({"key": entry.fields, "rows": [dict(row, fact="another")]})
    elif content == "NAN":
        content = json.dumps({"key": entry.fields, "rows": [dict(row, ie=float("nan"))]})
    elif content.startswith("{"):
        content = json.dumps({"key": entry.fields, **json.loads(content)})
    entry.path.write_text(content)
    with pytest.warns(UserWarning, match="cached trace .* is damaged"):
        assert tracing._read_cached(entry, fact, "mlp") is None
    absent = CacheEntry(tmp_path / "absent.json", entry.fields, "trace")
    assert tracing._read_cached(absent, fact, "mlp") is None


def test_staging_files_of_a_killed_writer_are_removed(tmp_path):
    import os
    import time

    from intattn_analysis.loading import STALE_STAGING_SECONDS, write_json_atomic

    path = tmp_path / "entry.json"
    stale = tmp_path / ".entry.json.abc123.tmp"  # a writer killed before its rename
    fresh = tmp_path / ".entry.json.def456.tmp"  # a writer at work right now
    for staging in (stale, fresh):
        staging.write_text("{")
    old = time.time() - STALE_STAGING_SECONDS - 60
    os.utime(stale, (old, old))
    write_json_atomic(path, {"ok": 1})
    assert path.read_text() == '{"ok": 1}'
    assert not stale.exists() and fresh.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".entry.json.def456.tmp", "entry.json"]


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("kwargs, match", [
    (dict(name=None), "name must be an embedded model"),
    (dict(name=""), "name must be an embedded model"),
    (dict(name="smollm2-135m", dtype="bogus"), "dtype must be one of"),
    (dict(name="smollm2-135m", n_devices=0), "n_devices must be a positive integer"),
    (dict(name="smollm2-135m", n_devices=-1), "n_devices must be a positive integer"),
    (dict(name="/no/such/model/dir"), "there is no model directory at '/no/such/model/dir'"),
])
def test_load_model_names_bad_arguments_at_once(kwargs, match):
    import time

    started = time.perf_counter()
    with pytest.raises(ia.ModelLoadError, match=match):
        ia.load_model(**kwargs)
    assert time.perf_counter() - started < 5  # before any loading or hub retries


def test_a_directory_without_a_tokenizer_or_config_is_named(tmp_path, tiny_llama):
    tiny_llama.hf_model.config.save_pretrained(tmp_path)
    with pytest.raises(ia.ModelLoadError, match="has no tokenizer.*tokenizer.save_pretrained"):
        ia.load_model(str(tmp_path))
    (tmp_path / "config.json").unlink()
    with pytest.raises(ia.ModelLoadError, match="has no config.json"):
        ia.load_model(str(tmp_path))


def test_an_unknown_hub_id_offline_fails_at_once(monkeypatch):
    import time

    from intattn_analysis import loading

    monkeypatch.setattr(loading, "_hub_reachable", lambda timeout=2.0: False)
    started = time.perf_counter()
    with pytest.raises(ia.ModelLoadError, match=r"org-that-does-not-exist/model-xyz.*smollm2-135m"):
        ia.load_model("org-that-does-not-exist/model-xyz")
    assert time.perf_counter() - started < 5


def test_dtype_names_become_torch_dtypes():
    from intattn_analysis.loading import _dtype

    assert _dtype("float16") is torch.float16 and _dtype("torch.bfloat16") is torch.bfloat16
    assert _dtype(None) is torch.float32 and _dtype(torch.float64) is torch.float64


def test_a_truncated_checkpoint_is_detected(tmp_path, tiny_llama, tiny_tokenizer_dir):
    import transformers

    from intattn_analysis.loading import _checkpoint_problem

    # a fresh model: the loaded one is wrapped by the bridge and cannot be saved as it is
    transformers.AutoModelForCausalLM.from_config(tiny_llama.hf_model.config).save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(tiny_tokenizer_dir).save_pretrained(tmp_path)
    assert _checkpoint_problem(tmp_path) is None
    (weights,) = tmp_path.glob("*.safetensors")
    weights.write_bytes(weights.read_bytes()[:-1000])
    assert "header promises" in _checkpoint_problem(tmp_path)


# ----------------------------------------------------------------------------- command line
@pytest.mark.parametrize("arguments, match", [
    (["--methods", "bogus"], r"--methods: unknown method\(s\) \['bogus'\]"),
    (["--metrics", "accuracy"], r"--metrics: unknown metric set"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--alpha", "1.5"], r"--alpha must lie in \[0, 1\]"),
    (["--out", "/proc/no-such-place/run"], "--out /proc/no-such-place/run: cannot write"),
    (["--data", "no/such/file.json"], "no/such/file.json"),
])
def test_evaluate_checks_its_arguments_before_any_work(arguments, match, capsys, monkeypatch):
    from intattn_analysis import cli, loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(loading, "load_model", no_loading)
    assert cli.main(["evaluate", *arguments]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("intattn evaluate: error:")
    assert re.search(match, err), err
    with pytest.raises(Exception, match=match):
        cli.main(["evaluate", *arguments, "--debug"])


# ----------------------------------------------------------------------------- benchmark files
@pytest.fixture
def no_local_data(tmp_path, monkeypatch):
    from intattn_analysis import benchmarks

    monkeypatch.delenv("INTATTN_DATA_DIR", raising=False)
    monkeypatch.setenv("INTATTN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(benchmarks, "CHECKOUT_DATA", tmp_path / "no-checkout-data")
    return benchmarks


def test_a_benchmark_name_is_found_in_the_users_folder_first(no_local_data, tmp_path, monkeypatch):
    import json

    folder = tmp_path / "mine"
    (folder / "knowedit").mkdir(parents=True)
    (folder / "knowedit" / "ZsRE-test-all.json").write_text(json.dumps([KNOWEDIT]))
    monkeypatch.setenv("INTATTN_DATA_DIR", str(folder))
    (fact,) = ia.load_facts("knowedit/ZsRE-test-all")
    assert fact.subject == "Paris"
    assert no_local_data.resolve_benchmark("knowedit/ZsRE-test-all.json").parent == folder / "knowedit"


def test_offline_a_missing_benchmark_names_every_option_at_once(no_local_data, monkeypatch):
    import time
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    started = time.perf_counter()
    with pytest.raises(ia.DatasetError, match=r"checkout data folder.*download cache.*download from "
                                              r"https://raw.githubusercontent.com/.*failed.*INTATTN_DATA_DIR"):
        ia.load_facts("knowedit/ZsRE-test-all")
    assert time.perf_counter() - started < 5
    with pytest.raises(ia.DatasetError, match="no download source gives exactly this file"):
        no_local_data.resolve_benchmark("knowedit/wiki_counterfact_test_cf")


def test_a_download_is_kept_only_with_its_recorded_checksum(no_local_data, monkeypatch):
    import hashlib
    import io
    import json
    import urllib.request

    payload = json.dumps([KNOWEDIT]).encode()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    with pytest.raises(ia.DatasetError, match="has sha256 .* not the recorded"):
        no_local_data.resolve_benchmark("knowedit/ZsRE-test-all")
    name = "knowedit/ZsRE-test-all"
    pinned = no_local_data.BENCHMARKS[name]
    from dataclasses import replace

    monkeypatch.setitem(no_local_data.BENCHMARKS, name,
                        replace(pinned, sha256=hashlib.sha256(payload).hexdigest()))
    path = no_local_data.resolve_benchmark(name)
    assert path.read_bytes() == payload and "cache" in str(path)
    status = {row["name"]: row for row in no_local_data.benchmark_status()}
    assert status[name]["found in"] == "download cache" and status[name]["sha256 ok"]
    assert status["mquake/MQuAKE-hard"]["found in"] == "missing"
