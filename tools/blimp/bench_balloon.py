"""bench-balloon: time inflating and deflating a big balloon, against the host's floor.

Every run boots a fresh guest (a BalloonSession) and times, per memory state, one
inflate to --size and one deflate to 0, from the QMP command until query-balloon shows
the target.  The floor is bench/madvise_floor.c: one madvise() per 4 KiB page over the
same amount of anonymous memory, which is what QEMU does for every ballooned page.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from .benchutil import log
from . import exitcodes
from .options import REPO, add_balloon_guest_options, balloon_append, size_arg
from .qemu import qemu_version, resolve_accel
from .session import SESSION_ERRORS, BalloonSession, describe_failure
from .units import PAGE, GiB, MiB, mib, page_round

#: Targets for 3 GiB of a 4 GiB guest (see bench/balloon_bench.py).
INFLATE_FLOOR_RATIO = 1.5
DEFLATE_TARGET_S = 0.5        # for 3 GiB; scaled with --size
DEFAULT_BENCH_CONFIGS = "256/1,256/4,256/16,1024/16,4096/16"
PORTABLE_MAX_PFNS = 256       # Firecracker / cloud-hypervisor cap a buffer at 256 PFNs
BENCH_STATES = ("untouched", "touched", "retouched")

#: (touched, thp) -> the floor's figures
Floor = Dict[Tuple[int, int], dict]
Log = Callable[[str], None]


class BenchError(Exception):
    """The benchmark cannot run (the floor tool failed)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-balloon", help="time inflating/deflating 3 GiB of a 4 GiB guest",
                       description="Inflate a balloon of --size (3G) in a --memory (4G) q35 "
                                   "guest and deflate it again, on untouched memory and after "
                                   "the guest has written its free memory, for several "
                                   "pfns/buffers configurations; timed from the QMP command "
                                   "until query-balloon shows the target.  Compares with the "
                                   "host floor: one madvise() per 4 KiB page on the same amount "
                                   "of anonymous memory (bench/madvise_floor.c, compiled on the "
                                   "fly into build/bench/).  Every run boots a fresh guest.")
    add_balloon_guest_options(p, memory="4G", accel="tcg")
    p.add_argument("--size", type=size_arg, default=3 * GiB, help="balloon size (default 3G)")
    p.add_argument("--configs", default=DEFAULT_BENCH_CONFIGS,
                   help="comma-separated pfns/buffers pairs (default %s)" % DEFAULT_BENCH_CONFIGS)
    p.add_argument("--runs", "-n", type=int, default=3,
                   help="fresh guests per config (default 3); figures are the best run, "
                        "medians are in the JSON")
    p.add_argument("--no-touched", action="store_true",
                   help="only untouched memory (skips writing --size in the guest)")
    p.add_argument("--retouched", action="store_true",
                   help="also a third cycle: the guest writes the memory again after one "
                        "balloon cycle (host memory then in 4 KiB pages, no THP)")
    p.add_argument("--floor-runs", type=int, default=3)
    p.add_argument("--poll-ms", type=float, default=1.0,
                   help="query-balloon polling interval (default 1 ms)")
    p.add_argument("--timeout", type=float, default=900.0, help="per QEMU run")
    p.add_argument("--check-targets", action="store_true", help="exit 2 if a target is missed")
    p.set_defaults(func=run)


# ------------------------------------------------------------------ the host floor

