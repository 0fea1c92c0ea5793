"""conform: run blimp's conformance mode against host configurations (docs/conformance.md).

    python3 -m blimp conform                          # the quick matrix
    python3 -m blimp conform --matrix full -j 2       # every configuration, two at a time
    python3 -m blimp conform --machine pc --transport legacy --device-opts deflate-on-oom=on
    python3 -m blimp conform --list

Each configuration boots the guest with ``blimp.mode=conform blimp.conform.host=1`` (128 MiB
unless the configuration or --memory says otherwise, the agent on COM2, the balloon as ``balloon0``), reads its serial console live, answers every
``conform_request`` (target, rss, stats_interval, stats_read, migrate) with an ``ack``/``nack``
line on the agent channel, collects the TAP and the ``conform_check`` events and waits for the
guest to exit.  A configuration passes if the guest exits 0x10, or exits 0x11 and every
``not ok`` point is a known deviation of its host (KNOWN_DEVIATIONS).  Writes the TAP per
configuration (--tap-dir), the serial logs next to it, and JUnit XML (--junit).

The protocol logic (Responder, parse_points, evaluate, junit_xml) is independent of QEMU:
tests/e2e/test_conform_runner.py feeds it a fake event stream.
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import re
import sys
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from . import exitcodes, guestlog, latency, refhost
from .balloon import rss_of
from .options import DEFAULT_KERNEL, REPO
from .qemu import ACCELS, MACHINES, QEMU_BINARY, parse_memory, qemu_version
from .session import SESSION_ERRORS, BalloonSession
from .units import PAGE

#: the guest's RAM unless a configuration (or --memory) says otherwise: the runner needs it for
#: `target` (QMP balloon value = RAM - pages * 4096)
RAM = "128M"
RAM_BYTES = parse_memory(RAM)
#: RAM of the high-memory configurations: q35 puts RAM beyond 2 GiB (pc: 3.5 GiB) at 4 GiB, so
#: the guest places isolated pages above 4 GiB too, and their 32-bit aliases are pages it watches
HIGH_RAM = "6G"
#: hard deadline of one configuration, boot to exit (migration included)
CONFIG_TIMEOUT = 120.0
#: the guest options every configuration gets
CONFORM_APPEND = "blimp.mode=conform blimp.conform.host=1"
DEFAULT_OUT = os.path.join(REPO, "build", "conform")

HOST_STOCK = "qemu-7.2"
HOST_REFERENCE = "reference"
#: the pseudo check id of a live migration that completed but left the guest broken on the
#: destination (it died, hung or ran on without its answer): the runner sees that, not the guest
MIGRATION_CHECK = "migration"

#: transport -> (balloon device properties, extra QEMU args, guest options, the transport
#: name the guest's virtio_device event must show)
TRANSPORTS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...], Tuple[str, ...], str]] = {
    "legacy": (("disable-modern=on",), (), ("blimp.virtio=legacy",), "virtio-pci-legacy"),
    "transitional-legacy": ((), (), ("blimp.virtio=legacy",), "virtio-pci-legacy"),
    "transitional-modern": ((), (), ("blimp.virtio=modern",), "virtio-pci-modern"),
    "modern": (("disable-legacy=on",), (), ("blimp.virtio=modern",), "virtio-pci-modern"),
    # microvm's transports are version 1 unless force-legacy is off (QEMU 7.2 virtio-mmio.c)
    "mmio-v1": ((), (), ("blimp.virtio=legacy",), "virtio-mmio-legacy"),
    "mmio-v2": ((), ("-global", "virtio-mmio.force-legacy=false"), ("blimp.virtio=modern",),
                "virtio-mmio-modern"),
}
PCI_TRANSPORTS = ("legacy", "transitional-legacy", "transitional-modern", "modern")
MMIO_TRANSPORTS = ("mmio-v1", "mmio-v2")

#: device feature sets: (device properties, free page hinting, guest options).
#: `all`: everything QEMU 7.2 can offer (stats is always offered; page-poison is on by
#: default; free-page-hint needs an iothread, which the hinting flag adds), and a guest that
#: accepts all of it: PAGE_POISON only with blimp.poison=1 (its default 0 declines it).
#: `min`: everything off that can be off (the stats queue cannot: QEMU always offers it).
FEATURE_SETS: Dict[str, Tuple[Tuple[str, ...], bool, Tuple[str, ...]]] = {
    "all": (("deflate-on-oom=on", "free-page-reporting=on", "page-poison=on"), True,
            ("blimp.poison=1",)),
    "min": (("deflate-on-oom=off", "free-page-reporting=off", "free-page-hint=off",
             "page-poison=off"), False, ()),
}

#: guest-side declines, run on pc-modern-all (docs/conformance.md, "Guest options")
DECLINES: Dict[str, Tuple[str, ...]] = {
    "stats": ("blimp.balloon.stats=0",),
    "oom": ("blimp.balloon.deflate_on_oom=0",),
    "hinting": ("blimp.balloon.hinting=0",),
    "reporting": ("blimp.balloon.reporting=0",),
    "poison": ("blimp.poison=0",),
}
DECLINES["all"] = tuple(o for opts in DECLINES.values() for o in opts)

#: runner faults: answer one kind of request wrongly on purpose, so a test can prove the
#: guest's check (and the runner's failure path) catches it
FAULTS = {
    "rss-flat": "rss: always report the first RSS read (the host seems never to discard)",
    "target-off-by-one": "target: set one page more than asked",
    "stats-ignored": "stats_interval: acknowledge, but never start polling (a timeout)",
}


# ---------------------------------------------------------------- configurations

@dataclass(frozen=True)
class Config:
    """One host configuration the guest runs its checks against."""
    name: str
    machine: str
    transport: str
    device_opts: Tuple[str, ...] = ()
    free_page_hint: bool = False          # free-page-hint=on + the iothread
    append: Tuple[str, ...] = ()          # guest options beyond the conform ones
    host: str = HOST_STOCK                # HOST_STOCK or HOST_REFERENCE
    qemu: Optional[str] = None            # binary; None: the host's default
    extra_args: Tuple[str, ...] = ()
    quick: bool = False                   # part of the quick matrix
    description: str = ""
    memory: str = RAM                     # guest RAM (-m)

    @property
    def expected_transport(self) -> str:
        return TRANSPORTS[self.transport][3]

    def guest_append(self) -> str:
        return " ".join((CONFORM_APPEND,) + TRANSPORTS[self.transport][2] + self.append)

    def all_device_opts(self) -> List[str]:
        return list(TRANSPORTS[self.transport][0]) + list(self.device_opts)

    def all_extra_args(self) -> List[str]:
        return list(TRANSPORTS[self.transport][1]) + list(self.extra_args)


#: the quick matrix: one per transport family and feature set, a decline, the reference
#: host's extension and RAM above 4 GiB
QUICK = ("pc-legacy-all", "q35-modern-all", "q35-transitional-legacy-min", "microvm-mmio-v2-all",
         "pc-modern-all-decline-all", "ref-q35-modern-chunks", "q35-modern-min-6G")

#: the feature set of the high-memory configurations that report free pages: `all` without free
#: page hinting (a live migration of 6 GiB under TCG, beside reports of 6 GiB, outlasts the
#: session's wait for the agent on the destination)
NOHINT = ("deflate-on-oom=on", "free-page-reporting=on", "page-poison=on", "free-page-hint=off")

#: the high-memory configurations, HIGH_RAM each: name (without -6G), machine, transport,
#: device options, guest options, host
HIGH_MEMORY: Tuple[Tuple[str, str, str, Tuple[str, ...], Tuple[str, ...], str], ...] = (
    ("q35-modern-min", "q35", "modern", FEATURE_SETS["min"][0], (), HOST_STOCK),
    ("q35-modern-nohint", "q35", "modern", NOHINT, ("blimp.poison=1",), HOST_STOCK),
    ("pc-legacy-min", "pc", "legacy", FEATURE_SETS["min"][0], (), HOST_STOCK),
    ("ref-q35-modern-chunks-min", "q35", "modern", FEATURE_SETS["min"][0] + (refhost.CHUNKS,),
     (), HOST_REFERENCE),
)
#: a configuration's hard deadline is --timeout times this when its RAM is above 4 GiB
HIGH_TIMEOUT_SCALE = 2.5


def full_matrix() -> List[Config]:
    out: List[Config] = []

    def add(name: str, **kw: Any) -> None:
        out.append(Config(name=name, quick=name in QUICK, **kw))

    for machine in ("pc", "q35"):
        for transport in PCI_TRANSPORTS:
            for fs, (opts, hint, guest) in FEATURE_SETS.items():
                add("%s-%s-%s" % (machine, transport, fs), machine=machine, transport=transport,
                    device_opts=opts, free_page_hint=hint, append=guest,
                    description="%s, %s, features %s" % (machine, transport, fs))
    for transport in MMIO_TRANSPORTS:
        for fs, (opts, hint, guest) in FEATURE_SETS.items():
            add("microvm-%s-%s" % (transport, fs), machine="microvm", transport=transport,
                device_opts=opts, free_page_hint=hint, append=guest,
                description="microvm, %s, features %s" % (transport, fs))
    opts, hint, guest_all = FEATURE_SETS["all"]
    for what, declines in DECLINES.items():
        keys = {o.split("=")[0] for o in declines}
        guest = tuple(o for o in guest_all if o.split("=")[0] not in keys) + declines
        add("pc-modern-all-decline-%s" % what, machine="pc", transport="modern",
            device_opts=opts, free_page_hint=hint, append=guest,
            description="pc, modern, features all, the guest declines %s (%s)"
                        % (what, " ".join(declines)))
    for chunks in (True, False):
        add("ref-q35-modern-%s" % ("chunks" if chunks else "nochunks"), machine="q35",
            transport="modern", device_opts=opts + ((refhost.CHUNKS,) if chunks else ()),
            free_page_hint=hint, host=HOST_REFERENCE, append=guest_all,
            description="reference host, q35, modern, features all, x-chunks=%s"
                        % ("on" if chunks else "off"))
    for base, machine, transport, dev, guest, host in HIGH_MEMORY:
        add("%s-%s" % (base, HIGH_RAM), machine=machine, transport=transport, device_opts=dev,
            append=guest, host=host, memory=HIGH_RAM,
            description="%s%s, %s, device %s, RAM %s (above 4 GiB)" % (
                "reference host, " if host == HOST_REFERENCE else "", machine, transport,
                ",".join(dev), HIGH_RAM))
    return out


def config_timeout(cfg: Config, timeout: float) -> float:
    """The hard deadline of one configuration: `timeout`, longer for RAM above 4 GiB."""
    return timeout * (HIGH_TIMEOUT_SCALE if parse_memory(cfg.memory) > 4 << 30 else 1.0)


def matrix(kind: str) -> List[Config]:
    full = full_matrix()
    return full if kind == "full" else [c for c in full if c.quick]


# ---------------------------------------------------------------- known deviations

@dataclass(frozen=True)
class Deviation:
    """A `not ok` point that is a known, understood deviation of a host: the configuration
    still passes, and the report says so with the evidence."""
    host: str
    check: str                    # the point's id, e.g. "D9"
    evidence: str                 # QEMU source file:function, what it does, what the guest saw
    transports: Tuple[str, ...] = ()   # only on these transports (empty: every one)
    accel: str = ""                    # only with this accelerator (empty: any)

    def applies(self, host: str, check: str, transport: str, accel: str = "") -> bool:
        return (host == self.host and check == self.check
                and (not self.transports or transport in self.transports)
                and (not self.accel or accel == self.accel))


#: filled only from real runs, each confirmed in the QEMU 7.2 source (docs/conformance.md,
#: "Known deviations"). The reference host is QEMU 7.2 with a patch to the balloon device
#: alone, so the stock host's entries hold for it as well (hosts_of).
KNOWN_DEVIATIONS: List[Deviation] = [
    Deviation(HOST_STOCK, "D9",
              "hw/virtio/virtio.c:virtio_queue_notify() runs the queue's handler "
              "(virtio-balloon.c:virtio_balloon_handle_output pops the inflate buffer and "
              "pushes it used) as soon as the queue has a ring address, without looking at "
              "the device status; virtio-pci.c:virtio_pci_notify_write() / "
              "virtio_ioport_write(VIRTIO_PCI_QUEUE_NOTIFY) and "
              "virtio-mmio.c:virtio_mmio_write(VIRTIO_MMIO_QUEUE_NOTIFY) call it for every "
              "notify. The guest saw: an inflate buffer kicked with status 0x03/0x0b (no "
              "DRIVER_OK) was used within 20 ms"),
    Deviation(HOST_STOCK, MIGRATION_CHECK,
              "include/exec/ram_addr.h:cpu_physical_memory_sync_dirty_bitmap(): its fast path "
              "(word-aligned ranges, the whole of RAM here) clears the migration dirty bits "
              "with qatomic_xchg and never calls tlb_reset_dirty_range_all(), unlike the slow "
              "path (cpu_physical_memory_test_and_clear_dirty), so under TCG pages written "
              "before a bitmap sync keep their TLB entries without TLB_NOTDIRTY and the "
              "guest's later writes to them are not logged: the destination gets stale pages. "
              "The guest (conform mode polls all the time) then died on the destination (#GP/"
              "#UD at a garbage rip), hung, or QEMU reported 'VQ 3 ... Guest index ... "
              "inconsistent with Host index' (virtio.c:virtio_load read a stale avail index); "
              "about one migrating configuration in eight. The reference host carries the fix "
              "(tools/reference-host/qemu-7.2-tcg-dirty-sync.patch)", accel="tcg"),
]


#: stock deviations the reference host's patches remove
FIXED_ON_REFERENCE = (MIGRATION_CHECK,)


def hosts_of(host: str) -> Tuple[str, ...]:
    return (host, HOST_STOCK) if host == HOST_REFERENCE else (host,)


def known_deviation(host: str, check: str, transport: str,
                    table: Sequence[Deviation] = (), accel: str = "") -> Optional[Deviation]:
    for h in hosts_of(host):
        if h != host and check in FIXED_ON_REFERENCE:
            continue
        for d in (table or KNOWN_DEVIATIONS):
            if d.applies(h, check, transport, accel):
                return d
    return None



class MigrationBroken(RuntimeError):
    """migrate() failed; `completed`: the source had finished (postmigrate), so the guest's
    state went over and the destination could not run it."""

    def __init__(self, message: str, completed: bool) -> None:
        super().__init__(message)
        self.completed = completed


# ---------------------------------------------------------------- answering requests

class Host:
    """What the runner does on the host for a request (a real one: SessionHost)."""

    ram_bytes = RAM_BYTES

    def set_balloon_value(self, value: int) -> None:
        raise NotImplementedError

    def rss_kib(self) -> int:
        raise NotImplementedError

    def set_stats_interval(self, seconds: int) -> None:
        raise NotImplementedError

    def read_stats(self) -> dict:
        raise NotImplementedError

    def migrate(self) -> int:
        """Live-migrate and switch to the destination; QEMU's total-time in ms."""
        raise NotImplementedError

    def send(self, line: str) -> dict:
        """One line to the guest's agent; its reply."""
        raise NotImplementedError

    def recover(self) -> None:
        """After a failed migration: let the guest run on (the source may be paused)."""


