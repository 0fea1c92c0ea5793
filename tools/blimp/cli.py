#!/usr/bin/python3
"""blimp host tool: boot blimp images in QEMU and measure them.

    tools/blimp.py run [--kernel build/blimp.elf] [--machine q35] [--memory 128M]
                       [--accel auto] [--append "blimp.mode=selftest"]
                       [--balloon [--balloon-opt deflate-on-oom=on ...]] [--timeout 60]
    tools/blimp.py bench-boot [--runs 7] [--machines q35,microvm,pc]
    tools/blimp.py demo [--memory 1G] [--machine q35]
    tools/blimp.py balloon [--memory 1G] [--touch 768M] 512M 0 ...
    tools/blimp.py bench-balloon [--configs 256/1,256/4,1024/16,4096/16] [--runs 3]

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

from typing import Optional

from . import agent as agentmod, balloon as balloonmod, exitcodes, guestlog, qmp as qmpmod
from .qemu import (ACCELS, MACHINES, Qemu, QemuError, QemuExited, SerialTimeout,
                   parse_memory, resolve_accel)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

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


def add_balloon_guest_options(p: argparse.ArgumentParser, memory: str, accel: str):
    """The guest options of the subcommands that always boot a pc/q35 guest with a balloon
    and the agent (demo, bench-balloon)."""
    p.add_argument("--kernel", default=DEFAULT_KERNEL)
    p.add_argument("--machine", choices=("pc", "q35"), default="q35")
    p.add_argument("--memory", "-m", type=_memory, default=memory,
                   help="guest RAM (default %s)" % memory)
    p.add_argument("--accel", choices=ACCELS, default=accel)
    p.add_argument("--append", default="", help="extra kernel command line")
    p.add_argument("--balloon-opt", action="append", type=_keyval, default=[],
                   metavar="KEY=VAL", help="extra balloon device property (repeatable)")


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


# ------------------------------------------------------------- balloon commands

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4096


class Failure(Exception):
    """A step of demo/balloon/bench-balloon went wrong; the message says which."""


def _size(value: str) -> int:
    """argparse type: a size in bytes from '512M', '1G', '4096K', '0' (bare = MiB, like -m)."""
    if value.strip() == "0":
        return 0
    try:
        return parse_memory(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _mib(n: int) -> str:
    v = n / MiB
    return ("%d MiB" % v) if v == int(v) else ("%.1f MiB" % v)


def _balloon_errors():
    """The exceptions a balloon session can raise that mean 'this step failed'."""
    return (QemuError, agentmod.AgentError, balloonmod.BalloonTimeout, qmpmod.QMPError,
            qmpmod.QMPTimeout, qmpmod.QMPConnectionError, Failure, FileNotFoundError,
            ProcessLookupError, TimeoutError)


class GuestConsole:
    """Prints the guest's serial lines that arrived since the last call, indented."""

    def __init__(self, q: Qemu, show_events: bool = False, prefix: str = "    guest| ",
                 enabled: bool = True):
        self.q, self.show_events, self.prefix, self.enabled = q, show_events, prefix, enabled
        self.seen = 0

    def flush(self, settle: float = 0.0):
        if settle:
            import time
            time.sleep(settle)
        lines = self.q.lines
        new, self.seen = lines[self.seen:], len(lines)
        if not self.enabled:
            return
        for line in new:
            if not line.strip():
                continue
            if line.startswith("{") and not self.show_events:
                continue
            print(self.prefix + line, flush=True)


def boot_balloon_guest(q: Qemu, timeout: float = 30.0):
    """Start `q` (balloon=True, agent optional), wait for the driver's balloon_features
    event and the agent; returns (features event, Agent or None, Balloon)."""
    if q.proc is None:
        q.start()
    if q.agent:
        q.agent_client(timeout=timeout, ready=False)   # connect before the guest says ready
    try:
        feats = q.wait_for_event("balloon_features", timeout=timeout)
    except (SerialTimeout, QemuExited) as e:
        raise Failure("the guest did not bring up the balloon driver: %s" % e) from None
    ag = q.agent_client(timeout=timeout) if q.agent else None
    return feats, ag, balloonmod.Balloon.of(q)


def _reached_event(q: Qemu, start: int, pages: int, timeout: float = 5.0):
    """The guest's balloon_reached event for `pages` at serial index >= start, or None."""
    try:
        q.wait_for(r'^\{"event":"balloon_reached","actual_pages":%d,' % pages,
                   timeout=timeout, start=start)
    except (SerialTimeout, QemuExited):
        return None
    return guestlog.parse_event(q.lines[q.last_index])