def floor_binary() -> str:
    """bench/madvise_floor.c compiled into build/bench/ (again when the source is newer)."""
    src = os.path.join(REPO, "bench", "madvise_floor.c")
    out_dir = os.path.join(REPO, "build", "bench")
    out = os.path.join(out_dir, "madvise_floor")
    if not os.path.exists(out) or os.path.getmtime(out) < os.path.getmtime(src):
        os.makedirs(out_dir, exist_ok=True)
        cc = os.environ.get("CC", "gcc")
        r = subprocess.run([cc, "-O2", "-Wall", "-Wextra", "-o", out, src],
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise BenchError("compiling %s failed:\n%s" % (src, r.stderr))
    return out


def measure_floor(size: int, runs: int) -> Floor:
    """Seconds of one madvise per 4 KiB page over `size` bytes (best and median of
    `runs`), for touched/untouched memory, with and without THP."""
    exe = floor_binary()
    res: Floor = {}
    for touched in (0, 1):
        for thp in (0, 1):
            xs, ws = [], []
            for _ in range(runs):
                r = subprocess.run([exe, str(size), str(touched), str(thp)],
                                   capture_output=True, text=True, timeout=600)
                if r.returncode != 0:
                    raise BenchError("madvise_floor failed: %s" % r.stderr.strip())
                d = json.loads(r.stdout)
                xs.append(d["dontneed_s"])
                ws.append(d["willneed_s"])
            res[(touched, thp)] = {"dontneed_s": min(xs), "willneed_s": min(ws),
                                   "dontneed_median_s": statistics.median(xs),
                                   "willneed_median_s": statistics.median(ws),
                                   "dontneed_all": [round(x, 4) for x in xs],
                                   "willneed_all": [round(x, 4) for x in ws]}
    return res


# ------------------------------------------------------------------ QEMU's memory

def anon_huge_kib(pid: int) -> int:
    """AnonHugePages of process `pid` in KiB (0 if unknown)."""
    try:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def ram_thp_eligible(pid: int, ram: int) -> Optional[bool]:
    """Whether QEMU's guest-RAM mapping (the first mapping of at least `ram` bytes in
    /proc/<pid>/smaps) may use transparent huge pages (its THPeligible field)."""
    try:
        with open("/proc/%d/smaps" % pid) as f:
            big = False
            for line in f:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):
                    lo, hi = head.split("-")
                    big = int(hi, 16) - int(lo, 16) >= ram
                elif big and line.startswith("THPeligible:"):
                    return line.split()[1] == "1"
    except (OSError, ValueError):
        pass
    return None


# ------------------------------------------------------------------ one guest

def bench_states(args: argparse.Namespace) -> List[str]:
    states = ["untouched"]
    if not args.no_touched:
        states.append("touched")
        if args.retouched:
            states.append("retouched")
    return states


def bench_run(args: argparse.Namespace, pfns: int, buffers: int, run_index: int) -> dict:
    """One fresh guest: an inflate/deflate cycle on untouched memory, then (unless
    --no-touched) the guest writes nearly all its free memory and a second cycle,
    and with --retouched a third after writing it again."""
    append = balloon_append(args.append, pfns, buffers) or ""
    session = BalloonSession(args.kernel, machine=args.machine, memory=args.memory,
                             accel=resolve_accel(args.accel), append=append,
                             balloon_opts=args.balloon_opt, timeout=args.timeout)
    out: dict = {"ok": False, "append": append}
    try:
        with session:
            out["transport"] = session.transport
            out["thp_eligible"] = ram_thp_eligible(session.qemu.pid, session.ram)
            free = _free_bytes_for(session, page_round(args.size))
            for state in bench_states(args):
                if state != "untouched":
                    # write (nearly) all free memory: every ballooned page is then resident
                    session.touch_free_memory(free - 16 * MiB, seed=run_index + 1,
                                              timeout=args.timeout)
                    if state == "touched":
                        out["anon_huge_kib"] = anon_huge_kib(session.qemu.pid)
                out[state] = _cycle(session, args, run_index, state)
            session.quit()
            session.check_no_violation()
            out["ok"] = True
    except SESSION_ERRORS as e:
        out["error"], out["context"] = describe_failure(session, e)
    return out


def _free_bytes_for(session: BalloonSession, size: int) -> int:
    """The guest's free memory; a failure if a balloon of `size` would not fit in it."""
    free = session.state()["mm"]["free_pages"] * PAGE
    if size > free - 8 * MiB:
        raise session.failure("guest has only %s free, cannot balloon %s" % (mib(free), mib(size)))
    return free


