"""The benchmarks of the AAPO and ZAPO tables: the five of AAPO's, as the AAPO repository's
``open-rs/evaluate.py`` (open-rs's and open-r1's ``src/open_r1/evaluate.py``) defines them (datasets,
columns, prompt, gold kind), and ZAPO's AMC, the 83 problems of ``AI-MO/aimo-validation-amc``; each
protocol's benchmarks and prompt (:data:`PROTOCOL_BENCHMARKS`, :data:`PROTOCOL_PROMPTS`); plus the
unbiased pass@k estimator.

Pure Python (no lighteval, no torch): ``evaluation/tasks.py`` builds the lighteval tasks from it,
``aapo_trl/eval_callback.py`` the in-training evaluation, ``aapo-trl eval`` its command line.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

#: The user message of the open-rs / open-r1 math tasks (adapted there from OpenAI simple-evals and
#: the Llama 3 evals). Protocol text: it must stay byte-identical for results to be comparable.
MATH_QUERY_TEMPLATE = (
    "Solve the following math problem efficiently and clearly.  The last line of your response should be "
    "of the following format: 'Therefore, the final answer is: $\\boxed{{ANSWER}}$. I hope it is correct' "
    "(without quotes) where ANSWER is just the final number or expression that solves the problem. "
    "Think step by step before answering.\n\n{Question}"
)

#: ZAPO's evaluation prompt (Sec. 4.1: "following the same settings as GRESO"): GRESO's, the
#: ``make_prefix`` of its test-set preprocessing scripts (``examples/data_preprocess/test_math500.py``,
#: ``test_amc.py``, ``test_aime2024.py``, ``test_minervamath.py``, ``test_olympiad.py``; the same text for
#: every benchmark, trailing space included), sent as the only user message of the chat template,
#: as verl's dataset does with a ``prompt`` of one ``{"role": "user"}`` message. GRESO's own copies of
#: those scripts are not in the reference index this was written from; the text is the one of the
#: GRESO-derived copies (``Urheen/SFPO``, ``Code/SFPO/examples/data_preprocess/test_*.py``, whose
#: ``train-scripts/generate_dataset.sh`` is GRESO's). Protocol text: keep it byte-identical.
GRESO_QUERY_TEMPLATE = (
    "Please solve the following math problem: {Question}. The assistant first thinks about the reasoning process "
    "step by step and then provides the user with the answer. Return the final answer in \\boxed{{}} tags, for "
    "example \\boxed{{1}}. Let's solve this step by step. "
)

#: Prompt name -> template (``{Question}`` is the problem).
PROMPTS = {"open-rs": MATH_QUERY_TEMPLATE, "greso": GRESO_QUERY_TEMPLATE}

#: open-rs evaluates with ``max_new_tokens=32768`` and this task ``generation_size``.
DEFAULT_GENERATION_SIZE = 32768

#: The k of AAPO Table 7 (pass@k from 64 samples per problem). pass@1 is always reported.
PASS_AT_K = (8, 16, 32, 64)

#: ``--scoring``: ``papers`` is the grader of the protocol's paper (AAPO: lighteval's extractive match
#: as open-rs configures it; ZAPO: GRESO's, the last ``\\boxed{}`` verified with math-verify);
#: ``robust`` also accepts what a careful grader accepts and ``papers`` marks wrong, never a wrong
#: answer; ``qwen`` is the Qwen2.5-Math evaluation toolkit's ``math_equal`` (``evaluation/tasks.py``).
SCORINGS = ("papers", "robust", "qwen")
DEFAULT_SCORING = "papers"

#: The grader ``--scoring papers`` means under each protocol.
PAPERS_GRADERS = {"aapo": "open-rs", "aapo-passk": "open-rs", "zapo": "greso"}

#: Each protocol's benchmarks, in the column order of its paper's table (AAPO Table 1; ZAPO Table 1
#: prints AMC, MATH500, Minerva, Olympiad, AIME24), and its prompt.
PROTOCOL_BENCHMARKS = {
    "aapo": ("aime24", "math_500", "amc23", "minerva", "olympiadbench"),
    "aapo-passk": ("aime24", "math_500", "amc23", "minerva", "olympiadbench"),
    "zapo": ("amc_aimo", "math_500", "minerva", "olympiadbench", "aime24"),
}
PROTOCOL_PROMPTS = {"aapo": "open-rs", "aapo-passk": "open-rs", "zapo": "greso"}
DEFAULT_PROTOCOL = "aapo"


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOL_BENCHMARKS:
        raise ValueError(f"unknown protocol {protocol!r}; choose from {', '.join(PROTOCOL_BENCHMARKS)}")
    return protocol

#: Prefix of every lighteval task name: lighteval's built-ins include ``aime24`` and ``math_500``.
TASK_PREFIX = "aapo_"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of the papers' tables.

    Attributes:
        key: Short name used everywhere in aapo-trl (results JSON, data folders, CLI).
        title: Column title in the papers' tables.
        hub_id: The dataset the AAPO / open-rs evaluation loads.
        split: The split it evaluates.
        question_column: Column holding the problem statement.
        gold_column: Column holding the gold (a bare answer, or a solution ending in ``\\boxed{}``).
        gold_kind: ``"expr"`` (gold read as a plain expression) or ``"latex"`` (gold read as LaTeX).
        num_problems: Size of the full public set (AAPO's text counts OlympiadBench as 674; its Hub
            set, ``knoveleng/OlympiadBench``, and that dataset's card have 675).
    """

    key: str
    title: str
    hub_id: str
    split: str
    question_column: str
    gold_column: str
    gold_kind: str
    num_problems: int

    @property
    def task_name(self) -> str:
        return TASK_PREFIX + self.key

    def query(self, row: Mapping[str, Any], prompt: str = "open-rs") -> str:
        """The user message for one dataset row, with the ``prompt`` of :data:`PROMPTS`."""
        if prompt not in PROMPTS:
            raise ValueError(f"unknown prompt {prompt!r}; choose from {', '.join(PROMPTS)}")
        return PROMPTS[prompt].format(Question=row[self.question_column])

    def gold(self, row: Mapping[str, Any]) -> str:
        """The gold text for one dataset row (parsed later according to :attr:`gold_kind`)."""
        return gold_text(row[self.gold_column])


    def final_answer(self, row: Mapping[str, Any]) -> str:
        """The gold *answer* as a solver would box it: the last ``\\boxed{}`` of a gold solution
        (MATH-500, Minerva), else the gold without its math ``$`` and final period (OlympiadBench's
        ``$\\frac{2}{3}$`` -> ``\\frac{2}{3}``, its malformed ``$221,$8$`` -> ``221,8``, AIME's ``204``).
        The oracle checks box it."""
        gold = self.gold(row)
        boxed = last_boxed(gold)
        if boxed is not None:
            return boxed
        text = gold.strip().rstrip(".").strip()
        return re.sub(r"(?<!\\)\$", "", text).strip()


