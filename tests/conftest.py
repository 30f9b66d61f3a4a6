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