#: QEMU's uint64 stats are -1 (2^64 - 1 over QMP) until the guest sends them
_UNSET = (-1, (1 << 64) - 1)


def stats_fields(qom: dict) -> List[str]:
    """qom-get guest-stats as the `ack` fields: last_update=<s>, then stat-swap-in as
    swap_in and so on, leaving out the values the guest never sent."""
    out = ["last_update=%d" % int(qom.get("last-update", 0))]
    for key, value in sorted((qom.get("stats") or {}).items()):
        if not isinstance(value, int) or value in _UNSET:
            continue
        name = key[len("stat-"):] if key.startswith("stat-") else key
        out.append("%s=%d" % (name.replace("-", "_"), value))
    return out


def _words(text: str, limit: int = 160) -> str:
    """A reason as words on one line that fits an agent command line."""
    w = " ".join(re.sub(r"[^\x20-\x7e]", " ", str(text)).split())
    return (w[:limit - 3] + "...") if len(w) > limit else (w or "failed")


@dataclass
class Exchange:
    """One request and what the runner did about it."""
    request: dict
    answer: Optional[str] = None       # the ack/nack line sent
    reply: Optional[dict] = None       # the agent's reply to it
    error: Optional[str] = None        # the runner could not answer (a runner failure)
    note: Optional[str] = None         # why an action failed, in full (the nack has a line)
    destination_broken: bool = False   # a migration completed, the destination then failed
    known: Optional[Deviation] = None  # ... and that is a known deviation of the host
    seconds: float = 0.0


