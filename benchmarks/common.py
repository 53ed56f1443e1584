"""Small helpers shared by the benchmarks: the command-line options every benchmark has (the device
and the CPUs this process may use, both from :mod:`vars_deq.devices`), synchronized timing, FLOP
counting, peak memory, per-configuration subprocesses and result files under
``benchmarks/results/<device>/``."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import os
import re
import resource
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch

from vars_deq.devices import available_cpus, device_label, select_device, set_threads

RESULTS = Path(__file__).resolve().parent / "results"
M_MMAP_THRESHOLD = -3  # glibc <malloc.h>


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
    set_threads(args.threads)
    device = select_device(args.device)
    out = Path(args.out) if args.out is not None else RESULTS / device_slug(device)
    out.mkdir(parents=True, exist_ok=True)
    return device, out


def device_slug(device: torch.device) -> str:
    """``cpu`` or the CUDA device name, lower-case with runs of other characters as ``-``."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


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
    """Reset VmHWM to the current RSS (Linux >= 4.0, /proc/self/clear_refs).

    False where that is refused or silently ignored (some containers): then VmHWM still holds an
    earlier peak, which the check after the write detects.
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    status = rss_status()
    return status is not None and status["VmHWM"] - status["VmRSS"] < 1.0


class PeakRSS:
    """Peak resident memory of this process while the block runs, and the RSS when it began (MiB).

    Where the kernel lets VmHWM be reset the peak is exact; elsewhere a thread samples VmRSS every
    ``interval`` seconds, which can miss a peak shorter than that (``source`` says which ran).
    """

    def __init__(self, interval: float = 5e-4):
        self.interval = interval
        self.base_mib = self.peak_mib = 0.0
        self.source = ""
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        page_mib = os.sysconf("SC_PAGE_SIZE") / 2**20
        with open("/proc/self/statm") as f:
            while not self._stop.is_set():
                f.seek(0)
                self.peak_mib = max(self.peak_mib, int(f.read().split()[1]) * page_mib)
                time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        status = rss_status()
        if status is None:
            raise RuntimeError("peak memory on CPU needs /proc/self/status (Linux)")
        self.base_mib = self.peak_mib = status["VmRSS"]
        if reset_peak_rss():
            self.source = "VmHWM (reset at the start)"
        else:
            self.source = f"VmRSS sampled every {self.interval * 1e3:g} ms (VmHWM cannot be reset here)"
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self._thread is None:
            self.peak_mib = rss_status()["VmHWM"]
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mib = max(self.peak_mib, rss_status()["VmRSS"])

    @property
    def delta_mib(self) -> float:
        return self.peak_mib - self.base_mib


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
