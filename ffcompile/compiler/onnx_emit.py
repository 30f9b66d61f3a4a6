"""ONNX emitter: one tensor program -> one ONNX model (opset 18) that passes the full checker.

Each primitive is lowered by its entry in ``ffcompile.core.primitives`` (one or a few standard
ONNX ops); constants become initializers. Node and
value names keep the program's scopes (``posneg/h1/local_rule/...``) so graphs read well in
Netron. Imports only onnx and numpy: the on-device runtime never needs torch.

Before emission a few rewrites make the graph fast in onnxruntime's CPU provider without
changing what it computes (every output still matches the torch reference to fp32 rounding; on
``mnist-supervised`` at batch 1000 they take a train step's live temporaries from 92 to 38 MiB):

- **Output copies dropped.** A program names its outputs with ``identity`` nodes; where the value
  is computed inside the program, its producer writes the output directly instead (onnxruntime
  would otherwise copy every new parameter and optimizer slot once per step).
- **Bias folded into Gemm.** ``add(matmul(a, b), c)`` becomes one ``Gemm`` with ``C = c``.
- **Few rows times a big weight** (``x @ W^T``, 2..32 rows: inference, small batches) runs as
  ``(W @ x^T)^T``: onnxruntime's SGEMM repacks its B operand on every call, which for a weight
  matrix costs more than the product; as A it is streamed once.
- **Outer products as broadcasts.** A matmul with inner dimension 1 (peer normalization's
  ``dz_row x x_sum``) is a broadcast ``Mul`` (the same single product per element), so it joins
  the elementwise chain around it instead of writing a full matrix.
- **Tiled elementwise chains** (``fuse=True``). onnxruntime runs one kernel per node over whole
  tensors, so a chain of k elementwise ops over a 2000x2000 matrix (the optimizer update is ~15)
  streams 16 MB through DRAM k times. Connected elementwise nodes over a large common leading
  dimension become one ``Scan`` over row tiles of ``TILE_ELEMS`` elements: the chain runs on one
  tile at a time while it sits in cache, and only the chain's real inputs and outputs touch DRAM.
  Values that broadcast along the tiled axis (scalars, ``[1, n]`` rows) are read from the outer
  scope. The arithmetic per element is unchanged: results are bitwise those of the plain graph.
  Pass ``fuse=False`` for a plain one-node-per-primitive graph (other importers, debugging).
  ``tiled_outputs=True`` (changes the model's output shapes) also drops the copy of tiled
  program outputs back into their [rows, ...] shape; ``shipped_onnx``, what a bundle ships, sets
  it for training programs.
- **Weight gradients tile by tile.** A chain over a weight's [units, fan_in] rows (its optimizer
  update) computes the weight gradient ``dz^T x`` itself, one tile of units per Scan step, and
  with it the local rule's dz and the bias gradient's column sums: no step holds a whole
  gradient, a whole dz or a copy of an updated tensor. The per-tile products round like any
  other GEMM blocking: equal to the plain graph's to fp32 rounding, not bitwise.
- **No full-size temporaries that a fused op avoids** (``fuse=True``): ``relu(x @ W^T + b)`` is one
  ``FusedGemm`` (onnxruntime's contrib op; the pre-activation is never stored, whatever graph
  optimization level the session runs at, and the emitted node order stays the one planned),
  ``reduce_sum(x * x)`` squares and sums a tile of rows at a time, and the softmax readout's
  features are never concatenated (``[f1 | f2] @ W^T`` becomes a sum of per-feature products).
- **Memory-aware node order.** Nodes are emitted in program order except that small nodes and
  the optimizer updates run as soon as they can, so each layer's gradient is consumed by its
  update before the next layer runs (``OrtProgram`` makes onnxruntime follow this order).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..core.primitives import PRIMITIVES
from ..core.program import Node, Program, Value

OPSET = 18
CONTRIB = "com.microsoft"  # onnxruntime's contrib ops (FusedGemm): in its released packages, not in
                           # builds made with --disable_contrib_ops or minimal builds
_TYPES = {"float32": TensorProto.FLOAT, "int64": TensorProto.INT64, "bool": TensorProto.BOOL}
# Primitives computed independently per element (with numpy broadcasting): safe to tile.
_ELEMENTWISE = frozenset(p.name for p in PRIMITIVES.values() if p.elementwise)

TILE_ELEMS = 32768        # elements per tile of the widest value in a fused chain (128 KiB fp32)
GRADIENT_TILE_ELEMS = 1 << 18  # where the chain computes its weight gradient tile by tile: larger tiles
                          # for the GEMM (measured: 16-row tiles of a 4x2000 step cost 30 % more time)
FUSE_MIN_ELEMS = 1 << 20  # fuse only chains over values at least this large (4 MiB fp32): smaller
                          # ones stay in the last-level cache between ops anyway (measured: tiling
                          # 2x500 and [200, 2000] activation chains made them slower)


class _Graph:
    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.fused_shapes: dict[str, list[int]] = {}  # outputs of contrib ops (no ONNX shape inference)

    def const(self, name: str, array) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs, output: str, **attrs) -> str:
        self.nodes.append(helper.make_node(op, list(inputs), [output], name=output, **attrs))
        return output

    @staticmethod
    def onnx_type(dtype: str) -> int:
        return _TYPES[dtype]


def _lower(g: _Graph, node: Node) -> None:
    out, ins, a = node.output.name, list(node.inputs), node.attrs
    if node.op in ("matmul", "gemm") and a.get("weights_first"):
        # x [m, k] @ W[n, k]^T for few rows m, as (W @ x^T)^T: the big weight is streamed as
        # Gemm's A instead of being repacked as B on every call (see _peephole).
        if node.op == "gemm":
            bias = g.node("Reshape", [ins[2], g.const(f"{out}/column_shape", np.array([-1, 1], np.int64))], f"{out}/bias_column")
            ins = [*ins[:2], bias]
        g.node("Gemm", [ins[1], ins[0], *ins[2:]], f"{out}/transposed", transA=0, transB=1)
        g.node("Transpose", [f"{out}/transposed"], out, perm=[1, 0])
    elif node.op == "matmul" and a.get("tile_of_gradient"):
        # dz_tile^T x as (x^T dz_tile)^T: the thin dz tile is the operand onnxruntime repacks on
        # every call, not x, which is the same in every tile
        g.node("Gemm", [ins[1], ins[0]], f"{out}/transposed", transA=1, transB=0)
        g.node("Transpose", [f"{out}/transposed"], out, perm=[1, 0])
    elif node.op == "gemm" and a.get("relu"):  # emitter-internal: relu(matmul + bias), one pass
        g.node("FusedGemm", ins, out, domain=CONTRIB, transA=int(a["trans_a"]), transB=int(a["trans_b"]),
               activation="Relu")
        g.fused_shapes[out] = list(node.output.shape)
    elif node.op == "gemm":  # emitter-internal: matmul + bias
        g.node("Gemm", ins, out, transA=int(a["trans_a"]), transB=int(a["trans_b"]))
    elif node.op == "reduce_sum_square":  # emitter-internal: reduce_sum(x * x), see _sum_of_squares
        _sum_of_squares(g, ins[0], tuple(a["in_shape"]), tuple(a["axes"]), bool(a["keepdims"]), node.output)
    elif node.op in PRIMITIVES and PRIMITIVES[node.op].onnx is not None:
        PRIMITIVES[node.op].onnx(g, ins, out, **a)
    else:
        raise NotImplementedError(f"ONNX emitter: no lowering for primitive {node.op!r}")


def _sum_of_squares(g: _Graph, x: str, shape: tuple, axes: tuple, keepdims: bool, out: Value) -> None:
    """Row sums of x * x over the last axis of a large [rows, n] x, without x * x at full size:
    one Scan over row tiles, each tile squared and summed by the same Mul and ReduceSum as the
    plain graph's (onnxruntime's ReduceSumSquare would save the tiles, but it accumulates in one
    running sum and loses about an order of magnitude of precision over 2000 terms)."""
    rows, row_elems = shape[0], _numel(shape[1:])
    tile = _tile_rows(rows, row_elems, TILE_ELEMS) if len(shape) == 2 and axes in ((1,), (-1,)) else rows
    if tile == rows or _numel(shape) < FUSE_MIN_ELEMS or tile * row_elems * 8 < TILE_ELEMS:  # (thin: see _find_tiled_groups)
        square = g.node("Mul", [x, x], f"{out.name}/square")
        g.node("ReduceSum", [square, g.const(f"{out.name}/all_axes", np.array(axes, np.int64))], out.name,
               keepdims=int(keepdims))
        return
    tag = f"{out.name}/tiled"
    body = _Graph()
    square = body.node("Mul", [f"{tag}/x", f"{tag}/x"], f"{tag}/square")
    body.node("ReduceSum", [square, body.const(f"{tag}/axes", np.array([1], np.int64))], f"{tag}/sum",
              keepdims=int(keepdims))
    tile_out = [tile, 1] if keepdims else [tile]
    body_graph = helper.make_graph(body.nodes, f"{tag}_body",
                                   [helper.make_tensor_value_info(f"{tag}/x", TensorProto.FLOAT, [tile, shape[1]])],
                                   [helper.make_tensor_value_info(f"{tag}/sum", TensorProto.FLOAT, tile_out)],
                                   initializer=body.initializers)
    tiles = g.node("Reshape", [x, g.const(f"{tag}/tiles_shape", np.array([rows // tile, tile, shape[1]], np.int64))],
                   f"{tag}/tiles")
    g.nodes.append(helper.make_node("Scan", [tiles], [f"{tag}/sums"], name=tag, body=body_graph, num_scan_inputs=1))
    g.node("Reshape", [f"{tag}/sums", g.const(f"{tag}/shape", np.array(out.shape, np.int64))], out.name)


# -- rewrites on the program's node list ------------------------------------------------------

def _consumers(nodes: list[Node]) -> dict[str, list[int]]:
    users: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        for name in n.inputs:
            users.setdefault(name, []).append(i)
    return users


def _rename(nodes: list[Node], old: str, new: str) -> list[Node]:
    out = []
    for n in nodes:
        if old in n.inputs:
            n = dataclasses.replace(n, inputs=tuple(new if x == old else x for x in n.inputs))
        if n.output.name == old:
            n = dataclasses.replace(n, output=dataclasses.replace(n.output, name=new))
        out.append(n)
    return out


def _drop_output_copies(program: Program, nodes: list[Node]) -> list[Node]:
    """``out = identity(v)`` for a program output: let v's producer write ``out`` itself."""
    producers = {n.output.name: n for n in nodes}
    output_names = {v.name for v in program.outputs}
    claimed: set[str] = set()
    for out in program.outputs:
        node = producers[out.name]
        if node.op != "identity":
            continue
        src = node.inputs[0]
        producer = producers.get(src)
        if producer is None or producer.op == "constant" or src in claimed or src in output_names:
            continue  # program inputs and constants need the copy; a value given two names too
        claimed.add(src)
        nodes = _rename([n for n in nodes if n is not node], src, out.name)
        producers = {n.output.name: n for n in nodes}
    return nodes


