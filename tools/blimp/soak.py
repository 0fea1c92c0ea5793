"""soak: the balloon's wake-up scenarios, run after run, with CPU hogs beside them.

Every run boots a fresh guest in balloon mode on one machine face and gives it its first
balloon target at one host timing, the moments at which a target can reach a guest whose
interrupt path is not ready (or is slow) to hear it:

  faces     q35-modern (virtio-balloon-pci, modern; INTx: QEMU 7.2's balloon has no MSI-X),
            pc-legacy (disable-modern=on, blimp.virtio=legacy), microvm-mmio-v2
            (virtio-mmio.force-legacy=off), microvm-mmio-v1 (force-legacy=on)
  timings   paused          -S, the target over QMP, then cont
            ready           the target at the console's ready line
            qmp             the target as soon as QMP connects (the guest is still booting)
            hold-<step>     blimp.test.hold=<step>:300, the target when the guest says it holds
                            there (negotiate, driver_ok, routed; only with a kernel that has
                            the option)
            burst           from the ready line, 5-20 targets 1-20 ms apart, then a final one
            inflight        a guest that is up: a big target, then 2-5 ms later another (the
                            final one) while the first one's buffers are in flight

The run passes when query-balloon shows the final target and the guest logs balloon_reached
with that many pages, and then a second target (0) is reached the same way, each within
--target-timeout seconds.  Anything else is a failure: a target not reached in time (or a
guest gone silent) is a FREEZE; a guest that exits, does not boot or reports a protocol
problem is an ERROR.  At the end of a run the agent's ``state`` gives ``irq.missed`` (lost
interrupts the guest found and recovered from; a kernel without the counter leaves it
unknown).  Meanwhile --hogs busy processes compete for the CPUs.

For each freeze: the scenario, the run's seed, the command that replays it, what
query-balloon and the guest's agent said, whether a poke through the agent woke the guest,
and the last console lines.  A progress line every --progress seconds, then a table.
Exit status 0 only when every run passed.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

from . import guestlog
from .options import DEFAULT_KERNEL, memory_arg
from .qemu import QEMU_BINARY, parse_memory
from .session import PROBLEM_EVENTS, SESSION_ERRORS, BalloonSession, describe_failure
from .units import MiB, PAGE


@dataclass(frozen=True)
class Face:
    """A machine and the balloon transport the guest is to use on it."""
    machine: str
    balloon_opts: Tuple[str, ...]
    extra_args: Tuple[str, ...]
    append: Tuple[str, ...]
    transport: str            # what the guest's balloon_features must say


FACES: Dict[str, Face] = {
    "q35-modern": Face("q35", (), (), (), "virtio-pci-modern"),
    "pc-legacy": Face("pc", ("disable-modern=on",), (), ("blimp.virtio=legacy",),
                      "virtio-pci-legacy"),
    "microvm-mmio-v2": Face("microvm", (), ("-global", "virtio-mmio.force-legacy=off"), (),
                            "virtio-mmio-modern"),
    "microvm-mmio-v1": Face("microvm", (), ("-global", "virtio-mmio.force-legacy=on"), (),
                            "virtio-mmio-legacy"),
}
HOLD_STEPS = ("negotiate", "driver_ok", "routed")
BASE_TIMINGS = ("paused", "ready", "qmp")
TIMINGS = BASE_TIMINGS + tuple("hold-" + s for s in HOLD_STEPS) + ("burst", "inflight")
#: how long a hold-<step> run holds the guest at its step
HOLD_MS = 300
#: the kernel option hold-<step> needs; its name is a string in the image when it has it
HOLD_OPTION = b"blimp.test.hold"
#: seconds a guest may take to boot (to its ready line, hold event or agent)
BOOT_TIMEOUT_S = 30.0
#: query-balloon / console polling while waiting for a target
POLL_S = 0.005
#: at a freeze: how long the agent may take to answer, then to show the poke woke the guest
PROBE_S = 3.0
WAKE_S = 2.0
CONSOLE_TAIL = 15
#: a guest whose TSC rate (measured against the PIT at boot) is this far from the runs' median
#: keeps time wrongly: its holds, looks and timeouts last that much longer or shorter
TSC_OFF = 0.10


class Freeze(Exception):
    """A target was not reached in time: `details` says what the host and guest showed."""

    def __init__(self, reason: str, details: dict) -> None:
        super().__init__(reason)
        self.reason = reason
        self.details = details


class RunError(Exception):
    """Something other than a freeze went wrong in a run (the guest ended, ...)."""


@dataclass
class RunResult:
    index: int
    seed: int
    face: str
    timing: str
    status: str = "pending"                 # ok | freeze | error
    reason: str = ""
    targets_mib: List[int] = field(default_factory=list)   # every QMP target, in order
    final_mib: Optional[int] = None         # the first phase's final target
    first_ms: Optional[float] = None        # host time: final target (or cont) -> reached
    first_guest_ms: Optional[int] = None    # the guest's balloon_reached "ms"
    first_times: Optional[dict] = None      # query-balloon showed it / the event line came
    boot_ms: Optional[float] = None         # QEMU spawn -> the first target was sent
    tsc_khz: Optional[int] = None           # the guest's TSC rate, as it measured it at boot
    second_ms: Optional[float] = None       # the same for the second target (0)
    transport: str = ""
    irq: Optional[dict] = None              # the agent's state "irq" object at the end
    missed: Optional[int] = None            # irq.missed; None: unknown
    missed_events: int = 0                  # irq_missed events on the console
    hold: Optional[dict] = None             # the guest's hold event
    stopped: bool = False                   # --inject-stop: the runner stopped this VM
    lost_irq: bool = False                  # --inject-lose-irq: the agent's lose-irq before 0
    freeze: Optional[dict] = None           # what a freeze showed
    diagnosis: Optional[str] = None         # blimp.diagnose's report of a freeze
    diagnosis_case: Optional[str] = None    # its case: lost-wakeup, spinning, paused, ...
    console_tail: List[str] = field(default_factory=list)
    context: str = ""
    replay: str = ""
    wall_s: float = 0.0


# ------------------------------------------------------------------ scenarios

def scenario_order(faces: Sequence[str], timings: Sequence[str], runs: int, order: str,
                   seed: int) -> List[Tuple[str, str]]:
    """The (face, timing) of each run.  rr: every face within the first len(faces) runs,
    every timing within the first len(timings), every pair within len(faces)*len(timings)
    (pairs (i mod F, (i + block) mod T), shifted by one per lcm(F, T) block: the Chinese
    remainder theorem).  random: a seeded uniform choice per run."""
    nf, nt = len(faces), len(timings)
    if order == "random":
        rng = random.Random(seed * 1000003 + 17)
        return [(rng.choice(faces), rng.choice(timings)) for _ in range(runs)]
    g = nf
    b = nt
    while b:
        g, b = b, g % b
    lcm = nf * nt // g
    out = []
    for i in range(runs):
        j = i % (nf * nt)
        out.append((faces[j % nf], timings[(j + j // lcm) % nt]))
    return out


def kernel_has_hold(kernel: str) -> bool:
    """The image knows blimp.test.hold (its option table names it)."""
    try:
        with open(kernel, "rb") as f:
            return HOLD_OPTION + b"\0" in f.read()
    except OSError:
        return False


# ------------------------------------------------------------------ CPU hogs

class Hogs:
    """N busy processes (a shell loop each), killed by PID when done, whatever happens."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: List[subprocess.Popen] = []

    def start(self) -> Hogs:
        setpriv = shutil.which("setpriv")
        main = threading.current_thread() is threading.main_thread()
        for _ in range(self.n):
            argv = ["sh", "-c", "while :; do :; done"]
            if setpriv and main:
                # they die with us even if we are SIGKILLed
                argv = [setpriv, "--pdeathsig", "KILL", "--"] + argv
            self.procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                               stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL,
                                               start_new_session=True))
        atexit.register(self.stop)
        return self

    @property
    def pids(self) -> List[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.procs = []

    def __enter__(self) -> Hogs:
        return self.start()

    def __exit__(self, *exc: object) -> bool:
        self.stop()
        return False


# ------------------------------------------------------------------ one run

def _diagnose(session: BalloonSession) -> Optional[dict]:
    """blimp.diagnose's reading of a frozen guest ({"case", "verdict", "report"}), when that
    module exists (the harness branch writes it: ``diagnose(qemu, lines=...)`` returns a
    Diagnosis with ``case``, ``verdict`` and ``report()``); None without it."""
    if importlib.util.find_spec("blimp.diagnose") is None:
        return None
    try:
        from . import diagnose   # type: ignore[attr-defined]
        d = diagnose.diagnose(session.qemu, lines=session.lines)
        report = d.report() if hasattr(d, "report") else str(d)
        return {"case": getattr(d, "case", None), "verdict": getattr(d, "verdict", None),
                "report": report}
    except Exception as e:       # a diagnosis must never hide the freeze itself
        return {"case": "unknown", "verdict": None, "report": "diagnose failed: %r" % e}


class SoakRun:
    """One run: boot, targets at the scenario's timing, wait, check, end."""

    def __init__(self, index: int, face: str, timing: str, args: argparse.Namespace) -> None:
        self.index = index
        self.args = args
        self.seed = args.seed + index
        self.rng = random.Random(self.seed * 7919 + 3)
        self.face = FACES[face]
        self.timing = timing
        self.ram = parse_memory(args.memory)
        self.r = RunResult(index, self.seed, face, timing)
        self.r.stopped = index in (args.inject_stop or [])
        self.r.lost_irq = index in (args.inject_lose_irq or [])
        self.r.replay = replay_command(args, self.r)
        self.session: Optional[BalloonSession] = None
        self.pos = 0                          # console lines scanned for events
        self.t0 = time.monotonic()
        self.phase = "booting"

    # -------------------------------------------------------- guest and host sizes

    def append(self) -> str:
        words = list(self.face.append)
        if self.args.irq == "poll":
            words.append("blimp.irq=poll")
        if self.timing.startswith("hold-"):
            words.append("blimp.test.hold=%s:%d" % (self.timing[5:], HOLD_MS))
        if self.args.append:
            words.append(self.args.append)
        return " ".join(words)

    def size(self, lo: float, hi: float, avoid: Sequence[int] = ()) -> int:
        """A balloon size in whole MiB between lo and hi of RAM, not one of `avoid`."""
        ram_mib = self.ram // MiB
        while True:
            s = self.rng.randint(max(1, int(lo * ram_mib)), max(1, int(hi * ram_mib))) * MiB
            if s not in avoid:
                return s

    def target(self, size: int) -> None:
        self.session.balloon.set_size(size)
        self.r.targets_mib.append(size // MiB)

    # -------------------------------------------------------- waiting

    def wait_start(self, name: str, pred=None) -> dict:
        return self.session.wait_event(name, pred, timeout=BOOT_TIMEOUT_S)

    def wait_reached(self, size: int, since: int, t0: float, which: str) -> dict:
        """Wait until query-balloon shows a balloon of `size` and the guest logged
        balloon_reached with that many pages (from console line `since` on).  Returns
        {"ms": until both were seen, "query_ms": query-balloon first showed it, "console_ms":
        the event's line arrived, "event": the event}, times from t0 (host clock); Freeze at
        t0 + --target-timeout."""
        s = self.session
        q = s.qemu
        pages = size // PAGE
        deadline = t0 + self.args.target_timeout
        query_at: Optional[float] = None
        console_at: Optional[float] = None
        event: Optional[dict] = None
        pos = since
        while True:
            if query_at is None and s.balloon.size() == size:
                query_at = time.monotonic()
            if event is None:
                lines = s.lines
                for i in range(pos, len(lines)):
                    ev = guestlog.event_named(lines[i], "balloon_reached",
                                              lambda e: e.get("actual_pages") == pages)
                    if ev:
                        event = ev
                        console_at = (q.t_start or t0) + q.line_time(i)
                        break
                pos = len(lines)
            now = time.monotonic()
            if query_at is not None and event is not None:
                return {"ms": round((now - t0) * 1000, 1),
                        "query_ms": round((query_at - t0) * 1000, 1),
                        "console_ms": round(((console_at or now) - t0) * 1000, 1),
                        "event": event}
            if not s.running():
                raise RunError("the guest ended while the host waited for its %s target "
                               "(%d MiB)" % (which, size // MiB))
            if now >= deadline:
                raise self.freeze(size, since, which, query_at is not None, event)
            time.sleep(POLL_S)

    def freeze(self, size: int, since: int, which: str, host_seen: bool,
               event: Optional[dict]) -> Freeze:
        """What the host and the guest show at a freeze; the agent is poked last (its
        command is an interrupt: if the guest only slept through a lost wake-up, the
        poke wakes it, which says so)."""
        s = self.session
        q = s.qemu
        d: dict = {"which": which, "target_mib": size // MiB,
                   "timeout_s": self.args.target_timeout, "host_reached": host_seen,
                   "guest_reached": event is not None}
        try:
            d["query_balloon_mib"] = s.balloon.size() / MiB
        except SESSION_ERRORS as e:
            d["query_balloon_mib"] = None
            d["query_balloon_error"] = str(e)
        lines = s.lines
        d["console_lines_since_target"] = len(lines) - since
        if lines and q.t_start is not None:
            try:
                d["console_quiet_s"] = round(time.monotonic() - q.t_start
                                             - q.line_time(len(q.lines) - 1), 2)
            except IndexError:
                pass
        d["tail"] = lines[-CONSOLE_TAIL:]
        d["diagnosis"] = _diagnose(s)
        # the poke
        st = None
        try:
            agent = q.agent_client(timeout=PROBE_S)
            st = agent.cmd("state", timeout=PROBE_S)
        except SESSION_ERRORS as e:
            d["agent"] = "silent (%s)" % str(e).splitlines()[0]
        if st is not None:
            b = st.get("balloon", {})
            d["agent"] = "answered"
            d["guest_balloon"] = {k: b.get(k) for k in ("state", "target_pages", "actual_pages",
                                                         "inflate_buffers", "deflate_buffers")}
            d["guest_irq"] = st.get("irq")
            woke = None
            t = time.monotonic()
            while time.monotonic() - t < WAKE_S and q.running():
                try:
                    if s.balloon.size() == size:
                        woke = time.monotonic() - t
                        break
                except SESSION_ERRORS:
                    break
                time.sleep(POLL_S)
            d["woken_by_poke_ms"] = None if woke is None else round(woke * 1000, 1)
        reason = "%s target %d MiB not reached in %g s: %s" % (
            which, size // MiB, self.args.target_timeout, describe_freeze(d))
        return Freeze(reason, d)

    # -------------------------------------------------------- the run

    def first_phase(self) -> Tuple[int, int, float]:
        """Boot and give the first target at this run's timing: (final size, console
        mark before it, time from which it counts)."""
        s = self.session
        tm = self.timing
        if tm == "paused":
            size = self.size(0.25, 0.65)
            since = s.mark()
            self.target(size)
            time.sleep(self.rng.uniform(0.0, 0.02))
            s.qemu.qmp().execute("cont")
            return size, since, time.monotonic()
        if tm == "qmp":
            size = self.size(0.25, 0.65)
        elif tm == "ready" or tm == "burst":
            self.wait_start("ready")
            size = self.size(0.25, 0.65)
        elif tm.startswith("hold-"):
            step = tm[5:]
            self.r.hold = self.wait_start("hold", lambda e: e.get("step") == step)
            size = self.size(0.25, 0.65)
        elif tm == "inflight":
            self.wait_start("balloon_features")
            s.agent = s.qemu.agent_client(timeout=BOOT_TIMEOUT_S)
            big = self.size(0.6, 0.72)
            self.target(big)
            time.sleep(self.rng.uniform(0.002, 0.005))
            size = self.size(0.1, 0.4, avoid=(big,))
            since = s.mark()
            self.target(size)
            return size, since, time.monotonic()
        else:
            raise ValueError("unknown timing %r" % tm)
        if tm == "burst":
            sizes = []
            for _ in range(self.rng.randint(5, 20)):
                sizes.append(self.size(0.05, 0.7))
                self.target(sizes[-1])
                time.sleep(self.rng.uniform(0.001, 0.02))
            size = self.size(0.25, 0.65, avoid=sizes)
        since = s.mark()
        self.target(size)
        return size, since, time.monotonic()

    def execute(self) -> None:
        a = self.args
        f = self.face
        self.session = BalloonSession(
            a.kernel, machine=f.machine, memory=a.memory, accel="tcg", append=self.append(),
            balloon_opts=list(f.balloon_opts), extra_args=list(f.extra_args),
            paused=self.timing == "paused", qemu=a.qemu, boot_timeout=BOOT_TIMEOUT_S,
            timeout=BOOT_TIMEOUT_S + 2 * a.target_timeout + 60, context_lines=CONSOLE_TAIL)
        s = self.session
        s.start(wait_ready=False)
        self.phase = "first target"
        size, since, t0 = self.first_phase()
        if s.qemu.t_start is not None:
            self.r.boot_ms = round((t0 - s.qemu.t_start) * 1000, 1)
        self.r.final_mib = size // MiB
        if self.r.stopped:
            s.qemu.qmp().execute("stop")    # --inject-stop: this target can never be reached
        w = self.wait_reached(size, since, t0, "first")
        self.r.first_ms = w["ms"]
        self.r.first_times = {k: w[k] for k in ("query_ms", "console_ms")}
        self.r.first_guest_ms = w["event"].get("ms")
        self.phase = "second target"
        if self.r.lost_irq:
            # --inject-lose-irq: the guest masks its device line behind its loop's back; the
            # bounded look must find the target anyway (irq.missed > 0, not a freeze)
            s.agent = s.qemu.agent_client(timeout=BOOT_TIMEOUT_S)
            s.check("lose-irq", timeout=10)
        since = s.mark()
        t0 = time.monotonic()
        self.target(0)
        self.r.second_ms = self.wait_reached(0, since, t0, "second")["ms"]
        self.phase = "ending"
        s.agent = s.qemu.agent_client(timeout=BOOT_TIMEOUT_S)
        st = s.state()
        self.r.irq = st.get("irq")
        if isinstance(self.r.irq, dict) and isinstance(self.r.irq.get("missed"), int):
            self.r.missed = self.r.irq["missed"]
        self.scan()
        boot = s.events("boot")
        if boot and isinstance(boot[0].get("tsc_khz"), int):
            self.r.tsc_khz = boot[0]["tsc_khz"]
        feats = s.events("balloon_features")
        self.r.transport = str(feats[0].get("transport")) if feats else "?"
        problems = []
        if self.r.transport != f.transport:
            problems.append("the guest used %s, not %s" % (self.r.transport, f.transport))
        if self.timing.startswith("hold-") and self.r.hold.get("ms") != HOLD_MS:
            problems.append("hold event %r, expected ms %d" % (self.r.hold, HOLD_MS))
        bad = [e for e in s.events() if e["event"] in PROBLEM_EVENTS]
        if bad:
            problems.append("the guest reported %s" % bad)
        if problems:
            raise RunError("; ".join(problems))
        s.quit(timeout=15)

    def scan(self) -> None:
        """irq_missed events on the console so far."""
        s = self.session
        if s is None:
            return
        lines = s.lines
        for line in lines[self.pos:]:
            if guestlog.event_named(line, "irq_missed"):
                self.r.missed_events += 1
        self.pos = len(lines)

    def run(self) -> RunResult:
        try:
            self.execute()
            self.r.status = "ok"
        except Freeze as e:
            self.r.status = "freeze"
            self.r.reason = e.reason
            self.r.freeze = e.details
            diag = e.details.get("diagnosis")
            if diag:
                self.r.diagnosis = diag.get("report")
                self.r.diagnosis_case = diag.get("case")
        except (RunError,) + SESSION_ERRORS as e:
            self.r.status = "error"
            if self.session is not None:
                reason, context = describe_failure(self.session, e)
            else:
                reason, context = str(e), ""
            self.r.reason = reason.splitlines()[0] if reason else repr(e)
            self.r.context = context
        except Exception as e:        # a bug of ours must not stop the other runs
            self.r.status = "error"
            self.r.reason = "runner error: %r" % e
        finally:
            if self.session is not None:
                try:
                    self.scan()
                    self.r.console_tail = self.session.lines[-CONSOLE_TAIL:]
                    if self.r.status != "ok" and not self.r.context:
                        self.r.context = self.session.context(CONSOLE_TAIL)
                finally:
                    self.session.close()
            self.r.wall_s = round(time.monotonic() - self.t0, 2)
            self.phase = "ended"
        return self.r


def describe_freeze(d: dict) -> str:
    """One line: what the host saw, what the agent said, what the poke did."""
    parts = []
    q = d.get("query_balloon_mib")
    parts.append("query-balloon %s" % ("?" if q is None else "%g MiB" % q))
    parts.append("balloon_reached %s" % ("logged" if d.get("guest_reached") else "not logged"))
    if "console_quiet_s" in d:
        parts.append("console quiet %.1f s" % d["console_quiet_s"])
    agent = d.get("agent", "?")
    if agent == "answered":
        gb = d.get("guest_balloon") or {}
        parts.append("agent answered: guest target_pages %s actual_pages %s state %s"
                     % (gb.get("target_pages"), gb.get("actual_pages"), gb.get("state")))
        irq = d.get("guest_irq") or {}
        if irq:
            parts.append("irq mode %s device %s sleeps %s missed %s"
                         % (irq.get("mode"), irq.get("device"), irq.get("sleeps"),
                            irq.get("missed", "?")))
        w = d.get("woken_by_poke_ms")
        parts.append("the poke woke it: target reached %g ms later (a lost wake-up)" % w
                     if w is not None else "still not reached %g s after the poke" % WAKE_S)
    else:
        parts.append("guest silent: agent %s" % agent)
    return "; ".join(parts)


# ------------------------------------------------------------------ reports

def replay_command(args: argparse.Namespace, r: RunResult) -> str:
    cmd = ["./blimp", "soak", "--runs", "1", "-j", "1", "--seed", str(r.seed),
           "--faces", r.face, "--timings", r.timing, "--hogs", str(args.hogs),
           "--memory", args.memory, "--target-timeout", "%g" % args.target_timeout]
    if args.irq != "auto":
        cmd += ["--irq", args.irq]
    if r.stopped:
        cmd += ["--inject-stop", "0"]
    if r.lost_irq:
        cmd += ["--inject-lose-irq", "0"]
    if args.kernel != DEFAULT_KERNEL:
        cmd += ["--kernel", args.kernel]
    if args.qemu != QEMU_BINARY:
        cmd += ["--qemu", args.qemu]
    if args.append:
        cmd += ["--append", "'%s'" % args.append]
    return " ".join(cmd)


def percentile(xs: Sequence[float], p: float) -> Optional[float]:
    """Nearest-rank percentile (p in 0..100); None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else ("%.0f" % x)


def stats(results: Sequence[RunResult]) -> dict:
    firsts = [r.first_ms for r in results if r.first_ms is not None]
    seconds = [r.second_ms for r in results if r.second_ms is not None]
    tscs = [r.tsc_khz for r in results if r.tsc_khz]
    tsc_med = percentile(tscs, 50)
    return {
        "runs": len(results),
        "ok": sum(r.status == "ok" for r in results),
        "freezes": sum(r.status == "freeze" for r in results),
        "errors": sum(r.status == "error" for r in results),
        "missed_runs": sum((r.missed or 0) > 0 for r in results),
        "missed_unknown": sum(r.missed is None and r.status == "ok" for r in results),
        "missed_events_runs": sum(r.missed_events > 0 for r in results),
        # the guest found its line raised before it routed it (an early target, taken at
        # unmask): evidence that a timing really hit that window
        "raised_while_masked_runs": sum(
            isinstance(r.irq, dict) and (r.irq.get("raised_while_masked") or 0) > 0
            for r in results),
        "first_p50_ms": percentile(firsts, 50), "first_p99_ms": percentile(firsts, 99),
        "first_max_ms": max(firsts) if firsts else None,
        "second_p50_ms": percentile(seconds, 50), "second_p99_ms": percentile(seconds, 99),
        "second_max_ms": max(seconds) if seconds else None,
        "tsc_khz_median": tsc_med, "tsc_khz_min": min(tscs) if tscs else None,
        "tsc_khz_max": max(tscs) if tscs else None,
        "tsc_off_runs": [r.index for r in results if r.tsc_khz and tsc_med and
                         abs(r.tsc_khz - tsc_med) > TSC_OFF * tsc_med],
    }


def table(results: Sequence[RunResult], faces: Sequence[str],
          timings: Sequence[str]) -> List[str]:
    """Rows: timings; columns: faces (passed/runs); then per-timing totals and times to
    the first target; a last row per face."""
    w = max(12, max(len(f) for f in faces))
    head = "%-16s" % "timing" + "".join(" %*s" % (w, f) for f in faces) + \
        " | %5s %6s %6s %6s %7s %7s %7s" % ("runs", "freeze", "error", "missed",
                                             "p50 ms", "p99 ms", "max ms")
    out = [head]

    def cell(rs: Sequence[RunResult]) -> str:
        if not rs:
            return "-"
        ok = sum(r.status == "ok" for r in rs)
        return "%d/%d" % (ok, len(rs))

    def tail(rs: Sequence[RunResult]) -> str:
        st = stats(rs)
        return " | %5d %6d %6d %6d %7s %7s %7s" % (
            st["runs"], st["freezes"], st["errors"], st["missed_runs"],
            _ms(st["first_p50_ms"]), _ms(st["first_p99_ms"]), _ms(st["first_max_ms"]))

    for t in timings:
        rs = [r for r in results if r.timing == t]
        if not rs:
            continue
        out.append("%-16s" % t + "".join(
            " %*s" % (w, cell([r for r in rs if r.face == f])) for f in faces) + tail(rs))
    out.append("%-16s" % "all" + "".join(
        " %*s" % (w, cell([r for r in results if r.face == f])) for f in faces) +
        tail(results))
    return out


def write_junit(path: str, results: Sequence[RunResult]) -> None:
    suite = ET.Element("testsuite", name="blimp.soak", tests=str(len(results)),
                       failures=str(sum(r.status == "freeze" for r in results)),
                       errors=str(sum(r.status == "error" for r in results)))
    for r in results:
        tc = ET.SubElement(suite, "testcase", classname="blimp.soak.%s" % r.face,
                           name="run%d-%s-seed%d" % (r.index, r.timing, r.seed),
                           time="%.1f" % r.wall_s)
        if r.status != "ok":
            el = ET.SubElement(tc, "failure" if r.status == "freeze" else "error",
                               message=("%s: %s" % (r.status, r.reason))[:500])
            el.text = "\n".join(["replay: " + r.replay, ""] +
                                ([r.diagnosis] if r.diagnosis else []) +
                                ["last console lines:"] + r.console_tail +
                                ["", r.context])
        out = ET.SubElement(tc, "system-out")
        out.text = "targets %r MiB, first %s ms, second %s ms, transport %s, irq %r" % (
            r.targets_mib, r.first_ms, r.second_ms, r.transport, r.irq)
    ET.ElementTree(suite).write(path, encoding="unicode", xml_declaration=True)


def print_failure(r: RunResult, verbose: bool) -> None:
    print()
    print("%s run %d (seed %d): %s/%s: %s" % (r.status.upper(), r.index, r.seed, r.face,
                                             r.timing, r.reason))
    print("  targets (MiB, in order): %s" % (", ".join(map(str, r.targets_mib)) or "none"))
    print("  replay: " + r.replay)
    if r.diagnosis:
        print("  " + r.diagnosis.replace("\n", "\n  "))
    if r.console_tail:
        print("  last console lines:")
        for line in r.console_tail:
            print("    | " + line)
    if verbose and r.context:
        print("  " + r.context.replace("\n", "\n  "))


class Log:
    def __init__(self) -> None:
        self.lock = threading.Lock()

    def say(self, line: str) -> None:
        with self.lock:
            print("soak: " + line, flush=True)


# ------------------------------------------------------------------ the command

def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("soak", help="wake-up scenarios N times beside CPU hogs; freezes "
                                    "reported",
                       description=__doc__.split("\n", 1)[1].strip(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=200, help="runs (200)")
    p.add_argument("-j", "--jobs", type=int, default=2, help="guests at once (2)")
    p.add_argument("--hogs", type=int, default=os.cpu_count() or 1,
                   help="busy processes beside the guests (default: the CPUs, %d)"
                   % (os.cpu_count() or 1))
    p.add_argument("--seed", type=int, default=1, help="run i gets seed S+i (1)")
    p.add_argument("--seconds", type=float, default=None,
                   help="start no run after this many seconds (the runs started finish)")
    p.add_argument("--order", choices=("rr", "random"), default="rr",
                   help="rr: scenarios in turn, every pair once per round (default); random: "
                        "a seeded choice per run")
    p.add_argument("--faces", default="all",
                   help="comma-separated of %s, or all" % ",".join(FACES))
    p.add_argument("--timings", default="all",
                   help="comma-separated of %s, or all (hold-* only with a kernel that has "
                        "blimp.test.hold)" % ",".join(TIMINGS))
    p.add_argument("--irq", choices=("auto", "poll"), default="auto",
                   help="poll: the guests get blimp.irq=poll (the control)")
    p.add_argument("--memory", "-m", type=memory_arg, default="256M", help="per guest (256M)")
    p.add_argument("--target-timeout", type=float, default=20.0,
                   help="seconds each target may take before the run is a freeze (20)")
    p.add_argument("--inject-stop", type=int, action="append", default=None, metavar="RUN",
                   help="proves the detector: QMP stop on run RUN's VM right after its first "
                        "target (it is never reached: a freeze); repeatable")
    p.add_argument("--inject-lose-irq", type=int, action="append", default=None,
                   metavar="RUN",
                   help="proves the irq.missed count: before run RUN's second target the "
                        "agent's lose-irq masks the guest's device line (INTx/mmio faces); the "
                        "guest's bounded look must still reach it; repeatable")
    p.add_argument("--append", default="", help="more guest command line for every run")
    p.add_argument("--kernel", default=DEFAULT_KERNEL)
    p.add_argument("--qemu", default=QEMU_BINARY, help="QEMU binary (qemu-system-x86_64)")
    p.add_argument("--progress", type=float, default=5.0,
                   help="seconds between progress lines (5)")
    p.add_argument("--json", default=None, metavar="FILE", help="write every run as JSON")
    p.add_argument("--junit", default=None, metavar="FILE", help="write a JUnit XML report")
    p.add_argument("--verbose", "-v", action="store_true",
                   help="print each failure's full context (QEMU argv, agent transcript)")
    p.set_defaults(func=run)


def _pick(spec: str, known: Sequence[str], what: str) -> List[str]:
    if spec in ("all", ""):
        return list(known)
    picked = [x.strip() for x in spec.split(",") if x.strip()]
    bad = [x for x in picked if x not in known]
    if bad:
        raise ValueError("unknown %s %s (use %s or all)" % (what, ",".join(bad), ",".join(known)))
    return picked


def progress(done: List[RunResult], running: List[SoakRun], total: int, t0: float) -> str:
    st = stats(done)
    return ("%d/%d runs done, %d running, %.0f s: %d ok, %d freezes, %d errors; irq.missed > 0 "
            "in %d runs; first target p50 %s ms p99 %s ms"
            % (len(done), total, len(running), time.monotonic() - t0, st["ok"], st["freezes"],
               st["errors"], st["missed_runs"], _ms(st["first_p50_ms"]),
               _ms(st["first_p99_ms"])))


def run(args: argparse.Namespace) -> int:
    if args.runs < 1 or args.jobs < 1 or args.hogs < 0 or args.target_timeout <= 0:
        print("soak: --runs and -j must be at least 1, --hogs at least 0, --target-timeout "
              "positive", file=sys.stderr)
        return 2
    try:
        faces = _pick(args.faces, tuple(FACES), "face(s)")
        timings = _pick(args.timings, TIMINGS, "timing(s)")
    except ValueError as e:
        print("soak: %s" % e, file=sys.stderr)
        return 2
    if not os.path.isfile(args.kernel):
        print("soak: kernel image not found: %s" % args.kernel, file=sys.stderr)
        return 2
    log = Log()
    has_hold = kernel_has_hold(args.kernel)
    if not has_hold:
        holds = [t for t in timings if t.startswith("hold-")]
        timings = [t for t in timings if not t.startswith("hold-")]
        if holds and args.timings not in ("all", ""):
            print("soak: %s needs blimp.test.hold, which %s does not have"
                  % (",".join(holds), args.kernel), file=sys.stderr)
            return 2
        if not timings:
            print("soak: no timing left to run", file=sys.stderr)
            return 2
    order = scenario_order(faces, timings, args.runs, args.order, args.seed)
    log.say("%d runs, -j %d, %d CPU hogs, %s guests, irq %s, seeds %d..%d, target timeout "
            "%g s; faces %s; timings %s%s"
            % (args.runs, args.jobs, args.hogs, args.memory, args.irq, args.seed,
               args.seed + args.runs - 1, args.target_timeout, ",".join(faces),
               ",".join(timings), "" if has_hold else
               " (no hold-*: the kernel has no blimp.test.hold)"))
    lock = threading.Lock()
    next_index = [0]
    done: List[RunResult] = []
    running: List[SoakRun] = []
    t0 = time.monotonic()
    stop_starting = threading.Event()

    def worker() -> None:
        while not stop_starting.is_set():
            with lock:
                i = next_index[0]
                if i >= args.runs:
                    return
                if args.seconds is not None and time.monotonic() - t0 >= args.seconds:
                    return
                next_index[0] += 1
                face, timing = order[i]
                sr = SoakRun(i, face, timing, args)
                running.append(sr)
            r = sr.run()
            with lock:
                running.remove(sr)
                done.append(r)
            if r.status != "ok":
                log.say("run %d (seed %d) %s/%s: %s: %s" % (r.index, r.seed, r.face, r.timing,
                                                          r.status.upper(), r.reason))

    hogs = Hogs(args.hogs)
    threads = [threading.Thread(target=worker, name="soak-%d" % k, daemon=True)
               for k in range(min(args.jobs, args.runs))]
    try:
        hogs.start()
        if args.hogs:
            log.say("hogs: pids %s" % " ".join(map(str, hogs.pids)))
        for t in threads:
            t.start()
        last = time.monotonic()
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.2)
            if time.monotonic() - last >= args.progress:
                last = time.monotonic()
                with lock:
                    line = progress(list(done), list(running), args.runs, t0)
                log.say(line)
    finally:
        stop_starting.set()
        with lock:
            live = list(running)
        for sr in live:
            if sr.session is not None:
                sr.session.close()
        hogs.stop()
    wall = time.monotonic() - t0
    results = sorted(done, key=lambda r: r.index)
    print()
    for line in table(results, faces, timings):
        print(line)
    st = stats(results)
    print()
    print("runs %d of %d (ok %d, freezes %d, errors %d) in %.0f s wall, -j %d, %d hogs, irq %s"
          % (st["runs"], args.runs, st["ok"], st["freezes"], st["errors"], wall, args.jobs,
             args.hogs, args.irq))
    print("lost interrupts recovered: irq.missed > 0 in %d runs (unknown in %d: no missed "
          "field); irq_missed events in %d runs"
          % (st["missed_runs"], st["missed_unknown"], st["missed_events_runs"]))
    print("the device's line was already raised when the guest routed it in %d runs "
          "(irq.raised_while_masked > 0)" % st["raised_while_masked_runs"])
    print("time to the first target: p50 %s ms, p99 %s ms, max %s ms; to the second (0): "
          "p50 %s ms, p99 %s ms, max %s ms"
          % (_ms(st["first_p50_ms"]), _ms(st["first_p99_ms"]), _ms(st["first_max_ms"]),
             _ms(st["second_p50_ms"]), _ms(st["second_p99_ms"]), _ms(st["second_max_ms"])))
    if st["tsc_khz_median"]:
        off = st["tsc_off_runs"]
        print("guest TSC rate measured at boot: median %d kHz, min %d, max %d; %d runs more "
              "than %d %% off the median%s"
              % (st["tsc_khz_median"], st["tsc_khz_min"], st["tsc_khz_max"], len(off),
                 TSC_OFF * 100, "" if not off else " (runs %s%s: their guest clock, so its "
                 "holds, looks and timeouts, runs that much slow or fast)"
                 % (", ".join("%d: %d kHz" % (r.index, r.tsc_khz) for r in results
                              if r.index in off[:10]), ", ..." if len(off) > 10 else "")))
    cases: Dict[str, int] = {}
    for r in results:
        if r.status == "freeze" and r.diagnosis_case:
            cases[r.diagnosis_case] = cases.get(r.diagnosis_case, 0) + 1
    if cases:
        print("freezes by diagnosis (blimp.diagnose): " + ", ".join(
            "%s %d" % kv for kv in sorted(cases.items())))
    failed = [r for r in results if r.status != "ok"]
    for r in failed:
        print_failure(r, args.verbose)
    if args.junit:
        write_junit(args.junit, results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ok": not failed and len(results) > 0,
                       "config": {"runs": args.runs, "jobs": args.jobs, "hogs": args.hogs,
                                  "seed": args.seed, "irq": args.irq, "memory": args.memory,
                                  "faces": faces, "timings": timings, "order": args.order,
                                  "target_timeout_s": args.target_timeout,
                                  "hold_option": has_hold},
                       "summary": dict(st, wall_s=round(wall, 1)),
                       "runs": [asdict(r) for r in results]}, f, indent=1)
    print()
    if failed:
        print("soak: FAILED: %d freezes, %d errors in %d runs"
              % (st["freezes"], st["errors"], len(results)))
        return 1
    if not results:
        print("soak: no run finished")
        return 1
    print("soak: ok: %d runs, 0 freezes" % len(results))
    return 0
