"""bench-backed: how much host memory ballooning gives back, per MiB ballooned.

A guest (default 4 GiB) touches and frees half its RAM, so that half is backed by the
host and free.  Then, as often as that backed memory lasts: inflate a balloon (default
1 GiB), read QEMU's RSS drop, deflate.  The first inflate takes backed memory anyway; the
later ones are where it matters: the deflated pages come back unbacked (QEMU dropped
them), and only a guest that prefers backed blocks gives the host another full balloon's
worth of memory.  One more cycle after that is the control: no backed free memory is
left, so it returns (almost) nothing.  Target: >= 0.95 MiB of RSS per MiB ballooned
while backed free memory lasts.
"""

from __future__ import annotations

import argparse
import json
import sys

from .options import DEFAULT_KERNEL, size_arg
from .qemu import qemu_version, resolve_accel
from .session import SESSION_ERRORS, BalloonSession, describe_failure
from .units import GiB, mib

TARGET = 0.95


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-backed", help="RSS returned per MiB ballooned",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--kernel", default=DEFAULT_KERNEL)
    p.add_argument("--memory", "-m", default="4G")
    p.add_argument("--size", type=size_arg, default=1 * GiB, help="balloon size (default 1G)")
    p.add_argument("--accel", default="tcg")
    p.add_argument("--timeout", type=float, default=600.0)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("bench-backed: %s, accel %s, %s guest, balloon %s"
          % (qemu_version(), resolve_accel(args.accel), args.memory, mib(args.size)),
          flush=True)
    session = BalloonSession(args.kernel, memory=args.memory, accel=resolve_accel(args.accel),
                             timeout=args.timeout)
    ratios = []
    try:
        with session:
            half = session.ram // 2
            big = session.check("alloc %d 5" % half, timeout=args.timeout)
            session.check("free %d" % big["id"])
            print("  guest touched and freed %s" % mib(half), flush=True)
            cycles = half // args.size
            for cycle in range(cycles + 1):
                rss0 = session.balloon.rss()
                session.resize(args.size, timeout=300)
                drop = rss0 - session.balloon.rss()
                ratios.append(drop / args.size)
                print("  cycle %d: inflate %s -> QEMU RSS -%d MiB (%.3f MiB per MiB)%s"
                      % (cycle + 1, mib(args.size), drop >> 20, ratios[-1],
                         "  [control: no backed free memory left]" if cycle == cycles else ""),
                      flush=True)
                session.resize(0, timeout=300, stop_if_exhausted=False)
            session.quit()
    except SESSION_ERRORS as e:
        reason, context = describe_failure(session, e)
        print("FAILED: %s\n%s" % (reason, context), flush=True)
        return 1
    control = ratios.pop()
    worst = min(ratios)
    print("worst %.3f MiB of RSS per MiB ballooned (target >= %.2f): %s"
          % (worst, TARGET, "met" if worst >= TARGET else "NOT met"), flush=True)
    print(json.dumps({"bench": "backed", "memory": args.memory, "size": args.size,
                      "ratios": [round(r, 4) for r in ratios], "control": round(control, 4),
                      "target_met": worst >= TARGET}),
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit("run as: python3 -m blimp bench-backed")
