/*
 * virtio-pci transports (virtio spec 4.1). Modern: the common, notify, ISR and device-config
 * structures are found through vendor capabilities (cap id 0x09) and mapped uncached wherever
 * the firmware put the BAR (OVMF: 0xE000000000). Legacy: a 20-byte register header in I/O BAR0
 * followed by the device config (QEMU's balloon has no MSI-X, so the config is at +20).
 */
#include "virtio/virtio_pci.h"
#include "arch/x86/io.h"
#include "arch/x86/paging.h"
#include "include/platform.h"
#include "lib/printf.h"

#define VIRTIO_VENDOR    0x1af4
#define RESET_TIMEOUT_NS (1000ull * 1000 * 1000)

/* Modern common configuration offsets (spec 4.1.4.3). */
enum {
    CC_DFSELECT = 0x00,
    CC_DF = 0x04,
    CC_GFSELECT = 0x08,
    CC_GF = 0x0c,
    CC_MSIX = 0x10,
    CC_NUMQ = 0x12,
    CC_STATUS = 0x14,
    CC_CFGGEN = 0x15,
    CC_Q_SELECT = 0x16,
    CC_Q_SIZE = 0x18,
    CC_Q_MSIX = 0x1a,
    CC_Q_ENABLE = 0x1c,
    CC_Q_NOFF = 0x1e,
    CC_Q_DESCLO = 0x20,
    CC_Q_DESCHI = 0x24,
    CC_Q_AVAILLO = 0x28,
    CC_Q_AVAILHI = 0x2c,
    CC_Q_USEDLO = 0x30,
    CC_Q_USEDHI = 0x34,
};

/* Legacy I/O header offsets (spec 4.1.4.10). */
enum {
    L_HOST_FEATURES = 0,
    L_GUEST_FEATURES = 4,
    L_QUEUE_PFN = 8,
    L_QUEUE_NUM = 12,
    L_QUEUE_SEL = 14,
    L_QUEUE_NOTIFY = 16,
    L_STATUS = 18,
    L_ISR = 19,
    L_CONFIG = 20,
};

static struct virtio_pci *vp_of(struct virtio_transport *t)
{
    return t->priv;
}

static inline uint8_t r8(volatile uint8_t *base, unsigned off)
{
    return *(volatile uint8_t *)(base + off);
}
static inline uint16_t r16(volatile uint8_t *base, unsigned off)
{
    return *(volatile uint16_t *)(base + off);
}
static inline uint32_t r32(volatile uint8_t *base, unsigned off)
{
    return *(volatile uint32_t *)(base + off);
}
static inline void w8(volatile uint8_t *base, unsigned off, uint8_t v)
{
    *(volatile uint8_t *)(base + off) = v;
}
static inline void w16(volatile uint8_t *base, unsigned off, uint16_t v)
{
    *(volatile uint16_t *)(base + off) = v;
}
static inline void w32(volatile uint8_t *base, unsigned off, uint32_t v)
{
    *(volatile uint32_t *)(base + off) = v;
}

/* ---- modern ---- */

static uint8_t m_get_status(struct virtio_transport *t)
{
    return r8(vp_of(t)->common, CC_STATUS);
}

static void m_set_status(struct virtio_transport *t, uint8_t s)
{
    w8(vp_of(t)->common, CC_STATUS, s);
}

static int m_reset(struct virtio_transport *t)
{
    m_set_status(t, 0);
    uint64_t deadline = platform_now_ns() + RESET_TIMEOUT_NS;
    while (m_get_status(t) != 0) {
        if (platform_now_ns() > deadline)
            return -1;
        cpu_pause();
    }
    return 0;
}

static uint64_t m_get_features(struct virtio_transport *t)
{
    volatile uint8_t *c = vp_of(t)->common;
    w32(c, CC_DFSELECT, 0);
    uint64_t lo = r32(c, CC_DF);
    w32(c, CC_DFSELECT, 1);
    uint64_t hi = r32(c, CC_DF);
    return hi << 32 | lo;
}

