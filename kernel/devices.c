#include "kernel/devices.h"
#include "include/bus.h"
#include "lib/json.h"
#include "lib/printf.h"
#include "virtio/balloon.h"
#include "virtio/virtio_mmio.h"
#include "virtio/virtio_pci.h"

/* The transport state the bound device keeps for as long as the kernel runs. */
static struct virtio_pci vpci;
static struct virtio_mmio vmmio;

static void announce(const struct virtio_transport *t, const char *source, uint64_t base)
{
    struct json j;
    event_begin(&j, "virtio_device");
    json_str(&j, "transport", t->name);
    json_str(&j, "source", source);
    json_u64(&j, "device_id", t->device_id);
    if (base)
        json_u64(&j, "base", base);
    json_str(&j, "irq",
             t->irq.kind == VIRTIO_IRQ_GSI    ? "gsi"
             : t->irq.kind == VIRTIO_IRQ_MSIX ? "msix"
                                              : "none");
    if (t->irq.kind == VIRTIO_IRQ_GSI)
        json_u64(&j, "gsi", t->irq.gsi);
    event_emit(&j);
}

static bool any_function(const struct pci_func *f, void *ctx)
{
    (void)f;
    (void)ctx;
    return true;
}

static bool try_mmio(const struct virtio_mmio_device *d, enum virtio_mmio_versions v,
                     bool from_cmdline, struct virtio_transport *t)
{
    enum virtio_mmio_result r = virtio_mmio_bind(d, VIRTIO_ID_BALLOON, v, &vmmio, t);
    if (r == VIRTIO_MMIO_BOUND) {
        announce(t, from_cmdline ? "cmdline" : "probe", d->base);
        return true;
    }
    /* A command-line entry names a device: say so when there is none (a probe stays quiet). */
    if (r == VIRTIO_MMIO_EMPTY && from_cmdline)
        kprintf("virtio-mmio: virtio_mmio.device=0x%lx@0x%lx: no device there, skipped\n", d->size,
                d->base);
    return false;
}

int find_balloon(const struct options *o, struct virtio_transport *t)
{
    enum virtio_mmio_versions v = o->virtio == VIRTIO_MODERN   ? VIRTIO_MMIO_V2_ONLY
                                  : o->virtio == VIRTIO_LEGACY ? VIRTIO_MMIO_V1_ONLY
                                                               : VIRTIO_MMIO_ANY;
    for (unsigned i = 0; i < o->n_virtio_mmio; i++)
        if (try_mmio(&o->virtio_mmio[i], v, true, t))
            return 0;

    if (o->virtio != VIRTIO_MMIO_ONLY) {
        enum virtio_pci_choice c = o->virtio == VIRTIO_MODERN   ? VIRTIO_PCI_MODERN
                                   : o->virtio == VIRTIO_LEGACY ? VIRTIO_PCI_LEGACY
                                                                : VIRTIO_PCI_AUTO;
        if (virtio_pci_find(VIRTIO_ID_BALLOON, c, &vpci, t) == 0) {
            announce(t, "pci", 0);
            return 0;
        }
    }
    /* Reading unknown MMIO can have side effects; microvm's window is only assumed where
     * there is no PCI to have put something else there. */
    if (pci_scan(any_function, NULL)) {
        kprintf("virtio-mmio: PCI functions present: QEMU microvm's window not probed\n");
        return -1;
    }
    struct virtio_mmio_device slots[MICROVM_MMIO_MAX_SLOTS];
    unsigned n = virtio_mmio_probe_microvm(slots);
    kprintf("virtio-mmio: 0x%lx: %u transports (QEMU microvm), interrupt lines %s\n",
            (uint64_t)MICROVM_MMIO_BASE, n,
            n == MICROVM_MMIO_MAX_SLOTS ? "from GSI 24 (second IOAPIC)" : "unknown");
    for (unsigned i = 0; i < n; i++) {
        bool listed = false; /* already tried as a command-line entry */
        for (unsigned k = 0; k < o->n_virtio_mmio; k++)
            listed |= virtio_mmio_overlap(&o->virtio_mmio[k], &slots[i]);
        if (!listed && try_mmio(&slots[i], v, false, t))
            return 0;
    }
    return -1;
}
