"""Run a blimp image in QEMU, capture its serial console, never leak a QEMU.

Usage::

    from blimp.qemu import Qemu
    with Qemu("build/blimp.elf", machine="q35", memory="128M",
              append="blimp.mode=boot", timeout=30) as q:
        q.wait_for(r"^blimp: ready in \\d+ us", timeout=10)   # human text: a regex
        ev = q.wait_event("exit", lambda e: e["code"] == 0x10)  # events: parsed JSON
        status = q.wait()          # raw QEMU exit status (33 = guest success)
        print(q.outcome.describe())

Every QEMU runs in its own session/process group with a hard deadline
(``timeout``, enforced by a watchdog thread even if nobody calls ``wait``) and
is killed by its own PID (SIGTERM, then SIGKILL) on timeout, on ``close()``,
on leaving the ``with`` block (also through an exception) and at interpreter
exit.  Where util-linux ``setpriv`` exists QEMU also gets PDEATHSIG=KILL, so it
dies with the thread that started it even if Python is killed with SIGKILL.

QEMU facts this relies on (checked on QEMU 7.2, see shared boot-notes):
 * ``-serial`` works on microvm for COM1, but microvm creates only ONE serial
   port from ``-serial``: a second ``-serial`` is silently ignored there.  So
   COM2 (the agent channel) is always ``-device isa-serial,iobase=0x2f8,irq=3``.
 * ``isa-debug-exit`` works on pc, q35 and microvm; status = code*2+1.
 * ``/dev/kvm`` on this machine is PVM (kvm_pvm), which is slow for firmware:
   ``accel="auto"`` only picks KVM with kvm_intel/kvm_amd loaded.
"""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import (IO, Any, BinaryIO, Callable, Dict, List, Optional, Sequence, Set, TypeVar,
                    Union)

from . import exitcodes, guestlog
from .agent import Agent
from .qmp import QMP

QEMU_BINARY = os.environ.get("BLIMP_QEMU", "qemu-system-x86_64")
MACHINES = ("pc", "q35", "microvm")
ACCELS = ("auto", "tcg", "kvm")
DEBUG_EXIT_DEVICE = "isa-debug-exit,iobase=0xf4,iosize=0x04"
AGENT_SERIAL = "isa-serial,chardev=agent,iobase=0x2f8,irq=3"
#: the iothread that free page hinting runs in (QEMU refuses free-page-hint without one)
HINT_IOTHREAD = "io0"
#: UEFI firmware (Debian's ovmf): 2 MiB with volatile variables, so no VARS copy is needed.
#: TCG only: OVMF does not run under this machine's PVM /dev/kvm.
OVMF = "/usr/share/ovmf/OVMF.fd"
KILL_GRACE = 2.0      # seconds between SIGTERM and SIGKILL

T = TypeVar("T")


class QemuError(Exception):
    pass


class SerialTimeout(QemuError, TimeoutError):
    pass


class QemuExited(QemuError):
    """QEMU exited while we were waiting for serial output."""


# ------------------------------------------------------------ helpers

def qemu_version(qemu: str = QEMU_BINARY) -> str:
    """The first line of `qemu --version`, or '?'."""
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
        return out.splitlines()[0] if out else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def hardware_kvm_available() -> bool:
    """True only for real hardware virtualisation: /dev/kvm AND kvm_intel/kvm_amd.

    This machine's /dev/kvm comes from kvm_pvm (software-assisted, nested; firmware
    is ~40x slower than TCG there), which deliberately does not count."""
    if not os.path.exists("/dev/kvm"):
        return False
    return any(os.path.exists("/sys/module/" + m) for m in ("kvm_intel", "kvm_amd"))


def resolve_accel(accel: str) -> str:
    if accel not in ACCELS:
        raise ValueError("accel must be one of %s, not %r" % (ACCELS, accel))
    if accel == "auto":
        return "kvm" if hardware_kvm_available() else "tcg"
    return accel


_MEM_RE = re.compile(r"^(\d+)([KMGT]?)(?:i?B)?$", re.I)


def parse_memory(mem: Union[str, int]) -> int:
    """'128M' / '4G' / '512' (MiB, like QEMU) -> bytes."""
    if isinstance(mem, int):
        return mem << 20
    m = _MEM_RE.match(str(mem).strip())
    if not m:
        raise ValueError("bad memory size %r (use e.g. 128M, 4G)" % (mem,))
    n, unit = int(m.group(1)), (m.group(2) or "M").upper()
    return n << {"K": 10, "M": 20, "G": 30, "T": 40}[unit]


