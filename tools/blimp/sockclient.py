"""The part every line-based socket client here shares: closing, and use as a context manager."""

from __future__ import annotations

import socket
import time
from typing import Callable, Optional, Type


class SocketClient:
    """Owns one connected socket in self._sock (None once closed)."""

    _sock: Optional[socket.socket] = None

    def _connect(self, path: str, connect_timeout: float, alive: Optional[Callable[[], bool]],
                 error: Type[Exception], what: str):
        """Connect to the unix socket at path, retrying until it accepts (QEMU creates it a
        moment after starting), QEMU dies (alive() false) or connect_timeout passes."""
        deadline = time.monotonic() + connect_timeout
        last_err: Optional[Exception] = None
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(max(0.05, min(1.0, deadline - time.monotonic())))
                s.connect(path)
                self._sock = s
                return
            except OSError as e:
                s.close()
                last_err = e
            if alive is not None and not alive():
                raise error("QEMU exited before the %s socket %s accepted" % (what, path))
            if time.monotonic() >= deadline:
                raise error("cannot connect to the %s socket %s within %.1f s: %s"
                            % (what, path, connect_timeout, last_err))
            time.sleep(0.005)

    def close(self):
        if self._sock is not None:
            try:
                self._sock.close()
            finally:
                self._sock = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
