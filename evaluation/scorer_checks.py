"""Oracle and control of every scorer on the full benchmark sets, under each protocol's prompt.

* **oracle**: each problem's own gold answer, boxed in a completion of the protocol's answer format,
  must score 1 (a scorer that misses it has false negatives; the papers' graders' own misses are named
  in :data:`KNOWN_ORACLE_MISSES`);
* **control**: another problem's gold answer must score 0, on a fixed seeded sample of 500 ordered
  pairs of problems whose answers differ as text (a scorer that accepts it has false positives).

``tests/test_eval_oracle_control.py`` runs both for the six sets x three scorers x two prompts;
``python evaluation/scorer_checks.py --data-dir DIR`` prints the table (what the closing note of
issue 28 reports). Each gold and each answer is extracted once per scorer; the pairs compare them.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import random
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path


if "aapo_eval_run" not in sys.modules:  # run as a script: load the runner first, whose loader loads every sibling
    _runner_spec = importlib.util.spec_from_file_location("aapo_eval_run", Path(__file__).resolve().with_name("run.py"))
    sys.modules["aapo_eval_run"] = importlib.util.module_from_spec(_runner_spec)
    _runner_spec.loader.exec_module(sys.modules["aapo_eval_run"])
# Every module of evaluation/ is loaded by the runner's loader (evaluation/run.py, registered as aapo_eval_run; the
# `aapo-trl eval` CLI, the tests and run.py as a script all go through it): one loader, one module per file.
_sibling = sys.modules["aapo_eval_run"].load_sibling


benchmarks = _sibling("benchmarks")

#: How a right completion ends under each prompt: open-rs asks for its sentence, GRESO for a box.
ANSWER_FORMATS = {
    "open-rs": "Step by step... Therefore, the final answer is: $\\boxed{ANSWER}$. I hope it is correct",
    "greso": "Let's solve this step by step. ... So the final answer is \\boxed{ANSWER}.",
}

CONTROL_PAIRS = 500

#: Golds a papers' grader misses its own right answer on, kept as they are (they are those papers'
#: graders, reproduced faithfully), named so that nothing else may fail the oracle: ``(grader, set,
#: gold as written) -> why``. ``robust`` has none.
KNOWN_ORACLE_MISSES = {
    ("open-rs", "olympiadbench", "$221,$8$"): "malformed in the source: lighteval reads it as '221,'",
    ("greso", "olympiadbench", "$(-\\infty, 0) \\cup\\{1\\}$."): "GRESO keeps the source's final period in the "
                                                                     "gold ('...\\{1\\}.'), which math-verify "
                                                                     "then does not match",
    ("qwen", "olympiadbench", "$f(x)=a x+b$, where $b$ is an arbitrary integer, and $a$ is an arbitrary positive "
                              "integer with $\\mho(a)=0$"): "the toolkit normalises the answer twice and the gold "
                                                            "once; the second pass drops more unit words",
    ("qwen", "minerva", "Using the doppler shift formula, $\\lambda^{\\prime}= \\boxed{\\lambda_{\\text {red}} / "
                        "\\sqrt{2}}$."): "the toolkit normalises the answer twice and Minerva's gold once; the "
                                          "second pass unwraps '\\text{red}' in the answer only",
}

#: Pairs of different problems' answers that the Qwen2.5-Math toolkit's ``math_equal`` accepts, faithfully
#: reproduced by ``--scoring qwen`` (it is another papers' grader, kept as it is): ``(set, gold answer,
#: other answer) -> why``. The control test requires exactly these, so a change in either direction shows.
QWEN_TOOLKIT_FALSE_MATCHES = {
    ("minerva", "1", "100"): "math_equal accepts the gold x 100 and / 100 (a percent read either way)",
    ("olympiadbench", "1", "100"): "math_equal accepts the gold x 100 and / 100 (a percent read either way)",
}


def completion(prompt: str, answer: str) -> str:
    return ANSWER_FORMATS[prompt].replace("ANSWER", answer)


@dataclass
class Extracted:
    rows: list
    answers: list[str]
    golds: list
    predictions: list
    scorer: object


def grader_name(protocol: str, scoring: str) -> str:
    """The grader behind ``scoring`` under ``protocol`` (``papers`` is the protocol's paper's)."""
    return benchmarks.PAPERS_GRADERS[protocol] if scoring == "papers" else scoring


@lru_cache(maxsize=None)
def _golds(key: str, grader: str, data_dir: str) -> list:
    """A set's golds as one grader reads them: the same under either prompt, so extracted once."""
    tasks = _sibling("tasks")
    bench = benchmarks.BENCHMARKS[key]
    rows = benchmarks.load_rows(bench, data_dir=data_dir, environ={})
    by_papers_grader = {name: protocol for protocol, name in benchmarks.PAPERS_GRADERS.items()}
    scoring, protocol = ("papers", by_papers_grader[grader]) if grader in by_papers_grader else (grader, "aapo")
    scorer = tasks.make_scorer(bench, scoring, protocol)
    prompt_function = tasks.make_prompt_function(bench, protocol)
    return [scorer.extract_golds(prompt_function(row, bench.task_name)) for row in rows]