def qemu_memory_arg(mem: Union[str, int]) -> str:
    """Normalised -m argument (QEMU takes suffixes K, M, G, T)."""
    return "%dM" % (parse_memory(mem) >> 20) if parse_memory(mem) % (1 << 20) == 0 \
        else "%dK" % (parse_memory(mem) >> 10)


#: device/machine properties: 'a=1,b=2', ['a=1', 'b=2'] or {'a': 1}
Opts = Union[None, str, Sequence[str], Dict[str, object]]


def _opts(opts: Opts) -> List[str]:
    if not opts:
        return []
    if isinstance(opts, dict):
        return ["%s=%s" % (k, v) for k, v in opts.items()]
    if isinstance(opts, str):
        return [o for o in opts.split(",") if o]
    return list(opts)


def balloon_device(machine: str, opts: Opts = None, dev_id: Optional[str] = "balloon0") -> str:
    dev = "virtio-balloon-device" if machine == "microvm" else "virtio-balloon-pci"
    parts = [dev] + (["id=" + dev_id] if dev_id else []) + _opts(opts)
    return ",".join(parts)


def free_page_hint_opts(iothread: str = HINT_IOTHREAD) -> List[str]:
    """Balloon properties that offer VIRTIO_BALLOON_F_FREE_PAGE_HINT; the Qemu needs
    ``iothread=<the same id>`` too."""
    return ["free-page-hint=on", "iothread=" + iothread]


def balloon_qom_path(dev_id: str = "balloon0") -> str:
    return "/machine/peripheral/" + dev_id


_SETPRIV = shutil.which("setpriv")
_live: Set[Qemu] = set()
_live_lock = threading.Lock()


def _kill_all_live() -> None:
    with _live_lock:
        live = list(_live)
    for q in live:
        try:
            q.kill()
        except Exception:
            pass


atexit.register(_kill_all_live)


def firmware_args(qemu: str) -> List[str]:
    """A QEMU built outside Debian's package (the reference host) has no firmware path of
    its own: point it at the packaged firmware (SeaBIOS, option ROMs)."""
    path = shutil.which(qemu) or qemu
    if os.path.realpath(path).startswith("/usr/bin/"):
        return []
    return ["-L", "/usr/share/qemu", "-L", "/usr/share/seabios"]


# ------------------------------------------------------------ the class

