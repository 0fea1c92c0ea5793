"""End-to-end tests of the virtio-mmio transport on QEMU 7.2 microvm (TCG).

QEMU's facts these rely on (docs/design.md, "virtio-mmio"): microvm has 24
transports from 0xfeb00000 on GSIs 24.. with ACPI on (the default), 8 on GSIs
5.. with acpi=off; a device takes the top slot; with acpi=off QEMU appends
virtio_mmio.device=512@0xfeb00e00:12 to a PVH command line (not to a multiboot1
one); transports are version 1 unless -global virtio-mmio.force-legacy=false.
So ACPI on exercises the probe, acpi=off + PVH the command-line entry, and
acpi=off + multiboot1 the probe without a known interrupt line.
"""

from __future__ import annotations

import re

import pytest

from blimp import exitcodes
from blimp import qemu
from guest import MiB, PAGE

V2 = ["-global", "virtio-mmio.force-legacy=false"]
TOP_ACPI = 0xFEB02E00      # slot 23 of 24
TOP_NOACPI = 0xFEB00E00    # slot 7 of 8
HELD = 32 * MiB
STEPS = [96 * MiB, 256 * MiB, 64 * MiB, 0]
RECORD_SLACK = 64

# (id, image, machine options, extra QEMU args, transport, source, base, gsi or None)
CASES = [
    ("pvh-acpi-v1", "pvh", (), [], "virtio-mmio-legacy", "probe", TOP_ACPI, 47),
    ("pvh-acpi-v2", "pvh", (), V2, "virtio-mmio-modern", "probe", TOP_ACPI, 47),
    ("pvh-noacpi-v1", "pvh", ("acpi=off",), [], "virtio-mmio-legacy", "cmdline", TOP_NOACPI, 12),
    ("pvh-noacpi-v2", "pvh", ("acpi=off",), V2, "virtio-mmio-modern", "cmdline", TOP_NOACPI, 12),
    ("mb1-acpi-v1", "mb1", (), [], "virtio-mmio-legacy", "probe", TOP_ACPI, 47),
    ("mb1-noacpi-v2", "mb1", ("acpi=off",), V2, "virtio-mmio-modern", "probe", TOP_NOACPI, None),
]


