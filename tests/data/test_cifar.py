"""CIFAR-10 binary batches read from records generated here in the official layout."""

import numpy as np
import pytest

from ffcompile.data.cifar import ENV_VAR, PIXELS, RECORD, SUBDIR, TEST_FILE, TRAIN_FILES, load_cifar10, read_batch, resolve_cifar_dir, to_images
from ffcompile.data.idx import DataError


def write_batch(path, labels, pixels):
    records = np.concatenate([np.asarray(labels, np.uint8)[:, None], pixels.astype(np.uint8)], axis=1)
    path.write_bytes(records.tobytes())


def make_dataset(root, per_file=3, seed=0):
    rng = np.random.default_rng(seed)
    folder = root / SUBDIR
    folder.mkdir(parents=True)
    written = {}
    for name in TRAIN_FILES + (TEST_FILE,):
        labels, pixels = rng.integers(0, 10, per_file), rng.integers(0, 256, (per_file, PIXELS))
        write_batch(folder / name, labels, pixels)
        written[name] = (labels, pixels)
    return folder, written


def test_reads_labels_and_pixel_planes(tmp_path):
    pixels = np.zeros((2, PIXELS), np.uint8)
    pixels[1, :1024], pixels[1, 1024:2048], pixels[1, 2048:] = 10, 20, 30  # red, green, blue planes
    write_batch(tmp_path / "b.bin", [7, 3], pixels)
    got_pixels, labels = read_batch(tmp_path / "b.bin")
    assert labels.tolist() == [7, 3]
    assert np.array_equal(got_pixels, pixels)
    assert to_images(got_pixels)[1, 5, 9].tolist() == [10, 20, 30]


def test_load_from_env_var_and_parent_folder(tmp_path, monkeypatch):
    folder, written = make_dataset(tmp_path)
    monkeypatch.setenv(ENV_VAR, str(tmp_path))
    data = load_cifar10()
    assert data.path == folder
    assert data.x_train.shape == (15, PIXELS) and data.x_test.shape == (3, PIXELS)
    assert data.y_train.tolist() == np.concatenate([written[n][0] for n in TRAIN_FILES]).tolist()
    np.testing.assert_allclose(data.x_test, written[TEST_FILE][1] / 255.0, rtol=1e-6)
    assert load_cifar10(folder).y_test.tolist() == written[TEST_FILE][0].tolist()


def test_truncated_record_names_file_and_index(tmp_path):
    folder, _ = make_dataset(tmp_path)
    path = folder / "data_batch_3.bin"
    path.write_bytes(path.read_bytes()[:2 * RECORD + 100])
    with pytest.raises(DataError, match=r"data_batch_3\.bin: record 2 is truncated \(100 of 3073 bytes"):
        load_cifar10(tmp_path)


def test_bad_label_byte_is_reported(tmp_path):
    write_batch(tmp_path / "b.bin", [1, 12], np.zeros((2, PIXELS)))
    with pytest.raises(DataError, match="record 1 has label byte 12"):
        read_batch(tmp_path / "b.bin")


def test_missing_files_are_listed(tmp_path, monkeypatch):
    folder, _ = make_dataset(tmp_path)
    (folder / "data_batch_5.bin").unlink()
    (folder / TEST_FILE).unlink()
    with pytest.raises(DataError, match="missing in .*: data_batch_5.bin, test_batch.bin") as err:
        resolve_cifar_dir(tmp_path)
    assert "\n" not in str(err.value)
    monkeypatch.delenv(ENV_VAR, raising=False)
    with pytest.raises(DataError, match="data_batch_1.bin"):
        resolve_cifar_dir()


def test_splits_hold_out_the_last_tenth_of_the_training_records(tmp_path):
    from ffcompile.data.datasets import load_split

    make_dataset(tmp_path, per_file=4)
    _, x_train, y_train = load_split("cifar10", tmp_path, "train")
    source, x_val, y_val = load_split("cifar10", tmp_path, "val")
    _, x_all, y_all = load_split("cifar10", source, "trainval")
    _, x_test, _ = load_split("cifar10", source, "test")
    assert (len(x_train), len(x_val), len(x_all), len(x_test)) == (18, 2, 20, 4)
    np.testing.assert_array_equal(np.concatenate([x_train, x_val]), x_all)
    np.testing.assert_array_equal(np.concatenate([y_train, y_val]), y_all)


def _archive(tmp_path, members):
    import io
    import tarfile

    path = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_download_verifies_the_archive_and_extracts_only_the_batches(tmp_path):
    import hashlib

    from ffcompile.data.cifar import download_cifar10

    source, written = make_dataset(tmp_path / "src")
    members = {f"{SUBDIR}/{n}": (source / n).read_bytes() for n in written}
    members[f"{SUBDIR}/batches.meta.txt"] = b"airplane\n"
    members["../escape.bin"] = b"x"
    archive = _archive(tmp_path, members)
    data = archive.read_bytes()
    url = archive.as_uri()
    with pytest.raises(DataError, match="wrong archive"):
        download_cifar10(tmp_path / "bad", url=url, md5="0" * 32, size=None, log=lambda _: None)
    folder = download_cifar10(tmp_path / "dest", url=url, md5=hashlib.md5(data).hexdigest(), size=len(data),
                              log=lambda _: None)
    assert sorted(p.name for p in folder.iterdir()) == sorted(written)
    assert not (tmp_path / "escape.bin").exists() and not (tmp_path / "dest" / "escape.bin").exists()
    assert load_cifar10(tmp_path / "dest").y_test.tolist() == written[TEST_FILE][0].tolist()
    assert download_cifar10(tmp_path / "dest", url="file:///nonexistent", log=lambda _: None) == folder


def test_cli_download_keeps_files_already_there(tmp_path):
    """`ffcompile data download DEST --dataset cifar10` checks what DEST holds before fetching."""
    from cli_helpers import invoke, succeeded  # tests/cli_helpers.py

    make_dataset(tmp_path / "dest")
    result = succeeded(invoke("data", "download", tmp_path / "dest", "--dataset", "cifar10"))
    assert "already present" in result.output and f"ok: CIFAR-10 binary files in {tmp_path / 'dest' / SUBDIR}" in result.output
