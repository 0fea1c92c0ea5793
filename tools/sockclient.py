"""The part every line-based socket client here shares: closing, and use as a context manager."""

from __future__ import annotations

import socket
from typing import Optional


class SocketClient:
    """Owns one connected socket in self._sock (None once closed)."""

    _sock: Optional[socket.socket] = None

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
