"""Per-buffer latency histograms (agent `latency`, `state`'s balloon.latency, the
balloon_latency event) through real QEMU: every inflate, deflate and report buffer the
device used is counted once, with sane percentiles (docs/agent.md, docs/design.md
"Latency"); and blimp.latency formats them."""

from __future__ import annotations

import time

from blimp.latency import format_latency, parse_latency
from guest import MiB

KINDS = ("inflate", "deflate", "report")
REPORTING = ["free-page-reporting=on"]


def _check_kind(k: dict, name: str) -> None:
    """One kind's figures agree with each other and with its buckets."""
    assert k["count"] > 0, (name, k)
    assert 0 < k["min_us"] <= k["mean_us"] <= k["max_us"], (name, k)
    assert k["min_us"] <= k["p50_us"] <= k["p90_us"] <= k["p99_us"] <= k["max_us"], (name, k)
    b = k["buckets"]
    assert sum(n for _, n in b) == k["count"], (name, k)
    los = [lo for lo, _ in b]
    assert los == sorted(set(los)) and all(n > 0 for _, n in b), (name, k)
    assert all(lo == 0 or lo & (lo - 1) == 0 for lo in los), (name, k)  # 0, 2, 4, 8, ...
    # the minimum and the maximum lie in the first and the last non-empty bucket
    assert b[0][0] <= max(k["min_us"], 2) and (b[0][0] == 0 or k["min_us"] < 2 * b[0][0])
    assert b[-1][0] <= k["max_us"] and (b[-1][0] == 0 or k["max_us"] < 2 * b[-1][0] or
                                        b[-1][0] >= 1 << 32)


def _stable(vm, timeout: float = 10.0):
    """(state, latency) taken while nothing moved: the same balloon counters before and
    after the latency reply, and no report out."""
    deadline = time.monotonic() + timeout
    while True:
        st1 = vm.state()["balloon"]
        lat = vm.check("latency")
        st2 = vm.state()["balloon"]
        keys = ("inflate_buffers", "deflate_buffers", "report_chains", "actual_pages")
        if all(st1[k] == st2[k] for k in keys) and st2["inflight_report_pages"] == 0:
            return st2, lat
        if time.monotonic() > deadline:
            raise AssertionError("the balloon kept moving: %r / %r" % (st1, st2))
        time.sleep(0.2)


def test_inflate_deflate_latency(balloon_vm):
    with balloon_vm(memory="1G") as vm:
        for size in (256 * MiB, 64 * MiB, 384 * MiB, 0):
            vm.resize(size, timeout=60)
        st, lat = _stable(vm)
        assert set(KINDS) <= set(lat), lat
        assert lat["inflate"]["count"] == st["inflate_buffers"], (lat, st)
        assert lat["deflate"]["count"] == st["deflate_buffers"], (lat, st)
        assert lat["report"]["count"] == 0 == st["report_chains"], (lat, st)
        _check_kind(lat["inflate"], "inflate")
        _check_kind(lat["deflate"], "deflate")
        # state's compact copy says the same
        compact = st["latency"]
        for name in KINDS:
            for f in ("count", "p50_us", "p99_us", "max_us"):
                assert compact[name][f] == lat[name][f], (name, f, compact, lat)
        table = format_latency(lat)
        assert table.splitlines()[0].split()[:2] == ["kind", "count"], table
        assert "inflate" in table and "deflate" in table, table
        assert parse_latency(st)["inflate"].count == st["inflate_buffers"]
        vm.check_no_violation()
        vm.quit()


def test_report_latency(balloon_vm):
    with balloon_vm(memory="1G", balloon_opts=REPORTING) as vm:
        a = vm.check("alloc 256M 3", timeout=120)
        mark = vm.mark()
        vm.check("free %d" % a["id"])
        vm.wait_event("balloon_reported", lambda e: e["pages"] > 0, since=mark, timeout=30)
        st, lat = _stable(vm)
        assert st["report_chains"] >= 1, st
        assert lat["report"]["count"] == st["report_chains"], (lat, st)
        _check_kind(lat["report"], "report")
        assert lat["inflate"]["count"] == st["inflate_buffers"] == 0, (lat, st)
        assert "report" in format_latency(lat)
        vm.check_no_violation()
        vm.quit()


def test_stress_emits_latency_before_done(balloon_vm):
    """Stress mode prints balloon_latency just before stress_done, with what it ballooned."""
    append = "blimp.mode=stress blimp.seed=3 blimp.stress.ops=0 blimp.stress.ms=8000"
    with balloon_vm(machine="q35", memory="512M", append=append, timeout=120) as vm:
        vm.wait_event("stress_start", timeout=30)
        vm.resize(64 * MiB, timeout=60)
        vm.resize(0, timeout=60)
        done = vm.wait_event("stress_done", timeout=120)
        assert done["settled"] is True, done
        lines = vm.lines
        i_lat = max(i for i, line in enumerate(lines) if '"balloon_latency"' in line)
        i_done = max(i for i, line in enumerate(lines) if '"stress_done"' in line)
        assert i_lat < i_done, lines[i_lat:i_done + 1]
        ev = vm.events("balloon_latency")[-1]
        assert "truncated" not in ev, ev
        _check_kind(ev["inflate"], "inflate")
        _check_kind(ev["deflate"], "deflate")
        assert "inflate" in format_latency(ev)


def test_format_latency_table():
    """Host side only: the table of a known event, and of state's compact form."""
    ev = {"event": "balloon_latency",
          "inflate": {"count": 3, "min_us": 3, "mean_us": 502, "p50_us": 8, "p90_us": 1500,
                      "p99_us": 1500, "max_us": 1500, "buckets": [[2, 1], [4, 1], [1024, 1]]},
          "deflate": {"count": 0, "min_us": 0, "mean_us": 0, "p50_us": 0, "p90_us": 0,
                      "p99_us": 0, "max_us": 0, "buckets": []},
          "report": {"count": 1, "min_us": 250000, "mean_us": 250000, "p50_us": 250000,
                     "p90_us": 250000, "p99_us": 250000, "max_us": 2500000, "buckets": [[0, 1]]}}
    rows = [line.split() for line in format_latency(ev).splitlines()]
    assert rows[0] == ["kind", "count", "min", "p50", "p90", "p99", "max", "mean"]
    assert rows[1] == ["inflate", "3", "3", "us", "8", "us", "1.5", "ms", "1.5", "ms", "1.5",
                       "ms", "502", "us"]
    assert rows[2] == ["deflate", "0"] + ["-"] * 6
    assert rows[3][:4] == ["report", "1", "250", "ms"] and rows[3][-4:-2] == ["2.5", "s"]
    parsed = parse_latency(ev)
    assert parsed["inflate"].buckets == [(2, 1), (4, 1), (1024, 1)]
    compact = {"ok": True, "cmd": "state", "balloon": {"latency": {
        k: {"count": 1, "p50_us": 4, "p99_us": 4, "max_us": 3} for k in KINDS}}}
    t = format_latency(compact)
    assert t.splitlines()[1].split()[:4] == ["inflate", "1", "-", "4"], t
