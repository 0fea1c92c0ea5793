"""Why is the guest silent?  A few seconds of facts about a running QEMU and a verdict.

    from blimp.diagnose import diagnose
    d = diagnose(qemu)                 # a started blimp.qemu.Qemu; never raises
    print(d.verdict)                   # "guest halted with interrupts on while the device
                                       #  has an interrupt pending (ISR 0x1): lost wake-up"
    print(d.report())                  # the verdict and every fact behind it

A runner that gives up on a guest (a target never reached, an event that never came, an
agent command unanswered) used to say only "timed out".  The same symptom has different
causes, each with a different owner: the guest sleeping through an interrupt the device
raised (a lost wake-up: the guest's bug), the guest spinning with interrupts off (the
guest's bug, elsewhere), the guest asleep with nothing pending (the host never asked), the
VM paused, QEMU itself hung or gone.  What tells them apart, all read from outside the
guest:

 * QMP ``query-status``: is the VM running at all;
 * HMP ``info registers`` (through QMP ``human-monitor-command``), twice, at the start and
   the end of the sampling interval: RIP, RFLAGS and its IF bit (bit 9), and QEMU's
   ``HLT=1`` for a vCPU halted in ``hlt``;
 * HMP ``info lapic``: the local APIC's IRR and ISR (vectors requested / in service);
 * QMP ``x-query-virtio-status`` of the balloon's virtio backend (found with
   ``x-query-virtio``): the ISR QEMU holds for the device (bit 0 queue, bit 1 config;
   the guest reading it clears it), read at the start and the end of the interval;
 * QEMU's CPU time (/proc/<pid>/stat utime + stime) over the interval: under TCG a
   halted vCPU costs nothing, a spinning one a whole core;
 * the guest's last event line on serial.

Every QMP/HMP call has a short timeout; a failure is recorded as a fact and the rest goes
on (after a QMP timeout no more QMP is tried: a QEMU that does not answer one command
answers none).  Nothing here raises.  The parsers take the text QEMU 7.2 prints
(tests/e2e/diagnose_samples/ holds captured samples).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional

from . import guestlog

#: RFLAGS.IF: maskable interrupts are taken
RFLAGS_IF = 1 << 9
#: seconds between the two samples (CPU time, registers, device ISR)
SAMPLE_S = 0.5
#: seconds one QMP/HMP command may take
QMP_TIMEOUT_S = 1.0
#: the virtio device a balloon's backend reports in x-query-virtio
BALLOON_VIRTIO_NAME = "virtio-balloon"
#: query-status states in which the VM is merely stopped, not broken
PAUSED_STATES = ("paused", "prelaunch", "postmigrate", "inmigrate", "finish-migrate",
                 "suspended", "debug", "save-vm", "restore-vm")


# ---------------------------------------------------------------- parsing QEMU's text

@dataclass
class Registers:
    """What `info registers` says about CPU#0 that matters here."""
    rip: int
    rflags: int
    halted: Optional[bool]          # QEMU's HLT=1 (None: not printed)

    @property
    def interrupts_on(self) -> bool:
        return bool(self.rflags & RFLAGS_IF)

    def describe(self) -> str:
        return "RIP %#x, RFLAGS %#x (IF=%d), %s" % (
            self.rip, self.rflags, self.interrupts_on,
            {True: "halted (HLT=1)", False: "not halted (HLT=0)", None: "HLT not shown"}
            [self.halted])


_RIP = re.compile(r"\bRIP=([0-9a-fA-F]+)")
_RFL = re.compile(r"\bRFL=([0-9a-fA-F]+)")
_HLT = re.compile(r"\bHLT=([01])\b")


def parse_registers(text: str) -> Optional[Registers]:
    """The first CPU's RIP, RFLAGS and halt state from HMP `info registers` (QEMU 7.2
    x86-64: ``RIP=000000000010ad85 RFL=00000202 [-------] CPL=0 II=0 A20=1 SMM=0 HLT=1``);
    None when the text has no RIP/RFL (another CPU model, an error message)."""
    rip, rfl = _RIP.search(text), _RFL.search(text)
    if not rip or not rfl:
        return None
    hlt = _HLT.search(text[rfl.start():])
    return Registers(int(rip.group(1), 16), int(rfl.group(1), 16),
                     None if hlt is None else hlt.group(1) == "1")


