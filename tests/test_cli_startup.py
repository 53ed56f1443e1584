"""Start-up of the command line: parsers import only what their subcommand needs."""

import subprocess
import sys

import pytest

HEAVY = ("timm", "torchvision", "matplotlib", "torchdeq")


def _new_heavy_modules(argv: list[str]) -> list[str]:
    """Heavy top-level modules that parsing ``argv`` imports beyond ``import vars_deq`` itself."""
    code = (
        "import sys, vars_deq; before = set(sys.modules)\n"
        "from vars_deq.cli import build_parser\n"
        f"try:\n    build_parser().parse_args({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print(sorted({{m.split('.')[0] for m in set(sys.modules) - before}} & set({HEAVY!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return eval(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("argv", [["--help"], ["compare", "--help"], ["evaluate", "--help"], ["maps", "--help"]])
def test_parsers_import_no_heavy_module(argv):
    assert _new_heavy_modules(argv) == []


def test_help_imports_no_heavy_module():
    """`vars-deq --help` end to end, the package import included, read from ``-X importtime``."""
    probe = subprocess.run([sys.executable, "-c", f"import sys, vars_deq; print(sorted(set({HEAVY!r}) & set(sys.modules)))"],
                           capture_output=True, text=True, check=True)
    if eval(probe.stdout.strip().splitlines()[-1]):
        pytest.skip("`import vars_deq` itself imports a heavy module (the package's import is not lazy yet)")
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "vars_deq.cli", "--help"],
                          capture_output=True, text=True)
    assert done.returncode == 0 and "COMMAND" in done.stdout
    imported = {line.split("|")[-1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:")}
    assert imported & set(HEAVY) == set()


def test_python_m_and_entry_point_name_the_same_main():
    import importlib
    import re
    from pathlib import Path

    import vars_deq.cli

    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    module, _, attr = re.search(r'^vars-deq = "([^"]+)"', pyproject, re.M).group(1).partition(":")
    assert getattr(importlib.import_module(module), attr) is vars_deq.cli.main
    done = subprocess.run([sys.executable, "-m", "vars_deq.cli", "maps", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--compare-untrained" in done.stdout and "--force" in done.stdout
