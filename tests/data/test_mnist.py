import functools
import gzip
import hashlib
import http.server
import shutil
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from ffcompile.data import DataError, download_mnist, load_mnist, read_idx, resolve_data_dir, write_idx
from ffcompile.data import mnist

REPO_ROOT = Path(__file__).parents[2]
GZ_NAMES = [name + ".gz" for name in mnist.FILES.values()]


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(autouse=True)
def no_env_data_dir(monkeypatch):
    monkeypatch.delenv(mnist.ENV_VAR, raising=False)


def link_files(src_dir, dest_dir, names=GZ_NAMES):
    dest_dir.mkdir(exist_ok=True)
    for name in names:
        (dest_dir / name).symlink_to(Path(src_dir) / name)
    return dest_dir


@pytest.fixture
def fake_builtin(tmp_path, monkeypatch):
    """A tiny made-up MNIST (12 train / 6 test) standing in for the built-in subset (no official sums apply)."""
    rng = np.random.default_rng(0)
    arrays = {
        "train_images": rng.integers(0, 256, (12, 28, 28), dtype=np.uint8),
        "train_labels": np.arange(12, dtype=np.uint8) % 10,
        "test_images": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "test_labels": np.arange(6, dtype=np.uint8),
    }
    for role, array in arrays.items():
        write_idx(tmp_path / (mnist.FILES[role] + ".gz"), array)
    monkeypatch.setattr(mnist, "BUILTIN_DIR", tmp_path)
    return tmp_path, arrays


# --- built-in subset -------------------------------------------------------------------------


def test_builtin_is_the_default():
    source = resolve_data_dir(None)
    assert source.builtin and source.path == mnist.BUILTIN_DIR
    assert source.describe() == "built-in MNIST subset (5000 train / 1000 test)"
    assert resolve_data_dir("builtin").builtin


def test_builtin_checksums():
    sums = mnist._read_sums(mnist.BUILTIN_DIR / "SHA256SUMS")
    assert sorted(sums) == sorted(GZ_NAMES)
    for name, digest in sums.items():
        assert sha256(mnist.BUILTIN_DIR / name) == digest
    resolve_data_dir("builtin").verify()


def test_builtin_split_sizes():
    # The validation split is the last n // 6 rows of the training file: 5000 // 6 = 833, leaving 4167.
    sizes = {split: len(load_mnist("builtin", split)[1]) for split in mnist.SPLITS}
    assert sizes == {"train": 4167, "val": 833, "trainval": 5000, "test": 1000}


def test_builtin_values():
    images, labels = load_mnist(None, "test")
    assert images.dtype == np.float32 and images.shape == (1000, 784)
    assert labels.dtype == np.int64 and labels.shape == (1000,)
    assert images.min() == 0.0 and images.max() == 1.0
    assert set(labels.tolist()) == set(range(10))


def test_builtin_subset_is_reproducible_from_full_mnist(full_mnist_dir, tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "tools"))
    try:
        import make_mnist_subset
    finally:
        sys.path.remove(str(REPO_ROOT / "tools"))
    make_mnist_subset.make_subset(full_mnist_dir, tmp_path)
    # Compare contents, not gzip bytes: those may differ under another zlib build.
    for name in GZ_NAMES:
        np.testing.assert_array_equal(read_idx(tmp_path / name), read_idx(mnist.BUILTIN_DIR / name), err_msg=name)
    assert mnist._read_sums(tmp_path / "SHA256SUMS") == {name: sha256(tmp_path / name) for name in GZ_NAMES}


# --- splits ----------------------------------------------------------------------------------


def test_splits_slice_the_training_file_in_order(fake_builtin):
    _, arrays = fake_builtin
    train_x, train_y = load_mnist(None, "train")
    val_x, val_y = load_mnist(None, "val")
    all_x, all_y = load_mnist(None, "trainval")
    assert len(train_y) == 10 and len(val_y) == 2  # 12 // 6 = 2
    np.testing.assert_array_equal(np.concatenate([train_y, val_y]), all_y)
    np.testing.assert_array_equal(np.concatenate([train_x, val_x]), all_x)
    np.testing.assert_array_equal(all_y, arrays["train_labels"])
    np.testing.assert_allclose(all_x * 255, arrays["train_images"].reshape(12, 784), atol=1e-4)
    test_x, test_y = load_mnist(None, "test")
    np.testing.assert_array_equal(test_y, arrays["test_labels"])


def test_unknown_split(fake_builtin):
    with pytest.raises(DataError, match="unknown MNIST split 'validation'.*train, val, trainval, test"):
        load_mnist(None, "validation")


