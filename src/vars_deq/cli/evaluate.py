"""``vars-deq evaluate``: clean, corruption and PGD accuracy of a training checkpoint."""

from __future__ import annotations

import argparse
import json

from .common import add_data_options, add_runtime_options, dataset_for, setup_runtime
from .layer_options import add_layer_options, layer_options

NAME = "evaluate"
HELP = "clean, corruption and PGD accuracy of a checkpoint"
DESCRIPTION = ("Evaluate a training checkpoint on the test split of its dataset (or another one): clean "
               "accuracy, accuracy under 9 corruptions at severities 1-5 (noise, blur, digital families) and "
               "under an L-inf PGD attack that differentiates through the configured VARS backward.")


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..eval.corruptions import CORRUPTIONS, SEVERITIES

    p.add_argument("--checkpoint", required=True, help="a checkpoint.pth written by vars-deq train")
    p.add_argument("--model", help="refuse the checkpoint unless it is of this model")
    add_data_options(p, "default: the dataset the checkpoint was trained on")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit", type=int, help="evaluate the first N test examples only")
    p.add_argument("--corruptions", nargs="*", choices=sorted(CORRUPTIONS), metavar="NAME",
                   help=f"subset of {', '.join(CORRUPTIONS)} (default all; no names: none)")
    p.add_argument("--severities", nargs="+", type=int, choices=SEVERITIES, default=list(SEVERITIES))
    p.add_argument("--pgd-eps", type=float, default=0.03, help="L-inf radius in [0, 1] pixel units (default 0.03)")
    p.add_argument("--pgd-steps", type=int, default=10)
    p.add_argument("--pgd-step-size", type=float, help="default 2.5 * eps / steps")
    p.add_argument("--no-pgd", action="store_true", help="skip the PGD attack")
    p.add_argument("--seed", type=int, default=0, help="seeds the corruptions' noise and PGD's random start")
    p.add_argument("--output", help="write the results as JSON to this file")
    p.add_argument("--no-progress", action="store_true")
    add_runtime_options(p)
    add_layer_options(p)


def run(args: argparse.Namespace) -> int:
    from ..data import build_datasets, model_input_size
    from ..eval.evaluate import evaluate_model, format_table
    from ..train.checkpoint import atomic_write_bytes, model_from_checkpoint

    device = setup_runtime(args)
    overrides = layer_options(args)
    model, ckpt = model_from_checkpoint(args.checkpoint, overrides, expect_model=args.model)
    trained = ckpt["config"]
    dataset = dataset_for(args) or trained.get("dataset", "digits")
    data_dir = args.data_dir if args.data_dir is not None else (
        trained.get("data_dir") if dataset == trained.get("dataset") else None)
    data = build_datasets(dataset, data_dir, model_input_size(model))
    result = evaluate_model(
        model, data.test,
        corruptions=args.corruptions, severities=args.severities,
        pgd_eps=None if args.no_pgd else args.pgd_eps, pgd_steps=args.pgd_steps, pgd_step_size=args.pgd_step_size,
        seed=args.seed, batch_size=args.batch_size, limit=args.limit, device=device,
        progress=not args.no_progress,
    )
    result = {
        "checkpoint": str(args.checkpoint),
        "model": ckpt["model_name"],
        "model_kwargs": dict(ckpt["model_kwargs"]),
        "layer_options": {**dict(trained.get("layer_options") or {}), **overrides},
        "dataset": dataset,
        **result,
    }
    print(f"{result['model']} ({args.checkpoint}) on {dataset} test split")
    print(format_table(result))
    if args.output:
        atomic_write_bytes(args.output, (json.dumps(result, indent=2) + "\n").encode())
        print(f"wrote {args.output}")
    return 0
