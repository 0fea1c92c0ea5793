/*
 * virtio-pci transports (virtio spec 4.1). Modern: the common, notify, ISR and device-config
 * structures are found through vendor capabilities (cap id 0x09) and reached as bus regions
 * wherever the firmware put the BAR (OVMF: 0xE000000000). Legacy: a 20-byte register header in
 * I/O BAR0 followed by the device config (QEMU's balloon has no MSI-X, so the config is at +20).
 * Everything the device reports -- capability fields, BARs, queue notify offsets -- is checked
 * before it becomes an address.
 */
#include "virtio/virtio_pci.h"
#include "include/bus.h"
#include "include/platform.h"

#define VIRTIO_VENDOR    0x1af4
#define PCI_CAP_ID_MSIX  0x11
#define MSIX_CTRL        2 /* capability offsets: message control, table offset/BIR */
#define MSIX_TABLE       4
#define MSIX_CAP_SIZE    12
#define MSIX_ENABLE      0x8000
#define MSIX_FUNC_MASK   0x4000
#define MSIX_ENTRY       16 /* table entry: addr lo, addr hi, data, vector control */
#define RESET_TIMEOUT_NS (1000ull * 1000 * 1000)

/* Device ids (spec 4.1.2): modern-only 0x1040 + type; transitional 0x1000..0x103f, with the
 * type in the subsystem device id. */
#define VIRTIO_PCI_MODERN_BASE      0x1040
#define VIRTIO_PCI_TRANSITIONAL_MIN 0x1000
#define VIRTIO_PCI_TRANSITIONAL_MAX 0x103f

/* Vendor capability layout (spec 4.1.4). */
enum {
    CAP_LEN = 2,
    CAP_CFG_TYPE = 3,
    CAP_BAR = 4,
    CAP_OFFSET = 8,
    CAP_LENGTH = 12,
    CAP_NOTIFY_MULT = 16,
    CAP_SIZE = 16,        /* struct virtio_pci_cap */
    CAP_NOTIFY_SIZE = 20, /* struct virtio_pci_notify_cap */
};
enum { CFG_COMMON = 1, CFG_NOTIFY = 2, CFG_ISR = 3, CFG_DEVICE = 4 };

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
    CC_SIZE = 0x38, /* everything up to and including queue_used */
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
    L_CONFIG = 20,      /* device config without MSI-X */
    L_MSIX_CONFIG = 20, /* with MSI-X on: the config vector, */
    L_MSIX_QUEUE = 22,  /* the selected queue's vector, */
    L_CONFIG_MSIX = 24, /* and the device config after them */
};

static struct virtio_pci *vp_of(struct virtio_transport *t)
{
    return t->priv;
}

static void msix_assign_config(struct virtio_transport *t);
static void msix_assign_queue(struct virtio_transport *t);
static int msix_setup(struct virtio_transport *t, const struct virtio_msix_msg msgs[2]);

static bool cfg_in_range(struct virtio_transport *t, unsigned off, unsigned width)
{
    return (width == 1 || width == 2 || width == 4) && off % width == 0 && off < t->config_size &&
           width <= t->config_size - off;
}

static uint32_t region_read(const struct bus_region *r, uint64_t off, unsigned width)
{
    return width == 1 ? bus_read8(r, off) : width == 2 ? bus_read16(r, off) : bus_read32(r, off);
}

static void region_write(const struct bus_region *r, uint64_t off, unsigned width, uint32_t v)
{
    if (width == 1)
        bus_write8(r, off, (uint8_t)v);
    else if (width == 2)
        bus_write16(r, off, (uint16_t)v);
    else
        bus_write32(r, off, v); /* one 4-byte access: the spec's rule for multi-byte fields */
}

/* ---- modern ---- */

static uint8_t m_get_status(struct virtio_transport *t)
{
    t->exits.status++;
    return bus_read8(&vp_of(t)->common, CC_STATUS);
}

static void m_set_status(struct virtio_transport *t, uint8_t s)
{
    t->exits.status++;
    bus_write8(&vp_of(t)->common, CC_STATUS, s);
}

