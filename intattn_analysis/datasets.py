"""Benchmark loaders: every knowledge-editing file format the package reads, as `Fact` records.

``load_facts(source)`` reads the built-in fact set (``source="builtin"``) or a user's copy of
a public benchmark file (a path to a JSON list of records, or a ``.jsonl`` file with one
record per line) and returns a list of :class:`~intattn_analysis.facts.Fact`. The file
format is told from the keys of the first record; ``format=`` overrides that guess. Each
format is one small converter function registered in :data:`FORMATS`, so adding a format
means writing one function, not editing a chain of conditions.

Formats (their mapping onto ``Fact`` is described in each converter's docstring):

``"facts"`` (alias ``"builtin"``)
    A list of ``Fact.to_dict()`` records: the package's own format.
``"knowedit"``
    KnowEdit's ZsRE and WikiData_counterfact files.
``"counterfact-flat"``
    EasyEdit's flattened CounterFact (one rephrase and one neighborhood prompt per case).
``"mend-zsre"``
    MEND's ZsRE files, optionally with EasyEdit's ``portability`` block.
``"rome-counterfact"``
    ROME's ``counterfact.json`` (and MEMIT's ``multi_counterfact.json``, same records);
    :func:`write_rome_counterfact` writes this format.
``"mquake"``
    MQuAKE: one fact per case, built from the case's first requested rewrite;
    :func:`mquake_rewrites` gives every rewrite of every case.

Rules shared by all formats:

* The edit prompt must name the subject verbatim; its first occurrence becomes the ``{}``
  slot. The only exceptions are the records listed in :data:`ERRATA`, whose subject field
  is spelled differently from the prompt in the published file; they are corrected to the
  span the prompt uses, with one warning per file. There is no fuzzy matching.
* Paraphrases and rephrase prompts get ``{}`` in place of the first verbatim occurrence of
  the subject; one that names the subject differently is kept as plain text.
* An answer given as a list (of strings, or of lists of aliases) is reduced to its first
  non-empty string; a probe keeps the others as :attr:`~intattn_analysis.Probe.aliases`
  (read only by the generation protocol). A probe whose answer is empty (``""``, ``[]``, ``[[]]``) cannot be
  scored; it is dropped, with one warning per file giving the count. An empty true answer
  of the edit itself gives ``target_true=None`` (``Fact`` allows that); an empty new target
  is an error.
* ``Fact.source`` is the file name (``"ZsRE-test-all.json"``) or ``"builtin"``;
  ``Fact.case_id`` is the record's own ``case_id`` where it has one, else its index in the
  file.
* Every problem raises :class:`DatasetError`, whose message names the file, the record
  index (counting from 0) and the record's own field name, and says what was expected.
  ``strict=False`` skips bad records instead, with a single warning.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

from .benchmarks import CHECKOUT_DATA, DatasetError, lookup, resolve_benchmark
from .facts import SUBJECT_SLOT, Fact, FactError, Probe

__all__ = [
    "DatasetError",
    "DatasetWarning",
    "ERRATA",
    "FORMATS",
    "Format",
    "benchmark_path",
    "benchmark_root",
    "facts_table",
    "detect_format",
    "load_facts",
    "mquake_rewrites",
    "write_rome_counterfact",
]

BUILTIN = "builtin"
SPLITS = ("train", "test")

#: Published records whose ``subject`` field is not spelled as in their prompt, keyed by the
#: exact ``(subject, prompt)`` pair, mapped to the subject span the prompt actually uses.
#: All three are in KnowEdit's ``ZsRE-test-all.json`` (records 396, 597 and 676).
ERRATA: dict[tuple[str, str], str] = {
    ("Rio Grande 463", "By which company, D&RGW 463 has been manufactured?"): "D&RGW 463",
    (
        "Prince Frederick Adolf, Duke of Östergötland",
        "What is the name of Prince Frederick Adolf of Sweden father?",
    ): "Prince Frederick Adolf",
    ("Raja Zarith Sofiah", "Who is Raja Zarith Sofia's father?"): "Raja Zarith Sofia",
}


class DatasetWarning(UserWarning):
    """Something in a benchmark file was corrected, dropped or skipped while loading."""


# ---------------------------------------------------------------------------- formats
@dataclass
class _Notes:
    """What the converters noticed in one file; reported once per file as warnings."""

    source: str
    corrected: int = 0
    dropped_probes: int = 0


Converter = Callable[[Mapping[str, Any], int, _Notes], Fact]


@dataclass(frozen=True)
class Format:
    """A file format: how to recognise its records and how to turn one into a Fact.

    ``keys`` are the top-level keys its records may have (read or knowingly ignored); a
    key that is not among them but is spelled almost like one of them is a misspelling,
    reported by :func:`check_keys` rather than ignored.
    """

    name: str
    detect: Callable[[Mapping[str, Any]], bool]
    convert: Converter
    keys: frozenset[str] = frozenset()


#: Known formats by name. Aliases map to the same :class:`Format`.
FORMATS: dict[str, Format] = {}


def _register(name: str, detect: Callable[[Mapping[str, Any]], bool], *aliases: str,
              keys: Sequence[str] = ()):
    def decorator(convert: Converter) -> Converter:
        fmt = Format(name, detect, convert, frozenset(keys))
        for key in (name, *aliases):
            FORMATS[key] = fmt
        return convert

    return decorator


def check_keys(record: Mapping[str, Any], fmt: Format) -> None:
    """Raise :class:`FactError` for a key that looks like a misspelling of one of the
    format's keys (``rephrase_promt`` for ``rephrase_prompt``): the converter would
    ignore it and silently lose what it holds. Other unknown keys are left alone."""
    import difflib

    unknown = sorted(set(record) - fmt.keys) if fmt.keys else []
    absent = sorted(fmt.keys - set(record))
    for key in unknown:
        close = difflib.get_close_matches(str(key), absent, n=1, cutoff=0.8)
        if close:
            raise FactError(
                str(key),
                f"is not a {fmt.name} key; did you mean {close[0]!r}? (a misspelt key is "
                "not read, and what it holds would be lost)",
            )


def _checked(fmt: Format, detected: bool) -> Converter:
    """The format's converter, after the record's keys are checked; for a format told from
    the first record, each record must also look like that format (a file that mixes
    formats would otherwise lose the probes the guessed converter does not read)."""

    def convert(record: Mapping[str, Any], index: int, notes: _Notes) -> Fact:
        check_keys(record, fmt)  # first: a misspelt key can also make a record look foreign
        if detected and not fmt.detect(record):
            others = [f.name for f in dict.fromkeys(FORMATS.values()) if f.detect(record)]
            raise FactError(
                "record",
                f"has the keys {sorted(record)}, which are not those of the {fmt.name!r} format "
                f"told from the first record{' but of ' + repr(others[0]) if others else ''}; "
                "a file must not mix formats (split it, or pass format= to read it as one)",
            )
        return fmt.convert(record, index, notes)

    return convert


def _format_names() -> str:
    return ", ".join(repr(name) for name in FORMATS)


# ---------------------------------------------------------------------------- field helpers
def _get(record: Mapping[str, Any], key: str, where: str | None = None) -> Any:
    if key not in record:
        raise FactError(where or key, f"is missing (the record has {sorted(record)})")
    return record[key]


def _text(record: Mapping[str, Any], key: str, where: str | None = None) -> str:
    value = _get(record, key, where)
    if not isinstance(value, str) or not value.strip():
        raise FactError(where or key, f"must be a non-empty string, got {value!r}")
    return value


def _optional_text(record: Mapping[str, Any], key: str) -> str | None:
    """A string field that may be absent or null; present, it must be a non-empty string."""
    if record.get(key) is None:
        return None
    return _text(record, key)


def _mapping(record: Mapping[str, Any], key: str, where: str | None = None) -> Mapping:
    value = _get(record, key, where)
    if not isinstance(value, Mapping):
        raise FactError(where or key, f"must be a JSON object, got {type(value).__name__}")
    return value


def _texts(record: Mapping[str, Any], key: str) -> list[str]:
    """An optional list of non-empty strings (absent or null gives [])."""
    values = record.get(key)
    if values is None:
        return []
    if not isinstance(values, list):
        raise FactError(key, f"must be a list of strings, got {type(values).__name__}")
    for i, value in enumerate(values):
        if not isinstance(value, str) or not value.strip():
            raise FactError(f"{key}[{i}]", f"must be a non-empty string, got {value!r}")
    return values


def _first_string(value: Any, where: str) -> str | None:
    """The first non-empty string of a string, a list of strings or a list of alias lists."""
    if isinstance(value, str):
        return value if value.strip() else None
    if isinstance(value, list):
        for item in value:
            found = _first_string(item, where)
            if found is not None:
                return found
        return None
    raise FactError(where, f"must be a string or a list of strings, got {value!r}")


def _all_strings(value: Any) -> list[str]:
    """Every non-empty string of a string, a list of strings or a list of alias lists,
    in order, each once."""
    if isinstance(value, str):
        return [value] if value.strip() else []
    out: list[str] = []
    for item in value if isinstance(value, list) else []:
        out += [s for s in _all_strings(item) if s not in out]
    return out


def _aliases(value: Any, answer: str) -> tuple[str, ...]:
    """The other answers a ground truth accepts besides ``answer``: the rest of its alias
    lists, and any further answers it lists."""
    return tuple(s for s in _all_strings(value) if s != answer)


def _slot(subject: str, text: str) -> str | None:
    """``text`` with ``{}`` in place of the subject's first occurrence as a whole word (not
    inside a longer word: "Java" in "JavaScript" does not count); ``None`` without one."""
    # the edges only matter where the subject itself starts or ends with a word character
    # (KnowEdit has subjects with a trailing space, such as 'Angora goat ')
    before = r"(?<!\w)" if re.match(r"\w", subject[:1]) else ""
    after = r"(?!\w)" if re.match(r"\w", subject[-1:]) else ""
    match = re.search(before + re.escape(subject) + after, text)
    if match is None:
        return None
    return text[: match.start()] + SUBJECT_SLOT + text[match.end():]


def _subject_template(subject: str, text: str, where: str, notes: _Notes) -> tuple[str, str]:
    """The subject as the prompt spells it (see ERRATA) and the prompt with ``{}`` for it."""
    corrected = ERRATA.get((subject, text))
    if corrected is not None:
        notes.corrected += 1
        subject = corrected
    if subject not in text:
        raise FactError(
            where,
            f"the subject {subject!r} does not occur in {text!r}; the prompt must spell "
            "the subject exactly as the 'subject' field does",
        )
    template = _slot(subject, text)
    if template is None:
        raise FactError(
            where,
            f"the subject {subject!r} occurs in {text!r} only inside a longer word; the "
            "prompt must name the subject as a word of its own",
        )
    return subject, template


def _paraphrase(subject: str, text: str) -> str:
    """``{}`` in place of the subject's first whole-word occurrence, else of its first
    occurrence at all (benchmark paraphrases write possessives without the apostrophe:
    "the Derek Whiteheads team"); text without the subject is kept as is. Either way the
    filled-in paraphrase is the original text."""
    template = _slot(subject, text)
    return text.replace(subject, SUBJECT_SLOT, 1) if template is None else template


def _case_id(record: Mapping[str, Any], index: int) -> str:
    case_id = record.get("case_id")
    return str(index if case_id is None else case_id)


# ---------------------------------------------------------------------------- converters
def _is_fact_record(record: Mapping[str, Any]) -> bool:
    keys = set(record)
    return {"subject", "prompt", "target_new"} <= keys <= set(Fact.fields())


@_register("facts", _is_fact_record, BUILTIN, keys=Fact.fields())
def _from_fact_dict(record: Mapping[str, Any], index: int, notes: _Notes) -> Fact:
    """The package's own format: a ``Fact.to_dict()`` record, read by ``Fact.from_dict``.

    The prompt is already a template with ``{}``. ``source`` is replaced by the file name
    (or ``"builtin"``); a missing ``case_id`` becomes the record's index.
    """
    fact = Fact.from_dict(record)
    case_id = fact.case_id if fact.case_id is not None else str(index)
    return replace(fact, source=notes.source, case_id=case_id)


def _knowedit_probes(record: Mapping[str, Any], key: str, notes: _Notes) -> list[Probe]:
    section = record.get(key)
    if section is None:
        return []
    if not isinstance(section, Mapping):
        raise FactError(
            key,
            "must map sub-type names to lists of {prompt, ground_truth} objects, "
            f"got {type(section).__name__}",
        )
    probes = []
    for kind, items in section.items():
        if not isinstance(items, list):
            raise FactError(
                f"{key}.{kind}",
                f"must be a list of {{prompt, ground_truth}} objects, got {type(items).__name__}",
            )
        for j, item in enumerate(items):
            where = f"{key}.{kind}[{j}]"
            if not isinstance(item, Mapping):
                raise FactError(where, f"must be a {{prompt, ground_truth}} object, got {item!r}")
            prompt = _text(item, "prompt", f"{where}.prompt")
            truth = _get(item, "ground_truth", f"{where}.ground_truth")
            answer = _first_string(truth, f"{where}.ground_truth")
            if answer is None:
                notes.dropped_probes += 1
                continue
            probes.append(Probe(prompt, answer, kind, _aliases(truth, answer)))
    return probes


def _is_knowedit(record: Mapping[str, Any]) -> bool:
    return {"prompt", "ground_truth"} <= set(record) and "locality_prompt" not in record


@_register("knowedit", _is_knowedit, keys=(
    "subject", "prompt", "target_new", "ground_truth", "rephrase_prompt", "portability",
    "locality", "case_id", "cond",
))
def _from_knowedit(record: Mapping[str, Any], index: int, notes: _Notes) -> Fact:
    """KnowEdit's ZsRE and WikiData_counterfact files.

    ``prompt`` names the subject and becomes the template; ``target_new`` is the new
    target; ``ground_truth`` (a string, a list of strings, or a list of alias lists) gives
    ``target_true`` as its first string, or ``None`` when it is empty. ``rephrase_prompt``,
    where present, is the one paraphrase. ``portability`` and ``locality`` map a sub-type
    name (``"Reasoning"``, ``"Subject_Aliasing"``, ``"Logical_Generalization"``,
    ``"Relation_Specificity"``, ``"Forgetfulness"``) to ``{prompt, ground_truth}`` items;
    each item becomes a probe in ``Fact.portability`` / ``Fact.locality`` whose ``kind`` is
    the sub-type name and whose answer is the first string of its ground truth.
    """
    subject, prompt = _subject_template(_text(record, "subject"), _text(record, "prompt"),
                                        "prompt", notes)
    rephrase = _optional_text(record, "rephrase_prompt")
    return Fact(
        subject=subject,
        prompt=prompt,
        target_true=_first_string(_get(record, "ground_truth"), "ground_truth"),
        target_new=_text(record, "target_new"),
        paraphrases=[_paraphrase(subject, rephrase)] if rephrase else [],
        portability=_knowedit_probes(record, "portability", notes),
        locality=_knowedit_probes(record, "locality", notes),
        source=notes.source,
        case_id=_case_id(record, index),
    )


@_register("counterfact-flat", lambda record: {"prompt", "locality_prompt"} <= set(record), keys=(
    "case_id", "prompt", "target_new", "subject", "ground_truth", "rephrase_prompt",
    "locality_prompt", "locality_ground_truth",
))
def _from_counterfact_flat(record: Mapping[str, Any], index: int, notes: _Notes) -> Fact:
    """EasyEdit's flattened CounterFact: one case per record, ROME's ``case_id`` kept.

    ``prompt`` names the subject and becomes the template; ``ground_truth`` is
    ``target_true`` and ``target_new`` the new target. ``rephrase_prompt`` is the one
    paraphrase. ``locality_prompt`` / ``locality_ground_truth`` is CounterFact's
    neighborhood prompt (another subject, same relation, answered by the same true
    object), so it goes to ``Fact.neighborhood`` as a probe with kind ``""``.
    """
    subject, prompt = _subject_template(_text(record, "subject"), _text(record, "prompt"),
                                        "prompt", notes)
    return Fact(
        subject=subject,
        prompt=prompt,
        target_true=_first_string(_get(record, "ground_truth"), "ground_truth"),
        target_new=_text(record, "target_new"),
        paraphrases=[_paraphrase(subject, _text(record, "rephrase_prompt"))],
        neighborhood=[
            Probe(_text(record, "locality_prompt"), _text(record, "locality_ground_truth"))
        ],
        source=notes.source,
        case_id=_case_id(record, index),
    )


def _mend_portability(record: Mapping[str, Any]) -> list[Probe]:
    if record.get("portability") is None:
        return []
    block = _mapping(record, "portability")
    question = _text(block, "New Question", "portability.New Question")
    answer = _text(block, "New Answer", "portability.New Answer")
    return [Probe(question, answer, "Reasoning")]


@_register("mend-zsre", lambda record: {"src", "alt"} <= set(record), keys=(
    "subject", "src", "pred", "rephrase", "alt", "answers", "loc", "loc_ans", "cond",
    "portability", "case_id",
))
def _from_mend_zsre(record: Mapping[str, Any], index: int, notes: _Notes) -> Fact:
    """MEND's ZsRE question answering records.

    ``src`` names the subject and becomes the template; ``alt`` is the new target and
    ``answers[0]`` the true one (``pred``, a model's old prediction, and ``cond`` are not
    used). ``rephrase`` is the one paraphrase. ``loc`` / ``loc_ans`` (a Natural Questions
    item, ``"nq question: ..."`` prefix kept as MEND and EasyEdit feed it) is one locality
    probe with kind ``""``. EasyEdit's optional ``portability`` block gives one probe,
    ``New Question`` answered by ``New Answer``, kind ``"Reasoning"``;
    ``Recalled Relation`` is not used.
    """
    subject, prompt = _subject_template(_text(record, "subject"), _text(record, "src"),
                                        "src", notes)
    return Fact(
        subject=subject,
        prompt=prompt,
        target_true=_first_string(_get(record, "answers"), "answers"),
        target_new=_text(record, "alt"),
        paraphrases=[_paraphrase(subject, _text(record, "rephrase"))],
        locality=[Probe(_text(record, "loc"), _text(record, "loc_ans"))],
        portability=_mend_portability(record),
        source=notes.source,
        case_id=_case_id(record, index),
    )


def _rewrite_template(rewrite: Mapping[str, Any], where: str) -> str:
    template = _text(rewrite, "prompt", f"{where}.prompt")
    if template.count(SUBJECT_SLOT) != 1:
        raise FactError(
            f"{where}.prompt",
            f"must contain exactly one '{{}}' where the subject goes, got {template!r}",
        )
    return template


def _target(rewrite: Mapping[str, Any], key: str, where: str) -> str:
    return _text(_mapping(rewrite, key, f"{where}.{key}"), "str", f"{where}.{key}.str")


def _is_rome(record: Mapping[str, Any]) -> bool:
    return isinstance(record.get("requested_rewrite"), Mapping)


@_register("rome-counterfact", _is_rome, keys=(
    "case_id", "pararel_idx", "requested_rewrite", "paraphrase_prompts", "neighborhood_prompts",
    "attribute_prompts", "generation_prompts",
))
def _from_rome_counterfact(record: Mapping[str, Any], index: int, notes: _Notes) -> Fact:
    """ROME's ``counterfact.json`` (MEMIT's ``multi_counterfact.json`` has the same records).

    ``requested_rewrite`` holds the edit: ``prompt`` is already a template with ``{}``,
    ``subject``, ``target_new.str`` and ``target_true.str`` are the targets (the Wikidata
    ids are not kept) and ``relation_id`` the relation. ``paraphrase_prompts`` are the
    paraphrases. ``neighborhood_prompts`` name other subjects whose answer is
    ``target_true.str``: they go to ``Fact.neighborhood`` (kind ``""``).

    ``attribute_prompts`` name other subjects whose true answer is ``target_new.str``. They
    go to ``Fact.locality`` with kind ``"attribute"``, not to ``neighborhood``: the edit
    must leave their answer alone, as for any locality probe, but their answer is the new
    target, so mixing them into ``neighborhood`` would break the CounterFact rule that a
    neighborhood probe is answered by ``target_true``. ``generation_prompts`` (for
    fluency and consistency of generated text) have no place in a Fact and are not read.
    """
    rewrite = _mapping(record, "requested_rewrite")
    where = "requested_rewrite"
    target_true = _target(rewrite, "target_true", where)
    target_new = _target(rewrite, "target_new", where)
    subject = _text(rewrite, "subject", f"{where}.subject")
    return Fact(
        subject=subject,
        prompt=_rewrite_template(rewrite, where),
        target_true=target_true,
        target_new=target_new,
        paraphrases=[_paraphrase(subject, t) for t in _texts(record, "paraphrase_prompts")],
        neighborhood=[Probe(t, target_true) for t in _texts(record, "neighborhood_prompts")],
        locality=[Probe(t, target_new, "attribute") for t in _texts(record, "attribute_prompts")],
        relation=rewrite.get("relation_id"),
        source=notes.source,
        case_id=_case_id(record, index),
    )


def _mquake_rewrite(rewrite: Any, where: str, case_id: str, notes: _Notes) -> Fact:
    if not isinstance(rewrite, Mapping):
        raise FactError(where, f"must be a JSON object, got {type(rewrite).__name__}")
    subject = _text(rewrite, "subject", f"{where}.subject")
    question = _optional_text(rewrite, "question")
    return Fact(
        subject=subject,
        prompt=_rewrite_template(rewrite, where),
        target_true=_target(rewrite, "target_true", where),
        target_new=_target(rewrite, "target_new", where),
        paraphrases=[_paraphrase(subject, question)] if question else [],
        relation=rewrite.get("relation_id"),
        source=notes.source,
        case_id=case_id,
    )


def _mquake_rewrite_list(record: Mapping[str, Any]) -> list:
    rewrites = _get(record, "requested_rewrite")
    if not isinstance(rewrites, list) or not rewrites:
        raise FactError("requested_rewrite", f"must be a non-empty list, got {rewrites!r}")
    return rewrites


def _mquake_probes(record: Mapping[str, Any]) -> list[Probe]:
    new_answer = _text(record, "new_answer")
    aliases = _aliases(record.get("new_answer_alias") or [], new_answer)
    probes = [Probe(q, new_answer, "multi_hop", aliases) for q in _texts(record, "questions")]
    hops = record.get("new_single_hops") or []
    if not isinstance(hops, list):
        raise FactError("new_single_hops", f"must be a list, got {type(hops).__name__}")
    for j, hop in enumerate(hops):
        where = f"new_single_hops[{j}]"
        if not isinstance(hop, Mapping):
            raise FactError(where, f"must be a JSON object, got {type(hop).__name__}")
        answer = _text(hop, "answer", f"{where}.answer")
        probes.append(Probe(_text(hop, "cloze", f"{where}.cloze"), answer, "single_hop",
                            _aliases(hop.get("answer_alias") or [], answer)))
    return probes


@_register("mquake", lambda record: isinstance(record.get("requested_rewrite"), list), keys=(
    "case_id", "requested_rewrite", "questions", "answer", "answer_alias", "new_answer",
    "new_answer_alias", "single_hops", "new_single_hops", "orig",
))
def _from_mquake(record: Mapping[str, Any], index: int, notes: _Notes) -> Fact:
    """MQuAKE (CF, CF-3k, T, hard): one fact per case, from its first requested rewrite.

    The rewrite's ``prompt`` is already a template with ``{}``; ``subject``,
    ``target_true.str``, ``target_new.str`` and ``relation_id`` fill the fact, and its
    ``question`` is the one paraphrase. The case's multi-hop ``questions`` become
    portability probes answered by ``new_answer``, kind ``"multi_hop"`` (they hold only
    once *all* the case's rewrites are applied: see :func:`mquake_rewrites`). Each of
    ``new_single_hops`` becomes a portability probe from its ``cloze`` (the completion
    form of its question) to its ``answer``, kind ``"single_hop"``. The answers' aliases
    (``new_answer_alias``, each hop's ``answer_alias``) become the probes' aliases; the
    unedited ``single_hops`` and ``orig`` are not kept.
    """
    rewrites = _mquake_rewrite_list(record)
    fact = _mquake_rewrite(rewrites[0], "requested_rewrite[0]", _case_id(record, index), notes)
    return replace(fact, portability=_mquake_probes(record))


def _mquake_case(record: Mapping[str, Any], index: int, notes: _Notes) -> list[Fact]:
    first = _from_mquake(record, index, notes)
    rewrites = _mquake_rewrite_list(record)
    return [first] + [
        _mquake_rewrite(rewrite, f"requested_rewrite[{j}]", f"{first.case_id}.{j}", notes)
        for j, rewrite in enumerate(rewrites[1:], start=1)
    ]


# ---------------------------------------------------------------------------- detection
def _detect(records: Sequence[Any], path: Path | None) -> Format:
    if not records:
        raise DatasetError("no records to tell the format from; pass format=", path=path)
    first = records[0]
    if not isinstance(first, Mapping):
        raise DatasetError(f"expected a JSON object, got {type(first).__name__}",
                           path=path, index=0)
    matches = {fmt.name: fmt for fmt in FORMATS.values() if fmt.detect(first)}
    if len(matches) != 1:
        raise DatasetError(
            f"cannot tell the format from the first record's keys {sorted(first)}; "
            f"known formats: {_format_names()}; pass format= to choose one",
            path=path,
        )
    return next(iter(matches.values()))


def detect_format(records: Sequence[Mapping[str, Any]]) -> str:
    """The name of the format of ``records`` (a list of parsed JSON records).

    The guess looks at the keys of the first record only: ``requested_rewrite`` as an
    object means ROME CounterFact, as a list MQuAKE; ``src`` and ``alt`` mean MEND ZsRE;
    ``locality_prompt`` means EasyEdit's flat CounterFact; ``prompt`` with
    ``ground_truth`` means KnowEdit; only ``Fact`` fields mean ``"facts"``. Raises
    :class:`DatasetError` for a shape it does not know.
    """
    return _detect(records, None).name


def _lookup_format(name: str) -> Format:
    if not isinstance(name, str):
        raise DatasetError(f"format must be a format name (one of {_format_names()}), got {name!r}")
    key = name.lower().replace("_", "-")
    if key not in FORMATS:
        raise DatasetError(f"unknown format {name!r}; known formats: {_format_names()}")
    return FORMATS[key]


# ---------------------------------------------------------------------------- reading
def _builtin_resource():
    """The packaged built-in fact set (a Traversable)."""
    return resources.files(__package__) / "data" / "builtin_facts.json"


def builtin_path() -> Path:
    """File-system path of the packaged built-in fact set (for tools that rewrite it)."""
    return Path(str(_builtin_resource()))


def _read_builtin() -> list[Any]:
    resource = _builtin_resource()
    if not resource.is_file():
        raise DatasetError(
            "the built-in fact set is missing (expected package data "
            "intattn_analysis/data/builtin_facts.json)",
            path=str(resource),
        )
    return _parse_json(resource.read_text(encoding="utf-8"), str(resource))


def _parse_json(text: str, path: str | Path) -> list[Any]:
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise DatasetError(
            f"invalid JSON at line {error.lineno} column {error.colno}: {error.msg} "
            "(expected a JSON list of records, or a .jsonl file with one record per line)",
            path=path,
        ) from None
    if not isinstance(records, list):
        raise DatasetError(
            f"expected a JSON list of records, got a JSON {type(records).__name__}", path=path
        )
    return records


def _parse_jsonl(text: str, path: Path) -> list[Any]:
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise DatasetError(
                f"invalid JSON on line {number} column {error.colno}: {error.msg} "
                "(a .jsonl file holds one JSON object per line)",
                path=path,
                index=len(records),
            ) from None
    return records


def _read_file(path: Path) -> list[Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DatasetError("no such file", path=path) from None
    except UnicodeDecodeError as error:
        raise DatasetError(f"not UTF-8 text ({error.reason})", path=path) from None
    except OSError as error:
        raise DatasetError(f"cannot read the file: {error.strerror}", path=path) from None
    if path.suffix == ".jsonl":
        return _parse_jsonl(text, path)
    return _parse_json(text, path)


def _resolve_path(path: Path, split: str | None) -> Path:
    """The file to read: ``path`` itself, or the one file of directory ``path`` for ``split``."""
    if not path.exists():
        raise DatasetError("no such file or directory", path=path)
    if not path.is_dir():
        if split is not None:
            raise DatasetError(
                f"split={split!r} given, but this file is already one split; pass the "
                "file of the split you want, or its directory with split=",
                path=path,
            )
        return path
    files = sorted(p for p in path.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
    if split is None:
        raise DatasetError(
            f"is a directory; pass one file, or split= to choose among {[p.name for p in files]}",
            path=path,
        )
    chosen = [p for p in files if split.lower() in p.name.lower()]
    if len(chosen) != 1:
        found = "no file" if not chosen else f"{len(chosen)} files {[p.name for p in chosen]}"
        raise DatasetError(
            f"split={split!r} matches {found} among {[p.name for p in files]}; "
            "it must match exactly one: pass the file itself",
            path=path,
        )
    return chosen[0]


def _in_split(split: str | None) -> Callable[[Fact], bool] | None:
    """Membership in a built-in split: the parity of ``Fact.key``, about half each."""
    if split is None:
        return None
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for the built-in facts; use one of {SPLITS}")
    parity = SPLITS.index(split)
    return lambda fact: int(fact.key, 16) % 2 == parity


# ---------------------------------------------------------------------------- converting
T = TypeVar("T")


def _convert_all(
    records: Sequence[Any],
    convert: Callable[[Mapping[str, Any], int, _Notes], T],
    notes: _Notes,
    path: str | Path,
    *,
    limit: int | None,
    strict: bool,
    keep: Callable[[T], bool] | None = None,
) -> tuple[list[T], int, DatasetError | None]:
    """Convert records in order; return the results, the number skipped and the first error."""
    results: list[T] = []
    skipped, first_error = 0, None
    for index, record in enumerate(records):
        if limit is not None and len(results) >= limit:
            break
        try:
            if not isinstance(record, Mapping):
                raise DatasetError(f"expected a JSON object, got {type(record).__name__}",
                                   path=path, index=index)
            item = convert(record, index, notes)
        except FactError as error:
            message = str(error).removeprefix(f"field {error.field!r}: ")
            error = DatasetError(message, path=path, index=index, field=error.field)
            if strict:
                raise error from None
            skipped, first_error = skipped + 1, first_error or error
            continue
        except DatasetError as error:
            if strict:
                raise
            skipped, first_error = skipped + 1, first_error or error
            continue
        if keep is None or keep(item):
            results.append(item)
    return results, skipped, first_error


def _warn(notes: _Notes, skipped: int, first_error: DatasetError | None) -> None:
    """At most one warning per kind of event, for the caller of the public function."""
    if notes.corrected:
        warnings.warn(
            f"{notes.source}: corrected the subject of {notes.corrected} record(s) whose "
            "subject field is not spelled as in the prompt (see datasets.ERRATA)",
            DatasetWarning, stacklevel=3,
        )
    if notes.dropped_probes:
        warnings.warn(
            f"{notes.source}: dropped {notes.dropped_probes} probe(s) with an empty answer",
            DatasetWarning, stacklevel=3,
        )
    if skipped:
        warnings.warn(
            f"{notes.source}: skipped {skipped} bad record(s) (strict=False); "
            f"first error: {first_error}",
            DatasetWarning, stacklevel=3,
        )


def _check_limit(limit: int | None) -> None:
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise DatasetError(f"limit must be a non-negative integer or None, got {limit!r}")


def load_facts(
    source: str | Path,
    *,
    format: str | None = None,
    split: str | None = None,
    limit: int | None = None,
    strict: bool = True,
) -> list[Fact]:
    """Read a benchmark as a list of Facts.

    ``source`` is the string ``"builtin"`` for the packaged fact set, or a path to a JSON
    file (a list of records) or a ``.jsonl`` file (one record per line), or to a directory
    together with ``split``. ``format`` names one of :data:`FORMATS`; by default it is told
    from the first record (:func:`detect_format`).

    ``split``: for the built-in set, ``"train"`` or ``"test"`` selects about half of the
    facts, fixed by each fact's content hash (``Fact.key``), and ``None`` selects all. For a
    directory, it picks the single ``.json``/``.jsonl`` file whose name contains the split
    word (``"train"``, ``"test"``, ``"val"``...); none or several is an error. A split given
    with a plain file is an error, since a file is already one split.

    ``limit`` keeps the first ``limit`` facts (after the split). With ``strict=True`` the
    first bad record raises :class:`DatasetError`; with ``strict=False`` bad records are
    skipped and one :class:`DatasetWarning` gives their count and the first error. A missing
    file, invalid JSON or an unknown format raise either way.
    """
    _check_limit(limit)
    fmt = _lookup_format(format) if format is not None else None
    keep = None
    if isinstance(source, str) and source == BUILTIN:
        keep = _in_split(split)
        path: str | Path = BUILTIN
        name = BUILTIN
        records = _read_builtin()
        fmt = fmt or FORMATS[BUILTIN]
    else:
        if not Path(source).exists() and lookup(source) is not None:
            source = resolve_benchmark(source)  # a catalogue name, e.g. "knowedit/ZsRE-test-all"
        path = _resolve_path(Path(source), split)
        name = path.name
        records = _read_file(path)
    if not records:
        return []
    detected = fmt is None
    fmt = fmt or _detect(records, Path(path))
    notes = _Notes(source=name)
    facts, skipped, first_error = _convert_all(
        records, _checked(fmt, detected), notes, path, limit=limit, strict=strict, keep=keep
    )
    _warn(notes, skipped, first_error)
    return facts


def mquake_rewrites(
    source: str | Path, *, limit: int | None = None, strict: bool = True
) -> list[list[Fact]]:
    """Every requested rewrite of every MQuAKE case: one list of Facts per case.

    The first Fact of each list is the one :func:`load_facts` gives for the case (with the
    multi-hop and single-hop portability probes, which test the whole chain of edits);
    the others are the case's further rewrites, without probes, with ``case_id``
    ``"<case_id>.<j>"`` for rewrite ``j``. Apply all of a case's rewrites before scoring
    its multi-hop probes.
    """
    _check_limit(limit)
    path = _resolve_path(Path(source), None)
    records = _read_file(path)
    notes = _Notes(source=path.name)
    cases, skipped, first_error = _convert_all(
        records, _mquake_case, notes, path, limit=limit, strict=strict
    )
    _warn(notes, skipped, first_error)
    return cases


# ---------------------------------------------------------------------------- writing
def _rome_case_id(fact: Fact, index: int) -> int | str:
    if fact.case_id is None:
        return index
    return int(fact.case_id) if fact.case_id.isdigit() else fact.case_id


def _rome_record(fact: Fact, index: int, path: Path) -> tuple[dict[str, Any], int]:
    """One ROME CounterFact record and the number of probes the format cannot hold."""
    if fact.target_true is None:
        raise DatasetError("ROME CounterFact needs a true answer, got None",
                           path=path, index=index, field="target_true")
    neighborhood = [p.prompt for p in fact.neighborhood if p.answer == fact.target_true]
    attribute = [p.prompt for p in fact.locality
                 if p.kind == "attribute" and p.answer == fact.target_new]
    dropped = (len(fact.neighborhood) + len(fact.locality) + len(fact.portability)
               - len(neighborhood) - len(attribute))
    record = {
        "case_id": _rome_case_id(fact, index),
        "requested_rewrite": {
            "prompt": fact.prompt,
            "relation_id": fact.relation,
            "target_new": {"str": fact.target_new, "id": None},
            "target_true": {"str": fact.target_true, "id": None},
            "subject": fact.subject,
        },
        "paraphrase_prompts": fact.paraphrase_texts,
        "neighborhood_prompts": neighborhood,
        "attribute_prompts": attribute,
        "generation_prompts": [],
    }
    return record, dropped


def write_rome_counterfact(facts: Iterable[Fact], path: str | Path) -> Path:
    """Write facts as a ROME ``counterfact.json`` file; return its path.

    Each fact becomes one record, the inverse of the ``"rome-counterfact"`` loader:
    paraphrases are written as full texts, neighborhood probes as ``neighborhood_prompts``
    and locality probes of kind ``"attribute"`` as ``attribute_prompts``. The format holds
    only prompts, so a neighborhood probe must be answered by ``target_true`` and an
    attribute probe by ``target_new``; other probes (portability, other locality) cannot be
    written and are dropped with one :class:`DatasetWarning`. Wikidata ids are written as
    ``null``, ``generation_prompts`` as ``[]``; ``known`` and ``source`` are not written.
    A fact without ``target_true`` raises :class:`DatasetError`.
    """
    path = Path(path)
    records, dropped = [], 0
    for index, fact in enumerate(facts):
        record, lost = _rome_record(fact, index, path)
        records.append(record)
        dropped += lost
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if dropped:
        warnings.warn(
            f"{path.name}: dropped {dropped} probe(s) that ROME CounterFact cannot hold",
            DatasetWarning, stacklevel=2,
        )
    return path


# ---------------------------------------------------------------------------- helpers
def benchmark_root() -> Path:
    """The folder of the public benchmark collection (it may not exist).

    ``$INTATTN_DATA_DIR`` when that is set, else :data:`CHECKOUT_DATA` (the layout of the
    project's own checkout).
    """
    import os

    root = os.environ.get("INTATTN_DATA_DIR")
    return Path(root) if root else CHECKOUT_DATA


def benchmark_path(relative: str | Path = "") -> Path:
    """A file of the public benchmark collection, e.g. ``"knowedit/ZsRE-test-all.json"``.

    The collection lives in :func:`benchmark_root`. A file of the catalogue
    (:data:`intattn_analysis.benchmarks.BENCHMARKS`) missing there is looked for in the
    other places :func:`intattn_analysis.benchmarks.resolve_benchmark` knows, and
    downloaded where the network allows. A user with copies elsewhere passes their paths
    to :func:`load_facts` directly.
    """
    path = benchmark_root() / relative
    if not path.exists() and lookup(str(relative)) is not None:
        return resolve_benchmark(str(relative))
    if not path.exists():
        raise DatasetError(
            "benchmark file not found; set INTATTN_DATA_DIR to the folder that holds the "
            "benchmark files (knowedit/, counterfact/, zsre/, mquake/), or pass the file's "
            "path to load_facts",
            path=path,
        )
    return path


def facts_table(facts: Sequence[Fact]):
    """A pandas DataFrame with one row per fact (probe lists shown as counts)."""
    import pandas as pd

    rows = [
        {
            "case_id": f.case_id,
            "relation": f.relation,
            "subject": f.subject,
            "prompt": f.text,
            "target_true": f.target_true,
            "target_new": f.target_new,
            "paraphrases": len(f.paraphrases),
            "neighborhood": len(f.neighborhood),
            "portability": len(f.portability),
            "locality": len(f.locality),
            **{f"known[{m}]": k for m, k in sorted(f.known.items())},
        }
        for f in facts
    ]
    return pd.DataFrame(rows)
