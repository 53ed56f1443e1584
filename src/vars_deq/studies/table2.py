"""The paper's robustness comparison in small: its Table 2, Figure 3 and Figure 6 on local data.

Shi et al., "Visual Attention Emerges from Recurrent Sparse Reconstruction", ICML 2022: on
ImageNet, DeiT* -> w/ VARS-SD takes ImageNet-C error from 67.0 to 62.5 and PGD accuracy from 11.9
to 13.4 (Table 2), with attention maps that stay stable under corruption (Figure 3), and an
ablation over the number of steps T and the sparsity lam (Figure 6). This study runs that
comparison on the embedded digits (default) or a local CIFAR-10 folder, one recipe for all rows:

    deit          self-attention (timm's Attention)                      DeiT
    performer     Performer linear attention                             DeiT*
    vars_s        VARS-S, the original's settings                        w/ VARS-S
    vars_d        VARS-D, the original's settings                        w/ VARS-D
    vars_sd       VARS-SD, the original's settings (5 ISTA steps, unrolled gradients)
    vars_sd_deq   VARS-SD as a converged equilibrium trained with implicit gradients
                  (the library's DEQ preset: FISTA to relative residual 1e-2, <= 100 steps)

Training: the library's recipe (AdamW lr 1e-3, weight decay 0.05, batch 64, 1 warm-up epoch,
cosine decay to 1e-5) for a fixed number of epochs; the cosine schedule ends every run on a
plateau, and each record keeps the spread of its last epochs' test accuracy to show it.

Evaluation of each (row, seed) on the test split:

- clean accuracy; corruption accuracy per family (noise, blur, digital; the weather family of
  ImageNet-C has no meaning on 8 x 8 digits) and its mean over severities 1-5;
- L-inf PGD at two radii with random starts on the first 200 test images, judged against steps: an example is robust when the
  model is right on every judged iterate of every attack. An iterative layer can mask its
  gradient, so each VARS model is attacked twice, with the gradients of its layers unrolled
  through the solver's steps and with their implicit gradient (the same forward, the backward
  swapped), and the stronger attack (the intersection of both) is reported;
- map stability (Figure 3 in numbers): the Pearson correlation of each test image's attention
  map (mean over layers) with that of its corrupted copy (gaussian noise, severity 3).

Figure 6 in small: corruption accuracy of VARS-SD against T in {1, 3, 5, 10, converged} (lam 0.3)
and against lam (T = 5), one trained model (seed 0) per setting; T = 5 and lam = 0.3 are the
vars_sd row's seed 0, "converged" is the vars_sd_deq row's seed 0.

Results: ``table2[_<dataset>].json`` (one record per model and seed, each with ``model`` and
``seed``), a PNG per table (``..._table.png``, ``..._pgd.png``, ``..._ablation.png``) and the
attention maps of every row on the same clean and corrupted images (``..._maps.png``).
"""

from __future__ import annotations

import copy
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

__all__ = ["ROWS", "StudyConfig", "run_study", "markdown"]

#: row -> (paper's name, registered model, VARS layer options of the run)
ROWS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "deit": ("DeiT", "deit_digits", {}),
    "performer": ("DeiT*", "performer_digits", {}),
    "vars_s": ("w/ VARS-S", "vars_s_digits", {}),
    "vars_d": ("w/ VARS-D", "vars_d_digits", {}),
    "vars_sd": ("w/ VARS-SD", "vars_sd_digits", {}),
    "vars_sd_deq": ("w/ VARS-SD (DEQ, implicit)", "vars_sd_digits", {"backward": "implicit"}),
}
VARS_ROWS = ("vars_s", "vars_d", "vars_sd", "vars_sd_deq")
#: Figure 6: ablation setting -> VARS-SD layer options (seed 0); None: a row's seed 0 serves
ABLATION_STEPS: dict[str, dict[str, Any] | None] = {
    "1": {"max_steps": 1}, "3": {"max_steps": 3}, "5": None, "10": {"max_steps": 10}, "converged": None}
