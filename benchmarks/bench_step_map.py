"""The fused no-grad step of LassoBatch.T against the plain one S_t(z - eta (G z - b)).

Where autograd does not record and the atoms are explicit, T runs fused (vars_deq.problems.StepMap):
S_t(A z + c) with A = I - eta G where the operator keeps its Gram (M < 2N), else
S_t((z + c) + (-eta D^T)(D z)), c = eta b: the same products, two or three elementwise passes over
the codes fewer. Per problem shape (Performer atoms, with free static atoms beside them as in
VARS-SD, lam 0.3), this times, interleaved, with the fused step on and off (``problems.STEP_MAP``),

- one no-grad application of T (median of ``--repeats`` rounds of ``--calls`` calls), and
- a no-grad FISTA solve to a relative residual of 1e-3 at most 100 steps (``SOLVE``: the DEQ forward
  preset when this benchmark was written, kept so that its runs compare),

and records how far the two solves' outputs are apart (float32; a code entry within rounding of
its threshold can flip, so this is not bounded by rounding: tests/test_fast_paths.py checks the
forms in float64).

    python benchmarks/bench_step_map.py --device cpu --threads 1
    python benchmarks/bench_step_map.py --quick

Results: <out>/step_map.json and step_map.png (default out: benchmarks/results/<device>/).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import vars_deq as vd  # noqa: E402
from vars_deq import problems  # noqa: E402

LAM = 0.3
#: name -> (problems P, tokens N, Performer features M_d, free static atoms M_s, code columns C)
SHAPES = {
    "N=16, M=24 (Gram form)": (256, 16, 16, 8, 16),
    "digits VARS-D (N=16, M=32)": (256, 16, 32, 0, 16),
    "digits VARS-SD (N=16, M=64)": (256, 16, 32, 32, 16),
    "deit VARS-D (N=196, M=128)": (24, 196, 128, 0, 64),
    "deit VARS-SD (N=196, M=324)": (24, 196, 128, 196, 64),
}
QUICK_SHAPES = {"quick (N=8, M=16)": (4, 8, 8, 8, 4)}
SOLVE = {"solver": "fista", "max_steps": 100, "tol": 1e-3}


def make_problem(shape, device, seed=0) -> vd.SparseCoding:
    P, N, md, ms, C = shape
    gen = torch.Generator().manual_seed(seed)
    d = C
    q = torch.randn(P, 1, N, d, generator=gen).to(device)
    v = torch.randn(P, 1, N, C, generator=gen).to(device)
    performer = vd.PerformerDictionary(d, num_features=md, num_heads=1, seed=seed).to(device)
    if ms == 0:
        return vd.SparseCoding(performer(q), v, LAM)
    static = vd.DenseDictionary(torch.randn(1, N, ms, generator=gen).to(device))
    return vd.SparseCoding(vd.UnionDictionary(performer, static)(q), v, LAM)


class StepMap:
    """Turns the fused step on or off."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.saved = problems.STEP_MAP
        problems.STEP_MAP = self.on

    def __exit__(self, *exc):
        problems.STEP_MAP = self.saved


def fresh(shape, device) -> vd.SparseCoding:
    return make_problem(shape, device)


def one_step_seconds(shape, device, on: bool, calls: int) -> float:
    prob = fresh(shape, device)
    with torch.no_grad(), StepMap(on):
        flat = prob.flat()
        z = flat.b.clone()
        flat.T(z)  # builds the fused map once, outside the timing (a solve builds it once too)

        def run():
            for _ in range(calls):
                flat.T(z)
        _, s = common.timed(run, device)
    return s / calls


def solve_seconds(shape, device, on: bool):
    prob = fresh(shape, device)
    with torch.no_grad(), StepMap(on):
        with warnings.catch_warnings():  # the M=324 suite needs more than 100 steps: the budget is the preset's
            warnings.simplefilter("ignore", vd.ConvergenceWarning)
            sol, s = common.timed(lambda: vd.solve(prob, z0="thresholded_encode", **SOLVE), device)
    return s, sol


def main(argv=None) -> int:
    ap = common.parser(__doc__, default_threads=1)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=50, help="T applications per timed round")
    args = ap.parse_args(argv)
    device, out = common.setup(args)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    repeats, calls = (1, 2) if args.quick else (args.repeats, args.calls)
    rows = []
    for name, shape in shapes.items():
        P, N, md, ms, C = shape
        M = md + ms
        _, sol_on = solve_seconds(shape, device, True)
        _, sol_off = solve_seconds(shape, device, False)
        agree = (sol_on.z - sol_off.z).abs().max().item() / sol_off.z.abs().max().clamp_min(1e-30).item()
        t = {"step_on": [], "step_off": [], "solve_on": [], "solve_off": []}
        for _ in range(repeats):  # interleaved
            t["step_on"].append(one_step_seconds(shape, device, True, calls))
            t["step_off"].append(one_step_seconds(shape, device, False, calls))
            t["solve_on"].append(solve_seconds(shape, device, True)[0])
            t["solve_off"].append(solve_seconds(shape, device, False)[0])
        med = {k: common.median(v) for k, v in t.items()}
        with torch.no_grad():
            form = "gram" if fresh(shape, device).flat().step_map().atoms is None else "factored"
        row = {
            "shape": name, "P": P, "N": N, "M": M, "C": C, "form": form,
            "macs_per_column": M * M if form == "gram" else 2 * N * M,
            "step_ms_fused": 1e3 * med["step_on"], "step_ms_plain": 1e3 * med["step_off"],
            "step_ratio": med["step_on"] / med["step_off"],
            "solve_ms_fused": 1e3 * med["solve_on"], "solve_ms_plain": 1e3 * med["solve_off"],
            "solve_ratio": med["solve_on"] / med["solve_off"],
            "mean_steps_fused": sol_on.stats.steps.float().mean().item(),
            "mean_steps_plain": sol_off.stats.steps.float().mean().item(),
            "max_relative_difference_float32": agree,
        }
        rows.append(row)
        print(f"{name:30s} {form:8s} step {row['step_ms_fused']:7.3f} / {row['step_ms_plain']:7.3f} ms "
              f"({row['step_ratio']:.2f}x)  solve {row['solve_ms_fused']:8.1f} / {row['solve_ms_plain']:8.1f} ms "
              f"({row['solve_ratio']:.2f}x)  steps {row['mean_steps_fused']:.1f} / {row['mean_steps_plain']:.1f}  "
              f"diff {agree:.1e}")
    result = {
        "benchmark": "step_map", "quick": args.quick, "environment": common.environment(device),
        "config": {"lam": LAM, "solve": SOLVE, "repeats": repeats, "calls": calls, "z0": "thresholded_encode"},
        "rows": rows,
    }
    common.write_json(out / "step_map.json", result)
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["step_ratio"] for r in rows], 0.4, label="one T")
    ax.bar([i + 0.2 for i in x], [r["solve_ratio"] for r in rows], 0.4, label="FISTA to 1e-3")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(list(x), [f'{r["shape"]}\n{r["form"]}' for r in rows], rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("fused / plain time")
    ax.set_title(f"Fused no-grad step ({device.type}, {args.threads} thread(s))")
    ax.legend()
    common.save_figure(fig, out / "step_map.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
