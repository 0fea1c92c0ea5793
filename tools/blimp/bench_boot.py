"""bench-boot: boot time per machine type, QEMU spawn to the guest's ready line."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List, Optional

from . import exitcodes, guestlog
from .options import DEFAULT_KERNEL, REPO, memory_arg
from .qemu import ACCELS, MACHINES, Qemu, QemuExited, SerialTimeout, qemu_version, resolve_accel

#: Boot-time targets (host wall clock, QEMU spawn -> ready line, TCG).
BOOT_TARGETS_S = {"q35": 0.15, "microvm": 0.05}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-boot", help="measure boot time (spawn -> ready line)",
                       description="Boot time per machine type: QEMU spawn to the ready line "
                                   "on serial (host wall clock), blimp.mode=boot.")
    p.add_argument("--kernel", default=DEFAULT_KERNEL)
    p.add_argument("--machines", default="q35,microvm,pc",
                   help="comma-separated machine types (default q35,microvm,pc)")
    p.add_argument("--runs", "-n", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1, help="uncounted runs per machine first")
    p.add_argument("--memory", "-m", type=memory_arg, default="128M")
    p.add_argument("--accel", choices=ACCELS, default="tcg",
                   help="default tcg (the targets are TCG figures)")
    p.add_argument("--append", default="", help="extra kernel options after blimp.mode=boot")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--check-targets", action="store_true",
                   help="exit 2 if a target is missed")
    p.set_defaults(func=run)


# ------------------------------------------------------------------ one boot

def boot_once(kernel: str, machine: str, memory: str, accel: str, append: str,
              timeout: float) -> dict:
    """One boot: host seconds from QEMU spawn to the first ready line, the guest's
    boot_us, and the outcome."""
    r: dict = {"machine": machine, "ok": False}
    with Qemu(kernel, machine=machine, memory=memory, accel=accel, append=append,
              qmp=False, timeout=timeout) as q:
        _time_ready_line(q, r, timeout)
        q.wait(timeout=10)
        _record_outcome(q, r)
    return r


def _time_ready_line(q: Qemu, r: dict, timeout: float) -> None:
    """Into r: host_s (spawn -> the first ready line, event or human) and guest_us."""
    try:
        q.wait_line(guestlog.ready_line, timeout=timeout, what="the ready line")
        r["host_s"] = q.line_time(q.last_index)
        try:
            r["guest_us"] = q.wait_event("ready", timeout=5).get("boot_us")
        except (SerialTimeout, QemuExited):
            r["guest_us"] = None
    except (SerialTimeout, QemuExited) as e:
        r["error"] = str(e)


def _record_outcome(q: Qemu, r: dict) -> None:
    out = q.outcome
    r["outcome"] = out.describe()
    r["status"] = out.status
    if "host_s" in r and out.ok:
        r["ok"] = True
    elif "error" not in r:
        r["error"] = out.describe()
    if not r["ok"]:
        r["serial_tail"] = q.lines[-10:]
        r["stderr"] = q.stderr.strip()[-2000:]


# ------------------------------------------------------------------ the benchmark

def _stats(xs: List[Optional[float]]) -> Optional[dict]:
    ys = [x for x in xs if x is not None]
    if not ys:
        return None
    return {"median": statistics.median(ys), "min": min(ys), "max": max(ys), "n": len(ys)}


def _rounded(st: dict, digits: int = 4) -> dict:
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in st.items()}


def run(args: argparse.Namespace) -> int:
    machines = [m.strip() for m in args.machines.split(",") if m.strip()]
    for m in machines:
        if m not in MACHINES:
            print("blimp: error: unknown machine %r" % m, file=sys.stderr)
            return 2
    if not os.path.isfile(args.kernel):
        print("blimp: error: kernel image not found: %s" % args.kernel, file=sys.stderr)
        return exitcodes.CLI_QEMU_ERROR
    accel = resolve_accel(args.accel)
    print("bench-boot: %s, accel %s, -m %s, %d runs (+%d warm-up) per machine"
          % (os.path.relpath(args.kernel), accel, args.memory, args.runs, args.warmup))
    results = _boot_all(args, machines, accel)
    failures = [r for rs in results.values() for r in rs if not r["ok"]]
    summary, missed = _summarise(results)
    line = {"bench": "boot", "kernel": os.path.relpath(args.kernel, REPO), "accel": accel,
            "memory": args.memory, "runs": args.runs, "qemu": qemu_version(),
            "machines": summary, "failures": len(failures)}
    print(json.dumps(line, sort_keys=True))
    if failures:
        return 1
    if args.check_targets and missed:
        return 2
    return 0


def _boot_all(args: argparse.Namespace, machines: List[str],
              accel: str) -> Dict[str, List[dict]]:
    """Warm-up boots, then the counted ones; failures are reported as they happen."""
    append = ("blimp.mode=boot " + args.append).strip()
    results: Dict[str, List[dict]] = {m: [] for m in machines}
    for m in machines:
        for _ in range(args.warmup):
            boot_once(args.kernel, m, args.memory, accel, append, args.timeout)
    # round-robin so that a slow phase of the host does not hit one machine only
    for i in range(args.runs):
        for m in machines:
            r = boot_once(args.kernel, m, args.memory, accel, append, args.timeout)
            results[m].append(r)
            if not r["ok"]:
                _report_failed_boot(i, m, r)
    return results


def _report_failed_boot(i: int, machine: str, r: dict) -> None:
    print("  run %d %s FAILED: %s" % (i + 1, machine, r.get("error")), file=sys.stderr)
    for line in r.get("serial_tail", []):
        print("    | " + line, file=sys.stderr)
    if r.get("stderr"):
        print("    qemu: " + r["stderr"], file=sys.stderr)


def _summarise(results: Dict[str, List[dict]]) -> tuple[dict, bool]:
    """Print the table; the per-machine summary and whether a target was missed."""
    summary = {}
    missed = False
    print("%-8s %8s %8s %8s %12s %8s  %s" % ("machine", "median", "min", "max",
                                           "guest_us", "target", "met"))
    for m, runs in results.items():
        ok = [r for r in runs if r["ok"]]
        hs = _stats([r["host_s"] for r in ok])
        gs = _stats([r.get("guest_us") for r in ok])
        target = BOOT_TARGETS_S.get(m)
        met = None if target is None or hs is None else hs["median"] <= target
        if met is False or (target is not None and hs is None):
            missed = True
        summary[m] = {
            "host_s": dict(_rounded(hs), all=[round(r["host_s"], 4) for r in ok]) if hs else None,
            "guest_boot_us_median": gs["median"] if gs else None,
            "target_s": target, "met": met,
            "runs": len(runs), "failed": len(runs) - len(ok),
        }
        _print_machine_row(m, hs, gs, target, met)
    return summary, missed


def _print_machine_row(m: str, hs: Optional[dict], gs: Optional[dict], target: Optional[float],
                       met: Optional[bool]) -> None:
    if not hs:
        print("%-8s  no successful run" % m)
        return
    print("%-8s %7.3fs %7.3fs %7.3fs %12s %8s  %s" % (
        m, hs["median"], hs["min"], hs["max"],
        "%d" % gs["median"] if gs else "-",
        "%.3fs" % target if target else "-",
        {True: "yes", False: "NO", None: "-"}[met]))
