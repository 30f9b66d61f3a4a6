"""The FF graph: the model-level IR.

Typed, immutable dataclasses that describe an FF network and how it learns, loaded from
human-written ``models/*.toml`` and serialised to JSON (inside bundles and checkpoints). Every
validation error names the file and the field, e.g.
``models/x.toml: layers[2].size: must be a positive integer, got -3``.

Paper references: goodness and threshold (eq. 1), length normalization (sec. 2.1, footnote 5),
peer normalization (footnote 9), label embedding and neutral label (sec. 3.3), hybrid negatives
(sec. 3.2), local receptive fields (footnote 8), recurrent top-down wiring (sec. 3.4).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

from .errors import FFCompileError
from .family import Family, family_of
from .spec_limits import check_layer_name, check_limits


class SpecError(FFCompileError):
    pass


@dataclass(frozen=True)
class LabelEmbedding:
    """How the label enters the network. ``first_pixels``: one-of-N in the first N inputs (the
    image border, sec. 3.3); the neutral label is N entries of ``neutral``. ``top_layer``: a
    one-of-N layer above the last hidden layer of a recurrent net, sending its normalized state
    down (sec. 3.4, figure 3); the input is the image alone. ``none``: unsupervised."""

    kind: str = "first_pixels"
    classes: int = 10
    neutral: float = 0.1


@dataclass(frozen=True)
class InputSpec:
    """``dataset``: what ``ffcompile train``/``eval``/``build`` read (``ffcompile.data.datasets``):
    ``mnist`` (28x28 digits), ``cifar10`` (the binary distribution) or ``text`` (next character,
    sec. 4.1: rows are one-of-30 codes of 10-character contexts, labels the next character) or
    ``images`` (your own data: a .npz file, IDX files or a folder of images per class; ``data.images``)."""

    dataset: str = "mnist"
    size: int = 784
    image_shape: tuple[int, int] = (28, 28)
    channels: int = 1  # colour planes, stored one after another (CIFAR-10: the 32x32 R, G, B planes)
    label: LabelEmbedding = LabelEmbedding()
    normalize: bool = True  # length-normalize the raw input before the first layer


@dataclass(frozen=True)
class DenseLayer:
    name: str
    size: int
    kind: str = "dense"
    threshold: float | None = None  # overrides goodness.threshold_per_unit * size


@dataclass(frozen=True)
class LocalLayer:
    """Locally connected, no weight sharing (footnote 8): a grid of locations, each with
    ``channels`` units seeing a ``field`` x ``field`` window of the layer below (pixels of every
    input channel for the first layer, grid points for later ones) placed every ``stride`` steps.
    ``padding``: zeros around the layer below, so windows at the edge are truncated there
    (footnote 12; a 32x32 grid over 32x32 pixels with field 11 and stride 1 needs padding 5)."""

    name: str
    grid: int
    field: int
    stride: int
    channels: int
    kind: str = "local"
    threshold: float | None = None
    padding: int = 0

    @property
    def size(self) -> int:
        return self.grid * self.grid * self.channels


Layer = Union[DenseLayer, LocalLayer]


@dataclass(frozen=True)
class Normalization:
    """``rms``: x / sqrt(mean(x^2) + eps) (length sqrt(N), as Hinton's code does); ``l2``: unit
    length; ``l1``: for the sum-of-activities goodness (footnote 21). Never subtracts the mean."""

    kind: str = "rms"
    eps: float = 1e-8


@dataclass(frozen=True)
class Goodness:
    """``ssq``: sum of squares, positive data high. ``neg_ssq`` ("min ssq"): p(positive) =
    sigmoid(theta - sum of squares), positive data low. ``sum``: sum of activities (sec. 9)."""

    kind: str = "ssq"
    threshold_per_unit: float = 1.0


@dataclass(frozen=True)
class PeerNorm:
    """Footnote 9: each unit's running mean activity m (on positive data) is pulled toward its
    layer's mean. ``form = "loss"``: the gradient of ``weight * mean_j (m_j - mean m)^2``.
    ``form = "direct"`` (Hinton's published code): ``weight * (m_j - mean m)`` is added to every
    positive row's gradient at the unit's input, a pull 2 * units / (1 - momentum) times stronger.
    Either way it passes the ReLU as if it were on, so dead units revive."""

    weight: float = 0.03
    momentum: float = 0.9
    form: str = "loss"
    initial_mean: float = 0.0  # m before the first batch


@dataclass(frozen=True)
class Regularizers:
    """``weight_decay`` applies to weights, never biases. Coupled (torch.optim's SGD and Adam): added
    to the gradient before the optimizer sees it. ``decoupled_weight_decay``: subtracted from the
    parameter next to the optimizer's step, ``w -= lr * (step + weight_decay * w)`` (AdamW; the
    update rule of Hinton's published code)."""

    weight_decay: float = 0.0
    decoupled_weight_decay: bool = False
    peer_norm: PeerNorm | None = None


@dataclass(frozen=True)
class ParamGroup:
    """Optimizer settings for some parameters. ``params``: parameter names (``h1.weight``,
    ``softmax.bias``) or a layer's name for all of its parameters (``h1``, ``softmax``).
    ``lr``: the group's learning rate before the schedule (the schedule scales every group alike;
    0 freezes the group). ``weight_decay``: replaces ``regularizers.weight_decay`` for the group."""

    params: tuple[str, ...] = ()
    lr: float | None = None
    weight_decay: float | None = None


@dataclass(frozen=True)
class Optimizer:
    """``sgd``: ``velocity = momentum * velocity + (1 - dampening) * gradient`` (velocity starts at 0;
    dampening 0.9 is the "delay" gradient smoothing of Hinton's code), step = velocity. ``adam``:
    torch.optim.Adam. ``groups``: per-parameter learning rate and weight decay."""

    kind: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    dampening: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    groups: tuple[ParamGroup, ...] = ()


@dataclass(frozen=True)
class Initialization:
    """Hidden-layer weights: ``uniform`` U(-1/sqrt(fan_in), 1/sqrt(fan_in)) or ``normal``
    N(0, 1)/sqrt(fan_in) (Hinton's code). Biases and the softmax readout start at 0."""

    kind: str = "uniform"


@dataclass(frozen=True)
class Schedule:
    """``constant`` or ``linear_cooldown``: constant, then linear to zero from ``cooldown_start``
    (a fraction of the epochs) to the end. The rate is constant within an epoch, read off the line
    ``at`` the epoch's start or its middle; ``epoch_middle`` with ``cooldown_start = 0.5`` is
    Hinton's ffnew.m gain, (1 + 2 (E - e)) / E in epoch e = 1..E of the second half."""

    kind: str = "constant"
    cooldown_start: float = 0.5
    at: str = "epoch_start"


@dataclass(frozen=True)
class Negatives:
    """``random_label``: a uniformly drawn wrong label. ``hard_label``: a wrong label drawn in
    proportion to the softmax readout's probabilities on a neutral-label pass (sec. 3.3).
    ``hybrid_image``: one digit times a blurred random mask plus another times its reverse (sec.
    3.2). ``teacher_forcing`` / ``self_generated``: sequence negatives from the model (sec. 4.1)."""

    kind: str = "hard_label"
    blur_passes: int = 6
    min_prob: float = 1e-6  # floor added to wrong-label probabilities so sampling never divides by 0


@dataclass(frozen=True)
class Readout:
    goodness_layers: tuple[str, ...] = ()
    softmax_layers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Recurrent:
    """Static image as video (sec. 3.4): synchronous updates from the normalized states of the
    layers above and below at the previous step, new = damping * previous + (1 - damping) * computed."""

    iterations: int = 8
    damping: float = 0.3
    readout_iterations: tuple[int, int] = (3, 5)


@dataclass(frozen=True)
class Training:
    batch_size: int = 100
    epochs: int = 60
    seed: int = 0
    jitter: int = 0  # max shift in pixels for jittered MNIST (sec. 3.3); 0 = off
    # Sequence models (sec. 4.1). "together": each step combines positive and negative gradients.
    # "separate": a positive-only update, then negatives from the updated model and a
    # negative-only update, minibatch after minibatch (negatives made offline, a "sleep phase").
    phases: str = "together"
    learn_hidden: bool = True  # false: fixed random hidden weights, only the softmax learns (fig. 5 baseline)


@dataclass(frozen=True)
class Model:
    name: str
    layers: tuple[Layer, ...]
    input: InputSpec = InputSpec()
    initialization: Initialization = Initialization()
    normalization: Normalization = Normalization()
    goodness: Goodness = Goodness()
    regularizers: Regularizers = Regularizers()
    optimizer: Optimizer = Optimizer()
    schedule: Schedule = Schedule()
    negatives: Negatives = Negatives()
    readout: Readout = Readout()
    training: Training = Training()
    recurrent: Recurrent | None = None

    def layer_index(self, name: str) -> int:
        return [layer.name for layer in self.layers].index(name)

    def threshold(self, i: int) -> float:
        layer = self.layers[i]
        return layer.threshold if layer.threshold is not None else self.goodness.threshold_per_unit * layer.size

    def parameter_names(self) -> list[str]:
        """Every learned parameter, as the lowering names them."""
        names = []
        for layer in self.layers:
            names += [f"{layer.name}.weight", f"{layer.name}.bias"]
            if self.recurrent is not None:
                names.append(f"{layer.name}.top_down.weight")
        if self.readout.softmax_layers:
            names += ["softmax.weight", "softmax.bias"]
        return names

    def param_group(self, param: str) -> ParamGroup | None:
        """The optimizer group that sets ``param``'s learning rate and weight decay, if any."""
        for group in self.optimizer.groups:
            if any(_selects(pattern, param) for pattern in group.params):
                return group
        return None

    def fan_in(self, i: int) -> int:
        return self.input.size if i == 0 else self.layers[i - 1].size

    @property
    def family(self) -> Family:
        return family_of(self)

    def to_json(self) -> dict:
        return _to_json(self)

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=True)


def _selects(pattern: str, param: str) -> bool:
    return param == pattern or param.startswith(pattern + ".")


# --------------------------------------------------------------------------------------------
# Loading: plain dicts (from TOML or JSON) -> typed, validated Model.

_LAYER_KINDS = {"dense": DenseLayer, "local": LocalLayer}
_CHOICES = {
    "input.dataset": ("mnist", "cifar10", "text", "images"),
    "input.label.kind": ("first_pixels", "top_layer", "none"),
    "normalization.kind": ("rms", "l2", "l1"),
    "goodness.kind": ("ssq", "neg_ssq", "sum"),
    "optimizer.kind": ("sgd", "adam"),
    "initialization.kind": ("uniform", "normal"),
    "schedule.kind": ("constant", "linear_cooldown"),
    "schedule.at": ("epoch_start", "epoch_middle"),
    "negatives.kind": ("random_label", "hard_label", "hybrid_image", "teacher_forcing", "self_generated"),
    "training.phases": ("together", "separate"),
}


def load_model(path: str | Path) -> Model:
    """A spec file, or the name of a shipped spec (``mnist-small``: models/mnist-small.toml)."""
    from .shipped import shipped_model

    path = Path(path)
    if not path.is_file() and not path.suffix and shipped_model(str(path)) is not None:
        path = shipped_model(str(path))
    if not path.is_file():
        raise SpecError(f"{path}: model spec not found")
    try:
        if path.suffix == ".json":
            raw = json.loads(path.read_text())
        else:
            raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, ValueError, UnicodeDecodeError) as e:  # ValueError: json, huge integers
        raise SpecError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {str(e)[:200]}") from None
    except RecursionError:
        raise SpecError(f"{path}: nested too deeply to be a model spec") from None
    return model_from_dict(raw, source=str(path))


def model_from_json(text: str, source: str = "<json>") -> Model:
    return model_from_dict(json.loads(text), source=source)


def model_from_dict(raw: dict, source: str = "<dict>") -> Model:
    reader = _Reader(source)
    model = reader.model(raw)
    validate(model, source)
    return model


class _Reader:
    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, msg: str):
        raise SpecError(f"{self.source}: {where}: {msg}")

    def table(self, raw: Any, where: str) -> dict:
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            self.fail(where, f"must be a table, got {type(raw).__name__}")
        return raw

    def make(self, cls, raw: Any, where: str, **fixed):
        raw = dict(self.table(raw, where))
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for key in raw:
            if key not in fields or key in fixed:
                known = ", ".join(k for k in fields if k not in fixed)
                self.fail(f"{where}.{key}" if where else key, f"unknown field (known: {known})")
        values = {}
        for name, f in fields.items():
            if name in fixed:
                values[name] = fixed[name]
            elif name in raw:
                values[name] = self.coerce(raw[name], f.type, f"{where}.{name}" if where else name)
        try:
            return cls(**values)
        except TypeError as e:
            self.fail(where or "model", str(e))

    def coerce(self, value: Any, type_str: str, where: str):
        t = str(type_str)
        if "| None" in t and value is None:
            return None
        base = t.replace(" | None", "")
        if base == "bool":
            if not isinstance(value, bool):
                self.fail(where, f"must be true or false, got {value!r}")
            return value
        if base == "int":
            if isinstance(value, bool) or not isinstance(value, int):
                self.fail(where, f"must be an integer, got {value!r}")
            return value
        if base == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                self.fail(where, f"must be a number, got {value!r}")
            return float(value)
        if base == "str":
            if not isinstance(value, str):
                self.fail(where, f"must be a string, got {value!r}")
            return value
        if base.startswith("tuple["):
            if not isinstance(value, (list, tuple)):
                self.fail(where, f"must be a list, got {value!r}")
            if "ParamGroup" in base:
                return tuple(self.make(ParamGroup, v, f"{where}[{i}]") for i, v in enumerate(value))
            item = "str" if "str" in base else "int"
            return tuple(self.coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
        nested = {"LabelEmbedding": LabelEmbedding, "PeerNorm": PeerNorm}
        if base in nested:
            return self.make(nested[base], value, where)
        self.fail(where, f"unsupported field type {t}")

    def model(self, raw: dict) -> Model:
        raw = dict(self.table(raw, "model"))
        known = {f.name for f in dataclasses.fields(Model)}
        for key in raw:
            if key not in known:
                self.fail(key, f"unknown section (known: {', '.join(sorted(known))})")
        if "name" not in raw or not isinstance(raw["name"], str) or not raw["name"]:
            self.fail("name", "a non-empty model name is required")
        layers_raw = raw.get("layers")
        if not isinstance(layers_raw, list) or not layers_raw:
            self.fail("layers", "at least one [[layers]] entry is required")
        layers = []
        for i, layer in enumerate(layers_raw):
            where = f"layers[{i}]"
            layer = dict(self.table(layer, where))
            kind = layer.pop("kind", "dense")
            if not isinstance(kind, str) or kind not in _LAYER_KINDS:
                self.fail(f"{where}.kind", f"unknown layer kind {kind!r} (known: {', '.join(_LAYER_KINDS)})")
            layer.setdefault("name", f"h{i + 1}")
            layers.append(self.make(_LAYER_KINDS[kind], layer, where, kind=kind))
        sections = {
            "input": InputSpec, "initialization": Initialization, "normalization": Normalization, "goodness": Goodness,
            "regularizers": Regularizers, "optimizer": Optimizer, "schedule": Schedule,
            "negatives": Negatives, "readout": Readout, "training": Training, "recurrent": Recurrent,
        }
        values = {"name": raw["name"], "layers": tuple(layers)}
        for key, cls in sections.items():
            if raw.get(key) is not None:
                values[key] = self.make(cls, raw[key], key)
        if "input" in raw and "image_shape" in raw["input"]:
            values["input"] = dataclasses.replace(values["input"], image_shape=tuple(values["input"].image_shape))
        return Model(**values)


def validate(model: Model, source: str = "<model>") -> None:
    def fail(where, msg):
        raise SpecError(f"{source}: {where}: {msg}")

    for where, choices in _CHOICES.items():
        obj = model
        for part in where.split("."):
            obj = getattr(obj, part)
        if obj not in choices:
            fail(where, f"unknown value {obj!r} (known: {', '.join(choices)})")

    inp = model.input
    if inp.size <= 0:
        fail("input.size", f"must be a positive integer, got {inp.size}")
    if inp.channels <= 0:
        fail("input.channels", f"must be a positive integer, got {inp.channels}")
    if len(inp.image_shape) != 2 or inp.channels * inp.image_shape[0] * inp.image_shape[1] != inp.size:
        planes = f" x {inp.channels} channels" if inp.channels > 1 else ""
        fail("input.image_shape", f"{list(inp.image_shape)}{planes} does not have input.size = {inp.size} values")
    if inp.label.kind == "first_pixels":
        if not 2 <= inp.label.classes <= inp.size:
            fail("input.label.classes", f"must be between 2 and input.size, got {inp.label.classes}")
        if not 0.0 <= inp.label.neutral <= 1.0:
            fail("input.label.neutral", f"must be in [0, 1], got {inp.label.neutral}")

    names = set()
    for i, layer in enumerate(model.layers):
        where = f"layers[{i}] ({layer.name})"
        check_layer_name(layer.name, where, fail)
        if layer.name in names:
            fail(f"{where}.name", f"duplicate layer name {layer.name!r}")
        names.add(layer.name)
        if isinstance(layer, DenseLayer) and layer.size <= 0:
            fail(f"{where}.size", f"must be a positive integer, got {layer.size}")
        if isinstance(layer, LocalLayer):
            _validate_local(model, i, lambda field, msg, w=where: fail(f"{w}.{field}", msg))
        if layer.threshold is not None and layer.threshold < 0:
            fail(f"{where}.threshold", f"must be >= 0 (the sign of the goodness is set by goodness.kind), got {layer.threshold}")

    if model.goodness.threshold_per_unit < 0:
        fail("goodness.threshold_per_unit",
             f"must be >= 0 (use goodness.kind = \"neg_ssq\" for positive-data-low), got {model.goodness.threshold_per_unit}")
    if model.goodness.kind == "sum" and model.normalization.kind != "l1":
        fail("normalization.kind", "the sum-of-activities goodness needs normalization.kind = \"l1\" (paper, footnote 21)")
    if model.normalization.eps <= 0:
        fail("normalization.eps", f"must be > 0, got {model.normalization.eps}")

    reg = model.regularizers
    if reg.weight_decay < 0:
        fail("regularizers.weight_decay", f"must be >= 0, got {reg.weight_decay}")
    if reg.peer_norm is not None:
        if reg.peer_norm.weight < 0:
            fail("regularizers.peer_norm.weight", f"must be >= 0, got {reg.peer_norm.weight}")
        if not 0 <= reg.peer_norm.momentum < 1:
            fail("regularizers.peer_norm.momentum", f"must be in [0, 1), got {reg.peer_norm.momentum}")
        if reg.peer_norm.form not in ("loss", "direct"):
            fail("regularizers.peer_norm.form", f"unknown value {reg.peer_norm.form!r} (known: loss, direct)")
        if not 0 <= reg.peer_norm.initial_mean < float("inf"):
            fail("regularizers.peer_norm.initial_mean", f"must be a finite number >= 0, got {reg.peer_norm.initial_mean}")

    opt = model.optimizer
    if opt.lr <= 0:
        fail("optimizer.lr", f"must be > 0, got {opt.lr}")
    for name in ("momentum", "dampening", "beta1", "beta2"):
        if not 0 <= getattr(opt, name) < 1:
            fail(f"optimizer.{name}", f"must be in [0, 1), got {getattr(opt, name)}")
    _validate_groups(model, fail)
    if not 0 <= model.schedule.cooldown_start <= 1:
        fail("schedule.cooldown_start", f"must be in [0, 1], got {model.schedule.cooldown_start}")

    supervised = inp.label.kind != "none"
    for field_name in ("goodness_layers", "softmax_layers"):
        chosen = getattr(model.readout, field_name)
        for j, name in enumerate(chosen):
            if name not in names:
                fail(f"readout.{field_name}[{j}]", f"no layer named {name!r} (layers: {', '.join(l.name for l in model.layers)})")
        if len(set(chosen)) != len(chosen):
            fail(f"readout.{field_name}", "lists a layer twice")
    neg = model.negatives.kind
    if neg in ("random_label", "hard_label") and not supervised:
        fail("negatives.kind", f"{neg!r} needs labels in the input (input.label.kind = \"first_pixels\")")
    if neg == "hard_label" and not model.readout.softmax_layers and model.recurrent is None:
        fail("negatives.kind", "\"hard_label\" samples from the softmax readout: set readout.softmax_layers")

    if model.readout.goodness_layers and not supervised:
        fail("readout.goodness_layers", "the goodness readout needs labels in the input")

    t = model.training
    if t.batch_size <= 0:
        fail("training.batch_size", f"must be a positive integer, got {t.batch_size}")
    if t.epochs < 0:
        fail("training.epochs", f"must be >= 0, got {t.epochs}")
    if t.jitter < 0:
        fail("training.jitter", f"must be >= 0, got {t.jitter}")
    _validate_sequence(model, fail)
    if model.recurrent is not None:
        r = model.recurrent
        if r.iterations <= 0:
            fail("recurrent.iterations", f"must be positive, got {r.iterations}")
        if not 0 <= r.damping < 1:
            fail("recurrent.damping", f"must be in [0, 1), got {r.damping}")
        lo, hi = r.readout_iterations
        if not 1 <= lo <= hi <= r.iterations:
            fail("recurrent.readout_iterations", f"[{lo}, {hi}] must lie within 1..{r.iterations}")
        _validate_recurrent(model, fail)
    elif inp.label.kind == "top_layer":
        fail("input.label.kind", "\"top_layer\" labels belong to recurrent networks: add a [recurrent] section")
    check_limits(model, fail)


def _validate_groups(model: Model, fail) -> None:
    params = model.parameter_names()
    owner: dict[str, int] = {}
    for g, group in enumerate(model.optimizer.groups):
        where = f"optimizer.groups[{g}]"
        if not group.params:
            fail(f"{where}.params", "list at least one parameter or layer name")
        for j, pattern in enumerate(group.params):
            chosen = [p for p in params if _selects(pattern, p)]
            if not chosen:
                fail(f"{where}.params[{j}]", f"{pattern!r} matches no parameter (parameters: {', '.join(params)})")
            for p in chosen:
                if owner.setdefault(p, g) != g:
                    fail(f"{where}.params[{j}]", f"{p!r} is already in optimizer.groups[{owner[p]}]")
        for name in ("lr", "weight_decay"):
            value = getattr(group, name)
            if value is not None and not 0 <= value < float("inf"):
                fail(f"{where}.{name}", f"must be a finite number >= 0, got {value}")


SEQUENCE_NEGATIVES = ("teacher_forcing", "self_generated")


def _validate_sequence(model: Model, fail) -> None:
    """Next-character models (sec. 4.1): contexts of one-of-N codes in, the next symbol out."""
    text = model.input.dataset == "text"
    sequence = model.negatives.kind in SEQUENCE_NEGATIVES
    if sequence and not text:
        fail("negatives.kind", f"{model.negatives.kind!r} negatives are for next-character models "
                               "(input.dataset = \"text\")")
    if text and not sequence:
        fail("negatives.kind", f"next-character models take \"teacher_forcing\" or \"self_generated\" negatives, "
                               f"not {model.negatives.kind!r}")
    if not text:
        if model.training.phases != "together":
            fail("training.phases", "\"separate\" phases are for next-character models (input.dataset = \"text\")")
        if not model.training.learn_hidden:
            fail("training.learn_hidden", "false (a fixed random baseline) is for next-character models only")
        return
    if model.input.label.kind != "none":
        fail("input.label.kind", "a next-character model has no label in its input: set \"none\" "
                                 "(input.label.classes is the alphabet size)")
    symbols = model.input.label.classes
    if symbols < 2 or model.input.size % symbols:
        fail("input.size", f"must be a whole number of one-of-{symbols} codes (input.label.classes), "
                           f"got {model.input.size}")
    if model.input.size // symbols < 2:
        fail("input.size", "the context must hold at least 2 characters")
    if not model.readout.softmax_layers:
        fail("readout.softmax_layers", "a next-character model predicts with its softmax readout: list its layers")
    if model.recurrent is not None:
        fail("recurrent", "next-character models are feed-forward (figure 4)")
    if any(not isinstance(layer, DenseLayer) for layer in model.layers):
        fail("layers", "next-character models have dense layers only")
    if model.training.jitter:
        fail("training.jitter", "jitter shifts images; a next-character model has none")
    if not model.training.learn_hidden and model.training.phases != "together":
        fail("training.phases", "with learn_hidden = false only the softmax learns: there are no phases to separate")


def _validate_recurrent(model: Model, fail) -> None:
    """The sec. 3.4 network: pixels below, a one-of-N label layer on top, hidden layers between.
    A local layer above another one gets top-down input through the same window, so it must
    keep the grid (stride 1): then unit (y, x) of the lower layer sees the upper layer's field
    x field window around (y, x), padded as the upper layer pads (sec. 4: "an 11 x 11 receptive
    field in the layer above")."""
    if model.input.label.kind != "top_layer":
        fail("input.label.kind", f"a recurrent network takes its label as the top layer: set \"top_layer\", "
                                 f"not {model.input.label.kind!r}")
    if model.input.label.classes < 2:
        fail("input.label.classes", f"must be at least 2, got {model.input.label.classes}")
    for i, layer in enumerate(model.layers[1:], start=1):
        below = model.layers[i - 1]
        if isinstance(layer, LocalLayer) and isinstance(below, LocalLayer) and (
                layer.stride != 1 or layer.grid != below.grid):
            fail(f"layers[{i}] ({layer.name}).grid", f"in a recurrent net a local layer above local layer "
                 f"{below.name!r} needs stride 1 and the same grid ({below.grid}) for its top-down windows, "
                 f"got grid {layer.grid}, stride {layer.stride}")
    if model.regularizers.peer_norm is not None:
        fail("regularizers.peer_norm", "is not supported for recurrent networks yet")
    if model.negatives.kind not in ("hard_label", "random_label"):
        fail("negatives.kind", f"recurrent networks take \"hard_label\" or \"random_label\" negatives, "
                               f"not {model.negatives.kind!r}")


def _validate_local(model: Model, i: int, fail) -> None:
    layer: LocalLayer = model.layers[i]
    for name in ("grid", "field", "stride", "channels"):
        if getattr(layer, name) <= 0:
            fail(name, f"must be a positive integer, got {getattr(layer, name)}")
    if not 0 <= layer.padding < layer.field:
        fail("padding", f"must be in [0, field - 1 = {layer.field - 1}] (a window must touch the layer below), "
                        f"got {layer.padding}")
    if i == 0:
        below, what = model.input.image_shape[0], "pixels"
        if model.input.image_shape[0] != model.input.image_shape[1]:
            fail("grid", "local layers need a square input image")
    else:
        prev = model.layers[i - 1]
        if not isinstance(prev, LocalLayer):
            fail("kind", f"a local layer must follow the input or another local layer, not {prev.kind!r} layer {prev.name!r}")
        below, what = prev.grid, "grid points"
    span = (layer.grid - 1) * layer.stride + layer.field
    if span > below + 2 * layer.padding:
        padded = f" (+ 2 x padding {layer.padding})" if layer.padding else ""
        fail("field", f"grid {layer.grid} x stride {layer.stride} with field {layer.field} spans {span} {what}, "
                      f"but the layer below has only {below}{padded}")


def _to_json(obj):
    if dataclasses.is_dataclass(obj):
        out = {f.name: _to_json(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return out
    if isinstance(obj, tuple):
        return [_to_json(v) for v in obj]
    return obj
