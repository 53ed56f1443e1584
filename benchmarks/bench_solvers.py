"""Solvers side by side on VARS-shaped lasso problems (issue: core solvers).

N = 196 tokens, M = 128 atoms from a Performer dictionary (head_dim 64), C = 64 channels,
24 problems (batch 8 x 3 heads), lam = 0.3, each solved to relative residual 1e-4. Reports
iterations, wall time (median of repeats, all solvers interleaved in one run), fraction converged
and the final energy gap to a float64 reference; writes JSON and a convergence plot (energy gap
against iteration, log scale).

    python benchmarks/bench_solvers.py [--device cpu|cuda] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import vars_deq as vd

SOLVERS = ["ista", "fista", "mfista", "fista_restart", "anderson", "anderson_residual", "anderson_plain"]


def make_problem(device, dtype=torch.float32, seed=0, batch=8, heads=3, tokens=196, head_dim=64, lam=0.3):
    gen = torch.Generator().manual_seed(seed)
    # queries with a shared low-rank component: tokens of an image are correlated, as in a ViT
    base = torch.randn(batch, 1, tokens, 8, generator=gen) @ torch.randn(8, head_dim, generator=gen)
    q = (base + 0.5 * torch.randn(batch, heads, tokens, head_dim, generator=gen)).to(device, dtype)
    v = torch.randn(batch, heads, tokens, head_dim, generator=gen).to(device, dtype)
    dictionary = vd.PerformerDictionary(head_dim, num_heads=heads, seed=seed).to(device)
    return vd.SparseCoding(dictionary(q), v, lam)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave as is)")
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument("--max-steps", type=int, default=5000)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    from common import device_label, results_dir, sync

    out = Path(args.out) if args.out else results_dir(device)
    out.mkdir(parents=True, exist_ok=True)

    prob = make_problem(device)
    ref = vd.solve(make_problem(device, torch.float64), "fista_restart", max_steps=20000, tol=1e-12)
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
            sync(device)
            t0 = time.perf_counter()
            vd.solve(prob, name, max_steps=args.max_steps, tol=args.tol)
            sync(device)
            times[name].append(time.perf_counter() - t0)
    for name in SOLVERS:
        rows[name]["seconds_median"] = statistics.median(times[name])

    ista = rows["ista"]
    targets = {
        "fista_iterations_ratio": rows["fista"]["iterations_mean"] / ista["iterations_mean"],
        "anderson_iterations_ratio": rows["anderson"]["iterations_mean"] / ista["iterations_mean"],
        "anderson_time_ratio": rows["anderson"]["seconds_median"] / ista["seconds_median"],
        "anderson_all_converged": rows["anderson"]["converged_fraction"] == 1.0,
        "targets": "fista <= 0.5x ista iterations; anderson <= 0.35x iterations, <= 0.6x time, all converged",
    }
    result = {
        "device": device_label(device),
        "problem": {"N": 196, "M": 128, "C": 64, "problems": 24, "lam": 0.3, "tol": args.tol, "dictionary": "performer"},
        "threads": torch.get_num_threads(),
        "solvers": rows,
        "ratios": targets,
        "log10_rel_energy_gap_trace": traces,
    }
    (out / "solvers.json").write_text(json.dumps(result, indent=1))
    plot(traces, out / "solvers.png", result["device"])

    print(f"device {result['device']}, threads {result['threads']}")
    print(f"{'solver':20s} {'iters':>8s} {'max':>6s} {'conv':>5s} {'time s':>8s} {'gap':>9s}")
    for name, r in rows.items():
        print(f"{name:20s} {r['iterations_mean']:8.1f} {r['iterations_max']:6d} {r['converged_fraction']:5.2f} "
              f"{r['seconds_median']:8.4f} {r['final_rel_energy_gap_max']:9.2e}")
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in targets.items()})
    return result


def plot(traces, path, device):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, tr in traces.items():
        ax.plot(range(1, len(tr) + 1), [10**t for t in tr], label=name)
    ax.set_yscale("log")
    ax.set_xscale("log")
    ax.set_xlabel("iteration")
    ax.set_ylabel("relative energy gap (E - E*) / E*  (geometric mean over problems)")
    ax.set_title(f"VARS-shaped lasso, N=196 M=128 C=64, 24 problems ({device})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
