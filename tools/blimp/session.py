"""The one balloon session: a running blimp guest with a virtio balloon, QMP and the agent.

    with BalloonSession("build/blimp.elf", machine="q35", memory="1G") as s:
        s.check("alloc 64M 7")                 # any agent command; ok:false raises
        r = s.resize(256 * MiB)                # QMP balloon, poll query-balloon, then the
        print(r.seconds, r.guest_ms)           #   guest's balloon_reached event
        s.check_balloon(256 * MiB)             # host and guest agree on it
        s.verify(pages=64 * MiB // PAGE)       # held memory intact
        s.check_no_violation()
        m = s.migrate()                        # live migration to a fresh QEMU; the session
        print(m.ram_transferred, m.total_time_ms)  #   goes on with the guest there
        s.verify()
        s.quit()                               # guest exit 0x10, QEMU status 33

demo, balloon, bench-balloon and the e2e tests all drive the guest through this class.
Every failure is a SessionError whose message carries the context (QEMU's state and
stderr, the serial tail, the agent transcript) captured when it happened; when the session
gives up on a silent guest (a target, an event or an agent reply that never came) it also
carries blimp.diagnose's verdict of why.  Leaving the ``with`` block always ends QEMU (by
PID).

Hosts do not wait for the guest: libvirt starts QEMU with -S, sets the balloon target over
QMP and then `cont`s, and a host may move the target while the guest's driver is still
coming up.  `start_mode` picks how much start() waits (START_MODES); `start_target` sets a
target right after QMP connects, before the guest has done anything:

    with BalloonSession(kernel, start_mode="paused", start_target=256 * MiB) as s:
        s.cont()                               # libvirt's start: target first, then run
        s.wait_balloon(256 * MiB)              # query-balloon and balloon_reached agree
        s.check("ping")                        # waits for the agent's ready line first

What the guest says at bring-up (`features`, `accepted`, `transport`, the agent's
readiness) is then waited for on first use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple, TypeVar

from . import exitcodes, guestlog
from .agent import Agent, AgentConnectionError, AgentError, AgentTimeout
from .balloon import DEFAULT_POLL_S, Balloon, BalloonAborted, BalloonTimeout
from .diagnose import Diagnosis, diagnose
from .qemu import HINT_IOTHREAD, Qemu, QemuError, SerialTimeout, free_page_hint_opts
from .qmp import QMPConnectionError, QMPError, QMPTimeout
from .units import GiB, PAGE, mib, page_round

T = TypeVar("T")

#: events that mean the host or the device misbehaved
PROBLEM_EVENTS = ("violation", "balloon_stalled", "device_needs_reset")
#: how long after query-balloon shows a target the guest may take to log reaching it
REACHED_EVENT_TIMEOUT_S = 10.0
#: migrate()'s default max-bandwidth: QEMU's own default (32 MiB/s) would make moving a few
#: GiB take minutes and measure the throttle, not what is sent
MIGRATION_BANDWIDTH = 10 * GiB
#: query-migrate states after which nothing more happens
MIGRATION_END_STATES = ("completed", "failed", "cancelled")
#: how start() begins.  "ready": return once the guest's balloon driver is up (its
#: balloon_features event) and its agent answers.  "immediate": return as soon as QEMU runs
#: and QMP and the agent's socket are connected, awaiting nothing the guest says, so the
#: first QMP action races the guest's bring-up.  "paused": QEMU starts with -S and start()
#: returns with the VM paused and QMP connected (cont() runs it), as libvirt does.
START_MODES = ("ready", "immediate", "paused")


class SessionError(Exception):
    """A step of a balloon session failed: `reason` says which, `context` what QEMU,
    the guest and the agent showed at that moment."""

    def __init__(self, reason: str, context: str = "",
                 diagnosis: Optional[Diagnosis] = None) -> None:
        super().__init__(reason + ("\n" + context if context else ""))
        self.reason = reason
        self.context = context
        self.diagnosis = diagnosis      # why the guest was silent, when the session gave up


#: what a session step can raise; callers that report any failure catch these
SESSION_ERRORS: Tuple[type, ...] = (
    SessionError, QemuError, AgentError, BalloonTimeout, QMPError, QMPTimeout,
    QMPConnectionError, guestlog.BadEvent, FileNotFoundError, ProcessLookupError, TimeoutError)


@dataclass
class Resize:
    """What one resize() saw."""
    size: int                  # balloon bytes asked for (page-rounded)
    previous: int              # balloon bytes before
    seconds: float             # from the QMP balloon command until query-balloon showed it
    polls: int                 # query-balloon calls that took
    reached: Optional[dict]    # the guest's balloon_reached event (None: size unchanged)

    @property
    def guest_ms(self) -> Optional[int]:
        """The guest's own time to reach the target, from its event."""
        return None if self.reached is None else self.reached.get("ms")


