"""timm's own model test suite, run on the models vars_deq registers.

At test time the source distribution of the installed timm is fetched from the package registry
(``pip download --no-binary :all: --no-deps timm==<version>``; the test is skipped when that
fails, e.g. offline) and its ``tests/test_models.py`` runs in a pytest subprocess, restricted to
:data:`MODELS` by a small plugin (:data:`PLUGIN`), with our names classified like timm's ViTs:

- added to ``NON_STD_FILTERS`` (timm's list of transformer name patterns, whose models get the
  non-standard config test and no ``features_only`` hook test), as ``deit*`` and ``vit_*`` are;
- module ``vars_vit`` added to ``FEAT_INTER_FILTERS`` (the modules with ``forward_intermediates``
  and the ``features_only`` getter), as ``vision_transformer`` is.

Covered per model: forward (and grad checkpointing), backward (every parameter gets a gradient),
the non-standard config test (built under ``torch.device("meta")``, classifier reset, dtype change,
factory device), ``features_only`` with the getter, ``forward_intermediates``, layer pruning, fx
forward and backward (our attention layers are fx leaves), and TorchScript for the models without
VARS layers. TorchScript tests of the VARS models are skipped, with the reason in :data:`PLUGIN`.
The models are the five digits models and one DeiT-Tiny of each kind (the DeiT-Small ones differ
only in width); the whole run is one pytest subprocess (marked ``slow``).

The fast tests below check each of the fixes that suite needed, offline, on the digits models.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import timm
import torch
from timm.layers import create_feature_extractor, get_graph_node_names
from timm.models._features import FeatureGetterNet

import vars_deq
from vars_deq import VARSAttention
from vars_deq.models import PerformerAttention

MODELS = (
    "vars_s_digits", "vars_d_digits", "vars_sd_digits", "deit_digits", "performer_digits",
    "vars_s_deit_tiny_patch16_224", "vars_d_deit_tiny_patch16_224", "vars_sd_deit_tiny_patch16_224",
    "performer_deit_tiny_patch16_224",
)

#: loaded with ``-p`` before timm's test module is imported, so our models are registered when its
#: parametrizations call ``list_models``
PLUGIN = '''
import os

import pytest
import timm
import timm.models

import vars_deq.models  # noqa: F401  (registers the models)

SELECTED = frozenset(os.environ["VARS_TIMM_MODELS"].split(","))
TORCHSCRIPT_REASON = (
    "TorchScript is not supported by VARS layers: the iterative sparse-coding solve (solver objects, calls "
    "with **options, a torch.autograd.Function for the implicit backward) is Python torch.jit.script cannot compile"
)
_list_models = timm.list_models


def list_models(*args, **kwargs):
    """timm's list_models, restricted to the selected models (the suite is not run on timm's zoo)."""
    return [name for name in _list_models(*args, **kwargs) if name.split(".")[0] in SELECTED]


timm.list_models = timm.models.list_models = list_models


def pytest_configure(config):
    config.addinivalue_line("markers", "timeout(seconds): pytest-timeout's limit, not enforced here")


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("model_name") if callspec else None
        if name not in SELECTED:  # tests of named timm models, and empty parametrizations
            drop.append(item)
            continue
        if "torchscript" in item.name and name.startswith("vars_"):
            item.add_marker(pytest.mark.skip(reason=TORCHSCRIPT_REASON))
        keep.append(item)
    config.hook.pytest_deselected(items=drop)
    items[:] = keep
'''

#: (anchor, inserted line): our names and module, classified like timm's ViTs
CLASSIFY = (
    ("NON_STD_FILTERS = [\n", "    'vars_*', 'performer_*', 'deit_digits',\n"),
    ("FEAT_INTER_FILTERS = [\n", "    'vars_vit',\n"),
)


@pytest.fixture(scope="module")
def timm_suite(tmp_path_factory) -> Path:
    """timm's tests/test_models.py (patched as above) and its pytest config, in a fresh directory."""
    root = tmp_path_factory.mktemp("timm_suite")
    version = timm.__version__
    try:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", "--no-input",
             "--disable-pip-version-check", f"timm=={version}", "-d", str(root)],
            check=True, capture_output=True, text=True, timeout=240,
        )
    except subprocess.CalledProcessError as err:
        tail = " | ".join((err.stderr or err.stdout or "").strip().splitlines()[-2:])
        pytest.skip(f"cannot fetch timm {version}'s source distribution from the package registry: {tail}")
    except subprocess.TimeoutExpired:
        pytest.skip(f"fetching timm {version}'s source distribution from the package registry timed out")
    top = f"timm-{version}"
    # only the tests and the pytest config: the sdist's timm/ must not shadow the installed one
    wanted = {f"{top}/pyproject.toml", *(f"{top}/tests/{f}" for f in ("__init__.py", "conftest.py", "test_models.py"))}
    # the "data" filter exists from Python 3.10.12 / 3.11.4; the members are four named regular files anyway
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(root / f"{top}.tar.gz") as sdist:
        sdist.extractall(root, members=[m for m in sdist.getmembers() if m.name in wanted], **safe)
    suite = root / top
    test_file = suite / "tests" / "test_models.py"
    source = test_file.read_text()
    for anchor, line in CLASSIFY:
        assert source.count(anchor) == 1, f"timm {version}'s test_models.py has no single {anchor.strip()!r} list"
        source = source.replace(anchor, anchor + line)
    test_file.write_text(source)
    (suite / "vars_timm_plugin.py").write_text(PLUGIN)
    return suite


