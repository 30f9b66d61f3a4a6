"""Benchmark (not a test): FF training on torch.distributed, 1 vs N processes, data-parallel and
layer-pipelined; writes its JSON and the measured section of docs/distributed.md.

For each mode and process count it launches a torchrun job on this machine (gloo, CPU; each
process gets cores / N torch threads, or --threads) that trains on random images and times every
step:

- data-parallel (``DataParallelStep``'s parts): ``train_gradients`` on the shard, the all-reduce
  of the gradients, ``train_apply``;
- layer-pipelined (``PipelineStep``): the whole step, and on every process the time in its
  stage's programs ("compute") and the time blocked on transfers, on the stage below or on the
  metrics' all-reduce ("waiting").

The JSON has the medians, the bytes each mode sends, the throughput (rows per second), and a
projection to more devices from the measured split, with the programs' times divided by a device
speed-up the caller states (``--speedup``: how much faster one target device runs the same
programs than this machine's CPU) and a link bandwidth (``--bandwidth-gbs``):

    data-parallel:   step(N) = gradients(1) / N + apply + all-reduce(N),
                     all-reduce(N) = 2 (N - 1) / N * gradient bytes / bandwidth  (a ring all-reduce)
    layer-pipelined: step(S) = (M + S - 1) * max over stages of a micro-batch's compute
                               + max over stages of apply + (S - 1) * a micro-batch's activities / bandwidth

(S stages as ``pipeline_stages`` splits the layers, M micro-batches; each layer's per-micro-batch
compute is measured here in one process, a micro-batch's activities are what the 2-process run
sent per micro-batch; the latency of each message is ignored). A pipeline has at most one stage
per layer.

    python bench/bench_distributed.py --model models/mnist-supervised.toml --procs 1,2 --steps 10 --threads 1 \\
        --speedup 100 --bandwidth-gbs 150 --device-name "GPUs assumed 100x as fast as one thread here, with NVLink-class links" \\
        --out docs/results/distributed.json --page docs/distributed.md
    python bench/bench_distributed.py --report docs/results/distributed.json --page docs/distributed.md [--check]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
START, END = "<!-- bench-distributed:start -->", "<!-- bench-distributed:end -->"


def random_feeds(model, rows: int, seed: int = 0) -> dict:
    import numpy as np

    rng = np.random.default_rng(seed)
    return {"x": rng.random((rows, model.input.size), dtype=np.float32), "y": rng.integers(0, 10, rows),
            "u": rng.random(rows, dtype=np.float32), "lr": np.float32(1e-3), "step": np.float32(1)}


def worker(args) -> None:
    """One process of the job: times its steps; rank 0 writes them to args.part."""
    import torch

    sys.path.insert(0, str(REPO))
    from ffcompile.core.spec import load_model
    from ffcompile.lowering import init_state
    from ffcompile.reference import distributed

    rank, world = distributed.start("cpu")
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // world))
    model = load_model(args.model)
    feeds = random_feeds(model, model.training.batch_size)
    run = time_data_parallel if args.mode == "data" else time_pipeline
    result = run(model, rank, world, feeds, args, distributed, init_state)
    if rank == 0:
        Path(args.part).write_text(json.dumps({**result, "threads": torch.get_num_threads()}))
    distributed.stop()


def time_data_parallel(model, rank, world, feeds, args, distributed, init_state) -> dict:
    import torch

    step = distributed.DataParallelStep(model, "cpu", rank, world)
    params, state = (step.to_device(d) for d in init_state(model, 0))
    times = {"gradients": [], "all_reduce": [], "apply": []}
    shard = step.to_device({k: feeds[k][step.rows] for k in step.feed_names})
    schedule = step.to_device({k: feeds[k] for k in step.schedule_names})
    for _ in range(args.steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = step.gradients.run({**params, **shard})
        t1 = time.perf_counter()
        summed = distributed.all_reduce_sum({k: out[k] for k in step.reduced})
        t2 = time.perf_counter()
        with torch.no_grad():
            step.apply.run({**params, **state, **summed, **schedule})
        t3 = time.perf_counter()
        for key, seconds in zip(times, (t1 - t0, t2 - t1, t3 - t2)):
            times[key].append(seconds)
    return {"times": times, "bytes_per_step": sum(out[k].numel() * out[k].element_size() for k in step.reduced)}


def time_pipeline(model, rank, world, feeds, args, distributed, init_state) -> dict:
    import torch

    step = distributed.PipelineStep(model, "cpu", rank, world, micro_batches=args.micro_batches)
    params, state = (step.to_device(d) for d in init_state(model, 0))
    steps, split = [], []
    for _ in range(args.steps):
        before, sent = dict(step.seconds), step.bytes_sent
        started = time.perf_counter()
        params, state, _ = step(params, state, feeds)
        steps.append(time.perf_counter() - started)
        split.append([step.seconds["compute"] - before["compute"], step.seconds["waiting"] - before["waiting"],
                      step.bytes_sent - sent])
    # every process's median compute, waiting and bytes sent, gathered by one sum
    mine = torch.zeros(world, 3, dtype=torch.float64)
    mine[rank] = torch.tensor([statistics.median(s[i] for s in split[1:] or split) for i in range(3)])
    per_rank = distributed.all_reduce_sum({"split": mine})["split"].tolist()
    return {"times": {"step": steps}, "micro_batches": len(step.micro), "stages": distributed.describe_stages(model, world),
            "per_rank_seconds": [{"compute": c, "waiting": w} for c, w, _ in per_rank],
            "bytes_per_step": int(sum(b for _, _, b in per_rank))}


def layer_seconds(model, micro: int, repeats: int = 3) -> list[dict]:
    """Per layer, in this process: the seconds of one micro-batch of ``stage_neutral`` (if the layer
    takes part in the neutral pass) plus ``stage_posneg``, and of ``stage_apply``, each the layer as
    a stage of its own (the softmax readout with its highest layer)."""
    import numpy as np
    import torch

    from ffcompile.lowering import build_stage_program, init_state, runs_neutral_pass
    from ffcompile.reference.interpreter import TorchProgram

    params, state = init_state(model, 0)
    rows = {**random_feeds(model, model.training.batch_size), "negative_labels": np.zeros(model.training.batch_size, np.int64)}
    out = []
    for i in range(len(model.layers)):
        layers = range(i, i + 1)
        seconds = {}
        for name, batch in (("stage_neutral", micro), ("stage_posneg", micro), ("stage_apply", model.training.batch_size)):
            if name == "stage_neutral" and not runs_neutral_pass(model, layers):
                continue
            program = TorchProgram(build_stage_program(model, name, batch, layers))
            feeds = {}
            for v in program.program.inputs:
                known = {**params, **state, **rows}.get(v.name)
                if v.name.startswith(("grad.", "peer.")) or v.name.endswith(".in") or known is None:
                    known = np.random.default_rng(1).random(v.shape).astype(np.float32)
                value = np.asarray(known)
                feeds[v.name] = torch.as_tensor(value[:v.shape[0]] if value.ndim and value.shape != v.shape else value)
            times = []
            for _ in range(repeats):
                started = time.perf_counter()
                with torch.no_grad():
                    program.run(feeds)
                times.append(time.perf_counter() - started)
            seconds[name] = min(times)
        out.append({"layer": model.layers[i].name, "micro_batch_seconds": seconds.get("stage_neutral", 0.0) + seconds["stage_posneg"],
                    "apply_seconds": seconds["stage_apply"]})
    return out


def project(result: dict, model, devices: list[int], speedup: float, bandwidth_gbs: float | None) -> dict:
    from ffcompile.lowering import pipeline_stages

    data = result["runs"]["data"]
    base = data[min(data, key=int)]
    n1 = int(min(data, key=int))
    measured_bw = result["allreduce_bandwidth_measured_gbs"]
    bandwidth = (bandwidth_gbs or measured_bw or 0.0) * 1e9
    grad1 = base["median_seconds"]["gradients"] * n1 / speedup
    apply = base["median_seconds"]["apply"] / speedup
    payload = base["bytes_per_step"]
    out = {"assumed_speedup": speedup, "bandwidth_gbs": bandwidth / 1e9 or None,
           "bandwidth": "stated (--bandwidth-gbs)" if bandwidth_gbs else "measured here (the 2-process all-reduce)",
           "data": {}, "pipeline": {}}
    for n in devices:
        comm = 2 * (n - 1) / n * payload / bandwidth if bandwidth else None
        total = grad1 / n + apply + (comm or 0.0)
        out["data"][n] = {"step_seconds": total, "gradients_seconds": grad1 / n, "apply_seconds": apply,
                          "all_reduce_seconds": comm, "speedup_over_1": (grad1 + apply) / total}
    layers = result["layer_seconds"]
    micro_count = result["micro_batches_projected"]
    # what one stage sends the next per step, measured with 2 stages (and assumed for every hop)
    hop_bytes = next((run["bytes_per_step"] for n, run in result["runs"]["pipeline"].items() if int(n) == 2), 0)
    one = (sum(x["micro_batch_seconds"] for x in layers) * micro_count + sum(x["apply_seconds"] for x in layers)) / speedup
    for s in devices:
        if s > len(model.layers):
            out["pipeline"][s] = {"note": f"{s} stages: more than the model's {len(model.layers)} layers (a pipeline has "
                                          "at most one stage per layer)"}
            continue
        stages = pipeline_stages(model, s)
        micro = max(sum(layers[i]["micro_batch_seconds"] for i in st) for st in stages) / speedup
        apply_s = max(sum(layers[i]["apply_seconds"] for i in st) for st in stages) / speedup
        hop = hop_bytes / micro_count / bandwidth if bandwidth and s > 1 else 0.0
        total = (micro_count + s - 1) * micro + apply_s + (s - 1) * hop
        out["pipeline"][s] = {"step_seconds": total, "compute_seconds": (micro_count + s - 1) * micro + apply_s,
                              "transfer_seconds": (s - 1) * hop, "micro_batches": micro_count,
                              "speedup_over_1": one / total}
    return out


def measure(args) -> dict:
    sys.path.insert(0, str(REPO))
    from ffcompile.core.spec import load_model

    model = load_model(args.model)
    batch = model.training.batch_size
    load_before = os.getloadavg()
    runs: dict[str, dict] = {"data": {}, "pipeline": {}}
    for mode in args.modes.split(","):
        for n in map(int, args.procs.split(",")):
            with tempfile.TemporaryDirectory() as tmp:
                part = Path(tmp) / "part.json"
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                           __file__, "--model", str(args.model), "--steps", str(args.steps), "--mode", mode,
                           "--micro-batches", str(args.micro_batches), "--threads", str(args.threads or 0),
                           "--part", str(part)]
                subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                measured = json.loads(part.read_text())
            median = {k: statistics.median(v[1:] or v) for k, v in measured.pop("times").items()}  # step 1 warms up
            step_s = sum(median.values())
            runs[mode][n] = {**measured, "median_seconds": median, "step_seconds": step_s,
                             "rows_per_second": round(batch / step_s, 1)}
    data = runs["data"]
    multi = [n for n in data if n > 1]
    measured_bw = (2 * (max(multi) - 1) / max(multi) * data[max(multi)]["bytes_per_step"]
                   / data[max(multi)]["median_seconds"]["all_reduce"]) if multi else None
    micro_count = args.micro_batches
    result = {"benchmark": "FF training on torch.distributed (gloo, CPU): data-parallel and layer-pipelined",
              "model": str(args.model), "batch": batch, "steps": args.steps,
              "command": shlex.join(["python", "bench/" + Path(sys.argv[0]).name, *sys.argv[1:]]), "cores": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d"), "load_average_before_after": [load_before, os.getloadavg()],
              "runs": runs, "allreduce_bandwidth_measured_gbs": measured_bw / 1e9 if measured_bw else None,
              "micro_batches_projected": micro_count,
              "layer_seconds": layer_seconds(model, -(-batch // micro_count))}
    return result


def projections(result: dict, model, args) -> list[dict]:
    """This machine's devices as measured, and the devices --speedup and --bandwidth-gbs describe."""
    devices = list(map(int, args.project.split(",")))
    out = [{"devices": "devices like this machine's CPU processes", **project(result, model, devices, 1.0, None)}]
    if args.speedup != 1.0 or args.bandwidth_gbs:
        out.append({"devices": args.device_name, **project(result, model, devices, args.speedup, args.bandwidth_gbs)})
    return out


