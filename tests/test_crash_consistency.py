"""A kill at any point loses nothing: checkpoint and metrics are one unit, a rebuild always leaves
a bundle at -o, leftovers of killed runs are cleaned, and a second writer is refused."""

import json
import os
import shutil

import numpy as np
import pytest

from ffcompile.contract.checkpoint import load_checkpoint
from ffcompile.runtime.bundle import load_bundle
from cli_helpers import error_line, invoke, succeeded  # tests/cli_helpers.py


def rows(run):
    return [r["epoch"] for r in json.loads((run / "metrics.json").read_text())["epochs"]]


def test_kill_between_checkpoint_and_metrics_loses_no_row(tiny_spec, tmp_path):
    run = tmp_path / "run"
    succeeded(invoke("train", tiny_spec, "--out", run, "--epochs", "1", "--limit", "100", "--no-progress"))
    one_row = (run / "metrics.json").read_bytes()
    succeeded(invoke("train", tiny_spec, "--out", run, "--epochs", "2", "--limit", "100", "--no-progress", "--resume"))
    (run / "metrics.json").write_bytes(one_row)  # as if killed after the epoch-2 checkpoint, before its metrics
    succeeded(invoke("train", tiny_spec, "--out", run, "--epochs", "2", "--limit", "100", "--no-progress", "--resume"))
    assert rows(run) == [1, 2]
    (run / "metrics.json").unlink()
    succeeded(invoke("train", tiny_spec, "--out", run, "--epochs", "2", "--limit", "100", "--no-progress", "--resume"))
    assert rows(run) == [1, 2]


def test_finetune_metrics_recovered_from_the_checkpoint(tiny_bundle, tmp_path):
    out = tmp_path / "ft"
    args = ["finetune", tiny_bundle, "--epochs", "2", "--limit", "40", "--out", out, "--no-progress"]
    succeeded(invoke(*args))
    (out / "metrics.json").unlink()
    succeeded(invoke(*args, "--resume"))
    assert rows(out) == [1, 2]


def test_stale_temporary_files_cleaned_on_the_next_run(tiny_spec, tmp_path):
    run = tmp_path / "run"
    succeeded(invoke("train", tiny_spec, "--out", run, "--epochs", "1", "--limit", "100", "--no-progress"))
    # ours (atomic_write) and safetensors' own (.tmpXXXXXX, renamed into ours when complete)
    stale = [run / ".checkpoint.safetensors.abc123.tmp", run / ".metrics.json.def456.tmp", run / ".tmpy80puA"]
    for path in stale:
        path.write_bytes(b"half written")
    succeeded(invoke("train", tiny_spec, "--out", run, "--epochs", "2", "--limit", "100", "--no-progress", "--resume"))
    assert not any(p.exists() for p in stale)

    bundle = tmp_path / "b"
    succeeded(invoke("build", tiny_spec, "-o", bundle, "--verify-steps", "0", "--no-progress"))
    leftovers = [tmp_path / ".b.building-x1y2", tmp_path / ".b.old-z3"]
    for folder in leftovers:
        (folder / "programs").mkdir(parents=True)
    succeeded(invoke("build", tiny_spec, "-o", bundle, "--verify-steps", "0", "--no-progress"))
    assert not any(p.exists() for p in leftovers)
    load_bundle(bundle)


def test_rebuild_swaps_bundles_in_one_step(tiny_spec, tmp_path, monkeypatch):
    """A kill right after the new bundle moved into place, or right before: -o holds a whole bundle."""
    import ffcompile.compiler.build as bundle_module

    bundle = tmp_path / "b"
    succeeded(invoke("build", tiny_spec, "-o", bundle, "--verify-steps", "0", "--no-progress"))
    renames = []
    real_replace = os.replace

    def watched_replace(src, dst):
        renames.append((str(src), str(dst)))
        assert os.path.isdir(bundle) or str(dst) == str(bundle), "a rename left -o without a bundle"
        return real_replace(src, dst)
    monkeypatch.setattr(bundle_module.os, "replace", watched_replace)
    succeeded(invoke("build", tiny_spec, "-o", bundle, "--verify-steps", "0", "--no-progress", "--seed", "3"))
    load_bundle(bundle)
    assert not [dst for _, dst in renames if dst == str(bundle)], "the bundle was moved away and back, not swapped"


def test_restores_a_bundle_moved_aside_by_a_killed_rebuild(tiny_spec, tmp_path):
    bundle = tmp_path / "b"
    succeeded(invoke("build", tiny_spec, "-o", bundle, "--verify-steps", "0", "--no-progress"))
    aside = tmp_path / ".b.old-k1ll"
    aside.mkdir()
    shutil.move(bundle, aside / "bundle")  # killed between moving the old bundle aside and moving the new one in
    result = succeeded(invoke("build", tiny_spec, "-o", bundle, "--verify-steps", "0", "--no-progress", "--seed", "4"))
    assert "restored" in result.output
    load_bundle(bundle)
    assert not aside.exists()


@pytest.mark.parametrize("command", ["train", "finetune", "build"])
def test_second_writer_refused(command, tiny_spec, tiny_bundle, tmp_path):
    from ffcompile.contract.locking import exclusive

    if command == "train":
        out = tmp_path / "run"
        lock_of, args = out, ["train", tiny_spec, "--out", out, "--epochs", "1", "--limit", "100", "--no-progress"]
    elif command == "finetune":
        out = tmp_path / "ft"
        lock_of, args = out, ["finetune", tiny_bundle, "--out", out, "--epochs", "1", "--limit", "40", "--no-progress"]
    else:
        out = tmp_path / "b"
        lock_of, args = out, ["build", tiny_spec, "-o", out, "--verify-steps", "0", "--no-progress"]
    with exclusive(lock_of, "test"):
        result = invoke(*args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    line = result.output.strip().splitlines()[-1]
    assert "in use by another ffcompile process" in line and str(lock_of) in line, line
    succeeded(invoke(*args))  # free again once the first writer is done
