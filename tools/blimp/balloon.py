"""Drive QEMU's virtio balloon from the host over QMP (standard library only).

    from blimp.qemu import Qemu
    from blimp.balloon import Balloon
    with Qemu("build/blimp.elf", memory="1G", balloon=True) as q:
        b = Balloon.of(q)                  # QMP client, RAM size, QEMU pid, QOM path
        b.set_size(512 << 20)              # balloon holds 512 MiB (guest left with 512 MiB)
        secs = b.wait_size(512 << 20, timeout=30)   # polls query-balloon every 2 ms
        print(b.rss() >> 20, "MiB resident")
        b.enable_stats(1); print(b.wait_stats(timeout=10)["stats"]["stat-free-memory"])

Two ways to name a target (QEMU docs section 7.2 of balloon-protocol.md):
 * **guest size** = what QMP ``balloon {"value": N}`` takes and ``query-balloon``
   reports as ``actual``: the logical VM size, RAM minus the balloon;
 * **balloon size** = RAM minus guest size = ``num_pages * 4096`` in the device.
QEMU rejects a guest size <= 0 (``GenericError``), so the largest balloon that can be
asked for is RAM - 1 byte; ``set_size`` refuses a balloon >= RAM with ValueError.
Sizes are rounded down to whole 4 KiB pages (QEMU computes num_pages = (RAM-N) >> 12,
and ``actual`` is always RAM - pages * 4096).
"""

from __future__ import annotations

import time
from typing import Callable, Optional

from .qemu import Qemu, balloon_qom_path
from .qmp import QMP
from .units import mib, page_round

DEFAULT_POLL_S = 0.002
#: VIRTIO_BALLOON_F_FREE_PAGE_HINT: the guest tells the host which pages are free while
#: it migrates them, so they need not be sent
F_FREE_PAGE_HINT = 1 << 3
UNSET_STAT = (1 << 64) - 1    # QEMU's "-1" for a stat the guest did not send


class BalloonTimeout(TimeoutError):
    def __init__(self, msg: str, last_actual: Optional[int] = None) -> None:
        super().__init__(msg)
        self.last_actual = last_actual


class BalloonAborted(BalloonTimeout):
    """wait_* gave up early because its `abort` callback named a reason."""


