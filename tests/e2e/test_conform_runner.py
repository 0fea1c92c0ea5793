"""Unit tests of the conformance runner (tools/blimp/conform.py) without QEMU: a fake
event stream in the shape docs/conformance.md gives, a fake host, and the JUnit writer."""

from __future__ import annotations

import argparse
import json
import time
import xml.etree.ElementTree as ET

import pytest

from blimp import conform, exitcodes
from blimp.conform import Config, Deviation, Host, Responder, Result
from blimp.session import SessionError

RAM = conform.RAM_BYTES


class FakeHost(Host):
    def __init__(self, rss=(50000, 42000), stats=None):
        self.calls = []
        self.sent = []
        self._rss = list(rss)
        self._stats = stats or {"last-update": 1764600000, "stats": {
            "stat-swap-in": 0, "stat-free-memory": 100 * 4096,
            "stat-total-memory": RAM, "stat-htlb-pgfail": (1 << 64) - 1,
            "stat-disk-caches": -1}}

    def set_balloon_value(self, value):
        self.calls.append(("balloon", value))

    def rss_kib(self):
        self.calls.append(("rss",))
        return self._rss.pop(0) if len(self._rss) > 1 else self._rss[0]

    def set_stats_interval(self, seconds):
        self.calls.append(("stats_interval", seconds))

    def read_stats(self):
        self.calls.append(("stats_read",))
        return self._stats

    def migrate(self):
        self.calls.append(("migrate",))
        return 812

    def send(self, line):
        self.sent.append(line)
        return {"ok": True, "cmd": line.split()[0]}


def req(seq, action, **kw):
    return json.dumps(dict(event="conform_request", seq=seq, action=action, **kw))


def check(n, cid, verdict, detail):
    return json.dumps(dict(event="conform_check", n=n, id=cid, section="5.5.4",
                           title="t", verdict=verdict, detail=detail))


def transcript(failing=False):
    """A guest's console: requests, TAP points with YAML blocks and their events."""
    lines = ['{"event":"virtio_device","transport":"virtio-pci-modern","source":"pci",'
             '"device_id":5,"irq":"none"}',
             "TAP version 14",
             req(1, "target", pages=2048),
             "ok 1 - D1 §5.5.3 the device offers only defined features",
             "  ---", "  verdict: conforms", '  detail: "features 0x1f"', "  ...",
             check(1, "D1", "conforms", "features 0x1f"),
             req(2, "rss"), req(3, "rss"),
             ("not ok" if failing else "ok") + " 2 - B1 blimp: inflated pages discarded",
             "  ---", "  verdict: %s" % ("acked-not-discarded" if failing else "conforms"),
             '  detail: "RSS fell by 0 KiB"', "  ...",
             check(2, "B1", "acked-not-discarded" if failing else "conforms",
                   "RSS fell by 0 KiB"),
             req(4, "stats_interval", seconds=1), req(5, "stats_read"),
             "ok 3 - D7 §5.5.6.3 stats # SKIP declined by blimp.balloon.stats=0",
             "  ---", "  verdict: declined", '  detail: "declined"', "  ...",
             check(3, "D7", "declined", "declined"),
             req(6, "migrate"),
             "1..3",
             "SUMMARY: 3 tests, %d failed, 1 skipped" % (1 if failing else 0),
             '{"event":"conform_summary","tests":3,"failed":%d,"skipped":1}'
             % (1 if failing else 0)]
    return lines


def feed(lines, responder):
    chunks = [lines[i:i + 4] for i in range(0, len(lines), 4)]

    def more(since):
        done = sum(len(c) for c in chunks[:more.i])
        assert since == done
        if more.i >= len(chunks):
            return None
        more.i += 1
        return chunks[more.i - 1]
    more.i = 0
    return conform.pump(more, responder, time.monotonic() + 30)


