"""The benchmarks cannot rot: every --quick mode runs (through benchmarks/run.py, each benchmark in
its own subprocess) and writes JSON with the keys the README and the lead's scripts read, and a
PNG; plus the helpers with a claim of their own (available_cpus, the layer benchmark's FLOP floor)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
import bench_layer  # noqa: E402
import common  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: result file stem -> top-level JSON keys it must hold
EXPECTED_KEYS = {
    "solvers": {"benchmark", "quick", "environment", "problem", "solvers", "ratios", "log10_rel_energy_gap_trace"},
    "backward": {"benchmark", "quick", "environment", "setup", "rows", "adjoint_study", "targets"},
    "models": {"benchmark", "quick", "config", "environment", "results", "ratios_vs_deit", "target"},
    "flops": {"benchmark", "quick", "environment", "convention", "counted_ops", "registered_models", "models"},
    "layer": {"benchmark", "quick", "environment", "setup", "variants", "skipped", "ratios", "flop_floor"},
    "compare": {"device", "suites", "results", "targets"},
}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--device", "cpu", "--threads", "1",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return out, proc


def load(out: Path, stem: str) -> dict:
    return json.loads((out / f"{stem}.json").read_text())


def test_run_quick_succeeds(quick_results):
    _, proc = quick_results
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


@pytest.mark.parametrize("stem", sorted(EXPECTED_KEYS))
def test_quick_mode_writes_json_and_png(quick_results, stem):
    out, proc = quick_results
    assert (out / f"{stem}.json").is_file(), proc.stderr[-4000:]
    data = load(out, stem)
    assert EXPECTED_KEYS[stem] <= set(data), sorted(EXPECTED_KEYS[stem] - set(data))
    if "quick" in EXPECTED_KEYS[stem]:
        assert data["quick"] is True
    assert (out / f"{stem}.png").read_bytes()[:8] == PNG_MAGIC


def test_backward_adjoint_study_ran_through_public_stats(quick_results):
    adj = load(quick_results[0], "backward")["adjoint_study"]
    assert set(adj["methods"]) == {"cg", "fixed_point"}
    cg = adj["methods"]["cg"]
    assert cg["method"] == "cg" and cg["converged"] and cg["steps_max"] >= 1
    # CG to adjoint_tol 1e-6 on a float64 equilibrium: the gradients match the closed form on the support
    assert cg["grad_q_rel_error"] < 1e-4 and cg["grad_v_rel_error"] < 1e-4


def test_flops_quick_counts_digits_and_one_tiny_model(quick_results):
    data = load(quick_results[0], "flops")
    digits = {n for n in data["registered_models"] if n.endswith("_digits")}
    assert digits and digits <= set(data["models"])
    assert set(data["models"]) - digits == {"vars_sd_deit_tiny_patch16_224"}
    for row in data["models"].values():
        assert row["gflops"] > 0 and math.isclose(row["gmacs"], row["gflops"] / 2)
    assert data["models"]["vars_sd_deit_tiny_patch16_224"]["paper_gflops_as_gmacs"] == 1.4


def test_layer_quick_pairs_ours_with_the_original(quick_results):
    data = load(quick_results[0], "layer")
    assert {"ours_d", "original_d", "ours_sd", "original_sd"} <= set(data["variants"])
    assert set(data["variants"]).isdisjoint(data["skipped"])
    assert "d" in data["ratios"] and data["ratios"]["d"]["ratio"] > 0
    for row in data["variants"].values():
        assert row["median_s"] > 0 and row["forward_backward_macs_counted"] > row["forward_macs_counted"] > 0


# -- available_cpus ----------------------------------------------------------------------------------


def test_available_cpus_is_within_the_affinity_mask():
    assert 1 <= common.available_cpus() <= len(os.sched_getaffinity(0))


@given(quota=st.integers(1, 64_000_000), period=st.integers(1_000, 1_000_000), v1=st.booleans())
def test_cgroup_quota_caps_the_cpu_count(tmp_path_factory, quota, period, v1):
    root = tmp_path_factory.mktemp("cgroup")
    if v1:
        (root / "cpu").mkdir()
        (root / "cpu" / "cpu.cfs_quota_us").write_text(f"{quota}\n")
        (root / "cpu" / "cpu.cfs_period_us").write_text(f"{period}\n")
    else:
        (root / "cpu.max").write_text(f"{quota} {period}\n")
    assert common.cgroup_cpu_limit(root) == quota / period
    assert common.available_cpus(root) == max(1, min(len(os.sched_getaffinity(0)), math.floor(quota / period)))


@pytest.mark.parametrize("layout", ["v2 max", "v1 -1", "none"])
def test_unlimited_cgroup_leaves_the_affinity_mask(tmp_path, layout):
    if layout == "v2 max":
        (tmp_path / "cpu.max").write_text("max 100000\n")
    elif layout == "v1 -1":
        (tmp_path / "cpu,cpuacct").mkdir()
        (tmp_path / "cpu,cpuacct" / "cpu.cfs_quota_us").write_text("-1\n")
        (tmp_path / "cpu,cpuacct" / "cpu.cfs_period_us").write_text("100000\n")
    assert common.cgroup_cpu_limit(tmp_path) is None
    assert common.available_cpus(tmp_path) == len(os.sched_getaffinity(0))


def test_default_threads_are_the_available_cpus():
    import argparse

    ap = argparse.ArgumentParser()
    common.add_common_args(ap)
    assert ap.parse_args([]).threads == common.available_cpus()
    assert ap.parse_args(["--threads", "3"]).threads == 3


# -- the layer benchmark's reference and FLOP floor --------------------------------------------------------


@given(B=st.integers(1, 3), heads=st.integers(1, 3), d=st.integers(1, 4), N=st.integers(2, 9), kind=st.sampled_from(["d", "sd"]))
def test_flop_floor_is_what_the_reference_forward_multiplies(B, heads, d, N, kind):
    """flop_floor's dense-Gram count is exactly the matrix-product work FlopCounterMode sees in
    reference_forward (the update and the q, v, proj Linears), for any shape."""
    dim, m = heads * d, 2 * d
    gen = torch.Generator().manual_seed(0)
    weights = {"q_weight": torch.randn(dim, dim, generator=gen), "q_bias": torch.randn(dim, generator=gen),
               "v_weight": torch.randn(dim, dim, generator=gen), "v_bias": torch.randn(dim, generator=gen),
               "proj_weight": torch.randn(dim, dim, generator=gen), "proj_bias": torch.randn(dim, generator=gen),
               "features": torch.randn(heads, d, m, generator=gen), "static": torch.randn(1, heads, N, m, generator=gen)}
    x = torch.randn(B, N, dim, generator=gen)
    with torch.no_grad():
        flops, _ = common.count_flops(lambda: bench_layer.reference_forward(kind, x, weights))
    floor = bench_layer.flop_floor(B, N, dim, heads, m, m if kind == "sd" else 0)
    assert flops == 2 * floor["forward_macs_dense_gram"]
    assert floor["forward_macs_structured_gram"] <= floor["forward_macs_dense_gram"]


def test_reference_rejects_an_unknown_kind():
    with pytest.raises(ValueError, match="kind must be one of"):
        bench_layer.reference_forward("s", torch.zeros(1, 4, 2), {})
