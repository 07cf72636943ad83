"""Key second moments (covariance.py) and their corpora (corpus.py)."""

from __future__ import annotations

import gzip
import json

import pytest
import torch

from intattn_analysis import corpus as corpus_module
from intattn_analysis import covariance
from intattn_analysis.corpus import (
    CorpusError,
    ModelSamples,
    TextCorpus,
    resolve_corpus,
    special_prefix,
)
from intattn_analysis.covariance import (
    SecondMoments,
    cache_file,
    second_moments,
    second_moments_per_layer,
)

torch.set_num_threads(1)

SENTENCES = [
    "The Eiffel Tower is located in the city of Paris.",
    "Water boils at one hundred degrees.",
    "Hi",
    "Marie Curie was a physicist and chemist who conducted pioneering research on radioactivity.",
]


def _n_tokens(model, texts) -> int:
    return sum(len(ids) for ids in model.tokenize(texts))


def _direct(model, texts, pairs) -> dict:
    """``E[k kᵀ]`` from one unpadded forward per text, in float64."""
    sums = {p: 0 for p in pairs}
    count = 0
    names = {model.layer(l).key_hook(m): (m, l) for m, l in pairs}
    for ids in model.tokenize(texts):
        _, cache = model.bridge.run_with_cache(
            torch.tensor([ids]), names_filter=lambda n: n in names
        )
        for name, pair in names.items():
            keys = cache[name][0].reshape(len(ids), -1).double()
            sums[pair] = sums[pair] + keys.T @ keys
        count += len(ids)
    return {p: s / count for p, s in sums.items()}


#: Allowed difference between two estimates of ``E[k kᵀ]`` from forwards of different batch
#: shapes, in units of ``sqrt(C_ii C_jj)``. A key is a float32 activation after up to 5
#: blocks, each a sum over d <= 1536 terms whose order depends on the batch shape and the
#: thread count: each key element may move by about n_blocks · sqrt(d) · u ≈ 5 · 39 ·
#: 6e-8 ≈ 1.2e-5 of its vector's scale (u: float32 unit roundoff). A product k_i k_j
#: averaged over tokens then moves by at most 2 · 1.2e-5 · sqrt(C_ii C_jj)
#: (Cauchy–Schwarz), 2.4e-5; the bound is taken with a factor 4 of margin. An entry-wise
#: relative tolerance cannot work: entries that nearly cancel have no relative precision.
#: (Measured: at most 6.2e-6 on 1 and 2 threads.)
MOMENT_TOLERANCE = 1e-4


def _assert_moments_close(actual, expected) -> None:
    scale = expected.diagonal().clamp(min=0).sqrt()
    bound = MOMENT_TOLERANCE * scale[:, None] * scale[None, :]
    excess = (actual - expected).abs() - bound
    assert float(excess.max()) <= 0, (
        f"{int((excess > 0).sum())} entries differ by more than {MOMENT_TOLERANCE} sqrt(C_ii C_jj)"
    )


def _hooks_on(bridge) -> int:
    return sum(len(hp.fwd_hooks) + len(hp._forward_hooks) for hp in bridge.hook_dict.values())


# ----------------------------------------------------------------------------- numbers
def test_matches_direct_computation_with_padding(smollm2):
    pairs = [("mlp", 0), ("attn", 0), ("mlp", 4), ("attn", 4)]
    n = _n_tokens(smollm2, SENTENCES)
    expected = _direct(smollm2, SENTENCES, pairs)
    # batch of unequal lengths (right padding) and one sequence at a time
    batched = second_moments(smollm2, [0, 4], corpus=SENTENCES, n_tokens=n, batch_size=4,
                             dtype=torch.float64, cache_dir=False, progress=False)
    single = second_moments(smollm2, [0, 4], corpus=SENTENCES, n_tokens=n, batch_size=1,
                            dtype=torch.float64, cache_dir=False, progress=False)
    assert batched.n_tokens == single.n_tokens == n
    for pair in pairs:
        assert batched[pair].dtype == torch.float64
        _assert_moments_close(batched[pair], expected[pair])
        _assert_moments_close(single[pair], expected[pair])
        _assert_moments_close(batched[pair], single[pair])
    assert batched[("attn", 0)].shape == (576, 576)
    assert batched[("mlp", 0)].shape == (1536, 1536)


