"""A compiled TVM train step writes each parameter's and optimizer state's new value over the old.

A train step reads every parameter and optimizer-state tensor ``X`` and returns ``new.X``. Written
into a fresh buffer, an update reads one copy of the state and writes another: twice the memory,
and twice the cache footprint of the memory-bound update (a 2 x 500 Adam net's 7.8 MB of state
no longer fits the caches). In place, the kernel that computes ``new.X`` writes it over ``X``
wherever that is safe:

- ``X`` is an argument of that kernel's call and nothing after the call reads ``X``;
- inside the kernel, the block that writes ``new.X`` reads ``X`` only at the element it writes,
  and every other block that reads ``X`` runs before it: in no loop shared with it, or, in each
  iteration of the loops they share, reading exactly the elements the writer then writes (an
  optimizer's blocks computed tile by tile inside the gradient GEMM);
- the kernel writes ``new.X`` with no reduction; no view of ``X`` is taken.

The program's main function then returns ``X``'s buffer as ``new.X``: a caller that hands the
step its state gives it up (``TVMProgram.run``'s ``donate``); the sidecar lists the pairs.
The pass runs last in the Relax pipeline, on the lowered VM function, where each output is an
explicit allocation passed to the kernel that fills it.
"""

from __future__ import annotations

NEW_PREFIX = "new."


def candidates(onnx_model, inputs) -> dict[int, int]:
    """{output position: input position} for every output named ``new.<input>`` (an input of
    the same element type)."""
    position = {vi.name: i for i, vi in enumerate(inputs)}
    elem = {vi.name: vi.type.tensor_type.elem_type for vi in inputs}
    out = {}
    for o, vo in enumerate(onnx_model.graph.output):
        name = vo.name[len(NEW_PREFIX):] if vo.name.startswith(NEW_PREFIX) else None
        if name in position and elem[name] == vo.type.tensor_type.elem_type:
            out[o] = position[name]
    return out


class InPlacePlan:
    """The candidate pairs going in, and (``applied``) the pairs the pass made in place."""

    def __init__(self, pairs: dict[int, int]):
        self.pairs = pairs
        self.applied: dict[int, int] = {}


def in_place_pass(plan: InPlacePlan):
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="FFCStateInPlace")
    def _pass(mod, _ctx):
        return _rewrite(mod, plan)

    return _pass


def is_op(value, name: str) -> bool:
    """Whether a Relax expression is a call of the operator ``name`` (e.g. ``relax.sum``)."""
    import tvm
    from tvm import relax

    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == name


def _kernel_call(value) -> bool:
    import tvm
    from tvm import relax

    return isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.GlobalVar)


_INSPECTING = ("vm.builtin.check_tensor_info", "vm.builtin.match_shape")


def _extern(value, names) -> bool:
    from tvm import relax

    return isinstance(value, relax.Call) and isinstance(value.op, relax.ExternFunc) and value.op.global_symbol in names


def _only_read_before(var, call_at: int, bindings, users) -> bool:
    """Whether an update at binding ``call_at`` written over ``var`` disturbs none of its uses:
    kernels that run no later than the update, the VM releasing its register, checks of its
    shape, and views of it (a reshape) used only so themselves."""
    for i in users.get(var, []):
        value = bindings[i].value
        if _extern(value, ("vm.builtin.reshape",)):
            if not _only_read_before(bindings[i].var, call_at, bindings, users):
                return False
        elif _kernel_call(value):
            if i > call_at:
                return False
        elif not (is_op(value, "relax.vm.kill_object") or _extern(value, _INSPECTING)):
            return False
    return True


