"""Tests of blimp.agent and blimp.balloon without QEMU: a fake agent socket
server and a fake QMP object stand in for the guest and QEMU."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from blimp import balloon as balloonmod
from blimp.agent import Agent, AgentCommandFailed, AgentConnectionError, AgentTimeout
from blimp.balloon import Balloon, BalloonAborted, BalloonTimeout

MiB = 1 << 20


# ------------------------------------------------------------ fake agent

def agent_server(path, handler, greet=True, delay=0.0):
    """Serve one client: optionally send agent_ready, then answer each line with
    handler(line) -> list of raw lines (bytes or str) to send back."""
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)

    def serve():
        c, _ = srv.accept()
        try:
            if delay:
                time.sleep(delay)
            if greet:
                c.sendall(b'{"event":"agent_ready"}\n')
            f = c.makefile("rb")
            for line in f:
                out = handler(line.decode().strip())
                if out is None:
                    break
                for o in out:
                    c.sendall(o.encode() if isinstance(o, str) else o)
        finally:
            c.close()
            srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


def reply_for(line):
    word = line.split()[0]
    if word == "ping":
        return ['{"ok":true,"cmd":"ping"}\n']
    if word == "alloc":
        # an event and some noise first, the reply split over two writes
        return ['{"event":"balloon_oom_deflate","pages":256,"actual_pages":0}\n',
                "garbage that is not JSON\n",
                '{"ok":true,"cmd":"al', 'loc","id":1,"pages":256,"blocks":1,"ms":0}\r\n']
    if word == "fail":
        return ['{"ok":false,"cmd":"fail","error":"nope"}\n']
    if word == "slow":
        return []
    if word == "bye":
        return None
    return ['{"ok":false,"cmd":"%s","error":"unknown command \'%s\'"}\n' % (word, word)]


def test_agent_commands_events_and_noise(tmp_path):
    path = str(tmp_path / "a.sock")
    threading.Timer(0.2, agent_server, args=(path, reply_for)).start()
    a = Agent(path, connect_timeout=5, timeout=2)
    try:
        a.wait_ready(2)
        assert a.ready and a.events == [{"event": "agent_ready"}]
        assert a.ping() == {"ok": True, "cmd": "ping"}
        r = a.alloc("1M", seed=3)
        assert r["ok"] and r["id"] == 1
        assert a.events[-1]["event"] == "balloon_oom_deflate"
        assert a.transcript[-3:-1] == ["> alloc 1M 3", "< (not JSON) garbage that is not JSON"]
        assert a.cmd("fail")["ok"] is False
        with pytest.raises(AgentCommandFailed) as ei:
            a.check("fail")
        assert ei.value.reply["error"] == "nope"
        assert "unknown command" in a.cmd("bogus x")["error"]
        t0 = time.monotonic()
        with pytest.raises(AgentTimeout):
            a.cmd("slow", timeout=0.3)
        assert time.monotonic() - t0 < 1.5
        with pytest.raises(ValueError):
            a.send("two\nlines")
        a.send("bye")
        with pytest.raises(AgentConnectionError):
            a.cmd("ping", timeout=2)
    finally:
        a.close()


def test_agent_ready_missed_falls_back_to_ping(tmp_path):
    path = str(tmp_path / "a.sock")
    agent_server(path, reply_for, greet=False)
    a = Agent(path, connect_timeout=2, timeout=2)
    try:
        t0 = time.monotonic()
        a.wait_ready(5)
        assert a.ready and not a.events
        assert 0.8 < time.monotonic() - t0 < 3
    finally:
        a.close()


def test_agent_not_ready_times_out(tmp_path):
    path = str(tmp_path / "a.sock")
    agent_server(path, lambda line: [], greet=False)
    a = Agent(path, connect_timeout=2, timeout=2)
    try:
        with pytest.raises(AgentTimeout):
            a.wait_ready(1.5)
    finally:
        a.close()


def test_agent_connect_deadline_and_dead_qemu(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(AgentConnectionError):
        Agent(str(tmp_path / "none.sock"), connect_timeout=0.3)
    assert time.monotonic() - t0 < 2
    t0 = time.monotonic()
    with pytest.raises(AgentConnectionError):
        Agent(str(tmp_path / "none.sock"), connect_timeout=10, alive=lambda: False)
    assert time.monotonic() - t0 < 1


# ------------------------------------------------------------ fake QMP for Balloon

class FakeBalloonQMP:
    """QEMU's balloon arithmetic: the guest moves `step` bytes per query-balloon."""

    def __init__(self, ram, step=64 * MiB, stuck_at=None):
        self.ram, self.step, self.stuck_at = ram, step, stuck_at
        self.actual = ram
        self.target = ram
        self.calls = []
        self.props = {}

    def execute(self, cmd, _timeout=None, **args):
        self.calls.append((cmd, args))
        if cmd == "balloon":
            if args["value"] <= 0:
                raise AssertionError("QEMU would reject value <= 0")
            self.target = min(args["value"], self.ram)
            return {}
        if cmd == "query-balloon":
            goal = self.target if self.stuck_at is None else max(self.target, self.stuck_at)
            if self.actual > goal:
                self.actual = max(goal, self.actual - self.step)
            elif self.actual < goal:
                self.actual = min(goal, self.actual + self.step)
            return {"actual": self.actual}
        if cmd == "qom-set":
            self.props[args["property"]] = args["value"]
            return {}
        if cmd == "qom-get":
            return {"stats": {"stat-free-memory": 5}, "last-update": 7}
        raise AssertionError(cmd)


