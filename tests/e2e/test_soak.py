"""`./blimp soak` end to end (tools/blimp/soak.py; docs/host-tools.md).

The soak boots guest after guest on every machine face (q35 modern PCI, pc legacy PCI,
microvm virtio-mmio v2 and v1) and gives each its first balloon target at one of the
timings that once lost the guest's wake-up (a paused start, the ready line, QMP connect,
the hold windows of blimp.test.hold, a burst, a target while buffers are in flight), with
CPU hogs beside them.  These tests run it as a user does (python3 -m blimp soak and its
--json report): a small soak passes with no freeze and runs every face and every timing,
the freeze detector fires on a run whose VM the runner stops right after its target
(--inject-stop), naming exactly that run, its seed and its replay command, and a run whose
guest loses its device interrupt on purpose (the agent's lose-irq) is counted among the
"lost interrupts recovered", not as a freeze.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Tuple

import guest
from blimp import soak


def _soak(images, tmp_path, *argv: str, timeout: float = 150) -> Tuple[subprocess.CompletedProcess,
                                                                        dict]:
    report = str(tmp_path / "soak.json")
    cmd = [sys.executable, "-u", "-m", "blimp", "soak", "--kernel", images["pvh"],
           "--json", report, "--junit", str(tmp_path / "soak.xml"), "--progress", "2"] + \
        list(argv)
    env = dict(os.environ, PYTHONPATH=guest.TOOLS)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, env=env)
    with open(report) as f:
        return r, json.load(f)


def test_scenario_order_covers_every_pair():
    """rr: every face within the first F runs, every timing within the first T, every pair
    within F*T (also when F and T share a factor)."""
    faces = list(soak.FACES)
    for timings in (list(soak.TIMINGS), list(soak.TIMINGS[:5]), list(soak.TIMINGS[:6])):
        f, t = len(faces), len(timings)
        order = soak.scenario_order(faces, timings, f * t, "rr", 1)
        assert len(set(order)) == f * t, (timings, order)
        assert {x for x, _ in order[:f]} == set(faces)
        assert {y for _, y in order[:t]} == set(timings)
    rnd = soak.scenario_order(faces, list(soak.TIMINGS), 50, "random", 7)
    assert rnd == soak.scenario_order(faces, list(soak.TIMINGS), 50, "random", 7)


def test_small_soak_has_no_freeze_and_runs_every_scenario(images, tmp_path):
    """8 runs, two at a time, one CPU hog: exit 0, no freeze, no error, every face and every
    timing (hold windows included: the kernel has blimp.test.hold) ran, and each run reached
    its final target and then 0 on the transport it was meant to use."""
    r, rep = _soak(images, tmp_path, "--runs", "8", "-j", "2", "--hogs", "1", "--seed", "11")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    cfg, st, runs = rep["config"], rep["summary"], rep["runs"]
    assert rep["ok"] is True and st["freezes"] == 0 and st["errors"] == 0, out
    assert cfg["hold_option"] is True, "the kernel has no blimp.test.hold: " + out
    assert len(runs) == 8 and [x["index"] for x in runs] == list(range(8)), out
    assert {x["face"] for x in runs} == set(soak.FACES), runs
    assert set(cfg["timings"]) == set(soak.TIMINGS), cfg
    assert {x["timing"] for x in runs} == set(soak.TIMINGS), runs
    for x in runs:
        assert x["status"] == "ok" and x["first_ms"] is not None, x
        assert x["second_ms"] is not None and x["targets_mib"][-1] == 0, x
        assert x["transport"] == soak.FACES[x["face"]].transport, x
        assert x["seed"] == 11 + x["index"], x
        if x["timing"].startswith("hold-"):
            assert x["hold"]["step"] == x["timing"][5:], x
    assert "soak: ok: 8 runs, 0 freezes" in out, out
    assert "lost interrupts recovered: " in out and "time to the first target: p50" in out, out
    print("\n" + "\n".join(l for l in r.stdout.splitlines() if not l.startswith("soak: ")))


def test_freeze_detector_fires_on_a_stopped_vm(images, tmp_path):
    """--inject-stop 1: run 1's VM is QMP-stopped right after its first target, which it
    then can never reach.  The soak reports exactly that run as a freeze (the guest silent:
    its agent does not answer), with its scenario, seed, replay command and console tail,
    and exits 1; the other runs (polling guests, the control) pass."""
    r, rep = _soak(images, tmp_path, "--runs", "3", "-j", "2", "--hogs", "1", "--seed", "40",
                   "--irq", "poll", "--inject-stop", "1", "--target-timeout", "3")
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    runs = rep["runs"]
    assert [x["status"] for x in runs] == ["ok", "freeze", "ok"], out
    assert rep["summary"]["freezes"] == 1 and rep["summary"]["errors"] == 0, out
    f = runs[1]
    assert f["stopped"] is True and f["seed"] == 41, f
    d = f["freeze"]
    assert d["which"] == "first" and d["target_mib"] == f["final_mib"], d
    assert d["host_reached"] is False and d["guest_reached"] is False, d
    assert d["agent"].startswith("silent"), d
    head = "FREEZE run 1 (seed 41): %s/%s: first target %d MiB not reached in 3 s" % (
        f["face"], f["timing"], f["final_mib"])
    assert head in out, out
    assert "guest silent: agent silent" in out, out
    replay = ("replay: ./blimp soak --runs 1 -j 1 --seed 41 --faces %s --timings %s --hogs 1 "
              "--memory 256M --target-timeout 3 --irq poll --inject-stop 0"
              % (f["face"], f["timing"]))
    assert replay in out, out
    assert "last console lines:" in out and f["console_tail"], out
    assert "soak: FAILED: 1 freezes, 0 errors in 3 runs" in out, out
    with open(str(tmp_path / "soak.xml")) as fx:
        xml = fx.read()
    assert xml.count("<failure ") == 1 and 'name="run1-' in xml, xml


def test_lost_interrupt_is_recovered_and_counted(images, tmp_path):
    """--inject-lose-irq 1: before run 1's second target the agent's lose-irq masks the
    guest's device line; its bounded look still reaches the target, the agent's state says
    irq.missed > 0 and an irq_missed event was logged, and the soak counts exactly that run
    as a lost interrupt recovered (exit 0: no freeze)."""
    r, rep = _soak(images, tmp_path, "--runs", "2", "-j", "2", "--hogs", "1", "--seed", "50",
                   "--faces", "q35-modern,microvm-mmio-v2", "--timings", "ready",
                   "--inject-lose-irq", "1")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    runs = rep["runs"]
    assert [x["status"] for x in runs] == ["ok", "ok"], out
    assert runs[0]["lost_irq"] is False and runs[0]["missed"] == 0, runs[0]
    assert runs[1]["lost_irq"] is True and runs[1]["missed"] >= 1, runs[1]
    assert runs[1]["missed_events"] >= 1 and runs[1]["face"] == "microvm-mmio-v2", runs[1]
    assert rep["summary"]["missed_runs"] == 1, rep["summary"]
    assert "lost interrupts recovered: irq.missed > 0 in 1 runs" in out, out
