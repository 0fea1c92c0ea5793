"""Shared helpers of the e2e tests: boot specs, a cached/parallel boot runner, and
checks of blimp's serial output against the guest interface spec.  Interactive
balloon runs use blimp.session.BalloonSession (see conftest's balloon_vm)."""

from __future__ import annotations

import os
import re
import struct
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from blimp import exitcodes, guestlog
from blimp.qemu import Qemu, parse_memory
from blimp.units import GiB, MiB, PAGE

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOLS = os.path.join(REPO, "tools")

IMAGES = {"pvh": "blimp.elf", "mb1": "blimp-mb1.elf"}
PROTOCOL = {"pvh": "pvh", "mb1": "multiboot1"}
BUDDY_ORDERS = 19          # free_blocks[0..18]

# RAM below 4 GiB when the guest has more than fits there (QEMU 7.2 machine code):
# pc: 3 GiB once -m >= 3.5 GiB; q35: 2 GiB once -m >= 2.75 GiB; microvm: 3 GiB.
LOWMEM_SPLIT = {"pc": (3 * GiB, 0xE0000000), "q35": (2 * GiB, 0xB0000000),
                "microvm": (3 * GiB, 3 * GiB)}

# Firmware keeps a little of -m for itself.  Measured on QEMU 7.2 (all machines,
# 128M/4G/6G, PVH and multiboot1): pc/q35 lose exactly 513 KiB (1 KiB EBDA at
# 0x9fc00, the 384 KiB legacy hole 0xa0000-0x100000, 128 KiB SeaBIOS area at
# the top of low RAM), microvm 385 KiB (its 128 KiB NVS sits inside the hole).
# 1 MiB leaves room for firmware noise yet catches a lost/duplicated entry.
RAM_SLACK = 1 * MiB


def expected_high_ram(machine: str, mem: int) -> int:
    low, threshold = LOWMEM_SPLIT[machine]
    if mem < threshold:
        return 0
    return max(0, mem - low)


# ---------------------------------------------------------------- specs

@dataclass(frozen=True)
class Spec:
    image: str                 # "pvh" | "mb1"
    machine: str               # pc | q35 | microvm
    memory: str                # "128M", "4G", ...
    append: str
    machine_opts: Tuple[str, ...] = ()
    timeout: float = 60.0
    tag: str = ""              # extra id text
    balloon: bool = False      # add a virtio-balloon device

    @property
    def id(self) -> str:
        parts = [self.image, self.machine, self.memory]
        if self.machine_opts:
            parts.append(",".join(self.machine_opts))
        if self.balloon:
            parts.append("balloon")
        if self.tag:
            parts.append(self.tag)
        return "-".join(parts)

    @property
    def memory_bytes(self) -> int:
        return parse_memory(self.memory)


@dataclass
class Boot:
    """A finished QEMU run of one Spec."""
    spec: Spec
    kernel: str
    argv: List[str]
    status: Optional[int]
    outcome: exitcodes.Outcome
    lines: List[str]
    stderr: str
    seconds: float
    log_path: Optional[str] = None
    _events: Optional[List[dict]] = field(default=None, repr=False)

    def context(self, n: int = 30) -> str:
        tail = self.lines[-n:]
        s = ["run: " + self.spec.id, "outcome: " + self.outcome.describe(),
             "seconds: %.2f" % self.seconds, "argv: " + " ".join(self.argv)]
        if self.log_path:
            s.append("serial log: " + self.log_path)
        if self.stderr.strip():
            s.append("qemu stderr: " + self.stderr.strip()[-2000:])
        s.append("serial tail:\n  " + "\n  ".join(tail))
        return "\n".join(s)

    @property
    def events(self) -> List[dict]:
        if self._events is None:
            self._events = guestlog.events(self.lines)
        return self._events

    def events_named(self, name: str) -> List[dict]:
        return [e for e in self.events if e["event"] == name]

    def event(self, name: str) -> dict:
        evs = self.events_named(name)
        assert len(evs) == 1, "expected exactly one %r event, got %d\n%s" % (
            name, len(evs), self.context())
        return evs[0]

    def tap(self) -> guestlog.Tap:
        return guestlog.parse_tap(self.lines)


