"""Every way blimp boots, each through to a working balloon (QEMU 7.2, TCG).

One matrix: boot path x machine x command-line variant. Each run boots in balloon mode with
a virtio balloon (virtio-balloon-pci; virtio-balloon-device on microvm, over virtio-mmio
version 1 or 2) and the agent, checks the boot event (protocol, the command line intact), the
memory map and the allocator, how the guest waits for the device (interrupts, or polling with
blimp.irq=poll), then inflates and deflates the balloon over QMP.

    -kernel PVH (blimp.elf) and multiboot1 (blimp-mb1.elf): QEMU's own loaders
    GRUB ISO (blimp.images.iso) on SeaBIOS and on OVMF: multiboot2
    blimp.efi (blimp.images.esp, \\EFI\\BOOT\\BOOTX64.EFI) on OVMF: the UEFI handover
    -kernel blimp.bzImage: the Linux boot protocol, through QEMU's option ROM into the
        real-mode setup (E820 from SeaBIOS), then the 32-bit entry with boot_params
    GRUB ISO with `linux blimp.bzImage` on SeaBIOS and OVMF: the 32-bit entry, GRUB's
        boot_params (on OVMF the RSDP comes from the EFI system table it passes)

OVMF runs under TCG only (not under this machine's /dev/kvm); a boot takes 3-5 s.
"""

from __future__ import annotations

import pytest

import guest
from blimp import images, qemu
from blimp.qemu import Qemu
from guest import MiB, PAGE

PATHS = images.BOOT_PATHS
# (path, machine, extra QEMU arguments): microvm's transport is virtio-mmio, version 1 unless
# force-legacy is off (QEMU 7.2).
MMIO_V2 = ["-global", "virtio-mmio.force-legacy=false"]
MATRIX = [("pvh", "pc", []), ("pvh", "q35", []), ("mb1", "pc", []), ("mb1", "q35", []),
          ("grub-bios", "pc", []), ("grub-bios", "q35", []), ("grub-ovmf", "q35", []),
          ("efi", "q35", []), ("efi", "pc", []), ("bzimage", "pc", []), ("bzimage", "q35", []),
          ("grub-linux-bios", "pc", []), ("grub-linux-bios", "q35", []),
          ("grub-linux-ovmf", "q35", []),
          ("pvh", "microvm", []), ("pvh", "microvm", MMIO_V2), ("mb1", "microvm", []),
          ("mb1", "microvm", MMIO_V2)]
# Command-line variants each path runs with: every word must reach the kernel unchanged.
# A new kernel option that must work on every boot path is one more entry here. The value:
# (command line, how the guest must wait for the device: the `irq` event's modes).
TUNED = "blimp.balloon.pfns=512 blimp.balloon.buffers=8"
CMDLINES = {
    "irq": (TUNED, ("intx", "msix")),
    "poll": (TUNED + " blimp.irq=poll", ("poll",)),
}
MEMORY = "1G"
# RAM firmware keeps out of the map: SeaBIOS 513 KiB (guest.RAM_SLACK); OVMF about 6 MiB on
# q35 and pc with 1 GiB (runtime services, ACPI, NVS and reserved areas).
OVMF_RAM_SLACK = 16 * MiB
BALLOON = 256 * MiB


CASES = [(p, m, x, c) for p, m, x in MATRIX for c in CMDLINES]


def _case_id(case):
    path, machine, extra, variant = case
    if machine == "microvm":
        machine += "-mmio2" if extra == MMIO_V2 else "-mmio1"
    return "-".join((path, machine, variant))