@lru_cache(maxsize=None)
def extracted(key: str, protocol: str, scoring: str, data_dir: str) -> Extracted:
    """Every gold and every boxed gold answer of one full set, extracted once by one scorer."""
    tasks = _sibling("tasks")
    bench = benchmarks.BENCHMARKS[key]
    rows = benchmarks.load_rows(bench, data_dir=data_dir, environ={})
    scorer = tasks.make_scorer(bench, scoring, protocol)
    prompt_function = tasks.make_prompt_function(bench, protocol)
    docs = [prompt_function(row, bench.task_name) for row in rows]
    answers = [bench.final_answer(row) for row in rows]
    prompt = benchmarks.PROTOCOL_PROMPTS[protocol]
    golds = _golds(key, grader_name(protocol, scoring), data_dir)
    predictions = [scorer.extract_prediction(doc, completion(prompt, answer)) for doc, answer in zip(docs, answers)]
    return Extracted(rows, answers, golds, predictions, scorer)


def known_misses(key: str, protocol: str, scoring: str) -> set[str]:
    grader = grader_name(protocol, scoring)
    return {gold for (name, bench, gold) in KNOWN_ORACLE_MISSES if name == grader and bench == key}


def oracle_failures(key: str, protocol: str, scoring: str, data_dir: str) -> tuple[int, list[str]]:
    """(problems, golds whose own boxed answer did not score 1, the known misses included)."""
    found = extracted(key, protocol, scoring, str(data_dir))
    bench = benchmarks.BENCHMARKS[key]
    failed = [bench.gold(row) for row, gold, prediction in zip(found.rows, found.golds, found.predictions)
              if not found.scorer.matches(gold, prediction)]
    return len(found.rows), failed


def control_pairs(answers: list[str], size: int = CONTROL_PAIRS) -> list[tuple[int, int]]:
    """Ordered pairs of different problems whose answers differ as text (problems sharing an answer,
    e.g. two MATH-500 problems answered ``2``, are not a control), a fixed sample of them."""
    same = [answer.replace(" ", "") for answer in answers]
    n = len(answers)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j and same[i] != same[j]]
    return pairs if len(pairs) <= size else random.Random(0).sample(pairs, size)


def known_false_match(key: str, scoring: str, pair: tuple[str, str]) -> bool:
    return scoring == "qwen" and (key, *pair) in QWEN_TOOLKIT_FALSE_MATCHES


def control_false_matches(key: str, protocol: str, scoring: str, data_dir: str) -> tuple[int, list[tuple[str, str]]]:
    """(pairs, (gold answer, other problem's answer) pairs that scored 1, the toolkit's known ones included)."""
    found = extracted(key, protocol, scoring, str(data_dir))
    pairs = control_pairs(found.answers)
    false = [(found.answers[i], found.answers[j]) for i, j in pairs
             if found.scorer.matches(found.golds[i], found.predictions[j])]
    return len(pairs), false


def table(data_dir: str, keys=None, protocols=("aapo", "zapo"), scorings=None) -> str:
    """The oracle / control table as Markdown (rows: set x prompt; one oracle and one control cell per scorer)."""
    tasks = _sibling("tasks")
    scorings = scorings or tasks.SCORINGS
    keys = keys or list(benchmarks.BENCHMARKS)
    header = ["Set", "Prompt (protocol)"] + [f"{s}: oracle / control" for s in scorings]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(scorings)) + "|"]
    for key in keys:
        for protocol in protocols:
            cells = []
            for scoring in scorings:
                started = time.time()
                problems, failed = oracle_failures(key, protocol, scoring, data_dir)
                pairs, false = control_false_matches(key, protocol, scoring, data_dir)
                cells.append(f"{problems - len(failed)}/{problems} / {pairs - len(false)}/{pairs} "
                             f"({time.time() - started:.0f} s)")
                if failed or false:
                    known = len(set(failed) & known_misses(key, protocol, scoring)) + sum(
                        known_false_match(key, scoring, pair) for pair in false)
                    cells[-1] += f" [misses: {failed[:3]}; false: {false[:3]}; {known} of them named]"
            prompt = benchmarks.PROTOCOL_PROMPTS[protocol]
            lines.append("| " + " | ".join([key, f"{prompt} ({protocol})", *cells]) + " |")
            print(lines[-1], flush=True)
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True, help="the full sets, one folder per benchmark key")
    parser.add_argument("--benchmarks", default=None, help="comma-separated keys (default: all six)")
    parser.add_argument("--protocols", default="aapo,zapo")
    parser.add_argument("--scorings", default=None)
    args = parser.parse_args(argv)
    logging.getLogger("lighteval").setLevel(logging.ERROR)
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    keys = args.benchmarks.split(",") if args.benchmarks else None
    scorings = args.scorings.split(",") if args.scorings else None
    print(table(args.data_dir, keys, tuple(args.protocols.split(",")), scorings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
