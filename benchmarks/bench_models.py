"""Training throughput, peak memory and FLOPs of VARS DeiT-Tiny models against timm's DeiT-Tiny (issue 4).

Models (all DeiT-Tiny skeletons, 224 x 224, 1000 classes, random init):

- ``deit``: timm's own ``deit_tiny_patch16_224`` (self-attention; fused scaled_dot_product_attention
  when timm enables it, recorded as ``fused_attn``);
- ``performer``: ``performer_deit_tiny_patch16_224`` (Performer linear attention, the paper's DeiT*);
- ``vars_s``, ``vars_d``, ``vars_sd``: VARS attention with its defaults (5 ISTA steps, unrolled).

One training step is forward + cross-entropy + backward + AdamW step on a fixed random batch.
Per model: the median wall time of ``--steps`` steps after ``--warmup`` untimed ones (device
synchronized), images/s = batch / median, and the process CPU time per step (on a shared CPU
the wall clock includes other processes' load; CPU time does not).

Memory: on CPU each model runs in its own forked process (glibc with a fixed mmap threshold, so
freed tensors leave the RSS); the figure is the peak RSS (VmHWM) during the training steps minus
the RSS with the model, optimizer and batch built and nothing run. On CUDA:
torch.cuda.max_memory_allocated during the steps minus the memory allocated before them.

FLOPs per image: torch.utils.flop_counter.FlopCounterMode on a one-image forward. It counts
matrix products, convolutions and attention kernels (FLOPs = 2 x multiply-adds; papers quoting
"1.3 GFLOPs" for DeiT-Tiny count multiply-adds, so GMACs are reported too); FFTs, eigenvalue
solves and elementwise work are not counted, and timm's attention is counted unfused (the counter has
no formula for the fused CPU kernel). benchmarks/bench_flops.py covers every registered model.

    python benchmarks/bench_models.py                       # CUDA if available, else CPU
    python benchmarks/bench_models.py --device cpu --threads 1 --steps 3 --batch-size 32
    python benchmarks/bench_models.py --vars-kwargs lipschitz=gershgorin --name models_gershgorin
    python benchmarks/bench_models.py --quick       # deit and vars_sd, 64 x 64 images, batch 2, one step

Results: <out>/models.json and models.png (default out: benchmarks/results/<device>/); a table on stdout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import timm  # noqa: E402

import vars_deq.models  # noqa: E402,F401  (registers the VARS models)

MODELS = {
    "deit": "deit_tiny_patch16_224",
    "performer": "performer_deit_tiny_patch16_224",
    "vars_s": "vars_s_deit_tiny_patch16_224",
    "vars_d": "vars_d_deit_tiny_patch16_224",
    "vars_sd": "vars_sd_deit_tiny_patch16_224",
}
BASELINE = "deit"
QUICK_MODELS = (BASELINE, "vars_sd")
#: training throughput of each model against timm's DeiT-Tiny, same batch and threads (issue 12)
TARGETS = {"vars_sd": 0.45, "vars_d": 0.7}
MMAP_THRESHOLD = 65536


def build(name: str, device: torch.device, batch: int, img_size: int, vars_kwargs: dict, seed: int = 0):
    torch.manual_seed(seed)
    kwargs = vars_kwargs if name.startswith("vars_") else {}
    model = timm.create_model(MODELS[name], pretrained=False, img_size=img_size, **kwargs).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, img_size, img_size, generator=gen).to(device)
    y = torch.randint(0, model.num_classes, (batch,), generator=gen).to(device)
    return model, opt, x, y


def train_step(model, opt, x, y) -> None:
    loss = torch.nn.functional.cross_entropy(model(x), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def measure(cfg: dict[str, Any]) -> dict[str, Any]:
    """One model: timing, memory and FLOPs (runs in a forked child on CPU)."""
    device = torch.device(cfg["device"])
    if device.type == "cpu":
        torch.set_num_threads(cfg["threads"])
    model, opt, x, y = build(cfg["name"], device, cfg["batch"], cfg["img_size"], cfg["vars_kwargs"])
    attn = model.blocks[0].attn
    info: dict[str, Any] = {
        "model": MODELS[cfg["name"]],
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "attention": type(attn).__name__,
        "fused_attn": bool(getattr(attn, "fused_attn", False)),
    }
    gc.collect()
    if device.type == "cuda":
        common.sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
    rss = contextlib.nullcontext() if device.type == "cuda" else common.PeakRSS()
    wall, cpu = [], []
    with rss:
        for i in range(cfg["warmup"] + cfg["steps"]):
            c0 = time.process_time()
            _, t = common.timed(lambda: train_step(model, opt, x, y), device)
            if i >= cfg["warmup"]:
                wall.append(t)
                cpu.append(time.process_time() - c0)
    if device.type == "cuda":
        info["peak_mem_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        info["peak_mem_total_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
    else:
        info.update(peak_mem_mib=rss.delta_mib, peak_mem_total_mib=rss.peak_mib, memory_source=rss.source)
    step = common.median(wall)
    info.update(
        step_s=step,
        step_times_s=wall,
        images_per_s=cfg["batch"] / step,
        cpu_s_per_step=common.median(cpu),
        images_per_cpu_s=cfg["batch"] / common.median(cpu),
    )
    model.eval()
    image = torch.randn(1, 3, cfg["img_size"], cfg["img_size"], device=device)
    with torch.no_grad(), common.unfused_attention(model):
        flops, _ = common.count_flops(lambda: model(image))
    info.update(gflops_per_image=flops / 1e9, gmacs_per_image=flops / 2e9)
    if hasattr(attn, "last_stats"):
        backward = attn.vars.backward  # a vd.Implicit/Unroll/Phantom dataclass: its mode and fields
        info["solver"] = {"steps": float(attn.last_stats["steps"]),
                          "backward": {"name": backward.name, **dataclasses.asdict(backward)},
                          "lipschitz": attn.vars.lipschitz}
    return info


def _parse_value(text: str) -> Any:
    """KEY=VALUE values: int, float, True/False/None, else the string."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"True": True, "False": False, "None": None}.get(text, text)