def test_balloon_sizes_and_waits():
    ram = 1024 * MiB
    fq = FakeBalloonQMP(ram)
    b = Balloon(fq, ram, pid=os.getpid())
    assert b.set_size(512 * MiB + 100) == 512 * MiB          # page-rounded
    assert fq.calls[-1] == ("balloon", {"value": 512 * MiB})
    secs = b.wait_size(512 * MiB, timeout=5, poll=0)
    assert secs >= 0 and b.polls == 8 and b.size() == 512 * MiB
    assert b.resize(0, timeout=5, poll=0) >= 0 and b.guest_size() == ram
    b.set_guest_size(1 * MiB)
    assert fq.calls[-1] == ("balloon", {"value": 1 * MiB})
    with pytest.raises(ValueError):
        b.set_size(ram)                  # QMP value 0: QEMU rejects it
    with pytest.raises(ValueError):
        b.set_guest_size(100)            # rounds to 0
    assert b.rss() > 0
    b.enable_stats(2)
    assert fq.props["guest-stats-polling-interval"] == 2
    assert b.wait_stats(timeout=1, newer_than=6)["last-update"] == 7
    with pytest.raises(BalloonTimeout):
        b.wait_stats(timeout=0.2, newer_than=7, poll=0.01)


def test_balloon_wait_timeout_and_abort():
    ram = 1024 * MiB
    fq = FakeBalloonQMP(ram, stuck_at=1000 * MiB)   # the guest gives only 24 MiB
    b = Balloon(fq, ram)
    b.set_size(512 * MiB)
    t0 = time.monotonic()
    with pytest.raises(BalloonTimeout) as ei:
        b.wait_size(512 * MiB, timeout=0.3, poll=0.01)
    assert ei.value.last_actual == 1000 * MiB and "stuck" in str(ei.value)
    assert time.monotonic() - t0 < 1.5
    with pytest.raises(BalloonAborted) as ei:
        b.wait_size(512 * MiB, timeout=10, poll=0.01, abort=lambda: "guest exhausted")
    assert "guest exhausted" in str(ei.value)
    alive = [True]
    with pytest.raises(BalloonTimeout) as ei:
        Balloon(fq, ram, alive=lambda: alive.pop() if alive else False).wait_size(
            512 * MiB, timeout=10, poll=0.01)
    assert "exited" in str(ei.value)


def test_rss_of_self():
    assert balloonmod.rss_of(os.getpid()) > 1 * MiB
    with pytest.raises(OSError):
        balloonmod.rss_of(2 ** 22 + 12345)
