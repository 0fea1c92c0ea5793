#!/usr/bin/python3
"""Boot-time benchmark: QEMU spawn -> `ready` line on serial (host wall clock),
TCG, blimp.mode=boot, N runs per machine (default 7, after 1 warm-up run); then every
boot path (-kernel PVH / multiboot1, GRUB ISO on SeaBIOS and OVMF, blimp.efi on OVMF)
from spawn to balloon-ready (the balloon_features event), median of --path-runs (5).
Prints median/min/max per machine and the guest's own boot_us median,
compares with the targets (q35 <= 0.15 s, microvm <= 0.05 s), and ends with
one JSON line of the figures.

    /usr/bin/python3 bench/boot_bench.py [--runs 7] [--machines q35,microvm,pc]
                                         [--kernel build/blimp.elf] [--check-targets]

This is `PYTHONPATH=tools python3 -m blimp bench-boot`; see its --help for all options.
"""

from __future__ import annotations

import os
import sys

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")

if __name__ == "__main__":
    # run the package in a fresh interpreter with tools/ on its PYTHONPATH
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (TOOLS, os.environ.get("PYTHONPATH")) if p))
    argv = [sys.executable, "-m", "blimp", "bench-boot"] + sys.argv[1:]
    os.execve(sys.executable, argv, env)
