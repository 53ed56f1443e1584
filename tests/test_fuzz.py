"""Bad input, fuzzed: every case through the public API ends in a ValueError (or the CLI's one-line
error naming the argument) within seconds, and writes or overwrites nothing."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vars_deq as vd

BAD_NUMBERS = [math.nan, math.inf, -math.inf, -1.0, -1e300, 1e300, 0, -3, True, "1", None]
TRIED = {"api": 0, "cli": 0}


def _good():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 6, 9, generator=g), torch.randn(2, 6, 3, generator=g)


def _bad_tensor(kind: str) -> torch.Tensor:
    D, x = _good()
    return {
        "nan": x.clone().fill_(math.nan), "inf": x.clone().fill_(math.inf), "shape": torch.randn(6),
        "tokens": torch.randn(2, 5, 3), "int": x.long(), "half_dtype": x.double(), "empty_tokens": torch.randn(2, 0, 3),
    }[kind]


API_CASES = (
    [("x", k) for k in ("nan", "inf", "shape", "tokens", "int", "half_dtype", "empty_tokens")]
    + [("lam", v) for v in (math.nan, math.inf, -1.0, -1e-9, "0.3", torch.full((5, 5), 0.1))]
    + [("solve", (n, v)) for n, vs in {"max_steps": (-1, 1.5, math.nan, "5", True),
                                       "tol": (0, -1e-3, math.nan, math.inf, "1e-4"),
                                       "solver": ("newton", "", 3, None),
                                       "z0": ("random", torch.randn(3), 1.0)}.items() for v in vs]
    + [("backward", (n, v)) for n, vs in {"adjoint": ("gmres", 1, None),
                                          "tol": (math.nan, math.inf, -1.0, 0, True, "1", None),
                                          "max_steps": (0, -1, 2.5, True, math.nan),
                                          "ridge": (-1.0, math.nan, math.inf, "0"),
                                          "on_unconverged": ("panic", None),
                                          "phantom_steps": (0, 1.5, -2),
                                          "tau": (0.0, 1.5, math.nan, -1)}.items() for v in vs]
    + [("layer", (n, v)) for n, vs in {"dim": (0, -1, 2.5), "num_heads": (0, 5), "dictionary": ("x", "", None),
                                       "lam": (-1.0, math.nan), "max_steps": (-1, 2.5),
                                       "lipschitz": ("svd", None), "lipschitz_margin": (-1.0, math.nan, "1"),
                                       "static_atoms": ("learned", None), "attn_drop": (0.1,),
                                       "init": ("random",)}.items() for v in vs]
)


def _api_call(case):
    what, arg = case
    D, x = _good()
    if what == "x":
        vd.SparseCoding(D, _bad_tensor(arg), 0.1)
    elif what == "lam":
        vd.SparseCoding(D, x, arg)
    elif what == "solve":
        name, value = arg
        vd.solve(vd.SparseCoding(D, x, 0.1), **{"solver": "fista", "max_steps": 5, "tol": 1e-4, name: value})
    elif what == "backward":
        name, value = arg
        if name in ("phantom_steps", "tau"):
            vd.sparse_code(vd.SparseCoding(D, x, 0.1), backward="phantom", **{name: value})
        else:
            vd.Implicit(**{name: value})
    else:
        name, value = arg
        vd.VARSAttention(**{"dim": 16, "num_heads": 2, "dictionary": "d", name: value})


@settings(max_examples=3 * len(API_CASES), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(API_CASES))
def test_bad_api_input_is_a_value_error_naming_the_argument(case):
    TRIED["api"] += 1
    start = time.perf_counter()
    with pytest.raises(ValueError) as err:
        _api_call(case)
    assert time.perf_counter() - start < 5
    name = case[0] if case[0] in ("x", "lam") else case[1][0]
    said = str(err.value)
    assert name.split("_")[0] in said or name in said, (case, said)


def _files(root):
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


CLI_CASES = [
    ["train", "--epochs", "-1"], ["train", "--epochs", "0"], ["train", "--lr", "nan"], ["train", "--lam", "-1"],
    ["train", "--max-steps", "-3"], ["train", "--tol", "0"], ["train", "--model", "nope"], ["train", "--threads", "0"],
    ["train", "--batch-size", "0"], ["train", "--device", "tpu"], ["train", "--adjoint-ridge", "-1", "--backward",
                                                                     "implicit"],
    ["train", "--phantom-steps", "2", "--backward", "implicit"], ["train", "--data-dir", "missing_dir"],
    ["evaluate", "--checkpoint", "missing.pth"], ["evaluate", "--checkpoint", "empty.pth"],
    ["evaluate", "--checkpoint", "text.pth"], ["evaluate", "--checkpoint", "truncated.pth"],
    ["evaluate", "--checkpoint", "."], ["evaluate", "--checkpoint", "foreign.pth"],
    ["maps", "--checkpoint", "empty.pth"], ["maps", "--output", "exists.png"],
    ["compare", "--max-steps", "0"], ["compare", "--tols", "-1"], ["compare", "--checkpoint", "text.pth"],
    ["compare", "--layers", "9"], ["compare", "--num-images", "0"],
]


@pytest.mark.slow
def test_bad_cli_input_is_one_line_and_writes_nothing(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    (tmp_path / "text.pth").write_text("not a checkpoint\n")
    torch.save({"weights": torch.ones(3)}, tmp_path / "foreign.pth")
    good = tmp_path / "good.pth"
    torch.save({"a": torch.ones(1000)}, good)
    (tmp_path / "truncated.pth").write_bytes(good.read_bytes()[:200])
    good.unlink()
    (tmp_path / "exists.png").write_bytes(b"keep")
    before = _files(tmp_path)
    # one process for every case (start-up is the slow part): each case's exit status and stderr
    script = (
        "import sys, io, contextlib, json\n"
        "from vars_deq.cli import main\n"
        "out = []\n"
        f"for argv in {CLI_CASES!r}:\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        try:\n"
        "            rc = main(argv)\n"
        "        except SystemExit as e:\n"
        "            rc = e.code\n"
        "    out.append((rc, err.getvalue()))\n"
        "print(json.dumps(out))\n"
    )
    run = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr[-2000:]
    import json

    results = json.loads(run.stdout.strip().splitlines()[-1])
    for argv, (rc, err) in zip(CLI_CASES, results):
        TRIED["cli"] += 1
        assert rc == 2, (argv, rc, err)
        lines = [line for line in err.strip().splitlines() if line.strip()]
        assert lines and "Traceback" not in err, (argv, err)
        # one error line (argparse's usage lines may precede its own)
        assert len([line for line in lines if line.startswith(f"vars-deq {argv[0]}: error: ")]) == 1, (argv, err)
    assert _files(tmp_path) == before, "a bad command wrote or changed a file"
    assert (tmp_path / "exists.png").read_bytes() == b"keep"


@pytest.mark.parametrize("case", API_CASES, ids=str)
def test_every_bad_api_case_is_refused(case):
    """The same cases, each one once (hypothesis above may draw some twice)."""
    with pytest.raises(ValueError):
        _api_call(case)


@settings(deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from(["tol", "lam", "adjoint_tol", "tau"]))
def test_any_float_is_taken_or_refused_with_a_value_error(value, name):
    TRIED["api"] += 1
    D, x = _good()
    try:
        if name == "lam":
            vd.SparseCoding(D, x, value)
        elif name == "tol":
            vd.solve(vd.SparseCoding(D, x, 0.1), "ista", max_steps=2, tol=value)
        elif name == "adjoint_tol":
            vd.Implicit(tol=value)
        else:
            vd.Phantom(tau=value)
    except ValueError as err:
        assert name.split("_")[-1] in str(err) or name in str(err)
    except Warning:
        pass
