"""``aapo-trl eval --prepare-data DIR``: the five sets saved from the Hub (mocked here) in the layout
``--data-dir`` reads, with a progress bar; and the full public sets' sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aapo_trl.cli import main
from aapo_trl.evaluation import evaluation_module

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "eval"


def _fixture_rows(key: str) -> list[dict]:
    path = next((FIXTURES / key).glob("*.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_prepare_data_saves_every_set_where_data_dir_reads_it(tmp_path, monkeypatch, capsys):
    import datasets

    benchmarks = evaluation_module("benchmarks")
    by_hub_id = {b.hub_id: (b, _fixture_rows(b.key)) for b in benchmarks.BENCHMARKS.values()}
    calls = []

    def fake_load_dataset(path, split=None, **kwargs):  # the Hub call
        bench, rows = by_hub_id[path]
        calls.append((path, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    target = tmp_path / "offline"
    assert main(["eval", "--prepare-data", str(target)]) == 0
    assert sorted(calls) == sorted((b.hub_id, b.split) for b in benchmarks.BENCHMARKS.values())
    out = capsys.readouterr()
    assert "benchmarks" in out.err and "6/6" in out.err  # the progress bar: all six sets
    assert f"--data-dir {target}" in out.out
    monkeypatch.undo()  # reading back goes through the real datasets.load_dataset, offline
    for bench in benchmarks.BENCHMARKS.values():
        assert (target / bench.key / f"{bench.split}.jsonl").is_file()
        assert benchmarks.resolve_dataset(bench, data_dir=target, environ={}) == str(target / bench.key)
        rows = benchmarks.load_rows(bench, data_dir=target, environ={})
        assert rows == [{**row} for row in _fixture_rows(bench.key)]


def test_olympiadbench_has_675_problems():
    assert evaluation_module("benchmarks").BENCHMARKS["olympiadbench"].num_problems == 675


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"the full benchmark sets are not next to this checkout "
                                                     f"({SHARED_DATA})")
def test_full_public_sets_have_the_sizes_the_harness_expects():
    benchmarks = evaluation_module("benchmarks")
    for bench in benchmarks.BENCHMARKS.values():
        rows = benchmarks.load_rows(bench, data_dir=SHARED_DATA, environ={})
        assert len(rows) == bench.num_problems, bench.key
