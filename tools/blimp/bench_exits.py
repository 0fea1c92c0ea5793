"""bench-exits: what an idle guest costs the host, with interrupts and with polling.

For each machine (default pc and q35) and each blimp.irq mode (auto = interrupts, poll),
boot a guest with a virtio balloon, let it settle, then read the agent's `state` twice
over an idle window (default 8 s): the device accesses a hypervisor has to trap ("exits",
counted by the guest's transport: config reads, ISR reads, notifies, status/queue
registers) and the interrupts the guest took, per second, and the CPU time QEMU used
meanwhile (percent of one core: what the idle guest really costs). Polling re-reads
the ISR and the config every millisecond; with interrupts an idle guest sleeps in hlt and
touches the device only for its bounded look (one ISR read every 100 ms: a lost interrupt
costs at most that long). The floor: an idle guest with interrupts costs at most 5 % of a
core (`IDLE_CPU_FLOOR`), checked in the same run as the polling control.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from .options import DEFAULT_KERNEL
from .qemu import qemu_version, resolve_accel
from .session import SESSION_ERRORS, BalloonSession, describe_failure

COLUMNS = [("config_reads", "config rd/s"), ("isr_reads", "ISR rd/s"),
           ("notifies", "notify/s"), ("status", "status/s"), ("irq_device", "dev irq/s"),
           ("irq_timer", "timer irq/s"), ("irq_looks", "looks/s"), ("cpu_pct", "QEMU CPU %")]
#: the most an idle guest waiting on interrupts may cost, in percent of one core
IDLE_CPU_FLOOR = 5.0


def qemu_cpu_seconds(pid: int) -> float:
    """User + system CPU time QEMU has used so far (/proc/<pid>/stat)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-exits", help="idle device accesses per second, irq vs poll",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--kernel", default=DEFAULT_KERNEL)
    p.add_argument("--machines", default="pc,q35")
    p.add_argument("--modes", default="auto,poll", help="blimp.irq values (default auto,poll)")
    p.add_argument("--memory", "-m", default="512M")
    p.add_argument("--window", type=float, default=8.0, help="idle window, seconds (default 8)")
    p.add_argument("--settle", type=float, default=1.0, help="seconds after boot before it")
    p.add_argument("--accel", default="tcg")
    p.add_argument("--json", help="write the results here too")
    p.set_defaults(func=run)


def measure(session: BalloonSession, window: float) -> dict:
    """Per-second rates over about `window` seconds (host clock)."""
    t0 = time.monotonic()
    a = session.state()
    t1 = time.monotonic()
    cpu0 = qemu_cpu_seconds(session.qemu.pid)
    time.sleep(window)
    cpu1 = qemu_cpu_seconds(session.qemu.pid)
    t2 = time.monotonic()
    b = session.state()
    t3 = time.monotonic()
    # Host time, midpoint to midpoint: a guest TSC that follows the host's under TCG can
    # stall when the host's steps back (QEMU keeps it monotonic), inflating guest-time rates.
    dt = (t2 + t3) / 2 - (t0 + t1) / 2
    rates = {k: (b["exits"][k] - a["exits"][k]) / dt for k in b["exits"]}
    for k in ("device", "spurious", "timer", "sleeps", "agent", "looks", "missed"):
        rates["irq_" + k] = (b["irq"].get(k, 0) - a["irq"].get(k, 0)) / dt
    rates["cpu_pct"] = 100.0 * (cpu1 - cpu0) / window
    rates["guest_s"] = (b["irq"]["uptime_ns"] - a["irq"]["uptime_ns"]) / 1e9
    rates["host_s"] = dt
    rates["mode"] = b["irq"]["mode"]
    return rates


def run(args: argparse.Namespace) -> int:
    accel = resolve_accel(args.accel)
    print("bench-exits: %s, accel %s, %s guest, %.0f s idle window"
          % (qemu_version(), accel, args.memory, args.window), flush=True)
    results = []
    failed = 0
    for machine in args.machines.split(","):
        for mode in args.modes.split(","):
            session = BalloonSession(args.kernel, machine=machine, memory=args.memory,
                                     accel=accel, append="blimp.irq=%s" % mode,
                                     timeout=args.window * 3 + 60)
            try:
                with session:
                    time.sleep(args.settle)
                    r = measure(session, args.window)
                    session.quit()
            except SESSION_ERRORS as e:
                reason, context = describe_failure(session, e)
                print("  %s blimp.irq=%s: FAILED: %s\n%s" % (machine, mode, reason, context),
                      file=sys.stderr)
                failed += 1
                continue
            r.update(machine=machine, option=mode)
            results.append(r)
    head = "%-5s %-10s %-6s" % ("mach", "blimp.irq", "waits") + "".join(
        " %12s" % title for _, title in COLUMNS)
    print(head)
    for r in results:
        print("%-5s %-10s %-6s" % (r["machine"], r["option"], r["mode"]) + "".join(
            " %12.1f" % r[k] for k, _ in COLUMNS))
    for r in results:
        if r["mode"] != "poll":
            ok = r["cpu_pct"] <= IDLE_CPU_FLOOR
            failed += not ok
            print("%s %s: idle with interrupts costs %.1f %% of a core (floor %.0f %%): %s"
                  % (r["machine"], r["option"], r["cpu_pct"], IDLE_CPU_FLOOR,
                     "ok" if ok else "OVER"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if failed else 0
