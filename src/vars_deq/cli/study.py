"""``vars-deq study table2``: the paper's robustness comparison in small (Table 2, Figures 3 and 6)."""

from __future__ import annotations

import argparse

NAME = "study"
HELP = "the paper's robustness comparison in small: Table 2, Figure 3, Figure 6"
DESCRIPTION = ("Train DeiT, DeiT* (Performer), w/ VARS-S, -D, -SD (the original's settings) and w/ VARS-SD as a "
               "converged equilibrium trained with implicit gradients, with one recipe and several seeds, on the "
               "embedded digits or a local CIFAR-10 folder; evaluate clean, corruption and PGD accuracy (VARS "
               "models attacked through unrolled and implicit gradients), attention-map stability, and the "
               "ablation over steps T and sparsity lam. Finished runs under --runs are reused. Writes "
               "table2*.json (one record per model and seed) and PNGs to --results.")
STUDIES = ("table2",)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from ..studies.table2 import ROWS, StudyConfig

    d = StudyConfig()
    p.add_argument("study", choices=STUDIES, help="which study")
    p.add_argument("--data-dir", help="a folder holding cifar-10-batches-py (default: the embedded digits)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs per run, every row (default %(default)s)")
    p.add_argument("--seeds", type=int, default=d.seeds, help="seeds 0..S-1 per row (default %(default)s)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(d.rows), metavar="ROW",
                   help=f"rows of the table (default all: {' '.join(ROWS)})")
    p.add_argument("--pgd-eps", nargs="+", type=float, default=list(d.pgd_eps),
                   help="L-inf radii in [0, 1] pixel units (default %(default)s)")
    p.add_argument("--pgd-steps", type=int, default=d.pgd_steps, help="default %(default)s")
    p.add_argument("--pgd-restarts", type=int, default=d.pgd_restarts,
                   help="random starts per gradient source (default %(default)s)")
    p.add_argument("--pgd-examples", type=int, default=d.pgd_examples,
                   help="attack the first N test images (default %(default)s)")
    p.add_argument("--no-ablation", action="store_true", help="skip the Figure 6 ablation runs")
    p.add_argument("--runs", default=d.runs, help="the training runs' folder (default %(default)s)")
    p.add_argument("--results", default=d.results, help="where the JSON and PNGs go (default %(default)s)")
    p.add_argument("--jobs", type=int, default=d.jobs, help="runs at once, each its own process (default %(default)s)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads per run (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="1 seed, 1 epoch, 2 PGD steps; on digits an 80-image subset (a smoke test, about 2 min)")
    p.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    from ..studies.table2 import StudyConfig, markdown, run_study

    quick = {"seeds": 1, "epochs": 1, "pgd_steps": 2} if args.quick else {}
    cfg = StudyConfig(**{
        "epochs": args.epochs, "seeds": args.seeds, "pgd_eps": tuple(args.pgd_eps), "pgd_steps": args.pgd_steps,
        "pgd_restarts": args.pgd_restarts, "pgd_examples": args.pgd_examples, "rows": tuple(args.rows), "ablation": not args.no_ablation,
        "dataset": "digits" if args.data_dir is None else "cifar10", "data_dir": args.data_dir,
        "runs": args.runs, "results": args.results, "jobs": args.jobs, "threads": args.threads,
        "quick": args.quick, "progress": not args.no_progress, **quick})
    result = run_study(cfg)
    print(markdown(result))
    print(f"wrote {cfg.results}/{cfg.stem}.json and its PNGs in {result['wall_s'] / 60:.1f} min")
    return 0