static void m_set_features(struct virtio_transport *t, uint64_t f)
{
    volatile uint8_t *c = vp_of(t)->common;
    w32(c, CC_GFSELECT, 0);
    w32(c, CC_GF, (uint32_t)f);
    w32(c, CC_GFSELECT, 1);
    w32(c, CC_GF, (uint32_t)(f >> 32));
}

static bool cfg_in_range(struct virtio_transport *t, unsigned off, unsigned width)
{
    return (width == 1 || width == 2 || width == 4) && off % width == 0 &&
           off + width <= t->config_size;
}

static bool m_config_read(struct virtio_transport *t, unsigned off, unsigned width, uint32_t *v)
{
    if (!cfg_in_range(t, off, width))
        return false;
    volatile uint8_t *d = vp_of(t)->device_cfg;
    *v = width == 1 ? r8(d, off) : width == 2 ? r16(d, off) : r32(d, off);
    return true;
}

static bool m_config_write(struct virtio_transport *t, unsigned off, unsigned width, uint32_t v)
{
    if (!cfg_in_range(t, off, width))
        return false;
    volatile uint8_t *d = vp_of(t)->device_cfg;
    if (width == 1)
        w8(d, off, (uint8_t)v);
    else if (width == 2)
        w16(d, off, (uint16_t)v);
    else
        w32(d, off, v);
    return true;
}

static uint32_t m_config_generation(struct virtio_transport *t)
{
    return r8(vp_of(t)->common, CC_CFGGEN);
}

static uint16_t m_queue_max_size(struct virtio_transport *t, unsigned index)
{
    volatile uint8_t *c = vp_of(t)->common;
    if (index >= r16(c, CC_NUMQ))
        return 0;
    w16(c, CC_Q_SELECT, (uint16_t)index);
    return r16(c, CC_Q_SIZE);
}

static bool m_needs_legacy_layout(struct virtio_transport *t)
{
    (void)t;
    return false;
}

static int m_queue_enable(struct virtio_transport *t, unsigned index, uint16_t size,
                          const struct vq_addrs *a)
{
    struct virtio_pci *vp = vp_of(t);
    volatile uint8_t *c = vp->common;
    if (index >= VIRTIO_PCI_MAX_QUEUES)
        return -1;
    w16(c, CC_Q_SELECT, (uint16_t)index);
    w16(c, CC_Q_SIZE, size);
    w16(c, CC_Q_MSIX, 0xffff); /* no vector: we poll the used rings and the ISR */
    w32(c, CC_Q_DESCLO, (uint32_t)a->desc);
    w32(c, CC_Q_DESCHI, (uint32_t)(a->desc >> 32));
    w32(c, CC_Q_AVAILLO, (uint32_t)a->avail);
    w32(c, CC_Q_AVAILHI, (uint32_t)(a->avail >> 32));
    w32(c, CC_Q_USEDLO, (uint32_t)a->used);
    w32(c, CC_Q_USEDHI, (uint32_t)(a->used >> 32));
    uint16_t noff = r16(c, CC_Q_NOFF);
    /* The notify address must lie inside the notify structure (untrusted value). */
    if ((uint64_t)noff * vp->notify_mult + 2 > vp->notify_len) {
        kprintf("virtio-pci: queue %u notify offset %u (x%u) is outside the %u-byte notify "
                "area\n",
                index, noff, vp->notify_mult, vp->notify_len);
        return -1;
    }
    vp->notify_off[index] = noff;
    w16(c, CC_Q_ENABLE, 1);
    return 0;
}

static void m_notify(struct virtio_transport *t, unsigned index)
{
    struct virtio_pci *vp = vp_of(t);
    if (index < VIRTIO_PCI_MAX_QUEUES)
        w16(vp->notify_base, vp->notify_off[index] * vp->notify_mult, (uint16_t)index);
}

static uint8_t m_read_isr(struct virtio_transport *t)
{
    return r8(vp_of(t)->isr, 0);
}

static const struct virtio_transport_ops modern_ops = {
    .reset = m_reset,
    .get_status = m_get_status,
    .set_status = m_set_status,
    .get_features = m_get_features,
    .set_features = m_set_features,
    .config_read = m_config_read,
    .config_write = m_config_write,
    .config_generation = m_config_generation,
    .queue_max_size = m_queue_max_size,
    .queue_needs_legacy_layout = m_needs_legacy_layout,
    .queue_enable = m_queue_enable,
    .notify = m_notify,
    .read_isr = m_read_isr,
};

