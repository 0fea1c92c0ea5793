#include "arch/x86/exit.h"
#include "arch/x86/acpi.h"
#include "arch/x86/io.h"
#include "lib/json.h"
#include "lib/printf.h"

const char *exit_code_name(enum exit_code code)
{
    switch (code) {
    case EXIT_SUCCESS_CODE:
        return "success";
    case EXIT_TEST_FAILED:
        return "test-failed";
    case EXIT_BAD_CMDLINE:
        return "bad-cmdline";
    case EXIT_PANIC:
        return "panic";
    case EXIT_CPU_EXCEPTION:
        return "cpu-exception";
    case EXIT_PROTOCOL_ERROR:
        return "protocol-error";
    case EXIT_OUT_OF_MEMORY:
        return "out-of-memory";
    case EXIT_NO_DEVICE:
        return "no-device";
    case EXIT_DEVICE_NEEDS_RESET:
        return "device-needs-reset";
    }
    return "unknown";
}

/* Some 20-100 ms at any clock rate (the TSC may not be calibrated yet): a reset request is
 * acted on by the VMM after the write returns, so give it that long before the next way. */
static void settle(void)
{
    uint64_t t0 = rdtsc();
    while (rdtsc() - t0 < 100000000)
        cpu_pause();
}

static struct acpi_s5 s5; /* pm1a_cnt 0: not known */

void machine_exit_use_s5(const struct acpi_s5 *s)
{
    s5 = *s;
}

#define SLP_TYP_SHIFT 10
#define SLP_TYP_MASK  (7u << SLP_TYP_SHIFT)
#define SLP_EN        (1u << 13)
#define SCI_EN        1u

/* ACPI soft off, as an OS does it: ACPI mode on if the firmware left it off (SMI_CMD), then
 * SLP_TYP with SLP_EN into PM1a (and PM1b) control. */
static void acpi_power_off(void)
{
    if (!s5.pm1a_cnt)
        return;
    kprintf("blimp: ACPI S5 (PM1a_CNT 0x%x, SLP_TYPa %u)\n", s5.pm1a_cnt, s5.slp_typa);
    if (!(inw(s5.pm1a_cnt) & SCI_EN) && s5.smi_cmd && s5.acpi_enable) {
        outb(s5.smi_cmd, s5.acpi_enable);
        for (int i = 0; i < 100000 && !(inw(s5.pm1a_cnt) & SCI_EN); i++)
            cpu_pause();
    }
    uint16_t v = inw(s5.pm1a_cnt) & (uint16_t) ~(SLP_TYP_MASK | SLP_EN);
    outw(s5.pm1a_cnt, (uint16_t)(v | s5.slp_typa << SLP_TYP_SHIFT | SLP_EN));
    if (s5.pm1b_cnt) {
        v = inw(s5.pm1b_cnt) & (uint16_t) ~(SLP_TYP_MASK | SLP_EN);
        outw(s5.pm1b_cnt, (uint16_t)(v | s5.slp_typb << SLP_TYP_SHIFT | SLP_EN));
    }
    settle();
    kprintf("blimp: still running after S5\n");
}

/* No isa-debug-exit answered (kvmtool, libvirt, Firecracker, QEMU without the device): end the
 * VM anyway, so no one has to kill it. Power off first (libvirt restarts a guest that resets,
 * by default), then the ways a PC resets, most specific first; every VMM that gets no answer
 * from one has another (QEMU -no-reboot exits on any reset). */
__attribute__((noreturn)) static void end_without_debug_exit(void)
{
    cpu_cli();
    acpi_power_off();
    outb(0xcf9, 0x02); /* PIIX/ICH reset control: select hard reset, */
    outb(0xcf9, 0x06); /* then pull it */
    settle();
    for (int i = 0; i < 100000 && (inb(0x64) & 0x02); i++) /* i8042 input buffer full */
        cpu_pause();
    outb(0x64, 0xfe); /* i8042: pulse the reset line (Firecracker's and kvmtool's way out) */
    settle();
    kprintf("blimp: no reset answered either; triple fault\n");
    static const struct __attribute__((packed)) {
        uint16_t limit;
        uint64_t base;
    } no_idt = {0, 0};
    __asm__ volatile("lidt %0; int3" : : "m"(no_idt));
    cpu_halt_forever();
}

void machine_exit(enum exit_code code, const char *reason)
{
    struct json j;
    event_begin(&j, "exit");
    json_u64(&j, "code", (uint64_t)code);
    json_str(&j, "name", exit_code_name(code));
    json_str(&j, "reason", reason ? reason : "");
    event_emit(&j);
    outl(0xf4, (uint32_t)code);
    kprintf("blimp: no isa-debug-exit device at port 0xf4 answered: the verdict is the exit "
            "event above; powering off or resetting the machine\n");
    end_without_debug_exit();
}
