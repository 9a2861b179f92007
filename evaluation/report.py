"""Markdown tables in the papers' format: our results beside the published rows for the same base model.

Pure Python: renders results records (the JSON ``evaluation/run.py`` / ``aapo-trl eval`` write) with
the numbers of ``evaluation/paper_tables.py``.

* the pass@1 table of AAPO's protocol has AAPO Table 1's columns (AIME24, MATH-500, AMC23, Minerva,
  OlympiadBench, Avg.): the published pass@1 rows of AAPO Tables 1, 6, 8 for the base model, then ours;
  the table of ZAPO's protocol (``--protocol zapo``) has ZAPO Table 1's (AMC of 83 problems, MATH-500,
  Minerva, OlympiadBench, AIME24, Avg.) and its rows: each paper's rows beside results measured as it
  measured them;
* when a record has pass@k for k >= 8, a pass@k table in AAPO Table 7's format follows.

Scores print as percentages with one decimal, "–" where there is none; "†" marks the rows the AAPO
authors re-evaluated themselves.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


# Every module of evaluation/ is loaded by the runner's loader (evaluation/run.py, registered as aapo_eval_run; the
# `aapo-trl eval` CLI, the tests and run.py as a script all go through it): one loader, one module per file.
_sibling = sys.modules["aapo_eval_run"].load_sibling


paper_tables = _sibling("paper_tables")
SCORINGS = _sibling("benchmarks").SCORINGS
COLUMNS = paper_tables.COLUMNS
TITLES = paper_tables.TITLES
DASH = "–"


def percent(value: float | None, scale: float = 100.0) -> str:
    return DASH if value is None else f"{value * scale:.1f}"


def record_label(record: Mapping[str, Any]) -> str:
    if record.get("label"):
        return str(record["label"])
    model = str(record.get("model", "model"))
    path = Path(model)
    return path.name if path.name else model


def record_base_model(record: Mapping[str, Any]) -> str | None:
    """The papers' Hub id of the record's base model: ``record["base_model"]`` if set, else guessed
    from the model name or path; ``None`` when it is none of the papers' base models."""
    for candidate in (record.get("base_model"), record.get("model")):
        hub = paper_tables.canonical_base_model(candidate)
        if hub:
            return hub
    return None


#: Per protocol: the columns and the published tables its results are printed beside.
LAYOUTS = {
    "aapo": (COLUMNS, ("AAPO Table 1", "AAPO Table 6", "AAPO Table 8"), ("AAPO Table 7",)),
    "zapo": (paper_tables.ZAPO_COLUMNS, ("ZAPO Table 1",), ()),
}


def record_protocol(record: Mapping[str, Any]) -> str:
    """``zapo`` for results of ZAPO's protocol, else ``aapo`` (``aapo-passk`` and older records)."""
    return "zapo" if (record.get("protocol") or {}).get("name") == "zapo" else "aapo"


def report_layout(records: Sequence[Mapping[str, Any]]) -> str:
    protocols = {record_protocol(r) for r in records}
    if len(protocols) > 1:
        raise ValueError("these results were measured under different protocols (aapo and zapo: other "
                         "benchmarks, prompt and grader); print them separately")
    return protocols.pop()


def _metric(record: Mapping[str, Any], key: str, metric: str) -> float | None:
    bench = record.get("benchmarks", {}).get(key)
    if not bench:
        return None
    return bench.get("metrics", {}).get(metric)


def _average(record: Mapping[str, Any], metric: str, columns: Sequence[str] = COLUMNS) -> float | None:
    values = [_metric(record, key, metric) for key in columns]
    if any(v is None for v in values):
        return None
    return sum(values) / len(values)


def record_scoring(record: Mapping[str, Any]) -> str:
    """The scorer of a record's ``metrics``; records written before ``--scoring`` existed used the
    papers' scorer, the only one there was."""
    return record.get("scoring") or record.get("protocol", {}).get("scoring") or "papers"


def _scoring_text(records: Sequence[Mapping[str, Any]]) -> str:
    names = list(dict.fromkeys(record_scoring(r) for r in records))
    return " / ".join(names) + " scorer" + ("s" if len(names) > 1 else "")