/* ---- legacy ---- */

static uint16_t io_of(struct virtio_transport *t)
{
    return vp_of(t)->io_base;
}

static uint8_t l_get_status(struct virtio_transport *t)
{
    return inb(io_of(t) + L_STATUS);
}

static void l_set_status(struct virtio_transport *t, uint8_t s)
{
    outb(io_of(t) + L_STATUS, s);
}

static int l_reset(struct virtio_transport *t)
{
    l_set_status(t, 0);
    return l_get_status(t) == 0 ? 0 : -1; /* legacy reset completes on the write */
}

static uint64_t l_get_features(struct virtio_transport *t)
{
    return inl(io_of(t) + L_HOST_FEATURES);
}

static void l_set_features(struct virtio_transport *t, uint64_t f)
{
    outl(io_of(t) + L_GUEST_FEATURES, (uint32_t)f);
}

static bool l_config_read(struct virtio_transport *t, unsigned off, unsigned width, uint32_t *v)
{
    if (!cfg_in_range(t, off, width))
        return false;
    uint16_t port = (uint16_t)(io_of(t) + L_CONFIG + off);
    *v = width == 1 ? inb(port) : width == 2 ? inw(port) : inl(port);
    return true;
}

static bool l_config_write(struct virtio_transport *t, unsigned off, unsigned width, uint32_t v)
{
    if (!cfg_in_range(t, off, width))
        return false;
    uint16_t port = (uint16_t)(io_of(t) + L_CONFIG + off);
    if (width == 1)
        outb(port, (uint8_t)v);
    else if (width == 2)
        outw(port, (uint16_t)v);
    else
        outl(port, v); /* one 4-byte access: the spec's rule for `actual` */
    return true;
}

static uint32_t l_config_generation(struct virtio_transport *t)
{
    (void)t;
    return 0;
}

static uint16_t l_queue_max_size(struct virtio_transport *t, unsigned index)
{
    outw(io_of(t) + L_QUEUE_SEL, (uint16_t)index);
    return inw(io_of(t) + L_QUEUE_NUM);
}

static bool l_needs_legacy_layout(struct virtio_transport *t)
{
    (void)t;
    return true;
}

static int l_queue_enable(struct virtio_transport *t, unsigned index, uint16_t size,
                          const struct vq_addrs *a)
{
    outw(io_of(t) + L_QUEUE_SEL, (uint16_t)index);
    /* Legacy queues have the device's fixed size and one contiguous 4 KiB-aligned area. */
    if (inw(io_of(t) + L_QUEUE_NUM) != size || (a->desc & 0xfff) || (a->desc >> 12) > 0xffffffffu)
        return -1;
    outl(io_of(t) + L_QUEUE_PFN, (uint32_t)(a->desc >> 12));
    return 0;
}

static void l_notify(struct virtio_transport *t, unsigned index)
{
    outw(io_of(t) + L_QUEUE_NOTIFY, (uint16_t)index);
}

static uint8_t l_read_isr(struct virtio_transport *t)
{
    return inb(io_of(t) + L_ISR);
}

static const struct virtio_transport_ops legacy_ops = {
    .reset = l_reset,
    .get_status = l_get_status,
    .set_status = l_set_status,
    .get_features = l_get_features,
    .set_features = l_set_features,
    .config_read = l_config_read,
    .config_write = l_config_write,
    .config_generation = l_config_generation,
    .queue_max_size = l_queue_max_size,
    .queue_needs_legacy_layout = l_needs_legacy_layout,
    .queue_enable = l_queue_enable,
    .notify = l_notify,
    .read_isr = l_read_isr,
};

/* ---- discovery ---- */

struct find_ctx {
    uint16_t device_id;
    struct virtio_pci *vp;
    bool found;
};

