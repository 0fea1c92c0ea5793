#!/usr/bin/python3
"""Balloon benchmark: inflate a 3 GiB balloon in a 4 GiB q35 guest and deflate it again,
on untouched guest memory and again after the guest has written (nearly) all of its free
memory, for several kernel configurations (blimp.balloon.pfns / blimp.balloon.buffers:
256/1, 256/4, 256/16, 1024/16, 4096/16).  Each figure is timed from the QMP `balloon`
command until query-balloon shows the target (polled every ms; not the rate-limited
BALLOON_CHANGE event).

The host floor is measured in the same run: bench/madvise_floor.c (compiled on the fly
with gcc into build/bench/) maps the same amount of anonymous memory like QEMU maps guest
RAM, and times one madvise(MADV_DONTNEED) per 4 KiB page -- what QEMU does for every
ballooned page -- untouched and touched, with and without THP.

Prints time, GiB/s and the ratio to the floor per config, whether the targets are met
(inflate <= 1.5x the floor; deflate of 3 GiB <= 0.5 s), the fastest configuration and the
fastest portable one (<= 256 PFNs per buffer, what Firecracker and cloud-hypervisor
accept), then one JSON line.  The accelerator is TCG unless --accel says otherwise.

    /usr/bin/python3 bench/balloon_bench.py [--runs 3] [--configs 256/4,1024/16]
                                            [--no-touched] [--check-targets]

This is `PYTHONPATH=tools python3 -m blimp bench-balloon`; see its --help for all options.
"""

from __future__ import annotations

import os
import sys

TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")

if __name__ == "__main__":
    # run the package in a fresh interpreter with tools/ on its PYTHONPATH
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (TOOLS, os.environ.get("PYTHONPATH")) if p))
    argv = [sys.executable, "-m", "blimp", "bench-balloon"] + sys.argv[1:]
    os.execve(sys.executable, argv, env)
