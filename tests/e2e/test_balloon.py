"""End-to-end tests of blimp's virtio balloon driver against real QEMU (TCG).

Each test boots blimp in balloon mode (no blimp.mode option) with a
virtio-balloon-pci device and the agent on COM2 (blimp.session.BalloonSession),
drives the balloon over QMP (blimp.balloon) and checks the guest through the agent
(blimp.agent): query-balloon reaches every target, the guest's own state
agrees, deflating gives back every page, memory the guest holds stays intact,
QEMU's RSS falls when touched memory is ballooned, guest stats reach QEMU,
deflate-on-OOM works exactly when negotiated, and impossible or changing
targets neither hang nor crash the guest.

Sizes below are *balloon* sizes (RAM - QMP value).
"""

from __future__ import annotations

import re
import time

import pytest

import guest
from blimp import exitcodes
from guest import GiB, MiB, PAGE

MODERN = "virtio-pci-modern"
LEGACY = "virtio-pci-legacy"

# (id, device properties, kernel command line, transport the guest must pick)
TRANSPORTS = [
    ("modern", [], "", MODERN),
    ("legacy-dev", ["disable-modern=on"], "", LEGACY),
    ("legacy-opt", [], "blimp.virtio=legacy", LEGACY),
]
TUNED = "blimp.balloon.pfns=1024 blimp.balloon.buffers=16"
ROUNDTRIP = [(m, t) for m in ("pc", "q35") for t in TRANSPORTS] + [
    ("q35", ("modern-1024x16", [], TUNED, MODERN)),
    ("pc", ("legacy-dev-1024x16", ["disable-modern=on"], TUNED, LEGACY)),
    ("q35", ("legacy-opt-1024x16", [], TUNED + " blimp.virtio=legacy", LEGACY)),
]
STEPS = [128 * MiB, 384 * MiB, 640 * MiB, 256 * MiB, 0]
HELD = 64 * MiB          # what the agent holds (with a seed) through the whole run
# pages the balloon may use for its own records (mm/blocklist.c) while it holds pages
RECORD_SLACK = 64


def _id(p):
    machine, (name, _, _, _) = p
    return "%s-%s" % (machine, name)


# ------------------------------------------------------------ inflate / deflate

