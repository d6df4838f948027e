"""Models built on the REAL `reactor-runtime` package from PyPI, run by reactor-graph.

The real package is installed per version (pinned: 0.0.4 of the 0.0.x line, 1.7.5 of the 1.x line) into a folder of
its own with `pip install --no-deps --target`, plus only what `import reactor_runtime` needs (its full dependency
set pulls LiveKit, FastAPI/uvicorn, aiortc pins, supabase, redis and OpenTelemetry exporters, and pins numpy<2):

    0.0.x: boto3, tqdm, supabase   (reactor_cli.utils imports them at module level; nothing here calls them)
    1.x:   boto3, tqdm, omegaconf, opentelemetry-api

Packages this environment already has (pydantic, numpy, pyyaml, ...) are removed from that folder so the
environment's own copies are the ones imported. The checks themselves (tests/compat/real/checks_real_runtime.py)
then run in a pytest subprocess with that folder first on PYTHONPATH, so this process keeps reactor-graph's stand-in
for the shim tests. Where the registry cannot be reached the tests skip, saying so. The folder is kept between runs
in $REACTOR_RUNTIME_TEST_CACHE (default: <tmp>/reactor-graph-real-runtime).

Also here, in this process (no real package): manifests as the documentation writes them (a bare runtime version)
load, `VideoModel.weights(name)` of the stand-in resolves locally, `show` and /health name the runtime.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

import pytest

from reactor_graph.compat import VideoModel, load_manifest, open_manifest
from reactor_graph.compat.weights import WeightsNotFound
from reactor_graph.errors import GraphError

from .conftest import MODELS, Collector

HERE = Path(__file__).parent
CHECKS = HERE / "real" / "checks_real_runtime.py"
IMPORT_NEEDS = {"0.0.4": ["boto3", "tqdm", "supabase"], "1.7.5": ["boto3", "tqdm", "omegaconf", "opentelemetry-api"]}


def _pip(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", *args], capture_output=True,
                          text=True, timeout=timeout)


def _prune_what_we_have(target: Path) -> None:
    """Remove from `target` every distribution this environment already provides (by its RECORD)."""
    for info in target.glob("*.dist-info"):
        dist = metadata.Distribution.at(info)
        name = dist.metadata["Name"]
        if name.lower().replace("_", "-") == "reactor-runtime":
            continue
        try:
            metadata.distribution(name)  # in this environment (target is not on sys.path here)
        except metadata.PackageNotFoundError:
            continue
        for f in dist.files or []:
            p = (target / f).resolve()
            if p.is_relative_to(target.resolve()) and p.is_file():
                p.unlink()
        shutil.rmtree(info, ignore_errors=True)
    for d in sorted(target.rglob("*"), key=lambda p: -len(p.parts)):  # now-empty package folders
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()


def real_runtime(version: str) -> Path:
    """A folder holding reactor-runtime==version and what importing it needs; skip if it cannot be installed."""
    cache = Path(os.environ.get("REACTOR_RUNTIME_TEST_CACHE", Path(tempfile.gettempdir()) / "reactor-graph-real-runtime"))
    target = cache / f"reactor-runtime-{version}"
    if (target / ".complete").exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"rr-{version}-", dir=cache))
    try:
        r = _pip("install", "-q", "--no-deps", "--target", str(work), f"reactor-runtime=={version}")
        if r.returncode:
            pytest.skip(f"cannot install reactor-runtime=={version} from the package registry: {r.stderr[-400:]}")
        r = _pip("install", "-q", "--target", str(work), *IMPORT_NEEDS[version])
        if r.returncode:
            pytest.skip(f"cannot install what importing reactor-runtime=={version} needs "
                        f"({', '.join(IMPORT_NEEDS[version])}): {r.stderr[-400:]}")
        _prune_what_we_have(work)
        (work / ".complete").write_text(version)
        try:
            work.rename(target)
        except OSError:  # another run got there first
            pass
    except subprocess.TimeoutExpired:
        pytest.skip(f"installing reactor-runtime=={version} took too long")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


@pytest.mark.slow
@pytest.mark.parametrize("version", ["0.0.4", "1.7.5"])
def test_models_on_the_real_reactor_runtime(version, tmp_path):
    target = real_runtime(version)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "REACTOR_RUNTIME_UNDER_TEST": version, "HOME": str(tmp_path)}  # HOME: no ~/.cache/reactor_registry
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-W", "ignore::DeprecationWarning",
                        "--basetemp", str(tmp_path / "t"), str(CHECKS)], capture_output=True, text=True, env=env,
                       cwd=HERE.parent.parent, timeout=540)
    assert r.returncode == 0, f"reactor-runtime {version}:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]


# ---------------------------------------------------------------------------------------------- no real package
def doc_manifest(folder: Path, **over) -> Path:
    shutil.copy(MODELS / "prompt_model.py", folder / "prompt_model.py")
    data = {"class": "prompt_model:PromptModel", "model_name": "prompt-model", "model_version": "0.0.1",
            "reactor-runtime": "0.0.0", "args": {"size": 16}, "weights": [], **over}
    (folder / "manifest.json").write_text(json.dumps(data, indent=2))
    return folder / "manifest.json"


def test_the_documentations_bare_runtime_version_loads_and_is_shown(tmp_path):
    host = open_manifest(doc_manifest(tmp_path))
    assert host.runtime["written_for"] == "0.0.0" and host.runtime["notes"] == []
    assert host.runtime["driven_by"]["package"] == "reactor_graph.compat"
    res = Collector().start(host, max_blocks=2).wait_end()
    assert res.ok and res.blocks == 2
    for spec in (">=0.0.3", "1.7.5", "v0.0.4", "~=1.4"):  # ranges keep working, other bare versions too
        assert load_manifest(doc_manifest(tmp_path, **{"reactor-runtime": spec})).manifest.runtime == spec


def test_a_runtime_version_that_is_neither_is_refused_and_2x_warns(tmp_path):
    with pytest.raises(GraphError, match=r"reactor-runtime: 'latest' is neither a version .* nor a version range"):
        load_manifest(doc_manifest(tmp_path, **{"reactor-runtime": "latest"}))
    lm = load_manifest(doc_manifest(tmp_path, **{"reactor-runtime": "2.10.1"}))
    assert lm.notes and "2.x API (ReactorModel, @event) is not provided" in lm.notes[0]


def test_weights_names_resolve_locally_and_a_missing_one_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    wdir = tmp_path / "wdir"
    (wdir / "Tiny").mkdir(parents=True)
    m = doc_manifest(tmp_path, weights=["Tiny"])
    with pytest.raises(GraphError) as info:
        load_manifest(m)
    msg = str(info.value)
    assert "weights[0]: weights 'Tiny' not found; searched" in msg and str(tmp_path / "Tiny") in msg
    assert "never downloads" in msg and "--weights-dir" in msg
    host = open_manifest(m, weights_dir=[wdir])
    assert VideoModel.weights("Tiny") == wdir / "Tiny"  # the stand-in's VideoModel.weights
    with pytest.raises(WeightsNotFound, match=r"'Other' is not in the manifest's weights: Tiny"):
        VideoModel.weights("Other")
    assert host.manifest.weights == [wdir / "Tiny"]
    m = doc_manifest(tmp_path, weights={"Tiny": "wdir/Tiny"})  # the manifest's own mapping, relative to it
    open_manifest(m)
    assert VideoModel.weights("Tiny") == wdir / "Tiny"


def test_show_and_health_name_the_runtime(tmp_path):
    from typer.testing import CliRunner

    from reactor_graph.cli import app

    m = doc_manifest(tmp_path)
    r = CliRunner().invoke(app, ["show", str(m)])
    assert r.exit_code == 0, r.output
    assert "prompt-model 0.0.1" in r.output and "written for 0.0.0; driven by reactor-graph's VideoModel API" in r.output
    r = CliRunner().invoke(app, ["show", str(m), "--json"])
    assert json.loads(r.output)["runtime"]["written_for"] == "0.0.0"

    import asyncio

    from aiohttp.test_utils import make_mocked_request

    from reactor_graph.server.app import Server

    host = open_manifest(m)

    async def health():
        server = Server(host)
        return json.loads((await server.health(make_mocked_request("GET", "/health"))).body)

    body = asyncio.run(health())
    assert body["runtime"]["written_for"] == "0.0.0" and body["runtime"]["driven_by"]["package"] == "reactor_graph.compat"
