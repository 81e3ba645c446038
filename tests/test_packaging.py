"""The built wheel carries the CUDA sources where the loader looks for them, and every package.

The CUDA C sources stay in the top-level kernels/; pyproject.toml maps that folder to the package
``gpusaver._kernels``, and ``gpusaver.staging.cuda.kernels`` reads them with importlib.resources.
These tests build a real wheel (pip fetches setuptools from the package index for the isolated
build), install it into a folder of its own and import gpusaver from there, away from the checkout.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

from gpusaver.staging.cuda.kernels import _INSTALL_HINT, _KERNELS

REPO = Path(__file__).resolve().parents[1]
KERNEL_FILES = sorted(f"{stem}.cu" for stem in _KERNELS)
# Prints where the loader found the sources, where gpusaver came from, and what it read.
PROBE = """
import json, gpusaver
from gpusaver.staging.cuda import kernels
print(json.dumps({"dir": str(kernels._kernel_dir()), "package": gpusaver.__file__,
                  "sources": kernels.kernel_sources()}))
"""


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, args))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def _probe(tmp_path: Path, pythonpath: list[str]) -> dict:
    """Run PROBE in a fresh interpreter, cwd outside the checkout. ``-S`` skips site-packages'
    .pth files, so an editable install of this checkout cannot answer for what is tested; the
    interpreter's own site-packages (numpy, crc32c) come last on the path instead."""
    site = [sysconfig.get_paths()[k] for k in ("purelib", "platlib")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([*pythonpath, *dict.fromkeys(site)])
    cwd = tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    proc = _run([sys.executable, "-S", "-c", PROBE], cwd=cwd, env=env)
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory) -> Path:
    """The checkout without its VCS, venv and build outputs. Built from a copy because an in-tree
    build writes build/ and *.egg-info into the checkout, which concurrent runs would share."""
    dest = tmp_path_factory.mktemp("src") / "gpusaver-src"
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".hypothesis",
        ".pytest_cache", "results"))
    return dest


@pytest.fixture(scope="module")
def wheel(source_copy, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check",
          "-q", "-w", str(out), str(source_copy)])
    (built,) = out.glob("gpusaver-*.whl")
    return built


def test_wheel_carries_kernels_where_the_loader_looks(wheel):
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name in KERNEL_FILES:
            # importlib.resources.files("gpusaver._kernels") is gpusaver/_kernels/ in the wheel.
            assert f"gpusaver/_kernels/{name}" in names, sorted(names)
            assert zf.read(f"gpusaver/_kernels/{name}") == (REPO / "kernels" / name).read_bytes()
        assert "gpusaver/_kernels/__init__.py" in names
        # Mapped, not copied under its checkout name: no top-level package called "kernels".
        assert not any(n.startswith("kernels/") for n in names), sorted(names)


def test_wheel_has_every_module(wheel):
    """pyproject.toml lists its packages (find cannot add the mapped one): a package added under
    gpusaver/ and not listed there would be missing from the wheel."""
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    missing = sorted(
        p.relative_to(REPO).as_posix() for p in (REPO / "gpusaver").rglob("*.py")
        if "__pycache__" not in p.parts and p.relative_to(REPO).as_posix() not in names)
    assert not missing, (f"not in the wheel: {missing}; add their packages to "
                         "[tool.setuptools] packages in pyproject.toml")


def test_wheel_offers_the_extras_the_install_hint_names(wheel):
    with zipfile.ZipFile(wheel) as zf:
        (meta_name,) = [n for n in zf.namelist() if n.endswith(".dist-info/METADATA")]
        meta = Parser().parsestr(zf.read(meta_name).decode())
    extras = set(meta.get_all("Provides-Extra"))
    hinted = set(re.findall(r"gpusaver\[(\w+)\]", _INSTALL_HINT))
    assert hinted and hinted <= extras, (hinted, extras)
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("cupy-cuda13x") and 'extra == "cuda13"' in r for r in requires)
    assert any(r.startswith("cupy-cuda12x") and 'extra == "cuda12"' in r for r in requires)
    assert any(r.startswith("gpusaver[cuda13]") and 'extra == "cuda"' in r for r in requires)


def test_installed_wheel_finds_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile",
          "--disable-pip-version-check", "-q", "--target", str(target), str(wheel)])
    found = _probe(tmp_path, [str(target)])
    target = target.resolve()
    assert Path(found["package"]).resolve().is_relative_to(target), found["package"]
    assert Path(found["dir"]).resolve() == target / "gpusaver" / "_kernels", found["dir"]
    assert found["sources"] == {
        Path(n).stem: (REPO / "kernels" / n).read_text(encoding="utf-8") for n in KERNEL_FILES}


def test_source_tree_without_install_falls_back_to_its_kernels(source_copy, tmp_path):
    """As on a machine that puts a checkout on PYTHONPATH instead of installing it."""
    found = _probe(tmp_path, [str(source_copy)])
    source_copy = source_copy.resolve()
    assert Path(found["package"]).resolve().is_relative_to(source_copy), found["package"]
    assert Path(found["dir"]).resolve() == source_copy / "kernels", found["dir"]
    assert set(found["sources"]) == set(_KERNELS)


def test_editable_install_maps_kernels_to_the_checkout(tmp_path):
    """``pip install -e .`` (how the README and CI install) resolves gpusaver._kernels to the
    checkout's kernels/ through setuptools' editable finder, not through the fallback."""
    # In a subprocess outside the checkout: ``python -m pytest`` puts the checkout on sys.path,
    # where a stale gpusaver.egg-info would stand in for the installed distribution.
    probe = """if True:
        import importlib.metadata, importlib.util, json
        try:
            url = importlib.metadata.distribution("gpusaver").read_text("direct_url.json")
        except importlib.metadata.PackageNotFoundError:
            url = None
        from gpusaver.staging.cuda import kernels
        print(json.dumps([url, importlib.util.find_spec("gpusaver._kernels").origin,
                          str(kernels._kernel_dir())]))
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = _run([sys.executable, "-c", probe], cwd=tmp_path, env=env)
    url, origin, found = json.loads(proc.stdout.strip().splitlines()[-1])
    if url is None:
        pytest.skip("gpusaver is not installed")
    if not json.loads(url).get("dir_info", {}).get("editable"):
        pytest.skip("gpusaver is not installed in editable mode")
    origin, found = Path(origin).resolve(), Path(found).resolve()
    if not origin.is_relative_to(REPO):
        pytest.skip(f"the editable install is of another checkout ({origin})")
    assert origin == REPO / "kernels" / "__init__.py"
    assert found == REPO / "kernels"
