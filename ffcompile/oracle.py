"""The autograd oracle: the FF train step written the way public FF code writes it — plain
PyTorch, ``detach()`` between layers, one ``backward()`` per layer loss, and torch.optim for the
update. It shares no code with the lowering, so agreement checks that the analytic local
gradients, regularizers and optimizers of ``ffcompile.lowering`` are exactly right."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import Model


def _norm(t: torch.Tensor, model: Model) -> torch.Tensor:
    eps = model.normalization.eps
    kind = model.normalization.kind
    if kind == "l1":
        return t / (t.abs().sum(1, keepdim=True) + eps)
    if kind == "rms":
        return t / torch.sqrt((t * t).mean(1, keepdim=True) + eps)
    return t / torch.sqrt((t * t).sum(1, keepdim=True) + eps)


def _embed(x: torch.Tensor, label_rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([label_rows, x[:, label_rows.shape[1]:]], dim=1)


def oracle_train_step(model: Model, params: dict, state: dict, x, y, u, lr: float, step: int):
    """Same contract as the ``train_step`` program (tensors in, new params/state out), float64-safe."""
    classes = model.input.label.classes
    P = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    batch = x.shape[0]
    new_state = {}

    def layer_inputs(rows):
        h = rows
        for i, layer in enumerate(model.layers):
            inp = (h if i == 0 and not model.input.normalize else _norm(h, model)).detach()
            z = inp @ P[f"{layer.name}.weight"].T + P[f"{layer.name}.bias"]
            yield i, layer, z, torch.relu(z)
            h = torch.relu(z).detach()

    probs = None
    if model.readout.softmax_layers:
        neutral = torch.full((batch, classes), model.input.label.neutral, dtype=x.dtype)
        feats = [_norm(a, model).detach() for _i, layer, _z, a in layer_inputs(_embed(x, neutral))
                 if layer.name in model.readout.softmax_layers]
        logits = torch.cat(feats, 1) @ P["softmax.weight"].T + P["softmax.bias"]
        F.cross_entropy(logits, y).backward()
        probs = torch.softmax(logits, 1).detach()

    weights = probs if model.negatives.kind == "hard_label" else torch.zeros(batch, classes, dtype=x.dtype)
    q = (weights + model.negatives.min_prob) * (1 - F.one_hot(y, classes).to(x.dtype))
    cdf = torch.cumsum(q, 1)
    cdf = cdf / cdf[:, -1:]
    negative_labels = (cdf < torch.clamp(u, min=1e-7)[:, None]).sum(1)

    rows = torch.cat([_embed(x, F.one_hot(y, classes).to(x.dtype)), _embed(x, F.one_hot(negative_labels, classes).to(x.dtype))])
    target = torch.cat([torch.ones(batch, dtype=x.dtype), torch.zeros(batch, dtype=x.dtype)])
    sign = -1.0 if model.goodness.kind == "neg_ssq" else 1.0
    for i, layer, z, a in layer_inputs(rows):
        m = a.sum(1) if model.goodness.kind == "sum" else (a * a).sum(1)
        loss = F.binary_cross_entropy_with_logits(sign * (m - model.threshold(i)), target)
        peer = model.regularizers.peer_norm
        if peer is not None:
            pretend = z + (a - z).detach()  # value of the ReLU, derivative of the identity (footnote 9)
            mean = peer.momentum * state[f"{layer.name}.peer_mean"] + (1 - peer.momentum) * pretend[:batch].mean(0)
            loss = loss + peer.weight * ((mean - mean.mean()) ** 2).mean()
            new_state[f"{layer.name}.peer_mean"] = mean.detach()
        loss.backward()

    opt = model.optimizer
    wd = model.regularizers.weight_decay
    ordered = list(P)
    groups = [{"params": [P[k] for k in ordered if k.endswith(".weight")], "weight_decay": wd},
              {"params": [P[k] for k in ordered if k.endswith(".bias")], "weight_decay": 0.0}]
    if opt.kind == "sgd":
        optim = torch.optim.SGD(groups, lr=lr, momentum=opt.momentum)
        for k in ordered:
            optim.state[P[k]]["momentum_buffer"] = state[f"{k}.velocity"].clone()
    else:
        optim = torch.optim.Adam(groups, lr=lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
        for k in ordered:
            optim.state[P[k]].update(step=torch.tensor(float(step - 1)), exp_avg=state[f"{k}.m"].clone(),
                                     exp_avg_sq=state[f"{k}.v"].clone())
    optim.step()
    for k in ordered:
        if opt.kind == "sgd":
            new_state[f"{k}.velocity"] = optim.state[P[k]]["momentum_buffer"]
        else:
            new_state[f"{k}.m"] = optim.state[P[k]]["exp_avg"]
            new_state[f"{k}.v"] = optim.state[P[k]]["exp_avg_sq"]
    return {k: v.detach() for k, v in P.items()}, new_state, negative_labels
