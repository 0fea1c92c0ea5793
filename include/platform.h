/*
 * The small platform interface that the portable layers (mm/, virtio/) use instead of touching
 * hardware. The kernel implements it in arch/x86/platform.c; host unit tests and benchmarks
 * implement it in tests/unit/fake_platform.c, where "physical memory" is a malloc'd arena.
 */
#ifndef BLIMP_PLATFORM_H
#define BLIMP_PLATFORM_H

#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define PAGE_SHIFT 12
#define PAGE_SIZE  4096ULL

/* Translate between guest-physical addresses and pointers the code can dereference. */
void *phys_to_virt(uint64_t phys);
uint64_t virt_to_phys(const void *virt);

/* Monotonic nanoseconds since boot (kernel: calibrated TSC). Every wait uses it for a deadline. */
uint64_t platform_now_ns(void);

/* A human-readable log line (printf-style, no trailing newline needed). */
void platform_log(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/*
 * Barriers. x86 is strongly ordered for ordinary memory, so rmb/wmb only stop the compiler;
 * mb() is a full fence (needed between publishing avail.idx and reading the device's event index).
 * The same definitions are correct on the x86-64 host that runs the unit tests.
 */
static inline void barrier(void)
{
    __asm__ __volatile__("" ::: "memory");
}
static inline void mb(void)
{
    __asm__ __volatile__("mfence" ::: "memory");
}
static inline void rmb(void)
{
    barrier();
}
static inline void wmb(void)
{
    barrier();
}

#endif
