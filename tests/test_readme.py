"""The README is the front door: every ```python block runs as written (in order, in one process)
and every command line of its ```bash blocks runs, with the smallest sensible extra arguments."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"```(\w+)\n(.*?)```", re.S)

#: per subcommand, what makes a README command line small enough for the test suite
SMALL = {
    "compare": ["--num-images", "1", "--max-steps", "30", "--solvers", "fista", "ista", "--synthetic",
                "--deit-images", "1", "--repeats", "1", "--no-progress", "--threads", "1"],
    "train": ["--epochs", "1", "--model-kwargs", "depth=1", "--no-progress", "--threads", "1"],
    "evaluate": ["--limit", "16", "--severities", "1", "--corruptions", "gaussian_noise", "--pgd-steps", "1",
                 "--no-progress", "--threads", "1"],
    "maps": ["--num-images", "2", "--no-progress", "--threads", "1"],
    "study": ["--quick", "--rows", "deit", "vars_sd", "vars_sd_deq", "--no-ablation", "--jobs", "1", "--no-progress"],
}


def _blocks(lang: str) -> list[str]:
    return [body for kind, body in BLOCK.findall(README.read_text()) if kind == lang]


def _commands() -> list[list[str]]:
    lines = [line.strip() for body in _blocks("bash") for line in body.splitlines()]
    return [shlex.split(line) for line in lines if line.startswith("vars-deq ")]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}


def test_the_readme_has_the_two_commands():
    bash = _blocks("bash")
    assert any('pip install -e ".[dev]"' in b and "vars-deq compare" in b for b in bash)
    assert any(b.strip() == "python -m pytest -q" for b in bash)


@pytest.mark.slow
def test_every_python_block_runs_in_order(tmp_path):
    code = "\n".join(["import torch", "torch.set_num_threads(1)", *_blocks("python")])
    assert code.count("\n") > 10
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


@pytest.mark.slow
def test_every_command_line_runs(tmp_path):
    commands = _commands()
    assert {c[1] for c in commands} >= {"compare", "train", "evaluate", "maps", "study"}
    bin_dir = Path(sys.executable).parent
    for argv in commands:  # in README order: train writes the checkpoint evaluate and maps read
        exe = bin_dir / argv[0]
        full = [str(exe) if exe.exists() else argv[0], *argv[1:], *SMALL[argv[1]]]
        run = subprocess.run(full, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, f"{shlex.join(argv)}:\n{run.stderr[-3000:]}"
        assert "Traceback" not in run.stderr, run.stderr[-3000:]
