/*
 * The TSC is the timestamp source for every deadline and benchmark. Its rate is measured once
 * against PIT channel 0 (a fixed 1.193182 MHz clock), reading the counter back with latch
 * commands. Channel 2 is the textbook choice, but its output is read through port 0x61, which
 * belongs to the PC speaker device that microvm does not have. A missing PIT shows up as a
 * counter that never moves; then we fall back to CPUID leaf 0x15/0x16, or a 2 GHz guess, and say
 * so. Each PIT read is bracketed by two TSC reads: a vCPU the host deschedules inside a read
 * (seen under load: 5 % of boots measured the TSC up to 19x too fast, so every timeout ran that
 * much slower) shows as a wide bracket, and the measurement is taken again.
 */
#include "arch/x86/tsc.h"
#include "arch/x86/io.h"
#include "lib/printf.h"

#define PIT_HZ          1193182u
#define CALIBRATE_TICKS 3580u /* about 3 ms */
#define CALIBRATE_TRIES 8
#define BRACKET_SHARE   500 /* both brackets together within 1/500 of the window: 0.2 % */

static uint64_t khz;

static uint16_t pit0_read(void)
{
    outb(0x43, 0x00); /* latch channel 0 */
    uint8_t lo = inb(0x40);
    uint8_t hi = inb(0x40);
    return (uint16_t)(lo | hi << 8);
}

/* A PIT read and the TSC around it: *tsc is the bracket's middle, *width its length. */
static uint16_t pit0_read_at(uint64_t *tsc, uint64_t *width)
{
    uint64_t before = rdtsc();
    uint16_t v = pit0_read();
    uint64_t after = rdtsc();
    *tsc = before + (after - before) / 2;
    *width = after - before;
    return v;
}

/* One window of CALIBRATE_TICKS; 0 when the PIT does not count. *slack: the two brackets'
 * widths against the window's cycles, in 1/BRACKET_SHARE (0: exact; >= 1: not trusted). */
static uint64_t pit_measure_once(uint64_t *slack)
{
    outb(0x43, 0x30); /* channel 0, lobyte/hibyte, mode 0 (counts down once from 0xffff) */
    outb(0x40, 0xff);
    outb(0x40, 0xff);
    uint64_t start, w0, end, w1;
    uint16_t first = pit0_read_at(&start, &w0);
    /* Bounded: a counter that never moves (no PIT) must not hang the boot. */
    for (unsigned long spin = 0; spin < 10000000ul; spin++) {
        uint16_t now = pit0_read_at(&end, &w1);
        if ((uint16_t)(first - now) >= CALIBRATE_TICKS && now <= first) {
            uint64_t cycles = end - start;
            *slack = cycles ? (w0 + w1) * BRACKET_SHARE / cycles : UINT64_MAX;
            return cycles * PIT_HZ / ((uint64_t)(first - now) * 1000);
        }
    }
    return 0;
}

/* The first window whose brackets are tight; after CALIBRATE_TRIES, the tightest seen. */
static uint64_t pit_measure_khz(void)
{
    uint64_t best = 0, best_slack = UINT64_MAX;
    for (unsigned i = 0; i < CALIBRATE_TRIES; i++) {
        uint64_t slack, k = pit_measure_once(&slack);
        if (k == 0)
            return 0;
        if (slack < best_slack) {
            best = k;
            best_slack = slack;
        }
        if (slack == 0)
            break;
        kprintf("blimp: TSC calibration window %u disturbed (a PIT read took %lu/%u of it); "
                "measuring again\n",
                i + 1, (unsigned long)slack, BRACKET_SHARE);
    }
    return best;
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
