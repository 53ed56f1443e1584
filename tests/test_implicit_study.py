"""examples/implicit_study.py in its quick mode: one record per method, a readable JSON, a PNG."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "implicit_study.py"


def _load():
    spec = importlib.util.spec_from_file_location("implicit_study", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_quick_study_writes_one_record_per_method(tmp_path, torch_single_thread, capsys):
    study = _load()
    out = tmp_path / "results" / "study.json"
    assert study.main(["--quick", "--runs", str(tmp_path / "runs"), "--out", str(out)]) == 0

    result = json.loads(out.read_text())
    records = result["records"]
    assert sorted(r["method"] for r in records) == sorted(study.METHODS)
    assert all(r["seed"] == 0 and r["layer_options"] == study.METHODS[r["method"]] for r in records)
    for r in records:
        assert r["epoch"] == [1]
        assert len(r["test_acc"]) == len(r["train_time_s"]) == len(r["solver_steps"]) == 1
        assert 0.0 <= r["final_acc"] <= r["best_acc"] <= 1.0
        assert r["train_time_s"][-1] > 0 and r["s_per_epoch"] > 0
        assert r["time_to_target_s"] is None or r["time_to_target_s"] > 0
        assert isinstance(r["peak_step_bytes"], int) and r["peak_step_bytes"] > 0
        assert r["solver_steps"][-1] >= 1 and 0.0 <= r["solver_converged"][-1] <= 1.0
    by_method = {r["method"]: r for r in records}
    # the unroll preset is the original's fixed 5 ISTA steps; the others run the converging FISTA forward
    assert by_method["unroll-5ista"]["solver_steps"] == [5.0]
    assert [row["method"] for row in result["table"]] == list(study.METHODS)
    assert all(math.isfinite(row["peak_step_mib"]["mean"]) and row["seeds"] == 1 for row in result["table"])

    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = capsys.readouterr().out
    assert all(f"| {m} |" in table for m in study.METHODS)


def test_bad_arguments_are_refused(tmp_path):
    study = _load()
    with pytest.raises(SystemExit, match="--seeds must be >= 1"):
        study.main(["--seeds", "0", "--runs", str(tmp_path)])
    with pytest.raises(SystemExit, match="--method-seeds"):
        study.main(["--method-seeds", "nope=2", "--runs", str(tmp_path)])
    assert not any(tmp_path.iterdir())
