/* include/platform.h for the kernel: identity mapping, the calibrated TSC and the console. */
#include "include/platform.h"
#include "arch/x86/tsc.h"
#include "lib/printf.h"

void *phys_to_virt(uint64_t phys)
{
    return (void *)(uintptr_t)phys;
}

uint64_t virt_to_phys(const void *virt)
{
    return (uint64_t)(uintptr_t)virt;
}

uint64_t platform_now_ns(void)
{
    return tsc_ns_since_boot();
}

void platform_log(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvprintf(fmt, ap);
    va_end(ap);
    kprintf("\n");
}
