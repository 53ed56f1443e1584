"""torch.compile of whole VARS models: training-step time eager against compiled, side by side.

The fixed-step forward (tol=None, the original's 5 ISTA steps) never synchronises with the host,
so inductor traces a whole model, VARS layers included, into one graph (no graph breaks; the
count is recorded). Per model, two copies with the same weights:

1. agreement, before any timing (else the benchmark stops): a float64 copy compiled against the
   float64 eager model, loss and every parameter gradient of one step to ``--exact-tol`` (1e-9)
   relative: the compiled graph computes the same function. Float32 cannot judge that: a code
   entry within rounding of its threshold may flip in or out of the support under any change of
   rounding, and the gradients then differ by far more than rounding (DeiT-Tiny VARS-D: compiled
   float32 4e-4 from float64 in one block's projection gradient, eager 5e-7; digits VARS-D at
   batch 64: both 1e-2). The float32 errors of compiled and eager against float64 are recorded,
   not judged;
2. timing: ``--steps`` training steps (forward, cross-entropy, backward; no optimizer, the same
   batch) alternating eager and compiled, after ``--warmup`` untimed ones; medians and the ratio.
   The first compiled call's time (tracing and code generation) is reported on its own.

    python benchmarks/bench_compile.py --device cpu --threads 1
    python benchmarks/bench_compile.py --models vars_sd --batch-size 4 --mode max-autotune-no-cudagraphs
    python benchmarks/bench_compile.py --device cuda --mode reduce-overhead      # CUDA graphs
    python benchmarks/bench_compile.py --quick     # the digits vars_sd model, batch 8, 2 steps

Results: <out>/compile.json and compile.png (default out: benchmarks/results/<device>/).
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import timm  # noqa: E402

import vars_deq.models  # noqa: E402,F401  (registers the VARS models)
from vars_deq.devices import has_cxx_compiler  # noqa: E402

MODELS = {
    "deit": ("deit_tiny_patch16_224", 224, 3),
    "vars_d": ("vars_d_deit_tiny_patch16_224", 224, 3),
    "vars_sd": ("vars_sd_deit_tiny_patch16_224", 224, 3),
    "vars_d_digits": ("vars_d_digits", 8, 1),
    "vars_sd_digits": ("vars_sd_digits", 8, 1),
}
DEFAULT_MODELS = ("deit", "vars_d", "vars_sd")
QUICK_MODELS = ("vars_sd_digits",)


def grads_of(model, x, y) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.detach().clone()
                           for n, p in model.named_parameters() if p.grad is not None}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def agreement(eager, x, y, args, device: torch.device) -> tuple[dict[str, float], float, Any]:
    """Float64 compiled against float64 eager (the judge), float32 compiled and eager against
    float64 (recorded, not judged); returns the report, the first float32 compiled call's time
    and the float32 compiled model."""
    import torch._dynamo

    ref = copy.deepcopy(eager).double()
    loss_r, grads_r = grads_of(ref, x.double(), y)
    torch._dynamo.reset()
    loss_x, grads_x = grads_of(torch.compile(copy.deepcopy(ref), mode=args.mode), x.double(), y)
    exact = max([rel(loss_x, loss_r)] + [rel(grads_x[n], r) for n, r in grads_r.items()])
    if not exact <= args.exact_tol:
        raise SystemExit(f"compiled and eager differ by {exact:.1e} relative in float64 (> {args.exact_tol:g}): "
                         "not timing different computations")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(copy.deepcopy(eager), mode=args.mode)
    (loss_c, grads_c), first = common.timed(lambda: grads_of(compiled, x, y), device)
    loss_e, grads_e = grads_of(eager, x, y)
    tensors = {"loss": (loss_c, loss_e, loss_r), **{n: (grads_c[n], grads_e[n], r) for n, r in grads_r.items()}}
    report = {"max_rel_diff_float64": exact, "max_rel_diff_loss_and_grads": 0.0,
              "max_rel_error_compiled": 0.0, "max_rel_error_eager": 0.0}
    for n, (c, e, r) in tensors.items():
        report["max_rel_diff_loss_and_grads"] = max(report["max_rel_diff_loss_and_grads"], rel(c, e))
        report["max_rel_error_compiled"] = max(report["max_rel_error_compiled"], rel(c.double(), r))
        report["max_rel_error_eager"] = max(report["max_rel_error_eager"], rel(e.double(), r))
    return report, first, compiled


def measure(name: str, args, device: torch.device) -> dict[str, Any]:
    import torch._dynamo

    registered, size, chans = MODELS[name]
    torch.manual_seed(0)
    eager = timm.create_model(registered, img_size=size).to(device).train()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(args.batch_size, chans, size, size, generator=gen).to(device)
    y = torch.randint(0, eager.num_classes, (args.batch_size,), generator=gen).to(device)
    t0 = time.perf_counter()
    report, first, compiled = agreement(eager, x, y, args, device)
    times = {"eager": [], "compiled": []}
    for i in range(args.warmup + args.steps):
        for label, model in (("eager", eager), ("compiled", compiled)):  # interleaved
            _, t = common.timed(lambda: grads_of(model, x, y), device)
            if i >= args.warmup:
                times[label].append(t)
    med = {k: common.median(v) for k, v in times.items()}
    breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    return {"model": registered, "img_size": size, "batch": args.batch_size, "mode": args.mode,
            "first_compiled_call_s": first, "setup_s": time.perf_counter() - t0,
            "graph_breaks": breaks, **report,
            "eager_step_s": med["eager"], "compiled_step_s": med["compiled"],
            "compiled_over_eager": med["compiled"] / med["eager"], "step_times_s": times}


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    plt = common.pyplot()
    names = list(results)
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * max(1, len(names)), 4))
    xs = range(len(names))
    ax.bar([i - 0.2 for i in xs], [1e3 * results[n]["eager_step_s"] for n in names], 0.4, label="eager")
    c = ax.bar([i + 0.2 for i in xs], [1e3 * results[n]["compiled_step_s"] for n in names], 0.4,
               label="torch.compile")
    common.label_bars(ax, c, [f"{results[n]['compiled_over_eager']:.2f}x" for n in names])
    ax.set_xticks(list(xs), names)
    ax.set(ylabel="ms per step (forward + backward), median", title=title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    common.save_figure(fig, path)


def main(argv=None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--models", nargs="+", choices=list(MODELS), default=None,
                    help=f"default {' '.join(DEFAULT_MODELS)}; --quick: {' '.join(QUICK_MODELS)}")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--mode", default="default", help="torch.compile mode (default, reduce-overhead, max-autotune, ...)")
    ap.add_argument("--exact-tol", type=float, default=1e-9,
                    help="largest relative difference of compiled and eager in float64 (default 1e-9)")
    args = ap.parse_args(argv)
    if args.models is None:
        args.models = list(QUICK_MODELS if args.quick else DEFAULT_MODELS)
    if args.quick:
        args.batch_size, args.steps, args.warmup = 8, 2, 0
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0:
        ap.error("--batch-size and --steps must be >= 1, --warmup >= 0")
    device, out = common.setup(args)
    results = {}
    skipped = None
    if device.type == "cpu" and not has_cxx_compiler():
        skipped = "no C++ compiler on this machine: inductor cannot generate CPU code"
        print(f"skipped: {skipped}")
    for name in [] if skipped else args.models:
        r = results[name] = measure(name, args, device)
        print(f"  {name:15s} eager {1e3 * r['eager_step_s']:8.1f} ms  compiled {1e3 * r['compiled_step_s']:8.1f} ms "
              f"= {r['compiled_over_eager']:.2f}x  (first call {r['first_compiled_call_s']:.0f} s, "
              f"{r['graph_breaks']} graph breaks; float64 compiled vs eager {r['max_rel_diff_float64']:.0e}; float32 "
              f"error vs float64: compiled {r['max_rel_error_compiled']:.1e}, eager {r['max_rel_error_eager']:.1e})", flush=True)
    label = common.device_label(device)
    common.write_json(out / "compile.json", {
        "benchmark": "compile", "quick": args.quick, "config": {**vars(args), "out": str(out), "device": str(device)},
        "environment": common.environment(device), "results": results, "skipped": skipped})
    plot(results, out / "compile.png", f"torch.compile, batch {args.batch_size}, {label}, mode {args.mode}")
    print(f"wrote {out / 'compile.json'} and {out / 'compile.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
