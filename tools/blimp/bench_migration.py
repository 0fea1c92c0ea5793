"""bench-migration: live migration of a guest with and without free page hinting.

A fresh guest (default 4 GiB) holds 128 MiB of verified data and touches and frees 2 GiB
more, then migrates to a second QEMU over a unix socket with max-bandwidth raised to
10 GiB/s: once with the stock balloon device and once with free-page-hint=on (so the
guest may tell QEMU which pages are free and need not be sent).  For each mode, the best
of N fresh guests (least total time): query-migrate's RAM transferred and total time,
side by side and against the guest's in-use memory (RAM minus its free pages), with the
held data verified on the destination.  Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Dict, List, Optional

from .benchutil import best_run, log
from .balloon import F_FREE_PAGE_HINT
from .options import DEFAULT_KERNEL, memory_arg, size_arg
from .qemu import parse_memory, qemu_version, resolve_accel
from .session import MIGRATION_BANDWIDTH, SESSION_ERRORS, BalloonSession, describe_failure
from .units import GiB, MiB, PAGE

MODES = ("off", "on")
TARGET_RATIO = 1.2            # hint on: RAM transferred <= 1.2 x the guest's in-use memory
HELD_SEED, TOUCH_SEED = 7, 9
DONE_TIMEOUT_S = 15.0
#: the issue's figures for a Linux 6.1 guest (KVM): (MiB transferred, ms)
LINUX_6_1 = {"off": (2194, 3340), "on": (322, 378)}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-migration",
                       help="live migration with and without free page hinting",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--kernel", default=DEFAULT_KERNEL)
    p.add_argument("--memory", "-m", type=memory_arg, default="4G", help="guest RAM (4G)")
    p.add_argument("--held", type=size_arg, default=128 * MiB,
                   help="verified data the guest keeps (128M)")
    p.add_argument("--touch", type=size_arg, default=2 * GiB,
                   help="memory written and freed before migrating (2G)")
    p.add_argument("--modes", default=",".join(MODES),
                   help="free page hinting off, on or both (default off,on)")
    p.add_argument("--runs", "-n", type=int, default=3, help="fresh guests per mode (best)")
    p.add_argument("--max-bandwidth", type=size_arg, default=MIGRATION_BANDWIDTH,
                   help="migrate-set-parameters max-bandwidth per second (10G)")
    p.add_argument("--accel", default="tcg")
    p.add_argument("--timeout", type=float, default=300.0, help="per QEMU run")
    p.set_defaults(func=run)


def one_guest(args: argparse.Namespace, hinting: bool) -> dict:
    """A fresh guest: hold, touch and free, migrate, verify on the destination."""
    session = BalloonSession(args.kernel, machine="q35", memory=args.memory,
                             accel=resolve_accel(args.accel), free_page_hint=hinting,
                             timeout=args.timeout)
    out: dict = {"ok": False}
    try:
        with session:
            accepted = bool(session.accepted & F_FREE_PAGE_HINT)
            session.check("alloc %d %d" % (args.held, HELD_SEED), timeout=60)
            session.touch_free_memory(args.touch, seed=TOUCH_SEED, timeout=args.timeout)
            in_use = session.in_use()
            since = session.mark()
            m = session.migrate(max_bandwidth=args.max_bandwidth, timeout=args.timeout)
            done = None
            if accepted:
                # DONE comes once the guest runs on the destination
                try:
                    done = session.wait_event("balloon_hint_done", since=m.switch_line,
                                              timeout=DONE_TIMEOUT_S)
                except SESSION_ERRORS:
                    done = None
            session.verify(pages=args.held // PAGE, timeout=args.timeout)
            session.quit()
            session.check_no_violation()
            out.update(ok=True, hint_accepted=accepted, in_use=in_use,
                       ram_transferred=m.ram_transferred, ram_total=m.ram_total,
                       ram_normal=m.ram_normal, ram_duplicate=m.ram_duplicate,
                       total_time_ms=m.total_time_ms, downtime_ms=m.downtime_ms,
                       setup_time_ms=m.setup_time_ms, mbps=round(m.mbps, 1),
                       hint_rounds=len(session.events("balloon_hint_start", since)),
                       done_released_pages=None if done is None else done["released_pages"])
    except SESSION_ERRORS as e:
        out["error"], out["context"] = describe_failure(session, e)
    return out


def best_of(results: List[dict]) -> Optional[dict]:
    """The run with the least total time, with every run's transferred bytes beside it."""
    best = best_run(results, "total_time_ms")
    if best:
        best["transferred_all"] = [r["ram_transferred"] for r in results if r.get("ok")]
    return best


