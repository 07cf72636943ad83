"""The `Fact` record: one piece of knowledge, the edit that rewrites it, and its probes.

Every benchmark format the package reads (KnowEdit, CounterFact, MEND ZsRE, MQuAKE, the
built-in set) is turned into this one type, so tracing, editing and evaluation never look
at a file format.

A fact is written as a prompt *template* with ``{}`` where the subject goes
(``"The Eiffel Tower is located in the city of"`` becomes subject ``"Eiffel Tower"``,
prompt ``"The {} is located in the city of"``). The template form is what causal tracing
needs (it must know which tokens are the subject) and what MEMIT-style editors need (the
key is read at the subject's last token). Substitution uses ``str.replace("{}", subject)``,
never ``str.format``, so prompts may contain other braces.

Probes are ``(prompt, answer, kind)`` named tuples. ``prompt`` is a full text (it may
mention other subjects); ``answer`` is the expected continuation; ``kind`` names the
benchmark's sub-type (``"Reasoning"``, ``"Subject_Aliasing"``, ...) so that metrics can be
averaged per sub-type, and is ``""`` where the source has none.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping, NamedTuple

__all__ = ["Fact", "FactError", "Probe", "sample_by_relation"]

SUBJECT_SLOT = "{}"


class FactError(ValueError):
    """A fact is malformed. ``field`` names the offending field."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"field {field!r}: {message}")


class Probe(NamedTuple):
    """A prompt with the answer expected after it; ``kind`` is the benchmark's sub-type.

    ``aliases`` are other spellings of the answer that the benchmark accepts (KnowEdit's
    WikiData_counterfact lists them, MQuAKE too). Teacher-forced metrics score ``answer``
    alone, as KnowEdit does; the generation protocol accepts a generated answer that
    matches any of them (:mod:`intattn_analysis.answers`).
    """

    prompt: str
    answer: str
    kind: str = ""
    aliases: tuple[str, ...] = ()

    def __repr__(self) -> str:
        """The fields, ``aliases`` only where there are any."""
        aliases = f", aliases={self.aliases!r}" if self.aliases else ""
        return f"Probe(prompt={self.prompt!r}, answer={self.answer!r}, kind={self.kind!r}{aliases})"


def _probe(value: Any, field_name: str, index: int) -> Probe:
    if isinstance(value, Probe):
        probe = value
    elif isinstance(value, Mapping):
        probe = Probe(value.get("prompt"), value.get("answer"), value.get("kind", "") or "",
                      value.get("aliases") or ())
    elif isinstance(value, (tuple, list)) and len(value) in (2, 3, 4):
        probe = Probe(*value)
    else:
        raise FactError(
            f"{field_name}[{index}]",
            f"expected (prompt, answer), (prompt, answer, kind) or (prompt, answer, kind, aliases), "
            f"got {value!r}",
        )
    aliases = probe.aliases
    if isinstance(aliases, str) or not isinstance(aliases, (tuple, list)):
        raise FactError(f"{field_name}[{index}].aliases", f"must be a list of strings, got {aliases!r}")
    for j, alias in enumerate(aliases):
        if not isinstance(alias, str) or not alias.strip():
            raise FactError(f"{field_name}[{index}].aliases[{j}]", f"must be a non-empty string, got {alias!r}")
    probe = probe._replace(aliases=tuple(aliases))
    for part in ("prompt", "answer"):
        text = getattr(probe, part)
        if not isinstance(text, str) or not text.strip():
            raise FactError(
                f"{field_name}[{index}].{part}", f"must be a non-empty string, got {text!r}"
            )
    if not isinstance(probe.kind, str):
        raise FactError(f"{field_name}[{index}].kind", f"must be a string, got {probe.kind!r}")
    return probe


