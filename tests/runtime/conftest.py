from pathlib import Path

import pytest

from ffcompile.bundle import build_bundle

TINY_SPEC = Path(__file__).parents[1] / "bundle" / "tiny.toml"


@pytest.fixture(scope="session")
def tiny_spec():
    return TINY_SPEC


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """Built once; tests that modify a bundle copy it first."""
    out = tmp_path_factory.mktemp("bundles") / "tiny-x86"
    build_bundle(TINY_SPEC, "x86-cpu", out, infer_batch=50, verify_steps=0, progress=False, log=lambda _: None)
    return out


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    import shutil

    dest = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dest)
    return dest
