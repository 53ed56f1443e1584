"""The ``vars-deq`` command line.

Each subcommand is one ``add_<name>_parser(subparsers)`` function that registers its parser and
sets ``run=<function(args) -> int>``; adding a subcommand means adding its function to
``COMMANDS``. Errors a user can fix (bad option, missing data, unusable checkpoint) end with one
line on stderr and exit status 2; a diverged training run exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

__all__ = ["COMMANDS", "build_parser", "main"]

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 1


# ---------------------------------------------------------------------------- shared options


def _add_layer_options(p: argparse.ArgumentParser) -> None:
    from .backward import BACKWARDS
    from .solvers import SOLVERS

    g = p.add_argument_group("VARS layers", "applied to every VARS layer of the model; unset ones keep the model's")
    g.add_argument("--backward", choices=BACKWARDS, help="gradient of the equilibrium")
    g.add_argument("--solver", choices=sorted(SOLVERS), metavar="NAME",
                   help=f"forward solver: {', '.join(sorted(SOLVERS))}")
    g.add_argument("--max-steps", type=int, help="solver iterations (upper bound when --tol is set)")
    g.add_argument("--tol", type=float, help="stop a problem once its fixed-point residual is below this")
    g.add_argument("--lam", type=float, help="sparsity weight lambda of the lasso energy")


def _layer_options(args: argparse.Namespace) -> dict[str, Any]:
    from .train.factory import LAYER_OPTIONS

    return {k: getattr(args, k) for k in LAYER_OPTIONS if getattr(args, k, None) is not None}


def _add_data_options(p: argparse.ArgumentParser, default_note: str) -> None:
    from .data import DATASETS

    p.add_argument("--dataset", choices=DATASETS,
                   help=f"{default_note}; with --data-dir alone: cifar10 if it holds cifar-10-batches-py, else imagefolder")
    p.add_argument("--data-dir", help="local ImageFolder root (train/ and val/ subfolders, or class folders) "
                                      "or the folder holding cifar-10-batches-py")


def _dataset_for(args: argparse.Namespace) -> str | None:
    if args.dataset is not None or args.data_dir is None:
        return args.dataset
    return "cifar10" if (Path(args.data_dir) / "cifar-10-batches-py").is_dir() else "imagefolder"


def _set_threads(n: int | None) -> None:
    if n is not None:
        if n < 1:
            raise ValueError(f"--threads must be >= 1, got {n}")
        import torch

        torch.set_num_threads(n)


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


# ---------------------------------------------------------------------------- train


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    from .train.trainer import AMP_MODES, SCHEDULERS, TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "train", help="train a (VARS) ViT classifier",
        description="Train any timm-registered classifier, VARS models included, with checkpoints every epoch, "
                    "exact resume and optional DDP (launch with torchrun --nproc_per_node N). Every option left "
                    "unset takes the default shown, or, with --resume, the value the checkpointed run used.",
    )
    p.add_argument("--model", help=f"timm model name (default {d.model})")
    p.add_argument("--model-kwargs", nargs="+", metavar="KEY=VALUE", default=None,
                   help="keyword arguments for timm.create_model, values as Python literals")
    _add_data_options(p, f"default {d.dataset} (scikit-learn's embedded 8x8 digits)")
    p.add_argument("--output", help=f"run directory for checkpoint.pth, metrics.jsonl, curves.png (default {d.output})")
    p.add_argument("--epochs", type=int, help=f"default {d.epochs}")
    p.add_argument("--batch-size", type=int, help=f"per process (default {d.batch_size})")
    p.add_argument("--eval-batch-size", type=int, help=f"default {d.eval_batch_size}")
    p.add_argument("--opt", help=f"timm optimizer name (default {d.opt})")
    p.add_argument("--lr", type=float, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--weight-decay", type=float, help=f"default {d.weight_decay}")
    p.add_argument("--momentum", type=float, help=f"for SGD-type optimizers (default {d.momentum})")
    p.add_argument("--sched", choices=SCHEDULERS, help=f"timm scheduler, stepped per update (default {d.sched})")
    p.add_argument("--warmup-epochs", type=int, help=f"default {d.warmup_epochs}")
    p.add_argument("--warmup-lr", type=float, help=f"default {d.warmup_lr}")
    p.add_argument("--min-lr", type=float, help=f"default {d.min_lr}")
    p.add_argument("--clip-grad", type=float, help="clip the gradient norm to this (default: no clipping)")
    p.add_argument("--smoothing", type=float, help=f"label smoothing (default {d.smoothing})")
    p.add_argument("--amp", choices=AMP_MODES, help="mixed precision: bf16 on CPU or CUDA, fp16 on CUDA with a "
                                                  f"gradient scaler (default {d.amp})")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), help=f"default {d.device}")
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--workers", type=int, help=f"data loader processes (default {d.workers})")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="also checkpoint every N optimizer steps inside an epoch (default: epoch ends only)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue a run: from CHECKPOINT, or without a value from <output>/checkpoint.pth")
    p.add_argument("--no-progress", action="store_const", const=True, help="no progress bar")
    p.add_argument("--threads", type=int, help="torch intra-op threads per process")
    _add_layer_options(p)
    p.set_defaults(run=run_train)


def _train_options(args: argparse.Namespace) -> dict[str, Any]:
    from .train.factory import parse_model_kwargs
    from .train.trainer import TrainConfig

    skip = {"command", "run", "threads", "no_progress", "model_kwargs", "dataset",
            "backward", "solver", "max_steps", "tol", "lam"}
    names = {f for f in TrainConfig.__dataclass_fields__}
    given = {k: v for k, v in vars(args).items() if k not in skip and v is not None and k in names}
    if args.model_kwargs is not None:
        given["model_kwargs"] = parse_model_kwargs(args.model_kwargs)
    dataset = _dataset_for(args)
    if dataset is not None:
        given["dataset"] = dataset
    layer = _layer_options(args)
    if layer:
        given["layer_options"] = layer
    if args.no_progress:
        given["progress"] = False
    return given


def run_train(args: argparse.Namespace) -> int:
    from .train.trainer import resolve_config, train

    _set_threads(args.threads)
    config = resolve_config(_train_options(args))
    summary = train(config)
    if _is_main_process():
        final = summary["final"] or {}
        acc = final.get("test_acc")
        print(
            f"{summary['model']}: {summary['global_step']} optimizer steps, "
            f"test accuracy {100 * acc:.2f}% (best {100 * summary['best_test_acc']:.2f}%)"
            if acc is not None else f"{summary['model']}: nothing left to train",
            f"in {summary['time_s']:.1f} s; wrote {Path(config.output)}/"
            "{checkpoint.pth, metrics.jsonl, curves.png, summary.json}",
        )
    return 0


# ---------------------------------------------------------------------------- evaluate


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    from .eval.corruptions import CORRUPTIONS, SEVERITIES

    p = sub.add_parser(
        "evaluate", help="clean, corruption and PGD accuracy of a checkpoint",
        description="Evaluate a training checkpoint on the test split of its dataset (or another one): clean "
                    "accuracy, accuracy under 9 corruptions at severities 1-5 (noise, blur, digital families) and "
                    "under an L-inf PGD attack that differentiates through the configured VARS backward.",
    )
    p.add_argument("--checkpoint", required=True, help="a checkpoint.pth written by vars-deq train")
    p.add_argument("--model", help="refuse the checkpoint unless it is of this model")
    _add_data_options(p, "default: the dataset the checkpoint was trained on")
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
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--output", help="write the results as JSON to this file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    _add_layer_options(p)
    p.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from .data import build_datasets, model_input_size
    from .eval.evaluate import evaluate_model, format_table
    from .train.checkpoint import atomic_write_bytes, model_from_checkpoint

    _set_threads(args.threads)
    overrides = _layer_options(args)
    model, ckpt = model_from_checkpoint(args.checkpoint, overrides, expect_model=args.model)
    trained = ckpt["config"]
    dataset = _dataset_for(args) or trained.get("dataset", "digits")
    data_dir = args.data_dir if args.data_dir is not None else (
        trained.get("data_dir") if dataset == trained.get("dataset") else None)
    data = build_datasets(dataset, data_dir, model_input_size(model))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but CUDA is not available")
    device = "cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu"
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


# ---------------------------------------------------------------------------- entry point

def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    from .compare import add_compare_parser as add

    add(sub)


def add_maps_parser(sub: argparse._SubParsersAction) -> None:
    from .maps_cli import add_maps_parser as add

    add(sub)


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_compare_parser,
    add_train_parser,
    add_evaluate_parser,
    add_maps_parser,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vars-deq", description="VARS attention as a deep-equilibrium layer.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .data import DataError
    from .train.checkpoint import CheckpointError
    from .train.trainer import TrainingDiverged

    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except TrainingDiverged as e:
        print(f"vars-deq {args.command}: training diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except (ValueError, DataError, CheckpointError) as e:
        print(f"vars-deq {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
