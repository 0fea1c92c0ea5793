/*
 * Host stand-in for include/platform.h used by unit tests and benchmarks: "physical memory" is a
 * malloc'd arena, and logged lines are kept so tests can check them.
 */
#ifndef BLIMP_FAKE_PLATFORM_H
#define BLIMP_FAKE_PLATFORM_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/*
 * Back guest-physical [base_phys, base_phys + bytes) with a zeroed, page-aligned arena (bytes == 0:
 * no arena). Replaces any previous arena. phys_to_virt/virt_to_phys abort outside it.
 */
void fake_ram_init(uint64_t base_phys, uint64_t bytes);
void fake_ram_fini(void);

/* platform_now_ns is the host's monotonic clock plus every skip so far: a test moves time on
 * (e.g. to run a deadline out) without sleeping. */
void fake_clock_skip(uint64_t ns);
/* A clock that only moves when read (step_ns per reading) or skipped, starting at 0: no wait ever
 * spins in real time, and a run depends on its input alone (the fuzzers). 0: the host's clock. */
void fake_clock_virtual(uint64_t step_ns);

/* Log capture: every platform_log line is kept (the latest FAKE_LOG_KEEP of them). */
#define FAKE_LOG_KEEP 64
#define FAKE_LOG_LINE 256
void fake_log_reset(void);                  /* forget captured lines and zero the count */
unsigned fake_log_count(void);              /* lines logged since the last reset */
const char *fake_log_last(void);            /* latest line, or "" */
bool fake_log_contains(const char *needle); /* does any kept line contain needle */
void fake_log_echo(bool on);                /* also print lines to stderr (default on) */
/* Count every line containing needle from now on, kept or not (fake_log_watched). */
void fake_log_watch(const char *needle);
unsigned fake_log_watched(void);

#endif
