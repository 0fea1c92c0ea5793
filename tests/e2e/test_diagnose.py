"""blimp.diagnose: a silent guest is diagnosed, not just timed out.

The first half parses text captured from QEMU 7.2 (tests/e2e/diagnose_samples/: `info
registers`, `info lapic` and x-query-virtio-status of real runs, TCG, q35):
 * idle-*: a guest in balloon mode asleep in `sti; hlt`, nothing pending;
 * lost-*: the lost wake-up of the issue "Never lose a wake-up", captured before its fix
   (QEMU started with -S, a balloon target set, `cont`: the guest halted with interrupts on
   while QEMU held the device's ISR at 0x1, never woken);
 * stress-*: a stress-mode guest in its storm (interrupts off) with the balloon's vector
   50 requested in the local APIC's IRR.

The second half freezes real guests on purpose and checks the verdict: paused by QMP stop,
never started (-S), spinning with interrupts off (blimp.test.hold busy-waits with them off),
asleep waiting for the host, QEMU stopped by SIGSTOP (QMP silent), QEMU ended; and the
session's own timeouts carry the verdict.  A lasting lost wake-up cannot be produced on a
fixed kernel: the agent's lose-irq masks the device's line, but the guest's bounded look
(every 100 ms, no boot option turns it off) finds the work within 100 ms, before the
diagnosis's two samples 0.5 s apart could agree; so that verdict is checked on the samples.
"""

from __future__ import annotations

import json
import os
import signal

import pytest

from blimp import diagnose as dg
from blimp.session import SessionError
from guest import MiB

SAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "diagnose_samples")


def _sample(name: str) -> str:
    with open(os.path.join(SAMPLES, name), newline="") as f:
        return f.read()


# ------------------------------------------------------------ parsing (no QEMU)

def test_parse_registers_halted_with_interrupts_on():
    r = dg.parse_registers(_sample("idle-info_registers.txt"))
    assert r is not None
    assert (r.rip, r.rflags, r.halted, r.interrupts_on) == (0x10AD85, 0x202, True, True)


def test_parse_registers_running_with_interrupts_off():
    r = dg.parse_registers(_sample("stress-info_registers.txt"))
    assert r is not None
    assert (r.rip, r.rflags, r.halted, r.interrupts_on) == (0x1136D4, 0x46, False, False)
    assert r.describe() == "RIP 0x1136d4, RFLAGS 0x46 (IF=0), not halted (HLT=0)"


def test_parse_registers_rejects_other_text():
    assert dg.parse_registers("Error: no CPU\r\n") is None
    assert dg.parse_registers("") is None


def test_parse_lapic():
    idle = dg.parse_lapic(_sample("idle-info_lapic.txt"))
    assert idle is not None and idle.irr == [] and idle.isr == []
    busy = dg.parse_lapic(_sample("stress-info_lapic.txt"))
    assert busy is not None and busy.irr == [50] and busy.isr == [] and busy.level == [50]
    assert busy.describe() == "local APIC IRR 50(level), ISR (none)"
    assert dg.parse_lapic("dumping local APIC state for CPU 0\r\n") is None


def _judged(regs: str, lapic: str, isr, cpu: float) -> dg.Diagnosis:
    r = dg.parse_registers(_sample(regs))
    d = dg.Diagnosis(verdict="", case="", registers=[r, r], lapic=dg.parse_lapic(_sample(lapic)),
                     device_isr=list(isr), cpu_percent=cpu)
    dg.judge(d)
    return d


def test_verdict_lost_wakeup_from_captured_state():
    status = json.loads(_sample("lost-x-query-virtio-status.json"))
    d = _judged("lost-info_registers.txt", "lost-info_lapic.txt", [status["isr"]] * 2, 2.0)
    assert d.case == "lost-wakeup", d
    assert d.verdict == ("guest halted with interrupts on while the device has an interrupt "
                         "pending (ISR 0x1): lost wake-up")


