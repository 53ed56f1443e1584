"""FLOPs per image of every model vars_deq registers with timm, and of timm's DeiT-Tiny/-Small (issue 12).

Each model is built with ``timm.create_model`` (random init, eval mode) and one forward of one
image of its ``pretrained_cfg["input_size"]`` runs under ``torch.utils.flop_counter.FlopCounterMode``.

Counting convention:

- FlopCounterMode counts 2 FLOPs per multiply-add of a matrix product (mm, bmm, addmm, baddbmm,
  convolution, scaled-dot-product attention; einsum and matmul reach it through those), so
  GMACs = GFLOPs / 2 are reported too.
- It counts nothing else: FFTs, eigenvalue solves, elementwise work (exp, thresholds, norms,
  softmax, GELU), reductions. The JSON lists, per model, the aten ops that ran uncounted.
- It has no formula for the CPU kernel of fused scaled-dot-product attention, so timm's attention
  runs unfused (``fused_attn = False``) while counting: its q k^T and attention-times-v products count.
- The paper's figures (1.3 for DeiT* (the Performer DeiT-Tiny), 1.0 / 1.4 / 1.4 for VARS-S / -D
  / -SD Tiny) are quoted as "GFLOPs" but follow the usual vision-paper convention, where a "FLOP"
  is a multiply-add: they are compared with the counted GMACs.

    python benchmarks/bench_flops.py              # every registered model, timm's deit_{tiny,small}
    python benchmarks/bench_flops.py --quick      # the digits models and one tiny model

Results: <out>/flops.json and flops.png (default out: benchmarks/results/<device>/).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

import timm  # noqa: E402

TIMM_MODELS = ("deit_tiny_patch16_224", "deit_small_patch16_224")
QUICK_TINY = "vars_sd_deit_tiny_patch16_224"
#: the paper's "GFLOPs" per image (multiply-adds, by the vision-paper convention), Tiny models
PAPER_GMACS = {
    "performer_deit_tiny_patch16_224": 1.3,
    "vars_s_deit_tiny_patch16_224": 1.0,
    "vars_d_deit_tiny_patch16_224": 1.4,
    "vars_sd_deit_tiny_patch16_224": 1.4,
}


def registered_models() -> list[str]:
    """The timm names whose entry point lives in vars_deq.models (so a renamed or moved model file
    cannot drop a model from the count silently), whatever imported the package first."""
    import vars_deq.models  # noqa: F401  (registers the models)

    ours = sorted(n for n in timm.list_models() if timm.models.model_entrypoint(n).__module__.startswith("vars_deq."))
    if not ours:
        raise RuntimeError("importing vars_deq.models registered no timm model")
    return ours


def measure(name: str, device: torch.device) -> dict:
    """FLOPs of a one-image forward of ``name`` (eval mode, no grad)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).to(device).eval()
    size = tuple(model.pretrained_cfg["input_size"])
    image = torch.randn(1, *size, device=device)
    with torch.no_grad(), common.unfused_attention(model):
        flops, uncounted = common.count_flops(lambda: model(image))
    row = {
        "input_size": list(size),
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "gflops": flops / 1e9,
        "gmacs": flops / 2e9,
        "uncounted_ops": uncounted,
    }
    if name in PAPER_GMACS:
        row["paper_gflops_as_gmacs"] = PAPER_GMACS[name]
        row["counted_gmacs_over_paper"] = row["gmacs"] / PAPER_GMACS[name]
    return row


def plot(rows: dict[str, dict], path: Path, title: str) -> None:
    plt = common.pyplot()
    names = list(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.65 * len(names) + 2), 4.6))
    xs = range(len(names))
    counted = [rows[n]["gmacs"] for n in names]
    bars = ax.bar(xs, counted, color=["#777777" if n in TIMM_MODELS else "#dd8452" for n in names],
                  label="counted GMACs (FlopCounterMode FLOPs / 2)")
    common.label_bars(ax, bars, [f"{v:.3g}" for v in counted])
    paper = [(i, rows[n]["paper_gflops_as_gmacs"]) for i, n in enumerate(names) if "paper_gflops_as_gmacs" in rows[n]]
    if paper:
        ax.plot([i for i, _ in paper], [v for _, v in paper], "k_", markersize=22, markeredgewidth=2,
                label="paper's GFLOPs (multiply-adds)")
    ax.set_xticks(list(xs), names, rotation=40, ha="right", fontsize=7)
    ax.set_ylabel("GMACs per image (forward, batch 1)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(True, axis="y", which="both", alpha=0.3)
    common.save_figure(fig, path)


def main(argv=None) -> int:
    ap = common.parser(__doc__)
    ap.add_argument("--models", nargs="*", default=None, help="timm names (default: see above)")
    args = ap.parse_args(argv)
    device, out = common.setup(args)
    registered = registered_models()
    if args.models:
        names = args.models
    elif args.quick:
        names = [n for n in registered if n.endswith("_digits")] + [QUICK_TINY]
    else:
        names = list(TIMM_MODELS) + registered
    rows = {}
    for name in names:
        rows[name] = measure(name, device)
        r = rows[name]
        paper = f"  paper {r['paper_gflops_as_gmacs']:.1f}" if "paper_gflops_as_gmacs" in r else ""
        print(f"{name:34s} {r['gflops']:8.3f} GFLOPs {r['gmacs']:8.3f} GMACs {r['params_m']:6.2f} M params{paper}",
              flush=True)
    result = {
        "benchmark": "flops",
        "quick": args.quick,
        "environment": common.environment(device),
        "convention": ("torch.utils.flop_counter.FlopCounterMode on one forward at batch 1, eval mode, no grad: "
                       "2 FLOPs per multiply-add of the ops it has formulas for (counted_ops); gmacs = gflops / 2. "
                       "Uncounted: FFTs, eigenvalue solves, elementwise ops and reductions (uncounted_ops per model). "
                       "The paper's GFLOPs are multiply-adds (the usual vision-paper convention) and are compared "
                       "with gmacs."),
        "counted_ops": common.counted_ops(),
        "registered_models": registered,
        "models": rows,
    }
    common.write_json(out / "flops.json", result)
    plot(rows, out / "flops.png", f"forward GMACs per image, batch 1, counted by FlopCounterMode "
                                  f"({common.device_label(device)})")
    print(f"wrote {out / 'flops.json'} and flops.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