@pytest.mark.slow
def test_timm_model_suite_passes(timm_suite: Path):
    report = timm_suite / "report.xml"
    src = str(Path(vars_deq.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, (str(timm_suite), src, os.environ.get("PYTHONPATH")))),
        "VARS_TIMM_MODELS": ",".join(MODELS),
        "OMP_NUM_THREADS": "1",
    }
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "tests/test_models.py", "-p", "vars_timm_plugin", "-p", "no:cacheprovider",
         "-q", "-rfEs", "--tb=short", f"--junitxml={report}"],
        cwd=timm_suite, env=env, capture_output=True, text=True, timeout=900,
    )
    tail = run.stdout[-6000:] + run.stderr[-2000:]
    assert report.exists(), f"timm's suite did not run (exit {run.returncode}):\n{tail}"
    cases = list(ET.parse(report).getroot().iter("testcase"))
    failed = [c.get("name") for c in cases if c.find("failure") is not None or c.find("error") is not None]
    skipped = [c.get("name") for c in cases if c.find("skipped") is not None]
    passed = [c.get("name") for c in cases if c.get("name") not in failed and c.get("name") not in skipped]
    assert not failed, f"timm's test_models.py failed {len(failed)} of {len(cases)}: {failed}\n{tail}"
    assert run.returncode == 0, tail
    assert passed, f"timm's test_models.py ran no test on our models:\n{tail}"
    # only TorchScript of the VARS models is skipped; every model passes timm's tests otherwise
    assert all("torchscript" in name and "-vars_" in name for name in skipped), skipped
    for model in MODELS:
        assert any(name.endswith(f"-{model}]") for name in passed), f"no timm test passed on {model}"


# -- the fixes, one test each (offline, digits models) -----------------------------------------

DIGITS = ("vars_s_digits", "vars_d_digits", "vars_sd_digits", "performer_digits", "deit_digits")


def _images(batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 1, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("name", ["vars_s_digits", "vars_sd_digits", "performer_digits"])
def test_features_only_wraps_the_converted_model(name):
    torch.manual_seed(0)
    features = timm.create_model(name, features_only=True, out_indices=(1, 3)).eval()
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    assert isinstance(features, FeatureGetterNet)
    kinds = {type(m) for m in features.modules()}
    assert (VARSAttention if name.startswith("vars_") else PerformerAttention) in kinds
    x = _images()
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=(1, 3), intermediates_only=True)
        got = features(x)
    assert features.feature_info.channels() == [64, 64]
    assert len(got) == 2
    for g, e in zip(got, expected):
        assert g.shape == (2, 64, 4, 4)
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("name", DIGITS)
def test_builds_on_the_meta_device(name):
    with torch.device("meta"):
        model = timm.create_model(name)
    tensors = [*model.parameters(), *model.buffers()]
    assert tensors and all(t.is_meta for t in tensors)
    assert model.forward_features(torch.empty(1, 1, 8, 8, device="meta")).is_meta


def test_lam_is_still_validated():
    with pytest.raises(ValueError, match="lam must be finite and >= 0"):
        timm.create_model("vars_d_digits", lam=-0.1)
    with torch.device("meta"), pytest.raises(ValueError, match="lam must be finite and >= 0"):
        timm.create_model("vars_d_digits", lam=float("nan"))


@pytest.mark.parametrize("name", ["vars_sd_digits", "vars_s_digits", "performer_digits"])
def test_attention_layers_are_fx_leaves(name):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    _, nodes = get_graph_node_names(model)
    leaf = "blocks.0.attn"
    assert leaf in nodes and not any(n.startswith(leaf + ".") for n in nodes)
    extractor = create_feature_extractor(model, return_nodes={nodes[-1]: "out"})
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(extractor(x)["out"], model(x))


def test_performer_scripts():
    torch.manual_seed(0)
    model = timm.create_model("performer_digits").eval()
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(torch.jit.script(model)(x), model(x))