def _protocol_line(records: Sequence[Mapping[str, Any]]) -> str:
    protocols = []
    for record in records:
        p = record.get("protocol", {})
        text = (
            f"{p.get('name', '?')}: temperature {p.get('temperature')}, top_p {p.get('top_p')}, "
            f"{p.get('num_samples')} sample(s) per problem, at most {p.get('max_new_tokens')} new tokens"
        )
        if p.get("system_prompt"):
            text += ", with a system prompt"
        text += f", {record_scoring(record)} scorer"
        if p.get("prompt"):
            text += f", prompt: {p['prompt']}"
        if p.get("papers_grader"):
            text += f", papers grader: {p['papers_grader']}"
        if text not in protocols:
            protocols.append(text)
    return "; ".join(protocols)


def _size_line(records: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> str | None:
    partial = []
    for record in records:
        for key in columns:
            bench = record.get("benchmarks", {}).get(key)
            if bench and bench.get("num_problems") is not None and bench.get("full_size"):
                if bench["num_problems"] < bench["full_size"]:
                    partial.append(record)
                    break
    if not partial:
        return None
    counts = []
    for key in columns:
        sizes = sorted({r["benchmarks"][key]["num_problems"] for r in records if key in r.get("benchmarks", {})})
        full = next((r["benchmarks"][key].get("full_size") for r in records if key in r.get("benchmarks", {})), None)
        if sizes:
            counts.append(f"{TITLES[key]} {'/'.join(map(str, sizes))} of {full}")
    return ("Our rows are on subsets (" + ", ".join(counts) + " problems): not comparable with the published "
            "numbers.")


def _published_label(row) -> str:
    return row.model + ("†" if row.reproduced else "")


def pass_at_1_table(
    records: Sequence[Mapping[str, Any]],
    base_model: str | None = None,
    tables: Iterable[str] | None = None,
    columns: Sequence[str] | None = None,
) -> tuple[str, list[str]]:
    """The pass@1 table and its notes (default: the records' protocol's columns and tables)."""
    layout = LAYOUTS[report_layout(records) if records else "aapo"]
    columns = layout[0] if columns is None else columns
    tables = layout[1] if tables is None else tables
    header = ["Model", *(TITLES[c] for c in columns), "Avg.", "Source"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(columns) + 1) + ["---"]) + "|"]
    notes: list[str] = []
    for row in paper_tables.rows_for(base_model, tables=tables, metric="pass@1"):
        cells = [percent(row.scores.get(c), 1.0) for c in columns] + [percent(row.average, 1.0)]
        source = row.source + (f" ({row.setting})" if row.table == "6" else "")
        lines.append("| " + " | ".join([_published_label(row), *cells, source]) + " |")
        if row.note:
            notes.append(f"{row.source}, {row.model}: {row.note}.")
    for record in records:
        cells = [percent(_metric(record, c, "pass@1")) for c in columns] + [
            percent(_average(record, "pass@1", columns))]
        lines.append("| " + " | ".join([f"**{record_label(record)}** (ours)", *cells, "this run"]) + " |")
    return "\n".join(lines), notes


def pass_at_k_table(records: Sequence[Mapping[str, Any]], base_model: str | None = None) -> str | None:
    """AAPO Table 7's format (Model, K, the five benchmarks), or ``None`` when no record has k >= 8."""
    ks = sorted({int(name.split("@")[1]) for r in records for b in r.get("benchmarks", {}).values()
                 for name in b.get("metrics", {}) if name.startswith("pass@") and not name.endswith("_stderr")
                 and int(name.split("@")[1]) > 1})
    if not ks:
        return None
    columns, _, passk_tables = LAYOUTS[report_layout(records)]
    header = ["Model", "K", *(TITLES[c] for c in columns), "Source"]
    rule = "|" + "|".join(["---", "---:"] + ["---:"] * len(columns) + ["---"]) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    for row in paper_tables.rows_for(base_model, tables=passk_tables, metric=None) if passk_tables else []:
        cells = [percent(row.scores.get(c), 1.0) for c in columns]
        lines.append("| " + " | ".join([row.model, str(row.k), *cells, row.source]) + " |")
    for record in records:
        for k in ks:
            cells = [percent(_metric(record, c, f"pass@{k}")) for c in columns]
            if all(cell == DASH for cell in cells):
                continue
            lines.append("| " + " | ".join([f"**{record_label(record)}** (ours)", str(k), *cells, "this run"]) + " |")
    return "\n".join(lines)


