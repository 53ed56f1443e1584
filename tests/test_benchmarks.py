"""The benchmarks cannot rot: every --quick mode runs (through benchmarks/run.py, each benchmark in
its own subprocess) and writes JSON with the keys the README and the lead's scripts read, and a
PNG; plus the helpers with a claim of their own (the device helpers come from vars_deq.devices, the
layer benchmark's FLOP floor and its check against the reference of the original code)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
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

import vars_deq as vd  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

#: result file stem -> top-level JSON keys it must hold
EXPECTED_KEYS = {
    "solvers": {"benchmark", "quick", "environment", "problem", "solvers", "ratios", "log10_rel_energy_gap_trace"},
    "backward": {"benchmark", "quick", "environment", "setup", "time_comparison", "rows", "adjoint_study", "targets"},
    "models": {"benchmark", "quick", "config", "environment", "results", "ratios_vs_deit", "targets"},
    "flops": {"benchmark", "quick", "environment", "convention", "counted_ops", "registered_models", "models"},
    "layer": {"benchmark", "quick", "environment", "setup", "variants", "skipped", "ratios", "flop_floor"},
    "compare": {"device", "suites", "results", "targets"},
    "compile": {"benchmark", "quick", "config", "environment", "results"},
    "adjoint_cost": {"benchmark", "quick", "config", "environment", "results", "summary"},
    "step_map": {"benchmark", "quick", "config", "environment", "rows"},
    "train_step": {"benchmark", "quick", "config", "environment", "rows"},
}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--quick", "--jobs", "2", "--device", "cpu", "--threads", "1",
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
    assert set(adj["methods"]) == {"direct", "auto", "cg", "fixed_point"}
    cg = adj["methods"]["cg"]
    assert cg["method"] == "cg" and cg["converged"] and cg["steps_max"] >= 1
    # CG to adjoint_tol 1e-6 on a float64 equilibrium: the gradients match the closed form on the support
    assert cg["grad_q_rel_error"] < 1e-4 and cg["grad_v_rel_error"] < 1e-4
    direct, auto = adj["methods"]["direct"], adj["methods"]["auto"]
    assert direct["method"] == "direct" and direct["converged"] and auto["method"] in {"cg", "cg+direct", "direct"}
    for row in (direct, auto):  # exact to rounding on the support
        assert row["grad_q_rel_error"] < 1e-4 and row["grad_v_rel_error"] < 1e-4


def test_backward_interleaved_comparison_has_every_adjoint_and_both_targets(quick_results):
    data = load(quick_results[0], "backward")
    compare = data["time_comparison"]
    assert compare["solver"] == "fista" and compare["loss"] == "<w, z>"
    variants = {(r["variant"], r["steps"]) for r in compare["rows"]}
    names = {"unroll", "implicit_direct", "implicit_auto", "implicit_cg"}
    assert variants == {(n, k) for n in names for k in (2, 5)}  # --quick: K = 2 (backward), 5 (total)
    for r in compare["rows"]:
        assert r["total_s"] > 0 and (r["adjoint"] is None) == (r["variant"] == "unroll")
        if r["adjoint"] is not None and r["variant"] != "implicit_auto":
            assert r["adjoint"]["method"] == r["variant"].removeprefix("implicit_")
    timed = {(t["variant"], t["steps"]) for t in data["targets"] if "variant" in t}
    assert timed == {(n, k) for n in names - {"unroll"} for k in (2, 5)}


def test_compile_quick_checked_agreement_before_timing(quick_results):
    data = load(quick_results[0], "compile")
    if data["skipped"]:
        pytest.skip(data["skipped"])
    (row,) = data["results"].values()
    assert row["graph_breaks"] == 0
    assert row["max_rel_diff_float64"] <= data["config"]["exact_tol"]
    assert row["max_rel_error_compiled"] >= 0 and row["max_rel_error_eager"] >= 0
    assert row["eager_step_s"] > 0 and row["compiled_step_s"] > 0
    assert len(row["step_times_s"]["eager"]) == len(row["step_times_s"]["compiled"]) == data["config"]["steps"]


def test_adjoint_cost_quick_times_every_adjoint_and_fits_the_constants(quick_results):
    data = load(quick_results[0], "adjoint_cost")
    for row in data["results"].values():
        assert set(row["median_backward_s"]) == {"direct", "cg", "auto"}
        assert row["runs"]["direct"]["method"] == "direct" and row["runs"]["cg"]["method"] == "cg"
        assert row["runs"]["auto"]["method"] in {"cg", "cg+direct", "direct"}
        assert all(run["converged"] for run in row["runs"].values())
    for a, b in data["summary"]["fitted"].values():
        assert a >= 0 and b >= 0 and a + b > 0


def test_train_step_quick_times_every_backward_and_the_warm_start_saves_forward_steps(quick_results):
    rows = load(quick_results[0], "train_step")["rows"]
    assert set(rows) == {"unroll", "implicit", "implicit_direct", "implicit_cg", "implicit_warm"}
    assert rows["unroll"]["forward_steps_per_layer"] == [5.0] * 4 and rows["unroll"]["step_over_unroll"] == 1.0
    assert rows["implicit_direct"]["adjoint"] == ["direct"] and rows["implicit_cg"]["adjoint"] == ["cg"]
    cold, warm = rows["implicit"]["forward_steps_per_layer"], rows["implicit_warm"]["forward_steps_per_layer"]
    assert all(w <= 2 < c for w, c in zip(warm, cold))  # the same batch at the same weights: already converged
    for row in rows.values():
        assert row["step_ms"] > 0 and row["forward_ms"] > 0 and row["backward_ms"] > 0


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
    for pair in ("d", "sd"):  # checked before timing, recorded in the JSON
        assert data["ratios"][pair]["output_rel_diff"] < data["setup"]["agreement_tol"] == 1e-5
    for name in ("ours_d_deq", "ours_sd_deq"):
        assert data["variants"][name]["forward_stats"]["steps"] > 0
    for row in data["variants"].values():
        assert row["median_s"] > 0 and row["forward_backward_macs_counted"] > row["forward_macs_counted"] > 0


# -- device and threads: the library's one declaration ---------------------------------------------


def test_common_uses_the_library_device_helpers():
    """benchmarks/common.py declares no device or CPU logic of its own (the cgroup and affinity
    properties are tested on vars_deq.devices in tests/test_devices.py)."""
    from vars_deq import devices

    assert common.available_cpus is devices.available_cpus and common.device_label is devices.device_label
    assert not hasattr(common, "pick_device") and not hasattr(common, "cgroup_cpu_limit")


def test_available_cpus_is_within_the_affinity_mask():
    assert 1 <= common.available_cpus() <= len(os.sched_getaffinity(0))


def test_default_threads_are_the_available_cpus():
    import argparse

    ap = argparse.ArgumentParser()
    common.add_common_args(ap)
    assert ap.parse_args([]).threads == common.available_cpus()
    assert ap.parse_args(["--threads", "3"]).threads == 3


@pytest.mark.parametrize("argv, match", [(["--threads", "0"], "--threads must be"), (["--device", "tpu"], "--device must be")])
def test_setup_rejects_bad_threads_and_devices(tmp_path, argv, match):
    args = common.parser("doc").parse_args([*argv, "--out", str(tmp_path)])
    threads = torch.get_num_threads()
    try:
        with pytest.raises(ValueError, match=match):
            common.setup(args)
    finally:
        torch.set_num_threads(threads)


# -- the layer benchmark's reference and FLOP floor --------------------------------------------------------


def _faithful_layer(kind: str, dim: int, heads: int, num_tokens: int) -> vd.VARSAttention:
    extra = {"static_atoms": "free", "num_tokens": num_tokens} if kind == "sd" else {}
    return vd.VARSAttention(dim, heads, qkv_bias=True, dictionary=kind, **extra)


@given(B=st.integers(1, 3), heads=st.integers(1, 3), d=st.integers(1, 4), N=st.integers(2, 9), kind=st.sampled_from(["d", "sd"]))
def test_flop_floor_is_what_the_original_multiplies(B, heads, d, N, kind):
    """flop_floor's dense-Gram count is exactly the matrix-product work FlopCounterMode sees in the
    original's forward on the layer's weights (the update and the q, v, proj Linears), for any
    shape, plus the one product the reference spends beyond it: it forms the Gram D^T D a second
    time for its step bound L (gershgorin_lipschitz), B H N M^2 multiply-adds."""
    dim, m = heads * d, 2 * d
    torch.manual_seed(0)
    weights = bench_layer.reference_weights(_faithful_layer(kind, dim, heads, N))
    x = torch.randn(B, N, dim)
    with torch.no_grad():
        flops, _ = common.count_flops(lambda: bench_layer.reference_forward(weights, heads)(x))
    M = 2 * m if kind == "sd" else m
    floor = bench_layer.flop_floor(B, N, dim, heads, m, m if kind == "sd" else 0)
    assert flops == 2 * (floor["forward_macs_dense_gram"] + B * heads * N * M * M)
    assert floor["forward_macs_structured_gram"] <= floor["forward_macs_dense_gram"]


@pytest.mark.parametrize("kind", ["d", "sd"])
def test_agreement_check_stops_a_benchmark_of_different_layers(kind):
    """The pair agrees to float32 rounding on the mapped weights, and a perturbed original is refused."""
    torch.manual_seed(0)
    dim, heads, N = 12, 3, 9
    layer = _faithful_layer(kind, dim, heads, N)
    weights = bench_layer.reference_weights(layer)
    x, w = torch.randn(2, N, dim), torch.randn(2, N, dim)
    ours = bench_layer.Variant("ours", layer, list(layer.parameters()), x, w)
    original = bench_layer.Variant("original", bench_layer.reference_forward(weights, heads),
                                   [t for t in weights.values() if t.requires_grad], x, w)
    diffs = bench_layer.agreement(kind, layer, weights, ours, original)
    assert diffs["output_rel_diff"] < bench_layer.AGREEMENT_TOL and diffs["weight_grad_rel_diff"] < 1e-5
    with torch.no_grad():
        weights["b_proj"].add_(1e-2)
    with pytest.raises(RuntimeError, match="disagree"):
        bench_layer.agreement(kind, layer, weights, ours, original)


@pytest.mark.parametrize("resettable", [True, False])
def test_peak_rss_sees_a_short_lived_allocation_with_or_without_a_resettable_high_water_mark(monkeypatch, resettable):
    """CI's containers refuse /proc/self/clear_refs: the sampled fallback must still see the peak."""
    if common.rss_status() is None:
        pytest.skip("needs /proc/self/status (Linux)")
    if not resettable:
        monkeypatch.setattr(common, "reset_peak_rss", lambda: False)
    elif not common.reset_peak_rss():
        pytest.skip("this kernel does not let VmHWM be reset")
    size_mib = 256
    with common.PeakRSS() as rss:
        block = torch.ones(size_mib * 2**18)  # float32: 4 bytes each, every page touched
        time.sleep(0.02)
        del block
    assert ("sampled" in rss.source) != resettable
    assert size_mib * 0.9 <= rss.delta_mib < size_mib * 2, rss.delta_mib


def test_parallel_jobs_are_refused_for_timed_runs():
    proc = subprocess.run([sys.executable, str(BENCH / "run.py"), "--jobs", "2", "--only", "flops"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--jobs > 1 needs --quick" in proc.stderr, proc.stderr
