"""blimp exit codes: the one table the host tools use.

The guest writes a code to the isa-debug-exit port (0xf4); QEMU then exits with
status ``code * 2 + 1``.  An even status can never come from the guest: 0 means
the guest triple-faulted or reset (with ``-no-reboot``) without reaching the
exit port.  docs/ carries the same table for humans; keep the two in step.

This module also fixes the exit status of the ``python3 -m blimp`` command line
(``cli_status``), so shell scripts can tell the outcomes apart.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Optional

# Guest exit codes (value written to isa-debug-exit).
SUCCESS = 0x10
TEST_FAILURES = 0x11
BAD_CMDLINE = 0x12
PANIC = 0x13
CPU_EXCEPTION = 0x14
HOST_PROTOCOL_VIOLATION = 0x15
OUT_OF_MEMORY = 0x16
NO_BALLOON_DEVICE = 0x17
DEVICE_NEEDS_RESET = 0x18

#: code -> (short name, description)
GUEST_CODES = {
    SUCCESS: ("success", "success"),
    TEST_FAILURES: ("test-failures", "self-test or conformance failures"),
    BAD_CMDLINE: ("bad-cmdline", "bad kernel command line"),
    PANIC: ("panic", "kernel panic"),
    CPU_EXCEPTION: ("cpu-exception", "unexpected CPU exception"),
    HOST_PROTOCOL_VIOLATION: ("host-protocol-violation", "host violated the balloon protocol"),
    OUT_OF_MEMORY: ("out-of-memory", "guest out of memory"),
    NO_BALLOON_DEVICE: ("no-balloon-device", "no virtio balloon device found"),
    DEVICE_NEEDS_RESET: ("device-needs-reset",
                         "the balloon device needs a reset (blimp.balloon.on_reset=stop)"),
}

# Outcome kinds.
GUEST = "guest"              # guest wrote a code to isa-debug-exit
TRIPLE_FAULT = "triple-fault"  # status 0: reset/triple fault without debug-exit
TIMEOUT = "timeout"          # we killed QEMU at its deadline
QEMU_ERROR = "qemu-error"    # status 1: QEMU refused to start / fatal error (guest code 0 is never used)
SIGNALLED = "signal"         # QEMU died from a signal (not ours)
OTHER = "other"              # any other even status

# Exit statuses of the `python3 -m blimp` command line for non-guest outcomes.
CLI_TRIPLE_FAULT = 3
CLI_TIMEOUT = 124            # like coreutils timeout(1)
CLI_QEMU_ERROR = 125
CLI_OTHER = 126


def qemu_status(code: int) -> int:
    """QEMU process exit status for a guest exit code."""
    return (code << 1) | 1


def guest_code(status: int) -> Optional[int]:
    """Guest exit code for an odd QEMU status, else None."""
    if status is not None and status > 0 and status & 1:
        return (status - 1) >> 1
    return None


def code_name(code: int) -> str:
    return GUEST_CODES.get(code, ("unknown-0x%02x" % code, ""))[0]


@dataclass(frozen=True)
class Outcome:
    kind: str                    # one of GUEST, TRIPLE_FAULT, TIMEOUT, QEMU_ERROR, SIGNALLED, OTHER
    status: Optional[int]        # raw QEMU status (negative = signal, as subprocess reports it)
    code: Optional[int] = None   # guest code when kind == GUEST

    @property
    def ok(self) -> bool:
        return self.kind == GUEST and self.code == SUCCESS

    @property
    def name(self) -> str:
        if self.kind == GUEST:
            return code_name(self.code)
        return self.kind

    def describe(self) -> str:
        if self.kind == GUEST:
            desc = GUEST_CODES.get(self.code, (None, "unknown code"))[1]
            return "guest exit 0x%02x %s: %s (QEMU status %d)" % (
                self.code, self.name, desc, self.status)
        if self.kind == TRIPLE_FAULT:
            return "triple fault / reset without debug-exit (QEMU status 0)"
        if self.kind == TIMEOUT:
            return "timeout (QEMU killed)"
        if self.kind == QEMU_ERROR:
            return "QEMU failed (status 1; see its stderr)"
        if self.kind == SIGNALLED:
            try:
                sig = signal.Signals(-self.status).name
            except (ValueError, TypeError):
                sig = str(-self.status)
            return "QEMU killed by signal %s" % sig
        return "unexpected QEMU status %s" % self.status

    def cli_status(self) -> int:
        """Exit status for the `python3 -m blimp` command line.

        0 for guest success; the guest code (0x11..0x18 = 17..24) for other guest
        codes; 3 triple fault; 124 timeout; 125 QEMU error; 128+N signal N.
        """
        if self.kind == GUEST:
            return 0 if self.code == SUCCESS else self.code & 0xff
        if self.kind == TRIPLE_FAULT:
            return CLI_TRIPLE_FAULT
        if self.kind == TIMEOUT:
            return CLI_TIMEOUT
        if self.kind == QEMU_ERROR:
            return CLI_QEMU_ERROR
        if self.kind == SIGNALLED:
            return 128 + (-self.status)
        return CLI_OTHER


def classify(status: Optional[int], timed_out: bool = False) -> Outcome:
    """Map a raw QEMU exit status to an Outcome.

    status odd (>1) => guest code (status-1)/2; 0 => triple fault; timed_out => timeout
    (wins over the status the kill produced).
    """
    if timed_out or status is None:
        return Outcome(TIMEOUT, status)
    if status == 0:
        return Outcome(TRIPLE_FAULT, status)
    if status == 1:
        return Outcome(QEMU_ERROR, status)
    if status < 0:
        return Outcome(SIGNALLED, status)
    if status & 1:
        return Outcome(GUEST, status, guest_code(status))
    return Outcome(OTHER, status)