def test_label_count_mismatch(fake_builtin):
    directory, _ = fake_builtin
    write_idx(directory / "t10k-labels-idx1-ubyte.gz", np.zeros(5, dtype=np.uint8))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz: expected 6 uint8 labels"):
        load_mnist(None, "test")


def test_label_out_of_range(fake_builtin):
    directory, _ = fake_builtin
    write_idx(directory / "t10k-labels-idx1-ubyte.gz", np.full(6, 10, dtype=np.uint8))
    with pytest.raises(DataError, match="label 10 is out of range"):
        load_mnist(None, "test")


def test_corrupt_file_is_reported_with_its_path(fake_builtin):
    directory, _ = fake_builtin
    path = directory / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(DataError, match=f"{path}: corrupt gzip"):
        load_mnist(None, "test")


def test_full_split_sizes(full_mnist_dir):
    source = resolve_data_dir(full_mnist_dir)
    assert source.describe() == f"MNIST in {full_mnist_dir} (60000 train / 10000 test)"
    train_x, train_y = load_mnist(source, "train")
    val_x, val_y = load_mnist(source, "val")
    test_x, test_y = load_mnist(source, "test")
    assert train_x.shape == (50000, 784) and train_y.shape == (50000,)
    assert val_x.shape == (10000, 784) and val_y.shape == (10000,)
    assert test_x.shape == (10000, 784) and test_y.shape == (10000,)
    all_labels = read_idx(full_mnist_dir / "train-labels-idx1-ubyte.gz")
    np.testing.assert_array_equal(val_y, all_labels[50000:])
    builtin_x, builtin_y = load_mnist("builtin", "test")
    np.testing.assert_array_equal(builtin_x, test_x[:1000])
    np.testing.assert_array_equal(builtin_y, test_y[:1000])


def test_uncompressed_official_files_are_accepted(full_mnist_dir, tmp_path):
    link_files(full_mnist_dir, tmp_path, GZ_NAMES[:2])
    for name in GZ_NAMES[2:]:
        (tmp_path / name.removesuffix(".gz")).write_bytes(gzip.decompress((full_mnist_dir / name).read_bytes()))
    source = resolve_data_dir(tmp_path)
    assert source.files["test_images"].name == "t10k-images-idx3-ubyte"
    images, labels = load_mnist(source, "test")
    expected_images, expected_labels = load_mnist(full_mnist_dir, "test")
    np.testing.assert_array_equal(images, expected_images)
    np.testing.assert_array_equal(labels, expected_labels)


# --- resolution ------------------------------------------------------------------------------


def test_env_var_and_argument_precedence(tmp_path, monkeypatch):
    env_dir = link_files(mnist.BUILTIN_DIR, tmp_path / "env")
    arg_dir = link_files(mnist.BUILTIN_DIR, tmp_path / "arg")
    monkeypatch.setenv(mnist.ENV_VAR, str(env_dir))
    assert resolve_data_dir(None).path == env_dir
    assert not resolve_data_dir(None).builtin
    assert resolve_data_dir(arg_dir).path == arg_dir
    assert resolve_data_dir(str(arg_dir)).describe() == f"MNIST in {arg_dir} (5000 train / 1000 test)"
    assert resolve_data_dir("builtin").builtin
    monkeypatch.setenv(mnist.ENV_VAR, "builtin")
    assert resolve_data_dir(None).builtin
    monkeypatch.setenv(mnist.ENV_VAR, "")
    assert resolve_data_dir(None).builtin


def test_missing_dir_error_names_files_and_remedies(tmp_path, monkeypatch):
    missing = tmp_path / "nowhere"
    monkeypatch.setenv(mnist.ENV_VAR, str(missing))
    with pytest.raises(DataError) as excinfo:
        resolve_data_dir(None)
    message = str(excinfo.value)
    assert "\n" not in message and str(missing) in message and "$FFCOMPILE_DATA_DIR" in message
    for name in GZ_NAMES:
        assert name in message and name.removesuffix(".gz") in message
    assert "ffcompile data download DIR" in message


def test_missing_files_are_listed(tmp_path):
    link_files(mnist.BUILTIN_DIR, tmp_path, GZ_NAMES[:3])
    with pytest.raises(DataError) as excinfo:
        load_mnist(tmp_path, "train")
    message = str(excinfo.value)
    assert f"MNIST files missing in {tmp_path}" in message
    assert "t10k-labels-idx1-ubyte.gz (or t10k-labels-idx1-ubyte)" in message
    assert "train-images" not in message
    assert "ffcompile data download DIR" in message and "FFCOMPILE_DATA_DIR" in message


# --- checksums -------------------------------------------------------------------------------


