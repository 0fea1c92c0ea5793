"""Showing the guest's serial console while a subcommand runs."""

from __future__ import annotations

import time

from .qemu import Qemu


class GuestConsole:
    """Prints the guest's serial lines that arrived since the last call, indented."""

    def __init__(self, q: Qemu, show_events: bool = False, prefix: str = "    guest| ",
                 enabled: bool = True) -> None:
        self.q, self.show_events, self.prefix, self.enabled = q, show_events, prefix, enabled
        self.seen = 0

    def flush(self, settle: float = 0.0) -> None:
        """Print the new lines (JSON event lines only with show_events); `settle` s
        first give the guest time to finish what it is printing."""
        if settle:
            time.sleep(settle)
        lines = self.q.lines
        new, self.seen = lines[self.seen:], len(lines)
        if not self.enabled:
            return
        for line in new:
            if not line.strip():
                continue
            if line.startswith("{") and not self.show_events:
                continue
            print(self.prefix + line, flush=True)