@dataclass
class Migration:
    """What one migrate() measured: the source's final query-migrate figures."""
    free_page_hint: bool       # the balloon device offered FREE_PAGE_HINT
    total_time_ms: int         # QEMU's total-time: migrate command to completion
    downtime_ms: int           # the guest was stopped this long
    setup_time_ms: int
    ram_transferred: int       # bytes sent for RAM (page data and per-page headers)
    ram_total: int             # bytes of guest RAM (plus ROMs) to migrate
    ram_normal: int            # pages sent with their data
    ram_duplicate: int         # zero pages, sent as a flag only
    mbps: float
    wall_s: float              # host clock, migrate command until query-migrate said completed
    switch_line: int           # the session's first serial line from the destination
    query: dict = field(repr=False, default_factory=dict)   # the whole query-migrate reply


class BalloonSession:
    """A blimp guest in balloon mode (its default) with a virtio-balloon device, QMP and
    the agent on COM2.  Construct, then start() it or use it as a context manager."""

    def __init__(self, kernel: Optional[str], *, machine: str = "q35", memory: str = "1G",
                 accel: str = "auto", append: str = "", balloon_opts: Sequence[str] = (),
                 timeout: float = 120.0, boot_timeout: float = 30.0,
                 serial_log: Optional[str] = None, context_lines: int = 15,
                 free_page_hint: bool = False, start_mode: str = "ready",
                 start_target: Optional[int] = None, **qemu_options: Any) -> None:
        """`timeout` is QEMU's hard deadline, `boot_timeout` how long the guest may take
        to bring up its balloon driver and agent, `serial_log` a file for the raw
        console, `context_lines` the serial tail that failure messages show,
        `free_page_hint` offers FREE_PAGE_HINT (with the iothread QEMU needs for it).
        `start_mode` is one of START_MODES; `start_target` a balloon size in bytes asked
        for (QMP balloon) as soon as QMP connects, before the guest runs when paused.
        Further keywords (smp, machine_opts, extra_args, ...) go to Qemu; Qemu's own
        `paused=True`, as callers passed it before start modes, means start_mode="paused"."""
        if qemu_options.pop("paused", False):
            if start_mode not in ("ready", "paused"):
                raise ValueError("paused=True contradicts start_mode=%r" % start_mode)
            start_mode = "paused"
        if start_mode not in START_MODES:
            raise ValueError("start_mode must be one of %s, not %r" % (START_MODES, start_mode))
        opts = list(balloon_opts)
        if free_page_hint:
            opts += free_page_hint_opts()
            qemu_options.setdefault("iothread", HINT_IOTHREAD)
        self.qemu = Qemu(kernel, machine=machine, memory=memory, accel=accel,
                         append=append or None, balloon=True, balloon_opts=opts,
                         agent=True, timeout=timeout, serial_log=serial_log,
                         paused=start_mode == "paused", **qemu_options)
        self.ram = self.qemu.memory_bytes
        self.boot_timeout = boot_timeout
        self.serial_log = serial_log
        self.context_lines = context_lines
        self.start_mode = start_mode
        self.start_target = start_target
        self.paused = False             # started paused and not cont()ed yet
        self.agent: Optional[Agent] = None      # connected; see _ready_agent()
        self._balloon: Optional[Balloon] = None
        self._features: Optional[dict] = None  # the driver's balloon_features event
        # serial lines of the QEMUs the guest has migrated away from: session line numbers
        # (mark, since) run on through the destination's lines
        self._earlier_lines: List[str] = []
        self.migrations: List[Migration] = []

    # ------------------------------------------------------------ lifetime

    def start(self, wait_ready: bool = True) -> BalloonSession:
        """Boot, connect QMP and the agent's socket, ask for `start_target` if given, and
        return as `start_mode` says: "ready" once the balloon driver is up and the agent
        answers, "immediate" at once, "paused" at once with the VM not yet run.  Without
        `wait_ready` a "ready" session starts as "immediate" (a mode that is not balloon
        mode: conform waits for nothing the guest says)."""
        self.qemu.start()
        try:
            # connect first: what the guest sends on COM2 before that is lost
            self.agent = self.qemu.agent_client(timeout=self.boot_timeout, ready=False)
            self._balloon = Balloon.of(self.qemu)
            self.paused = self.start_mode == "paused"
            if self.start_target is not None:
                self._balloon.set_size(self.start_target)
            if wait_ready and self.start_mode == "ready":
                self.wait_ready()
        except SESSION_ERRORS + (ValueError,) as e:
            reason = "the guest did not come up: %s" % _reason(e)
            if isinstance(e, SessionError):
                failure = SessionError(reason, e.context, e.diagnosis)
            else:
                failure = self.failure(reason)
            self.close()
            raise failure from None
        return self

    def wait_ready(self) -> BalloonSession:
        """Wait until the balloon driver is up (its balloon_features event) and the agent
        answers: what a "ready" start does before returning, for the other modes."""
        self._features_event()
        self._ready_agent()
        return self

    def cont(self) -> None:
        """Run a VM started with start_mode="paused" (QMP cont): the guest boots now."""
        try:
            self.qemu.qmp().execute("cont")
        except (QMPError, QMPTimeout, QMPConnectionError, QemuError) as e:
            raise self.failure("cont: %s" % e) from None
        self.paused = False

    def close(self) -> None:
        """End QEMU if it still runs, close the clients and remove the temp dir."""
        self.qemu.close()

    def __enter__(self) -> BalloonSession:
        return self.start()

    def __exit__(self, *exc: object) -> bool:
        self.close()
        return False

    def running(self) -> bool:
        return self.qemu.running()

    @property
    def balloon(self) -> Balloon:
        """The QMP side of the balloon: sizes, waits, QEMU's RSS, guest stats."""
        if self._balloon is None:
            raise self.failure("the session is not started")
        return self._balloon

    def _still_paused(self) -> bool:
        """Started paused and not run since (a cont over raw QMP counts too): nothing the
        guest would say can come."""
        if self.paused:
            try:
                self.paused = not self.qemu.qmp().execute("query-status").get("running")
            except SESSION_ERRORS:
                pass
        return self.paused

    @property
    def features(self) -> dict:
        """The driver's balloon_features event (waited for on first use)."""
        return self._features_event()

    def _features_event(self) -> dict:
        if self._features is None:
            if self._still_paused():
                raise self.failure("balloon_features: the VM is paused (cont() it first)")
            self._features = self.wait_event("balloon_features", timeout=self.boot_timeout)
        return self._features

    @property
    def accepted(self) -> int:
        """The feature bits the driver accepted."""
        return int(self.features.get("accepted", 0))

    @property
    def transport(self) -> str:
        return str(self.features.get("transport", "?"))

    # ------------------------------------------------------------ failures

    def failure(self, reason: str) -> SessionError:
        """A SessionError for `reason` with the context as of now (raise it)."""
        return SessionError(reason, self.context())

    def gave_up(self, reason: str) -> SessionError:
        """A SessionError for a guest that went silent (raise it): the reason ends with
        blimp.diagnose's verdict of why, and the context starts with its facts.  Takes
        about a second (two samples of the vCPU and the device)."""
        d = self.diagnose()
        return SessionError("%s; %s" % (reason, d.verdict), d.report() + "\n" + self.context(),
                            d)

    def diagnose(self) -> Diagnosis:
        """Why the guest is silent now (blimp.diagnose; never raises)."""
        return diagnose(self.qemu, lines=self.lines)

    def context(self, lines: Optional[int] = None) -> str:
        """QEMU's command line, state and stderr, the serial tail and the agent's
        transcript: what a failure message needs."""
        q = self.qemu
        out = ["argv: " + " ".join(q.build_argv())] if q.tmpdir else []
        out.append(self._qemu_state())
        err = "\n".join(l for l in q.stderr.strip().splitlines()
                        if "terminating on signal" not in l)
        if err:
            out.append("QEMU stderr: " + err[-1500:])
        if self.serial_log:
            out.append("serial log: " + self.serial_log)
        if self.migrations:
            out.append("migrated %d time(s); serial lines from %d on are the current QEMU's"
                       % (len(self.migrations), len(self._earlier_lines)))
        tail = self.lines[-(lines or self.context_lines):]
        if tail:
            out.append("last guest console lines:\n" + "\n".join("    | " + l for l in tail))
        if self.agent is not None and self.agent.transcript:
            out.append("agent transcript (last 10):\n" + "\n".join(
                "    " + l for l in self.agent.transcript[-10:]))
        return "\n".join(out)

    def _qemu_state(self) -> str:
        q = self.qemu
        if q.proc is None:
            return "QEMU not started"
        if q.running():
            return "QEMU running (pid %d)" % q.pid
        try:
            q.wait(timeout=2)
            return "QEMU ended: " + q.outcome.describe()
        except QemuError as e:
            return "QEMU ended: %s" % e

    # ------------------------------------------------------------ serial events

    @property
    def lines(self) -> List[str]:
        """The guest's serial console so far, across migrations: the lines of every QEMU
        it left, then the current QEMU's."""
        return self._earlier_lines + self.qemu.lines

    def mark(self) -> int:
        """The serial position now: pass it as `since` to see only what comes after.
        Marks stay valid across migrate(): lines are numbered over the whole session."""
        return len(self._earlier_lines) + len(self.qemu.lines)

    def wait_lines(self, since: int, timeout: float) -> List[str]:
        """The serial lines from session line `since` on, waiting up to `timeout` s for
        at least one; [] if none came (or QEMU has exited: see running())."""
        if self.mark() <= since:
            try:
                self.qemu.wait_line(lambda line: True, timeout=timeout,
                                    start=max(0, since - len(self._earlier_lines)))
            except QemuError:          # SerialTimeout, or QemuExited
                pass
        return self.lines[since:]

    def events(self, name: Optional[str] = None, since: int = 0) -> List[dict]:
        """The guest's events on serial (from line `since` on), optionally only `name`."""
        return guestlog.events(self.lines[since:], name)

    def wait_event(self, name: str, predicate: Optional[Callable[[dict], bool]] = None,
                   timeout: float = 10.0, since: int = 0) -> dict:
        """The first event `name` from serial line `since` on for which predicate holds
        (fields are tested on the parsed JSON), waiting up to `timeout` s for it."""
        for line in self._earlier_lines[since:]:       # what earlier QEMUs printed
            ev = guestlog.event_named(line, name, predicate)
            if ev:
                return ev
        try:
            return self.qemu.wait_event(name, predicate, timeout=timeout,
                                        start=max(0, since - len(self._earlier_lines)))
        except SerialTimeout as e:
            raise self.gave_up(str(e)) from None
        except QemuError as e:
            raise self.failure(str(e)) from None

    def check_no_violation(self) -> None:
        bad = [e for e in self.events() if e["event"] in PROBLEM_EVENTS]
        if bad:
            raise self.failure("guest reported %s" % bad)

    # ------------------------------------------------------------ agent

    def cmd(self, line: str, timeout: float = 60.0) -> dict:
        """Send one agent command line; its JSON reply (``ok`` may be false).  Sent only
        once the agent has said it is ready (see _ready_agent)."""
        agent = self._ready_agent("agent %r" % line)
        try:
            return agent.cmd(line, timeout)
        except AgentTimeout as e:
            raise self.gave_up("agent %r: %s" % (line, e)) from None
        except AgentError as e:
            raise self.failure("agent %r: %s" % (line, e)) from None

    def _ready_agent(self, what: str = "agent") -> Agent:
        """The agent, once it has said it listens (agent_ready, or a ping answered):
        bytes sent to the guest's UART before its agent drains it can be lost, so a
        host-first session waits for that here, on first use, not in start()."""
        if self.agent is None:
            raise self.failure("%s: the session is not started" % what)
        if not self.agent.ready:
            if self._still_paused():
                raise self.failure("%s: the VM is paused (cont() it first)" % what)
            try:
                self.agent.wait_ready(self.boot_timeout)
            except AgentTimeout as e:
                raise self.gave_up("%s: %s" % (what, e)) from None
            except AgentError as e:
                raise self.failure("%s: %s" % (what, e)) from None
        return self.agent

    def check(self, line: str, timeout: float = 60.0) -> dict:
        """cmd(), but a reply without ``ok: true`` is a failure."""
        r = self.cmd(line, timeout)
        if r.get("ok") is not True:
            raise self.failure("agent %r failed: %r" % (line, r))
        return r

    def state(self, timeout: float = 10.0) -> dict:
        """The agent's state snapshot: mm, held, balloon."""
        return self.check("state", timeout)

    def verify(self, what: str = "all", pages: Optional[int] = None,
               timeout: float = 120.0) -> dict:
        """The guest re-checks every word of held memory `what` (an id or all); any bad
        page, or a page count other than `pages` (if given), is a failure."""
        r = self.cmd("verify %s" % what, timeout)
        if r.get("ok") is not True or r.get("bad_pages") != 0:
            raise self.failure("guest memory corrupted: %r (first bad word at %#x holds %#x)"
                               % (r, r.get("first_bad") or 0, r.get("found") or 0))
        if pages is not None and r.get("pages") != pages:
            raise self.failure("verify %s covered %r pages, expected %d"
                               % (what, r.get("pages"), pages))
        return r

    def touch_free_memory(self, size: int, seed: int = 99, timeout: float = 300.0) -> dict:
        """Make the guest write `size` bytes of its free memory and free them again, so
        that the host really backs that memory; the alloc reply."""
        r = self.cmd("alloc %d %d" % (size, seed), timeout)
        if r.get("ok") is not True:
            raise self.failure("guest could not allocate %s to touch it: %s" % (mib(size), r))
        self.check("free %d" % r["id"])
        return r

    def in_use(self) -> int:
        """Bytes of RAM the guest does not have free: RAM minus its allocator's free pages,
        so held data, the kernel and memory the allocator does not manage all count."""
        return self.ram - self.state()["mm"]["free_pages"] * PAGE

    def quit(self, code: int = exitcodes.SUCCESS, timeout: float = 15.0) -> exitcodes.Outcome:
        """Ask the guest to exit with `code`; a failure unless QEMU then exits with
        code * 2 + 1."""
        self.check("quit %d" % code, 10.0)
        self.qemu.wait(timeout=timeout)
        outcome = self.qemu.outcome
        if outcome.kind != exitcodes.GUEST or outcome.code != code:
            raise self.failure("after quit %d: %s, expected QEMU status %d"
                               % (code, outcome.describe(), exitcodes.qemu_status(code)))
        return outcome

    # ------------------------------------------------------------ balloon

    def balloon_size(self) -> int:
        """Bytes in the balloon now, as QEMU's query-balloon says."""
        return self.balloon.size()

    def resize(self, balloon_bytes: int, timeout: float = 60.0, poll: float = DEFAULT_POLL_S,
               stop_if_exhausted: bool = True) -> Resize:
        """Ask for a balloon of `balloon_bytes` (QMP balloon), poll query-balloon until it
        shows it, then wait for the guest's balloon_reached event for that many pages.
        With `stop_if_exhausted`, the guest saying it has no more memory to give ends
        the wait at once (a failure)."""
        balloon = self.balloon
        previous = balloon.size()
        since = self.mark()
        abort = self._exhausted_since(since) if stop_if_exhausted else None
        size = page_round(balloon_bytes)
        # timed from just before the QMP command
        seconds = self._balloon_wait(lambda: balloon.resize(size, timeout, poll, abort=abort))
        reached = None
        if size != previous:     # an unchanged target gives the guest nothing to report
            reached = self._reached(size, since)
        return Resize(size, previous, seconds, balloon.polls, reached)

    def wait_balloon(self, balloon_bytes: int, timeout: float = 60.0,
                     poll: float = DEFAULT_POLL_S, since: int = 0,
                     stop_if_exhausted: bool = True) -> Resize:
        """Wait, without asking for anything, until query-balloon shows a balloon of
        `balloon_bytes` and the guest has logged balloon_reached for that many pages
        (from serial line `since` on): for a target someone set before (start_target,
        a raw QMP balloon).  The guest logs reaching every target it is given, its first
        one at boot included.  `previous` in the result is the size at the first poll."""
        balloon = self.balloon
        size = page_round(balloon_bytes)
        abort = self._exhausted_since(since) if stop_if_exhausted else None
        previous = self._balloon_wait(balloon.size)
        seconds = self._balloon_wait(lambda: balloon.wait_size(size, timeout, poll, abort=abort))
        return Resize(size, previous, seconds, balloon.polls, self._reached(size, since))

    def _balloon_wait(self, step: Callable[[], T]) -> T:
        """A QMP balloon step; its errors as session failures, a timeout diagnosed."""
        try:
            return step()
        except BalloonAborted as e:
            raise self.failure(str(e)) from None
        except (BalloonTimeout, QMPTimeout) as e:
            raise self.gave_up(str(e)) from None
        except (QMPError, QMPConnectionError, ValueError) as e:
            raise self.failure(str(e)) from None

    def _reached(self, size: int, since: int) -> dict:
        """The guest's balloon_reached event for a balloon of `size` bytes."""
        pages = size // PAGE
        return self.wait_event("balloon_reached", lambda ev: ev.get("actual_pages") == pages,
                               timeout=REACHED_EVENT_TIMEOUT_S, since=since)

    def check_balloon(self, balloon_bytes: int) -> dict:
        """query-balloon, the guest's state and the target all say `balloon_bytes`, and
        the balloon runs; returns the guest's state."""
        pages = balloon_bytes // PAGE
        host = self.balloon_size()
        st = self.state()
        b = st["balloon"]
        problems = []
        if host != balloon_bytes:
            problems.append("query-balloon: balloon %s" % mib(host))
        for key in ("target_pages", "actual_pages", "held_pages"):
            if b.get(key) != pages:
                problems.append("guest %s %r" % (key, b.get(key)))
        if b.get("state") != "running":
            problems.append("balloon state %r" % b.get("state"))
        if problems:
            raise self.failure("expected a balloon of %s (%d pages): %s"
                               % (mib(balloon_bytes), pages, "; ".join(problems)))
        return st

    # ------------------------------------------------------------ live migration

    def migrate(self, max_bandwidth: int = MIGRATION_BANDWIDTH,
                downtime_limit_ms: Optional[int] = None, timeout: float = 120.0,
                poll: float = 0.02, paused: bool = False) -> Migration:
        """Live-migrate the guest to a new QEMU and carry on there.

        Starts a destination like the current QEMU (Qemu.migration_destination: same
        machine, -m, devices and ids, iothread, kernel; its own sockets), sets the
        source's max-bandwidth (and downtime-limit, if given), runs ``migrate`` over a
        unix socket and polls query-migrate until it is completed.  Then the session
        switches: `qemu`, the QMP `balloon` helper and the agent talk to the destination,
        and the source (paused in postmigrate) is shut down.  The guest's serial lines go
        on in `lines` after the source's, so marks taken before stay valid.  Whether free
        pages are hinted is the device's choice at boot (free_page_hint=True).
        If the migration fails or the destination does not run the guest, the
        destination is closed and the session stays on the source (a SessionError).
        `paused`: QMP stop on the source first and cont on the destination after (not live:
        the guest does not run while its RAM is copied)."""
        source = self.qemu
        if self.agent is None or self._balloon is None:
            raise self.failure("migrate: the session is not started")
        dest = source.migration_destination(serial_log=self.serial_log)
        try:
            dest.start()
            uri = dest.accept_migration(timeout=self.boot_timeout)
            # connect before the guest runs there: nothing it writes on COM2 is lost
            dest.agent_client(timeout=self.boot_timeout, ready=False)
            if paused:
                source.qmp().execute("stop")
            result = self._run_migration(uri, max_bandwidth, downtime_limit_ms, timeout, poll)
            self._wait_running(dest, timeout=self.boot_timeout, cont=paused)
            try:
                agent = dest.agent_client(timeout=self.boot_timeout)     # answers a ping
            except AgentConnectionError:
                # Seen with conform mode: the destination closed the agent connection made
                # before the migration. Mostly the guest had died there (the reason then
                # names it); a live destination's chardev is a server: connect again, once.
                dest.drop_agent_client()
                agent = dest.agent_client(timeout=self.boot_timeout)
            balloon = Balloon.of(dest)
        except SESSION_ERRORS as e:
            reason = "migration failed: %s" % _reason(e)
            if dest.proc is not None and not dest.running():
                dest.wait(timeout=2)           # its stderr read to the end
                reason += " (destination: %s)" % dest.outcome.describe()
            dest_err = dest.stderr.strip()
            if self.serial_log and dest.lines:
                # the source, resumed, may write over what the destination appended
                path = self.serial_log + ".failed-destination"
                with open(path, "w") as f:
                    f.write("\n".join(dest.lines) + "\n")
                reason += " (the destination's console: %s)" % path
            dest.close()
            tail = dest.lines[-8:]
            if tail:
                reason += "\ndestination's console (last lines):\n" + "\n".join(
                    "    | " + l for l in tail)
            raise self.failure(reason + ("\ndestination QEMU stderr: " + dest_err[-1500:]
                                         if dest_err else "")) from None
        except BaseException:
            dest.close()
            raise
        # the source is paused for good now; closing it flushes a partial last line
        source.close()
        moved = source.lines
        if source.ended_mid_line and moved:
            # the guest was inside a line when it stopped there: it goes on on the destination
            dest.continue_line(moved.pop())
        self._earlier_lines += moved
        result.switch_line = len(self._earlier_lines)
        self.qemu, self.agent, self._balloon = dest, agent, balloon
        self.migrations.append(result)
        return result

    def _run_migration(self, uri: str, max_bandwidth: int, downtime_limit_ms: Optional[int],
                       timeout: float, poll: float) -> Migration:
        """Migrate the current QEMU to `uri`; the completed query-migrate's figures."""
        qmp = self.qemu.qmp()
        params: dict = {"max-bandwidth": int(max_bandwidth)}
        if downtime_limit_ms is not None:
            params["downtime-limit"] = int(downtime_limit_ms)
        qmp.execute("migrate-set-parameters", **params)
        t0 = time.monotonic()
        qmp.execute("migrate", uri=uri)
        deadline = t0 + timeout
        while True:
            info = qmp.execute("query-migrate")
            status = info.get("status")
            if status in MIGRATION_END_STATES:
                break
            if time.monotonic() >= deadline:
                qmp.execute("migrate_cancel")
                ram = info.get("ram", {})
                raise self.failure("migration still %r after %.0f s (%s of %s sent, %s left)"
                                   % (status, timeout, mib(ram.get("transferred", 0)),
                                      mib(ram.get("total", 0)), mib(ram.get("remaining", 0))))
            time.sleep(poll)
        wall = time.monotonic() - t0
        if status != "completed":
            raise self.failure("migration %s: %s" % (status, info.get("error-desc", "no reason")))
        ram = info["ram"]
        return Migration(free_page_hint=self.qemu.free_page_hint,
                         total_time_ms=info["total-time"], downtime_ms=info["downtime"],
                         setup_time_ms=info["setup-time"], ram_transferred=ram["transferred"],
                         ram_total=ram["total"], ram_normal=ram["normal"],
                         ram_duplicate=ram["duplicate"], mbps=ram.get("mbps", 0.0),
                         wall_s=wall, switch_line=-1, query=info)

    def _wait_running(self, dest: Qemu, timeout: float, cont: bool = False) -> None:
        """The destination has loaded the guest and runs it (QEMU starts it by itself
        after an incoming migration completes; with `cont`, the source was paused and the
        destination is resumed here once it has loaded the guest)."""
        qmp = dest.qmp()
        deadline = time.monotonic() + timeout
        while True:
            status = qmp.execute("query-status")
            if status.get("running"):
                return
            if cont and status.get("status") == "paused":
                qmp.execute("cont")
                continue
            if status.get("status") in ("inmigrate-failed", "internal-error", "shutdown") \
                    or time.monotonic() >= deadline:
                raise QemuError("the destination is %r, not running the guest"
                                % status.get("status"))
            time.sleep(0.02)

    def _exhausted_since(self, since: int) -> Callable[[], Optional[str]]:
        """An `abort` callback for balloon waits: the guest logged balloon_exhausted
        (it has no more memory to give) at serial line `since` or later."""
        def exhausted() -> Optional[str]:
            found = self.events("balloon_exhausted", since)
            if found:
                return "the guest has no more memory to give (%s)" % found[0]
            return None
        return exhausted


def _reason(e: BaseException) -> str:
    return e.reason if isinstance(e, SessionError) else str(e)


def describe_failure(session: BalloonSession, e: Exception) -> Tuple[str, str]:
    """(reason, context) of a failure from a session step: a SessionError carries its
    own; for anything else the session's context now."""
    if isinstance(e, SessionError):
        return e.reason, e.context
    return str(e), session.context()
