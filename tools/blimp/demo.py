"""demo: boot blimp with a balloon and show it working, step by step."""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List

from . import exitcodes
from .console import GuestConsole
from .options import add_balloon_guest_options, size_arg
from .qemu import parse_memory, qemu_version, resolve_accel
from .session import SESSION_ERRORS, BalloonSession, describe_failure
from .units import MiB, PAGE, mib

ROW = "  %-8s %9s %9s %11s %10s %9s %10s %10s  %s"
ROW_HEADER = ROW % ("", "balloon", "actual", "guest size", "QMP->seen", "guest ms", "QEMU RSS",
                    "guest free", "held memory")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="show the balloon working (boot, inflate, deflate, verify)",
                       description="Boot blimp with a virtio balloon and the agent, allocate "
                                   "memory in the guest, inflate the balloon step by step and "
                                   "deflate it again while showing target, actual, QEMU's RSS "
                                   "and timings, show the guest statistics QEMU receives, "
                                   "verify the guest's memory and quit.  Exit 0 on success.")
    add_balloon_guest_options(p, memory="1G", accel="auto")
    p.add_argument("--hold", type=size_arg, default=256 * MiB,
                   help="memory the guest allocates and keeps (default 256M)")
    p.add_argument("--max", dest="max_balloon", type=size_arg, default=512 * MiB,
                   help="largest balloon (default 512M)")
    p.add_argument("--step", type=size_arg, default=128 * MiB, help="balloon step (default 128M)")
    p.add_argument("--touch", type=size_arg, default=None,
                   help="guest memory to write and free before inflating, so the RSS drop is "
                        "visible (default: all the guest has free but 16M; 0 = none)")
    p.add_argument("--events", action="store_true", help="show the guest's JSON event lines too")
    p.add_argument("--quiet-console", action="store_true", help="do not show the guest console")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="kill QEMU after this many seconds (default 300)")
    p.set_defaults(func=run)


def say(msg: str = "") -> None:
    print(msg, flush=True)


def run(args: argparse.Namespace) -> int:
    status = _check_args(args)
    if status:
        return status
    accel = resolve_accel(args.accel)
    say("blimp demo: the virtio memory balloon, driven from the host")
    say("  QEMU %s, machine %s, %s of guest RAM, accelerator %s%s" % (
        qemu_version().replace("QEMU emulator version ", ""), args.machine,
        mib(parse_memory(args.memory)), accel.upper(),
        " (no hardware virtualisation: every guest instruction is emulated)"
        if accel == "tcg" else ""))
    session = BalloonSession(args.kernel, machine=args.machine, memory=args.memory, accel=accel,
                             append=args.append, balloon_opts=args.balloon_opt,
                             timeout=args.timeout)
    demo = Demo(args, session)
    try:
        with session:
            demo.run_steps()
    except SESSION_ERRORS as e:
        reason, context = describe_failure(session, e)
        print("\nblimp demo: FAILED during %s: %s" % (demo.step, reason), file=sys.stderr)
        if context:
            print(context, file=sys.stderr)
        return 1
    say("\nblimp demo: OK")
    return 0


def _check_args(args: argparse.Namespace) -> int:
    """Exit status for arguments the demo cannot work with, else 0."""
    ram = parse_memory(args.memory)
    if args.step <= 0 or args.max_balloon <= 0 or args.max_balloon % PAGE or args.step % PAGE:
        print("blimp demo: error: --max and --step must be positive multiples of 4 KiB",
              file=sys.stderr)
        return 2
    if args.hold + args.max_balloon + 32 * MiB > ram:
        print("blimp demo: error: --hold %s + --max %s does not fit in %s of guest RAM"
              % (mib(args.hold), mib(args.max_balloon), mib(ram)), file=sys.stderr)
        return 2
    if not os.path.isfile(args.kernel):
        print("blimp demo: error: kernel image not found: %s (build it with `ninja`)"
              % args.kernel, file=sys.stderr)
        return exitcodes.CLI_QEMU_ERROR
    return 0


def balloon_sizes(step: int, largest: int) -> tuple[List[int], List[int]]:
    """The balloon sizes on the way up (step, 2*step, ..., largest) and down to 0."""
    up = list(range(step, largest + 1, step))
    if up[-1] != largest:
        up.append(largest)
    down = sorted(set([s for s in up if s < largest] + [0]), reverse=True)
    return up, down


