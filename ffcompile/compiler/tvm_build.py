"""Compile ONNX programs (FF train steps) with Apache TVM (Relax); ``ffcompile.runtime.tvm`` runs them.

Pipeline (``compile_onnx``):

1. ONNX -> Relax with ``tvm.relax.frontend.onnx.from_onnx``.
2. Graph rewrites: products with a concatenation read its parts instead; ``FuseTransposeMatmul``
   (x @ W^T as one kernel); a large weight gradient dz^T x as one kernel that computes dz^T a
   block of units at a time; each parameter's update grouped into one kernel (with its gradient
   GEMM where that pays); the stock CPU legalize/fuse passes; each step output moved to right
   after its inputs exist (working memory).
3. Our hand-written TensorIR schedule rules (``_CPUScheduler``) on every fused kernel:
   register-tiled, vectorized, multi-threaded GEMM micro-kernels (MR x NR accumulators over the
   whole K, B blocked for L2, W packed per column block, epilogues fused into the write-back,
   zero-padding of N when it is not a multiple of the vector width); row reductions via rfactor
   into vector partial sums; column reductions vectorized along the contiguous axis; everything
   else fused, vectorized and parallelized. Optional MetaSchedule records (``tune``) take
   precedence for the kernels they cover. GPU targets get the dlight GPU rules instead.
4. On CPU, last: each new parameter and optimizer state written over the old where the kernel
   allows it (``tvm_in_place``).
5. ``tvm.compile`` + ``export_library``; a JSON sidecar ``<lib>.json`` keeps the ONNX input /
   output names, dtypes and shapes (the Relax VM function only knows positions), and which
   outputs are written over which inputs.

"""

from __future__ import annotations

import warnings

import json
from pathlib import Path

from ..runtime.machine import ALIASES, host_arch
from ..runtime.tvm import sidecar_path, usable_cores
from .tvm_in_place import InPlacePlan, candidates, in_place_pass, is_op, stmt_children

_FORMAT = "ffcompile.tvm/1"


def _np_dtype_name(elem_type: int) -> str:
    import onnx

    return str(onnx.helper.tensor_dtype_to_np_dtype(elem_type))


def _value_info(vi) -> dict:
    tt = vi.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tt.shape.dim]
    return {"name": vi.name, "dtype": _np_dtype_name(tt.elem_type), "shape": dims}


def _import_onnx(model):
    """ONNX -> Relax IRModule with one function "main" taking the graph inputs in order."""
    from tvm.relax.frontend.onnx import from_onnx

    init_names = {t.name for t in model.graph.initializer}
    inputs = [vi for vi in model.graph.input if vi.name not in init_names]
    shape_dict = {}
    dtype_dict = {}
    for vi in inputs:
        info = _value_info(vi)
        if any(not isinstance(d, int) for d in info["shape"]):
            raise ValueError(f"input {vi.name!r} has a non-static shape {info['shape']}")
        shape_dict[vi.name] = info["shape"]
        dtype_dict[vi.name] = info["dtype"]
    with warnings.catch_warnings():  # the importer announces every dotted name it sanitizes
        warnings.filterwarnings("ignore", message="Renaming name", category=UserWarning)
        mod = from_onnx(model, shape_dict=shape_dict, dtype_dict=dtype_dict, keep_params_in_input=False)
    return mod, inputs


_VIEW_OPS = {"Identity", "Reshape", "Squeeze", "Unsqueeze", "Flatten"}


def _outputs_needing_copy(model) -> list[str]:
    """Outputs that may share memory with an input, a constant or another output.

    ``TVMProgram.run`` hands outputs to numpy without a copy (they are fresh VM allocations);
    these few are copied instead so callers can never scribble over constants or inputs.
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    inputs = {i.name for i in model.graph.input}
    const_cache: dict[str, bool] = {}

    def is_const(name: str) -> bool:  # depends on no graph input
        if name in const_cache:
            return const_cache[name]
        const_cache[name] = True  # (graphs are acyclic; provisional value)
        if name in inputs:
            v = False
        elif name not in producer:
            v = True  # initializer
        else:
            v = all(is_const(i) for i in producer[name].input if i)
        const_cache[name] = v
        return v

    def root(name: str) -> str:
        while name in producer and producer[name].op_type in _VIEW_OPS:
            name = producer[name].input[0]
        return name

    seen_roots: set[str] = set()
    out = []
    for o in model.graph.output:
        r = root(o.name)
        if r in inputs or is_const(o.name) or r in seen_roots:
            out.append(o.name)
        seen_roots.add(r)
    return out


def _write_meta(out_path: Path, model, inputs, target, extra: dict) -> None:
    meta = {
        "format": _FORMAT,
        "function": "main",
        "inputs": [_value_info(vi) for vi in inputs],
        "outputs": [_value_info(vo) for vo in model.graph.output],
        "copy_outputs": _outputs_needing_copy(model),
        "target": str(target),
        **extra,
    }
    sidecar_path(out_path).write_text(json.dumps(meta, indent=1))


def _as_target(target):
    import tvm

    if isinstance(target, tvm.target.Target):
        return target
    return tvm.target.Target(target)


def _database(tuning_records):
    """A MetaSchedule JSON database from a work dir (or one of its two json files)."""
    from tvm.s_tir import meta_schedule as ms

    p = Path(tuning_records)
    if p.is_file():
        p = p.parent
    wl, tr = p / "database_workload.json", p / "database_tuning_record.json"
    if not (wl.exists() and tr.exists()):
        raise FileNotFoundError(f"no MetaSchedule database (database_*.json) in {p}")
    return ms.database.JSONDatabase(path_workload=str(wl), path_tuning_record=str(tr), allow_missing=False)


def _schedule_passes(target, schedule: str, tuning_records):
    """TIR scheduling passes run after legalization + fusion (PrimFuncs are fused, unscheduled)."""
    from tvm import relax

    passes = []
    if tuning_records is not None:
        from tvm import tirx

        db = _database(tuning_records)

        def _apply_db(mod, _ctx, db=db):
            with db:
                new = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            # mark what the database replaced so the schedule rules leave it alone
            for gv, func in new.functions_items():
                if isinstance(func, tirx.PrimFunc) and gv in mod and not func.same_as(mod[gv]):
                    new[gv] = func.with_attr("tirx.is_scheduled", True)
            return new

        import tvm

        passes.append(tvm.transform.module_pass(_apply_db, opt_level=0, name="FFCApplyTuningRecords"))
    if schedule == "hand":
        passes.append(_hand_schedule_pass(target, _SCHED_LOG))
    elif schedule == "dlight":
        from tvm.s_tir import dlight as dl

        passes.append(dl.ApplyDefaultSchedule(dl.cpu.GEMV(), dl.cpu.Reduction()))
    elif schedule != "none":
        raise ValueError(f"unknown schedule {schedule!r}")
    return passes


_SCHED_LOG: list | None = None  # set to a list to collect what the hand schedule did (debugging)


class PlannedMemory:
    """Filled by the pipeline: ``peak_bytes``, the most memory one call of the program holds at
    once beyond its inputs: the storages of the VM's static memory plan live together (allocated
    to released), plus the workspace a kernel allocates for itself (a packed operand) while it
    runs."""

    def __init__(self):
        self.peak_bytes: int | None = None


def _planned_memory_pass(report: PlannedMemory, threads: int):
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="FFCPlannedMemory")
    def _pass(mod, _ctx):
        report.peak_bytes = _planned_peak_bytes(mod, threads)
        return mod

    return _pass


def _planned_peak_bytes(mod, threads: int) -> int:
    """See ``PlannedMemory``; ``mod`` after the Relax pipeline's memory planning."""
    from tvm import relax, tirx

    workspace = {gv: _workspace_bytes(f, threads) for gv, f in mod.functions_items() if isinstance(f, tirx.PrimFunc)}
    live: dict = {}
    held = peak = 0
    for block in mod["main"].body.blocks:
        for b in block.bindings:
            v = b.value
            if is_op(v, "relax.vm.alloc_storage"):
                size = _prod(int(x) for x in v.args[0].values) * _dtype_bytes(v.args[2])
                live[b.var] = size
                held += size
            elif is_op(v, "relax.vm.kill_object") and v.args[0] in live:
                held -= live.pop(v.args[0])
            elif isinstance(v, relax.Call) and v.op in workspace:
                peak = max(peak, held + workspace[v.op])
            peak = max(peak, held)
    return peak


def _dtype_bytes(dtype_imm) -> int:
    import tvm

    return tvm.runtime.DataType(str(dtype_imm.value)).bits // 8


def _workspace_bytes(func, threads: int) -> int:
    """Bytes of the global buffers a scheduled kernel allocates for itself, each at the size and
    place the lowering gives it (a buffer a parallel loop's body allocates, once per thread)."""
    import tvm
    from tvm import s_tir, tirx

    lowered = tvm.transform.Sequential([s_tir.transform.LowerInitBlock(),
                                        s_tir.transform.PlanAndUpdateBufferAllocationLocation(),
                                        s_tir.transform.ConvertBlocksToOpaque(),
                                        s_tir.transform.CompactBufferAllocation()])(
        tvm.IRModule({"f": func.with_attr("global_symbol", "f")}))["f"]
    total, stack = 0, [(lowered.body, 1)]
    while stack:
        node, copies = stack.pop()
        if isinstance(node, tirx.For) and node.kind == tirx.ForKind.PARALLEL:
            copies = threads
        if isinstance(node, s_tir.SBlock):
            total += copies * sum(_prod(int(d) for d in buf.shape) * buf.dtype.bits // 8
                                  for buf in node.alloc_buffers if buf.scope() == "global")
        stack.extend((c, copies) for c in stmt_children(node))
    return total