def _rewrite(mod, plan: InPlacePlan):
    import tvm
    from tvm import relax

    plan.applied = {}
    if not plan.pairs or "main" not in [gv.name_hint for gv in mod.get_global_vars()]:
        return mod
    main = mod["main"]
    if not isinstance(main.body, relax.SeqExpr) or len(main.body.blocks) != 1:
        return mod
    bindings = list(main.body.blocks[0].bindings)
    result = main.body.body
    ret = next((b.value for b in bindings if b.var.same_as(result)), None)
    if not isinstance(ret, relax.Tuple):
        return mod
    defined_at = {b.var: i for i, b in enumerate(bindings)}
    users: dict = {}
    for i, b in enumerate(bindings):
        for v in relax.analysis.free_vars(b.value):
            users.setdefault(v, []).append(i)
    returned = list(ret.fields)
    replace, drop, aliased_funcs = {}, set(), set()
    for out_pos, in_pos in sorted(plan.pairs.items()):
        if out_pos >= len(returned) or in_pos >= len(main.params):
            continue
        new, old = returned[out_pos], main.params[in_pos]
        if not isinstance(new, relax.Var) or new not in defined_at or any(f.same_as(old) for f in returned):
            continue
        alloc = bindings[defined_at[new]]
        if not is_op(alloc.value, "relax.vm.alloc_tensor"):
            continue
        writers = [i for i in users.get(new, []) if _kernel_call(bindings[i].value)]
        if not writers:
            continue
        call_at = writers[0]  # the first kernel that takes it is the one that fills it
        call = bindings[call_at].value
        in_args = [k for k, a in enumerate(call.args) if a.same_as(old)]
        out_args = [k for k, a in enumerate(call.args) if a.same_as(new)]
        if not in_args or len(out_args) != 1:
            continue
        if not _only_read_before(old, call_at, bindings, users):
            continue  # the old value, or a view of it, is read after the update
        if not _kernel_may_write_over(mod[call.op], in_args[0], out_args[0]):
            continue
        replace[new] = old
        drop.add(defined_at[new])
        storage = alloc.value.args[0]
        if isinstance(storage, relax.Var) and storage in defined_at and all(
                i == defined_at[new] or is_op(bindings[i].value, "relax.vm.kill_object") for i in users[storage]):
            drop.add(defined_at[storage])
            drop.update(i for i in users[storage] if i != defined_at[new])
        drop.update(i for i in users[new] if is_op(bindings[i].value, "relax.vm.kill_object"))
        aliased_funcs.add(call.op)
        plan.applied[out_pos] = in_pos
    if not replace:
        return mod

    def swap(e):
        return replace.get(e, e) if isinstance(e, relax.Var) else e

    new_bindings = []
    for i, b in enumerate(bindings):
        if i in drop:
            continue
        v = b.value
        if isinstance(v, relax.Call) and any(isinstance(a, relax.Var) and a in replace for a in v.args):
            v = relax.Call(v.op, [swap(a) for a in v.args], v.attrs, v.ty_args)
        elif isinstance(v, relax.Tuple) and any(isinstance(f, relax.Var) and f in replace for f in v.fields):
            v = relax.Tuple([swap(f) for f in v.fields])
        elif isinstance(v, relax.TupleGetItem) and isinstance(v.tuple_value, relax.Var) and v.tuple_value in replace:
            v = relax.TupleGetItem(swap(v.tuple_value), v.index)
        elif any(u in replace for u in relax.analysis.free_vars(v)):
            plan.applied = {}
            return mod  # a use this rewrite does not know: leave the program as it was
        new_bindings.append(relax.VarBinding(b.var, v))
    new_main = relax.Function(main.params, relax.SeqExpr([relax.BindingBlock(new_bindings)], result),
                              main.ret_ty, main.is_pure, main.attrs)
    funcs = {}
    for gv, f in mod.functions_items():
        if gv.name_hint == "main":
            f = new_main
        elif any(gv.same_as(u) for u in aliased_funcs):
            f = f.with_attr("tirx.noalias", False)  # one of its outputs is one of its inputs now
        funcs[gv] = f
    return tvm.IRModule(funcs, attrs=mod.attrs)


