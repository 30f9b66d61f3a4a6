"""Optimizer updates as tensor programs, with torch.optim's semantics (SGD with momentum and
dampening, Adam; coupled L2 weight decay, or decoupled as in AdamW) and per-parameter groups, so
the autograd oracle can check them against torch.optim itself."""

from __future__ import annotations

import math

from ..core.builder import Builder
from ..core.program import Value
from ..core.spec import Model


def group_settings(model: Model, name: str) -> tuple[float, float]:
    """(learning-rate factor relative to ``optimizer.lr``, weight decay) of parameter ``name``.
    Weight decay applies to weights only."""
    group = model.param_group(name)
    lr = group.lr if group is not None and group.lr is not None else model.optimizer.lr
    decay = model.regularizers.weight_decay
    if group is not None and group.weight_decay is not None:
        decay = group.weight_decay
    return lr / model.optimizer.lr, decay if name.endswith(".weight") else 0.0


def apply_update(b: Builder, model: Model, name: str, param: Value, grad: Value, state: dict[str, Value],
                 lr: Value, step: Value | None) -> tuple[Value, dict[str, Value]]:
    """Returns the new parameter and its new optimizer slots. ``step`` is the 1-based step count
    (Adam's bias correction); ``lr`` comes from the host's schedule and is scaled by the
    parameter's group."""
    opt = model.optimizer
    lr_factor, decay = group_settings(model, name)
    decoupled = model.regularizers.decoupled_weight_decay
    with b.scope(f"{name}.update"):
        if lr_factor != 1.0:
            lr = b.mul(lr, lr_factor)
        if decay > 0 and not decoupled:
            grad = b.add(grad, b.mul(param, decay))
        if opt.kind == "sgd":
            velocity = grad
            if opt.momentum > 0:
                smoothed = b.mul(grad, 1.0 - opt.dampening) if opt.dampening else grad
                velocity = b.add(b.mul(state[f"{name}.velocity"], opt.momentum), smoothed)
            slots, direction = {f"{name}.velocity": velocity}, velocity
        else:
            m = b.add(b.mul(state[f"{name}.m"], opt.beta1), b.mul(grad, 1.0 - opt.beta1))
            v = b.add(b.mul(state[f"{name}.v"], opt.beta2), b.mul(b.mul(grad, grad), 1.0 - opt.beta2))
            correction1 = b.sub(1.0, b.exp(b.mul(step, math.log(opt.beta1))))
            correction2 = b.sub(1.0, b.exp(b.mul(step, math.log(opt.beta2))))
            denom = b.add(b.div(b.sqrt(v), b.sqrt(correction2)), opt.eps)
            slots = {f"{name}.m": m, f"{name}.v": v}
            if not (decay > 0 and decoupled):
                return b.sub(param, b.mul(b.div(m, denom), b.div(lr, correction1))), slots
            direction = b.div(b.div(m, denom), correction1)
        if decay > 0 and decoupled:
            direction = b.add(direction, b.mul(param, decay))
        return b.sub(param, b.mul(direction, lr)), slots


def emit_updates(b: Builder, model: Model, params: dict[str, Value], grads: dict[str, Value], state: dict[str, Value],
                 new_state: dict[str, Value], metrics: dict[str, Value], lr: Value, step: Value | None) -> None:
    """The end of every train step: the optimizer update of each parameter (weight decay on
    weights only), then the outputs ``new.<param>``, ``new.<state>`` and the metrics. A parameter
    without a gradient is not learned by this step: it and its optimizer slots pass through."""
    new_params = {}
    for name in params:
        if name not in grads:
            new_params[name] = params[name]
            continue
        new_params[name], slots = apply_update(b, model, name, params[name], grads[name], state, lr, step)
        new_state.update(slots)
    for name in state:
        new_state.setdefault(name, state[name])
    for name in params:
        b.output(f"new.{name}", new_params[name])
    for name in state:
        b.output(f"new.{name}", new_state[name])
    for name, value in metrics.items():
        b.output(name, value)
