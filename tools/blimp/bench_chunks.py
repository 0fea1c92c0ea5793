"""bench-chunks: chunked inflate against PFN arrays on the same reference host.

For each balloon size (default 1, 3, 7 and 15 GiB, each in a guest 1 GiB larger) and
each protocol -- chunks (the device offers x-chunks, docs/chunked-inflate.md) and PFN
arrays (the same patched binary without x-chunks: the guest's portable default of 256
PFNs x 16 buffers) -- a fresh guest inflates the balloon and deflates it again, on
untouched memory and (for sizes up to --touched-max) after writing its free memory.
Times run from the QMP `balloon` command until query-balloon shows the target; the
guest's own time (target seen -> reached) is beside it.  The host floors are measured
in the same run: one madvise() per 4 KiB page (what a PFN-array host must do) and one
madvise() for the whole range (what a chunk host can do).  Writes a table, one JSON
line and a plot (python3-matplotlib) of balloon size against time, both protocols.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List, Optional

from .benchutil import best_run, log, new_plot, save_plot
from . import refhost
from .bench_balloon import BenchError, floor_binary
from .options import DEFAULT_KERNEL, REPO, size_arg
from .qemu import qemu_version, resolve_accel
from .session import SESSION_ERRORS, BalloonSession, describe_failure
from .units import GiB, MiB, mib

PROTOCOLS = ("chunks", "pfns")
TARGET_3G_S = 0.050          # chunks: 3 GiB inflated in <= 50 ms
TARGET_SPEEDUP = 10.0        # chunks >= 10x faster than PFN arrays on the same binary


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-chunks", help="chunked inflate vs PFN arrays on the reference host",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--kernel", default=DEFAULT_KERNEL)
    p.add_argument("--sizes", default="1G,3G,7G,15G",
                   help="balloon sizes, each in a guest 1 GiB larger (default 1G,3G,7G,15G)")
    p.add_argument("--touched-max", type=size_arg, default=3 * GiB,
                   help="also measure touched memory for balloons up to this size (default 3G)")
    p.add_argument("--runs", "-n", type=int, default=2, help="fresh guests per point (best)")
    p.add_argument("--accel", default="tcg")
    p.add_argument("--qemu", help="reference host binary (default: build or find the cached one)")
    p.add_argument("--plot", default=os.path.join(REPO, "build", "bench", "chunks.png"))
    p.add_argument("--timeout", type=float, default=1200.0, help="per QEMU run")
    p.set_defaults(func=run)


def measure_floors(size: int) -> Dict[str, float]:
    """Seconds to discard `size` bytes of touched, THP-backed anonymous memory: one madvise
    per 4 KiB page, and one for the whole range (best of 3)."""
    exe = floor_binary()
    out: Dict[str, float] = {}
    for name, step in (("per_page", 4096), ("one_call", size)):
        best = None
        for _ in range(3):
            r = subprocess.run([exe, str(size), "1", "1", str(step)], capture_output=True,
                               text=True, timeout=900)
            if r.returncode != 0:
                raise BenchError("madvise_floor failed: %s" % r.stderr.strip())
            s = json.loads(r.stdout)["dontneed_s"]
            best = s if best is None else min(best, s)
        out[name] = best
    return out


def one_guest(args: argparse.Namespace, qemu: str, protocol: str, size: int,
              touched: bool) -> dict:
    """A fresh guest: inflate `size`, deflate to 0, on untouched or touched memory."""
    opts = [refhost.CHUNKS] if protocol == "chunks" else []
    session = BalloonSession(args.kernel, machine="q35", memory="%dM" % ((size + GiB) >> 20),
                             accel=resolve_accel(args.accel), balloon_opts=opts, qemu=qemu,
                             timeout=args.timeout)
    out: dict = {"ok": False}
    try:
        with session:
            chunked = bool(session.accepted & refhost.F_X_CHUNKS)
            if chunked != (protocol == "chunks"):
                raise session.failure("protocol %s but chunks accepted=%s" % (protocol, chunked))
            if touched:
                free = session.state()["mm"]["free_pages"] * 4096
                session.touch_free_memory(free - 16 * MiB, timeout=args.timeout)
            rss0 = session.balloon.rss()
            inflate = session.resize(size, timeout=600, poll=0.0005)
            rss1 = session.balloon.rss()
            deflate = session.resize(0, timeout=600, poll=0.0005, stop_if_exhausted=False)
            st = session.state()["balloon"]
            session.quit()
            session.check_no_violation()
            out.update(ok=True, inflate_s=inflate.seconds, deflate_s=deflate.seconds,
                       inflate_guest_ms=inflate.guest_ms, deflate_guest_ms=deflate.guest_ms,
                       rss_drop_mib=(rss0 - rss1) >> 20, inflate_buffers=st["inflate_buffers"],
                       deflate_buffers=st["deflate_buffers"])
    except SESSION_ERRORS as e:
        out["error"], out["context"] = describe_failure(session, e)
    return out


def best_of(results: List[dict]) -> Optional[dict]:
    """The fastest inflate, with the fastest deflate of all runs beside it."""
    best = best_run(results, "inflate_s")
    if best:
        best["deflate_s"] = min(r["deflate_s"] for r in results if r.get("ok"))
    return best


def run(args: argparse.Namespace) -> int:
    sizes = [size_arg(s) for s in args.sizes.split(",") if s]
    qemu = args.qemu or refhost.reference_qemu(build=True)
    log("bench-chunks: %s, accel %s, sizes %s, best of %d fresh guests"
        % (qemu_version(qemu), resolve_accel(args.accel), ",".join(mib(s) for s in sizes),
           args.runs))
    points: List[dict] = []
    failed = False
    for size in sizes:
        floors = measure_floors(size)
        log("  %s: host floor (touched) %.3f s per 4 KiB page madvise, %.4f s one madvise"
            % (mib(size), floors["per_page"], floors["one_call"]))
        for touched in ([False, True] if size <= args.touched_max else [False]):
            for protocol in PROTOCOLS:
                res = [one_guest(args, qemu, protocol, size, touched) for _ in range(args.runs)]
                for r in res:
                    if not r["ok"]:
                        failed = True
                        log("    FAILED %s %s: %s\n%s" % (protocol, mib(size), r["error"],
                                                           r.get("context", "")))
                best = best_of(res)
                point = {"size": size, "touched": touched, "protocol": protocol, "best": best,
                         "floor": floors}
                points.append(point)
                if best:
                    log("    %-6s %-9s inflate %.4f s (guest %s ms, %d buffers), deflate %.4f s"
                        " (guest %s ms), RSS drop %d MiB"
                        % (protocol, "touched" if touched else "untouched", best["inflate_s"],
                           best["inflate_guest_ms"], best["inflate_buffers"], best["deflate_s"],
                           best["deflate_guest_ms"], best["rss_drop_mib"]))
    summary = summarise(points)
    for line in summary["lines"]:
        log(line)
    plot(points, args.plot)
    print(json.dumps({"bench": "chunks", "qemu": qemu_version(qemu), "points": points,
                      "targets": summary["targets"]}, default=str), flush=True)
    return 1 if failed else 0


def _get(points: List[dict], size: int, touched: bool, protocol: str) -> Optional[dict]:
    for p in points:
        if p["size"] == size and p["touched"] == touched and p["protocol"] == protocol:
            return p["best"]
    return None


def summarise(points: List[dict]) -> dict:
    lines = ["", "%-8s %-9s %12s %12s %8s %12s %12s" % (
        "balloon", "memory", "chunks in", "PFNs in", "speedup", "chunks out", "PFNs out")]
    targets: Dict[str, object] = {}
    for size in sorted({p["size"] for p in points}):
        for touched in (False, True):
            c, f = _get(points, size, touched, "chunks"), _get(points, size, touched, "pfns")
            if not c or not f:
                continue
            speedup = f["inflate_s"] / c["inflate_s"]
            lines.append("%-8s %-9s %10.4f s %10.4f s %7.1fx %10.4f s %10.4f s" % (
                mib(size), "touched" if touched else "untouched", c["inflate_s"], f["inflate_s"],
                speedup, c["deflate_s"], f["deflate_s"]))
            if size == 3 * GiB:
                key = "touched" if touched else "untouched"
                targets["3G_%s_chunks_inflate_s" % key] = c["inflate_s"]
                targets["3G_%s_within_50ms" % key] = c["inflate_s"] <= TARGET_3G_S
                targets["3G_%s_speedup" % key] = round(speedup, 1)
                targets["3G_%s_speedup_met" % key] = speedup >= TARGET_SPEEDUP
    per_gib = ["%s: %.2f ms/GiB" % (mib(p["size"]), 1000 * p["best"]["inflate_s"] * GiB / p["size"])
               for p in points if p["protocol"] == "chunks" and not p["touched"] and p["best"]]
    lines.append("chunks, untouched, inflate time per GiB: " + ", ".join(per_gib))
    lines.append("targets: " + json.dumps(targets))
    return {"lines": lines, "targets": targets}


def plot(points: List[dict], path: str) -> None:
    made = new_plot()
    if made is None:
        return
    fig, ax = made
    for protocol, style in (("chunks", "o-"), ("pfns", "s--")):
        for touched in (False, True):
            xs = [p["size"] / GiB for p in points if p["protocol"] == protocol
                  and p["touched"] == touched and p["best"]]
            ys = [p["best"]["inflate_s"] for p in points if p["protocol"] == protocol
                  and p["touched"] == touched and p["best"]]
            if xs:
                ax.plot(xs, ys, style, label="%s, %s" % (
                    "chunks" if protocol == "chunks" else "PFN arrays",
                    "touched" if touched else "untouched"))
    for key, style, label in (("per_page", ":", "host floor: madvise per 4 KiB page"),
                              ("one_call", "-.", "host floor: one madvise per range")):
        floors = sorted({(p["size"], p["floor"][key]) for p in points})
        if floors:
            ax.plot([s / GiB for s, _ in floors], [f for _, f in floors], style, color="grey",
                    label=label)
    ax.set_yscale("log")
    ax.set_xlabel("balloon size (GiB), guest 1 GiB larger")
    ax.set_ylabel("inflate time (s), QMP command to query-balloon")
    ax.set_title("blimp on the reference host (QEMU 7.2 + chunk patch)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_plot(fig, path)


if __name__ == "__main__":
    sys.exit("run as: python3 -m blimp bench-chunks")
