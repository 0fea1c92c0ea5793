/*
 * The virtio transport interface: everything the device-independent code (virtqueue, balloon)
 * needs from a bus. Implementations: virtio/virtio_pci.c (modern and legacy faces),
 * virtio/virtio_mmio.c (versions 2 and 1) and tests/unit/fake_transport.c for host unit tests.
 * Values read through it come from the device and are untrusted: callers validate them.
 */
#ifndef VIRTIO_TRANSPORT_H
#define VIRTIO_TRANSPORT_H

#include <stdbool.h>
#include <stdint.h>

/* Device status bits (virtio spec 2.1). */
#define VIRTIO_STATUS_ACKNOWLEDGE 0x01
#define VIRTIO_STATUS_DRIVER      0x02
#define VIRTIO_STATUS_DRIVER_OK   0x04
#define VIRTIO_STATUS_FEATURES_OK 0x08
#define VIRTIO_STATUS_NEEDS_RESET 0x40
#define VIRTIO_STATUS_FAILED      0x80

/* Transport feature bits (virtio spec 6). */
#define VIRTIO_F_NOTIFY_ON_EMPTY 24
#define VIRTIO_F_ANY_LAYOUT      27
#define VIRTIO_F_INDIRECT_DESC   28
#define VIRTIO_F_EVENT_IDX       29
#define VIRTIO_F_QEMU_BAD        30 /* QEMU's legacy-negotiation sentinel: never accept */
#define VIRTIO_F_VERSION_1       32
#define VIRTIO_F_ACCESS_PLATFORM 33
#define VIRTIO_F_RING_PACKED     34
#define VIRTIO_F_RING_RESET      40

/* ISR bits (PCI ISR register, MMIO InterruptStatus). */
#define VIRTIO_ISR_QUEUE  0x1
#define VIRTIO_ISR_CONFIG 0x2

/* Where a queue's three parts live (guest-physical). */
struct vq_addrs {
    uint64_t desc, avail, used;
};

/*
 * How the device interrupts, as the transport found it when it bound (docs/design.md,
 * "Interrupts"). The kernel routes it; the portable code only carries it.
 */
enum virtio_irq_kind {
    VIRTIO_IRQ_NONE, /* no line known: the kernel polls */
    VIRTIO_IRQ_GSI,  /* a wire into the IOAPIC: PCI INTx (level) or a virtio-mmio line */
    VIRTIO_IRQ_MSIX, /* PCI MSI-X (the transport has an msix table) */
};

struct virtio_irq {
    enum virtio_irq_kind kind;
    unsigned gsi;    /* VIRTIO_IRQ_GSI: the IOAPIC input (global system interrupt) */
    bool isa;        /* gsi is an 8259 IRQ number (a PCI interrupt line): the kernel maps it
                        through the ACPI interrupt source overrides first */
    bool level;      /* level-triggered (PCI INTx; virtio-mmio on QEMU) */
    bool active_low; /* polarity */
};

/*
 * Every register access the driver makes that a hypervisor has to trap (a VM exit on real
 * virtualization), counted by the transport itself, so a host developer can compare what the
 * driver costs with interrupts and with polling.
 */
struct virtio_exit_counts {
    uint64_t config_reads, config_writes; /* device-specific configuration */
    uint64_t status;                      /* status, features, generation, queue set-up */
    uint64_t notifies;                    /* queue notifications */
    uint64_t isr_reads;                   /* interrupt status reads (and acks) */
};

/* One MSI/MSI-X message: where the device writes, and what (the kernel's irq_msi_message). */
struct virtio_msix_msg {
    uint64_t addr;
    uint32_t data;
};

#define VIRTIO_MSI_NO_VECTOR 0xffff /* spec 4.1.4.10.2: no vector, or the device refused one */
#define VIRTIO_MSIX_CONFIG   0      /* the message configuration changes use */
#define VIRTIO_MSIX_QUEUES   1      /* the message every queue's used buffers use */

struct virtio_transport;

/* One result of a transport's own register checks (conformance mode). */
struct virtio_reg_check {
    const char *what; /* the requirement, in words */
    bool ok;
    const char *fmt; /* what was read, as printf text over v (up to four %u / %x) */
    uint32_t v[4];
};
#define VIRTIO_REG_CHECKS_MAX 8