def _failure_context(q: Qemu, ag=None, n: int = 15) -> str:
    out = []
    if q.proc is not None and not q.running():
        if q.killed and not q.timed_out:
            out.append("(QEMU stopped by blimp.py after the failure)")
        else:
            try:
                q.wait(timeout=2)
                out.append("QEMU ended: " + q.outcome.describe())
            except QemuError:
                pass
    err = "\n".join(l for l in q.stderr.strip().splitlines()
                    if "terminating on signal" not in l)
    if err:
        out.append("QEMU stderr: " + err[-1500:])
    tail = q.lines[-n:]
    if tail:
        out.append("last guest console lines:\n" + "\n".join("    | " + l for l in tail))
    if ag is not None and ag.transcript:
        out.append("agent transcript (last 8):\n" + "\n".join(
            "    " + l for l in ag.transcript[-8:]))
    return "\n".join(out)


def _exhausted_check(q: Qemu, start: int):
    """An `abort` callback for Balloon waits: the guest logged balloon_exhausted
    (it has no more memory to give) at serial index >= start."""
    def check():
        for line in q.lines[start:]:
            if line.startswith('{"event":"balloon_exhausted"'):
                return "the guest has no more memory to give (%s)" % line
        return None
    return check


def _touch_guest(ag, size: int, seed: int = 99, timeout: float = 300.0) -> dict:
    """Make the guest write `size` bytes of its free memory, then free them again."""
    r = ag.cmd("alloc %d %d" % (size, seed), timeout=timeout)
    if r.get("ok") is not True:
        raise Failure("guest could not allocate %s to touch it: %s" % (_mib(size), r))
    ag.check("free %d" % r["id"])
    return r


# -------------------------------------------------------------------- demo

