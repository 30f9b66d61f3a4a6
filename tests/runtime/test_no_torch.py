"""The on-device runtime must work where torch is not installed: a subprocess in which importing
torch raises loads a bundle, predicts, fine-tunes a few steps and re-reads its checkpoint."""

import subprocess
import sys
import textwrap

BLOCK_TORCH = textwrap.dedent("""
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is blocked in this test: " + name)

    sys.meta_path.insert(0, NoTorch())
""")

SCRIPT = BLOCK_TORCH + textwrap.dedent("""
    from ffcompile.data import load_mnist
    from ffcompile.runtime.bundle import load_bundle

    bundle = load_bundle(sys.argv[1])
    x, y = load_mnist(None, "test")
    assert bundle.predict(x[:70], "goodness").shape == (70,)
    assert bundle.predict(x[:70], "softmax").dtype.name == "int64"
    xt, yt = load_mnist(None, "train")
    ckpt = bundle.finetune(xt[:60], yt[:60], epochs=1, out_dir=sys.argv[2], progress=False, log=lambda _: None)
    assert ckpt.step == 3, ckpt.step
    tuned = bundle.with_weights(sys.argv[2])
    print("error", tuned.evaluate(x, y, "softmax").error_percent)
    assert "torch" not in sys.modules
    print("ok without torch")
""")


def test_runtime_never_imports_torch(tiny_bundle, tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_bundle), str(tmp_path / "ft")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ok without torch" in result.stdout
    assert (tmp_path / "ft" / "checkpoint.safetensors").is_file()


def test_cli_run_and_finetune_never_import_torch(tiny_bundle, tmp_path):
    script = BLOCK_TORCH + textwrap.dedent("""
        from ffcompile.cli import main
        main()
    """)
    for args in (["run", str(tiny_bundle), "--json"],
                 ["finetune", str(tiny_bundle), "--epochs", "1", "--limit", "40", "--out", str(tmp_path / "ft"),
                  "--no-progress"]):
        result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
