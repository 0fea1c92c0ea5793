"""Tests of the host tools themselves; no blimp kernel needed (a fake QEMU
script stands in where a process is needed)."""

from __future__ import annotations

import json
import os
import socket
import sys
import textwrap
import threading
import time

import pytest

from blimp import exitcodes, guestlog
from blimp import qemu as qemumod
from blimp.qemu import Qemu, QemuExited, SerialTimeout
from blimp.qmp import QMP, QMPError, QMPTimeout


# ------------------------------------------------------------ exit codes

@pytest.mark.parametrize("status,kind,code,cli", [
    (33, "guest", 0x10, 0), (35, "guest", 0x11, 0x11), (37, "guest", 0x12, 0x12),
    (39, "guest", 0x13, 0x13), (41, "guest", 0x14, 0x14), (43, "guest", 0x15, 0x15),
    (45, "guest", 0x16, 0x16), (47, "guest", 0x17, 0x17),
    (0, "triple-fault", None, 3), (1, "qemu-error", None, 125),
    (-9, "signal", None, 137), (2, "other", None, 126)])
def test_classify(status, kind, code, cli):
    o = exitcodes.classify(status)
    assert (o.kind, o.code, o.cli_status()) == (kind, code, cli)
    assert o.ok == (status == 33)
    assert o.describe()


def test_classify_timeout_wins():
    o = exitcodes.classify(-15, timed_out=True)
    assert o.kind == "timeout" and o.cli_status() == 124


def test_status_roundtrip():
    for code in exitcodes.GUEST_CODES:
        assert exitcodes.guest_code(exitcodes.qemu_status(code)) == code
    assert exitcodes.qemu_status(exitcodes.SUCCESS) == 33
    assert exitcodes.qemu_status(exitcodes.NO_BALLOON_DEVICE) == 47


# ------------------------------------------------------------ guestlog

def test_parse_events_and_tap():
    lines = ["SeaBIOS noise \x1b[2J", '{"event":"boot","protocol":"pvh","cmdline":"x"}\r',
             "TAP version 14", "ok 1 - a", "not ok 2 - b", "ok 3 - c # SKIP no device",
             "1..3", "SUMMARY: 3 tests, 1 failed, 1 skipped",
             '{"event":"exit","code":17,"reason":"tests"}']
    assert [e["event"] for e in guestlog.events(lines)] == ["boot", "exit"]
    tap = guestlog.parse_tap(lines)
    assert tap.version == 14 and tap.plan == 3 and not tap.plan_before_results
    assert [r.number for r in tap.failed] == [2]
    assert [r.reason for r in tap.skipped] == ["no device"]
    assert tap.summary == (3, 1, 1)
    with pytest.raises(guestlog.BadEvent):
        guestlog.parse_event('{"event":"boot",')


def test_parse_event_ignores_key_order_and_spacing():
    """Events are JSON: the kernel may order keys and space them as it likes."""
    assert guestlog.parse_event('{ "actual_pages": 5, "event" : "balloon_reached", "ms": 1 }') == {
        "event": "balloon_reached", "actual_pages": 5, "ms": 1}
    assert guestlog.parse_event('{"ok":true,"cmd":"ping"}') is None      # an object, no event
    assert guestlog.parse_event("blimp: ready in 5 us") is None
    with pytest.raises(guestlog.BadEvent):
        guestlog.parse_event('{"ms":1,"event":')
    with pytest.raises(guestlog.BadEvent):
        guestlog.parse_event('{"event":7}')
    assert guestlog.event_named('{"ms":1,"event":"x"}', "x", lambda e: e["ms"] == 1)
    assert guestlog.event_named('{"ms":1,"event":"x"}', "x", lambda e: e["ms"] == 2) is None
    assert guestlog.event_named('{"event":"x",', "x") is None          # garbage never matches
    assert guestlog.ready_line('{"boot_us":5,"event":"ready"}') == {"event": "ready", "boot_us": 5}
    assert guestlog.ready_line("blimp: ready in 5 us").group(1) == "5"
    assert not guestlog.ready_line('{"event":"boot"}')


# ------------------------------------------------------------ argv / accel

def test_argv_microvm_balloon_agent(tmp_path):
    k = tmp_path / "k.elf"
    k.write_bytes(b"\x7fELF")
    q = Qemu(str(k), machine="microvm", memory="4G", accel="tcg", append="a=1 b=2",
             balloon=True, balloon_opts=["deflate-on-oom=on"], agent=True)
    try:
        argv = q.argv()
    finally:
        q.close()
    s = " ".join(argv)
    assert argv[argv.index("-m") + 1] == "4096M"
    assert "-device virtio-balloon-device,id=balloon0,deflate-on-oom=on" in s
    assert "-device isa-serial,chardev=agent,iobase=0x2f8,irq=3" in s
    assert "-device isa-debug-exit,iobase=0xf4,iosize=0x04" in s
    for a in ("-no-reboot", "-nodefaults"):
        assert a in argv
    assert argv[argv.index("-append") + 1] == "a=1 b=2"
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert "-cpu" not in argv


