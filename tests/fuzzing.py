"""Fuzz the CLI with damaged model specs, bundle manifests, argument lists and .npy inputs, and
count how each case ends: a clean error (one ``error:`` line, exit 1 or 2), success, a traceback,
a hang, or a file written outside the case's output folder (goals for the last three: 0).

    python tests/fuzzing.py --cases 500 --out fuzz.json        # 500 cases per target

Every case runs in-process (click's test runner) in a scratch folder of its own, with its inputs
under in/ (a fresh copy of a tiny bundle among them), its outputs under out/, and the current
directory in cwd/; afterwards everything but out/ must be as it was. ``tests/test_fuzz.py`` runs
the same cases from hypothesis-drawn seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import struct
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from ffcompile.cli import main  # noqa: E402

TARGETS = ("spec", "manifest", "cli", "npy")
TINY_SPEC = REPO / "tests" / "bundle" / "tiny.toml"
WEIRD_NUMBERS = ["nan", "inf", "-inf", "0", "-1", "1e308", "-0.0", "1e-320", "9223372036854775807",
                 "99999999999999999999999", "0.5", "1", "2", "true", '"x"', "[]", "{}", "[1, 2]"]
WEIRD_JSON = [None, True, False, 0, -1, 1.5, 10**30, -10**30, "", "x" * 300, "../../etc/passwd", "/etc/passwd",
              "programs/../../x", [], {}, [1], {"a": 1}, float(1e308), "programs\\x.onnx", "sha256:" + "0" * 64]


DEEP = "<deeply nested array>"


class Hang(BaseException):
    """Raised by the alarm: not an Exception, so no handler in ffcompile can swallow it."""


def _snapshot(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    state = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        if here == skip or skip in here.parents:
            dirnames[:] = []
            continue
        for name in filenames + [d for d in dirnames if (here / d).is_symlink()]:
            path = here / name
            st = path.lstat()
            state[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return state


@contextlib.contextmanager
def _alarm(seconds: float):
    def fire(signum, frame):
        raise Hang()
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Fuzzer:
    def __init__(self, bundle: Path, timeout: float = 20.0):
        """``bundle``: a built bundle of tests/bundle/tiny.toml (copied into every case)."""
        self.bundle = Path(bundle)
        self.timeout = timeout

    # ---- case makers: each writes its inputs under ``scratch/in`` and returns CLI arguments ----

    def spec_case(self, rng: random.Random, scratch: Path) -> list[str]:
        lines = TINY_SPEC.read_text().splitlines()
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(lines))
            line = lines[i]
            choice = rng.random()
            if "=" in line and choice < 0.6:
                key = line.split("=", 1)[0]
                lines[i] = f"{key}= {rng.choice(WEIRD_NUMBERS)}"
            elif choice < 0.7:
                del lines[i]
                if not lines:
                    lines = ["x = 1"]
            elif choice < 0.8:
                lines.insert(i, rng.choice(["[recurrent]", "iterations = 100000", "[[layers]]", 'name = "softmax"',
                                            "size = 100000000", "blur_passes = 1000000000", "seed = -5",
                                            'kind = "local"', "grid = 1000", "field = 3", "stride = 1",
                                            "channels = 4", "x = " + "[" * 2000 + "]" * 2000]))
            elif choice < 0.9:
                lines[i] = line[: rng.randrange(len(line) + 1)]
            else:
                lines.insert(i, "[" + rng.choice(["input", "optimizer", "negatives", "training", "goodness",
                                                  "normalization", "schedule", "regularizers", "readout"]) + "]")
        suffix = ".json" if rng.random() < 0.15 else ".toml"
        path = scratch / "in" / f"spec{suffix}"
        if suffix == ".json":
            path.write_text(_dumps(_json_mutate(rng, {"name": "x", "layers": [{"size": 8}]})))
        else:
            path.write_text("\n".join(lines) + "\n")
        return ["inspect", str(path), "--batch", str(rng.choice([1, 2, 7]))]

    def manifest_case(self, rng: random.Random, scratch: Path) -> list[str]:
        from ffcompile.contract.integrity import write_digest

        bundle = scratch / "in" / "bundle"
        path = bundle / "manifest.json"
        if rng.random() < 0.3:  # raw byte damage: the digest must catch every change
            data = bytearray(path.read_bytes())
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            path.write_bytes(bytes(data))
        else:  # structural damage with the digest rewritten: the structure checks must catch it
            manifest = json.loads(path.read_text())
            for _ in range(rng.randint(1, 3)):
                manifest = _json_mutate(rng, manifest)
            path.write_text(_dumps(manifest))
            write_digest(bundle)
        x = scratch / "in" / "x.npy"
        np.save(x, np.random.default_rng(rng.randrange(1 << 30)).random((3, 784), dtype=np.float32))
        return ["run", str(bundle), "--input", str(x), "--json"]

    def cli_case(self, rng: random.Random, scratch: Path) -> list[str]:
        bundle, out = scratch / "in" / "bundle", scratch / "out"
        spec = scratch / "in" / "tiny.toml"
        shutil.copyfile(TINY_SPEC, spec)
        weird = ["-1", "0", "1", "nan", "inf", "abc", "", "99999999999999999999", "1e9", "-0", str(scratch / "nope"),
                 "/dev/null", str(bundle), str(spec), "../x"]
        commands = {
            "inspect": lambda: [str(spec), "--batch", rng.choice(weird + ["3"])],
            "run": lambda: [str(bundle), *rng.choice([["--readout", rng.choice(["softmax", "x", "all"])],
                                                      ["--split", rng.choice(["test", "nope"])],
                                                      ["--input", rng.choice(weird)], ["--digest", rng.choice(weird)],
                                                      ["--trust", rng.choice(weird)], ["--weights", rng.choice(weird)],
                                                      ["--input-scale", rng.choice(weird)]])],
            "train": lambda: [str(spec), "--out", str(out / "run"), "--no-progress", "--epochs",
                              rng.choice(["0", "1", "-1", "x"]), "--limit", rng.choice(["20", "5", "0", "-3", "abc"]),
                              *rng.choice([[], ["--eval-every", rng.choice(weird)], ["--device", rng.choice(weird)],
                                           ["--resume"], ["--split", "nope"]])],
            "finetune": lambda: [str(bundle), "--out", str(out / "ft"), "--no-progress", "--epochs",
                                 rng.choice(["0", "1", "-1", "x"]), "--limit", rng.choice(["20", "5", "0", "-3", "x"]),
                                 *rng.choice([[], ["--resume"], ["--split", rng.choice(weird)]])],
            "build": lambda: [str(spec), "-o", str(out / "b"), "--verify-steps", rng.choice(["0", "-1", "x"]),
                              "--no-progress", *rng.choice([[], ["--target", rng.choice(weird + ["x86-cpu"])],
                                                            ["--batch", rng.choice(weird)],
                                                            ["--infer-batch", rng.choice(weird)],
                                                            ["--sign", rng.choice(weird)], ["--seed", rng.choice(weird)]])],
            "verify": lambda: [str(bundle), "--steps", rng.choice(["0", "1", "-1", "x"]), "--no-progress",
                               "--report", str(out / "r.json")],
            "eval": lambda: [rng.choice(weird), "--batch", rng.choice(weird), "--device", rng.choice(["cpu", "tpu", ""])],
            "keygen": lambda: [str(out / rng.choice(["k", "sub/k"]))],
            "targets": lambda: [],
            "generate": lambda: [str(bundle), "--prompt", rng.choice(["hello world", "", "x" * 5])],
            "nonsense": lambda: [rng.choice(weird)],
        }
        name = rng.choice(list(commands))
        args = commands[name]()
        if rng.random() < 0.2:
            args.insert(rng.randrange(len(args) + 1), rng.choice(["--bogus", "-x", "--", "--help"]))
        return ([] if name == "nonsense" else [name]) + args

    def npy_case(self, rng: random.Random, scratch: Path) -> list[str]:
        path = scratch / "in" / "x.npy"
        choice = rng.random()
        if choice < 0.4:
            dtype = rng.choice(["<f4", "<f8", "|u1", "<i8", "|b1", "<c8", "<U3", "|O", ">f4", "<f2"])
            shape = rng.choice([(3, 784), (784,), (0, 784), (2, 2), (10**9, 784), (2**40, 2**40), (-1, 784), ()])
            data = rng.randrange(0, 20000)
            header = "{'descr': %r, 'fortran_order': %s, 'shape': %r, }" % (dtype, rng.choice(["False", "True"]), shape)
            header += " " * (63 - (len(header) + 10) % 64) + "\n"
            path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode()
                             + bytes(rng.randrange(256) for _ in range(min(data, 4096))) + b"\0" * max(0, data - 4096))
        elif choice < 0.7:
            values = np.random.default_rng(rng.randrange(1 << 30)).random((rng.choice([1, 3, 5]), 784))
            values *= rng.choice([1.0, 255.0, 1e30, -1.0, np.nan])
            with np.errstate(over="ignore"):
                np.save(path, values.astype(rng.choice([np.float32, np.float64, np.float16])))
        else:
            np.save(path, np.random.default_rng(0).random((3, 784), dtype=np.float32))
            data = bytearray(path.read_bytes())
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            path.write_bytes(bytes(data[: rng.randrange(len(data) + 1)] if rng.random() < 0.3 else data))
        args = ["run", str(scratch / "in" / "bundle"), "--input", str(path), "--json"]
        if rng.random() < 0.3:
            args += ["--input-scale", rng.choice(["255", "0", "-1", "nan", "1e-30"])]
        return args

    # ---- running a case ----

    def run(self, target: str, seed: int) -> dict:
        rng = random.Random(f"{target}-{seed}")
        scratch = Path(tempfile.mkdtemp(prefix="ffcompile-fuzz-"))
        cwd = os.getcwd()
        try:
            for sub in ("in", "out", "cwd"):
                (scratch / sub).mkdir()
            shutil.copytree(self.bundle, scratch / "in" / "bundle")
            args = getattr(self, f"{target}_case")(rng, scratch)
            before = _snapshot(scratch, scratch / "out")
            os.chdir(scratch / "cwd")
            started = time.perf_counter()
            try:
                with _alarm(self.timeout):
                    result = CliRunner().invoke(main, args, catch_exceptions=True)
            except Hang:
                return {"target": target, "seed": seed, "outcome": "hang", "args": args}
            finally:
                os.chdir(cwd)
            seconds = time.perf_counter() - started
            after = _snapshot(scratch, scratch / "out")
            touched = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
            case = {"target": target, "seed": seed, "args": args, "exit": result.exit_code,
                    "seconds": round(seconds, 3)}
            text = result.output
            if isinstance(result.exception, Hang):
                return {**case, "outcome": "hang"}
            if touched:
                return {**case, "outcome": "outside_write", "files": touched[:5]}
            if "Traceback" in text or result.exit_code not in (0, 1, 2) or (
                    result.exception is not None and not isinstance(result.exception, SystemExit)):
                lines = [line for line in text.strip().splitlines() if line and not line.startswith(" ")]
                detail = repr(result.exception) if result.exception is not None and not isinstance(
                    result.exception, SystemExit) else " | ".join(lines[-3:])
                return {**case, "outcome": "traceback", "detail": detail[:300]}
            if result.exit_code == 0:
                return {**case, "outcome": "ok"}
            return {**case, "outcome": "clean_error", "line": (text.strip().splitlines() or [""])[-1][:200]}
        finally:
            os.chdir(cwd)
            shutil.rmtree(scratch, ignore_errors=True)


def _json_mutate(rng: random.Random, value, depth: int = 0):
    """One random change somewhere inside a JSON value."""
    if isinstance(value, dict) and value and depth < 6 and rng.random() < 0.75:
        key = rng.choice(list(value))
        value = dict(value)
        if rng.random() < 0.15:
            del value[key]
        else:
            value[key] = _json_mutate(rng, value[key], depth + 1)
        return value
    if isinstance(value, list) and value and depth < 6 and rng.random() < 0.75:
        value = list(value)
        i = rng.randrange(len(value))
        value[i] = _json_mutate(rng, value[i], depth + 1)
        return value
    if rng.random() < 0.05:
        return DEEP
    return rng.choice(WEIRD_JSON)


def _dumps(value) -> str:
    """JSON text, with every ``DEEP`` marker as an array nested 5000 levels deep."""
    return json.dumps(value).replace(json.dumps(DEEP), "[" * 5000 + "]" * 5000)


def build_tiny_bundle(where: Path) -> Path:
    from ffcompile.compiler.build import build_bundle

    out = Path(where) / "tiny-bundle"
    build_bundle(TINY_SPEC, "x86-cpu", out, infer_batch=50, verify_steps=0, progress=False, log=lambda _: None)
    return out


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=500, help="cases per target")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds before a case counts as a hang")
    parser.add_argument("--seed", type=int, default=0, help="first case seed")
    parser.add_argument("--out", type=Path, default=Path("fuzz.json"))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ffcompile-fuzz-bundle-"))
    started = time.perf_counter()
    report = {"cases_per_target": args.cases, "timeout_s": args.timeout, "targets": {}, "problems": []}
    try:
        fuzzer = Fuzzer(build_tiny_bundle(work), args.timeout)
        for target in args.targets.split(","):
            counts = {"cases": 0, "ok": 0, "clean_error": 0, "traceback": 0, "hang": 0, "outside_write": 0}
            for seed in range(args.seed, args.seed + args.cases):
                case = fuzzer.run(target, seed)
                counts["cases"] += 1
                counts[case["outcome"]] += 1
                if case["outcome"] not in ("ok", "clean_error"):
                    report["problems"].append(case)
            report["targets"][target] = counts
            print(target, counts, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["totals"] = {k: sum(t[k] for t in report["targets"].values())
                        for k in ("cases", "ok", "clean_error", "traceback", "hang", "outside_write")}
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out}: {report['totals']}")


if __name__ == "__main__":
    main_cli()