ABLATION_LAMS: dict[str, dict[str, Any] | None] = {"0.1": {"lam": 0.1}, "0.3": None, "1.0": {"lam": 1.0}}
ABLATION_SOURCE = {("steps", "5"): "vars_sd", ("steps", "converged"): "vars_sd_deq", ("lam", "0.3"): "vars_sd"}
#: a CIFAR-10 run builds the same skeleton for 32 x 32 RGB: patches of 4 give the digits' 8 x 8 grid
CIFAR_MODEL_KWARGS = {"img_size": 32, "in_chans": 3, "patch_size": 4}
MAP_CORRUPTION = ("gaussian_noise", 3)
PLATEAU_EPOCHS = 5
#: the batch of the published Table 2 (benchmarks/results/cpu/table2.*), kept when the trainer's default moved to 32
BATCH_SIZE = 64
PGD_CHUNK = 50


@dataclass(frozen=True)
class StudyConfig:
    """Everything that defines a study run (the command line maps onto these fields)."""

    epochs: int = 30
    seeds: int = 3
    pgd_eps: tuple[float, ...] = (0.05, 0.1)
    pgd_steps: int = 20
    pgd_restarts: int = 1
    pgd_examples: int = 200
    rows: tuple[str, ...] = tuple(ROWS)
    ablation: bool = True
    dataset: str = "digits"
    data_dir: str | None = None
    runs: str = "runs/table2"
    results: str = "runs/table2"
    jobs: int = 2
    threads: int = 1
    quick: bool = False
    progress: bool = True

    def validate(self) -> None:
        for name in ("epochs", "seeds", "pgd_steps", "pgd_restarts", "pgd_examples", "jobs", "threads"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.pgd_eps or not all(0 < e <= 1 for e in self.pgd_eps):
            raise ValueError(f"pgd_eps must be one or more radii in (0, 1], got {list(self.pgd_eps)}")
        bad = [r for r in self.rows if r not in ROWS]
        if bad or not self.rows:
            raise ValueError(f"rows must be a non-empty subset of {list(ROWS)}, got {list(self.rows)}")
        if self.dataset not in ("digits", "cifar10"):
            raise ValueError(f"dataset must be one of ('digits', 'cifar10'), got {self.dataset!r}")
        if (self.dataset == "cifar10") != (self.data_dir is not None):
            raise ValueError("data_dir is required for dataset 'cifar10' and refused for 'digits'")
        if self.ablation and not {"vars_sd", "vars_sd_deq"} <= set(self.rows):
            raise ValueError("the ablation needs the rows 'vars_sd' and 'vars_sd_deq' (or turn the ablation off)")

    @property
    def stem(self) -> str:
        return "table2" + ("" if self.dataset == "digits" else f"_{self.dataset}") + ("_quick" if self.quick else "")


@dataclass(frozen=True)
class Job:
    """One training run and its evaluation."""

    model: str  # record key: a row, or "vars_sd@steps=1" for an ablation setting
    seed: int
    registered: str
    layer_options: dict[str, Any]
    output: str
    full_eval: bool  # PGD and map stability besides clean and corruption accuracy
    cfg: StudyConfig = field(repr=False)


def plan(cfg: StudyConfig) -> list[Job]:
    """Every run of the study, the longest first (so a pool of two does not end on one long run)."""
    root = Path(cfg.runs) / (cfg.dataset + ("_quick" if cfg.quick else ""))
    jobs = [Job(row, seed, ROWS[row][1], dict(ROWS[row][2]), str(root / row / f"seed{seed}"), True, cfg)
            for row in cfg.rows for seed in range(cfg.seeds)]
    if cfg.ablation:
        for axis, settings in (("steps", ABLATION_STEPS), ("lam", ABLATION_LAMS)):
            for value, options in settings.items():
                if options is not None:
                    key = f"vars_sd@{axis}={value}"
                    jobs.append(Job(key, 0, "vars_sd_digits", dict(options), str(root / key.replace("@", "_")),
                                    False, cfg))
    cost = {"vars_sd_deq": 6, "vars_s": 2, "vars_sd": 1.5}
    return sorted(jobs, key=lambda j: -cost.get(j.model, 1.0))


def _dataset(cfg: StudyConfig) -> dict[str, Any]:
    if cfg.dataset == "cifar10":
        return {"dataset": "cifar10", "data_dir": cfg.data_dir}
    if cfg.quick:
        from ..data import write_digits_folder

        return {"dataset": "imagefolder", "data_dir": str(write_digits_folder(Path(cfg.runs) / "quick_digits", 8, 4))}
    return {"dataset": "digits"}


def run_job(job: Job) -> dict[str, Any]:
    """Train one run (or reuse a finished one) and evaluate it: one record of the JSON."""
    import torch

    from ..devices import set_threads
    from ..train import TrainConfig, model_from_checkpoint, train

    cfg = job.cfg
    set_threads(cfg.threads)
    out = Path(job.output)
    data = _dataset(cfg)
    model_kwargs = dict(CIFAR_MODEL_KWARGS) if cfg.dataset == "cifar10" else {}
    reused = (out / "summary.json").exists()
    t0 = time.perf_counter()
    if not reused:
        train(TrainConfig(model=job.registered, model_kwargs=model_kwargs, layer_options=job.layer_options,
                          epochs=cfg.epochs, batch_size=BATCH_SIZE, seed=job.seed, output=str(out), device="cpu",
                          progress=False, pretrain_epochs=0,
                          resume="auto" if (out / "checkpoint.pth").exists() else None, **data))
    train_wall = time.perf_counter() - t0
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]
    acc = [h["test_acc"] for h in history]
    last = acc[-PLATEAU_EPOCHS:]
    record: dict[str, Any] = {
        "model": job.model, "seed": job.seed, "registered_model": job.registered,
        "layer_options": job.layer_options, "run": str(out), "reused": reused,
        "train": {"epochs": len(history), "best_acc": max(acc), "final_acc": acc[-1], "test_acc": acc,
                  "train_time_s": sum(h["epoch_time_s"] for h in history),
                  "wall_s": None if reused else train_wall,
                  f"last_{len(last)}_epochs_acc_range": max(last) - min(last),
                  "solver_steps_last_epoch": history[-1].get("solver_steps"),
                  "solver_converged_last_epoch": history[-1].get("solver_converged")},
    }
    t0 = time.perf_counter()
    model, _ = model_from_checkpoint(out / "checkpoint.pth")
    x, y = _test_tensors(model, data)
    with warnings.catch_warnings():
        from ..equilibrium import ConvergenceWarning

        warnings.simplefilter("ignore", ConvergenceWarning)  # summarized by the forward statistics instead
        record.update(_corruption_accuracy(model, x, y))
        if job.full_eval:
            record["pgd"] = {f"{eps:g}": _pgd(model, x, y, eps, cfg, job.seed) for eps in cfg.pgd_eps}
            record["map_stability"] = _map_stability(model, x)
    record["eval_s"] = time.perf_counter() - t0
    return record