class Responder:
    """Answers conform_request events (docs/conformance.md, "Guest -> runner")."""

    def __init__(self, host: Host, fault: Optional[str] = None) -> None:
        if fault is not None and fault not in FAULTS:
            raise ValueError("unknown fault %r (known: %s)" % (fault, ", ".join(FAULTS)))
        self.host = host
        self.fault = fault
        self.exchanges: List[Exchange] = []
        self._first_rss: Optional[int] = None
        self._note: Optional[str] = None
        self._broken = False

    def answer_line(self, req: dict) -> str:
        """The ack/nack line for one request (performing its action)."""
        seq = req.get("seq")
        action = req.get("action")
        h = self.host
        try:
            if action == "target":
                pages = int(req["pages"])
                if self.fault == "target-off-by-one":
                    pages += 1
                value = h.ram_bytes - pages * PAGE
                if pages < 0 or value <= 0:
                    return "nack %d target %d pages is outside the guest's RAM" % (seq, pages)
                h.set_balloon_value(value)
                return "ack %d" % seq
            if action == "rss":
                kib = h.rss_kib()
                if self.fault == "rss-flat":
                    if self._first_rss is None:
                        self._first_rss = kib
                    kib = self._first_rss
                return "ack %d kib=%d" % (seq, kib)
            if action == "stats_interval":
                if self.fault != "stats-ignored":
                    h.set_stats_interval(int(req["seconds"]))
                return "ack %d" % seq
            if action == "stats_read":
                return " ".join(["ack %d" % seq] + stats_fields(h.read_stats()))
            if action == "migrate":
                return "ack %d ms=%d" % (seq, h.migrate())
            return "nack %d unknown action %s" % (seq, _words(str(action), 40))
        except (KeyError, TypeError, ValueError) as e:
            return "nack %d bad request: %s" % (seq, _words(repr(e)))
        except SESSION_ERRORS + (OSError, RuntimeError) as e:
            reason = getattr(e, "reason", None) or str(e) or repr(e)
            self._note = str(e)
            self._broken = bool(getattr(e, "completed", False))
            if action == "migrate":
                self.host.recover()
            return "nack %d %s failed: %s" % (seq, action, _words(reason.splitlines()[0]))

    def handle(self, req: dict) -> Exchange:
        ex = Exchange(dict(req))
        t0 = time.monotonic()
        if not isinstance(req.get("seq"), int):
            ex.error = "conform_request without an integer seq: %r" % (req,)
        else:
            self._note, self._broken = None, False
            ex.answer = self.answer_line(req)
            ex.note, ex.destination_broken = self._note, self._broken
            try:
                ex.reply = self.host.send(ex.answer)
                if ex.reply.get("ok") is not True:
                    ex.error = "the guest's agent refused %r: %r" % (ex.answer, ex.reply)
            except SESSION_ERRORS + (OSError,) as e:
                reason = getattr(e, "reason", None) or str(e)
                ex.error = "could not send %r: %s" % (ex.answer, reason.splitlines()[0])
        ex.seconds = time.monotonic() - t0
        self.exchanges.append(ex)
        return ex


