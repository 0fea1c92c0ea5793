"""Hosts as they were, on the reference host (tools/reference-host).

* `x-used-len-bytes-read=on`: the device reports the bytes it read as the used
  length of inflate, deflate and stats buffers, as QEMU did before 7.0. The guest
  calls that a deviation per queue (reported once each, counted, not fatal) and
  the balloon works; with blimp.balloon.strict=1 it is a violation (exit 0x15).
* `x-fixed-queue-index=on` with free page reporting: the reporting queue is 4
  (crosvm's numbering until 2025) and queue 3 exists but is not in use. The guest
  names the numbering from the queue sizes and reports through queue 4.
"""

from __future__ import annotations

import time

from blimp import exitcodes, refhost
from guest import MiB, PAGE

HELD = 32 * MiB


def test_old_qemu_used_lengths_are_deviations(balloon_vm, reference_qemu):
    with balloon_vm(balloon_opts=[refhost.USED_LEN_BYTES_READ], qemu=reference_qemu) as vm:
        vm.check("alloc %d 4141" % HELD)
        vm.balloon.enable_stats(1)
        vm.resize(256 * MiB)
        vm.check_balloon(256 * MiB)
        vm.balloon.wait_stats(timeout=10)
        vm.resize(64 * MiB)
        vm.check_balloon(64 * MiB)
        # two stats rounds: QEMU returns the stats buffer every second
        vm.wait_event("device_deviation", lambda e: e["queue"] == "statsq", timeout=15)
        queues = vm.state()["balloon"]["queues"]
        for name in ("inflateq", "deflateq", "statsq"):
            q = queues[name]
            assert q["verdict"] == "deviates" and q["deviations"] >= 1, queues
        devs = vm.events("device_deviation")
        assert sorted(e["queue"] for e in devs) == ["deflateq", "inflateq", "statsq"], devs
        infl = [e for e in devs if e["queue"] == "inflateq"][0]
        assert infl["len"] > 0 and infl["len"] % 4 == 0, infl    # the PFN bytes QEMU read
        assert infl["len"] == infl["buffer_bytes"] and infl["observed"] == "the bytes read", infl
        vm.verify(pages=HELD // PAGE)
        vm.resize(0)
        vm.check_balloon(0)
        vm.check_no_violation()
        vm.quit()


def test_old_qemu_used_lengths_strict(balloon_vm, reference_qemu):
    with balloon_vm(balloon_opts=[refhost.USED_LEN_BYTES_READ], qemu=reference_qemu,
                    append="blimp.balloon.strict=1") as vm:
        vm.balloon.set_size(64 * MiB)
        vm.qemu.wait(timeout=60)
        out = vm.qemu.outcome
        assert out.kind == exitcodes.GUEST and out.code == exitcodes.HOST_PROTOCOL_VIOLATION, (
            out.describe() + "\n" + vm.context())
        v = vm.events("violation")
        assert v and "no device-writable bytes" in v[0]["message"], v


def test_stock_used_lengths_conform(balloon_vm, reference_qemu):
    """Without the property the same host conforms: no deviation anywhere."""
    with balloon_vm(qemu=reference_qemu) as vm:
        vm.resize(128 * MiB)
        vm.resize(0)
        queues = vm.state()["balloon"]["queues"]
        assert all(q["verdict"] == "conforms" for q in queues.values()), queues
        assert not vm.events("device_deviation")
        vm.quit()


def _reporting_works(vm) -> dict:
    big = vm.check("alloc 256M 7", timeout=120)           # touched, then freed: reported
    vm.check("free %d" % big["id"])
    deadline = time.time() + 20
    while time.time() < deadline:
        st = vm.state()["balloon"]
        if st["reported_pages"] >= (200 * MiB) // PAGE:
            return st
        time.sleep(0.2)
    raise AssertionError("reporting did not go through: %r\n%s" % (st, vm.context()))


def test_fixed_queue_numbering_detected(balloon_vm, reference_qemu):
    with balloon_vm(balloon_opts=["free-page-reporting=on", refhost.FIXED_QUEUE_INDEX],
                    qemu=reference_qemu) as vm:
        q = vm.wait_event("balloon_queues", timeout=5)
        assert q["numbering"] == "fixed" and q["used"] == "fixed", q
        assert q["report_index"] == 4, q
        st = _reporting_works(vm)
        assert st["queues"]["reportingq"]["index"] == 4, st
        vm.check_no_violation()
        vm.quit()


def test_negotiated_queue_numbering_detected(balloon_vm, reference_qemu):
    with balloon_vm(balloon_opts=["free-page-reporting=on"], qemu=reference_qemu) as vm:
        q = vm.wait_event("balloon_queues", timeout=5)
        assert q["numbering"] == "negotiated" and q["report_index"] == 3, q
        _reporting_works(vm)
        vm.check_no_violation()
        vm.quit()


def test_fixed_host_with_negotiated_numbering_forced(balloon_vm, reference_qemu):
    """Told to use negotiated numbering on a fixed host, the guest puts reports on
    queue 3, the placeholder: QEMU calls that a driver error and needs a reset."""
    with balloon_vm(balloon_opts=["free-page-reporting=on", refhost.FIXED_QUEUE_INDEX],
                    qemu=reference_qemu,
                    append="blimp.balloon.queues=negotiated blimp.balloon.on_reset=stop") as vm:
        q = vm.wait_event("balloon_queues", timeout=5)
        assert q["numbering"] == "fixed" and q["used"] == "negotiated", q
        big = vm.check("alloc 256M 7", timeout=120)      # freed: a reporting pass follows
        vm.check("free %d" % big["id"])
        vm.qemu.wait(timeout=60)
        assert vm.qemu.outcome.code == exitcodes.DEVICE_NEEDS_RESET, vm.context()
        assert "not in use (x-fixed-queue-index)" in vm.qemu.stderr


def test_bad_next_with_chunks_and_old_used_lengths(balloon_vm, reference_qemu):
    """Reset recovery with chunked buffers on a host that also reports old-style used
    lengths: the chunk arrays are re-sent to the fresh device, the target is reached,
    and the deviation count survives the reset."""
    with balloon_vm(balloon_opts=[refhost.CHUNKS, refhost.USED_LEN_BYTES_READ,
                                  "disable-legacy=on"],
                    qemu=reference_qemu, append="blimp.balloon.inject=bad_next") as vm:
        assert int(vm.features["accepted"]) & refhost.F_X_CHUNKS, vm.features
        vm.check("alloc %d 55" % HELD)
        vm.resize(512 * MiB, timeout=90)
        vm.wait_event("balloon_reset", timeout=5)
        st = vm.check_balloon(512 * MiB)
        assert st["balloon"]["resets"] == 1, st["balloon"]
        assert st["balloon"]["queues"]["inflateq"]["verdict"] == "deviates", st["balloon"]
        vm.resize(0)
        vm.check_balloon(0)
        vm.verify(pages=HELD // PAGE)
        assert "Desc next is" in vm.qemu.stderr
        vm.quit()