static int m_reset(struct virtio_transport *t)
{
    m_set_status(t, 0);
    /* A modern device may take a while: it is reset when status reads back 0 (spec 4.1.4.3.2).
     * Each read is a device access (a VM exit under a hypervisor), which paces the loop. */
    uint64_t deadline = platform_now_ns() + RESET_TIMEOUT_NS;
    while (m_get_status(t) != 0)
        if (platform_now_ns() > deadline)
            return -1;
    msix_assign_config(t); /* a reset drops the device's vectors (QEMU: to NO_VECTOR) */
    return 0;
}

static uint64_t m_get_features(struct virtio_transport *t)
{
    const struct bus_region *c = &vp_of(t)->common;
    t->exits.status += 4;
    bus_write32(c, CC_DFSELECT, 0);
    uint64_t lo = bus_read32(c, CC_DF);
    bus_write32(c, CC_DFSELECT, 1);
    uint64_t hi = bus_read32(c, CC_DF);
    return hi << 32 | lo;
}

static void m_set_features(struct virtio_transport *t, uint64_t f)
{
    const struct bus_region *c = &vp_of(t)->common;
    t->exits.status += 4;
    bus_write32(c, CC_GFSELECT, 0);
    bus_write32(c, CC_GF, (uint32_t)f);
    bus_write32(c, CC_GFSELECT, 1);
    bus_write32(c, CC_GF, (uint32_t)(f >> 32));
}

static bool m_config_read(struct virtio_transport *t, unsigned off, unsigned width, uint32_t *v)
{
    if (!cfg_in_range(t, off, width))
        return false;
    t->exits.config_reads++;
    *v = region_read(&vp_of(t)->device_cfg, off, width);
    return true;
}

static bool m_config_write(struct virtio_transport *t, unsigned off, unsigned width, uint32_t v)
{
    if (!cfg_in_range(t, off, width))
        return false;
    t->exits.config_writes++;
    region_write(&vp_of(t)->device_cfg, off, width, v);
    return true;
}

static uint32_t m_config_generation(struct virtio_transport *t)
{
    t->exits.status++;
    return bus_read8(&vp_of(t)->common, CC_CFGGEN);
}

static uint16_t m_queue_max_size(struct virtio_transport *t, unsigned index)
{
    const struct bus_region *c = &vp_of(t)->common;
    t->exits.status++;
    if (index >= bus_read16(c, CC_NUMQ))
        return 0;
    t->exits.status += 2;
    bus_write16(c, CC_Q_SELECT, (uint16_t)index);
    return bus_read16(c, CC_Q_SIZE);
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
    const struct bus_region *c = &vp->common;
    if (index >= VIRTIO_PCI_MAX_QUEUES)
        return -1;
    t->exits.status += 10;
    bus_write16(c, CC_Q_SELECT, (uint16_t)index);
    bus_write16(c, CC_Q_SIZE, size);
    bus_write16(c, CC_Q_MSIX, VIRTIO_MSI_NO_VECTOR);
    msix_assign_queue(t); /* with MSI-X on: the queues' vector, read back */
    bus_write32(c, CC_Q_DESCLO, (uint32_t)a->desc);
    bus_write32(c, CC_Q_DESCHI, (uint32_t)(a->desc >> 32));
    bus_write32(c, CC_Q_AVAILLO, (uint32_t)a->avail);
    bus_write32(c, CC_Q_AVAILHI, (uint32_t)(a->avail >> 32));
    bus_write32(c, CC_Q_USEDLO, (uint32_t)a->used);
    bus_write32(c, CC_Q_USEDHI, (uint32_t)(a->used >> 32));
    uint16_t noff = bus_read16(c, CC_Q_NOFF);
    /* The 16-bit notify store must land, aligned, inside the notify structure. */
    uint64_t at = (uint64_t)noff * vp->notify_mult;
    if (at % 2 != 0 || at + 2 > vp->notify.size) {
        platform_log("virtio-pci: queue %u notify offset %u (x%u) is outside the %llu-byte "
                     "notify area",
                     index, noff, vp->notify_mult, (unsigned long long)vp->notify.size);
        return -1;
    }
    vp->notify_off[index] = noff;
    t->exits.status++;
    bus_write16(c, CC_Q_ENABLE, 1);
    return 0;
}

static void m_notify(struct virtio_transport *t, unsigned index)
{
    struct virtio_pci *vp = vp_of(t);
    t->exits.notifies++;
    if (index < VIRTIO_PCI_MAX_QUEUES)
        bus_write16(&vp->notify, (uint64_t)vp->notify_off[index] * vp->notify_mult,
                    (uint16_t)index);
}