def add_demo(sub):
    p = sub.add_parser("demo", help="show the balloon working (boot, inflate, deflate, verify)",
                       description="Boot blimp with a virtio balloon and the agent, allocate "
                                   "memory in the guest, inflate the balloon step by step and "
                                   "deflate it again while showing target, actual, QEMU's RSS "
                                   "and timings, show the guest statistics QEMU receives, "
                                   "verify the guest's memory and quit.  Exit 0 on success.")
    add_balloon_guest_options(p, memory="1G", accel="auto")
    p.add_argument("--hold", type=_size, default=256 * MiB,
                   help="memory the guest allocates and keeps (default 256M)")
    p.add_argument("--max", dest="max_balloon", type=_size, default=512 * MiB,
                   help="largest balloon (default 512M)")
    p.add_argument("--step", type=_size, default=128 * MiB, help="balloon step (default 128M)")
    p.add_argument("--touch", type=_size, default=None,
                   help="guest memory to write and free before inflating, so the RSS drop is "
                        "visible (default: all the guest has free but 16M; 0 = none)")
    p.add_argument("--events", action="store_true", help="show the guest's JSON event lines too")
    p.add_argument("--quiet-console", action="store_true", help="do not show the guest console")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="kill QEMU after this many seconds (default 300)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    import time
    ram = parse_memory(args.memory)
    accel = resolve_accel(args.accel)
    if args.step <= 0 or args.max_balloon <= 0 or args.max_balloon % PAGE or args.step % PAGE:
        print("blimp demo: error: --max and --step must be positive multiples of 4 KiB",
              file=sys.stderr)
        return 2
    if args.hold + args.max_balloon + 32 * MiB > ram:
        print("blimp demo: error: --hold %s + --max %s does not fit in %s of guest RAM"
              % (_mib(args.hold), _mib(args.max_balloon), _mib(ram)), file=sys.stderr)
        return 2
    if not os.path.isfile(args.kernel):
        print("blimp demo: error: kernel image not found: %s (build it with `ninja`)"
              % args.kernel, file=sys.stderr)
        return exitcodes.CLI_QEMU_ERROR
    sizes = list(range(args.step, args.max_balloon + 1, args.step))
    if sizes[-1] != args.max_balloon:
        sizes.append(args.max_balloon)
    down = sorted(set([s for s in sizes if s < args.max_balloon] + [0]), reverse=True)

    def say(msg=""):
        print(msg, flush=True)

    say("blimp demo: the virtio memory balloon, driven from the host")
    say("  QEMU %s, machine %s, %s of guest RAM, accelerator %s%s" % (
        _qemu_version().replace("QEMU emulator version ", ""), args.machine, _mib(ram),
        accel.upper(), " (no hardware virtualisation: every guest instruction is emulated)"
        if accel == "tcg" else ""))
    q = Qemu(args.kernel, machine=args.machine, memory=args.memory, accel=accel,
             append=args.append, balloon=True, balloon_opts=args.balloon_opt, agent=True,
             timeout=args.timeout)
    ag = None
    step = "boot"
    try:
        with q:
            con = GuestConsole(q, show_events=args.events, enabled=not args.quiet_console)
            say("\n== 1. boot blimp with a virtio-balloon-pci device and the agent on COM2")
            t0 = time.monotonic()
            feats, ag, bal = boot_balloon_guest(q)
            con.flush(settle=0.05)
            st = ag.state()
            say("  booted in %.2f s; balloon driver on %s (features offered %#x, accepted %#x)"
                % (time.monotonic() - t0, feats["transport"], feats["offered"],
                   feats["accepted"]))
            say("  the guest manages %s, %s free; QEMU resident memory (RSS) %s" % (
                _mib(st["mm"]["total_pages"] * PAGE), _mib(st["mm"]["free_pages"] * PAGE),
                _mib(bal.rss())))
            bal.enable_stats(1)

            touch = args.touch
            if touch is None:
                touch = max(0, st["mm"]["free_pages"] * PAGE - 16 * MiB)
            if touch:
                step = "touch"
                say("\n== 2. the guest writes %s of its free memory and frees it again" % _mib(touch))
                say("     (so that QEMU really holds that memory and ballooning it visibly "
                    "gives it back)")
                r = _touch_guest(ag, touch)
                con.flush()
                say("  wrote %d pages in %.2f s (guest: %d ms); QEMU RSS now %s" % (
                    r["pages"], r["ms"] / 1000.0, r["ms"], _mib(bal.rss())))

            step = "alloc"
            say("\n== 3. the guest allocates %s and fills every 8-byte word with a pattern "
                "(address, seed 2024)" % _mib(args.hold))
            r = ag.cmd("alloc %d 2024" % args.hold, timeout=300)
            if r.get("ok") is not True:
                raise Failure("alloc %s failed in the guest: %s" % (_mib(args.hold), r))
            hold_id, hold_pages = r["id"], r["pages"]
            con.flush()
            say("  allocation #%d: %d pages in %d blocks, %d ms; QEMU RSS %s" % (
                hold_id, r["pages"], r["blocks"], r["ms"], _mib(bal.rss())))

            header = "  %-8s %9s %9s %11s %10s %9s %10s %10s  %s" % (
                "", "balloon", "actual", "guest size", "QMP->seen", "guest ms", "QEMU RSS",
                "guest free", "held memory")
            rows = []

            def move(kind, size):
                start = len(q.lines)
                secs = bal.resize(size, timeout=60)
                ev = _reached_event(q, start, size // PAGE)
                s = ag.state()
                v = ag.verify(str(hold_id), timeout=120)
                if v.get("ok") is not True or v.get("bad_pages"):
                    raise Failure("held memory corrupted after the balloon reached %s: %s"
                                  % (_mib(size), v))
                actual = bal.size()
                if s["balloon"]["actual_pages"] * PAGE != actual:
                    raise Failure("guest says %d pages ballooned, QEMU says %s" % (
                        s["balloon"]["actual_pages"], _mib(actual)))
                rows.append((kind, size, secs))
                con.flush()
                say("  %-8s %9s %9s %11s %9.3fs %9s %10s %10s  %s" % (
                    kind, _mib(size), _mib(actual), _mib(ram - actual), secs,
                    ev["ms"] if ev else "-", _mib(bal.rss()),
                    _mib(s["mm"]["free_pages"] * PAGE), "verified"))

            step = "inflate"
            say("\n== 4. inflate the balloon to %s in steps of %s (QMP balloon; then poll "
                "query-balloon)" % (_mib(args.max_balloon), _mib(args.step)))
            say(header)
            rss_top = bal.rss()
            for size in sizes:
                move("inflate", size)
            rss_inflated = bal.rss()
            step = "deflate"
            say("\n== 5. deflate it back to 0")
            say(header)
            for size in down:
                move("deflate", size)
            say("  QEMU RSS: %s before inflating, %s with the balloon at %s: %s returned to the "
                "host" % (_mib(rss_top), _mib(rss_inflated), _mib(args.max_balloon),
                          _mib(max(0, rss_top - rss_inflated))))
            say("  (deflating does not raise the RSS: the host backs those pages again only "
                "when the guest writes them)")

            step = "stats"
            say("\n== 6. guest statistics as QEMU sees them (qom-get guest-stats, polling "
                "every 1 s)")
            now_free = ag.state()["mm"]["free_pages"] * PAGE
            # the stats are a snapshot from the last poll: wait for one taken after the deflate
            stats = bal.wait_stats(timeout=10, pred=lambda x: x["stats"].get(
                "stat-free-memory") == now_free)
            stv = stats["stats"]
            for key in ("stat-total-memory", "stat-free-memory", "stat-available-memory"):
                say("  %-22s %s" % (key, _mib(stv[key])))
            others = {k: v for k, v in stv.items() if k not in (
                "stat-total-memory", "stat-free-memory", "stat-available-memory")}
            say("  %-22s %s" % ("others (blimp has none)",
                                ", ".join("%s=%d" % (k[5:], v) for k, v in sorted(others.items()))))
            say("  %-22s %s (host time)" % ("last-update", time.strftime(
                "%H:%M:%S", time.localtime(stats["last-update"]))))
            if not 0 < stv["stat-free-memory"] <= stv["stat-total-memory"] <= ram:
                raise Failure("implausible guest stats: %r" % stv)
            say("  (free memory matches the guest's own count, %s)" % _mib(now_free))

            step = "verify"
            say("\n== 7. verify the %s the guest held throughout" % _mib(args.hold))
            v = ag.verify("all", timeout=120)
            if v.get("ok") is not True or v.get("bad_pages") or v.get("pages") != hold_pages:
                raise Failure("verify failed: %s" % v)
            say("  %d pages checked in %d ms: every word intact" % (v["pages"], v["ms"]))
            ag.check("free all")
            st2 = ag.state()
            say("  freed; the guest has %s free again (%s at boot)" % (
                _mib(st2["mm"]["free_pages"] * PAGE), _mib(st["mm"]["free_pages"] * PAGE)))
            if st2["mm"]["free_pages"] != st["mm"]["free_pages"]:
                raise Failure("the guest lost %d pages over the demo" % (
                    st["mm"]["free_pages"] - st2["mm"]["free_pages"]))

            step = "quit"
            say("\n== 8. quit")
            ag.quit()
            q.wait(timeout=15)
            con.flush()
            outcome = q.outcome
            say("  %s" % outcome.describe())
            if not outcome.ok:
                raise Failure("unexpected guest exit: %s" % outcome.describe())
            bad = [e for e in q.events() if e["event"] in ("violation", "balloon_stalled")]
            if bad:
                raise Failure("guest reported %s" % bad)
    except _balloon_errors() as e:
        print("\nblimp demo: FAILED during %s: %s" % (step, e), file=sys.stderr)
        ctx = _failure_context(q, ag)
        if ctx:
            print(ctx, file=sys.stderr)
        return 1
    say("\nblimp demo: OK")
    return 0


# ----------------------------------------------------------------- balloon

def add_balloon(sub):
    p = sub.add_parser("balloon", help="boot, set balloon target(s), print timings",
                       description="Boot blimp in balloon mode and move the balloon through the "
                                   "given sizes, one after the other, timing each from the QMP "
                                   "`balloon` command until query-balloon shows the target "
                                   "(polled).  Sizes are balloon sizes (RAM - QMP value), e.g. "
                                   "`balloon -m 4G 3G 0`; with --guest-size they are QMP "
                                   "values.  Exit 0 if every target was reached.")
    add_qemu_options(p)
    p.set_defaults(memory="1G", balloon=True, agent=True, timeout=600.0)
    p.add_argument("sizes", nargs="+", type=_size, metavar="SIZE",
                   help="balloon sizes to reach in order (e.g. 512M 0)")
    p.add_argument("--guest-size", action="store_true",
                   help="SIZEs are guest sizes (the QMP balloon value), not balloon sizes")
    p.add_argument("--pfns", type=int, default=None, help="blimp.balloon.pfns for the guest")
    p.add_argument("--buffers", type=int, default=None,
                   help="blimp.balloon.buffers for the guest")
    p.add_argument("--touch", type=_size, default=0,
                   help="first let the guest write and free this much memory")
    p.add_argument("--wait", type=float, default=120.0,
                   help="seconds to wait for each target (default 120)")
    p.add_argument("--poll-ms", type=float, default=1.0,
                   help="query-balloon polling interval in ms (default 1)")
    p.add_argument("--json", action="store_true", help="end with one JSON line of the figures")
    p.set_defaults(func=cmd_balloon)


def _kernel_append(base: Optional[str], pfns=None, buffers=None) -> Optional[str]:
    words = (base or "").split()
    if pfns is not None:
        words.append("blimp.balloon.pfns=%d" % pfns)
    if buffers is not None:
        words.append("blimp.balloon.buffers=%d" % buffers)
    return " ".join(words) or None


def cmd_balloon(args) -> int:
    import time
    ram = parse_memory(args.memory)
    append = _kernel_append(args.append, args.pfns, args.buffers)
    q = qemu_from_args(args, balloon=True, agent=True, append=append)
    ag = None
    results = []
    try:
        with q:
            t0 = time.monotonic()
            feats, ag, bal = boot_balloon_guest(q)
            print("balloon: QEMU pid %d, %s, %s RAM, accel %s, guest driver on %s "
                  "(accepted %#x), cmdline %r, ready after %.2f s" % (
                      q.pid, q.machine, _mib(ram), q.accel, feats["transport"],
                      feats["accepted"], append or "", time.monotonic() - t0), flush=True)
            if args.touch:
                r = _touch_guest(ag, args.touch)
                print("balloon: guest wrote and freed %s (%d ms); QEMU RSS %s" % (
                    _mib(args.touch), r["ms"], _mib(bal.rss())), flush=True)
            print("%-10s %10s %10s %10s %9s %10s %10s %10s" % (
                "target", "from", "QMP->seen", "guest ms", "GiB/s", "polls", "RSS before",
                "RSS after"), flush=True)
            for size in args.sizes:
                target = (ram - size) if args.guest_size else size
                if not 0 <= target < ram:
                    raise Failure("size %s is outside [0, RAM %s)" % (_mib(size), _mib(ram)))
                target = target // PAGE * PAGE
                frm = bal.size()
                rss0 = bal.rss()
                start = len(q.lines)
                secs = bal.resize(target, timeout=args.wait, poll=args.poll_ms / 1000.0,
                                  abort=_exhausted_check(q, start))
                ev = _reached_event(q, start, target // PAGE)
                rss1 = bal.rss()
                moved = abs(target - frm)
                rate = moved / GiB / secs if secs > 0 else float("inf")
                results.append({"from": frm, "target": target, "seconds": round(secs, 6),
                                "guest_ms": ev["ms"] if ev else None, "polls": bal.polls,
                                "rss_before": rss0, "rss_after": rss1})
                print("%-10s %10s %9.3fs %10s %9.2f %10d %10s %10s" % (
                    _mib(target), _mib(frm), secs, ev["ms"] if ev else "-", rate, bal.polls,
                    _mib(rss0), _mib(rss1)), flush=True)
            ag.quit()
            q.wait(timeout=15)
            if not q.outcome.ok:
                raise Failure("guest exit: %s" % q.outcome.describe())
            bad = [e for e in q.events() if e["event"] in ("violation", "balloon_stalled")]
            if bad:
                raise Failure("guest reported %s" % bad)
    except _balloon_errors() as e:
        print("balloon: FAILED: %s" % e, file=sys.stderr)
        ctx = _failure_context(q, ag)
        if ctx:
            print(ctx, file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"tool": "balloon", "machine": q.machine, "memory": ram,
                          "accel": q.accel, "append": append, "transport": feats["transport"],
                          "steps": results}, sort_keys=True))
    return 0