def _peephole(nodes: list[Node], inputs: list[Value], outputs: set[str], weights_first: bool) -> list[Node]:
    """matmul + bias -> Gemm with C; inner-dimension-1 matmuls -> broadcast Mul; with
    ``weights_first``, skinny matmuls as (W @ x^T)^T."""
    values = {v.name: v for v in inputs} | {n.output.name: n.output for n in nodes}
    producers = {n.output.name: n for n in nodes}
    users = _consumers(nodes)
    gemms: dict[str, Node] = {}   # add output name -> the Gemm replacing it
    absorbed: set[str] = set()    # matmuls that now live inside a Gemm
    for n in nodes:
        if n.op != "add" or n.output.dtype != "float32":
            continue
        for side in (0, 1):
            mm, bias = producers.get(n.inputs[side]), values.get(n.inputs[1 - side])
            if (mm is None or mm.op != "matmul" or mm.output.name in absorbed or mm.output.name in outputs
                    or len(users.get(mm.output.name, [])) != 1 or mm.output.shape != n.output.shape):
                continue
            if bias is None or tuple(np.broadcast_shapes(bias.shape, mm.output.shape)) != mm.output.shape:
                continue  # Gemm's C broadcasts one way only
            if _numel(bias.shape) == _numel(mm.output.shape):
                continue  # a full-size addend is cheaper inside a tiled elementwise chain
            gemms[n.output.name] = dataclasses.replace(n, op="gemm", inputs=(*mm.inputs, bias.name), attrs=dict(mm.attrs))
            absorbed.add(mm.output.name)
            break
    out: list[Node] = []
    for n in nodes:
        if n.output.name in absorbed:
            continue
        if n.output.name in gemms:
            n = gemms[n.output.name]
        if n.op == "matmul" and _inner_dim(n, values) == 1:
            out.extend(_outer_product(n))
            continue
        if n.op in ("matmul", "gemm") and weights_first and _skinny(n, values):
            n = dataclasses.replace(n, attrs={**n.attrs, "weights_first": True})
        out.append(n)
    return out