def test_argv_pc_balloon_pci_kvm(tmp_path):
    k = tmp_path / "k.elf"
    k.write_bytes(b"\x7fELF")
    q = Qemu(str(k), machine="pc", accel="kvm", balloon=True, balloon_opts="disable-modern=on")
    try:
        argv = q.argv()
    finally:
        q.close()
    assert "virtio-balloon-pci,id=balloon0,disable-modern=on" in argv
    assert argv[argv.index("-cpu") + 1] == "qemu64,-pni"


def test_accel_auto_ignores_pvm(monkeypatch):
    present = set()
    monkeypatch.setattr(qemumod.os.path, "exists", lambda p: p in present)
    present.update({"/dev/kvm", "/sys/module/kvm", "/sys/module/kvm_pvm"})
    assert qemumod.resolve_accel("auto") == "tcg"
    present.add("/sys/module/kvm_amd")
    assert qemumod.resolve_accel("auto") == "kvm"
    present.discard("/dev/kvm")
    assert qemumod.resolve_accel("auto") == "tcg"


@pytest.mark.parametrize("text,n", [("128M", 128 << 20), ("4G", 4 << 30), ("512", 512 << 20),
                                    ("6g", 6 << 30), ("1T", 1 << 40)])
def test_parse_memory(text, n):
    assert qemumod.parse_memory(text) == n


def test_parse_memory_rejects():
    with pytest.raises(ValueError):
        qemumod.parse_memory("4 GB please")


# ------------------------------------------------------------ process handling (fake QEMU)

def fake_qemu(tmp_path, body: str) -> str:
    p = tmp_path / "fake-qemu"
    p.write_text("#!%s\nimport sys, time, os\n%s\n" % (sys.executable, textwrap.dedent(body)))
    p.chmod(0o755)
    return str(p)


@pytest.fixture
def kernel(tmp_path):
    k = tmp_path / "k.elf"
    k.write_bytes(b"\x7fELF")
    return str(k)


def test_serial_capture_and_status(tmp_path, kernel):
    fq = fake_qemu(tmp_path, """
        sys.stdout.write('hello\\r\\n{"event":"ready","boot_us":5}\\r\\nblimp: ready in 5 us\\npartial')
        sys.stdout.flush(); time.sleep(0.2); sys.exit(33)""")
    with Qemu(kernel, qemu=fq, timeout=10) as q:
        m = q.wait_for(r"ready in (\d+) us", timeout=5)
        assert m.group(1) == "5" and q.last_index == 2
        assert q.line_time(q.last_index) >= 0
        assert q.wait() == 33
        assert q.outcome.ok
        assert q.lines == ["hello", '{"event":"ready","boot_us":5}', "blimp: ready in 5 us",
                           "partial"]
        assert q.events("ready") == [{"event": "ready", "boot_us": 5}]


def test_wait_event_tests_parsed_fields(tmp_path, kernel):
    """wait_event parses each line: it finds an event by its fields whatever their order,
    skips events that fail the predicate and lines that only look similar."""
    fq = fake_qemu(tmp_path, """
        for line in ['{"event":"balloon_reached","actual_pages":1,"ms":3}',
                     'balloon_reached actual_pages 7',
                     '{"ms": 9, "actual_pages": 7, "event": "balloon_reached"}',
                     '{"event":"balloon_reached","actual_pages":7,"ms":11}']:
            print(line, flush=True)
        time.sleep(0.2); sys.exit(33)""")
    with Qemu(kernel, qemu=fq, timeout=10, qmp=False) as q:
        ev = q.wait_event("balloon_reached", lambda e: e["actual_pages"] == 7, timeout=5)
        assert ev["ms"] == 9 and q.last_index == 2
        assert q.wait_event("balloon_reached", start=3, timeout=5)["ms"] == 11
        with pytest.raises(QemuExited):
            q.wait_event("balloon_reached", lambda e: e["actual_pages"] == 8, timeout=5)
        assert q.wait() == 33


def test_session_that_never_comes_up_reports_context(tmp_path, kernel):
    """A BalloonSession whose guest dies during boot fails with a SessionError that
    carries QEMU's outcome and the serial tail, and leaves no QEMU behind."""
    from blimp.session import BalloonSession, SessionError
    fq = fake_qemu(tmp_path, """
        print('blimp: panic: no memory map', flush=True)
        sys.exit(39)""")
    session = BalloonSession(kernel, memory="128M", accel="tcg", timeout=10, boot_timeout=5,
                             qemu=fq)
    t0 = time.monotonic()
    with pytest.raises(SessionError) as ei:
        with session:
            pytest.fail("the session must not start")
    assert time.monotonic() - t0 < 5
    assert "did not come up" in ei.value.reason
    assert "QEMU ended: guest exit 0x13 panic" in ei.value.context
    assert "| blimp: panic: no memory map" in ei.value.context
    assert not session.running()


