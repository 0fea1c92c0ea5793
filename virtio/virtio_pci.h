/*
 * virtio over PCI: discovery of a device of a given virtio type and its two faces, the modern
 * interface (vendor capabilities in memory BARs, possibly above 4 GiB) and the legacy one
 * (I/O BAR0; QEMU's disable-modern=on, and the transitional device's other face).
 */
#ifndef VIRTIO_VIRTIO_PCI_H
#define VIRTIO_VIRTIO_PCI_H

#include "virtio/transport.h"
#include "arch/x86/pci.h"

enum virtio_pci_choice { VIRTIO_PCI_AUTO, VIRTIO_PCI_MODERN, VIRTIO_PCI_LEGACY };

#define VIRTIO_PCI_MAX_QUEUES 8

struct virtio_pci {
    struct pci_dev pci;
    /* modern */
    volatile uint8_t *common, *notify_base, *isr, *device_cfg;
    uint32_t notify_mult;
    uint32_t notify_len;
    uint16_t notify_off[VIRTIO_PCI_MAX_QUEUES];
    /* legacy */
    uint16_t io_base;
};

/* Finds the first virtio-pci device of virtio type device_id and binds t to the chosen face
 * (AUTO: modern when the device has it). Returns 0, or -1 with the reason printed. */
int virtio_pci_find(uint16_t device_id, enum virtio_pci_choice choice, struct virtio_pci *vp,
                    struct virtio_transport *t);

#endif
