/*
 * virtio over PCI: discovery of a device of a given virtio type and its two faces, the modern
 * interface (vendor capabilities in memory BARs, possibly above 4 GiB) and the legacy one
 * (I/O BAR0; QEMU's disable-modern=on, and the transitional device's other face). Portable: it
 * reaches the hardware only through include/bus.h.
 */
#ifndef VIRTIO_VIRTIO_PCI_H
#define VIRTIO_VIRTIO_PCI_H

#include "include/bus.h"
#include "virtio/transport.h"

enum virtio_pci_choice { VIRTIO_PCI_AUTO, VIRTIO_PCI_MODERN, VIRTIO_PCI_LEGACY };

#define VIRTIO_PCI_MAX_QUEUES 8

struct virtio_pci {
    struct pci_func pci;
    /* modern: the four structures the vendor capabilities point at */
    struct bus_region common, notify, isr, device_cfg;
    uint32_t notify_mult;
    uint16_t notify_off[VIRTIO_PCI_MAX_QUEUES];
    /* legacy: the register header and device config in I/O BAR0 */
    struct bus_region legacy;
    unsigned legacy_cfg; /* where the device config starts: 20, or 24 with MSI-X on */
    /* MSI-X (PCI 3.0 6.8.2; virtio 4.1.4.10.2): the capability, its table, and whether the
     * device's vectors are in use; intx is the line to go back to. */
    unsigned msix_cap;  /* config offset, 0: none */
    unsigned msix_size; /* table entries */
    struct bus_region msix_table;
    bool msix_on;
    struct virtio_irq intx;
};

/* Finds the first virtio-pci device of virtio type device_id and binds t to the chosen face
 * (AUTO: modern when the device has it). Returns 0, or -1 with the reason logged. */
int virtio_pci_find(uint16_t device_id, enum virtio_pci_choice choice, struct virtio_pci *vp,
                    struct virtio_transport *t);

#endif