def _cycle(session: BalloonSession, args: argparse.Namespace, run_index: int,
           state: str) -> dict:
    """Inflate to --size and deflate to 0 once; the figures."""
    poll = args.poll_ms / 1000.0
    rss0 = session.balloon.rss()
    inflate = session.resize(page_round(args.size), timeout=300, poll=poll)
    rss1 = session.balloon.rss()
    deflate = session.resize(0, timeout=300, poll=poll, stop_if_exhausted=False)
    log("    run %d %-9s inflate %.3f s (guest %s ms), deflate %.3f s (guest %s ms), "
        "RSS %s -> %s" % (run_index + 1, state, inflate.seconds, _ms(inflate.guest_ms),
                          deflate.seconds, _ms(deflate.guest_ms), mib(rss0), mib(rss1)))
    return {"inflate_s": inflate.seconds, "deflate_s": deflate.seconds,
            "inflate_guest_ms": inflate.guest_ms, "deflate_guest_ms": deflate.guest_ms,
            "rss_drop_mib": (rss0 - rss1) >> 20}


def _ms(v: Optional[int]) -> str:
    return "?" if v is None else str(v)


# ------------------------------------------------------------------ the benchmark

@dataclass
class Plan:
    """What run() derived from the arguments."""
    configs: List[Tuple[int, int]]
    accel: str
    size: int

    @property
    def gib(self) -> float:
        return self.size / GiB

    @property
    def deflate_target(self) -> float:
        return DEFLATE_TARGET_S * (self.size / (3 * GiB))


def run(args: argparse.Namespace) -> int:
    plan = _plan(args)
    if isinstance(plan, int):
        return plan
    _log_header(args, plan)
    try:
        floor = measure_floor(plan.size, args.floor_runs)
    except (BenchError, OSError, subprocess.SubprocessError) as e:
        print("bench-balloon: error: %s" % e, file=sys.stderr)
        return 1
    _log_floor(floor, plan)
    results = _run_configs(args, plan)
    # QEMU asks for THP on guest RAM; first-touched guest memory is then in huge pages
    # (madvise_floor with thp=1 does the same).  Re-touched memory is in 4 KiB pages.
    thp = any(r.get("anon_huge_kib", 0) > 0 or r.get("thp_eligible")
              for c in results for r in c["runs"])
    summary, missed = _summarise(args, plan, floor, thp, results)
    _print_json_line(args, plan, floor, thp, summary)
    if any(not e["ok"] for e in summary):
        return 1
    if args.check_targets and missed:
        return 2
    return 0


def _plan(args: argparse.Namespace) -> Plan | int:
    """The configurations to run, or the exit status for bad arguments."""
    configs = []
    for c in args.configs.split(","):
        try:
            pf, bu = c.strip().split("/")
            configs.append((int(pf), int(bu)))
        except ValueError:
            print("blimp bench-balloon: error: bad config %r (want pfns/buffers)" % c,
                  file=sys.stderr)
            return 2
    if not os.path.isfile(args.kernel):
        print("blimp bench-balloon: error: kernel image not found: %s" % args.kernel,
              file=sys.stderr)
        return exitcodes.CLI_QEMU_ERROR
    if args.runs < 1:
        print("blimp bench-balloon: error: --runs must be >= 1", file=sys.stderr)
        return 2
    return Plan(configs, resolve_accel(args.accel), page_round(args.size))


def _log_header(args: argparse.Namespace, plan: Plan) -> None:
    log("bench-balloon: %s balloon in a %s %s guest, accelerator %s%s, %s" % (
        mib(plan.size), args.memory, args.machine, plan.accel.upper(),
        " (software emulation; no KVM)" if plan.accel == "tcg" else "", qemu_version()))
    log("  %d fresh guest(s) per config; timed from the QMP balloon command until query-balloon "
        "shows the target (polled every %g ms)" % (args.runs, args.poll_ms))
    log("host floor: one madvise() per 4 KiB page over %s of anonymous memory (best of %d)..."
        % (mib(plan.size), args.floor_runs))


