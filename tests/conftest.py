from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="session")
def full_mnist_dir() -> Path:
    """The full official MNIST (four .gz files) kept beside the checkout, for tests only."""
    path = REPO_ROOT.parent / "shared" / "data" / "mnist"
    if not (path / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"full MNIST not found at {path} (expected the four official .gz files there)")
    return path


TINY_SPEC = REPO_ROOT / "tests" / "bundle" / "tiny.toml"


@pytest.fixture(scope="session")
def tiny_arm_bundle(tmp_path_factory) -> Path:
    """The tiny model cross-compiled for arm-cpu (TVM, aarch64); build-time parity runs the
    program checks on the host proxy only (no trajectory) to keep it quick. Shared by the bundle
    and the emulated-device tests."""
    import shutil

    from ffcompile.compiler.build import build_bundle

    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64-linux-gnu-gcc not installed (Debian package gcc-aarch64-linux-gnu; "
                    "run .ci/install_emulation.sh)")
    out = tmp_path_factory.mktemp("bundles") / "tiny-arm"
    build_bundle(TINY_SPEC, "arm-cpu", out, infer_batch=50, verify_steps=0, progress=False, log=lambda _: None)
    return out



@pytest.fixture(scope="session")
def tiny_spec():
    return TINY_SPEC


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory):
    """An x86-cpu bundle of tests/bundle/tiny.toml, built once per session; tests that modify a
    bundle copy it first."""
    from ffcompile.compiler.build import build_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-x86"
    build_bundle(TINY_SPEC, "x86-cpu", out, infer_batch=50, verify_steps=5, progress=False, log=lambda _: None)
    return out

