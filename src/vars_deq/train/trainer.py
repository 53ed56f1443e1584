"""Supervised training of timm classifiers (VARS ViTs or any other), resumable to the step.

Reproducibility contract. With the same config, a run is a function of the seed:
- the model is initialized right after seeding python/numpy/torch with ``seed``;
- the data order of epoch e is the DistributedSampler permutation seeded with ``seed + e``
  (each rank takes its stride of it), so it does not depend on what ran before;
- a checkpoint stores model, optimizer, scheduler, grad scaler, the position (epoch, batches done
  in that epoch, global optimizer step), every rank's RNG states and the running epoch sums.
Resuming from a mid-epoch checkpoint skips exactly the batches already done in that epoch and
restores the RNG streams, so the resumed run takes the same optimizer steps on the same batches
as an uninterrupted one and ends with the same number of steps (and, on the CPU, the same weights).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..data import build_datasets, check_shift, model_input_size, random_shift
from ..equilibrium import ConvergenceWarning
from ..backward import UNCONVERGED_ADJOINTS, UNCONVERGED_BACKWARDS
from ..layers import SparseReconstruction, WarmStart, original_forward
from .checkpoint import (
    CheckpointError,
    atomic_write_bytes,
    check_same_model,
    load_checkpoint,
    load_model_weights,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .distributed import DEVICES, DistInfo, all_gather_objects, all_reduce_sum, init_distributed, shutdown_distributed
from .factory import LAYER_OPTIONS, apply_layer_options, create_model

__all__ = [
    "AMP_MODES",
    "SCHEDULERS",
    "FAULT_EXIT_ENV",
    "CHECKPOINT_NAME",
    "TrainConfig",
    "TrainingDiverged",
    "resume_path",
    "resolve_config",
    "train",
]

AMP_MODES = ("none", "bf16", "fp16")
SCHEDULERS = ("cosine", "tanh", "step", "multistep", "poly", "constant", "none")
CHECKPOINT_NAME = "checkpoint.pth"
# Fault injection for tests: after this many optimizer steps the process ends at once with
# os._exit (no cleanup, no flush), as a kill would, leaving only what was already on disk.
FAULT_EXIT_ENV = "VARS_DEQ_FAULT_EXIT_AFTER_STEP"
FAULT_EXIT_CODE = 86

# settings that belong to this process, not to the run: never taken from a checkpoint, and free
# to change on resume; every other setting shapes the optimizer steps and must stay as it was
_PER_PROCESS = ("resume", "progress", "device", "workers", "output", "checkpoint_every", "eval_batch_size")


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN/Inf; the message names the optimizer step."""


