"""Every detector a user relies on fires when what it protects is broken.

Each test damages something on purpose — held memory through the agent's
``corrupt`` command, a selftest stamp or a poisoned free page through
``blimp.inject=`` — and checks that the guest reports it, with the exact
address.  If a detector is hollowed out (made to always pass), these fail.
"""

from __future__ import annotations

import re

import pytest

from blimp import exitcodes
import guest
from guest import MiB, PAGE, Spec


def _pattern(addr: int, seed: int) -> int:
    """The agent's fill pattern (docs/agent.md)."""
    return ((addr * 0x9E3779B97F4A7C15) ^ seed) & (2**64 - 1)


# ------------------------------------------------------------ agent verify

def test_verify_reports_corrupted_held_memory(balloon_vm):
    with balloon_vm(machine="q35", memory="512M") as vm:
        a = vm.check("alloc %d 7" % (16 * MiB))
        pages = a["pages"]
        assert pages == 16 * MiB // PAGE
        vm.verify(pages=pages)

        first = vm.check("corrupt %d 100 5" % a["id"])
        second = vm.check("corrupt %d 3000" % a["id"])
        for c in (first, second):
            assert c["addr"] % 8 == 0 and c["now"] == c["was"] ^ (2**64 - 1), c
            assert c["was"] == _pattern(c["addr"], 7), "corrupt read an unpatterned word: %r" % c
        assert first["addr"] % PAGE == 5 * 8 and second["addr"] % PAGE == 0

        r = vm.cmd("verify %d" % a["id"])
        assert r["ok"] is False, "verify missed two corrupted words: %r\n%s" % (r, vm.context())
        assert r["bad_pages"] == 2 and r["pages"] == pages, r
        # verify walks pages in the same order corrupt counts them: page 100 comes first
        assert r["first_bad"] == first["addr"], r
        assert r["found"] == first["now"], r

        # rewriting the pattern repairs it; verify agrees again
        vm.check("touch %d" % a["id"])
        vm.verify(pages=pages)
        vm.check_no_violation()
        vm.quit()


def test_corrupt_rejects_bad_arguments(balloon_vm):
    with balloon_vm(machine="q35", memory="256M") as vm:
        a = vm.check("alloc 8K")
        for line in ("corrupt", "corrupt %d" % a["id"], "corrupt 99 0", "corrupt all 0",
                     "corrupt %d 2" % a["id"], "corrupt %d 0 512" % a["id"], "corrupt x 0"):
            r = vm.cmd(line)
            assert r["ok"] is False and r["cmd"] == "corrupt" and r["error"], (line, r)
        vm.verify(pages=2)
        vm.quit()


# ------------------------------------------------------------ selftest stamps

def _injected_address(boot, what: str) -> int:
    """The address the guest's one `# injected: <what> 0x...` line names."""
    found = [m.group(1) for m in (re.search(re.escape(what) + r" (0x[0-9a-f]+)", l)
                                  for l in boot.lines) if m]
    assert len(found) == 1, "expected one %r injection line\n%s" % (what, boot.context())
    return int(found[0], 16)


STAMP = [Spec("pvh", "q35", "128M", "blimp.mode=selftest blimp.inject=stamp", timeout=60.0,
              tag="inject-stamp")]


@pytest.mark.parametrize("spec", STAMP, ids=[s.id for s in STAMP])
def test_selftest_stamp_check_fires(boot):
    guest.check_exit(boot, exitcodes.TEST_FAILURES)
    injected = _injected_address(boot, "injected: overwrote the stamp of page")
    tap = boot.tap()
    stamp = [r for r in tap.results if r.description.startswith("every page holds its own stamp")]
    assert len(stamp) == 1, "no stamp result\n" + boot.context()
    assert not stamp[0].ok, "the stamp check passed over a damaged page\n" + boot.context()
    assert "(1 bad; first at %#x " % injected in stamp[0].description, stamp[0]
    # only that check failed, and the summary says so
    assert [r.description for r in tap.failed] == [stamp[0].description]
    assert tap.summary[1] == 1


# ------------------------------------------------------------ poison

POISON = [Spec("pvh", "q35", "128M", "blimp.mode=selftest blimp.poison=1", timeout=60.0,
               tag="poison-present"),
          Spec("pvh", "q35", "128M",
               "blimp.mode=selftest blimp.poison=1 blimp.poison_pattern=0x0123456789abcdef",
               timeout=60.0, tag="poison-pattern"),
          Spec("pvh", "q35", "128M", "blimp.mode=selftest blimp.poison=1 blimp.inject=poison",
               timeout=60.0, tag="inject-poison")]


def _result(boot, prefix):
    found = [r for r in boot.tap().results if r.description.startswith(prefix)]
    assert len(found) == 1, "no TAP result %r\n%s" % (prefix, boot.context())
    return found[0]


@pytest.mark.parametrize("spec", POISON[:2], ids=[s.id for s in POISON[:2]])
def test_poison_is_really_written(boot):
    """With blimp.poison=1 every free page starts with the pattern: if poisoning
    were silently off, free memory would read zero and this would fail."""
    guest.check_exit(boot, exitcodes.SUCCESS)
    present = _result(boot, "free pages hold the poison pattern")
    assert present.ok and present.directive is None, present
    m = re.search(r"\((\d+) pages, 0 without", present.description)
    assert m and int(m.group(1)) > 20000, present   # nearly all of 128 MiB is free
    clean = _result(boot, "no poison mismatches")
    assert clean.ok and clean.directive is None, clean


@pytest.mark.parametrize("spec", POISON[2:], ids=[s.id for s in POISON[2:]])
def test_poison_check_fires(boot):
    guest.check_exit(boot, exitcodes.TEST_FAILURES)
    addr = _injected_address(boot, "injected: overwrote the word at")
    # the allocator names the damaged word when the page is allocated ...
    mismatches = [l for l in boot.lines if l.startswith("poison mismatch at ")]
    assert len(mismatches) == 1, "expected one mismatch line\n" + boot.context()
    assert mismatches[0].startswith("poison mismatch at %#x: expected 0xaaaaaaaaaaaaaaaa found "
                                    "0x5555555555555555" % addr), mismatches[0]
    # ... and the selftest fails on it, with the address
    verdict = _result(boot, "no poison mismatches")
    assert not verdict.ok and ("(1; latest at %#x)" % addr) in verdict.description, verdict
    assert [r.description for r in boot.tap().failed] == [verdict.description]


NOPOISON = [Spec("pvh", "q35", "128M", "blimp.mode=selftest blimp.poison=0", timeout=60.0,
                 tag="poison-off")]


@pytest.mark.parametrize("spec", NOPOISON, ids=[s.id for s in NOPOISON])
def test_poison_checks_skip_when_off(boot):
    guest.check_exit(boot, exitcodes.SUCCESS)
    for prefix in ("free pages hold the poison pattern", "no poison mismatches"):
        r = _result(boot, prefix)
        assert r.directive == "SKIP" and "blimp.poison=0" in r.description + r.reason, r