@pytest.mark.parametrize("path,machine,extra,variant", CASES, ids=[_case_id(c) for c in CASES])
def test_boot_path_balloon_roundtrip(balloon_vm, build_dir, kernel_bytes, path, machine, extra,
                                     variant):
    cmdline, waits = CMDLINES[variant]
    protocol, ovmf, _ = PATHS[path]
    # "ready": the test reads what the guest printed at bring-up (boot, memmap, buddy) as
    # soon as the session starts, so it needs the guest to have got that far first
    with balloon_vm(machine=machine, memory=MEMORY, timeout=180.0, extra_args=list(extra),
                    start_mode="ready", **images.boot_media(path, cmdline, build_dir)) as vm:
        boot = vm.events("boot")
        assert len(boot) == 1, vm.context()
        assert boot[0]["protocol"] == protocol, (
            "booted via %r, expected %r\n%s" % (boot[0]["protocol"], protocol, vm.context()))
        assert boot[0]["cmdline"] == images.cmdline_seen(path, cmdline), (
            "the command line arrived as %r, sent %r" % (boot[0]["cmdline"], cmdline))
        if protocol == "linux":   # QEMU's option ROM and GRUB take the 32-bit entry
            assert boot[0]["entry_bits"] == 32, boot[0]
        if protocol in ("multiboot2", "uefi") or path == "grub-linux-ovmf":
            # a copy of the firmware's RSDP in the info block, signature and checksum checked
            assert boot[0].get("rsdp", 0) > 0, "no valid RSDP tag: %r" % boot[0]
        mm = vm.events("memmap")[0]
        slack = OVMF_RAM_SLACK if ovmf else guest.RAM_SLACK
        guest.check_memmap_event(mm, machine, 1 << 30, slack)
        guest.check_buddy_event(mm, vm.events("buddy")[0], kernel_bytes["pvh"])

        st0 = vm.state()
        free0 = st0["mm"]["free_pages"]
        assert st0["balloon"]["actual_pages"] == 0
        vm.check("alloc 32M 13")
        r = vm.resize(BALLOON)
        st = vm.check_balloon(BALLOON)
        assert r.reached is not None and r.reached["actual_pages"] == BALLOON // PAGE, r
        assert st["mm"]["free_pages"] <= free0 - (BALLOON + 32 * MiB) // PAGE, st
        vm.verify(pages=32 * MiB // PAGE)
        vm.resize(0)
        vm.check_balloon(0)
        vm.check("free all")
        assert vm.state()["mm"]["free_pages"] == free0, "pages lost over the round trip"
        vm.check_no_violation()
        # The guest waited the way the variant asks, and with interrupts the device's
        # interrupts did the work (no device register was polled while idle is
        # tests/e2e/test_interrupts.py's subject).
        irq = vm.events("irq")
        assert len(irq) == 1 and irq[0]["mode"] in waits, (irq, vm.context())
        if machine == "microvm":
            dev = vm.events("virtio_device")
            want = "virtio-mmio-modern" if extra == MMIO_V2 else "virtio-mmio-legacy"
            assert dev and dev[0]["transport"] == want, dev
        counts = vm.state()["irq"]
        if "poll" in waits:
            assert counts["device"] == 0, counts
        else:
            assert counts["device"] > 0, counts
        vm.quit()


# ------------------------------------------------------------ blimp.efi's command line


def _run(pytestconfig, timeout=60.0, memory="256M", **kw):
    return qemu.run(None, machine="q35", memory=memory, accel="tcg", qmp=False, ovmf=True,
                    timeout=timeout * pytestconfig.getoption("timeout_scale"), **kw)


def test_efi_load_options_win_over_the_file(pytestconfig, build_dir):
    """Started by the UEFI shell (startup.nsh), blimp.efi takes its load options, drops the
    program name the shell puts first, and ignores \\blimp\\cmdline (a selftest decoy)."""
    cmdline = "blimp.mode=boot blimp.poison=0"
    disk = images.esp_shell(cmdline, decoy="blimp.mode=selftest",
                            efi=build_dir + "/blimp.efi")
    q = _run(pytestconfig, disk=disk, timeout=90.0)
    assert q.returncode == 33, q.describe()
    ev = q.events("boot")
    assert len(ev) == 1 and ev[0]["protocol"] == "uefi", q.describe()
    assert ev[0]["cmdline"] == cmdline, q.describe()
    assert any("command line from the load options" in l for l in q.lines), q.describe()


def test_efi_cmdline_too_long_is_refused(pytestconfig, build_dir):
    """A command line the kernel could not hold whole stops blimp.efi before the kernel
    starts, with the size named, and powers the machine off."""
    cmdline = "blimp.mode=boot " + " ".join(["blimp.poison=0"] * 80)   # 1215 bytes
    q = _run(pytestconfig, disk=images.esp(cmdline, efi=build_dir + "/blimp.efi"))
    assert not q.timed_out, q.describe()
    assert q.returncode == 0, q.describe()    # ResetSystem(shutdown) under -no-reboot
    msg = [l for l in q.lines if "blimp.efi: error: command line" in l]
    assert msg and "too long: %d bytes, at most 1023" % len(cmdline) in msg[0], q.describe()
    assert not q.events("boot"), "the kernel started anyway\n" + q.describe()


def test_malformed_multiboot2_block_is_rejected(pytestconfig, build_dir):
    """blimp.efi told to damage the block it hands over (the first tag's size past the
    block's end): the kernel's tag walk refuses it, names the reason and the tag's offset,
    and panics (0x13) before using any of it."""
    disk = images.esp("blimp.mode=boot", efi=build_dir + "/blimp.efi", inject="mb2_tag_size")
    q = _run(pytestconfig, disk=disk)
    assert q.returncode == 39, q.describe()
    assert any("blimp.efi: inject: mb2_tag_size" in l for l in q.lines), q.describe()
    ev = q.events("exit")
    assert ev and ev[-1]["name"] == "panic", q.describe()
    assert "multiboot2 tag size out of bounds" in ev[-1]["reason"], ev[-1]
    assert "offset 8" in ev[-1]["reason"], ev[-1]
    assert not q.events("boot"), "the kernel reported a boot from a rejected block"


def test_linux_64bit_entry(pytestconfig, build_dir, kernel_bytes):
    """The Linux boot protocol's 64-bit entry (code32_start + 0x200, long mode, rsi =
    boot_params; XLF_KERNEL_64): no loader here uses it, so blimp.efi enters that way on
    request (\\blimp\\inject = linux64) with a boot_params of its own making: the E820 map
    from the EFI map, cmd_line_ptr and acpi_rsdp_addr."""
    cmdline = "blimp.mode=boot blimp.poison=0"
    disk = images.esp(cmdline, efi=build_dir + "/blimp.efi", inject="linux64")
    q = _run(pytestconfig, disk=disk, memory="1G")
    assert q.returncode == 33, q.describe()
    assert any("blimp.efi: inject: linux64" in l for l in q.lines), q.describe()
    ev = q.events("boot")
    assert len(ev) == 1 and ev[0]["protocol"] == "linux", q.describe()
    assert ev[0]["entry_bits"] == 64 and ev[0]["cmdline"] == cmdline, ev[0]
    assert ev[0]["rsdp"] > 0, ev[0]
    mm = q.events("memmap")
    guest.check_memmap_event(mm[0], "q35", 1 << 30, OVMF_RAM_SLACK)
    guest.check_buddy_event(mm[0], q.events("buddy")[0], kernel_bytes["pvh"])


def test_efi_without_cmdline_boots_balloon_mode(pytestconfig, build_dir):
    """No load options and no \\blimp\\cmdline: an empty command line, so balloon mode
    (which, without a balloon device, exits 0x17)."""
    q = _run(pytestconfig, disk=images.esp(None, efi=build_dir + "/blimp.efi"))
    assert q.returncode == 47, q.describe()
    ev = q.events("boot")
    assert len(ev) == 1 and ev[0]["cmdline"] == "", q.describe()


# ------------------------------------------------------------ firmware maps, more memory

FIRMWARE_LARGE = [("efi", "6G", "blimp.mode=boot"), ("grub-ovmf", "6G", "blimp.mode=boot"),
                  ("efi", "512M", "blimp.mode=selftest")]


@pytest.mark.parametrize("path,memory,cmdline", FIRMWARE_LARGE,
                         ids=["%s-%s-%s" % (p, m, c.split("=")[1]) for p, m, c in FIRMWARE_LARGE])
def test_ovmf_memory_map_and_allocator(pytestconfig, build_dir, kernel_bytes, path, memory,
                                       cmdline):
    """UEFI maps (fragmented, RAM above 4 GiB on q35 from 2.75 GiB) through the EFI map tag:
    the same split as QEMU's e820, every RAM page but firmware's and the kernel's managed,
    and the allocator's self-test passes on them."""
    from blimp.qemu import parse_memory
    media = images.boot_media(path, cmdline, build_dir)
    q = _run(pytestconfig, timeout=150.0, memory=memory,
             **{k: v for k, v in media.items() if k not in ("kernel", "append", "ovmf")})
    assert q.returncode == 33, q.describe()
    mm = q.events("memmap")
    assert len(mm) == 1, q.describe()
    guest.check_memmap_event(mm[0], "q35", parse_memory(memory), OVMF_RAM_SLACK)
    guest.check_buddy_event(mm[0], q.events("buddy")[0], kernel_bytes["pvh"])
    if "selftest" in cmdline:
        summary = [l for l in q.lines if l.startswith("SUMMARY:")]
        assert summary and " 0 failed" in summary[0], q.describe()


# ------------------------------------------------------------ host side (no QEMU)


def test_firmware_boot_argv(tmp_path):
    iso, disk = tmp_path / "x.iso", tmp_path / "esp.img"
    q = Qemu(None, machine="q35", accel="tcg", cdrom=str(iso), ovmf=True, qmp=False)
    argv = q.argv()
    assert argv[argv.index("-bios") + 1].endswith("OVMF.fd")
    assert argv[argv.index("-cdrom") + 1] == str(iso)
    assert "-kernel" not in argv and "-append" not in argv
    q = Qemu(None, machine="pc", accel="tcg", disk=str(disk), qmp=False)
    argv = q.argv()
    assert "file=%s,format=raw,snapshot=on" % disk in argv and "-bios" not in argv
    with pytest.raises(ValueError):
        Qemu(None, cdrom=str(iso), append="blimp.mode=boot")   # -append needs -kernel
    with pytest.raises(ValueError):
        Qemu(None)


def test_grub_cfg_passes_words_unchanged():
    cfg = images.grub_cfg("blimp.mode=boot  a=$x c=;")
    line = [l for l in cfg.splitlines() if "multiboot2" in l][0]
    assert line.strip() == "multiboot2 /boot/blimp.elf 'blimp.mode=boot' 'a=$x' 'c=;'"
    for bad in ("b='q'", 'b="q"', "b=\\q"):
        with pytest.raises(images.ImageError):
            images.grub_cfg(bad)


def test_serial_cleaning_drops_ovmf_escapes():
    from blimp import guestlog
    raw = '\x1b[2J\x1b[01;01H\x1b[=3h\x1b[2J{"event":"boot","cmdline":""}\r'
    assert guestlog.parse_event(raw) == {"event": "boot", "cmdline": ""}