def answer_of_gold(gold: str) -> str:
    """The final answer in a gold text as verl-style graders take it: the last ``\\boxed{}`` of a
    solution, else the gold with every ``$`` removed (GRESO's ``test_olympiad.py`` reads
    ``final_answer[0].replace('$', '')``; AIME / AMC answers are bare numbers)."""
    boxed = last_boxed(gold)
    return boxed.strip() if boxed is not None else gold.replace("$", "").strip()


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (braces balanced), else ``None``."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    opening = text.find("{", start)
    if opening < 0:
        return None
    depth = 0
    for index in range(opening, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[opening + 1 : index]
    return None


#: AAPO Table 1's five in its column order, then ZAPO's AMC (``amc_aimo``: AMC 12A/B 2022 + 2023, the
#: 83 problems of ZAPO App. B; ``id`` restarts per year there, ``url`` is the unique key).
BENCHMARKS: dict[str, Benchmark] = {
    b.key: b
    for b in (
        Benchmark("aime24", "AIME24", "HuggingFaceH4/aime_2024", "train", "problem", "answer", "expr", 30),
        Benchmark("math_500", "MATH-500", "HuggingFaceH4/MATH-500", "test", "problem", "solution", "latex", 500),
        Benchmark("amc23", "AMC23", "knoveleng/AMC-23", "train", "problem", "answer", "expr", 40),
        Benchmark("minerva", "Minerva", "knoveleng/Minerva-Math", "train", "problem", "solution", "latex", 272),
        Benchmark(
            "olympiadbench", "OlympiadBench", "knoveleng/OlympiadBench", "train", "question", "answer", "latex", 675
        ),
        Benchmark("amc_aimo", "AMC (83)", "AI-MO/aimo-validation-amc", "train", "problem", "answer", "expr", 83),
    )
}
BENCHMARK_KEYS = tuple(BENCHMARKS)

_ALIASES = {
    "aime": "aime24",
    "aime_24": "aime24",
    "aime2024": "aime24",
    "math500": "math_500",
    "math": "math_500",
    "amc": "amc23",
    "amc_23": "amc23",
    "minerva_math": "minerva",
    "olympiad": "olympiadbench",
    "olympiad_bench": "olympiadbench",
    "aimo_amc": "amc_aimo",
    "amc83": "amc_aimo",
    "aimo_validation_amc": "amc_aimo",
    "ai_mo/aimo_validation_amc": "amc_aimo",
}

#: Under ZAPO's protocol ``amc`` is its AMC (83 problems), not AMC23.
_PROTOCOL_ALIASES = {"zapo": {"amc": "amc_aimo"}}


def benchmark(name: str | Benchmark, protocol: str = DEFAULT_PROTOCOL) -> Benchmark:
    """The benchmark for a key, an alias (``math500``; ``amc`` is AMC23 under AAPO's protocol and the
    83-problem AMC under ZAPO's), a task name (``aapo_aime24|0``) or a title."""
    if isinstance(name, Benchmark):
        return name
    key = str(name).strip().split("|")[0].split(":")[0]
    if key.startswith(TASK_PREFIX):
        key = key[len(TASK_PREFIX) :]
    lowered = key.lower().replace("-", "_")
    if lowered in _PROTOCOL_ALIASES.get(protocol, {}):
        return BENCHMARKS[_PROTOCOL_ALIASES[protocol][lowered]]
    for candidate in BENCHMARKS.values():
        if lowered in (candidate.key, candidate.title.lower().replace("-", "_")):
            return candidate
    if lowered in _ALIASES:
        return BENCHMARKS[_ALIASES[lowered]]
    raise KeyError(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARK_KEYS)}")


def parse_benchmarks(names: str | Sequence[str] | None, protocol: str = DEFAULT_PROTOCOL) -> list[Benchmark]:
    """``None``/``"all"`` -> the protocol's five, else the named ones (comma-separated or a list), in
    the protocol's table order (a benchmark outside it after them)."""
    order = list(PROTOCOL_BENCHMARKS[check_protocol(protocol)])
    order += [key for key in BENCHMARKS if key not in order]
    if names is None:
        return [BENCHMARKS[key] for key in PROTOCOL_BENCHMARKS[protocol]]
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    if not names or any(str(n).strip().lower() == "all" for n in names):
        return [BENCHMARKS[key] for key in PROTOCOL_BENCHMARKS[protocol]]
    wanted = {benchmark(n, protocol).key for n in names}
    return [BENCHMARKS[key] for key in order if key in wanted]


def gold_text(value: Any) -> str:
    """A gold answer as the string lighteval's extraction needs. Numbers become text (``27.0`` ->
    ``"27"``): the regex extraction fails on anything but ``str``. A list (OlympiadBench's
    ``final_answer``) gives its first item."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else ""
    if value is None:
        return ""
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return str(int(value))
    return str(value)


# --------------------------------------------------------------------------------------------------
# pass@k
# --------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021, "Evaluating Large Language Models Trained on Code"):
    ``1 - C(n - c, k) / C(n, k)`` for ``c`` correct among ``n`` samples, as a stable product."""
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def reported_ks(num_samples: int) -> list[int]:
    """pass@1 always; pass@k for the k of AAPO Table 7 that ``num_samples`` allows."""
    return [1] + [k for k in PASS_AT_K if k <= num_samples]


def metric_names(num_samples: int) -> list[str]:
    return [f"pass@{k}" for k in reported_ks(num_samples)]


def pass_at_ks(scores: Sequence[float], num_samples: int | None = None) -> dict[str, float]:
    """``{"pass@1": c / n, "pass@8": ...}`` for one problem's per-sample scores (1 = correct)."""
    n = len(scores)
    if n == 0:
        raise ValueError("no samples")
    c = sum(1 for s in scores if s >= 1.0)
    return {f"pass@{k}": (c / n if k == 1 else pass_at_k(n, c, k)) for k in reported_ks(num_samples or n) if k <= n}


# --------------------------------------------------------------------------------------------------
# Where the rows come from
# --------------------------------------------------------------------------------------------------


def resolve_dataset(
    bench: Benchmark | str,
    datasets: Mapping[str, str] | None = None,
    data_dir: str | os.PathLike | None = None,
    environ: Mapping[str, str] | None = None,
    protocol: str = DEFAULT_PROTOCOL,
) -> str:
    """Where a benchmark's rows come from; the first that applies wins:

    1. ``datasets[key]`` (a local folder or a Hub id; keys may be aliases, read under ``protocol``);
    2. ``data_dir/<key>`` when that folder exists;
    3. ``$AAPO_EVAL_DATASET_<KEY>`` (``AAPO_EVAL_DATASET_MATH_500``);
    4. ``$AAPO_EVAL_DATA_DIR/<key>`` when that folder exists;
    5. the Hub id of the papers' evaluation.

    A local folder holds the split as a file named after it (``train.jsonl``, ``test.parquet`` ...)
    with the Hub dataset's columns.
    """
    bench = benchmark(bench)
    environ = os.environ if environ is None else environ
    overrides = {benchmark(k, protocol).key: v for k, v in (datasets or {}).items()}
    if overrides.get(bench.key):
        return str(overrides[bench.key])
    if data_dir is not None and (Path(data_dir) / bench.key).is_dir():
        return str(Path(data_dir) / bench.key)
    if environ.get(f"AAPO_EVAL_DATASET_{bench.key.upper()}"):
        return environ[f"AAPO_EVAL_DATASET_{bench.key.upper()}"]
    env_dir = environ.get("AAPO_EVAL_DATA_DIR")
    if env_dir and (Path(env_dir) / bench.key).is_dir():
        return str(Path(env_dir) / bench.key)
    return bench.hub_id


def load_rows(bench: Benchmark | str, source: str | None = None, **resolve_kwargs) -> list[dict[str, Any]]:
    """The benchmark's evaluation split as a list of row dicts (``datasets`` is imported here)."""
    from datasets import load_dataset

    bench = benchmark(bench)
    source = source or resolve_dataset(bench, **resolve_kwargs)
    return [dict(row) for row in load_dataset(source, split=bench.split)]


def prepare_data(
    directory: str | os.PathLike,
    benchmark_names: str | Sequence[str] | None = None,
    progress: bool = True,
) -> dict[str, Path]:
    """Save the benchmarks' evaluation splits (default: all six) from the Hub into ``directory`` in the layout
    ``--data-dir`` reads (``<key>/<split>.jsonl``, the Hub columns), for a machine without network
    access. Returns the written file of each benchmark. A set whose size is not the benchmark's
    full size is saved, with a warning: the results will flag it as a subset."""
    import logging

    from datasets import load_dataset
    from tqdm.auto import tqdm

    root = Path(directory)
    written: dict[str, Path] = {}
    every = benchmark_names is None or (isinstance(benchmark_names, str) and benchmark_names.strip().lower() == "all")
    chosen = list(BENCHMARKS.values()) if every else parse_benchmarks(benchmark_names)
    bar = tqdm(chosen, desc="benchmarks", unit="set", disable=not progress)
    for bench in bar:
        bar.set_postfix_str(f"{bench.key} <- {bench.hub_id}")
        rows = load_dataset(bench.hub_id, split=bench.split)
        target = root / bench.key / f"{bench.split}.jsonl"
        target.parent.mkdir(parents=True, exist_ok=True)
        rows.to_json(str(target), lines=True, force_ascii=False)
        if len(rows) != bench.num_problems:
            logging.getLogger(__name__).warning("%s: %d rows saved from %s, the full set has %d",
                                                bench.key, len(rows), bench.hub_id, bench.num_problems)
        written[bench.key] = target
    return written


__all__ = [
    "BENCHMARKS",
    "BENCHMARK_KEYS",
    "Benchmark",
    "DEFAULT_GENERATION_SIZE",
    "MATH_QUERY_TEMPLATE",
    "PASS_AT_K",
    "SCORINGS",
    "DEFAULT_SCORING",
    "DEFAULT_PROTOCOL",
    "GRESO_QUERY_TEMPLATE",
    "PAPERS_GRADERS",
    "PROMPTS",
    "PROTOCOL_BENCHMARKS",
    "PROTOCOL_PROMPTS",
    "answer_of_gold",
    "check_protocol",
    "TASK_PREFIX",
    "benchmark",
    "gold_text",
    "last_boxed",
    "load_rows",
    "metric_names",
    "parse_benchmarks",
    "pass_at_k",
    "pass_at_ks",
    "prepare_data",
    "reported_ks",
    "resolve_dataset",
]
