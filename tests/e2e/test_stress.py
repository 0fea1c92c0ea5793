"""Stress mode end to end (blimp.mode=stress; README "Stress mode").

The guest runs a seeded storm of allocations, frees, verifies and rewrites on its own
memory while it balloons for the host: every held page carries a pattern of (seed,
address, generation) and is verified, so a host that loses or corrupts guest memory is
caught page by page.  These tests check that a storm under changing QMP targets ends
clean (exit 0x10, no failure, free pages after == before), that the same seed replays
the same operations (whatever the balloon does meanwhile) and another seed does not,
and that the detector fires: blimp.inject=stress_corrupt damages one word of one held
page and the run must fail naming exactly that address.
"""

from __future__ import annotations

import re
from typing import List, Tuple

import pytest

import guest
from blimp import exitcodes, guestlog
from guest import MiB, PAGE, Spec

STORM_SEED = 11
STORM_OPS = 40000
# balloon sizes the host asks for, one after the other, while the storm runs: inflate, grow,
# shrink, empty (the last one 0, so free pages after == before literally)
STORM_TARGETS = [96 * MiB, 192 * MiB, 64 * MiB, 256 * MiB, 128 * MiB, 0]


def _stress_spec(append: str, tag: str, timeout: float = 120.0) -> Spec:
    return Spec("pvh", "q35", "512M", "blimp.mode=stress " + append, timeout=timeout, tag=tag,
                balloon=True)


# the storm's operations again, with nobody moving the balloon: same seed, same count
QUIET = _stress_spec("blimp.seed=%d blimp.stress.ops=%d" % (STORM_SEED, STORM_OPS), "quiet")
REPLAY_A = _stress_spec("blimp.seed=5 blimp.stress.ops=3000", "seed5-a")
REPLAY_B = _stress_spec("blimp.seed=5 blimp.stress.ops=3000", "seed5-b")
OTHER = _stress_spec("blimp.seed=6 blimp.stress.ops=3000", "seed6")
INJECT = _stress_spec("blimp.seed=5 blimp.stress.ops=3000 blimp.inject=stress_corrupt",
                      "inject")
BAD_OPTION = Spec("pvh", "q35", "128M", "blimp.mode=stress blimp.stress.max_order=11",
                  timeout=30.0, tag="stress-bad-option")


def _indexed(lines: List[str], name: str) -> List[Tuple[int, dict]]:
    """(serial line index, event) of every `name` event."""
    out = []
    for i, line in enumerate(lines):
        ev = guestlog.event_named(line, name)
        if ev is not None:
            out.append((i, ev))
    return out


def _check_done(done: dict, ops: int, context: str) -> None:
    """A clean stress_done: every op ran, everything verified, nothing leaked."""
    assert done["ops"] == ops, "%d ops, expected %d\n%s" % (done["ops"], ops, context)
    assert done["pages_verified"] > 0 and done["bytes_verified"] == done["pages_verified"] * PAGE
    assert done["allocs"] > ops // 5 and done["frees"] > 0 and done["rewrites"] > 0, done
    # one full verify every 1000 ops (the default), plus the final one
    assert done["full_verifies"] == ops // 1000 + 1, done
    assert done["free_pages_after"] == done["free_pages_before"], (
        "leak: %d free pages before, %d after\n%s" % (done["free_pages_before"],
                                                       done["free_pages_after"], context))
    assert done["balloon_pages_before"] == done["balloon_pages_after"] == 0, done
    assert done["settled"] is True, done
    assert done["ops_per_s"] > 0