class Qemu:
    """One QEMU run of a blimp image (context manager)."""

    def __init__(self, kernel: Optional[str], *, machine: str = "q35", memory: Union[str, int] = "128M",
                 accel: str = "auto", append: Optional[str] = None,
                 balloon: bool = False, balloon_opts: Opts = None, balloon_id: str = "balloon0",
                 agent: bool = False, qmp: bool = True, smp: Optional[int] = None,
                 machine_opts: Opts = None, cpu: Optional[str] = None,
                 extra_args: Sequence[str] = (), timeout: float = 60.0,
                 echo: Optional[BinaryIO] = None, serial_log: Optional[str] = None,
                 serial_log_append: bool = False, paused: bool = False,
                 qemu: str = QEMU_BINARY, keep_tmp: bool = False,
                 iothread: Optional[str] = None, incoming: Optional[str] = None,
                 cdrom: Optional[str] = None, disk: Optional[str] = None,
                 ovmf: bool = False, debug_exit: bool = True) -> None:
        """`iothread` adds ``-object iothread,id=<it>`` (for devices that need one, such
        as the balloon with free-page-hint=on); `incoming` makes this QEMU a migration
        destination (``-incoming <it>``, e.g. "defer"; see migration_destination()).
        Firmware boots instead of ``-kernel`` (kernel=None, no append: the command line is
        inside the media; see blimp.images): `cdrom` an ISO, `disk` a raw image (a FAT ESP;
        attached with snapshot=on, so the file never changes), `ovmf` UEFI firmware instead
        of SeaBIOS (OVMF). `debug_exit=False` leaves out isa-debug-exit, as hosts other
        than ours do: the guest then ends by resetting the machine (-no-reboot: QEMU exits 0)."""
        if machine not in MACHINES:
            raise ValueError("machine must be one of %s, not %r" % (MACHINES, machine))
        if kernel is None and not (cdrom or disk):
            raise ValueError("nothing to boot: give a kernel, a cdrom or a disk")
        if kernel is None and append is not None:
            raise ValueError("append needs a kernel (-append only goes with -kernel)")
        self.kernel = kernel
        self.machine = machine
        self.memory = qemu_memory_arg(memory)
        self.memory_bytes = parse_memory(memory)
        self.accel = resolve_accel(accel)
        self.append = append
        self.balloon = balloon
        self.balloon_opts = _opts(balloon_opts)
        self.balloon_id = balloon_id
        self.agent = agent
        self.use_qmp = qmp
        self.smp = smp
        self.machine_opts = _opts(machine_opts)
        self.cpu = cpu
        self.extra_args = list(extra_args)
        self.timeout = float(timeout)
        self.echo = echo                  # binary stream; raw serial bytes are copied there
        self.serial_log = serial_log      # path; raw serial bytes are written there too
        self.serial_log_append = serial_log_append
        self.paused = paused
        self.qemu = qemu
        self.keep_tmp = keep_tmp
        self.iothread = iothread
        self.incoming = incoming
        self.cdrom = cdrom
        self.disk = disk
        self.ovmf = ovmf
        self.debug_exit = debug_exit

        self.tmpdir: Optional[str] = None
        self.qmp_path: Optional[str] = None
        self.agent_path: Optional[str] = None
        self.migration_path: Optional[str] = None   # where a destination listens
        self.proc: Optional[subprocess.Popen] = None
        self.t_start: Optional[float] = None   # time.monotonic() just before spawning
        self.t_exit: Optional[float] = None
        self.timed_out = False
        self.killed = False                    # we ended it (timeout or close)
        self.returncode: Optional[int] = None

        self._cond = threading.Condition()
        self._lines: List[str] = []
        self._line_times: List[float] = []
        self._partial = b""
        self.ended_mid_line = False  # the console closed inside a line (see continue_line)
        self._raw = bytearray()
        self._stderr = bytearray()
        self._eof = False
        self._threads: List[threading.Thread] = []
        self._watchdog: Optional[threading.Timer] = None
        self._log_fp: Optional[BinaryIO] = None
        self._qmp_client: Optional[QMP] = None
        self._agent_client: Optional[Agent] = None
        self.last_index = -1                   # the line the last wait_* found

    # -------------------------------------------------------- argv

    def build_argv(self) -> List[str]:
        if self.tmpdir is None:
            raise QemuError("build_argv() needs the temp dir: call start() or argv()")
        machine = ",".join([self.machine] + self.machine_opts)
        argv = [self.qemu] + firmware_args(self.qemu) + (["-bios", OVMF] if self.ovmf else []) + [
                "-machine", machine,
                "-accel", self.accel,
                "-m", self.memory,
                "-no-reboot", "-nodefaults", "-display", "none"] + (
                ["-device", DEBUG_EXIT_DEVICE] if self.debug_exit else []) + [
                "-chardev", "stdio,id=con0,signal=off",
                "-serial", "chardev:con0"]
        if self.accel == "kvm":
            argv += ["-cpu", self.cpu or "qemu64,-pni"]
        elif self.cpu:
            argv += ["-cpu", self.cpu]
        if self.smp:
            argv += ["-smp", str(self.smp)]
        if self.use_qmp:
            argv += ["-qmp", "unix:%s,server=on,wait=off" % self.qmp_path]
        if self.agent:
            argv += ["-chardev", "socket,id=agent,path=%s,server=on,wait=off" % self.agent_path,
                     "-device", AGENT_SERIAL]
        if self.iothread:
            argv += ["-object", "iothread,id=%s" % self.iothread]
        if self.balloon:
            argv += ["-device", balloon_device(self.machine, self.balloon_opts, self.balloon_id)]
        if self.kernel is not None:
            argv += ["-kernel", self.kernel]
        if self.append is not None:
            argv += ["-append", self.append]
        if self.cdrom:
            argv += ["-cdrom", self.cdrom]
        if self.disk:
            argv += ["-drive", "file=%s,format=raw,snapshot=on" % self.disk]
        if self.paused:
            argv += ["-S"]
        if self.incoming:
            argv += ["-incoming", self.incoming]
        argv += self.extra_args
        return argv

    def _make_tmp(self) -> None:
        if self.tmpdir is None:
            # short path: unix socket paths are limited to 107 bytes
            self.tmpdir = tempfile.mkdtemp(prefix="blimp-", dir="/tmp")
            self.qmp_path = os.path.join(self.tmpdir, "qmp.sock")
            self.agent_path = os.path.join(self.tmpdir, "agent.sock")
            self.migration_path = os.path.join(self.tmpdir, "migration.sock")

    def argv(self) -> List[str]:
        self._make_tmp()
        return self.build_argv()

    # -------------------------------------------------------- lifecycle

    def start(self) -> Qemu:
        if self.proc is not None:
            raise QemuError("already started")
        for what, path in (("kernel image", self.kernel), ("cdrom image", self.cdrom),
                           ("disk image", self.disk), ("firmware", OVMF if self.ovmf else None)):
            if path is not None and not os.path.isfile(path):
                raise QemuError("%s not found: %s" % (what, path))
        self._make_tmp()
        argv = self.build_argv()
        spawn = argv
        if _SETPRIV and threading.current_thread() is threading.main_thread():
            # PDEATHSIG follows the *thread* that forks; only use it from the main thread
            spawn = [_SETPRIV, "--pdeathsig", "KILL", "--"] + argv
        if self.serial_log:
            # a migration destination appends: one log holds the guest's whole console
            self._log_fp = open(self.serial_log, "ab" if self.serial_log_append else "wb")
        self.t_start = time.monotonic()
        self.proc = subprocess.Popen(spawn, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, start_new_session=True,
                                     close_fds=True)
        with _live_lock:
            _live.add(self)
        self._watchdog = threading.Timer(self.timeout, self._on_deadline)
        self._watchdog.daemon = True
        self._watchdog.start()
        for target, stream in ((self._read_serial, self.proc.stdout),
                               (self._read_stderr, self.proc.stderr)):
            t = threading.Thread(target=target, args=(stream,), daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def __enter__(self) -> Qemu:
        return self.start()

    def __exit__(self, *exc: object) -> bool:
        self.close()
        return False

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def deadline(self) -> float:
        return (self.t_start or time.monotonic()) + self.timeout

    def _on_deadline(self) -> None:
        if self.running():
            self.timed_out = True
            self.kill()

    def kill(self) -> None:
        """SIGTERM, then SIGKILL after KILL_GRACE seconds; by PID only."""
        p = self.proc
        if p is None or p.poll() is not None:
            return
        self.killed = True
        try:
            p.send_signal(signal.SIGTERM)   # Popen refuses to signal a reaped PID
            try:
                p.wait(KILL_GRACE)
            except subprocess.TimeoutExpired:
                p.send_signal(signal.SIGKILL)
                p.wait(KILL_GRACE * 5)
        except ProcessLookupError:
            pass
        self._reaped()

    def _reaped(self) -> None:
        if self.proc is not None and self.proc.returncode is not None and self.returncode is None:
            self.returncode = self.proc.returncode
            self.t_exit = time.monotonic()

    def wait(self, timeout: Optional[float] = None) -> int:
        """Wait for QEMU to exit and return its raw exit status.

        Waits at most `timeout` seconds (and never past the run's deadline); if it
        is still running then, QEMU is killed and the run counts as timed out
        (``outcome.kind == 'timeout'``; the returned status is then the signal's)."""
        if self.proc is None:
            raise QemuError("not started")
        limit = self.deadline() - time.monotonic()
        if timeout is not None:
            limit = min(limit, timeout)
        try:
            self.proc.wait(max(0.0, limit))
        except subprocess.TimeoutExpired:
            self.timed_out = True
            self.kill()
        self._reaped()
        self._join_readers()
        return self.proc.returncode

    def _join_readers(self, timeout: float = 5.0) -> None:
        for t in self._threads:
            t.join(timeout)

    def close(self) -> None:
        """Kill QEMU if still running, stop helpers, remove the temp dir."""
        for client in (self._qmp_client, self._agent_client):
            try:
                if client is not None:
                    client.close()
            except Exception:
                pass
        if self.proc is not None:
            if self.proc.poll() is None:
                self.kill()
            self._reaped()
            self._join_readers()
            for s in (self.proc.stdout, self.proc.stderr):
                try:
                    s.close()
                except Exception:
                    pass
        if self._watchdog is not None:
            self._watchdog.cancel()
        with _live_lock:
            _live.discard(self)
        if self._log_fp is not None:
            try:
                self._log_fp.close()
            except Exception:
                pass
            self._log_fp = None
        if self.tmpdir and not self.keep_tmp:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    @property
    def outcome(self) -> exitcodes.Outcome:
        if self.proc is None:
            raise QemuError("not started")
        if self.returncode is None and not self.timed_out:
            raise QemuError("still running; call wait() first")
        return exitcodes.classify(self.returncode, self.timed_out)

    # -------------------------------------------------------- serial

    @staticmethod
    def _pump(stream: IO[bytes], on_chunk: Callable[[bytes], None]) -> None:
        """Hand every chunk read from `stream` to on_chunk; b"" once at end of file."""
        fd = stream.fileno()
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            on_chunk(chunk)
            if not chunk:
                return

    def _read_serial(self, stream: IO[bytes]) -> None:
        self._pump(stream, self._serial_chunk)

    def _serial_chunk(self, chunk: bytes) -> None:
        now = time.monotonic()
        if not chunk:
            with self._cond:
                if self._partial:
                    self._add_line(self._partial, now)
                    self._partial = b""
                    self.ended_mid_line = True
                self._eof = True
                self._cond.notify_all()
            return
        for sink in (self.echo, self._log_fp):
            if sink is not None:
                try:
                    sink.write(chunk)
                    sink.flush()
                except Exception:
                    pass
        with self._cond:
            self._raw += chunk
            data = self._partial + chunk
            *complete, self._partial = data.split(b"\n")
            for line in complete:
                self._add_line(line, now)
            self._cond.notify_all()

    def _add_line(self, raw: bytes, t: float) -> None:
        self._lines.append(guestlog.clean(raw.decode("utf-8", "replace")))
        self._line_times.append(t)

    def _read_stderr(self, stream: IO[bytes]) -> None:
        def keep(chunk: bytes) -> None:
            with self._cond:
                self._stderr += chunk
        self._pump(stream, keep)

    def continue_line(self, head: str) -> None:
        """A migrated guest: `head` is the line the source's console ended inside; what the
        guest printed next, here, completes it."""
        with self._cond:
            if self._lines:
                self._lines[0] = head + self._lines[0]
            else:
                self._partial = head.encode() + self._partial

    @property
    def lines(self) -> List[str]:
        """Complete serial lines so far (CR and ANSI escapes removed)."""
        with self._cond:
            return list(self._lines)

    def line_time(self, index: int) -> float:
        """Seconds from spawn to the arrival of serial line `index` (host clock)."""
        with self._cond:
            return self._line_times[index] - self.t_start

    @property
    def serial(self) -> str:
        """The full serial text so far, raw (decoded)."""
        with self._cond:
            return bytes(self._raw).decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        with self._cond:
            return bytes(self._stderr).decode("utf-8", "replace")

    def wait_line(self, test: Callable[[str], T], timeout: float = 10.0, start: int = 0,
                  what: str = "the awaited line") -> T:
        """Wait until test(line) is truthy for a serial line with index >= start and
        return that value; ``self.last_index`` is then the line's index.

        Raises SerialTimeout after `timeout` s (or at the run's deadline), and
        QemuExited as soon as QEMU has exited without printing such a line."""
        end = min(time.monotonic() + timeout, self.deadline())
        i = start
        while True:
            with self._cond:
                while i < len(self._lines):
                    found = test(self._lines[i])
                    if found:
                        self.last_index = i
                        return found
                    i += 1
                eof = self._eof
                left = end - time.monotonic()
                if not eof and left > 0:
                    self._cond.wait(min(left, 0.5))
                    continue
            if eof:
                self._reap_after_eof()
                raise QemuExited("QEMU exited (status %s) before serial showed %s"
                                 % (self.returncode, what))
            raise SerialTimeout("serial did not show %s within %.1f s" % (what, timeout))

    def _reap_after_eof(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(2)
            except subprocess.TimeoutExpired:
                pass
            self._reaped()

    def wait_for(self, pattern: Union[str, re.Pattern], timeout: float = 10.0,
                 start: int = 0) -> re.Match:
        """Wait until a serial line (index >= start) matches `pattern` (re.search);
        returns the match.  For human text; events have wait_event."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        return self.wait_line(rx.search, timeout, start, "a line matching %r" % rx.pattern)

    def wait_event(self, name: str, predicate: Optional[Callable[[dict], bool]] = None,
                   timeout: float = 10.0, start: int = 0) -> dict:
        """Wait for the guest's event `name` (a serial line parsed as JSON, so key order
        and spacing do not matter) at index >= start for which predicate(event) holds."""
        return self.wait_line(lambda line: guestlog.event_named(line, name, predicate),
                              timeout, start, "a %s event%s" % (
                                  name, "" if predicate is None else " as expected"))

    def events(self, name: Optional[str] = None) -> List[dict]:
        return guestlog.events(self.lines, name)

    # -------------------------------------------------------- QMP

    def qmp(self, timeout: float = 10.0) -> QMP:
        """Connected QMP client (created on first use, closed by close())."""
        if not self.use_qmp:
            raise QemuError("started without qmp=True")
        if self._qmp_client is None:
            self._qmp_client = QMP(self.qmp_path, connect_timeout=timeout, alive=self.running)
        return self._qmp_client

    def agent_client(self, timeout: float = 10.0, ready: bool = True) -> Agent:
        """Connected client of the guest agent on COM2 (blimp.agent; created on
        first use, closed by close()).  With `ready` it also waits (up to `timeout`)
        until the guest agent answers."""
        if not self.agent_path or not self.agent:
            raise QemuError("started without agent=True")
        if self._agent_client is None:
            self._agent_client = Agent(self.agent_path, connect_timeout=timeout,
                                       alive=self.running)
        if ready and not self._agent_client.ready:
            self._agent_client.wait_ready(timeout)
        return self._agent_client

    def drop_agent_client(self) -> None:
        """Close the agent client (if any): the next agent_client() connects anew."""
        if self._agent_client is not None:
            try:
                self._agent_client.close()
            except Exception:
                pass
            self._agent_client = None

    # -------------------------------------------------------- migration

    @property
    def free_page_hint(self) -> bool:
        """The balloon device offers FREE_PAGE_HINT."""
        return self.balloon and "free-page-hint=on" in self.balloon_opts

    def migration_destination(self, timeout: Optional[float] = None,
                              serial_log: Optional[str] = None,
                              echo: Optional[BinaryIO] = None) -> Qemu:
        """A new (not started) Qemu that can receive this one's guest: the same binary,
        machine, -m, CPU, devices and device ids, iothread, kernel and command line
        (migration needs identical RAM blocks and device state layout), with its own
        temp dir and sockets, started with ``-incoming defer`` (accept_migration()).
        Its serial log, if any, is appended to, not truncated."""
        return Qemu(self.kernel, machine=self.machine, memory=self.memory, accel=self.accel,
                    append=self.append, balloon=self.balloon, balloon_opts=self.balloon_opts,
                    balloon_id=self.balloon_id, agent=self.agent, qmp=True, smp=self.smp,
                    machine_opts=self.machine_opts, cpu=self.cpu, extra_args=self.extra_args,
                    timeout=self.timeout if timeout is None else timeout, echo=echo,
                    serial_log=serial_log, serial_log_append=True, qemu=self.qemu,
                    keep_tmp=self.keep_tmp, iothread=self.iothread, incoming="defer",
                    cdrom=self.cdrom, disk=self.disk, ovmf=self.ovmf,
                    debug_exit=self.debug_exit)

    def accept_migration(self, timeout: float = 10.0) -> str:
        """On a started ``incoming="defer"`` QEMU: listen for the migration stream on a
        unix socket in its temp dir (QMP migrate-incoming) and return the URI to give the
        source's ``migrate``.  Once this returns the socket accepts connections, which a
        plain ``-incoming unix:`` would not promise."""
        if self.incoming != "defer" or self.proc is None:
            raise QemuError("accept_migration() needs a started Qemu with incoming='defer'")
        uri = "unix:" + str(self.migration_path)
        self.qmp(timeout).execute("migrate-incoming", uri=uri)
        return uri

    def describe(self) -> str:
        """A short multi-line report for assertion messages."""
        out = ["argv: " + " ".join(self.build_argv()) if self.tmpdir else "argv: -"]
        if self.proc is not None and (self.returncode is not None or self.timed_out):
            out.append("outcome: " + self.outcome.describe())
        err = self.stderr.strip()
        if err:
            out.append("qemu stderr:\n" + err)
        tail = self.lines[-40:]
        out.append("serial (last %d lines):\n%s" % (len(tail), "\n".join(tail)))
        return "\n".join(out)


def run(kernel: str, timeout: float = 60.0, **kw: Any) -> Qemu:
    """Boot, wait for exit (or the timeout), return the finished Qemu (closed)."""
    q = Qemu(kernel, timeout=timeout, **kw)
    try:
        q.start()
        q.wait()
    finally:
        q.close()
    return q
