/*
 * Leaving the guest with a status a test runner can gate on: QEMU's isa-debug-exit
 * (-device isa-debug-exit,iobase=0xf4,iosize=0x04) ends QEMU with status (code << 1) | 1, so no
 * code can be confused with a triple fault (status 0). The README ("Output and exit codes")
 * and tools/blimp/exitcodes.py hold the same table.
 */
#ifndef ARCH_X86_EXIT_H
#define ARCH_X86_EXIT_H

enum exit_code {
    EXIT_SUCCESS_CODE = 0x10,       /* QEMU status 33: everything asked for held */
    EXIT_TEST_FAILED = 0x11,        /* 35: at least one report() failed */
    EXIT_BAD_CMDLINE = 0x12,        /* 37: unknown or malformed kernel command-line option */
    EXIT_PANIC = 0x13,              /* 39: the kernel found itself in an impossible state */
    EXIT_CPU_EXCEPTION = 0x14,      /* 41: unexpected CPU exception */
    EXIT_PROTOCOL_ERROR = 0x15,     /* 43: the host's device broke the virtio protocol */
    EXIT_OUT_OF_MEMORY = 0x16,      /* 45: the guest could not get memory it needed */
    EXIT_NO_DEVICE = 0x17,          /* 47: no virtio balloon device was found */
    EXIT_DEVICE_NEEDS_RESET = 0x18, /* 49: the device needs a reset and on_reset=stop */
};

struct acpi_s5;

/* Prints an exit event, then leaves through isa-debug-exit; without that device it powers the
 * machine off (ACPI S5, when machine_exit_use_s5 was given the way) or resets it. */
__attribute__((noreturn)) void machine_exit(enum exit_code code, const char *reason);
/* Remember how to power off (read at boot: the ACPI tables may be reused RAM later). */
void machine_exit_use_s5(const struct acpi_s5 *s5);
const char *exit_code_name(enum exit_code code);

#endif