# ----------------------------------------------------------- bench-balloon

#: Targets for 3 GiB of a 4 GiB guest (see bench/balloon_bench.py).
INFLATE_FLOOR_RATIO = 1.5
DEFLATE_TARGET_S = 0.5        # for 3 GiB; scaled with --size
DEFAULT_BENCH_CONFIGS = "256/1,256/4,256/16,1024/16,4096/16"
PORTABLE_MAX_PFNS = 256       # Firecracker / cloud-hypervisor cap a buffer at 256 PFNs
BENCH_STATES = ("untouched", "touched", "retouched")


def add_bench_balloon(sub):
    p = sub.add_parser("bench-balloon", help="time inflating/deflating 3 GiB of a 4 GiB guest",
                       description="Inflate a balloon of --size (3G) in a --memory (4G) q35 "
                                   "guest and deflate it again, on untouched memory and after "
                                   "the guest has written its free memory, for several "
                                   "pfns/buffers configurations; timed from the QMP command "
                                   "until query-balloon shows the target.  Compares with the "
                                   "host floor: one madvise() per 4 KiB page on the same amount "
                                   "of anonymous memory (bench/madvise_floor.c, compiled on the "
                                   "fly into build/bench/).  Every run boots a fresh guest.")
    add_balloon_guest_options(p, memory="4G", accel="tcg")
    p.add_argument("--size", type=_size, default=3 * GiB, help="balloon size (default 3G)")
    p.add_argument("--configs", default=DEFAULT_BENCH_CONFIGS,
                   help="comma-separated pfns/buffers pairs (default %s)" % DEFAULT_BENCH_CONFIGS)
    p.add_argument("--runs", "-n", type=int, default=3,
                   help="fresh guests per config (default 3); figures are the best run, "
                        "medians are in the JSON")
    p.add_argument("--no-touched", action="store_true",
                   help="only untouched memory (skips writing --size in the guest)")
    p.add_argument("--retouched", action="store_true",
                   help="also a third cycle: the guest writes the memory again after one "
                        "balloon cycle (host memory then in 4 KiB pages, no THP)")
    p.add_argument("--floor-runs", type=int, default=3)
    p.add_argument("--poll-ms", type=float, default=1.0,
                   help="query-balloon polling interval (default 1 ms)")
    p.add_argument("--timeout", type=float, default=900.0, help="per QEMU run")
    p.add_argument("--check-targets", action="store_true", help="exit 2 if a target is missed")
    p.set_defaults(func=cmd_bench_balloon)


