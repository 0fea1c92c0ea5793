"""The one line-based unix-socket client that the QMP and agent clients build on.

It owns connecting (with retries: QEMU creates its sockets a moment after it starts),
reading lines (buffering partial reads, a deadline on every read, decoding) and writing
lines.  Subclasses name themselves and their connection error class; what a line means
(a QMP message, an agent reply or event) is theirs to decide.
"""

from __future__ import annotations

import socket
import time
from typing import Callable, Optional, Type

#: how often a blocked read wakes up to notice that QEMU has died
ALIVE_CHECK_S = 0.5


class SocketClient:
    """Owns one connected socket in self._sock (None once closed)."""

    #: the peer's name in error messages ("QMP", "agent")
    what: str = "socket"
    #: raised when connecting, reading or writing fails or the peer hangs up
    connection_error: Type[Exception] = ConnectionError

    def __init__(self, path: str, connect_timeout: float, timeout: float,
                 alive: Optional[Callable[[], bool]] = None) -> None:
        """Connect to the unix socket at `path` (retrying up to `connect_timeout` s).
        `timeout` is the default per-request timeout of the subclass; `alive`, if given,
        is polled while connecting and reading so that a dead QEMU fails fast."""
        self.path = path
        self.timeout = timeout
        self.alive = alive
        self._sock: Optional[socket.socket] = None
        self._buf = b""
        self._connect(connect_timeout)

    # ---------------------------------------------------------- connecting

    def _connect(self, connect_timeout: float) -> None:
        """Retry until the socket accepts, QEMU dies (alive() false) or the time is up."""
        deadline = time.monotonic() + connect_timeout
        last_err: Optional[Exception] = None
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
                s.connect(self.path)
                self._sock = s
                return
            except OSError as e:
                s.close()
                last_err = e
            if self.alive is not None and not self.alive():
                raise self.connection_error("QEMU exited before the %s socket %s accepted"
                                            % (self.what, self.path))
            if time.monotonic() >= deadline:
                raise self.connection_error("cannot connect to the %s socket %s within %.1f s: %s"
                                            % (self.what, self.path, connect_timeout, last_err))
            time.sleep(0.005)

    def _connected(self) -> socket.socket:
        if self._sock is None:
            raise self.connection_error("%s connection closed" % self.what)
        return self._sock

    # ---------------------------------------------------------- lines

    def read_line(self, deadline: float) -> Optional[str]:
        """The next non-empty line (decoded, CR/NUL removed, stripped), or None once
        time.monotonic() passes `deadline`."""
        while True:
            line = self._next_buffered_line()
            if line is None:
                if not self._receive(deadline):
                    return None
            elif line:
                return line

    def _next_buffered_line(self) -> Optional[str]:
        if b"\n" not in self._buf:
            return None
        raw, self._buf = self._buf.split(b"\n", 1)
        return raw.decode("utf-8", "replace").replace("\r", "").replace("\x00", "").strip()

    def _receive(self, deadline: float) -> bool:
        """Append what arrives before `deadline` to the buffer; False at the deadline."""
        sock = self._connected()
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            sock.settimeout(min(left, ALIVE_CHECK_S))
            try:
                chunk = sock.recv(65536)
            except socket.timeout:
                if self.alive is not None and not self.alive():
                    raise self.connection_error("QEMU exited while waiting for the %s"
                                                % self.what) from None
                continue
            except OSError as e:
                raise self.connection_error("%s read failed: %s" % (self.what, e)) from None
            if not chunk:
                raise self.connection_error("%s connection closed by QEMU" % self.what)
            self._buf += chunk
            return True

    def send_line(self, line: str) -> None:
        sock = self._connected()
        sock.settimeout(self.timeout)
        try:
            sock.sendall((line + "\n").encode())
        except OSError as e:
            raise self.connection_error("%s write failed: %s" % (self.what, e)) from None

    # ---------------------------------------------------------- lifetime

    def close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self) -> SocketClient:
        return self

    def __exit__(self, *exc: object) -> bool:
        self.close()
        return False
