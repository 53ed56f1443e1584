"""Forward solvers side by side on the problems VARS layers really solve (``vars-deq compare``).

The problems are captured from the VARS layers of a trained model on real images (by default the
small VARS-SD digits checkpoint shipped with the package, on scikit-learn's bundled digits), plus
synthetic suites of chosen conditioning. For each solver and each relative-residual tolerance:
iterations and wall time (CUDA-synchronised) until every problem is below it, fraction below it,
sparsity; the energy gap to a float64 reference at the end of the run (the tightest tolerance).
A mixed batch of easy and hard problems measures per-problem stopping against whole-batch
stopping. The figure is :func:`vars_deq.plots.plot_convergence`; the command line is
:mod:`vars_deq.cli.compare`.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .dictionaries.dense import DenseOperator
from .equilibrium import ConvergenceWarning, solve
from .layers.sparse_reconstruction import SparseReconstruction
from .problems import SparseCoding
from .solvers import make_solver

__all__ = ["capture_problems", "synthetic_problems", "mixed_batch", "compare_solvers", "per_problem_work",
           "DEFAULT_SOLVERS", "deit_problems", "DEIT_KINDS", "DEFAULT_TOLS", "format_table", "target_checks", "write_json"]

DEFAULT_SOLVERS = (
    "ista", "fista", "mfista", "fista_restart", "fista_gradient_restart", "fista_rank1",
    "anderson", "anderson_residual", "anderson_plain",
    "torchdeq_anderson", "torchdeq_broyden", "torchdeq_fixed_point_iter",
)
DEFAULT_TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def capture_problems(model: nn.Module, images: torch.Tensor) -> list[SparseCoding]:
    """The sparse-coding problems each VARS layer of ``model`` solves on ``images`` (one
    SparseCoding per layer, batch x heads problems), detached."""
    layers = [m for m in model.modules() if isinstance(m, SparseReconstruction)]
    if not layers:
        raise ValueError(f"the model ({type(model).__name__}) has no VARS (SparseReconstruction) layers to capture")
    captured: list[SparseCoding] = []

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        source = args[1] if len(args) > 1 else kwargs.get("source")
        op = module.dictionary(x if source is None else source, num_prefix_tokens=kwargs.get("num_prefix_tokens"))
        captured.append(SparseCoding(op, x.detach(), module.lam.detach().to(x.dtype), nonneg=module.nonneg,
                                     lipschitz=module.lipschitz, check_finite=False, lipschitz_margin=module.margin))

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in layers]
    try:
        with torch.no_grad():
            model.eval()(images)
    finally:
        for h in handles:
            h.remove()
    return captured


def synthetic_problems(log10_cond: float, batch: int = 32, tokens: int = 64, atoms: int = 96, channels: int = 16,
                       lam: float = 0.1, seed: int = 0, device: str | torch.device = "cpu") -> SparseCoding:
    """Dense dictionaries with singular values spread log-uniformly over 10**log10_cond."""
    g = torch.Generator().manual_seed(seed)
    r = min(tokens, atoms)
    u, _ = torch.linalg.qr(torch.randn(batch, tokens, tokens, generator=g))
    v, _ = torch.linalg.qr(torch.randn(batch, atoms, atoms, generator=g))
    s = torch.logspace(0, -log10_cond, r)
    d = (u[..., :r] * s) @ v[..., :r].transpose(-1, -2)
    d = d / d.norm(dim=-2, keepdim=True)  # unit atoms, as in VARS
    x = d @ (torch.randn(batch, atoms, channels, generator=g) * (torch.rand(batch, atoms, 1, generator=g) < 0.2))
    x = x + 0.1 * torch.randn(batch, tokens, channels, generator=g)
    return SparseCoding(d.to(device), x.to(device), lam)


#: the DeiT-Tiny-scale suites: "d" (VARS-D, M = 128 atoms) and "sd" (VARS-SD, free static atoms, M = 256)
DEIT_KINDS = ("d", "sd")


def deit_problems(kind: str, images: torch.Tensor, seed: int = 0, device: str | torch.device = "cpu") -> SparseCoding:
    """The problems the first VARS layer of a DeiT-Tiny VARS model (``vars_{kind}_deit_tiny_patch16_224``,
    the original's settings, freshly initialized from ``seed``) solves on ``images`` resized to
    3 x 224 x 224: N = 196 tokens, C = 64 channels per head, 3 heads per image; the shapes and
    atom statistics of the problems a user's DeiT-size model solves (trained weights are not shipped)."""
    import timm

    from . import models  # noqa: F401  (registers the VARS models with timm)

    if kind not in DEIT_KINDS:
        raise ValueError(f"kind must be one of {DEIT_KINDS}, got {kind!r}")
    torch.manual_seed(seed)
    model = timm.create_model(f"vars_{kind}_deit_tiny_patch16_224", depth=1).to(device)
    x = nn.functional.interpolate(images.to(device), size=(224, 224), mode="bilinear", align_corners=False)
    return capture_problems(model, x.expand(-1, 3, -1, -1))[0]


def mixed_batch(device="cpu", seed: int = 0) -> SparseCoding:
    """Half well-conditioned, half ill-conditioned problems in one batch (for per-problem stopping)."""
    easy = synthetic_problems(0.5, batch=16, seed=seed)
    hard = synthetic_problems(3.0, batch=16, seed=seed + 1)
    d = torch.cat([easy.D.weight, hard.D.weight]).to(device)
    x = torch.cat([easy.x, hard.x]).to(device)
    return SparseCoding(DenseOperator(d), x, 0.1)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_solve(prob, solver, tol, max_steps, per_problem=True, trace=False):
    device = prob.x.device
    _sync(device)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        sol = solve(prob, solver, max_steps=max_steps, tol=tol, per_problem=per_problem, trace=trace)
    _sync(device)
    return sol, time.perf_counter() - t0


def _first_below(trace: torch.Tensor, tol: float) -> torch.Tensor:
    """Per problem, the 1-based step at which the residual first fell below tol (0: never)."""
    below = (trace < tol).int()
    hit = below.cumsum(0) > 0
    first = hit.int().argmax(0) + 1
    return torch.where(hit.any(0), first, torch.zeros_like(first))


def _plot_steps(n: int, points: int = 80) -> list[int]:
    """About ``points`` log-spaced 1-based steps in 1..n (all of them when n is small)."""
    if n <= points:
        return list(range(1, n + 1))
    return sorted({max(1, min(n, round(n ** (i / (points - 1))))) for i in range(points)})


def compare_solvers(
    problems: SparseCoding,
    solvers: Sequence[str] = DEFAULT_SOLVERS,
    tols: Sequence[float] = DEFAULT_TOLS,
    max_steps: int = 2000,
    repeats: int = 1,
    progress=None,
) -> dict[str, Any]:
    """Every solver on the same problems: per tolerance the iterations and wall time at which every
    problem was below it and the fraction below it; at the end of the run (the tightest tolerance)
    the energy gap to a float64 reference and the sparsity; traces for the plots: the largest
    relative residual over the problems (every solver) and the mean log10 energy gap (this
    library's solvers: TorchDEQ's loop exposes no iterate to take an energy of).

    Each solve runs to the tightest tolerance and records per-step residuals and wall times (its
    loop synchronises each step anyway) and, at log-spaced steps, energies. TorchDEQ's Broyden
    also records T at its start point; such records before the first iteration are dropped, so
    iteration counts never exceed ``max_steps``.
    """
    tols = sorted(tols, reverse=True)
    tight = tols[-1]
    with torch.no_grad():
        ref = solve(problems.to(torch.float64), "fista_restart", max_steps=20_000, tol=1e-9)
    e_star = ref.stats.energy.reshape(-1)
    scale = e_star.abs().clamp_min(1e-30)
    results: dict[str, Any] = {}
    for name in solvers:
        make_solver(name)
        rows: dict[str, Any] = {}
        trace = None
        with torch.no_grad():
            torchdeq = "torchdeq" in name  # its loop exposes no iterate to take energies of
            runs = [_timed_solve(problems, name, tight, max_steps, trace="residual" if torchdeq else "log")
                    for _ in range(repeats)]
            sol = runs[0][0]
            n_records = len(sol.stats.time_trace)
            offset = max(0, n_records - max_steps)  # evaluations of T before the first iteration
            n_steps = n_records - offset
            res = sol.stats.residual_trace.reshape(n_records, -1)[offset:]
            times = torch.tensor([statistics.median(r[0].stats.time_trace[i] for r in runs)
                                  for i in range(offset, n_records)], dtype=torch.float64)
            if not torchdeq:
                etr = sol.stats.energy_trace.double().reshape(n_steps, -1)
                gaps = ((etr - e_star) / scale).clamp_min(0)
                logged = ~torch.isnan(gaps).all(1)
                mean_log = torch.nanmean(gaps.clamp_min(1e-16).log10(), dim=1)
                trace = [(i + 1, float(mean_log[i])) for i in range(n_steps) if bool(logged[i])]
            # a stopped problem's residual is NaN: the largest over the problems still iterating
            worst = torch.nan_to_num(res.double(), nan=-math.inf).amax(1).clamp_min(1e-30).log10()
            residual_trace = [(k, float(worst[k - 1])) for k in _plot_steps(n_steps)]
            final_gap = ((sol.stats.energy.double().reshape(-1) - e_star) / scale).clamp_min(0)
            for tol in tols:
                first = _first_below(res, tol)  # (P,)
                reached = first > 0
                k_all = int(first.max()) if bool(reached.all()) else n_steps
                gap = final_gap.max().item() if tol == tight else None
                rows[f"{tol:g}"] = {
                    "iterations_mean": torch.where(reached, first, torch.full_like(first, n_steps)).float().mean().item(),
                    "iterations_all": k_all,
                    "seconds": float(times[k_all - 1]),
                    "converged_fraction": reached.float().mean().item(),
                    "rel_energy_gap_max": gap,
                }
            rows["sparsity_at_tightest"] = (sol.z == 0).float().mean().item()
        t_row = rows[f"{tight:g}"]
        results[name] = {
            "by_tol": rows,
            "log10_gap_trace": trace,
            "log10_max_residual_trace": residual_trace,
            "seconds_per_iteration": t_row["seconds"] / max(t_row["iterations_all"], 1),
        }
        if progress is not None:
            progress.update(1)
    return results


def per_problem_work(problems: SparseCoding, solver: str = "anderson", tol: float = 1e-4,
                     max_steps: int = 5000) -> dict[str, Any]:
    """Gram products and time of per-problem stopping against whole-batch stopping."""
    out = {}
    with torch.no_grad():
        for mode, flag in (("per_problem", True), ("whole_batch", False)):
            sol, seconds = _timed_solve(problems, solver, tol, max_steps, per_problem=flag)
            steps = sol.stats.steps
            # per problem: the rows the loop really iterated (stopped problems leave the batch in groups)
            if not flag:
                work = int(steps.max()) * steps.numel()
            else:
                work = int(steps.sum()) if sol.stats.rows_iterated is None else sol.stats.rows_iterated
            out[mode] = {"products": work, "seconds": seconds, "converged_fraction": sol.converged.float().mean().item()}
    out["work_ratio"] = out["per_problem"]["products"] / out["whole_batch"]["products"]
    out["time_ratio"] = out["per_problem"]["seconds"] / out["whole_batch"]["seconds"]
    return out


def _sci(v) -> str:
    return "-" if v is None else f"{v:.1e}"


def format_table(results: dict[str, dict[str, Any]], tol: float) -> str:
    """One block per suite at relative residual ``tol``; the energy gap is the one at the end of
    the run (the tightest tolerance, named in the column header)."""
    key = f"{tol:g}"
    lines = []
    for suite, per_solver in results.items():
        tight = min((k for k in next(iter(per_solver.values()))["by_tol"] if k != "sparsity_at_tightest"), key=float)
        gap_header = f"E gap@{tight}"
        lines.append(f"\n{suite}  (relative residual {key})")
        lines.append(f"{'solver':26s} {'iters':>8s} {'all':>6s} {'time s':>9s} {'conv':>6s} {gap_header:>12s}")
        for name, r in per_solver.items():
            row = r["by_tol"][key]
            gap = r["by_tol"][tight]["rel_energy_gap_max"]
            # not every problem below tol: the count is the step budget, which was not enough
            k_all = str(row["iterations_all"]) if row["converged_fraction"] == 1 else f">{row['iterations_all']}"
            lines.append(
                f"{name:26s} {row['iterations_mean']:8.1f} {k_all:>6s} {row['seconds']:9.4f} "
                f"{row['converged_fraction']:6.2f} {_sci(gap):>12s}"
            )
    return "\n".join(lines)


def target_checks(per_solver: dict[str, Any], tol: float = 1e-4) -> dict[str, Any]:
    """The issue's targets on one suite, with the measured ratios.

    A ratio against (or of) a solver that did not bring every problem below ``tol`` would
    compare a step budget, not a convergence speed: it is None, and ``notes`` says why.
    """
    key = f"{tol:g}"
    notes: dict[str, str] = {}

    def ratio(label: str, a: str, b: str, field: str) -> float | None:
        for n in (a, b):
            if n not in per_solver:
                notes[label] = f"{n} was not run"
                return None
        for n in (a, b):
            frac = per_solver[n]["by_tol"][key]["converged_fraction"]
            if frac < 1:
                notes[label] = f"{n} brought only {frac:.0%} of the problems below {key} within the step budget"
                return None
        return per_solver[a]["by_tol"][key][field] / per_solver[b]["by_tol"][key][field]

    return {
        "tol": tol,
        "anderson_vs_ista_iterations": ratio("anderson_vs_ista_iterations", "anderson", "ista", "iterations_mean"),
        "anderson_vs_fista_iterations": ratio("anderson_vs_fista_iterations", "anderson", "fista", "iterations_mean"),
        "anderson_vs_torchdeq_anderson_time": ratio("anderson_vs_torchdeq_anderson_time", "anderson",
                                                    "torchdeq_anderson", "seconds"),
        "anderson_converged_fraction": (per_solver["anderson"]["by_tol"][key]["converged_fraction"]
                                        if "anderson" in per_solver else None),
        "fista_rank1_vs_fista_time": ratio("fista_rank1_vs_fista_time", "fista_rank1", "fista", "seconds"),
        "notes": notes,
        "targets": "anderson <= 0.35x ista and <= 0.6x fista iterations, <= 0.5x torchdeq_anderson time, 100% converged; "
                   "a forward <= 0.6x fista's time",
    }


def write_json(obj: Any, path: Path) -> None:
    """``obj`` as indented JSON (tensor and NumPy scalars as floats)."""
    path.write_text(json.dumps(obj, indent=1, default=float))
