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
from .reporting import VERDICT_METRICS

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
        self.stores: list[str] = []  # the experiments of the store under folder/store read

    def get(self, name: str) -> pd.DataFrame | None:
        """``<name>.csv`` as a frame (``setting`` and ``settings_id`` kept as text), or ``None`` when absent.
        ``name`` may lead out of the folder (``../tuning/pmet-smollm2-135m``)."""
        path = self.folder / f"{name}.csv"
        if not path.exists():
            return None
        if name not in self.read:
            self.read.append(name)
        frame = pd.read_csv(path, dtype={"setting": str, "settings_id": str})
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


def _figure(tables: Tables, name: str, caption: str) -> list[str]:
    """A figure the notebooks saved from these tables (``<figures>/<name>.png``), linked
    from ``docs/results/``; nothing where it has not been made."""
    if not (tables.folder.parent / f"{name}.png").exists():
        return []
    return [f"![{caption}](../../{tables.folder.parent.name}/{name}.png)", "", f"*{caption[0].upper()}{caption[1:]}.*",
            ""]


def _edits(frame: pd.DataFrame) -> int:
    """The largest ``n_edits`` of the edited rows (0 where only the unedited model is stored)."""
    edited = frame.loc[frame["setting"] != "pre-edit", "n_edits"]
    return int(edited.max()) if edited.notna().any() else 0