@pytest.mark.parametrize("machine,transport", ROUNDTRIP, ids=[_id(p) for p in ROUNDTRIP])
def test_inflate_deflate_roundtrip(balloon_vm, machine, transport):
    """Inflate step by step and back to 0: query-balloon reaches each target, the
    guest's state agrees, held memory verifies after every step, and deflating to 0
    gives the allocator back every page."""
    name, dev_opts, append, want_transport = transport
    with balloon_vm(machine=machine, balloon_opts=dev_opts, append=append) as vm:
        assert vm.features["transport"] == want_transport, (
            "guest chose %r, expected %r\n%s" % (vm.features["transport"], want_transport,
                                                  vm.context()))
        st0 = vm.state()
        assert st0["balloon"]["actual_pages"] == 0 and st0["held"]["pages"] == 0
        a = vm.check("alloc %d 4242" % HELD)
        assert a["pages"] == HELD // PAGE
        st1 = vm.state()
        free1 = st1["mm"]["free_pages"]
        # the agent's blocklist takes a record page or two on top of the data
        want = st0["mm"]["free_pages"] - HELD // PAGE
        assert want - 4 <= free1 <= want, (st0, st1)
        for size in STEPS:
            r = vm.resize(size, timeout=60)
            st = vm.check_balloon(size)
            pages = size // PAGE
            free = st["mm"]["free_pages"]
            assert free1 - pages - RECORD_SLACK <= free <= free1 - pages, (
                "balloon %d MiB: free_pages %d, expected %d - %d (- <=%d record pages)\n%s" % (
                    size >> 20, free, free1, pages, RECORD_SLACK, vm.context()))
            vm.verify(pages=HELD // PAGE)
            # the guest reports reaching it on serial, too (after the previous step's report)
            assert r.reached is not None and r.reached["actual_pages"] == pages, r
            assert isinstance(r.guest_ms, int), r.reached
            assert r.seconds < 30
        st_end = vm.state()
        assert st_end["mm"]["free_pages"] == free1, (
            "after deflating to 0 the allocator has %d free pages, %d before inflating: "
            "%d pages lost\n%s" % (st_end["mm"]["free_pages"], free1,
                                   free1 - st_end["mm"]["free_pages"], vm.context()))
        b = st_end["balloon"]
        assert b["inflate_buffers"] > 0 and b["deflate_buffers"] > 0
        targets = [e["target_pages"] for e in vm.events("balloon_target")]
        assert targets[-len(STEPS):] == [s // PAGE for s in STEPS], targets
        vm.check("free all")
        assert vm.state()["mm"]["free_pages"] == st0["mm"]["free_pages"]
        vm.check_no_violation()
        vm.quit()


# ------------------------------------------------------------ host memory

@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_rss_falls_when_touched_memory_is_ballooned(balloon_vm, machine):
    """The guest touches 768 MiB (held 64 MiB + 704 MiB allocated and freed) of a
    1 GiB guest; inflating a 768 MiB balloon must then give at least 400 MiB back
    to the host (QEMU's VmRSS).  Pigeonhole: of the ~958 MiB the guest has free,
    704 MiB were touched, so at least 704 + 768 - 958 = 514 MiB of the balloon are
    touched pages, whichever pages the guest picks."""
    with balloon_vm(machine=machine) as vm:
        vm.check("alloc %d 77" % HELD)
        big = vm.check("alloc 704M 5", timeout=120)
        vm.check("free %d" % big["id"])
        rss_before = vm.balloon.rss()
        assert rss_before >= 700 * MiB, "guest touched 768 MiB but QEMU RSS is %d MiB" % (
            rss_before >> 20)
        vm.resize(768 * MiB)
        vm.check_balloon(768 * MiB)
        rss_after = vm.balloon.rss()
        drop = rss_before - rss_after
        assert drop >= 400 * MiB, (
            "QEMU RSS fell by only %d MiB (%d -> %d MiB) after inflating 768 MiB of touched "
            "memory\n%s" % (drop >> 20, rss_before >> 20, rss_after >> 20, vm.context()))
        vm.verify(pages=HELD // PAGE)
        vm.resize(0)
        vm.verify(pages=HELD // PAGE)
        # the guest can use (and we can verify) all that memory again
        r = vm.check("alloc 768M 6", timeout=120)
        vm.verify(str(r["id"]), pages=768 * MiB // PAGE)
        vm.quit()


# ------------------------------------------------------------ guest statistics

def test_guest_stats(balloon_vm):
    """guest-stats after setting guest-stats-polling-interval: total ~ guest RAM,
    free <= total and following allocations and inflation, last-update set."""
    with balloon_vm(machine="q35", memory="1G") as vm:
        bal = vm.balloon
        bal.enable_stats(1)
        s0 = bal.wait_stats(timeout=10)
        st = s0["stats"]
        total, free = st["stat-total-memory"], st["stat-free-memory"]
        assert s0["last-update"] > 0
        assert 1 * GiB - 16 * MiB <= total <= 1 * GiB, "stat-total-memory %d" % total
        assert 0 < free <= total, "stat-free-memory %d, total %d" % (free, total)
        assert st["stat-available-memory"] == free
        # blimp sends all 10 tags; what it has not got is 0, not QEMU's "unset" (2^64-1)
        for k in ("stat-swap-in", "stat-swap-out", "stat-major-faults", "stat-minor-faults",
                  "stat-disk-caches", "stat-htlb-pgalloc", "stat-htlb-pgfail"):
            assert st[k] == 0, "%s = %r" % (k, st[k])
        guest_state = vm.state()
        assert total == guest_state["mm"]["total_pages"] * PAGE
        assert free == guest_state["mm"]["free_pages"] * PAGE

        vm.check("alloc 100M 3")
        s1 = bal.wait_stats(timeout=10, pred=lambda s: s["stats"]["stat-free-memory"] != free)
        free1 = s1["stats"]["stat-free-memory"]
        # 100 MiB of data plus the agent's record page(s)
        assert 100 * MiB <= free - free1 <= 100 * MiB + 4 * PAGE, (
            "free fell by %d bytes after alloc 100M" % (free - free1))
        assert s1["last-update"] >= s0["last-update"]

        vm.resize(256 * MiB)
        s2 = bal.wait_stats(timeout=10, pred=lambda s: s["stats"]["stat-free-memory"] != free1)
        free2 = s2["stats"]["stat-free-memory"]
        assert 256 * MiB <= free1 - free2 <= 256 * MiB + RECORD_SLACK * PAGE, (
            "free fell by %d bytes after a 256 MiB inflation" % (free1 - free2))
        assert s2["stats"]["stat-total-memory"] == total
        assert vm.state()["balloon"]["stats_updates"] >= 2
        bal.enable_stats(0)
        vm.verify()
        vm.quit()


# ------------------------------------------------------------ deflate on OOM

OOM_CASES = [
    ("on", ["deflate-on-oom=on"], "", True),
    ("device-off", ["deflate-on-oom=off"], "", False),
    ("kernel-off", ["deflate-on-oom=on"], "blimp.balloon.deflate_on_oom=0", False),
    ("on-legacy", ["deflate-on-oom=on", "disable-modern=on"], "", True),
]


@pytest.mark.parametrize("case", OOM_CASES, ids=[c[0] for c in OOM_CASES])
def test_deflate_on_oom(balloon_vm, case):
    """1 GiB guest, 768 MiB balloon, then `alloc 512M`: with DEFLATE_ON_OOM
    negotiated the guest takes memory back from the balloon (telling the host) and
    succeeds; without it the allocation fails cleanly and the balloon stays."""
    name, dev_opts, append, negotiated = case
    with balloon_vm(machine="q35", balloon_opts=dev_opts, append=append) as vm:
        assert bool(vm.accepted & guest.F_DEFLATE_ON_OOM) == negotiated, (
            "DEFLATE_ON_OOM accepted=%#x, expected negotiated=%s\n%s" % (
                vm.accepted, negotiated, vm.context()))
        vm.check("alloc %d 31" % HELD)
        vm.resize(768 * MiB)
        vm.check_balloon(768 * MiB)
        before = vm.mark()
        r = vm.cmd("alloc 512M 32", timeout=120)
        if negotiated:
            assert r.get("ok") is True, "alloc 512M failed despite DEFLATE_ON_OOM: %r\n%s" % (
                r, vm.context())
            ev = vm.wait_event("balloon_oom_deflate", timeout=10, since=before)
            assert ev["pages"] > 0
            size = vm.balloon_size()
            assert size < 768 * MiB, "balloon still %d MiB after OOM deflate" % (size >> 20)
            # 1022 MiB managed - 64 held - 512 allocated: at most ~446 MiB can stay ballooned
            assert size <= 450 * MiB, "balloon %d MiB: the 512 MiB did not come from it" % (
                size >> 20)
            st = vm.state()
            assert st["balloon"]["oom_deflated_pages"] >= ev["pages"]
            # The guest re-inflates whatever the allocation left above its reserve, so host
            # and guest views agree once that settles (a page or two may still move).
            deadline = time.time() + 5
            while st["balloon"]["actual_pages"] * PAGE != vm.balloon_size():
                assert time.time() < deadline, (
                    "guest actual %d pages never matched query-balloon %d bytes\n%s" % (
                        st["balloon"]["actual_pages"], vm.balloon_size(), vm.context()))
                time.sleep(0.05)
                st = vm.state()
            vm.verify()          # both allocations intact
            # memory freed again: the guest re-inflates to the host's target
            vm.check("free %d" % r["id"])
            vm.balloon.wait_size(768 * MiB, timeout=30)
            vm.check_balloon(768 * MiB)
        else:
            assert r.get("ok") is False and "out of memory" in r.get("error", ""), (
                "alloc 512M should fail cleanly without DEFLATE_ON_OOM: %r\n%s" % (
                    r, vm.context()))
            assert not vm.events("balloon_oom_deflate"), vm.context()
            vm.check_balloon(768 * MiB)
            assert vm.state()["balloon"]["oom_deflated_pages"] == 0
            vm.check("ping")
        vm.verify(pages=HELD // PAGE)     # only the first allocation is left
        vm.resize(0)
        vm.check_balloon(0)
        vm.check_no_violation()
        vm.quit()


# ------------------------------------------------------------ host first

HOST_FIRST = [("q35-modern", "q35", []), ("pc-legacy-dev", "pc", ["disable-modern=on"]),
              ("microvm-mmio", "microvm", [])]


@pytest.mark.parametrize("start_mode", ["paused", "immediate"])
@pytest.mark.parametrize("name,machine,dev_opts", HOST_FIRST, ids=[c[0] for c in HOST_FIRST])
def test_target_before_the_guest_runs(balloon_vm, name, machine, dev_opts, start_mode):
    """Hosts do not wait for the guest.  "paused" is libvirt's start: QEMU -S, the target
    set over QMP, then cont; "immediate" sets it while the guest is still bringing up its
    driver and interrupts.  Either way the guest reaches the target (query-balloon and its
    balloon_reached agree), then follows the next one, and deflating gives every page
    back."""
    early = 192 * MiB
    with balloon_vm(machine=machine, memory="512M", balloon_opts=dev_opts,
                    start_mode=start_mode, start_target=early) as vm:
        if start_mode == "paused":
            vm.cont()
        r = vm.wait_balloon(early, timeout=30)
        assert r.reached is not None and r.reached["actual_pages"] == early // PAGE, r
        st = vm.check_balloon(early)
        assert st["balloon"]["target_pages"] == early // PAGE
        vm.resize(64 * MiB, timeout=30)
        vm.check_balloon(64 * MiB)
        vm.resize(0, timeout=30)
        vm.check_balloon(0)
        vm.check_no_violation()
        vm.quit()


# ------------------------------------------------------------ impossible target

@pytest.mark.parametrize("machine,dev_opts", [("q35", []), ("pc", ["disable-modern=on"])],
                         ids=["q35-modern", "pc-legacy-dev"])
def test_target_beyond_guest_memory(balloon_vm, machine, dev_opts):
    """QMP balloon value=1 MiB (balloon 1023 MiB, more than the guest can give):
    the guest inflates what it can, logs balloon_exhausted, keeps answering, and
    deflating to 0 afterwards gives everything back."""
    with balloon_vm(machine=machine, balloon_opts=dev_opts) as vm:
        vm.check("alloc %d 9" % HELD)
        free1 = vm.state()["mm"]["free_pages"]
        before = vm.mark()
        vm.balloon.set_guest_size(1 * MiB)
        ev = vm.wait_event("balloon_exhausted", timeout=60, since=before)
        assert ev["target_pages"] <= (1 * GiB) // PAGE
        # it settles: query-balloon stops moving, near everything the guest had free
        last, stable_since = None, time.monotonic()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            size = vm.balloon_size()
            if size != last:
                last, stable_since = size, time.monotonic()
            elif time.monotonic() - stable_since > 0.5:
                break
            time.sleep(0.01)
        assert time.monotonic() < deadline, "balloon never settled\n" + vm.context()
        assert vm.check("ping")["ok"]
        st = vm.state()
        b = st["balloon"]
        assert b["state"] == "running", vm.context()
        assert b["actual_pages"] * PAGE == last
        assert b["actual_pages"] >= free1 - 1024, (
            "only %d of %d free pages ballooned" % (b["actual_pages"], free1))
        assert st["mm"]["free_pages"] < 1024
        assert vm.running()
        vm.verify(pages=HELD // PAGE)
        vm.resize(0)
        vm.check_balloon(0)
        assert vm.state()["mm"]["free_pages"] == free1
        vm.verify(pages=HELD // PAGE)
        vm.check_no_violation()
        vm.quit()


# ------------------------------------------------------------ changing targets

def _change_mid_flight(vm, start: int, first: int, second: int, in_flight, tries: int = 4):
    """From a settled balloon of `start` bytes ask for `first`, and once QMP shows it
    moving, for `second`. The guest's balloon_target event for `second` says how far it
    had got; `in_flight(event)` decides whether that was really mid-flight. If the guest
    had already finished, settle back at `start` and try again: the test's premise is
    asserted, never assumed. Returns the event."""
    seen = []
    for _ in range(tries):
        since = vm.mark()
        vm.balloon.set_size(first)
        lo, hi = min(start, first), max(start, first)
        deadline = time.monotonic() + 30
        while not lo < vm.balloon_size() < hi:
            assert time.monotonic() < deadline, "no balloon progress towards %d MiB\n%s" % (
                first >> 20, vm.context())
            time.sleep(0.001)
        vm.balloon.set_size(second)
        ev = vm.wait_event("balloon_target", lambda e: e["target_pages"] == second // PAGE,
                           timeout=30, since=since)
        if in_flight(ev):
            return ev
        seen.append(ev)
        vm.resize(start)
    raise AssertionError("the target never changed mid-flight in %d tries: %r" % (tries, seen))


@pytest.mark.parametrize("machine,dev_opts,append", [
    ("q35", [], ""), ("pc", ["disable-modern=on"], ""),
    ("q35", [], "blimp.balloon.pfns=256 blimp.balloon.buffers=1")],
    ids=["q35-modern", "pc-legacy-dev", "q35-modern-256x1"])
def test_target_changes_mid_flight(balloon_vm, machine, dev_opts, append):
    """768 MiB asked, changed to 128 MiB while inflating (and 0 -> 512 MiB while
    deflating): the balloon settles at the final target, both directions."""
    p768 = 768 * MiB // PAGE
    with balloon_vm(machine=machine, balloon_opts=dev_opts, append=append) as vm:
        vm.check("alloc %d 5" % HELD)
        free1 = vm.state()["mm"]["free_pages"]

        # inflating towards 768 MiB: some pages given or in flight, not all acknowledged
        ev = _change_mid_flight(
            vm, 0, 768 * MiB, 128 * MiB,
            lambda e: 0 < e["actual_pages"] + e["inflight_inflate"] and e["actual_pages"] < p768)
        vm.balloon.wait_size(128 * MiB, timeout=30)
        time.sleep(0.2)                       # settled, not passing through
        vm.check_balloon(128 * MiB)
        targets = [e["target_pages"] for e in vm.events("balloon_target")]
        assert p768 in targets and targets[-1] == (128 * MiB) // PAGE, targets

        # deflating from 768 MiB towards 0: started (pages in flight or some returned), not done
        vm.resize(768 * MiB)
        ev2 = _change_mid_flight(
            vm, 768 * MiB, 0, 512 * MiB,
            lambda e: 0 < e["actual_pages"] and (e["actual_pages"] < p768
                                                 or e["inflight_deflate"] > 0))
        vm.balloon.wait_size(512 * MiB, timeout=30)
        time.sleep(0.2)
        vm.check_balloon(512 * MiB)
        vm.verify(pages=HELD // PAGE)
        vm.resize(0)
        assert vm.state()["mm"]["free_pages"] == free1
        vm.check_no_violation()
        vm.quit()
        print("changed mid-inflate at %r, mid-deflate at %r" % (ev, ev2))


# ------------------------------------------------------------ no device

NO_DEVICE = [guest.Spec(image, machine, "128M", "", timeout=30.0, tag="balloon-mode")
             for image, machine in (("pvh", "q35"), ("mb1", "pc"), ("pvh", "microvm"))]


@pytest.mark.parametrize("spec", NO_DEVICE, ids=[s.id for s in NO_DEVICE])
def test_no_balloon_device_error_line(boot):
    """Balloon mode without a device: QEMU status 47 and the documented error line
    (the same runs as test_boot.py's test_balloon_mode_without_device)."""
    guest.check_exit(boot, exitcodes.NO_BALLOON_DEVICE)
    assert boot.status == 47
    assert any(re.match(r"^blimp: error: no usable virtio balloon device found", l)
               for l in boot.lines), boot.context()


# ------------------------------------------------------------ the command line tools

def _blimp_py(images, pytestconfig, *argv, timeout=240):
    import os
    import subprocess
    import sys
    cmd = [sys.executable, "-u", "-m", "blimp"] + list(argv) + [
        "--kernel", images["pvh"], "--accel", pytestconfig.getoption("accel")]
    env = dict(os.environ, PYTHONPATH=guest.TOOLS)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)


def test_cli_demo(images, pytestconfig):
    """`python3 -m blimp demo` (what `./blimp demo` runs) goes through all its steps and exits 0."""
    r = _blimp_py(images, pytestconfig, "demo")
    out = r.stdout
    assert r.returncode == 0, "demo failed (%d):\n%s\n%s" % (r.returncode, out, r.stderr)
    assert out.rstrip().endswith("blimp demo: OK"), out
    for i in range(1, 9):
        assert "== %d. " % i in out, "step %d missing:\n%s" % (i, out)
    assert "guest| balloon: virtio-pci-modern" in out, out
    assert re.search(r"inflate\s+512 MiB\s+512 MiB\s+512 MiB", out), out
    assert re.search(r"deflate\s+0 MiB\s+0 MiB\s+1024 MiB", out), out
    m = re.search(r"with the balloon at 512 MiB: ([\d.]+) MiB returned to the host", out)
    assert m and float(m.group(1)) >= 256, "RSS hardly fell:\n" + out
    assert "every word intact" in out and "QEMU status 33" in out


def test_cli_balloon_targets_and_json(images, pytestconfig):
    r = _blimp_py(images, pytestconfig, "balloon", "-m", "1G", "--pfns", "1024",
                  "--buffers", "16", "--touch", "512M", "768M", "128M", "0", "--json")
    assert r.returncode == 0, "%s\n%s" % (r.stdout, r.stderr)
    last = r.stdout.strip().splitlines()[-1]
    import json
    j = json.loads(last)
    assert [s["target"] for s in j["steps"]] == [768 * MiB, 128 * MiB, 0]
    assert all(s["seconds"] > 0 for s in j["steps"])
    assert "blimp.balloon.pfns=1024 blimp.balloon.buffers=16" in j["append"]


def test_cli_balloon_unreachable_target_fails_fast(images, pytestconfig):
    t0 = time.monotonic()
    r = _blimp_py(images, pytestconfig, "balloon", "-m", "256M", "255M")
    assert r.returncode == 1, "%s\n%s" % (r.stdout, r.stderr)
    assert "no more memory to give" in r.stderr, r.stderr
    assert time.monotonic() - t0 < 60


# ------------------------------------------------------------ backed memory first

def test_inflate_and_allocation_take_backed_memory_first(balloon_vm):
    """A 2 GiB guest touches and frees 1.5 GiB, then inflates 512 MiB and deflates it:
    those 512 MiB come back unbacked (the host dropped them).  Inflating 512 MiB again
    must take memory the host still backs -- not the just-deflated pages -- so QEMU's
    RSS falls by >= 0.95 MiB per MiB ballooned; and an allocation afterwards must use
    backed memory too, so QEMU's RSS hardly grows."""
    size = 512 * MiB
    with balloon_vm(memory="2G") as vm:
        big = vm.check("alloc 1536M 5", timeout=120)
        vm.check("free %d" % big["id"])
        for cycle in range(2):
            rss0 = vm.balloon.rss()
            vm.resize(size)
            vm.check_balloon(size)
            ratio = (rss0 - vm.balloon.rss()) / size
            assert ratio >= 0.95, (
                "cycle %d: RSS fell by %.2f MiB per MiB ballooned (want >= 0.95)\n%s"
                % (cycle, ratio, vm.context()))
            vm.resize(0)
        rss0 = vm.balloon.rss()
        a = vm.check("alloc 256M 8", timeout=60)
        grew = vm.balloon.rss() - rss0
        assert grew <= 16 * MiB, (
            "allocating 256 MiB after a deflate grew QEMU's RSS by %d MiB: it used memory "
            "the host had dropped\n%s" % (grew >> 20, vm.context()))
        vm.verify(str(a["id"]), pages=256 * MiB // PAGE)
        vm.check_no_violation()
        vm.quit()


# ------------------------------------------------------------ page poison

F_PAGE_POISON = 1 << 4


@pytest.mark.parametrize("append,accepted", [
    ("blimp.poison=1", True),
    ("blimp.poison=0", False),
    ("blimp.poison=1 blimp.poison_pattern=0x0123456789abcdef", False)],
    ids=["poison", "no-poison", "pattern-not-32-bit"])
def test_page_poison_accepted_only_when_poisoning(balloon_vm, append, accepted):
    """QEMU 7.2 offers PAGE_POISON by default. The guest accepts it only when it really
    poisons free pages with a pattern poison_val can describe, and then keeps its poison
    through inflate, deflate and reuse (no mismatch)."""
    with balloon_vm(append=append) as vm:
        assert vm.features["offered"] & F_PAGE_POISON
        assert bool(vm.accepted & F_PAGE_POISON) == accepted, vm.features
        if "0x0123456789abcdef" in append:
            assert any("PAGE_POISON declined" in l for l in vm.qemu.lines), vm.context()
        vm.resize(512 * MiB)
        vm.resize(0)
        r = vm.check("alloc 768M 4", timeout=120)   # reuses the deflated pages
        vm.verify(str(r["id"]), pages=768 * MiB // PAGE)
        assert not [l for l in vm.qemu.lines if l.startswith("poison mismatch")], vm.context()
        vm.check_no_violation()
        vm.quit()