static bool match(struct pci_dev *d, void *p)
{
    struct find_ctx *ctx = p;
    if (d->vendor != VIRTIO_VENDOR)
        return false;
    /* Modern devices are 0x1040 + type; transitional ones 0x1000..0x103f with the type in the
     * subsystem device id. */
    bool ok = d->device == 0x1040 + ctx->device_id ||
              (d->device >= 0x1000 && d->device <= 0x103f && d->subsys_device == ctx->device_id);
    if (ok) {
        ctx->vp->pci = *d;
        ctx->found = true;
    }
    return ok;
}

/* Map the part of a BAR a capability points at; NULL if it does not fit the BAR. */
static volatile uint8_t *map_cap(const struct pci_dev *d, unsigned cap, uint32_t *len_out)
{
    uint8_t bar = pci_read8(d, cap + 4);
    uint32_t off = pci_read32(d, cap + 8), len = pci_read32(d, cap + 12);
    if (bar > 5 || d->bar[bar].io || !d->bar[bar].base || (uint64_t)off + len > d->bar[bar].size)
        return NULL;
    uint64_t phys = d->bar[bar].base + off;
    if (paging_map(phys, len, MAP_MMIO) != 0)
        return NULL;
    if (len_out)
        *len_out = len;
    return phys_to_virt(phys);
}

static int setup_modern(struct virtio_pci *vp, struct virtio_transport *t)
{
    const struct pci_dev *d = &vp->pci;
    unsigned notify_cap = 0;
    uint32_t cfg_len = 0;
    for (unsigned cap = pci_find_cap(d, 0x09, 0); cap; cap = pci_find_cap(d, 0x09, cap)) {
        uint8_t type = pci_read8(d, cap + 3);
        /* The first capability of each type wins (spec 4.1.4). */
        if (type == 1 && !vp->common)
            vp->common = map_cap(d, cap, NULL);
        else if (type == 2 && !vp->notify_base) {
            vp->notify_base = map_cap(d, cap, &vp->notify_len);
            notify_cap = cap;
        } else if (type == 3 && !vp->isr)
            vp->isr = map_cap(d, cap, NULL);
        else if (type == 4 && !vp->device_cfg)
            vp->device_cfg = map_cap(d, cap, &cfg_len);
    }
    if (!vp->common || !vp->notify_base || !vp->isr || !vp->device_cfg)
        return -1;
    vp->notify_mult = pci_read32(d, notify_cap + 16);
    t->ops = &modern_ops;
    t->name = "virtio-pci-modern";
    t->legacy = false;
    t->config_size = cfg_len;
    return 0;
}

static int setup_legacy(struct virtio_pci *vp, struct virtio_transport *t)
{
    const struct pci_bar *b = &vp->pci.bar[0];
    if (!b->io || !b->base || b->size <= L_CONFIG || vp->pci.device >= 0x1040)
        return -1;
    vp->io_base = (uint16_t)b->base;
    t->ops = &legacy_ops;
    t->name = "virtio-pci-legacy";
    t->legacy = true;
    t->config_size = (unsigned)b->size - L_CONFIG;
    return 0;
}

int virtio_pci_find(uint16_t device_id, enum virtio_pci_choice choice, struct virtio_pci *vp,
                    struct virtio_transport *t)
{
    *vp = (struct virtio_pci){0};
    struct find_ctx ctx = {.device_id = device_id, .vp = vp};
    if (!pci_scan(match, &ctx))
        return -1;
    const struct pci_dev *d = &vp->pci;
    kprintf("virtio-pci: %02x:%02x.%u %04x:%04x rev %u (virtio type %u)\n", d->bus, d->dev, d->fn,
            d->vendor, d->device, d->revision, device_id);
    pci_enable(d);
    t->priv = vp;
    t->device_id = device_id;
    int rc = -1;
    if (choice != VIRTIO_PCI_LEGACY)
        rc = setup_modern(vp, t);
    if (rc != 0 && choice != VIRTIO_PCI_MODERN)
        rc = setup_legacy(vp, t);
    if (rc != 0)
        kprintf("virtio-pci: the device has no usable %s interface\n",
                choice == VIRTIO_PCI_MODERN   ? "modern"
                : choice == VIRTIO_PCI_LEGACY ? "legacy"
                                              : "modern or legacy");
    return rc;
}
