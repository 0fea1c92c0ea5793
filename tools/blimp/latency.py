"""Per-buffer latency of the balloon's queues: what the guest's ``balloon_latency`` event
(docs/serial-output.md) and the agent's ``latency`` reply (docs/agent.md) carry, as a table.

For each kind of buffer (inflate, deflate, report) the guest measures the time from making
the buffer available (and kicking) to collecting it from the used ring, in log2 buckets of
microseconds; the percentiles are bucket upper bounds, capped at the maximum.

    from blimp.latency import format_latency
    print(format_latency(vm.check("latency")))      # or a balloon_latency event, or a state

    python3 -m blimp.latency serial.log             # the last balloon_latency event of a log
    python3 -m blimp.latency - < serial.log
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Tuple

from . import guestlog

KINDS = ("inflate", "deflate", "report")
# table columns: (heading, field)
COLUMNS = (("min", "min_us"), ("p50", "p50_us"), ("p90", "p90_us"), ("p99", "p99_us"),
           ("max", "max_us"), ("mean", "mean_us"))


@dataclass
class KindLatency:
    """One kind's histogram summary; a field the source did not carry is None (the agent's
    `state` has only count, p50, p99 and max)."""
    kind: str
    count: int
    min_us: Optional[int] = None
    mean_us: Optional[int] = None
    p50_us: Optional[int] = None
    p90_us: Optional[int] = None
    p99_us: Optional[int] = None
    max_us: Optional[int] = None
    buckets: List[Tuple[int, int]] = field(default_factory=list)  # (lower bound us, count)


def _source(obj: dict) -> dict:
    """The dict holding the kinds: an event or `latency` reply itself, or a `state` reply's
    balloon.latency."""
    if any(k in obj for k in KINDS):
        return obj
    inner = obj.get("balloon", {}).get("latency") if isinstance(obj.get("balloon"), dict) \
        else obj.get("latency")
    if isinstance(inner, dict):
        return inner
    raise ValueError("no latency figures in %r" % (obj,))


def parse_latency(obj: dict) -> Dict[str, KindLatency]:
    """The kinds of a ``balloon_latency`` event, a ``latency`` reply or a ``state`` reply, by
    kind name (only the kinds present)."""
    src = _source(obj)
    out = {}
    for kind in KINDS:
        k = src.get(kind)
        if not isinstance(k, dict):
            continue
        out[kind] = KindLatency(
            kind=kind, count=int(k.get("count", 0)),
            **{f: (int(k[f]) if f in k else None)
               for f in ("min_us", "mean_us", "p50_us", "p90_us", "p99_us", "max_us")},
            buckets=[(int(lo), int(n)) for lo, n in k.get("buckets", [])])
    return out


def format_us(us: Optional[int]) -> str:
    """850 us, 12.3 ms, 4.56 s; '-' for no value."""
    if us is None:
        return "-"
    if us < 1000:
        return "%d us" % us
    if us < 1000000:
        return "%.3g ms" % (us / 1000.0) if us < 100000 else "%d ms" % round(us / 1000.0)
    return "%.3g s" % (us / 1e6) if us < 100000000 else "%d s" % round(us / 1e6)


def format_latency(event: dict) -> str:
    """A human table of a balloon_latency event / latency or state reply: one row per kind
    (count, min, p50, p90, p99, max, mean); kinds without buffers show '-'."""
    kinds = parse_latency(event)
    head = ["kind", "count"] + [h for h, _ in COLUMNS]
    rows = [head]
    for kind in KINDS:
        k = kinds.get(kind)
        if k is None:
            continue
        vals = [getattr(k, f) if k.count else None for _, f in COLUMNS]
        rows.append([kind, str(k.count)] + [format_us(v) for v in vals])
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = []
    for r in rows:
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
    if event.get("buckets_omitted"):
        lines.append("(buckets omitted: they did not fit one line)")
    return "\n".join(lines)


def last_event(lines: Iterable[str]) -> Optional[dict]:
    """The last balloon_latency event of serial lines, or None."""
    evs = guestlog.events(lines, "balloon_latency")
    return evs[-1] if evs else None


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m blimp.latency",
                                description="the last balloon_latency event of a serial log, "
                                            "as a table")
    p.add_argument("log", help="serial log file, or - for stdin")
    args = p.parse_args(argv)
    if args.log == "-":
        ev = last_event(sys.stdin.read().splitlines())
    else:
        with open(args.log, encoding="utf-8", errors="replace") as f:
            ev = last_event(f.read().splitlines())
    if ev is None:
        print("no balloon_latency event in %s" % args.log, file=sys.stderr)
        return 1
    print(format_latency(ev))
    return 0


if __name__ == "__main__":
    sys.exit(main())
