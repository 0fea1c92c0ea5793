"""`./blimp conform` end to end: the conformance runner (tools/blimp/conform.py) against
blimp's conformance mode (kernel/conform/) through real QEMU 7.2 and the reference host.

* the quick matrix passes, and its JUnit XML has one suite per configuration with the
  counts of the guest's TAP;
* a runner that lies about the host's memory (`--fault rss-flat`) makes B1 fail as
  acked-not-discarded: the configuration fails, the exit status is 1, JUnit carries it;
* the reference host misbehaving on purpose fails the check that watches for it: used
  lengths as QEMU before 7.0 wrote them (x-used-len-bytes-read=on) fail D20, a host that
  acknowledges inflated pages without discarding them (x-no-discard=on) fails B1, and so on
  for every host bug the reference host has on purpose (HOST_FAULTS).
Each failing case has a passing twin in the quick matrix (same machine and transport, no
fault or quirk), so the failures come from the fault, not from the configuration.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from blimp import conform, guestlog

from guest import REPO, TOOLS


def _run(args, tmp_path, pytestconfig, images, reference_qemu, timeout=400):
    junit = tmp_path / "junit.xml"
    env = dict(os.environ, PYTHONPATH=TOOLS, BLIMP_REFERENCE_QEMU=reference_qemu)
    argv = [sys.executable, "-m", "blimp", "conform", "--kernel", images["pvh"],
            "--accel", pytestconfig.getoption("accel"), "--junit", str(junit),
            "--tap-dir", str(tmp_path / "tap")] + args
    p = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=timeout * pytestconfig.getoption("timeout_scale"))
    out = "argv: %s\nstatus %d\n%s\n%s" % (" ".join(argv), p.returncode, p.stdout, p.stderr)
    root = ET.parse(str(junit)).getroot() if junit.exists() else None
    return p.returncode, root, out


def _suites(root):
    return {s.get("name"): s for s in root.findall("testsuite")}


def _failures(suite):
    return {tc.get("name").split()[0]: tc.find("failure")
            for tc in suite.findall("testcase") if tc.find("failure") is not None}


def test_quick_matrix_passes(tmp_path, pytestconfig, images, reference_qemu):
    status, root, out = _run(["--matrix", "quick", "-j", "2"], tmp_path, pytestconfig, images,
                             reference_qemu)
    assert status == 0, out
    assert root is not None, out
    suites = _suites(root)
    assert sorted(suites) == sorted(conform.QUICK), out
    for name, s in suites.items():
        tap = (tmp_path / "tap" / (name + ".tap")).read_text()
        points, plan, summary = conform.parse_points(tap.splitlines())
        assert plan and len(points) == plan and summary[0] == plan, (name, tap)
        cases = s.findall("testcase")
        assert int(s.get("tests")) == len(cases) == plan, (name, out)
        assert int(s.get("failures")) == 0 and int(s.get("errors")) == 0, (name, out)
        skipped = sum(1 for tc in cases if tc.find("skipped") is not None)
        assert int(s.get("skipped")) == skipped >= summary[2], (name, out)
        ids = [tc.get("name").split()[0] for tc in cases]
        assert "B1" in ids and "D1" in ids, (name, ids)
        assert all(tc.get("classname") == name for tc in cases)
        assert "TAP version 14" in s.find("system-out").text
    assert int(root.get("tests")) == sum(int(s.get("tests")) for s in suites.values())
    assert "configurations: %d, passed" % len(conform.QUICK) in out, out


def test_isolated_pages_above_4g(tmp_path, pytestconfig, images, reference_qemu):
    """A 6 GiB q35 guest isolates a second block above 4 GiB whose 32-bit alias is memory it
    holds and watches (conform_layout), D4 conforms naming both blocks, and stock QEMU 7.2
    passes (a host truncating PFN << 12 to 32 bits would destroy the alias: D4 fails)."""
    name = "q35-modern-min-" + conform.HIGH_RAM
    status, root, out = _run(["--only", name], tmp_path, pytestconfig, images, reference_qemu)
    assert status == 0, out
    serial = (tmp_path / "tap" / (name + ".serial.log")).read_text().splitlines()
    layouts = [e for e in (guestlog.event_named(l, "conform_layout") for l in serial) if e]
    assert len(layouts) == 1, out
    areas = layouts[0]["areas"]
    low = [a for a in areas if a["base"] < 1 << 32]
    high = [a for a in areas if a["base"] >= 1 << 32]
    assert len(low) == 1 and len(high) == 1, layouts
    assert high[0]["alias32"] == high[0]["base"] & 0xffffffff, layouts
    assert layouts[0]["target"] == layouts[0]["isolated"] - 64 > high[0]["pages"] // 2
    (suite,) = root.findall("testsuite")
    d4 = [tc for tc in suite.findall("testcase") if tc.get("name").startswith("D4 ")]
    assert d4 and d4[0].find("failure") is None, out
    tap = (tmp_path / "tap" / (name + ".tap")).read_text()
    assert "(above 4 GiB) inflated and deflated" in tap, tap


def test_pfn_32bit_host_fails_d4(tmp_path, pytestconfig, images, reference_qemu):
    """A host that computes the guest address of a PFN in 32 bits (the reference host's
    x-pfn-32bit=on: it discards (pfn << 12) & 0xffffffff) destroys the 32-bit alias of an
    isolated page above 4 GiB: D4 fails naming the alias. Its passing twin is
    test_isolated_pages_above_4g (and on 128 MiB the property changes nothing)."""
    status, root, out = _run(["--qemu", reference_qemu, "--machine", "q35", "--transport",
                              "modern", "--memory", conform.HIGH_RAM, "--device-opts",
                              "x-pfn-32bit=on," + ",".join(conform.FEATURE_SETS["min"][0])],
                             tmp_path, pytestconfig, images, reference_qemu)
    assert status == 1, out
    (suite,) = root.findall("testsuite")
    fails = _failures(suite)
    assert "D4" in fails, out
    message = fails["D4"].get("message")
    assert message.startswith("wrong-page-discarded") and "32-bit alias" in message, out


def test_runner_fault_fails_b1(tmp_path, pytestconfig, images, reference_qemu):
    """The runner reports an RSS that never moves: the guest must call the inflated pages
    acked but not discarded, and the configuration must fail."""
    status, root, out = _run(["--machine", "q35", "--transport", "modern",
                              "--fault", "rss-flat"], tmp_path, pytestconfig, images,
                             reference_qemu)
    assert status == 1, out
    (suite,) = root.findall("testsuite")
    fails = _failures(suite)
    assert "B1" in fails, out
    assert fails["B1"].get("message").startswith("acked-not-discarded"), out
    assert int(suite.get("failures")) == len(fails) >= 1
    assert "FAIL" in out and "B1 (acked-not-discarded)" in out, out


#: the two verdicts no host bug above produces: a host that never acts (timeout) and a
#: device that needs a reset in the middle of a check (the guest sends a malformed chain on
#: purpose; the driver recovers and the check says so)
OTHER_VERDICTS = [
    (["--fault", "stats-ignored", "--append", "blimp.conform.timeout_ms=3000"], "D6", "timeout"),
    (["--append", "blimp.balloon.inject=bad_next"], "D4", "needs-reset"),
]


@pytest.mark.parametrize("argv,check,verdict", OTHER_VERDICTS, ids=["timeout", "needs-reset"])
def test_timeout_and_needs_reset_verdicts(tmp_path, pytestconfig, images, reference_qemu, argv,
                                          check, verdict):
    """A runner that acknowledges stats polling but never starts it makes D6 time out; a
    device that needs a reset during the isolated-page inflate makes D4 say needs-reset."""
    status, root, out = _run(["--machine", "q35", "--transport", "modern"] + argv, tmp_path,
                             pytestconfig, images, reference_qemu)
    assert status == 1, out
    (suite,) = root.findall("testsuite")
    fails = _failures(suite)
    assert check in fails, out
    assert fails[check].get("message").startswith(verdict), out


#: reference-host properties that make a host misbehave (tools/reference-host), and the point
#: that must then fail with its verdict
HOST_FAULTS = [
    ("x-used-len-bytes-read=on", "", "D20", "protocol-violation"),   # QEMU < 7.0's used lengths
    ("x-no-discard=on", "", "B1", "acked-not-discarded"),
    ("x-discard-neighbour=on", "", "D4", "wrong-page-discarded"),
    ("x-write-readable=on", "", "D20", "protocol-violation"),
    ("x-num-pages-be=on", "", "D3", "protocol-violation"),
    ("free-page-reporting=on,x-report-ignore-poison=on", "blimp.poison=1", "D16",
     "protocol-violation"),
]


@pytest.mark.parametrize("props,append,check,verdict", HOST_FAULTS,
                         ids=[h[0].split(",")[-1] for h in HOST_FAULTS])
def test_host_fault_fails_its_check(tmp_path, pytestconfig, images, reference_qemu, props,
                                    append, check, verdict):
    """The reference host misbehaving on purpose (tools/reference-host) fails the check that
    watches for it, and the configuration fails; the same configuration without the
    property passes (shown by hand, and ref-q35-modern-* in the quick matrix)."""
    status, root, out = _run(["--qemu", reference_qemu, "--machine", "q35", "--transport",
                              "modern", "--device-opts", props]
                             + (["--append", append] if append else []),
                             tmp_path, pytestconfig, images, reference_qemu)
    assert status == 1, out
    (suite,) = root.findall("testsuite")
    fails = _failures(suite)
    assert check in fails, out
    assert fails[check].get("message").startswith(verdict), out