def _test_tensors(model, data: dict[str, Any]):
    import torch

    from ..data import build_datasets, model_input_size

    test = build_datasets(data["dataset"], data.get("data_dir"), model_input_size(model)).test
    x, y = zip(*(test[i] for i in range(len(test))))
    return torch.stack(x), torch.as_tensor(y)


def _corruption_accuracy(model, x, y) -> dict[str, Any]:
    from torch.utils.data import TensorDataset

    from ..eval import evaluate_model

    res = evaluate_model(model, TensorDataset(x, y), pgd_eps=None, seed=0)
    return {k: res[k] for k in ("num_examples", "clean_acc", "corruption_mean", "families", "corruptions")}


def _gradient_sources(model, x) -> dict[str, Any]:
    """name -> a copy of ``model`` with the same weights and another backward for its VARS layers.

    ``unroll``: backprop through the layers' solver steps; an adaptive forward (tol set) is
    unrolled for a fixed number of steps, as many as it takes on the clean ``x`` (rounded up),
    since the stopping test itself has no gradient. ``implicit``: the implicit gradient at a
    converged equilibrium (the library's DEQ forward preset); for a layer trained as that
    equilibrium it is its own gradient, for a 5-step layer the gradient of the map it approximates.
    """
    import torch

    from .. import SparseReconstruction, Unroll
    from ..layers.sparse_reconstruction import PRESET, layer_stats

    layers = [m for m in model.modules() if isinstance(m, SparseReconstruction)]
    if not layers:
        return {"autograd": model}
    adaptive = any(layer.tol is not None for layer in layers)
    if adaptive:
        with torch.no_grad():
            model.eval()(x)
    steps = [math.ceil(s["steps"]) for s in layer_stats(model)] if adaptive else [None] * len(layers)
    unroll, implicit = copy.deepcopy(model), copy.deepcopy(model)
    copies = ([m for m in c.modules() if isinstance(m, SparseReconstruction)] for c in (unroll, implicit))
    for layer, taken, source_u, source_i in zip(layers, steps, *copies, strict=True):
        fixed = layer.max_steps if layer.tol is None else max(1, taken)
        source_u.configure(backward=Unroll(), solver=layer.solver, max_steps=fixed, tol=None)
        # by name: the layer's damped adjoint (LAYER_ADJOINT_RIDGE); undamped, the support systems of
        # these layers (more atoms than tokens) are singular and part of the adjoint does not converge
        source_i.configure(backward="implicit", solver=PRESET, max_steps=PRESET, tol=PRESET)
    return {"unroll": unroll, "implicit": implicit}


