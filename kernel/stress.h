/*
 * Stress mode (blimp.mode=stress): balloon mode, plus a seeded storm of operations on the
 * guest's own memory run between device events (kernel/stress_engine.h), verified page by page;
 * progress lines while it runs, then a final verify, everything freed, and a leak check.
 * README "Stress mode", docs/design.md "Stress mode", docs/serial-output.md.
 */
#ifndef KERNEL_STRESS_H
#define KERNEL_STRESS_H

#include <stdint.h>

#include "kernel/cmdline.h"

__attribute__((noreturn)) void stress_mode_run(const struct options *opts, uint64_t rsdp_phys);

#endif
