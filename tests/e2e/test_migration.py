"""Live migration of a blimp guest between two real QEMUs, with and without free page
hinting (VIRTIO_BALLOON_F_FREE_PAGE_HINT).

The guest (3 GiB) holds 128 MiB of verified data and has touched and freed 2 GiB more,
so without hinting QEMU must send those 2 GiB of garbage; with hinting the guest tells
the source they are free and QEMU skips them.  BalloonSession.migrate() starts the
destination (-incoming defer, its own sockets), migrates over a unix socket with a
10 GiB/s max-bandwidth and switches the session to the destination, where the held
data must verify and the balloon must still follow targets.

"In use" below is RAM minus the guest allocator's free pages before migrating
(BalloonSession.in_use): the held data, the agent's records, the kernel image and the
memory the allocator does not manage (about 3 MiB here) all count.  That allowance for
the kernel is what the 1.2 x target is measured against.

The hinting test needs the guest side of FREE_PAGE_HINT; a kernel without it fails the
test at "guest did not accept FREE_PAGE_HINT".
"""

from __future__ import annotations

import time

from blimp.balloon import F_FREE_PAGE_HINT
from blimp.qemu import Qemu, free_page_hint_opts
from guest import GiB, MiB, PAGE

MEMORY = "3G"
HELD = 128 * MiB          # verified data the guest keeps through the migration
TOUCHED = 2 * GiB         # written, then freed, before migrating
HELD_SEED, TOUCH_SEED = 7, 9
TARGET_RATIO = 1.2        # with hinting: RAM transferred <= 1.2 x in-use
HINT_EVENT_TIMEOUT_S = 15.0
TIMEOUT = 180.0           # per QEMU: boot, 2 GiB touched, migration and checks under TCG

#: the hint-off figure of this pytest run, for the hint-on test to compare against
MEASURED: dict = {}


def test_destination_is_a_copy_of_the_source(images):
    """The destination's command line is the source's (machine, -m, devices and ids,
    iothread, kernel) with its own sockets and -incoming defer."""
    src = Qemu(images["pvh"], machine="q35", memory=MEMORY, accel="tcg", balloon=True,
               balloon_opts=free_page_hint_opts(), agent=True, iothread="io0",
               append="blimp.balloon.pfns=256")
    dst = src.migration_destination()
    try:
        a, b = src.argv(), dst.argv()
        assert src.tmpdir != dst.tmpdir
        assert b[-2:] == ["-incoming", "defer"] and "-incoming" not in a
        same = [x.replace(src.tmpdir, "TMP") for x in a]
        assert [x.replace(dst.tmpdir, "TMP") for x in b[:-2]] == same
        assert "iothread,id=io0" in b
        assert "virtio-balloon-pci,id=balloon0,free-page-hint=on,iothread=io0" in b
        assert dst.free_page_hint and src.free_page_hint
    finally:
        src.close()
        dst.close()


def _hold_and_free(vm) -> int:
    """Hold HELD bytes of verified data, touch and free TOUCHED more; in-use bytes."""
    vm.check("alloc %d %d" % (HELD, HELD_SEED))
    vm.touch_free_memory(TOUCHED, seed=TOUCH_SEED, timeout=120)
    return vm.in_use()


