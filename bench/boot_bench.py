#!/usr/bin/python3
"""Boot-time benchmark: QEMU spawn -> `ready` line on serial (host wall clock),
TCG, blimp.mode=boot, N runs per machine (default 7, after 1 warm-up run).
Prints median/min/max per machine and the guest's own boot_us median,
compares with the targets (q35 <= 0.15 s, microvm <= 0.05 s), and ends with
one JSON line of the figures.

    /usr/bin/python3 bench/boot_bench.py [--runs 7] [--machines q35,microvm,pc]
                                         [--kernel build/blimp.elf] [--check-targets]

This is `tools/blimp.py bench-boot`; see its --help for all options.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))

import blimp  # noqa: E402

if __name__ == "__main__":
    sys.exit(blimp.main(["bench-boot"] + sys.argv[1:]))
