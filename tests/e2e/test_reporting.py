"""Free page reporting (VIRTIO_BALLOON_F_PAGE_REPORTING, bit 5) through real QEMU:
memory the guest frees goes back to the host (QEMU's RSS falls), held memory is intact,
and without the feature (declined or not offered) nothing changes."""

from __future__ import annotations

import time

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


def test_reporting_with_poison(balloon_vm):
    """blimp.poison=1: pages QEMU discarded read back as zero, which must not count as
    poison mismatches; memory allocated again afterwards verifies."""
    with balloon_vm(memory="1G", balloon_opts=REPORTING, append="blimp.poison=1") as vm:
        assert vm.accepted >> REPORTING_BIT & 1, vm.features
        # Poisoning wrote all free memory at boot; the first pass (which verifies every block
        # before reporting it) gives it back. Cycle only after that.
        vm.wait_event("balloon_reported", timeout=120)
        held = _alloc(vm, HELD, 7)
        _cycle(vm, 5)
        again = _alloc(vm, FREED, 9)     # the reported (discarded) blocks, allocated again
        vm.verify(str(again), pages=FREED >> 12)
        vm.check("free %d" % again)
        vm.verify(str(held), pages=HELD >> 12)
        vm.check("alloc 128M 3")
        mismatches = [l for l in vm.qemu.lines if "poison mismatch" in l]
        assert not mismatches, mismatches[:3]
        vm.check_no_violation()
        vm.quit()