@dataclass
class Lapic:
    """The vectors of the local APIC's IRR (requested, not yet taken) and ISR (taken,
    not yet ended by an EOI), each with QEMU's "(level)" mark when TMR has it."""
    irr: List[int] = field(default_factory=list)
    isr: List[int] = field(default_factory=list)
    level: List[int] = field(default_factory=list)

    def describe(self) -> str:
        return "local APIC IRR %s, ISR %s" % (_vectors(self.irr, self.level),
                                              _vectors(self.isr, self.level))


def _isr_text(isr: List[int]) -> str:
    """Samples of the device's ISR: "0" when all are clear, else each in hex."""
    if not any(isr):
        return "0"
    return "/".join("%#x" % i for i in isr)


def _vectors(vs: List[int], level: List[int]) -> str:
    if not vs:
        return "(none)"
    return " ".join("%d%s" % (v, "(level)" if v in level else "") for v in vs)


_APIC_LINE = re.compile(r"^(IRR|ISR)\s+(.*)$")
_APIC_VECTOR = re.compile(r"^(\d+)(\(level\))?$")


def parse_lapic(text: str) -> Optional[Lapic]:
    """IRR and ISR of HMP `info lapic` (QEMU 7.2: ``IRR\\t 50(level) `` or
    ``ISR\\t (none)``); None when neither line is there."""
    found = Lapic()
    seen = False
    for raw in text.splitlines():
        m = _APIC_LINE.match(raw.strip())
        if not m:
            continue
        seen = True
        for word in m.group(2).split():
            v = _APIC_VECTOR.match(word)
            if v:
                getattr(found, m.group(1).lower()).append(int(v.group(1)))
                if v.group(2):
                    found.level.append(int(v.group(1)))
    return found if seen else None


def cpu_seconds(pid: int) -> float:
    """utime + stime of process `pid` in seconds (/proc/<pid>/stat fields 14 and 15)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_state(pid: int) -> str:
    """The kernel's state letter of `pid` with its name (R running, S sleeping,
    T stopped, ...)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("State:"):
                return line.split(":", 1)[1].strip()
    return "?"


# ---------------------------------------------------------------- the facts

@dataclass
class Diagnosis:
    """A verdict and the facts behind it."""
    verdict: str
    case: str                            # lost-wakeup, spinning, waiting, paused, ...
    facts: List[str] = field(default_factory=list)
    status: Optional[str] = None         # query-status
    registers: List[Registers] = field(default_factory=list)   # first, last sample
    lapic: Optional[Lapic] = None
    device_isr: List[int] = field(default_factory=list)         # first, last sample
    cpu_percent: Optional[float] = None  # of one core, over the interval
    last_event: Optional[str] = None

    def report(self) -> str:
        return "\n".join(["diagnosis: " + self.verdict] + ["    " + f for f in self.facts])


class _Probe:
    """QMP with a short timeout per call; the first failure is a fact, and after a
    timeout no further QMP call is made."""

    def __init__(self, qemu: Any, facts: List[str], timeout: float) -> None:
        self.qemu = qemu
        self.facts = facts
        self.timeout = timeout
        self.dead: Optional[str] = None

    def qmp(self, cmd: str, **args: Any) -> Any:
        if self.dead is not None:
            return None
        try:
            return self.qemu.qmp(timeout=self.timeout).execute(cmd, self.timeout, **args)
        except Exception as e:     # QMPError, QMPTimeout, a closed socket, anything
            what = "%s: %s: %s" % (cmd, type(e).__name__, e)
            self.facts.append("QMP " + what)
            if not _is_qmp_error(e):
                self.dead = what
            return None

    def hmp(self, line: str) -> Optional[str]:
        out = self.qmp("human-monitor-command", **{"command-line": line})
        return out if isinstance(out, str) else None


def _is_qmp_error(e: Exception) -> bool:
    """An error reply: QEMU answered, so QMP itself works."""
    return type(e).__name__ == "QMPError"


def _virtio_path(probe: _Probe) -> Optional[str]:
    devices = probe.qmp("x-query-virtio")
    for dev in devices or []:
        if isinstance(dev, dict) and dev.get("name") == BALLOON_VIRTIO_NAME:
            return str(dev.get("path"))
    if devices is not None:
        probe.facts.append("x-query-virtio lists no %s" % BALLOON_VIRTIO_NAME)
    return None