def kernel_path(build_dir: str, image: str) -> str:
    return os.path.join(build_dir, IMAGES[image])


def run_spec(spec: Spec, build_dir: str, accel: str = "tcg", timeout_scale: float = 1.0,
             log_dir: Optional[str] = None) -> Boot:
    kernel = kernel_path(build_dir, spec.image)
    log_path = None
    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
        log_path = os.path.join(log_dir, re.sub(r"[^\w.,=-]+", "_", spec.id) + ".log")
    q = Qemu(kernel, machine=spec.machine, memory=spec.memory, accel=accel,
             append=spec.append, machine_opts=list(spec.machine_opts), qmp=False,
             balloon=spec.balloon,
             timeout=spec.timeout * timeout_scale, serial_log=log_path)
    t0 = time.monotonic()
    try:
        q.start()
        status = q.wait()
    finally:
        q.close()
    return Boot(spec=spec, kernel=kernel, argv=q.build_argv(), status=status,
                outcome=q.outcome, lines=q.lines, stderr=q.stderr,
                seconds=time.monotonic() - t0, log_path=log_path)


class BootRunner:
    """Runs each Spec once per session and caches the Boot.  With jobs > 1 the
    specs announced by prefetch() run in a thread pool (each QEMU still has its
    own deadline and is killed by PID)."""

    def __init__(self, build_dir: str, accel: str, jobs: int = 1, timeout_scale: float = 1.0,
                 log_dir: Optional[str] = None):
        self.build_dir = build_dir
        self.accel = accel
        self.jobs = max(1, jobs)
        self.timeout_scale = timeout_scale
        self.log_dir = log_dir
        self._lock = threading.Lock()
        self._futures: Dict[Spec, object] = {}
        self._pool = ThreadPoolExecutor(self.jobs) if self.jobs > 1 else None

    def _run(self, spec: Spec) -> Boot:
        return run_spec(spec, self.build_dir, self.accel, self.timeout_scale, self.log_dir)

    def prefetch(self, specs):
        if self._pool is None:
            return
        with self._lock:
            for s in specs:
                if s not in self._futures:
                    self._futures[s] = self._pool.submit(self._run, s)

    def get(self, spec: Spec) -> Boot:
        with self._lock:
            fut = self._futures.get(spec)
            if fut is None:
                if self._pool is not None:
                    fut = self._futures[spec] = self._pool.submit(self._run, spec)
        if fut is not None:
            return fut.result()
        boot = self._run(spec)   # sequential mode: cache the finished result
        with self._lock:
            self._futures[spec] = _Done(boot)
        return boot

    def shutdown(self):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)


class _Done:
    def __init__(self, value):
        self._value = value

    def result(self):
        return self._value


# ---------------------------------------------------------------- ELF

def image_footprint(path: str) -> int:
    """Bytes of guest memory the image occupies: span of its PT_LOAD segments
    (memsz, so .bss included).  Works for ELF32 and ELF64."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b"\x7fELF", "%s is not an ELF file" % path
    is64 = data[4] == 2
    if is64:
        phoff, = struct.unpack_from("<Q", data, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    else:
        phoff, = struct.unpack_from("<I", data, 0x1C)
        phentsize, phnum = struct.unpack_from("<HH", data, 0x2A)
    lo, hi = None, 0
    for i in range(phnum):
        off = phoff + i * phentsize
        if is64:
            p_type, _, _, _, p_paddr, _, p_memsz, _ = struct.unpack_from("<IIQQQQQQ", data, off)
        else:
            p_type, _, _, p_paddr, _, p_memsz, _, _ = struct.unpack_from("<IIIIIIII", data, off)
        if p_type == 1 and p_memsz:
            lo = p_paddr if lo is None else min(lo, p_paddr)
            hi = max(hi, p_paddr + p_memsz)
    return 0 if lo is None else hi - lo


# ---------------------------------------------------------------- checks

def check_exit(boot: Boot, code: int):
    """QEMU status is code*2+1 and the guest's last event is exit with that code."""
    assert boot.outcome.kind == exitcodes.GUEST and boot.outcome.code == code, (
        "expected guest exit 0x%02x (QEMU status %d), got: %s\n%s" % (
            code, exitcodes.qemu_status(code), boot.outcome.describe(), boot.context()))
    exits = boot.events_named("exit")
    assert len(exits) == 1, "expected one exit event, got %d\n%s" % (len(exits), boot.context())
    assert boot.events[-1]["event"] == "exit", "exit is not the last event\n" + boot.context()
    assert exits[0].get("code") == code, "exit event code %r != 0x%02x\n%s" % (
        exits[0].get("code"), code, boot.context())
    assert isinstance(exits[0].get("reason"), str), "exit event without a reason string"