def _floor_binary() -> str:
    src = os.path.join(REPO, "bench", "madvise_floor.c")
    out_dir = os.path.join(REPO, "build", "bench")
    out = os.path.join(out_dir, "madvise_floor")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        os.makedirs(out_dir, exist_ok=True)
        cc = os.environ.get("CC", "gcc")
        r = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-o", out, src],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise Failure("compiling %s failed:\n%s" % (src, r.stderr))
    return out


def measure_floor(size: int, runs: int) -> dict:
    """Seconds of one madvise per 4 KiB page over `size` bytes (best and median of
    `runs`), for touched/untouched memory, with and without THP."""
    import statistics as st
    exe = _floor_binary()
    res = {}
    for touched in (0, 1):
        for thp in (0, 1):
            xs, ws = [], []
            for _ in range(runs):
                r = subprocess.run([exe, str(size), str(touched), str(thp)],
                                   capture_output=True, text=True, timeout=600)
                if r.returncode != 0:
                    raise Failure("madvise_floor failed: %s" % r.stderr.strip())
                d = json.loads(r.stdout)
                xs.append(d["dontneed_s"])
                ws.append(d["willneed_s"])
            res[(touched, thp)] = {"dontneed_s": min(xs), "willneed_s": min(ws),
                                   "dontneed_median_s": st.median(xs),
                                   "willneed_median_s": st.median(ws),
                                   "dontneed_all": [round(x, 4) for x in xs],
                                   "willneed_all": [round(x, 4) for x in ws]}
    return res