def _fewer_full_size(nodes: list[Node], inputs: list[Value], outputs: set[str]) -> list[Node]:
    """Rewrites that keep full-size temporaries from existing at all (the step's working memory):
    ``relu(x @ W^T + b)`` as one FusedGemm (the pre-activation never stored), ``reduce_sum(x * x)``
    squared and summed tile by tile (the squares never stored whole; a length normalization and
    the goodness of the same activities each read x once), and the softmax readout's features
    never concatenated."""
    producers = {n.output.name: n for n in nodes}
    users = _consumers(nodes)
    replaced: dict[str, Node] = {}
    dropped: set[str] = set()
    for n in nodes:
        src = producers.get(n.inputs[0]) if n.inputs else None
        if src is None or src.output.name in outputs:
            continue
        only_here = len(users.get(src.output.name, [])) == 1
        if n.op == "relu" and src.op == "gemm" and only_here and not src.attrs.get("weights_first"):
            replaced[n.output.name] = dataclasses.replace(src, output=n.output, attrs={**src.attrs, "relu": True})
            dropped.add(src.output.name)
        elif n.op == "reduce_sum" and src.op == "mul" and src.inputs[0] == src.inputs[1] and all(
                nodes[u].op == "reduce_sum" for u in users[src.output.name]):
            replaced[n.output.name] = dataclasses.replace(n, op="reduce_sum_square", inputs=(src.inputs[0],),
                                                          attrs={**n.attrs, "in_shape": src.output.shape})
            dropped.add(src.output.name)
    nodes = [replaced.get(n.output.name, n) for n in nodes if n.output.name not in dropped]
    return _split_concatenated_features(nodes, inputs, outputs)