def _log_floor(floor: Floor, plan: Plan) -> None:
    for (touched, thp), f in sorted(floor.items()):
        log("  %-9s THP %-3s  MADV_DONTNEED %.3f s (%.2f GiB/s; all %s)   MADV_WILLNEED %.3f s"
            % ("touched" if touched else "untouched", "on" if thp else "off", f["dontneed_s"],
               plan.gib / f["dontneed_s"], f["dontneed_all"], f["willneed_s"]))


def _run_configs(args: argparse.Namespace, plan: Plan) -> List[dict]:
    """--runs fresh guests per configuration (a failed run ends its configuration)."""
    results = []
    for pfns, buffers in plan.configs:
        log("config pfns=%d buffers=%d:" % (pfns, buffers))
        runs = []
        for i in range(args.runs):
            r = bench_run(args, pfns, buffers, i)
            runs.append(r)
            if not r["ok"]:
                log("    run %d FAILED: %s" % (i + 1, r["error"]))
                if r.get("context"):
                    log(r["context"])
                break
        results.append({"pfns": pfns, "buffers": buffers, "runs": runs})
    return results


def _summarise(args: argparse.Namespace, plan: Plan, floor: Floor, thp: bool,
               results: List[dict]) -> Tuple[List[dict], bool]:
    """Print the results table; one summary entry per configuration, and whether a
    target was missed."""
    floor_in = {"untouched": floor[(0, thp)]["dontneed_s"],
                "touched": floor[(1, thp)]["dontneed_s"],
                "retouched": floor[(1, 0)]["dontneed_s"]}
    floor_out = floor[(0, thp)]["willneed_s"]     # deflate: one MADV_WILLNEED per page
    log("")
    log("results: best of %d guests (medians in the JSON line)" % args.runs)
    log("  floors: inflate untouched %.3f s, touched %.3f s (THP %s, like QEMU's RAM here)%s; "
        "deflate %.3f s (MADV_WILLNEED)" % (
            floor_in["untouched"], floor_in["touched"], "on" if thp else "off",
            ", re-touched %.3f s (4 KiB pages)" % floor_in["retouched"] if args.retouched
            else "", floor_out))
    log("%-10s %-10s %9s %7s %8s %9s %7s %8s  %s" % (
        "pfns/bufs", "memory", "inflate", "GiB/s", "x floor", "deflate", "GiB/s", "x floor",
        "targets: inflate <= %.1fx floor, deflate <= %.2f s" % (INFLATE_FLOOR_RATIO,
                                                                 plan.deflate_target)))
    missed = False
    summary = []
    for c in results:
        entry, config_missed = _summarise_config(c, plan, floor_in, floor_out)
        summary.append(entry)
        missed |= config_missed
    _log_fastest(summary)
    return summary, missed


def _summarise_config(c: dict, plan: Plan, floor_in: Dict[str, float],
                      floor_out: float) -> Tuple[dict, bool]:
    name = "%d/%d" % (c["pfns"], c["buffers"])
    ok_runs = [r for r in c["runs"] if r["ok"]]
    if len(ok_runs) != len(c["runs"]) or not ok_runs:
        log("%-10s FAILED: %s" % (name, c["runs"][-1].get("error")))
        return ({"pfns": c["pfns"], "buffers": c["buffers"], "ok": False,
                 "error": c["runs"][-1].get("error")}, False)
    entry = {"pfns": c["pfns"], "buffers": c["buffers"], "ok": True,
             "portable": c["pfns"] <= PORTABLE_MAX_PFNS,
             "transport": ok_runs[0].get("transport")}
    missed = False
    for state in BENCH_STATES:
        per = [r[state] for r in ok_runs if state in r]
        if per:
            entry[state] = _state_figures(name, state, per, plan, floor_in[state], floor_out)
            missed |= not (entry[state]["inflate_target_met"]
                           and entry[state]["deflate_target_met"])
    return entry, missed