def plot(results: dict[str, dict], path: Path, title: str) -> None:
    plt = common.pyplot()
    names = list(results)
    panels = [
        ("images_per_s", "training images / s (wall)"),
        ("images_per_cpu_s", "training images / CPU-s" if "cpu" in title else None),
        ("peak_mem_mib", "peak training memory (MiB)"),
        ("gflops_per_image", "forward GFLOPs / image (counted)"),
    ]
    panels = [p for p in panels if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    colors = ["#777777" if n == BASELINE else "#4c72b0" if n == "performer" else "#dd8452" for n in names]
    for ax, (key, label) in zip(axes, panels):
        vals = [results[n][key] for n in names]
        bars = ax.bar(names, vals, color=colors)
        base = results[BASELINE][key] if BASELINE in results else None
        common.label_bars(ax, bars, [f"{v:.3g}" + (f"\n{v / base:.2f}x" if base else "") for v in vals])
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
        ax.set_ylim(0, max(vals) * 1.25)
    fig.suptitle(title, fontsize=10)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3, help="timed training steps per model")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    ap.add_argument("--img-size", type=int, default=224)
    ap.add_argument("--models", nargs="*", default=None, choices=list(MODELS),
                    help=f"default all; --quick: {' '.join(QUICK_MODELS)}")
    ap.add_argument("--vars-kwargs", nargs="*", default=[], metavar="KEY=VALUE",
                    help="create_model keywords for the VARS models, e.g. lipschitz=gershgorin max_steps=3")
    ap.add_argument("--name", default="models", help="result file stem (models -> models.json, models.png)")
    args = ap.parse_args(argv)
    vars_kwargs = {}
    for item in args.vars_kwargs:
        key, sep, value = item.partition("=")
        if not sep:
            ap.error(f"--vars-kwargs takes KEY=VALUE, got {item!r}")
        vars_kwargs[key] = _parse_value(value)
    if args.models is None:
        args.models = list(QUICK_MODELS if args.quick else MODELS)
    if args.quick:
        args.batch_size, args.steps, args.warmup, args.img_size = 2, 1, 0, 64
    if args.batch_size < 1 or args.steps < 1 or args.warmup < 0 or args.threads < 1:
        ap.error("--batch-size, --steps and --threads must be >= 1, --warmup >= 0")
    device, out = common.setup(args)
    if device.type == "cpu":
        common.fixed_mmap_threshold(MMAP_THRESHOLD)

    results: dict[str, dict] = {}
    for name in args.models:
        cfg = {"name": name, "device": str(device), "batch": args.batch_size, "img_size": args.img_size,
               "steps": args.steps, "warmup": args.warmup, "threads": args.threads, "vars_kwargs": vars_kwargs}
        t0 = time.perf_counter()
        results[name] = common.run_forked(measure, cfg) if device.type == "cpu" else measure(cfg)
        if device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()
        r = results[name]
        print(f"  {name:10s} {r['images_per_s']:8.2f} img/s  ({time.perf_counter() - t0:.0f} s)", flush=True)

    ratios = {}
    if BASELINE in results:
        base = results[BASELINE]
        for name, r in results.items():
            ratios[name] = {
                "throughput": r["images_per_s"] / base["images_per_s"],
                "throughput_cpu_time": r["images_per_cpu_s"] / base["images_per_cpu_s"],
                "peak_mem": r["peak_mem_mib"] / base["peak_mem_mib"] if base["peak_mem_mib"] > 0 else None,
                "flops": r["gflops_per_image"] / base["gflops_per_image"],
            }
    summary = {
        "benchmark": "models",
        "quick": args.quick,
        "config": {**vars(args), "out": str(out), "models": args.models, "device": str(device)},
        "environment": common.environment(device),
        "results": results,
        "ratios_vs_deit": ratios,
        "targets": [{
            "what": f"{name} training throughput >= {target}x timm DeiT-Tiny on the same device",
            "ratio": ratios.get(name, {}).get("throughput"),
            "met": None if name not in ratios else ratios[name]["throughput"] >= target,
        } for name, target in TARGETS.items()],
    }
    common.write_json(out / f"{args.name}.json", summary)
    label = common.device_label(device)
    extra = f", VARS {vars_kwargs}" if vars_kwargs else ""
    plot(results, out / f"{args.name}.png", f"DeiT-Tiny skeletons, batch {args.batch_size}, {label}{extra}")

    head = (f"{'model':10s} {'img/s':>8s} {'x deit':>7s} {'img/CPU-s':>10s} {'x deit':>7s} {'peak MiB':>9s} "
            f"{'GFLOPs':>7s} {'GMACs':>6s} {'params M':>8s}")
    print(f"\n{label}, batch {args.batch_size}, {args.steps} timed steps{extra}")
    print(head)
    for name, r in results.items():
        q = ratios.get(name, {})
        print(f"{name:10s} {r['images_per_s']:8.2f} {q.get('throughput', float('nan')):7.2f} "
              f"{r['images_per_cpu_s']:10.2f} {q.get('throughput_cpu_time', float('nan')):7.2f} "
              f"{r['peak_mem_mib']:9.0f} {r['gflops_per_image']:7.2f} {r['gmacs_per_image']:6.2f} {r['params_m']:8.2f}")
    for t in summary["targets"]:
        if t["ratio"] is not None:
            print(f"target: {t['what']}: {t['ratio']:.2f}x ({'met' if t['met'] else 'NOT met'})")
    print(f"wrote {out / (args.name + '.json')} and {out / (args.name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