def relax_pipeline(target, schedule: str = "hand", tuning_records=None, in_place=None, memory=None):
    """The Relax pipeline we compile with: the stock CPU pipeline plus TIR scheduling, and, given
    an ``InPlacePlan`` (``tvm_in_place``), state updates written over the old state. Given a
    ``PlannedMemory``, it records what one call holds at its peak."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    target = _as_target(target)
    if target.kind.name != "llvm":
        return _gpu_pipeline(target, tuning_records)

    @tvm.transform.module_pass(opt_level=0, name="FFCRelaxPipeline")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                _pre_passes(schedule)
                + cpu.library_dispatch_passes(target)
                + _legalize_passes(target, schedule)
                + _schedule_passes(target, schedule, tuning_records)
                + [_outputs_early_pass()]
                + cpu.dataflow_lower_passes(target)
                + cpu.finalize_passes(target)
                + ([in_place_pass(in_place)] if in_place is not None else [])
                + ([_planned_memory_pass(memory, _cpu_params(target)["threads"])] if memory is not None else [])
            )
            return seq(mod)

    return _pipeline


def _outputs_early_pass():
    """Run each step output as soon as its inputs exist: a parameter's update, with the bindings
    only it needs (the weight gradient GEMM), moves up to right after the last binding it shares
    with the rest of the step. The ONNX importer binds a value where it is first used, so without
    this every layer's weight gradient waits for the end of the step, and all of them (and the
    activations they read) are live at once. Other bindings keep their order."""

    def rewrite(bindings, result, _bb):
        order = _outputs_early(bindings, result)
        return None if order == list(range(len(bindings))) else [bindings[i] for i in order]

    return _main_block_pass("FFCOutputsEarly", rewrite)


def _outputs_early(bindings, result) -> list[int]:
    """The new order of ``bindings`` (indices), given the function's ``result`` (a var, bound in
    the block to the tuple of outputs or not). A call with several outputs and the bindings that
    take them apart count as one. Each binding whose value only the function returns (a sink),
    with the bindings whose every use is inside that set (its cone), moves to right after the
    latest binding outside the cone that the cone reads; the rest keep their order."""
    from tvm import relax

    index = {b.var: i for i, b in enumerate(bindings)}
    returned = {result}
    tuple_at = index.get(result)
    if tuple_at is not None and isinstance(bindings[tuple_at].value, relax.Tuple):
        returned |= set(relax.analysis.free_vars(bindings[tuple_at].value))
    unit = list(range(len(bindings)))  # a TupleGetItem belongs to the call whose outputs it takes
    for i, b in enumerate(bindings):
        if isinstance(b.value, relax.TupleGetItem) and b.value.tuple_value in index:
            unit[i] = unit[index[b.value.tuple_value]]
    members: dict[int, list[int]] = {}
    for i, u in enumerate(unit):
        members.setdefault(u, []).append(i)
    deps = {u: {unit[index[v]] for i in ms for v in relax.analysis.free_vars(bindings[i].value) if v in index} - {u}
            for u, ms in members.items()}
    users: dict[int, set] = {u: set() for u in members}
    for u, d in deps.items():
        for j in d:
            if u != tuple_at:
                users[j].add(u)
    cone_of: dict[int, int] = {}  # unit -> the sink whose cone it is in
    anchored: dict[int, list[int]] = {}  # unit -> sinks whose cones run right after it
    for s in sorted(members):
        if users[s] or s == tuple_at:
            continue
        cone, grew = {s}, True
        while grew:
            grew = False
            for j in sorted({j for u in cone for j in deps[u]} - cone, reverse=True):
                if users[j] <= cone and not returned & {bindings[i].var for i in members[j]} and j not in cone_of:
                    cone.add(j)
                    grew = True
        outside = {j for u in cone for j in deps[u]} - cone
        for u in cone:
            cone_of[u] = s
        anchored.setdefault(max(outside, default=-1), []).append(s)
    cones: dict[int, list[int]] = {}
    for u, s in cone_of.items():
        cones.setdefault(s, []).extend(members[u])
    order = [i for s in anchored.get(-1, []) for i in sorted(cones[s])]
    for u in sorted(members):
        if u in cone_of:
            continue
        order.extend(members[u])
        order.extend(i for s in anchored.get(u, []) for i in sorted(cones[s]))
    return order


def _pre_passes(schedule: str) -> list:
    """Graph-level rewrites before legalization."""
    from tvm import relax

    if schedule == "hand":
        # FuseTransposeMatmul: x @ W^T as one kernel reading W in place (our GEMM rule packs it)
        # instead of a separate, memory-bound transpose of every weight matrix
        return [_concatenated_operands_pass(), relax.transform.FuseTransposeMatmul(),
                _unit_block_gradients_pass(), _sums_over_transposes_pass()]
    return []


def _transposed(value):
    """The 2-D tensor that ``value`` (a bound expression) transposes, or None."""
    if (is_op(value, "relax.permute_dims") and len(_shape_of(value.args[0]) or ()) == 2
            and (value.attrs.axes is None or [int(a) for a in value.attrs.axes] == [1, 0])):
        return value.args[0]
    return None


def _readers(bindings, result) -> dict:
    """Each value's readers: the bound expressions that read it, and the function's result."""
    readers: dict = {}
    for e in [b.value for b in bindings] + [result]:
        for u in _uses(e):
            readers.setdefault(u, []).append(e)
    return readers


def _concatenated_operands_pass():
    """Products with a concatenation ``c = concat([a_1, .., a_n], axis=1)``, when they are all c
    feeds (a readout over several layers' activities): ``c @ W^T`` as the sum of the ``a_i @
    W_i^T`` over W's column slices, and ``d^T @ c`` as the concatenation of the ``d^T @ a_i``.
    c is then never written: it was as large as its parts together and lived beside them from
    the readout's forward GEMM to its weight gradient."""
    from tvm import relax

    def rewrite(bindings, result, bb):
        by_var = {b.var: b for b in bindings}
        readers = _readers(bindings, result)  # (the result reads as no product: left alone)

        def takes(v, c) -> bool:  # c @ W^T, or d^T @ c, all 2-D
            if not is_op(v, "relax.matmul") or len(_shape_of(v.args[0]) or ()) != 2 or len(_shape_of(v.args[1]) or ()) != 2:
                return False
            if v.args[0].same_as(c):
                return v.args[1] in by_var and _transposed(by_var[v.args[1]].value) is not None
            return v.args[1].same_as(c) and not v.args[0].same_as(c)

        parts: dict = {}  # c -> (its parts, their column offsets)
        for b in bindings:
            v = b.value
            if (is_op(v, "relax.concat") and v.attrs.axis is not None and int(v.attrs.axis) in (1, -1)
                    and isinstance(v.args[0], relax.Tuple) and len(_shape_of(b.var) or ()) == 2
                    and all(len(_shape_of(a) or ()) == 2 for a in v.args[0].fields) and readers.get(b.var)
                    and all(takes(r, b.var) for r in readers[b.var])):
                widths = [_shape_of(a)[1] for a in v.args[0].fields]
                parts[b.var] = (list(v.args[0].fields), [sum(widths[:i]) for i in range(len(widths) + 1)])
        if not parts:
            return None
        # W^T of c @ W^T: no longer read where only such products read it
        unread = {v.args[1] for c in parts for v in readers[c] if v.args[0].same_as(c)}
        unread = {w_t for w_t in unread if all(is_op(r, "relax.matmul") and r.args[0] in parts for r in readers[w_t])}
        new_bindings = []

        def emit(expr, name):
            expr = bb.normalize(expr)
            var = relax.DataflowVar(name, expr.ty)
            new_bindings.append(relax.VarBinding(var, expr))
            return var

        for b in bindings:
            v, name = b.value, b.var.name
            if b.var in parts or b.var in unread:
                continue  # the concatenation, and W^T: no longer read
            if is_op(v, "relax.matmul") and v.args[0] in parts:  # sum of a_i @ W[:, o_i:o_(i+1)]^T
                w = _transposed(by_var[v.args[1]].value)
                fields, offsets = parts[v.args[0]]
                total = None
                for i, a in enumerate(fields):
                    w_i = emit(relax.op.strided_slice(w, [1], [offsets[i]], [offsets[i + 1]]), f"{name}_w{i}")
                    p = emit(relax.op.matmul(a, emit(relax.op.permute_dims(w_i, [1, 0]), f"{name}_wt{i}")), f"{name}_p{i}")
                    total = p if total is None else emit(relax.op.add(total, p), f"{name}_s{i}")
                new_bindings.append(relax.VarBinding(b.var, total))
            elif is_op(v, "relax.matmul") and v.args[1] in parts:  # concatenation of d^T @ a_i
                products = [emit(relax.op.matmul(v.args[0], a), f"{name}_p{i}") for i, a in enumerate(parts[v.args[1]][0])]
                new_bindings.append(relax.VarBinding(b.var, bb.normalize(relax.op.concat(products, axis=1))))
            else:
                new_bindings.append(b)
        return new_bindings

    return _main_block_pass("FFCConcatenatedOperands", rewrite)


_UNIT_BLOCK_ATTR = "ffc.unit_block_gradient"


def _unit_block_gradients_pass():
    """A weight gradient ``matmul(permute_dims(s * y), x)`` (dz^T x, dz = s * y with s a scale per
    row) whose dz^T would be larger than ``_CPUScheduler.UNIT_BLOCK_BYTES``, as one kernel that
    writes dz^T a block of units at a time (the GEMM rule's unit blocks) instead of whole: whole,
    it is a third tensor as large as the layer's output, live beside the layer's input x and
    output y while the GEMM runs. The parameter's update joins the kernel (see
    ``_state_update_groups``), so the gradient is not written whole either."""
    from tvm import relax, te

    def operands(v, by_var, readers):  # (y, s, x, the transpose's var) of such a matmul, or None
        if not is_op(v, "relax.matmul") or v.args[0] not in by_var or len(readers.get(v.args[0], ())) != 1:
            return None
        dz = _transposed(by_var[v.args[0]].value)
        if dz is None or dz not in by_var or not is_op(by_var[dz].value, "relax.multiply"):
            return None
        x = v.args[1]
        ys, xs = _shape_of(dz), _shape_of(x)
        if ys is None or xs is None or len(xs) != 2 or ys[0] != xs[0]:
            return None
        a, b = by_var[dz].value.args
        for s, y in ((a, b), (b, a)):
            if _shape_of(s) == (ys[0], 1) and _shape_of(y) == ys and all(str(e.ty.dtype) == "float32" for e in (s, y, x)):
                return y, s, x, v.args[0]
        return None

    def kernel(rows: int, units: int, cols: int):
        y, s = te.placeholder((rows, units), "float32", "y"), te.placeholder((rows, 1), "float32", "s")
        x = te.placeholder((rows, cols), "float32", "x")
        dz_t = te.compute((units, rows), lambda u, r: s[r, 0] * y[r, u], name="dz_t")
        k = te.reduce_axis((0, rows), "k")
        g = te.compute((units, cols), lambda u, f: te.sum(dz_t[u, k] * x[k, f], axis=k), name="matmul")
        return (te.create_prim_func([y, s, x, g], index_dtype_override="int64")
                .without_attr("global_symbol").with_attr(_UNIT_BLOCK_ATTR, 1))

    def rewrite(bindings, result, bb):
        by_var = {b.var: b for b in bindings}
        readers = _readers(bindings, result)
        replaced, dropped = {}, set()
        for b in bindings:
            found = operands(b.value, by_var, readers)
            if found is None or _prod(_shape_of(found[0])) * 4 <= _CPUScheduler.UNIT_BLOCK_BYTES:
                continue
            y, s, x, transpose = found
            gv = bb.add_func(kernel(*_shape_of(y), _shape_of(x)[1]), "gradient_by_unit_blocks")
            replaced[b.var] = relax.call_tir(gv, relax.Tuple([y, s, x]), b.var.ty)
            dropped.add(transpose)  # read by this product only
            dz = by_var[transpose].value.args[0]
            if len(readers.get(dz, ())) == 1:
                dropped.add(dz)
        if not replaced:
            return None
        return [relax.VarBinding(b.var, replaced[b.var]) if b.var in replaced else b
                for b in bindings if b.var not in dropped]

    return _main_block_pass("FFCUnitBlockGradients", rewrite)


def _sums_over_transposes_pass():
    """``sum(g, axis=0)`` as ``sum(g^T, axis=1)`` where the program transposes g anyway (a bias
    gradient beside the weight gradient's ``g^T``): g is then read only by its transpose, which
    FuseOps fuses into the kernel that computes g (g^T written directly, not g and then g^T),
    and the sum runs along g^T's contiguous rows."""
    from tvm import relax

    def rewrite(bindings, _result, _bb):
        transposed: dict = {}  # g -> the var holding g^T, for 2-D g
        new_bindings, changed = [], False
        for b in bindings:
            v = b.value
            if _transposed(v) is not None:
                transposed.setdefault(v.args[0], b.var)
            elif (is_op(v, "relax.sum") and v.args[0] in transposed and not v.attrs.keepdims
                  and v.attrs.axis is not None and [int(a) for a in v.attrs.axis] == [0]):
                b = relax.VarBinding(b.var, relax.op.sum(transposed[v.args[0]], axis=[1], keepdims=False))
                changed = True
            new_bindings.append(b)
        return new_bindings if changed else None

    return _main_block_pass("FFCSumsOverTransposes", rewrite)


def _main_block_pass(name: str, rewrite):
    """A module pass over the bindings of ``main``'s one dataflow block: ``rewrite(bindings,
    result, bb)`` returns the new bindings, or None to leave the module as it is; ``bb``, a
    BlockBuilder over the module, takes the functions the new bindings call."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, _ctx):
        main = mod["main"]
        if len(main.body.blocks) != 1 or not isinstance(main.body.blocks[0], relax.DataflowBlock):
            return mod
        bb = relax.BlockBuilder(mod)
        new_bindings = rewrite(list(main.body.blocks[0].bindings), main.body.body, bb)
        if new_bindings is None:
            return mod
        new_main = relax.Function(main.params, relax.SeqExpr([relax.DataflowBlock(new_bindings)], main.body.body),
                                  main.ret_ty, main.is_pure, main.attrs)
        gv_main = mod.get_global_var("main")
        out = tvm.IRModule({gv: (new_main if gv.same_as(gv_main) else f) for gv, f in bb.get().functions_items()},
                           attrs=mod.attrs)
        return relax.transform.Normalize()(out)

    return _pass


def _legalize_passes(target, schedule: str) -> list:
    """The stock CPU legalization and fusion, with each parameter's optimizer update grouped into
    one kernel before FuseOps (for our schedule rules, which fuse the group's loops)."""
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    passes = cpu.legalize_passes(target)
    if schedule != "hand":
        return passes
    at = next(i for i, p in enumerate(passes) if p.info.name == "FuseOps")
    return passes[:at] + [_group_state_updates_pass()] + passes[at:]


_ELEMWISE_PATTERNS = (0, 1)  # relax OpPatternKind: kElemWise, kBroadcast
_OUT_ELEMWISE_FUSABLE = 4  # kOutEWiseFusable: a matmul


def _group_state_updates_pass():
    """Make each parameter's new state (the parameter, its optimizer moments) one fused function.

    The update reads the gradient g and the old state and writes the new state: in Adam, m' and
    v' from g, then p' from m' and v'. FuseOps fuses only where a value's uses meet again inside
    the group; m' and v' are also step outputs, so it leaves three kernels that write and re-read
    every state tensor. Here, for every step output, the elementwise kernels of the output's shape
    that produce it (back to the first kernel of another kind) are collected; outputs whose sets
    share a kernel form one group, joined by the gradient GEMM that feeds it when the GEMM sums
    over few k or runs by blocks of units (``_unit_block_gradients_pass``). A group becomes a
    function marked Primitive that FuseTIR turns into one kernel with several outputs. A group
    that a value outside it would both read from and feed is left alone.
    (Other outputs computed by an elementwise chain, e.g. the step's negative labels, are grouped
    the same way.)"""
    def rewrite(bindings, result, bb):
        groups = _state_update_groups(bb.get(), bindings, result)
        if not groups:
            return None
        member_of = {b.var: gi for gi, members in enumerate(groups) for b in members}
        # (bindings to emit, values they read, values they define), in program order; a group
        # stands where its last member stood
        items = []
        for b in bindings:
            gi = member_of.get(b.var)
            if gi is None:
                items.append(([b], set(_uses(b.value)), {b.var}))
            elif b.var.same_as(groups[gi][-1].var):
                members = groups[gi]
                inside = {m.var for m in members}
                reads = {u for m in members for u in _uses(m.value)} - inside
                items.append((_extract_group(bb, members, bindings, result, gi), reads, inside))
        # emit each item once what it reads is defined: a binding that read a member's value
        # before the group's place moves after the group
        bound = {b.var for b in bindings}
        defined: set = set()
        new_bindings, pending = [], []
        for item in items:
            pending.append(item)
            progress = True
            while progress:
                progress = False
                for it in list(pending):
                    if all(u in defined or u not in bound for u in it[1]):
                        pending.remove(it)
                        new_bindings.extend(it[0])
                        defined |= it[2]
                        progress = True
        # groups that read each other's results (through values outside both): leave all
        return None if pending else new_bindings

    return _main_block_pass("FFCGroupStateUpdates", rewrite)


def _uses(expr) -> list:
    from tvm import relax

    return list(relax.analysis.free_vars(expr))


def _state_update_groups(mod, bindings, result) -> list[list]:
    """Groups of bindings (in program order) as described in :func:`_group_state_updates_pass`."""
    from tvm import relax

    by_var = {b.var: b for b in bindings}
    position = {b.var: i for i, b in enumerate(bindings)}

    def elementwise(b) -> bool:
        return _op_pattern(mod, b) in _ELEMWISE_PATTERNS

    outputs = list(result.fields) if isinstance(result, relax.Tuple) else [result]
    if isinstance(result, relax.Var) and result in by_var and isinstance(by_var[result].value, relax.Tuple):
        outputs = list(by_var[result].value.fields)
    parent: dict = {}

    def find(x):
        while not (up := parent.setdefault(x, x)).same_as(x):
            x = up
        return x

    members: set = set()
    for out in outputs:
        if not isinstance(out, relax.Var) or out not in by_var or not elementwise(by_var[out]):
            continue
        shape = _shape_of(out)
        if not shape:
            continue
        stack, seen = [out], set()
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            members.add(v)
            parent[find(v)] = find(out)
            for u in _uses(by_var[v].value):
                if u in by_var and elementwise(by_var[u]) and _shape_of(u) == shape:
                    stack.append(u)
    groups: dict = {}
    for v in members:
        groups.setdefault(find(v), []).append(v)
    readers: dict = {}
    for b in bindings:
        for u in _uses(b.value):
            readers.setdefault(u, set()).add(b.var)
    found = []
    for vs in sorted(groups.values(), key=lambda vs: min(position[v] for v in vs)):
        # the GEMM that computes the gradient, when only the group reads it and it sums over few
        # k (see _CPUScheduler.EPILOGUE_MAX_K): the kernel then updates each tile of the gradient
        # as it leaves the GEMM's registers; or when it runs by unit blocks, each block's update
        # right after the block
        inside = set(vs)
        for v in list(vs):
            for u in _uses(by_var[v].value):
                if (u in by_var and u not in inside and _shape_of(u) == _shape_of(v)
                        and readers.get(u, set()) <= inside
                        and (_is_unit_block_gradient(mod, by_var[u])
                             or (_op_pattern(mod, by_var[u]) == _OUT_ELEMWISE_FUSABLE
                                 and _contraction(by_var[u]) <= _CPUScheduler.EPILOGUE_MAX_K))):
                    inside.add(u)
        if len(inside) < 2 or not _is_convex(inside, bindings):
            continue
        found.append([by_var[v] for v in sorted(inside, key=position.get)])
    return found


def _is_unit_block_gradient(mod, binding) -> bool:
    v = binding.value
    if not is_op(v, "relax.call_tir"):
        return False
    attrs = mod[v.args[0]].attrs
    return attrs is not None and _UNIT_BLOCK_ATTR in attrs


def _contraction(binding) -> int:
    """K of a legalized matmul kernel's call (its first operand is [.., M, K])."""
    shape = _shape_of(binding.value.args[1].fields[0])
    return shape[-1] if shape else 1 << 30


def _op_pattern(mod, binding) -> int | None:
    """The relax OpPatternKind of a binding's call_tir kernel (None for anything else)."""
    v = binding.value
    if not is_op(v, "relax.call_tir"):
        return None
    func = mod[v.args[0]]
    return None if func.attrs is None or "op_pattern" not in func.attrs else int(func.attrs["op_pattern"])


def _shape_of(var):
    try:
        return tuple(int(d) for d in var.ty.shape)
    except Exception:  # noqa: BLE001 - not a tensor of static shape
        return None


def _is_convex(group: set, bindings) -> bool:
    """No value outside ``group`` both depends on a member and feeds one."""
    tainted: set = set()  # values outside the group computed from a member
    for b in bindings:
        if b.var not in group and any(u in group or u in tainted for u in _uses(b.value)):
            tainted.add(b.var)
    return not any(u in tainted for b in bindings if b.var in group for u in _uses(b.value))


def _extract_group(bb, members, bindings, result, index: int) -> list:
    """Add a Primitive function computing ``members``; return the bindings that call it and
    rebind the members that are used outside the group."""
    from tvm import relax

    inside = {b.var for b in members}
    external = []  # values from outside, constants included (FuseTIR takes no constants inside)
    for b in members:
        for a in b.value.args[1].fields:
            if a not in inside and not any(a.same_as(e) for e in external):
                external.append(a)
    used_outside = set()
    for b in bindings:
        if b.var not in inside:
            used_outside.update(u for u in _uses(b.value) if u in inside)
    used_outside.update(u for u in _uses(result) if u in inside)
    results = [b.var for b in members if b.var in used_outside]
    params = [relax.Var(f"in{i}", v.ty) for i, v in enumerate(external)]

    def param_for(a):
        return next(p for e, p in zip(external, params) if a.same_as(e))

    remap: dict = {}
    with bb.function(f"ffc_state_update{index}", params, attrs={"Primitive": 1}, private=True):
        with bb.dataflow():
            for b in members:
                call = b.value
                args = [remap[a] if a in remap else param_for(a) for a in call.args[1].fields]
                remap[b.var] = bb.emit(relax.Call(call.op, [call.args[0], relax.Tuple(args), *call.args[2:]],
                                                  call.attrs, call.ty_args), name_hint=b.var.name)
            out = bb.emit_output(relax.Tuple([remap[v] for v in results]) if len(results) > 1 else remap[results[0]])
        gv = bb.emit_func_output(out)
    call = bb.normalize(relax.Call(gv, external))
    if len(results) == 1:
        return [relax.VarBinding(results[0], call)]
    call_var = relax.DataflowVar(f"state_update{index}", call.ty)
    return [relax.VarBinding(call_var, call),
            *(relax.VarBinding(v, bb.normalize(relax.TupleGetItem(call_var, k))) for k, v in enumerate(results))]


def _gpu_schedule_pass(target):
    """dlight GPU rules applied per kernel, robustly: tvm 0.27's dl.gpu.Reduction hits an
    internal rfactor error on some of our fused kernels (and ApplyDefaultSchedule lets that
    abort the build), so every rule is tried in turn and a failing rule is skipped."""
    import tvm
    from tvm import s_tir
    from tvm.s_tir import dlight as dl

    rules = [dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction(), dl.gpu.Fallback()]

    @tvm.transform.module_pass(opt_level=0, name="FFCGPUSchedule")
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in _unscheduled_prim_funcs(mod):
            for rule in rules:
                try:
                    space = rule.apply(func, target, False)
                except Exception:  # noqa: BLE001
                    continue
                if space is None:
                    continue
                sch = space if isinstance(space, s_tir.Schedule) else space[0]
                updates[gv] = sch.mod["main"].with_attr("tirx.is_scheduled", True)
                break
        for gv, f in updates.items():
            mod[gv] = f
        return mod

    return _pass


def _gpu_pipeline(target, tuning_records):
    """TVM's stock GPU pipeline, with our robust rule application instead of ApplyDefaultSchedule."""
    import importlib

    import tvm
    from tvm import relax

    try:  # per-backend pass lists live in tvm.relax.backend.<kind>.pipeline
        be = importlib.import_module(f"tvm.relax.backend.{target.kind.name}.pipeline")
    except ImportError:  # pragma: no cover
        be = relax.pipeline

    @tvm.transform.module_pass(opt_level=0, name="FFCRelaxPipelineGPU")
    def _pipeline(mod, _ctx):
        with target:
            seq = tvm.transform.Sequential(
                be.library_dispatch_passes(target)
                + [
                    relax.transform.LegalizeOps(),
                    relax.transform.AnnotateTIROpPattern(),
                    relax.transform.FoldConstant(),
                    relax.transform.FuseOps(),
                    relax.transform.FuseTIR(),
                ]
                + _schedule_passes(target, "none", tuning_records)
                + [_gpu_schedule_pass(target), _outputs_early_pass()]
                + be.dataflow_lower_passes(target)
                + be.finalize_passes(target)
            )
            return seq(mod)

    return _pipeline


def lower_for_tuning(model, target, schedule: str = "hand"):
    """ONNX -> legalized, fused Relax module (what MetaSchedule tunes / the database keys on).
    ``schedule`` must match the one given to :func:`compile_onnx` so the kernels hash the same."""
    import tvm
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    target = _as_target(target)
    mod, _ = _import_onnx(model)
    with target:
        return tvm.transform.Sequential(
            _pre_passes(schedule) + cpu.library_dispatch_passes(target) + _legalize_passes(target, schedule))(mod)


def tune(model, target, work_dir: str | Path, *, trials: int = 64, max_trials_per_task: int | None = None,
         op_names: list[str] | None = None, schedule: str = "hand") -> Path:
    """MetaSchedule-tune an ONNX program's fused kernels; the database lands in ``work_dir``
    (pass it as ``tuning_records`` to :func:`compile_onnx`). Needs ``num-cores`` in the target."""
    from tvm import relax

    target = _as_target(target)
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    mod = lower_for_tuning(model, target, schedule)
    with target:
        relax.transform.MetaScheduleTuneIRMod(
            params={}, work_dir=str(work_dir), max_trials_global=trials,
            max_trials_per_task=max_trials_per_task, op_names=op_names,
        )(mod)
    return work_dir


def compile_onnx(model, target: dict, out_path: str | Path, *, cc: str | None = None,
                 tuning_records: str | Path | None = None, schedule: str = "hand") -> Path:
    """Compile an ONNX program for ``target`` and export it as a shared library at ``out_path``.

    Writes ``<out_path>.json`` next to it with the input/output names, dtypes and shapes
    (the Relax VM function does not keep ONNX names), which :func:`load` reads.
    ``schedule``: "hand" (our TensorIR schedule rules, default), "dlight" (tvm's CPU dlight
    rules) or "none" (stock pipeline; unscheduled loops). ``tuning_records``: a MetaSchedule
    work dir from :func:`tune`; tuned kernels take precedence over the schedule rules.
    """
    import tvm

    import onnx

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model))
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tgt = _as_target(target)
    mod, inputs = _import_onnx(model)
    in_place = InPlacePlan(candidates(model, inputs)) if schedule == "hand" and tgt.kind.name == "llvm" else None
    memory = PlannedMemory() if tgt.kind.name == "llvm" else None
    # (the Relax VM's "compiled" exec mode saves 2-3 % of a small step's time, but LLVM takes
    # minutes on a program of thousands of calls, e.g. a locally connected CIFAR net)
    ex = tvm.compile(mod, target=tgt, relax_pipeline=relax_pipeline(tgt, schedule, tuning_records, in_place, memory))
    kw = {}
    if cc is not None:
        kw["cc"] = cc
    elif (tgt.kind.name == "llvm" and "mtriple" in tgt.attrs and out_path.suffix != ".tar"
          and not _host_triple_matches(str(tgt.attrs["mtriple"]))):
        raise ValueError(f"cross-compiling for {tgt.attrs['mtriple']}: pass cc= (e.g. aarch64-linux-gnu-gcc)")
    ex.export_library(str(out_path), **kw)
    applied = in_place.applied if in_place is not None else {}
    _write_meta(out_path, model, inputs, tgt, {
        "schedule": schedule, "tuned": tuning_records is not None,
        "in_place": {model.graph.output[o].name: inputs[i].name for o, i in sorted(applied.items())},
        **({"planned_working_bytes": memory.peak_bytes} if memory is not None else {})})
    return out_path