def test_verdict_waiting_for_the_host():
    d = _judged("idle-info_registers.txt", "idle-info_lapic.txt", [0, 0], 1.0)
    assert d.case == "waiting"
    assert d.verdict == "guest halted with interrupts on, device ISR 0: waiting for the host"


def test_verdict_one_pending_isr_sample_is_not_a_lost_wakeup():
    """The ISR set in one sample only is a guest that took its interrupt in between."""
    d = _judged("idle-info_registers.txt", "idle-info_lapic.txt", [1, 0], 1.0)
    assert d.case == "waiting", d


def test_verdict_spinning():
    d = _judged("stress-info_registers.txt", "stress-info_lapic.txt", [0, 0], 97.4)
    assert d.case == "spinning"
    assert d.verdict == "guest spinning at RIP 0x1136d4 (RFLAGS.IF=0, QEMU using 97% of a core)"


def test_verdict_requested_vector_while_asleep():
    """Halted with interrupts on and a vector in the IRR: the CPU should have taken it."""
    d = _judged("idle-info_registers.txt", "stress-info_lapic.txt", [0, 0], 1.0)
    assert d.case == "lost-wakeup"
    assert "local APIC has vector 50(level) requested (IRR): lost wake-up" in d.verdict


class _DeadQmp:
    """A Qemu whose process lives (this test's own pid) and whose QMP never answers."""
    proc = object()
    pid = os.getpid()
    lines = ['{"event":"irq","mode":"intx"}', "balloon: waiting by intx"]

    def running(self) -> bool:
        return True

    def qmp(self, timeout: float = 10.0):
        from blimp.qmp import QMPTimeout
        raise QMPTimeout("no QMP message within the timeout")


def test_diagnose_never_raises_and_names_a_dead_qmp():
    d = dg.diagnose(_DeadQmp(), sample_s=0.05)
    assert d.case == "qmp-dead", d
    assert d.verdict.startswith("QEMU not answering QMP (process state "), d.verdict
    assert d.last_event == '{"event":"irq","mode":"intx"}'
    assert "QMP query-status: QMPTimeout" in d.report()


def test_diagnose_survives_a_broken_qemu_object():
    d = dg.diagnose(object())
    assert d.case == "unknown" and "diagnosis failed" in d.report(), d


# ------------------------------------------------------------ real frozen guests

def test_paused_by_qmp_stop(balloon_vm):
    with balloon_vm(memory="256M", append="blimp.mode=balloon blimp.irq=poll") as vm:
        vm.wait_ready()
        vm.qemu.qmp().execute("stop")
        d = vm.diagnose()
        assert (d.case, d.verdict) == ("paused", "VM paused (status paused)"), d.report()
        # the guest's last event before the stop (which one depends on the guest's timing)
        assert d.last_event is not None, d.report()
        assert json.loads(d.last_event) == vm.qemu.events()[-1], d.report()
        vm.cont()
        vm.quit()


def test_never_started(balloon_vm):
    """start_mode="paused" is QEMU -S: the guest has not run an instruction."""
    with balloon_vm(memory="256M", start_mode="paused") as vm:
        d = vm.diagnose()
        assert (d.case, d.verdict) == ("paused", "VM paused (status prelaunch)"), d.report()
        assert d.last_event is None
        with pytest.raises(SessionError, match="the VM is paused"):
            vm.features
        vm.cont()
        assert vm.transport.startswith("virtio-pci"), vm.features
        vm.quit()


def test_spinning_with_interrupts_off(balloon_vm):
    """blimp.test.hold=driver_ok busy-waits with interrupts off after DRIVER_OK: a target
    set meanwhile is not reached, and the session's timeout says why."""
    with balloon_vm(memory="256M", append="blimp.test.hold=driver_ok:30000",
                    start_target=64 * MiB) as vm:
        vm.wait_event("hold", lambda e: e["step"] == "driver_ok", timeout=30)
        with pytest.raises(SessionError) as err:
            vm.wait_balloon(64 * MiB, timeout=1.0)
        e = err.value
        assert e.diagnosis is not None and e.diagnosis.case == "spinning", e
        assert "; guest spinning at RIP 0x" in e.reason and "RFLAGS.IF=0, QEMU using" in e.reason
        assert e.diagnosis.cpu_percent is not None and e.diagnosis.cpu_percent > 25, e.context
        assert all(not r.halted and not r.interrupts_on for r in e.diagnosis.registers)
        assert e.context.startswith("diagnosis: guest spinning"), e.context


