"""Next-character FF (sec. 4.1): the compiled step against autograd, teacher-forced negatives
drawn from the model's own softmax, the sleep-phase halves adding up to the joint step, the
frozen-hidden baseline, and ONNX / TVM parity of every program."""

import numpy as np
import pytest
import torch

from ffcompile.compiler import tvm_build as tvm_compile
from ffcompile.runtime import tvm as tvm_runtime
from ffcompile.compiler.onnx_emit import to_onnx
from ffcompile.reference.interpreter import TorchProgram
from ffcompile.lowering import build_program, init_state, train_programs
from ffcompile.runtime.ort import OrtProgram
from ffcompile.core.spec import DenseLayer, Goodness, InputSpec, LabelEmbedding, Model, Negatives, Optimizer, Readout, SpecError, Training, load_model, model_from_dict
from outputs import assert_outputs_match  # tests/outputs.py

SYMBOLS, CONTEXT, BATCH = 5, 3, 6


def tiny(negatives="teacher_forcing", phases="together", learn_hidden=True, optimizer=None, goodness="ssq") -> Model:
    return Model(
        name="tiny-text",
        input=InputSpec(dataset="text", size=SYMBOLS * CONTEXT, image_shape=(CONTEXT, SYMBOLS),
                        label=LabelEmbedding(kind="none", classes=SYMBOLS)),
        layers=(DenseLayer("h1", 9), DenseLayer("h2", 7)),
        goodness=Goodness(kind=goodness, threshold_per_unit=0.8),
        optimizer=optimizer or Optimizer(kind="sgd", lr=1.0, momentum=0.0),
        negatives=Negatives(kind=negatives),
        readout=Readout(softmax_layers=("h1", "h2")),
        training=Training(batch_size=BATCH, phases=phases, learn_hidden=learn_hidden),
    )


def one_hot_rows(rng, rows, chars=CONTEXT):
    codes = rng.integers(0, SYMBOLS, (rows, chars))
    return np.eye(SYMBOLS, dtype=np.float32)[codes].reshape(rows, chars * SYMBOLS)


def feeds_for(model, program, rng, params, state):
    feeds = {**params, **state, "x": one_hot_rows(rng, BATCH), "y": rng.integers(0, SYMBOLS, BATCH),
             "u": rng.random(BATCH, dtype=np.float32), "x_neg": one_hot_rows(rng, BATCH),
             "lr": np.float32(model.optimizer.lr), "step": np.float32(3)}
    return {v.name: feeds[v.name] for v in program.inputs}


def start(model, seed=0):
    rng = np.random.default_rng(seed)
    params, state = init_state(model, 1)
    params = {k: (v + rng.normal(0, 0.3, v.shape)).astype(np.float32) for k, v in params.items()}
    return rng, params, state


def run64(program, feeds):
    """The program evaluated in float64 (float inputs widened), for checks at 1e-6 and below."""
    wide = {k: v.astype(np.float64) if np.asarray(v).dtype == np.float32 else v for k, v in feeds.items()}
    return TorchProgram(program, float_dtype=torch.float64).run_numpy(wide)


def rms(t):
    return t / torch.sqrt((t * t).mean(1, keepdim=True) + 1e-8)


def ending_in(x, codes):
    return torch.cat([x[:, SYMBOLS:], torch.eye(SYMBOLS, dtype=x.dtype)[codes]], 1)