class Demo:
    """The demo's steps, in order, on one started session; `step` names the one running
    (for the failure message)."""

    def __init__(self, args: argparse.Namespace, session: BalloonSession) -> None:
        self.args = args
        self.s = session
        self.step = "boot"
        self.console = GuestConsole(session.qemu, show_events=args.events,
                                    enabled=not args.quiet_console)
        self.boot_state: dict = {}
        self.hold_id = 0
        self.hold_pages = 0

    def run_steps(self) -> None:
        self.show_boot()
        self.touch()
        self.hold()
        self.inflate_and_deflate()
        self.show_stats()
        self.verify_and_free()
        self.quit()

    def rss(self) -> str:
        return mib(self.s.balloon.rss())

    # ------------------------------------------------------------ steps

    def show_boot(self) -> None:
        say("\n== 1. boot blimp with a virtio-balloon-pci device and the agent on COM2")
        booted_s = time.monotonic() - (self.s.qemu.t_start or time.monotonic())
        self.console.flush(settle=0.05)
        st = self.boot_state = self.s.state()
        f = self.s.features
        say("  booted in %.2f s; balloon driver on %s (features offered %#x, accepted %#x)"
            % (booted_s, f["transport"], f["offered"], f["accepted"]))
        say("  the guest manages %s, %s free; QEMU resident memory (RSS) %s" % (
            mib(st["mm"]["total_pages"] * PAGE), mib(st["mm"]["free_pages"] * PAGE), self.rss()))
        self.s.balloon.enable_stats(1)

    def touch(self) -> None:
        touch = self.args.touch
        if touch is None:
            touch = max(0, self.boot_state["mm"]["free_pages"] * PAGE - 16 * MiB)
        if not touch:
            return
        self.step = "touch"
        say("\n== 2. the guest writes %s of its free memory and frees it again" % mib(touch))
        say("     (so that QEMU really holds that memory and ballooning it visibly "
            "gives it back)")
        r = self.s.touch_free_memory(touch)
        self.console.flush()
        say("  wrote %d pages in %.2f s (guest: %d ms); QEMU RSS now %s" % (
            r["pages"], r["ms"] / 1000.0, r["ms"], self.rss()))

    def hold(self) -> None:
        self.step = "alloc"
        say("\n== 3. the guest allocates %s and fills every 8-byte word with a pattern "
            "(address, seed 2024)" % mib(self.args.hold))
        r = self.s.check("alloc %d 2024" % self.args.hold, timeout=300)
        self.hold_id, self.hold_pages = r["id"], r["pages"]
        self.console.flush()
        say("  allocation #%d: %d pages in %d blocks, %d ms; QEMU RSS %s" % (
            self.hold_id, r["pages"], r["blocks"], r["ms"], self.rss()))

    def inflate_and_deflate(self) -> None:
        up, down = balloon_sizes(self.args.step, self.args.max_balloon)
        self.step = "inflate"
        say("\n== 4. inflate the balloon to %s in steps of %s (QMP balloon; then poll "
            "query-balloon)" % (mib(self.args.max_balloon), mib(self.args.step)))
        say(ROW_HEADER)
        rss_top = self.s.balloon.rss()
        for size in up:
            self.move("inflate", size)
        rss_inflated = self.s.balloon.rss()
        self.step = "deflate"
        say("\n== 5. deflate it back to 0")
        say(ROW_HEADER)
        for size in down:
            self.move("deflate", size)
        say("  QEMU RSS: %s before inflating, %s with the balloon at %s: %s returned to the "
            "host" % (mib(rss_top), mib(rss_inflated), mib(self.args.max_balloon),
                      mib(max(0, rss_top - rss_inflated))))
        say("  (deflating does not raise the RSS: the host backs those pages again only "
            "when the guest writes them)")

    def move(self, kind: str, size: int) -> None:
        """One balloon size: reach it, check host and guest agree, verify held memory,
        print a row."""
        r = self.s.resize(size, timeout=60, stop_if_exhausted=False)
        st = self.s.check_balloon(size)
        self.s.verify(str(self.hold_id), timeout=120)
        actual = self.s.balloon_size()
        self.console.flush()
        say(ROW % (kind, mib(size), mib(actual), mib(self.s.ram - actual),
                   "%.3fs" % r.seconds, r.guest_ms if r.guest_ms is not None else "-",
                   self.rss(), mib(st["mm"]["free_pages"] * PAGE), "verified"))

    def show_stats(self) -> None:
        self.step = "stats"
        say("\n== 6. guest statistics as QEMU sees them (qom-get guest-stats, polling "
            "every 1 s)")
        now_free = self.s.state()["mm"]["free_pages"] * PAGE
        # the stats are a snapshot from the last poll: wait for one taken after the deflate
        stats = self.s.balloon.wait_stats(timeout=10, pred=lambda x: x["stats"].get(
            "stat-free-memory") == now_free)
        stv = stats["stats"]
        main = ("stat-total-memory", "stat-free-memory", "stat-available-memory")
        for key in main:
            say("  %-22s %s" % (key, mib(stv[key])))
        others = {k: v for k, v in stv.items() if k not in main}
        say("  %-22s %s" % ("others (blimp has none)",
                            ", ".join("%s=%d" % (k[5:], v) for k, v in sorted(others.items()))))
        say("  %-22s %s (host time)" % ("last-update", time.strftime(
            "%H:%M:%S", time.localtime(stats["last-update"]))))
        if not 0 < stv["stat-free-memory"] <= stv["stat-total-memory"] <= self.s.ram:
            raise self.s.failure("implausible guest stats: %r" % stv)
        say("  (free memory matches the guest's own count, %s)" % mib(now_free))

    def verify_and_free(self) -> None:
        self.step = "verify"
        say("\n== 7. verify the %s the guest held throughout" % mib(self.args.hold))
        v = self.s.verify("all", pages=self.hold_pages, timeout=120)
        say("  %d pages checked in %d ms: every word intact" % (v["pages"], v["ms"]))
        self.s.check("free all")
        free_now = self.s.state()["mm"]["free_pages"]
        free_at_boot = self.boot_state["mm"]["free_pages"]
        say("  freed; the guest has %s free again (%s at boot)" % (
            mib(free_now * PAGE), mib(free_at_boot * PAGE)))
        if free_now != free_at_boot:
            raise self.s.failure("the guest lost %d pages over the demo"
                                 % (free_at_boot - free_now))

    def quit(self) -> None:
        self.step = "quit"
        say("\n== 8. quit")
        outcome = self.s.quit()
        self.console.flush()
        say("  %s" % outcome.describe())
        self.s.check_no_violation()