def check_all_events_parse(boot: Boot):
    """Every line that starts like an event is valid JSON with a string 'event'."""
    for line in boot.lines:
        guestlog.parse_event(line)     # raises BadEvent


def cmdline_words(boot: Boot) -> List[str]:
    ev = boot.event("boot")
    cl = ev.get("cmdline")
    assert isinstance(cl, str), "boot event cmdline is not a string: %r" % (cl,)
    return cl.split()


def check_boot_event(boot: Boot):
    spec = boot.spec
    ev = boot.event("boot")
    assert boot.events[0]["event"] == "boot", (
        "first event is %r, not boot\n%s" % (boot.events[0]["event"], boot.context()))
    assert ev.get("protocol") == PROTOCOL[spec.image], (
        "image %s booted with protocol %r, expected %r" % (
            IMAGES[spec.image], ev.get("protocol"), PROTOCOL[spec.image]))
    words = cmdline_words(boot)
    want = spec.append.split()
    if spec.image == "mb1":
        # QEMU puts the kernel file name in front; the kernel may or may not show it.
        ok = words == want or (words[1:] == want and words[:1] and
                               words[0].endswith(IMAGES["mb1"]))
    else:
        extra = [w for w in words if w.startswith("virtio_mmio.device=")]
        ok = [w for w in words if w not in extra] == want
    assert ok, "boot event cmdline %r does not match -append %r" % (ev.get("cmdline"), spec.append)


def check_memmap(boot: Boot) -> dict:
    spec = boot.spec
    mm = boot.event("memmap")
    check_memmap_event(mm, spec.machine, spec.memory_bytes)
    return mm


def check_memmap_event(mm: dict, machine: str, mem: int, slack: int = RAM_SLACK) -> None:
    """A memmap event is sane for `-m mem` on `machine`: sorted, non-overlapping, RAM adds up
    to ram_bytes, within `slack` below -m (firmware keeps some), the split around 4 GiB."""
    memory = "%d MiB" % (mem >> 20)
    entries = mm.get("entries")
    assert isinstance(entries, list) and entries, "memmap without entries: %r" % (mm,)
    prev_end = None
    for i, e in enumerate(entries):
        for k in ("base", "size"):
            assert isinstance(e.get(k), int) and e[k] >= 0, "entry %d: bad %s: %r" % (i, k, e)
        assert isinstance(e.get("type"), str) and e["type"], "entry %d: bad type: %r" % (i, e)
        assert e["size"] > 0, "entry %d has zero size: %r" % (i, e)
        if prev_end is not None:
            assert e["base"] >= entries[i - 1]["base"], "memmap not sorted at %d: %r" % (i, entries)
            assert e["base"] >= prev_end, "memmap entries %d and %d overlap: %r, %r" % (
                i - 1, i, entries[i - 1], e)
        prev_end = e["base"] + e["size"]
    ram = [e for e in entries if e["type"] == "ram"]
    total = sum(e["size"] for e in ram)
    assert mm.get("ram_bytes") == total, "ram_bytes %r != sum of RAM entries %d" % (
        mm.get("ram_bytes"), total)
    assert total <= mem, "ram_bytes %d exceeds -m %s (%d)" % (total, memory, mem)
    assert total >= mem - slack, (
        "ram_bytes %d is %d KiB short of -m %s (allowed %d KiB)" % (
            total, (mem - total) >> 10, memory, slack >> 10))
    high = sum(e["size"] for e in ram if e["base"] >= 4 * GiB)
    want_high = expected_high_ram(machine, mem)
    assert high == want_high, "RAM above 4 GiB: %d MiB, expected %d MiB for %s -m %s" % (
        high >> 20, want_high >> 20, machine, memory)
    if mem > 4 * GiB:
        assert any(e["base"] >= 4 * GiB for e in ram), "no RAM entry above 4 GiB"
    # RAM entries never straddle 4 GiB in QEMU's maps, and no RAM overlaps the MMIO hole
    for e in ram:
        assert not (e["base"] < 4 * GiB < e["base"] + e["size"]), "RAM entry straddles 4 GiB: %r" % e