def _pgd(model, x, y, eps: float, cfg: StudyConfig, seed: int) -> dict[str, Any]:
    import torch

    from ..eval import pgd_robust_counts

    steps = cfg.pgd_steps
    x, y = x[: cfg.pgd_examples], y[: cfg.pgd_examples]
    checkpoints = sorted({0, 1, 2, 5, 10, 20, 50, 100, steps} & set(range(steps + 1)))
    generator = torch.Generator().manual_seed(seed * 1000 + round(eps * 1e4))
    counts = None
    # in chunks: unrolling a converged forward keeps every step's tensors for the backward
    for start in range(0, len(y), PGD_CHUNK):
        xs, ys = x[start:start + PGD_CHUNK], y[start:start + PGD_CHUNK]
        part = pgd_robust_counts(model, xs, ys, eps, steps, sources=_gradient_sources(model, xs),
                                 restarts=cfg.pgd_restarts, checkpoints=checkpoints, generator=generator)
        if counts is None:
            counts = part
            continue
        counts["num_examples"] += part["num_examples"]
        counts["robust"] = {k: c + part["robust"][k] for k, c in counts["robust"].items()}
        counts["per_source"] = {name: {k: c + part["per_source"][name][k] for k, c in v.items()}
                                for name, v in counts["per_source"].items()}
    n = counts["num_examples"]
    per_source = {name: {str(k): c / n for k, c in v.items()} for name, v in counts["per_source"].items()}
    return {"eps": eps, "steps": steps, "restarts": cfg.pgd_restarts, "num_examples": n, "step_size": 2.5 * eps / steps,
            "acc": counts["robust"][steps] / n,
            "acc_vs_steps": {str(k): c / n for k, c in counts["robust"].items()},
            "per_source": per_source,
            "strongest_source": min(per_source, key=lambda s: per_source[s][str(steps)])}


def _maps(model, x):
    from ..models.maps import attention_maps

    return attention_maps(model, x).mean(1)  # (B, h, w), mean over layers


def _map_stability(model, x) -> float:
    """Mean over images of corr(map(x), map(corrupt(x))), the maps as vectors over the token grid."""
    import torch

    from ..eval import corrupt

    clean = _maps(model, x).flatten(1)
    noisy = _maps(model, corrupt(x, *MAP_CORRUPTION, seed=0, index=0)).flatten(1)
    a, b = clean - clean.mean(1, keepdim=True), noisy - noisy.mean(1, keepdim=True)
    corr = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)
    return float(corr.mean())


# -- the study ------------------------------------------------------------------------------