class SessionHost(Host):
    """The real host: a BalloonSession's QEMU, QMP and agent."""

    def __init__(self, session: BalloonSession, deadline: Optional[float] = None) -> None:
        self.session = session
        self.ram_bytes = session.ram
        self.deadline = deadline          # time.monotonic() by which the run must end

    def set_balloon_value(self, value: int) -> None:
        self.session.qemu.qmp().execute("balloon", value=value)

    def rss_kib(self) -> int:
        return rss_of(self.session.qemu.pid) // 1024

    def set_stats_interval(self, seconds: int) -> None:
        self.session.balloon.enable_stats(seconds)

    def read_stats(self) -> dict:
        return self.session.balloon.stats()

    def migrate(self) -> int:
        left = 60.0 if self.deadline is None else self.deadline - time.monotonic()
        try:
            return self.session.migrate(timeout=max(5.0, min(60.0, left))).total_time_ms
        except SESSION_ERRORS as e:
            try:
                status = self.session.qemu.qmp().execute("query-status").get("status")
            except SESSION_ERRORS + (OSError,):
                status = "?"
            raise MigrationBroken(str(e), status == "postmigrate") from None

    def send(self, line: str) -> dict:
        return self.session.cmd(line, timeout=10.0)

    def recover(self) -> None:
        """A migration that failed after the source stopped leaves it paused (postmigrate):
        resume it so that the guest gets the nack and goes on."""
        try:
            qmp = self.session.qemu.qmp()
            if not qmp.execute("query-status").get("running"):
                qmp.execute("cont")
        except SESSION_ERRORS + (OSError,):
            pass


# ---------------------------------------------------------------- the guest's output

_RESULT = re.compile(r"^(not ok|ok)\b\s*(\d+)?\s*(?:-\s*)?(.*?)\s*$")
_DIRECTIVE = re.compile(r"\s*(?<!\\)#\s*(SKIP|TODO)\b\s*(.*)$", re.I)
_YAML_KV = re.compile(r"^\s+([A-Za-z_][\w-]*):\s?(.*)$")


@dataclass
class Point:
    """One TAP point with its YAML block and its conform_check event."""
    n: int
    ok: bool
    description: str                   # "D3 §5.5.4 num_pages reads exactly ..."
    directive: Optional[str] = None    # SKIP / TODO
    reason: str = ""
    yaml: Dict[str, str] = field(default_factory=dict)
    check: Optional[dict] = None       # the conform_check event

    @property
    def id(self) -> str:
        if self.check and self.check.get("id"):
            return str(self.check["id"])
        return self.description.split()[0] if self.description else "#%d" % self.n

    @property
    def verdict(self) -> str:
        if self.check and self.check.get("verdict"):
            return str(self.check["verdict"])
        return self.yaml.get("verdict", "conforms" if self.ok and not self.directive
                             else "?")

    @property
    def detail(self) -> str:
        if self.check and self.check.get("detail") is not None:
            return str(self.check["detail"])
        return self.yaml.get("detail", self.reason)

    @property
    def skipped(self) -> bool:
        return self.ok and self.directive == "SKIP"


def _unquote(v: str) -> str:
    v = v.strip()
    if len(v) >= 2 and v[0] == v[-1] == '"':
        try:
            return json.loads(v)
        except ValueError:
            return v[1:-1]
    return v


def tap_text(lines: Iterable[str]) -> str:
    """The guest's TAP document: from `TAP version` to the SUMMARY line, events left out."""
    out: List[str] = []
    inside = False
    for raw in lines:
        line = guestlog.clean(raw).rstrip()
        if line.startswith("TAP version"):
            inside, out = True, []
        if not inside or line.lstrip().startswith("{"):
            continue
        out.append(line)
        if line.startswith("SUMMARY:"):
            inside = False
    return "\n".join(out) + ("\n" if out else "")