def test_official_names_are_checked_against_official_sums(tmp_path):
    # The subset files carry official names but not official content.
    link_files(mnist.BUILTIN_DIR, tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"  # the first file read for "test"
    with pytest.raises(DataError) as excinfo:
        load_mnist(tmp_path, "test")
    message = str(excinfo.value)
    assert f"checksum mismatch for {path}" in message
    assert mnist.OFFICIAL_SHA256[path.name] in message and sha256(path) in message
    assert "official" in message


def test_directory_sha256sums_is_checked(full_mnist_dir, tmp_path):
    link_files(full_mnist_dir, tmp_path)
    sums = tmp_path / "SHA256SUMS"
    shutil.copy(full_mnist_dir / "SHA256SUMS", sums)
    resolve_data_dir(tmp_path).verify()

    wrong = "0" * 64
    sums.write_text(sums.read_text().replace(mnist.OFFICIAL_SHA256["t10k-labels-idx1-ubyte.gz"], wrong))
    with pytest.raises(DataError, match=f"expected sha256 {wrong} \\(from {sums}\\)"):
        load_mnist(tmp_path, "test")

    sums.write_text(f"{wrong} *extra.bin\n")
    with pytest.raises(DataError, match=f"{sums} lists extra.bin, which is missing"):
        resolve_data_dir(tmp_path)
    (tmp_path / "extra.bin").write_bytes(b"x")
    with pytest.raises(DataError, match="checksum mismatch for .*extra.bin"):
        resolve_data_dir(tmp_path).verify()

    sums.write_text("not a checksum line\n")
    with pytest.raises(DataError, match=f"{sums} line 1"):
        resolve_data_dir(tmp_path)


def test_tampered_builtin_is_caught(tmp_path, monkeypatch):
    for name in GZ_NAMES + ["SHA256SUMS"]:
        shutil.copy(mnist.BUILTIN_DIR / name, tmp_path / name)
    labels = tmp_path / "t10k-labels-idx1-ubyte.gz"
    tampered = read_idx(labels)
    tampered[0] = (tampered[0] + 1) % 10
    write_idx(labels, tampered)
    monkeypatch.setattr(mnist, "BUILTIN_DIR", tmp_path)
    with pytest.raises(DataError, match=f"checksum mismatch for {labels}.*SHA256SUMS"):
        load_mnist(None, "test")


# --- download --------------------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def mirrors(full_mnist_dir, tmp_path):
    """A local HTTP server with a good mirror, a corrupt one and a missing one."""
    root = tmp_path / "www"
    (root / "corrupt").mkdir(parents=True)
    link_files(full_mnist_dir, root / "good")
    for name in GZ_NAMES:
        (root / "corrupt" / name).write_bytes(b"not mnist at all" * 100)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=root))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield {"good": f"{base}/good/", "corrupt": f"{base}/corrupt/", "missing": f"{base}/missing/"}
    server.shutdown()
    server.server_close()


def test_download_skips_bad_mirrors(mirrors, tmp_path):
    dest = tmp_path / "dest"
    messages = []
    order = [mirrors["corrupt"], mirrors["missing"], mirrors["good"]]
    source = download_mnist(dest, progress=True, mirrors=order, log=messages.append)
    assert sorted(p.name for p in dest.iterdir()) == sorted(GZ_NAMES)  # no temp files left behind
    for name in GZ_NAMES:
        assert sha256(dest / name) == mnist.OFFICIAL_SHA256[name]
    assert source.path == dest and source.sizes == (60000, 10000)
    assert any(mirrors["corrupt"] in m and "wrong sha256" in m for m in messages)
    assert any(mirrors["missing"] in m and "404" in m for m in messages)

    messages.clear()
    download_mnist(dest, progress=False, mirrors=[mirrors["corrupt"]], log=messages.append)
    assert all("already present and verified" in m for m in messages) and len(messages) == 4


def test_download_fails_when_every_mirror_is_bad(mirrors, tmp_path):
    dest = tmp_path / "dest"
    order = [mirrors["corrupt"], mirrors["missing"]]
    with pytest.raises(DataError) as excinfo:
        download_mnist(dest, progress=False, mirrors=order, log=lambda message: None)
    message = str(excinfo.value)
    assert "\n" not in message
    assert f"could not download {GZ_NAMES[0]}" in message
    assert mirrors["corrupt"] in message and mirrors["missing"] in message
    assert list(dest.iterdir()) == []


def test_download_from_file_url_replaces_corrupt_local_file(full_mnist_dir, tmp_path):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / GZ_NAMES[0]).write_bytes(b"stale")
    download_mnist(dest, progress=False, mirrors=[full_mnist_dir.as_uri()], log=lambda message: None)
    assert sha256(dest / GZ_NAMES[0]) == mnist.OFFICIAL_SHA256[GZ_NAMES[0]]
