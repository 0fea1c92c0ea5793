/*
 * The TSC is the timestamp source for every deadline and benchmark. Its rate is measured once
 * against PIT channel 0 (a fixed 1.193182 MHz clock), reading the counter back with latch
 * commands. Channel 2 is the textbook choice, but its output is read through port 0x61, which
 * belongs to the PC speaker device that microvm does not have. A missing PIT shows up as a
 * counter that never moves; then we fall back to CPUID leaf 0x15/0x16, or a 2 GHz guess, and say
 * so. The rate is the median of CALIBRATE_WINDOWS short windows: under load on our hosts a
 * window now and then measures the TSC many times too fast (the host's TSC, which TCG passes
 * through, jumps when QEMU's vCPU thread moves between host CPUs; 2 boots in 200 beside CPU hogs
 * measured 6x and 37x), and every timeout would then run that much slower.
 */
#include "arch/x86/tsc.h"
#include "arch/x86/io.h"
#include "lib/printf.h"

#define PIT_HZ            1193182u
#define CALIBRATE_TICKS   1193u /* 1 ms: one PIT tick is 0.08 % of it */
#define CALIBRATE_WINDOWS 5

static uint64_t khz;

static uint16_t pit0_read(void)
{
    outb(0x43, 0x00); /* latch channel 0 */
    uint8_t lo = inb(0x40);
    uint8_t hi = inb(0x40);
    return (uint16_t)(lo | hi << 8);
}

/* One window of CALIBRATE_TICKS; 0 when the PIT does not count. */
static uint64_t pit_measure_once(void)
{
    outb(0x43, 0x30); /* channel 0, lobyte/hibyte, mode 0 (counts down once from 0xffff) */
    outb(0x40, 0xff);
    outb(0x40, 0xff);
    uint16_t first = pit0_read();
    uint64_t start = rdtsc();
    /* Bounded: a counter that never moves (no PIT) must not hang the boot. */
    for (unsigned long spin = 0; spin < 10000000ul; spin++) {
        uint16_t now = pit0_read();
        if ((uint16_t)(first - now) >= CALIBRATE_TICKS && now <= first) {
            uint64_t cycles = rdtsc() - start;
            return cycles * PIT_HZ / ((uint64_t)(first - now) * 1000);
        }
    }
    return 0;
}

/* The median of CALIBRATE_WINDOWS windows: a window or two the host disturbed do not count. */
static uint64_t pit_measure_khz(void)
{
    uint64_t k[CALIBRATE_WINDOWS];
    for (unsigned i = 0; i < CALIBRATE_WINDOWS; i++) {
        k[i] = pit_measure_once();
        if (k[i] == 0)
            return 0;
        for (unsigned j = i; j > 0 && k[j - 1] > k[j]; j--) { /* insertion sort */
            uint64_t t = k[j];
            k[j] = k[j - 1];
            k[j - 1] = t;
        }
    }
    uint64_t median = k[CALIBRATE_WINDOWS / 2];
    if (k[CALIBRATE_WINDOWS - 1] - k[0] > median / 10)
        kprintf("blimp: TSC calibration windows disagree (%lu..%lu kHz): using the median\n",
                (unsigned long)k[0], (unsigned long)k[CALIBRATE_WINDOWS - 1]);
    return median;
}

static uint64_t cpuid_khz(void)
{
    uint32_t a, b, c, d;
    cpuid(0, 0, &a, &b, &c, &d);
    uint32_t max = a;
    if (max >= 0x15) {
        cpuid(0x15, 0, &a, &b, &c, &d);
        if (a && b && c)
            return (uint64_t)c * b / a / 1000;
    }
    if (max >= 0x16) {
        cpuid(0x16, 0, &a, &b, &c, &d);
        if (a)
            return (uint64_t)a * 1000;
    }
    return 0;
}

uint64_t tsc_calibrate(void)
{
    khz = pit_measure_khz();
    if (khz < 10000 || khz > 100000000) { /* outside 10 MHz .. 100 GHz: no usable PIT */
        uint64_t fallback = cpuid_khz();
        kprintf("blimp: warning: PIT calibration gave %lu kHz; using %s\n", khz,
                fallback ? "CPUID" : "a 2 GHz guess");
        khz = fallback ? fallback : 2000000;
    }
    return khz;
}

uint64_t tsc_khz(void)
{
    return khz;
}

uint64_t tsc_to_ns(uint64_t cycles)
{
    /* cycles * 1e6 / khz without overflow for a few hundred years of uptime */
    return cycles / khz * 1000000 + (cycles % khz) * 1000000 / khz;
}

uint64_t tsc_ns_since_boot(void)
{
    return tsc_to_ns(rdtsc() - boot_tsc);
}
