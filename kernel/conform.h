/*
 * Conformance mode (blimp.mode=conform): checks the host's balloon device against the device
 * requirements of virtio 1.2/1.3 (D1-D24 of ../shared/docs/balloon-protocol.md section 5.2) and
 * prints one TAP point per requirement; docs/conformance.md.
 */
#ifndef KERNEL_CONFORM_H
#define KERNEL_CONFORM_H

#include "kernel/cmdline.h"

__attribute__((noreturn)) void conform_mode_run(const struct options *opts, uint64_t rsdp_phys);

#endif
