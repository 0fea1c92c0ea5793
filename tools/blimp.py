#!/usr/bin/python3
"""blimp host tool: boot blimp images in QEMU and measure them.

    tools/blimp.py run [--kernel build/blimp.elf] [--machine q35] [--memory 128M]
                       [--accel auto] [--append "blimp.mode=selftest"]
                       [--balloon [--balloon-opt deflate-on-oom=on ...]] [--timeout 60]
    tools/blimp.py bench-boot [--runs 7] [--machines q35,microvm,pc]

`run` streams the guest's serial console (COM1) to stdout and exits with:
0 guest success (0x10); the guest code 17..23 (0x11..0x17) for the other guest
codes; 3 triple fault/reset; 124 timeout; 125 QEMU error; 128+N QEMU killed by
signal N.  See tools/exitcodes.py.

New subcommands: write ``cmd_<name>(args) -> int`` and an ``add_<name>(sub)``
that registers its parser, and list it in SUBCOMMANDS.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TOOLS)
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

import exitcodes  # noqa: E402
from qemu import (ACCELS, MACHINES, Qemu, QemuError, QemuExited, SerialTimeout,  # noqa: E402
                  parse_memory, resolve_accel)

DEFAULT_KERNEL = os.path.join(REPO, "build", "blimp.elf")
DEFAULT_MB1_KERNEL = os.path.join(REPO, "build", "blimp-mb1.elf")

#: Boot-time targets (host wall clock, QEMU spawn -> ready line, TCG).
BOOT_TARGETS_S = {"q35": 0.15, "microvm": 0.05}


def _install_signal_handlers():
    """Turn SIGTERM/SIGHUP into SystemExit so `with Qemu` blocks and atexit kill QEMU."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)
    for s in (signal.SIGTERM, signal.SIGHUP):
        try:
            signal.signal(s, handler)
        except (ValueError, OSError):
            pass


def _memory(value: str) -> str:
    try:
        parse_memory(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))
    return value


def _keyval(value: str) -> str:
    if "=" not in value or value.startswith("="):
        raise argparse.ArgumentTypeError("expected key=value, got %r" % value)
    return value


def add_qemu_options(p: argparse.ArgumentParser, machine_default: str = "q35",
                     single_machine: bool = True):
    """Options shared by every subcommand that boots QEMU."""
    p.add_argument("--kernel", default=DEFAULT_KERNEL,
                   help="image to boot (default: build/blimp.elf; build/blimp-mb1.elf is "
                        "the multiboot1 image)")
    if single_machine:
        p.add_argument("--machine", choices=MACHINES, default=machine_default)
    p.add_argument("--memory", "-m", type=_memory, default="128M",
                   help="guest RAM, e.g. 128M, 4G (default 128M)")
    p.add_argument("--accel", choices=ACCELS, default="auto",
                   help="auto = TCG unless kvm_intel/kvm_amd is loaded (PVM's /dev/kvm "
                        "does not count)")
    p.add_argument("--append", default=None, help="kernel command line")
    p.add_argument("--balloon", action="store_true",
                   help="add a virtio-balloon device (-pci on pc/q35, -device on microvm)")
    p.add_argument("--balloon-opt", action="append", type=_keyval, default=[],
                   metavar="KEY=VAL",
                   help="extra balloon device property, e.g. deflate-on-oom=on, "
                        "disable-modern=on, disable-legacy=on (repeatable)")
    p.add_argument("--machine-opt", action="append", type=_keyval, default=[],
                   metavar="KEY=VAL", help="extra -machine property, e.g. acpi=off")
    p.add_argument("--smp", type=int, default=None)
    p.add_argument("--agent", action="store_true",
                   help="add COM2 as a unix-socket server (agent channel); path printed")
    p.add_argument("--qemu-arg", action="append", default=[], metavar="ARG",
                   help="extra raw QEMU argument (repeatable; use --qemu-arg=-foo)")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="kill QEMU after this many seconds (default 60)")


def qemu_from_args(args, machine=None, **overrides) -> Qemu:
    kw = dict(machine=machine or args.machine, memory=args.memory, accel=args.accel,
              append=args.append, balloon=args.balloon, balloon_opts=args.balloon_opt,
              machine_opts=args.machine_opt, smp=args.smp, agent=args.agent,
              extra_args=args.qemu_arg, timeout=args.timeout)
    kw.update(overrides)
    return Qemu(args.kernel, **kw)


# ------------------------------------------------------------------ run

def add_run(sub):
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


def cmd_run(args) -> int:
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


# ------------------------------------------------------------- bench-boot

READY_LINE = r'^(\{"event":\s*"ready"|blimp: ready in \d+ us)'


