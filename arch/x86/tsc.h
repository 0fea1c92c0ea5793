#ifndef ARCH_X86_TSC_H
#define ARCH_X86_TSC_H

#include <stdint.h>

extern uint64_t boot_tsc; /* TSC at the first instruction of the boot entry (boot/entry.S) */

/* Measures the TSC rate against the PIT (about 3 ms); returns the rate in kHz. */
uint64_t tsc_calibrate(void);
uint64_t tsc_khz(void);
uint64_t tsc_to_ns(uint64_t cycles);
uint64_t tsc_ns_since_boot(void);

#endif
