"""Small helpers shared by the benchmarks: the command-line options every benchmark has, the CPUs
this process may use, device choice, synchronized timing, FLOP counting, peak memory,
per-configuration subprocesses and result files under ``benchmarks/results/<device>/``."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import math
import os
import re
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"
CGROUP_ROOT = Path("/sys/fs/cgroup")
M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


# -- CPUs this process may use -------------------------------------------------------------------


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs allowed by the cgroup's CFS quota, quota / period, or None when unlimited or unknown.

    cgroup v2: ``cpu.max`` holds "quota period" ("max period" when unlimited); cgroup v1:
    ``cpu.cfs_quota_us`` (-1 when unlimited) and ``cpu.cfs_period_us`` under ``cpu/`` or
    ``cpu,cpuacct/``.
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for sub in ("cpu", "cpu,cpuacct"):
        try:
            quota_us = int((root / sub / "cpu.cfs_quota_us").read_text())
            period_us = int((root / sub / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us < 0 or period_us <= 0 else quota_us / period_us
    return None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """The CPUs this process may run on: its affinity mask, capped by the cgroup quota
    (rounded down: a 1.5-CPU quota keeps one thread busy without throttling), at least 1.

    torch's default thread count is the machine's core count, which oversubscribes a process
    confined to fewer by affinity or quota (issue 12: an 11x slower training epoch)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, math.floor(limit))
    return max(1, cpus)


# -- options every benchmark has ------------------------------------------------------------------


def add_common_args(parser: argparse.ArgumentParser, default_threads: int | None = None) -> None:
    """--device, --threads, --out and --quick; ``default_threads`` None means :func:`available_cpus`."""
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    threads = available_cpus() if default_threads is None else default_threads
    parser.add_argument("--threads", type=int, default=threads,
                        help=f"torch CPU intra-op threads (default {threads}"
                             + (": the CPUs this process may use)" if default_threads is None else ")"))
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results/<device>)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: a smoke run of a few seconds")


def parser(doc: str, default_threads: int | None = None) -> argparse.ArgumentParser:
    """A benchmark's parser: its module docstring as help, and :func:`add_common_args`."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap, default_threads)
    return ap


def setup(args: argparse.Namespace) -> tuple[torch.device, Path]:
    """Apply --threads, resolve --device, create the results folder: (device, folder)."""
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    out = Path(args.out) if args.out is not None else RESULTS / device_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    return device, out


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch.cuda.is_available() is False")
    return dev


def device_slug(device: torch.device) -> str:
    """``cpu`` or the CUDA device name, lower-case with runs of other characters as ``-``."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def device_label(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    n = torch.get_num_threads()
    return f"cpu ({n} thread{'s' if n != 1 else ''})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(fn(), seconds), with the device synchronized on both sides so queued kernels count."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def peak_rss_mib() -> float:
    """ru_maxrss of this process (Linux reports KiB).

    On Linux a child inherits its parent's high-water mark through fork/exec, so in a worker this
    is at least the driver's peak; :func:`rss_status` has the process's own figures.
    """
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def rss_status() -> dict[str, float] | None:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process image in MiB (Linux)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
    except OSError:
        return None
    return {k: int(v.split()[0]) / 2**10 for k, v in fields.items()}


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0, /proc/self/clear_refs); False if unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def run_forked(fn: Callable[[Any], dict[str, Any]], arg: Any) -> dict[str, Any]:
    """``fn(arg)`` in a forked child process; returns its (JSON-able) dict.

    A fresh process per configuration makes its peak memory attributable to that configuration;
    forking from a driver that has imported torch but computed nothing avoids paying the imports
    again for every configuration. The child's peak is VmHWM after :func:`reset_peak_rss` (its
    ru_maxrss starts at the driver's resident size).
    """
    if not hasattr(os, "fork"):
        raise RuntimeError("per-configuration memory measurement needs os.fork (POSIX)")
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_fd)
        try:
            payload = {"result": fn(arg)}
        except BaseException:
            payload = {"error": traceback.format_exc()}
        with os.fdopen(write_fd, "w") as f:
            json.dump(payload, f)
        os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd) as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise RuntimeError(f"worker for {arg} died (wait status {status})")
    payload = json.loads(data)
    if "error" in payload:
        raise RuntimeError(f"worker for {arg} failed:\n{payload['error']}")
    return payload["result"]


def fixed_mmap_threshold(nbytes: int) -> bool:
    """glibc: serve every allocation of at least ``nbytes`` by mmap and unmap it on free (this also
    turns off the dynamic threshold), so RSS follows live large blocks, not heap fragmentation.
    False where glibc's mallopt is unavailable."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, nbytes))
    except (OSError, AttributeError):
        return False


def environment(device: torch.device) -> dict[str, Any]:
    return {
        "device": device_label(device),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
    }


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def label_bars(ax, bars, notes: list[str]) -> None:
    """Write each note above its bar."""
    for bar, note in zip(bars, notes):
        ax.annotate(note, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=7)


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)


# -- FLOPs ---------------------------------------------------------------------------------------


def counted_ops() -> list[str]:
    """The aten ops torch.utils.flop_counter has a formula for (matrix products, convolutions,
    attention kernels and their backwards); every other op counts zero."""
    from torch.utils.flop_counter import flop_registry

    return sorted(str(op) for op in flop_registry)


@contextlib.contextmanager
def unfused_attention(model: torch.nn.Module):
    """timm attention modules with ``fused_attn`` off while inside: FlopCounterMode has no formula
    for the CPU kernel of scaled_dot_product_attention (``_scaled_dot_product_flash_attention_for_cpu``),
    so a fused DeiT forward on CPU counts no attention products; the unfused path's matmuls count."""
    mods = [m for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    saved = [m.fused_attn for m in mods]
    for m in mods:
        m.fused_attn = False
    try:
        yield model
    finally:
        for m, f in zip(mods, saved):
            m.fused_attn = f


def count_flops(fn: Callable[[], Any]) -> tuple[int, list[str]]:
    """(FLOPs of ``fn()`` by torch.utils.flop_counter.FlopCounterMode, aten ops it ran that the
    counter has no formula for). FLOPs count 2 per multiply-add of a matrix product."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode, flop_registry

    class OpNames(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket not in flop_registry:
                self.names.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    counter, seen = FlopCounterMode(display=False), OpNames()
    with counter, seen:
        fn()
    return int(counter.get_total_flops()), sorted(seen.names)
