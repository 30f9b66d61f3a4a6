"""Wheels carry the checkout's top-level ``targets/`` and ``models/`` specs as package data
(``ffcompile/shipped/``, see ``ffcompile.core.shipped``); everything else is in pyproject.toml."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SHIPPED = ("targets", "models")


class BuildWithSpecs(build_py):
    def run(self):
        super().run()
        for folder in SHIPPED:
            dest = Path(self.build_lib) / "ffcompile" / "shipped" / folder
            self.mkpath(str(dest))
            for spec in sorted(Path(folder).glob("*.toml")):
                self.copy_file(str(spec), str(dest / spec.name))


setup(cmdclass={"build_py": BuildWithSpecs})