def _interval(row, value: str = "mean", sign: bool = False, digits: int = 1) -> str:
    if pd.isna(row["ci_low"]):
        return _number(row[value], digits, sign=sign)
    return (f"{_number(row[value], digits, sign=sign)} [{_number(row['ci_low'], digits, sign=sign)}, "
            f"{_number(row['ci_high'], digits, sign=sign)}]")


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
    return wide[[c for c in ("settings_id", *order) if c in wide.columns]]


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
        figure = _figure(tables, f"07_protocols_{model}_{dataset}_paper", "each editor's metrics under teacher "
                         "forcing and under generation, with 95% intervals (notebook 07)")
        if set(group["protocol"]) != set(PROTOCOLS):
            lines += [f"### {model}, {dataset}", "",
                      f"Measured under {', '.join(sorted(set(group['protocol'])))} only so far.", ""]
            continue
        n = _edits(group)
        lines += [f"### {model}, {dataset}", "", *figure,
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
        "## Settings",
        "",
        *_settings_section(tables, ("editors", "alpha-sweep", "batch-scaling", "sequential", "outdated")),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- settings
#: Hyperparameters that make a row what it is rather than set it: the alpha an experiment
#: varies, and the null-space projection that makes IntAttn-Edit the ``IntAttn-Edit+NS``
#: row. They are left out when stored settings are compared with today's defaults.
VARIED = ("alpha", "projection", "nullspace_threshold", "nullspace_l2")


def settings_table(store_root: str | os.PathLike, experiments: Sequence[str]) -> pd.DataFrame:
    """Per (experiment, model, dataset, method, settings id): how many stored edit units
    there are, and whether their hyperparameters are the method's defaults for the model today
    (:func:`intattn_analysis.hparams_for`; the fields of :data:`VARIED` are left out of
    the comparison), or how they differ from them."""
    from .experiments.settings import settings_id, settings_of
    from .experiments.store import KEY_FIELD, ResultStore
    from .hparams import hparams_for

    today: dict[tuple[str, str], dict | None] = {}
    counts: dict[tuple, int] = {}
    for experiment in experiments:
        for first in ResultStore(store_root, experiment).first_rows().values():
            key = first.get(KEY_FIELD, {})
            if "hparams" not in key or "method" not in key:
                continue  # the unedited model, a trace
            model, method = first.get("model"), key["method"]
            if (model, method) not in today:
                try:
                    today[model, method] = hparams_for(model, method).effective_dict()
                except ValueError:
                    today[model, method] = None  # no defaults file: nothing to compare with
            now = today[model, method]
            stored = key["hparams"]
            if now is None:
                text = "no defaults to compare with"
            else:
                differ = sorted(n for n in set(stored) | set(now) if n not in VARIED and stored.get(n) != now.get(n))
                text = ("today's defaults" if not differ else
                        "differs: " + ", ".join(f"{n} {stored.get(n)} (today {now.get(n)})" for n in differ))
            entry = (experiment, model, first.get("dataset"), method, settings_id(settings_of(key)), text)
            counts[entry] = counts.get(entry, 0) + 1
    return pd.DataFrame([(*entry, n) for entry, n in counts.items()],
                        columns=["experiment", "model", "dataset", "method", "settings_id", "settings", "units"])


def _settings_section(tables: Tables, experiments: Sequence[str]) -> list[str]:
    if not (tables.folder / "store").is_dir():
        return ["No store beside the tables (`store/`), so the settings behind them cannot be shown.", ""]
    table = settings_table(tables.folder / "store", experiments)
    tables.stores.extend(e for e in experiments if e not in tables.stores)
    if table.empty:
        return ["No edit units are stored yet.", ""]
    return ["The hyperparameters of every stored edit unit behind these tables, against the method's "
            "defaults for the model today (the alpha an experiment varies and the null-space projection of "
            "the `+NS` rows are not compared). Each table row names its settings id (`settings_id`); "
            "`<experiment>_settings.csv` lists every id's settings:", "",
            markdown_table(table), ""]


# --------------------------------------------------------------------------- claims page
def _peaks(aie: pd.DataFrame) -> pd.DataFrame:
    """Per (model, token, module): the layer of the largest AIE, with its interval."""
    rows = aie.loc[aie.groupby(["model", "token", "module"], sort=False)["aie"].idxmax()]
    return pd.DataFrame({
        "model": rows["model"], "token": rows["token"], "module": rows["module"],
        "peak layer": rows["layer"].astype(int),
        "AIE at the peak": [f"{r.aie:.3f} [{r.ci_low:.3f}, {r.ci_high:.3f}]" for r in rows.itertuples()],
        "facts": rows["n_facts"].astype(int)})


def _claim_one(tables: Tables) -> tuple[list[str], dict[str, str]]:
    aie, claim = tables.get("localization_aie"), tables.get("localization_claim")
    if aie is None or claim is None:
        return ["Not run yet (`intattn run localization --dataset builtin --scale paper`).", ""], {}
    lines = ["The average indirect effect (AIE) of restoring each module's output, per layer, over every "
             "built-in fact the model knows (`localization_aie.csv`); the peak of each module:", "",
             markdown_table(_peaks(aie).set_index(["model", "token", "module"])), "",
             "The finding holds when attention's share of the combined AIE is highest in the early third of "
             "the layers *and* its AIE-weighted centre lies below the MLP's (`ia.early_attention_finding`):", ""]
    verdicts = {}
    for row in claim.itertuples():
        lines.append(f"- {row.model}, {row.token.replace('_', ' ')} token: "
                     f"{'holds' if row.holds else 'does not hold'} ({row.numbers}).")
        if row.token == "subject_last":
            verdicts[row.model] = f"{'yes' if row.holds else 'no'} (subject token: {row.numbers})"
    lines += _figure(tables, "04_localization_paper", "the AIE of attention and the MLP per layer at both token "
                     "classes, with 95% intervals, and the severed paths (notebook 04)")
    severed = tables.get("localization_severed")
    if severed is not None:
        lines += ["", "Severing a path (ROME's frozen-module experiment): the residual stream's AIE at the last "
                  "subject token and how much severing the MLP or the attention path lowers it, at the layer "
                  "where the residual AIE peaks:", ""]
        peak = severed.loc[severed.groupby("model", sort=False)["aie"].idxmax()]
        lines.append(markdown_table(pd.DataFrame({
            "model": peak["model"], "layer": peak["layer"].astype(int), "residual AIE": peak["aie"].round(3),
            "drop, MLP severed": peak["drop_mlp"].round(3), "drop, attention severed": peak["drop_attn"].round(3)})))
    return lines + [""], verdicts


def _sweep_tables(tables: Tables) -> tuple[list[str], dict[tuple[str, str], str]]:
    intervals, paired = tables.get("alpha_sweep_intervals"), tables.get("alpha_sweep_paired")
    ranges, claim = tables.get("alpha_sweep_range"), tables.get("alpha_sweep_claim")
    if intervals is None or paired is None or ranges is None:
        return ["Not run yet (`intattn run alpha-sweep --scale paper`).", ""], {}
    if "protocol" not in ranges.columns:
        ranges = ranges.assign(protocol="teacher-forced")
    lines, verdicts = _figure(tables, "04_alpha_sweep_paper", "each metric against alpha, with 95% intervals "
                             "(notebook 04)"), {}
    for (model, dataset, protocol), group in intervals.groupby(["model", "dataset", "protocol"], sort=False):
        n = _edits(group)
        pair = paired[(paired["model"] == model) & (paired["dataset"] == dataset) & (paired["protocol"] == protocol)]
        best = ranges[(ranges["model"] == model) & (ranges["dataset"] == dataset) & (ranges["protocol"] == protocol)]
        lines += [f"### {model}, {dataset}, {protocol}", "",
                  f"Percent (Fluency in bits), mean [95% interval over {n} edited facts]:", "",
                  markdown_table(formatted_intervals(group[group["metric"].isin(SHOWN + ("Fluency",))],
                                                     ["setting"])), "",
                  "Each setting minus alpha 0 on the same facts (points, paired 95% interval; "
                  + ("Holm-adjusted p-value, one family per model, dataset and protocol: every setting on the four "
                     "KnowEdit metrics):" if "p_holm" in pair.columns
                     else "p-values uncorrected):"), ""]
        shown = pair[pair["metric"].isin(BEST_SHOWN)].copy()
        p = "p_holm" if "p_holm" in shown.columns else "p_value"
        shown["text"] = [f"{_interval(r, 'diff', sign=True)}, p {_p(r[p])}" for _, r in shown.iterrows()]
        lines += [markdown_table(shown.pivot_table(index="setting", columns="metric", values="text", aggfunc="first",
                                                   sort=False)[[m for m in BEST_SHOWN if m in set(shown["metric"])]]),
                  ""]
        if not best.empty:
            row = best.iloc[0]
            lines.append(f"- Best fixed alpha by the mean of Edit Succ., Rephrase and Locality per fact: "
                         f"{row['best_alpha']:g}; the range not worse than it: {{{row['alphas_in_range']}}}.")
        if claim is not None and "protocol" in claim.columns:
            verdict = claim[(claim["model"] == model) & (claim["dataset"] == dataset) & (claim["protocol"] == protocol)]
            beats = verdict[verdict["beats"].astype(bool)]["setting"].tolist()
            lines.append(f"- Settings decided better than alpha 0 on Edit Succ., Rephrase and Locality together: "
                         f"{', '.join(beats) or 'none'}.")
            if protocol == "teacher-forced":
                verdicts[(model, dataset)] = ("yes: " + ", ".join(beats)) if beats else "no: no alpha is decided " \
                    "better than alpha 0 on all three"
        if not best.empty and protocol == "teacher-forced":
            verdicts[(model, "range", dataset)] = "{" + best.iloc[0]["alphas_in_range"] + "}"
        lines.append("")
    return lines, verdicts


def _estimator_tables(tables: Tables) -> list[str]:
    alphas, paired, ranges = (tables.get(n) for n in ("alpha_estimators_alphas", "alpha_estimators_paired",
                                                      "alpha_estimators_range"))
    if alphas is None or paired is None:
        return ["Not run yet (`intattn run alpha-estimators --scale paper`).", ""]
    lines = []
    for (model, dataset), group in alphas.groupby(["model", "dataset"], sort=False):
        pair = paired[(paired["model"] == model) & (paired["dataset"] == dataset)]
        table = group[["estimator", "alpha", "mean_alpha"]].rename(columns={"alpha": "alpha per layer",
                                                                            "mean_alpha": "mean alpha"})
        table["mean alpha"] = table["mean alpha"].round(3)
        for protocol, part in pair.groupby("protocol", sort=False):
            for metric in ("Edit Succ.", "Locality"):
                rows = part[part["metric"] == metric].set_index("setting")
                table[f"{metric} − MEMIT, {protocol}"] = [
                    _interval(rows.loc[e], "diff", sign=True) if e in rows.index else "" for e in table["estimator"]]
        if ranges is not None:
            inside = ranges[(ranges["model"] == model) & (ranges["dataset"] == dataset)]
            for protocol, part in inside.groupby("protocol", sort=False):
                flags = part.set_index("estimator")["inside"]
                table[f"in the best range ({protocol})"] = [
                    {True: "yes", False: "no"}.get(bool(flags[e]) if e in flags.index and pd.notna(flags[e])
                                                   else None, "") for e in table["estimator"]]
        lines += [f"### {model}, {dataset}", "", markdown_table(table.set_index("estimator")), ""]
    return lines


#: The paired metrics the claims page shows.
BEST_SHOWN = ("Edit Succ.", "Rephrase", "Locality")


def _p(value: float) -> str:
    return "< 1e-3" if value < 1e-3 else f"{value:.3f}"


def claims_page(tables: Tables) -> str:
    """``claims.md``: the paper's three claims at paper scale, per model."""
    one, verdict_one = _claim_one(tables)
    sweep, verdict_sweep = _sweep_tables(tables)
    models = list(dict.fromkeys([*verdict_one, *(k[0] for k in verdict_sweep)]))
    verdict = pd.DataFrame([{
        "model": m,
        "1. attention stores facts, most of all early": verdict_one.get(m, "not run"),
        "2. best range of fixed alphas (ZsRE, teacher-forced)": verdict_sweep.get((m, "range", "zsre"), "not run"),
        "3. an alpha beats MEMIT on all three (ZsRE, teacher-forced)": verdict_sweep.get(
            (m, "zsre"), "no claim table (`intattn run alpha-sweep --tables-only --scale paper`)"
            if (m, "range", "zsre") in verdict_sweep else "not run"),
    } for m in models])
    lines = [
        "# The paper's claims at scale",
        "",
        "(1) Attention modules store facts, most of all in early layers; (2) a moderate alpha is best and the "
        "contribution-guided alpha stays in the optimal range; (3) IntAttn-Edit beats MLP-only editing (MEMIT) "
        "on success, generalisation and preservation. Every number is a mean over facts with a 95% bootstrap "
        "interval; every comparison is paired on the same facts.",
        "",
        "## Verdicts",
        "",
        markdown_table(verdict) if len(verdict) else "Nothing has been run yet.",
        "",
        "## Claim 1: localization",
        "",
        *one,
        "## Claims 2 and 3: the alpha sweep",
        "",
        *sweep,
        "## Claims 2 and 3: alpha estimators against MEMIT",
        "",
        "Each estimator's alpha at the edited layers, and its edit minus MEMIT's on the same test facts "
        "(points, paired 95% interval), per protocol; `in the best range` compares the mean alpha with the "
        "sweep's best range.",
        "",
        *_estimator_tables(tables),
        "## Settings",
        "",
        *_settings_section(tables, ("alpha-sweep", "alpha-estimators")),
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- editors page
def _decided(row, p: str = "p_holm", level: float = 0.05) -> str:
    """``above``, ``below`` or ``level`` for a paired row (its adjusted p-value decides)."""
    if pd.isna(row.get(p)) or row[p] >= level:
        return "level"
    return "above" if row["diff"] > 0 else "below"


def _against_baseline(pair: pd.DataFrame, metrics: Sequence[str],
                      family: str = "every row of the table on the four KnowEdit metrics") -> list[str]:
    """One sentence per metric: which rows are decided above and below the baseline;
    ``family`` says which comparisons its Holm correction runs over."""
    lines = []
    if pair.empty:
        return lines
    baseline = pair["baseline"].iloc[0]
    p = "p_holm" if "p_holm" in pair.columns else "p_value"
    for metric in metrics:
        part = pair[pair["metric"] == metric]
        if part.empty:
            continue
        sides = {side: [f"{r['setting']} ({_interval(r, 'diff', sign=True)})" for _, r in part.iterrows()
                        if _decided(r, p) == side] for side in ("above", "below")}
        level = [r["setting"] for _, r in part.iterrows() if _decided(r, p) == "level"]
        text = f"- {metric}: " + "; ".join(
            [f"above {baseline}: {', '.join(sides['above'])}" if sides["above"] else f"none above {baseline}",
             f"below: {', '.join(sides['below'])}" if sides["below"] else "none below",
             f"level with it: {', '.join(level)}" if level else "none level"]) + "."
        lines.append(text)
    correction = (f"Holm-adjusted p < 0.05 within its family ({family})" if p == "p_holm"
                  else "p < 0.05, uncorrected")
    return lines + [f"- (Decided means {correction}; points, paired 95% interval.)"]


def editors_page(tables: Tables) -> str:
    """``editors.md``: every editor on the same batch, per model, dataset and protocol."""
    intervals, paired, seconds = (tables.get(n) for n in ("editors_intervals", "editors_paired", "editors_seconds"))
    lines = ["# The editor family", "",
             "Every editor on the same batch of KnowEdit test edits (the first editable records), each with its "
             "defaults for the model, evaluated with the same metrics and paired with MEMIT on the same facts "
             "(`intattn run editors --scale paper --protocol both`). Percent (Fluency in bits), mean [95% interval "
             "over facts]; `seconds` is the edit alone.", ""]
    if intervals is None or paired is None:
        return "\n".join(lines + ["Not run yet."])
    for (model, dataset, protocol), group in intervals.groupby(["model", "dataset", "protocol"], sort=False):
        n = _edits(group)
        table = formatted_intervals(group[group["metric"].isin(SHOWN + ("Fluency",))], ["setting"])
        pair = paired[(paired["model"] == model) & (paired["dataset"] == dataset) & (paired["protocol"] == protocol)]
        for metric in ("Edit Succ.", "Locality"):
            rows = pair[pair["metric"] == metric].set_index("setting")
            table[f"{metric} − MEMIT"] = [_interval(rows.loc[s], "diff", sign=True) if s in rows.index else ""
                                          for s in table.index]
        if seconds is not None and protocol == "teacher-forced":
            timed = seconds[(seconds["model"] == model) & (seconds["dataset"] == dataset)].set_index("setting")
            table["seconds"] = [f"{timed.loc[s, 'edit_seconds']:.0f}" if s in timed.index else "" for s in table.index]
        lines += [f"## {model}, {dataset}, {protocol}", "", f"{n} edits.", "", markdown_table(table), "",
                  *_against_baseline(pair, ("Edit Succ.", "Rephrase", "Locality")), ""]
    lines += _rome_sensitivity_section(tables)
    lines += ["## Settings", "", *_settings_section(tables, ("editors",))]
    return "\n".join(lines)


def _rome_sensitivity_section(tables: Tables) -> list[str]:
    """What ``scripts/rome_sensitivity.py`` measured: the same ROME batch twice, and once
    with the edited matrix changed in its last digits."""
    table = tables.get("rome_sensitivity")
    if table is None:
        return []
    lines = ["## ROME's batch and rounding", "",
             "ROME writes a batch one fact after another, each rank-one update on the model the earlier ones "
             "left, so a difference in the last digits can grow from fact to fact. "
             "`scripts/rome_sensitivity.py` wrote the same batch three times on one machine: once more as "
             "before, and once with every weight of the edited matrix multiplied by 1 + 2^-21 (about four units "
             "in the last place of float32).", "", markdown_table(table.drop(columns="protocol").round(1)), ""]
    for _, row in table.iterrows():
        n, differing = int(row["n_facts"]), int(row["facts_differing"])
        if row["change"] == "none":
            lines.append(f"- Written again unchanged, the batch of {n} is "
                         f"{'identical' if differing == 0 else f'different on {differing} facts'}.")
        elif differing:
            lines.append(f"- Changed in the last digits, Edit Succ. changes on {differing} of {n} facts "
                         f"({row['edit_succ_first']:.1f} against {row['edit_succ_other']:.1f}): two computations of "
                         "a ROME batch whose forwards differ in the last digits (another version of the code, "
                         "another BLAS or CPU) can differ as much, while one computation is the same in every "
                         "experiment that runs it.")
        else:
            lines.append(f"- Changed in the last digits, the batch of {n} is unchanged.")
    return lines + [""]


# --------------------------------------------------------------------------- scaling page
def _by(frame: pd.DataFrame, model: str, dataset: str, protocol: str) -> pd.DataFrame:
    part = frame[(frame["model"] == model) & (frame["dataset"] == dataset)]
    return part[part["protocol"] == protocol] if "protocol" in part.columns else part


def _wide(intervals: pd.DataFrame, column: str, metric: str) -> pd.DataFrame:
    """One row per setting, one column per value of ``column``: ``metric``'s mean [interval]."""
    part = intervals[(intervals["metric"] == metric) & (intervals["setting"] != "pre-edit")].copy()
    part["text"] = [_interval(r) for _, r in part.iterrows()]
    return part.pivot_table(index="setting", columns=column, values="text", aggfunc="first", sort=False)


def _batch_scaling_section(tables: Tables) -> list[str]:
    intervals, paired, scaling = (tables.get(n) for n in ("batch_scaling_intervals", "batch_scaling_paired",
                                                          "batch_scaling_scaling"))
    if intervals is None:
        return ["Not run yet (`intattn run batch-scaling --scale paper --protocol both`).", ""]
    lines = []
    for (model, dataset, protocol), group in intervals.groupby(["model", "dataset", "protocol"], sort=False):
        n = int(group["n_edits"].max())
        largest = int(group["batch_size"].max())
        lines += [f"### {model}, {dataset}, {protocol}", "",
                  f"The same {n} facts at every batch size (columns: facts written at once).", ""]
        for metric in ("Edit Succ.", "Locality"):
            lines += [f"{metric}:", "", markdown_table(_wide(group, "batch_size", metric)), ""]
        if scaling is not None:
            loss = _by(scaling, model, dataset, protocol)
            loss = loss[(loss["metric"] == "Edit Succ.") & (loss["batch_size"] == largest)].sort_values("diff")
            if not loss.empty:
                order = ", ".join(f"{r['setting']} {_interval(r, 'diff', sign=True)}" for _, r in
                                  loss.iloc[::-1].iterrows())
                lines.append(f"- Edit Succ. at {largest} minus the same editor at size "
                             f"{int(loss['baseline_size'].iloc[0])}, on the same facts, least loss first: {order}.")
        if paired is not None:
            pair = _by(paired, model, dataset, protocol)
            family = (f"{int(pair['metric'].isin(VERDICT_METRICS).sum())} comparisons: every size and editor "
                      "on the four KnowEdit metrics")
            lines += [f"- Against MEMIT at {largest} facts at once:",
                      *(f"  {line}" for line in _against_baseline(pair[pair["batch_size"] == largest],
                                                                   ("Edit Succ.", "Rephrase", "Locality"), family))]
        lines += _replication_lines(tables.get("batch_scaling_replication"), model, dataset, protocol)
        lines.append("")
    return lines


def _replication_lines(replication: pd.DataFrame | None, model: str, dataset: str, protocol: str) -> list[str]:
    """The comparison against MEMIT at each replicated size, batch by batch and pooled, or
    what the paper scale asks for that is not stored yet."""
    from .experiments.batch_scaling import SCALES

    part = None if replication is None or replication.empty else _by(replication, model, dataset, protocol)
    if part is None or part.empty:
        asked = [f"{count} disjoint batches of {size}" for size, count in SCALES["paper"].replicates]
        if not asked:
            return []
        return [f"- Not replicated yet: the paper scale asks for {', '.join(asked)}; `intattn status` counts the "
                "missing units."]
    lines = []
    for size, rows in part.groupby("batch_size", sort=False):
        batches = sorted(b for b in rows["batch"].astype(str).unique() if b != "all")
        family = (f"{int(rows['metric'].isin(VERDICT_METRICS).sum())} comparisons: each editor, batch by batch "
                  "and pooled, on the four KnowEdit metrics")
        lines.append(f"- Replicated at {int(size)} facts at once on {len(batches)} disjoint batches, against MEMIT:")
        for batch in [*batches, "all"]:
            chosen = rows[rows["batch"].astype(str) == batch]
            if chosen.empty:
                continue
            n = int(chosen["n_edits"].max())
            name = f"batch {batch} ({n} facts)" if batch != "all" else f"the batches pooled ({n} facts)"
            lines += [f"  - {name}:", *(f"    {line}" for line in _against_baseline(
                chosen, ("Edit Succ.", "Rephrase", "Locality"), family))]
    return lines


def _sequential_section(tables: Tables) -> list[str]:
    intervals, paired = tables.get("sequential_intervals"), tables.get("sequential_paired")
    if intervals is None:
        return ["Not run yet (`intattn run sequential --scale paper --protocol both`).", ""]
    lines = []
    for (model, dataset, protocol), group in intervals.groupby(["model", "dataset", "protocol"], sort=False):
        last = int(group["round"].max())
        edits = int(group[(group["round"] == last) & (group["metric"] == "Edit Succ.")]["n_edits"].max())
        rounds = sorted({1, 5, 10, 15, last} & set(group["round"].astype(int)))
        trajectory = _wide(group[group["round"].isin(rounds)], "round", "Edit Succ.")
        trajectory.columns = [f"round {c}" for c in trajectory.columns]
        final = formatted_intervals(group[(group["round"] == last)
                                          & group["metric"].isin(("Edit Succ.", "Rephrase", "Locality", "Known kept"))],
                                    ["setting"])
        lines += [f"### {model}, {dataset}, {protocol}", "",
                  f"Every edit so far evaluated after each round; after round {last} ({edits} edits):", "",
                  markdown_table(final), "", "Edit Succ. over every edit so far, by round:", "",
                  markdown_table(trajectory), ""]
        first = group[(group["round"] == 1) & (group["metric"] == "Edit Succ.")].set_index("setting")["mean"]
        end = group[(group["round"] == last) & (group["metric"] == "Edit Succ.")].set_index("setting")["mean"]
        drop = (end - first).dropna().sort_values(ascending=False)
        lines.append("- Edit Succ. from round 1 to round " + str(last) + ", least loss first: "
                     + ", ".join(f"{name} {value:+.1f}" for name, value in drop.items()) + ".")
        if paired is not None:
            pair = _by(paired, model, dataset, protocol)
            lines += [f"- Against MEMIT after round {last}:",
                      *(f"  {line}" for line in _against_baseline(
                          pair[pair["round"] == last], ("Edit Succ.", "Locality", "Known kept"),
                          "every editor after the same round on the four KnowEdit metrics; Known kept and the "
                          "other metrics another"))]
        lines.append("")
    return lines


def scaling_page(tables: Tables) -> str:
    """``scaling.md``: batch scaling and sequential editing."""
    return "\n".join([
        "# Many edits: batch scaling and sequential editing", "",
        "Every editor that writes a batch at once, at growing batch sizes on the same facts "
        "(`batch-scaling`), and in rounds of edits piling up on one model (`sequential`). The IntAttn-Edit rows "
        "take the alpha estimator (e) chose on train records. Percent, mean [95% interval over facts].", "",
        "## Batch scaling", "",
        *_figure(tables, "06_batch_scaling_paper", "each metric against the batch size, with 95% intervals "
                 "(notebook 06)"),
        *_batch_scaling_section(tables),
        "## Sequential editing", "",
        *_figure(tables, "05_sequential_paper", "each metric against the rounds of edits applied, with 95% "
                 "intervals (notebook 05)"),
        *_sequential_section(tables),
        "## Settings", "", *_settings_section(tables, ("batch-scaling", "sequential"))])


# --------------------------------------------------------------------------- outdated page
#: The outdated experiment's metrics the page shows, in order.
OUTDATED_SHOWN = ("Old top-1/prompt", "Old top-10/prompt", "Old top-1/paraphrase", "Old top-1/alias",
                  "Context old top-1", "Control copy top-1")
ANSWERS_SHOWN = ("Old answer/prompt", "Old answer/paraphrase", "Old answer/alias", "Context old answer",
                 "Control copy answer")


def outdated_page(tables: Tables) -> str:
    """``outdated.md``: where the old answer survives each editor."""
    intervals, paired, restored = (tables.get(n) for n in ("outdated_intervals", "outdated_paired",
                                                           "outdated_restored"))
    answers, answers_paired = tables.get("outdated_answers"), tables.get("outdated_answers_paired")
    lines = ["# Outdated knowledge: where the old answer survives", "",
             "After each editor writes its batch of known built-in facts: how often the old answer is still the "
             "model's first choice (top-1) or among its ten first (top-10) on the edit prompt, a paraphrase and "
             "an alias of the subject; how often a context that cites the old answer brings it back (`Context old "
             "top-1`), beside the copying control (the same context citing an unrelated answer, `Control copy "
             "top-1`). Percent, mean [95% interval over facts].", ""]
    if intervals is None:
        return "\n".join(lines + ["Not run yet (`intattn run outdated --dataset builtin --scale paper`)."])
    lines += _figure(tables, "06_outdated_flow_paper", "where the old answer still flows after each editor: the "
                     "AIE of each module against the unedited model's (notebook 06)")
    for (model, dataset), group in intervals.groupby(["model", "dataset"], sort=False):
        n = int(group["n_edits"].max())
        lines += [f"## {model}, {dataset}", "", f"{n} facts.", "",
                  markdown_table(formatted_intervals(group[group["metric"].isin(OUTDATED_SHOWN)], ["setting"])), ""]
        if paired is not None:
            pair = paired[(paired["model"] == model) & (paired["dataset"] == dataset)]
            lines += _against_baseline(pair, ("Old top-1/prompt", "Old top-10/prompt", "Context old top-1"),
                                       "every editor on the old-answer metrics") + [""]
        if restored is not None:
            part = restored[(restored["model"] == model) & (restored["dataset"] == dataset)]
            if not part.empty:
                lines += ["Among the facts whose old answer is no longer the first choice on the plain prompt, how "
                          "often the context brings it back:", "",
                          markdown_table(formatted_intervals(part, ["setting"])), ""]
        if answers is not None:
            part = answers[(answers["model"] == model) & (answers["dataset"] == dataset)]
            if not part.empty:
                lines += ["Under generation (the answer begins with the old answer):", "",
                          markdown_table(formatted_intervals(part[part["metric"].isin(ANSWERS_SHOWN)], ["setting"])),
                          ""]
                if answers_paired is not None:
                    pair = answers_paired[(answers_paired["model"] == model) & (answers_paired["dataset"] == dataset)]
                    lines += _against_baseline(pair, ("Old answer/prompt", "Context old answer"),
                                               "every editor on the old-answer metrics") + [""]
    lines += ["## Settings", "", *_settings_section(tables, ("outdated",))]
    return "\n".join(lines)


# --------------------------------------------------------------------------- tuning page
def tuning_page(tables: Tables) -> str:
    """``tuning.md``: the grids of ``intattn tune`` (``figures/tuning``) and the target
    stop rules compared on train records (``figures/target_rules.csv``)."""
    lines = ["# Settings chosen on train records", "",
             "Each grid of `intattn tune` edits one batch of *train* records with every setting of one editor and "
             "with MEMIT at its defaults, and pairs each setting with MEMIT on the same facts (points, paired 95% "
             "interval). Percent, mean [95% interval over facts]. The defaults of `intattn_analysis/data/hparams/` "
             "name in their `source` fields which grid chose them.", ""]
    folder = tables.folder.parent / "tuning"
    grids = sorted(folder.glob("*.csv")) if folder.is_dir() else []
    if not grids:
        lines += ["No grid has been run yet (`intattn tune METHOD --grid NAME=V1,V2`).", ""]
    for path in grids:
        grid = tables.get(f"../tuning/{path.stem}")
        shown = grid[grid["metric"].isin(("Edit Succ.", "Rephrase", "Locality"))]
        shown = shown.assign(baseline=shown["baseline"].fillna(""))
        # a file holds every run of a grid (on more or fewer records, against MEMIT at other
        # settings): one table per run
        runs = list(shown.groupby(["model", "dataset", "n_edits", "baseline"], sort=False))
        for k, ((model, dataset, _, _), part) in enumerate(runs, start=1):
            table = formatted_intervals(part, ["setting"])
            for metric in ("Edit Succ.", "Locality"):
                rows = part[part["metric"] == metric].set_index("setting")
                table[f"{metric} − baseline"] = [
                    f"{rows.loc[s, 'diff']:+.1f} [{rows.loc[s, 'ci_low_vs_memit']:+.1f}, "
                    f"{rows.loc[s, 'ci_high_vs_memit']:+.1f}]" if s in rows.index and pd.notna(rows.loc[s, "diff"])
                    else "" for s in table.index]
            baseline = part["baseline"].iloc[0] or "none"
            n = int(part["n_edits"].max())
            run = f", run {k} of {len(runs)}" if len(runs) > 1 else ""
            lines += [f"## {path.stem}: {model}, {dataset}{run}", "",
                      f"{n} train records; baseline: `{baseline}`.", "", markdown_table(table), ""]
    rules = tables.get("../target_rules")
    if rules is not None:
        keep = [c for c in rules.columns if not c.endswith("±95%") and "vs first" not in c]
        lines += ["## Target stop rules (`figures/target_rules.csv`)", "",
                  "The rule that ends each fact's target optimisation, compared on the same train records "
                  "(`scripts/target_rules.py`); the ± columns are in the CSV.", "",
                  markdown_table(rules[keep].round(3)), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- attribution page
#: The agreement measures, in the order shown.
AGREEMENT_MEASURES = ("spearman", "recall@5", "recall@10", "sign_agreement")


def _where_it_misses(curves: pd.DataFrame) -> pd.DataFrame:
    """Per (model, method, window, token, module): the AIE summed over layers by exact
    tracing and by the estimate, the estimate's share of it, and the layer where the two
    differ most."""
    rows = []
    keys = ["model", "compared", "window", "token", "module"]
    for key, group in curves.groupby(keys, sort=False):
        exact = group[group["method"] == "exact"].set_index("layer")["aie"]
        estimate = group[group["method"] != "exact"].set_index("layer")["aie"].reindex(exact.index)
        gap = (estimate - exact).abs()
        rows.append({**dict(zip(keys, key)), "exact_sum": round(float(exact.sum()), 3),
                     "estimate_sum": round(float(estimate.sum()), 3),
                     "share": round(float(estimate.sum() / exact.sum()), 2) if exact.sum() > 0 else float("nan"),
                     "worst_layer": int(gap.idxmax()), "exact_there": round(float(exact[gap.idxmax()]), 3),
                     "estimate_there": round(float(estimate[gap.idxmax()]), 3)})
    return pd.DataFrame(rows).rename(columns={"compared": "method"})


def attribution_page(tables: Tables) -> str:
    """``attribution.md``: attribution patching (AtP, AtP*) against exact causal tracing."""
    agreement, curves, claims, paired, timing, bench = (tables.get(n) for n in (
        "localization_attribution_agreement", "localization_attribution_aie", "localization_attribution_claim",
        "localization_attribution_paired", "localization_timing", "../benchmarks/tracing"))
    lines = ["# Attribution patching against exact causal tracing", "",
             "Attribution patching estimates every site's indirect effect from the corrupted run's gradient, "
             "`(clean - corrupted) . d p(answer) / d activation` (AtP); `attribution*` adds AtP*'s GradDrop, a "
             "magnitude that paths of opposite sign cannot cancel. Both use exact tracing's facts, noise draws and "
             "windows; a window's estimate is the sum of its layers' (`intattn_analysis/attribution.py` states "
             "both approximations). Per fact, over its sites: Spearman's rho between estimated and exact IEs, the "
             "share of the exact top-5 and top-10 sites among the estimate's, and sign agreement; mean [95% "
             "interval over facts].", ""]
    if agreement is None:
        return "\n".join(lines + ["Not run yet (`intattn run localization --dataset builtin --scale paper --method "
                                  "attribution`, then `--method 'attribution*'`)."])
    lines += _figure(tables, "01_attribution_vs_exact_paper", "exact tracing (solid) and AtP (dashed), AIE per "
                     "layer at the paper scale (notebook 01)")
    for model, group in agreement.groupby("model", sort=False):
        table = group.assign(value=[_interval(r, digits=2) for r in group.to_dict("records")])
        wide = table.pivot_table(index=["method", "window", "kind"], columns="measure", values="value",
                                 aggfunc="first", sort=False)
        wide = wide[[m for m in AGREEMENT_MEASURES if m in wide.columns]]
        n = int(group["n_facts"].max())
        lines += [f"## {model}", "", f"{n} facts (AtP*: the facts it traced; AtP* is held to the exact effects' "
                  "magnitudes, and has no sign).", "", markdown_table(wide), ""]
        if paired is not None and (paired["model"] == model).any():
            part = paired[paired["model"] == model]
            shown = part.assign(diff=[_interval(r, "diff", sign=True, digits=3) for r in part.to_dict("records")],
                                p_holm=part["p_holm"].map(_p))
            shown = shown.round({"attribution": 3, "attribution*": 3})
            lines += ["Does GradDrop help? AtP* against AtP on the facts both traced, both held to the exact "
                      "effects' magnitudes (AtP as absolute values); the difference is AtP* minus AtP, mean [95% "
                      "bootstrap interval over facts], Holm-adjusted over the rows of a window:", "",
                      markdown_table(shown[["window", "kind", "measure", "attribution", "attribution*", "diff",
                                            "p_holm", "n_facts"]]), ""]
        if claims is not None:
            part = claims[claims["model"] == model]
            lines += ["Claim 1 (attention matters most early) from each method's curves at the notebooks' window:",
                      "", markdown_table(part[["method", "compared", "token", "n_facts", "holds", "numbers"]]), ""]
        if curves is not None:
            # AtP only: AtP*'s magnitudes are not comparable with signed sums
            signed = curves[(curves["model"] == model) & (curves["compared"] == "attribution")]
            misses = _where_it_misses(signed).drop(columns="model")
            lines += ["Where AtP misses: the AIE summed over layers, exact and estimated, AtP's share of it, and "
                      "the layer where the two curves differ most:", "", markdown_table(misses), ""]
    if timing is not None:
        lines += ["## Time", "", "Seconds per fact of the paper-scale units that were timed (attribution, and exact "
                  "tracing one layer at a time, both without the per-fact cache), 10 noise draws, on the machine "
                  "that ran them:", "", markdown_table(timing.round(3)), ""]
    if bench is not None:
        lines += ["`benchmarks/bench_tracing.py`, every kind, token and layer of a fact, equal noise draws; "
                  "`exact_over_method` is exact tracing's time over the method's, `over_forward_backward` the "
                  "method's time over one plain forward and backward of the prompt batched over the draws:", "",
                  markdown_table(bench), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- precision page
#: The metrics the precision page shows, in order.
PRECISION_SHOWN = ("Edit Succ.", "Rephrase", "Portability", "Locality", "Fluency")


def precision_page(tables: Tables) -> str:
    """``precision.md``: the closed-form editors with the model in half precision (bfloat16 at
    paper scale) against float32."""
    intervals, paired, seconds, bench = (tables.get(n) for n in ("precision_intervals", "precision_paired",
                                                                 "precision_seconds", "../benchmarks/precision"))
    lines = ["# Half precision against float32", "",
             "The same batch of test edits written by MEMIT, IntAttn-Edit and AlphaEdit with the model loaded in "
             "float32 and in bfloat16, each with its defaults for the model, evaluated with the editors "
             "experiment's metrics and paired fact by fact (`intattn run precision --scale paper`). Both "
             "dtypes follow the precision policy (`docs/design.md`, Precision): second moments summed in float64 "
             "over the same corpus text, float64 solves, float32 targets, the update cast once to the weights' "
             "dtype, an exact restore. `pre-edit` is the unedited model, so its row is what the precision alone "
             "moves. Percent (Fluency in bits), mean [95% interval over facts]; the difference is the dtype minus "
             "float32 on the same facts, Holm-adjusted over every row on the four KnowEdit metrics.", ""]
    speed = [] if bench is None else [
        "## Speed", "", "`benchmarks/bench_precision.py`: seconds of a forward and of a forward with backward of one "
        "token batch, median of its repeats, and each dtype's time over float32's, on the machine that last ran it:",
        "", markdown_table(bench), ""]
    if intervals is None:
        return "\n".join(lines + ["Not run yet (`intattn run precision --model smollm2-135m --dataset zsre "
                                  "--scale paper`).", "", *speed])
    if paired is None:  # only the reference dtype is stored: nothing to pair
        paired = pd.DataFrame(columns=["model", "dataset", "protocol", "dtype", "reference", "setting", "metric",
                                       "diff", "ci_low", "ci_high", "p_value", "n_edits", "p_holm"])
    for (model, dataset, protocol), group in intervals.groupby(["model", "dataset", "protocol"], sort=False):
        pair = paired[(paired["model"] == model) & (paired["dataset"] == dataset) & (paired["protocol"] == protocol)]
        reference = pair["reference"].iloc[0] if not pair.empty else "float32"
        if pair.empty:
            shown = formatted_intervals(group[group["metric"].isin(PRECISION_SHOWN)], ["dtype", "setting"])
            lines += [f"## {model}, {dataset}, {protocol}", "", "Only these dtypes are stored, so nothing is paired "
                      "yet:", "", markdown_table(shown), ""]
        for dtype, part in pair.groupby("dtype", sort=False):
            rows = []
            for _, r in part[part["metric"].isin(PRECISION_SHOWN)].iterrows():
                means = group[(group["setting"] == r["setting"]) & (group["metric"] == r["metric"])].set_index("dtype")
                rows.append({"setting": r["setting"], "metric": r["metric"],
                             reference: _interval(means.loc[reference]) if reference in means.index else "",
                             dtype: _interval(means.loc[dtype]) if dtype in means.index else "",
                             f"{dtype} − {reference}": _interval(r, "diff", sign=True),
                             "p_holm": _p(r["p_holm"]) if pd.notna(r["p_holm"]) else ""})
            decided = part[(part["metric"].isin(VERDICT_METRICS)) & (part["p_holm"] < 0.05)]
            family = part[part["metric"].isin(VERDICT_METRICS)].dropna(subset=["diff"])
            largest = family.loc[family["diff"].abs().idxmax()] if not family.empty else None
            verdict = (f"{len(decided)} of {len(family)} differences on the KnowEdit metrics are decided "
                       "(Holm-adjusted p < 0.05)"
                       + (": " + "; ".join(f"{r['setting']} {r['metric']} {_interval(r, 'diff', sign=True)}"
                                           for _, r in decided.iterrows()) if len(decided) else "")
                       + ".")
            if largest is not None:
                verdict += (f" The largest in size is {largest['setting']} {largest['metric']}, "
                            f"{_interval(largest, 'diff', sign=True)} points.")
            n = int(part["n_edits"].max())
            lines += [f"## {model}, {dataset}, {protocol}: {dtype}", "", f"{n} edits.", "",
                      markdown_table(pd.DataFrame(rows)), "", verdict, ""]
        if seconds is not None and protocol == "teacher-forced":
            timed = seconds[(seconds["model"] == model) & (seconds["dataset"] == dataset)]
            if not timed.empty:
                wide = timed.pivot_table(index="setting", columns="dtype", values="edit_seconds", aggfunc="first",
                                         sort=False).round(0)
                lines += ["Seconds per batch edit (the edit alone; the first editor of a batch computes the shared "
                          "targets unless the cache holds them) on the machine that ran the units. bfloat16 is fast only on hardware with "
                          "bfloat16 matrix instructions; elsewhere PyTorch emulates it.", "",
                          markdown_table(wide), ""]
    return "\n".join(lines + speed)


# --------------------------------------------------------------------------- pages
#: ``{file name: page function}``: the pages ``intattn report`` writes.
#: The models and devices ``plans.md`` plans for: the paper's 7B models.
PLANNED_MODELS = ("Qwen/Qwen2.5-7B", "mistralai/Mistral-7B-v0.1")
PLANNED_DEVICES = (("bfloat16", "h100-80gb"), ("bfloat16", "a100-40gb"), ("float32", "a100-80gb"))


def plans_page(tables: Tables) -> str:
    """The paper-scale plans of the 7B models (:mod:`intattn_analysis.plan`), from their
    shipped configurations and the reference model's units in the store."""
    from .experiments.status import PAPER_GRID
    from .plan import (DEVICES, REFERENCE_MODEL, REFERENCE_RATE, UTILISATION, PlanDoesNotFit, plan, reference_units,
                       summary)

    lines = ["# Plans for the paper's 7B models", ""]
    store = tables.folder / "store"
    if not store.is_dir():
        return "\n".join([*lines, "No store beside the tables (`store/`): plans take their units from it.", ""])
    units = {e: reference_units(e, store) for e in PAPER_GRID}
    units = {e: u for e, u in units.items() if not u.empty}
    tables.stores.extend(e for e in units if e not in tables.stores)
    lines += [f"`intattn plan` from each model's shipped configuration (no weights): the units of "
              f"{REFERENCE_MODEL}'s paper-scale run in the store, the memory the largest of them needs, and "
              f"the hours estimated from the reference units' measured seconds, scaled by the ratio of forward "
              f"FLOPs per token and by the device's peak at {UTILISATION:.0%} utilisation against the reference "
              f"machine's {REFERENCE_RATE / 1e9:.0f} GFLOP/s. Each experiment's time includes the second "
              "moments over the defaults' corpus (10M tokens for these models), which are computed once per model "
              "and cached for the others; sampling that corpus from the model, the offline default, costs at "
              "least as much again. A unit that does not fit "
              "is named. Exact traces are not timed per unit (they are assembled from a per-fact cache), so "
              "their time is not in the estimate. `intattn plan --model M --experiment E --device D` gives the "
              "whole table.", ""]
    for model in PLANNED_MODELS:
        rows = []
        for experiment, reference in units.items():
            row = {"experiment": experiment}
            for dtype, device in PLANNED_DEVICES:
                column = f"{dtype}, {device}"
                try:
                    table = plan(model, experiment, dtype=dtype, device=device, store_root=store, units=reference)
                except PlanDoesNotFit as refused:
                    table = refused.table
                    worst = table.loc[table["total_gib"].idxmax()]
                    row.setdefault("units", int(table["units"].sum()))
                    row[column] = (f"does not fit: {worst['kind']} {worst['method']} needs "
                                   f"{worst['total_gib']:.1f} of {DEVICES[device].memory_gib:g} GiB").replace("  ", " ")
                else:
                    row.setdefault("units", int(table["units"].sum()))
                    totals = summary(table)
                    untimed = f" + {totals['untimed']} untimed units" if totals["untimed"] else ""
                    row[column] = (f"{_duration(totals['hours'])}{untimed}, largest unit "
                                   f"{totals['peak_gib']:.1f} GiB")
            rows.append(row)
        frame = pd.DataFrame(rows)
        frame = frame[["experiment", "units", *(c for c in frame.columns if c not in ("experiment", "units"))]]
        lines += [f"## {model}", "", markdown_table(frame), ""]
    return "\n".join(lines)


def _duration(hours: float) -> str:
    """Hours as minutes below one hour, with two significant digits."""
    return f"{hours * 60:.2g} min" if hours < 1 else f"{hours:.2g} h"


PAGES: dict[str, Callable[[Tables], str]] = {
    "claims.md": claims_page, "editors.md": editors_page, "generation.md": generation_page,
    "scaling.md": scaling_page, "outdated.md": outdated_page, "tuning.md": tuning_page,
    "attribution.md": attribution_page, "plans.md": plans_page, "precision.md": precision_page}

GENERATED = "<!-- generated by `intattn report` from the tables named at the end; do not edit by hand -->"


def render_pages(tables_dir: str | os.PathLike) -> dict[str, str]:
    """``{file name: markdown}`` of every page, from the CSVs under ``tables_dir``."""
    pages = {}
    for name, page in PAGES.items():
        tables = Tables(tables_dir)
        body = page(tables).rstrip("\n")
        sources = ", ".join([*(f"`{os.path.normpath(f'{tables.folder.name}/{n}.csv')}`" for n in tables.read),
                             *(f"the store's `{e}` units" for e in tables.stores)]) or "none"
        pages[name] = f"{GENERATED}\n\n{body}\n\n---\nRead from (under `{tables.folder.parent.name}/`) {sources}.\n"
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