/* Append one result (dropped when out is full: max bounds what the caller can print). */
static inline void virtio_reg_check_add(struct virtio_reg_check *out, unsigned *n, unsigned max,
                                        const char *what, bool ok, const char *fmt, uint32_t v0,
                                        uint32_t v1, uint32_t v2, uint32_t v3)
{
    if (*n >= max)
        return;
    out[*n] = (struct virtio_reg_check){what, ok, fmt, {v0, v1, v2, v3}};
    (*n)++;
}

struct virtio_transport_ops {
    /* Write 0 to the status and wait (with a deadline) until the device reads back 0.
     * Returns 0, or -1 if the device never finished resetting. */
    int (*reset)(struct virtio_transport *t);
    uint8_t (*get_status)(struct virtio_transport *t);
    void (*set_status)(struct virtio_transport *t, uint8_t status);
    uint64_t (*get_features)(struct virtio_transport *t); /* legacy: bits 0-31 only */
    void (*set_features)(struct virtio_transport *t, uint64_t features);
    /* Device-specific configuration; off and width (1, 2, 4) are checked against the
     * transport's known config size. Returns false when out of range. */
    bool (*config_read)(struct virtio_transport *t, unsigned off, unsigned width, uint32_t *val);
    bool (*config_write)(struct virtio_transport *t, unsigned off, unsigned width, uint32_t val);
    uint32_t (*config_generation)(struct virtio_transport *t); /* legacy: always 0 */
    /* The size the device offers for queue index (0 = no such queue). */
    uint16_t (*queue_max_size)(struct virtio_transport *t, unsigned index);
    /* Whether the ring must use the legacy contiguous layout (one area, 4096-aligned used
     * ring) and the device's fixed size. */
    bool (*queue_needs_legacy_layout)(struct virtio_transport *t);
    /* Program and enable queue index with size entries at addrs. Returns 0 or -1. */
    int (*queue_enable)(struct virtio_transport *t, unsigned index, uint16_t size,
                        const struct vq_addrs *addrs);
    void (*notify)(struct virtio_transport *t, unsigned index);
    /* Read (and so acknowledge) the interrupt status: VIRTIO_ISR_* bits. */
    uint8_t (*read_isr)(struct virtio_transport *t);
    /* Optional (NULL: the transport has no MSI-X, e.g. virtio-mmio). Deliver configuration
     * changes with msgs[VIRTIO_MSIX_CONFIG] and every queue's used buffers with
     * msgs[VIRTIO_MSIX_QUEUES], instead of the INTx line. Call it before the driver resets the
     * device: the transport assigns its vectors again after every reset and as each queue is
     * enabled, reads each back, and when the device refuses one (VIRTIO_MSI_NO_VECTOR) turns
     * MSI-X off and goes back to t->irq's INTx line. t->irq.kind says which is in effect.
     * Returns 0, or -1 when the device has no usable MSI-X (INTx stays). */
    int (*msix_setup)(struct virtio_transport *t, const struct virtio_msix_msg msgs[2]);
    /* Optional (conformance mode): check the registers a just-reset device must show (status,
     * queue enables and sizes, feature windows, magic and version), up to `max` results.
     * Leaves the device reset. Returns the number of results. */
    unsigned (*check_registers)(struct virtio_transport *t, struct virtio_reg_check *out,
                                unsigned max);
    /* Optional: the interrupt status without acknowledging it (virtio-mmio's InterruptStatus,
     * which stays set until InterruptACK; PCI has no such read: its ISR clears on reading). */
    uint8_t (*peek_isr)(struct virtio_transport *t);
};

struct virtio_transport {
    const struct virtio_transport_ops *ops;
    const char *name;     /* "virtio-pci-modern"/"-legacy", "virtio-mmio-modern"/"-legacy" */
    bool legacy;          /* legacy interface: no FEATURES_OK, 32 feature bits */
    uint16_t device_id;   /* virtio device type, 5 = balloon */
    unsigned config_size; /* bytes of device config the transport exposes (0 = unknown) */
    struct virtio_irq irq;
    struct virtio_exit_counts exits;
    void *priv; /* implementation state */
};

#endif
