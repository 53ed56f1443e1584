"""`vars-deq compare`: forward solvers side by side on the problems VARS layers really solve.

The problems are captured from the VARS layers of a trained model on real images (by default the
small VARS-SD digits checkpoint shipped with the package, on scikit-learn's bundled digits), plus
synthetic suites of chosen conditioning. For each solver and each relative-residual tolerance:
iterations and wall time (CUDA-synchronised), fraction converged, energy gap to a float64
reference, sparsity. A mixed batch of easy and hard problems measures per-problem stopping
against whole-batch stopping.
"""

from __future__ import annotations

import json
import math
import statistics
import time
import warnings
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .dictionaries.dense import DenseOperator
from .equilibrium import ConvergenceWarning, solve
from .layers.sparse_reconstruction import SparseReconstruction
from .problems import SparseCoding
from .solvers import SOLVERS, make_solver

__all__ = ["capture_problems", "synthetic_problems", "mixed_batch", "compare_solvers", "per_problem_work",
           "DEFAULT_SOLVERS", "DEFAULT_TOLS", "default_checkpoint", "plot", "format_table", "target_checks",
           "add_compare_parser", "run_compare"]

DEFAULT_SOLVERS = (
    "ista", "fista", "mfista", "fista_restart", "fista_gradient_restart",
    "anderson", "anderson_residual", "anderson_plain",
    "torchdeq_anderson", "torchdeq_broyden", "torchdeq_fixed_point_iter",
)
DEFAULT_TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)


def default_checkpoint() -> Path:
    """The VARS-SD digits checkpoint shipped with the package (see its recipe beside it)."""
    return Path(str(resources.files("vars_deq") / "assets" / "vars_sd_digits.pt"))


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
        op = module.dictionary(x if source is None else source)
        captured.append(SparseCoding(op, x.detach(), module.lam.detach().to(x.dtype), nonneg=module.nonneg,
                                     lipschitz=module.lipschitz, check_finite=False))

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


def compare_solvers(
    problems: SparseCoding,
    solvers: Sequence[str] = DEFAULT_SOLVERS,
    tols: Sequence[float] = DEFAULT_TOLS,
    max_steps: int = 2000,
    repeats: int = 1,
    progress=None,
) -> dict[str, Any]:
    """Every solver on the same problems: per tolerance the iterations and wall time at which every
    problem was below it, the fraction below it, the energy gap to a float64 reference, sparsity;
    plus the mean energy-gap trace for the plots.

    One timed solve to the tightest tolerance records per-step residuals and wall times (its loop
    synchronises each step anyway); a second solve records energies (one extra product per step, so
    it is not timed). TorchDEQ's loop keeps no per-step record, so it is run once per tolerance.
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
            n_steps = len(sol.stats.time_trace)
            res = sol.stats.residual_trace.reshape(n_steps, -1)
            times = torch.tensor([statistics.median(r[0].stats.time_trace[i] for r in runs) for i in range(n_steps)],
                                 dtype=torch.float64)
            gaps = None
            if not torchdeq:
                etr = sol.stats.energy_trace.double().reshape(n_steps, -1)
                gaps = ((etr - e_star) / scale).clamp_min(0)
                logged = ~torch.isnan(gaps).all(1)
                mean_log = torch.nanmean(gaps.clamp_min(1e-16).log10(), dim=1)
                trace = [(i + 1, float(mean_log[i])) for i in range(n_steps) if bool(logged[i])]
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
            work = int(steps.sum()) if flag else int(steps.max()) * steps.numel()
            out[mode] = {"products": work, "seconds": seconds, "converged_fraction": sol.converged.float().mean().item()}
    out["work_ratio"] = out["per_problem"]["products"] / out["whole_batch"]["products"]
    out["time_ratio"] = out["per_problem"]["seconds"] / out["whole_batch"]["seconds"]
    return out


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = list(results)
    fig, axes = plt.subplots(len(suites), 2, figsize=(11, 3.6 * len(suites)), squeeze=False)
    for row, suite in enumerate(suites):
        for name, r in results[suite].items():
            tr = r["log10_gap_trace"]
            if not tr:
                continue
            its = [k for k, _ in tr]
            gaps = [10**g for _, g in tr]
            axes[row, 0].plot(its, gaps, label=name)
            axes[row, 1].plot([i * r["seconds_per_iteration"] for i in its], gaps, label=name)
        for col, xlabel in enumerate(("iteration", "seconds (from the timed run)")):
            ax = axes[row, col]
            ax.set_yscale("log")
            ax.set_xscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("relative energy gap")
            ax.set_title(f"{suite}")
            ax.grid(True, which="both", alpha=0.3)
        axes[row, 0].legend(fontsize=7, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _sci(v) -> str:
    return "-" if v is None else f"{v:.1e}"


def format_table(results: dict[str, dict[str, Any]], tol: float) -> str:
    key = f"{tol:g}"
    lines = []
    for suite, per_solver in results.items():
        lines.append(f"\n{suite}  (relative residual {key})")
        lines.append(f"{'solver':26s} {'iters':>8s} {'all':>6s} {'time s':>9s} {'conv':>6s} {'E gap':>9s}")
        for name, r in per_solver.items():
            row = r["by_tol"][key]
            lines.append(
                f"{name:26s} {row['iterations_mean']:8.1f} {row['iterations_all']:6d} {row['seconds']:9.4f} "
                f"{row['converged_fraction']:6.2f} {_sci(row['rel_energy_gap_max']):>9s}"
            )
    return "\n".join(lines)


def target_checks(per_solver: dict[str, Any], tol: float = 1e-4) -> dict[str, Any]:
    """The issue's targets on one suite, with the measured ratios."""
    key = f"{tol:g}"

    def get(name, field):
        return per_solver[name]["by_tol"][key][field] if name in per_solver else math.nan

    aa_it, aa_t = get("anderson", "iterations_mean"), get("anderson", "seconds")
    return {
        "anderson_vs_ista_iterations": aa_it / get("ista", "iterations_mean"),
        "anderson_vs_fista_iterations": aa_it / get("fista", "iterations_mean"),
        "anderson_vs_torchdeq_anderson_time": aa_t / get("torchdeq_anderson", "seconds"),
        "anderson_converged_fraction": get("anderson", "converged_fraction"),
        "targets": "anderson <= 0.35x ista and <= 0.6x fista iterations, <= 0.5x torchdeq_anderson time, 100% converged",
    }