def test_one_pass_equals_per_layer_passes(smollm2):
    kwargs = dict(corpus=SENTENCES * 3, n_tokens=80, max_len=16, batch_size=5, progress=False)
    one = second_moments(smollm2, [1, 6, 13], cache_dir=False, **kwargs)
    per_layer = second_moments_per_layer(smollm2, [1, 6, 13], **kwargs)
    assert set(one) == set(per_layer) == {(m, l) for m in ("mlp", "attn") for l in (1, 6, 13)}
    for pair in one:
        # the same forwards of the same batches, read at other hooks: the sums are the same
        # float operations in the same order, so only float64 accumulation rounding may differ
        torch.testing.assert_close(one[pair], per_layer[pair], rtol=1e-12, atol=1e-12)
    assert one.n_tokens == per_layer.n_tokens == 80


def test_n_tokens_is_exact_and_sequences_are_capped(smollm2):
    source = resolve_corpus(SENTENCES)
    sequences = source.sequences(smollm2, n_tokens=20, max_len=4)
    assert sum(len(s) for s in sequences) == 20
    assert max(len(s) for s in sequences) <= 4


@pytest.mark.parametrize("fixture", ["smollm2", "gemma3"])
def test_attention_key_is_o_proj_input_layout(fixture, request):
    model = request.getfixturevalue(fixture)
    layer = 1
    spec = model.layer(layer)
    ids = torch.tensor(model.tokenize(["The Eiffel Tower is located in"]))
    _, cache = model.bridge.run_with_cache(
        ids, names_filter=lambda n: n in (spec.key_hook("attn"), spec.value_hook("attn"))
    )
    key = cache[spec.key_hook("attn")]
    assert key.ndim == 4  # [batch, pos, head, d_head]: flattened head-major by the collector
    flat = key.reshape(*key.shape[:2], -1)
    module = model.module("attn", layer)
    value = flat @ module.weight.T + (module.bias if module.bias is not None else 0)
    # the same float32 matmul as o_proj's, possibly with another kernel's summation order:
    # sqrt(d) · u ≈ 24 · 6e-8 ≈ 1.5e-6 of the outputs' scale (~1), well inside 1e-5
    torch.testing.assert_close(value, cache[spec.value_hook("attn")], rtol=1e-4, atol=1e-5)
    # the moment has the o_proj input dimension
    result = second_moments(model, layer, "attn", corpus=SENTENCES[:1], n_tokens=5,
                            cache_dir=False, progress=False)
    assert result[("attn", layer)].shape == (module.weight.shape[1],) * 2


def test_special_prefix_starts_every_sequence(gemma3, smollm2):
    prefix = special_prefix(gemma3)
    assert prefix == [gemma3.tokenizer.bos_token_id]
    for sequence in resolve_corpus(SENTENCES).sequences(gemma3, n_tokens=30, max_len=6):
        assert sequence[0] == prefix[0] and len(sequence) <= 6
    assert special_prefix(smollm2) == []


# ----------------------------------------------------------------------------- early stop, hooks
def test_forward_stops_after_last_needed_layer(smollm2):
    fired: list[str] = []
    record = lambda x, hook: fired.append(hook.name)  # noqa: E731
    before = _hooks_on(smollm2.bridge)
    with smollm2.bridge.hooks(fwd_hooks=[
        (lambda n: n.endswith("hook_resid_pre") or n == "ln_final.hook_out", record)
    ]):
        second_moments(smollm2, [1, 3], corpus=SENTENCES, n_tokens=30, batch_size=2,
                       cache_dir=False, progress=False)
    layers = {int(n.split(".")[1]) for n in fired if n.startswith("blocks.")}
    assert layers == {0, 1, 2, 3}
    assert "ln_final.hook_out" not in fired
    batches = 2  # 30 tokens of these sentences fill two batches of two
    assert len(fired) == 4 * batches
    assert _hooks_on(smollm2.bridge) == before