def check_buddy(boot: Boot, kernel_bytes: int) -> dict:
    b = boot.event("buddy")
    check_buddy_event(boot.event("memmap"), b, kernel_bytes)
    return b


def check_buddy_event(mm: dict, b: dict, kernel_bytes: int) -> None:
    """The buddy event agrees with itself and manages all RAM of the memmap event but the
    kernel image, its metadata and a little more."""
    fb = b.get("free_blocks")
    assert isinstance(fb, list) and len(fb) == BUDDY_ORDERS, (
        "free_blocks must have %d orders, got %r" % (BUDDY_ORDERS, fb))
    assert all(isinstance(c, int) and c >= 0 for c in fb), "bad free_blocks %r" % fb
    for k in ("total_pages", "free_pages", "meta_bytes"):
        assert isinstance(b.get(k), int) and b[k] >= 0, "buddy %s: %r" % (k, b.get(k))
    total, free, meta = b["total_pages"], b["free_pages"], b["meta_bytes"]
    assert sum(c << k for k, c in enumerate(fb)) == free, (
        "free_pages %d != sum(c_k * 2^k) = %d" % (free, sum(c << k for k, c in enumerate(fb))))
    assert 0 < free <= total, "free_pages %d not in (0, total_pages %d]" % (free, total)
    ram_pages = mm["ram_bytes"] // PAGE
    assert total <= ram_pages, "total_pages %d > RAM pages %d" % (total, ram_pages)
    # What the buddy does not manage: the kernel image, its own metadata, and
    # a little more (RAM below 1 MiB, partial pages at entry edges, page tables,
    # boot stack).  Allow image + metadata + 4 MiB.
    allowed = kernel_bytes + meta + 4 * MiB
    missing = (ram_pages - total) * PAGE
    assert missing <= allowed, (
        "buddy manages %d pages, RAM has %d: %d KiB unaccounted (> image %d KiB + meta %d KiB "
        "+ 4096 KiB)" % (total, ram_pages, missing >> 10, kernel_bytes >> 10, meta >> 10))
    # metadata is small: well under 1% of RAM... but not nothing
    assert 0 < meta <= mm["ram_bytes"] // 64, "meta_bytes %d implausible for %d bytes of RAM" % (
        meta, mm["ram_bytes"])


def check_tap(boot: Boot, allow_skips: bool = True) -> guestlog.Tap:
    tap = boot.tap()
    ctx = boot.context(60)
    assert tap.version == 14, "no 'TAP version 14' line\n" + ctx
    assert tap.plan is not None, "no TAP plan line 1..N\n" + ctx
    assert not tap.plan_before_results, "plan printed before the results (spec: at the end)"
    assert tap.lines_after_plan == 0, "results after the plan line\n" + ctx
    assert tap.plan > 0, "empty test plan"
    assert len(tap.results) == tap.plan, "plan 1..%d but %d results\n%s" % (
        tap.plan, len(tap.results), ctx)
    nums = [r.number for r in tap.results]
    assert nums == list(range(1, tap.plan + 1)), "test numbers not 1..%d: %r" % (tap.plan, nums)
    failed = tap.failed
    assert not failed, "failed tests: %s\n%s" % (
        "; ".join("%d %s" % (r.number, r.description) for r in failed), ctx)
    assert tap.summary is not None, "no SUMMARY line\n" + ctx
    n, f, s = tap.summary
    assert (n, f, s) == (tap.plan, 0, len(tap.skipped)), (
        "SUMMARY %r inconsistent with TAP (plan %d, 0 failed, %d skipped)" % (
            tap.summary, tap.plan, len(tap.skipped)))
    if not allow_skips:
        assert not tap.skipped, "skipped: %r" % tap.skipped
    return tap


# ---------------------------------------------------------------- balloon features

#: DEFLATE_ON_OOM feature bit (virtio 5.5.3)
F_DEFLATE_ON_OOM = 1 << 2
