"""Client of blimp's in-guest agent (COM2, line-based JSON; standard library only).

    from blimp.qemu import Qemu
    with Qemu("build/blimp.elf", memory="1G", balloon=True, agent=True) as q:
        a = q.agent_client()               # connected and ready (agent_ready or a ping answer)
        r = a.cmd("alloc 256M 7")          # {"ok": true, "cmd": "alloc", "id": 1, ...}
        a.check("verify all")              # like cmd() but raises AgentCommandFailed on ok:false
        a.quit()                           # the guest exits with 0x10 => QEMU status 33

The guest side (kernel/agent.c) reads one command per line and answers each with exactly
one JSON line; the first word of the command comes back as ``"cmd"``.  JSON objects with an
``"event"`` key (such as ``{"event":"agent_ready"}``) are events, not replies: they are kept in
``events`` and never taken for a reply.  ``cmd``/``check`` send any command line, so new
guest commands need nothing here.

Connecting: QEMU's chardev is a unix-socket server with ``wait=off``, so bytes the guest
writes before we are connected are dropped.  Connecting (blimp.sockclient) therefore
retries fast (the socket exists long before the guest has booted) and ``wait_ready``
accepts either the ``agent_ready`` event or, failing that, an answer to ``ping`` (sent once
per second), so a missed ``agent_ready`` costs at most a second.  Every read has a timeout.
"""

from __future__ import annotations

import json
import time
from typing import Callable, List, Optional, Union

from .exitcodes import SUCCESS as SUCCESS_CODE
from .sockclient import SocketClient

DEFAULT_TIMEOUT = 10.0


class AgentError(Exception):
    pass


class AgentTimeout(AgentError, TimeoutError):
    pass


class AgentConnectionError(AgentError, ConnectionError):
    pass


class AgentCommandFailed(AgentError):
    """A reply with ``"ok": false`` where the caller required success."""

    def __init__(self, line: str, reply: dict) -> None:
        super().__init__("agent command %r failed: %s" % (line, reply.get("error", reply)))
        self.line = line
        self.reply = reply


class Agent(SocketClient):
    what = "agent"
    connection_error = AgentConnectionError

    def __init__(self, path: str, connect_timeout: float = DEFAULT_TIMEOUT,
                 timeout: float = DEFAULT_TIMEOUT,
                 alive: Optional[Callable[[], bool]] = None) -> None:
        """Connect to the agent socket at `path`, retrying until `connect_timeout`.
        `alive`, if given, is polled while retrying/waiting so a dead QEMU fails fast.
        `timeout` is the default per-command timeout."""
        self.events: List[dict] = []
        self.stray: List[dict] = []       # replies nobody waited for (e.g. to a garbled ping)
        self.transcript: List[str] = []   # "> cmd" / "< reply" lines, for failure messages
        self.ready = False
        super().__init__(path, connect_timeout, timeout, alive)

    # ---------------------------------------------------------- I/O

    def _read_msg(self, deadline: float, until_ready: bool = False) -> Optional[dict]:
        """Next reply (a JSON object that is not an event); None at the deadline, or,
        with `until_ready`, as soon as agent_ready arrives.  Events go to ``events``;
        non-JSON lines (noise) are recorded in the transcript and skipped."""
        while True:
            line = self.read_line(deadline)
            if line is None:
                return None
            try:
                msg = json.loads(line)
            except ValueError:
                self.transcript.append("< (not JSON) " + line[:200])
                continue
            if not isinstance(msg, dict):
                self.transcript.append("< (not an object) " + line[:200])
                continue
            if "event" in msg:
                self.events.append(msg)
                if msg.get("event") == "agent_ready":
                    self.ready = True
                    if until_ready:
                        return None
                continue
            self.transcript.append("< " + line[:400])
            return msg

    def send(self, line: str) -> None:
        if "\n" in line or len(line) > 255:
            raise ValueError("agent command must be one line of at most 255 characters")
        self.transcript.append("> " + line)
        self.send_line(line)

    # ---------------------------------------------------------- API

    def wait_ready(self, timeout: float = DEFAULT_TIMEOUT) -> Agent:
        """Return once the guest agent answers: its agent_ready event, or a ping reply."""
        deadline = time.monotonic() + timeout
        next_ping = time.monotonic() + 1.0
        while not self.ready:
            now = time.monotonic()
            if now >= deadline:
                raise AgentTimeout("guest agent not ready within %.1f s" % timeout)
            msg = self._read_msg(min(deadline, next_ping), until_ready=True)
            if msg is not None:
                if msg.get("cmd") == "ping" and msg.get("ok") is True:
                    self.ready = True
                else:
                    self.stray.append(msg)
                continue
            if not self.ready and time.monotonic() >= next_ping:
                self.send("ping")
                next_ping = time.monotonic() + 1.0
        return self

    def cmd(self, line: str, timeout: Optional[float] = None) -> dict:
        """Send one command line and return its parsed reply (``ok`` may be false).

        The reply is the next non-event JSON line whose ``cmd`` is the command's first
        word (replies to stray pings are skipped).  AgentTimeout if none arrives."""
        word = line.split()[0] if line.split() else ""
        self.send(line)
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            msg = self._read_msg(deadline)
            if msg is None:
                raise AgentTimeout("no agent reply to %r within %.1f s" % (line, limit))
            if msg.get("cmd") == word:
                return msg
            self.stray.append(msg)

    def check(self, line: str, timeout: Optional[float] = None) -> dict:
        """cmd(), but an ``ok: false`` reply raises AgentCommandFailed."""
        r = self.cmd(line, timeout)
        if r.get("ok") is not True:
            raise AgentCommandFailed(line, r)
        return r

    # conveniences -------------------------------------------------

    def ping(self, timeout: Optional[float] = None) -> dict:
        return self.check("ping", timeout)

    def alloc(self, size: Union[int, str], seed: Optional[int] = None,
              timeout: Optional[float] = None) -> dict:
        """alloc <size> [seed]; `size` is bytes (int) or text like '256M'. Not checked."""
        arg = str(size) if isinstance(size, int) else size
        return self.cmd("alloc %s%s" % (arg, "" if seed is None else " %d" % seed), timeout)

    def free(self, what: str = "all", timeout: Optional[float] = None) -> dict:
        return self.check("free %s" % what, timeout)

    def verify(self, what: str = "all", timeout: Optional[float] = None) -> dict:
        return self.cmd("verify %s" % what, timeout)

    def touch(self, what: str = "all", seed: Optional[int] = None,
              timeout: Optional[float] = None) -> dict:
        return self.cmd("touch %s%s" % (what, "" if seed is None else " %d" % seed), timeout)

    def state(self, timeout: Optional[float] = None) -> dict:
        return self.check("state", timeout)

    def quit(self, code: int = SUCCESS_CODE, timeout: Optional[float] = None) -> dict:
        return self.check("quit %d" % code, timeout)

    def history(self, n: int = 20) -> str:
        return "\n".join(self.transcript[-n:])
