"""``aapo-trl eval --rescore PATH``: re-grade saved generations under every scorer, no model loaded.

Users compare their numbers with papers graded differently, and with published generations. Three
formats are read (a folder is searched for them):

* **lighteval details** (``details_<task>|0_<time>.parquet``), this harness's own (``--save-details``,
  lighteval 0.13: ``doc`` with the ``query``, ``model_response`` with the ``text`` of each sample,
  ``metric``) and lighteval's older layout (``full_prompt`` / ``example``, ``predictions``, ``metrics``);
  the original grader's flags are this harness's per-sample ``doc.specific["scores"]``, or the
  metric value of a one-sample row;
* **the Qwen2.5-Math toolkit's output jsonl** (one object per problem: ``question``, ``code`` = the
  generations, ``gt``, ``score`` = its grader's flags per generation).

Each row is matched to its benchmark problem by the problem text: the prompt of either protocol
around a problem, or a problem text contained in the row's prompt / question (whitespace ignored).
A file's benchmark is the one whose problems match most of its rows (``--benchmarks`` restricts the
candidates; ``amc`` follows ``--protocol``). Unmatched rows are counted and reported, never graded.

The report gives per file and benchmark: problems and samples matched, pass@1 under each scorer
(``metrics_by_scoring`` of the same generations), and, where the file carries the original grader's
flags, each scorer's agreement with them (the fraction of samples graded alike).
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence


# Every module of evaluation/ is loaded by the runner's loader (evaluation/run.py, registered as aapo_eval_run; the
# `aapo-trl eval` CLI, the tests and run.py as a script all go through it): one loader, one module per file.
_sibling = sys.modules["aapo_eval_run"].load_sibling


benchmarks = _sibling("benchmarks")


@dataclass
class SavedSample:
    """One problem's saved generations: the text that identifies the problem, the completions and,
    when the file has them, the original grader's 0/1 flags (one per completion)."""

    prompt: str
    completions: list[str]
    flags: list[float] | None = None
    row_number: int = 0


@dataclass
class RescoredBenchmark:
    path: str
    format: str
    benchmark: str
    problems: int
    samples: int
    unmatched: int
    pass_at_1: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)


def _squash(text: str) -> str:
    return re.sub(r"\s+", "", str(text))


# ----------------------------------------------------------------------------------------------
# Reading the files
# ----------------------------------------------------------------------------------------------


def _as_list(value) -> list:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    if hasattr(value, "tolist"):
        return list(value.tolist())
    return [value]


def _flag(value) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if number in (0.0, 1.0) else None


def read_qwen_jsonl(path: Path) -> list[SavedSample]:
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        missing = [key for key in ("question", "code") if key not in row]
        if missing:
            raise ValueError(f"{path}:{number}: a Qwen2.5-Math toolkit row needs {', '.join(missing)}")
        completions = [str(c) for c in _as_list(row["code"])]
        flags = [(_flag(f) if _flag(f) is not None else float(bool(f))) for f in _as_list(row.get("score"))]
        samples.append(SavedSample(str(row["question"]), completions, flags or None, number))
    return samples


def read_lighteval_details(path: Path) -> list[SavedSample]:
    import pyarrow.parquet as pq

    samples = []
    for number, row in enumerate(pq.read_table(str(path)).to_pylist(), 1):
        doc = row.get("doc") or {}
        response = row.get("model_response") or {}
        if doc:  # lighteval >= 0.10: Doc / ModelResponse / metric
            prompt = doc.get("query") or ""
            completions = [str(t) for t in _as_list(response.get("text"))]
            scores = _as_list((doc.get("specific") or {}).get("scores"))
            metric = row.get("metric") or {}
        else:  # older lighteval: full_prompt / example, predictions, metrics
            prompt = row.get("full_prompt") or row.get("example") or ""
            completions = [str(t) for t in _as_list(row.get("predictions"))]
            scores = []
            metric = row.get("metrics") or {}
        if not completions:
            raise ValueError(f"{path}: row {number} has no generations (model_response.text / predictions)")
        flags = [_flag(s) for s in scores]
        if not flags and len(completions) == 1 and isinstance(metric, Mapping) and metric:
            flags = [_flag(next(iter(metric.values())))]
        samples.append(SavedSample(str(prompt), completions,
                                   flags if flags and all(f is not None for f in flags) else None, number))
    return samples