def _host_triple_matches(triple: str) -> bool:
    arch = triple.split("-")[0].lower()
    return ALIASES.get(arch, arch) == host_arch()


# ---------------------------------------------------------------------------------------------
# Hand-written TensorIR schedule rules for CPUs
# ---------------------------------------------------------------------------------------------


def _cpu_params(target) -> dict:
    """Vector lanes (fp32) / register count / thread count for an llvm target."""
    attrs = target.attrs
    triple = str(attrs.get("mtriple", "")) or ""
    mcpu = str(attrs.get("mcpu", "")) or ""
    mattr = " ".join(str(a) for a in attrs.get("mattr", []) or [])
    if not triple:
        import platform

        arch = platform.machine().lower()
    else:
        arch = triple.split("-")[0].lower()
    if arch in ("aarch64", "arm64"):
        lanes, regs = 4, 32
    elif arch.startswith("arm"):
        lanes, regs = 4, 16
    elif arch in ("x86_64", "amd64", "i686", "i386", "x86"):
        avx512 = "avx512f" in mattr or any(
            c in mcpu for c in ("skylake-avx512", "cascadelake", "cooperlake", "icelake", "sapphirerapids",
                                "tigerlake", "znver4", "znver5", "rocketlake", "graniterapids", "emeraldrapids"))
        avx = avx512 or "avx" in mattr or any(
            c in mcpu for c in ("haswell", "broadwell", "skylake", "znver", "alderlake", "raptorlake",
                                "meteorlake", "cannonlake", "core-avx", "x86-64-v3", "x86-64-v4"))
        if avx512:
            lanes, regs = 16, 32
        elif avx:
            lanes, regs = 8, 16
        else:
            lanes, regs = 4, 16
    else:
        lanes, regs = 4, 16
    cores = int(attrs.get("num-cores", 0) or 0) or usable_cores()
    return {"lanes": lanes, "regs": regs, "threads": cores}