@dataclass
class TrainConfig:
    """Everything that defines a training run (the command line maps onto these fields).

    ``layer_options`` holds only the VARS layer options the user gave (backward, solver,
    max_steps, tol, lam); the model's own defaults stand for the rest. ``warm_start`` (opt-in): VARS
    layers that solve to a tol (the DEQ presets) start each training sample from its equilibrium of
    its previous visit (:class:`vars_deq.WarmStart`, saved in the checkpoints); fixed-step layers, the
    evaluation and DDP runs (whose ranks see different samples each epoch) always start cold: the
    equilibrium a solve to tol reaches still depends on its start (README, implicit training), and
    a test accuracy must be a function of the weights alone.
    ``shift``: each training image is translated by a random offset of up to that many pixels
    (:func:`vars_deq.data.random_shift`, drawn from the global RNG the checkpoints carry; 0: none).
    ``checkpoint_every`` adds mid-epoch checkpoints every N optimizer steps (0: only at epoch
    ends). ``resume`` is a checkpoint path, or "auto" for ``<output>/checkpoint.pth``.
    ``pretrain_epochs``: the first N epochs (their evaluations too) run every VARS layer as the
    original VARS code does (:func:`vars_deq.original_forward`: 5 ISTA steps, unrolled), then the
    configured layers take over: the shallow pretraining of deep-equilibrium models (Bai et al.,
    MDEQ, NeurIPS 2020). None: ``epochs * PRETRAIN_FRACTION`` (rounded down) where a VARS layer's
    backward assumes an equilibrium (implicit, phantom), else 0.
    """

    model: str = "vars_sd_digits"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    layer_options: dict[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    data_dir: str | None = None
    output: str = "runs/train"
    # 45 epochs at batch 32: on the digits, 3 seeds each, both the unrolled original and the DEQ train
    # better than at batch 64 or with 30 epochs (README, implicit training)
    epochs: int = 45
    batch_size: int = 32
    eval_batch_size: int = 256
    opt: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.05
    momentum: float = 0.9
    sched: str = "cosine"
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5
    clip_grad: float | None = None
    smoothing: float = 0.0
    shift: int = 0
    amp: str = "none"
    compile: bool = False
    device: str = "auto"
    seed: int = 0
    workers: int = 0
    checkpoint_every: int = 0
    resume: str | None = None
    progress: bool = True
    warm_start: bool = False
    pretrain_epochs: int | None = None

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_epochs", "workers", "checkpoint_every", "shift"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.pretrain_epochs is not None and not 0 <= int(self.pretrain_epochs) < int(self.epochs):
            raise ValueError(f"pretrain_epochs must be >= 0 and < epochs ({self.epochs}, so that the configured "
                             f"layers train), or None for the preset; got {self.pretrain_epochs}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.clip_grad is not None and not self.clip_grad > 0:
            raise ValueError(f"clip_grad must be > 0 (or None for no clipping), got {self.clip_grad}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {self.smoothing}")
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        if self.sched not in SCHEDULERS:
            raise ValueError(f"sched must be one of {SCHEDULERS}, got {self.sched!r}")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {self.device!r}")
        unknown = set(self.layer_options) - set(LAYER_OPTIONS)
        if unknown:
            raise ValueError(f"unknown VARS layer option(s) {sorted(unknown)}; valid: {list(LAYER_OPTIONS)}")


#: the preset share of a run's epochs that pretrains an equilibrium model unrolled
#: (TrainConfig.pretrain_epochs): 6 of the default 45. Measured on the digits VARS-SD DEQ (README,
#: implicit training): with 6 it reached 97% in 1.5-2.0x the unrolled original's time and met the
#: accuracy targets on all five seeds; without pretraining 1.4-2.6x and one seed below them, with 11
#: and 16 epochs one seed below them
PRETRAIN_FRACTION = 0.15


def resolve_pretrain_epochs(cfg: TrainConfig, layers: list[SparseReconstruction]) -> int:
    """The run's pretraining epochs: as given, or the preset (TrainConfig.pretrain_epochs)."""
    if cfg.pretrain_epochs is not None:
        if cfg.pretrain_epochs and not layers:
            raise ValueError(f"model {cfg.model!r} has no VARS (SparseReconstruction) layers, so "
                             f"--pretrain-epochs {cfg.pretrain_epochs} cannot apply to it")
        return int(cfg.pretrain_epochs)
    equilibrium = any(m.backward.name != "unroll" for m in layers)
    return int(cfg.epochs * PRETRAIN_FRACTION) if equilibrium else 0


_ACCUM_HEAD = 7  # the whole-model sums of Trainer.accum before the per-layer ones
_LAYER_STATS = ("steps", "residual", "converged")  # each VARS layer's sums after them, in this order


def resume_path(output: str | os.PathLike, resume: str) -> Path:
    """The checkpoint ``resume`` names: ``"auto"`` is ``<output>/checkpoint.pth``."""
    return Path(output) / CHECKPOINT_NAME if resume == "auto" else Path(resume)


def resolve_config(given: dict[str, Any]) -> TrainConfig:
    """The run's config: defaults overridden by ``given``, or, to resume, the checkpoint's settings.

    So ``--resume`` alone continues the run exactly as it was configured. Settings that shape
    the optimizer steps (model, data, optimizer, schedule, epochs, seed, VARS options, ...) are
    part of the resumed state (the optimizer and scheduler state carry the learning rate and
    schedule length), so giving a different value with ``--resume`` is an error rather than an
    override that would be silently ignored; per-process settings (device, workers, progress,
    checkpoint_every, eval_batch_size) may change.
    """
    unknown = set(given) - {f.name for f in fields(TrainConfig)}
    if unknown:
        raise ValueError(f"unknown training option(s) {sorted(unknown)}")
    merged = asdict(TrainConfig())
    if given.get("resume"):
        output = given.get("output")
        if output is None:
            output = str(Path(given["resume"]).parent) if given["resume"] != "auto" else merged["output"]
        path = resume_path(output, given["resume"])
        ckpt = load_checkpoint(path)
        check_same_model(ckpt, given.get("model", ckpt["model_name"]), given.get("model_kwargs", ckpt["model_kwargs"]),
                         path)
        saved = {k: v for k, v in ckpt["config"].items() if k in merged and k not in _PER_PROCESS}
        changed = [k for k, v in given.items() if k in saved and _normalized(v) != _normalized(saved[k])]
        if changed:
            desc = ", ".join(f"{k}={given[k]!r} (checkpoint: {saved[k]!r})" for k in changed)
            raise ValueError(
                f"cannot change {desc} when resuming {str(path)!r}: a resumed run continues with the settings it "
                "was started with; start a new run in another --output to change them"
            )
        merged.update(saved)
        merged["output"] = output
    merged.update(given)
    return TrainConfig(**merged)


def _normalized(v: Any) -> Any:
    # a checkpoint may hand tuples back as lists
    if isinstance(v, (list, tuple)):
        return [_normalized(x) for x in v]
    if isinstance(v, dict):
        return {k: _normalized(x) for k, x in v.items()}
    return v


def train(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) a run; returns the summary also written to ``<output>/summary.json``.

    Raises:
        ValueError: a bad option (named, with the valid choices).
        DataError: a missing or unreadable data directory.
        CheckpointError: a corrupt checkpoint, one from another model, or an existing run in
            ``output`` without ``resume``; nothing is written in these cases.
        TrainingDiverged: a NaN/Inf loss or gradient; the step is named, the last checkpoint kept.
    """
    config.validate()
    start = time.perf_counter()
    info = init_distributed(config.device)
    try:
        return _Trainer(config, info).run(start)
    finally:
        shutdown_distributed()


class _Trainer:
    def __init__(self, cfg: TrainConfig, info: DistInfo):
        self.cfg, self.info, self.device = cfg, info, info.device
        if cfg.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("amp 'fp16' needs CUDA; use 'bf16' on the CPU")
        self.out = Path(cfg.output)
        self.ckpt_path = self.out / CHECKPOINT_NAME
        ckpt = None
        if cfg.resume:
            src = resume_path(cfg.output, cfg.resume)
            ckpt = load_checkpoint(src)
            check_same_model(ckpt, cfg.model, cfg.model_kwargs, src)
        elif self.ckpt_path.exists():
            raise CheckpointError(
                f"{str(self.ckpt_path)!r} already exists: pass --resume to continue that run, or choose another --output"
            )
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"output {str(self.out)!r} exists and is not a directory")

        _seed_everything(cfg.seed)
        model = create_model(cfg.model, cfg.model_kwargs)
        apply_layer_options(model, cfg.model, cfg.layer_options)
        if ckpt is not None:
            load_model_weights(model, ckpt, src)
        # ranks share the initial weights but draw different dropout noise from here on
        _seed_everything(cfg.seed + info.rank)
        self.model = model.to(self.device)

        self.data = build_datasets(cfg.dataset, cfg.data_dir, model_input_size(model))
        check_shift(cfg.shift, self.data.input_size[1:])
        num_classes = getattr(model, "num_classes", self.data.num_classes)
        if num_classes != self.data.num_classes:
            raise ValueError(
                f"model {cfg.model!r} has {num_classes} classes but dataset {cfg.dataset!r} has "
                f"{self.data.num_classes}; pass --model-kwargs num_classes={self.data.num_classes}"
            )
        per_rank = math.ceil(len(self.data.train) / info.world_size)
        self.steps_per_epoch = math.ceil(per_rank / cfg.batch_size)

        from timm.optim import create_optimizer_v2
        from timm.scheduler import create_scheduler_v2

        self.optimizer = create_optimizer_v2(
            model, opt=cfg.opt, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.momentum
        )
        self.scheduler = None
        if cfg.sched != "none":
            self.scheduler, _ = create_scheduler_v2(
                self.optimizer, sched=cfg.sched, num_epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
                warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, step_on_epochs=False,
                updates_per_epoch=self.steps_per_epoch,
            )
        self.scaler = torch.amp.GradScaler("cuda") if cfg.amp == "fp16" else None

        self.epoch, self.step_in_epoch, self.global_step = 0, 0, 0
        self.last_convergence_warning = ""
        self.history: list[dict[str, Any]] = []
        self.vars_layers = [m for m in model.modules() if isinstance(m, SparseReconstruction)]
        self.pretrain_epochs = resolve_pretrain_epochs(cfg, self.vars_layers)
        # running epoch sums: loss * n, correct, n, then over steps with VARS layers: their mean
        # solver steps, such steps, their mean converged fraction, steps that warned of no convergence;
        # then per VARS layer: its steps, its largest residual, its converged fraction
        self.accum = torch.zeros(_ACCUM_HEAD + 3 * len(self.vars_layers), dtype=torch.float64)
        self.warm = None
        if cfg.warm_start and not info.distributed and any(m.tol is not None for m in self.vars_layers):
            self.warm = WarmStart(model, len(self.data.train))
        if ckpt is not None:
            self._restore(ckpt, str(src))

        self.ddp = model
        if info.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        if cfg.compile:
            # one graph per step shape; the weights, the checkpoint and the evaluation stay self.model's
            self.ddp = torch.compile(self.ddp)
        fault = os.environ.get(FAULT_EXIT_ENV, "")
        self.exit_after = int(fault) if fault else 0

    def _restore(self, ckpt: dict[str, Any], src: str) -> None:
        if ckpt["step_in_epoch"] and (
            ckpt.get("world_size") != self.info.world_size or ckpt.get("steps_per_epoch") != self.steps_per_epoch
        ):
            raise CheckpointError(
                f"checkpoint {src!r} was written mid-epoch with {ckpt.get('world_size')} process(es) and "
                f"{ckpt.get('steps_per_epoch')} steps per epoch; resume it with the same process count and batch size"
            )
        try:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scheduler is not None and ckpt.get("scheduler") is not None:
                self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None and ckpt.get("scaler") is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {src!r} has optimizer/scheduler state that does not fit: {e}") from e
        self.epoch, self.step_in_epoch = int(ckpt["epoch"]), int(ckpt["step_in_epoch"])
        self.global_step = int(ckpt["global_step"])
        self.history = list(ckpt.get("history", []))
        if self.info.is_main and ckpt.get("accum") is not None:
            saved = ckpt["accum"].to(torch.float64)
            self.accum[:saved.numel()] = saved[:self.accum.numel()]  # checkpoints before the per-layer sums
        if self.warm is not None and ckpt.get("warm_start") is not None:
            self.warm.load_state_dict(ckpt["warm_start"])
            self.warm.warm, self.warm.total = ckpt["warm_start"].get("counts", (0, 0))
        rngs = ckpt.get("rng") or []
        if self.info.rank < len(rngs):
            set_rng_state(rngs[self.info.rank])
        else:
            _seed_everything(self.cfg.seed + self.info.rank + 1000 * self.epoch)

    # ------------------------------------------------------------------ main loop

    def run(self, start: float) -> dict[str, Any]:
        cfg, info = self.cfg, self.info
        if info.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            self._write_metrics()
        for epoch in range(self.epoch, cfg.epochs):
            self.epoch = epoch
            pretrain = epoch < self.pretrain_epochs
            t0 = time.perf_counter()
            with original_forward() if pretrain else contextlib.nullcontext():
                self._train_epoch(epoch)
                totals = all_reduce_sum(self.accum.clone(), info)
                t_eval = time.perf_counter()
                test_loss, test_acc = self._evaluate()
                eval_s = time.perf_counter() - t_eval
            n = max(totals[2].item(), 1.0)
            record = {
                "epoch": epoch + 1,
                "global_step": self.global_step,
                "lr": self.optimizer.param_groups[0]["lr"],
                "train_loss": totals[0].item() / n,
                "train_acc": totals[1].item() / n,
                "test_loss": test_loss,
                "test_acc": test_acc,
                "solver_steps": totals[3].item() / totals[4].item() if totals[4] > 0 else None,
                "solver_converged": totals[5].item() / totals[4].item() if totals[4] > 0 else None,
                **self._per_layer_record(totals),
                "unconverged_warning_steps": int(totals[6].item()),
                "warm_started": self.warm.warm / self.warm.total if self.warm is not None and self.warm.total else None,
                "pretrain": pretrain,
                "epoch_time_s": time.perf_counter() - t0,
                "eval_time_s": eval_s,
            }
            if self.warm is not None:
                self.warm.reset_counts()
            if info.is_main and totals[6] > 0:
                print(f"epoch {epoch + 1}: {int(totals[6].item())} of {int(totals[4].item())} steps warned: "
                      f"{self.last_convergence_warning}", file=sys.stderr)
            self.history.append(record)
            self.accum.zero_()
            self.step_in_epoch = 0
            if info.is_main:
                self._write_metrics()
            self._save(epoch + 1, 0)
        return self._finish(time.perf_counter() - start)

    def _train_epoch(self, epoch: int) -> None:
        cfg, info = self.cfg, self.info
        sampler = DistributedSampler(
            self.data.train, num_replicas=info.world_size, rank=info.rank, shuffle=True, seed=cfg.seed,
            drop_last=False,
        )
        sampler.set_epoch(epoch)
        order = list(sampler)[self.step_in_epoch * cfg.batch_size:]
        # a private generator: creating the loader's iterator must not consume the global RNG, whose
        # stream a resumed run has to continue exactly
        loader = DataLoader(
            self.data.train, batch_size=cfg.batch_size, sampler=order, num_workers=cfg.workers,
            generator=torch.Generator().manual_seed(cfg.seed + epoch), pin_memory=self.device.type == "cuda",
        )
        self.ddp.train()
        bar = _progress(cfg.progress and info.is_main, self.steps_per_epoch, self.step_in_epoch,
                        f"epoch {epoch + 1}/{cfg.epochs}")
        others: dict[tuple, warnings.WarningMessage] = {}
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always", ConvergenceWarning)
                for i, (x, y) in enumerate(loader):
                    before = _unconverged_backwards()
                    ids = order[i * cfg.batch_size:(i + 1) * cfg.batch_size]
                    with self.warm.use(ids) if self.warm is not None else contextlib.nullcontext():
                        self._step(x, y, epoch)
                    self._count_convergence_warnings(caught, others, _unconverged_backwards() > before)
                    self._after_step(bar, epoch)
        finally:
            bar.close()
            # one line per epoch replaces a ConvergenceWarning per step; anything else is re-issued
            for w in others.values():
                warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)

    def _count_convergence_warnings(self, caught: list, others: dict, unconverged: bool) -> None:
        """``unconverged``: a backward of this step ran at an unconverged equilibrium (the library
        warns once per call site and counts the rest, so the count, not the warnings, says it)."""
        conv = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
        for w in caught:
            if not issubclass(w.category, ConvergenceWarning):
                others.setdefault((str(w.message), w.category, w.filename, w.lineno), w)
        if conv:
            self.last_convergence_warning = str(conv[-1].message)
        if unconverged or conv:
            self.accum[6] += 1
        caught.clear()

    def _after_step(self, bar, epoch: int) -> None:
        cfg, a = self.cfg, self.accum
        bar.update(1)
        post = {"loss": f"{a[0] / max(a[2], 1):.4f}", "acc": f"{a[1] / max(a[2], 1):.3f}"}
        if a[4] > 0:
            post["steps"] = f"{a[3] / a[4]:.2f}"
        post["lr"] = f"{self.optimizer.param_groups[0]['lr']:.2e}"
        bar.set_postfix(post, refresh=False)
        if (cfg.checkpoint_every and self.global_step % cfg.checkpoint_every == 0
                and self.step_in_epoch < self.steps_per_epoch):
            self._save(epoch, self.step_in_epoch)
        if self.exit_after and self.global_step >= self.exit_after:
            os._exit(FAULT_EXIT_CODE)

    def _step(self, x: torch.Tensor, y: torch.Tensor, epoch: int) -> None:
        cfg = self.cfg
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        x = random_shift(x, cfg.shift)
        with self._autocast():
            logits = self.ddp(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.smoothing)
        n = y.shape[0]
        local = torch.stack([
            loss.detach().double() * n,
            (logits.detach().argmax(-1) == y).sum().double(),
            torch.tensor(float(n), dtype=torch.float64, device=self.device),
            (~torch.isfinite(loss.detach())).double(),
        ])
        # the NaN flag is summed over ranks before backward, so every rank takes the same decision
        flagged = all_reduce_sum(local[3:].clone(), self.info).item()
        local = local.cpu()
        if flagged > 0:
            self._diverged("the loss is non-finite", epoch, self.global_step + 1)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        max_norm = cfg.clip_grad if cfg.clip_grad is not None else math.inf
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        # fp16 overflow is routine and the scaler skips that step; anywhere else it is divergence
        if self.scaler is None and not torch.isfinite(grad_norm):
            self._diverged("the gradient is non-finite", epoch, self.global_step + 1)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.global_step += 1
        self.step_in_epoch += 1
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.global_step)
        # one host copy for every layer's statistics (NaN rows: layers this step did not run)
        rows = [torch.stack([m.last_stats[k].float() for k in _LAYER_STATS]) if m.last_stats else None
                for m in self.vars_layers]
        device = next((r.device for r in rows if r is not None), torch.device("cpu"))
        nan = torch.full((len(_LAYER_STATS),), math.nan, device=device)
        per_layer = (torch.stack([nan if r is None else r for r in rows]).to("cpu", torch.float64) if rows
                     else torch.zeros(0, len(_LAYER_STATS), dtype=torch.float64))
        ran = per_layer[~per_layer[:, 0].isnan()]
        solver = [ran[:, 0].mean().item(), 1.0, ran[:, 2].mean().item()] if len(ran) else [0.0, 0.0, 0.0]
        self.accum[:6] += torch.tensor([*local[:3].tolist(), *solver], dtype=torch.float64)
        self.accum[_ACCUM_HEAD:] += per_layer.nan_to_num(0.0).flatten()

    def _per_layer_record(self, totals: torch.Tensor) -> dict[str, list[float] | None]:
        """Each VARS layer's forward over the epoch: mean steps, mean of the per-step largest
        residual, mean converged fraction (None without VARS layers or steps)."""
        n = totals[4].item()
        per = totals[_ACCUM_HEAD:].view(-1, 3) / n if n > 0 and self.vars_layers else None
        return {f"solver_{key}_per_layer": None if per is None else per[:, j].tolist()
                for j, key in enumerate(_LAYER_STATS)}

    def _diverged(self, what: str, epoch: int, step: int, taken: bool = False) -> None:
        kept = (f"the last good checkpoint {str(self.ckpt_path)!r} is kept unchanged" if self.ckpt_path.exists()
                else "no checkpoint had been written yet")
        where = (f"after optimizer step {step}" if taken
                 else f"at optimizer step {step} (epoch {epoch + 1}, batch {self.step_in_epoch + 1})")
        stop = "training stopped without saving it" if taken else "training stopped before taking that step"
        raise TrainingDiverged(f"{what} {where}; {stop}, and {kept}")

    def _autocast(self):
        if self.cfg.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.amp == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, float]:
        """Test loss and accuracy; each rank takes a stride of the test set, sums are all-reduced."""
        test: Dataset = self.data.test
        idx = list(range(self.info.rank, len(test), self.info.world_size))
        loader = DataLoader(test, batch_size=self.cfg.eval_batch_size, sampler=idx, num_workers=self.cfg.workers)
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            with self._autocast():
                logits = self.model(x)
            sums[0] += F.cross_entropy(logits.float(), y, reduction="sum").double()
            sums[1] += (logits.argmax(-1) == y).sum()
            sums[2] += y.shape[0]
        self.model.train()
        sums = all_reduce_sum(sums, self.info).cpu()
        return sums[0].item() / sums[2].item(), sums[1].item() / sums[2].item()

    # ------------------------------------------------------------------ files

    def _save(self, epoch: int, step_in_epoch: int) -> None:
        # collectives first: every rank must reach them, rank 0 alone writes
        accum = all_reduce_sum(self.accum.clone(), self.info)
        rngs = all_gather_objects(rng_state(), self.info)
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            self._diverged("a weight became non-finite", epoch, self.global_step, taken=True)
        if not self.info.is_main:
            return
        save_checkpoint(self.ckpt_path, {
            "model_name": self.cfg.model,
            "model_kwargs": dict(self.cfg.model_kwargs),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch,
            "step_in_epoch": step_in_epoch,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.info.world_size,
            "data_seed": self.cfg.seed,
            "rng": rngs,
            "accum": accum,
            "history": self.history,
            "config": asdict(self.cfg),
            "warm_start": None if self.warm is None else {**self.warm.state_dict(),
                                                          "counts": (self.warm.warm, self.warm.total)},
        })

    def _write_metrics(self) -> None:
        # rewritten whole from the history, which the checkpoint also holds, so after a resume the
        # file never keeps a line for an epoch the checkpoint does not know about
        lines = "".join(json.dumps(h) + "\n" for h in self.history)
        atomic_write_bytes(self.out / "metrics.jsonl", lines.encode())

    def _finish(self, elapsed: float) -> dict[str, Any]:
        hashes = all_gather_objects(_state_hash(self.model), self.info)
        summary = {
            "model": self.cfg.model,
            "model_kwargs": dict(self.cfg.model_kwargs),
            "layer_options": dict(self.cfg.layer_options),
            "epochs": self.cfg.epochs,
            "pretrain_epochs": self.pretrain_epochs,
            "global_step": self.global_step,
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.info.world_size,
            "final": self.history[-1] if self.history else None,
            "best_test_acc": max((h["test_acc"] for h in self.history), default=None),
            "time_s": elapsed,
            "param_sha256_per_rank": hashes,
            "checkpoint": str(self.ckpt_path),
        }
        if self.info.is_main:
            if self.history:
                from .plots import describe_layers, plot_curves

                plot_curves(self.history, self.out / "curves.png", title=self.cfg.model,
                            layers=describe_layers(self.model), num_classes=self.data.num_classes)
            atomic_write_bytes(self.out / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
        return summary


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _state_hash(model: nn.Module) -> str:
    """SHA-256 of the weights and buffers, to check that all ranks hold the same model."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _unconverged_backwards() -> int:
    return sum(UNCONVERGED_BACKWARDS.values()) + sum(UNCONVERGED_ADJOINTS.values())


def _progress(enabled: bool, total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)