def page_section(r: dict) -> list[str]:
    """The measured section of docs/distributed.md, from the JSON."""
    ms = lambda s: "–" if s is None else f"{s * 1e3:.0f} ms" if s >= 0.01 else f"{s * 1e3:.2f} ms"
    lines = [f"Generated by `python bench/bench_distributed.py --report docs/results/distributed.json --page "
             f"docs/distributed.md` from `docs/results/distributed.json`; do not edit by hand. Measured "
             f"{r['date']} with `{r['command']}` on this machine's {r['cores']} CPU cores (gloo), {r['steps']} steps "
             f"of `{r['model']}` (batch {r['batch']}) on random images; load average (1, 5, 15 min) before "
             f"{', '.join(f'{x:.1f}' for x in r['load_average_before_after'][0])}, after "
             f"{', '.join(f'{x:.1f}' for x in r['load_average_before_after'][1])}: the cores were shared with other "
             "work, so times are inflated and noisy.", "",
             "| mode | processes | step (median) | rows / s | split of the step |", "|---|---|---|---|---|"]
    for mode, runs in r["runs"].items():
        for n, run in sorted(runs.items(), key=lambda kv: int(kv[0])):
            if mode == "data":
                m = run["median_seconds"]
                split = f"gradients {ms(m['gradients'])}, all-reduce {ms(m['all_reduce'])}, apply {ms(m['apply'])}"
            else:
                split = f"{run['stages'].replace('|', '/')}, {run['micro_batches']} micro-batches; " + "; ".join(
                    f"rank {i}: compute {ms(p['compute'])}, waiting {ms(p['waiting'])}"
                    for i, p in enumerate(run["per_rank_seconds"]))
            lines.append(f"| {'data-parallel' if mode == 'data' else 'layer-pipelined'} | {n} | {ms(run['step_seconds'])} "
                         f"| {run['rows_per_second']:.0f} | {split} |")
    for p in r["projection"]:
        bw = f"{p['bandwidth_gbs']:.2f} GB/s, {p['bandwidth']}" if p["bandwidth_gbs"] else "no bandwidth"
        lines += ["", f"Projection for {p['devices']}: programs {p['assumed_speedup']:g}× as fast as one process "
                  f"here, links of {bw}, per-message latency ignored; the formulas are in "
                  "`bench/bench_distributed.py`:", "",
                  "| devices | data-parallel step | its speed-up | layer-pipelined step | its speed-up |", "|---|---|---|---|---|"]
        for n, d in p["data"].items():
            q = p["pipeline"].get(n, {})
            pipe = (ms(q["step_seconds"]), f"{q['speedup_over_1']:.2f}×") if "step_seconds" in q else (q.get("note", "–"), "–")
            lines.append(f"| {n} | {ms(d['step_seconds'])} (all-reduce {ms(d['all_reduce_seconds'])}) | "
                         f"{d['speedup_over_1']:.2f}× | {pipe[0]} | {pipe[1]} |")
    return lines