def autograd_grads(model, params, x, y, negatives, phase):
    """The paper's losses with autograd: each layer's own logistic FF loss on detached inputs,
    positive rows = the real strings (context moved on by y), the softmax's cross-entropy on the
    context's normalized activities; returns d(loss)/d(param) for every parameter that learns."""
    p = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    x = None if x is None else torch.tensor(x, dtype=torch.float64)
    grads = {}
    if phase != "negative":
        h, feats = x, []
        for layer in model.layers:
            h = torch.relu(rms(h).detach() @ p[f"{layer.name}.weight"].T + p[f"{layer.name}.bias"])
            feats.append(rms(h).detach())
        logits = torch.cat(feats, 1) @ p["softmax.weight"].T + p["softmax.bias"]
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor(y))
        grads.update(zip(("softmax.weight", "softmax.bias"), torch.autograd.grad(loss, [p["softmax.weight"], p["softmax.bias"]])))
    if not model.training.learn_hidden:
        return grads
    rows, targets = [], []
    if phase != "negative":
        rows.append(ending_in(x, torch.tensor(y)))
        targets += [1.0] * BATCH
    if phase != "positive":
        rows.append(torch.tensor(negatives, dtype=torch.float64) if negatives.ndim == 2 else ending_in(x, torch.tensor(negatives)))
        targets += [0.0] * BATCH
    h, targets = torch.cat(rows), torch.tensor(targets, dtype=torch.float64)
    for i, layer in enumerate(model.layers):
        w, b = p[f"{layer.name}.weight"], p[f"{layer.name}.bias"]
        y_ = torch.relu(rms(h).detach() @ w.T + b)
        logit = (y_ * y_).sum(1) - model.threshold(i)
        loss = torch.nn.functional.softplus(logit * (1 - 2 * targets)).sum() / (2 * BATCH)
        grads[f"{layer.name}.weight"], grads[f"{layer.name}.bias"] = torch.autograd.grad(loss, [w, b])
        h = y_.detach()
    return {k: v.numpy() for k, v in grads.items()}


def sample_wrong(probs, y, u, min_prob):
    """Inverse CDF over the characters other than the true one, weights probs + min_prob."""
    q = (probs.astype(np.float64) + min_prob) * (1 - np.eye(probs.shape[1])[y])
    cdf = np.cumsum(q, 1) / q.sum(1, keepdims=True)
    return (cdf < np.maximum(u, 1e-7)[:, None]).sum(1)


@pytest.mark.parametrize("negatives", ["teacher_forcing", "self_generated"])
@pytest.mark.parametrize("program", ["train_step", "train_positive", "train_negative"])
def test_step_matches_autograd(negatives, program):
    """SGD with lr 1, no momentum: every parameter moves by exactly minus its gradient."""
    model = tiny(negatives)
    rng, params, state = start(model)
    built = build_program(model, program, BATCH)
    feeds = feeds_for(model, built, rng, params, state)
    out = run64(built, feeds)
    phase = {"train_step": "both", "train_positive": "positive", "train_negative": "negative"}[program]
    negative_rows = feeds.get("x_neg")
    if negatives == "teacher_forcing" and phase != "positive":
        negative_rows = out["negative_labels"]  # checked against the softmax in the next test
    want = autograd_grads(model, params, feeds.get("x"), feeds.get("y"), negative_rows, phase)
    for name in params:
        moved = params[name] - out[f"new.{name}"]
        if name in want:
            np.testing.assert_allclose(moved, want[name], rtol=1e-6, atol=1e-8, err_msg=name)
        else:
            assert np.array_equal(out[f"new.{name}"], params[name]), f"{name} must not learn in {program}"


def test_teacher_forced_negatives_come_from_the_softmax():
    """The made-up last character is drawn from the model's own prediction for the context,
    never the true character, with the step's uniforms."""
    model = tiny("teacher_forcing")
    rng, params, state = start(model, seed=4)
    step = build_program(model, "train_step", BATCH)
    feeds = feeds_for(model, step, rng, params, state)
    made_up = TorchProgram(step).run_numpy(feeds)["negative_labels"]
    infer = build_program(model, "infer_softmax", BATCH)
    probs = run64(infer, {v.name: {**params, "x": feeds["x"]}[v.name] for v in infer.inputs})["probs"]
    assert np.all(made_up != feeds["y"])
    np.testing.assert_array_equal(made_up, sample_wrong(probs, feeds["y"], feeds["u"], model.negatives.min_prob))


@pytest.mark.parametrize("negatives", ["teacher_forcing", "self_generated"])
def test_sleep_phase_halves_add_up_to_the_joint_step(negatives):
    model = tiny(negatives)
    rng, params, state = start(model, seed=2)
    runs = {}
    for name in ("train_step", "train_positive", "train_negative"):
        program = build_program(model, name, BATCH)
        feeds = feeds_for(model, program, np.random.default_rng(7), params, state)
        runs[name] = run64(program, feeds)
    for name in params:
        joint = params[name] - runs["train_step"][f"new.{name}"]
        halves = sum(params[name] - runs[p][f"new.{name}"] for p in ("train_positive", "train_negative"))
        np.testing.assert_allclose(halves, joint, rtol=1e-9, atol=1e-12, err_msg=name)
    for layer in model.layers:
        loss = sum(runs[p][f"loss.{layer.name}"] for p in ("train_positive", "train_negative"))
        np.testing.assert_allclose(loss, runs["train_step"][f"loss.{layer.name}"], rtol=1e-9)


