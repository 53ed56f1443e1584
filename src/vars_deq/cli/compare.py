"""``vars-deq compare``: forward solvers side by side on captured VARS problems (library:
:mod:`vars_deq.compare`; figure: :func:`vars_deq.plots.plot_convergence`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from .common import add_runtime_options, checkpoint_or_default, setup_runtime

NAME = "compare"
HELP = "forward solvers side by side on captured VARS problems"
DESCRIPTION = ("Forward solvers side by side on the sparse-coding problems the VARS layers of a trained model "
               "solve on real images, plus synthetic suites: iterations and time to each relative-residual "
               "tolerance, fraction converged, energy gap; a table, compare.json and compare.png.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..compare import DEFAULT_SOLVERS, DEFAULT_TOLS
    from ..solvers import SOLVERS

    p.add_argument("--checkpoint", default=None,
                   help="a vars-deq training checkpoint (default: the shipped VARS-SD digits one)")
    p.add_argument("--images", default=None, help="image file or folder (default: the digits test split)")
    p.add_argument("--num-images", type=int, default=8, help="images to capture problems from")
    p.add_argument("--solvers", nargs="+", default=list(DEFAULT_SOLVERS), choices=sorted(SOLVERS), metavar="NAME",
                   help=f"from {', '.join(sorted(SOLVERS))}")
    p.add_argument("--tols", nargs="+", type=float, default=list(DEFAULT_TOLS), help="relative residuals")
    p.add_argument("--synthetic", nargs="*", type=float, default=[3.0],
                   help="log10 condition numbers of synthetic dense suites (none: skip)")
    p.add_argument("--deit", nargs="*", choices=("d", "sd"), default=["d", "sd"],
                   help="DeiT-Tiny-scale suites (N=196, C=64) with VARS-D / VARS-SD atoms (none: skip)")
    p.add_argument("--deit-images", type=int, default=2, help="images for the DeiT-scale suites (3 problems each)")
    p.add_argument("--layers", nargs="*", type=int, default=[-1],
                   help="which VARS layers' problems (default: the last; e.g. 0 1 2 3 for all)")
    p.add_argument("--max-steps", type=int, default=500)
    p.add_argument("--repeats", type=int, default=1, help="timed repeats per measurement (median)")
    p.add_argument("--output", default="compare_results", help="folder for compare.json and compare.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_runtime_options(p)


def run(args: argparse.Namespace) -> int:
    import math

    from tqdm.auto import tqdm

    from ..compare import (capture_problems, compare_solvers, deit_problems, format_table, mixed_batch,
                           per_problem_work, synthetic_problems, target_checks, write_json)
    from ..data import load_digits_split, load_images, model_input_size
    from ..devices import device_label
    from ..plots import plot_convergence
    from ..train.checkpoint import model_from_checkpoint

    if not args.tols or any(not (t > 0 and math.isfinite(t)) for t in args.tols):
        raise ValueError(f"--tols must be finite numbers > 0, got {args.tols}")
    for flag in ("num_images", "max_steps", "repeats"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    device = setup_runtime(args)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {str(out)!r} is a file; give a folder for compare.json and compare.png")
    ckpt_path = checkpoint_or_default(args.checkpoint)
    model, ckpt = model_from_checkpoint(ckpt_path)
    model = model.to(device)
    input_size = model_input_size(model)
    if args.images:
        images = load_images(args.images, input_size, args.num_images)
    else:
        images = load_digits_split()[1].tensors[0][: args.num_images]
    captured = capture_problems(model, images.to(device))
    n = len(captured)
    suites = {}
    for i in (args.layers if args.layers else range(n)):
        if not -n <= i < n:
            raise ValueError(f"--layers: the model has VARS layers 0..{n - 1} (or -{n}..-1), got {i}")
        suites[f"captured layer {i % n} ({ckpt['model_name']})"] = captured[i]
    for c in args.synthetic:
        suites[f"synthetic cond 1e{c:g}"] = synthetic_problems(c, device=device)
    if args.deit and args.deit_images < 1:
        raise ValueError(f"--deit-images must be >= 1, got {args.deit_images}")
    for kind in args.deit:
        suites[f"deit-tiny VARS-{kind.upper()} (N=196)"] = deit_problems(
            kind, load_digits_split()[1].tensors[0][: args.deit_images], device=device)
    results = {}
    with tqdm(total=len(suites) * len(args.solvers), desc="compare", unit="solver",
              disable=args.no_progress) as bar:
        for suite, prob in suites.items():
            bar.set_postfix_str(suite)
            results[suite] = compare_solvers(prob, args.solvers, args.tols, args.max_steps, args.repeats, bar)
    work = per_problem_work(mixed_batch(device))
    out.mkdir(parents=True, exist_ok=True)
    label = device_label(device)
    report_tol = 1e-4 if 1e-4 in args.tols else min(args.tols)
    payload = {
        "device": label,
        "checkpoint": str(ckpt_path),
        "num_images": int(images.shape[0]),
        "max_steps": args.max_steps,
        "energy_gap_tol": min(args.tols),
        "suites": {s: {"problems": p.num_problems, "N": p.num_tokens, "M": p.num_atoms, "C": p.num_channels}
                   for s, p in suites.items()},
        "results": results,
        "targets": {s: target_checks(r, report_tol) for s, r in results.items()},
        "per_problem_stopping": work,
    }
    write_json(payload, out / "compare.json")
    plot_convergence(results, out / "compare.png", f"vars-deq compare on {label}", tol=report_tol)
    print(format_table(results, report_tol))
    for suite, checks in payload["targets"].items():
        for ratio, why in checks["notes"].items():
            print(f"{suite}: {ratio} not reported: {why}")
    print(f"\nper-problem stopping on a mixed easy/hard batch (anderson, tol 1e-4): "
          f"{work['work_ratio']:.2f}x the Gram products and {work['time_ratio']:.2f}x the time of whole-batch stopping")
    print(f"wrote {out / 'compare.json'} and {out / 'compare.png'}")
    return 0
