"""Free page reporting (VIRTIO_BALLOON_F_PAGE_REPORTING, bit 5) through real QEMU:
memory the guest frees goes back to the host (QEMU's RSS falls), held memory is intact,
and without the feature (declined or not offered) nothing changes."""

from __future__ import annotations

import time

import pytest

from blimp.units import MiB

REPORTING_BIT = 5
REPORTING = ["free-page-reporting=on"]
FREED = 640 * MiB       # touched, then freed: what must go back to the host
HELD = 64 * MiB         # kept across the cycles, verified after each
DROP_WITHIN_S = 10.0    # generous for TCG; the guest needs well under a second


def _alloc(vm, size: int, seed: int) -> int:
    return vm.check("alloc %dM %d" % (size >> 20, seed), timeout=120)["id"]


def _wait_rss_drop(vm, high: int, want: int, within: float) -> int:
    """Poll QEMU's RSS until it is `want` bytes below `high`; the drop reached."""
    deadline = time.monotonic() + within
    drop = high - vm.balloon.rss()
    while drop < want and time.monotonic() < deadline:
        time.sleep(0.02)
        drop = high - vm.balloon.rss()
    return drop


def _cycle(vm, seed: int) -> int:
    """Allocate and touch FREED bytes, free them; QEMU's RSS drop afterwards."""
    before = vm.balloon.rss()
    big = _alloc(vm, FREED, seed)
    high = vm.balloon.rss()
    assert high - before >= 0.9 * FREED, \
        "touching %d MiB grew QEMU's RSS by only %d MiB" % (FREED >> 20, (high - before) >> 20)
    mark = vm.mark()
    vm.check("free %d" % big)
    drop = _wait_rss_drop(vm, high, int(0.9 * FREED), DROP_WITHIN_S)
    assert drop >= 0.9 * FREED, \
        "QEMU's RSS fell by %d MiB of the %d MiB freed" % (drop >> 20, FREED >> 20)
    ev = vm.wait_event("balloon_reported", lambda e: e["pages"] > 0, since=mark)
    assert ev["chains"] >= 1, ev
    return drop


def test_freed_memory_returns_to_host(balloon_vm):
    with balloon_vm(memory="1G", balloon_opts=REPORTING) as vm:
        assert vm.accepted >> REPORTING_BIT & 1, vm.features
        held = _alloc(vm, HELD, 7)
        _cycle(vm, 5)
        vm.verify(str(held), pages=HELD >> 12)
        st = vm.state()["balloon"]
        assert st["reported_pages"] >= (FREED >> 12) * 9 // 10, st
        assert st["report_chains"] >= 1 and st["inflight_report_pages"] == 0, st
        # A second cycle reports again: the blocks were allocated in between.
        reported = st["reported_pages"]
        _cycle(vm, 6)
        vm.verify(str(held), pages=HELD >> 12)
        st = vm.state()["balloon"]
        assert st["reported_pages"] - reported >= (FREED >> 12) * 9 // 10, st
        assert st["state"] == "running", st
        vm.check_no_violation()
        vm.quit()


def test_reporting_declined_keeps_rss(balloon_vm):
    """The control that makes "RSS falls" mean something: with reporting declined the
    same free leaves QEMU's RSS where it was."""
    with balloon_vm(memory="1G", balloon_opts=REPORTING,
                    append="blimp.balloon.reporting=0") as vm:
        assert not vm.accepted >> REPORTING_BIT & 1, vm.features
        big = _alloc(vm, FREED, 5)
        high = vm.balloon.rss()
        vm.check("free %d" % big)
        drop = _wait_rss_drop(vm, high, int(0.1 * FREED), 2.0)
        assert drop < 0.1 * FREED, "RSS fell by %d MiB without reporting" % (drop >> 20)
        assert vm.state()["balloon"]["reported_pages"] == 0
        assert not vm.events("balloon_reported")
        vm.quit()


def test_stock_device_without_reporting(balloon_vm):
    with balloon_vm(memory="1G") as vm:
        assert not vm.accepted >> REPORTING_BIT & 1, vm.features
        held = _alloc(vm, HELD, 7)
        big = _alloc(vm, FREED, 5)
        vm.check("free %d" % big)
        vm.verify(str(held), pages=HELD >> 12)
        st = vm.state()["balloon"]
        assert st["state"] == "running" and st["reported_pages"] == 0, st
        vm.check_no_violation()
        vm.quit()


POISON_BIT = 4


@pytest.mark.parametrize("append,dev_opts,kept", [
    ("blimp.poison=1", [], True),
    ("blimp.poison=1 blimp.poison_pattern=0x0123456789abcdef", [], False),
    ("blimp.poison=1", ["page-poison=off"], False),
    ("blimp.poison=0", [], False)],
    ids=["poison-accepted", "poison-pattern-not-32-bit", "poison-not-offered", "no-poison"])
def test_reporting_and_poison(balloon_vm, append, dev_opts, kept):
    """Reporting on x poison on/off, and what the host does with reported pages: with
    PAGE_POISON accepted (poison_val 0xaaaaaaaa) QEMU keeps them, so QEMU's RSS stays
    and the guest verifies their poison on reuse; otherwise QEMU discards them (RSS
    falls, they read back zero) and the guest never relies on their contents. Either
    way no poison mismatch, and every allocation afterwards verifies."""
    with balloon_vm(memory="1G", balloon_opts=REPORTING + dev_opts, append=append) as vm:
        assert vm.accepted >> REPORTING_BIT & 1, vm.features
        assert bool(vm.accepted >> POISON_BIT & 1) == kept, vm.features
        if "poison=1" in append:
            # Poisoning wrote all free memory at boot; let the first pass happen first.
            vm.wait_event("balloon_reported", timeout=120)
        held = _alloc(vm, HELD, 7)
        big = _alloc(vm, FREED, 5)
        high = vm.balloon.rss()
        mark = vm.mark()
        vm.check("free %d" % big)
        vm.wait_event("balloon_reported", lambda e: e["pages"] > 0, since=mark, timeout=30)
        drop = _wait_rss_drop(vm, high, int(0.9 * FREED), 2.0 if kept else DROP_WITHIN_S)
        if kept:
            assert drop < 0.1 * FREED, "QEMU discarded reported pages despite poison_val " \
                "(RSS fell by %d MiB)\n%s" % (drop >> 20, vm.context())
        else:
            assert drop >= 0.9 * FREED, "QEMU's RSS fell by only %d MiB" % (drop >> 20)
        again = _alloc(vm, FREED, 9)     # the reported blocks, allocated again
        vm.verify(str(again), pages=FREED >> 12)
        vm.verify(str(held), pages=HELD >> 12)
        mismatches = [l for l in vm.qemu.lines if "poison mismatch" in l]
        assert not mismatches, mismatches[:3]
        vm.check_no_violation()
        vm.quit()
