"""The device install: the wheel with only its `runtime` extra (numpy, onnxruntime, safetensors,
click, tqdm), in a fresh virtual environment without torch, runs and fine-tunes a bundle."""

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).parents[2]
# the venv must see only what it installed (a PYTHONPATH to a checkout would satisfy the wheel)
CLEAN = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}


@pytest.fixture(scope="module")
def runtime_env(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runtime-env")
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(REPO)], check=True,
                   capture_output=True)
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    wheel = next(wheels.glob("ffcompile-*.whl"))
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", f"{wheel}[runtime]"], capture_output=True,
                             text=True, env=CLEAN)
    if install.returncode:
        pytest.fail(f"pip install {wheel.name}[runtime] failed: {install.stderr[-2000:]}")
    return root / "venv" / "bin"


def test_the_runtime_extra_runs_and_finetunes_a_bundle_without_torch(runtime_env, tiny_bundle, tmp_path):
    python = str(runtime_env / "python")
    missing = subprocess.run([python, "-c", "import torch"], capture_output=True, text=True, env=CLEAN)
    assert missing.returncode != 0 and "No module named 'torch'" in missing.stderr
    ffcompile = str(runtime_env / "ffcompile")
    run = subprocess.run([ffcompile, "run", str(tiny_bundle), "--json"], capture_output=True, text=True, cwd=tmp_path, env=CLEAN)
    assert run.returncode == 0, run.stderr
    assert set(json.loads(run.stdout)["readouts"]) == {"goodness", "softmax"}
    out = tmp_path / "tuned"
    tune = subprocess.run([ffcompile, "finetune", str(tiny_bundle), "--epochs", "1", "--limit", "200", "--out", str(out),
                           "--no-progress"], capture_output=True, text=True, cwd=tmp_path, env=CLEAN)
    assert tune.returncode == 0, tune.stderr
    assert (out / "checkpoint.safetensors").is_file()
    rerun = subprocess.run([ffcompile, "run", str(tiny_bundle), "--weights", str(out / "checkpoint.safetensors"), "--json"],
                           capture_output=True, text=True, cwd=tmp_path, env=CLEAN)
    assert rerun.returncode == 0, rerun.stderr
