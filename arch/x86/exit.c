#include "arch/x86/exit.h"
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

void machine_exit(enum exit_code code, const char *reason)
{
    struct json j;
    event_begin(&j, "exit");
    json_u64(&j, "code", (uint64_t)code);
    json_str(&j, "name", exit_code_name(code));
    json_str(&j, "reason", reason ? reason : "");
    event_emit(&j);
    outl(0xf4, (uint32_t)code);
    /* No isa-debug-exit (another VMM, or QEMU without the device): stop here, visibly. */
    kprintf("blimp: halted (no isa-debug-exit device at port 0xf4)\n");
    cpu_halt_forever();
}
