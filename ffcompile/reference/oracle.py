"""The autograd oracle: the FF train step written the way public FF code writes it — plain
PyTorch, ``detach()`` between layers, one ``backward()`` per layer loss, and torch.optim for the
update. It shares no code with the lowering, so agreement checks that the analytic local
gradients, regularizers and optimizers of ``ffcompile.lowering`` are exactly right.

Locally connected layers are written the way footnote 13 defines them: dense weights times a 0/1
connectivity mask (``masks``; the caller builds it). Unsupervised models (sec. 3.2) take the second
digit ``x_other`` and the raw ``mask_bits``; the hybrid mask is made here with a convolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.spec import Model


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


def hybrid_mask(model: Model, bits: torch.Tensor) -> torch.Tensor:
    """Bits blurred ``blur_passes`` times by [1/4, 1/2, 1/4] along x then y (edge pixels
    repeated), thresholded at 0.5."""
    h, w = model.input.image_shape
    img = bits.reshape(-1, 1, h, w)
    kernel = torch.tensor([0.25, 0.5, 0.25], dtype=bits.dtype)
    for _ in range(model.negatives.blur_passes):
        img = F.conv2d(F.pad(img, (1, 1, 0, 0), mode="replicate"), kernel.reshape(1, 1, 1, 3))
        img = F.conv2d(F.pad(img, (0, 0, 1, 1), mode="replicate"), kernel.reshape(1, 1, 3, 1))
    return (img > 0.5).reshape(bits.shape)


def oracle_train_step(model: Model, params: dict, state: dict, x, y, u, lr: float, step: int,
                      x_other=None, mask_bits=None, masks: dict | None = None):
    """Same contract as the ``train_step`` program (tensors in, new params/state out), float64-safe.
    ``masks``: {layer name: [out, in] 0/1} for locally connected layers, whose weights are dense here."""
    classes = model.input.label.classes
    P = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    batch = x.shape[0]
    new_state = {}
    masks = masks or {}
    supervised = model.input.label.kind != "none"

    def layer_inputs(rows):
        h = rows
        for i, layer in enumerate(model.layers):
            inp = (h if i == 0 and not model.input.normalize else _norm(h, model)).detach()
            weight = P[f"{layer.name}.weight"]
            if layer.name in masks:
                weight = weight * masks[layer.name]
            z = inp @ weight.T + P[f"{layer.name}.bias"]
            yield i, layer, z, torch.relu(z)
            h = torch.relu(z).detach()

    if not supervised:
        return _unsupervised_step(model, P, state, new_state, x, y, x_other, mask_bits, layer_inputs, lr, step)

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
    _ff_layers(model, P, state, new_state, rows, batch, layer_inputs)
    _optimizer_step(model, P, state, new_state, lr, step)
    return {k: v.detach() for k, v in P.items()}, new_state, negative_labels


def _unsupervised_step(model, P, state, new_state, x, y, x_other, mask_bits, layer_inputs, lr, step):
    negatives = torch.where(hybrid_mask(model, mask_bits), x, x_other)
    activities = _ff_layers(model, P, state, new_state, torch.cat([x, negatives]), x.shape[0], layer_inputs)
    if model.readout.softmax_layers:
        feats = [_norm(activities[name], model) for name in
                 sorted(model.readout.softmax_layers, key=model.layer_index)]
        logits = torch.cat(feats, 1) @ P["softmax.weight"].T + P["softmax.bias"]
        F.cross_entropy(logits, y).backward()
    _optimizer_step(model, P, state, new_state, lr, step)
    return {k: v.detach() for k, v in P.items()}, new_state, negatives


def _ff_layers(model, P, state, new_state, rows, batch, layer_inputs) -> dict:
    """Each layer's own loss on [positives; negatives], backward per layer. Returns the positive
    rows' (detached) activities per layer."""
    dtype = rows.dtype
    target = torch.cat([torch.ones(batch, dtype=dtype), torch.zeros(batch, dtype=dtype)])
    sign = -1.0 if model.goodness.kind == "neg_ssq" else 1.0
    activities = {}
    for i, layer, z, a in layer_inputs(rows):
        activities[layer.name] = a[:batch].detach()
        m = a.sum(1) if model.goodness.kind == "sum" else (a * a).sum(1)
        loss = F.binary_cross_entropy_with_logits(sign * (m - model.threshold(i)), target)
        peer = model.regularizers.peer_norm
        if peer is not None:
            pretend = z + (a - z).detach()  # value of the ReLU, derivative of the identity (footnote 9)
            mean = peer.momentum * state[f"{layer.name}.peer_mean"] + (1 - peer.momentum) * pretend[:batch].mean(0)
            deviation = mean - mean.mean()
            if peer.form == "direct":  # a fixed pull weight * (m_j - mean m) on every positive row's z
                loss = loss + peer.weight * (deviation.detach() * pretend[:batch]).sum(1).mean()
            else:
                loss = loss + peer.weight * (deviation ** 2).mean()
            new_state[f"{layer.name}.peer_mean"] = mean.detach()
        loss.backward()
    return activities