def _anon_huge_kib(pid: int) -> int:
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _ram_thp_eligible(pid: int, ram: int) -> Optional[bool]:
    """Whether QEMU's guest-RAM mapping (the first mapping of at least `ram` bytes in
    /proc/<pid>/smaps) may use transparent huge pages (its THPeligible field)."""
    try:
        with open("/proc/%d/smaps" % pid) as f:
            big = False
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = head.split("-")
                    big = int(hi, 16) - int(lo, 16) >= ram
                elif big and line.startswith("THPeligible:"):
                    return line.split()[1] == "1"
    except (OSError, ValueError):
        pass
    return None


def bench_run(args, pfns: int, buffers: int, run: int, log) -> dict:
    """One fresh guest: an inflate/deflate cycle on untouched memory, then (unless
    --no-touched) the guest writes nearly all its free memory and a second cycle,
    and with --retouched a third after writing it again."""
    size = args.size // PAGE * PAGE
    append = _kernel_append(args.append, pfns, buffers)
    q = Qemu(args.kernel, machine=args.machine, memory=args.memory,
             accel=resolve_accel(args.accel), append=append, balloon=True,
             balloon_opts=args.balloon_opt, agent=True, timeout=args.timeout)
    out = {"ok": False, "append": append}
    ag = None
    poll = args.poll_ms / 1000.0
    try:
        with q:
            feats, ag, bal = boot_balloon_guest(q)
            out["transport"] = feats["transport"]
            out["thp_eligible"] = _ram_thp_eligible(q.pid, parse_memory(args.memory))
            free = ag.state()["mm"]["free_pages"] * PAGE
            if size > free - 8 * MiB:
                raise Failure("guest has only %s free, cannot balloon %s" % (_mib(free),
                                                                             _mib(size)))
            states = ["untouched"]
            if not args.no_touched:
                states.append("touched")
                if args.retouched:
                    states.append("retouched")
            for state in states:
                if state != "untouched":
                    # write (nearly) all free memory: every ballooned page is then resident
                    _touch_guest(ag, free - 16 * MiB, seed=run + 1, timeout=args.timeout)
                    if state == "touched":
                        out["anon_huge_kib"] = _anon_huge_kib(q.pid)
                rss0 = bal.rss()
                start = len(q.lines)
                t_in = bal.resize(size, timeout=300, poll=poll, abort=_exhausted_check(q, start))
                ev_in = _reached_event(q, start, size // PAGE)
                rss1 = bal.rss()
                start = len(q.lines)
                t_out = bal.resize(0, timeout=300, poll=poll)
                ev_out = _reached_event(q, start, 0)
                out[state] = {"inflate_s": t_in, "deflate_s": t_out,
                              "inflate_guest_ms": ev_in["ms"] if ev_in else None,
                              "deflate_guest_ms": ev_out["ms"] if ev_out else None,
                              "rss_drop_mib": (rss0 - rss1) >> 20}
                log("    run %d %-9s inflate %.3f s (guest %s ms), deflate %.3f s (guest %s ms), "
                    "RSS %s -> %s" % (run + 1, state, t_in, ev_in["ms"] if ev_in else "?", t_out,
                                      ev_out["ms"] if ev_out else "?", _mib(rss0), _mib(rss1)))
            ag.quit()
            q.wait(timeout=15)
            if not q.outcome.ok:
                raise Failure("guest exit: %s" % q.outcome.describe())
            bad = [e for e in q.events() if e["event"] in ("violation", "balloon_stalled")]
            if bad:
                raise Failure("guest reported %s" % bad)
            out["ok"] = True
    except _balloon_errors() as e:
        out["error"] = str(e)
        out["context"] = _failure_context(q, ag)
    return out


def cmd_bench_balloon(args) -> int:
    import statistics as stat
    configs = []
    for c in args.configs.split(","):
        try:
            pf, bu = c.strip().split("/")
            configs.append((int(pf), int(bu)))
        except ValueError:
            print("blimp bench-balloon: error: bad config %r (want pfns/buffers)" % c,
                  file=sys.stderr)
            return 2
    if not os.path.isfile(args.kernel):
        print("blimp bench-balloon: error: kernel image not found: %s" % args.kernel,
              file=sys.stderr)
        return exitcodes.CLI_QEMU_ERROR
    if args.runs < 1:
        print("blimp bench-balloon: error: --runs must be >= 1", file=sys.stderr)
        return 2
    accel = resolve_accel(args.accel)
    size = args.size // PAGE * PAGE
    gib = size / GiB
    deflate_target = DEFLATE_TARGET_S * (size / (3 * GiB))

    def log(msg):
        print(msg, flush=True)

    log("bench-balloon: %s balloon in a %s %s guest, accelerator %s%s, %s" % (
        _mib(size), args.memory, args.machine, accel.upper(),
        " (software emulation; no KVM)" if accel == "tcg" else "", _qemu_version()))
    log("  %d fresh guest(s) per config; timed from the QMP balloon command until query-balloon "
        "shows the target (polled every %g ms)" % (args.runs, args.poll_ms))
    log("host floor: one madvise() per 4 KiB page over %s of anonymous memory (best of %d)..."
        % (_mib(size), args.floor_runs))
    try:
        floor = measure_floor(size, args.floor_runs)
    except (Failure, OSError, subprocess.SubprocessError) as e:
        print("bench-balloon: error: %s" % e, file=sys.stderr)
        return 1
    for (touched, thp), f in sorted(floor.items()):
        log("  %-9s THP %-3s  MADV_DONTNEED %.3f s (%.2f GiB/s; all %s)   MADV_WILLNEED %.3f s"
            % ("touched" if touched else "untouched", "on" if thp else "off", f["dontneed_s"],
               gib / f["dontneed_s"], f["dontneed_all"], f["willneed_s"]))

    results = []
    for pfns, buffers in configs:
        log("config pfns=%d buffers=%d:" % (pfns, buffers))
        runs = []
        for i in range(args.runs):
            r = bench_run(args, pfns, buffers, i, log)
            runs.append(r)
            if not r["ok"]:
                log("    run %d FAILED: %s" % (i + 1, r["error"]))
                if r.get("context"):
                    log(r["context"])
                break
        results.append({"pfns": pfns, "buffers": buffers, "runs": runs})

    # QEMU asks for THP on guest RAM; first-touched guest memory is then in huge pages
    # (madvise_floor with thp=1 does the same).  Re-touched memory is in 4 KiB pages.
    thp = any(r.get("anon_huge_kib", 0) > 0 or r.get("thp_eligible")
              for c in results for r in c["runs"])
    floor_in = {"untouched": floor[(0, thp)]["dontneed_s"],
                "touched": floor[(1, thp)]["dontneed_s"],
                "retouched": floor[(1, 0)]["dontneed_s"]}
    floor_out = floor[(0, thp)]["willneed_s"]     # deflate: one MADV_WILLNEED per page
    log("")
    log("results: best of %d guests (medians in the JSON line)" % args.runs)
    log("  floors: inflate untouched %.3f s, touched %.3f s (THP %s, like QEMU's RAM here)%s; "
        "deflate %.3f s (MADV_WILLNEED)" % (
            floor_in["untouched"], floor_in["touched"], "on" if thp else "off",
            ", re-touched %.3f s (4 KiB pages)" % floor_in["retouched"] if args.retouched
            else "", floor_out))
    log("%-10s %-10s %9s %7s %8s %9s %7s %8s  %s" % (
        "pfns/bufs", "memory", "inflate", "GiB/s", "x floor", "deflate", "GiB/s", "x floor",
        "targets: inflate <= %.1fx floor, deflate <= %.2f s" % (INFLATE_FLOOR_RATIO,
                                                                 deflate_target)))
    missed = False
    summary = []
    for c in results:
        name = "%d/%d" % (c["pfns"], c["buffers"])
        ok_runs = [r for r in c["runs"] if r["ok"]]
        if len(ok_runs) != len(c["runs"]) or not ok_runs:
            log("%-10s FAILED: %s" % (name, c["runs"][-1].get("error")))
            summary.append({"pfns": c["pfns"], "buffers": c["buffers"], "ok": False,
                            "error": c["runs"][-1].get("error")})
            continue
        entry = {"pfns": c["pfns"], "buffers": c["buffers"], "ok": True,
                 "portable": c["pfns"] <= PORTABLE_MAX_PFNS,
                 "transport": ok_runs[0].get("transport")}
        for state in BENCH_STATES:
            per = [r[state] for r in ok_runs if state in r]
            if not per:
                continue
            ins = [x["inflate_s"] for x in per]
            outs = [x["deflate_s"] for x in per]
            t_in, t_out = min(ins), min(outs)
            ratio_in = t_in / floor_in[state]
            ok_in = ratio_in <= INFLATE_FLOOR_RATIO
            ok_out = t_out <= deflate_target
            missed |= not (ok_in and ok_out)
            log("%-10s %-10s %8.3fs %7.2f %8.2f %8.3fs %7.2f %8.2f  %s, %s" % (
                name, state, t_in, gib / t_in, ratio_in, t_out, gib / t_out, t_out / floor_out,
                "inflate met" if ok_in else "inflate MISSED",
                "deflate met" if ok_out else "deflate MISSED"))
            entry[state] = {
                "inflate_s": round(t_in, 4), "deflate_s": round(t_out, 4),
                "inflate_median_s": round(stat.median(ins), 4),
                "deflate_median_s": round(stat.median(outs), 4),
                "inflate_gib_s": round(gib / t_in, 3), "deflate_gib_s": round(gib / t_out, 3),
                "inflate_floor_ratio": round(ratio_in, 3),
                "deflate_floor_ratio": round(t_out / floor_out, 3),
                "inflate_all": [round(x, 4) for x in ins],
                "deflate_all": [round(x, 4) for x in outs],
                "inflate_guest_ms": [x["inflate_guest_ms"] for x in per],
                "deflate_guest_ms": [x["deflate_guest_ms"] for x in per],
                "rss_drop_mib": [x["rss_drop_mib"] for x in per],
                "inflate_target_met": ok_in, "deflate_target_met": ok_out}
        summary.append(entry)

    ok = [e for e in summary if e["ok"]]

    def score(e):      # sum over the memory states measured of inflate + deflate (best runs)
        return sum(e[s]["inflate_s"] + e[s]["deflate_s"] for s in BENCH_STATES if s in e)
    best = min(ok, key=score) if ok else None
    best_safe = min([e for e in ok if e["portable"]], key=score, default=None)
    if best:
        log("fastest overall: %d/%d; fastest portable (<= %d PFNs per buffer): %s" % (
            best["pfns"], best["buffers"], PORTABLE_MAX_PFNS,
            "%d/%d" % (best_safe["pfns"], best_safe["buffers"]) if best_safe else "none"))
    line = {"bench": "balloon", "accel": accel, "qemu": _qemu_version(), "machine": args.machine,
            "memory": args.memory, "size": size, "runs": args.runs, "poll_ms": args.poll_ms,
            "thp": thp,
            "floor": {("touched" if t else "untouched") + ("_thp" if h else ""):
                      {k: (round(v, 4) if isinstance(v, float) else v) for k, v in f.items()}
                      for (t, h), f in floor.items()},
            "targets": {"inflate_floor_ratio": INFLATE_FLOOR_RATIO,
                        "deflate_s": round(deflate_target, 4)},
            "configs": summary,
            "fastest": "%d/%d" % (best["pfns"], best["buffers"]) if best else None,
            "fastest_portable": ("%d/%d" % (best_safe["pfns"], best_safe["buffers"])
                                 if best_safe else None)}
    print(json.dumps(line, sort_keys=True), flush=True)
    if any(not e["ok"] for e in summary):
        return 1
    if args.check_targets and missed:
        return 2
    return 0


# ------------------------------------------------------------------ main

SUBCOMMANDS = [add_run, add_bench_boot, add_demo, add_balloon, add_bench_balloon]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python3 -m blimp", description=__doc__.split("\n\n")[0],
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