def _split_concatenated_features(nodes: list[Node], inputs: list[Value], outputs: set[str]) -> list[Node]:
    """A concatenation [f1 | f2 | ...] (the softmax readout's features) read only by products
    with it - ``[f1 | f2] @ W^T (+ b)`` and ``d^T [f1 | f2]`` - is never built: the first becomes
    ``f1 @ W[:, block 1]^T + f2 @ W[:, block 2]^T (+ b)``, the second ``[d^T f1 | d^T f2]``, whose
    blocks are small. Saves a copy of every feature at full size."""
    users = _consumers(nodes)
    shapes = {v.name: v.shape for v in inputs} | {n.output.name: n.output.shape for n in nodes}
    out: list[Node] = []
    split: dict[str, Node] = {}
    for n in nodes:
        if n.op == "concat" and n.attrs.get("axis") == 1 and len(n.output.shape) == 2 and len(n.inputs) > 1 \
                and n.output.name not in outputs and all(_reads_features(nodes[u], n.output.name)
                                                         for u in users.get(n.output.name, [])):
            split[n.output.name] = n
    if not split:
        return nodes
    for n in nodes:
        if n.output.name in split:
            continue
        c = next((split[x] for x in n.inputs if x in split), None)
        if c is None:
            out.append(n)
            continue
        widths = [(f, shapes[f][1]) for f in c.inputs]
        name = n.output.name
        if n.attrs["trans_a"]:  # d^T [f1 | f2]: one [rows, width] block per feature
            d = n.inputs[0]
            blocks = []
            for k, (f, width) in enumerate(widths):
                block = Value(f"{name}/block{k}", (n.output.shape[0], width))
                out.append(Node("matmul", (d, f), block, {"trans_a": True, "trans_b": False}))
                blocks.append(block.name)
            out.append(Node("concat", tuple(blocks), n.output, {"axis": 1}))
            continue
        w, start, total = n.inputs[1], 0, None
        for k, (f, width) in enumerate(widths):
            part_w = Value(f"{name}/weight{k}", (n.output.shape[1], width))
            out.append(Node("slice", (w,), part_w, {"axis": 1, "start": start, "stop": start + width}))
            start += width
            last = k == len(widths) - 1
            part = n.output if last and total is None else Value(f"{name}/part{k}", n.output.shape)
            if k == 0 and n.op == "gemm":
                out.append(Node("gemm", (f, part_w.name, n.inputs[2]), part, {"trans_a": False, "trans_b": True}))
            else:
                out.append(Node("matmul", (f, part_w.name), part, {"trans_a": False, "trans_b": True}))
            if total is not None:
                summed = n.output if last else Value(f"{name}/sum{k}", n.output.shape)
                out.append(Node("add", (total, part.name), summed, {}))
                part = summed
            total = part.name
    return out


def _reads_features(n: Node, concat: str) -> bool:
    if n.op not in ("matmul", "gemm") or n.attrs.get("weights_first") or n.attrs.get("relu"):
        return False
    if n.attrs["trans_a"]:  # d^T F (a plain matmul: the split has no bias to add)
        return n.op == "matmul" and n.inputs[1] == concat and n.inputs[0] != concat and not n.attrs["trans_b"]
    return n.inputs[0] == concat and n.inputs[1] != concat and n.attrs["trans_b"]  # F W^T (+ b)


SKINNY_MIN_ROWS = 2       # (one row: onnxruntime's matrix-vector path is faster as is)
SKINNY_ROWS = 32          # x @ W^T with at most this many rows of x ...
SKINNY_MIN_WEIGHTS = 1 << 16  # ... and at least this many weights runs as (W @ x^T)^T


def _skinny(n: Node, values: dict[str, Value]) -> bool:
    if n.attrs["trans_a"] or not n.attrs["trans_b"]:
        return False
    rows, cols = n.output.shape
    w = values.get(n.inputs[1])
    if w is None or not SKINNY_MIN_ROWS <= rows <= SKINNY_ROWS or _numel(w.shape) < SKINNY_MIN_WEIGHTS:
        return False
    if n.op == "gemm":
        bias = values.get(n.inputs[2])
        return bias is not None and _numel(bias.shape) == cols  # becomes a [cols, 1] column
    return True


def _inner_dim(n: Node, values: dict[str, Value]) -> int | None:
    a = values.get(n.inputs[0])
    if a is None:
        return None
    return a.shape[0] if n.attrs["trans_a"] else a.shape[1]


def _outer_product(n: Node) -> list[Node]:
    """op(a) [m, 1] @ op(b) [1, n] == a column times a row, one product per element."""
    m, cols = n.output.shape
    a, b = n.inputs
    out = []
    if n.attrs["trans_a"]:  # a is [1, m]
        col = Value(f"{n.output.name}/column", (m, 1))
        out.append(Node("reshape", (a,), col, {"new_shape": (m, 1)}))
        a = col.name
    if n.attrs["trans_b"]:  # b is [n, 1]
        row = Value(f"{n.output.name}/row", (1, cols))
        out.append(Node("reshape", (b,), row, {"new_shape": (1, cols)}))
        b = row.name
    out.append(Node("mul", (a, b), n.output, {}))
    return out


