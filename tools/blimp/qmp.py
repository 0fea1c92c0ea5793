"""Minimal QMP client (standard library only).

    c = QMP("/tmp/blimp-xyz/qmp.sock", connect_timeout=10)
    c.execute("balloon", value=64 << 20)
    c.execute("qom-get", path="/machine/peripheral/balloon0", property="guest-stats")
    ev = c.wait_event("BALLOON_CHANGE", timeout=5)
    c.close()

Every read has a timeout.  Asynchronous events that arrive while waiting for a
command's reply (or in ``wait_event``/``poll_events``) are appended to
``events``.  Commands carry an ``id`` and replies are matched on it.
"""

from __future__ import annotations

import json
import time
from typing import Any, Callable, List, Optional

from .sockclient import SocketClient

DEFAULT_TIMEOUT = 10.0


class QMPError(Exception):
    """The command failed: ``error_class`` and ``desc`` come from QEMU."""

    def __init__(self, cmd: str, error_class: str, desc: str) -> None:
        super().__init__("%s: %s: %s" % (cmd, error_class, desc))
        self.cmd = cmd
        self.error_class = error_class
        self.desc = desc


class QMPConnectionError(ConnectionError):
    pass


class QMPTimeout(TimeoutError):
    pass


class QMP(SocketClient):
    what = "QMP"
    connection_error = QMPConnectionError

    def __init__(self, path: str, connect_timeout: float = DEFAULT_TIMEOUT,
                 timeout: float = DEFAULT_TIMEOUT, alive: Optional[Callable[[], bool]] = None,
                 negotiate: bool = True) -> None:
        """Connect to QEMU's QMP unix socket at `path`, retrying until
        `connect_timeout` (QEMU creates the socket a little after it starts).
        `alive`, if given, is polled while retrying so a dead QEMU fails fast.
        `timeout` is the default per-command/read timeout."""
        self.events: List[dict] = []
        self.greeting: Optional[dict] = None
        self._next_id = 1
        deadline = time.monotonic() + connect_timeout
        super().__init__(path, connect_timeout, timeout, alive)
        try:
            self.greeting = self._read_msg(deadline=max(deadline, time.monotonic() + 2.0))
            if "QMP" not in self.greeting:
                raise QMPConnectionError("unexpected QMP greeting %r" % (self.greeting,))
            if negotiate:
                self.execute("qmp_capabilities")
        except BaseException:
            self.close()
            raise

    # ---------------------------------------------------------- I/O

    def _read_msg(self, deadline: float) -> dict:
        """Next JSON message (a reply or an event); QMPTimeout at the deadline."""
        line = self.read_line(deadline)
        if line is None:
            raise QMPTimeout("no QMP message within the timeout")
        try:
            return json.loads(line)
        except ValueError as e:
            raise QMPConnectionError("bad QMP message %r: %s" % (line[:200], e)) from None

    def _send(self, obj: dict) -> None:
        self.send_line(json.dumps(obj))

    # ---------------------------------------------------------- API

    def execute(self, cmd: str, _timeout: Optional[float] = None, **args: Any) -> Any:
        """Run `cmd` with arguments `args` (use ``**{"a-b": 1}`` for dashed names).

        Returns the reply's ``return`` value, raises QMPError on an ``error``
        reply, QMPTimeout if no reply arrives within the timeout."""
        msg_id = "blimp-%d" % self._next_id
        self._next_id += 1
        req = {"execute": cmd, "id": msg_id}
        if args:
            req["arguments"] = args
        self._send(req)
        deadline = time.monotonic() + (self.timeout if _timeout is None else _timeout)
        while True:
            msg = self._read_msg(deadline)
            if "event" in msg:
                self.events.append(msg)
                continue
            if msg.get("id") != msg_id:
                continue        # stale reply of a command that timed out earlier
            if "error" in msg:
                err = msg["error"]
                raise QMPError(cmd, err.get("class", "?"), err.get("desc", ""))
            return msg.get("return")

    def poll_events(self, timeout: float = 0.0) -> List[dict]:
        """Read whatever events arrive within `timeout` s; returns the new ones."""
        n = len(self.events)
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self._read_msg(deadline)
            except QMPTimeout:
                break
            if "event" in msg:
                self.events.append(msg)
        return self.events[n:]

    def wait_event(self, name: str, timeout: float = DEFAULT_TIMEOUT,
                   since: int = 0, match: Optional[Callable[[dict], bool]] = None) -> dict:
        """First event called `name` at index >= `since` in ``events`` (also
        ones already collected), waiting up to `timeout` s for it."""
        deadline = time.monotonic() + timeout
        i = since
        while True:
            while i < len(self.events):
                ev = self.events[i]
                i += 1
                if ev.get("event") == name and (match is None or match(ev)):
                    return ev
            try:
                msg = self._read_msg(deadline)
            except QMPTimeout:
                raise QMPTimeout("no %s event within %.1f s" % (name, timeout)) from None
            if "event" in msg:
                self.events.append(msg)
