"""stress: N guests in stress mode at once, each under a host-side storm driving QMP.

Guest i runs ``blimp.mode=stress blimp.seed=S+i`` (its seeded allocation/verify storm,
README "Stress mode") with a balloon offering DEFLATE_ON_OOM and FREE_PAGE_HINT (and the
iothread hinting needs).  Meanwhile one host thread per guest drives QEMU with storms picked
in turn from --storm:

  fast      many balloon targets a few milliseconds apart, none waited for
  slow      one big target, held until query-balloon shows it reached
  reverse   raise the target and lower it again before the guest gets there
  stopcont  QMP stop while a target change is in flight, a pause, cont
  migrate   a migration to a fresh QEMU, live (free page hinting rounds on the way) or
            --migrate paused (QMP stop first);
            the guest goes on there (BalloonSession.migrate)
  reset     a non-zero target, then the agent's reset-device: the guest resets the device
            and re-inflates what it holds (balloon_reset, cause "guest")
  oom       a target of nearly all RAM: the guest's own allocations then run it out of
            memory and the balloon deflates on OOM

The start: like a real host, the runner does not wait for the guest.  Each session starts
"immediate" (BalloonSession start_mode): QMP and the agent's socket connected, nothing the
guest says awaited, and the first storm begins at once, racing the guest's bring-up (its
driver, its interrupt set-up, the start of its own storm).  Agent commands wait for the
agent's ready line on first use.

The end (quiescence): every guest is started with a long ``blimp.stress.settle_ms``, so once
its operations are done it waits for the balloon to be at rest (no buffer or hint round in
flight, actual == target).  The host watches the guest's stress_progress events and starts
no storm that could still run when the guest's bound comes (LEAD_S plus the storm's own
expected length before it); it then resumes the VM if paused and asks for a balloon of 0,
and only waits.  The guest ends at rest with free pages after == before, and leaves.

Progress: a line per guest every --progress seconds.  The end: a table per guest and
totals, the failures with what the guest found, and the command that replays one guest
alone.  Exit status 0 when every guest ended with success (0x10), no stress_failure, no
protocol problem and no timeout; 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional

from . import guestlog
from .options import DEFAULT_KERNEL, memory_arg
from .qemu import MACHINES, QEMU_BINARY, parse_memory
from .session import PROBLEM_EVENTS, SESSION_ERRORS, BalloonSession, describe_failure
from .units import MiB, PAGE

STORMS = ("fast", "slow", "reverse", "stopcont", "migrate", "reset", "oom")
#: storms each machine supports (all three run every storm with QEMU 7.2: microvm's
#: virtio-mmio balloon migrates, hints and resets like the PCI one)
MACHINE_STORMS = {m: STORMS for m in MACHINES}
#: seconds before the guest's bound (as its progress predicts it) at which no storm starts
LEAD_S = 3.0
#: expected seconds a storm takes, at first (measured ones replace them)
EXPECTED_S = {"fast": 0.5, "slow": 2.0, "reverse": 1.0, "stopcont": 1.0, "migrate": 3.0,
              "reset": 2.0, "oom": 2.0}
#: the guest waits this long at most, after its last op, for the host to let it rest
SETTLE_MS = 120000
#: wait at most this long for one storm's effect (a target reached, a reset re-inflated)
ACTION_TIMEOUT_S = 60.0
#: after quiescing: how long the guest may take to settle and exit
END_TIMEOUT_S = 180.0


class StormFailure(Exception):
    """The host saw something wrong while driving a storm (a target never reached, ...)."""


@dataclass
class GuestResult:
    """What one guest did and how it ended."""
    index: int
    seed: int
    ok: bool = False
    failures: List[str] = field(default_factory=list)
    outcome: str = ""
    done: Optional[dict] = None             # stress_done
    failure: Optional[dict] = None          # the first stress_failure
    latency: Optional[dict] = None          # the last balloon_latency, if the guest has it
    actions: Dict[str, int] = field(default_factory=lambda: {s: 0 for s in STORMS})
    targets: int = 0                        # QMP balloon commands sent
    migrations: List[dict] = field(default_factory=list)
    resets: int = 0                         # balloon_reset events (guest- or device-caused)
    oom_deflated: int = 0                   # pages, from balloon_oom_deflate events
    hint_rounds: int = 0
    progress: Optional[dict] = None         # the last stress_progress
    wall_s: float = 0.0
    context: str = ""


class GuestRun(threading.Thread):
    """One guest: boot it, storm it, watch its events, end it."""

    def __init__(self, index: int, args: argparse.Namespace, storms: List[str],
                 log: "Log") -> None:
        super().__init__(name="stress-vm%d" % index, daemon=True)
        self.index = index
        self.args = args
        self.storms = storms
        self.log = log
        self.seed = args.seed + index
        self.rng = random.Random(self.seed * 7919 + 1)
        self.ram = parse_memory(args.memory)
        self.r = GuestResult(index, self.seed)
        self.session: Optional[BalloonSession] = None
        self.pos = 0                    # serial lines parsed so far
        self.ended = False              # stress_done or stress_failure seen
        self.quiescing = False
        self.paused = False
        self.expected = dict(EXPECTED_S)
        self.t0 = time.monotonic()
        self.phase = "booting"

    # ------------------------------------------------------------ guest command line

    def append(self) -> str:
        a = self.args
        parts = ["blimp.mode=stress", "blimp.seed=%d" % self.seed,
                 "blimp.stress.settle_ms=%d" % SETTLE_MS, "blimp.stress.progress=0",
                 "blimp.stress.end_empty=1"]
        if a.seconds:
            parts += ["blimp.stress.ops=0", "blimp.stress.ms=%d" % int(a.seconds * 1000)]
        else:
            parts += ["blimp.stress.ops=%d" % a.ops]
        if a.append:
            parts.append(a.append)
        return " ".join(parts)

    # ------------------------------------------------------------ events

    def scan(self) -> None:
        """Take in the serial lines printed since the last scan."""
        s = self.session
        if s is None:
            return
        lines = s.lines
        for line in lines[self.pos:]:
            try:
                ev = guestlog.parse_event(line)
            except guestlog.BadEvent:
                continue
            if ev is None:
                continue
            name = ev.get("event")
            if name == "stress_progress":
                self.r.progress = ev
            elif name == "stress_done":
                self.r.done = ev
                self.ended = True
            elif name == "stress_failure":
                if self.r.failure is None:
                    self.r.failure = ev
                self.ended = True
            elif name == "balloon_latency":
                self.r.latency = ev
            elif name == "balloon_oom_deflate":
                self.r.oom_deflated += int(ev.get("pages", 0))
            elif name == "balloon_reset":
                self.r.resets += 1
            elif name == "balloon_hint_start":
                self.r.hint_rounds += 1
            elif name in PROBLEM_EVENTS:
                self.fail("protocol problem: %s" % ev)
            elif name == "irq_missed":
                # the guest recovered within its 100 ms look, but a host that drops
                # interrupts is a finding, never a pass
                self.fail("lost interrupt: the guest found device work no interrupt announced "
                          "(%s)" % ev)
        self.pos = len(lines)

    def fail(self, what: str) -> None:
        if what not in self.r.failures:
            self.r.failures.append(what)
            self.log.say("vm%d (seed %d): FAILED: %s" % (self.index, self.seed,
                                                          what.splitlines()[0]))

    # ------------------------------------------------------------ the end

    def remaining_s(self) -> float:
        """Seconds until the guest's bound, as its last progress predicts (inf: unknown)."""
        p = self.r.progress
        if p is None or not p.get("ms"):
            return float("inf") if not self.args.seconds else self.args.seconds
        ms, ops = p["ms"], p["ops"]
        if self.args.seconds:
            return self.args.seconds - ms / 1000.0
        rate = ops / (ms / 1000.0)
        return (self.args.ops - ops) / rate if rate > 0 else float("inf")

    def may_start(self, storm: str) -> bool:
        return not self.ended and self.remaining_s() > LEAD_S + self.expected[storm]

    # ------------------------------------------------------------ QMP / agent steps

    def set_target(self, size: int) -> int:
        size = max(0, min(int(size), self.ram - 64 * MiB)) & ~(PAGE - 1)
        self.session.balloon.set_size(size)
        self.r.targets += 1
        return size

    def wait_reached(self, size: int, timeout: float = ACTION_TIMEOUT_S) -> None:
        """query-balloon shows a balloon of `size` (or the guest ended)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.session.balloon.size() == size:
                return
            self.scan()
            if self.ended or not self.session.running():
                return
            if time.monotonic() >= deadline:
                raise self.session.gave_up(
                    "balloon of %d MiB not reached in %.0f s (query-balloon %d MiB)"
                    % (size >> 20, timeout, self.session.balloon.size() >> 20))
            time.sleep(0.02)

    def wait_event(self, name: str, since: int, timeout: float = ACTION_TIMEOUT_S) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            found = self.session.events(name, since)
            if found:
                return found[0]
            self.scan()
            if self.ended or not self.session.running():
                return {}
            if time.monotonic() >= deadline:
                raise self.session.gave_up("no %s event within %.0f s" % (name, timeout))
            time.sleep(0.02)

    # ------------------------------------------------------------ storms

    def storm_fast(self) -> None:
        for _ in range(self.rng.randint(15, 30)):
            self.set_target(self.rng.uniform(0, 0.4) * self.ram)
            time.sleep(self.rng.uniform(0.001, 0.01))

    def storm_slow(self) -> None:
        size = self.set_target(self.rng.uniform(0.3, 0.5) * self.ram)
        self.wait_reached(size)

    def storm_reverse(self) -> None:
        now = self.session.balloon.size()
        up = self.set_target(now + self.rng.uniform(0.2, 0.35) * self.ram)
        time.sleep(self.rng.uniform(0.001, 0.004))
        back = self.set_target(max(0, now - self.rng.uniform(0, 0.1) * self.ram))
        if back == up:      # both clamped to the largest target: lower it for real
            back = self.set_target(up - 32 * MiB)
        self.wait_reached(back)

    def storm_stopcont(self) -> None:
        qmp = self.session.qemu.qmp()
        self.set_target(self.rng.uniform(0.05, 0.4) * self.ram)
        time.sleep(self.rng.uniform(0.001, 0.01))
        qmp.execute("stop")
        self.paused = True
        time.sleep(self.rng.uniform(0.1, 0.4))
        qmp.execute("cont")
        self.paused = False

    def storm_migrate(self) -> None:
        m = self.session.migrate(timeout=ACTION_TIMEOUT_S, paused=self.args.migrate == "paused")
        self.r.migrations.append({"total_ms": m.total_time_ms, "downtime_ms": m.downtime_ms,
                                  "ram_mib": m.ram_transferred >> 20,
                                  "hint": m.free_page_hint})

    def storm_reset(self) -> None:
        size = self.set_target(self.rng.uniform(0.1, 0.3) * self.ram)
        self.wait_reached(size)
        since = self.session.mark()
        r = self.session.cmd("reset-device", timeout=30)
        if r.get("ok") is not True:
            if self.ended or not self.session.running():
                return
            raise StormFailure("agent reset-device: %r" % r)
        self.wait_event("balloon_reinflated", since)
        self.wait_reached(size)

    def storm_oom(self) -> None:
        since = self.session.mark()
        self.set_target_raw(self.ram - 8 * MiB)
        time.sleep(self.rng.uniform(1.0, 2.0))
        self.scan()
        self.set_target(self.rng.uniform(0.05, 0.2) * self.ram)
        if not self.session.events("balloon_oom_deflate", since):
            self.log.debug("vm%d: oom storm: no OOM deflate this time" % self.index)

    def set_target_raw(self, size: int) -> None:
        """A target beyond what set_target allows (the OOM storm)."""
        self.session.balloon.set_size(int(size) & ~(PAGE - 1))
        self.r.targets += 1

    # ------------------------------------------------------------ the thread

    def run(self) -> None:
        a = self.args
        hint = "migrate" in self.storms and a.hint == "on"
        self.session = BalloonSession(
            a.kernel, machine=a.machine, memory=a.memory, accel="tcg", append=self.append(),
            balloon_opts=["deflate-on-oom=on"], free_page_hint=hint,
            timeout=(a.seconds or 60) + END_TIMEOUT_S + 300, boot_timeout=60, qemu=a.qemu,
            context_lines=30, start_mode="immediate",
            serial_log=(os.path.join(a.serial_dir, "vm%d.log" % self.index)
                        if a.serial_dir else None))
        try:
            with self.session:
                # no waiting for the guest's stress_start (nor its driver or interrupts):
                # the first storm races its bring-up, as a real host's first target would
                self.phase = "running"
                self.storm_loop()
                self.phase = "ending"
                self.finish()
                if not self.r.context:          # finish() keeps a timeout's diagnosis
                    self.r.context = self.session.context(40)
        except SESSION_ERRORS + (StormFailure,) as e:
            reason, context = describe_failure(self.session, e)
            self.scan()
            self.fail(reason)
            self.r.context = context
        except Exception as e:      # a bug of ours must not hang the other guests
            self.fail("runner error: %r" % e)
        finally:
            if self.session is not None:
                self.scan()
                q = self.session.qemu
                if q.killed and not q.timed_out:
                    if not self.r.outcome:
                        self.r.outcome = "QEMU ended by the runner"
                elif q.returncode is not None or q.timed_out:
                    self.r.outcome = q.outcome.describe()
                    if not q.outcome.ok:
                        self.fail("guest exit: %s" % self.r.outcome)
                elif not self.r.outcome:
                    self.r.outcome = "QEMU killed by the runner"
            self.r.wall_s = time.monotonic() - self.t0
            self.phase = "ended"
            self.r.ok = not self.r.failures and self.r.done is not None and \
                self.r.failure is None
            if self.r.failure is not None:
                self.fail(describe_stress_failure(self.r.failure))

    def storm_loop(self) -> None:
        order: List[str] = []
        while True:
            self.scan()
            if self.ended or not self.session.running():
                return
            if not order:
                order = list(self.storms)
                self.rng.shuffle(order)
            storm = order[0]
            if not self.may_start(storm):
                # too close to the end for this one: a shorter one, or none
                short = [s for s in order if self.may_start(s)]
                if not short:
                    return
                storm = short[0]
            order.remove(storm)
            t = time.monotonic()
            try:
                getattr(self, "storm_" + storm)()
            except SESSION_ERRORS + (StormFailure,):
                self.scan()
                if self.ended or not self.session.running():
                    return      # the guest ended meanwhile: its outcome says how
                raise
            self.expected[storm] = max(self.expected[storm], time.monotonic() - t)
            self.r.actions[storm] += 1

    def finish(self) -> None:
        """Quiesce: resume the VM, ask for an empty balloon, wait for the guest to end."""
        self.phase = "quiescing"
        s = self.session
        if s.running():
            try:
                if self.paused:
                    s.qemu.qmp().execute("cont")
                    self.paused = False
                if not self.ended:
                    self.set_target(0)
            except SESSION_ERRORS:
                if s.running():
                    raise
        deadline = time.monotonic() + END_TIMEOUT_S + (self.args.seconds or 0)
        while s.running() and time.monotonic() < deadline:
            self.scan()
            time.sleep(0.1)
        if s.running():
            d = s.diagnose()
            self.fail("timeout: the guest did not end within %.0f s of the host's last storm; %s"
                      % (END_TIMEOUT_S + (self.args.seconds or 0), d.verdict))
            self.r.context = d.report() + "\n" + s.context(40)
            s.close()
        s.qemu.wait(timeout=10)
        self.scan()


def describe_stress_failure(f: dict) -> str:
    """The guest's stress_failure in a line: what, seed, step, page, word, found."""
    if f.get("what") == "verify":
        return ("stress_failure verify: seed %d, op %d (%s, slot %d): page %#x, word at %#x: "
                "expected %#018x found %#018x (generation %d)"
                % (f["seed"], f["op"], f.get("during", "?"), f.get("slot", -1), f["page"],
                   f["addr"], f["expected"], f["found"], f.get("gen", -1)))
    if f.get("what") == "leak":
        return ("stress_failure leak: seed %d, after op %d: lost_pages %d (free pages %d before, "
                "%d after; balloon %d / %d)"
                % (f["seed"], f["op"], f["lost_pages"], f["free_pages_before"],
                   f["free_pages_after"], f["balloon_pages_before"], f["balloon_pages_after"]))
    return "stress_failure %r" % f


