"""One CLI convention: help text on every option, -o beside every --out, --json on every command
(one parseable object on stdout, messages on stderr), progress bars only on a terminal."""

import json

import click
import pytest

from ffcompile.cli import main

from cli_helpers import invoke

TINY = "tests/bundle/tiny.toml"


def commands(group=main, prefix=()):
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            yield from commands(command, (*prefix, name))
        else:
            yield " ".join((*prefix, name)), command


@pytest.mark.parametrize("name,command", list(commands()), ids=[n for n, _ in commands()])
def test_every_command_explains_its_options_and_speaks_json(name, command):
    options = [p for p in command.params if isinstance(p, click.Option)]
    assert command.help, name
    for option in options:
        assert option.help, f"{name} {option.opts[0]} has no help text"
        if "--out" in option.opts:
            assert "-o" in option.opts, f"{name} --out has no -o"
    assert any("--json" in o.opts for o in options), f"{name} has no --json"


def json_of(*args) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_from_the_whole_flow(tmp_path, tiny_bundle):
    assert {t["name"] for t in json_of("targets")["targets"]} >= {"x86-cpu", "arm-cpu"}
    assert "mnist-small" in {m["name"] for m in json_of("models")["models"]}
    assert json_of("inspect", "mnist-small")["kind"] == "spec"
    trained = json_of("train", TINY, "-o", tmp_path / "run", "--epochs", "1", "--limit", "40", "--backend", "torch")
    assert trained["epochs"] == 1 and trained["backend"] == "torch"
    assert json_of("inspect", tmp_path / "run")["kind"] == "run"
    assert json_of("inspect", tiny_bundle)["kind"] == "bundle"
    assert set(json_of("eval", tmp_path / "run", "--split", "val")["error_percent"]) == {"goodness", "softmax"}
    assert json_of("run", tiny_bundle)["readouts"]
    tuned = json_of("finetune", tiny_bundle, "-o", tmp_path / "tuned", "--epochs", "1", "--limit", "40")
    assert tuned["epochs"] == 1 and "test" in tuned["error_percent"]["goodness"]
    assert json_of("export", tmp_path / "run", "-o", tmp_path / "m.onnx")["readout"] == "goodness"
    assert json_of("keygen", tmp_path / "keys" / "k")["key"]
    assert json_of("data", "verify")["ok"]


def test_progress_bars_stay_off_the_log_when_it_is_not_a_terminal(tmp_path):
    result = invoke("train", TINY, "-o", tmp_path / "run", "--epochs", "1", "--limit", "40", "--backend", "torch")
    assert result.exit_code == 0, result.output
    assert "\r" not in result.output and "it/s" not in result.output


def test_a_build_logs_each_compilation_with_its_seconds(tmp_path):
    """Not a terminal: one plain line per compiled program once it is done, no bar redrawn with \\r."""
    result = invoke("build", TINY, "--target", "x86-cpu", "-o", tmp_path / "b", "--verify-steps", "0",
                    "--infer-batch", "50")
    assert result.exit_code == 0, result.output
    compiled = [line for line in result.output.splitlines() if line.startswith("compile ")]
    assert compiled and all(line.endswith(" s") and "for x86-cpu: " in line for line in compiled), result.output
    assert "\r" not in result.output