def test_no_hooks_left_after_an_error(smollm2):
    before = _hooks_on(smollm2.bridge)

    def fail(x, hook):
        raise RuntimeError("injected")

    with pytest.raises(RuntimeError, match="injected"):
        with smollm2.bridge.hooks(fwd_hooks=[("blocks.2.hook_resid_pre", fail)]):
            second_moments(smollm2, [5], corpus=SENTENCES, n_tokens=10,
                           cache_dir=False, progress=False)
    assert _hooks_on(smollm2.bridge) == before


# ----------------------------------------------------------------------------- cache
def test_cache_hit_does_not_run_the_model(smollm2, tmp_path, monkeypatch):
    kwargs = dict(corpus=SENTENCES, n_tokens=25, max_len=12, cache_dir=tmp_path, progress=False)
    first = second_moments(smollm2, [0, 2], **kwargs)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 4

    def no_forward(*args, **kw):
        raise AssertionError("the model ran on a cache hit")

    with monkeypatch.context() as patch:
        patch.setattr(smollm2.bridge, "forward", no_forward)
        again = second_moments(smollm2, [0, 2], **kwargs)
        subset = second_moments(smollm2, [2], "attn", **kwargs)
    for pair in first:
        assert torch.equal(first[pair], again[pair])
    assert torch.equal(subset[("attn", 2)], first[("attn", 2)])
    assert again.n_tokens == 25 and again.seconds == 0

    # a superset computes only the missing pairs, in one pass
    passes: list[list] = []
    collect = covariance._collect
    def counting_collect(model, pairs, *args, **kwargs):
        passes.append(list(pairs))
        return collect(model, pairs, *args, **kwargs)

    monkeypatch.setattr(covariance, "_collect", counting_collect)
    more = second_moments(smollm2, [0, 2, 3], **kwargs)
    assert passes == [[("mlp", 3), ("attn", 3)]]
    assert torch.equal(more[("mlp", 0)], first[("mlp", 0)])


def test_cache_key_names_every_setting(smollm2, tmp_path):
    base = dict(cache_dir=tmp_path, model=smollm2, module="mlp", layer=3,
                corpus_id="texts:abc", n_tokens=100, max_len=64, dtype=torch.float32)
    reference = cache_file(**base)
    for change in (dict(module="attn"), dict(layer=4), dict(corpus_id="texts:abd"),
                   dict(n_tokens=101), dict(max_len=65), dict(dtype=torch.float64)):
        assert cache_file(**{**base, **change}) != reference, change
    assert resolve_corpus(SENTENCES).corpus_id != resolve_corpus(SENTENCES[:3]).corpus_id
    assert resolve_corpus(SENTENCES).corpus_id == resolve_corpus(list(SENTENCES)).corpus_id