def _to_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, default=float))



# -- command line -------------------------------------------------------------------------------


def load_images(path: str | Path, input_size: tuple[int, int, int], limit: int) -> torch.Tensor:
    """Images from a file or a folder (any format PIL reads), in [0, 1], adapted to the model."""
    import numpy as np
    from PIL import Image

    from .data import adapt_images

    p = Path(path)
    if not p.exists():
        raise ValueError(f"--images {str(p)!r} does not exist")
    files = sorted(f for f in (p.rglob("*") if p.is_dir() else [p]) if f.is_file())
    images = []
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0
        except OSError:
            continue  # not an image: folders may hold other files
        images.append(adapt_images(torch.from_numpy(arr).permute(2, 0, 1)[None], input_size))
        if len(images) == limit:
            break
    if not images:
        raise ValueError(f"--images {str(p)!r} holds no readable image")
    return torch.cat(images)


def add_compare_parser(sub) -> None:
    p = sub.add_parser("compare", help="forward solvers side by side on captured VARS problems",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default=None, help="a vars-deq training checkpoint (default: the shipped VARS-SD digits one)")
    p.add_argument("--images", default=None, help="image file or folder (default: the digits test split)")
    p.add_argument("--num-images", type=int, default=8, help="images to capture problems from")
    p.add_argument("--solvers", nargs="+", default=list(DEFAULT_SOLVERS), help=f"from {sorted(SOLVERS)}")
    p.add_argument("--tols", nargs="+", type=float, default=list(DEFAULT_TOLS), help="relative residuals")
    p.add_argument("--synthetic", nargs="*", type=float, default=[3.0],
                   help="log10 condition numbers of synthetic dense suites (none: skip)")
    p.add_argument("--layers", nargs="*", type=int, default=[-1],
                   help="which VARS layers' problems (default: the last; e.g. 0 1 2 3 for all)")
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per measurement (median)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--output", default="compare_results", help="folder for compare.json and compare.png")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: the problems are small, and on a busy 2-core machine two "
                        "OpenMP threads made a 500-step ISTA solve 140x slower)")
    p.set_defaults(run=run_compare)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"--device {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def run_compare(args) -> int:
    from tqdm import tqdm

    from .data import load_digits_split, model_input_size
    from .train.checkpoint import model_from_checkpoint

    for name in args.solvers:
        make_solver(name)
    if any(t <= 0 for t in args.tols):
        raise ValueError(f"--tols must be > 0, got {args.tols}")
    device = _device(args.device)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    ckpt_path = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    model, ckpt = model_from_checkpoint(ckpt_path)
    model = model.to(device)
    input_size = model_input_size(model)
    if args.images:
        images = load_images(args.images, input_size, args.num_images)
    else:
        images = load_digits_split()[1].tensors[0][: args.num_images]
    captured = capture_problems(model, images.to(device))
    layers = [i % len(captured) if -len(captured) <= i < 0 else i for i in args.layers] if args.layers else range(len(captured))
    suites: dict[str, SparseCoding] = {}
    for i in layers:
        if not 0 <= i < len(captured):
            raise ValueError(f"--layers: the model has VARS layers 0..{len(captured) - 1}, got {i}")
        suites[f"captured layer {i} ({ckpt['model_name']})"] = captured[i]
    for c in args.synthetic:
        suites[f"synthetic cond 1e{c:g}"] = synthetic_problems(c, device=device)
    results = {}
    with tqdm(total=len(suites) * len(args.solvers), desc="compare", unit="solver") as bar:
        for suite, prob in suites.items():
            bar.set_postfix_str(suite)
            results[suite] = compare_solvers(prob, args.solvers, args.tols, args.max_steps, args.repeats, bar)
    work = per_problem_work(mixed_batch(device))
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    device_label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})"
    report_tol = 1e-4 if 1e-4 in args.tols else min(args.tols)
    payload = {
        "device": device_label,
        "checkpoint": str(ckpt_path),
        "num_images": int(images.shape[0]),
        "suites": {s: {"problems": p.num_problems, "N": p.num_tokens, "M": p.num_atoms, "C": p.num_channels}
                   for s, p in suites.items()},
        "results": results,
        "targets": {s: target_checks(r, report_tol) for s, r in results.items()},
        "per_problem_stopping": work,
    }
    _to_json(payload, out / "compare.json")
    plot(results, out / "compare.png", f"vars-deq compare on {device_label}")
    print(format_table(results, report_tol))
    print(f"\nper-problem stopping on a mixed easy/hard batch (anderson, tol 1e-4): "
          f"{work['work_ratio']:.2f}x the Gram products and {work['time_ratio']:.2f}x the time of whole-batch stopping")
    print(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")
    return 0
