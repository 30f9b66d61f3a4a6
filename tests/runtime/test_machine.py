"""One name per architecture, as targets spell it; aliases from uname, Debian and LLVM triples."""

import pytest

from ffcompile.compiler.tvm_build import _host_triple_matches
from ffcompile.core.errors import FFCompileError
from ffcompile.runtime.machine import canonical_arch, host_arch


@pytest.mark.parametrize("alias,name", [("amd64", "x86_64"), ("arm64", "aarch64"), ("AARCH64", "aarch64"),
                                        ("armhf", "armv7l"), ("riscv", "riscv64"), ("x86_64", "x86_64")])
def test_aliases(alias, name):
    assert canonical_arch(alias) == name


def test_unknown_architecture_is_one_line():
    with pytest.raises(FFCompileError, match="unknown architecture 'sparc'"):
        canonical_arch("sparc")


def test_host_triples():
    assert _host_triple_matches(f"{host_arch()}-linux-gnu")
    other = "aarch64" if host_arch() != "aarch64" else "x86_64"
    assert not _host_triple_matches(f"{other}-linux-gnu")
