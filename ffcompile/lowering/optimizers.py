"""Optimizer updates as tensor programs, with torch.optim's semantics (coupled L2 weight decay) so
the autograd oracle can check them against torch.optim itself."""

from __future__ import annotations

import math

from ..core.builder import Builder
from ..core.program import Value
from ..core.spec import Model


def apply_update(b: Builder, model: Model, name: str, param: Value, grad: Value, state: dict[str, Value],
                 lr: Value, step: Value | None, decay: bool) -> tuple[Value, dict[str, Value]]:
    """Returns the new parameter and its new optimizer slots. ``step`` is the 1-based step count
    (Adam's bias correction); ``lr`` comes from the host's schedule."""
    opt = model.optimizer
    with b.scope(f"{name}.update"):
        if decay and model.regularizers.weight_decay > 0:
            grad = b.add(grad, b.mul(param, model.regularizers.weight_decay))
        if opt.kind == "sgd":
            velocity = b.add(b.mul(state[f"{name}.velocity"], opt.momentum), grad) if opt.momentum > 0 else grad
            return b.sub(param, b.mul(velocity, lr)), {f"{name}.velocity": velocity}
        m = b.add(b.mul(state[f"{name}.m"], opt.beta1), b.mul(grad, 1.0 - opt.beta1))
        v = b.add(b.mul(state[f"{name}.v"], opt.beta2), b.mul(b.mul(grad, grad), 1.0 - opt.beta2))
        correction1 = b.sub(1.0, b.exp(b.mul(step, math.log(opt.beta1))))
        correction2 = b.sub(1.0, b.exp(b.mul(step, math.log(opt.beta2))))
        denom = b.add(b.div(b.sqrt(v), b.sqrt(correction2)), opt.eps)
        new = b.sub(param, b.mul(b.div(m, denom), b.div(lr, correction1)))
        return new, {f"{name}.m": m, f"{name}.v": v}


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
        new_params[name], slots = apply_update(
            b, model, name, params[name], grads[name], state, lr, step, decay=name.endswith(".weight"))
        new_state.update(slots)
    for name in state:
        new_state.setdefault(name, state[name])
    for name in params:
        b.output(f"new.{name}", new_params[name])
    for name in state:
        b.output(f"new.{name}", new_state[name])
    for name, value in metrics.items():
        b.output(name, value)