def test_real_lost_wakeup(balloon_vm):
    """A real lost wake-up: the guest's own look is turned off (blimp.irq.look_ms=0, tests
    only) and its line masked behind its back (agent lose-irq), so the target's config
    interrupt never arrives and the guest sleeps on with the device's ISR set. The session's
    timeout must say exactly that (this is the freeze every early target caused before the
    fix, captured in diagnose_samples/)."""
    with balloon_vm(memory="256M", append="blimp.irq.look_ms=0") as vm:
        assert vm.wait_event("irq", timeout=30)["look_ms"] == 0
        assert vm.check("lose-irq")["missed"] == 0
        vm.balloon.set_size(64 * MiB)
        with pytest.raises(SessionError) as err:
            vm.wait_balloon(64 * MiB, timeout=2.0)
        e = err.value
        assert e.diagnosis is not None and e.diagnosis.case == "lost-wakeup", e
        assert "guest halted with interrupts on while the device has an interrupt pending " \
               "(ISR 0x" in e.reason and e.reason.endswith("): lost wake-up"), e.reason
        vm.quit()


def test_asleep_waiting_for_the_host(balloon_vm):
    """An event that never comes from an idle guest: asleep, nothing pending."""
    with balloon_vm(memory="256M") as vm:
        vm.wait_event("irq", timeout=30)
        with pytest.raises(SessionError) as err:
            vm.wait_event("balloon_reached", lambda e: e["actual_pages"] == 12345, timeout=1.0)
        e = err.value
        assert e.reason.endswith("; guest halted with interrupts on, device ISR 0: waiting "
                                 "for the host"), e.reason
        assert e.diagnosis.cpu_percent is not None and e.diagnosis.cpu_percent < 50, e.context
        vm.quit()


def test_qemu_not_answering(balloon_vm):
    """QEMU stopped by SIGSTOP: QMP is silent, and the process state says why."""
    with balloon_vm(memory="256M") as vm:
        vm.wait_ready()
        os.kill(vm.qemu.pid, signal.SIGSTOP)
        try:
            d = vm.diagnose()
        finally:
            os.kill(vm.qemu.pid, signal.SIGCONT)
        assert d.case == "qmp-dead", d.report()
        assert d.verdict.startswith("QEMU not answering QMP (process state T (stopped)"), d.verdict
        vm.quit()


def test_qemu_ended(balloon_vm):
    with balloon_vm(memory="256M") as vm:
        vm.quit()
        d = vm.diagnose()
        assert d.case == "ended", d.report()
        assert d.verdict.startswith("QEMU ended: guest exit 0x10"), d.verdict
        assert '"exit"' in (d.last_event or ""), d.report()


def test_conform_timeout_is_diagnosed(images, pytestconfig, tmp_path):
    """The conformance runner's hard per-configuration timeout says why the guest went
    quiet: here it spins in its bring-up with interrupts off (blimp.test.hold)."""
    from blimp import conform
    cfg = conform.Config(name="q35-modern-hold", machine="q35", transport="modern",
                         append=("blimp.test.hold=driver_ok:30000",))
    res = conform.run_config(cfg, kernel=images["pvh"], accel=pytestconfig.getoption("accel"),
                             out_dir=str(tmp_path), timeout=4.0)
    assert res.status == conform.FAIL, res.reasons
    assert res.reasons[0] == "no exit within 4 s (hard per-configuration timeout)", res.reasons
    assert res.reasons[1].startswith("diagnosis: guest spinning at RIP 0x"), res.reasons
    assert "RFLAGS.IF=0" in res.reasons[1] and '"step":"driver_ok"' in res.reasons[1], res.reasons
