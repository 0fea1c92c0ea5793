"""blimp against the reference host: QEMU 7.2 with the balloon patch in
tools/reference-host (chunked inflate, docs/chunked-inflate.md, and
MUST_TELL_HOST behind device properties).

The host is built (or found in its cache) once per session by the
`reference_qemu` fixture; a failed build fails these tests, it never skips them.
"""

from __future__ import annotations

import time

import pytest

from blimp import refhost
from guest import MiB, PAGE

HELD = 64 * MiB


def _accepted(vm) -> int:
    return int(vm.features["accepted"])


def _offered(vm) -> int:
    return int(vm.features["offered"])


@pytest.mark.parametrize("machine,dev_opts", [
    ("q35", []), ("pc", ["disable-modern=on"])], ids=["q35-modern", "pc-legacy"])
def test_chunked_inflate_and_deflate(balloon_vm, reference_qemu, machine, dev_opts):
    """Chunks negotiated (on the legacy interface too: bit 23 fits in 32 bits); QMP
    targets reached with a handful of buffers; QEMU's RSS falls by the ballooned
    amount of touched memory; held data intact; everything comes back."""
    with balloon_vm(machine=machine, balloon_opts=[refhost.CHUNKS] + dev_opts,
                    qemu=reference_qemu) as vm:
        assert _offered(vm) & refhost.F_X_CHUNKS, "the reference host did not offer bit 23"
        assert _accepted(vm) & refhost.F_X_CHUNKS, "the guest declined chunks: %r" % vm.features
        vm.check("alloc %d 31" % HELD)
        big = vm.check("alloc 704M 5", timeout=120)          # touch, then give back
        vm.check("free %d" % big["id"])
        rss_before = vm.balloon.rss()
        assert rss_before >= 700 * MiB, "QEMU RSS %d MiB after touching 768 MiB" % (
            rss_before >> 20)

        r = vm.resize(768 * MiB)
        vm.check_balloon(768 * MiB)
        st = vm.state()["balloon"]
        # 768 MiB of buddy blocks are a few dozen chunks at most: a few buffers, where
        # PFN arrays of 256 would take 768 of them
        assert st["inflate_buffers"] <= 8, st
        drop = rss_before - vm.balloon.rss()
        # of ~958 MiB free, 704 MiB were touched: at least 514 MiB of the balloon are
        assert drop >= 400 * MiB, "QEMU RSS fell by only %d MiB\n%s" % (drop >> 20, vm.context())
        vm.verify(pages=HELD // PAGE)

        vm.resize(200 * MiB)                                  # partial deflate splits blocks
        vm.check_balloon(200 * MiB)
        vm.resize(0)
        vm.check_balloon(0)
        assert vm.state()["balloon"]["deflate_buffers"] <= 8
        vm.verify(pages=HELD // PAGE)
        again = vm.check("alloc 768M 6", timeout=120)        # all of it usable again
        vm.verify(str(again["id"]), pages=768 * MiB // PAGE)
        vm.check_no_violation()
        vm.quit()
        print("768 MiB by chunks: guest %s ms" % r.guest_ms)


@pytest.mark.parametrize("dev_opts", [[refhost.MUST_TELL_HOST],
                                      [refhost.MUST_TELL_HOST, refhost.CHUNKS]],
                         ids=["pfns", "chunks"])
def test_must_tell_host_offered_and_honoured(balloon_vm, reference_qemu, dev_opts):
    """Stock QEMU never offers MUST_TELL_HOST; the patched device does. The guest
    accepts it and deflates (telling the host before any reuse: the unit tests'
    device model proves the ordering page by page); held data stays intact."""
    with balloon_vm(balloon_opts=dev_opts, qemu=reference_qemu) as vm:
        assert _offered(vm) & refhost.F_MUST_TELL_HOST
        assert _accepted(vm) & refhost.F_MUST_TELL_HOST, vm.features
        vm.check("alloc %d 9" % HELD)
        for size in (512 * MiB, 128 * MiB, 640 * MiB, 0):
            vm.resize(size)
            vm.check_balloon(size)
        vm.verify(pages=HELD // PAGE)
        st = vm.state()["balloon"]
        assert st["deflate_buffers"] > 0 and st["actual_pages"] == 0, st
        vm.check_no_violation()
        vm.quit()


def test_guest_that_declines_chunks(balloon_vm, reference_qemu):
    """blimp.balloon.chunks=0 on the patched host: PFN arrays, as on any host."""
    with balloon_vm(balloon_opts=[refhost.CHUNKS], append="blimp.balloon.chunks=0",
                    qemu=reference_qemu) as vm:
        assert _offered(vm) & refhost.F_X_CHUNKS
        assert not _accepted(vm) & refhost.F_X_CHUNKS, vm.features
        vm.check("alloc %d 3" % HELD)
        vm.resize(256 * MiB)
        vm.check_balloon(256 * MiB)
        # PFN arrays of at most 256 pages: at least 256 buffers for 256 MiB
        assert vm.state()["balloon"]["inflate_buffers"] >= 256 * MiB // PAGE // 256
        vm.resize(0)
        vm.verify(pages=HELD // PAGE)
        vm.check_no_violation()
        vm.quit()


def test_chunked_guest_on_stock_qemu(balloon_vm):
    """Stock QEMU 7.2 does not offer bit 23: the guest falls back to PFN arrays."""
    with balloon_vm() as vm:
        assert not _offered(vm) & refhost.F_X_CHUNKS
        assert not _accepted(vm) & refhost.F_X_CHUNKS
        vm.resize(256 * MiB)
        vm.check_balloon(256 * MiB)
        assert vm.state()["balloon"]["inflate_buffers"] >= 256
        vm.resize(0)
        vm.quit()


BAD_CHUNKS = {
    "chunk_align": "is empty or not 4 KiB-aligned",
    "chunk_overlap": "overlaps or precedes the previous chunk",
    "chunk_outside": "is not inside one guest RAM region",
    "chunk_writable": "chunk buffer has device-writable descriptors",
}


@pytest.mark.parametrize("what", sorted(BAD_CHUNKS))
def test_reference_host_rejects_bad_chunk(balloon_vm, reference_qemu, what):
    """The guest sends one bad chunk on purpose (blimp.balloon.inject): the reference
    host names the rule it breaks, acknowledges nothing from that buffer, and asks for a
    reset (QEMU's virtio_error: DEVICE_NEEDS_RESET); the guest reports it, resets the
    device, re-sends what it held (well-formed now: the damage is done once) and reaches
    the target."""
    with balloon_vm(balloon_opts=[refhost.CHUNKS], qemu=reference_qemu,
                    append="blimp.balloon.inject=%s blimp.balloon.timeout_ms=300" % what) as vm:
        since = vm.mark()
        vm.balloon.set_size(64 * MiB)
        inj = vm.wait_event("inject", timeout=10, since=since)
        assert inj["what"] == what, inj
        nr = vm.wait_event("device_needs_reset", timeout=10, since=since)
        assert nr["actual_pages"] == 0, ("the host acknowledged pages of a rejected buffer",
                                         nr)
        deadline = time.monotonic() + 5
        while BAD_CHUNKS[what] not in vm.qemu.stderr and time.monotonic() < deadline:
            time.sleep(0.05)
        err = vm.qemu.stderr
        assert "virtio-balloon: chunk" in err and BAD_CHUNKS[what] in err, (
            "QEMU did not report the bad chunk (%s)\n%s" % (what, vm.context()))
        if what != "chunk_writable":
            assert "(addr %#x" % inj["addr"] in err, err
        vm.wait_event("balloon_reinflated", timeout=30, since=since)
        vm.wait_event("balloon_reached", lambda e: e["actual_pages"] == 64 * MiB // 4096,
                      timeout=30, since=since)
        vm.check_balloon(64 * MiB)
