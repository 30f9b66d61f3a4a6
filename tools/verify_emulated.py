#!/usr/bin/env python
"""Check an aarch64 bundle (arm-cpu / arm-cpu-ort) on an emulated device; the same as
``ffcompile verify BUNDLE --emulate [options]``.

    python tools/verify_emulated.py bundles/small-arm --steps 10 --report emulated.json

Needs qemu-user and gcc-aarch64-linux-gnu (.ci/install_emulation.sh); the aarch64 sysroot is
built on first use (~1 min, ~150 MB of downloads) and cached in ~/.cache/ffcompile. Exit status 0:
parity passed, 1: failed, 2: bad usage; errors are one line.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ffcompile.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["verify", *sys.argv[1:2], "--emulate", *sys.argv[2:]], prog_name="verify_emulated.py")
