"""How the backward of the VARS layers shapes training: VARS-SD on the embedded digits.

Methods (every other setting is the library default: adamw 1e-3, cosine, 1 warm-up epoch, batch 64;
but no unrolled pretraining, so that every epoch trains with the method's own backward):

    unroll-5ista     backprop through the original code's forward, 5 ISTA steps (the unroll preset)
    unroll-fista     backprop through the DEQ forward preset (FISTA to relative residual 1e-2, <= 100 steps)
    implicit         the library's default for backward="implicit": the DEQ forward preset (FISTA to 1e-2,
                     <= 100 steps) and the "auto" adjoint (the direct solve, or CG first where its budget
                     covers the iterations CG needs)
    implicit-direct  implicit gradient (DEQ forward preset), adjoint by Cholesky on the support
    implicit-cg      the same with the adjoint by conjugate gradients on the active set
    phantom-5        phantom gradient (Geng et al. 2021): k = 5 undamped steps (tau = 1) from the equilibrium
    jfb              Jacobian-free backprop (Fung et al. 2022): phantom with k = 1

Per run (method x seed) the JSON keeps the per-epoch test accuracy, training time (the trainer's
epoch_time_s: the optimizer steps of the epoch and its test evaluation) and forward statistics, and the
peak memory of one training step. Peak memory: torch.profiler's CPU memory events (every allocation
and free of torch's CPU allocator, in time order) over one step (forward, cross-entropy, backward)
on the first 64 training images at the trained weights, after one unprofiled warm-up step; the peak
of the running sum is the most memory the step held above what was live before it (weights and
optimizer state are not counted; the gradients are, as they are allocated inside the step).

    python examples/implicit_study.py --seeds 3 --epochs 10 --jobs 2 [--threads 1] [--out PATH]
    python examples/implicit_study.py --quick    # 1 seed, 1 epoch, 80 training images (the test)

Writes PATH (default benchmarks/results/cpu/implicit_study.json, one record per method and seed)
and the figure next to it (.png: accuracy against epoch and against training time, peak memory per
method), and prints a table as mean +- std over seeds. Runs live under --runs; a run with a
summary.json there is reused (its record says "reused": its times are those of the run that trained it),
one with only a checkpoint is resumed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from vars_deq.layers.sparse_reconstruction import FORWARD_PRESETS

MODEL = "vars_sd_digits"
TARGET_ACC = 0.97
MEMORY_BATCH = 64
#: the batch of the published study (benchmarks/results/cpu/implicit_study.*), kept when the trainer's default moved to 32
BATCH_SIZE = 64
DEFAULT_OUT = "benchmarks/results/cpu/implicit_study.json"

#: method -> the VARS layer options of its training run (TrainConfig.layer_options)
METHODS: dict[str, dict[str, Any]] = {
    "unroll-5ista": {"backward": "unroll"},
    "unroll-fista": {"backward": "unroll", **FORWARD_PRESETS["implicit"]},
    "implicit": {"backward": "implicit"},
    "implicit-direct": {"backward": "implicit", "adjoint": "direct"},
    "implicit-cg": {"backward": "implicit", "adjoint": "cg"},
    "phantom-5": {"backward": "phantom", "phantom_steps": 5, "tau": 1.0},
    "jfb": {"backward": "phantom", "phantom_steps": 1},
}
#: --quick: the first QUICK_PER_CLASS training and QUICK_TEST_PER_CLASS test images of each class
QUICK_PER_CLASS, QUICK_TEST_PER_CLASS = 8, 4


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..S-1 per method (default 3)")
    ap.add_argument("--epochs", type=int, default=10, help="epochs per run (default 10)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per training (default 1)")
    ap.add_argument("--jobs", type=int, default=1, help="trainings run at once, each in its own process (default 1)")
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--method-seeds", nargs="+", default=[], metavar="METHOD=S",
                    help="fewer (or more) seeds for some methods, e.g. unroll-fista=1 (its epochs cost the most)")
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"the JSON; the PNG goes next to it (default {DEFAULT_OUT})")
    ap.add_argument("--runs", default="runs/implicit_study", help="the training runs' folder")
    ap.add_argument("--quick", action="store_true", help="1 seed, 1 epoch, an 80-image subset (a smoke test)")
    args = ap.parse_args(argv)
    for name in ("seeds", "epochs", "threads", "jobs"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.quick:
        args.seeds, args.epochs = 1, 1
    seeds = {m: args.seeds for m in args.methods}
    for item in args.method_seeds:
        method, _, count = item.partition("=")
        if method not in seeds or not count.isdigit() or int(count) < 1:
            raise SystemExit(f"--method-seeds entries must be METHOD=S with METHOD one of {args.methods} and S >= 1, "
                             f"got {item!r}")
        seeds[method] = int(count)
    runs = Path(args.runs) / ("quick" if args.quick else "full")
    data = _quick_data(runs / "data") if args.quick else None
    jobs = [
        {"method": m, "seed": s, "epochs": args.epochs, "threads": args.threads, "data_dir": data,
         "output": str(runs / m / f"seed{s}")}
        for m in args.methods for s in range(seeds[m])
    ]
    # longest first, so that the two-process schedule does not end on one long run
    jobs.sort(key=lambda j: (j["method"] != "unroll-fista", j["seed"]))
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    if args.jobs == 1:
        records = [run_one(j) for j in jobs]
    else:
        # spawned workers: a forked torch with live thread pools can deadlock
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            records = list(pool.map(run_one, jobs))
    records.sort(key=lambda r: (list(METHODS).index(r["method"]), r["seed"]))
    wall = time.perf_counter() - t0
    import torch

    result = {
        "benchmark": "implicit_study",
        "command": "python examples/implicit_study.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": {
            "device": f"cpu ({args.threads} thread(s) per training, {args.jobs} training(s) at once)",
            "torch": torch.__version__, "python": platform.python_version(),
            "loadavg_1min_before_after": [load_before, os.getloadavg()[0]],
        },
        "setup": {
            "model": MODEL, "epochs": args.epochs, "seeds": seeds,
            "data": (f"digits subset: the first {QUICK_PER_CLASS} training and {QUICK_TEST_PER_CLASS} test images "
                     "per class, as an image folder" if args.quick
                     else "scikit-learn digits (bundled), the library's 80/20 split"),
            "methods": {m: METHODS[m] for m in args.methods},
            "target_acc": TARGET_ACC,
            "time": "the trainer's epoch_time_s (optimizer steps of the epoch; evaluation excluded), cumulated",
            "memory": "peak of the running sum of torch.profiler CPU memory events over one training step "
                      f"(batch {MEMORY_BATCH}, trained weights, after a warm-up step), in bytes above the "
                      "memory live before the step",
        },
        "records": records,
        "table": summarize(records),
        "wall_s": wall,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(records, out.with_suffix(".png"), args.epochs)
    print(markdown(result["table"], args.epochs))
    print(f"wrote {out} and {out.with_suffix('.png')} in {wall:.0f} s")
    return 0


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (method, seed) run, or reuse a finished one, and measure one step's peak memory."""
    from vars_deq.devices import set_threads
    from vars_deq.train import TrainConfig, train

    set_threads(job["threads"])
    out = Path(job["output"])
    reused = (out / "summary.json").exists()
    if not reused:
        dataset = {"dataset": "imagefolder", "data_dir": job["data_dir"]} if job["data_dir"] else {}
        train(TrainConfig(model=MODEL, layer_options=dict(METHODS[job["method"]]), epochs=job["epochs"],
                          batch_size=BATCH_SIZE, seed=job["seed"], output=str(out), device="cpu", progress=False,
                          pretrain_epochs=0, resume="auto" if (out / "checkpoint.pth").exists() else None, **dataset))
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    elapsed, t = [], 0.0
    for h in history:
        t += h["epoch_time_s"]
        elapsed.append(t)
    acc = [h["test_acc"] for h in history]
    reached = next((elapsed[i] for i, a in enumerate(acc) if a >= TARGET_ACC), None)
    return {
        "method": job["method"], "seed": job["seed"], "layer_options": METHODS[job["method"]],
        "run": str(out), "reused": reused,
        "epoch": [h["epoch"] for h in history], "test_acc": acc, "train_acc": [h["train_acc"] for h in history],
        "epoch_time_s": [h["epoch_time_s"] for h in history], "train_time_s": elapsed,
        "solver_steps": [h["solver_steps"] for h in history],
        "solver_converged": [h["solver_converged"] for h in history],
        "best_acc": max(acc), "final_acc": acc[-1], "time_to_target_s": reached,
        "s_per_epoch": statistics.fmean(h["epoch_time_s"] for h in history),
        "peak_step_bytes": step_peak_bytes(out / "checkpoint.pth", job["data_dir"]),
    }