static uint8_t m_read_isr(struct virtio_transport *t)
{
    t->exits.isr_reads++;
    return bus_read8(&vp_of(t)->isr, 0);
}

static bool pow2_or_zero(uint32_t v)
{
    return (v & (v - 1)) == 0;
}

/* Spec 4.1.4.3.1: after a reset the status reads 0 and every queue_enable 0; queue_size is 0
 * or a power of 2; a feature window reads the same every time it is selected. */
static unsigned m_check_registers(struct virtio_transport *t, struct virtio_reg_check *out,
                                  unsigned max)
{
    const struct bus_region *c = &vp_of(t)->common;
    unsigned n = 0;
    m_reset(t); /* waits (bounded) for the status to read 0 */
    uint8_t st = m_get_status(t);
    virtio_reg_check_add(out, &n, max, "device_status reads 0 after a reset", st == 0,
                         "device_status 0x%02x", st, 0, 0, 0);
    uint16_t numq = bus_read16(c, CC_NUMQ);
    unsigned bad_en = 0, bad_size = 0, first_bad = 0;
    for (unsigned q = 0; q < numq && q < VIRTIO_PCI_MAX_QUEUES; q++) {
        bus_write16(c, CC_Q_SELECT, (uint16_t)q);
        uint16_t en = bus_read16(c, CC_Q_ENABLE), size = bus_read16(c, CC_Q_SIZE);
        if (en && !bad_en++)
            first_bad = q;
        bad_size += !pow2_or_zero(size);
    }
    virtio_reg_check_add(out, &n, max, "queue_enable reads 0 on every queue after a reset",
                         bad_en == 0, "%u queues, %u enabled (first: %u)", numq, bad_en, first_bad,
                         0);
    virtio_reg_check_add(out, &n, max, "queue_size is 0 or a power of 2", bad_size == 0,
                         "%u queues, %u bad sizes", numq, bad_size, 0, 0);
    uint32_t w[2][2];
    for (unsigned pass = 0; pass < 2; pass++)
        for (unsigned sel = 0; sel < 2; sel++) {
            bus_write32(c, CC_DFSELECT, sel);
            w[pass][sel] = bus_read32(c, CC_DF);
        }
    virtio_reg_check_add(out, &n, max, "device_feature shows the same bits per select window",
                         w[0][0] == w[1][0] && w[0][1] == w[1][1],
                         "window 0: 0x%08x/0x%08x, window 1: 0x%08x/0x%08x", w[0][0], w[1][0],
                         w[0][1], w[1][1]);
    t->exits.status += 1 + 3 * numq + 8; /* numq, per queue select/enable/size, 4 windows */
    return n;
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
    .check_registers = m_check_registers,
    .msix_setup = msix_setup,
};

/* ---- legacy ---- */

static const struct bus_region *io_of(struct virtio_transport *t)
{
    return &vp_of(t)->legacy;
}

static uint8_t l_get_status(struct virtio_transport *t)
{
    t->exits.status++;
    return bus_read8(io_of(t), L_STATUS);
}

static void l_set_status(struct virtio_transport *t, uint8_t s)
{
    t->exits.status++;
    bus_write8(io_of(t), L_STATUS, s);
}

static int l_reset(struct virtio_transport *t)
{
    l_set_status(t, 0);
    if (l_get_status(t) != 0) /* legacy reset completes on the write */
        return -1;
    msix_assign_config(t);
    return 0;
}

static uint64_t l_get_features(struct virtio_transport *t)
{
    t->exits.status++;
    return bus_read32(io_of(t), L_HOST_FEATURES);
}

static void l_set_features(struct virtio_transport *t, uint64_t f)
{
    t->exits.status++;
    bus_write32(io_of(t), L_GUEST_FEATURES, (uint32_t)f);
}

static bool l_config_read(struct virtio_transport *t, unsigned off, unsigned width, uint32_t *v)
{
    if (!cfg_in_range(t, off, width))
        return false;
    t->exits.config_reads++;
    *v = region_read(io_of(t), vp_of(t)->legacy_cfg + off, width);
    return true;
}

