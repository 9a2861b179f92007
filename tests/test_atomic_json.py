"""The one atomic JSON writer (aapo_trl.checkpointing.atomic_write_json) and the writers that go through it."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from aapo_trl import ref_rollouts
from aapo_trl.checkpointing import atomic_write_json

REPO = Path(__file__).resolve().parents[1]


def _mini_repro():
    spec = importlib.util.spec_from_file_location("mini_repro", REPO / "benchmarks" / "mini_repro.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_formats_round_trip(tmp_path):
    path = tmp_path / "deep" / "state.json"
    atomic_write_json(path, {"b": 1, "a": [1.5, None]})
    assert path.read_text() == '{"b":1,"a":[1.5,null]}\n' and json.loads(path.read_text()) == {"b": 1, "a": [1.5, None]}
    atomic_write_json(path, {"b": Path("x"), "a": 1}, indent=2, sort_keys=True, default=str)
    assert path.read_text() == '{\n  "a": 1,\n  "b": "x"\n}\n'


def test_nan_is_refused_unless_allowed_and_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write_json(path, {"step": 1})
    with pytest.raises(ValueError):
        atomic_write_json(path, {"loss": math.nan})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"what": object()})
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temporary file left behind
    atomic_write_json(path, {"loss": math.nan}, allow_nan=True)
    assert math.isnan(json.loads(path.read_text())["loss"])


@pytest.mark.parametrize("writer", ["ref_rollouts", "mini_repro"])
def test_the_cache_and_benchmark_writers_are_atomic_too(tmp_path, writer):
    write = ref_rollouts._write_json_atomic if writer == "ref_rollouts" else _mini_repro()._write_json_atomic
    path = tmp_path / "metadata.json"
    write(path, {"settings": {"out": tmp_path}})
    assert json.loads(path.read_text()) == {"settings": {"out": str(tmp_path)}}
    with pytest.raises(TypeError):
        write(path, {(1, 2): "a tuple key"})  # not JSON, whatever ``default`` says
    assert json.loads(path.read_text()) == {"settings": {"out": str(tmp_path)}}
    assert [p.name for p in tmp_path.iterdir()] == ["metadata.json"]
