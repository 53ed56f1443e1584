"""What a flop costs in each implicit adjoint: the calibration of ``adjoint="auto"``.

The direct adjoint (batched Cholesky of each code column's support Gram) and conjugate gradient
run at very different speeds per counted flop: small batched factorizations run far below
matrix-product throughput, CG is matrix products. Per problem shape (Performer atoms, lam 0.3,
FISTA to a relative residual of 1e-4, loss <w, z>), this measures the backward of each
adjoint (median of ``--repeats`` interleaved rounds), the CG iterations it took, and the time per
counted flop of each (``direct_flops`` and ``cg_flops`` at the iterations taken, from
vars_deq.direct_adjoint). A least-squares fit over the shapes of

    t_direct = a_d groups + b_d direct_flops,    t_cg / iterations = a_cg + b_cg cg_flops(1 iteration)

(groups: the batched factorizations of the system-size groups, ``support_groups``, dense columns at
their co-support size where N >= M)

(non-negative) gives ``DIRECT_COST`` = (a_d, b_d) and ``CG_ITERATION_COST`` = (a_cg, b_cg) in
vars_deq/direct_adjoint.py, from which "auto" gives CG as many iterations as the direct solve
would take (``cg_budget``) before it solves what CG left directly, where that budget covers the
iterations CG can be expected to need (``cg_worth_trying``: twice the largest support). The JSON
records the fit, the library's constants, each shape's budget, largest support and CG iterations,
what "auto" ran and its time against the faster of the two.

    python benchmarks/bench_adjoint_cost.py --device cpu --threads 1
    python benchmarks/bench_adjoint_cost.py --quick

Results: <out>/adjoint_cost.json and adjoint_cost.png (default out: benchmarks/results/<device>/).
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import vars_deq as vd  # noqa: E402
from vars_deq.direct_adjoint import (  # noqa: E402
    CG_ITERATION_COST, DIRECT_COST, cg_budget, cg_flops, cg_worth_trying, direct_flops, support_groups)

LAM = 0.3
#: name -> (problems P, tokens N, atoms M, code columns C, query dim d)
SHAPES = {
    "digits-like (N=17, M=48)": (192, 17, 48, 16, 16),
    "digits VARS-SD layer at batch 32 (N=16, M=64)": (128, 16, 64, 16, 16),
    "N=64, M=64": (96, 64, 64, 16, 16),
    "deit VARS-D (N=196, M=128)": (24, 196, 128, 64, 64),
    "deit VARS-SD-size (N=196, M=324)": (24, 196, 324, 64, 64),
}
QUICK_SHAPES = {"quick (N=16, M=16)": (4, 16, 16, 8, 8)}
ADJOINTS = ("direct", "cg", "auto")


def problem(shape, device, seed=0):
    P, N, M, C, d = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(P, 1, N, d, generator=gen).to(device)
    v = torch.randn(P, 1, N, C, generator=gen).to(device).requires_grad_()
    w = torch.randn(P, 1, M, C, generator=gen).to(device)
    with torch.no_grad():  # the atoms are data here: the gradient flows to the signal v
        atoms = vd.PerformerDictionary(d, num_features=M, num_heads=1).to(device)(q)
    return atoms, v, w


def backward_once(atoms, v, w, adjoint: str, device) -> tuple[float, Any, dict[int, int], int]:
    z, sol = vd.sparse_code(vd.SparseCoding(atoms, v, LAM), solver="fista", max_steps=2000, tol=1e-4,
                            backward=vd.Implicit(adjoint=adjoint, max_steps=2000), return_solution=True)
    # the systems the direct solve factorizes: dense columns on their co-support where N >= M
    mask = z.detach().flatten(0, 1) != 0
    support = support_groups(mask, complement=v.shape[-2] >= z.shape[-2])
    loss = (z * w).sum()
    v.grad = None
    _, t = common.timed(lambda: loss.backward(), device)
    return t, sol.stats.adjoint, support, int(mask.sum(-2).max())


def measure(name: str, shape, args, device) -> dict[str, Any]:
    P, N, M, C, _ = shape
    atoms, v, w = problem(shape, device)
    times = {a: [] for a in ADJOINTS}
    info = {}
    for r in range(args.repeats + 1):
        for adjoint in ADJOINTS:  # interleaved
            t, stats, support, largest = backward_once(atoms, v, w, adjoint, device)
            if r:  # the first round warms up
                times[adjoint].append(t)
            info[adjoint] = {"method": stats.method, "steps_max": int(stats.steps.max()),
                             "converged": bool(stats.converged.all())}
    med = {a: common.median(ts) for a, ts in times.items()}
    iterations = info["cg"]["steps_max"]
    budget = cg_budget(P, C, M, support)
    return {"shape": {"P": P, "N": N, "M": M, "C": C}, "s_max": max(support, default=0), "largest_support": largest,
            "support_groups": {str(s): n for s, n in support.items()}, "median_backward_s": med, "runs": info,
            "direct_flops": direct_flops(M, support), "direct_calls": max(1, len(support)),
            "cg_flops_per_iteration": cg_flops(P, C, M, 1),
            "cg_s_per_iteration": med["cg"] / iterations,
            "break_even_cg_iterations": med["direct"] / (med["cg"] / iterations),
            "library_cg_budget": budget, "cg_tried_by_auto": cg_worth_trying(budget, largest),
            "faster": min(("direct", "cg"), key=lambda a: med[a]),
            "auto_over_faster": med["auto"] / min(med["direct"], med["cg"])}


def fit(flops: list[float], seconds: list[float], calls: list[float] | None = None) -> tuple[float, float]:
    """(a, b) >= 0 minimizing the squared relative error sum ((a n + b f) / t - 1)^2, n the calls
    (1 each where not given): relative, so that a 20 ms shape weighs as much as a 900 ms one (an
    absolute fit follows the largest shapes and mispredicts the small ones, where "auto" then
    picks the slower adjoint)."""
    f, t = np.asarray(flops, dtype=float), np.asarray(seconds, dtype=float)
    n = np.ones_like(f) if calls is None else np.asarray(calls, dtype=float)
    X, y = np.stack([n / t, f / t], 1), np.ones_like(t)
    if len(f) > 1:
        (a, b), *_ = np.linalg.lstsq(X, y, rcond=None)
        if a >= 0 and b >= 0:
            return float(a), float(b)
    candidates = [(0.0, float(X[:, 1].sum() / (X[:, 1] ** 2).sum())), (float(X[:, 0].sum() / (X[:, 0] ** 2).sum()), 0.0)]
    return min(candidates, key=lambda ab: float(((X @ np.asarray(ab) - 1) ** 2).sum()))


def plot(results: dict[str, dict], fitted: dict[str, tuple[float, float]], path: Path, title: str) -> None:
    plt = common.pyplot()
    names = list(results)
    fig, (ax_t, ax_b) = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.27
    for i, a in enumerate(ADJOINTS):
        ax_t.bar([j + (i - 1) * width for j in range(len(names))],
                 [1e3 * results[n]["median_backward_s"][a] for n in names], width, label=a)
    ax_t.set_yscale("log")
    ax_t.set_xticks(range(len(names)), names, rotation=15, ha="right", fontsize=7)
    ax_t.set(ylabel="backward ms (median)", title="implicit backward by adjoint")
    ax_t.legend(fontsize=8)
    xs = range(len(names))
    ax_b.plot(xs, [results[n]["break_even_cg_iterations"] for n in names], "o-", label="measured break-even")
    ax_b.plot(xs, [results[n]["library_cg_budget"] for n in names], "s--", label="library cg_budget")
    ax_b.plot(xs, [results[n]["runs"]["cg"]["steps_max"] for n in names], "^:", label="CG iterations taken")
    ax_b.set_yscale("log")
    ax_b.set_xticks(list(xs), names, rotation=15, ha="right", fontsize=7)
    ax_b.set(ylabel="CG iterations", title="CG iterations worth one direct solve")
    ax_b.legend(fontsize=8)
    for ax in (ax_t, ax_b):
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--repeats", type=int, default=3, help="timed interleaved rounds (default 3)")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = 1
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    device, out = common.setup(args)
    warnings.simplefilter("ignore", vd.ConvergenceWarning)
    results = {}
    for name, shape in (QUICK_SHAPES if args.quick else SHAPES).items():
        r = results[name] = measure(name, shape, args, device)
        med = r["median_backward_s"]
        print(f"  {name:34s} s_max {r['s_max']:4d}  direct {1e3 * med['direct']:8.1f} ms  cg {1e3 * med['cg']:8.1f} ms "
              f"({r['runs']['cg']['steps_max']} it)  auto {1e3 * med['auto']:8.1f} ms ({r['runs']['auto']['method']}, "
              f"{r['auto_over_faster']:.2f}x the faster)  break-even {r['break_even_cg_iterations']:.0f} it "
              f"(library budget {r['library_cg_budget']}, largest support {r['largest_support']}, CG tried: "
              f"{r['cg_tried_by_auto']})", flush=True)
    rows = list(results.values())
    fitted = {"DIRECT_COST": fit([r["direct_flops"] for r in rows], [r["median_backward_s"]["direct"] for r in rows],
                                 [r["direct_calls"] for r in rows]),
              "CG_ITERATION_COST": fit([r["cg_flops_per_iteration"] for r in rows],
                                       [r["cg_s_per_iteration"] for r in rows])}
    summary = {"fitted": fitted, "library": {"DIRECT_COST": DIRECT_COST, "CG_ITERATION_COST": CG_ITERATION_COST},
               "auto_over_faster_max": max(r["auto_over_faster"] for r in rows)}
    common.write_json(out / "adjoint_cost.json", {
        "benchmark": "adjoint_cost", "quick": args.quick, "config": {**vars(args), "out": str(out),
                                                                     "device": str(device)},
        "environment": common.environment(device), "results": results, "summary": summary})
    plot(results, fitted, out / "adjoint_cost.png", f"implicit adjoint cost, {common.device_label(device)}")
    print(f"fitted DIRECT_COST = {fitted['DIRECT_COST']}, CG_ITERATION_COST = {fitted['CG_ITERATION_COST']} "
          f"(library {DIRECT_COST}, {CG_ITERATION_COST}); auto at most {summary['auto_over_faster_max']:.2f}x the "
          "faster adjoint")
    print(f"wrote {out / 'adjoint_cost.json'} and {out / 'adjoint_cost.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