def write_page(result: dict, page: Path, check: bool) -> None:
    text = page.read_text()
    if START not in text or END not in text:
        sys.exit(f"bench_distributed: {page} has no {START} ... {END} lines")
    head, rest = text.split(START, 1)
    new = head + START + "\n" + "\n".join(page_section(result)) + "\n" + END + rest.split(END, 1)[1]
    if check:
        sys.exit(f"bench_distributed: out of date: {page}" if new != text else 0)
    if new != text:
        page.write_text(new)
        print(f"bench_distributed: wrote {page}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=Path("models/mnist-supervised.toml"))
    ap.add_argument("--procs", default="1,2", help="process counts to measure")
    ap.add_argument("--modes", default="data,pipeline", help="data, pipeline or both")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--micro-batches", type=int, default=4, help="micro-batches of a pipelined step")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads per process (default: cores / processes; on a machine shared with other "
                         "work, 1 keeps 1 process from oversubscribing its cores)")
    ap.add_argument("--project", default="2,4,8", help="device counts to project to")
    ap.add_argument("--speedup", type=float, default=1.0,
                    help="a second projection: target device speed / this CPU's (one process, one thread)")
    ap.add_argument("--bandwidth-gbs", type=float, default=None,
                    help="the second projection's link bandwidth (default: the all-reduce bandwidth measured here)")
    ap.add_argument("--device-name", default="assumed devices", help="what --speedup and --bandwidth-gbs describe")
    ap.add_argument("--out", type=Path, help="the JSON to write")
    ap.add_argument("--report", type=Path, help="only write --page from this JSON")
    ap.add_argument("--page", type=Path, help="the page whose measured section to write (docs/distributed.md)")
    ap.add_argument("--check", action="store_true", help="with --report: exit 1 if --page is out of date")
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--part", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        return worker(args)
    if args.report:
        result = json.loads(args.report.read_text())
    else:
        if not args.out:
            ap.error("--out is required (or --report)")
        result = measure(args)
        sys.path.insert(0, str(REPO))
        from ffcompile.core.spec import load_model

        result["projection"] = projections(result, load_model(args.model), args)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(json.dumps({mode: {n: {"step_ms": round(r["step_seconds"] * 1e3, 1), "rows_per_second": r["rows_per_second"]}
                                 for n, r in runs.items()} for mode, runs in result["runs"].items()}))
    if args.page:
        write_page(result, args.page, args.check)


if __name__ == "__main__":
    main()