static bool l_config_write(struct virtio_transport *t, unsigned off, unsigned width, uint32_t v)
{
    if (!cfg_in_range(t, off, width))
        return false;
    t->exits.config_writes++;
    region_write(io_of(t), vp_of(t)->legacy_cfg + off, width, v);
    return true;
}

static uint32_t l_config_generation(struct virtio_transport *t)
{
    (void)t;
    return 0;
}

static uint16_t l_queue_max_size(struct virtio_transport *t, unsigned index)
{
    t->exits.status += 2;
    bus_write16(io_of(t), L_QUEUE_SEL, (uint16_t)index);
    return bus_read16(io_of(t), L_QUEUE_NUM);
}

static bool l_needs_legacy_layout(struct virtio_transport *t)
{
    (void)t;
    return true;
}

static int l_queue_enable(struct virtio_transport *t, unsigned index, uint16_t size,
                          const struct vq_addrs *a)
{
    t->exits.status += 3;
    bus_write16(io_of(t), L_QUEUE_SEL, (uint16_t)index);
    /* Legacy queues have the device's fixed size and one contiguous 4 KiB-aligned area. */
    if (bus_read16(io_of(t), L_QUEUE_NUM) != size || (a->desc & 0xfff) ||
        (a->desc >> 12) > 0xffffffffu)
        return -1;
    bus_write32(io_of(t), L_QUEUE_PFN, (uint32_t)(a->desc >> 12));
    msix_assign_queue(t); /* the queue is still selected */
    return 0;
}

static void l_notify(struct virtio_transport *t, unsigned index)
{
    t->exits.notifies++;
    bus_write16(io_of(t), L_QUEUE_NOTIFY, (uint16_t)index);
}

static uint8_t l_read_isr(struct virtio_transport *t)
{
    t->exits.isr_reads++;
    return bus_read8(io_of(t), L_ISR);
}

/* Legacy (spec 4.1.4.10 and 2.4): status 0 after a reset, no queue address left behind. */
static unsigned l_check_registers(struct virtio_transport *t, struct virtio_reg_check *out,
                                  unsigned max)
{
    unsigned n = 0;
    bus_write8(io_of(t), L_STATUS, 0);
    uint8_t st = bus_read8(io_of(t), L_STATUS);
    virtio_reg_check_add(out, &n, max, "device status reads 0 after a reset", st == 0,
                         "status 0x%02x", st, 0, 0, 0);
    unsigned bad_pfn = 0, bad_size = 0, queues = 0;
    for (unsigned q = 0; q < VIRTIO_PCI_MAX_QUEUES; q++) {
        bus_write16(io_of(t), L_QUEUE_SEL, (uint16_t)q);
        uint16_t size = bus_read16(io_of(t), L_QUEUE_NUM);
        if (!size)
            break;
        queues++;
        bad_size += !pow2_or_zero(size);
        bad_pfn += bus_read32(io_of(t), L_QUEUE_PFN) != 0;
    }
    virtio_reg_check_add(out, &n, max, "queue address (QUEUE_PFN) reads 0 after a reset",
                         bad_pfn == 0, "%u queues, %u with an address", queues, bad_pfn, 0, 0);
    virtio_reg_check_add(out, &n, max, "queue size is 0 or a power of 2", bad_size == 0,
                         "%u queues, %u bad sizes", queues, bad_size, 0, 0);
    t->exits.status += 2 + 3 * queues;
    return n;
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
    .check_registers = l_check_registers,
    .msix_setup = msix_setup,
};

/* ---- MSI-X ---- */

static unsigned msix_entry(const struct virtio_pci *vp, unsigned which)
{
    return vp->msix_size > which ? which : 0; /* a one-entry table serves both */
}

/* The device refused a vector, or MSI-X cannot be had: INTx again (and, on legacy, the device
 * config back at 20). */
static void msix_off(struct virtio_transport *t, const char *why)
{
    struct virtio_pci *vp = vp_of(t);
    const struct pci_func *f = &vp->pci;
    uint16_t ctrl = pci_cfg_read16(f, vp->msix_cap + MSIX_CTRL);
    pci_cfg_write16(f, vp->msix_cap + MSIX_CTRL, (uint16_t)(ctrl & ~MSIX_ENABLE));
    uint16_t cmd = pci_cfg_read16(f, PCI_CFG_COMMAND);
    pci_cfg_write16(f, PCI_CFG_COMMAND, (uint16_t)(cmd & ~PCI_CMD_INTX_OFF));
    vp->msix_on = false;
    if (t->legacy) {
        vp->legacy_cfg = L_CONFIG;
        t->config_size = (unsigned)(vp->legacy.size - L_CONFIG);
    }
    t->irq = vp->intx;
    platform_log("virtio-pci: MSI-X off (%s): back to %s", why,
                 t->irq.kind == VIRTIO_IRQ_GSI ? "INTx" : "polling");
}