def boot_once(kernel: str, machine: str, memory: str, accel: str, append: str,
              timeout: float) -> dict:
    """One boot: host seconds from QEMU spawn to the first ready line, the guest's
    boot_us, and the outcome."""
    r = {"machine": machine, "ok": False}
    with Qemu(kernel, machine=machine, memory=memory, accel=accel, append=append,
              qmp=False, timeout=timeout) as q:
        try:
            q.wait_for(READY_LINE, timeout=timeout)
            r["host_s"] = q.line_time(q.last_index)
            try:
                ev = q.wait_for_event("ready", timeout=5)
                r["guest_us"] = ev.get("boot_us")
            except (SerialTimeout, QemuExited):
                r["guest_us"] = None
        except (SerialTimeout, QemuExited) as e:
            r["error"] = str(e)
        q.wait(timeout=10)
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
    return r


def _stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _rounded(st, digits=4):
    return {k: (round(v, digits) if isinstance(v, float) else v) for k, v in st.items()}


def add_bench_boot(sub):
    p = sub.add_parser("bench-boot", help="measure boot time (spawn -> ready line)",
                       description="Boot time per machine type: QEMU spawn to the ready line "
                                   "on serial (host wall clock), blimp.mode=boot.")
    p.add_argument("--kernel", default=DEFAULT_KERNEL)
    p.add_argument("--machines", default="q35,microvm,pc",
                   help="comma-separated machine types (default q35,microvm,pc)")
    p.add_argument("--runs", "-n", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1, help="uncounted runs per machine first")
    p.add_argument("--memory", "-m", type=_memory, default="128M")
    p.add_argument("--accel", choices=ACCELS, default="tcg",
                   help="default tcg (the targets are TCG figures)")
    p.add_argument("--append", default="", help="extra kernel options after blimp.mode=boot")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--check-targets", action="store_true",
                   help="exit 2 if a target is missed")
    p.set_defaults(func=cmd_bench_boot)


def _qemu_version() -> str:
    try:
        out = subprocess.run([os.environ.get("BLIMP_QEMU", "qemu-system-x86_64"), "--version"],
                             capture_output=True, text=True, timeout=10).stdout
        return out.splitlines()[0] if out else "?"
    except Exception:
        return "?"


def cmd_bench_boot(args) -> int:
    machines = [m.strip() for m in args.machines.split(",") if m.strip()]
    for m in machines:
        if m not in MACHINES:
            print("blimp: error: unknown machine %r" % m, file=sys.stderr)
            return 2
    if not os.path.isfile(args.kernel):
        print("blimp: error: kernel image not found: %s" % args.kernel, file=sys.stderr)
        return exitcodes.CLI_QEMU_ERROR
    accel = resolve_accel(args.accel)
    append = ("blimp.mode=boot " + args.append).strip()
    results = {m: [] for m in machines}
    failures = []
    print("bench-boot: %s, accel %s, -m %s, %d runs (+%d warm-up) per machine"
          % (os.path.relpath(args.kernel), accel, args.memory, args.runs, args.warmup))
    for m in machines:
        for _ in range(args.warmup):
            boot_once(args.kernel, m, args.memory, accel, append, args.timeout)
    # round-robin so that a slow phase of the host does not hit one machine only
    for i in range(args.runs):
        for m in machines:
            r = boot_once(args.kernel, m, args.memory, accel, append, args.timeout)
            results[m].append(r)
            if not r["ok"]:
                failures.append(r)
                print("  run %d %s FAILED: %s" % (i + 1, m, r.get("error")), file=sys.stderr)
                for line in r.get("serial_tail", []):
                    print("    | " + line, file=sys.stderr)
                if r.get("stderr"):
                    print("    qemu: " + r["stderr"], file=sys.stderr)

    summary = {}
    missed = False
    print("%-8s %8s %8s %8s %12s %8s  %s" % ("machine", "median", "min", "max",
                                           "guest_us", "target", "met"))
    for m in machines:
        ok = [r for r in results[m] if r["ok"]]
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
            "runs": len(results[m]), "failed": len(results[m]) - len(ok),
        }
        if hs:
            print("%-8s %7.3fs %7.3fs %7.3fs %12s %8s  %s" % (
                m, hs["median"], hs["min"], hs["max"],
                "%d" % gs["median"] if gs else "-",
                "%.3fs" % target if target else "-",
                {True: "yes", False: "NO", None: "-"}[met]))
        else:
            print("%-8s  no successful run" % m)
    line = {"bench": "boot", "kernel": os.path.relpath(args.kernel, REPO), "accel": accel,
            "memory": args.memory, "runs": args.runs, "qemu": _qemu_version(),
            "machines": summary, "failures": len(failures)}
    print(json.dumps(line, sort_keys=True))
    if failures:
        return 1
    if args.check_targets and missed:
        return 2
    return 0


# ------------------------------------------------------------------ main

SUBCOMMANDS = [add_run, add_bench_boot]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blimp.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add in SUBCOMMANDS:
        add(sub)
    return p


def main(argv=None) -> int:
    _install_signal_handlers()
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 141


if __name__ == "__main__":
    sys.exit(main())