# -- tiling elementwise chains ------------------------------------------------------------------

@dataclasses.dataclass
class _Tiled:
    """A group of elementwise nodes run as one Scan over row tiles of a [rows, ...] space."""

    index: int
    nodes: list[Node]
    rows: int
    rank: int
    tile_rows: int
    tiled_inputs: list[Value]   # [rows, ...] values made outside: cut into tiles
    outputs: list[Value]        # values the rest of the graph reads
    sources: dict[str, str] = dataclasses.field(default_factory=dict)  # tiled input -> what to cut
    # (a tiled input made by a reshape is cut from the reshape's input directly: one Reshape, not
    # two that onnxruntime would fuse into a new node, which its priority order runs last)
    column_inputs: list[Value] = dataclasses.field(default_factory=list)  # [R, rows] values cut
    # into column tiles [R, tile_rows], read by a weight gradient computed tile by tile (_pull_gradients)
    gradient_tiles: set[str] = dataclasses.field(default_factory=set)  # those gradients' matmuls

    def reads(self) -> set[str]:
        local = {n.output.name for n in self.nodes}
        return {self.sources.get(x, x) for n in self.nodes for x in n.inputs if x not in local}


def _numel(shape) -> int:
    return int(np.prod(shape, dtype=np.int64))


def _tile_rows(rows: int, row_elems: int, tile_elems: int) -> int:
    """The largest divisor of ``rows`` whose tile stays within ``tile_elems`` elements."""
    best = 1
    for d in range(1, rows + 1):
        if rows % d == 0 and d * row_elems <= tile_elems:
            best = d
    return best


def _find_tiled_groups(nodes: list[Node], program_inputs: dict[str, Value], outputs: set[str]) -> list[_Tiled]:
    values = {**program_inputs, **{n.output.name: n.output for n in nodes}}
    producer = {n.output.name: i for i, n in enumerate(nodes)}
    users = _consumers(nodes)

    def key(v: Value):
        return (len(v.shape), v.shape[0]) if len(v.shape) >= 1 else None

    eligible = [n.op in _ELEMENTWISE and len(n.output.shape) >= 1 and n.output.shape[0] >= 2
                and _numel(n.output.shape) >= FUSE_MIN_ELEMS for n in nodes]
    # Grow groups in program (topological) order, merging the groups of a node's producers. A
    # node joins (and merges) them unless it also depends on one of them through a node outside
    # it (goodness -> logit -> dz, say): one Scan would have to run before and after that node.
    parent: list[int] = []       # union-find over group ids
    group_key: list[tuple] = []
    dep_left: list[set[int]] = []  # per group: groups its members reach through an outside node

    def find(g: int) -> int:
        while parent[g] != g:
            parent[g] = parent[parent[g]]
            g = parent[g]
        return g

    def reach(start) -> set[int]:
        """The groups ``start`` depends on through outside nodes, transitively, and ``start``: a
        group joined after a node was placed can make an old group depend on a new one (a
        recurrent net's h1 at t+1 joins h1's group and reads h2 at t, whose group read h1 at t)."""
        seen, stack = set(), [find(g) for g in start]
        while stack:
            g = stack.pop()
            if g not in seen:
                seen.add(g)
                stack.extend(find(d) for d in dep_left[g])
        return seen

    group_of: dict[int, int] = {}
    left: list[set[int]] = []    # per node: groups it depends on through a path that left them
    for i, n in enumerate(nodes):
        prods = [producer[x] for x in n.inputs if x in producer]
        outside = {find(g) for p in prods for g in left[p]}
        if eligible[i]:
            blocked = reach(outside)  # joining any of these would close a cycle through N's outside inputs
            candidates = {find(group_of[p]) for p in prods if p in group_of}
            candidates = {g for g in candidates if group_key[g] == key(n.output) and g not in blocked}
            if any(reach(dep_left[g]) & (candidates - {g}) for g in candidates):
                candidates = set(sorted(candidates)[:1])  # merging these would close a cycle
            if candidates:
                g = min(candidates)
                for other in candidates - {g}:
                    parent[other] = g
                    dep_left[g] |= dep_left[other]
            else:
                g = len(parent)
                parent.append(g)
                group_key.append(key(n.output))
                dep_left.append(set())
            dep_left[g] |= outside
            group_of[i] = g
        own = find(group_of[i]) if i in group_of else None
        left.append(outside | {find(group_of[p]) for p in prods if p in group_of and find(group_of[p]) != own})
    groups: dict[int, list[int]] = {}
    for i, g in group_of.items():
        groups.setdefault(find(g), []).append(i)

    tiled = []
    grouped = {i for members in groups.values() if len(members) >= 2 for i in members}
    for members in groups.values():
        if len(members) < 2:
            continue  # one op over a whole tensor gains nothing from tiling
        rank, rows = group_key[find(group_of[members[0]])]
        pulled, column_inputs = _pull_gradients(members, nodes, values, producer, users, outputs, rank, rows, grouped)
        members = sorted(set(members) | pulled)
        member_set = set(members)
        tiled_inputs, seen = [], {v.name for v in column_inputs}
        for i in members:
            for name in nodes[i].inputs:
                if producer.get(name) in member_set or name in seen or i in pulled:  # pulled: columns, outer scope
                    continue
                v = values[name]
                if len(v.shape) == rank and v.shape[0] == rows:
                    seen.add(name)
                    tiled_inputs.append(v)
        if not tiled_inputs:
            continue
        outs = [nodes[i].output for i in members
                if nodes[i].output.name in outputs or any(u not in member_set for u in users.get(nodes[i].output.name, []))]
        # (the tile size counts a tile's [rows, ...] values only, not the [R, tile_rows] column
        # tiles a pulled gradient reads: GRADIENT_TILE_ELEMS was measured with them included)
        row_elems = max(_numel(nodes[i].output.shape[1:]) for i in members)
        tile_rows = _tile_rows(rows, row_elems, GRADIENT_TILE_ELEMS if pulled else TILE_ELEMS)
        if tile_rows == rows or tile_rows * row_elems * 8 < TILE_ELEMS:
            continue  # one tile, or tiles so thin that Scan's per-step overhead would dominate
        sources = {}
        for v in tiled_inputs:
            j = producer.get(v.name)
            if j is not None and nodes[j].op == "reshape" and v.name not in outputs and all(
                    u in member_set for u in users.get(v.name, [])):
                sources[v.name] = nodes[j].inputs[0]
        tiled.append(_Tiled(len(tiled), [nodes[i] for i in sorted(members)], rows, rank, tile_rows, tiled_inputs, outs,
                            sources, column_inputs, {nodes[i].output.name for i in pulled if nodes[i].op == "matmul"}))
    return tiled