/* Write a vector register and read it back: VIRTIO_MSI_NO_VECTOR back means refused. */
static bool msix_set(struct virtio_transport *t, unsigned which)
{
    struct virtio_pci *vp = vp_of(t);
    uint16_t want = (uint16_t)msix_entry(vp, which), got;
    t->exits.status += 2;
    if (t->legacy) {
        unsigned reg = which == VIRTIO_MSIX_CONFIG ? L_MSIX_CONFIG : L_MSIX_QUEUE;
        bus_write16(&vp->legacy, reg, want);
        got = bus_read16(&vp->legacy, reg);
    } else {
        unsigned reg = which == VIRTIO_MSIX_CONFIG ? CC_MSIX : CC_Q_MSIX;
        bus_write16(&vp->common, reg, want);
        got = bus_read16(&vp->common, reg);
    }
    return got == want;
}

static void msix_assign_config(struct virtio_transport *t)
{
    if (vp_of(t)->msix_on && !msix_set(t, VIRTIO_MSIX_CONFIG))
        msix_off(t, "the device refused the config vector");
}

static void msix_assign_queue(struct virtio_transport *t)
{
    if (vp_of(t)->msix_on && !msix_set(t, VIRTIO_MSIX_QUEUES))
        msix_off(t, "the device refused a queue vector");
}

/* The MSI-X capability, if the device has one, and its table (checked against its BAR). */
static void find_msix(struct virtio_pci *vp)
{
    const struct pci_func *f = &vp->pci;
    unsigned cap = pci_find_cap(f, PCI_CAP_ID_MSIX);
    if (!cap || cap + MSIX_CAP_SIZE > PCI_CFG_SIZE)
        return;
    unsigned size = (pci_cfg_read16(f, cap + MSIX_CTRL) & 0x7ff) + 1;
    uint32_t where = pci_cfg_read32(f, cap + MSIX_TABLE);
    unsigned bir = where & 7;
    uint64_t off = where & ~7u, len = (uint64_t)size * MSIX_ENTRY;
    if (bir >= PCI_BARS || f->bar[bir].io || off + len > f->bar[bir].size ||
        pci_map_bar(f, bir, off, len, &vp->msix_table) != 0) {
        platform_log("virtio-pci: MSI-X table (BAR %u, 0x%lx, %u entries) is unusable", bir,
                     (unsigned long)off, size);
        return;
    }
    vp->msix_cap = cap;
    vp->msix_size = size;
}

static int msix_setup(struct virtio_transport *t, const struct virtio_msix_msg msgs[2])
{
    struct virtio_pci *vp = vp_of(t);
    const struct pci_func *f = &vp->pci;
    if (!vp->msix_cap)
        return -1;
    uint16_t ctrl = pci_cfg_read16(f, vp->msix_cap + MSIX_CTRL);
    /* Program the table with the function masked, then unmask (PCI 6.8.2.9). */
    pci_cfg_write16(f, vp->msix_cap + MSIX_CTRL, (uint16_t)(ctrl | MSIX_ENABLE | MSIX_FUNC_MASK));
    for (unsigned i = 0; i < 2 && i < vp->msix_size; i++) {
        uint64_t e = (uint64_t)i * MSIX_ENTRY;
        bus_write32(&vp->msix_table, e, (uint32_t)msgs[i].addr);
        bus_write32(&vp->msix_table, e + 4, (uint32_t)(msgs[i].addr >> 32));
        bus_write32(&vp->msix_table, e + 8, msgs[i].data);
        bus_write32(&vp->msix_table, e + 12, 0); /* unmasked */
    }
    pci_cfg_write16(f, vp->msix_cap + MSIX_CTRL,
                    (uint16_t)((ctrl | MSIX_ENABLE) & ~MSIX_FUNC_MASK));
    uint16_t cmd = pci_cfg_read16(f, PCI_CFG_COMMAND);
    pci_cfg_write16(f, PCI_CFG_COMMAND, (uint16_t)(cmd | PCI_CMD_INTX_OFF));
    vp->msix_on = true;
    if (t->legacy) {
        vp->legacy_cfg = L_CONFIG_MSIX;
        t->config_size = (unsigned)(vp->legacy.size - L_CONFIG_MSIX);
    }
    t->irq = (struct virtio_irq){.kind = VIRTIO_IRQ_MSIX};
    msix_assign_config(t);
    if (!vp->msix_on)
        return -1;
    platform_log("virtio-pci: MSI-X on: %u table entries, config vector %u, queue vector %u",
                 vp->msix_size, msix_entry(vp, VIRTIO_MSIX_CONFIG),
                 msix_entry(vp, VIRTIO_MSIX_QUEUES));
    return 0;
}

