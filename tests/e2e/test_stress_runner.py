"""`./blimp stress` end to end (tools/blimp/stress_runner.py; README "Stress mode").

The runner boots N stress-mode guests at once and storms each from the host (QMP targets
fast, slow and reversing, stop/cont, migrations to a fresh QEMU, device resets through the
agent's reset-device, deflate-on-OOM under pressure).  These tests run it as a user does
(python3 -m blimp stress, its --json report and its output) and check that a clean run is
clean with every kind of storm really done, and that its detectors fire: a corrupted word
(blimp.inject=stress_corrupt) and leaked pages (blimp.inject=stress_leak) make it exit
non-zero naming the seed, the step, the address or the lost pages, and the replay command.

On stock QEMU 7.2 migrations here are --migrate paused: under TCG a live migration loses the
writes of a guest in the middle of its storm (cpu_physical_memory_sync_dirty_bitmap's fast path
never puts pages back to TLB_NOTDIRTY; docs/hosts.md). The reference host carries the fix
(tools/reference-host/qemu-7.2-tcg-dirty-sync.patch), and there the storms migrate live, with
free page hinting rounds, page by page verified.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import List, Tuple

import guest
from blimp import guestlog
from guest import MiB, PAGE


def _stress(images, pytestconfig, tmp_path, *argv: str,
            timeout: float = 150) -> Tuple[subprocess.CompletedProcess, dict, str]:
    """Run the stress subcommand; (process, its --json report, serial log dir)."""
    report = str(tmp_path / "stress.json")
    serial = str(tmp_path / "serial")
    os.makedirs(serial, exist_ok=True)
    cmd = [sys.executable, "-u", "-m", "blimp", "stress", "--kernel", images["pvh"],
           "--json", report, "--serial-dir", serial] + list(argv)
    env = dict(os.environ, PYTHONPATH=guest.TOOLS)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, env=env)
    with open(report) as f:
        return r, json.load(f), serial


def _serial_events(serial_dir: str, vm: int, name: str) -> List[dict]:
    with open(os.path.join(serial_dir, "vm%d.log" % vm), errors="replace") as f:
        return guestlog.events(f.read().splitlines(), name)


def test_two_guests_every_storm(images, pytestconfig, tmp_path):
    """Two guests, every storm, 12 s of storm each: exit 0, no corruption, no leak, every
    kind of host action done, at least 10,000 operations."""
    r, rep, serial = _stress(images, pytestconfig, tmp_path, "--vms", "2", "--seed", "21",
                             "--seconds", "15", "--migrate", "paused", "--progress", "2")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    assert rep["ok"] is True and len(rep["guests"]) == 2, out
    total_ops = 0
    for g in rep["guests"]:
        done = g["done"]
        assert g["ok"] and not g["failures"] and g["failure"] is None, (g, out)
        assert done is not None and done["seed"] == 21 + g["index"], g
        # the host's last target is 0: the balloon ends empty, and free pages after are
        # those before plus what the balloon held then (the runner's first storm races the
        # guest's bring-up, so the balloon may already hold pages when the storm starts)
        assert done["balloon_pages_after"] == 0, done
        assert (done["free_pages_after"]
                == done["free_pages_before"] + done["balloon_pages_before"]), done
        assert done["settled"] is True, done
        assert done["pages_verified"] > 0 and done["ops_per_s"] > 0, done
        acts = g["actions"]
        assert all(acts[k] >= 1 for k in ("fast", "slow", "reverse", "stopcont", "migrate",
                                           "reset", "oom")), (acts, out)
        assert len(g["migrations"]) >= 1 and g["resets"] >= 1 and g["oom_deflated"] > 0, g
        # every reset the runner asked for was the guest's own, and it re-inflated
        resets = _serial_events(serial, g["index"], "balloon_reset")
        assert len(resets) == g["resets"] and all(e["cause"] == "guest" for e in resets), resets
        assert len(_serial_events(serial, g["index"], "balloon_reinflated")) >= len(resets)
        assert len(_serial_events(serial, g["index"], "stress_progress")) >= 5
        total_ops += done["ops"]
    assert total_ops >= 10000, total_ops
    # what a user sees: progress lines while it runs, then the table and the totals
    assert out.count("ops/s), ") >= 4, out
    assert "leak check" in out and "ok: free" in out and "totals: " in out, out
    assert "stress: ok: 2 guests" in out, out
    print("\n" + "\n".join(l for l in r.stdout.splitlines()
                           if l.startswith(("vm", "all", "totals", "vm ")) or " seed " in l))


def test_injected_corruption_fails_with_seed_step_and_address(images, pytestconfig, tmp_path):
    """blimp.inject=stress_corrupt through the runner: exit non-zero, and the report names
    the guest, its seed, the operation and the damaged word (the one the guest damaged)."""
    r, rep, serial = _stress(images, pytestconfig, tmp_path, "--vms", "1", "--seed", "5",
                             "--ops", "3000", "--storm", "fast",
                             "--append", "blimp.inject=stress_corrupt")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    g = rep["guests"][0]
    f = g["failure"]
    assert not g["ok"] and f is not None and f["what"] == "verify" and f["seed"] == 5, g
    inj = _serial_events(serial, 0, "inject")[0]
    assert inj["what"] == "stress_corrupt" and f["addr"] == inj["addr"], (inj, f)
    assert "FAILED vm0 (seed 5)" in out, out
    line = [l for l in out.splitlines() if "stress_failure verify" in l]
    assert line, out
    assert ("seed 5, op %d " % f["op"]) in line[0], line
    assert ("word at %#x: expected %#018x found %#018x" % (inj["addr"], inj["was"], inj["now"])
            in line[0]), line
    assert "page %#x" % (inj["addr"] & ~(PAGE - 1)) in line[0], line
    assert "replay this guest alone: ./blimp stress --vms 1 --seed 5 --ops 3000" in out, out
    assert "--append 'blimp.inject=stress_corrupt'" in out, out


def test_leak_fails_with_lost_pages(images, pytestconfig, tmp_path):
    """blimp.inject=stress_leak (4 pages kept out of the allocator at the end): the leak
    check fails, and the runner says `leak` with lost_pages 4 and exits non-zero."""
    r, rep, serial = _stress(images, pytestconfig, tmp_path, "--vms", "1", "--seed", "8",
                             "--ops", "3000", "--storm", "fast,reverse",
                             "--append", "blimp.inject=stress_leak")
    out = r.stdout + r.stderr
    assert r.returncode != 0, out
    g = rep["guests"][0]
    assert not g["ok"] and g["failure"]["what"] == "leak", g
    assert g["failure"]["lost_pages"] == 4, g["failure"]
    assert "stress_failure leak: seed 8" in out and "lost_pages 4" in out, out
    assert "LEAK" in out, out
    assert _serial_events(serial, 0, "inject")[0]["what"] == "stress_leak"


def test_agent_reset_device_with_a_target(balloon_vm):
    """The agent's reset-device: with a 64 MiB balloon the guest resets the device, tells
    the fresh device every held page again and is back at the target; the data it holds
    verifies, and QEMU's and the guest's balloon agree."""
    with balloon_vm(machine="q35", memory="256M") as vm:
        vm.check("alloc %d 77" % (16 * MiB))
        vm.resize(64 * MiB)
        since = vm.mark()
        r = vm.check("reset-device")
        assert r["resets"] == 1 and r["target_pages"] == 64 * MiB // PAGE, r
        rs = vm.wait_event("balloon_reset", since=since, timeout=10)
        assert rs["cause"] == "guest" and rs["reinflate_pages"] == 64 * MiB // PAGE, rs
        ri = vm.wait_event("balloon_reinflated", since=since, timeout=30)
        assert ri["pages"] == 64 * MiB // PAGE, ri
        st = vm.check_balloon(64 * MiB)
        assert st["balloon"]["resets"] == 1 and st["balloon"]["reinflate_pending_pages"] == 0
        assert not vm.events("device_needs_reset")
        vm.verify(pages=16 * MiB // PAGE)
        vm.resize(0)
        vm.check_balloon(0)
        vm.check_no_violation()
        vm.quit()


def test_live_migrations_with_hinting_on_reference_host(images, pytestconfig, tmp_path,
                                                        reference_qemu):
    """The reference host (QEMU 7.2 with the TCG dirty-sync fix): two guests storm while they
    are live-migrated with free page hinting; every page verifies, nothing leaks, and hinting
    rounds really ran."""
    r, rep, serial = _stress(images, pytestconfig, tmp_path, "--vms", "2", "--seed", "31",
                             "--seconds", "15", "--migrate", "live", "--qemu", reference_qemu,
                             "--storm", "migrate,fast,reverse,oom", timeout=240)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out
    hint_rounds = 0
    for g in rep["guests"]:
        done = g["done"]
        assert g["ok"] and done is not None, (g, out)
        # the balloon may hold pages when the storm starts (the runner acts at once)
        assert done["balloon_pages_after"] == 0, done
        assert (done["free_pages_after"]
                == done["free_pages_before"] + done["balloon_pages_before"]), done
        assert len(g["migrations"]) >= 1, g
        hint_rounds += len(_serial_events(serial, g["index"], "balloon_hint_start"))
    assert hint_rounds >= 1, out



def test_lost_interrupt_fails_the_guest():
    """A guest that reports device work no interrupt announced (irq_missed) has recovered by
    itself, but the host dropped an interrupt: the runner fails that guest, saying so."""
    import argparse
    import types
    from blimp import stress_runner
    args = argparse.Namespace(seed=1, memory="256M")
    run = stress_runner.GuestRun(0, args, [], stress_runner.Log())
    run.session = types.SimpleNamespace(lines=[
        '{"event":"stress_progress","ops":10}',
        '{"event":"irq_missed","mode":"intx","config":true,"queue":false,"count":1,"looks":3}'])
    run.scan()
    assert len(run.r.failures) == 1 and run.r.failures[0].startswith("lost interrupt"), \
        run.r.failures
    assert run.r.progress == {"event": "stress_progress", "ops": 10}
