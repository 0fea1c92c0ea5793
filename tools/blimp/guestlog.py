"""Parse what blimp prints on its serial console.

Machine events are one JSON object per line with a string ``"event"`` key (in any
position).  Self-tests print TAP 14.  Everything else is human text (and
perhaps firmware noise), which the parsers skip.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Union

# CSI sequences, including OVMF's private ones such as ESC[=3h
_ANSI = re.compile(r"\x1b\[[0-9;?=<>]*[A-Za-z]")
# an object line that names an event key is meant as an event, whatever its key order
_EVENT_KEY = re.compile(r'"event"\s*:')


def clean(line: str) -> str:
    """Drop ANSI escapes, CR and stray NULs from one serial line."""
    return _ANSI.sub("", line).replace("\r", "").replace("\x00", "")


class BadEvent(ValueError):
    pass


def parse_event(line: str) -> Optional[dict]:
    """The event dict of a line, None for a non-event line; BadEvent if it looks like
    an event (a JSON object line with an "event" key) but is not valid JSON or has
    no string "event" (the kernel printed garbage).  Key order and spacing do not
    matter."""
    line = clean(line).strip()
    if not line.startswith("{") or not _EVENT_KEY.search(line):
        return None
    try:
        ev = json.loads(line)
    except ValueError as e:
        raise BadEvent("malformed event line %r: %s" % (line, e)) from None
    if not isinstance(ev, dict) or not isinstance(ev.get("event"), str):
        raise BadEvent("event line without a string 'event': %r" % line)
    return ev


def event_named(line: str, name: str,
                predicate: Optional[Callable[[dict], bool]] = None) -> Optional[dict]:
    """The event on `line` if it is called `name` and satisfies `predicate`, else None.
    A malformed event line counts as no match: the checks of the event stream
    (parse_event over every line) are where garbage is reported."""
    try:
        ev = parse_event(line)
    except BadEvent:
        return None
    if ev is None or ev["event"] != name or (predicate is not None and not predicate(ev)):
        return None
    return ev


def events(lines: Iterable[str], name: Optional[str] = None) -> List[dict]:
    out = []
    for line in lines:
        ev = parse_event(line)
        if ev is not None and (name is None or ev["event"] == name):
            out.append(ev)
    return out


def one_event(lines: Iterable[str], name: str) -> dict:
    """Exactly one event called name; AssertionError otherwise."""
    evs = events(lines, name)
    if len(evs) != 1:
        raise AssertionError("expected exactly one %r event, got %d" % (name, len(evs)))
    return evs[0]


# ---------------------------------------------------------------- TAP 14

_TAP_RESULT = re.compile(r"^(not ok|ok)\b\s*(\d+)?\s*(?:-\s*)?(.*?)\s*$")
_TAP_PLAN = re.compile(r"^1\.\.(\d+)\s*(?:#.*)?$")
_TAP_VERSION = re.compile(r"^TAP version (\d+)\s*$")
_SUMMARY = re.compile(r"^SUMMARY: (\d+) tests, (\d+) failed, (\d+) skipped\s*$")


@dataclass
class TapResult:
    ok: bool
    number: Optional[int]
    description: str
    directive: Optional[str] = None   # "SKIP" / "TODO"
    reason: str = ""


@dataclass
class Tap:
    version: Optional[int] = None
    plan: Optional[int] = None
    results: List[TapResult] = field(default_factory=list)
    summary: Optional[tuple] = None   # (tests, failed, skipped)
    plan_before_results: bool = False
    lines_after_plan: int = 0         # results seen after the plan line

    @property
    def failed(self) -> List[TapResult]:
        return [r for r in self.results if not r.ok and r.directive != "TODO"]

    @property
    def skipped(self) -> List[TapResult]:
        return [r for r in self.results if r.directive == "SKIP"]


def parse_tap(lines: Iterable[str]) -> Tap:
    tap = Tap()
    for raw in lines:
        line = clean(raw).rstrip()
        if line.startswith("{") or not line:
            continue
        m = _TAP_VERSION.match(line)
        if m:
            tap.version = int(m.group(1))
            continue
        m = _TAP_PLAN.match(line)
        if m:
            tap.plan = int(m.group(1))
            tap.plan_before_results = not tap.results
            continue
        m = _SUMMARY.match(line)
        if m:
            tap.summary = tuple(int(x) for x in m.groups())
            continue
        m = _TAP_RESULT.match(line)
        if m:
            desc = m.group(3)
            directive, reason = None, ""
            dm = re.search(r"\s*(?<!\\)#\s*(SKIP|TODO)\b\s*(.*)$", desc, re.I)
            if dm:
                directive, reason = dm.group(1).upper(), dm.group(2)
                desc = desc[:dm.start()]
            if tap.plan is not None and not tap.plan_before_results:
                tap.lines_after_plan += 1
            tap.results.append(TapResult(m.group(1) == "ok",
                                         int(m.group(2)) if m.group(2) else None,
                                         desc, directive, reason))
    return tap


# ------------------------------------------------------------ ready line

READY_RE = re.compile(r"^blimp: ready in (\d+) us")


def ready_line(line: str) -> Union[dict, re.Match, None]:
    """Whether `line` says the guest has booted: its ready event (returned) or the
    human 'blimp: ready in N us' line (its match)."""
    return event_named(line, "ready") or READY_RE.match(clean(line))
