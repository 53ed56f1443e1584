"""Forward+backward cost of the backward modes on VARS-shaped problems (issues 3 and 11).

Lasso problems z* = argmin 1/2 ||v - D(q) z||^2 + lam ||z||_1 with a PerformerDictionary (head_dim
64, M = 128 atoms) over B x H = 24 problems of N = 196 tokens and C = 64 channels, queries and
values requiring grad, a forward of K fixed steps (tol=None), loss <w, z> with a fixed cotangent w:
``vd.sparse_code(prob, solver, backward=..., max_steps=K, tol=None)``. The backward is an object:
``vd.Unroll()``, ``vd.Phantom(steps, tau)``, or ``vd.Implicit(adjoint=..., tol=1e-6)`` with adjoint
"direct" (batched Cholesky on the support), "auto" (the direct solve, or CG first where the direct
solve's predicted time covers the iterations CG needs, then direct for what it left) or "cg"
(conjugate gradient on the support).

1. Interleaved comparison (the performance targets of issue 11): for K in {--time-steps (30),
   --total-steps (200)}, unroll and implicit with each of --compare-adjoints (direct, auto, cg),
   FISTA by default, timed in rounds (one forward+backward of every variant per round, the first
   round untimed), so that a busy machine slows all of them alike. Targets: implicit backward
   <= 0.5x the unrolled one at K = 30, and forward+backward <= 0.5x at K = 200. The issue's
   figures are for CPU, one thread: ``--threads 1``.
2. Sweep over --steps for every backward mode (implicit with --sweep-adjoint): peak memory and
   median forward and backward times.

   - CPU: each configuration's memory is measured in its own process, forked from the driver
     after the imports and before the driver computes anything: the baseline is the RSS after
     input creation and a tiny warm-up (which pages in the autograd engine, LAPACK and kernels:
     costs that do not depend on the configuration), then the peak RSS of one forward+backward.
     The peak is VmHWM, reset after the baseline, because a Linux child's ru_maxrss starts at its
     parent's resident size (ru_maxrss figures are reported too). glibc runs with a fixed 64 KiB
     mmap threshold so freed tensors leave the RSS at once and the peak follows the live tensors
     rather than the heap's fragmentation history (--malloc-default turns this off).
   - CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the allocated
     memory before the run.
   - Times are taken in the driver process: median of --repeats after one untimed run, forward and
     backward separately, device-synchronized, plus process CPU time (robust to a busy machine).
3. Adjoint work at convergence (float64, forward to relative residual 1e-8): steps (one Gram
   product each) of adjoint "direct", "auto", "cg", "fixed_point" and "anderson" to reach
   adjoint_tol=1e-6, read from the public API (``vd.sparse_code(..., return_solution=True)``, then
   ``sol.stats.adjoint`` after ``backward()``), and the error of each gradient against the closed
   form on the support of z*.

    python benchmarks/bench_backward.py --threads 1   # CPU, one thread (issue 11's setting)
    python benchmarks/bench_backward.py --device cuda
    python benchmarks/bench_backward.py --quick       # tiny problems: a smoke run of seconds

Results: <out>/backward.json and backward.png (default out: benchmarks/results/<device>/).
"""

from __future__ import annotations

import gc
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import vars_deq as vd  # noqa: E402
from vars_deq.devices import set_threads  # noqa: E402

MODES = ("implicit", "unroll", "phantom")
DEFAULT_STEPS = (5, 20, 30, 50, 100, 200)
SHAPE = {"B": 8, "H": 3, "N": 196, "C": 64, "head_dim": 64, "M": 128}
QUICK_SHAPE = {"B": 2, "H": 1, "N": 16, "C": 8, "head_dim": 8, "M": 16}
LAM = 0.3
TARGET_MEM_RATIO = 1.05
TARGET_TIME_RATIO = 0.5
TIME_STEPS = 30
TOTAL_STEPS = 200
COMPARE_ADJOINTS = ("direct", "auto", "cg")
ADJOINT_TOL = 1e-6
MMAP_THRESHOLD = 65536
#: what sol.stats.adjoint.residual measures, per adjoint solve
OWN_RESIDUAL = {
    "direct": "||A u_S - rhs_S|| / ||rhs_S|| of the support system per code column, max over columns",
    "cg": "||r|| / ||rhs|| per code column, max over columns",
    "cg+direct": "CG's ||r|| / ||rhs|| per code column (the support system's residual where the direct solve "
                 "finished), max over columns",
    "fixed_point": "||T(u) - u|| / ||g|| over the whole code (the solve loop's residual)",
    "anderson": "||T(u) - u|| / ||g|| over the whole code (the solve loop's residual)",
}


# -- one configuration (memory: in a forked child on CPU, in-process on CUDA) -------------------


