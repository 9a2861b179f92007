"""Markdown tables in the papers' format: our results beside the published rows for the same base model.

Pure Python: renders results records (the JSON ``evaluation/run.py`` / ``aapo-trl eval`` write) with
the numbers of ``evaluation/paper_tables.py``.

* the pass@1 table has AAPO Table 1's columns (AIME24, MATH-500, AMC23, Minerva, OlympiadBench, Avg.):
  the published pass@1 rows of AAPO Tables 1, 6, 8 and ZAPO Table 1 for the base model, then ours;
* when a record has pass@k for k >= 8, a pass@k table in AAPO Table 7's format follows.

Scores print as percentages with one decimal, "–" where there is none; "†" marks the rows the AAPO
authors re-evaluated themselves.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


def _sibling(name: str):
    module_name = f"aapo_eval_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, Path(__file__).resolve().with_name(f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


paper_tables = _sibling("paper_tables")
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


def _metric(record: Mapping[str, Any], key: str, metric: str) -> float | None:
    bench = record.get("benchmarks", {}).get(key)
    if not bench:
        return None
    return bench.get("metrics", {}).get(metric)


def _average(record: Mapping[str, Any], metric: str) -> float | None:
    values = [_metric(record, key, metric) for key in COLUMNS]
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
        if text not in protocols:
            protocols.append(text)
    return "; ".join(protocols)


def _size_line(records: Sequence[Mapping[str, Any]]) -> str | None:
    partial = []
    for record in records:
        for key in COLUMNS:
            bench = record.get("benchmarks", {}).get(key)
            if bench and bench.get("num_problems") is not None and bench.get("full_size"):
                if bench["num_problems"] < bench["full_size"]:
                    partial.append(record)
                    break
    if not partial:
        return None
    counts = []
    for key in COLUMNS:
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
    tables: Iterable[str] | None = ("AAPO Table 1", "AAPO Table 6", "AAPO Table 8", "ZAPO Table 1"),
) -> tuple[str, list[str]]:
    """The pass@1 table and its notes."""
    header = ["Model", *(TITLES[c] for c in COLUMNS), "Avg.", "Source"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(COLUMNS) + 1) + ["---"]) + "|"]
    notes: list[str] = []
    for row in paper_tables.rows_for(base_model, tables=tables, metric="pass@1"):
        cells = [percent(row.scores.get(c), 1.0) for c in COLUMNS] + [percent(row.average, 1.0)]
        source = row.source + (f" ({row.setting})" if row.table == "6" else "")
        lines.append("| " + " | ".join([_published_label(row), *cells, source]) + " |")
        if row.note:
            notes.append(f"{row.source}, {row.model}: {row.note}.")
    for record in records:
        cells = [percent(_metric(record, c, "pass@1")) for c in COLUMNS] + [percent(_average(record, "pass@1"))]
        lines.append("| " + " | ".join([f"**{record_label(record)}** (ours)", *cells, "this run"]) + " |")
    return "\n".join(lines), notes


def pass_at_k_table(records: Sequence[Mapping[str, Any]], base_model: str | None = None) -> str | None:
    """AAPO Table 7's format (Model, K, the five benchmarks), or ``None`` when no record has k >= 8."""
    ks = sorted({int(name.split("@")[1]) for r in records for b in r.get("benchmarks", {}).values()
                 for name in b.get("metrics", {}) if name.startswith("pass@") and not name.endswith("_stderr")
                 and int(name.split("@")[1]) > 1})
    if not ks:
        return None
    header = ["Model", "K", *(TITLES[c] for c in COLUMNS), "Source"]
    rule = "|" + "|".join(["---", "---:"] + ["---:"] * len(COLUMNS) + ["---"]) + "|"
    lines = ["| " + " | ".join(header) + " |", rule]
    for row in paper_tables.rows_for(base_model, tables=["AAPO Table 7"], metric=None):
        cells = [percent(row.scores.get(c), 1.0) for c in COLUMNS]
        lines.append("| " + " | ".join([row.model, str(row.k), *cells, row.source]) + " |")
    for record in records:
        for k in ks:
            cells = [percent(_metric(record, c, f"pass@{k}")) for c in COLUMNS]
            if all(cell == DASH for cell in cells):
                continue
            lines.append("| " + " | ".join([f"**{record_label(record)}** (ours)", str(k), *cells, "this run"]) + " |")
    return "\n".join(lines)


def scoring_table(records: Sequence[Mapping[str, Any]]) -> str | None:
    """pass@1 of the same generations under each scorer (``metrics_by_scoring``), or ``None`` when
    no record carries both gradings."""
    lines = []
    for record in records:
        for scoring in ("papers", "robust"):
            cells = []
            for key in COLUMNS:
                graded = (record.get("benchmarks", {}).get(key) or {}).get("metrics_by_scoring") or {}
                cells.append(percent((graded.get(scoring) or {}).get("pass@1")))
            if any(cell != DASH for cell in cells):
                lines.append("| " + " | ".join([f"**{record_label(record)}** (ours)", scoring, *cells]) + " |")
    if not lines:
        return None
    header = "| " + " | ".join(["Model", "Scorer", *(TITLES[c] for c in COLUMNS)]) + " |"
    rule = "|" + "|".join(["---", "---"] + ["---:"] * len(COLUMNS)) + "|"
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
        parts.append(f"{lead}. † = re-evaluated by the AAPO authors "
                     "(lighteval + vLLM, temperature 0.6, top_p 0.95); ZAPO Table 1 uses temperature 1.0, "
                     "4 repeats, verl, and 83 AMC problems.")
    size_line = _size_line(records)
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
        parts.append("pass@1 (%) of the same generations under each scorer (papers: lighteval's extractive match "
                     "as the papers ran it; robust: --scoring robust)")
        parts.append(graded)
    return "\n\n".join(parts)


__all__ = ["pass_at_1_table", "pass_at_k_table", "percent", "record_base_model", "record_label", "record_scoring",
           "render_report", "scoring_table"]
