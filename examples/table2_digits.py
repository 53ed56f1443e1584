"""A small version of the paper's Table 2 on the embedded digits data.

Self-attention (DeiT), Performer linear attention (the paper's DeiT*) and VARS-S, -D, -SD on
the same ViT skeleton, trained with the same recipe and budget, then evaluated for clean,
corruption (noise, blur, digital; severities 1-5, mean over families) and PGD accuracy.

    python examples/table2_digits.py [--epochs 20] [--output runs/table2] [--device auto]

Writes <output>/table2.json and prints a markdown table (the README quotes it).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from vars_deq.eval.evaluate import evaluate_model
from vars_deq.train.checkpoint import model_from_checkpoint
from vars_deq.train.trainer import TrainConfig, train
from vars_deq.data import load_digits_split

MODELS = ("deit_digits", "performer_digits", "vars_s_digits", "vars_d_digits", "vars_sd_digits")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--output", default="runs/table2")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", nargs="+", default=list(MODELS))
    ap.add_argument("--pgd-eps", type=float, default=0.03)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (small models: 1 is fastest on 2 cores)")
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    out = Path(args.output)
    test = load_digits_split()[1]
    rows = {}
    for name in args.models:
        run_dir = out / name
        ckpt = run_dir / "checkpoint.pth"
        t0 = time.perf_counter()
        if not ckpt.exists():
            train(TrainConfig(model=name, epochs=args.epochs, output=str(run_dir), seed=args.seed, device=args.device,
                              progress=False))
        seconds = time.perf_counter() - t0
        model, _ = model_from_checkpoint(ckpt)
        res = evaluate_model(model, test, pgd_eps=args.pgd_eps, seed=args.seed,
                             device="cpu" if args.device == "auto" else args.device)
        rows[name] = {"train_seconds": seconds, **res}
        print(f"{name}: {json.dumps({k: v for k, v in res.items() if not isinstance(v, dict)})}", flush=True)
    (out / "table2.json").write_text(json.dumps({"epochs": args.epochs, "seed": args.seed, "rows": rows}, indent=1))
    print(markdown(rows, args.epochs))
    return 0


def _pct(v) -> str:
    return f"{100 * v:.1f}" if isinstance(v, (int, float)) else "-"


def markdown(rows, epochs) -> str:
    lines = [f"| model (digits, {epochs} epochs) | clean | corruption mean | noise | blur | digital | PGD |",
             "|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        fam = r.get("families") or {}
        pgd = (r.get("pgd") or {}).get("acc")
        lines.append(f"| {name} | {_pct(r.get('clean_acc'))} | {_pct(r.get('corruption_mean'))} | "
                     f"{_pct(fam.get('noise'))} | {_pct(fam.get('blur'))} | {_pct(fam.get('digital'))} | "
                     f"{_pct(pgd)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