def parse_points(lines: Sequence[str]) -> Tuple[List[Point], Optional[int], Optional[tuple]]:
    """(points, plan, summary) of the guest's TAP (the last document on the console),
    each point joined with its YAML block and its conform_check event (by n)."""
    checks: Dict[int, dict] = {}
    for line in lines:
        ev = guestlog.event_named(line, "conform_check")
        if ev is not None and isinstance(ev.get("n"), int):
            checks[ev["n"]] = ev
    points: List[Point] = []
    plan = summary = None
    in_yaml = False
    for raw in lines:
        line = guestlog.clean(raw).rstrip()
        if line.startswith("TAP version"):
            points, plan, summary, in_yaml = [], None, None, False
            continue
        if in_yaml:
            if line.strip() == "...":
                in_yaml = False
            else:
                m = _YAML_KV.match(line)
                if m and points:
                    points[-1].yaml[m.group(1)] = _unquote(m.group(2))
            continue
        if line.strip() == "---" and points and line.startswith(" "):
            in_yaml = True
            continue
        m = re.match(r"^1\.\.(\d+)", line)
        if m:
            plan = int(m.group(1))
            continue
        m = re.match(r"^SUMMARY: (\d+) tests, (\d+) failed, (\d+) skipped", line)
        if m:
            summary = tuple(int(x) for x in m.groups())
            continue
        m = _RESULT.match(line)
        if m:
            desc, directive, reason = m.group(3), None, ""
            dm = _DIRECTIVE.search(desc)
            if dm:
                directive, reason = dm.group(1).upper(), dm.group(2)
                desc = desc[:dm.start()]
            n = int(m.group(2)) if m.group(2) else len(points) + 1
            points.append(Point(n, m.group(1) == "ok", desc, directive, reason))
    for p in points:
        p.check = checks.get(p.n)
    return points, plan, summary


# ---------------------------------------------------------------- one configuration's result

PASS, DEVIATES, FAIL = "pass", "deviates (known)", "FAIL"


@dataclass
class Result:
    config: Config
    host: str
    accel: str = ""
    status: str = FAIL
    reasons: List[str] = field(default_factory=list)    # why it failed (runner-level)
    points: List[Point] = field(default_factory=list)
    plan: Optional[int] = None
    summary: Optional[tuple] = None
    summary_event: Optional[dict] = None
    known: List[Tuple[Point, Deviation]] = field(default_factory=list)
    unknown_failures: List[Point] = field(default_factory=list)
    outcome: Optional[exitcodes.Outcome] = None
    transport_seen: Optional[str] = None
    exchanges: List[Exchange] = field(default_factory=list)
    serial: List[str] = field(default_factory=list)
    seconds: float = 0.0
    tap_path: Optional[str] = None
    serial_path: Optional[str] = None

    @property
    def passed(self) -> bool:
        return self.status in (PASS, DEVIATES)

    @property
    def known_runner(self) -> List[Exchange]:
        """Requests the host failed in a way that is a known deviation of it."""
        return [ex for ex in self.exchanges if ex.known is not None]

    @property
    def counts(self) -> Tuple[int, int, int]:
        """(tests, failed, skipped) as the points show them."""
        return (len(self.points), sum(1 for p in self.points if not p.ok),
                sum(1 for p in self.points if p.skipped))

    def verdicts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for p in self.points:
            out[p.verdict] = out.get(p.verdict, 0) + 1
        return out

    def line(self) -> str:
        tests, failed, skipped = self.counts
        text = "%-34s %-16s %3d tests, %2d failed, %2d skipped %6.1f s" % (
            self.config.name, self.status, tests, failed, skipped, self.seconds)
        if self.known or self.known_runner:
            text += "  known: " + ", ".join([p.id for p, _ in self.known] + [
                "%s (seq %s)" % (MIGRATION_CHECK, ex.request.get("seq"))
                for ex in self.known_runner])
        if self.unknown_failures:
            text += "  failed: " + ", ".join("%s (%s)" % (p.id, p.verdict)
                                             for p in self.unknown_failures)
        if self.reasons:
            text += "\n    " + "\n    ".join(self.reasons)
        return text


def evaluate(res: Result, table: Sequence[Deviation] = ()) -> Result:
    """Fill in the points, the deviations and the status from the serial lines and outcome."""
    res.points, res.plan, res.summary = parse_points(res.serial)
    evs = [e for e in _events(res.serial) if e["event"] == "conform_summary"]
    res.summary_event = evs[-1] if evs else None
    devs = [e for e in _events(res.serial) if e["event"] == "virtio_device"]
    if devs:
        res.transport_seen = str(devs[0].get("transport"))
    res.known, res.unknown_failures = [], []
    for p in res.points:
        if p.ok:
            continue
        d = known_deviation(res.host, p.id, res.config.transport, table, res.accel)
        if d is not None:
            res.known.append((p, d))
        else:
            res.unknown_failures.append(p)
    reasons = res.reasons
    out = res.outcome
    if out is None:
        reasons.append("the guest did not exit")
    elif out.kind != exitcodes.GUEST or out.code not in (exitcodes.SUCCESS,
                                                          exitcodes.TEST_FAILURES):
        reasons.append("guest/QEMU outcome: %s" % out.describe())
    if not res.points:
        reasons.append("no TAP points on the console")
    else:
        if res.plan is None:
            reasons.append("no TAP plan (1..N) after the points")
        elif res.plan != len(res.points):
            reasons.append("TAP plan 1..%d but %d points" % (res.plan, len(res.points)))
        tests, failed, skipped = res.counts
        if res.summary is not None and res.summary != (tests, failed, skipped):
            reasons.append("SUMMARY says %s, the points %s" % (res.summary, res.counts))
        if out is not None and out.kind == exitcodes.GUEST:
            if out.code == exitcodes.SUCCESS and failed:
                reasons.append("exit 0x10 with %d not ok points" % failed)
            if out.code == exitcodes.TEST_FAILURES and not failed:
                reasons.append("exit 0x11 without a not ok point")
    missed = (res.summary_event or {}).get("irq_missed", 0)
    if missed:
        reasons.append("the guest found %d device event(s) no interrupt announced (irq_missed)"
                       % missed)
    if res.transport_seen is not None and res.transport_seen != res.config.expected_transport:
        reasons.append("the guest used %s, the configuration is %s (%s)" % (
            res.transport_seen, res.config.transport, res.config.expected_transport))
    for ex in res.exchanges:
        if ex.error:
            reasons.append("runner: request %s: %s" % (json.dumps(ex.request), ex.error))
        ex.known = None
        if ex.note and ex.destination_broken:
            ex.known = known_deviation(res.host, MIGRATION_CHECK, res.config.transport, table,
                                       res.accel)
        if ex.note and ex.known is None:
            # the host could not do what the guest asked: the run is incomplete
            reasons.append("runner: %s -> %s; in full:\n%s" % (
                json.dumps(ex.request), ex.answer, ex.note))
    if reasons or res.unknown_failures:
        res.status = FAIL
    else:
        res.status = DEVIATES if res.known or res.known_runner else PASS
    return res