class Log:
    """Lines from several threads, one at a time."""

    def __init__(self, verbose: bool = False) -> None:
        self.lock = threading.Lock()
        self.verbose = verbose

    def say(self, line: str) -> None:
        with self.lock:
            print("stress: " + line, flush=True)

    def debug(self, line: str) -> None:
        if self.verbose:
            self.say(line)


def _n(x: float) -> str:
    return "{:,}".format(int(x))


def progress_line(g: GuestRun) -> str:
    r = g.r
    acts = sum(r.actions.values())
    p = r.progress
    if p is None:
        return "vm%d (seed %d): %s" % (g.index, g.seed, g.phase)
    ms = max(1, p["ms"])
    return ("vm%d (seed %d): %s ops (%s ops/s), %s pages verified, balloon %s pages "
            "(target %s), host actions %d (migrations %d, resets %d), %s"
            % (g.index, g.seed, _n(p["ops"]), _n(p["ops"] * 1000 / ms),
               _n(p["pages_verified"]), _n(p["balloon_actual"]), _n(p["balloon_target"]),
               acts, r.actions["migrate"], r.actions["reset"], g.phase))


def replay_command(args: argparse.Namespace, seed: int) -> str:
    cmd = ["./blimp", "stress", "--vms", "1", "--seed", str(seed)]
    cmd += ["--seconds", "%g" % args.seconds] if args.seconds else ["--ops", str(args.ops)]
    cmd += ["--memory", args.memory, "--machine", args.machine, "--storm", args.storm]
    if args.migrate != "live":
        cmd += ["--migrate", args.migrate]
    if args.hint != "on":
        cmd += ["--hint", args.hint]
    if args.qemu != QEMU_BINARY:
        cmd += ["--qemu", args.qemu]
    if args.append:
        cmd += ["--append", "'%s'" % args.append]
    return " ".join(cmd)


