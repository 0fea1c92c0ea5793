#ifndef KERNEL_SELFTEST_H
#define KERNEL_SELFTEST_H

#include "boot/boot_info.h"
#include "kernel/cmdline.h"

/* blimp.mode=selftest: allocator checks over all of RAM; returns the exit code. */
int selftest_run(const struct boot_info *bi, const struct options *o);

#endif