def _events(lines: Iterable[str]) -> List[dict]:
    out = []
    for line in lines:
        try:
            ev = guestlog.parse_event(line)
        except guestlog.BadEvent:
            continue
        if ev is not None:
            out.append(ev)
    return out


# ---------------------------------------------------------------- driving a stream

def pump(lines: Callable[[int], Optional[List[str]]], responder: Responder,
         deadline: float) -> Tuple[int, bool]:
    """Read serial lines live and answer every conform_request among them.
    `lines(since)` returns the lines from `since` on (waiting a little for new ones), or
    None once the guest has stopped and nothing more will come.  Returns (lines read,
    timed out)."""
    seen = 0
    while True:
        new = lines(seen)
        if new is None:
            return seen, False
        for line in new:
            seen += 1
            ev = guestlog.event_named(line, "conform_request")
            if ev is not None:
                responder.handle(ev)
        if time.monotonic() >= deadline:
            return seen, True


def run_config(cfg: Config, *, kernel: str = DEFAULT_KERNEL, accel: str = "auto",
               qemu: Optional[str] = None, host: Optional[str] = None,
               out_dir: str = DEFAULT_OUT, timeout: float = CONFIG_TIMEOUT,
               fault: Optional[str] = None, table: Sequence[Deviation] = ()) -> Result:
    """Boot one configuration, answer its requests, wait for the guest's exit."""
    host = host or cfg.host
    res = Result(cfg, host)
    os.makedirs(out_dir, exist_ok=True)
    res.serial_path = os.path.join(out_dir, cfg.name + ".serial.log")
    res.tap_path = os.path.join(out_dir, cfg.name + ".tap")
    t0 = time.monotonic()
    binary = qemu or cfg.qemu or QEMU_BINARY
    session = BalloonSession(kernel, machine=cfg.machine, memory=cfg.memory, accel=accel,
                             append=cfg.guest_append(), balloon_opts=cfg.all_device_opts(),
                             timeout=timeout + 30, boot_timeout=30.0,
                             serial_log=res.serial_path, context_lines=20,
                             free_page_hint=cfg.free_page_hint,
                             extra_args=cfg.all_extra_args(), qemu=binary)
    res.accel = session.qemu.accel
    timed_out = False
    try:
        session.start(wait_ready=False)
        responder = Responder(SessionHost(session, t0 + timeout), fault)
        res.exchanges = responder.exchanges

        def lines(since: int) -> Optional[List[str]]:
            new = session.wait_lines(since, 0.5)
            if not new and not session.running():
                session.qemu.wait(timeout=5)        # reaps, joins the serial reader
                return session.lines[since:] or None
            return new

        _, timed_out = pump(lines, responder, t0 + timeout)
        if timed_out:
            d = session.diagnose()     # before close(): why the guest went quiet
            res.reasons.append("no exit within %.0f s (hard per-configuration timeout)"
                               % timeout)
            res.reasons.append(d.report())
        else:
            session.qemu.wait(timeout=10)
            res.outcome = session.qemu.outcome
    except SESSION_ERRORS as e:
        res.reasons.append("runner: %s" % (getattr(e, "reason", None) or str(e)).splitlines()[0])
        if getattr(e, "diagnosis", None) is not None:      # the session gave up on the guest
            res.reasons.append("\n".join(["diagnosis facts:"] + e.diagnosis.facts))
    except Exception as e:        # a runner bug must not lose the other configurations
        res.reasons.append("runner error: %r" % (e,))
    finally:
        res.serial = session.lines
        if res.reasons and (timed_out or res.outcome is None):
            res.reasons.append("last serial lines:\n" + "\n".join(
                "      | " + l for l in res.serial[-15:]))
            err = session.qemu.stderr.strip()
            if err:
                res.reasons.append("QEMU stderr: " + err[-600:])
        session.close()
    res.seconds = time.monotonic() - t0
    evaluate(res, table)
    with open(res.tap_path, "w") as f:
        f.write(tap_text(res.serial))
    return res


# ---------------------------------------------------------------- JUnit