def _pull_gradients(members: list[int], nodes: list[Node], values: dict[str, Value], producer: dict[str, int],
                    users: dict[str, list[int]], outputs: set[str], rank: int, rows: int,
                    grouped: set[int]) -> tuple[set[int], list[Value]]:
    """Weight gradients a group of [units, fan_in] rows reads, computed inside its Scan instead of
    whole: ``dW = dz^T x`` becomes, per tile of units, ``dz[:, tile]^T x``, so no step holds a
    full-size gradient. Where dz is itself an elementwise product of [R, units] values and
    per-row or scalar factors (the local rule's ``(2 dlogit) y``), read only by that product and
    by column sums (the bias gradient), and not already part of another tiled group
    (``grouped``), it is made per tile too, and so are the sums: then neither dz nor dW exists at
    full size. x is read whole from the outer scope, so it must be made outside the group and
    read by nothing else in it. Returns the indices of the nodes to compute in the Scan and the
    [R, units] values it cuts into column tiles."""
    if rank != 2:
        return set(), []
    member_set, pulled, columns = set(members), set(), {}
    for i in members:
        for name in nodes[i].inputs:
            m = producer.get(name)
            if m is None or m in member_set or m in pulled or name in outputs:
                continue
            node = nodes[m]
            if node.op != "matmul" or not node.attrs.get("trans_a") or node.attrs.get("trans_b") \
                    or node.output.shape[0] != rows or not all(u in member_set for u in users.get(name, [])):
                continue
            dz, x = (values[n] for n in node.inputs)
            if dz.name in outputs or x.name == dz.name or any(u in member_set for u in users.get(x.name, [])) \
                    or producer.get(x.name) in member_set | pulled or x.name in columns:
                continue
            e = producer.get(dz.name)
            sums = [u for u in users.get(dz.name, []) if u != m]
            make_dz = (e is not None and e not in grouped and nodes[e].op in _ELEMENTWISE and all(
                nodes[u].op == "reduce_sum" and tuple(nodes[u].attrs.get("axes", ())) == (0,)
                and not nodes[u].attrs.get("keepdims") for u in sums)
                and all(_column_tileable(values[n], dz.shape) for n in nodes[e].inputs))
            cut = [values[n] for n in nodes[e].inputs if values[n].shape == dz.shape] if make_dz else [dz]
            if any(u in member_set for v in cut for u in users.get(v.name, [])):
                continue  # a member reads it whole or by rows: it cannot also come in by columns
            pulled |= {m, e, *sums} if make_dz else {m}
            columns.update({v.name: v for v in cut})
    return pulled, list(columns.values())


def _column_tileable(v: Value, space: tuple) -> bool:
    """Whether a Scan over column tiles of [R, units] can read ``v``: the whole space (cut), or
    a value constant along the units (read whole from the outer scope)."""
    return tuple(v.shape) == tuple(space) or (len(v.shape) == 2 and v.shape[1] == 1) or _numel(v.shape) == 1


SMALL_BYTES = 64 << 10  # nodes that allocate at most this much (net of what they free) run early