def step_peak_bytes(checkpoint: Path, data_dir: str | None) -> int:
    """Peak bytes torch's CPU allocator held above its starting level during one training step."""
    import torch
    from torch.nn import functional as F
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from vars_deq.data import build_datasets, model_input_size
    from vars_deq.train import model_from_checkpoint

    model, _ = model_from_checkpoint(checkpoint)
    model.train()
    data = build_datasets("imagefolder" if data_dir else "digits", data_dir, model_input_size(model))
    x, y = next(iter(torch.utils.data.DataLoader(data.train, batch_size=MEMORY_BATCH)))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()

    step()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per method: mean and std over seeds (std 0 for one seed)."""
    rows = []
    for method in dict.fromkeys(r["method"] for r in records):
        rs = [r for r in records if r["method"] == method]
        hit = [r["time_to_target_s"] for r in rs if r["time_to_target_s"] is not None]
        rows.append({
            "method": method, "seeds": len(rs),
            "best_acc": _stats([r["best_acc"] for r in rs]),
            "final_acc": _stats([r["final_acc"] for r in rs]),
            "time_to_target_s": _stats(hit) if hit else None,
            "reached_target": len(hit),
            "s_per_epoch": _stats([r["s_per_epoch"] for r in rs]),
            "peak_step_mib": _stats([r["peak_step_bytes"] / 2**20 for r in rs]),
            "final_solver_steps": _stats([r["solver_steps"][-1] for r in rs]),
            "final_solver_converged": _stats([r["solver_converged"][-1] for r in rs]),
        })
    return rows


def _stats(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0}


def markdown(rows: list[dict[str, Any]], epochs: int) -> str:
    def pm(s: dict[str, float], scale: float = 1.0, fmt: str = ".2f") -> str:
        return f"{scale * s['mean']:{fmt}} +- {scale * s['std']:{fmt}}"

    lines = [
        f"VARS-SD on digits, {epochs} epochs, mean +- std over the seeds; time: training only (evaluation excluded)",
        "",
        f"| method | best acc (%) | final acc (%) | time to {100 * TARGET_ACC:g}% (s) | s/epoch "
        "| peak step memory (MiB) | forward steps (last epoch) | converged (last epoch) | seeds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["time_to_target_s"] is None:
            reach = "never"
        else:
            reach = pm(r["time_to_target_s"], fmt=".0f")
            if r["reached_target"] < r["seeds"]:
                reach += f" ({r['reached_target']}/{r['seeds']} seeds)"
        lines.append(
            f"| {r['method']} | {pm(r['best_acc'], 100)} | {pm(r['final_acc'], 100)} | {reach} "
            f"| {pm(r['s_per_epoch'], fmt='.1f')} | {pm(r['peak_step_mib'], fmt='.1f')} "
            f"| {pm(r['final_solver_steps'], fmt='.1f')} | {pm(r['final_solver_converged'], fmt='.3f')} "
            f"| {r['seeds']} |")
    return "\n".join(lines)


def plot(records: list[dict[str, Any]], path: Path, epochs: int) -> None:
    """Accuracy against epoch (mean over seeds) and training time (each seed), peak memory per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    methods = list(dict.fromkeys(r["method"] for r in records))
    colors = {m: f"C{i}" for i, m in enumerate(methods)}
    styles = ["-", "--", "-.", ":"]
    fig, (ax_e, ax_t, ax_m) = plt.subplots(1, 3, figsize=(15, 4.4))
    for i, m in enumerate(methods):
        rs = [r for r in records if r["method"] == m]
        n = min(len(r["test_acc"]) for r in rs)
        mean = [statistics.fmean(r["test_acc"][k] for r in rs) for k in range(n)]
        lo = [min(r["test_acc"][k] for r in rs) for k in range(n)]
        hi = [max(r["test_acc"][k] for r in rs) for k in range(n)]
        ep = rs[0]["epoch"][:n]
        ls = styles[i % len(styles)]
        ax_e.plot(ep, mean, ls, marker="o", ms=3, color=colors[m], label=m)
        ax_e.fill_between(ep, lo, hi, color=colors[m], alpha=0.15)
        for j, r in enumerate(rs):
            ax_t.plot(r["train_time_s"], r["test_acc"], ls, marker="o", ms=2, lw=1, color=colors[m],
                      label=m if j == 0 else None)
    all_acc = [a for r in records for a in r["test_acc"]]
    bottom = max(0.0, math.floor(10 * min(all_acc)) / 10 - 0.05) if all_acc else 0.0
    for ax in (ax_e, ax_t):
        ax.axhline(TARGET_ACC, color="grey", ls=":", lw=1)
        ax.set_ylim(bottom, 1.0)
        ax.grid(alpha=0.3)
    ax_e.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_e.set(xlabel="epoch", ylabel="test accuracy", title="test accuracy (mean, band: min-max over seeds)",
             xlim=(0.5, epochs + 0.5))
    ax_t.set(xlabel="training time (s, evaluation excluded)", ylabel="test accuracy",
             title=f"against time (each seed; dotted: {100 * TARGET_ACC:g}%)", xlim=(0, None))
    ax_e.legend(fontsize=8)
    mem = [[r["peak_step_bytes"] / 2**20 for r in records if r["method"] == m] for m in methods]
    ax_m.bar(range(len(methods)), [statistics.fmean(v) for v in mem],
             yerr=[statistics.stdev(v) if len(v) > 1 else 0.0 for v in mem], color=[colors[m] for m in methods])
    ax_m.set_xticks(range(len(methods)), methods, rotation=30, ha="right", fontsize=8)
    ax_m.set(ylabel="MiB", title=f"peak memory of one training step (batch {MEMORY_BATCH})")
    ax_m.grid(alpha=0.3, axis="y")
    fig.suptitle(f"VARS-SD on digits: backward methods ({len({r['seed'] for r in records})} seed(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _quick_data(root: Path) -> str:
    from vars_deq.data import write_digits_folder

    return str(write_digits_folder(root, QUICK_PER_CLASS, QUICK_TEST_PER_CLASS))


if __name__ == "__main__":
    raise SystemExit(main())
