from pathlib import Path

import pytest
import torch

from ffcompile.bundle import build_bundle

TINY_SPEC = Path(__file__).with_name("tiny.toml")


@pytest.fixture(scope="session")
def tiny_spec():
    return TINY_SPEC


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """Built once; tests that modify a bundle copy it first."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-x86"
    build_bundle(TINY_SPEC, "x86-cpu", out, infer_batch=50, verify_steps=5, progress=False, log=lambda _: None)
    return out


@pytest.fixture
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reference's small per-op matmuls: a second thread only adds latency
    yield
    torch.set_num_threads(threads)