def _device_isr(probe: _Probe, path: Optional[str]) -> Optional[int]:
    if path is None:
        return None
    st = probe.qmp("x-query-virtio-status", path=path)
    if not isinstance(st, dict) or "isr" not in st:
        return None
    return int(st["isr"])


def _sample(probe: _Probe, d: Diagnosis, path: Optional[str]) -> None:
    """One sample of the registers and the device's ISR."""
    text = probe.hmp("info registers")
    if text is not None:
        regs = parse_registers(text)
        if regs is None:
            d.facts.append("info registers: no RIP/RFL in %r" % text[:120])
        else:
            d.registers.append(regs)
    isr = _device_isr(probe, path)
    if isr is not None:
        d.device_isr.append(isr)


def _cpu(pid: Optional[int]) -> Optional[float]:
    try:
        return cpu_seconds(pid) if pid else None
    except (OSError, ValueError, IndexError):
        return None


def last_event_line(lines: List[str]) -> Optional[str]:
    """The guest's last event line on serial, as printed."""
    for line in reversed(lines):
        try:
            if guestlog.parse_event(line) is not None:
                return line
        except guestlog.BadEvent:
            continue
    return None


# ---------------------------------------------------------------- the verdict

def judge(d: Diagnosis) -> None:
    """Set d.case and d.verdict from the samples in `d` (a running VM whose QMP answered).
    A claim about the guest needs both register samples to agree: one sample alone could
    catch a guest that halts and wakes a thousand times a second in its hlt."""
    regs = d.registers
    if not regs:
        d.case, d.verdict = "unknown", "guest state unknown (no registers from QEMU)"
        return
    last = regs[-1]
    cpu = ("QEMU using %.0f%% of a core" % d.cpu_percent if d.cpu_percent is not None
           else "QEMU's CPU time unknown")
    halted = all(r.halted for r in regs)
    if_on = all(r.interrupts_on for r in regs)
    if halted and if_on:
        _judge_sleeping(d, cpu)
    elif halted:
        d.case = "halted-irqs-off"
        d.verdict = ("guest halted with interrupts off at RIP %#x (RFLAGS.IF=0): nothing but "
                     "an NMI can wake it" % last.rip)
    elif any(r.halted for r in regs):
        d.case = "alive"
        d.verdict = "guest alive: it ran and halted between the samples (%s)" % cpu
    elif not any(r.interrupts_on for r in regs):
        d.case = "spinning"
        d.verdict = "guest spinning at RIP %#x (RFLAGS.IF=0, %s)" % (last.rip, cpu)
    else:
        d.case = "running"
        d.verdict = "guest running at RIP %#x (RFLAGS.IF=%d, %s)" % (
            last.rip, last.interrupts_on, cpu)


def _judge_sleeping(d: Diagnosis, cpu: str) -> None:
    """Halted with interrupts on in both samples: whether something should have woken it."""
    isr = d.device_isr
    lapic = d.lapic
    if len(isr) >= 2 and all(isr):
        d.case = "lost-wakeup"
        d.verdict = ("guest halted with interrupts on while the device has an interrupt "
                     "pending (ISR %#x): lost wake-up" % isr[-1])
    elif lapic is not None and lapic.isr:
        d.case = "no-eoi"
        d.verdict = ("guest halted with interrupts on while its local APIC still has vector "
                     "%s in service (no EOI): that and lower-priority interrupts are held back"
                     % _vectors(lapic.isr, lapic.level))
    elif lapic is not None and lapic.irr:
        d.case = "lost-wakeup"
        d.verdict = ("guest halted with interrupts on while its local APIC has vector %s "
                     "requested (IRR): lost wake-up" % _vectors(lapic.irr, lapic.level))
    elif isr:
        d.case = "waiting"
        d.verdict = ("guest halted with interrupts on, device ISR %s: waiting for the host"
                     % _isr_text(isr))
    else:
        d.case = "waiting"
        d.verdict = ("guest halted with interrupts on, device ISR unknown: waiting for the "
                     "host or for an interrupt nobody can see (%s)" % cpu)


# ---------------------------------------------------------------- diagnose()