def summary(guests: List[GuestRun], args: argparse.Namespace) -> List[str]:
    out = []
    head = ("%-4s %6s %-6s %12s %9s %15s %5s %5s %5s %5s %5s %5s %5s %9s %s"
            % ("vm", "seed", "result", "ops", "ops/s", "pages verified", "fast", "slow", "rev",
               "stop", "migr", "reset", "oom", "oom pages", "leak check"))
    out.append(head)
    tot = {"ops": 0, "pages": 0, "oom": 0, "resets": 0, "migr": 0}
    tot_actions = {s: 0 for s in STORMS}
    for g in guests:
        r = g.r
        d = r.done or {}
        p = r.progress or {}
        ops = d.get("ops", p.get("ops", 0))
        rate = d.get("ops_per_s", p["ops"] * 1000 // p["ms"] if p.get("ms") else 0)
        pages = d.get("pages_verified", (r.progress or {}).get("pages_verified", 0))
        if r.done:
            fb, fa = d["free_pages_before"], d["free_pages_after"]
            bb, ba = d["balloon_pages_before"], d["balloon_pages_after"]
            leak = ("ok: free %d before, %d after" % (fb, fa) if fb + bb == fa + ba and
                    (r.failure is None or r.failure.get("what") != "leak")
                    else "LEAK: free %d -> %d, balloon %d -> %d" % (fb, fa, bb, ba))
        elif r.failure and r.failure.get("what") == "leak":
            leak = "LEAK: lost_pages %d" % r.failure["lost_pages"]
        else:
            leak = "-"
        a = r.actions
        out.append("%-4s %6d %-6s %12s %9s %15s %5d %5d %5d %5d %5d %5d %5d %9s %s"
                   % ("vm%d" % r.index, r.seed, "ok" if r.ok else "FAILED", _n(ops),
                      _n(rate), _n(pages), a["fast"], a["slow"],
                      a["reverse"], a["stopcont"], a["migrate"], a["reset"], a["oom"],
                      _n(r.oom_deflated), leak))
        tot["ops"] += ops
        tot["pages"] += pages
        tot["oom"] += r.oom_deflated
        tot["resets"] += r.resets
        tot["migr"] += len(r.migrations)
        for s in STORMS:
            tot_actions[s] += a[s]
    ta = tot_actions
    out.append("%-4s %6s %-6s %12s %9s %15s %5d %5d %5d %5d %5d %5d %5d %9s"
               % ("all", "", "ok" if all(g.r.ok for g in guests) else "FAILED",
                  _n(tot["ops"]), "", _n(tot["pages"]), ta["fast"], ta["slow"], ta["reverse"],
                  ta["stopcont"], ta["migrate"], ta["reset"], ta["oom"], _n(tot["oom"])))
    out.append("totals: %s ops, %s pages verified (%s MiB), %d host actions, %d QMP targets, "
               "%d migrations (%d hint rounds), %d device resets, %s pages deflated on OOM"
               % (_n(tot["ops"]), _n(tot["pages"]), _n(tot["pages"] * PAGE >> 20),
                  sum(ta.values()), sum(g.r.targets for g in guests), tot["migr"],
                  sum(g.r.hint_rounds for g in guests), tot["resets"], _n(tot["oom"])))
    for g in guests:
        if g.r.migrations:
            ms = g.r.migrations
            out.append("vm%d migrations: %s" % (g.index, ", ".join(
                "%d ms (downtime %d ms, %d MiB)" % (m["total_ms"], m["downtime_ms"],
                                                    m["ram_mib"]) for m in ms)))
        lat = g.r.latency
        if lat:
            parts = []
            for kind in ("inflate", "deflate", "report"):
                k = lat.get(kind)
                if isinstance(k, dict) and k.get("count"):
                    parts.append("%s %d requests p50 %s us p99 %s us max %s us"
                                 % (kind, k["count"], k.get("p50_us", "?"),
                                    k.get("p99_us", "?"), k.get("max_us", "?")))
            if parts:
                out.append("vm%d latency: %s" % (g.index, "; ".join(parts)))
    return out


def write_junit(path: str, guests: List[GuestRun], args: argparse.Namespace) -> None:
    suite = ET.Element("testsuite", name="blimp.stress", tests=str(len(guests)),
                       failures=str(sum(not g.r.ok for g in guests)))
    for g in guests:
        r = g.r
        tc = ET.SubElement(suite, "testcase", classname="blimp.stress",
                           name="vm%d-seed%d" % (r.index, r.seed), time="%.1f" % r.wall_s)
        if not r.ok:
            f = ET.SubElement(tc, "failure", message="; ".join(r.failures)[:500] or "failed")
            f.text = "\n".join(r.failures + ["replay: " + replay_command(args, r.seed), "",
                                             r.context])
        out = ET.SubElement(tc, "system-out")
        out.text = "actions %r, migrations %r, resets %d, oom pages %d, done %r" % (
            r.actions, r.migrations, r.resets, r.oom_deflated, r.done)
    ET.ElementTree(suite).write(path, encoding="unicode", xml_declaration=True)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stress", help="N guests in stress mode under host-side QMP storms",
                       description=__doc__.split("\n", 1)[1].strip(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vms", type=int, default=2, help="guests at once (2)")
    p.add_argument("--seed", type=int, default=1, help="guest i gets seed S+i (1)")
    bound = p.add_mutually_exclusive_group()
    bound.add_argument("--ops", type=int, default=None,
                       help="operations per guest (guest bound: blimp.stress.ops)")
    bound.add_argument("--seconds", type=float, default=None,
                       help="seconds of storm per guest, guest time (blimp.stress.ms); "
                            "default 20 unless --ops")
    p.add_argument("--memory", "-m", type=memory_arg, default="256M", help="per guest (256M)")
    p.add_argument("--machine", choices=MACHINES, default="q35")
    p.add_argument("--qemu", default=QEMU_BINARY, help="QEMU binary (qemu-system-x86_64)")
    p.add_argument("--kernel", default=DEFAULT_KERNEL)
    p.add_argument("--storm", default="all",
                   help="comma-separated storms of %s, or all (default: all the machine "
                        "supports)" % ",".join(STORMS))
    p.add_argument("--append", default="", help="more guest command line for every guest "
                                                 "(e.g. blimp.inject=stress_corrupt)")
    p.add_argument("--progress", type=float, default=3.0,
                   help="seconds between progress lines (3)")
    p.add_argument("--migrate", choices=("live", "paused"), default="live",
                   help="live: the guest runs while its RAM is copied (default); paused: QMP "
                        "stop first, cont on the destination (no hinting round then)")
    p.add_argument("--hint", choices=("on", "off"), default="on",
                   help="free-page-hint=on for the migrate storm (on)")
    p.add_argument("--serial-dir", default=None, metavar="DIR",
                   help="write each guest's serial console to DIR/vm<i>.log (all its QEMUs)")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="write every guest's result (events, actions, failures) as JSON")
    p.add_argument("--junit", default=None, metavar="FILE", help="write a JUnit XML report")
    p.add_argument("--verbose", "-v", action="store_true")
    p.set_defaults(func=run)


def parse_storms(spec: str, machine: str) -> List[str]:
    supported = MACHINE_STORMS[machine]
    if spec in ("all", ""):
        return list(supported)
    storms = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in storms if s not in STORMS]
    if bad:
        raise ValueError("unknown storm(s) %s (use %s or all)" % (",".join(bad), ",".join(STORMS)))
    unsupported = [s for s in storms if s not in supported]
    if unsupported:
        raise ValueError("machine %s does not support %s" % (machine, ",".join(unsupported)))
    return storms


