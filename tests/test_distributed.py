"""Training on torch.distributed (gloo, CPU, 2 processes), data-parallel and layer-pipelined: the
same parameters as one process with the whole batch, through the worker
(tests/distributed_worker.py) and the CLI; resume with another process count; a process that dies
stops the others with a one-line error."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

TESTS = Path(__file__).parent
WORKER = TESTS / "distributed_worker.py"
TINY = TESTS / "bundle" / "tiny.toml"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1", "FFCOMPILE_DIST_TIMEOUT": "60"}


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]


def worker_params(tmp_path, nproc: int, *flags: str) -> dict:
    out = tmp_path / f"params-{nproc}.npz"
    command = torchrun(nproc, str(WORKER), str(out), *flags) if nproc > 1 else [sys.executable, str(WORKER), str(out), *flags]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(out))


def assert_close(got: dict, want: dict, rtol: float) -> None:
    assert got.keys() == want.keys()
    for name, value in want.items():
        scale = max(float(np.abs(value).max()), 1e-30)
        assert float(np.abs(got[name] - value).max()) <= rtol * scale, name


def _farthest(got: dict, exact: dict) -> float:
    """The largest relative distance of a parameter or state tensor from ``exact``'s."""
    return max(float(np.abs(got[k] - v).max()) / max(float(np.abs(v).max()), 1e-30) for k, v in exact.items())


def assert_within_fp32_rounding(tmp_path, two: dict, *one_flags: str) -> None:
    """fp32, 20 steps: the two-process run no farther from the float64 trajectory than twice the
    one-process fp32 run is. Rounding drifts to about 1e-4 relative over these steps, and the
    splits round differently, so the two fp32 runs need not agree more closely than that (the
    float64 cases check the arithmetic itself to 1e-12)."""
    exact = worker_params(tmp_path, 1, "--float64", *one_flags)
    assert two.keys() == exact.keys()
    assert _farthest(two, exact) <= 2 * _farthest(worker_params(tmp_path, 1, *one_flags), exact)


@pytest.mark.parametrize("flags,rtol", [(("--float64", "--sgd"), 1e-12), (("--float64",), 1e-9)],
                         ids=["float64-sgd", "float64-adam"])
def test_two_processes_compute_the_one_process_step(tmp_path, flags, rtol):
    """20 steps: every parameter and optimizer state within rtol of one process's. Sharded sums
    round differently from whole-batch ones, and Adam divides each gradient by its own running
    size, which magnifies that rounding where a gradient is near 0 (to 1.1e-10 in float64 here).
    (tests/lowering/test_sharded_step.py checks one Adam step to 1e-12.)"""
    assert_close(worker_params(tmp_path, 2, *flags), worker_params(tmp_path, 1, *flags), rtol)


def test_two_processes_in_fp32_stay_within_its_rounding(tmp_path):
    assert_within_fp32_rounding(tmp_path, worker_params(tmp_path, 2, "--sgd"), "--sgd")


@pytest.mark.parametrize("flags,rtol", [(("--float64", "--sgd"), 1e-12), (("--float64",), 1e-9)],
                         ids=["float64-sgd", "float64-adam"])
def test_two_pipelined_processes_compute_the_one_process_step(tmp_path, flags, rtol):
    """Layer-pipelined (h1 on one process, h2 and the readout on the other, 4 micro-batches of 5
    rows): 20 steps within rtol of one process's. On the built-in MNIST images: on random pixels
    this net's layers blow up (goodness in the thousands) and die within 10 steps."""
    assert_close(worker_params(tmp_path, 2, "--pipeline", "--mnist", *flags), worker_params(tmp_path, 1, "--mnist", *flags),
                 rtol)


def test_two_pipelined_processes_in_fp32_stay_within_its_rounding(tmp_path):
    assert_within_fp32_rounding(tmp_path, worker_params(tmp_path, 2, "--pipeline", "--mnist", "--sgd"), "--mnist", "--sgd")


def test_two_pipelined_processes_train_an_unsupervised_model_as_one(tmp_path):
    """Hybrid-image negatives made on stage 0, the readout's features of h1 streamed up with the
    rows to the stage of h2, where the readout learns: 20 steps, float64, as one process."""
    flags = ("--pipeline", "--mnist", "--unsupervised", "--float64", "--sgd")
    assert_close(worker_params(tmp_path, 2, *flags), worker_params(tmp_path, 1, *flags[1:]), 1e-12)