def _schedule(nodes: list[Node], tiled: list[_Tiled], outputs: set[str]) -> list[Node | _Tiled]:
    """A topological order of plain nodes and tiled groups: program order, except that any ready
    item whose net allocation is small runs at once. Scalars and reductions thus run early, and an
    optimizer update (which frees its gradient and writes only program outputs) runs as soon as
    the gradient exists, not after every layer's gradient as the program lists it - the peak of
    live gradients drops from all layers' to one layer's. (Run with onnxruntime's priority-based
    execution order, which follows this order; ``OrtProgram`` does.)"""
    owner: dict[str, int] = {}   # value name -> item index
    items: list[Node | _Tiled] = []
    group_of = {id(n): g for g in tiled for n in g.nodes}
    placed_group: dict[int, int] = {}
    rank: list[int] = []
    for pos, n in enumerate(nodes):
        g = group_of.get(id(n))
        if g is None:
            items.append(n)
            rank.append(pos)
        elif g.index not in placed_group:
            placed_group[g.index] = len(items)
            items.append(g)
            rank.append(pos)
        owner[n.output.name] = placed_group[g.index] if g is not None else len(items) - 1
    reads: list[set[str]] = []
    made: list[int] = []         # bytes each item leaves allocated (program outputs excluded)
    for k, item in enumerate(items):
        reads.append(item.reads() if isinstance(item, _Tiled) else set(item.inputs))
        produced = item.outputs if isinstance(item, _Tiled) else [item.output]
        made.append(sum(_nbytes(v) for v in produced if v.name not in outputs))
    size = {n.output.name: _nbytes(n.output) for n in nodes if n.output.name not in outputs}
    readers: dict[str, int] = {}
    for r in reads:
        for x in r:
            readers[x] = readers.get(x, 0) + 1
    deps = [{owner[x] for x in r if x in owner} for r in reads]
    waiting = [len(d) for d in deps]
    dependents: dict[int, list[int]] = {}
    for k, d in enumerate(deps):
        for j in d:
            dependents.setdefault(j, []).append(k)
    ready = {k for k in range(len(items)) if waiting[k] == 0}
    order = []
    while ready:
        def net(k):
            return made[k] - sum(size.get(x, 0) for x in reads[k] if readers[x] == 1)
        small = [k for k in ready if net(k) <= SMALL_BYTES]
        k = min(small or ready, key=lambda j: rank[j])
        ready.remove(k)
        order.append(items[k])
        for x in reads[k]:
            readers[x] -= 1
        for j in dependents.get(k, []):
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.add(j)
    if len(order) != len(items):
        raise AssertionError("ONNX emitter: tiled groups formed a cycle")
    return order


def _nbytes(v: Value) -> int:
    return _numel(v.shape) * {"float32": 4, "int64": 8, "bool": 1}[v.dtype]


def _emit_tiled(g: _Graph, group: _Tiled, direct: set[str] = frozenset()) -> dict[str, list[int]]:
    """Emits the group; returns the tiled shape of each program output in ``direct``, which the
    Scan writes directly (no Reshape copy)."""
    tiles = group.rows // group.tile_rows
    tag = f"tiled{group.index}"
    local = {n.output.name for n in group.nodes}

    cut = {v.name for v in group.tiled_inputs} | {v.name for v in group.column_inputs}

    def inner(name: str) -> str:
        return f"{name}/{tag}" if name in local or name in cut else name

    def tile_shape(v: Value):
        return [group.tile_rows, *v.shape[1:]]

    body = _Graph()
    if group.column_inputs:
        # Column tiles are sliced from the outer-scope value inside the body: a Scan input
        # scanned along axis 1 would make onnxruntime transpose the whole value first.
        start = f"{tag}/column_start"
        stop = body.node("Add", [start, body.const(f"{tag}/column_width", np.array([group.tile_rows], np.int64))],
                         f"{tag}/column_stop")
        axis = body.const(f"{tag}/column_axis", np.array([1], np.int64))
        for v in group.column_inputs:
            body.node("Slice", [v.name, start, stop, axis], inner(v.name))
    for n in group.nodes:
        if n.output.name in group.gradient_tiles:
            n = dataclasses.replace(n, attrs={**n.attrs, "tile_of_gradient": True})
        _lower(body, dataclasses.replace(n, inputs=tuple(inner(x) for x in n.inputs),
                                         output=dataclasses.replace(n.output, name=inner(n.output.name))))
    body_inputs = [helper.make_tensor_value_info(inner(v.name), _TYPES[v.dtype], tile_shape(v)) for v in group.tiled_inputs]
    scan_inputs = []
    for v in group.tiled_inputs:
        shape = g.const(f"{v.name}/{tag}/tiles_shape", np.array([tiles, group.tile_rows, *v.shape[1:]], np.int64))
        scan_inputs.append(g.node("Reshape", [group.sources.get(v.name, v.name), shape], f"{v.name}/{tag}/tiles"))
    if group.column_inputs:  # each step's first column: [tiles, 1], scanned to [1]
        body_inputs.append(helper.make_tensor_value_info(f"{tag}/column_start", TensorProto.INT64, [1]))
        scan_inputs.append(g.const(f"{tag}/column_starts",
                                   np.arange(0, group.rows, group.tile_rows, dtype=np.int64).reshape(tiles, 1)))
    body_graph = helper.make_graph(
        body.nodes, f"{tag}_body", body_inputs,
        [helper.make_tensor_value_info(inner(v.name), _TYPES[v.dtype], tile_shape(v)) for v in group.outputs],
        initializer=body.initializers)
    scan_outputs = [v.name if v.name in direct else f"{v.name}/{tag}/tiles" for v in group.outputs]
    g.nodes.append(helper.make_node("Scan", scan_inputs, scan_outputs, name=tag, body=body_graph,
                                    num_scan_inputs=len(scan_inputs)))
    for v, tiled in zip(group.outputs, scan_outputs):
        if v.name not in direct:
            g.node("Reshape", [tiled, g.const(f"{v.name}/{tag}/shape", np.array(v.shape, np.int64))], v.name)
    return {v.name: [tiles, group.tile_rows, *v.shape[1:]] for v in group.outputs if v.name in direct}


