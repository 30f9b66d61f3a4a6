"""The FF train step written by hand in PyTorch, the way a user who knows the math writes it: a
few ``addmm``s per layer, the local gradients in closed form, the optimizer as ``torch._foreach_*``
over the parameter list (torch.optim's foreach path), parameters and optimizer state updated in
place.

Same math as the lowered ``train_step`` of a supervised dense model with rms normalization,
sum-of-squares goodness, hard negative labels from a neutral-label softmax pass, peer
normalization (either form) and either Adam with coupled weight decay or SGD with momentum and
dampening, weight decay coupled or decoupled, per-group learning rates and decay (Hinton's
recipe): the neutral pass, the softmax readout's gradient, the sampling of wrong labels, positive
and negative rows through every layer and each layer's own gradient. It leaves out the metrics the
lowered step also returns (losses, goodness).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..lowering.optimizers import group_settings


def supported(model) -> str | None:
    """None if ``hand_step`` covers ``model``, else what it lacks."""
    checks = {"normalization.kind": (model.normalization.kind, "rms"), "goodness.kind": (model.goodness.kind, "ssq"),
              "negatives.kind": (model.negatives.kind, "hard_label"),
              "input.label.kind": (model.input.label.kind, "first_pixels")}
    bad = [f"{k} = {got!r} (needs {want!r})" for k, (got, want) in checks.items() if got != want]
    if model.recurrent is not None or any(layer.kind != "dense" for layer in model.layers):
        bad.append("dense feed-forward layers only")
    if model.optimizer.kind == "adam" and (model.regularizers.decoupled_weight_decay or model.optimizer.groups):
        bad.append("Adam with coupled weight decay and one optimizer group")
    elif model.optimizer.kind == "sgd" and model.optimizer.momentum == 0:
        bad.append("SGD with momentum")
    return "; ".join(bad) or None


def hand_step(model):
    """``step(P, S, x, y, u, lr, step)``: one train step; updates the parameters ``P`` and the
    optimizer/peer state ``S`` (dicts of tensors, the lowering's names) in place."""
    names = [layer.name for layer in model.layers]
    widths = [layer.size for layer in model.layers]
    thresholds = [model.threshold(i) for i in range(len(names))]
    classes, neutral = model.input.label.classes, model.input.label.neutral
    eps, min_prob = model.normalization.eps, model.negatives.min_prob
    softmax_layers = set(model.readout.softmax_layers)
    peer, wd, opt = model.regularizers.peer_norm, model.regularizers.weight_decay, model.optimizer

    def norm(t):
        return t * torch.rsqrt(t.square().mean(1, keepdim=True) + eps)

    first = norm if model.input.normalize else (lambda t: t)

    def adam(P, S, grads, lr, step):
        keys = list(grads)
        weights = [k for k in keys if k.endswith(".weight")]
        if wd:
            torch._foreach_add_([grads[k] for k in weights], [P[k] for k in weights], alpha=wd)
        g = [grads[k] for k in keys]
        m, v, p = [S[f"{k}.m"] for k in keys], [S[f"{k}.v"] for k in keys], [P[k] for k in keys]
        torch._foreach_lerp_(m, g, 1 - opt.beta1)
        torch._foreach_mul_(v, opt.beta2)
        torch._foreach_addcmul_(v, g, g, value=1 - opt.beta2)
        correction1, correction2 = 1 - opt.beta1 ** step, 1 - opt.beta2 ** step
        denom = torch._foreach_sqrt(v)
        torch._foreach_div_(denom, math.sqrt(correction2))
        torch._foreach_add_(denom, opt.eps)
        torch._foreach_addcdiv_(p, m, denom, value=-lr / correction1)

    groups = {}  # (lr factor, weight decay) -> parameter names, as the lowering groups them
    for name in [f"{n}.{part}" for n in [*names, "softmax"] for part in ("weight", "bias")]:
        groups.setdefault(group_settings(model, name), []).append(name)

    def sgd(P, S, grads, lr):
        for (factor, decay), keys in groups.items():
            p, g = [P[k] for k in keys], [grads[k] for k in keys]
            if decay and not model.regularizers.decoupled_weight_decay:
                torch._foreach_add_(g, p, alpha=decay)
            velocity = [S[f"{k}.velocity"] for k in keys]
            torch._foreach_mul_(velocity, opt.momentum)
            torch._foreach_add_(velocity, g, alpha=1 - opt.dampening)
            direction = velocity
            if decay and model.regularizers.decoupled_weight_decay:
                direction = torch._foreach_add(velocity, p, alpha=decay)
            torch._foreach_add_(p, direction, alpha=-lr * factor)

    def step_fn(P, S, x, y, u, lr: float, step: float):
        batch = x.shape[0]
        onehot = F.one_hot(y, classes).to(x.dtype)
        grads = {}
        # Neutral-label pass: the softmax readout's input, its gradient, and the wrong-label odds.
        h = first(torch.cat([torch.full((batch, classes), neutral, dtype=x.dtype), x[:, classes:]], 1))
        feats = []
        for name in names:
            h = norm(torch.addmm(P[f"{name}.bias"], h, P[f"{name}.weight"].t()).relu_())
            if name in softmax_layers:
                feats.append(h)
        f = torch.cat(feats, 1)
        probs = torch.addmm(P["softmax.bias"], f, P["softmax.weight"].t()).softmax(1)
        dlogits = (probs - onehot) / batch
        grads["softmax.weight"] = dlogits.t() @ f
        grads["softmax.bias"] = dlogits.sum(0)
        q = (probs + min_prob) * (1 - onehot)
        cdf = q.cumsum(1)
        cdf = cdf / cdf[:, -1:]
        negative = (cdf < u.clamp(min=1e-7)[:, None]).sum(1)
        # Positive and negative rows through every layer, each layer learning from its own loss.
        rows = first(torch.cat([torch.cat([onehot, F.one_hot(negative, classes).to(x.dtype)]), x[:, classes:].repeat(2, 1)], 1))
        target = torch.cat([torch.ones(batch, dtype=x.dtype), torch.zeros(batch, dtype=x.dtype)])
        for i, name in enumerate(names):
            a = torch.addmm(P[f"{name}.bias"], rows, P[f"{name}.weight"].t()).relu_()
            dgoodness = (torch.sigmoid(a.square().sum(1) - thresholds[i]) - target) * (2.0 / (2 * batch))
            dz = a * dgoodness[:, None]
            if peer is not None:
                mean = peer.momentum * S[f"{name}.peer_mean"] + (1 - peer.momentum) * a[:batch].mean(0)
                pull = peer.weight / batch if peer.form == "direct" else \
                    2 * peer.weight * (1 - peer.momentum) / (widths[i] * batch)
                dz[:batch] += (mean - mean.mean()) * pull
                S[f"{name}.peer_mean"].copy_(mean)
            grads[f"{name}.weight"] = dz.t() @ rows
            grads[f"{name}.bias"] = dz.sum(0)
            rows = norm(a)
        if opt.kind == "adam":
            adam(P, S, grads, lr, step)
        else:
            sgd(P, S, grads, lr)
        return negative

    return step_fn