/* ---- discovery ---- */

struct find_ctx {
    uint16_t device_id;
    struct pci_func *found;
};

static bool match(const struct pci_func *f, void *p)
{
    struct find_ctx *ctx = p;
    if (f->vendor != VIRTIO_VENDOR)
        return false;
    bool modern = f->device == VIRTIO_PCI_MODERN_BASE + ctx->device_id;
    bool transitional = f->device >= VIRTIO_PCI_TRANSITIONAL_MIN &&
                        f->device <= VIRTIO_PCI_TRANSITIONAL_MAX &&
                        f->subsys_device == ctx->device_id;
    if (modern || transitional)
        *ctx->found = *f;
    return modern || transitional;
}

/* The smallest structure of each type the driver will touch. */
static uint32_t min_length(uint8_t type)
{
    switch (type) {
    case CFG_COMMON:
        return CC_SIZE;
    case CFG_NOTIFY:
        return 2;
    case CFG_ISR:
        return 1;
    default:
        return 0;
    }
}

/* Map the structure the capability at cap describes; false (logged) when it is unusable. */
static bool map_cap(const struct pci_func *f, unsigned cap, uint8_t type, struct bus_region *out)
{
    unsigned need = type == CFG_NOTIFY ? CAP_NOTIFY_SIZE : CAP_SIZE;
    if (cap + need > PCI_CFG_SIZE || pci_cfg_read8(f, cap + CAP_LEN) < need) {
        platform_log("virtio-pci: capability at 0x%x is too short", cap);
        return false;
    }
    uint8_t bar = pci_cfg_read8(f, cap + CAP_BAR);
    uint32_t off = pci_cfg_read32(f, cap + CAP_OFFSET);
    uint32_t len = pci_cfg_read32(f, cap + CAP_LENGTH);
    /* Checked here, not left to pci_map_bar: bar indexes f->bar, and the sum must not wrap. A
     * structure must start 4-aligned, or its 16- and 32-bit registers would be misaligned (found
     * by tests/fuzz/fuzz_virtio_pci). */
    if (bar >= PCI_BARS || off % 4 != 0 || len < min_length(type) || !f->bar[bar].size ||
        (uint64_t)off + len > f->bar[bar].size || pci_map_bar(f, bar, off, len, out) != 0) {
        platform_log("virtio-pci: capability at 0x%x (type %u, BAR %u, 0x%x+0x%x) is unusable", cap,
                     type, bar, off, len);
        return false;
    }
    return true;
}

static int setup_modern(struct virtio_pci *vp, struct virtio_transport *t)
{
    const struct pci_func *f = &vp->pci;
    unsigned notify_cap = 0;
    struct pci_cap_walk w;
    pci_cap_walk_start(&w, f);
    for (unsigned cap; (cap = pci_cap_walk_next(&w, PCI_CAP_ID_VENDOR)) != 0;) {
        uint8_t type = pci_cfg_read8(f, cap + CAP_CFG_TYPE);
        /* The first usable capability of each type wins (spec 4.1.4); others are ignored. */
        if (type == CFG_COMMON && !vp->common.size)
            map_cap(f, cap, type, &vp->common);
        else if (type == CFG_NOTIFY && !vp->notify.size) {
            if (map_cap(f, cap, type, &vp->notify))
                notify_cap = cap;
        } else if (type == CFG_ISR && !vp->isr.size)
            map_cap(f, cap, type, &vp->isr);
        else if (type == CFG_DEVICE && !vp->device_cfg.size)
            map_cap(f, cap, type, &vp->device_cfg);
    }
    if (!vp->common.size || !vp->notify.size || !vp->isr.size || !vp->device_cfg.size)
        return -1;
    vp->notify_mult = pci_cfg_read32(f, notify_cap + CAP_NOTIFY_MULT);
    t->ops = &modern_ops;
    t->name = "virtio-pci-modern";
    t->legacy = false;
    t->config_size = (unsigned)vp->device_cfg.size;
    return 0;
}