def _optimizer_step(model, P, state, new_state, lr, step) -> None:
    """torch.optim over one parameter group per (learning rate, weight decay) of the spec's groups.
    SGD's momentum buffers and Adam's moments are seeded from ``state`` (zeros at the start), so
    dampening applies from the first step. Decoupled weight decay: AdamW, or for SGD the
    parameter scaled by 1 - lr * decay before the step (what AdamW does)."""
    opt = model.optimizer
    decoupled = model.regularizers.decoupled_weight_decay
    groups: dict[tuple[float, float], list] = {}
    for k in P:
        group = model.param_group(k)
        k_lr = lr * (group.lr / opt.lr) if group is not None and group.lr is not None else lr
        decay = model.regularizers.weight_decay
        if group is not None and group.weight_decay is not None:
            decay = group.weight_decay
        groups.setdefault((k_lr, decay if k.endswith(".weight") else 0.0), []).append(P[k])
    param_groups = [{"params": ps, "lr": k_lr, "weight_decay": decay} for (k_lr, decay), ps in groups.items()]
    if opt.kind == "sgd":
        if decoupled:
            with torch.no_grad():
                for g in param_groups:
                    for p in g["params"]:
                        p.mul_(1 - g["lr"] * g["weight_decay"])
                    g["weight_decay"] = 0.0
        optim = torch.optim.SGD(param_groups, lr=lr, momentum=opt.momentum, dampening=opt.dampening)
        for k in P:
            optim.state[P[k]]["momentum_buffer"] = state[f"{k}.velocity"].clone()
    else:
        adam = torch.optim.AdamW if decoupled else torch.optim.Adam
        optim = adam(param_groups, lr=lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
        for k in P:
            optim.state[P[k]].update(step=torch.tensor(float(step - 1)), exp_avg=state[f"{k}.m"].clone(),
                                     exp_avg_sq=state[f"{k}.v"].clone())
    optim.step()
    for k in P:
        if opt.kind == "sgd":
            new_state[f"{k}.velocity"] = optim.state[P[k]]["momentum_buffer"]
        else:
            new_state[f"{k}.m"] = optim.state[P[k]]["exp_avg"]
            new_state[f"{k}.v"] = optim.state[P[k]]["exp_avg_sq"]


def oracle_recurrent_train_step(model: Model, params: dict, state: dict, x, y, u, lr: float, step: int,
                                masks: dict | None = None):
    """The sec. 3.4 recurrent net's train step, written directly: states rolled forward in time,
    every other layer's input and the layer's own previous state ``detach()``ed (no
    backpropagation through time), one loss per layer per iteration, torch.optim update.
    Negatives: wrong labels drawn from the softmax over labels of the goodness after the bottom-up
    pass and one iteration. A softmax readout learns from the positive images' bottom-up pass
    (cross-entropy on its normalized states, detached). ``masks``: {parameter name: [out, in]
    0/1} for local connections (sec. 4), whose weights are dense here. Returns (new params, new
    state, negative labels)."""
    classes, rec = model.input.label.classes, model.recurrent
    names = [layer.name for layer in model.layers]
    P = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
    masks = masks or {}
    W = lambda key: P[key] * masks[key] if key in masks else P[key]
    batch, dtype = x.shape[0], x.dtype
    sign = -1.0 if model.goodness.kind == "neg_ssq" else 1.0
    scored = [model.layer_index(n) for n in model.readout.goodness_layers] or list(range(len(names)))
    pixels = _norm(x, model) if model.input.normalize else x

    def bottom_up(rows):  # iteration 0
        h, states = rows, []
        for name in names:
            inp = h if not states and not model.input.normalize else _norm(h, model)
            h = torch.relu(inp @ W(f"{name}.weight").T + P[f"{name}.bias"]).detach()
            states.append(h)
        return states

    def run(pixels, label, iterations):
        states = bottom_up(x.repeat(len(pixels) // batch, 1))
        for t in range(1, iterations + 1):
            previous = [s.detach() for s in states]
            for i, name in enumerate(names):
                below = pixels if i == 0 else _norm(previous[i - 1], model)
                above = _norm(label, model) if i == len(names) - 1 else _norm(previous[i + 1], model)
                z = below.detach() @ W(f"{name}.weight").T + above.detach() @ W(f"{name}.top_down.weight").T + P[f"{name}.bias"]
                states[i] = rec.damping * previous[i] + (1 - rec.damping) * torch.relu(z)
            yield t, states

    with torch.no_grad():
        _t, states = next(run(pixels.repeat(classes, 1), torch.eye(classes, dtype=dtype).repeat_interleave(batch, 0), 1))
        measure = lambda h: h.sum(1) if model.goodness.kind == "sum" else (h * h).sum(1)
        g = sum(sign * measure(states[i]) for i in scored)
        probs = torch.softmax(g.reshape(classes, batch).T, 1)
    weights = probs if model.negatives.kind == "hard_label" else torch.zeros(batch, classes, dtype=dtype)
    q = (weights + model.negatives.min_prob) * (1 - F.one_hot(y, classes).to(dtype))
    cdf = torch.cumsum(q, 1)
    cdf = cdf / cdf[:, -1:]
    negative_labels = (cdf < torch.clamp(u, min=1e-7)[:, None]).sum(1)

    if model.readout.softmax_layers:
        first = bottom_up(x)
        feats = [_norm(first[i], model) for i in sorted(map(model.layer_index, model.readout.softmax_layers))]
        F.cross_entropy(torch.cat(feats, 1) @ P["softmax.weight"].T + P["softmax.bias"], y).backward()

    label = torch.cat([F.one_hot(y, classes), F.one_hot(negative_labels, classes)]).to(dtype)
    target = torch.cat([torch.ones(batch, dtype=dtype), torch.zeros(batch, dtype=dtype)])
    total = 0.0
    for _t, states in run(torch.cat([pixels, pixels]), label, rec.iterations):
        for i, h in enumerate(states):
            m = h.sum(1) if model.goodness.kind == "sum" else (h * h).sum(1)
            total = total + F.binary_cross_entropy_with_logits(sign * (m - model.threshold(i)), target)
    total.backward()
    new_state = {}
    _optimizer_step(model, P, state, new_state, lr, step)
    return {k: v.detach() for k, v in P.items()}, new_state, negative_labels