def test_text_files_hash_their_content(smollm2, tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(SENTENCES[0])
    (folder / "sub" / "b.txt").write_text(SENTENCES[3])
    (folder / "ignored.md").write_text("not read")
    before = resolve_corpus(folder)
    assert before.corpus_id.startswith("text-files:")
    assert resolve_corpus(str(folder / "a.txt")).corpus_id != before.corpus_id
    from_files = second_moments(smollm2, [1], "mlp", corpus=folder, n_tokens=20, max_len=8,
                                cache_dir=False, progress=False)
    from_list = second_moments(smollm2, [1], "mlp", corpus=[SENTENCES[0], SENTENCES[3]],
                               n_tokens=20, max_len=8, cache_dir=False, progress=False)
    # the same token sequences in the same batches, so the same float operations; the
    # float32 default (rtol 1.3e-6) leaves room only for a kernel's run-to-run variation
    torch.testing.assert_close(from_files[("mlp", 1)], from_list[("mlp", 1)])
    (folder / "a.txt").write_text(SENTENCES[1])
    assert resolve_corpus(folder).corpus_id != before.corpus_id


# ----------------------------------------------------------------------------- sampled corpus
def test_model_samples_are_seeded_cached_and_extend(smollm2, tmp_path, monkeypatch):
    samples = ModelSamples(seed=3, batch=4)
    assert samples.corpus_id == "model-samples:seed3:batch4"
    assert resolve_corpus(None).corpus_id == "model-samples:seed0"
    small = samples.sequences(smollm2, 30, 10, cache_dir=tmp_path, progress=False)
    assert sum(map(len, small)) == 30 and max(map(len, small)) <= 10
    large = samples.sequences(smollm2, 70, 10, cache_dir=tmp_path, progress=False)
    assert sum(map(len, large)) == 70
    flat_small, flat_large = sum(small, []), sum(large, [])
    assert flat_large[:30] == flat_small  # the first tokens do not depend on the total
    eos = smollm2.tokenizer.eos_token_id
    assert eos not in flat_large

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again although the corpus is cached")

    monkeypatch.setattr(corpus_module, "_hf_sampler", no_sampling)
    assert samples.sequences(smollm2, 70, 10, cache_dir=tmp_path, progress=False) == large


def test_shipped_samples_come_first_when_their_key_matches(smollm2, tmp_path, monkeypatch):
    samples = ModelSamples(seed=5, batch=4)
    cache = tmp_path / "cache"
    key = samples._cache_key(smollm2, 10)
    samples.sequences(smollm2, 400, 10, cache_dir=tmp_path / "fresh", progress=False)
    fresh = corpus_module._read_samples(samples._cache_file(tmp_path / "fresh", smollm2, 10), key)
    shipped_dir = tmp_path / "shipped"
    monkeypatch.setattr(corpus_module, "SHIPPED_SAMPLES", shipped_dir)
    shipped_dir.mkdir()
    # shipped text that sampling could not produce, so that reading it is visible
    rows = [[7, 8, 9]] * 20
    path = samples.shipped_file(smollm2, 10)
    assert path.parent == shipped_dir and path.name.endswith(".json.gz")
    with gzip.open(path, "wt") as fh:
        json.dump({"key": key, "rows": rows}, fh)

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled although the shipped samples hold enough tokens")

    with monkeypatch.context() as patch:
        patch.setattr(corpus_module, "_hf_sampler", no_sampling)
        assert samples.sequences(smollm2, 30, 10, cache_dir=cache, progress=False) == rows[:10]
        assert not list(cache.glob("**/*.json"))  # nothing sampled, nothing cached
    # asked for more than they hold: extended from the shipped rows, batch by batch
    longer = samples.sequences(smollm2, 90, 10, cache_dir=cache, progress=False)
    assert longer[:20] == rows and sum(map(len, longer)) == 90
    extended = corpus_module._read_samples(samples._cache_file(cache, smollm2, 10), key)
    assert extended[:20] == rows and len(extended) > 20
    assert extended[20:] == fresh[20:len(extended)]  # batch 5 on, seeded as always
    # a key that is not asked for (another max_len, another model state) is ignored
    with gzip.open(path, "wt") as fh:
        json.dump({"key": {**key, "max_len": 11}, "rows": rows}, fh)
    other = samples.sequences(smollm2, 50, 10, cache_dir=tmp_path / "other", progress=False)
    assert other == corpus_module._take(fresh, 50)


def test_ship_writes_whole_sampling_batches_that_later_reads_use(smollm2, tmp_path, monkeypatch):
    samples = ModelSamples(seed=6, batch=4)
    monkeypatch.setattr(corpus_module, "SHIPPED_SAMPLES", tmp_path / "shipped")
    drawn = samples.sequences(smollm2, 60, 10, cache_dir=tmp_path / "cache", progress=False)
    path, count, n_rows = samples.ship(smollm2, 25, 10, cache_dir=tmp_path / "cache", progress=False)
    assert path == samples.shipped_file(smollm2, 10) and path.exists()
    shipped = corpus_module._read_samples(path, samples._cache_key(smollm2, 10))
    assert len(shipped) == n_rows and n_rows % samples.batch == 0  # whole batches only
    assert sum(map(len, shipped)) == count >= 25
    assert sum(map(len, shipped[:-samples.batch])) < 25  # no batch more than needed

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled although the shipped samples hold enough tokens")

    monkeypatch.setattr(corpus_module, "_hf_sampler", no_sampling)
    read = samples.sequences(smollm2, 25, 10, cache_dir=tmp_path / "elsewhere", progress=False)
    assert read == corpus_module._take(drawn, 25)


def test_default_corpus_end_to_end(smollm2, tmp_path):
    result = second_moments(smollm2, [0], "attn", n_tokens=40, max_len=12, cache_dir=tmp_path,
                            progress=False)
    assert result.corpus_id == "model-samples:seed0" and result.n_tokens == 40
    described = result.describe()
    assert described["corpus"] == "model-samples:seed0" and described["matrices"] == {"attn": [0]}
    assert list(tmp_path.glob("corpora/*/samples-*.json"))
    moment = result[("attn", 0)]
    assert torch.equal(moment, moment.T)
    eigenvalues = torch.linalg.eigvalsh(moment)  # positive semi-definite, up to float32 products
    assert eigenvalues.min() > -1e-6 * eigenvalues.max()


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(layers=[30]), r"layers must be integers in \[0, 30\)"),
        (dict(layers=[-1]), r"\[0, 30\)"),
        (dict(layers=[]), "not empty"),
        (dict(modules=("mlp", "ffn")), r"modules must be .*'mlp', 'attn'"),
        (dict(n_tokens=0), "n_tokens must be a positive integer, got 0"),
        (dict(max_len=-3), "max_len must be a positive integer"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(dtype=torch.int32), "dtype must be one of"),
        (dict(corpus=[]), "the corpus list is empty"),
        (dict(corpus=["", "  "]), "holds no tokens"),
        (dict(corpus=[1, 2]), "must hold strings"),
        (dict(corpus=42), "corpus must be None"),
        (dict(corpus="no/such/file.txt"), "neither a file nor a folder"),
        (dict(corpus=SENTENCES, n_tokens=10_000), r"holds only \d+ tokens .* n_tokens=10000"),
    ],
)
def test_bad_inputs_raise_clear_errors(smollm2, kwargs, match):
    arguments = dict(layers=[0], modules=("mlp", "attn"), corpus=SENTENCES, n_tokens=10,
                     cache_dir=False, progress=False)
    arguments.update(kwargs)
    with pytest.raises((ValueError, CorpusError), match=match):
        second_moments(smollm2, **arguments)


