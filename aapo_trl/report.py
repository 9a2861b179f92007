"""``aapo-trl report RUN_DIR...``: plots and a paper-style Markdown table from the logged history of runs.

    aapo-trl report outputs/grpo-seed0 outputs/aapo-seed0 --output-dir report/
    aapo-trl report outputs/mini_repro          # a folder of run folders: every run in it

A *run* is a folder (or one of its JSON files) holding a Trainer log history. Every source below is read
and the one with the most logged training steps wins (ties: in this order), so a finished run, a run
still in progress (only checkpoints) and a GPU run trained elsewhere all work:

* ``results.json`` (``benchmarks/mini_repro.py``) and ``metrics.json`` (``aapo-trl train``): ``{"summary":
  {...}, "log_history": [...]}``, optionally with ``"heldout"`` (see below);
* ``trainer_state.json`` in the folder, else in its last ``checkpoint-N/`` (TRL's own file; GPU runs too).

What is drawn (matplotlib, Agg backend; one PNG each, runs overlaid, colour per algorithm):

* ``reward.png``: ``reward`` per step;
* ``zero_adv.png``: the share of zero-advantage groups before (``zero_adv/frac_groups``, i.e. GRPO's
  zero-variance groups; TRL's ``frac_reward_zero_std`` for runs without it) and after the algorithm's
  advantage (``zero_adv/frac_groups_final``);
* ``completion_length.png``: ``completions/mean_length``;
* ``zapo_entropy.png`` (runs that log them): ZAPO's ``zapo/se_mean`` and ``zapo/te_mean``;
* ``greso.png`` (runs that log them): GRESO's ``greso/p_easy`` and ``greso/p_hard``.

``report.md`` holds the table in the papers' format (one row per run) and, when several runs share an
algorithm (seeds), a second table with their mean +- std. Its columns: final reward (mean of the last
``--final-window`` logged steps), mean zero-advantage share before/after, all-zero batches (steps whose
whole batch had zero advantage), and, when the run recorded one, held-out accuracy before -> after:
``"heldout": {"before": {"greedy": a, "pass@1": b}, "after": {...}}`` in its results/metrics JSON.

The label of a run is its algorithm (``summary.algorithm`` of its JSON, else guessed from the folder
name) followed by the folder name when several runs share it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

SUMMARY_FILES = ("results.json", "metrics.json")
STATE_FILE = "trainer_state.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
ALGORITHM_NAMES = ("aapo", "zapo", "gpg", "grpo")

REWARD = ("reward",)
ZERO_BEFORE = ("zero_adv/frac_groups", "frac_reward_zero_std")
ZERO_AFTER = ("zero_adv/frac_groups_final",)
ALL_ZERO = ("zero_adv/all_zero_batch",)
LENGTH = ("completions/mean_length",)
SE = ("zapo/se_mean",)
TE = ("zapo/te_mean",)
P_EASY = ("greso/p_easy",)
P_HARD = ("greso/p_hard",)
HELDOUT_METRICS = ("greedy", "pass@1")

# Keys whose presence marks a log entry as a training step (TRL logs "loss" with every training step).
_STEP_KEYS = ("loss", "reward", *ZERO_BEFORE)


# --------------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One run: where it was read from and what it logged."""

    path: Path
    source: Path
    log_history: list[dict]
    summary: dict = field(default_factory=dict)
    heldout: dict | None = None
    algorithm: str | None = None
    label: str = ""

    @property
    def name(self) -> str:
        return self.path.name

    def train_steps(self) -> list[dict]:
        """The training-step entries of the history (evaluation and end-of-training entries left out)."""
        return train_entries(self.log_history)

    def series(self, keys: Sequence[str]) -> tuple[list[float], list[float]]:
        """``(steps, values)`` of the first key in ``keys`` this run logged (empty lists when none)."""
        for key in keys:
            points = [
                (entry["step"], float(entry[key]))
                for entry in self.train_steps()
                if entry.get(key) is not None and _finite(entry[key])
            ]
            if points:
                return [p[0] for p in points], [p[1] for p in points]
        return [], []

    def has(self, keys: Sequence[str]) -> bool:
        return bool(self.series(keys)[0])


def _finite(value: Any) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def train_entries(log_history: Iterable[dict]) -> list[dict]:
    """Log entries of training steps: a ``step`` and a training metric, no ``eval_*`` key, not the final
    ``train_runtime`` summary. One entry per step (the last one wins if a step was logged twice)."""
    by_step: dict[int, dict] = {}
    for entry in log_history:
        if "step" not in entry or "train_runtime" in entry:
            continue
        if any(str(key).startswith("eval_") for key in entry):
            continue
        if not any(key in entry for key in _STEP_KEYS):
            continue
        by_step[int(entry["step"])] = entry
    return [by_step[step] for step in sorted(by_step)]