def _int(x):
    try:
        return int(x)
    except Exception:
        return None


def _prod(xs):
    out = 1
    for x in xs:
        out *= x
    return out


def _divisor_near(n: int, want: int, limit: int | None = None) -> int:
    """Largest divisor of n that is <= want (>= 1)."""
    best = 1
    for d in range(1, min(n, want) + 1):
        if n % d == 0 and (limit is None or d <= limit):
            best = d
    return best


def _concat_bounds(value, var) -> list[int] | None:
    """The offsets where a concatenation along ``var`` switches source: the constants that a chain
    of ``if_then_else(c <= var, ...)`` (as TOPI's concatenate writes it) compares ``var`` with;
    None if ``value`` is not such a chain."""
    from tvm import tirx

    def is_select(expr) -> bool:
        return getattr(getattr(expr, "op", None), "name", "") == "prim.if_then_else"

    bounds = set()
    while is_select(value):
        cond, then, other = value.args
        if not (isinstance(cond, tirx.LE) and isinstance(cond.a, tirx.IntImm) and cond.b.same_as(var)):
            return None
        bounds.add(int(cond.a.value))
        if is_select(then):
            return None  # the chain nests in the else branch only
        value = other
    return sorted(bounds) or None


def _is_concatenation(block) -> list[int] | None:
    """The offsets where ``block``, a concatenation along its innermost axis, switches source."""
    if not hasattr(block.body, "value") or not block.iter_vars:
        return None
    return _concat_bounds(block.body.value, block.iter_vars[-1].var)


