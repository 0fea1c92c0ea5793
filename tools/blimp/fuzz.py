"""Run blimp's libFuzzer targets (tests/fuzz/, built by `ninja -f fuzz.ninja`).

    python3 -m blimp fuzz [--runs N] [--time S] [--targets virtqueue,balloon,...] [--merge]

For each target: first replay every saved input (tests/fuzz/regressions/<target>/, the inputs
that once found a bug, and the seed corpus tests/fuzz/corpus/<target>/), then fuzz from the
corpus for --runs executions each (default: a CI-sized run, 10^6 for the ring and each
transport, fewer for the whole driver, which is ~20x slower per input), or --time seconds. New interesting inputs go to a scratch
directory, so a run leaves the repository alone unless --merge folds them into the corpus.
A crash, a sanitizer report or a hang (one input running past --hang seconds) fails the run,
and the input that did it is kept under build/fuzz/artifacts/ with the command to replay it.
Exit status 0 only when every target ran clean.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TARGETS = ["virtqueue", "virtio_pci", "virtio_mmio", "balloon"]
# Inputs much longer than this only make each run slower: every target reads its script a few
# bytes per step, and a few hundred steps reach every state the models have.
MAX_LEN = {"virtqueue": 256, "virtio_pci": 512, "virtio_mmio": 512, "balloon": 512}
# The CI-sized run (./blimp test): over 3 million executions in all, a few minutes.
CI_RUNS = {"virtqueue": 1_000_000, "virtio_pci": 1_000_000, "virtio_mmio": 1_000_000,
           "balloon": 300_000}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fuzz", help="run the libFuzzer targets (tests/fuzz)",
                       description=__doc__.split("\n\n")[1].strip())
    p.add_argument("--runs", type=int, default=None,
                   help="executions per target (default: the CI-sized run; 0 = replay only)")
    p.add_argument("--time", type=int, default=0,
                   help="seconds per target instead of a run count (0: use --runs)")
    p.add_argument("--targets", default=",".join(TARGETS),
                   help="comma-separated targets (default: all)")
    p.add_argument("--hang", type=int, default=10,
                   help="seconds one input may run before it counts as a hang (default 10)")
    p.add_argument("--merge", action="store_true",
                   help="fold new interesting inputs into tests/fuzz/corpus/<target>")
    p.add_argument("--build-dir", default=os.path.join(REPO, "build", "fuzz"))
    p.set_defaults(func=run)


def _saved_inputs(target: str) -> List[str]:
    files = []
    for kind in ("regressions", "corpus"):
        d = os.path.join(REPO, "tests", "fuzz", kind, target)
        if os.path.isdir(d):
            files += sorted(os.path.join(d, f) for f in os.listdir(d))
    return files


def _stats(text: str) -> Dict[str, int]:
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^stat::(\w+):\s+(\d+)", text, re.M)}


def _replay(binary: str, artifact: Optional[str], fallback: str = "") -> str:
    """The failing input's full report (the fuzzing run hid the target's stderr)."""
    if not artifact or not os.path.exists(artifact):
        return fallback[-4000:]
    r = subprocess.run([binary, artifact], cwd=REPO, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True)
    lines = [ln for ln in r.stdout.splitlines() if "libFuzzer" not in ln or "ERROR" in ln]
    return "\n".join(lines[:40])


def _fuzz_one(binary: str, target: str, args: argparse.Namespace, artifacts: str) -> dict:
    res = {"target": target, "ok": False, "replayed": 0, "execs": 0, "seconds": 0.0,
           "cov": 0, "new": 0, "detail": ""}
    common = [f"-timeout={args.hang}", f"-max_len={MAX_LEN.get(target, 512)}",
              f"-artifact_prefix={artifacts}/{target}-", "-print_final_stats=1"]
    # The device models note every driver mistake they see on stderr; while fuzzing a hostile
    # device that is noise (close_fd_mask), and a failing input is replayed with it shown.
    quiet = ["-close_fd_mask=2"]
    saved = _saved_inputs(target)
    if saved:
        r = subprocess.run([binary, *common, *quiet, "-runs=1", *saved], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        res["replayed"] = len(saved)
        if r.returncode != 0:
            bad = re.findall(r"^Running: (\S+)", r.stdout, re.M)
            res["detail"] = "a saved input fails: " + (bad[-1] if bad else "?") + "\n" + \
                _replay(binary, bad[-1] if bad else None)
            return res
    runs = CI_RUNS[target] if args.runs is None else args.runs
    if runs == 0 and args.time == 0:
        res["ok"] = True
        return res
    corpus = os.path.join(REPO, "tests", "fuzz", "corpus", target)
    os.makedirs(corpus, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f"blimp-fuzz-{target}-")
    try:
        budget = [f"-max_total_time={args.time}"] if args.time else [f"-runs={runs}"]
        start = time.monotonic()
        r = subprocess.run([binary, *common, *quiet, *budget, scratch, corpus], cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        res["seconds"] = time.monotonic() - start
        st = _stats(r.stdout)
        res["execs"] = st.get("number_of_executed_units", 0)
        cov = re.findall(r"cov: (\d+)", r.stdout)
        res["cov"] = int(cov[-1]) if cov else 0
        res["new"] = len(os.listdir(scratch))
        if r.returncode != 0:
            arts = re.findall(r"Test unit written to (\S+)", r.stdout)
            what = "hang" if "ERROR: libFuzzer: timeout" in r.stdout else "crash"
            res["detail"] = (f"{what} (exit {r.returncode}); replay with: {binary} "
                             f"{arts[-1] if arts else '<artifact>'}\n" +
                             _replay(binary, arts[-1] if arts else None, r.stdout))
            return res
        if args.merge and res["new"]:
            subprocess.run([binary, "-merge=1", f"-max_len={MAX_LEN.get(target, 512)}",
                            corpus, scratch], cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, check=True)
        res["ok"] = True
        return res
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        print(f"blimp fuzz: unknown target(s) {', '.join(unknown)}; known: {', '.join(TARGETS)}",
              file=sys.stderr)
        return 2
    artifacts = os.path.join(args.build_dir, "artifacts")
    os.makedirs(artifacts, exist_ok=True)
    results = []
    for t in targets:
        binary = os.path.join(args.build_dir, f"fuzz_{t}")
        if not os.access(binary, os.X_OK):
            print(f"blimp fuzz: {binary} is missing: build it with `ninja -f fuzz.ninja`",
                  file=sys.stderr)
            return 2
        what = f"{args.time} s" if args.time else \
            f"{CI_RUNS[t] if args.runs is None else args.runs} runs"
        print(f"fuzz: {t}: replaying saved inputs, then {what} ...", flush=True)
        res = _fuzz_one(binary, t, args, artifacts)
        results.append(res)
        if not res["ok"]:
            print(f"fuzz: {t}: FAILED: {res['detail']}", flush=True)
    print()
    print(f"{'target':<12} {'saved':>6} {'execs':>10} {'exec/s':>8} {'cov':>5} {'new':>5}  result")
    for r in results:
        rate = r["execs"] / r["seconds"] if r["seconds"] else 0
        print(f"{r['target']:<12} {r['replayed']:>6} {r['execs']:>10} {rate:>8.0f} {r['cov']:>5} "
              f"{r['new']:>5}  {'ok' if r['ok'] else 'FAILED'}")
    total = sum(r["execs"] for r in results)
    print(f"total: {total} executions, {sum(1 for r in results if not r['ok'])} failed")
    return 0 if all(r["ok"] for r in results) else 1


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m blimp.fuzz")
    sub = p.add_subparsers(dest="command")
    add_parser(sub)
    args = p.parse_args(["fuzz", *(argv if argv is not None else sys.argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