def rss_of(pid: int) -> int:
    """Resident set size in bytes of process `pid` (VmRSS in /proc/<pid>/status)."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                parts = line.split()
                return int(parts[1]) * 1024   # "VmRSS:  123456 kB"
    raise RuntimeError("no VmRSS in /proc/%d/status (a kernel thread?)" % pid)


class Balloon:
    def __init__(self, qmp: QMP, ram_bytes: int, pid: Optional[int] = None,
                 qom_path: str = "/machine/peripheral/balloon0",
                 alive: Optional[Callable[[], bool]] = None) -> None:
        self.qmp = qmp
        self.ram = ram_bytes
        self.pid = pid
        self.qom_path = qom_path
        self.alive = alive
        self.polls = 0            # query-balloon calls made by the last wait

    @classmethod
    def of(cls, q: Qemu) -> Balloon:
        """A Balloon for a started Qemu (with balloon=True)."""
        return cls(q.qmp(), q.memory_bytes, pid=q.pid, qom_path=balloon_qom_path(q.balloon_id),
                   alive=q.running)

    # ---------------------------------------------------------- targets

    def page_round(self, n: int) -> int:
        return page_round(n)

    def set_guest_size(self, guest_bytes: int) -> int:
        """QMP balloon value=guest_bytes (rounded down to a page); returns the value sent."""
        v = self.page_round(int(guest_bytes))
        if v <= 0:
            raise ValueError("guest size must be at least one page (QEMU rejects <= 0), got %d"
                             % guest_bytes)
        self.qmp.execute("balloon", value=v)
        return v

    def set_size(self, balloon_bytes: int) -> int:
        """Ask for a balloon of `balloon_bytes` (rounded down to a page): QMP balloon
        value = RAM - balloon.  Returns the balloon size asked for."""
        size = self.page_round(int(balloon_bytes))
        if size < 0 or size >= self.ram:
            raise ValueError("balloon size %d out of range [0, RAM %d)" % (size, self.ram))
        self.set_guest_size(self.ram - size)
        return size

    def guest_size(self) -> int:
        """query-balloon 'actual': the guest's logical size in bytes."""
        return self.qmp.execute("query-balloon")["actual"]

    def size(self) -> int:
        """Bytes in the balloon now (RAM - query-balloon actual)."""
        return self.ram - self.guest_size()

    def wait_guest_size(self, guest_bytes: int, timeout: float = 30.0,
                        poll: float = DEFAULT_POLL_S, since: Optional[float] = None,
                        abort: Optional[Callable[[], Optional[str]]] = None) -> float:
        """Poll query-balloon until actual == guest_bytes (page-rounded).  Returns the
        seconds from `since` (time.monotonic(); default: now) to the first poll that
        saw it.  BalloonTimeout (with the last value seen) after `timeout` s.
        `abort`, if given, is called every ~50 ms; a string it returns ends the wait
        with BalloonAborted (e.g. the guest said it cannot get there)."""
        want = self.page_round(int(guest_bytes))
        t0 = time.monotonic() if since is None else since
        deadline = time.monotonic() + timeout
        self.polls = 0
        last = None
        next_abort_check = time.monotonic() + 0.05
        while True:
            last = self.guest_size()
            self.polls += 1
            now = time.monotonic()
            if last == want:
                return now - t0
            if now >= deadline:
                raise BalloonTimeout(
                    "balloon did not reach guest size %s (balloon %s) within %.1f s: "
                    "query-balloon actual stuck at %s (balloon %s)" % (
                        mib(want), mib(self.ram - want), timeout, mib(last),
                        mib(self.ram - last)), last)
            if self.alive is not None and not self.alive():
                raise BalloonTimeout("QEMU exited while waiting for the balloon", last)
            if abort is not None and now >= next_abort_check:
                next_abort_check = now + 0.05
                why = abort()
                if why:
                    raise BalloonAborted(
                        "gave up waiting for guest size %s (balloon %s): %s; query-balloon "
                        "actual %s (balloon %s)" % (mib(want), mib(self.ram - want), why,
                                                    mib(last), mib(self.ram - last)), last)
            if poll:
                time.sleep(poll)

    def wait_size(self, balloon_bytes: int, timeout: float = 30.0,
                  poll: float = DEFAULT_POLL_S, since: Optional[float] = None,
                  abort: Optional[Callable[[], Optional[str]]] = None) -> float:
        """wait_guest_size for a balloon of `balloon_bytes`."""
        return self.wait_guest_size(self.ram - self.page_round(int(balloon_bytes)), timeout,
                                    poll, since, abort)

    # the name the brief/older scripts use
    wait_actual = wait_guest_size

    def resize(self, balloon_bytes: int, timeout: float = 30.0,
               poll: float = DEFAULT_POLL_S,
               abort: Optional[Callable[[], Optional[str]]] = None) -> float:
        """set_size + wait_size, timed from just before the QMP command."""
        t0 = time.monotonic()
        size = self.set_size(balloon_bytes)
        return self.wait_size(size, timeout, poll, since=t0, abort=abort)

    # ---------------------------------------------------------- host side

    def rss(self) -> int:
        """QEMU's resident set size in bytes."""
        if self.pid is None:
            raise RuntimeError("QEMU pid unknown")
        return rss_of(self.pid)

    # ---------------------------------------------------------- stats

    def enable_stats(self, interval_s: int = 1) -> None:
        """qom-set guest-stats-polling-interval (seconds; 0 stops polling)."""
        self.qmp.execute("qom-set", path=self.qom_path,
                         property="guest-stats-polling-interval", value=int(interval_s))

    def stats(self) -> dict:
        """qom-get guest-stats: {"stats": {...}, "last-update": epoch seconds}."""
        return self.qmp.execute("qom-get", path=self.qom_path, property="guest-stats")

    def wait_stats(self, timeout: float = 10.0, newer_than: int = 0,
                   pred: Optional[Callable[[dict], bool]] = None,
                   poll: float = 0.05) -> dict:
        """Poll guest-stats until last-update > newer_than (and pred(stats) holds)."""
        deadline = time.monotonic() + timeout
        while True:
            s = self.stats()
            if s.get("last-update", 0) > newer_than and (pred is None or pred(s)):
                return s
            if time.monotonic() >= deadline:
                raise BalloonTimeout("no matching guest-stats within %.1f s (last: %r)"
                                     % (timeout, s))
            time.sleep(poll)