def _var_set(expr) -> set:
    """Free variables of a TIR expression."""
    from tvm.tirx.analysis import undefined_vars

    return set(undefined_vars(expr))


_EXPENSIVE = ("T.exp", "T.log", "T.sqrt", "T.sigmoid", "T.tanh", "T.pow", "T.erf", "T.rsqrt", "T.fmod", " / ")


def _is_cheap(block) -> bool:
    """True if the block body has no float division / transcendental calls (cheap to recompute)."""
    text = str(block.body)
    return not any(k in text for k in _EXPENSIVE)


def _store_dtype(block) -> str:
    from tvm import tirx

    return str(block.body.buffer.ty.dtype) if isinstance(block.body, tirx.BufferStore) else ""


def _block_size(sch, blk) -> int:
    return _prod(_int(iv.dom.extent) or 1 for iv in sch.get(blk).iter_vars)


class _CPUScheduler:
    """Schedules one fused PrimFunc: inline injective ops, then tile/vectorize/parallelize GEMMs,
    reductions and elementwise loops. Each step is tried on a copy and skipped on failure."""

    PAR_MIN_WORK = 1 << 14  # elements below which we do not bother with threads
    # multiply-adds from which a GEMM with fewer outputs than that runs on all threads (a small
    # batch's forward GEMM: few outputs, long rows; a thread-pool launch costs about 10 us of
    # one core's FMAs)
    GEMM_PAR_MIN_MACS = 1 << 20
    GEMV_ROWS = 4  # x @ W^T with at most this many rows is a row reduction, W read in place
    # A GEMM over at most this many k mostly writes its output: downstream elementwise work (an
    # optimizer update) then runs on each tile as it leaves the registers. Over more k the
    # update streams faster as a kernel of its own (measured: 4x2000 and 2x500 at batch 100).
    EPILOGUE_MAX_K = 64
    # A weight gradient's dz^T larger than this is computed a block of units at a time, inside
    # the GEMM, with the update (working memory: see _unit_block_gradients_pass), in blocks of
    # at most this size, but no more blocks than MAX_UNIT_BLOCKS: each block packs x again
    # (measured: 4 blocks add about 2 % to Hinton's 4 x 2000 step at batch 1000)
    UNIT_BLOCK_BYTES = 4 << 20
    MAX_UNIT_BLOCKS = 4
    # Inlining a producer read at several points (a stencil such as the hybrid masks' blur) copies
    # its expression into each; repeated, that grows exponentially (12 blur passes: 3^12 terms).
    MAX_BODY_CHARS = 4000

    def __init__(self, func, target):
        from tvm import s_tir

        self.sch = s_tir.Schedule(func)
        p = _cpu_params(target)
        self.lanes, self.regs, self.threads = p["lanes"], p["regs"], p["threads"]
        self.log: list[str] = []

    # -- helpers -----------------------------------------------------------------------------
    def _try(self, fn, *args):
        """Run fn on a copy of the schedule; keep the result only if it succeeds."""
        saved = self.sch.copy()
        try:
            fn(*args)
            return True
        except Exception as e:  # noqa: BLE001 - any schedule error means "skip this rule"
            self.sch = saved
            self.log.append(f"{getattr(fn, '__name__', fn)}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            return False

    def _blocks(self):
        sch = self.sch
        return [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]

    def _exists(self, name) -> bool:
        try:
            self.sch.get_sblock(name)
            return True
        except Exception:  # noqa: BLE001
            return False

    def _is_reduction(self, name) -> bool:
        from tvm import tirx

        return any(iv.iter_type == tirx.IterVar.CommReduce for iv in self.sch.get(self.sch.get_sblock(name)).iter_vars)

    # -- inlining ------------------------------------------------------------------------------
    def inline(self):
        """Inline cheap producers into their consumers, then injective consumers (e.g. a scale
        after a transpose) into their single non-reduction producer; each to a fixpoint."""
        self._inline_to_fixpoint("compute_inline", self._may_inline_into_consumers)
        self._inline_to_fixpoint("reverse_compute_inline", self._may_inline_into_producer)

    def _may_inline_into_consumers(self, blk) -> bool:
        consumers = self.sch.get_consumers(blk)
        if not consumers:
            return False
        # a GEMM's operand computed in the kernel (dz^T by unit blocks) is written a block at a
        # time: inlined, it would be recomputed for every column block of the product
        if any(self._gemm_operands(self.sch.get(c).name_hint) is not None for c in consumers):
            return False
        size = _block_size(self.sch, blk)
        # do not recompute expensive values across a broadcast (a concatenation of n sources is
        # n times as large as each, and reads each value once)
        def pieces(c) -> int:
            return len(_is_concatenation(self.sch.get(c)) or []) + 1

        return _is_cheap(self.sch.get(blk)) or all(_block_size(self.sch, c) <= size * pieces(c) for c in consumers)

    def _may_inline_into_producer(self, blk) -> bool:
        # only the producer's one reader: inlining one of several leaves the others reading a
        # buffer nobody writes (TVM does not refuse)
        prods = self.sch.get_producers(blk)
        return (len(prods) == 1 and not self._is_reduction(self.sch.get(prods[0]).name_hint)
                and len(self.sch.get_consumers(prods[0])) == 1)

    def _inline_to_fixpoint(self, primitive: str, eligible) -> None:
        """Apply the schedule primitive ``primitive`` to one eligible non-reduction block at a time
        until none is left. A block the primitive rejects is skipped (the schedule restored) and
        tried again after the next change; one whose inlining would grow a block body past
        ``MAX_BODY_CHARS`` is undone and not tried again."""
        too_big: set[str] = set()
        changed = True
        while changed:
            changed = False
            for name in self._blocks():
                if name in too_big or self._is_reduction(name):
                    continue
                blk = self.sch.get_sblock(name)
                if not eligible(blk):
                    continue
                saved = self.sch.copy()
                try:
                    getattr(self.sch, primitive)(blk)
                except Exception:  # noqa: BLE001
                    self.sch = saved
                    continue
                grown = max(len(str(self.sch.get(b).body)) for b in self._touched(name, saved))
                if grown > self.MAX_BODY_CHARS:
                    self.sch = saved
                    too_big.add(name)
                    self.log.append(f"{primitive} {name}: skipped, a body would grow to {grown} characters")
                    continue
                changed = True
                break

    def _touched(self, name, before):
        """Blocks of the current schedule that an inlining of ``name`` (as scheduled in ``before``)
        rewrote: its consumers and producers that still exist."""
        blk = before.get_sblock(name)
        names = {before.get(b).name_hint for b in (*before.get_consumers(blk), *before.get_producers(blk))}
        return [self.sch.get_sblock(n) for n in names if self._exists(n)]

    # -- GEMM ------------------------------------------------------------------------------------
    def _gemm_operands(self, name):
        """(M, N, K) if the block is C[.., i, j] += A(i,k) * B(k,j) with B contiguous along j
        (A may be [i,k] or [k,i]); else None."""
        from tvm import tirx
        from tvm.ir import TensorLoad

        stmt = self.sch.get(self.sch.get_sblock(name))
        ivs = list(stmt.iter_vars)
        kinds = ["R" if iv.iter_type == tirx.IterVar.CommReduce else "S" for iv in ivs]
        if kinds[-1:] != ["R"] or kinds.count("R") != 1 or len(ivs) < 3 or any(k != "S" for k in kinds[:-1]):
            return None
        if any(_int(iv.dom.extent) is None for iv in ivs):
            return None
        if any(_int(iv.dom.extent) != 1 for iv in ivs[:-3]):  # batch dims only if trivial
            return None
        iv_i, iv_j, iv_k = ivs[-3], ivs[-2], ivs[-1]
        i, j, k = iv_i.var, iv_j.var, iv_k.var
        if len(stmt.writes) != 1 or len(stmt.reads) not in (2, 3):
            return None
        body = stmt.body
        if not isinstance(body, tirx.BufferStore):
            return None
        wbuf = body.buffer
        # the store must be C[..., i, j] = C[..., i, j] + X * Y
        idx = list(body.indices)
        if not (idx and idx[-1].same_as(j) and len(idx) >= 2 and idx[-2].same_as(i)):
            return None
        v = body.value
        if not isinstance(v, tirx.Add):
            return None
        prod = v.b if isinstance(v.a, TensorLoad) and v.a.source.same_as(wbuf) else (
            v.a if isinstance(v.b, TensorLoad) and v.b.source.same_as(wbuf) else None)
        if prod is None:
            return None
        if isinstance(prod, tirx.Cast):
            return None
        if not isinstance(prod, tirx.Mul) or not all(isinstance(x, TensorLoad) for x in (prod.a, prod.b)):
            return None
        ops = [prod.a, prod.b]
        b_op = [o for o in ops if i not in _var_set(o) and j in _var_set(o)]
        if len(b_op) != 1:
            return None
        b_op = b_op[0]
        a_op = ops[1] if ops[0] is b_op else ops[0]
        if j in _var_set(a_op) or i not in _var_set(a_op) or k not in _var_set(a_op) or k not in _var_set(b_op):
            return None
        if str(wbuf.ty.dtype) != "float32" or len(b_op.indices) != 2:
            return None
        if b_op.indices[-1].same_as(j) and b_op.indices[-2].same_as(k):
            layout = "KN"
        elif b_op.indices[-1].same_as(k) and b_op.indices[-2].same_as(j):
            layout = "NK"
        else:
            return None
        b_index = [n for n, r in enumerate(stmt.reads) if r.source.same_as(b_op.source)]
        if len(b_index) != 1:
            return None
        return _int(iv_i.dom.extent), _int(iv_j.dom.extent), _int(iv_k.dom.extent), layout, b_index[0]

    # B block kept in L2: current x86 cores have 512K (Zen 3) to 2M, ARM server cores 1M (measured:
    # the 2000 x 2000 weight gradient over 200 rows, 6.4 -> 5.9 ms with blocks of 5 panels, 320K)
    L2_BYTES = 512 * 1024
    # A micro-kernel keeps two FMA pipes of latency 4 busy only with >= 8 independent accumulators;
    # it issues one load per B vector and per A element, two per cycle; what L1 cannot hold
    # comes from L2 at about 32 bytes per cycle in order, half that from rows N apart. (Current
    # x86 and ARM cores are within a factor of these that does not change the choice.)
    FMA_PIPES, FMA_LATENCY, LOADS_PER_CYCLE = 2, 4, 2
    L1_BYTES, L2_BYTES_PER_CYCLE = 32 * 1024, 32
    # B stored [K, N] is packed for at least this many rows of A: the copy of B, one pass, is
    # repaid by the row tiles that then read each panel in order (measured: the 2000 x 2000 weight
    # gradient over 200 rows takes 17 % less time packed)
    PACK_MIN_ROWS = 64
    # N whose best tile is one vector wide (784 = 49 x 16) is padded to whole double vectors over
    # at least this many k: the trimming copy is then small against the product, and that tile's
    # many rows of A (25) outrun the prefetcher (measured: the 784-column weight gradient over
    # 2000 rows, 27.4 -> 19.1 ms; over 200 rows, 2.37 -> 2.48 ms)
    PAD_MIN_K = 1000

    def _register_tile(self, M: int, N: int, K: int, packed: bool, lanes: int | None = None):
        """(MR, NR): the micro-kernel's rows and columns (NR whole vectors), accumulated in
        registers over K. MR divides M and NR divides N. Of the tiles that fit the register file
        (MR*nv accumulators + nv B vectors + 1 broadcast), the one with the fewest cycles per
        FMA, then the most accumulators (less re-reading of A and B). Per step of K a tile pays
        for its FMAs, its loads, the FMA latency, and L2 traffic: A's MR values, and B's NR
        columns when the K x NR panel outgrows L1, at half the rate where B is read in place (not
        ``packed``: rows N apart). ``lanes``: the vector width (default: the machine's). None: N
        needs padding."""
        lanes = lanes or self.lanes
        best, best_key = None, None
        for nv in range(1, self.regs):
            mr_cap = (self.regs - nv - 1) // nv
            if mr_cap < 1:
                break
            if N % (nv * lanes):
                continue
            mr = _divisor_near(M, mr_cap)
            acc = mr * nv
            nr_bytes = nv * lanes * 4
            l2 = (nr_bytes * (1 if packed else 2) if K * nr_bytes > self.L1_BYTES else 0) + 4 * mr
            cycles = max(acc / self.FMA_PIPES, (mr + nv) / self.LOADS_PER_CYCLE, self.FMA_LATENCY,
                         l2 / self.L2_BYTES_PER_CYCLE)
            key = (cycles / acc, -acc, -mr)
            if best_key is None or key < best_key:
                best, best_key = (mr, nv * lanes), key
        return best

    def _vector_lanes(self, N: int) -> int:
        """The vector width of a GEMM's N columns: the machine's, or for fewer columns than that,
        the widest of half or a quarter of it (at least 4) that N is a multiple of: an AVX-512
        core runs 8 columns as 256-bit vectors, in its 32 registers (measured: the batch-8 forward
        of a 2 x 500 step, computed as W x^T, 3x faster than as dot products)."""
        return self.lanes if N >= self.lanes else self._narrower_lanes(N, self.lanes)

    @staticmethod
    def _narrower_lanes(N: int, lanes: int) -> int:
        """The widest of half or a quarter of ``lanes`` (at least 4) that N is a multiple of;
        ``lanes`` if none is."""
        narrow = lanes // 2
        while narrow >= 4 and N % narrow:
            narrow //= 2
        return narrow if narrow >= 4 else lanes

    def _packs_b(self, M: int, N: int, K: int, layout: str) -> bool:
        """Whether the GEMM copies B into [N / NR, K, NR] panels first: always when B is stored
        [N, K] (x @ W^T: the micro-kernel needs NR columns contiguous); stored [K, N], when even
        the narrowest panel (K x one vector) is too big for L1 (read in place, such a panel
        touches a new page for every k), or when enough row tiles share each panel, unless B is a
        gradient's few rows (K <= EPILOGUE_MAX_K) that fit in L2. Those stay where they are: the
        threads then split the rows, each streams whole rows of the output and of the state the
        update fused with it reads and writes, and the copy is saved (measured: the weight
        updates of a 2 x 500 step at batch 1-16, 20-30 % faster; over 200 rows, packed is 1.6x
        faster)."""
        if layout == "NK" or K * self.lanes * 4 > self.L1_BYTES:
            return True
        return M >= self.PACK_MIN_ROWS and (K > self.EPILOGUE_MAX_K or K * N * 4 > self.L2_BYTES)

    def gemm(self, name, M, N, K, layout, b_index, unit_blocks: bool = True):
        """Register-tiled GEMM: C[i, j] += A(i, k) * B(k, j).

        Micro-kernel MR x NR (see _register_tile) accumulated in registers over the whole K,
        B columns blocked by JB micro-panels so a K x (JB*NR) block stays in L2; threads split
        the (column block, row tile) space. B is packed per column block (see _packs_b).
        """
        sch = self.sch
        lanes = self._vector_lanes(N)
        blk = sch.get_sblock(name)
        packed = self._packs_b(M, N, K, layout)
        padded = False
        if self._register_tile(M, N, K, packed, lanes) is None and K <= self.EPILOGUE_MAX_K:
            lanes = self._narrower_lanes(N, lanes)
        tile = self._register_tile(M, N, K, packed, lanes)
        if tile is None or (K >= self.PAD_MIN_K and tile[1] == lanes and N >= 8 * lanes and N % (2 * lanes)):
            if N <= lanes // 2:  # mostly padding: left to the row-reduction rule
                raise ValueError(f"N={N} too narrow for the vector width")
            # pad the j axis to whole vectors (zero-filled B copy, trimmed output)
            n_iters = len(sch.get(blk).iter_vars)
            sch.pad_einsum(blk, [1] * (n_iters - 2) + [2 * lanes if N >= 8 * lanes else lanes, 1])
            M, N, K, layout, b_index = self._gemm_operands(name)
            padded = True
        MR, NR = self._register_tile(M, N, K, packed, lanes)
        # A computed in the kernel (dz^T), too large to write whole: a block of MB rows at a time
        a_prod = self._a_producer(blk, b_index)
        MB = None
        if (unit_blocks and a_prod is not None and packed and M * K * 4 > self.UNIT_BLOCK_BYTES
                and len(sch.get_loops(blk)) == 3):
            # row tiles per block: the fewest blocks whose A fits UNIT_BLOCK_BYTES, else the most
            # blocks allowed
            tiles = M // MR
            allowed = [d for d in range(1, tiles) if tiles % d == 0 and tiles // d <= self.MAX_UNIT_BLOCKS]
            fitting = [d for d in allowed if d * MR * K * 4 <= self.UNIT_BLOCK_BYTES]
            MB = MR * (max(fitting) if fitting else min(allowed)) if allowed else None
        jn = N // NR
        jb_cap = max(1, self.L2_BYTES // (NR * K * 4))
        if packed and self.threads > 1:
            # only the column-block loop is parallel: keep >= 2 blocks per thread when possible
            jb_cap = max(1, min(jb_cap, jn // (2 * self.threads)))
        JB = _divisor_near(jn, jb_cap)
        pack = None
        if packed:
            pack = sch.cache_read(blk, b_index, "global")
            sch.transform_layout(pack, ("write", 0), (lambda j, k: (j // NR, k, j % NR)) if layout == "NK"
                                 else (lambda k, j: (j // NR, k, j % NR)))
            if padded:  # read W straight into the packed, zero-padded panels
                for p in sch.get_producers(pack):
                    try:
                        sch.compute_inline(p)
                    except Exception:  # noqa: BLE001
                        pass
        loops = sch.get_loops(blk)
        li, lj, lk = loops[-3:]
        io, ii = sch.split(li, [None, MR])
        ub, io = sch.split(io, [None, MB // MR]) if MB else (None, io)
        jo, jb, jv, jl = sch.split(lj, [None, JB, NR // lanes, lanes])
        sch.reorder(*([ub] if MB else []), jo, io, jb, lk, ii, jv, jl)
        outer = loops[:-3]
        wb = sch.cache_write(blk, 0, "local")
        # fuse elementwise epilogues into the write-back. Not when padded: the write-back then
        # covers the padded columns (reverse_compute_inline would happily write past the end of
        # the real output), so epilogues are fused into the trimming block instead.
        # A value read by several blocks (a gradient that m and v both read) stays in its buffer:
        # inlining one reader would leave the others reading a buffer nobody writes.
        progress = True
        while progress:
            progress = False
            for prod in (sch.get_consumers(wb) if padded else [wb]):
                readers = sch.get_consumers(prod)
                if len(readers) != 1:
                    continue
                try:
                    sch.reverse_compute_inline(readers[0])
                    progress = True
                    break
                except Exception:  # noqa: BLE001
                    pass
        sch.reverse_compute_at(wb, jb, preserve_unit_loops=True)
        if not padded and K <= self.EPILOGUE_MAX_K:
            self._epilogue_per_tile(wb, jb, lanes)
            sch = self.sch  # a failed attempt restores a copy (the handles stay valid)
        # the threads split the column blocks, each packing its own panels; where they cannot
        # split them evenly (2000 columns: 25 blocks of 80; a small batch's 16 columns: one), B
        # is packed whole first, all threads together, and they split the (column block, row
        # tile) space instead. Not a large W for x @ W^T: packed whole, its panels come from
        # memory rather than L2 (measured slower)
        whole_pack = (pack is not None and not outer and self.threads > 1 and (jn // JB) % self.threads
                      and M // MR >= self.threads and (layout == "KN" or K * N * 4 <= self.L2_BYTES)
                      and not MB)
        if pack is not None:
            if not whole_pack:
                sch.compute_at(pack, jo, preserve_unit_loops=True)
            if layout == "NK":
                self._transpose_in_blocks(pack)
            else:  # rows of NR contiguous values: a plain copy
                _, row = sch.get_loops(pack)[-2:]
                _, lane = sch.split(row, [None, lanes])
                sch.vectorize(lane)
            if whole_pack:
                sch.parallel(sch.get_loops(pack)[0])
        if pack is not None and not whole_pack:
            par = sch.fuse(*outer, jo) if outer else jo
        else:
            par = sch.fuse(*outer, jo, io) if outer else sch.fuse(jo, io)
        if (M * N >= self.PAR_MIN_WORK or M * N * K >= self.GEMM_PAR_MIN_MACS) and self.threads > 1:
            sch.parallel(par)
        if MB:
            self._by_unit_blocks(a_prod, wb, ub)
        # one register per (row, vector) of the tile: LLVM splits a wider vector well only at
        # power-of-two widths
        sch.unroll(ii)
        sch.unroll(jv)
        sch.vectorize(jl)
        init = sch.decompose_reduction(blk, lk)
        _, wb_j = sch.get_loops(wb)[-2:]
        sch.split(wb_j, [None, lanes])
        for b in (init, wb):
            ls = sch.get_loops(b)
            # the three innermost loops are (MR, vectors, lanes)
            sch.unroll(ls[-3])
            sch.unroll(ls[-2])
            sch.vectorize(ls[-1])
        self.log.append(f"gemm {name}: {layout} M={M} N={N}{' (padded)' if padded else ''} K={K} "
                        f"MR={MR} NR={NR} JB={JB}{' B packed whole' if whole_pack else ''}"
                        f"{' B in place' if pack is None else ''}{f' A by blocks of {MB} rows' if MB else ''}"
                        f"{' A written whole' if a_prod is not None and not MB else ''}")

    def _a_producer(self, blk, b_index: int):
        """The block of this kernel that writes the GEMM's A operand, if one does."""
        sch = self.sch
        stmt = sch.get(blk)
        b_buf = stmt.reads[b_index].source
        for p in sch.get_producers(blk):
            w = sch.get(p).writes
            if (len(w) == 1 and not w[0].source.same_as(b_buf) and not self._is_reduction(sch.get(p).name_hint)
                    and any(r.source.same_as(w[0].source) for r in stmt.reads)):
                return p
        return None

    def _by_unit_blocks(self, a_prod, wb, ub):
        """Under the loop ``ub`` over blocks of A's rows: compute that block of A (a transposed,
        scaled copy of the layer's output), run the block's GEMM, then every elementwise block
        downstream of the product (the parameter's update) on the block's rows. TVM then
        allocates A and the product one block large."""
        sch = self.sch
        sch.compute_at(a_prod, ub, preserve_unit_loops=True)
        self._tiled_transpose(sch.get_loops(a_prod)[1:])
        for name in self._downstream(wb):
            blk = sch.get_sblock(name)
            sch.reverse_compute_at(blk, ub, preserve_unit_loops=True)
            loops = sch.get_loops(blk)[1:]
            self._flat_parallel_vectorized(loops, [_int(sch.get(lp).extent) for lp in loops])

    def _downstream(self, wb) -> list[str]:
        """The non-reduction blocks that read the GEMM's write-back, directly or through each
        other, in program order."""
        sch = self.sch
        found, frontier = set(), [wb]
        while frontier:
            for c in sch.get_consumers(frontier.pop()):
                name = sch.get(c).name_hint
                if name not in found and not self._is_reduction(name):
                    found.add(name)
                    frontier.append(c)
        return [n for n in self._blocks() if n in found]

    def _epilogue_per_tile(self, wb, jb, lanes: int):
        """Compute the elementwise blocks downstream of the GEMM's write-back (an optimizer update
        grouped with its gradient GEMM) tile by tile, right after each tile leaves the registers:
        the product then never travels to memory and back, and TVM shrinks its buffer to one
        tile. Left as separate loops if any of them cannot move."""
        sch = self.sch
        downstream = self._downstream(wb)
        if not downstream:
            return
        saved = sch.copy()
        try:
            for name in downstream:
                blk = sch.get_sblock(name)
                sch.reverse_compute_at(blk, jb, preserve_unit_loops=True)
                last = sch.get_loops(blk)[-1]
                if (_int(sch.get(last).extent) or 0) % lanes == 0:
                    _, lane = sch.split(last, [None, lanes])
                    sch.vectorize(lane)
        except Exception as e:  # noqa: BLE001
            self.sch = saved
            self.log.append(f"epilogue per tile: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            return
        self.log.append(f"epilogue per tile: {', '.join(sorted(downstream))}")

    def _transpose_in_blocks(self, pack):
        """Pack B's [NR, K] rows into [K, NR] a [lanes, lanes] block at a time: each row's lanes
        come from one cache line, every written line is filled at once, and only ``lanes`` rows
        of B are read side by side, few enough streams for the hardware prefetcher. (Packing row
        by row writes a new line per element, which makes packing cost as much as the GEMM itself
        at batch 100; a [NR, lanes] block reads NR rows side by side, which took twice as long as
        reading B once.)"""
        sch = self.sch
        lj, lk = sch.get_loops(pack)[-2:]
        kb = _divisor_near(_int(sch.get(lk).extent), self.lanes)
        jb = _divisor_near(_int(sch.get(lj).extent), self.lanes)
        ko, ki = sch.split(lk, [None, kb])
        jo, ji = sch.split(lj, [None, jb])
        sch.reorder(jo, ko, ji, ki)
        sch.unroll(ki)

    def _loop_nest(self, name):
        """(block, statement, iter vars, loops, static extents) of a block whose loops map one to
        one onto iter vars of static extent; ValueError otherwise (the block stays unscheduled)."""
        blk = self.sch.get_sblock(name)
        stmt = self.sch.get(blk)
        ivs = list(stmt.iter_vars)
        loops = self.sch.get_loops(blk)
        exts = [_int(iv.dom.extent) for iv in ivs]
        if len(loops) != len(ivs) or any(e is None for e in exts):
            raise ValueError("unsupported loop nest")
        return blk, stmt, ivs, loops, exts

    # -- other reductions -----------------------------------------------------------------------
    def reduction(self, name):
        from tvm import tirx

        sch = self.sch
        blk, stmt, ivs, loops, exts = self._loop_nest(name)
        kinds = ["R" if iv.iter_type == tirx.IterVar.CommReduce else "S" for iv in ivs]
        if len(stmt.writes) != 1:
            raise ValueError("multi-output reduction")
        s_loops = [lp for lp, k in zip(loops, kinds) if k == "S"]
        r_loops = [lp for lp, k in zip(loops, kinds) if k == "R"]
        s_ext = [e for e, k in zip(exts, kinds) if k == "S"]
        r_ext = [e for e, k in zip(exts, kinds) if k == "R"]
        total = _prod(s_ext) * _prod(r_ext)
        # which loop is contiguous in the dominant read (of the largest buffer: not a per-row
        # scale read beside the matrix)?
        reads = [r for r in stmt.reads if len(r.region) > 0]
        big = max(reads, key=lambda r: _prod(_int(d) or 1 for d in r.source.shape)) if reads else None
        last_var = None
        if big is not None:
            mn = big.region[-1].min
            vs = _var_set(mn)
            if len(vs) == 1:
                last_var = next(iter(vs))
        r_vars = [iv.var for iv, k in zip(ivs, kinds) if k == "R"]
        s_vars = [iv.var for iv, k in zip(ivs, kinds) if k == "S"]
        lanes = self.lanes
        if len(r_loops) == 1 and last_var is not None and last_var.same_as(r_vars[0]):
            # row reduction over the contiguous axis: rfactor into `lanes` partial sums
            sch.reorder(*s_loops, *r_loops)
            par = sch.fuse(*s_loops) if len(s_loops) > 1 else (s_loops[0] if s_loops else None)
            threaded = par is not None and total >= self.PAR_MIN_WORK and self.threads > 1
            R = r_ext[0]
            vl = next((v for v in (lanes, 8, 4) if v <= lanes and R % v == 0 and R >= 4 * v), None)
            if vl is None or _store_dtype(stmt) != "float32":
                if threaded:
                    sch.parallel(par)
                self.log.append(f"row-reduction {name}")
                return
            # rows side by side, each summing into its own vector: enough independent FMAs to
            # hide their latency (one row's chain of FMAs waits on itself; measured: a 1 x 500 x
            # 500 product, 4-lane vectors, 2.7x faster with 10 rows). A divisor of the innermost
            # spatial extent, so that no group of rows straddles two of the outer ones (the final
            # sum's region per group is then exact), or whole multiples of it.
            want, inner = self.FMA_LATENCY * self.FMA_PIPES, s_ext[-1] if s_ext else 1
            chains = _divisor_near(inner, want)
            if chains == inner and len(s_ext) > 1:
                chains *= _divisor_near(s_ext[-2], max(1, want // inner))
            chains = chains if par is not None else 1
            if chains > 1:
                par, _ = sch.split(par, [None, chains])
            ro, rl = sch.split(r_loops[0], [None, vl])
            rf = sch.rfactor(rl, factor_axis=len(stmt.writes[0].region))
            rls = sch.get_loops(rf)  # [par, chain,] ro, rl
            if chains > 1:
                sch.reorder(rls[0], rls[2], rls[1], rls[3])
                sch.unroll(rls[1])
                ro = sch.get_loops(rf)[1]
            else:
                ro = rls[-2]
            sch.vectorize(sch.get_loops(rf)[-1])
            if threaded:
                sch.parallel(sch.get_loops(rf)[0])
            init = sch.decompose_reduction(rf, ro)
            sch.vectorize(sch.get_loops(init)[-1])
            if par is not None:
                sch.reverse_compute_at(sch.get_sblock(name), sch.get_loops(rf)[0])
            self.log.append(f"row-reduction {name}{f': {chains} rows side by side' if chains > 1 else ''}")
            return
        if (len(s_loops) == 1 and len(r_loops) == 1 and last_var is not None and last_var.same_as(s_vars[-1])
                and s_ext[-1] % lanes == 0 and self.threads > 1 and r_ext[0] % self.threads == 0
                and total >= self.PAR_MIN_WORK and _store_dtype(stmt) == "float32"):
            # column reduction of one vector per row: each thread sums its share of the rows into
            # a row of partial sums, reading whole rows in order, then one pass adds the partials
            # (a walk down each column block, one line per row, ran at half the copy bandwidth)
            ko, _ = sch.split(r_loops[0], [self.threads, None])
            rf = sch.rfactor(ko, factor_axis=0)
            j, t, k = sch.get_loops(rf)
            sch.reorder(t, k, j)
            sch.parallel(t)
            _, jl = sch.split(j, [None, lanes])
            sch.vectorize(jl)
            init = sch.decompose_reduction(rf, k)
            sch.vectorize(sch.split(sch.get_loops(init)[-1], [None, lanes])[1])
            self.log.append(f"col-reduction {name}: rows split between the threads")
            return
        if (len(s_loops) >= 1 and last_var is not None and last_var.same_as(s_vars[-1])
                and s_ext[-1] % lanes == 0):
            # column reduction: keep the contiguous spatial axis innermost and vectorize it
            so = s_loops[:-1]
            jo, jl = sch.split(s_loops[-1], [None, lanes])
            sch.reorder(*so, jo, *r_loops, jl)
            par = sch.fuse(*so, jo) if so else jo
            if total >= self.PAR_MIN_WORK and self.threads > 1:
                sch.parallel(par)
            sch.vectorize(jl)
            init = sch.decompose_reduction(blk, r_loops[0])
            sch.vectorize(sch.get_loops(init)[-1])
            self.log.append(f"col-reduction {name}")
            return
        # generic: parallel over the spatial loops
        if s_loops and total >= self.PAR_MIN_WORK and self.threads > 1:
            sch.reorder(*s_loops, *r_loops)
            par = sch.fuse(*s_loops) if len(s_loops) > 1 else s_loops[0]
            sch.parallel(par)
        self.log.append(f"reduction {name}")

    # -- elementwise / injective -----------------------------------------------------------------
    def spatial(self, name):
        sch = self.sch
        blk, stmt, ivs, loops, exts = self._loop_nest(name)
        if not loops:
            raise ValueError("unsupported loop nest")
        bounds = _is_concatenation(stmt)
        if bounds and exts[-1] % self.lanes == 0 and all(b % self.lanes == 0 for b in bounds):
            # a concatenation along the contiguous axis: a loop per source, each vectorized
            # (one loop selects between the sources element by element)
            par = sch.fuse(*loops[:-1]) if len(loops) > 1 else None
            outer, _ = sch.split(loops[-1], [None, self.lanes])
            cuts = [b // self.lanes for b in bounds]
            parts = sch.loop_partition(outer, [hi - lo for lo, hi in zip([0, *cuts], cuts)])
            copies = [b for part in parts for b in sch.get_child_blocks(part)]
            for b in copies:
                sch.vectorize(sch.get_loops(b)[-1])
            if par is not None and _prod(exts) >= self.PAR_MIN_WORK and self.threads > 1:
                sch.parallel(par)
            self.log.append(f"concatenation {name}: {len(copies)} sources")
            return
        total = _prod(exts)
        lanes = self.lanes
        # is the innermost iterator contiguous in every read (or absent from it)?
        inner = ivs[-1].var
        contiguous = True
        for r in stmt.reads:
            for d, rg in enumerate(r.region):
                if inner in _var_set(rg.min) and d != len(r.region) - 1:
                    contiguous = False
        if not contiguous and len(loops) >= 2 and exts[-1] >= lanes and exts[-2] >= lanes:
            self._tiled_transpose(loops)
            self.log.append(f"transpose {name}")
            return
        self._flat_parallel_vectorized(loops, exts)
        self.log.append(f"spatial {name}")

    def _tiled_transpose(self, loops):
        """A transpose-like loop nest (the innermost axis is not contiguous in what it reads):
        2-D tiling so both sides stay in cache; vectors along the rows read (stores scattered
        down the columns: a 2000 x 2000 transpose 1.3 -> 0.8 ms, against vectors gathered down
        the columns read)."""
        sch = self.sch
        exts = [_int(sch.get(lp).extent) for lp in loops]
        t = next((w for w in (16, 8) if exts[-1] % w == 0 and exts[-2] % w == 0), self.lanes)
        a_o, a_i = sch.split(loops[-2], [None, t])
        b_o, b_i = sch.split(loops[-1], [None, t])
        sch.reorder(*loops[:-2], a_o, b_o, a_i, b_i)
        par = sch.fuse(*loops[:-2], a_o, b_o)
        if _prod(exts) >= self.PAR_MIN_WORK and self.threads > 1:
            sch.parallel(par)
        if exts[-1] % t == 0 and exts[-2] % t == 0:
            sch.reorder(b_i, a_i)
            sch.unroll(b_i)
            sch.vectorize(a_i)

    def _flat_parallel_vectorized(self, loops, exts):
        """One parallel loop over everything but a vector of the innermost axis (no vectors
        straddling rows: those need gathers)."""
        sch = self.sch
        vec = next((v for v in (2 * self.lanes, self.lanes, 4) if exts[-1] % v == 0 and exts[-1] >= v), 1)
        if vec > 1:
            o, v = sch.split(loops[-1], [None, vec])
            o = sch.fuse(*loops[:-1], o) if len(loops) > 1 else o
        else:
            o = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            v = None
        if _prod(exts) >= self.PAR_MIN_WORK and self.threads > 1:
            sch.parallel(o)
        if v is not None:
            sch.vectorize(v)

    def _domain(self, name):
        return tuple(_int(iv.dom.extent) for iv in self.sch.get(self.sch.get_sblock(name)).iter_vars)

    def _unscheduled(self, name) -> bool:
        """Still one loop per iterator (not placed under another block's loops by a rule)."""
        blk = self.sch.get_sblock(name)
        return len(self.sch.get_loops(blk)) == len(self.sch.get(blk).iter_vars)

    def _pointwise(self, name) -> bool:
        """May the block share a loop nest with others? It writes one of the kernel's outputs
        (merged with their readers, intermediate buffers came out wrong after TVM's lowering:
        a padded GEMM's trimmed result, the hybrid mask's concatenations), has no branches, and
        reads every buffer at one element named by its own iterators or constants."""
        from tvm import tirx

        sch = self.sch
        stmt = sch.get(sch.get_sblock(name))
        intermediates = list(sch.get(sch.get_sblock("root")).alloc_buffers)
        if any(w.source.same_as(b) for w in stmt.writes for b in intermediates):
            return False
        if "if_then_else" in str(stmt.body):
            return False
        own = [iv.var for iv in stmt.iter_vars]
        for r in stmt.reads:
            for rg in r.region:
                if _int(rg.extent) != 1:
                    return False
                if not (isinstance(rg.min, tirx.IntImm) or any(rg.min.same_as(v) for v in own)):
                    return False
        return True

    def _reads_own_position(self, name, buffers) -> bool:
        """Does the block read each of ``buffers`` exactly where it writes its own output?"""
        stmt = self.sch.get(self.sch.get_sblock(name))
        out = stmt.writes[0].region
        for r in stmt.reads:
            if any(r.source.same_as(b) for b in buffers) and (
                    len(r.region) != len(out) or not all(a.min.same_as(w.min) for a, w in zip(r.region, out))):
                return False
        return True

    def _elementwise_runs(self) -> list[list[str]]:
        """Runs of two or more adjacent unscheduled pointwise blocks over one domain, each
        reading what the run's earlier blocks wrote only at its own output position."""
        runs, current = [], []
        for name in self._blocks():
            ok = not self._is_reduction(name) and self._unscheduled(name) and self._pointwise(name)
            if ok and current and self._domain(current[-1]) == self._domain(name) and self._reads_own_position(
                    name, [w.source for n in current for w in self.sch.get(self.sch.get_sblock(n)).writes]):
                current.append(name)
                continue
            if len(current) >= 2:
                runs.append(current)
            current = [name] if ok else []
        if len(current) >= 2:
            runs.append(current)
        return runs

    def one_pass(self, names):
        """Several elementwise outputs over one domain (a parameter's update: m', v', then p'
        from them) computed in one loop nest, so what a later block reads back of an earlier
        one's output is still in registers or L1: the blocks' loops are merged level by level,
        then split, parallelized and vectorized as one."""
        sch = self.sch
        exts = self._domain(names[0])
        for level in range(len(exts)):
            sch.merge(*[sch.get_loops(sch.get_sblock(n))[level] for n in names])
        self._flat_parallel_vectorized(sch.get_loops(sch.get_sblock(names[-1])), exts)
        self.log.append(f"one pass {', '.join(names)}")

    def run(self):
        self._try(self.inline)
        done = set()
        # GEMMs first: they absorb their epilogues
        for name in self._blocks():
            if name in done or not self._exists(name) or not self._is_reduction(name):
                continue
            g = self._gemm_operands(name)
            if g is not None and g[3] == "NK" and g[0] <= self.GEMV_ROWS:
                continue  # a few rows of x @ W^T: dot products along W's rows beat packing W
            # (by blocks of units where A is computed in the kernel; failing that, A written whole)
            if g is not None and (self._try(self.gemm, name, *g) or self._try(self.gemm, name, *g, False)):
                done.add(name)
        for names in self._elementwise_runs():
            if self._try(self.one_pass, names):
                done.update(names)
        for name in self._blocks():
            if name in done or not self._exists(name):
                continue
            # blocks created by the gemm rule are under its loops already
            if not self._unscheduled(name):
                continue
            if self._is_reduction(name):
                self._try(self.reduction, name)
            else:
                self._try(self.spatial, name)
            done.add(name)
        return self.sch.mod["main"]


def _schedule_func(func, target):
    s = _CPUScheduler(func, target)
    try:
        out = s.run()
    except Exception as e:  # noqa: BLE001 - e.g. a generic kernel with no "root" block (cumsum): keep it as lowered
        return func, [*s.log, f"left unscheduled: {type(e).__name__}: {str(e).splitlines()[0][:120]}"]
    return out, s.log


def _unscheduled_prim_funcs(mod):
    """(global var, PrimFunc) of every TIR function in ``mod`` that no schedule has claimed yet."""
    from tvm import tirx

    for gv, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and "tirx.is_scheduled" in func.attrs and func.attrs["tirx.is_scheduled"]:
            continue
        yield gv, func


def _hand_schedule_pass(target, log: list | None = None):
    import tvm

    target = _as_target(target)

    @tvm.transform.module_pass(opt_level=0, name="FFCHandSchedule")
    def _pass(mod, _ctx):
        if target.kind.name != "llvm":
            return mod
        updates = {}
        for gv, func in _unscheduled_prim_funcs(mod):
            new, flog = _schedule_func(func, target)
            if log is not None:
                log.append({"func": gv.name_hint, "log": flog})
            updates[gv] = new.with_attr("tirx.is_scheduled", True)
        for gv, f in updates.items():
            mod[gv] = f
        return mod

    return _pass