def junit_xml(results: Sequence[Result]) -> ET.ElementTree:
    """One <testsuite> per configuration, one <testcase> per TAP point (plus one named
    "run" when the configuration failed outside its points)."""
    root = ET.Element("testsuites", name="blimp conform")
    totals = dict(tests=0, failures=0, errors=0, skipped=0)
    total_time = 0.0
    for r in results:
        suite = ET.SubElement(root, "testsuite", name=r.config.name)
        n = dict(tests=0, failures=0, errors=0, skipped=0)
        known = {id(p): d for p, d in r.known}
        for p in r.points:
            tc = ET.SubElement(suite, "testcase", classname=r.config.name,
                               name=p.description or p.id)
            n["tests"] += 1
            if id(p) in known:
                d = known[id(p)]
                ET.SubElement(tc, "skipped", message="known deviation: %s: %s (%s)" % (
                    p.verdict, p.detail, d.evidence))
                n["skipped"] += 1
            elif not p.ok:
                f = ET.SubElement(tc, "failure", message="%s: %s" % (p.verdict, p.detail),
                                  type=p.verdict)
                f.text = "\n".join("%s: %s" % kv for kv in p.yaml.items())
                n["failures"] += 1
            elif p.skipped:
                ET.SubElement(tc, "skipped", message=p.reason or p.verdict)
                n["skipped"] += 1
        for ex in r.known_runner:
            tc = ET.SubElement(suite, "testcase", classname=r.config.name,
                               name="runner: %s (request %s)" % (MIGRATION_CHECK,
                                                                 ex.request.get("seq")))
            sk = ET.SubElement(tc, "skipped", message="known deviation: %s (%s)" % (
                (ex.note or "").splitlines()[0], ex.known.evidence))
            sk.text = ex.note
            n["tests"] += 1
            n["skipped"] += 1
        if r.reasons:
            tc = ET.SubElement(suite, "testcase", classname=r.config.name, name="run")
            e = ET.SubElement(tc, "error", message=r.reasons[0].splitlines()[0])
            e.text = "\n".join(r.reasons)
            n["tests"] += 1
            n["errors"] += 1
        for k, v in n.items():
            suite.set(k, str(v))
            totals[k] += v
        suite.set("time", "%.3f" % r.seconds)
        total_time += r.seconds
        props = ET.SubElement(suite, "properties")
        for k, v in (("host", r.host), ("machine", r.config.machine), ("memory", r.config.memory),
                     ("transport", r.config.transport),
                     ("device", ",".join(r.config.all_device_opts())
                      + (",free-page-hint=on" if r.config.free_page_hint else "")),
                     ("append", r.config.guest_append()), ("result", r.status),
                     ("outcome", r.outcome.describe() if r.outcome else "none")):
            ET.SubElement(props, "property", name=k, value=v)
        # ElementTree puts properties last; JUnit readers do not mind the order
        out = ET.SubElement(suite, "system-out")
        out.text = "\n".join(r.serial) + "\n"
    for k, v in totals.items():
        root.set(k, str(v))
    root.set("time", "%.3f" % total_time)
    return ET.ElementTree(root)


