"""End-to-end boots of the real blimp images in QEMU (TCG by default).

Each Spec boots once per session (see guest.BootRunner); several tests check
different parts of the same run so a failure names what is wrong.
"""

from __future__ import annotations

import re

import pytest

import guest
from blimp import exitcodes
from guest import Spec

MACHINES = ("pc", "q35", "microvm")
MEMORIES = ("128M", "4G", "6G")
# TCG selftest over all RAM; generous, measured runs are far below (see report)
SELFTEST_TIMEOUT = {"128M": 60.0, "4G": 120.0, "6G": 180.0}

SELFTEST = [Spec(image, machine, mem, "blimp.mode=selftest", timeout=SELFTEST_TIMEOUT[mem])
            for image in ("pvh", "mb1") for machine in MACHINES for mem in MEMORIES]
BOOT = [Spec(image, machine, "128M", "blimp.mode=boot", timeout=30.0)
        for image in ("pvh", "mb1") for machine in MACHINES]


def ids(specs):
    return [s.id for s in specs]


# ------------------------------------------------------------ selftest matrix

@pytest.mark.parametrize("spec", SELFTEST, ids=ids(SELFTEST))
def test_selftest_exits_success(boot):
    guest.check_exit(boot, exitcodes.SUCCESS)
    assert boot.status == 33


@pytest.mark.parametrize("spec", SELFTEST, ids=ids(SELFTEST))
def test_selftest_events_wellformed(boot):
    guest.check_all_events_parse(boot)
    order = [e["event"] for e in boot.events if e["event"] in ("boot", "memmap", "buddy")]
    assert order == ["boot", "memmap", "buddy"], "boot/memmap/buddy events: %r" % order


@pytest.mark.parametrize("spec", SELFTEST, ids=ids(SELFTEST))
def test_selftest_boot_protocol(boot):
    guest.check_boot_event(boot)


@pytest.mark.parametrize("spec", SELFTEST, ids=ids(SELFTEST))
def test_selftest_memmap(boot):
    guest.check_memmap(boot)


@pytest.mark.parametrize("spec", SELFTEST, ids=ids(SELFTEST))
def test_selftest_buddy(boot, kernel_bytes):
    guest.check_buddy(boot, kernel_bytes[boot.spec.image])


@pytest.mark.parametrize("spec", SELFTEST, ids=ids(SELFTEST))
def test_selftest_tap(boot):
    guest.check_tap(boot)


# ------------------------------------------------------------ blimp.mode=boot

@pytest.mark.parametrize("spec", BOOT, ids=ids(BOOT))
def test_mode_boot_ready(boot):
    guest.check_exit(boot, exitcodes.SUCCESS)
    guest.check_boot_event(boot)
    ready = boot.event("ready")
    us = ready.get("boot_us")
    assert isinstance(us, int) and 0 < us < 60_000_000, "implausible boot_us %r" % (us,)
    human = [m for m in (re.match(r"^blimp: ready in (\d+) us\b", l) for l in boot.lines) if m]
    assert len(human) == 1, "expected one 'blimp: ready in N us' line, got %d\n%s" % (
        len(human), boot.context())
    assert int(human[0].group(1)) == us, "human ready line says %s us, event says %d" % (
        human[0].group(1), us)
    names = [e["event"] for e in boot.events]
    assert names.index("ready") > names.index("buddy"), "ready before buddy: %r" % names
    # boot mode exits right after the ready line: no self-test output
    assert boot.tap().results == [], "boot mode ran tests:\n" + boot.context()


# ------------------------------------------------------------ command line errors

# Only our own keys (blimp.*, virtio_mmio.*) are judged; other words are ignored (below).
BAD = [("blimp.mode=nonsense", "blimp.mode"),
       ("blimp.bogus=1", "blimp.bogus"),
       ("blimp.poison", "blimp.poison"),
       ("blimp.poison=2", "blimp.poison"),
       ("virtio_mmio.device=junk", "virtio_mmio.device")]
BAD_SPECS = [Spec(image, machine, "128M", opt, timeout=30.0, tag="bad:" + opt)
             for opt, _ in BAD
             for image, machine in (("pvh", "q35"), ("mb1", "microvm"))]


@pytest.mark.parametrize("spec", BAD_SPECS, ids=ids(BAD_SPECS))
def test_bad_cmdline(boot):
    option = dict(BAD)[boot.spec.append]
    guest.check_exit(boot, exitcodes.BAD_CMDLINE)
    assert boot.status == 37
    errs = boot.events_named("error")
    assert len(errs) == 1, "expected one error event, got %r\n%s" % (errs, boot.context())
    ev = errs[0]
    assert ev.get("kind") == "cmdline", "error kind %r" % ev.get("kind")
    msg = ev.get("message")
    assert isinstance(msg, str) and msg, "error event without a message: %r" % ev
    # the event names the option in its message or in an extra "option" field
    named = option in msg or option in str(ev.get("option", ""))
    assert named, "error event %r does not name the option %r" % (ev, option)
    human = [l for l in boot.lines if l.startswith("blimp: error: ")]
    assert human and any(option in l for l in human), (
        "no 'blimp: error: ...' line naming %r\n%s" % (option, boot.context()))
    assert not boot.events_named("ready"), "reached ready despite a bad command line"


# ------------------------------------------------------------ other VMMs' default words