static int setup_legacy(struct virtio_pci *vp, struct virtio_transport *t)
{
    const struct pci_bar *b = &vp->pci.bar[0];
    /* Modern-only devices (0x1040+) have no legacy face, whatever BAR0 looks like. */
    /* Room for the MSI-X registers too when the device has MSI-X (its config then starts at
     * 24). */
    unsigned need = vp->msix_cap ? L_CONFIG_MSIX : L_CONFIG;
    if (vp->pci.device >= VIRTIO_PCI_MODERN_BASE || !b->io || !b->base || b->size <= need ||
        pci_map_bar(&vp->pci, 0, 0, b->size, &vp->legacy) != 0)
        return -1;
    t->ops = &legacy_ops;
    t->name = "virtio-pci-legacy";
    t->legacy = true;
    vp->legacy_cfg = L_CONFIG;
    t->config_size = (unsigned)(vp->legacy.size - L_CONFIG);
    return 0;
}

/* INTx (spec 4.1.5.3): the pin the device uses and the line the firmware routed it to, in the
 * standard header. The line is an 8259 IRQ number (what SeaBIOS/OVMF wrote), so the kernel maps it
 * through the ACPI overrides; PCI's own default is level-triggered, active low. */
static void find_intx(struct virtio_pci *vp, struct virtio_transport *t)
{
    const struct pci_func *f = &vp->pci;
    uint8_t pin = pci_cfg_read8(f, PCI_CFG_INT_PIN), line = pci_cfg_read8(f, PCI_CFG_INT_LINE);
    t->irq = (struct virtio_irq){.kind = VIRTIO_IRQ_NONE};
    if (pin < 1 || pin > 4 || line == 0 || line >= 0xf0) {
        platform_log("virtio-pci: no INTx line (pin %u, line %u): polling", pin, line);
        return;
    }
    /* Interrupts on: clear INTx Disable in case firmware set it. */
    uint16_t cmd = pci_cfg_read16(f, PCI_CFG_COMMAND);
    if (cmd & PCI_CMD_INTX_OFF)
        pci_cfg_write16(f, PCI_CFG_COMMAND, (uint16_t)(cmd & ~PCI_CMD_INTX_OFF));
    t->irq = (struct virtio_irq){
        .kind = VIRTIO_IRQ_GSI, .gsi = line, .isa = true, .level = true, .active_low = true};
    vp->intx = t->irq;
    platform_log("virtio-pci: INTx pin %c, line %u", 'A' + pin - 1, line);
}

int virtio_pci_find(uint16_t device_id, enum virtio_pci_choice choice, struct virtio_pci *vp,
                    struct virtio_transport *t)
{
    *vp = (struct virtio_pci){0};
    struct find_ctx ctx = {.device_id = device_id, .found = &vp->pci};
    if (!pci_scan(match, &ctx))
        return -1;
    const struct pci_func *f = &vp->pci;
    platform_log("virtio-pci: %02x:%02x.%u %04x:%04x rev %u (virtio type %u)", f->bus, f->dev,
                 f->fn, f->vendor, f->device, f->revision, device_id);
    pci_enable(f);
    find_msix(vp);
    t->priv = vp;
    t->device_id = device_id;
    int rc = -1;
    if (choice != VIRTIO_PCI_LEGACY)
        rc = setup_modern(vp, t);
    if (rc != 0 && choice != VIRTIO_PCI_MODERN)
        rc = setup_legacy(vp, t);
    if (rc == 0)
        find_intx(vp, t);
    if (rc != 0)
        platform_log("virtio-pci: the device has no usable %s interface",
                     choice == VIRTIO_PCI_MODERN   ? "modern"
                     : choice == VIRTIO_PCI_LEGACY ? "legacy"
                                                   : "modern or legacy");
    return rc;
}
