"""bench-boot: boot time per machine type (QEMU spawn to the guest's ready line), and per boot
path (-kernel PVH / multiboot1, GRUB ISO on SeaBIOS and OVMF, blimp.efi on OVMF) spawn to the
guest's balloon driver being up (its balloon_features event), as the host sees them."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from typing import Dict, List, Optional

from . import exitcodes, guestlog, images
from .options import DEFAULT_KERNEL, REPO, memory_arg
from .qemu import ACCELS, MACHINES, Qemu, QemuExited, SerialTimeout, qemu_version, resolve_accel

#: (boot path, machine) pairs of the boot-path table; OVMF only on q35 (TCG, 3-4 s a boot)
BOOT_PATHS = [(p, m) for p in ("pvh", "mb1") for m in ("pc", "q35", "microvm")] + [
    ("grub-bios", "pc"), ("grub-bios", "q35"), ("grub-ovmf", "q35"), ("efi", "q35")]

#: Boot-time targets (host wall clock, QEMU spawn -> ready line, TCG).
BOOT_TARGETS_S = {"q35": 0.15, "microvm": 0.05}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-boot", help="measure boot time (spawn -> ready line)",
                       description="Boot time per machine type: QEMU spawn to the ready line "
                                   "on serial (host wall clock), blimp.mode=boot.")
    p.add_argument("--kernel", default=DEFAULT_KERNEL)
    p.add_argument("--machines", default="q35,microvm,pc",
                   help="comma-separated machine types (default q35,microvm,pc; none: skip "
                        "the machine table)")
    p.add_argument("--paths", default="all",
                   help="boot paths to time to balloon-ready, comma-separated path:machine "
                        "(e.g. efi:q35,grub-bios:pc), all (default) or none")
    p.add_argument("--path-runs", type=int, default=5, help="counted runs per boot path")
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
    machines = [m.strip() for m in args.machines.split(",") if m.strip() and m.strip() != "none"]
    for m in machines:
        if m not in MACHINES:
            print("blimp: error: unknown machine %r" % m, file=sys.stderr)
            return 2
    if not os.path.isfile(args.kernel):
        print("blimp: error: kernel image not found: %s" % args.kernel, file=sys.stderr)
        return exitcodes.CLI_QEMU_ERROR
    accel = resolve_accel(args.accel)
    try:
        paths = _parse_paths(args.paths)
    except ValueError as e:
        print("blimp: error: %s" % e, file=sys.stderr)
        return 2
    summary: dict = {}
    missed = False
    failures: List[dict] = []
    if machines:
        print("bench-boot: %s, accel %s, -m %s, %d runs (+%d warm-up) per machine"
              % (os.path.relpath(args.kernel), accel, args.memory, args.runs, args.warmup))
        results = _boot_all(args, machines, accel)
        failures = [r for rs in results.values() for r in rs if not r["ok"]]
        summary, missed = _summarise(results)
    path_summary = {}
    if paths:
        path_results = _paths_all(args, paths, accel)
        failures += [r for rs in path_results.values() for r in rs if not r["ok"]]
        path_summary = _summarise_paths(path_results)
    line = {"bench": "boot", "kernel": os.path.relpath(args.kernel, REPO), "accel": accel,
            "memory": args.memory, "runs": args.runs, "qemu": qemu_version(),
            "machines": summary, "paths": path_summary, "path_runs": args.path_runs,
            "failures": len(failures)}
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


# ------------------------------------------------------------------ boot paths

def _parse_paths(spec: str) -> List[tuple]:
    spec = spec.strip()
    if spec in ("", "none"):
        return []
    if spec == "all":
        return list(BOOT_PATHS)
    out = []
    for item in spec.split(","):
        path, _, machine = item.strip().partition(":")
        if path not in images.BOOT_PATHS or machine not in MACHINES:
            raise ValueError("bad boot path %r (path:machine, paths %s)"
                             % (item, ", ".join(images.BOOT_PATHS)))
        out.append((path, machine))
    return out


def path_once(path: str, machine: str, memory: str, accel: str, timeout: float) -> dict:
    """One boot in balloon mode with a balloon device: host seconds from QEMU spawn to the
    ready line and to the balloon_features event (None when the guest found no balloon it can
    drive, as on microvm without a virtio-mmio transport)."""
    r: dict = {"path": path, "machine": machine, "ok": False, "balloon_s": None}
    media = images.boot_media(path, "", os.path.dirname(os.path.abspath(DEFAULT_KERNEL)))
    with Qemu(media.pop("kernel"), machine=machine, memory=memory, accel=accel, qmp=False,
              balloon=True, timeout=timeout, **media) as q:
        try:
            q.wait_line(guestlog.ready_line, timeout=timeout, what="the ready line")
            r["ready_s"] = q.line_time(q.last_index)
            ready_at = q.last_index
            ev = q.wait_line(lambda l: guestlog.event_named(l, "balloon_features")
                             or guestlog.event_named(l, "exit"), timeout=timeout,
                             start=ready_at, what="balloon_features or exit")
            if ev["event"] == "balloon_features":
                r["balloon_s"] = q.line_time(q.last_index)
            else:
                r["note"] = "no balloon: exit %s" % ev.get("name")
            r["ok"] = True
        except (SerialTimeout, QemuExited) as e:
            r["error"] = str(e)
            r["serial_tail"] = q.lines[-10:]
            r["stderr"] = q.stderr.strip()[-2000:]
    return r


def _paths_all(args: argparse.Namespace, paths: List[tuple],
               accel: str) -> Dict[tuple, List[dict]]:
    print("bench-boot paths: balloon mode, -m %s, accel %s, %d runs (+1 warm-up) per path"
          % (args.memory, accel, args.path_runs))
    results: Dict[tuple, List[dict]] = {p: [] for p in paths}
    for p in paths:
        path_once(p[0], p[1], args.memory, accel, args.timeout)   # warm-up (and makes media)
    for i in range(args.path_runs):
        for p in paths:
            r = path_once(p[0], p[1], args.memory, accel, args.timeout)
            results[p].append(r)
            if not r["ok"]:
                _report_failed_boot(i, "%s %s" % p, r)
    return results


def _summarise_paths(results: Dict[tuple, List[dict]]) -> dict:
    """Print the boot-path table; return its figures."""
    summary = {}
    print("%-10s %-8s %-10s %9s %9s %9s %9s  %s" % (
        "path", "machine", "protocol", "ready", "balloon", "min", "max", "runs"))
    for (path, machine), runs in results.items():
        ok = [r for r in runs if r["ok"]]
        rs = _stats([r["ready_s"] for r in ok])
        bs = _stats([r["balloon_s"] for r in ok])
        key = "%s:%s" % (path, machine)
        summary[key] = {"ready_s": _rounded(rs) if rs else None,
                        "balloon_s": _rounded(bs) if bs else None,
                        "runs": len(runs), "failed": len(runs) - len(ok),
                        "note": next((r["note"] for r in ok if "note" in r), None)}
        note = summary[key]["note"]
        print("%-10s %-8s %-10s %9s %9s %9s %9s  %d/%d%s" % (
            path, machine, images.BOOT_PATHS[path][0],
            "%.3fs" % rs["median"] if rs else "-",
            "%.3fs" % bs["median"] if bs else "-",
            "%.3fs" % bs["min"] if bs else "-", "%.3fs" % bs["max"] if bs else "-",
            len(ok), len(runs), "  (%s)" % note if note else ""))
    print("(median seconds from QEMU spawn: ready = the kernel's ready line, balloon = the "
          "balloon driver's balloon_features event; min/max of balloon)")
    return summary
