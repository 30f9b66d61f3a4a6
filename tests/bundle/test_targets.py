import pytest
from click.testing import CliRunner

from ffcompile.cli import main
from ffcompile.core.errors import FFCompileError
from ffcompile.compiler.targets import find_target, known_targets, load_target


def test_shipped_targets():
    targets = {t.name: t for t in known_targets()}
    cpu, cuda = targets["x86-cpu"], targets["cuda"]
    assert (cpu.backend, cpu.device, cpu.arch, cpu.providers, cpu.dtype) == \
        ("onnxruntime", "cpu", "x86_64", ("CPUExecutionProvider",), "float32")
    assert (cuda.backend, cuda.device, cuda.providers) == ("onnxruntime", "cuda", ("CUDAExecutionProvider",))


def test_targets_command_lists_them():
    result = CliRunner().invoke(main, ["targets"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert lines[0].split()[:4] == ["name", "backend", "device", "arch"]
    assert any(line.split()[:4] == ["x86-cpu", "onnxruntime", "cpu", "x86_64"] for line in lines)
    assert any(line.split()[:4] == ["cuda", "onnxruntime", "cuda", "x86_64"] for line in lines)


def test_unknown_target_lists_known():
    with pytest.raises(FFCompileError, match=r"unknown target 'arm-m0' \(known: .*cuda.*x86-cpu"):
        find_target("arm-m0")


@pytest.mark.parametrize("text,field", [
    ('backend = "tflite"\ndevice = "cpu"\narch = "x86_64"', "backend"),
    ('backend = "onnxruntime"\ndevice = "cpu"\narch = "x86_64"', "providers"),
    ('backend = "onnxruntime"\ndevice = "cpu"\narch = "sparc"\nproviders = ["CPUExecutionProvider"]', "arch"),
    ('backend = "onnxruntime"\ndevice = "cuda"\narch = "x86_64"\nproviders = ["CPUExecutionProvider"]', "providers"),
    ('backend = "onnxruntime"\ndevice = "cpu"\narch = "x86_64"\nproviders = ["CPUExecutionProvider"]\nspeed = 3', "speed"),
    ('backend = "tvm"\ndevice = "cpu"\narch = "aarch64"', "tvm"),
    ('backend = "onnxruntime"\ndevice = "cpu"\narch = "x86_64"\nproviders = ["CPUExecutionProvider"]\n'
     'inference_dtypes = ["int8"]', "inference_dtypes"),  # float32 is always there
    ('backend = "onnxruntime"\ndevice = "cpu"\narch = "x86_64"\nproviders = ["CPUExecutionProvider"]\n'
     'inference_dtypes = ["float32", "int4"]', "inference_dtypes"),
    ('backend = "tvm"\ndevice = "cpu"\narch = "x86_64"\ntvm = { kind = "llvm" }\n'
     'inference_dtypes = ["float32", "int8"]', "inference_dtypes"),
])
def test_bad_target_names_file_and_field(tmp_path, text, field):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(FFCompileError, match=rf"^{path}: {field}: "):
        load_target(path)


def test_search_path_env_and_paths(tmp_path, monkeypatch):
    (tmp_path / "edge.toml").write_text('backend = "onnxruntime"\ndevice = "cpu"\narch = "aarch64"\n'
                                        'providers = ["CPUExecutionProvider"]\n')
    monkeypatch.setenv("FFCOMPILE_TARGETS", str(tmp_path))
    assert find_target("edge").arch == "aarch64"
    assert find_target(str(tmp_path / "edge.toml")).name == "edge"
