"""One epoch of FF training on the built-in MNIST subset, run entirely by onnxruntime through a
bundle, against the PyTorch reference trainer from the same initial weights."""

from pathlib import Path

from ffcompile.compiler.build import build_bundle
from ffcompile.data import load_mnist
from ffcompile.runtime.bundle import load_bundle
from ffcompile.core.spec import load_model
from ffcompile.reference.train import Dataset, evaluate_params, train

MODEL = Path(__file__).parents[2] / "models" / "mnist-small.toml"


def test_one_epoch_onnxruntime_matches_reference(tmp_path, one_torch_thread):
    model = load_model(MODEL)
    x, y = load_mnist(None, "train")
    x_test, y_test = load_mnist(None, "test")
    reference = train(model, Dataset(x, y, None, None, "built-in"), tmp_path / "ref", epochs=1, progress=False,
                      log=lambda _: None)

    build_bundle(MODEL, "x86-cpu", tmp_path / "bundle", verify_steps=0, progress=False, log=lambda _: None)
    bundle = load_bundle(tmp_path / "bundle")
    tuned = bundle.finetune(x, y, epochs=1, out_dir=tmp_path / "ft", progress=False, log=lambda _: None)
    assert (tuned.epoch, tuned.step) == (reference.epoch, reference.step) == (1, len(x) // model.training.batch_size)
    on_device = bundle.with_weights(tmp_path / "ft")
    for readout in ("goodness", "softmax"):
        ref_error = evaluate_params(model, reference.params, x_test, y_test, readout)
        ort_error = on_device.evaluate(x_test, y_test, readout).error_percent
        print(f"{readout}: reference {ref_error:.2f}% onnxruntime {ort_error:.2f}% test error")
        assert abs(ref_error - ort_error) <= 0.2, readout
