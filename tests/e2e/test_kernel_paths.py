"""Kernel paths outside the boot matrix: the exception handler and the clang-built image."""

import os

import pytest

from blimp.qemu import Qemu


def run(kernel, append, machine="q35", memory="128M", timeout=60):
    q = Qemu(kernel, machine=machine, memory=memory, append=append, qmp=False, timeout=timeout)
    q.start()
    status = q.wait(timeout)
    q.close()
    return q, status


@pytest.mark.parametrize("machine", ["q35", "microvm"])
def test_cpu_exception_is_reported_and_exits_41(images, machine):
    q, status = run(images["pvh"], "blimp.mode=fault", machine=machine)
    assert status == 41, q.describe()
    exc = q.events("exception")
    assert len(exc) == 1, q.serial
    assert exc[0]["vector"] == 14 and exc[0]["name"].startswith("#PF")
    assert exc[0]["cr2"] == 0x7FFF00000000, exc[0]
    assert exc[0]["error_code"] & 0x2, "a write fault must have the W bit in its error code"
    assert any("rip=" in l and "cr2=" in l for l in q.lines), "register dump missing"
    assert q.events("exit")[-1]["name"] == "cpu-exception"


@pytest.mark.parametrize("image", ["blimp.elf", "blimp-mb1.elf"])
def test_clang_image_passes_selftest(build_dir, image):
    path = os.path.join(build_dir, "clang", image)
    assert os.path.isfile(path), "clang image missing: build it with `ninja -f clang.ninja`"
    q, status = run(path, "blimp.mode=selftest", memory="512M")
    assert status == 33, q.describe()
    assert any(l.startswith("SUMMARY:") and " 0 failed" in l for l in q.lines), q.serial


@pytest.mark.parametrize("machine", ["pc", "q35", "microvm"])
def test_without_debug_exit_the_vm_ends_itself(images, machine):
    """No isa-debug-exit (kvmtool, libvirt, Firecracker): after its exit event the guest says
    so and powers off (ACPI S5 from the FADT and the DSDT's \\_S5) or resets the machine
    (0xCF9, the i8042, a triple fault), so QEMU exits by itself, with 0, within seconds."""
    q = Qemu(images["pvh"], machine=machine, append="blimp.mode=boot", qmp=False, timeout=30,
             debug_exit=False)
    assert "isa-debug-exit" not in " ".join(q.argv())
    q.start()
    status = q.wait(30)
    q.close()
    assert not q.timed_out and status == 0, q.describe()
    assert q.t_exit - q.t_start < 15, q.describe()
    ev = q.events()
    assert ev[-1]["event"] == "exit" and ev[-1]["name"] == "success", q.describe()
    assert any("no isa-debug-exit device at port 0xf4 answered" in l for l in q.lines), q.describe()
    if machine != "microvm":   # PIIX4 and ICH9 ACPI: powered off, nothing after S5
        assert any(l.startswith("blimp: ACPI S5 (PM1a_CNT 0x") for l in q.lines), q.describe()
        assert not any("still running after S5" in l or "triple fault" in l
                       for l in q.lines), q.describe()
    else:                      # hardware-reduced ACPI, no 0xCF9 or i8042: the triple fault
        assert any("triple fault" in l for l in q.lines), q.describe()
