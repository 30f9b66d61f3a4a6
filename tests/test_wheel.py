"""A normal (non-editable) install works: the wheel ships the target and model specs, and the
installed package, not the checkout, lists targets and builds a bundle."""

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # setuptools writes build/ and *.egg-info beside the sources: not in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "build", "*.egg-info")
    for name in ("ffcompile", "targets", "models"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copyfile(REPO / name, source / name)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(out), str(source)], capture_output=True, text=True, timeout=300)
    if result.returncode != 0 and "No module named" in result.stderr:
        pytest.skip(f"cannot build wheels here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    return next(out.glob("ffcompile-*.whl"))


def test_wheel_ships_targets_and_models(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for folder in ("targets", "models"):
        shipped = {Path(n).name for n in names if f"/{folder}/" in n and n.endswith(".toml")}
        assert shipped == {p.name for p in (REPO / folder).glob("*.toml")}, folder
    assert "ffcompile/emulation/insn_count.c" in names  # verify --emulate builds its instruction counter from it


def test_installed_wheel_lists_targets_and_builds(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # the dependencies (and pip) from the environment running the tests, after the venv's own packages:
    # --system-site-packages would give the base interpreter's, not those of a venv the tests run in
    (next(venv.glob("lib/python*/site-packages")) / "outer.pth").write_text("\n".join(site.getsitepackages()))
    python = venv / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FFCOMPILE_TARGETS")}
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)], check=True,
                   env=env, cwd=tmp_path, timeout=120)
    where = subprocess.run([str(python), "-c", "import ffcompile; print(ffcompile.__file__)"], capture_output=True,
                           text=True, env=env, cwd=tmp_path, check=True).stdout.strip()
    assert Path(where).is_relative_to(venv), f"imported {where}, not the wheel installed in {venv}"

    ffcompile = str(venv / "bin" / "ffcompile")
    listed = subprocess.run([ffcompile, "targets"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert {"x86-cpu", "x86-cpu-tvm", "arm-cpu"} <= {line.split()[0] for line in listed.stdout.splitlines()[1:]}

    spec = tmp_path / "tiny.toml"
    spec.write_text((REPO / "tests" / "bundle" / "tiny.toml").read_text())
    built = subprocess.run([ffcompile, "build", str(spec), "--target", "x86-cpu", "-o", str(tmp_path / "b"),
                            "--verify-steps", "0", "--infer-batch", "50", "--no-progress"],
                           capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "b" / "bundle.digest").is_file()
    # a shipped model spec by name: the checkout's models/ folder is not there
    inspected = subprocess.run([ffcompile, "inspect", "mnist-small", "--batch", "10"], capture_output=True, text=True, env=env,
                               cwd=tmp_path, timeout=120)
    assert inspected.returncode == 0 and '"name": "mnist-small"' in inspected.stdout, inspected.stderr