def run(args: argparse.Namespace) -> int:
    if args.ops is None and args.seconds is None:
        args.seconds = 20.0
    if args.vms < 1:
        print("stress: --vms must be at least 1", file=sys.stderr)
        return 2
    try:
        storms = parse_storms(args.storm, args.machine)
    except ValueError as e:
        print("stress: %s" % e, file=sys.stderr)
        return 2
    args.storm = ",".join(storms)
    log = Log(args.verbose)
    log.say("%d guest(s) of %s on %s (TCG), seeds %d..%d, %s each, storms %s"
            % (args.vms, args.memory, args.machine, args.seed, args.seed + args.vms - 1,
               "%g s" % args.seconds if args.seconds else "%d ops" % args.ops, args.storm))
    if "migrate" in storms and args.migrate == "live":
        from .conform import host_kind   # one place knows the hosts ("reference", "qemu-7.2")
        if host_kind(args.qemu).startswith("qemu-7."):
            log.say("note: stock QEMU 7.x under TCG loses guest writes in live migration (its "
                    "dirty-bitmap sync: docs/design.md, \"Stress mode\"), which this run will "
                    "report as corruption; --qemu \"$(./blimp reference-host)\" has the fix, "
                    "--migrate paused avoids it")
    guests = [GuestRun(i, args, storms, log) for i in range(args.vms)]
    for g in guests:
        g.start()
    last = time.monotonic()
    try:
        while any(g.is_alive() for g in guests):
            for g in guests:
                g.join(timeout=0.2)
            if time.monotonic() - last >= args.progress:
                last = time.monotonic()
                for g in guests:
                    if g.phase != "ended":
                        log.say(progress_line(g))
    except KeyboardInterrupt:
        for g in guests:
            if g.session is not None:
                g.session.close()
        raise
    print()
    for line in summary(guests, args):
        print(line)
    failed = [g for g in guests if not g.r.ok]
    for g in failed:
        r = g.r
        print()
        print("FAILED vm%d (seed %d): %s" % (r.index, r.seed, r.outcome or "no outcome"))
        for f in r.failures or ["no stress_done from the guest"]:
            print("  " + f.replace("\n", "\n  "))
        print("  replay this guest alone: " + replay_command(args, r.seed))
        if args.verbose and r.context:
            print("  " + r.context.replace("\n", "\n  "))
    if args.junit:
        write_junit(args.junit, guests, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ok": not failed, "guests": [
                dict(asdict(g.r), replay=replay_command(args, g.r.seed)) for g in guests]},
                f, indent=1)
    print()
    print("stress: %s" % ("FAILED (%d of %d guests)" % (len(failed), len(guests)) if failed
                          else "ok: %d guests" % len(guests)))
    return 1 if failed else 0