def run_study(cfg: StudyConfig) -> dict[str, Any]:
    """Run (or resume) every job, write the JSON and the PNGs, and return the JSON's content."""
    import torch
    from tqdm.auto import tqdm

    cfg.validate()
    jobs = plan(cfg)
    _dataset(cfg)  # a data folder the runs share is written before any of them reads it
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    records = []
    with tqdm(total=len(jobs), desc="table2", unit="run", disable=not cfg.progress) as bar:
        if cfg.jobs == 1:
            for job in jobs:
                bar.set_postfix_str(f"{job.model} seed {job.seed}")
                records.append(run_job(job))
                bar.update(1)
        else:
            # spawned workers: a forked torch with live thread pools can deadlock
            with ProcessPoolExecutor(max_workers=cfg.jobs, mp_context=get_context("spawn")) as pool:
                futures = {pool.submit(run_job, job): job for job in jobs}
                for future in as_completed(futures):
                    records.append(future.result())
                    bar.set_postfix_str(f"done {futures[future].model} seed {futures[future].seed}")
                    bar.update(1)
    order = {j.model: i for i, j in enumerate(sorted(jobs, key=lambda j: _order(j.model)))}
    records.sort(key=lambda r: (order[r["model"]], r["seed"]))
    wall = time.perf_counter() - t0
    results = Path(cfg.results)
    results.mkdir(parents=True, exist_ok=True)
    stem = results / cfg.stem
    result = {
        "benchmark": "table2",
        "command": "vars-deq study " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["study"] else None,
        "config": {k: v for k, v in asdict(cfg).items() if k != "progress"},
        "environment": {"device": f"cpu ({cfg.threads} thread(s) per run, {cfg.jobs} run(s) at once)",
                        "torch": torch.__version__, "python": platform.python_version(),
                        "loadavg_1min_before_after": [load_before, os.getloadavg()[0]]},
        "setup": {
            "rows": {k: {"paper": v[0], "model": v[1], "layer_options": v[2]} for k, v in ROWS.items()
                     if k in cfg.rows},
            "recipe": "AdamW lr 1e-3, weight decay 0.05, batch 64, 1 warm-up epoch, cosine to 1e-5, "
                      f"{cfg.epochs} epochs, the same for every row",
            "pgd": f"L-inf, radii {list(cfg.pgd_eps)}, {cfg.pgd_steps} steps of 2.5 eps / steps, random start, "
                   f"{cfg.pgd_restarts} restart(s) per gradient source, on the first {cfg.pgd_examples} test images; VARS rows: sources 'unroll' and "
                   "'implicit' (same forward, backward swapped), robust = right on every judged iterate",
            "map_stability": f"Pearson correlation of the mean-over-layers attention map with that of the "
                             f"{MAP_CORRUPTION[0]} (severity {MAP_CORRUPTION[1]}) copy, mean over test images",
            "ablation": "VARS-SD, seed 0: T in {1, 3, 5, 10, converged} at lam 0.3; lam in {0.1, 0.3, 1.0} at T 5",
        },
        "records": records,
        "table": summarize(records, cfg),
        "ablation": ablation(records) if cfg.ablation else None,
        "wall_s": wall,
    }
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    plot_table(result, Path(f"{stem}_table.png"))
    plot_pgd(result, Path(f"{stem}_pgd.png"))
    if cfg.ablation:
        plot_ablation(result, Path(f"{stem}_ablation.png"))
    maps_figure(cfg, jobs, Path(f"{stem}_maps.png"))
    return result


def _order(model: str) -> tuple[int, str]:
    row = model.split("@")[0]
    return (list(ROWS).index(row) if row in ROWS else len(ROWS), model)


