"""Options and steps that several subcommands share: data, device and threads, output files."""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

EXIT_USER_ERROR = 2
EXIT_DIVERGED = 1

DEVICE_HELP = "auto (CUDA when present), cpu, cuda or cuda:N (default %(default)s)"


def add_data_options(p: argparse.ArgumentParser, default_note: str) -> None:
    from ..data import DATASETS

    p.add_argument("--dataset", choices=DATASETS,
                   help=f"{default_note}; with --data-dir alone: cifar10 if it holds cifar-10-batches-py, else imagefolder")
    p.add_argument("--data-dir", help="local ImageFolder root (train/ and val/ subfolders, or class folders) "
                                      "or the folder holding cifar-10-batches-py")


def dataset_for(args: argparse.Namespace) -> str | None:
    if args.dataset is not None or args.data_dir is None:
        return args.dataset
    return "cifar10" if (Path(args.data_dir) / "cifar-10-batches-py").is_dir() else "imagefolder"


def add_runtime_options(p: argparse.ArgumentParser, device_default: str | None = "auto") -> None:
    """--device (any spec :func:`vars_deq.devices.select_device` takes) and --threads."""
    p.add_argument("--device", default=device_default, metavar="DEVICE", help=DEVICE_HELP)
    add_threads_option(p)


def add_threads_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch intra-op CPU threads (default: the CPUs this process may use, by its affinity "
                        "and cgroup quota)")


def setup_runtime(args: argparse.Namespace) -> torch.device:
    """Set the threads (validated) and return the device of ``--device``: done first by every run."""
    from ..devices import select_device, set_threads

    set_threads(args.threads)
    return select_device(args.device)


def check_output(path: str | os.PathLike, force: bool) -> Path:
    """The output path, refused when it exists and ``force`` is not set (before any work is done)."""
    out = Path(path)
    if out.is_dir():
        raise ValueError(f"--output {str(out)!r} is a directory; give a file name")
    if out.exists() and not force:
        raise ValueError(f"--output {str(out)!r} exists; pass --force to overwrite it")
    return out


def checkpoint_or_default(path: str | None) -> Path:
    from ..train.checkpoint import default_checkpoint

    return Path(path) if path else default_checkpoint()