def _kernel_may_write_over(func, in_arg: int, out_arg: int) -> bool:
    """Whether the kernel stays correct with its output ``out_arg`` stored over its input ``in_arg``,
    judged on its scheduled blocks: the one block that writes the output (no reduction) reads the
    input only at the element it writes; every other block that reads the input comes before it
    and either shares no loop with it or, in each iteration of the loops they share, reads exactly
    the elements the writer then writes (an optimizer's blocks computed tile by tile)."""
    from tvm import s_tir, tirx

    try:
        old, new = func.params[in_arg], func.params[out_arg]
        if [int(d) for d in old.shape] != [int(d) for d in new.shape] or str(old.dtype) != str(new.dtype):
            return False
        sch = s_tir.Schedule(func)
        blocks = _blocks_in_order(sch, sch.get_sblock("root"))
        stmts = [sch.get(b) for b in blocks]
        writers = [k for k, s in enumerate(stmts) if any(w.source.same_as(new) for w in s.writes)]
        if len(writers) != 1:
            return False
        w = writers[0]
        writer = stmts[w]
        if any(iv.iter_type == tirx.IterVar.CommReduce for iv in writer.iter_vars) or len(writer.writes) != 1:
            return False
        written = writer.writes[0].region
        for k, s in enumerate(stmts):
            reads = [r.region for r in s.reads if r.source.same_as(old)]
            if not reads:
                continue
            if k == w:
                if not all(_same_element(r, written) for r in reads):
                    return False
            elif k > w or not all(_read_before_written(sch, blocks[k], r, blocks[w], written) for r in reads):
                return False
        return True
    except Exception:  # noqa: BLE001 - a kernel we cannot analyse is left as it is
        return False


def _same_element(a, b) -> bool:
    import tvm_ffi

    return len(a) == len(b) and all(tvm_ffi.structural_equal(x.min, y.min) and _is_one(x.extent) and _is_one(y.extent)
                                    for x, y in zip(a, b))


def _read_before_written(sch, reader, read, writer, written) -> bool:
    """Whether every element ``reader`` (a block before ``writer``) reads in ``read`` is read before
    ``writer`` writes it in ``written``."""
    import tvm_ffi

    reader_loops = [sch.get(lp) for lp in sch.get_loops(reader)]
    writer_loops = [sch.get(lp) for lp in sch.get_loops(writer)]
    shared = 0
    while (shared < min(len(reader_loops), len(writer_loops))
           and reader_loops[shared].same_as(writer_loops[shared])):
        shared += 1
    if shared == 0:
        return True  # the reader's loops end before the writer's begin
    own_r, own_w = reader_loops[shared:], writer_loops[shared:]
    if len(own_r) != len(own_w) or any(int(a.extent) != int(b.extent) for a, b in zip(own_r, own_w)):
        return False
    at_r, at_w = _elements(sch, reader, read), _elements(sch, writer, written)
    if at_r is None or at_w is None:
        return False
    common = [lp.loop_var for lp in reader_loops[:shared]]
    # the loops they share stand for themselves; each of the reader's own loops for the writer's
    return tvm_ffi.structural_equal([*at_r, *common, *(lp.loop_var for lp in own_r)],
                                    [*at_w, *common, *(lp.loop_var for lp in own_w)], map_free_vars=True)


def _elements(sch, block, region):
    """The element ``block`` touches in ``region``, as expressions of its loop variables, where each
    index is one of the block's own iteration variables; else None."""
    loops = sch.get_loops(block)
    stmt = sch.get(block)
    realize = _find_realize(sch.get(loops[-1]).body, stmt) if loops else None
    if realize is None:
        return None
    bound = list(zip((iv.var for iv in stmt.iter_vars), realize.iter_values))
    out = []
    for r in region:
        value = next((v for var, v in bound if var.same_as(r.min)), None)
        if value is None or not _is_one(r.extent):
            return None
        out.append(value)
    return out


def _find_realize(stmt, block):
    from tvm import s_tir

    if isinstance(stmt, s_tir.SBlockRealize):
        return stmt if stmt.block.same_as(block) else None
    for child in stmt_children(stmt):
        found = _find_realize(child, block)
        if found is not None:
            return found
    return None


def stmt_children(stmt) -> list:
    """The statements directly inside a TIR statement (a sequence's items, a loop's or a block's
    body, a block's init, an if's branches)."""
    if hasattr(stmt, "seq"):
        return list(stmt.seq)
    return [c for c in (getattr(stmt, a, None) for a in ("block", "body", "init", "then_case", "else_case")) if c is not None]


def _is_one(extent) -> bool:
    try:
        return int(extent) == 1
    except (TypeError, ValueError):
        return False


def _blocks_in_order(sch, parent) -> list:
    """Every block below ``parent``, in program order (a block before the blocks nested in it)."""
    out = []
    for b in sch.get_child_blocks(parent):
        out.append(b)
        out.extend(_blocks_in_order(sch, b))
    return out