def make_inputs(shape: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """(dictionary, q (B, H, N, d), v (B, H, N, C), w (B, H, M, C)): w is the fixed cotangent, loss <w, z*>."""
    gen = torch.Generator().manual_seed(seed)
    B, H, N, C, d, M = shape["B"], shape["H"], shape["N"], shape["C"], shape["head_dim"], shape["M"]
    q = torch.randn(B, H, N, d, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(B, H, N, C, generator=gen).to(device, dtype).requires_grad_()
    w = torch.randn(B, H, M, C, generator=gen).to(device, dtype)
    dictionary = vd.PerformerDictionary(d, num_features=M, num_heads=H).to(device)
    return dictionary, q, v, w


def make_backward(cfg: dict) -> vd.Backward:
    """The backward object of a configuration: its mode, and for implicit its adjoint solve."""
    if cfg["mode"] == "unroll":
        return vd.Unroll()
    if cfg["mode"] == "phantom":
        return vd.Phantom(steps=cfg["phantom_steps"], tau=cfg["tau"])
    # short fixed-step forwards are not equilibria; the cost is what is measured here
    return vd.Implicit(adjoint=cfg["adjoint"], tol=cfg.get("adjoint_tol", ADJOINT_TOL),
                       max_steps=cfg["adjoint_max_steps"], ridge=cfg["adjoint_ridge"], on_unconverged="ignore")


def code(dictionary, q, v, cfg: dict, steps: int | None = None):
    """(z, its Solution): K fixed forward steps of the configuration's solver, then its backward."""
    prob = vd.SparseCoding(dictionary(q), v, LAM, check_finite=False)
    return vd.sparse_code(prob, solver=cfg["solver"], backward=make_backward(cfg),
                          max_steps=cfg["steps"] if steps is None else steps, tol=None, return_solution=True)


class Case:
    """One configuration ready to run: loss = <w, z>, gradients to q and v."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.device, self.dtype = torch.device(cfg["device"]), getattr(torch, cfg["dtype"])
        torch.manual_seed(cfg["seed"])
        self.dictionary, self.q, self.v, self.w = make_inputs(cfg["shape"], self.device, self.dtype, cfg["seed"])
        self.sol = None

    def forward(self) -> torch.Tensor:
        z, self.sol = code(self.dictionary, self.q, self.v, self.cfg)
        return (z * self.w).sum()

    def backward(self, loss: torch.Tensor) -> None:
        self.q.grad = self.v.grad = None
        loss.backward()

    def grads_ok(self) -> bool:
        return all(t.grad is not None and bool(torch.isfinite(t.grad).all()) and bool(t.grad.abs().sum() > 0)
                   for t in (self.q, self.v))

    def forward_residual(self) -> float:
        return self.sol.stats.residual.max().item()

    def adjoint_stats(self) -> dict | None:
        """The latest backward's adjoint solve (implicit only): the method run, steps, residual."""
        adj = self.sol.stats.adjoint if self.sol is not None else None
        if adj is None or adj.steps is None:
            return None
        return {"method": adj.method, "steps_mean": adj.steps.float().mean().item(), "steps_max": int(adj.steps.max()),
                "residual_max": adj.residual.max().item(), "converged_fraction": adj.converged.float().mean().item()}


def measure_memory(cfg: dict) -> dict:
    """Peak memory of one forward+backward above a baseline taken after the inputs exist.

    On CPU this runs in a forked child (its own process), so the peak is this configuration's.
    """
    set_threads(cfg["threads"])
    warnings.simplefilter("ignore", vd.ConvergenceWarning)
    cpu = torch.device(cfg["device"]).type == "cpu"
    fixed_mmap = cpu and not cfg["malloc_default"] and common.fixed_mmap_threshold(MMAP_THRESHOLD)
    case = Case(cfg)
    if case.device.type == "cuda":
        case.backward(case.forward())  # cuBLAS handles and workspaces belong to the baseline
        torch.cuda.synchronize(case.device)
        torch.cuda.reset_peak_memory_stats(case.device)
        base = torch.cuda.memory_allocated(case.device) / 2**20
    else:
        # page in the autograd engine, LAPACK and kernels on a tiny problem, so the delta is the configuration's
        tiny = dict(cfg["shape"], B=1, N=min(16, cfg["shape"]["N"]))
        t_dict, t_q, t_v, t_w = make_inputs(tiny, case.device, case.dtype, cfg["seed"])
        (code(t_dict, t_q, t_v, cfg, steps=2)[0] * t_w).sum().backward()
        del t_dict, t_q, t_v, t_w
        gc.collect()
    if case.device.type == "cuda":
        case.backward(case.forward())
        torch.cuda.synchronize(case.device)
        peak = torch.cuda.max_memory_allocated(case.device) / 2**20
        out = {"memory_source": "torch.cuda.max_memory_allocated"}
    else:
        with common.PeakRSS() as rss:
            case.backward(case.forward())
        base, peak = rss.base_mib, rss.peak_mib
        out = {"memory_source": rss.source, "malloc_fixed_mmap_threshold": fixed_mmap}
    return {"peak_mib": peak, "baseline_mib": base, "peak_delta_mib": peak - base, **out,
            "grads_reach_queries_and_values": case.grads_ok()}


def timed_round(case: Case) -> tuple[float, float, float, float]:
    """One forward and one backward: (wall forward, wall backward, CPU forward, CPU backward) seconds."""
    c0 = time.process_time()
    loss, tf = common.timed(case.forward, case.device)
    c1 = time.process_time()
    _, tb = common.timed(lambda: case.backward(loss), case.device)
    return tf, tb, c1 - c0, time.process_time() - c1


def measure_time(cfg: dict) -> dict:
    """Median forward and backward time (wall clock, device-synchronized, and process CPU time)."""
    set_threads(cfg["threads"])
    case = Case(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", vd.ConvergenceWarning)  # float32 adjoints: recorded below instead
        case.backward(case.forward())  # untimed warm-up
        fwd, bwd, fwd_cpu, bwd_cpu = zip(*(timed_round(case) for _ in range(cfg["repeats"])))
    out = {
        "forward_s": common.median(fwd),
        "backward_s": common.median(bwd),
        "forward_all_s": list(fwd),
        "backward_all_s": list(bwd),
        "forward_cpu_s": common.median(fwd_cpu),
        "backward_cpu_s": common.median(bwd_cpu),
        "forward_residual_max": case.forward_residual(),
    }
    adj = case.adjoint_stats()
    if adj is not None:
        out["adjoint"] = adj
    return out


def compare_interleaved(args, device: torch.device) -> dict:
    """Issue 11's side-by-side timing: unroll and implicit (each adjoint of --compare-adjoints) at
    K = --time-steps and --total-steps, interleaved rounds (every variant once per round; round 0
    untimed), medians of forward, backward and their per-round sum."""
    names = [("unroll", None)] + [("implicit", a) for a in args.compare_adjoints]
    cases = {}
    for steps in sorted({args.time_steps, args.total_steps}):
        for mode, adjoint in names:
            cfg = config(args, device, mode, args.compare_solver, steps, **({"adjoint": adjoint} if adjoint else {}))
            cases[(steps, mode if adjoint is None else f"implicit_{adjoint}")] = Case(cfg)
    times = {key: [] for key in cases}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", vd.ConvergenceWarning)  # adjoint convergence is recorded instead
        for round_ in range(args.compare_repeats + 1):
            for key, case in cases.items():
                t = timed_round(case)
                if round_:
                    times[key].append(t)
    rows = []
    for (steps, name), case in cases.items():
        fwd, bwd, fwd_cpu, bwd_cpu = zip(*times[(steps, name)])
        rows.append({"variant": name, "steps": steps, "solver": args.compare_solver,
                     "forward_s": common.median(fwd), "backward_s": common.median(bwd),
                     "total_s": common.median([a + b for a, b in zip(fwd, bwd)]),
                     "forward_cpu_s": common.median(fwd_cpu), "backward_cpu_s": common.median(bwd_cpu),
                     "backward_all_s": list(bwd), "forward_all_s": list(fwd),
                     "forward_residual_max": case.forward_residual(), "adjoint": case.adjoint_stats()})
    return {"solver": args.compare_solver, "repeats": args.compare_repeats, "threads": torch.get_num_threads(),
            "adjoint_tol": ADJOINT_TOL, "adjoint_max_steps": args.timed_adjoint_max_steps,
            "adjoint_ridge": args.adjoint_ridge, "loss": "<w, z>",
            "order": "interleaved rounds: every variant's forward+backward once per round, round 0 untimed",
            "rows": rows}


# -- adjoint work at convergence ----------------------------------------------------------------


def exact_gradients(dictionary, q, v, wz, zstar, support):
    """Gradients of <wz, z*> with respect to q and v on the stable support S of z* (a reference
    independent of every adjoint solver): the lasso optimality conditions on S give

        z*_S = G_SS^{-1} (D_S^T v - lam sign(z*_S)),   z* = 0 off S,   G = D^T D,

    per problem and code column, and autograd differentiates that closed form (a batched dense
    solve with the off-support rows set to the identity)."""
    D = dictionary.atoms(q)  # (B, H, N, M)
    G = D.transpose(-1, -2) @ D
    b = D.transpose(-1, -2) @ v  # (B, H, M, C)
    m = support.to(D.dtype).transpose(-1, -2).unsqueeze(-1)  # (B, H, C, M, 1)
    A = m * G.unsqueeze(-3) * m.transpose(-1, -2) + torch.diag_embed(1 - m.squeeze(-1))
    rhs = m.squeeze(-1) * (b - LAM * torch.sign(zstar)).transpose(-1, -2)
    z = torch.linalg.solve(A, rhs).transpose(-1, -2)  # (B, H, M, C)
    return torch.autograd.grad((z * wz).sum(), (q, v))


def spectral_prediction(G, eta, support, tol):
    """Iterations the adjoint solves need on the support S of each code column, from the spectrum
    of eta G_SS (its eigenvalues lie in (0, 1]):

    fixed point u <- g + (I - eta G_SS) u contracts the error by rho = 1 - eta lambda_min each step,
    so it needs ln(tol) / ln(rho) steps; CG needs at most sqrt(kappa)/2 ln(2/tol) (kappa the
    condition number of G_SS), the classical bound. G (P, M, M), eta (P,), support (P, M, C).
    """
    with torch.no_grad():
        G = eta[:, None, None] * G
        m = support.to(G.dtype).transpose(1, 2).unsqueeze(-1)  # (P, C, M, 1)
        on = m.squeeze(-1)
        # off the support put trace(G_SS)/|S| (the mean eigenvalue, inside G_SS's spectrum) on the
        # diagonal, so the extreme eigenvalues of A are those of G_SS
        count = on.sum(-1)
        mean_ev = torch.where(count > 0, (on * G.diagonal(dim1=-2, dim2=-1)[:, None]).sum(-1) / count.clamp_min(1),
                              torch.ones_like(count))
        A = m * G[:, None] * m.transpose(-1, -2) + torch.diag_embed((1 - on) * mean_ev[..., None])
        ev = torch.linalg.eigvalsh(A)
        lo, hi = ev[..., 0].clamp_min(1e-300), ev[..., -1]
        fixed = math.log(tol) / torch.log1p(-lo).clamp_max(-1e-300)
        cg = 0.5 * torch.sqrt(hi / lo) * math.log(2 / tol)
        return {
            "eta_lambda_min_SS": {"min": lo.min().item(), "median": lo.median().item()},
            "kappa_SS": {"median": (hi / lo).median().item(), "max": (hi / lo).max().item()},
            "fixed_point_steps_predicted": {"median": fixed.median().item(), "max": fixed.max().item()},
            "cg_steps_bound": {"median": cg.median().item(), "max": cg.max().item()},
        }


def relative_error(got, ref) -> float:
    return ((got - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def adjoint_study(args, device: torch.device) -> dict:
    """Adjoint solves at a converged float64 forward, read from the public API only:
    ``vd.sparse_code(..., return_solution=True)`` and, after ``backward()``, ``sol.stats.adjoint``;
    the gradients are checked against :func:`exact_gradients`."""
    dtype, shape = torch.float64, args.shape
    dictionary, q, v, _ = make_inputs(shape, device, dtype, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    B, H, M, C = shape["B"], shape["H"], shape["M"], shape["C"]
    wz = torch.randn(B, H, M, C, generator=gen).to(device, dtype)  # cotangent on the codes

    def problem():
        return vd.SparseCoding(dictionary(q), v, LAM, check_finite=False)

    t0 = time.perf_counter()
    with torch.no_grad():
        ref = vd.solve(problem(), solver=args.adjoint_forward, max_steps=args.adjoint_forward_steps, tol=1e-8)
    forward_s = time.perf_counter() - t0
    if not bool(ref.converged.all()):
        raise RuntimeError(f"forward did not reach 1e-8 in {args.adjoint_forward_steps} steps; raise --adjoint-forward-steps")
    zstar = ref.z.detach()
    with torch.no_grad():
        support = problem().support(zstar)
    exact_q, exact_v = exact_gradients(dictionary, q, v, wz, zstar, support)
    with torch.no_grad():
        D = dictionary.atoms(q).reshape(-1, shape["N"], M)
        G = D.transpose(-1, -2) @ D
        eta = 1 / torch.linalg.eigvalsh(G)[:, -1]  # the "exact" step bound, L = ||D||_2^2
    out = {
        "dtype": "float64",
        "forward": {"solver": args.adjoint_forward, "tol": 1e-8, "steps_mean": ref.stats.steps.float().mean().item(),
                    "steps_max": int(ref.stats.steps.max()), "residual_max": ref.stats.residual.max().item(),
                    "seconds": forward_s},
        "adjoint_tol": ADJOINT_TOL,
        "adjoint_max_steps": args.adjoint_max_steps,
        "products_per_step": "1 batched Gram product per adjoint step for cg, fixed_point and anderson, plus 1 shared "
                             "product to find the active set, so sol.stats.adjoint.steps counts the work; direct "
                             "(and auto where it picks direct) reports 1 step: one batched Cholesky of the gathered "
                             "support Grams",
        "gradient_reference": "closed form z*_S = G_SS^-1 (D_S^T v - lam sign z*_S) on the support of z*, "
                              "differentiated by autograd (exact_gradients)",
        "methods": {},
    }
    for method in args.adjoints:
        prob = problem()
        # warm start at z*: the forward confirms the equilibrium and the implicit backward attaches there
        z, sol = vd.sparse_code(prob, solver=args.adjoint_forward, max_steps=10, tol=1e-8, z0=zstar,
                                return_solution=True,
                                backward=vd.Implicit(adjoint=method, tol=ADJOINT_TOL, max_steps=args.adjoint_max_steps,
                                                     on_unconverged="error"))
        q.grad = v.grad = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", vd.ConvergenceWarning)
            _, seconds = common.timed((z * wz).sum().backward, device)
        adj = sol.stats.adjoint
        out["methods"][method] = {
            "method": adj.method,
            "steps_mean": adj.steps.float().mean().item(),
            "steps_max": int(adj.steps.max()),
            "own_residual_max": adj.residual.max().item(),
            "own_residual_definition": OWN_RESIDUAL[adj.method],
            "converged": bool(adj.converged.all()),
            "converged_fraction": adj.converged.float().mean().item(),
            "grad_q_rel_error": relative_error(q.grad, exact_q),
            "grad_v_rel_error": relative_error(v.grad, exact_v),
            "backward_s": seconds,
            "warnings": [str(w.message) for w in caught],
        }
    out["support_fraction"] = support.double().mean().item()
    out["spectrum"] = spectral_prediction(G, eta, support.reshape(-1, M, C), ADJOINT_TOL)
    return out


# -- driver -------------------------------------------------------------------------------------


def config(args, device, mode, solver, steps, **extra):
    return {"mode": mode, "solver": solver, "steps": steps, "device": str(device), "dtype": "float32",
            "repeats": args.repeats, "seed": args.seed, "phantom_steps": args.phantom_steps, "tau": args.tau,
            "adjoint": args.sweep_adjoint, "adjoint_max_steps": args.timed_adjoint_max_steps,
            "adjoint_ridge": args.adjoint_ridge, "threads": args.threads, "malloc_default": args.malloc_default,
            "shape": args.shape, **extra}


def memory_of(cfg, device) -> dict:
    return common.run_forked(measure_memory, cfg) if device.type == "cpu" else measure_memory(cfg)


def describe(cfg) -> dict:
    implicit = cfg["mode"] == "implicit"
    return {**{k: cfg[k] for k in ("mode", "solver", "steps")},
            "adjoint_asked": cfg["adjoint"] if implicit else None,
            "adjoint_tol": cfg.get("adjoint_tol", ADJOINT_TOL) if implicit else None,
            "threads": torch.get_num_threads()}


def sweep(args, device: torch.device) -> tuple[list[dict], list[dict]]:
    cfgs = [config(args, device, mode, solver, steps)
            for solver in args.solvers for mode in MODES for steps in args.steps]
    rows = []
    print("peak memory (one forward+backward" + (", fresh process each):" if device.type == "cpu" else "):"))
    for cfg in cfgs:
        t0 = time.perf_counter()
        rows.append({**describe(cfg), **memory_of(cfg, device)})
        r = rows[-1]
        print(f"  {r['solver']:8s} {r['mode']:8s} steps={r['steps']:4d}  peak {r['peak_mib']:8.1f} MiB, "
              f"+{r['peak_delta_mib']:7.1f} above baseline  [{time.perf_counter() - t0:.1f} s]", flush=True)
    print(f"time (median of {args.repeats}):")
    # the time target at adjoint_tol 1e-6 is a choice: also show what looser CG solves cost
    variants = [describe(config(args, device, "implicit", solver, args.time_steps, adjoint="cg", adjoint_tol=t))
                for solver in args.solvers for t in args.variant_adjoint_tols]
    for row in rows + variants:
        t0 = time.perf_counter()
        extra = {"adjoint": row["adjoint_asked"], "adjoint_tol": row["adjoint_tol"]} if row["adjoint_tol"] else {}
        row.update(measure_time(config(args, device, row["mode"], row["solver"], row["steps"], **extra)))
        adj = row.get("adjoint")
        print(f"  {row['solver']:8s} {row['mode']:8s} steps={row['steps']:4d}"
              + (f" adjoint_tol={row['adjoint_tol']:.0e}" if adj else "")
              + f"  fwd {row['forward_s'] * 1e3:8.1f} ms  bwd {row['backward_s'] * 1e3:8.1f} ms"
              + (f"  ({adj['method']} {adj['steps_max']} steps)" if adj else "")
              + f"  [{time.perf_counter() - t0:.1f} s]", flush=True)
    return rows, variants


def find(rows, solver, mode, steps):
    for r in rows:
        if (r["solver"], r["mode"], r["steps"]) == (solver, mode, steps):
            return r
    return None


def time_targets(compare: dict, time_steps: int, total_steps: int) -> list[dict]:
    """Issue 11's ratios from the interleaved comparison, for every adjoint compared."""
    rows = {(r["variant"], r["steps"]): r for r in compare["rows"]}
    checks = []
    for variant in dict.fromkeys(name for name, _ in rows if name != "unroll"):
        for steps, key, what in ((time_steps, "backward_s", "backward"), (total_steps, "total_s", "forward+backward")):
            a, b = rows.get((variant, steps)), rows.get(("unroll", steps))
            if a is None or b is None:
                continue
            ratio = a[key] / b[key]
            adj = a["adjoint"]
            ran = f"{adj['method']}, {adj['steps_max']} steps max" if adj else "no adjoint stats"
            checks.append({
                "target": f"{variant} {what} time <= {TARGET_TIME_RATIO}x unrolled at K={steps} "
                          f"({compare['solver']}, adjoint_tol {ADJOINT_TOL:g}, interleaved)",
                "measured": f"{a[key] * 1e3:.1f} / {b[key] * 1e3:.1f} ms = {ratio:.3f}x ({ran}; {compare['threads']} "
                            f"thread{'s' if compare['threads'] != 1 else ''})",
                "variant": variant, "steps": steps, "value": ratio, "passed": ratio <= TARGET_TIME_RATIO,
            })
    return checks


def targets(rows, adj, compare, args) -> list[dict]:
    checks = []
    lo, hi = min(args.steps), max(args.steps)
    for solver in sorted({r["solver"] for r in rows}):
        a, b = find(rows, solver, "implicit", lo), find(rows, solver, "implicit", hi)
        if a and b and lo != hi and a["peak_delta_mib"] <= 0:
            checks.append({
                "target": f"implicit peak memory at {hi} steps <= {TARGET_MEM_RATIO}x that at {lo} steps ({solver})",
                "measured": f"not measurable: {a['peak_delta_mib']:.1f} MiB above baseline at {lo} steps "
                            f"({a['memory_source']})",
                "value": None, "passed": None,
            })
        elif a and b and lo != hi:
            ratio = b["peak_delta_mib"] / a["peak_delta_mib"]
            checks.append({
                "target": f"implicit peak memory at {hi} steps <= {TARGET_MEM_RATIO}x that at {lo} steps ({solver})",
                "measured": f"{b['peak_delta_mib']:.1f} / {a['peak_delta_mib']:.1f} MiB above baseline = {ratio:.3f}x "
                            f"(totals {b['peak_mib']:.1f} / {a['peak_mib']:.1f} MiB = {b['peak_mib'] / a['peak_mib']:.3f}x)",
                "value": ratio, "passed": ratio <= TARGET_MEM_RATIO,
            })
    checks += time_targets(compare, args.time_steps, args.total_steps)
    if adj and {"cg", "fixed_point"} <= set(adj["methods"]):
        cg, fp = adj["methods"]["cg"], adj["methods"]["fixed_point"]
        fp_count = (f"{fp['steps_max']}" if fp["converged"]
                    else f"> {fp['steps_max']} (capped, gradient error {fp['grad_q_rel_error']:.1e})")
        checks.append({
            "target": f"CG adjoint reaches {ADJOINT_TOL:g} in fewer Gram products than the fixed-point adjoint",
            "measured": f"cg {cg['steps_max']} steps (per problem mean {cg['steps_mean']:.1f}) vs fixed_point "
                        f"{fp_count} (per problem mean {fp['steps_mean']:.1f}); one Gram product per step, "
                        f"+1 shared product each",
            "value": cg["steps_max"] / fp["steps_max"],
            "passed": cg["converged"] and cg["steps_max"] < fp["steps_max"] and cg["steps_mean"] < fp["steps_mean"],
        })
    return checks


def plot(rows, variants, compare, path: Path, title: str) -> None:
    plt = common.pyplot()
    fig, (ax_m, ax_t, ax_c) = plt.subplots(1, 3, figsize=(16, 4.8))
    colors = {"implicit": "tab:blue", "unroll": "tab:red", "phantom": "tab:green"}
    styles = {"fista": "-", "ista": "-.", "anderson": "--"}
    markers = {"implicit": "s", "unroll": "o", "phantom": "^"}
    for solver in sorted({r["solver"] for r in rows}):
        for mode in MODES:
            sel = sorted((r for r in rows if r["solver"] == solver and r["mode"] == mode), key=lambda r: r["steps"])
            if not sel:
                continue
            xs = [r["steps"] for r in sel]
            # implicit and phantom can coincide in memory: distinct markers, implicit drawn on top
            kw = dict(color=colors[mode], ls=styles.get(solver, ":"), marker=markers[mode], label=f"{mode} ({solver})",
                      zorder=3 if mode == "implicit" else 2, mfc="none" if mode == "implicit" else None)
            ax_m.plot(xs, [r["peak_delta_mib"] for r in sel], **kw)
            ax_t.plot(xs, [r["backward_s"] * 1e3 for r in sel], **kw)
    for r, marker in zip(variants, "Dv<>ph"):
        ax_t.plot([r["steps"]], [r["backward_s"] * 1e3], marker=marker, ls="", color=colors["implicit"], mfc="none",
                  label=f"implicit ({r['solver']}), CG adjoint_tol {r['adjoint_tol']:g}")
    ax_m.set(xscale="log", yscale="log", xlabel="forward steps", ylabel="peak memory above baseline (MiB, log)",
             title="forward+backward peak memory")
    sweep_adjoint = next((r["adjoint_asked"] for r in rows if r["mode"] == "implicit"), None)
    ax_t.set(xscale="log", yscale="log", xlabel="forward steps", ylabel="backward time (ms, log)",
             title=f"backward time (median; implicit: {sweep_adjoint} to {ADJOINT_TOL:g})")
    # interleaved comparison: backward at the backward target's K, forward+backward at the total's
    groups = sorted({r["steps"] for r in compare["rows"]})
    names = list(dict.fromkeys(r["variant"] for r in compare["rows"]))
    by = {(r["variant"], r["steps"]): r for r in compare["rows"]}
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        for j, steps in enumerate(groups):
            r = by[(name, steps)]
            x = j + (i - (len(names) - 1) / 2) * width
            color = colors["unroll"] if name == "unroll" else ("tab:blue", "tab:purple", "tab:cyan", "tab:olive")[i % 4]
            bars = ax_c.bar([x], [r["total_s"] * 1e3], width, color=color, alpha=0.35,
                            label=f"{name}: forward+backward" if j == 0 else None)
            ax_c.bar([x], [r["backward_s"] * 1e3], width, color=color, label=f"{name}: backward" if j == 0 else None)
            common.label_bars(ax_c, bars, [f"{r['total_s'] * 1e3:.3g}"])
    ax_c.set_xticks(range(len(groups)), [f"K={k}" for k in groups])
    ax_c.set(yscale="log", ylabel="time (ms, log)",
             title=f"interleaved, {compare['solver']}, median of {compare['repeats']}")
    ax_c.legend(fontsize=7)
    for ax in (ax_m, ax_t):
        ax.grid(True, which="both", alpha=0.3)
    handles, labels = ax_t.get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(bottom=0.22)
    common.save_figure(fig, path)


def print_table(rows) -> None:
    head = (f"{'solver':8s} {'mode':8s} {'steps':>5s} {'peak MiB':>9s} {'+base MiB':>9s} {'fwd ms':>8s} "
            f"{'bwd ms':>8s} {'bwd cpu ms':>10s} {'adjoint tol/steps/res':>22s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        adj = r.get("adjoint")
        a = f"{r['adjoint_tol']:.0e} {adj['steps_max']:4d} {adj['residual_max']:.0e}" if adj else ""
        mem = f"{r['peak_mib']:9.1f} {r['peak_delta_mib']:9.1f}" if "peak_mib" in r else f"{'-':>9s} {'-':>9s}"
        print(f"{r['solver']:8s} {r['mode']:8s} {r['steps']:5d} {mem} "
              f"{r['forward_s'] * 1e3:8.1f} {r['backward_s'] * 1e3:8.1f} {r['backward_cpu_s'] * 1e3:10.1f} {a:>22s}")


def parse(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS), help="forward steps to sweep")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per configuration (after one untimed run)")
    p.add_argument("--solvers", nargs="+", default=["fista"], choices=["fista", "ista", "anderson"],
                   help="forward solvers of the sweep")
    p.add_argument("--sweep-adjoint", default="auto", choices=list(COMPARE_ADJOINTS),
                   help="the implicit backward's adjoint solve in the sweep")
    p.add_argument("--phantom-steps", type=int, default=1, help="k of the phantom gradient (1: Jacobian-free)")
    p.add_argument("--tau", type=float, default=1.0, help="damping of the phantom gradient")
    p.add_argument("--variant-adjoint-tols", type=float, nargs="*", default=[1e-4, 1e-3],
                   help="extra implicit runs at --time-steps with these CG tolerances (informational)")
    p.add_argument("--time-steps", type=int, default=TIME_STEPS,
                   help="forward steps K of the target: implicit backward <= 0.5x unrolled")
    p.add_argument("--total-steps", type=int, default=TOTAL_STEPS,
                   help="forward steps K of the target: implicit forward+backward <= 0.5x unrolled")
    p.add_argument("--compare-adjoints", nargs="+", default=list(COMPARE_ADJOINTS), choices=list(COMPARE_ADJOINTS),
                   help="implicit variants of the interleaved comparison with unroll")
    p.add_argument("--compare-solver", default="fista", choices=["fista", "ista"],
                   help="forward solver of the interleaved comparison (K fixed steps)")
    p.add_argument("--compare-repeats", type=int, default=5, help="timed rounds of the interleaved comparison")
    p.add_argument("--timed-adjoint-max-steps", type=int, default=vd.Implicit().max_steps,
                   help="cap of the implicit adjoint solves in the timed runs (vd.Implicit's default)")
    p.add_argument("--adjoint-ridge", type=float, default=0.0,
                   help="vd.Implicit(ridge=) of the timed runs (0: the exact support system)")
    p.add_argument("--adjoints", nargs="+", default=["direct", "auto", "cg", "fixed_point", "anderson"],
                   choices=list(vd.ADJOINTS), help="adjoint solves of the study at convergence")
    p.add_argument("--adjoint-max-steps", type=int, default=1000, help="cap of the converged adjoint solves")
    p.add_argument("--adjoint-forward", default="anderson", help="forward solver for the converged adjoint study")
    p.add_argument("--adjoint-forward-steps", type=int, default=3000)
    p.add_argument("--malloc-default", action="store_true",
                   help="CPU: measure RSS with glibc's default (dynamic) mmap threshold instead of a fixed 64 KiB one")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.shape = QUICK_SHAPE if args.quick else SHAPE
    if args.quick:  # problems of QUICK_SHAPE, steps 2 and 5, one repeat, no anderson adjoint
        args.steps, args.time_steps, args.total_steps, args.repeats = [2, 5], 2, 5, 1
        args.compare_repeats, args.adjoints = 1, ["direct", "auto", "cg", "fixed_point"]
        args.adjoint_max_steps, args.variant_adjoint_tols = 300, []
    if min(args.repeats, args.compare_repeats, *args.steps, args.time_steps, args.total_steps, args.threads) < 1:
        p.error("--repeats, --compare-repeats, --steps, --time-steps, --total-steps and --threads must be >= 1")
    args.steps = sorted(set(args.steps))
    return args


def main(argv=None) -> None:
    args = parse(argv)
    device, out_dir = common.setup(args)
    shape = args.shape
    print(f"device: {common.device_label(device)}; problems {shape}, lam={LAM}, float32, tol=None")
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    # the sweep first: its memory children are forked from the driver, and must not inherit the
    # heap the timed runs leave resident (their allocations would reuse it and show no growth)
    rows, variants = sweep(args, device)
    print(f"interleaved comparison ({args.compare_solver}, K = {args.time_steps}, {args.total_steps}; "
          f"{args.compare_repeats} rounds) ...", flush=True)
    compare = compare_interleaved(args, device)
    print("adjoint work at convergence (float64) ...", flush=True)
    adj = adjoint_study(args, device)
    checks = targets(rows, adj, compare, args)
    result = {
        "benchmark": "backward",
        "command": " ".join(["python", "benchmarks/bench_backward.py", *(argv if argv is not None else sys.argv[1:])]),
        "quick": args.quick,
        "environment": {**common.environment(device), "loadavg_1min_before_after": [load_before[0], os.getloadavg()[0]]},
        "setup": {**shape, "lam": LAM, "dtype": "float32", "tol": None, "repeats": args.repeats,
                  "phantom_steps": args.phantom_steps, "tau": args.tau,
                  "adjoint": f"vd.Implicit(adjoint={args.sweep_adjoint!r}, tol={ADJOINT_TOL:g}, "
                             f"max_steps={args.timed_adjoint_max_steps}, ridge={args.adjoint_ridge:g})",
                  "loss": "<w, z>, z = vd.sparse_code(SparseCoding(PerformerDictionary(q), v, lam), solver, "
                          "backward, max_steps=K, tol=None); q and v require grad",
                  "memory": ("peak RSS in a fresh (forked) process per configuration: VmHWM of /proc/self/status, "
                             "reset (clear_refs) after the baseline = VmRSS after imports, inputs and a tiny warm-up; "
                             "ru_maxrss figures kept as asked, but a child's ru_maxrss starts at its parent's resident "
                             "size (fork) or high-water mark (exec), so they understate deltas; glibc " +
                             ("default mmap threshold" if args.malloc_default else
                              f"mallopt(M_MMAP_THRESHOLD, {MMAP_THRESHOLD}): blocks >= 64 KiB are unmapped on free")
                             if device.type == "cpu" else
                             "torch.cuda.max_memory_allocated after reset_peak_memory_stats; baseline "
                             "memory_allocated after inputs and a full warm-up"),
                  "time": "in the driver process, default allocator: median of the repeats after one untimed run; "
                          "forward and backward timed separately (wall clock, device-synchronized; *_cpu_s: process "
                          "CPU time)"},
        "time_comparison": compare,
        "rows": rows,
        "implicit_adjoint_tol_variants": variants,
        "adjoint_study": adj,
        "targets": checks,
        "wall_s": time.perf_counter() - t0,
    }
    common.write_json(out_dir / "backward.json", result)
    plot(rows, variants, compare, out_dir / "backward.png",
         f"VARS-shaped lasso (B={shape['B']}, H={shape['H']}, N={shape['N']}, C={shape['C']}, M={shape['M']}, "
         f"float32) on {common.device_label(device)}")
    print()
    print_table(rows + variants)
    print()
    print(f"interleaved ({compare['solver']}, median of {compare['repeats']} rounds, {compare['threads']} threads):")
    for r in compare["rows"]:
        adj_row = r["adjoint"]
        print(f"  K={r['steps']:4d} {r['variant']:17s} fwd {r['forward_s'] * 1e3:8.1f} ms  bwd "
              f"{r['backward_s'] * 1e3:8.1f} ms  total {r['total_s'] * 1e3:8.1f} ms"
              + (f"  ({adj_row['method']}, {adj_row['steps_max']} steps, residual {adj_row['residual_max']:.0e})"
                 if adj_row else ""))
    print()
    spec = adj["spectrum"]
    print(f"adjoint at convergence (float64, support {adj['support_fraction']:.1%} of the codes, forward "
          f"{adj['forward']['steps_max']} steps of {adj['forward']['solver']}, cap {adj['adjoint_max_steps']}):")
    for name, m in adj["methods"].items():
        print(f"  {name:11s} steps mean {m['steps_mean']:7.1f} max {m['steps_max']:5d}  own residual "
              f"{m['own_residual_max']:.1e}  gradient error q {m['grad_q_rel_error']:.1e} v "
              f"{m['grad_v_rel_error']:.1e}  backward {m['backward_s'] * 1e3:.0f} ms")
    print(f"  spectrum of eta G_SS per column: lambda_min median {spec['eta_lambda_min_SS']['median']:.1e}, "
          f"min {spec['eta_lambda_min_SS']['min']:.1e}; kappa median {spec['kappa_SS']['median']:.0f}, "
          f"max {spec['kappa_SS']['max']:.0f}")
    print(f"  predicted steps to {ADJOINT_TOL:g}: fixed point median {spec['fixed_point_steps_predicted']['median']:.0f}, "
          f"max {spec['fixed_point_steps_predicted']['max']:.0f}; CG bound median {spec['cg_steps_bound']['median']:.0f}, "
          f"max {spec['cg_steps_bound']['max']:.0f}")
    print()
    print("targets:")
    for c in checks:
        print(f"  [{ {True: 'PASS', False: 'MISS', None: 'N/A'}[c['passed']] }] {c['target']}: {c['measured']}")
    print(f"\nwrote {out_dir / 'backward.json'} and backward.png ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