def write_junit(results: Sequence[Result], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tree = junit_xml(results)
    ET.indent(tree)
    tree.write(path, encoding="utf-8", xml_declaration=True)


# ---------------------------------------------------------------- reporting

def summary_table(results: Sequence[Result]) -> str:
    rows = ["%-34s %-16s %5s %6s %7s %7s  %s" % ("configuration", "result", "tests", "failed",
                                                "skipped", "seconds", "deviations / failures")]
    for r in results:
        tests, failed, skipped = r.counts
        notes = ["%s known" % p.id for p, _ in r.known] + \
                ["%s known" % MIGRATION_CHECK for _ in r.known_runner] + \
                ["%s %s" % (p.id, p.verdict) for p in r.unknown_failures] + \
                [x.splitlines()[0] for x in r.reasons if not x.startswith("last serial")
                 and not x.startswith("QEMU stderr")][:2]
        rows.append("%-34s %-16s %5d %6d %7d %7.1f  %s" % (
            r.config.name, r.status, tests, failed, skipped, r.seconds, "; ".join(notes)))
    verdicts: Dict[str, int] = {}
    for r in results:
        for k, v in r.verdicts().items():
            verdicts[k] = verdicts.get(k, 0) + v
    passed = sum(1 for r in results if r.status == PASS)
    dev = sum(1 for r in results if r.status == DEVIATES)
    rows.append("")
    rows.append("verdicts: " + ", ".join("%s %d" % kv for kv in sorted(verdicts.items())))
    rows.append("configurations: %d, passed %d, deviates (known) %d, failed %d"
                % (len(results), passed, dev, len(results) - passed - dev))
    seen: Dict[Deviation, List[str]] = {}
    for r in results:
        for d in [d for _, d in r.known] + [ex.known for ex in r.known_runner]:
            seen.setdefault(d, []).append(r.config.name)
    for d, names in seen.items():
        rows.append("deviates (known): %s on %s in %d configuration(s) (%s): %s"
                    % (d.check, d.host, len(names), ", ".join(names), d.evidence))
    return "\n".join(rows)


# ---------------------------------------------------------------- command line

def host_kind(qemu: Optional[str]) -> str:
    """The known-deviation key of a QEMU binary given by --qemu."""
    if qemu is None:
        return HOST_STOCK
    try:
        ref = refhost.reference_qemu(build=False)
        if os.path.realpath(ref) == os.path.realpath(qemu):
            return HOST_REFERENCE
    except Exception:          # no cached reference host: not it
        pass
    version = qemu_version(qemu)
    m = re.search(r"version (\d+\.\d+)", version)
    return "qemu-" + (m.group(1) if m else "?")


def single_config(args: argparse.Namespace) -> Config:
    machine = args.machine or "q35"
    transport = args.transport or ("mmio-v1" if machine == "microvm" else "modern")
    if (machine == "microvm") != (transport in MMIO_TRANSPORTS):
        raise SystemExit("blimp conform: transport %s does not go with machine %s"
                         % (transport, machine))
    opts = tuple(o for o in (args.device_opts or "").split(",") if o)
    append = tuple((args.append or "").split())
    hint = "free-page-hint=on" in opts
    if hint:
        opts = tuple(o for o in opts if o != "free-page-hint=on")
    memory = args.memory or RAM
    name = "%s-%s%s%s" % (machine, transport, "-custom" if opts or append else "",
                          "" if memory == RAM else "-" + memory)
    return Config(name=name, machine=machine, transport=transport, device_opts=opts,
                  free_page_hint=hint, append=append, memory=memory,
                  description="given on the command line")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("conform", help="run conformance mode against host configurations",
                       description="Boot blimp in conformance mode (docs/conformance.md) for "
                                   "each host configuration, answer its requests over QMP and "
                                   "the agent, collect TAP and write JUnit XML. With no "
                                   "configuration option it runs the matrix (--matrix); with "
                                   "--machine/--transport/--device-opts/--append one "
                                   "configuration. Exit 0 only if every configuration passed "
                                   "(guest exit 0x10, or only known deviations).")
    p.add_argument("--qemu", default=None,
                   help="QEMU binary (default: qemu-system-x86_64; the matrix's ref-* "
                        "configurations always use the reference host)")
    p.add_argument("--machine", choices=MACHINES, default=None)
    p.add_argument("--transport", choices=sorted(TRANSPORTS), default=None)
    p.add_argument("--device-opts", default=None, metavar="K=V,...",
                   help="balloon device properties (free-page-hint=on adds the iothread)")
    p.add_argument("--append", default=None, help="further guest options")
    p.add_argument("--memory", default=None, metavar="SIZE",
                   help="guest RAM, e.g. 6G (default %s; with --matrix/--only: every "
                        "configuration gets it instead of its own)" % RAM)
    p.add_argument("--matrix", choices=("quick", "full"), default="quick")
    p.add_argument("--only", default=None, metavar="NAME,...",
                   help="only these configurations of the full matrix (shell patterns)")
    p.add_argument("--junit", default=os.path.join(DEFAULT_OUT, "junit.xml"))
    p.add_argument("--tap-dir", default=DEFAULT_OUT,
                   help="where <configuration>.tap and .serial.log go (default build/conform)")
    p.add_argument("--list", action="store_true", help="list the matrix and exit")
    p.add_argument("-j", "--jobs", type=int, default=1, help="configurations at a time")
    p.add_argument("--kernel", default=DEFAULT_KERNEL)
    p.add_argument("--accel", choices=ACCELS, default="auto")
    p.add_argument("--timeout", type=float, default=CONFIG_TIMEOUT,
                   help="hard deadline per configuration in seconds (default %d)"
                        % CONFIG_TIMEOUT)
    p.add_argument("--latency", action="store_true",
                   help="after each configuration, its per-buffer latency table (the guest's "
                        "balloon_latency event; blimp.latency)")
    p.add_argument("--fault", choices=sorted(FAULTS), default=None,
                   help="answer one kind of request wrongly on purpose: " + "; ".join(
                       "%s: %s" % kv for kv in sorted(FAULTS.items())))
    p.set_defaults(func=run)


def select(args: argparse.Namespace) -> List[Config]:
    if args.memory is not None:
        parse_memory(args.memory)        # a bad size stops here, not in every configuration
    if args.machine or args.transport or args.device_opts or args.append:
        return [single_config(args)]
    configs = _select_matrix(args)
    if args.memory is not None:
        configs = [c if c.memory == args.memory else dataclasses.replace(
            c, memory=args.memory, name="%s-%s" % (c.name, args.memory)) for c in configs]
    return configs


def _select_matrix(args: argparse.Namespace) -> List[Config]:
    if args.only:
        full = full_matrix()
        out = []
        for pat in args.only.split(","):
            hit = [c for c in full if fnmatch.fnmatchcase(c.name, pat) and c not in out]
            if not hit:
                raise SystemExit("blimp conform: no configuration %r (see --list)" % pat)
            out += hit
        return out
    return matrix(args.matrix)


def run(args: argparse.Namespace) -> int:
    configs = select(args)
    if args.list:
        for c in (configs if (args.only or args.machine or args.transport)
                  else full_matrix()):
            print("%-34s %-5s %s" % (c.name, "quick" if c.quick else "", c.description))
        return 0
    stock_host = host_kind(args.qemu)
    ref_qemu: Optional[str] = None
    if any(c.host == HOST_REFERENCE for c in configs):
        try:
            ref_qemu = refhost.reference_qemu(build=True)
        except (refhost.ReferenceHostError, OSError) as e:
            print("blimp conform: no reference host (%s): its configurations fail" % e,
                  file=sys.stderr)
            ref_qemu = "/nonexistent/reference-qemu"
    print("blimp conform: %d configuration(s), %s, RAM %s, kernel %s%s" % (
        len(configs), qemu_version(args.qemu or QEMU_BINARY),
        "/".join(sorted({c.memory for c in configs}, key=parse_memory)),
        os.path.relpath(args.kernel), ", fault " + args.fault if args.fault else ""),
        flush=True)
    lock = threading.Lock()

    def one(cfg: Config) -> Result:
        if cfg.host == HOST_REFERENCE:
            qemu, host = ref_qemu, HOST_REFERENCE
        else:
            qemu, host = args.qemu, stock_host
        r = run_config(cfg, kernel=args.kernel, accel=args.accel, qemu=qemu, host=host,
                       out_dir=args.tap_dir, timeout=config_timeout(cfg, args.timeout),
                       fault=args.fault)
        with lock:
            print(r.line(), flush=True)
            ev = latency.last_event(r.serial)
            if args.latency and ev is not None:
                print("    " + latency.format_latency(ev).replace("\n", "\n    "), flush=True)
        return r

    t0 = time.monotonic()
    if args.jobs > 1 and len(configs) > 1:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            results = list(pool.map(one, configs))
    else:
        results = [one(c) for c in configs]
    write_junit(results, args.junit)
    print()
    print(summary_table(results))
    print("wall time %.1f s; JUnit %s; TAP and serial logs in %s" % (
        time.monotonic() - t0, os.path.relpath(args.junit), os.path.relpath(args.tap_dir)))
    return 0 if all(r.passed for r in results) else 1