# What hosts put in front of the user's command line for Linux: kvmtool (unless --nodefaults;
# kvmtool's x86 defaults), Firecracker and cloud-hypervisor. blimp ignores them, lists them
# once, and runs as usual. "bogus=1" and a bare word stand for anything else not ours.
FOREIGN = {
    "kvmtool": "noapic noacpi pci=conf1 reboot=k panic=1 i8042.direct=1 i8042.dumbkbd=1 "
               "i8042.nopnp=1 earlyprintk=serial i8042.noaux=1 console=ttyS0",
    "firecracker": "console=ttyS0 reboot=k panic=1 pci=off bogus=1 quiet",
}
FOREIGN_SPECS = [Spec(image, machine, "128M", words + " blimp.mode=boot", timeout=30.0,
                      tag="foreign-" + host)
                 for host, words in FOREIGN.items()
                 for image, machine in (("pvh", "q35"), ("mb1", "microvm"))]


@pytest.mark.parametrize("spec", FOREIGN_SPECS, ids=ids(FOREIGN_SPECS))
def test_foreign_words_ignored(boot):
    guest.check_exit(boot, exitcodes.SUCCESS)
    guest.check_boot_event(boot)
    foreign = boot.spec.append.split()[:-1]
    ev = boot.events_named("cmdline_ignored")
    assert len(ev) == 1, "expected one cmdline_ignored event\n" + boot.context()
    # the multiboot1 image may also list QEMU's image file name, which comes first
    words = ev[0]["words"]
    assert words[-len(foreign):] == foreign and len(words) - len(foreign) in (0, 1), ev[0]
    human = [l for l in boot.lines if l.startswith("blimp: ignoring foreign kernel arguments: ")]
    assert len(human) == 1 and human[0].endswith(" ".join(foreign)), boot.context()
    assert not boot.events_named("error"), boot.context()
    assert boot.events_named("ready"), boot.context()


# ------------------------------------------------------------ other modes/options

POISON = [Spec("pvh", "q35", "128M", "blimp.mode=selftest blimp.poison=1", timeout=60.0,
               tag="poison"),
          Spec("pvh", "q35", "128M", "blimp.poison=0 blimp.mode=selftest", timeout=60.0,
               tag="nopoison")]


@pytest.mark.parametrize("spec", POISON, ids=ids(POISON))
def test_selftest_poison_option(boot, kernel_bytes):
    guest.check_exit(boot, exitcodes.SUCCESS)
    guest.check_boot_event(boot)
    guest.check_memmap(boot)
    guest.check_buddy(boot, kernel_bytes["pvh"])
    guest.check_tap(boot)


NO_BALLOON = [Spec(image, machine, "128M", "", timeout=30.0, tag="balloon-mode")
              for image, machine in (("pvh", "q35"), ("mb1", "pc"), ("pvh", "microvm"))]


@pytest.mark.parametrize("spec", NO_BALLOON, ids=ids(NO_BALLOON))
def test_balloon_mode_without_device(boot):
    """Default mode needs a virtio balloon; without one: an error and 0x17."""
    guest.check_exit(boot, exitcodes.NO_BALLOON_DEVICE)
    assert boot.status == 47
    assert any(l.startswith("blimp: error") for l in boot.lines), (
        "no error line\n" + boot.context())


MMIO_ARG = [Spec("pvh", "microvm", "128M", "blimp.mode=boot", machine_opts=("acpi=off",),
                 balloon=True, timeout=30.0)]


@pytest.mark.parametrize("spec", MMIO_ARG, ids=ids(MMIO_ARG))
def test_microvm_virtio_mmio_option_accepted(boot):
    """microvm,acpi=off with a virtio-mmio device makes QEMU append
    virtio_mmio.device=512@0xfeb00e00:12 (PVH only); the kernel accepts it."""
    words = guest.cmdline_words(boot)
    assert any(re.match(r"^virtio_mmio\.device=\d+[KkMm]?@0x[0-9a-f]+:\d+$", w) for w in words), (
        "QEMU did not add virtio_mmio.device= (or the kernel dropped it): %r" % words)
    guest.check_exit(boot, exitcodes.SUCCESS)
    guest.check_boot_event(boot)


# ------------------------------------------------------------ tools against a real QEMU

@pytest.mark.parametrize("machine", ["q35", "microvm"])
def test_qmp_controls_real_qemu(images, pytestconfig, machine):
    """QMP on a paused VM with a balloon device: the harness' QMP client, the
    balloon QOM path and QEMU's balloon commands work; then the guest boots."""
    from blimp.qemu import Qemu, balloon_qom_path
    from blimp.qmp import QMPError
    with Qemu(images["pvh"], machine=machine, memory="256M",
              accel=pytestconfig.getoption("accel"), append="blimp.mode=boot",
              balloon=True, balloon_opts=["deflate-on-oom=on"], paused=True,
              timeout=30 * pytestconfig.getoption("timeout_scale")) as q:
        c = q.qmp()
        assert c.execute("query-status")["status"] == "prelaunch"
        assert c.execute("query-balloon") == {"actual": 256 << 20}
        with pytest.raises(QMPError) as ei:
            c.execute("balloon", value=0)
        assert ei.value.error_class == "GenericError"
        assert c.execute("qom-get", path=balloon_qom_path(), property="deflate-on-oom") is True
        stats = c.execute("qom-get", path=balloon_qom_path(), property="guest-stats")
        assert stats["last-update"] == 0
        c.execute("cont")
        assert c.wait_event("RESUME", timeout=5)
        q.wait_for(r"^blimp: ready in \d+ us", timeout=20)
        status = q.wait()
        assert status == 33, q.describe()
