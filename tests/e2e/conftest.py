"""pytest setup of blimp's end-to-end tests.

    /usr/bin/python3 -m pytest tests/e2e                 # all, TCG, one QEMU at a time
    /usr/bin/python3 -m pytest tests/e2e --jobs 2           # two QEMUs at a time
    /usr/bin/python3 -m pytest tests/e2e -k microvm

Options (or environment): --build-dir (BLIMP_BUILD_DIR, default build/),
--accel (BLIMP_ACCEL, default tcg), --jobs (BLIMP_E2E_JOBS, default 1),
--timeout-scale (BLIMP_TIMEOUT_SCALE, default 1).  Serial logs of every run
land in pytest's temp dir (printed in failures).
"""

from __future__ import annotations

import os

import pytest

import guest
from blimp import refhost
from blimp.session import BalloonSession

REPO = guest.REPO


def pytest_addoption(parser):
    g = parser.getgroup("blimp")
    g.addoption("--build-dir", default=os.environ.get("BLIMP_BUILD_DIR",
                                                      os.path.join(REPO, "build")),
                help="directory with blimp.elf and blimp-mb1.elf")
    g.addoption("--accel", default=os.environ.get("BLIMP_ACCEL", "tcg"),
                choices=("auto", "tcg", "kvm"), help="QEMU accelerator (default tcg)")
    g.addoption("--jobs", type=int, default=int(os.environ.get("BLIMP_E2E_JOBS", "1")),
                help="QEMU runs in parallel (default 1)")
    g.addoption("--timeout-scale", type=float,
                default=float(os.environ.get("BLIMP_TIMEOUT_SCALE", "1")),
                help="multiply every QEMU timeout by this")


def pytest_collection_modifyitems(session, config, items):
    """Remember, in collection order, which boot specs the selected tests need,
    so the runner can start them early when running in parallel."""
    specs = []
    seen = set()
    for item in items:
        cs = getattr(item, "callspec", None)
        if cs is None:
            continue
        for v in cs.params.values():
            if isinstance(v, guest.Spec) and v not in seen:
                seen.add(v)
                specs.append(v)
    config._blimp_specs = specs


@pytest.fixture(scope="session")
def build_dir(pytestconfig):
    return os.path.abspath(pytestconfig.getoption("build_dir"))


@pytest.fixture(scope="session")
def images(build_dir):
    """Paths of both images; a missing image is a test failure, not a skip."""
    paths = {k: os.path.join(build_dir, v) for k, v in guest.IMAGES.items()}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        pytest.fail("kernel image(s) missing: %s (build with `ninja` at the repo root)"
                    % ", ".join(missing), pytrace=False)
    return paths


@pytest.fixture(scope="session")
def runner(pytestconfig, build_dir, images, tmp_path_factory):
    r = guest.BootRunner(build_dir, pytestconfig.getoption("accel"),
                         jobs=pytestconfig.getoption("jobs"),
                         timeout_scale=pytestconfig.getoption("timeout_scale"),
                         log_dir=str(tmp_path_factory.mktemp("serial")))
    r.prefetch(getattr(pytestconfig, "_blimp_specs", []))
    yield r
    r.shutdown()


@pytest.fixture
def boot(runner, spec):
    """The finished run of the test's `spec` parameter (each spec boots once)."""
    return runner.get(spec)


@pytest.fixture(scope="session")
def kernel_bytes(images):
    return {k: guest.image_footprint(p) for k, p in images.items()}


#: how balloon_vm sessions start unless a test says otherwise: as real hosts do, without
#: waiting for the guest.  Session.start() returns once QMP and the agent's socket are
#: connected, so a test's first QMP action races the guest's bring-up (its driver, its
#: interrupt set-up); what the guest said at bring-up (features, transport, the agent's
#: readiness) is waited for on first use.  A test that must see bring-up first passes
#: start_mode="ready" and says why.
DEFAULT_START_MODE = "immediate"


@pytest.fixture
def balloon_vm(pytestconfig, images, request, tmp_path_factory):
    """Factory of blimp.session.BalloonSession runs (pvh image unless image="mb1", balloon +
    agent); use as
    ``with balloon_vm(machine="pc", balloon_opts=[...], append="...") as vm:``.
    What it adds for pytest: the accelerator and timeout scale of the command line,
    every run's serial log in pytest's temp dir, a longer serial tail in failure
    messages, every QEMU closed at the end of the test even if the test forgot, and a
    host-first start (DEFAULT_START_MODE; start_mode= and start_target= as the session's)."""
    made = []
    log_dir = tmp_path_factory.mktemp("balloon")
    scale = pytestconfig.getoption("timeout_scale")

    def make(machine="q35", memory="1G", balloon_opts=(), append="",
             timeout=120.0, kernel="pvh", start_mode=DEFAULT_START_MODE, start_target=None,
             **qemu_options) -> BalloonSession:
        """kernel: an image name of guest.IMAGES, a path, or None for a firmware boot from
        qemu_options' cdrom= or disk= (see blimp.images)."""
        name = "%s-%d.log" % (request.node.name, len(made))
        log_name = "".join(c if c.isalnum() or c in "-_.[]=," else "_" for c in name)
        session = BalloonSession(images.get(kernel, kernel), machine=machine, memory=memory,
                                 balloon_opts=balloon_opts, append=append,
                                 accel=pytestconfig.getoption("accel"),
                                 timeout=timeout * scale, boot_timeout=30.0 * scale,
                                 serial_log=os.path.join(str(log_dir), log_name),
                                 context_lines=40, start_mode=start_mode,
                                 start_target=start_target, **qemu_options)
        made.append(session)
        return session

    yield make
    for session in made:
        session.close()


@pytest.fixture(scope="session")
def reference_qemu() -> str:
    """The reference host's QEMU (tools/reference-host): $BLIMP_REFERENCE_QEMU, or the
    cached build, built now if missing. A build failure fails the tests that need it."""
    try:
        return refhost.reference_qemu(build=True)
    except (refhost.ReferenceHostError, OSError) as e:
        pytest.fail("no reference host: %s" % e, pytrace=False)