def scoring_table(records: Sequence[Mapping[str, Any]]) -> str | None:
    """pass@1 of the same generations under each scorer (``metrics_by_scoring``), or ``None`` when
    no record carries both gradings."""
    lines = []
    columns = LAYOUTS[report_layout(records)][0]
    for record in records:
        for scoring in SCORINGS:
            cells = []
            for key in columns:
                graded = (record.get("benchmarks", {}).get(key) or {}).get("metrics_by_scoring") or {}
                cells.append(percent((graded.get(scoring) or {}).get("pass@1")))
            if any(cell != DASH for cell in cells):
                lines.append("| " + " | ".join([f"**{record_label(record)}** (ours)", scoring, *cells]) + " |")
    if not lines:
        return None
    header = "| " + " | ".join(["Model", "Scorer", *(TITLES[c] for c in columns)]) + " |"
    rule = "|" + "|".join(["---", "---"] + ["---:"] * len(columns)) + "|"
    return "\n".join([header, rule, *lines])


def render_report(
    records: Sequence[Mapping[str, Any]],
    base_model: str | None = None,
    title: str | None = None,
) -> str:
    """The Markdown report for one or more results records (e.g. a checkpoint sweep).

    ``base_model`` picks the published rows (default: the first record's, see
    :func:`record_base_model`); a model that is none of the papers' base models gets our rows only.
    """
    records = list(records)
    if not records:
        raise ValueError("no results to render")
    protocol = report_layout(records)
    columns = LAYOUTS[protocol][0]
    hub = paper_tables.canonical_base_model(base_model) if base_model else record_base_model(records[0])
    parts = []
    if title:
        parts.append(f"## {title}")
    parts.append(f"pass@1 (%) -- protocol {_protocol_line(records)}")
    table, notes = pass_at_1_table(records, hub)
    parts.append(table)
    if hub is None:
        shown = base_model or records[0].get("base_model") or record_label(records[0])
        parts.append(f"No published rows for base model {shown!r} (the papers report "
                     f"{', '.join(paper_tables.BASE_MODELS)}); pass --compare to print one of those beside ours.")
    else:
        if record_base_model(records[0]) == hub:
            lead = f"Published rows: base model {hub}"
        else:
            lead = f"Published rows of {hub}, for comparison (not the evaluated model's base)"
        if protocol == "zapo":
            parts.append(f"{lead}, ZAPO Table 1 (ZAPO's protocol, as GRESO in verl: temperature 1.0, 4 samples per "
                         "problem, AMC = the 83 problems of AI-MO/aimo-validation-amc; its baselines other than "
                         "GRESO are copied from SEED-GRPO or their own papers).")
        else:
            parts.append(f"{lead}. † = re-evaluated by the AAPO authors "
                         "(lighteval + vLLM, temperature 0.6, top_p 0.95). ZAPO Table 1 is printed beside results "
                         "of --protocol zapo (another AMC set, prompt and grader).")
    size_line = _size_line(records, columns)
    if size_line:
        parts.append(size_line)
    if notes:
        parts.append("Notes: " + " ".join(notes))
    passk = pass_at_k_table(records, hub)
    if passk:
        parts.append("pass@k (%) -- unbiased estimator from the samples per problem (AAPO Table 7: 64 samples), "
                     f"{_scoring_text(records)}")
        parts.append(passk)
    graded = scoring_table(records)
    if graded:
        papers = "GRESO's grader" if protocol == "zapo" else "lighteval's extractive match as open-rs ran it"
        parts.append(f"pass@1 (%) of the same generations under each scorer (papers: {papers}; robust: "
                     "--scoring robust; qwen: the Qwen2.5-Math toolkit's math_equal)")
        parts.append(graded)
    return "\n\n".join(parts)


__all__ = ["LAYOUTS", "pass_at_1_table", "pass_at_k_table", "percent", "record_base_model", "record_label",
           "record_protocol", "record_scoring", "render_report", "report_layout", "scoring_table"]
