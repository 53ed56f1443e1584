"""One training step of the digits VARS-SD model by backward: the cost behind the training-time target.

The shipped VARS-SD digits checkpoint (vars_deq/assets) at batch ``--batch-size`` of the digits
training set, AdamW's zero_grad / forward / cross-entropy backward timed apart (median of
``--repeats`` interleaved rounds, each variant once per round, round 0 untimed), for

- ``unroll``: the original code (5 ISTA steps, backprop through them);
- ``implicit``: ``--backward implicit`` with every other option default (FISTA to 1e-2, the
  "auto" adjoint), started cold as every step of a run without ``--warm-start``;
- ``implicit_direct`` and ``implicit_cg``: the same with the adjoint named;
- ``implicit_warm``: the default implicit step started from the equilibrium of the same batch at the
  same weights (``vd.WarmStart``): the best case of a late epoch of ``--warm-start``, where the
  weights have nearly stopped moving.

Each row records the forward steps and the adjoint that ran, and the ratios to ``unroll``: the
training-time target asks for <= 2x the unrolled original's wall time to the same accuracy.

    python benchmarks/bench_train_step.py --device cpu --threads 1
    python benchmarks/bench_train_step.py --quick

Results: <out>/train_step.json and train_step.png (default out: benchmarks/results/<device>/).
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import vars_deq as vd  # noqa: E402
from vars_deq.data import load_digits_split  # noqa: E402
from vars_deq.train import apply_layer_options, model_from_checkpoint  # noqa: E402
from vars_deq.train.checkpoint import default_checkpoint  # noqa: E402

MODEL = "vars_sd_digits"
#: variant -> (VARS layer options given, warm-started)
VARIANTS = {
    "unroll": ({}, False),
    "implicit": ({"backward": "implicit"}, False),
    "implicit_direct": ({"backward": "implicit", "adjoint": "direct"}, False),
    "implicit_cg": ({"backward": "implicit", "adjoint": "cg"}, False),
    "implicit_warm": ({"backward": "implicit"}, True),
}


def build(device: torch.device, batch: int):
    base = model_from_checkpoint(default_checkpoint())[0].to(device).train()
    x, y = (t[:batch].to(device) for t in load_digits_split()[0].tensors)
    models, caches = {}, {}
    for name, (options, warm) in VARIANTS.items():
        m = copy.deepcopy(base)
        if options:
            apply_layer_options(m, MODEL, options)
        models[name] = (m, torch.optim.AdamW(m.parameters(), lr=0.0))  # lr 0: every round sees the same weights
        if warm:
            caches[name] = vd.WarmStart(m, batch)
            with caches[name].use(torch.arange(batch)), torch.no_grad():
                m(x)
    return models, caches, x, y


def step(model, opt, cache, x, y, device) -> tuple[float, float, float]:
    opt.zero_grad(set_to_none=True)
    ids = torch.arange(x.shape[0])
    with cache.use(ids) if cache is not None else contextlib.nullcontext():
        out, forward_s = common.timed(lambda: model(x), device)
        _, backward_s = common.timed(lambda: torch.nn.functional.cross_entropy(out, y).backward(), device)
    _, opt_s = common.timed(opt.step, device)
    return forward_s, backward_s, opt_s


def main(argv=None) -> int:
    ap = common.parser(__doc__, default_threads=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        ap.error("--batch-size and --repeats must be >= 1")
    device, out = common.setup(args)
    batch, repeats = (4, 1) if args.quick else (args.batch_size, args.repeats)
    warnings.simplefilter("ignore", vd.ConvergenceWarning)
    models, caches, x, y = build(device, batch)
    times = {name: {"forward": [], "backward": [], "optimizer": []} for name in VARIANTS}
    for r in range(repeats + 1):
        for name, (m, opt) in models.items():  # interleaved
            f, b, o = step(m, opt, caches.get(name), x, y, device)
            if r:
                times[name]["forward"].append(f)
                times[name]["backward"].append(b)
                times[name]["optimizer"].append(o)
    rows = {}
    for name, (m, _) in models.items():
        med = {k: common.median(v) for k, v in times[name].items()}
        layers = [layer for layer in m.modules() if isinstance(layer, vd.SparseReconstruction)]
        adjoints = sorted({layer.last_solution.stats.adjoint.method for layer in layers
                           if layer.last_solution.stats.adjoint is not None})
        rows[name] = {
            "layer_options": VARIANTS[name][0], "warm_start": VARIANTS[name][1],
            "forward_ms": 1e3 * med["forward"], "backward_ms": 1e3 * med["backward"],
            "optimizer_ms": 1e3 * med["optimizer"], "step_ms": 1e3 * sum(med.values()),
            "forward_steps_per_layer": [s["steps"] for s in vd.layer_stats(m)], "adjoint": adjoints,
            "all_s": times[name],
        }
    for name, row in rows.items():
        row["step_over_unroll"] = row["step_ms"] / rows["unroll"]["step_ms"]
        row["backward_over_unroll"] = row["backward_ms"] / rows["unroll"]["backward_ms"]
        print(f"{name:16s} forward {row['forward_ms']:7.1f}  backward {row['backward_ms']:7.1f}  optimizer "
              f"{row['optimizer_ms']:5.1f}  step {row['step_ms']:7.1f} ms ({row['step_over_unroll']:.2f}x unroll)  "
              f"steps {[round(s, 1) for s in row['forward_steps_per_layer']]}  adjoint {row['adjoint']}", flush=True)
    common.write_json(out / "train_step.json", {
        "benchmark": "train_step", "quick": args.quick, "environment": common.environment(device),
        "config": {"model": MODEL, "checkpoint": "shipped (vars_deq/assets/vars_sd_digits.pt)", "batch_size": batch,
                   "repeats": repeats, "order": "interleaved rounds, round 0 untimed", "lr": 0.0},
        "rows": rows,
    })
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    names = list(rows)
    bottom = [0.0] * len(names)
    for part in ("forward", "backward", "optimizer"):
        vals = [rows[n][f"{part}_ms"] for n in names]
        ax.bar(names, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, n in enumerate(names):
        ax.text(i, bottom[i], f"{rows[n]['step_over_unroll']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("ms per training step (median)")
    ax.set_title(f"{MODEL} training step, batch {batch} ({common.device_label(device)}, {args.threads} thread(s))")
    ax.tick_params(axis="x", labelsize=8)
    ax.legend()
    common.save_figure(fig, out / "train_step.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
