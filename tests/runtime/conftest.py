import pytest


@pytest.fixture
def bundle_copy(tiny_bundle, tmp_path):
    import shutil

    dest = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dest)
    return dest