TILED_SHAPES_KEY = "ffcompile.tiled_output_shapes"


def to_onnx(program: Program, doc: str = "", *, fuse: bool = True, tiled_outputs: bool = False,
            weights_first: bool = True) -> onnx.ModelProto:
    """``fuse``: tile large elementwise chains (see the module doc). ``weights_first``: run
    matmuls of few rows as (W @ x^T)^T (off for graphs whose batch is not fixed, and for
    quantization, which expects weights as the second operand). ``tiled_outputs``: program
    outputs computed by such a chain leave the graph in the Scan's layout, [tiles, rows/tiles,
    ...] - the same bytes in the same order as the program's [rows, ...] - instead of being
    copied into that shape: saves one read and write of each updated parameter/state tensor
    and a full-size temporary per tensor. The model's outputs then differ in shape from the
    program's; the metadata entry ``ffcompile.tiled_output_shapes`` lists them and
    ``OrtProgram`` binds and returns them in the program's shapes."""
    output_names = {v.name for v in program.outputs}
    nodes = _drop_output_copies(program, list(program.nodes))
    nodes = _peephole(nodes, program.inputs, output_names, weights_first)
    if fuse:
        nodes = _fewer_full_size(nodes, program.inputs, output_names)
    g = _Graph()
    for n in nodes:
        if n.op == "constant":
            g.const(n.output.name, program.constants[n.output.name])
    compute = [n for n in nodes if n.op != "constant"]
    tiled = _find_tiled_groups(compute, {v.name: v for v in program.inputs} | {
        n.output.name: n.output for n in nodes if n.op == "constant"}, output_names) if fuse else []
    bypassed = {name for group in tiled for name in group.sources}
    compute = [n for n in compute if n.output.name not in bypassed]
    tiled_shapes: dict[str, list[int]] = {}
    for item in _schedule(compute, tiled, output_names):
        if isinstance(item, _Tiled):
            members = {n.output.name for n in item.nodes}
            direct = {v.name for v in item.outputs if tiled_outputs and v.name in output_names
                      and not any(v.name in n.inputs for n in compute if n.output.name not in members)}
            tiled_shapes.update(_emit_tiled(g, item, direct))
        else:
            _lower(g, item)

    def info(v):
        return helper.make_tensor_value_info(v.name, _TYPES[v.dtype], tiled_shapes.get(v.name, list(v.shape)))

    graph = helper.make_graph(g.nodes, program.name, [info(v) for v in program.inputs],
                              [info(v) for v in program.outputs], initializer=g.initializers)
    graph.value_info.extend(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
                            for name, shape in g.fused_shapes.items() if name not in {v.name for v in program.outputs})
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(CONTRIB, 1)] if g.fused_shapes else [])
    model = helper.make_model(graph, opset_imports=opsets,
                              producer_name="ffcompile", doc_string=doc)
    if tiled_shapes:
        import json
        logical = {v.name: list(v.shape) for v in program.outputs if v.name in tiled_shapes}
        helper.set_model_props(model, {TILED_SHAPES_KEY: json.dumps(logical)})
    model.ir_version = 9  # readable by onnxruntime >= 1.16 and TVM's importer
    onnx.checker.check_model(model, full_check=True)
    return model


def shipped_onnx(program: Program, doc: str = "") -> onnx.ModelProto:
    """The ONNX a bundle ships for ``program``: tiled, and a training program's updated parameters
    and optimizer state leave in the Scan's layout (``OrtProgram`` returns them in the program's
    shapes), so no step holds a full-size copy of an updated tensor beside it. Inference programs
    keep their plain output shapes: reduced-precision builds quantize them as they are."""
    trains = any(v.name.startswith("new.") for v in program.outputs)
    return to_onnx(program, doc, tiled_outputs=trains)
