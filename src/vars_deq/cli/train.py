"""``vars-deq train``: train a (VARS) ViT classifier, with checkpoints, exact resume and DDP."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .common import EXIT_DIVERGED, add_data_options, add_threads_option, dataset_for
from .layer_options import add_layer_options, layer_options

NAME = "train"
HELP = "train a (VARS) ViT classifier"
DESCRIPTION = ("Train any timm-registered classifier, VARS models included, with checkpoints every epoch, "
               "exact resume and optional DDP (launch with torchrun --nproc_per_node N). Every option left "
               "unset takes the default shown, or, with --resume, the value the checkpointed run used.")

# command-line arguments that are not TrainConfig fields, or are mapped onto one by hand
_NOT_CONFIG = {"command", "run", "threads", "no_progress", "model_kwargs", "dataset"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..train.distributed import DEVICES
    from ..train.trainer import AMP_MODES, PRETRAIN_FRACTION, SCHEDULERS, TrainConfig

    d = TrainConfig()
    p.add_argument("--model", help=f"timm model name (default {d.model})")
    p.add_argument("--model-kwargs", nargs="+", metavar="KEY=VALUE", default=None,
                   help="keyword arguments for timm.create_model, values as Python literals")
    add_data_options(p, f"default {d.dataset} (scikit-learn's embedded 8x8 digits)")
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
    p.add_argument("--shift", type=int, metavar="PIXELS",
                   help="translate each training image by a random offset of up to PIXELS in each direction, "
                        f"zeros shifted in (default {d.shift}: no augmentation)")
    p.add_argument("--amp", choices=AMP_MODES, help="mixed precision: bf16 on CPU or CUDA, fp16 on CUDA with a "
                                                  f"gradient scaler (default {d.amp})")
    p.add_argument("--compile", action="store_const", const=True,
                   help="train through torch.compile (inductor): fixed-step VARS layers (the unroll preset) "
                        "trace whole; a forward with a tolerance synchronises and breaks the graph")
    # under torchrun each process takes the CUDA device of its local rank, so no cuda:N here
    p.add_argument("--device", choices=DEVICES, help=f"default {d.device}")
    p.add_argument("--seed", type=int, help=f"default {d.seed}")
    p.add_argument("--workers", type=int, help=f"data loader processes (default {d.workers})")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help="also checkpoint every N optimizer steps inside an epoch (default: epoch ends only)")
    p.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                   help="continue a run: from CHECKPOINT, or without a value from <output>/checkpoint.pth")
    p.add_argument("--no-progress", action="store_const", const=True, help="no progress bar")
    p.add_argument("--pretrain-epochs", type=int, metavar="N",
                   help="the first N epochs run the VARS layers as the original code does (5 ISTA steps, "
                        "unrolled), then the configured layers train: shallow pretraining of an equilibrium "
                        f"model (default: {PRETRAIN_FRACTION:g} of the epochs with an implicit or phantom "
                        "backward, else 0)")
    p.add_argument("--warm-start", dest="warm_start", action="store_const", const=True,
                   help="layers that solve to a tol start each training sample from its equilibrium of the "
                        "previous epoch (single process; default: every solve starts cold)")
    add_threads_option(p)
    add_layer_options(p)


def train_options(args: argparse.Namespace) -> dict[str, Any]:
    """The TrainConfig fields the user gave (unset options are left to the defaults or the resumed run)."""
    from ..train.factory import LAYER_OPTIONS, parse_model_kwargs
    from ..train.trainer import TrainConfig

    skip = _NOT_CONFIG | set(LAYER_OPTIONS)
    names = set(TrainConfig.__dataclass_fields__)
    given = {k: v for k, v in vars(args).items() if k not in skip and v is not None and k in names}
    if args.model_kwargs is not None:
        given["model_kwargs"] = parse_model_kwargs(args.model_kwargs)
    dataset = dataset_for(args)
    if dataset is not None:
        given["dataset"] = dataset
    layer = layer_options(args)
    if layer:
        given["layer_options"] = layer
    if args.no_progress:
        given["progress"] = False
    return given


def _default_threads() -> int:
    from ..devices import available_cpus

    # torchrun starts LOCAL_WORLD_SIZE processes on this machine: they share its CPUs
    return max(1, available_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def run(args: argparse.Namespace) -> int:
    from ..devices import select_device, set_threads
    from ..train.trainer import TrainingDiverged, resolve_config, train

    set_threads(args.threads if args.threads is not None else _default_threads())
    if args.device is not None:
        select_device(args.device)  # an unusable device fails here, worded as for every command
    config = resolve_config(train_options(args))
    try:
        summary = train(config)
    except TrainingDiverged as e:
        print(f"vars-deq train: training diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    if int(os.environ.get("RANK", "0")) == 0:
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
