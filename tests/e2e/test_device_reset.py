"""A device that needs a reset, through stock QEMU 7.2 (TCG).

`blimp.balloon.inject=bad_next` makes the guest publish one inflate buffer whose
descriptor has VRING_DESC_F_NEXT set and `next` = the queue size. QEMU 7.2 then
calls virtio_error ("Desc next is 128"): the device is broken (it pops nothing
more) and, on the modern interface (VIRTIO_F_VERSION_1), sets
DEVICE_NEEDS_RESET and raises a configuration interrupt. The guest must report
it, reset the device, re-inflate every page it holds and reach the target again
(on_reset=recover, the default), or exit with 0x18 (on_reset=stop).
"""

from __future__ import annotations

from blimp import exitcodes
from guest import MiB, PAGE

MODERN_ONLY = ["disable-legacy=on"]
HELD = 64 * MiB
BAD_NEXT = "blimp.balloon.inject=bad_next"


def test_bad_next_reset_and_recover(balloon_vm):
    """QEMU breaks on the malformed chain and asks for a reset; the guest resets it,
    re-inflates what it held (acknowledged or in flight), reaches the target, and
    query-balloon, the guest's state and the agent's held memory all agree."""
    with balloon_vm(machine="q35", balloon_opts=MODERN_ONLY, append=BAD_NEXT) as vm:
        vm.check("alloc %d 1313" % HELD)
        since = vm.mark()
        r = vm.resize(256 * MiB, timeout=90)
        inj = vm.wait_event("inject", since=since, timeout=5)
        assert inj["what"] == "bad_next", inj
        nr = vm.wait_event("device_needs_reset", since=since, timeout=5)
        assert nr["action"] == "recover" and nr["status"] & 0x40, nr
        rs = vm.wait_event("balloon_reset", since=since, timeout=5)
        # everything the guest held when QEMU broke goes to the fresh device again
        assert rs["reinflate_pages"] == nr["held_pages"] + nr["inflight_deflate"], (nr, rs)
        assert rs["reinflate_pages"] > 0, rs
        vm.wait_event("balloon_reinflated", since=since, timeout=5)
        st = vm.check_balloon(256 * MiB)
        assert st["balloon"]["resets"] == 1, st["balloon"]
        assert st["balloon"]["reinflate_pending_pages"] == 0, st["balloon"]
        err = vm.qemu.stderr
        assert "Desc next is" in err, "QEMU did not report the malformed chain:\n" + err
        print("QEMU:", " | ".join(l for l in err.splitlines() if "Desc next" in l))
        vm.verify(pages=HELD // PAGE)
        # and the device works on: deflate, inflate again, back to zero
        vm.resize(64 * MiB)
        vm.check_balloon(64 * MiB)
        vm.resize(0)
        vm.check_balloon(0)
        vm.verify(pages=HELD // PAGE)
        assert not vm.events("violation") and not vm.events("balloon_stalled")
        assert len(vm.events("device_needs_reset")) == 1
        vm.quit()
        print("reset and recovery: target reached in %s ms (guest)" % r.guest_ms)


def test_bad_next_on_reset_stop(balloon_vm):
    """on_reset=stop: the guest reports that the device needs a reset and exits 0x18."""
    with balloon_vm(machine="q35", balloon_opts=MODERN_ONLY,
                    append=BAD_NEXT + " blimp.balloon.on_reset=stop") as vm:
        vm.balloon.set_size(128 * MiB)
        vm.qemu.wait(timeout=60)
        out = vm.qemu.outcome
        assert out.kind == exitcodes.GUEST and out.code == exitcodes.DEVICE_NEEDS_RESET, (
            out.describe() + "\n" + vm.context())
        nr = vm.events("device_needs_reset")
        assert len(nr) == 1 and nr[0]["action"] == "stop", nr
        assert not vm.events("balloon_reset")
        assert "Desc next is" in vm.qemu.stderr


def test_bad_next_legacy_device_is_a_stall(balloon_vm):
    """The legacy interface has no DEVICE_NEEDS_RESET: QEMU marks the device broken but
    sets no status bit (virtio_error does that for VERSION_1 devices only), so the
    guest can only see a device that stopped answering: a stall, no reset."""
    with balloon_vm(machine="pc", balloon_opts=["disable-modern=on"],
                    append=BAD_NEXT + " blimp.balloon.timeout_ms=500") as vm:
        assert vm.features["transport"] == "virtio-pci-legacy", vm.features
        since = vm.mark()
        vm.balloon.set_size(64 * MiB)
        st = vm.wait_event("balloon_stalled", since=since, timeout=30)
        assert st["inflight_inflate"] > 0, st
        assert "Desc next is" in vm.qemu.stderr
        assert not vm.events("device_needs_reset") and not vm.events("balloon_reset")
        b = vm.state()["balloon"]
        assert b["state"] == "stalled" and b["resets"] == 0, b