def _stats(xs: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarize(records: list[dict[str, Any]], cfg: StudyConfig) -> list[dict[str, Any]]:
    """One row per model of the table: mean and std over seeds (std 0 for one seed)."""
    rows = []
    for row in cfg.rows:
        rs = [r for r in records if r["model"] == row]
        entry = {"model": row, "paper": ROWS[row][0], "seeds": len(rs),
                 "clean_acc": _stats([r["clean_acc"] for r in rs]),
                 "corruption_mean": _stats([r["corruption_mean"] for r in rs]),
                 "families": {f: _stats([r["families"][f] for r in rs]) for f in rs[0]["families"]},
                 "map_stability": _stats([r["map_stability"] for r in rs]),
                 "best_acc": _stats([r["train"]["best_acc"] for r in rs]),
                 "train_time_s": _stats([r["train"]["train_time_s"] for r in rs])}
        for eps in rs[0]["pgd"]:
            entry[f"pgd_{eps}"] = _stats([r["pgd"][eps]["acc"] for r in rs])
            for source in rs[0]["pgd"][eps]["per_source"]:
                steps = str(rs[0]["pgd"][eps]["steps"])
                entry[f"pgd_{eps}_{source}"] = _stats([r["pgd"][eps]["per_source"][source][steps] for r in rs])
        rows.append(entry)
    return rows


def ablation(records: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Figure 6: clean and corruption accuracy of VARS-SD (seed 0) per setting of T and of lam."""
    by_model = {r["model"]: r for r in records if r["seed"] == 0}
    out = {}
    for axis, settings in (("steps", ABLATION_STEPS), ("lam", ABLATION_LAMS)):
        out[axis] = []
        for value in settings:
            r = by_model[ABLATION_SOURCE.get((axis, value), f"vars_sd@{axis}={value}")]
            out[axis].append({"value": value, "run": r["model"], "clean_acc": r["clean_acc"],
                              "corruption_mean": r["corruption_mean"], "families": r["families"]})
    return out


def _pm(s: dict[str, float] | None, scale: float = 100.0, fmt: str = ".1f") -> str:
    return "-" if s is None else f"{scale * s['mean']:{fmt}} ± {scale * s['std']:{fmt}}"


def markdown(result: dict[str, Any]) -> str:
    """The README's tables: Table 2 (mean ± std over seeds) and, when run, the Figure 6 ablation."""
    table = result["table"]
    eps = list(result["records"][0]["pgd"])
    families = list(table[0]["families"])
    head = (["model", "clean"] + [f"corr. {f}" for f in families] + ["corr. mean"]
            + [f"PGD {e}" for e in eps] + ["map stability"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table:
        cells = ([r["paper"], _pm(r["clean_acc"])] + [_pm(r["families"][f]) for f in families]
                 + [_pm(r["corruption_mean"])] + [_pm(r[f"pgd_{e}"]) for e in eps]
                 + [_pm(r["map_stability"], 1.0, ".2f")])
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("ablation"):
        for axis, label in (("steps", "T"), ("lam", "lam")):
            rows = result["ablation"][axis]
            lines += ["", f"| VARS-SD, {label} | " + " | ".join(r["value"] for r in rows) + " |",
                      "|---|" + "---|" * len(rows),
                      "| clean | " + " | ".join(f"{100 * r['clean_acc']:.1f}" for r in rows) + " |",
                      "| corruption mean | " + " | ".join(f"{100 * r['corruption_mean']:.1f}" for r in rows) + " |"]
    return "\n".join(lines)


# -- figures --------------------------------------------------------------------------------


def _pyplot():
    from ..plots import _pyplot

    return _pyplot()


def plot_table(result: dict[str, Any], path: Path) -> None:
    """Table 2 as grouped bars: clean, corruption mean and PGD accuracy per model, ± std over seeds."""
    plt = _pyplot()
    table = result["table"]
    eps = list(result["records"][0]["pgd"])
    metrics = [("clean_acc", "clean"), ("corruption_mean", "corruption mean")] + [(f"pgd_{e}", f"PGD {e}")
                                                                                  for e in eps]
    fig, ax = plt.subplots(figsize=(2.0 + 1.6 * len(table), 4.4))
    width = 0.8 / len(metrics)
    for i, (key, label) in enumerate(metrics):
        xs = [j + (i - (len(metrics) - 1) / 2) * width for j in range(len(table))]
        ax.bar(xs, [100 * r[key]["mean"] for r in table], width, yerr=[100 * r[key]["std"] for r in table],
               label=label, capsize=2)
    ax.set_xticks(range(len(table)), [r["paper"] for r in table], rotation=15, ha="right", fontsize=8)
    ax.set(ylabel="accuracy (%)", ylim=(0, 100),
           title=f"Table 2 in small ({result['config']['dataset']}, {result['config']['epochs']} epochs, "
                 f"mean ± std over {table[0]['seeds']} seed(s))")
    ax.axhline(10, color="grey", ls=":", lw=1, label="chance")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, ncol=len(metrics) + 1, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_pgd(result: dict[str, Any], path: Path) -> None:
    """Robust accuracy against PGD steps (convergence of the attack), per radius and gradient source."""
    plt = _pyplot()
    eps = list(result["records"][0]["pgd"])
    fig, axes = plt.subplots(1, len(eps), figsize=(6 * len(eps), 4.2), squeeze=False)
    models = [r["model"] for r in result["table"]]
    styles = {"autograd": "-", "unroll": "--", "implicit": ":", "strongest": "-"}
    for ax, e in zip(axes[0], eps):
        for i, m in enumerate(models):
            rs = [r for r in result["records"] if r["model"] == m]
            curves = {"strongest": [r["pgd"][e]["acc_vs_steps"] for r in rs]}
            if len(rs[0]["pgd"][e]["per_source"]) > 1:
                curves.update({s: [r["pgd"][e]["per_source"][s] for r in rs] for s in rs[0]["pgd"][e]["per_source"]})
            for source, runs in curves.items():
                steps = [int(k) for k in runs[0]]
                mean = [100 * statistics.fmean(run[str(k)] for run in runs) for k in steps]
                ax.plot(steps, mean, styles[source], color=f"C{i}", marker="o", ms=3,
                        lw=2 if source == "strongest" else 1,
                        label=f"{result['table'][i]['paper']}" + ("" if source == "strongest" else f" ({source})"))
        ax.set(xlabel="PGD steps", ylabel="robust accuracy (%)", title=f"L-inf eps {e} (mean over seeds)",
               ylim=(0, 100))
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablation(result: dict[str, Any], path: Path) -> None:
    """Figure 6 in small: VARS-SD's clean and corruption accuracy against T and against lam."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, (axis, label) in zip(axes, (("steps", "steps T (lam 0.3)"), ("lam", "sparsity lam (T 5)"))):
        rows = result["ablation"][axis]
        xs = range(len(rows))
        ax.plot(xs, [100 * r["clean_acc"] for r in rows], "o-", label="clean")
        ax.plot(xs, [100 * r["corruption_mean"] for r in rows], "s--", label="corruption mean")
        ax.set_xticks(list(xs), [r["value"] for r in rows])
        ax.set(xlabel=label, ylabel="accuracy (%)", ylim=(0, 100))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Figure 6 in small: VARS-SD, one trained model (seed 0) per setting")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def maps_figure(cfg: StudyConfig, jobs: list[Job], path: Path, images: int = 3) -> None:
    """Figure 3 in small: each row's seed-0 maps on the same clean and corrupted test images."""
    import torch
    from torch.nn import functional as F

    from ..eval import corrupt
    from ..plots import plot_attention_maps
    from ..train import model_from_checkpoint

    data = _dataset(cfg)
    panels, labels = {}, None
    for job in jobs:
        if job.seed != 0 or not job.full_eval:
            continue
        model, _ = model_from_checkpoint(Path(job.output) / "checkpoint.pth")
        x, y = _test_tensors(model, data)
        pick = torch.linspace(0, len(y) - 1, images).round().long()  # spread over the classes
        x, labels = x[pick], y[pick]
        for label, xs in (("clean", x), (f"{MAP_CORRUPTION[0]} {MAP_CORRUPTION[1]}",
                                         corrupt(x, *MAP_CORRUPTION, seed=0, index=0))):
            with torch.no_grad():
                predictions = model.eval()(xs).argmax(-1)
            m = F.interpolate(_maps(model, xs)[:, None], size=xs.shape[-2:], mode="bilinear", align_corners=False)
            panels[f"{ROWS[job.model][0]}\n{label}"] = {"images": xs, "maps": m[:, 0], "predictions": predictions}
    panels = dict(sorted(panels.items(), key=lambda kv: [ROWS[r][0] for r in ROWS].index(kv[0].split("\n")[0])))
    plot_attention_maps(panels, path, "Figure 3 in small: attention maps (mean over layers), seed 0", labels=labels)