def test_storm_under_changing_targets(balloon_vm, runner):
    """>= 10,000 operations while the host inflates and deflates the balloon a few
    times: exit 0x10, no failure, free pages after == before, and the same operations
    as the same seed with nobody moving the balloon."""
    append = "blimp.mode=stress blimp.seed=%d blimp.stress.ops=%d" % (STORM_SEED, STORM_OPS)
    with balloon_vm(machine="q35", memory="512M", append=append, timeout=240) as vm:
        vm.wait_event("stress_start", timeout=30)
        for size in STORM_TARGETS:
            since = vm.mark()
            vm.balloon.set_size(size)
            vm.wait_event("balloon_reached", lambda e, p=size // PAGE: e["actual_pages"] == p,
                          timeout=60, since=since)
        vm.qemu.wait(timeout=120)
        outcome = vm.qemu.outcome
        lines = vm.lines
        context = vm.context(40)
        vm.check_no_violation()
    assert outcome.kind == exitcodes.GUEST and outcome.code == exitcodes.SUCCESS, (
        "stress run ended with %s\n%s" % (outcome.describe(), context))
    assert not guestlog.events(lines, "stress_failure"), context
    done_at = _indexed(lines, "stress_done")
    assert len(done_at) == 1, context
    done_line, done = done_at[0]
    _check_done(done, STORM_OPS, context)
    assert done["alloc_failures"] == 0, done
    # the balloon really moved while the storm ran: every target reached before the end
    start_line = _indexed(lines, "stress_start")[0][0]
    during = [e["actual_pages"] for i, e in _indexed(lines, "balloon_reached")
              if start_line < i < done_line]
    want = iter(during)
    assert all(size // PAGE in want for size in STORM_TARGETS), (
        "targets %r (pages) not all reached, in order, while the storm ran: %r\n%s"
        % ([t // PAGE for t in STORM_TARGETS], during, context))
    progress = [e["ops"] for e in guestlog.events(lines, "stress_progress")]
    assert len(progress) >= STORM_OPS // 1000 and progress == sorted(progress), progress
    print("\nstress: %d ops in %d ms, %d ops/s, %d pages verified (%d MiB), %d full verifies"
          % (done["ops"], done["ms"], done["ops_per_s"], done["pages_verified"],
             done["bytes_verified"] >> 20, done["full_verifies"]))
    # the same seed with a quiet balloon: the same operations, the same outcomes
    quiet = runner.get(QUIET)
    guest.check_exit(quiet, exitcodes.SUCCESS)
    q = quiet.event("stress_done")
    _check_done(q, STORM_OPS, quiet.context())
    assert (q["sequence"], q["outcomes"]) == (done["sequence"], done["outcomes"]), (q, done)
    assert q["pages_verified"] == done["pages_verified"], (q, done)


def _run_session(vm, sizes, wait_reached=True):
    """Ask for each balloon size in turn while the storm runs, then wait for the end;
    (outcome, serial lines, context)."""
    vm.wait_event("stress_start", timeout=30)
    for size in sizes:
        since = vm.mark()
        vm.balloon.set_size(size)
        if wait_reached:
            vm.wait_event("balloon_reached", lambda e, p=size // PAGE: e["actual_pages"] == p,
                          timeout=60, since=since)
    vm.qemu.wait(timeout=120)
    return vm.qemu.outcome, vm.lines, vm.context(40)


def test_storm_polling_ends_with_the_balloon_full(balloon_vm):
    """blimp.irq=poll, and the host leaves a 128 MiB balloon: the leak check counts the
    balloon's pages (held plus its record pages), so free + balloon is what free was."""
    append = "blimp.mode=stress blimp.seed=3 blimp.stress.ops=40000 blimp.irq=poll"
    with balloon_vm(machine="q35", memory="512M", append=append, timeout=240) as vm:
        outcome, lines, context = _run_session(vm, [200 * MiB, 50 * MiB, 128 * MiB])
        vm.check_no_violation()
    assert outcome.kind == exitcodes.GUEST and outcome.code == exitcodes.SUCCESS, (
        outcome.describe() + "\n" + context)
    done = guestlog.events(lines, "stress_done")[0]
    held = 128 * MiB // PAGE
    assert done["balloon_actual"] == held and done["settled"] is True, done
    assert held < done["balloon_pages_after"] <= held + 4, done   # + its record pages
    assert done["free_pages_after"] + done["balloon_pages_after"] == done["free_pages_before"]
    assert done["alloc_failures"] == 0 and done["ops"] == 40000, done


PRESSURE_APPEND = "blimp.seed=4 blimp.stress.ops=40000 blimp.stress.max_order=7"
PRESSURE_QUIET = Spec("pvh", "q35", "128M", "blimp.mode=stress " + PRESSURE_APPEND,
                      timeout=120.0, tag="pressure-quiet", balloon=True)


def test_storm_under_memory_pressure(balloon_vm, runner):
    """A 128 MiB guest with a 100 MiB balloon target and DEFLATE_ON_OOM: the storm's
    allocations run the guest out of memory, the balloon gives pages back and takes them
    again; nothing is corrupted or lost, and the operations drawn are still the seed's
    (the same sequence as with nobody ballooning; only the outcomes differ)."""
    with balloon_vm(machine="q35", memory="128M", balloon_opts=["deflate-on-oom=on"],
                    append="blimp.mode=stress " + PRESSURE_APPEND, timeout=240) as vm:
        outcome, lines, context = _run_session(vm, [100 * MiB], wait_reached=False)
    assert outcome.kind == exitcodes.GUEST and outcome.code == exitcodes.SUCCESS, (
        outcome.describe() + "\n" + context)
    assert not guestlog.events(lines, "stress_failure"), context
    done = guestlog.events(lines, "stress_done")[0]
    assert done["ops"] == 40000 and done["full_verifies"] == 41, done
    assert done["free_pages_after"] + done["balloon_pages_after"] == done["free_pages_before"]
    pressure = done["alloc_failures"] + len(guestlog.events(lines, "balloon_oom_deflate"))
    assert pressure > 0, "the storm never ran short of memory: %r\n%s" % (done, context)
    quiet = runner.get(PRESSURE_QUIET)
    guest.check_exit(quiet, exitcodes.SUCCESS)
    q = quiet.event("stress_done")
    assert q["alloc_failures"] == 0 and q["sequence"] == done["sequence"], (q, done)
    if done["alloc_failures"]:
        assert q["outcomes"] != done["outcomes"], (q, done)
    print("\nstress under pressure: %d ops/s, %d allocation failures, %d OOM deflates"
          % (done["ops_per_s"], done["alloc_failures"],
             len(guestlog.events(lines, "balloon_oom_deflate"))))


def test_same_seed_replays_another_does_not(runner):
    a, b, other = (runner.get(s) for s in (REPLAY_A, REPLAY_B, OTHER))
    dones = []
    for boot in (a, b, other):
        guest.check_exit(boot, exitcodes.SUCCESS)
        guest.check_all_events_parse(boot)
        d = boot.event("stress_done")
        _check_done(d, 3000, boot.context())
        dones.append(d)
    da, db, do = dones
    assert da["seed"] == db["seed"] == 5 and do["seed"] == 6
    for k in ("sequence", "outcomes", "allocs", "frees", "rewrites", "pages_verified",
              "pages_written"):
        assert da[k] == db[k], "seed 5 twice differs in %s: %r vs %r" % (k, da[k], db[k])
    assert do["sequence"] != da["sequence"] and do["outcomes"] != da["outcomes"], (da, do)


def test_injected_corruption_is_caught_with_its_address(runner):
    boot = runner.get(INJECT)
    guest.check_exit(boot, exitcodes.TEST_FAILURES)
    inj = boot.event("inject")
    assert inj["what"] == "stress_corrupt" and inj["now"] == inj["was"] ^ (2**64 - 1), inj
    fail = boot.event("stress_failure")
    assert fail["what"] == "verify" and fail["seed"] == 5, fail
    assert fail["addr"] == inj["addr"], "failure names %#x, the damage was at %#x\n%s" % (
        fail["addr"], inj["addr"], boot.context())
    assert fail["page"] == inj["addr"] & ~(PAGE - 1)
    assert fail["expected"] == inj["was"] and fail["found"] == inj["now"], (fail, inj)
    # found within the next full verify (every 1000 ops) at the latest
    assert inj["op"] < fail["op"] <= inj["op"] + 1000, (inj, fail)
    assert not boot.events_named("stress_done")
    human = [l for l in boot.lines if l.startswith("stress: FAILED:")]
    assert len(human) == 1 and "seed 5 op %d " % fail["op"] in human[0], boot.context()
    assert re.search(r"word at %#x: expected %#018x found %#018x" % (
        inj["addr"], inj["was"], inj["now"]), human[0]), human[0]


def test_bad_stress_option_stops_the_boot(runner):
    boot = runner.get(BAD_OPTION)
    guest.check_exit(boot, exitcodes.BAD_CMDLINE)
    err = boot.event("error")
    assert err["option"] == "blimp.stress.max_order=11" and "out of range" in err["message"]
