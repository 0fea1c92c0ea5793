"""Sizes: the binary units, the guest page, and how the tools print them."""

from __future__ import annotations

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4096            # the guest's page, and the balloon's unit


def mib(n: int) -> str:
    """Bytes as a short MiB figure: '512 MiB', '0.5 MiB'."""
    v = n / MiB
    return ("%d MiB" % v) if v == int(v) else ("%.1f MiB" % v)


def page_round(n: int) -> int:
    """`n` bytes rounded down to whole pages."""
    return n // PAGE * PAGE