@dataclass(frozen=True)
class Fact:
    """One fact and the edit that rewrites it.

    Attributes:
        subject: the entity the fact is about, exactly as it is spelled in ``prompt``.
        prompt: template with ``{}`` where the subject goes; the answer follows it.
        target_true: the true answer, or ``None`` where a benchmark does not give one.
        target_new: the counterfactual answer an edit writes in.
        paraphrases: other templates for the same question. ``{}`` marks the subject
            where the paraphrase names it as ``subject`` does; a paraphrase that names it
            differently is kept as plain text.
        neighborhood: other subjects, same relation, their own answers (CounterFact's
            specificity prompts): an edit must leave them alone.
        portability: consequences of the new fact (one-hop reasoning, aliases, ...).
        locality: unrelated prompts whose answers an edit must not change.
        relation: relation name or Wikidata id, where known.
        source: where the record came from (``"builtin"``, a file name, ...).
        known: per model name, whether the model's greedy continuation of the prompt
            starts with ``target_true``.
        case_id: the benchmark's own record id, or the record's index in its file.
    """

    subject: str
    prompt: str
    target_true: str | None
    target_new: str
    paraphrases: tuple[str, ...] = ()
    neighborhood: tuple[Probe, ...] = ()
    portability: tuple[Probe, ...] = ()
    locality: tuple[Probe, ...] = ()
    relation: str | None = None
    source: str = ""
    known: Mapping[str, bool] = field(default_factory=dict)
    case_id: str | None = None

    def __post_init__(self) -> None:
        for name in ("subject", "prompt", "target_new"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise FactError(name, f"must be a non-empty string, got {value!r}")
        if self.target_true is not None and (
            not isinstance(self.target_true, str) or not self.target_true.strip()
        ):
            raise FactError(
                "target_true", f"must be a non-empty string or None, got {self.target_true!r}"
            )
        if self.prompt.count(SUBJECT_SLOT) != 1:
            raise FactError(
                "prompt",
                f"must contain exactly one '{{}}' where the subject goes, got {self.prompt!r}; "
                "write the subject as '{}' (Fact.from_text does this for a full sentence)",
            )
        if SUBJECT_SLOT in self.subject:
            raise FactError("subject", f"must not contain '{{}}', got {self.subject!r}")
        object.__setattr__(self, "paraphrases", tuple(self._paraphrases(self.paraphrases)))
        for name in ("neighborhood", "portability", "locality"):
            probes = getattr(self, name)
            if isinstance(probes, (str, Mapping)):
                raise FactError(name, f"must be a list of probes, got {type(probes).__name__}")
            object.__setattr__(
                self, name, tuple(_probe(p, name, i) for i, p in enumerate(probes))
            )
        if not isinstance(self.known, Mapping) or not all(
            isinstance(v, bool) for v in self.known.values()
        ):
            raise FactError("known", f"must map model names to booleans, got {self.known!r}")
        object.__setattr__(self, "known", dict(self.known))
        if self.case_id is not None:
            object.__setattr__(self, "case_id", str(self.case_id))

    @staticmethod
    def _paraphrases(values: Iterable[str]) -> Iterable[str]:
        if isinstance(values, str):
            raise FactError("paraphrases", "must be a list of strings, got one string")
        for i, text in enumerate(values):
            if not isinstance(text, str) or not text.strip():
                raise FactError(f"paraphrases[{i}]", f"must be a non-empty string, got {text!r}")
            if text.count(SUBJECT_SLOT) > 1:
                raise FactError(f"paraphrases[{i}]", f"has more than one '{{}}': {text!r}")
            yield text

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_text(cls, text: str, subject: str, target_new: str, **fields: Any) -> "Fact":
        """Build a fact from a full sentence that contains ``subject`` verbatim.

        The first occurrence of the subject becomes the ``{}`` slot.
        """
        if not isinstance(subject, str) or not subject.strip():
            raise FactError("subject", f"must be a non-empty string, got {subject!r}")
        if not isinstance(text, str) or subject not in text:
            raise FactError(
                "prompt",
                f"subject {subject!r} does not occur in prompt {text!r}; the subject must be "
                "spelled in the prompt exactly as in the 'subject' field",
            )
        return cls(
            subject=subject,
            prompt=text.replace(subject, SUBJECT_SLOT, 1),
            target_new=target_new,
            **fields,
        )

    @classmethod
    def from_dict(cls, record: Mapping[str, Any]) -> "Fact":
        """Inverse of :meth:`to_dict`."""
        unknown = set(record) - {f for f in cls.__dataclass_fields__}
        if unknown:
            raise FactError(sorted(unknown)[0], f"is not a Fact field (fields: {cls.fields()})")
        return cls(**record)

    @classmethod
    def fields(cls) -> list[str]:
        return list(cls.__dataclass_fields__)

    # ------------------------------------------------------------------ views
    @property
    def text(self) -> str:
        """The prompt with the subject filled in."""
        return self.prompt.replace(SUBJECT_SLOT, self.subject)

    def fill(self, template: str, subject: str | None = None) -> str:
        """Fill ``{}`` in ``template`` with ``subject`` (default: this fact's subject)."""
        return template.replace(SUBJECT_SLOT, self.subject if subject is None else subject)

    @property
    def paraphrase_texts(self) -> list[str]:
        return [self.fill(p) for p in self.paraphrases]

    def with_known(self, model_name: str, known: bool) -> "Fact":
        return replace(self, known={**self.known, model_name: bool(known)})

    def to_dict(self) -> dict[str, Any]:
        record = asdict(self)
        for name in ("neighborhood", "portability", "locality"):
            record[name] = [list(p[:3]) + ([list(p.aliases)] if p.aliases else []) for p in getattr(self, name)]
        record["paraphrases"] = list(self.paraphrases)
        return record

    @property
    def changes_answer(self) -> bool:
        """False when ``target_new`` is ``target_true`` (ignoring case and surrounding
        space): such a record asks for no change and cannot be edited. KnowEdit's ZsRE
        test split has 43 of them."""
        if self.target_true is None:
            return True
        return self.target_new.strip().casefold() != self.target_true.strip().casefold()

    @property
    def key(self) -> str:
        """A short content hash: stable across runs, used in cache keys."""
        blob = json.dumps(
            [self.subject, self.prompt, self.target_true, self.target_new], ensure_ascii=False
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def __str__(self) -> str:
        arrow = f"{self.target_true!r} -> " if self.target_true is not None else "-> "
        return f"{self.text!r} {arrow}{self.target_new!r}"


def sample_by_relation(facts: Iterable[Fact], n: int | None) -> list[Fact]:
    """Up to ``n`` facts spread evenly over relations, deterministically.

    Relations are visited round-robin in sorted order, taking each relation's facts in
    their original order, so a small sample covers as many relations as it can. ``n=None``
    returns every fact (in the original order).
    """
    facts = list(facts)
    if n is None:
        return facts
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer or None, got {n!r}")
    groups: dict[str, list[Fact]] = {}
    for fact in facts:
        groups.setdefault(str(fact.relation or ""), []).append(fact)
    queues = [groups[r] for r in sorted(groups)]
    chosen: list[Fact] = []
    depth = 0
    while len(chosen) < min(n, len(facts)):
        for queue in queues:
            if depth < len(queue) and len(chosen) < n:
                chosen.append(queue[depth])
        depth += 1
    return chosen
