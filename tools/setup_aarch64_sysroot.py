#!/usr/bin/env python3
"""Build (or check) the cached aarch64 sysroot used to run compiled artifacts under qemu.

    python tools/setup_aarch64_sysroot.py            # build once; later runs return at once
    python tools/setup_aarch64_sysroot.py --rebuild  # throw the cache away and build again
    python tools/setup_aarch64_sysroot.py --check-tools

Host tools come from .ci/install_emulation.sh (gcc-aarch64-linux-gnu, qemu-user). The cache lives
in $FFCOMPILE_CACHE/sysroot-aarch64 (default ~/.cache/ffcompile/sysroot-aarch64) unless
--cache-dir is given. On success the last line of stdout is a JSON summary (root, site, python,
versions, sizes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ffcompile.emulation.qemu import DEVICE_WHEELS, EmulationError, check_host_tools, ensure_sysroot


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="aarch64")
    ap.add_argument("--cache-dir", default=None, help="where the sysroot lives (default: see above)")
    ap.add_argument("--rebuild", action="store_true", help="build again even if the cache is complete")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--check-tools", action="store_true",
                    help="only check that qemu and the cross compiler are installed")
    ap.add_argument("--package", action="append", default=None, metavar="NAME[==VERSION]",
                    help=f"wheel to install instead of the default set ({', '.join(DEVICE_WHEELS)}); repeat")
    args = ap.parse_args(argv)
    try:
        check_host_tools(args.arch)
        if args.check_tools:
            print(f"host tools for {args.arch}: ok")
            return 0
        t0 = time.monotonic()
        sysroot = ensure_sysroot(args.arch, cache_dir=args.cache_dir, progress=not args.quiet,
                                 rebuild=args.rebuild,
                                 packages=tuple(args.package) if args.package else DEVICE_WHEELS)
    except EmulationError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    info = sysroot.info
    print(json.dumps({
        "root": str(sysroot.root), "site": str(sysroot.site), "python": str(sysroot.python),
        "python_version": info.get("python_version"),
        "wheels": info.get("wheels", {}).get("wheels"),
        "root_bytes": info.get("root_bytes"), "site_bytes": info.get("site_bytes"),
        "build_seconds": info.get("build_seconds"), "built_at": info.get("built_at"),
        "seconds": round(time.monotonic() - t0, 2),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
