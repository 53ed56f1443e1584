"""Solvers side by side on VARS-shaped lasso problems (issue: core solvers).

N = 196 tokens, M = 128 atoms from a Performer dictionary (head_dim 64), C = 64 channels,
24 problems (batch 8 x 3 heads), lam = 0.3, each solved to relative residual 1e-4. Reports
iterations, wall time (median of repeats, all solvers interleaved in one run), fraction converged
and the final energy gap to a float64 reference; writes JSON and a convergence plot (energy gap
against iteration, log scale).

    python benchmarks/bench_solvers.py [--device cpu|cuda] [--repeats 5] [--threads 1] [--out DIR]
    python benchmarks/bench_solvers.py --quick      # 2 problems of N=16, M=16: a smoke run

Results: <out>/solvers.json and solvers.png (default out: benchmarks/results/<device>/).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import vars_deq as vd  # noqa: E402

SOLVERS = ["ista", "fista", "mfista", "fista_restart", "fista_rank1", "anderson", "anderson_residual", "anderson_plain"]
SHAPE = {"batch": 8, "heads": 3, "tokens": 196, "head_dim": 64}
QUICK_SHAPE = {"batch": 2, "heads": 1, "tokens": 16, "head_dim": 8}
LAM = 0.3


def make_problem(device, dtype=torch.float32, seed=0, batch=8, heads=3, tokens=196, head_dim=64, lam=LAM):
    gen = torch.Generator().manual_seed(seed)
    # queries with a shared low-rank component: tokens of an image are correlated, as in a ViT
    base = torch.randn(batch, 1, tokens, 8, generator=gen) @ torch.randn(8, head_dim, generator=gen)
    q = (base + 0.5 * torch.randn(batch, heads, tokens, head_dim, generator=gen)).to(device, dtype)
    v = torch.randn(batch, heads, tokens, head_dim, generator=gen).to(device, dtype)
    dictionary = vd.PerformerDictionary(head_dim, num_heads=heads, seed=seed).to(device)
    return vd.SparseCoding(dictionary(q), v, lam)


def main(argv=None):
    ap = common.parser(__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-steps", type=int, default=5000)
    args = ap.parse_args(argv)
    shape = QUICK_SHAPE if args.quick else SHAPE
    if args.quick:
        args.repeats = 1
    device, out = common.setup(args)

    prob = make_problem(device, **shape)
    ref = vd.solve(make_problem(device, torch.float64, **shape), "fista_restart", max_steps=20000, tol=1e-12)
    e_star = ref.stats.energy.to(torch.float64)

    rows, traces, times = {}, {}, {s: [] for s in SOLVERS}
    for name in SOLVERS:  # traced run: iterations, energies (tracing costs a product per step)
        sol = vd.solve(prob, name, max_steps=args.max_steps, tol=args.tol, trace=True)
        gap = (sol.stats.energy_trace.double() - e_star) / e_star.abs()
        traces[name] = torch.nanmean(gap.clamp_min(1e-16).log10().flatten(1), dim=1).tolist()
        rows[name] = {
            "iterations_mean": sol.stats.steps.float().mean().item(),
            "iterations_max": int(sol.stats.steps.max()),
            "converged_fraction": sol.converged.float().mean().item(),
            "final_rel_energy_gap_max": ((sol.stats.energy.double() - e_star) / e_star.abs()).max().item(),
            "sparsity": (sol.z == 0).float().mean().item(),
        }
    for _ in range(args.repeats):  # untraced, interleaved timing
        for name in SOLVERS:
            _, seconds = common.timed(lambda: vd.solve(prob, name, max_steps=args.max_steps, tol=args.tol), device)
            times[name].append(seconds)
    for name in SOLVERS:
        rows[name]["seconds_median"] = common.median(times[name])

    ista = rows["ista"]
    targets = {
        "fista_iterations_ratio": rows["fista"]["iterations_mean"] / ista["iterations_mean"],
        "anderson_iterations_ratio": rows["anderson"]["iterations_mean"] / ista["iterations_mean"],
        "anderson_time_ratio": rows["anderson"]["seconds_median"] / ista["seconds_median"],
        "anderson_all_converged": rows["anderson"]["converged_fraction"] == 1.0,
        "targets": "fista <= 0.5x ista iterations; anderson <= 0.35x iterations, <= 0.6x time, all converged",
    }
    problem = {"N": shape["tokens"], "M": 2 * shape["head_dim"], "C": shape["head_dim"],
               "problems": shape["batch"] * shape["heads"], "lam": LAM, "tol": args.tol, "dictionary": "performer"}
    result = {
        "benchmark": "solvers",
        "quick": args.quick,
        "environment": common.environment(device),
        "device": common.device_label(device),
        "problem": problem,
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "solvers": rows,
        "ratios": targets,
        "log10_rel_energy_gap_trace": traces,
    }
    common.write_json(out / "solvers.json", result)
    plot(traces, out / "solvers.png", result["device"], problem)

    print(f"device {result['device']}, threads {result['threads']}")
    print(f"{'solver':20s} {'iters':>8s} {'max':>6s} {'conv':>5s} {'time s':>8s} {'gap':>9s}")
    for name, r in rows.items():
        print(f"{name:20s} {r['iterations_mean']:8.1f} {r['iterations_max']:6d} {r['converged_fraction']:5.2f} "
              f"{r['seconds_median']:8.4f} {r['final_rel_energy_gap_max']:9.2e}")
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in targets.items()})
    print(f"wrote {out / 'solvers.json'} and solvers.png")
    return result


def plot(traces, path, device, problem):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, tr in traces.items():
        ax.plot(range(1, len(tr) + 1), [10**t for t in tr], label=name)
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("relative energy gap (E - E*) / E*  (geometric mean over problems)")
    ax.set_title(f"VARS-shaped lasso, N={problem['N']} M={problem['M']} C={problem['C']}, "
                 f"{problem['problems']} problems ({device})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    common.save_figure(fig, path)


if __name__ == "__main__":
    main()