def test_frozen_hidden_weights_learn_the_softmax_only():
    model = tiny("self_generated", learn_hidden=False, optimizer=Optimizer(kind="adam", lr=0.01))
    assert train_programs(model) == ["train_step"]
    rng, params, state = start(model)
    program = build_program(model, "train_step", BATCH)
    assert "x_neg" not in {v.name for v in program.inputs}  # no negatives at all
    out = TorchProgram(program).run_numpy(feeds_for(model, program, rng, params, state))
    for name in params:
        changed = not np.array_equal(out[f"new.{name}"], params[name])
        assert changed == name.startswith("softmax."), name
    with pytest.raises(Exception, match="train_positive"):
        build_program(model, "train_positive", BATCH)


PROGRAMS = [(kind, name) for kind in ("teacher_forcing", "self_generated")
            for name in ("train_step", "train_positive", "train_negative", "infer_softmax")]


@pytest.mark.parametrize("negatives,name", PROGRAMS)
def test_onnxruntime_matches_reference(negatives, name):
    model = tiny(negatives, optimizer=Optimizer(kind="adam", lr=0.01), goodness="neg_ssq")
    rng, params, state = start(model, seed=5)
    program = build_program(model, name, BATCH)
    feeds = feeds_for(model, program, rng, params, state)
    assert_outputs_match(OrtProgram(to_onnx(program).SerializeToString()).run(feeds), TorchProgram(program).run_numpy(feeds), 1e-5, 1e-5)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("negatives,name", [("teacher_forcing", "train_step"), ("self_generated", "train_negative"),
                                            ("self_generated", "infer_softmax")])
def test_tvm_matches_reference(negatives, name, tmp_path):
    model = tiny(negatives, optimizer=Optimizer(kind="adam", lr=0.01))
    rng, params, state = start(model, seed=6)
    program = build_program(model, name, BATCH)
    feeds = feeds_for(model, program, rng, params, state)
    lib = tvm_compile.compile_onnx(to_onnx(program, fuse=False), {"kind": "llvm", "num-cores": 1}, tmp_path / "p.so")
    assert_outputs_match(tvm_runtime.load(lib).run(feeds), TorchProgram(program).run_numpy(feeds), 1e-5, 1e-5)


def test_paper_spec_and_its_errors(tmp_path):
    model = load_model("models/text-nextchar.toml")
    assert model.input.size == 300 and [layer.size for layer in model.layers] == [2000] * 3
    assert model.training.batch_size == 22320  # every update uses all 22,320 predictions (fig. 5)
    raw = model.to_json()
    cases = [
        ({"negatives": {**raw["negatives"], "kind": "hybrid_image"}}, "negatives.kind: next-character models take"),
        ({"input": {**raw["input"], "size": 301, "image_shape": [7, 43]}}, "input.size: must be a whole number of one-of-30"),
        ({"readout": {"softmax_layers": [], "goodness_layers": []}}, "readout.softmax_layers"),
        ({"input": {**raw["input"], "dataset": "mnist", "size": 784, "image_shape": [28, 28]}},
         "negatives.kind: 'self_generated' negatives are for next-character models"),
    ]
    for change, message in cases:
        with pytest.raises(SpecError, match=message):
            model_from_dict({**raw, **change}, source="text.toml")
    mnist = load_model("models/mnist-small.toml").to_json()
    with pytest.raises(SpecError, match="training.phases"):
        model_from_dict({**mnist, "training": {**mnist["training"], "phases": "separate"}})
    with pytest.raises(SpecError, match="training.learn_hidden"):
        model_from_dict({**mnist, "training": {**mnist["training"], "learn_hidden": False}})
    with pytest.raises(SpecError, match="no phases to separate"):
        model_from_dict({**raw, "training": {**raw["training"], "phases": "separate", "learn_hidden": False}})
    with pytest.raises(SpecError, match="training.phases: unknown value 'sleep'"):
        model_from_dict({**raw, "training": {**raw["training"], "phases": "sleep"}})