def _state_figures(name: str, state: str, per: List[dict], plan: Plan, floor_in: float,
                   floor_out: float) -> dict:
    """Best and median figures of one memory state over the runs; prints its row."""
    gib = plan.gib
    ins = [x["inflate_s"] for x in per]
    outs = [x["deflate_s"] for x in per]
    t_in, t_out = min(ins), min(outs)
    ratio_in = t_in / floor_in
    ok_in = ratio_in <= INFLATE_FLOOR_RATIO
    ok_out = t_out <= plan.deflate_target
    log("%-10s %-10s %8.3fs %7.2f %8.2f %8.3fs %7.2f %8.2f  %s, %s" % (
        name, state, t_in, gib / t_in, ratio_in, t_out, gib / t_out, t_out / floor_out,
        "inflate met" if ok_in else "inflate MISSED",
        "deflate met" if ok_out else "deflate MISSED"))
    return {
        "inflate_s": round(t_in, 4), "deflate_s": round(t_out, 4),
        "inflate_median_s": round(statistics.median(ins), 4),
        "deflate_median_s": round(statistics.median(outs), 4),
        "inflate_gib_s": round(gib / t_in, 3), "deflate_gib_s": round(gib / t_out, 3),
        "inflate_floor_ratio": round(ratio_in, 3),
        "deflate_floor_ratio": round(t_out / floor_out, 3),
        "inflate_all": [round(x, 4) for x in ins],
        "deflate_all": [round(x, 4) for x in outs],
        "inflate_guest_ms": [x["inflate_guest_ms"] for x in per],
        "deflate_guest_ms": [x["deflate_guest_ms"] for x in per],
        "rss_drop_mib": [x["rss_drop_mib"] for x in per],
        "inflate_target_met": ok_in, "deflate_target_met": ok_out}


def _score(e: dict) -> float:
    """Sum over the memory states measured of inflate + deflate (best runs)."""
    return sum(e[s]["inflate_s"] + e[s]["deflate_s"] for s in BENCH_STATES if s in e)


def _fastest(summary: List[dict]) -> Tuple[Optional[dict], Optional[dict]]:
    """The fastest configuration, and the fastest portable one."""
    ok = [e for e in summary if e["ok"]]
    best = min(ok, key=_score) if ok else None
    best_portable = min([e for e in ok if e["portable"]], key=_score, default=None)
    return best, best_portable


def _config_name(e: Optional[dict]) -> Optional[str]:
    return "%d/%d" % (e["pfns"], e["buffers"]) if e else None


def _log_fastest(summary: List[dict]) -> None:
    best, best_portable = _fastest(summary)
    if best:
        log("fastest overall: %s; fastest portable (<= %d PFNs per buffer): %s" % (
            _config_name(best), PORTABLE_MAX_PFNS, _config_name(best_portable) or "none"))


def _print_json_line(args: argparse.Namespace, plan: Plan, floor: Floor, thp: bool,
                     summary: List[dict]) -> None:
    best, best_portable = _fastest(summary)
    line = {"bench": "balloon", "accel": plan.accel, "qemu": qemu_version(),
            "machine": args.machine, "memory": args.memory, "size": plan.size,
            "runs": args.runs, "poll_ms": args.poll_ms, "thp": thp,
            "floor": {("touched" if t else "untouched") + ("_thp" if h else ""):
                      {k: (round(v, 4) if isinstance(v, float) else v) for k, v in f.items()}
                      for (t, h), f in floor.items()},
            "targets": {"inflate_floor_ratio": INFLATE_FLOOR_RATIO,
                        "deflate_s": round(plan.deflate_target, 4)},
            "configs": summary,
            "fastest": _config_name(best),
            "fastest_portable": _config_name(best_portable)}
    print(json.dumps(line, sort_keys=True), flush=True)
