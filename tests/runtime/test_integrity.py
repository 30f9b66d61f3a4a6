"""One digest over the whole bundle, checked before anything is loaded; signatures by a trusted key."""

import json
import random
import shutil

import pytest

from ffcompile.core.errors import FFCompileError
from ffcompile.runtime.bundle import load_bundle
from cli_helpers import error_line, invoke, succeeded  # tests/cli_helpers.py


def test_no_single_bit_flip_in_the_manifest_is_accepted(bundle_copy):
    path = bundle_copy / "manifest.json"
    original = path.read_bytes()
    rng = random.Random(16)
    accepted = []
    for _ in range(300):
        bit = rng.randrange(len(original) * 8)
        flipped = bytearray(original)
        flipped[bit // 8] ^= 1 << (bit % 8)
        path.write_bytes(bytes(flipped))
        try:
            load_bundle(bundle_copy)
            accepted.append(bit)
        except FFCompileError:
            pass
    path.write_bytes(original)
    load_bundle(bundle_copy)
    assert accepted == [], f"{len(accepted)} of 300 single-bit flips accepted (bits {accepted[:10]})"


def test_digest_file_must_match(bundle_copy):
    (bundle_copy / "bundle.digest").write_text("sha256:" + "0" * 64 + "\n")
    with pytest.raises(FFCompileError, match="does not match the bundle digest"):
        load_bundle(bundle_copy)
    (bundle_copy / "bundle.digest").unlink()
    with pytest.raises(FFCompileError, match="bundle.digest is missing"):
        load_bundle(bundle_copy)


def test_build_prints_the_digest_and_run_can_pin_it(tiny_spec, tmp_path):
    bundle = tmp_path / "b"
    out = succeeded(invoke("build", tiny_spec, "-o", bundle, "--verify-steps", "0", "--no-progress")).output
    digest = next(line.split()[-1] for line in out.splitlines() if line.startswith("bundle digest "))
    assert (bundle / "bundle.digest").read_text().strip() == digest
    succeeded(invoke("run", bundle, "--digest", digest, "--json"))
    other = "sha256:" + ("0" if digest[-1] != "0" else "1") * 64
    assert "is not the required" in error_line(invoke("run", bundle, "--digest", other))
    assert "not a bundle digest" in error_line(invoke("run", bundle, "--digest", "abc"))


@pytest.fixture(scope="module")
def signed(tiny_spec, tmp_path_factory):
    work = tmp_path_factory.mktemp("signed")
    succeeded(invoke("keygen", work / "key"))
    succeeded(invoke("keygen", work / "other"))
    out = succeeded(invoke("build", tiny_spec, "-o", work / "bundle", "--verify-steps", "0", "--no-progress",
                           "--sign", work / "key")).output
    assert "signed by ed25519:" in out
    return work


def test_signed_bundle_runs_with_its_key_only(signed, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(signed / "bundle", bundle)
    for command in (["run", bundle, "--json"], ["verify", bundle, "--steps", "1", "--no-progress"],
                    ["finetune", bundle, "--epochs", "1", "--limit", "40", "--no-progress", "--out", tmp_path / "ft"]):
        succeeded(invoke(*command, "--trust", signed / "key.pub"))
    assert "not by the trusted key" in error_line(invoke("run", bundle, "--trust", signed / "other.pub"))
    assert "not an ffcompile public key" in error_line(invoke("run", bundle, "--trust", signed / "key"))


def test_trust_refuses_unsigned_and_resigned_bundles(signed, tiny_bundle, tmp_path):
    assert "not signed" in error_line(invoke("run", tiny_bundle, "--trust", signed / "key.pub"))

    # a changed manifest with a recomputed digest: the signature no longer matches
    from ffcompile.contract.integrity import write_digest

    bundle = tmp_path / "bundle"
    shutil.copytree(signed / "bundle", bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["model"]["optimizer"]["lr"] = 0.5
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    write_digest(bundle)
    assert "signature in bundle.sig does not match" in error_line(invoke("run", bundle, "--trust", signed / "key.pub"))
    # the same forged bundle, signed by another key
    from ffcompile.contract.integrity import load_private_key, sign_bundle

    sign_bundle(bundle, (bundle / "bundle.digest").read_text().strip(), load_private_key(signed / "other"))
    assert "not by the trusted key" in error_line(invoke("run", bundle, "--trust", signed / "key.pub"))


def test_keygen_refuses_to_overwrite_and_keeps_the_private_key_private(tmp_path):
    succeeded(invoke("keygen", tmp_path / "k"))
    assert (tmp_path / "k").stat().st_mode & 0o077 == 0
    assert "refusing to overwrite" in error_line(invoke("keygen", tmp_path / "k"))
