/* Finding the virtio device the kernel drives, over every transport blimp has. */
#ifndef KERNEL_DEVICES_H
#define KERNEL_DEVICES_H

#include "kernel/cmdline.h"
#include "virtio/transport.h"

/*
 * Binds t to the virtio balloon. Order: the command line's virtio_mmio.device= entries, then PCI,
 * then -- only when PCI has no function at all, as on QEMU microvm without pcie -- the slots of
 * microvm's MMIO window. blimp.virtio narrows it (docs/design.md, "virtio-mmio"). Emits a
 * virtio_device event for what it bound. Returns 0, or -1 with the reasons logged.
 */
int find_balloon(const struct options *o, struct virtio_transport *t);

#endif
