"""Run every benchmark and write its results (JSON + PNG) into one folder.

    python benchmarks/run.py [--device auto|cpu|cuda] [--out DIR] [--threads N] [--quick [--jobs N]] [--only NAME ...]

Runs, each in its own process so one's memory does not colour another's: the solver benchmark
(bench_solvers.py), the fused no-grad step against the plain one (bench_step_map.py), the backward memory/time benchmark (bench_backward.py), the calibration of
the "auto" adjoint (bench_adjoint_cost.py), the model
throughput benchmark (bench_models.py), the FLOP count (bench_flops.py), the layer against the
original's update (bench_layer.py), eager against torch.compile (bench_compile.py) and
`vars-deq compare`; each prints its own table, and the
README quotes them. --quick passes --quick to each (a smoke run of seconds apiece) and runs
compare on one image, two solvers and no synthetic suite. --threads is passed on; without it each
benchmark keeps its own default (the CPUs this process may use; one thread for bench_layer and
compare). The default folder is benchmarks/results/<device>/. --jobs N (with --quick only) runs N
jobs at once and prints each one's output when it ends: the smoke run of the test suite, whose
timings nobody reads; timed runs go one at a time, as two jobs on shared cores time each other.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("solvers", "step_map", "backward", "adjoint_cost", "train_step", "models", "flops", "layer", "compile")
JOBS = (*BENCHMARKS, "compare")
QUICK_COMPARE = ["--num-images", "1", "--solvers", "ista", "fista", "--tols", "1e-2", "--max-steps", "20",
                 "--synthetic", "--repeats", "1"]


def commands(device: str, out: Path, quick: bool, threads: int | None) -> dict[str, list[str]]:
    """The command line of each job."""
    py = sys.executable
    shared = ["--device", device] + (["--threads", str(threads)] if threads else [])
    jobs = {name: [py, str(HERE / f"bench_{name}.py"), *shared, "--out", str(out)] + (["--quick"] if quick else [])
            for name in BENCHMARKS}
    jobs["compare"] = [py, "-m", "vars_deq.cli", "compare", *shared, "--output", str(out)] + (QUICK_COMPARE if quick else [])
    return jobs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads for every job")
    ap.add_argument("--quick", action="store_true", help="every benchmark's --quick mode (a smoke run)")
    ap.add_argument("--only", nargs="*", default=None, choices=JOBS, help="a subset of the jobs")
    ap.add_argument("--jobs", type=int, default=1, help="jobs at once, with --quick only (default 1)")
    args = ap.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        ap.error("--threads must be >= 1")
    if args.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.jobs > 1 and not args.quick:
        ap.error("--jobs > 1 needs --quick: timed benchmarks run one at a time (jobs sharing the cores time each other)")
    device, out = args.device, args.out
    if out is None or device == "auto":
        sys.path.insert(0, str(HERE))
        from common import device_slug, select_device

        resolved = select_device(device)
        device = str(resolved)
        out = out if out is not None else HERE / "results" / device_slug(resolved)
    out.mkdir(parents=True, exist_ok=True)
    todo = {name: cmd for name, cmd in commands(device, out, args.quick, args.threads).items()
            if args.only is None or name in args.only}

    def run(name: str, cmd: list[str]) -> bool:
        start = time.perf_counter()
        if args.jobs == 1:  # streamed: the tables appear as they are measured
            print(f"\n=== {name}: {' '.join(cmd)}", flush=True)
            ok = subprocess.run(cmd, cwd=HERE.parent).returncode == 0
        else:
            proc = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True)
            print(f"\n=== {name}: {' '.join(cmd)}\n{proc.stdout}", end="", flush=True)
            print(proc.stderr, end="", file=sys.stderr, flush=True)
            ok = proc.returncode == 0
        print(f"=== {name}: {'done' if ok else 'FAILED'} in {time.perf_counter() - start:.1f} s", flush=True)
        return ok

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = dict(zip(todo, pool.map(lambda item: run(*item), todo.items())))
    failed = [name for name, ok in results.items() if not ok]
    if failed:
        print(f"failed: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
