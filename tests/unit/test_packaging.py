"""The built wheel installs one namespace, ``toposerve``, and works outside the checkout.

A fresh virtual environment in a temp dir gets the wheel (``--no-deps``); the
dependencies come from the test run's own environment through a ``.pth`` line, so
nothing is downloaded and the editable install of the checkout is not visible there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("brokers", "models", "consumers", "producers", "api", "deploy")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(the fresh environment's python, its site-packages), with the wheel installed."""
    root = tmp_path_factory.mktemp("wheel")
    # Built from a copy: setuptools writes build/ into the source tree, and a stale one
    # there could smuggle deleted modules into the wheel.
    source = shutil.copytree(REPO, root / "src", ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "bench-results"))
    wheels = root / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(source)],
                   check=True, cwd=root, capture_output=True)
    (wheel,) = wheels.glob("toposerve-*.whl")
    env_dir = root / "env"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    # The dependencies of this test run, without its editable toposerve (a plain path
    # entry: the .pth files there, the editable finder's among them, are not processed).
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
                   check=True, cwd=root, capture_output=True)
    return python, site


def _run(python: Path, *args: str, cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TOPOSERVE_"))}
    done = subprocess.run([str(python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_only_the_toposerve_namespace_lands_in_site_packages(installed: tuple[Path, Path]) -> None:
    _, site = installed
    top_level = {entry.name for entry in site.iterdir() if not entry.name.endswith((".dist-info", ".pth"))}
    assert "toposerve" in top_level
    assert not top_level & set(PACKAGES), f"top-level modules installed: {sorted(top_level & set(PACKAGES))}"
    assert {p.name for p in (site / "toposerve").iterdir() if p.is_dir()} >= set(PACKAGES)
    assert (site / "toposerve" / "deploy" / "models" / "manifest.json").is_file()  # package data


def test_every_package_imports_from_the_wheel_with_its_public_surface(installed: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    python, site = installed
    script = (
        "import importlib, sys\n"
        f"for name in {PACKAGES!r}:\n"
        "    module = importlib.import_module('toposerve.' + name)\n"
        "    print(name, module.__file__, len(getattr(module, '__all__', [])))\n"
        "    for symbol in getattr(module, '__all__', []):\n"
        "        getattr(module, symbol)\n"
    )
    out = _run(python, "-c", script, cwd=tmp_path)
    for line in out.splitlines():
        name, path, exported = line.split()
        assert path.startswith(str(site)), f"toposerve.{name} came from {path}, not the wheel"
        assert int(exported) > 0, f"toposerve.{name} lists nothing in __all__"


def test_the_command_line_runs_from_the_wheel(installed: tuple[Path, Path], tmp_path: Path) -> None:
    python, _ = installed
    profiles = _run(python, "-m", "toposerve", "profiles", cwd=tmp_path).split()
    assert {"asynchronous", "synchronous", "batch", "web_single"} <= set(profiles)
    topology = _run(python.parent / "toposerve", "topology", "--profile", "asynchronous", cwd=tmp_path)
    assert "toposerve.asynchronous.predict" in topology and "request.*" in topology
