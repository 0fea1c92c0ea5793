#ifndef KERNEL_BALLOON_MODE_H
#define KERNEL_BALLOON_MODE_H

#include "kernel/cmdline.h"

/* The default mode: find the balloon, bring it up, follow the host's target forever. */
__attribute__((noreturn)) void balloon_mode_run(const struct options *opts);

#endif