def diagnose(qemu: Any, sample_s: float = SAMPLE_S, timeout: float = QMP_TIMEOUT_S,
             lines: Optional[List[str]] = None) -> Diagnosis:
    """Look at a Qemu that has gone quiet and say why, within about sample_s + a few
    QMP timeouts.  `lines`: the guest's serial console (default: qemu.lines).
    Never raises: anything that fails is a fact of the result."""
    d = Diagnosis(verdict="", case="")
    try:
        _diagnose(qemu, d, sample_s, timeout, lines)
    except Exception as e:      # a bug here must never hide the failure being diagnosed
        d.facts.append("diagnosis failed: %r" % e)
        if not d.verdict:
            d.case, d.verdict = "unknown", "no diagnosis (%s)" % type(e).__name__
    return d


def _diagnose(qemu: Any, d: Diagnosis, sample_s: float, timeout: float,
              lines: Optional[List[str]]) -> None:
    d.last_event = last_event_line(qemu.lines if lines is None else lines)
    if d.last_event:
        d.facts.append("guest's last event: " + d.last_event[:300])
    if qemu.proc is None:
        d.case, d.verdict = "not-started", "QEMU not started"
        return
    if not qemu.running():
        d.case, d.verdict = "ended", "QEMU ended: " + _ended(qemu)
        return
    probe = _Probe(qemu, d.facts, timeout)
    status = probe.qmp("query-status")
    if probe.dead is not None:
        _judge_hung(qemu, d, sample_s)
        return
    d.status = str(status.get("status")) if isinstance(status, dict) else None
    d.facts.append("query-status: %s" % d.status)
    if isinstance(status, dict) and not status.get("running"):
        _judge_stopped(d)
        return
    _sample_running(qemu, probe, d, sample_s)
    if probe.dead is not None:
        d.case, d.verdict = "qmp-dead", "QEMU stopped answering QMP (%s)" % probe.dead
        return
    judge(d)


def _sample_running(qemu: Any, probe: _Probe, d: Diagnosis, sample_s: float) -> None:
    """Two samples sample_s apart, CPU time across them, the LAPIC in between."""
    path = _virtio_path(probe)
    cpu0, t0 = _cpu(qemu.pid), time.monotonic()
    _sample(probe, d, path)
    time.sleep(sample_s)
    text = probe.hmp("info lapic")
    d.lapic = parse_lapic(text) if text is not None else None
    if text is not None and d.lapic is None:
        d.facts.append("info lapic: no IRR/ISR lines")
    _sample(probe, d, path)
    cpu1, t1 = _cpu(qemu.pid), time.monotonic()
    if cpu0 is not None and cpu1 is not None and t1 > t0:
        d.cpu_percent = 100.0 * (cpu1 - cpu0) / (t1 - t0)
        d.facts.append("QEMU CPU: %.0f%% of a core over %.2f s" % (d.cpu_percent, t1 - t0))
    for i, r in enumerate(d.registers):
        d.facts.append("registers (sample %d): %s" % (i + 1, r.describe()))
    if d.lapic is not None:
        d.facts.append(d.lapic.describe())
    if d.device_isr:
        d.facts.append("device ISR (QEMU's, per sample): %s" % ", ".join(
            "%#x" % i for i in d.device_isr))


def _judge_stopped(d: Diagnosis) -> None:
    if d.status in PAUSED_STATES:
        d.case, d.verdict = "paused", "VM paused (status %s)" % d.status
    else:
        d.case, d.verdict = "stopped", "VM stopped (status %s)" % d.status


def _judge_hung(qemu: Any, d: Diagnosis, sample_s: float) -> None:
    """QMP did not answer: QEMU itself is stuck (or stopped by a signal)."""
    cpu0, t0 = _cpu(qemu.pid), time.monotonic()
    time.sleep(min(sample_s, 0.2))
    cpu1, t1 = _cpu(qemu.pid), time.monotonic()
    extra = []
    try:
        extra.append("process state %s" % process_state(qemu.pid))
    except OSError as e:
        extra.append("process state unknown: %s" % e)
    if cpu0 is not None and cpu1 is not None and t1 > t0:
        d.cpu_percent = 100.0 * (cpu1 - cpu0) / (t1 - t0)
        extra.append("%.0f%% of a core" % d.cpu_percent)
    d.facts.extend(extra)
    d.case, d.verdict = "qmp-dead", "QEMU not answering QMP (%s)" % ", ".join(extra)


def _ended(qemu: Any) -> str:
    try:
        qemu.wait(timeout=2)
        return qemu.outcome.describe()
    except Exception as e:
        return "outcome unknown (%s)" % e