def saved_files(path: str | Path) -> list[tuple[Path, str]]:
    """``(file, format)`` for a file or every readable file under a folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--rescore: {path} does not exist")
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    found = [(p, "lighteval-details") if p.suffix == ".parquet" else (p, "qwen-jsonl") for p in files
             if p.suffix in (".parquet", ".jsonl")]
    if not found:
        raise ValueError(f"--rescore: no lighteval details (.parquet) or Qwen toolkit output (.jsonl) in {path}")
    return found


def read_saved(path: Path, kind: str) -> list[SavedSample]:
    return read_lighteval_details(path) if kind == "lighteval-details" else read_qwen_jsonl(path)


# ----------------------------------------------------------------------------------------------
# Matching rows to problems
# ----------------------------------------------------------------------------------------------


class ProblemIndex:
    """The problems of the candidate benchmarks, found by the exact prompt of either protocol or by
    the problem text within a prompt (whitespace ignored)."""

    def __init__(self, rows_by_benchmark: Mapping[str, Sequence[Mapping[str, Any]]]):
        self.rows_by_benchmark = {key: list(rows) for key, rows in rows_by_benchmark.items()}
        self.by_text: dict[str, dict[str, int]] = {}
        for key, rows in self.rows_by_benchmark.items():
            bench = benchmarks.BENCHMARKS[key]
            texts = {}
            for index, row in enumerate(rows):
                problem = row[bench.question_column]
                texts.setdefault(_squash(problem), index)
                for prompt in benchmarks.PROMPTS:
                    texts.setdefault(_squash(bench.query(row, prompt)), index)
            self.by_text[key] = texts

    def find(self, key: str, prompt: str) -> int | None:
        squashed = _squash(prompt)
        texts = self.by_text[key]
        if squashed in texts:
            return texts[squashed]
        bench = benchmarks.BENCHMARKS[key]
        contained = [(len(_squash(row[bench.question_column])), index)
                     for index, row in enumerate(self.rows_by_benchmark[key])
                     if _squash(row[bench.question_column]) and _squash(row[bench.question_column]) in squashed]
        return max(contained)[1] if contained else None


def match_benchmark(samples: Sequence[SavedSample], index: ProblemIndex) -> tuple[str, list[tuple[int, SavedSample]]]:
    """The benchmark matching most rows (ties: the first candidate, the protocol's order) and its
    ``(problem index, sample)`` pairs."""
    best_key, best = None, []
    for key in index.rows_by_benchmark:
        matched = [(found, sample) for sample in samples if (found := index.find(key, sample.prompt)) is not None]
        if len(matched) > len(best):
            best_key, best = key, matched
    if best_key is None:
        raise ValueError("none of the rows matches a problem of the benchmarks searched "
                         f"({', '.join(index.rows_by_benchmark)}); pass --data-dir with the sets the generations "
                         "were made on, or --benchmarks")
    return best_key, best


# ----------------------------------------------------------------------------------------------
# Grading
# ----------------------------------------------------------------------------------------------


def rescore_samples(key: str, rows: Sequence[Mapping[str, Any]], matched: Sequence[tuple[int, SavedSample]],
                    protocol: str = "aapo") -> tuple[dict[str, float], dict[str, float]]:
    """pass@1 under each scorer and, where every matched row has flags, agreement with them."""
    from lighteval.models.model_output import ModelResponse

    tasks = _sibling("tasks")
    bench = benchmarks.BENCHMARKS[key]
    prompt_function = tasks.make_prompt_function(bench, protocol)
    docs = [prompt_function(rows[index], bench.task_name) for index, _ in matched]
    with_flags = all(sample.flags is not None and len(sample.flags) == len(sample.completions)
                     for _, sample in matched)
    pass_at_1, agreement = {}, {}
    for scoring in tasks.SCORINGS:
        scorer = tasks.make_scorer(bench, scoring, protocol)
        per_problem, agree, total = [], 0, 0
        for doc, (_, sample) in zip(docs, matched):
            scores = [float(scorer.compute(doc, ModelResponse(text=[text]))) for text in sample.completions]
            per_problem.append(sum(scores) / len(scores))
            if with_flags:
                agree += sum(1 for s, f in zip(scores, sample.flags) if s == f)
                total += len(scores)
        pass_at_1[scoring] = sum(per_problem) / len(per_problem)
        if with_flags and total:
            agreement[scoring] = agree / total
    return pass_at_1, agreement


def rescore(paths: Iterable[str | Path], protocol: str = "aapo", benchmark_names=None, data_dir=None,
            datasets: Mapping[str, str] | None = None, environ=None) -> list[RescoredBenchmark]:
    """Re-grade every saved file under ``paths``; one :class:`RescoredBenchmark` per file."""
    benchmarks.check_protocol(protocol)
    if benchmark_names in (None, "all") or (isinstance(benchmark_names, str) and benchmark_names.lower() == "all"):
        candidates = [benchmarks.BENCHMARKS[k] for k in benchmarks.PROTOCOL_BENCHMARKS[protocol]]
        candidates += [b for b in benchmarks.BENCHMARKS.values() if b not in candidates]
    else:
        candidates = benchmarks.parse_benchmarks(benchmark_names, protocol)
    rows = {b.key: benchmarks.load_rows(b, data_dir=data_dir, datasets=datasets, environ=environ,
                                        protocol=protocol) for b in candidates}
    index = ProblemIndex(rows)
    results = []
    for path in paths:
        for file, kind in saved_files(path):
            samples = read_saved(file, kind)
            key, matched = match_benchmark(samples, index)
            pass_at_1, agreement = rescore_samples(key, rows[key], matched, protocol)
            results.append(RescoredBenchmark(str(file), kind, key, len({i for i, _ in matched}),
                                             sum(len(s.completions) for _, s in matched),
                                             len(samples) - len(matched), pass_at_1, agreement))
    return results


def render_rescored(results: Sequence[RescoredBenchmark], protocol: str = "aapo") -> str:
    tasks = _sibling("tasks")
    grader = "GRESO's grader" if benchmarks.PAPERS_GRADERS[protocol] == "greso" else "open-rs lighteval"
    header = ["File", "Format", "Benchmark", "Problems", "Samples", "Unmatched",
              *(f"pass@1 {s}" for s in tasks.SCORINGS), *(f"agree {s}" for s in tasks.SCORINGS)]
    lines = [f"Re-graded saved generations, protocol {protocol} (papers = {grader}); pass@1 (%) = mean over "
             "problems of the fraction of right samples; agree (%) = samples graded as the file's own grader "
             "did ('–': the file carries no flags)", "",
             "| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|"]
    for r in results:
        cells = [Path(r.path).name, r.format, benchmarks.BENCHMARKS[r.benchmark].title, str(r.problems),
                 str(r.samples), str(r.unmatched)]
        cells += [f"{100 * r.pass_at_1[s]:.1f}" for s in tasks.SCORINGS]
        cells += [f"{100 * r.agreement[s]:.1f}" if s in r.agreement else "–" for s in tasks.SCORINGS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


__all__ = ["ProblemIndex", "RescoredBenchmark", "SavedSample", "match_benchmark", "read_lighteval_details",
           "read_qwen_jsonl", "render_rescored", "rescore", "rescore_samples", "saved_files"]
