"""The public benchmark files by name, and where to find them.

Notebooks and commands name a benchmark file as ``"knowedit/ZsRE-test-all"`` (the
``.json`` may be added). :func:`resolve_benchmark` finds it, in this order:

1. ``$INTATTN_DATA_DIR/<path>``, a folder of the user's own copies;
2. the checkout's data folder, ``shared/data`` beside the repository;
3. the download cache, ``<cache root>/data/<path>``, filled from the file's public source
   at a pinned commit where the network allows, and accepted only if its sha256 is the
   one recorded here.

Offline, with the file in none of the folders, it fails at once with an error that names
all three. ``intattn data`` lists every file and where it was found.

:class:`DatasetError`, the error of every benchmark file that cannot be found or read, is
defined here, below :mod:`intattn_analysis.datasets`, which reads the files and raises it
too (and from which it can be imported as well).
"""

from __future__ import annotations

import hashlib
import http.client
import os
from dataclasses import dataclass
from pathlib import Path

from .loading import cache_root, file_sha256, write_atomic

__all__ = [
    "BENCHMARKS",
    "CHECKOUT_DATA",
    "Benchmark",
    "DatasetError",
    "benchmark_status",
    "resolve_benchmark",
]

#: The checkout's data folder: ``shared/data`` beside the repository.
CHECKOUT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class DatasetError(ValueError):
    """A benchmark file or one of its records cannot be read.

    ``path`` is the file (``None`` where no file is involved), ``index`` the record's
    position in it counting from 0 (``None`` for whole-file problems), and ``field`` the
    record's own field name, dotted for nested fields (``"requested_rewrite.subject"``).
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | Path | None = None,
        index: int | None = None,
        field: str | None = None,
    ):
        self.path = Path(path) if path is not None else None
        self.index = index
        self.field = field
        where = [str(path)] if path is not None else []
        if index is not None:
            where.append(f"record {index}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join([*where, message]))


@dataclass(frozen=True)
class Benchmark:
    """One public file: its place in the collection, its source and its checksum."""

    path: str  # relative to the collection, e.g. "knowedit/ZsRE-test-all.json"
    sha256: str
    source: str  # repository : path @ commit, as the provenance table gives it
    url: str | None  # a download of exactly these bytes, or None where there is none

    @property
    def name(self) -> str:
        return self.path.removesuffix(".json")


def _raw(repository: str, commit: str, path: str) -> str:
    return f"https://raw.githubusercontent.com/{repository}/{commit}/{path}"


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("knowedit/ZsRE-test-all.json",
                  "d70ff1f69ddcac101bbe9c6f1d6ee3918bdac96f145d937e90fbbb02fcf85fab",
                  "fasdkljfds/EasyEdit : data/KnowEdit/benchmark_ZsRE_ZsRE-test-all.json @ e7880657d594",
                  _raw("fasdkljfds/EasyEdit", "e7880657d594", "data/KnowEdit/benchmark_ZsRE_ZsRE-test-all.json")),
        # rebuilt from its source (a generate_prompt field removed): no download gives these bytes
        Benchmark("knowedit/wiki_counterfact_test_cf.json",
                  "a24a8e21b48b3343d08d3e9264d255ec3475270ec2580d475deb2b12a81964e4",
                  "leonz-z/EasyEdit : dataset/KnowEdit-ms/wiki_counterfact_test_cf-generate-10.json "
                  "@ 5d49c472bd4b, without its generate_prompt field", None),
        Benchmark("knowedit/wiki_counterfact_train_cf.json",
                  "acdc01922afab1d4122249a2c22ad8c1e0e86506dd7a28eec698f22d175ebf9d",
                  "fasdkljfds/EasyEdit : data/KnowEdit/benchmark_wiki_counterfact_train_cf.json @ e7880657d594",
                  _raw("fasdkljfds/EasyEdit", "e7880657d594", "data/KnowEdit/benchmark_wiki_counterfact_train_cf.json")),
        Benchmark("counterfact/counterfact-val.json",
                  "42b44645471020a9419d183deb9e113e82941380046861770ea0083dabd13982",
                  "Jometeorie/KnowledgeSpread : data/counterfact/counterfact-val.json @ 51d7402617c2",
                  _raw("Jometeorie/KnowledgeSpread", "51d7402617c2", "data/counterfact/counterfact-val.json")),
        Benchmark("counterfact/counterfact-edit.json",
                  "bfe31a7081932739406e282bb625d74222549c3386c15b1df3dfbc3978c69eec",
                  "Jometeorie/KnowledgeSpread : data/counterfact/counterfact-edit.json @ 51d7402617c2",
                  _raw("Jometeorie/KnowledgeSpread", "51d7402617c2", "data/counterfact/counterfact-edit.json")),
        Benchmark("zsre/zsre_mend_edit_portability.json",
                  "0cf155da229b2eccae19fcfe5f7a09523363d357f5f15508d1521f495ad5ecd9",
                  "fasdkljfds/EasyEdit : data/wise/ZsRE/zsre_mend_edit.json @ e7880657d594",
                  _raw("fasdkljfds/EasyEdit", "e7880657d594", "data/wise/ZsRE/zsre_mend_edit.json")),
        Benchmark("zsre/zsre_mend_train-1k.json",
                  "e62596101d8ed551889c26c0d2a5277f92eaef3b14416d8eaee39b04a244ab60",
                  "Jometeorie/KnowledgeSpread : data/zsre/zsre_mend_train-1k.json @ 51d7402617c2",
                  _raw("Jometeorie/KnowledgeSpread", "51d7402617c2", "data/zsre/zsre_mend_train-1k.json")),
        Benchmark("mquake/MQuAKE-hard.json",
                  "fc78dc7bec4625d3ce6e2923acae7f1920691b0b23e663182bf799f2856f2a11",
                  "Alanzxd/memit_for_mquake : data/MQuAKE-hard.json @ 7d658a522b39",
                  _raw("Alanzxd/memit_for_mquake", "7d658a522b39", "data/MQuAKE-hard.json")),
    )
}


def lookup(name: str) -> Benchmark | None:
    """The benchmark ``name`` names (with or without ``.json``), or ``None``."""
    return BENCHMARKS.get(str(name).removesuffix(".json")) if isinstance(name, (str, Path)) else None


def _folders() -> list[tuple[str, Path]]:
    folders = []
    if os.environ.get("INTATTN_DATA_DIR"):
        folders.append(("INTATTN_DATA_DIR", Path(os.environ["INTATTN_DATA_DIR"])))
    folders.append(("checkout data folder", CHECKOUT_DATA))
    folders.append(("download cache", cache_root() / "data"))
    return folders


def _find(benchmark: Benchmark) -> tuple[str, Path] | None:
    """The first folder (label, path) that holds the file, or ``None``."""
    for label, folder in _folders():
        if (folder / benchmark.path).is_file():
            return label, folder / benchmark.path
    return None


def _download(benchmark: Benchmark, target: Path, timeout: float) -> None:
    import urllib.request

    with urllib.request.urlopen(benchmark.url, timeout=timeout) as response:  # noqa: S310
        payload = response.read()
    found = hashlib.sha256(payload).hexdigest()
    if found != benchmark.sha256:
        raise DatasetError(
            f"the download of {benchmark.name} from {benchmark.url} has sha256 {found}, not the "
            f"recorded {benchmark.sha256}; it was not kept"
        )
    write_atomic(target, lambda staging: Path(staging).write_bytes(payload))


def resolve_benchmark(name: str, *, download: bool = True, timeout: float = 5.0) -> Path:
    """The local path of benchmark ``name`` (see the module notes for the search order).

    A file found in a folder is used as it is (a user's copy may be a newer release); a
    downloaded file must match the recorded sha256. ``timeout`` bounds each network
    operation, so that without a network the call fails within seconds. Raises :class:`DatasetError` naming
    every place that was tried and how to fill one.
    """
    benchmark = lookup(name)
    if benchmark is None:
        raise DatasetError(f"unknown benchmark {name!r}; known: {sorted(BENCHMARKS)}")
    found = _find(benchmark)
    if found is not None:
        return found[1]
    tried = [f"{label} ({folder / benchmark.path})" for label, folder in _folders()]
    reason = "no download source gives exactly this file" if benchmark.url is None else None
    if reason is None and download:
        target = cache_root() / "data" / benchmark.path
        try:
            _download(benchmark, target, timeout)
            return target
        except (OSError, http.client.HTTPException, ValueError) as error:
            # no network, a connection cut short, or a download cache that cannot be written
            reason = f"the download from {benchmark.url} into {target} failed ({type(error).__name__}: {error})"
    elif reason is None:
        reason = "download=False"
    raise DatasetError(
        f"benchmark {benchmark.name} is not in any of: {'; '.join(tried)}, and {reason}. Set "
        f"INTATTN_DATA_DIR to a folder holding {benchmark.path}, put the collection in the "
        f"checkout's data folder, or download it where the network allows (source: "
        f"{benchmark.source}; sha256 {benchmark.sha256})"
    )


def benchmark_status() -> list[dict]:
    """One row per benchmark: where it was found (no download is tried), and whether
    its checksum is the recorded one."""
    rows = []
    for benchmark in BENCHMARKS.values():
        where, path = _find(benchmark) or ("missing", None)
        rows.append({
            "name": benchmark.name,
            "found in": where,
            "path": str(path) if path else "",
            "sha256 ok": (file_sha256(path) == benchmark.sha256) if path else None,
            "source": benchmark.source,
        })
    return rows