def test_requests_are_answered():
    host = FakeHost()
    r = Responder(host)
    seen, timed_out = feed(transcript(), r)
    assert seen == len(transcript()) and not timed_out
    assert host.sent == [
        "ack 1", "ack 2 kib=50000", "ack 3 kib=42000", "ack 4",
        "ack 5 last_update=1764600000 free_memory=409600 swap_in=0 total_memory=%d" % RAM,
        "ack 6 ms=812"]
    assert host.calls[0] == ("balloon", RAM - 2048 * 4096)
    assert ("stats_interval", 1) in host.calls
    assert all(ex.error is None for ex in r.exchanges)


def test_unknown_action_and_bad_request_are_nacked():
    host = FakeHost()
    r = Responder(host)
    r.handle({"event": "conform_request", "seq": 7, "action": "teleport"})
    r.handle({"event": "conform_request", "seq": 8, "action": "target"})
    r.handle({"event": "conform_request", "seq": 9, "action": "target", "pages": RAM // 4096})
    assert host.sent[0] == "nack 7 unknown action teleport"
    assert host.sent[1].startswith("nack 8 bad request: KeyError")
    assert host.sent[2].startswith("nack 9 target 32768 pages is outside")
    ex = r.handle({"event": "conform_request", "action": "rss"})
    assert ex.error and ex.answer is None


def test_failed_action_is_a_nack_with_the_reason():
    class Broken(FakeHost):
        def migrate(self):
            raise SessionError("migration failed: destination refused", "more context")
    host = Broken()
    Responder(host).handle({"event": "conform_request", "seq": 3, "action": "migrate"})
    assert host.sent == ["nack 3 migrate failed: migration failed: destination refused"]


def test_faults():
    host = FakeHost(rss=(50000, 42000))
    r = Responder(host, fault="rss-flat")
    for seq in (1, 2):
        r.handle({"seq": seq, "action": "rss"})
    assert host.sent == ["ack 1 kib=50000", "ack 2 kib=50000"]
    host = FakeHost()
    Responder(host, fault="target-off-by-one").handle({"seq": 1, "action": "target",
                                                       "pages": 10})
    assert host.calls == [("balloon", RAM - 11 * 4096)]
    with pytest.raises(ValueError):
        Responder(host, fault="nope")


def test_agent_refusal_is_a_runner_error():
    class Refuses(FakeHost):
        def send(self, line):
            return {"ok": False, "cmd": "ack", "error": "no request 1 pending"}
    r = Responder(Refuses())
    ex = r.handle({"seq": 1, "action": "target", "pages": 1})
    assert "refused" in ex.error


CFG = Config(name="pc-modern-all", machine="pc", transport="modern")


def result(lines, status=0x21, host="qemu-7.2"):
    res = Result(CFG, host, serial=list(lines), outcome=exitcodes.classify(status))
    return res


def test_lost_interrupt_fails_the_configuration():
    """A guest that reports device work no interrupt announced (irq_missed in its summary)
    fails the configuration even when every point passed."""
    lines = transcript()
    lines[-1] = lines[-1].replace('"skipped":1}', '"skipped":1,"irq_mode":"intx","irq_missed":2}')
    r = conform.evaluate(result(lines))
    assert r.status == conform.FAIL, r.reasons
    assert any("2 device event(s) no interrupt announced (irq_missed)" in x for x in r.reasons)


def test_points_joined_with_yaml_and_events():
    points, plan, summary = conform.parse_points(transcript(failing=True))
    assert plan == 3 and summary == (3, 1, 1)
    assert [p.id for p in points] == ["D1", "B1", "D7"]
    assert points[0].yaml == {"verdict": "conforms", "detail": "features 0x1f"}
    assert not points[1].ok and points[1].verdict == "acked-not-discarded"
    assert points[2].skipped and points[2].reason.startswith("declined")
    assert points[1].description == "B1 blimp: inflated pages discarded"
    tap = conform.tap_text(transcript())
    assert tap.startswith("TAP version 14\nok 1 - D1") and tap.endswith("1 skipped\n")
    assert "event" not in tap


def test_evaluate_pass_fail_and_known():
    assert conform.evaluate(result(transcript())).status == conform.PASS
    r = conform.evaluate(result(transcript(failing=True), status=0x23))
    assert r.status == conform.FAIL and [p.id for p in r.unknown_failures] == ["B1"]
    table = [Deviation("qemu-7.2", "B1", "qemu.c:f does x")]
    r = conform.evaluate(result(transcript(failing=True), status=0x23), table)
    assert r.status == conform.DEVIATES and r.passed
    # the reference host inherits the stock host's deviations, not the other way round
    r = conform.evaluate(result(transcript(failing=True), status=0x23, host="reference"),
                         table)
    assert r.status == conform.DEVIATES
    table = [Deviation("reference", "B1", "x")]
    r = conform.evaluate(result(transcript(failing=True), status=0x23), table)
    assert r.status == conform.FAIL
    # a deviation limited to other transports does not apply
    table = [Deviation("qemu-7.2", "B1", "x", transports=("legacy",))]
    assert conform.evaluate(result(transcript(failing=True), status=0x23),
                            table).status == conform.FAIL


def test_evaluate_runner_level_failures():
    r = conform.evaluate(result(transcript(), status=0x2b))           # 0x15
    assert r.status == conform.FAIL and "host-protocol-violation" in r.reasons[0]
    r = conform.evaluate(result(transcript()[:-3]))                    # no plan, no summary
    assert r.status == conform.FAIL and any("no TAP plan" in x for x in r.reasons)
    r = conform.evaluate(result(transcript(failing=True), status=0x21))
    assert any("exit 0x10 with 1 not ok" in x for x in r.reasons)
    res = result(transcript())
    res.outcome = None
    assert conform.evaluate(res).status == conform.FAIL
    lines = [l.replace("virtio-pci-modern", "virtio-pci-legacy") for l in transcript()]
    r = conform.evaluate(result(lines))
    assert r.status == conform.FAIL and "the guest used virtio-pci-legacy" in r.reasons[0]


def test_junit():
    ok = conform.evaluate(result(transcript()))
    bad = conform.evaluate(result(transcript(failing=True), status=0x23))
    bad.config = Config(name="q35-legacy-min", machine="q35", transport="legacy")
    bad.status = conform.FAIL
    known = conform.evaluate(result(transcript(failing=True), status=0x23),
                             [Deviation("qemu-7.2", "B1", "hw/virtio/x.c:f")])
    known.config = Config(name="known", machine="pc", transport="modern")
    crashed = result(["garbage"], status=0x27)
    crashed.config = Config(name="crashed", machine="pc", transport="modern")
    conform.evaluate(crashed)
    root = ET.fromstring(ET.tostring(conform.junit_xml([ok, bad, known, crashed]).getroot()))
    suites = root.findall("testsuite")
    assert [s.get("name") for s in suites] == ["pc-modern-all", "q35-legacy-min", "known",
                                               "crashed"]
    counts = [(s.get("tests"), s.get("failures"), s.get("skipped"), s.get("errors"))
              for s in suites]
    assert counts == [("3", "0", "1", "0"), ("3", "1", "1", "0"), ("3", "0", "2", "0"),
                      ("1", "0", "0", "1")]
    assert root.get("tests") == "10" and root.get("failures") == "1"
    tc = suites[1].findall("testcase")[1]
    assert tc.get("classname") == "q35-legacy-min"
    assert tc.get("name") == "B1 blimp: inflated pages discarded"
    assert tc.find("failure").get("message") == "acked-not-discarded: RSS fell by 0 KiB"
    sk = suites[2].findall("testcase")[1].find("skipped")
    assert sk.get("message").startswith("known deviation:") and "hw/virtio/x.c:f" in \
        sk.get("message")
    assert suites[0].findall("testcase")[2].find("skipped").get("message").startswith(
        "declined")
    assert "TAP version 14" in suites[0].find("system-out").text


def test_matrix_names_and_quick():
    full = conform.matrix("full")
    names = [c.name for c in full]
    assert len(names) == len(set(names))
    assert set(conform.QUICK) <= set(names)
    assert [c.name for c in conform.matrix("quick")] == [n for n in names
                                                         if n in conform.QUICK]
    assert "pc-legacy-all" in names and "microvm-mmio-v2-min" in names
    c = {c.name: c for c in full}["pc-modern-all-decline-all"]
    assert "blimp.balloon.stats=0" in c.guest_append() and "disable-legacy=on" in \
        c.all_device_opts()


def test_high_memory_configurations():
    """RAM above 4 GiB: 6G twins in the full matrix, one in the quick matrix, --memory for
    one configuration or a whole matrix, and `target` computed from the configuration's RAM."""
    full = {c.name: c for c in conform.matrix("full")}
    high = [c for c in full.values() if conform.parse_memory(c.memory) > 4 << 30]
    assert {c.name for c in high} == {h[0] + "-" + conform.HIGH_RAM
                                      for h in conform.HIGH_MEMORY}
    assert all(conform.config_timeout(c, 100) > 100 for c in high)
    assert conform.config_timeout(full["q35-modern-all"], 100) == 100
    assert any(c.quick and c.machine == "q35" and c.transport == "modern" for c in high)
    assert all(c.memory == conform.RAM for c in full.values() if c not in high)
    ns = argparse.Namespace(machine="q35", transport=None, device_opts=None, append=None,
                            memory="6G", only=None, matrix="quick")
    (one,) = conform.select(ns)
    assert one.name == "q35-modern-6G" and one.memory == "6G"
    ns.machine = None
    quick = conform.select(ns)
    assert all(c.memory == "6G" for c in quick)
    assert "q35-modern-min-6G" in [c.name for c in quick]          # not renamed twice
    assert "pc-legacy-all-6G" in [c.name for c in quick]
    assert any(c.host == conform.HOST_REFERENCE for c in high)
    host = FakeHost()
    host.ram_bytes = 6 << 30
    Responder(host).handle({"event": "conform_request", "seq": 1, "action": "target",
                            "pages": 4032})
    assert host.calls == [("balloon", (6 << 30) - 4032 * 4096)]


def _broken_migration(completed):
    class Broken(FakeHost):
        def migrate(self):
            raise conform.MigrationBroken("migration failed: guest agent not ready within 30 s",
                                          completed)
    r = Responder(Broken())
    r.handle({"event": "conform_request", "seq": 6, "action": "migrate"})
    return r.exchanges


@pytest.mark.parametrize("host,accel,completed,status", [
    ("qemu-7.2", "tcg", True, conform.DEVIATES),     # TCG's lost dirty bits: known
    ("qemu-7.2", "tcg", False, conform.FAIL),        # the migration itself failed
    ("qemu-7.2", "kvm", True, conform.FAIL),         # not the TCG bug
    ("reference", "tcg", True, conform.FAIL),        # the reference host has the fix
])
def test_broken_migration(host, accel, completed, status):
    res = result(transcript(), host=host)
    res.accel = accel
    res.exchanges = _broken_migration(completed)
    assert res.exchanges[0].answer.startswith("nack 6 migrate failed: migration failed")
    assert conform.evaluate(res).status == status, res.reasons
    if status == conform.DEVIATES:
        suite = conform.junit_xml([res]).getroot().find("testsuite")
        tc = [t for t in suite.findall("testcase") if t.get("name").startswith("runner:")]
        assert len(tc) == 1 and tc[0].find("skipped").get("message").startswith(
            "known deviation: migration failed")
        assert suite.get("tests") == "4" and suite.get("skipped") == "2"
        assert "migration known" in conform.summary_table([res])
