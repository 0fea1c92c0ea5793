#include "kernel/panic.h"
#include "lib/printf.h"
#include "arch/x86/exit.h"

void panic(const char *fmt, ...)
{
    char msg[256];
    va_list ap;
    va_start(ap, fmt);
    kvsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    kprintf("blimp: panic: %s\n", msg);
    machine_exit(EXIT_PANIC, msg);
}
