"""Run every benchmark and write results under benchmarks/results/<device>/ (JSON + PNG).

    python benchmarks/run.py [--device auto|cpu|cuda] [--quick]

Runs, each in its own process so one's memory does not colour another's: the solver benchmark
(bench_solvers.py), the backward memory/time benchmark (bench_backward.py), the model
throughput benchmark (bench_models.py) and `vars-deq compare`; each prints its own table, and the
README quotes them.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="fewer repeats and steps (a smoke run)")
    ap.add_argument("--only", nargs="*", default=None, help="subset of: solvers backward models compare")
    args = ap.parse_args(argv)
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    sys.path.insert(0, str(HERE))
    from common import device_slug

    out = HERE / "results" / device_slug(torch.device(device))
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    jobs = {
        "solvers": [py, str(HERE / "bench_solvers.py"), "--device", device] + (["--repeats", "1"] if args.quick else []),
        "backward": [py, str(HERE / "bench_backward.py"), "--device", device] + (["--quick"] if args.quick else []),
        "models": [py, str(HERE / "bench_models.py"), "--device", device] + (["--steps", "2"] if args.quick else []),
        "compare": [py, "-m", "vars_deq.cli", "compare", "--device", device, "--output", str(out)],
    }
    failed = []
    for name, cmd in jobs.items():
        if args.only and name not in args.only:
            continue
        print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
        if subprocess.run(cmd, cwd=HERE.parent).returncode != 0:
            failed.append(name)
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