def _read_json(path: Path) -> dict | None:
    try:
        with open(path) as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _last_checkpoint_state(folder: Path) -> Path | None:
    checkpoints = []
    for child in folder.iterdir() if folder.is_dir() else []:
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and (child / STATE_FILE).is_file():
            checkpoints.append((int(match.group(1)), child / STATE_FILE))
    return max(checkpoints)[1] if checkpoints else None


def _candidate_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = [path / name for name in (*SUMMARY_FILES, STATE_FILE) if (path / name).is_file()]
    checkpoint = _last_checkpoint_state(path)
    if checkpoint is not None:
        files.append(checkpoint)
    return files


def guess_algorithm(name: str) -> str | None:
    """The algorithm named in a folder name (``aapo-seed0`` -> ``aapo``), if exactly one is."""
    tokens = re.split(r"[^a-z0-9]+", name.lower())
    found = [algorithm for algorithm in ALGORITHM_NAMES if algorithm in tokens]
    return found[0] if len(found) == 1 else None


def load_run(path: str | Path) -> Run:
    """Read one run (a folder or one of its JSON files); raises ``FileNotFoundError`` when it logged nothing."""
    path = Path(path)
    best: tuple[int, int, Path, list[dict]] | None = None
    summary: dict = {}
    heldout = None
    algorithm = None
    for rank, candidate in enumerate(_candidate_files(path)):
        data = _read_json(candidate)
        if data is None or not isinstance(data.get("log_history"), list):
            continue
        history = data["log_history"]
        count = len(train_entries(history))
        if best is None or count > best[0]:
            best = (count, rank, candidate, history)
        if not summary and isinstance(data.get("summary"), dict):
            summary = data["summary"]
        if heldout is None and isinstance(data.get("heldout"), dict):
            heldout = data["heldout"]
        if algorithm is None and isinstance(data.get("algorithm"), str):
            algorithm = data["algorithm"]
    if best is None:
        raise FileNotFoundError(
            f"no logged history in {path}: expected results.json, metrics.json or trainer_state.json (in the folder "
            "or its last checkpoint-N/)"
        )
    folder = path if path.is_dir() else path.parent
    if CHECKPOINT_PATTERN.match(folder.name):  # a checkpoint given directly: name the run after its parent
        folder = folder.parent
    algorithm = summary.get("algorithm") or algorithm or guess_algorithm(folder.name)
    return Run(folder, best[2], best[3], summary, heldout, algorithm)


def expand_run_paths(paths: Sequence[str | Path]) -> list[Path]:
    """The given runs; a folder that logged nothing itself but whose sub-folders did stands for those."""
    expanded: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist")
        if path.is_dir() and not _candidate_files(path):
            children = [child for child in sorted(path.iterdir()) if child.is_dir() and _candidate_files(child)]
            if children:
                expanded.extend(children)
                continue
        expanded.append(path)
    return expanded


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    runs = [load_run(path) for path in expand_run_paths(paths)]
    assign_labels(runs)
    return runs


def assign_labels(runs: list[Run]) -> None:
    base = [run.algorithm or run.name for run in runs]
    for run, label in zip(runs, base):
        if base.count(label) == 1 or label == run.name:
            run.label = label
        elif label in run.name:  # e.g. aapo-seed0: the folder name says it all
            run.label = run.name
        else:
            run.label = f"{label} ({run.name})"


# --------------------------------------------------------------------------------------------------
# Numbers
# --------------------------------------------------------------------------------------------------


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def run_metrics(run: Run, final_window: int = 5) -> dict[str, Any]:
    """The numbers of one table row."""
    _, rewards = run.series(REWARD)
    before_steps, before = run.series(ZERO_BEFORE)
    _, after = run.series(ZERO_AFTER)
    all_zero_steps, all_zero = run.series(ALL_ZERO)
    steps = run.train_steps()
    window = rewards[-final_window:] if final_window > 0 else rewards
    # with logging_steps > 1 an entry averages several steps: weight it by the steps it covers
    all_zero_count = None
    if all_zero:
        previous, total = 0, 0.0
        for step, value in zip(all_zero_steps, all_zero):
            total += value * max(step - previous, 1)
            previous = step
        all_zero_count = int(round(total))
    row = {
        "label": run.label,
        "algorithm": run.algorithm,
        "run": run.name,
        "steps": int(steps[-1]["step"]) if steps else 0,
        "final_reward": _mean(window),
        "zero_adv_before": _mean(before),
        "zero_adv_after": _mean(after),
        "all_zero_batches": all_zero_count,
    }
    for when in ("before", "after"):
        for metric in HELDOUT_METRICS:
            value = ((run.heldout or {}).get(when) or {}).get(metric)
            row[f"heldout_{metric}_{when}"] = float(value) if _finite(value) else None
    return row


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _fmt_change(before: float | None, after: float | None) -> str:
    if before is None and after is None:
        return "-"
    return f"{_fmt(before)} -> {_fmt(after)}"


