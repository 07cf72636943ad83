"""Result pages generated from the tables: ``docs/results/*.md``.

Every number on a page is read from the tidy CSVs that ``intattn run ... --scale paper``
writes under ``figures/paper`` (and that ``intattn run NAME --tables-only`` rewrites from
the store), so a page says what the stored results say and nothing else. ``intattn
report`` writes the pages; ``intattn report --check`` says which pages differ from what
the tables give now, so a rerun whose page was not regenerated fails the tests
(``tests/test_report.py`` checks the committed pages).

A page is data: a name and a function of the tables folder (:data:`PAGES`). Each page
ends with the CSVs it read. Where a page's subject has not been measured yet, the page
says so by name instead of leaving it out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Sequence

import pandas as pd

from .intervals import formatted_intervals

__all__ = ["PAGES", "Tables", "markdown_table", "render_pages", "stale_pages", "write_pages"]

#: The main metrics of the protocol comparison, in the order they are shown.
SHOWN = ("Edit Succ.", "Rephrase", "Portability", "Locality")
#: The two protocols, in the order they are shown.
PROTOCOLS = ("teacher-forced", "generation")


class Tables:
    """The tidy CSVs of one folder, read on demand; remembers which it read (a page lists
    its sources) and reads a table without a ``protocol`` column as teacher-forced (it
    was written before the generation protocol existed)."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.read: list[str] = []

    def get(self, name: str) -> pd.DataFrame | None:
        """``<name>.csv`` as a frame (``setting`` kept as text), or ``None`` when absent."""
        path = self.folder / f"{name}.csv"
        if not path.exists():
            return None
        if name not in self.read:
            self.read.append(name)
        frame = pd.read_csv(path, dtype={"setting": str})
        if "protocol" not in frame.columns and {"model", "dataset"} <= set(frame.columns):
            frame["protocol"] = "teacher-forced"
        return frame


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of ``frame`` (its index included when named)."""
    if any(name is not None for name in frame.index.names):
        frame = frame.reset_index()
    cells = frame.astype(object).where(frame.notna(), "")

    def line(values: Iterable) -> str:
        return "| " + " | ".join(str(v).replace("|", "\\|").replace("\n", " ") for v in values) + " |"

    rows = [line(frame.columns), line("---" for _ in frame.columns)]
    rows += [line(row) for row in cells.itertuples(index=False)]
    return "\n".join(rows)


def _number(value: float, digits: int = 1, sign: bool = False) -> str:
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _interval(row, value: str = "mean", sign: bool = False) -> str:
    if pd.isna(row["ci_low"]):
        return _number(row[value], sign=sign)
    return (f"{_number(row[value], sign=sign)} [{_number(row['ci_low'], sign=sign)}, "
            f"{_number(row['ci_high'], sign=sign)}]")


# --------------------------------------------------------------------------- generation page
#: Each experiment's interval table, and the columns besides (model, dataset, protocol,
#: setting, metric) that tell its rows apart.
EXPERIMENT_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "editors": ("editors_intervals", ()),
    "alpha-sweep": ("alpha_sweep_intervals", ("alpha",)),
    "alpha-estimators": ("alpha_estimators_intervals", ()),
    "batch-scaling": ("batch_scaling_intervals", ("batch_size",)),
    "sequential": ("sequential_intervals", ("round",)),
    "outdated": ("outdated_intervals", ()),
}


def protocol_coverage(tables: Tables) -> pd.DataFrame:
    """Per (experiment, model, dataset): the largest number of edits behind one of its
    intervals under each protocol, or ``not run`` (``not measured`` under generation
    where the teacher-forced rows exist alone)."""
    out = []
    for experiment, (name, _) in EXPERIMENT_TABLES.items():
        frame = tables.get(name)
        if frame is None:
            out.append({"experiment": experiment, "model": "", "dataset": "",
                        **{p: "not run" for p in PROTOCOLS}})
            continue
        edited = frame[frame["setting"] != "pre-edit"]
        for (model, dataset), group in edited.groupby(["model", "dataset"], sort=False):
            counts = group.groupby("protocol")["n_edits"].max()
            out.append({"experiment": experiment, "model": model, "dataset": dataset,
                        **{p: str(int(counts[p])) if p in counts.index else "not measured" for p in PROTOCOLS}})
    return pd.DataFrame(out, columns=["experiment", "model", "dataset", *PROTOCOLS])


def _side_by_side(intervals: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """One row per setting, one column per (metric, protocol): ``mean [low, high]``."""
    part = intervals[intervals["metric"].isin(metrics)].copy()
    part["column"] = part["metric"] + ", " + part["protocol"]
    wide = formatted_intervals(part.drop(columns="metric").rename(columns={"column": "metric"}), ["setting"])
    order = [f"{m}, {p}" for m in metrics for p in PROTOCOLS]
    return wide[[c for c in order if c in wide.columns]]


def _editors_section(tables: Tables) -> list[str]:
    intervals = tables.get("editors_intervals")
    gaps = tables.get("editors_protocols")
    if intervals is None or gaps is None or gaps.empty:
        return ["The editor family has not been run under both protocols yet "
                "(`intattn run editors --scale paper --protocol both`)."]
    from .experiments.protocols import reading

    verdicts, rankings = tables.get("editors_verdicts"), tables.get("editors_rankings")
    examples = tables.get("editors_disagreements")
    lines: list[str] = []
    for (model, dataset), group in intervals.groupby(["model", "dataset"], sort=False):
        if set(group["protocol"]) != set(PROTOCOLS):
            lines += [f"### {model}, {dataset}", "",
                      f"Measured under {', '.join(sorted(set(group['protocol'])))} only so far.", ""]
            continue
        n = int(group.loc[group["setting"] != "pre-edit", "n_edits"].max())
        lines += [f"### {model}, {dataset}", "",
                  f"Percent, mean [95% interval over the {n} edited facts]; the unedited model is `pre-edit`.", "",
                  markdown_table(_side_by_side(group, SHOWN)), "",
                  "The generated answer's three scores for the edit prompt (exact match under the natural "
                  "stop, the answer beginning with the target, token F1):", "",
                  markdown_table(formatted_intervals(
                      group[(group["protocol"] == "generation")
                            & group["metric"].isin(["Edit Succ.", "Edit Succ. prefix", "Edit Succ. F1"])],
                      ["setting"])), ""]
        gap = gaps[(gaps["model"] == model) & (gaps["dataset"] == dataset) & gaps["metric"].isin(SHOWN)]
        lines += ["Generation minus teacher forcing on the same edits (points, paired 95% interval):", "",
                  markdown_table(formatted_intervals(gap, ["setting"], value="diff")), ""]
        pick = lambda frame: frame[(frame["model"] == model) & (frame["dataset"] == dataset)]  # noqa: E731
        if verdicts is not None and rankings is not None:
            sentences = [line.split(": ", 1)[1] for line in reading(pick(verdicts), pick(rankings), gap)]
            lines += [f"- {text[0].upper()}{text[1:]}" for text in sentences]
            counts = pick(verdicts)["verdict"].value_counts()
            lines += [f"- Of {int(counts.sum())} comparisons with {pick(verdicts)['baseline'].iloc[0]} (editor x "
                      f"metric), Holm-corrected per protocol: "
                      + ", ".join(f"{int(counts.get(v, 0))} {v}" for v in ("same", "separates", "merges", "flips"))
                      + ".", ""]
        if examples is not None:
            shown = pick(examples)
            if not shown.empty:
                lines += ["Edits on which the protocols disagree (the first of each editor and direction):", "",
                          markdown_table(shown.groupby(["setting", "direction"], sort=False).head(1)
                                         .drop(columns=["model", "dataset"])), ""]
    return lines


def _sweep_section(tables: Tables) -> list[str]:
    claim, ranges = tables.get("alpha_sweep_claim"), tables.get("alpha_sweep_range")
    if claim is None or ranges is None:
        return ["The alpha sweep's claim table has not been written yet (`intattn run alpha-sweep "
                "--scale paper --protocol both`)."]
    lines = ["Claim 2 (the best range of fixed alphas by the mean of Edit Succ., Rephrase and Locality) and "
             "claim 3 (an alpha decided better than alpha 0, i.e. MEMIT, on all three; Holm-corrected per "
             "model, dataset and protocol) under each protocol:", ""]
    out = []
    for (model, dataset), group in ranges.groupby(["model", "dataset"], sort=False):
        for protocol in PROTOCOLS:
            row = group[group["protocol"] == protocol]
            verdict = claim[(claim["model"] == model) & (claim["dataset"] == dataset) & (claim["protocol"] == protocol)]
            if row.empty or verdict.empty:
                out.append({"model": model, "dataset": dataset, "protocol": protocol, "best range": "not measured",
                            "beats alpha 0 on all three": "not measured", "decided worse on a metric": "",
                            "edits": ""})
                continue
            beats = verdict[verdict["beats"]]["setting"].tolist()
            worse = verdict[verdict["worse_on"].fillna("") != ""]["setting"].tolist()
            out.append({"model": model, "dataset": dataset, "protocol": protocol,
                        "best range": "{" + row["alphas_in_range"].iloc[0] + "}",
                        "beats alpha 0 on all three": ", ".join(beats) or "none",
                        "decided worse on a metric": ", ".join(worse) or "none",
                        "edits": int(row["n_edits"].iloc[0])})
    return lines + [markdown_table(pd.DataFrame(out)), ""]


def generation_page(tables: Tables) -> str:
    """``generation.md``: what changes when the model is asked instead of teacher-forced."""
    from .answers import GenerationSettings

    cap = GenerationSettings().max_new_tokens
    lines = [
        "# Teacher forcing and generation",
        "",
        "Every edit of the experiments below is scored twice: *teacher-forced* (the target's tokens are fed "
        "after the prompt and each must be the argmax) and under *generation* (the model answers greedily "
        f"from the prompt, stopped at the end of text, a newline once the answer has begun, or the end of a "
        f"sentence, with a cap of {cap} new tokens; the answer is scored by normalised exact match against "
        "the target and its aliases). Locality under generation keeps a probe when its answer is the "
        "unedited model's. `intattn_analysis/answers.py` states the rule.",
        "",
        "## Coverage",
        "",
        "The largest number of edits behind one interval, per experiment, model, dataset and protocol:",
        "",
        markdown_table(protocol_coverage(tables)),
        "",
        "## The editor family",
        "",
        *_editors_section(tables),
        "## The alpha sweep",
        "",
        *_sweep_section(tables),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- pages
#: ``{file name: page function}``: the pages ``intattn report`` writes.
PAGES: dict[str, Callable[[Tables], str]] = {"generation.md": generation_page}

GENERATED = "<!-- generated by `intattn report` from the tables named at the end; do not edit by hand -->"


def render_pages(tables_dir: str | os.PathLike) -> dict[str, str]:
    """``{file name: markdown}`` of every page, from the CSVs under ``tables_dir``."""
    pages = {}
    for name, page in PAGES.items():
        tables = Tables(tables_dir)
        body = page(tables).rstrip("\n")
        sources = ", ".join(f"`{n}.csv`" for n in tables.read) or "none"
        pages[name] = f"{GENERATED}\n\n{body}\n\n---\nRead from {sources}.\n"
    return pages


def write_pages(tables_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[Path]:
    """Write every page under ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in render_pages(tables_dir).items():
        path = out / name
        path.write_text(text)
        written.append(path)
    return written


def stale_pages(tables_dir: str | os.PathLike, out_dir: str | os.PathLike) -> list[str]:
    """The pages under ``out_dir`` that are missing or differ from what the tables give."""
    out = Path(out_dir)
    return [name for name, text in render_pages(tables_dir).items()
            if not (out / name).exists() or (out / name).read_text() != text]