def test_timeout_kills_by_deadline(tmp_path, kernel):
    fq = fake_qemu(tmp_path, """
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)   # force the SIGKILL path
        print('started', flush=True); time.sleep(600)""")
    t0 = time.monotonic()
    with Qemu(kernel, qemu=fq, timeout=1.0) as q:
        q.wait_for("started", 5)
        pid = q.pid
        status = q.wait()
    took = time.monotonic() - t0
    assert q.outcome.kind == "timeout" and status == -9
    assert took < 1.0 + qemumod.KILL_GRACE + 3
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_wait_for_raises_when_qemu_exits(tmp_path, kernel):
    fq = fake_qemu(tmp_path, "print('bye'); sys.exit(0)")
    with Qemu(kernel, qemu=fq, timeout=10) as q:
        with pytest.raises(QemuExited):
            q.wait_for("never", timeout=5)
        q.wait()
        assert q.outcome.kind == "triple-fault"


def test_wait_for_timeout_and_close_kills(tmp_path, kernel):
    fq = fake_qemu(tmp_path, "time.sleep(600)")
    with Qemu(kernel, qemu=fq, timeout=30) as q:
        with pytest.raises(SerialTimeout):
            q.wait_for("never", timeout=0.3)
        pid = q.pid
    assert q.returncode is not None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert not os.path.exists(q.tmpdir)


def test_exception_in_with_block_kills(tmp_path, kernel):
    fq = fake_qemu(tmp_path, "time.sleep(600)")
    with pytest.raises(RuntimeError):
        with Qemu(kernel, qemu=fq, timeout=30) as q:
            raise RuntimeError("boom")
    assert q.proc.returncode is not None


# ------------------------------------------------------------ QMP (fake server)

def qmp_server(path, script):
    """Serve one QMP client; `script` maps a command name to a list of messages to send."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve():
        c, _ = srv.accept()
        f = c.makefile("rwb")
        f.write(b'{"QMP": {"version": {"qemu": {"micro": 22, "minor": 2, "major": 7}}, '
                b'"capabilities": []}}\n')
        f.flush()
        for line in f:
            req = json.loads(line)
            for msg in script.get(req["execute"], [{"return": {}}]):
                if "return" in msg or "error" in msg:
                    msg = dict(msg, id=req.get("id"))
                f.write((json.dumps(msg) + "\n").encode())
                f.flush()
        c.close()
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def test_qmp_client(tmp_path):
    path = str(tmp_path / "q.sock")
    script = {
        "query-balloon": [{"event": "BALLOON_CHANGE", "data": {"actual": 1}},
                          {"return": {"actual": 134217728}}],
        "balloon": [{"error": {"class": "GenericError",
                               "desc": "Parameter 'target' expects a size"}}],
        "slow": [],
    }
    # start the server after the client begins retrying
    threading.Timer(0.3, qmp_server, args=(path, script)).start()
    c = QMP(path, connect_timeout=5, timeout=1)
    try:
        assert c.greeting["QMP"]["version"]["qemu"]["major"] == 7
        assert c.execute("query-balloon") == {"actual": 134217728}
        assert c.wait_event("BALLOON_CHANGE", timeout=0.1)["data"]["actual"] == 1
        with pytest.raises(QMPError) as ei:
            c.execute("balloon", value=0)
        assert ei.value.error_class == "GenericError"
        with pytest.raises(QMPTimeout):
            c.execute("slow", _timeout=0.2)
        with pytest.raises(QMPTimeout):
            c.wait_event("SHUTDOWN", timeout=0.2)
    finally:
        c.close()


def test_qmp_connect_deadline(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ConnectionError):
        QMP(str(tmp_path / "nothing.sock"), connect_timeout=0.3)
    assert time.monotonic() - t0 < 2


# ------------------------------------------------------------ the one socket client

def test_sockclient_lines_deadline_and_hangup(tmp_path):
    """blimp.sockclient joins split reads into lines, drops CR/NUL and empty lines, returns
    None at the deadline and raises its connection error when the peer hangs up."""
    from blimp.sockclient import SocketClient
    path = str(tmp_path / "s.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    go_on = threading.Event()

    def serve():
        c, _ = srv.accept()
        c.sendall(b"fir")
        time.sleep(0.05)
        c.sendall(b"st\r\n\n\x00second\nthi")
        go_on.wait(5)
        c.close()
        srv.close()

    threading.Thread(target=serve, daemon=True).start()
    with SocketClient(path, connect_timeout=2, timeout=2) as s:
        soon = time.monotonic() + 2
        assert s.read_line(soon) == "first"
        assert s.read_line(soon) == "second"
        t0 = time.monotonic()
        assert s.read_line(time.monotonic() + 0.2) is None      # "thi" is not a line yet
        assert 0.15 < time.monotonic() - t0 < 1.5
        go_on.set()
        with pytest.raises(ConnectionError):
            s.read_line(time.monotonic() + 2)
    with pytest.raises(ConnectionError):
        s.send_line("after close")
