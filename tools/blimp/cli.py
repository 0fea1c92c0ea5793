"""blimp host tool: boot blimp images in QEMU and measure them.

    python3 -m blimp run [--kernel build/blimp.elf] [--machine q35] [--memory 128M]
                         [--accel auto] [--append "blimp.mode=selftest"]
                         [--balloon [--balloon-opt deflate-on-oom=on ...]] [--timeout 60]
    python3 -m blimp bench-boot [--runs 7] [--machines q35,microvm,pc]
    python3 -m blimp demo [--memory 1G] [--machine q35]
    python3 -m blimp balloon [--memory 1G] [--touch 768M] 512M 0 ...
    python3 -m blimp bench-balloon [--configs 256/1,256/4,1024/16,4096/16] [--runs 3]
    python3 -m blimp bench-migration [--memory 4G] [--modes off,on] [--runs 3]
    python3 -m blimp bench-exits [--machines pc,q35] [--modes auto,poll] [--window 8]
    python3 -m blimp stress [--vms 2] [--seed 1] [--ops N | --seconds 20] [--storm all]
    python3 -m blimp conform [--matrix quick|full] [--machine M --transport T ...] [-j N]
    python3 -m blimp soak [--runs 200] [-j 2] [--hogs N] [--seed 1] [--irq auto|poll]

(with tools/ on PYTHONPATH; ./blimp does that).  `run` streams the guest's serial
console (COM1) to stdout and exits with: 0 guest success (0x10); the guest code
17..24 (0x11..0x18) for the other guest codes; 3 triple fault/reset; 124 timeout;
125 QEMU error; 128+N QEMU killed by signal N.  See blimp/exitcodes.py.

New subcommands: a module with ``add_parser(sub)`` that registers its parser (with
``func`` set to its ``run(args) -> int``), listed in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import signal
import sys
from types import FrameType
from typing import List, Optional

from . import (balloon_targets, bench_backed, bench_balloon, bench_boot, bench_chunks,
               bench_exits, bench_migration, bench_reporting, conform, demo, exitcodes, fuzz,
               soak, stress_runner)
from .options import add_qemu_options, qemu_from_args
from .qemu import QemuError


def _install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so `with Qemu` blocks and atexit kill QEMU."""
    def handler(signum: int, frame: Optional[FrameType]) -> None:
        raise SystemExit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(s, handler)
        except (ValueError, OSError):
            pass


# ------------------------------------------------------------------ run

def add_run(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="boot an image and stream its serial console",
                       description="Boot a blimp image in QEMU, stream COM1 to stdout, "
                                   "exit with the mapped guest status.")
    add_qemu_options(p)
    p.add_argument("--serial-log", default=None, help="also write the raw serial output here")
    p.add_argument("--print-argv", action="store_true",
                   help="print the QEMU command line on stderr before starting")
    p.add_argument("--dry-run", action="store_true",
                   help="print the QEMU command line and exit")
    p.add_argument("--quiet", "-q", action="store_true",
                   help="do not print the outcome line on stderr")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    q = qemu_from_args(args, echo=sys.stdout.buffer, serial_log=args.serial_log)
    if args.dry_run:
        argv = q.argv()
        q.close()
        print(" ".join(argv))
        return 0
    if args.print_argv:
        print("blimp: " + " ".join(q.argv()), file=sys.stderr)
    try:
        with q:
            if not args.quiet:
                print("blimp: QEMU pid %d, accel %s, QMP %s%s" % (
                    q.pid, q.accel, q.qmp_path,
                    (", agent " + q.agent_path) if args.agent else ""), file=sys.stderr)
            q.wait()
            err = q.stderr.strip()
            outcome = q.outcome
    except QemuError as e:
        print("blimp: error: %s" % e, file=sys.stderr)
        return exitcodes.CLI_QEMU_ERROR
    if err and (outcome.kind != exitcodes.GUEST or not args.quiet):
        print(err, file=sys.stderr)
    if not args.quiet:
        print("blimp: %s" % outcome.describe(), file=sys.stderr)
    return outcome.cli_status()


# ------------------------------------------------------------------ main

SUBCOMMANDS = [add_run, bench_boot.add_parser, demo.add_parser, balloon_targets.add_parser,
               bench_balloon.add_parser, bench_chunks.add_parser, bench_backed.add_parser,
               bench_migration.add_parser, bench_reporting.add_parser, bench_exits.add_parser,
               fuzz.add_parser, stress_runner.add_parser, conform.add_parser, soak.add_parser]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m blimp", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    _install_signal_handlers()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 141
