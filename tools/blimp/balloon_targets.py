"""balloon: boot blimp and move the balloon through the given sizes, timing each."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional

from .options import add_qemu_options, balloon_append, boot_media_from_args, size_arg
from .session import SESSION_ERRORS, BalloonSession, describe_failure
from .units import GiB, mib, page_round

ROW = "%-10s %10s %9s %10s %9s %10s %10s %10s"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("balloon", help="boot, set balloon target(s), print timings",
                       description="Boot blimp in balloon mode and move the balloon through the "
                                   "given sizes, one after the other, timing each from the QMP "
                                   "`balloon` command until query-balloon shows the target "
                                   "(polled).  Sizes are balloon sizes (RAM - QMP value), e.g. "
                                   "`balloon -m 4G 3G 0`; with --guest-size they are QMP "
                                   "values.  Exit 0 if every target was reached.")
    add_qemu_options(p)
    p.set_defaults(memory="1G", balloon=True, agent=True, timeout=600.0)
    p.add_argument("sizes", nargs="+", type=size_arg, metavar="SIZE",
                   help="balloon sizes to reach in order (e.g. 512M 0)")
    p.add_argument("--guest-size", action="store_true",
                   help="SIZEs are guest sizes (the QMP balloon value), not balloon sizes")
    p.add_argument("--pfns", type=int, default=None, help="blimp.balloon.pfns for the guest")
    p.add_argument("--buffers", type=int, default=None,
                   help="blimp.balloon.buffers for the guest")
    p.add_argument("--touch", type=size_arg, default=0,
                   help="first let the guest write and free this much memory")
    p.add_argument("--wait", type=float, default=120.0,
                   help="seconds to wait for each target (default 120)")
    p.add_argument("--poll-ms", type=float, default=1.0,
                   help="query-balloon polling interval in ms (default 1)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    append = balloon_append(args.append, args.pfns, args.buffers)
    kernel, media = boot_media_from_args(args, append)
    media["append"] = media.get("append") or ""
    session = BalloonSession(kernel, machine=args.machine, memory=args.memory,
                             accel=args.accel, balloon_opts=args.balloon_opt,
                             timeout=args.timeout, machine_opts=args.machine_opt, smp=args.smp,
                             extra_args=args.qemu_arg, **media)
    try:
        with session:
            _show_guest(session, append)
            if args.touch:
                r = session.touch_free_memory(args.touch)
                print("balloon: guest wrote and freed %s (%d ms); QEMU RSS %s" % (
                    mib(args.touch), r["ms"], mib(session.balloon.rss())), flush=True)
            steps = _move_through(session, args)
            session.quit()
            session.check_no_violation()
    except SESSION_ERRORS as e:
        reason, context = describe_failure(session, e)
        print("balloon: FAILED: %s" % reason, file=sys.stderr)
        if context:
            print(context, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"tool": "balloon", "machine": session.qemu.machine,
                          "memory": session.ram, "accel": session.qemu.accel, "append": append,
                          "transport": session.transport, "steps": steps}, sort_keys=True))
    return 0


def _show_guest(session: BalloonSession, append: Optional[str]) -> None:
    q = session.qemu
    print("balloon: QEMU pid %d, %s, %s RAM, accel %s, guest driver on %s "
          "(accepted %#x), cmdline %r, ready after %.2f s" % (
              q.pid, q.machine, mib(session.ram), q.accel, session.transport,
              session.accepted, append or "", time.monotonic() - (q.t_start or 0.0)),
          flush=True)


def _move_through(session: BalloonSession, args: argparse.Namespace) -> List[dict]:
    """Reach each size of args.sizes in turn; one figures dict per step."""
    print(ROW % ("target", "from", "QMP->seen", "guest ms", "GiB/s", "polls", "RSS before",
                 "RSS after"), flush=True)
    steps = []
    for size in args.sizes:
        target = (session.ram - size) if args.guest_size else size
        if not 0 <= target < session.ram:
            raise session.failure("size %s is outside [0, RAM %s)"
                                  % (mib(size), mib(session.ram)))
        rss0 = session.balloon.rss()
        r = session.resize(page_round(target), timeout=args.wait, poll=args.poll_ms / 1000.0)
        rss1 = session.balloon.rss()
        rate = abs(r.size - r.previous) / GiB / r.seconds if r.seconds > 0 else float("inf")
        steps.append({"from": r.previous, "target": r.size, "seconds": round(r.seconds, 6),
                      "guest_ms": r.guest_ms, "polls": r.polls,
                      "rss_before": rss0, "rss_after": rss1})
        print("%-10s %10s %9.3fs %10s %9.2f %10d %10s %10s" % (
            mib(r.size), mib(r.previous), r.seconds, r.guest_ms if r.guest_ms is not None
            else "-", rate, r.polls, mib(rss0), mib(rss1)), flush=True)
    return steps