def run(args: argparse.Namespace) -> int:
    modes = [m for m in args.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        log("bench-migration: unknown mode(s) %s (use off, on)" % ",".join(bad))
        return 2
    log("bench-migration: %s, accel %s, %s guest, %d MiB held, %d MiB touched and freed, "
        "max-bandwidth %d MiB/s, best of %d fresh guests"
        % (qemu_version(), resolve_accel(args.accel), args.memory, args.held >> 20,
           args.touch >> 20, args.max_bandwidth >> 20, args.runs))
    best: Dict[str, Optional[dict]] = {}
    failed = False
    for mode in modes:
        results = []
        for i in range(args.runs):
            r = one_guest(args, mode == "on")
            results.append(r)
            if r["ok"]:
                log("  hint %-3s run %d: %d MiB in %d ms (downtime %d ms), in-use %d MiB%s"
                    % (mode, i + 1, r["ram_transferred"] >> 20, r["total_time_ms"],
                       r["downtime_ms"], r["in_use"] >> 20,
                       "" if mode == "off" or r["hint_accepted"]
                       else ", guest did not accept FREE_PAGE_HINT"))
            else:
                failed = True
                log("  hint %-3s run %d FAILED: %s\n%s" % (mode, i + 1, r["error"],
                                                           r.get("context", "")))
        best[mode] = best_of(results)
    summary = summarise(best)
    for line in summary["lines"]:
        log(line)
    print(json.dumps({"bench": "migration", "qemu": qemu_version(), "memory": args.memory,
                      "ram": parse_memory(args.memory), "held": args.held,
                      "touched": args.touch, "max_bandwidth": args.max_bandwidth,
                      "best": best, "linux_6_1": LINUX_6_1, "targets": summary["targets"]},
                     default=str), flush=True)
    return 1 if failed else 0


def summarise(best: Dict[str, Optional[dict]]) -> dict:
    lines = ["", "%-9s %14s %9s %12s %10s %9s %12s %7s" % (
        "hinting", "RAM sent", "/ in-use", "total time", "downtime", "accepted",
        "hint rounds", "DONE")]
    for mode, b in best.items():
        if b is None:
            lines.append("%-9s (every run failed)" % mode)
            continue
        lines.append("%-9s %10d MiB %8.2fx %9d ms %7d ms %9s %12s %7s" % (
            mode, b["ram_transferred"] >> 20, b["ram_transferred"] / b["in_use"],
            b["total_time_ms"], b["downtime_ms"], "-" if mode == "off" else
            ("yes" if b["hint_accepted"] else "no"), b["hint_rounds"],
            "-" if b["done_released_pages"] is None else "yes"))
    lines.append("Linux 6.1 guest (the issue, KVM): %d MiB in %d ms without hinting, "
                 "%d MiB in %d ms with" % (LINUX_6_1["off"] + LINUX_6_1["on"]))
    targets: Dict[str, object] = {}
    on, off = best.get("on"), best.get("off")
    if on:
        limit = TARGET_RATIO * on["in_use"]
        targets["hint_on_limit_bytes"] = int(limit)
        targets["hint_on_within_1_2x_in_use"] = on["ram_transferred"] <= limit
        lines.append("target: hinting on sends <= %.1f x in-use (%d MiB): %s (%d MiB sent)" % (
            TARGET_RATIO, limit / MiB, "met" if on["ram_transferred"] <= limit else "NOT met",
            on["ram_transferred"] >> 20))
    if on and off:
        targets["hint_saving"] = round(1 - on["ram_transferred"] / off["ram_transferred"], 3)
        lines.append("hinting on vs off: RAM sent %+.0f%%, total time %+.0f%%" % (
            100 * (on["ram_transferred"] / off["ram_transferred"] - 1),
            100 * (on["total_time_ms"] / off["total_time_ms"] - 1)))
    lines.append("targets: " + json.dumps(targets))
    return {"lines": lines, "targets": targets}


if __name__ == "__main__":
    sys.exit("run as: python3 -m blimp bench-migration")
