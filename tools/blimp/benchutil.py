"""What the bench-* subcommands share: progress output and picking the best run."""

from __future__ import annotations

from typing import List, Optional


def log(msg: str) -> None:
    """A progress or result line, flushed at once (benchmarks run for minutes)."""
    print(msg, flush=True)


def best_run(results: List[dict], key: str) -> Optional[dict]:
    """A copy of the successful run with the smallest `key`, with `runs` (how many were
    tried) added; None when no run succeeded."""
    ok = [r for r in results if r.get("ok")]
    if not ok:
        return None
    best = dict(min(ok, key=lambda r: r[key]))
    best["runs"] = len(results)
    return best