def markdown_table(rows: list[dict], final_window: int = 5) -> str:
    """One row per run, in the papers' layout (method rows, metric columns)."""
    with_heldout = any(row.get(f"heldout_{m}_{w}") is not None for row in rows for m in HELDOUT_METRICS
                       for w in ("before", "after"))
    header = [
        "run", "algorithm", "steps", f"final reward (last {final_window})", "zero-adv share before",
        "zero-adv share after", "all-zero batches",
    ]
    if with_heldout:
        header += ["held-out greedy (before -> after)", "held-out pass@1 (before -> after)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [
            row["label"], _fmt(row["algorithm"]), str(row["steps"]), _fmt(row["final_reward"]),
            _fmt(row["zero_adv_before"]), _fmt(row["zero_adv_after"]), _fmt(row["all_zero_batches"]),
        ]
        if with_heldout:
            cells += [
                _fmt_change(row["heldout_greedy_before"], row["heldout_greedy_after"]),
                _fmt_change(row["heldout_pass@1_before"], row["heldout_pass@1_after"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


AGGREGATED = (
    ("final_reward", "final reward"),
    ("zero_adv_before", "zero-adv share before"),
    ("zero_adv_after", "zero-adv share after"),
    ("all_zero_batches", "all-zero batches"),
    ("heldout_greedy_before", "held-out greedy before"),
    ("heldout_greedy_after", "held-out greedy after"),
    ("heldout_pass@1_before", "held-out pass@1 before"),
    ("heldout_pass@1_after", "held-out pass@1 after"),
)


def aggregate_rows(rows: list[dict]) -> list[dict]:
    """Mean and sample std over the runs of each algorithm (runs without one are left out)."""
    groups: dict[str, list[dict]] = {}
    for row in rows:
        if row["algorithm"]:
            groups.setdefault(row["algorithm"], []).append(row)
    result = []
    for algorithm, members in groups.items():
        entry = {"algorithm": algorithm, "runs": len(members)}
        for key, _ in AGGREGATED:
            values = [float(m[key]) for m in members if m.get(key) is not None]
            entry[key] = (
                None if not values else (_mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
            )
        result.append(entry)
    return result


def aggregate_table(aggregated: list[dict]) -> str:
    keys = [(key, title) for key, title in AGGREGATED if any(entry[key] is not None for entry in aggregated)]
    header = ["algorithm", "runs", *[title for _, title in keys]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in aggregated:
        cells = [entry["algorithm"], str(entry["runs"])]
        for key, _ in keys:
            value = entry[key]
            cells.append("-" if value is None else f"{value[0]:.3f} +- {value[1]:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "aapo-trl report draws with matplotlib, which is not installed: pip install matplotlib "
            "(or pip install -e '.[dev]')"
        ) from error
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _smooth(values: list[float], window: int) -> list[float]:
    if window <= 1:
        return values
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def _styles(runs: list[Run]) -> dict[int, dict]:
    """Colour per algorithm (or label), a different line style for each further run of the same one."""
    palette = ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink",
               "tab:gray", "tab:olive", "tab:cyan"]
    dashes = ["-", "--", ":", "-."]
    colours: dict[str, str] = {}
    seen: dict[str, int] = {}
    styles = {}
    for index, run in enumerate(runs):
        key = run.algorithm or run.label
        colours.setdefault(key, palette[len(colours) % len(palette)])
        count = seen.get(key, 0)
        seen[key] = count + 1
        styles[index] = {"color": colours[key], "linestyle": dashes[count % len(dashes)]}
    return styles


def _panel(ax, runs, styles, keys, title, ylabel, smooth, label_suffix="", linestyle=None):
    drawn = 0
    for index, run in enumerate(runs):
        steps, values = run.series(keys)
        if not steps:
            continue
        style = dict(styles[index])
        if linestyle is not None:
            style["linestyle"] = linestyle
        ax.plot(steps, _smooth(values, smooth), label=run.label + label_suffix, linewidth=1.5,
                marker="o" if len(steps) == 1 else None, **style)
        drawn += 1
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend(fontsize="small")
    return drawn


def write_plots(runs: list[Run], output_dir: Path, smooth: int = 1) -> list[Path]:
    """The PNGs described in the module doc; a plot of metrics no run logged is not written."""
    plt = _pyplot()
    styles = _styles(runs)
    written = []
    # titles break into lines: side-by-side panels are only 6.4 inches wide each
    note = f"\n(moving average over {smooth} steps)" if smooth > 1 else ""

    def save(fig, name):
        path = output_dir / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    figures = [
        ("reward.png", [(REWARD, "reward" + note, "mean reward")]),
        ("zero_adv.png", [
            (ZERO_BEFORE, "zero-advantage groups, before\n(GRPO's zero-variance)" + note, "share of groups"),
            (ZERO_AFTER, "zero-advantage groups, after\nthe algorithm's advantage" + note, "share of groups"),
        ]),
        ("completion_length.png", [(LENGTH, "response length" + note, "mean completion tokens")]),
        ("zapo_entropy.png", [
            (SE, "ZAPO semantic entropy SE" + note, "mean over zero-advantage groups"),
            (TE, "ZAPO token entropy TE" + note, "mean over zero-advantage rows"),
        ]),
    ]
    for name, panels in figures:
        if not any(run.has(keys) for keys, _, _ in panels for run in runs):
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), squeeze=False)
        for ax, (keys, title, ylabel) in zip(axes[0], panels):
            _panel(ax, runs, styles, keys, title, ylabel, smooth)
        if name == "zero_adv.png":
            top = max([ax.get_ylim()[1] for ax in axes[0]] + [1.05])
            for ax in axes[0]:
                ax.set_ylim(-0.05, top)
        save(fig, name)

    if any(run.has(P_EASY) or run.has(P_HARD) for run in runs):
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        greso_runs = [run for run in runs if run.has(P_EASY) or run.has(P_HARD)]
        greso_styles = {i: styles[runs.index(run)] for i, run in enumerate(greso_runs)}
        _panel(ax, greso_runs, greso_styles, P_EASY, "GRESO keep probabilities", "probability", 1, " p_easy", "-")
        _panel(ax, greso_runs, greso_styles, P_HARD, "GRESO keep probabilities\n(solid: p_easy, dashed: p_hard)",
               "probability", 1, " p_hard", "--")
        save(fig, "greso.png")
    return written


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def build_report(
    run_paths: Sequence[str | Path],
    output_dir: str | Path,
    smooth: int = 1,
    final_window: int = 5,
    title: str = "aapo-trl report",
) -> dict[str, Any]:
    """Read the runs, write the PNGs and ``report.md`` into ``output_dir``; return what was written."""
    runs = load_runs(run_paths)
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    plots = write_plots(runs, output, smooth=smooth)
    rows = [run_metrics(run, final_window) for run in runs]
    table = markdown_table(rows, final_window)
    aggregated = aggregate_rows(rows)
    lines = [f"# {title}", "", "Runs: " + ", ".join(f"`{run.path}` (read `{run.source.name}`)" for run in runs), "",
             table, ""]
    if any(entry["runs"] > 1 for entry in aggregated):
        lines += ["Per algorithm, mean +- sample std over its runs:", "", aggregate_table(aggregated), ""]
    lines += [
        "Zero-adv share before: share of groups whose rewards do not vary (GRPO's vanishing-gradient groups); "
        "after: share of groups whose final advantage is all zero. All-zero batches: steps whose whole batch "
        "had zero advantage.",
        "",
    ]
    lines += [f"![{plot.stem}]({plot.name})" for plot in plots]
    markdown = "\n".join(lines) + "\n"
    (output / "report.md").write_text(markdown)
    return {"runs": runs, "rows": rows, "aggregated": aggregated, "table": table, "plots": plots,
            "markdown": output / "report.md"}


def register_cli(subparsers) -> None:
    """``aapo-trl report RUN_DIR...``."""
    parser = subparsers.add_parser(
        "report",
        help="plots (reward, zero-advantage share, length, ZAPO entropies, GRESO) and a Markdown table of runs",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR",
                        help="run folders (or their metrics.json / trainer_state.json); a folder of runs stands for all")
    parser.add_argument("--output-dir", default="report", help="where the PNGs and report.md go (default: report/)")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window of the plotted curves (steps)")
    parser.add_argument("--final-window", type=int, default=5,
                        help="final reward = mean of the last this-many logged steps")
    parser.add_argument("--title", default="aapo-trl report")
    parser.set_defaults(handler=_report_command)


def _report_command(args: argparse.Namespace, rest: list[str]) -> int:
    if rest:
        raise SystemExit(f"aapo-trl report: unrecognised arguments: {' '.join(rest)}")
    try:
        result = build_report(args.runs, args.output_dir, smooth=args.smooth, final_window=args.final_window,
                              title=args.title)
    except FileNotFoundError as error:
        print(f"aapo-trl report: {error}", file=sys.stderr)
        return 2
    print(result["table"])
    print(f"\nwrote {result['markdown']} and {len(result['plots'])} plots: "
          + ", ".join(str(p) for p in result["plots"]))
    return 0


__all__ = [
    "Run",
    "aggregate_rows",
    "build_report",
    "load_run",
    "load_runs",
    "markdown_table",
    "register_cli",
    "run_metrics",
    "train_entries",
    "write_plots",
]