@pytest.fixture
def sgd_spec(tmp_path) -> Path:
    """tests/bundle/tiny.toml with SGD (see the test above for why not Adam, in fp32)."""
    import dataclasses

    from ffcompile.core.spec import Optimizer, load_model

    path = tmp_path / "tiny-sgd.json"
    path.write_text(dataclasses.replace(load_model(TINY), optimizer=Optimizer(kind="sgd", lr=0.05)).dumps())
    return path


def train(spec, run_dir, epochs: int, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ffcompile", "train", str(spec), "--out", str(run_dir), "--epochs", str(epochs),
               "--limit", "200", "--no-progress", *extra]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_cli_runs_data_parallel_and_resumes_with_another_process_count(tmp_path, sgd_spec):
    """Epoch 1 in 2 processes, epoch 2 resumed in 1, against 2 epochs in 1 process."""
    first = train(sgd_spec, tmp_path / "split", 1, "--nproc", "2")
    assert "data-parallel: 2 processes" in first.stderr
    train(sgd_spec, tmp_path / "split", 2, "--resume")
    train(sgd_spec, tmp_path / "single", 2)
    assert_close(load_file(tmp_path / "split" / "checkpoint.safetensors"),
                 load_file(tmp_path / "single" / "checkpoint.safetensors"), 1e-5)


def test_cli_resumes_layer_pipelined_with_another_process_count(tmp_path, sgd_spec):
    """Epoch 1 in 1 process, epoch 2 resumed layer-pipelined in 2 (each takes its layers from the
    whole checkpoint; rank 0 gathers the model for the new one), against 2 epochs in 1 process."""
    train(sgd_spec, tmp_path / "split", 1, "--backend", "torch")
    second = train(sgd_spec, tmp_path / "split", 2, "--resume", "--nproc", "2", "--parallel", "pipeline")
    assert "layer-pipelined: 2 processes, layers h1 | h2, 4 micro-batches" in second.stderr
    train(sgd_spec, tmp_path / "single", 2, "--backend", "torch")
    assert_close(load_file(tmp_path / "split" / "checkpoint.safetensors"),
                 load_file(tmp_path / "single" / "checkpoint.safetensors"), 1e-5)


def test_cli_job_that_fails_ends_with_its_processes_one_line_errors(tmp_path, sgd_spec):
    """An error every process raises (a compiled backend) reaches the user as the processes' own
    one-line errors and exit code, without torchrun's log lines or traceback."""
    command = [sys.executable, "-m", "ffcompile", "train", str(sgd_spec), "--out", str(tmp_path / "run"), "--limit", "200",
               "--nproc", "2", "--backend", "onnxruntime"]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors and all("training on several processes runs the torch reference" in e for e in errors), done.stderr
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr, done.stderr


def test_cli_refuses_more_pipeline_processes_than_layers(tmp_path, sgd_spec):
    command = [sys.executable, "-m", "ffcompile", "train", str(sgd_spec), "--out", str(tmp_path / "run"), "--limit", "200",
               "--nproc", "3", "--parallel", "pipeline"]
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "error: model 'tiny' has 2 layers: it cannot be split into 3 pipeline stages" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("mode", [(), ("--pipeline",)], ids=["data-parallel", "pipelined"])
def test_a_process_that_dies_stops_the_others_with_one_line(tmp_path, mode):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
               "WORLD_SIZE": "2"}
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path / "out.npz"), "--die-at", "5", *mode], env=env,
                                      stderr=subprocess.PIPE, text=True))
    _, err = procs[0].communicate(timeout=120)  # bounded: the survivor must not hang
    procs[1].wait(timeout=30)
    assert procs[1].returncode == 3
    assert procs[0].returncode == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "lost the other processes" in lines[0], err
    assert "Traceback" not in err


def test_each_process_of_a_job_gets_its_own_gpu(monkeypatch):
    from ffcompile.reference.distributed import local_device

    monkeypatch.setenv("LOCAL_RANK", "3")
    assert (local_device("cuda"), local_device("cuda:1"), local_device("cpu")) == ("cuda:3", "cuda:1", "cpu")
