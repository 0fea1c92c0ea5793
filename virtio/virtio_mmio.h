/*
 * virtio over MMIO (virtio spec 4.2): one register window per device, version 2 (modern) and
 * version 1 (legacy, QEMU 7.2's default). Portable: it reaches the hardware only through
 * include/bus.h. Windows come from the kernel command line (Linux's
 * virtio_mmio.device=<size>@<base>:<irq>[:<id>], which QEMU microvm and Firecracker add) or from
 * probing a platform's known layout (kernel/devices.c).
 */
#ifndef VIRTIO_VIRTIO_MMIO_H
#define VIRTIO_VIRTIO_MMIO_H

#include <stdbool.h>
#include <stdint.h>

#include "include/bus.h"
#include "virtio/transport.h"

#define VIRTIO_MMIO_MAGIC  0x74726976u /* "virt" */
#define VIRTIO_MMIO_CONFIG 0x100       /* device-specific configuration starts here */
/* The smallest window: the register header plus the balloon's two mandatory config fields
 * (num_pages, actual). QEMU's windows are 0x200 bytes, Firecracker's 0x1000. */
#define VIRTIO_MMIO_MIN_SIZE (VIRTIO_MMIO_CONFIG + 8)
/* The largest: no device type has anywhere near this much configuration. */
#define VIRTIO_MMIO_MAX_SIZE 0x10000
/* Physical addresses x86-64 can have at most (52 bits). */
#define VIRTIO_MMIO_ADDR_LIMIT (1ull << 52)

/* Which interface versions a caller accepts (blimp.virtio=modern|legacy narrow it). */
enum virtio_mmio_versions {
    VIRTIO_MMIO_ANY,
    VIRTIO_MMIO_V2_ONLY,
    VIRTIO_MMIO_V1_ONLY,
};

/* One window, as the command line or a probe described it. */
struct virtio_mmio_device {
    uint64_t base, size;
    struct virtio_irq irq; /* VIRTIO_IRQ_NONE when nobody knows the line */
    int id;                /* Linux's optional platform-device id; -1 when absent */
};

struct virtio_mmio {
    struct virtio_mmio_device dev;
    struct bus_region regs; /* the whole window: registers and config */
    unsigned version;       /* 1 or 2 */
};

/* What virtio_mmio_bind found. */
enum virtio_mmio_result {
    VIRTIO_MMIO_BOUND = 0,
    VIRTIO_MMIO_EMPTY,       /* no device there: device id 0 or no virtio magic */
    VIRTIO_MMIO_OTHER_TYPE,  /* a virtio device of another type */
    VIRTIO_MMIO_UNSUPPORTED, /* a device we cannot use (version, or not what `versions` asks) */
    VIRTIO_MMIO_MAP_FAILED,
};

/*
 * Maps the window dev describes and, if a virtio device of type device_id sits there with an
 * acceptable version, binds t to it. Every outcome but BOUND and EMPTY is logged with the window's
 * base (a probe meets many empty slots).
 */
enum virtio_mmio_result virtio_mmio_bind(const struct virtio_mmio_device *dev, uint16_t device_id,
                                         enum virtio_mmio_versions versions, struct virtio_mmio *vm,
                                         struct virtio_transport *t);

/*
 * Parses the value of virtio_mmio.device=: <size>@<base>:<irq>[:<id>], size decimal or 0x hex
 * with an optional K/M/G suffix, base decimal or 0x hex, irq and id decimal. Checks the size
 * (VIRTIO_MMIO_MIN_SIZE..VIRTIO_MMIO_MAX_SIZE), the base's alignment (4: registers are 32-bit)
 * and that the window ends below VIRTIO_MMIO_ADDR_LIMIT. Returns true, or false with *why set to
 * a static message. The irq is recorded as a level-triggered, active-high GSI: QEMU holds the
 * line until InterruptACK (other hosts' trigger mode is not verified here).
 */
bool virtio_mmio_parse_device(const char *s, struct virtio_mmio_device *out, const char **why);

/*
 * QEMU microvm's transports (hw/i386/microvm.c, QEMU 7.2): 512-byte slots from 0xfeb00000, one
 * per IOAPIC pin of the line block they use. With ACPI on (the default) there is a second IOAPIC
 * and 24 slots on GSIs 24..47; with acpi=off, 8 slots on GSIs 5..12; with ACPI on and
 * ioapic2=off, 8 slots on GSIs 16..23. Every transport shows the magic even without a device, so
 * the number found tells 24 from 8; 8 leaves the line unknown (VIRTIO_IRQ_NONE).
 */
#define MICROVM_MMIO_BASE      0xfeb00000ull
#define MICROVM_MMIO_SLOT      512
#define MICROVM_MMIO_MAX_SLOTS 24
#define MICROVM_IOAPIC2_GSI    24

/* Fills out[] with the slots of QEMU microvm's window that hold a transport (empty or not), in
 * slot order, their lines set by the rule above; returns how many. */
unsigned virtio_mmio_probe_microvm(struct virtio_mmio_device out[MICROVM_MMIO_MAX_SLOTS]);

/* Whether two windows share a byte. */
bool virtio_mmio_overlap(const struct virtio_mmio_device *a, const struct virtio_mmio_device *b);

#endif