def test_small_corpus_with_explicit_flag_uses_all(smollm2):
    n = _n_tokens(smollm2, SENTENCES)
    result = second_moments(smollm2, 0, "mlp", corpus=SENTENCES, n_tokens=10_000,
                            allow_fewer_tokens=True, cache_dir=False, progress=False)
    assert result.n_tokens == n


def test_hub_dataset_offline_says_what_works(smollm2, monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    source = resolve_corpus("wikitext")
    assert source.corpus_id == "wikitext:wikitext-103-raw-v1:train"
    with pytest.raises(CorpusError, match="local .txt file or folder"):
        second_moments(smollm2, 0, corpus="wikitext", n_tokens=10, cache_dir=False, progress=False)


def test_plain_dict_is_accepted():
    plain = {("mlp", 2): torch.eye(3, dtype=torch.float64)}
    wrapped = SecondMoments.of(plain)
    assert wrapped[("mlp", 2)] is plain[("mlp", 2)] and wrapped.n_tokens is None
    assert SecondMoments.of(wrapped) is wrapped
    with pytest.raises(KeyError, match="no second moment"):
        wrapped[("attn", 2)]


def test_text_corpus_by_hand(smollm2):
    source = TextCorpus("my-corpus:v1", lambda: iter(SENTENCES))
    result = second_moments(smollm2, 0, "mlp", corpus=source, n_tokens=12, cache_dir=False,
                            progress=False)
    assert result.corpus_id == "my-corpus:v1"
