"""What the bench-* subcommands share: progress output and picking the best run."""

from __future__ import annotations

import os
from typing import Any, List, Optional, Tuple


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


def new_plot() -> Optional[Tuple[Any, Any]]:
    """A (figure, axes) pair from Debian's python3-matplotlib (no display needed), or None
    with a note when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("plot: python3-matplotlib is not installed (./blimp bench installs it); no plot")
        return None
    return plt.subplots(figsize=(7, 4.5))


def save_plot(fig: Any, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log("plot: %s" % path)