def _still_works_on_destination(vm) -> None:
    """After migrate(): the guest answers, its data verifies, the balloon follows a
    target and back, and the guest exits through the destination QEMU."""
    vm.verify(pages=HELD // PAGE)
    assert vm.state()["held"]["pages"] == HELD // PAGE
    vm.resize(256 * MiB)
    vm.check_balloon(256 * MiB)
    vm.verify(pages=HELD // PAGE)
    vm.resize(0)
    vm.check_balloon(0)
    vm.check_no_violation()
    vm.quit()


def _report(name: str, m, in_use: int) -> None:
    print("%s: RAM transferred %d MiB (%.2f x in-use %d MiB), total %d ms, downtime %d ms,"
          " %d normal + %d zero pages" % (
              name, m.ram_transferred >> 20, m.ram_transferred / in_use, in_use >> 20,
              m.total_time_ms, m.downtime_ms, m.ram_normal, m.ram_duplicate))


def test_migrate_without_hinting(balloon_vm):
    """Stock device: the migration completes, the source QEMU is gone, the guest runs on
    the destination with its data intact, and the 2 GiB it touched were sent."""
    with balloon_vm(memory=MEMORY, timeout=TIMEOUT) as vm:
        assert not vm.accepted & F_FREE_PAGE_HINT
        in_use = _hold_and_free(vm)
        source = vm.qemu
        before = vm.mark()
        m = vm.migrate()
        assert vm.qemu is not source and not source.running(), vm.context()
        assert not m.free_page_hint and m.switch_line == before
        # nothing told QEMU the touched memory was free: it all travelled
        assert m.ram_transferred >= TOUCHED + HELD, (
            "only %d MiB transferred though the guest had touched %d MiB" % (
                m.ram_transferred >> 20, (TOUCHED + HELD) >> 20))
        assert m.ram_normal * PAGE >= TOUCHED + HELD
        assert m.total_time_ms > 0 and m.ram_total >= vm.ram
        assert not vm.events("balloon_hint_start"), vm.context()
        MEASURED["off"] = m.ram_transferred
        _report("hinting off", m, in_use)
        _still_works_on_destination(vm)


def test_migrate_with_free_page_hinting(balloon_vm):
    """free-page-hint=on: the guest accepts FREE_PAGE_HINT, hints during the migration,
    gets DONE on the destination and takes its hinted pages back; RAM transferred is at
    most 1.2 x what the guest uses, and well below the hint-off run."""
    # Polling: with interrupts the 1.2 x target is missed in about half the runs on our loaded
    # 2-core TCG host, not understood yet (docs/design.md, "Interrupts", Open). Hinting with
    # interrupts is checked for correctness by test_interrupts.py::test_hinting_with_interrupts.
    with balloon_vm(memory=MEMORY, timeout=TIMEOUT, free_page_hint=True,
                    append="blimp.irq=poll") as vm:
        assert vm.features["offered"] & F_FREE_PAGE_HINT, (
            "QEMU did not offer FREE_PAGE_HINT\n" + vm.context())
        assert vm.accepted & F_FREE_PAGE_HINT, (
            "guest did not accept FREE_PAGE_HINT (bit 3): accepted %#x of offered %#x\n%s"
            % (vm.accepted, vm.features["offered"], vm.context()))
        in_use = _hold_and_free(vm)
        free_before = vm.state()["mm"]["free_pages"]
        before = vm.mark()
        m = vm.migrate()
        assert m.free_page_hint
        start = vm.wait_event("balloon_hint_start", since=before, timeout=HINT_EVENT_TIMEOUT_S)
        stop = vm.wait_event("balloon_hint_stop", lambda e: e["cmd_id"] == start["cmd_id"],
                             since=before, timeout=HINT_EVENT_TIMEOUT_S)
        assert stop["reason"] in ("host", "exhausted"), stop
        assert stop["pages"] > 0, "the guest hinted no pages: %r\n%s" % (stop, vm.context())
        # DONE reaches the guest once it runs on the destination: on that QEMU's serial
        done = vm.wait_event("balloon_hint_done", since=m.switch_line,
                             timeout=HINT_EVENT_TIMEOUT_S)
        assert done["released_pages"] > 0, done
        # every hinted page goes back to the allocator (give the guest a moment to finish)
        deadline = time.monotonic() + 5
        st = vm.state()
        while st["mm"]["free_pages"] != free_before and time.monotonic() < deadline:
            time.sleep(0.05)
            st = vm.state()
        assert st["mm"]["free_pages"] == free_before, (
            "free pages %d after DONE, %d before migrating\n%s" % (
                st["mm"]["free_pages"], free_before, vm.context()))
        assert st["balloon"]["hint_rounds"] >= 1, st
        assert "hinted_pages" in st["balloon"], st
        _report("hinting on", m, in_use)
        assert m.ram_transferred <= TARGET_RATIO * in_use, (
            "RAM transferred %d MiB > %.1f x in-use %d MiB (hint rounds %d, stop %r)" % (
                m.ram_transferred >> 20, TARGET_RATIO, in_use >> 20,
                st["balloon"]["hint_rounds"], stop))
        if "off" in MEASURED:
            assert m.ram_transferred < MEASURED["off"] / 2, (
                "hinting sent %d MiB, without it %d MiB" % (
                    m.ram_transferred >> 20, MEASURED["off"] >> 20))
        _still_works_on_destination(vm)