def _device_event(vm) -> dict:
    vm.wait_event("virtio_device", timeout=30)      # a host-first start returns before it
    evs = vm.events("virtio_device")
    assert len(evs) == 1, "expected one virtio_device event, got %r\n%s" % (evs, vm.context())
    return evs[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_mmio_balloon_roundtrip(balloon_vm, case):
    """Found where QEMU put it, with the interrupt line QEMU wired (or none when that
    cannot be known); every QMP target is reached and confirmed by the guest, held
    memory verifies after each step, and deflating to 0 returns every page."""
    _, image, mopts, extra, transport, source, base, gsi = case
    with balloon_vm(machine="microvm", memory="512M", kernel=image, machine_opts=list(mopts),
                    extra_args=extra) as vm:
        assert vm.transport == transport, vm.context()
        dev = _device_event(vm)
        assert dev["transport"] == transport and dev["source"] == source, dev
        assert dev["base"] == base and dev["device_id"] == 5, dev
        if gsi is None:
            assert dev["irq"] == "none" and "gsi" not in dev, dev
        else:
            assert dev["irq"] == "gsi" and dev["gsi"] == gsi, dev
        a = vm.check("alloc %d 4242" % HELD)
        free1 = vm.state()["mm"]["free_pages"]
        for size in STEPS:
            r = vm.resize(size, timeout=60)
            st = vm.check_balloon(size)
            pages = size // PAGE
            free = st["mm"]["free_pages"]
            assert free1 - pages - RECORD_SLACK <= free <= free1 - pages, (st, vm.context())
            assert r.reached is not None and r.reached["actual_pages"] == pages, r
            vm.verify(pages=a["pages"])
        assert vm.state()["mm"]["free_pages"] == free1, vm.context()
        vm.check_no_violation()
        vm.quit()


@pytest.mark.parametrize("extra,transport", [([], "virtio-mmio-legacy"),
                                             (V2, "virtio-mmio-modern")], ids=["v1", "v2"])
def test_mmio_guest_stats(balloon_vm, extra, transport):
    """The stats queue works over virtio-mmio: QEMU's guest-stats follow the guest's
    free memory."""
    with balloon_vm(machine="microvm", memory="512M", extra_args=extra) as vm:
        assert vm.transport == transport
        bal = vm.balloon
        bal.enable_stats(1)
        s0 = bal.wait_stats(timeout=10)
        free = s0["stats"]["stat-free-memory"]
        assert free == vm.state()["mm"]["free_pages"] * PAGE
        vm.check("alloc 64M 3")
        s1 = bal.wait_stats(timeout=10, pred=lambda s: s["stats"]["stat-free-memory"] != free)
        drop = free - s1["stats"]["stat-free-memory"]
        assert 64 * MiB <= drop <= 64 * MiB + 4 * PAGE, drop
        bal.enable_stats(0)
        vm.quit()


def test_mmio_empty_and_missing_entries_are_skipped(balloon_vm):
    """Entries naming an empty transport (slot 0) and an address where no device is
    are skipped with a log line each; the probe still finds the balloon."""
    append = ("virtio_mmio.device=512@0xfeb00000:24 virtio_mmio.device=4K@0xd0000000:5:1")
    with balloon_vm(machine="microvm", memory="256M", append=append) as vm:
        dev = _device_event(vm)
        assert dev["source"] == "probe" and dev["base"] == TOP_ACPI, dev
        out = "\n".join(vm.lines)
        assert "virtio_mmio.device=0x200@0xfeb00000: no device there, skipped" in out, out
        assert "virtio_mmio.device=0x1000@0xd0000000: no device there, skipped" in out, out
        vm.quit()


def test_mmio_entry_given_twice_is_one_device(balloon_vm):
    """acpi=off: the user's entry and QEMU's identical one are one device, not an
    overlap."""
    with balloon_vm(machine="microvm", memory="256M", machine_opts=["acpi=off"],
                    append="virtio_mmio.device=512@0xfeb00e00:12") as vm:
        assert _device_event(vm)["source"] == "cmdline"
        assert any("given twice; using it once" in l for l in vm.lines), vm.context()
        vm.quit()


def _boot(images, pytestconfig, append, machine="microvm", mopts=(), extra=(), balloon=True,
          image="pvh"):
    return qemu.run(images[image], machine=machine, memory="128M",
                    accel=pytestconfig.getoption("accel"), append=append,
                    machine_opts=list(mopts), extra_args=list(extra), balloon=balloon, qmp=False,
                    timeout=30 * pytestconfig.getoption("timeout_scale"))


def _expect_exit(q, code):
    out = q.describe() + "\n" + "\n".join(q.lines[-30:])
    assert q.outcome.kind == exitcodes.GUEST and q.outcome.code == code, out
    return "\n".join(q.lines)


BAD_ENTRIES = [
    ("unaligned", "virtio_mmio.device=512@0xfeb00e02:12", "not 4-byte aligned"),
    ("too-small", "virtio_mmio.device=0x100@0xfeb00e00:12", "smaller than 0x108"),
    ("malformed", "virtio_mmio.device=512:12", "expected <size>@<base>:<irq>"),
    ("irq-hex", "virtio_mmio.device=512@0xfeb00e00:0xc", "irq is not a decimal"),
    ("overlap", "virtio_mmio.device=512@0xfeb00e00:12 virtio_mmio.device=4K@0xfeb00800:13",
     "overlaps the window 0xfeb00e00-0xfeb00fff"),
]


@pytest.mark.parametrize("case", BAD_ENTRIES, ids=[c[0] for c in BAD_ENTRIES])
def test_mmio_bad_entry_is_bad_cmdline(images, pytestconfig, case):
    """A wrong or overlapping entry stops the boot (0x12) with an error naming it."""
    _, append, why = case
    q = _boot(images, pytestconfig, append)
    out = _expect_exit(q, exitcodes.BAD_CMDLINE)
    bad_word = append.split()[-1]
    errs = [e for e in q.events("error") if e.get("kind") == "cmdline"]
    assert len(errs) == 1 and errs[0]["option"] == bad_word, (errs, out)
    assert why in errs[0]["message"], (errs, out)
    assert re.search(r"bad command-line option '%s'" % re.escape(bad_word), out), out


def test_mmio_version_choice(images, pytestconfig):
    """blimp.virtio=modern refuses a version 1 transport (no balloon: 0x17, and the
    log says why); blimp.virtio=legacy takes it."""
    q = _boot(images, pytestconfig, "blimp.virtio=modern")
    out = _expect_exit(q, exitcodes.NO_BALLOON_DEVICE)
    assert "0xfeb02e00: version 1, but blimp.virtio asks for modern (2)" in out, out
    q = _boot(images, pytestconfig, "blimp.virtio=legacy",
              extra=V2)
    out = _expect_exit(q, exitcodes.NO_BALLOON_DEVICE)
    assert "0xfeb02e00: version 2, but blimp.virtio asks for legacy (1)" in out, out


def test_mmio_only_skips_pci_and_does_not_probe_next_to_it(images, pytestconfig):
    """blimp.virtio=mmio on q35 with a PCI balloon: PCI is not used, and the microvm
    window is not probed where PCI functions exist."""
    q = _boot(images, pytestconfig, "blimp.virtio=mmio", machine="q35")
    out = _expect_exit(q, exitcodes.NO_BALLOON_DEVICE)
    assert "PCI functions present: QEMU microvm's window not probed" in out, out
    assert not q.events("virtio_device"), out


def test_mmio_only_on_microvm(balloon_vm):
    with balloon_vm(machine="microvm", memory="256M", append="blimp.virtio=mmio") as vm:
        assert vm.transport == "virtio-mmio-legacy"
        vm.resize(32 * MiB)
        vm.check_balloon(32 * MiB)
        vm.quit()
