"""Your own image data (input.dataset = "images"): IDX files with their own SHA256SUMS, a .npz file
and a folder of PNGs per class each train through the CLI; data that does not fit the spec, or
files that fail their sums, stop with one line naming what is wrong."""

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ffcompile.core.spec import load_model
from ffcompile.data.datasets import load_model_split
from ffcompile.data.idx import DataError, encode_idx

TINY = Path(__file__).parents[1] / "bundle" / "tiny.toml"


def images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n 28x28 uint8 images whose class is a bright 4-row band at a class-dependent height."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n)
    x = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(y):
        x[i, 2 + 2 * label:6 + 2 * label] = 250
    return x, y


@pytest.fixture
def spec(tmp_path) -> Path:
    model = load_model(TINY)
    path = tmp_path / "tiny-images.json"
    path.write_text(dataclasses.replace(model, input=dataclasses.replace(model.input, dataset="images")).dumps())
    return path


def train(spec: Path, data, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ffcompile", "train", str(spec), "--data-dir", str(data), "--out",
                           str(out), "--epochs", "1", "--no-progress"], capture_output=True, text=True, timeout=300)


def write_idx(folder: Path, sums: bool = True) -> Path:
    folder.mkdir()
    (x_train, y_train), (x_test, y_test) = images(60, 0), images(20, 1)
    arrays = {"fashion-train-images-idx3-ubyte": x_train, "fashion-train-labels-idx1-ubyte": y_train.astype(np.uint8),
              "fashion-t10k-images-idx3-ubyte": x_test, "fashion-t10k-labels-idx1-ubyte": y_test.astype(np.uint8)}
    for name, array in arrays.items():
        (folder / name).write_bytes(encode_idx(array))
    if sums:
        (folder / "SHA256SUMS").write_text("".join(f"{hashlib.sha256((folder / n).read_bytes()).hexdigest()}  {n}\n"
                                                   for n in arrays))
    return folder


def test_an_idx_set_with_its_own_sums_trains(tmp_path, spec):
    data = write_idx(tmp_path / "fashion")
    done = train(spec, data, tmp_path / "run")
    assert done.returncode == 0, done.stderr
    assert "idx data in" in done.stderr and "checked against SHA256SUMS" in done.stderr
    assert (tmp_path / "run" / "checkpoint.safetensors").is_file()


def test_an_idx_file_that_fails_its_sum_is_refused(tmp_path, spec):
    data = write_idx(tmp_path / "fashion")
    (data / "fashion-train-labels-idx1-ubyte").write_bytes(encode_idx(np.zeros(60, np.uint8)))
    with pytest.raises(DataError, match="checksum mismatch for .*fashion-train-labels.*SHA256SUMS"):
        load_model_split(load_model(spec), data, "train")


def test_the_mnist_dataset_points_other_idx_sets_to_images(tmp_path):
    data = write_idx(tmp_path / "mnist-named", sums=False)
    for old in data.iterdir():
        old.rename(data / old.name.replace("fashion-", ""))
    with pytest.raises(DataError, match='input.dataset = "images"'):
        load_model_split(load_model(TINY), data, "train")


def test_an_npz_file_trains_and_must_fit_the_spec(tmp_path, spec):
    (x_train, y_train), (x_test, y_test) = images(60, 0), images(20, 1)
    np.savez(tmp_path / "digits.npz", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    done = train(spec, tmp_path / "digits.npz", tmp_path / "run")
    assert done.returncode == 0, done.stderr
    np.savez(tmp_path / "small.npz", x_train=x_train[:, :8, :8], y_train=y_train, x_test=x_test[:, :8, :8], y_test=y_test)
    with pytest.raises(DataError, match="64 values per image .8x8 x 1 channels., but the model's input.size is 784"):
        load_model_split(load_model(spec), tmp_path / "small.npz", "train")
    np.savez(tmp_path / "many.npz", x_train=x_train, y_train=y_train + 5, x_test=x_test, y_test=y_test)
    with pytest.raises(DataError, match="label 14 needs at least 15 classes, the model's input.label.classes is 10"):
        load_model_split(load_model(spec), tmp_path / "many.npz", "train")


def test_a_folder_of_pngs_per_class_trains(tmp_path, spec):
    from PIL import Image

    for part, (x, y) in (("train", images(60, 0)), ("test", images(20, 1))):
        for i, (image, label) in enumerate(zip(x, y)):
            folder = tmp_path / "pngs" / part / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{i}.png")
    source, x, y = load_model_split(load_model(spec), tmp_path / "pngs", "val")
    assert x.shape == (10, 784) and 0.0 <= x.min() and x.max() <= 1.0
    assert len(set(y.tolist())) > 3  # shuffled before the split: validation is not one class
    done = train(spec, tmp_path / "pngs", tmp_path / "run")
    assert done.returncode == 0, done.stderr
