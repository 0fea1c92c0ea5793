/*
 * virtio-mmio transports (virtio spec 4.2). Version 2: QueueReady and 64-bit split-ring
 * addresses, 64 feature bits, FEATURES_OK, ConfigGeneration. Version 1 (legacy, 4.2.4):
 * GuestPageSize, QueueAlign and QueuePFN with the contiguous legacy ring layout, 32 feature bits.
 * Every register is 32 bits wide and accessed as such; the config space at 0x100 takes natural
 * widths and is bounded by the window. Every access counts in t->exits (a trap each under a
 * hypervisor).
 */
#include "virtio/virtio_mmio.h"
#include "include/bus.h"
#include "include/platform.h"
#include "lib/parse.h"
#include "lib/string.h" /* memcpy */

#define RESET_TIMEOUT_NS (1000ull * 1000 * 1000)
#define LEGACY_PAGE_SIZE 4096u /* GuestPageSize: QueuePFN counts these */
#define LEGACY_ALIGN     4096u /* QueueAlign: where the used ring starts (legacy layout) */
#define MAX_QUEUE_SIZE   32768u
#define VERSION_LEGACY   1
#define VERSION_MODERN   2

/* Register offsets (spec 4.2.2; legacy-only ones from 4.2.4). */
enum {
    R_MAGIC = 0x000,
    R_VERSION = 0x004,
    R_DEVICE_ID = 0x008,
    R_VENDOR_ID = 0x00c,
    R_DEV_FEATURES = 0x010,
    R_DEV_FEATURES_SEL = 0x014,
    R_DRV_FEATURES = 0x020,
    R_DRV_FEATURES_SEL = 0x024,
    R_GUEST_PAGE_SIZE = 0x028, /* v1 */
    R_QUEUE_SEL = 0x030,
    R_QUEUE_NUM_MAX = 0x034,
    R_QUEUE_NUM = 0x038,
    R_QUEUE_ALIGN = 0x03c, /* v1 */
    R_QUEUE_PFN = 0x040,   /* v1 */
    R_QUEUE_READY = 0x044, /* v2 */
    R_QUEUE_NOTIFY = 0x050,
    R_INT_STATUS = 0x060,
    R_INT_ACK = 0x064,
    R_STATUS = 0x070,
    R_QUEUE_DESC_LO = 0x080, /* v2, like the five after it */
    R_QUEUE_DESC_HI = 0x084,
    R_QUEUE_DRIVER_LO = 0x090,
    R_QUEUE_DRIVER_HI = 0x094,
    R_QUEUE_DEVICE_LO = 0x0a0,
    R_QUEUE_DEVICE_HI = 0x0a4,
    R_CONFIG_GEN = 0x0fc, /* v2 */
};

static struct virtio_mmio *vm_of(struct virtio_transport *t)
{
    return t->priv;
}

/* Register accesses, each counted against the exit kind it belongs to. */
static uint32_t rd(struct virtio_transport *t, unsigned off, uint64_t *count)
{
    (*count)++;
    return bus_read32(&vm_of(t)->regs, off);
}

static void wr(struct virtio_transport *t, unsigned off, uint32_t v, uint64_t *count)
{
    (*count)++;
    bus_write32(&vm_of(t)->regs, off, v);
}

/* ---- shared by both versions ---- */

static uint8_t mm_get_status(struct virtio_transport *t)
{
    return (uint8_t)rd(t, R_STATUS, &t->exits.status);
}

static void mm_set_status(struct virtio_transport *t, uint8_t s)
{
    wr(t, R_STATUS, s, &t->exits.status);
}

static int mm_reset(struct virtio_transport *t)
{
    mm_set_status(t, 0);
    /* Reset is done when the status reads back 0 (spec 4.2.2.1); each read is a trap, which
     * paces the loop. */
    uint64_t deadline = platform_now_ns() + RESET_TIMEOUT_NS;
    while (mm_get_status(t) != 0)
        if (platform_now_ns() > deadline)
            return -1;
    /* Legacy: the page size QueuePFN is counted in, before any queue is set up (4.2.4). Written
     * after every reset so no device can lose it. */
    if (vm_of(t)->version == VERSION_LEGACY)
        wr(t, R_GUEST_PAGE_SIZE, LEGACY_PAGE_SIZE, &t->exits.status);
    return 0;
}

static bool cfg_in_range(struct virtio_transport *t, unsigned off, unsigned width)
{
    return (width == 1 || width == 2 || width == 4) && off % width == 0 && off < t->config_size &&
           width <= t->config_size - off;
}

static bool mm_config_read(struct virtio_transport *t, unsigned off, unsigned width, uint32_t *v)
{
    if (!cfg_in_range(t, off, width))
        return false;
    const struct bus_region *r = &vm_of(t)->regs;
    uint64_t at = VIRTIO_MMIO_CONFIG + off;
    t->exits.config_reads++;
    *v = width == 1 ? bus_read8(r, at) : width == 2 ? bus_read16(r, at) : bus_read32(r, at);
    return true;
}

static bool mm_config_write(struct virtio_transport *t, unsigned off, unsigned width, uint32_t v)
{
    if (!cfg_in_range(t, off, width))
        return false;
    const struct bus_region *r = &vm_of(t)->regs;
    uint64_t at = VIRTIO_MMIO_CONFIG + off;
    t->exits.config_writes++;
    if (width == 1)
        bus_write8(r, at, (uint8_t)v);
    else if (width == 2)
        bus_write16(r, at, (uint16_t)v);
    else
        bus_write32(r, at, v);
    return true;
}

static uint16_t mm_queue_max_size(struct virtio_transport *t, unsigned index)
{
    wr(t, R_QUEUE_SEL, index, &t->exits.status);
    uint32_t max = rd(t, R_QUEUE_NUM_MAX, &t->exits.status);
    /* Read as 32 bits: a value the uint16_t cannot hold must not wrap into a plausible size. */
    if (max != 0 && ((max & (max - 1)) || max > MAX_QUEUE_SIZE)) {
        platform_log("virtio-mmio: queue %u: QueueNumMax %u is not a power of two up to %u", index,
                     max, MAX_QUEUE_SIZE);
        return 0;
    }
    return (uint16_t)max;
}

static void mm_notify(struct virtio_transport *t, unsigned index)
{
    wr(t, R_QUEUE_NOTIFY, index, &t->exits.notifies);
}

static uint8_t mm_read_isr(struct virtio_transport *t)
{
    uint32_t isr = rd(t, R_INT_STATUS, &t->exits.isr_reads);
    /* QEMU holds the (level) line until the bits are acknowledged: ack every bit read, even
     * ones we do not know, or the line would stay up. */
    if (isr)
        wr(t, R_INT_ACK, isr, &t->exits.isr_reads);
    return (uint8_t)(isr & (VIRTIO_ISR_QUEUE | VIRTIO_ISR_CONFIG));
}

/* The queue must be idle before it is programmed (4.2.3.2): after a reset it is. */
static bool select_idle_queue(struct virtio_transport *t, unsigned index, uint16_t size,
                              unsigned in_use_reg)
{
    wr(t, R_QUEUE_SEL, index, &t->exits.status);
    if (rd(t, in_use_reg, &t->exits.status) != 0) {
        platform_log("virtio-mmio: queue %u is already in use", index);
        return false;
    }
    uint32_t max = rd(t, R_QUEUE_NUM_MAX, &t->exits.status);
    if (size == 0 || (size & (size - 1)) || size > max) {
        platform_log("virtio-mmio: queue %u: size %u is not a power of two up to %u", index, size,
                     max);
        return false;
    }
    wr(t, R_QUEUE_NUM, size, &t->exits.status);
    return true;
}

/* ---- version 2 ---- */

static uint64_t m_get_features(struct virtio_transport *t)
{
    wr(t, R_DEV_FEATURES_SEL, 0, &t->exits.status);
    uint64_t lo = rd(t, R_DEV_FEATURES, &t->exits.status);
    wr(t, R_DEV_FEATURES_SEL, 1, &t->exits.status);
    uint64_t hi = rd(t, R_DEV_FEATURES, &t->exits.status);
    return hi << 32 | lo;
}

static void m_set_features(struct virtio_transport *t, uint64_t f)
{
    wr(t, R_DRV_FEATURES_SEL, 0, &t->exits.status);
    wr(t, R_DRV_FEATURES, (uint32_t)f, &t->exits.status);
    wr(t, R_DRV_FEATURES_SEL, 1, &t->exits.status);
    wr(t, R_DRV_FEATURES, (uint32_t)(f >> 32), &t->exits.status);
}

static uint32_t m_config_generation(struct virtio_transport *t)
{
    return rd(t, R_CONFIG_GEN, &t->exits.status);
}

static bool m_needs_legacy_layout(struct virtio_transport *t)
{
    (void)t;
    return false;
}

static void wr64(struct virtio_transport *t, unsigned lo, uint64_t v)
{
    wr(t, lo, (uint32_t)v, &t->exits.status);
    wr(t, lo + 4, (uint32_t)(v >> 32), &t->exits.status);
}

static int m_queue_enable(struct virtio_transport *t, unsigned index, uint16_t size,
                          const struct vq_addrs *a)
{
    if (!select_idle_queue(t, index, size, R_QUEUE_READY))
        return -1;
    wr64(t, R_QUEUE_DESC_LO, a->desc);
    wr64(t, R_QUEUE_DRIVER_LO, a->avail);
    wr64(t, R_QUEUE_DEVICE_LO, a->used);
    wr(t, R_QUEUE_READY, 1, &t->exits.status);
    return 0;
}

/* ---- conformance checks (spec 4.2.2.1), both versions ---- */

static unsigned mm_check_registers(struct virtio_transport *t, struct virtio_reg_check *out,
                                   unsigned max)
{
    unsigned n = 0;
    uint32_t magic = rd(t, R_MAGIC, &t->exits.status);
    uint32_t version = rd(t, R_VERSION, &t->exits.status);
    uint32_t want = vm_of(t)->version;
    virtio_reg_check_add(out, &n, max, "MagicValue reads 0x74726976", magic == VIRTIO_MMIO_MAGIC,
                         "MagicValue 0x%08x", magic, 0, 0, 0);
    virtio_reg_check_add(out, &n, max, "Version reads 2 (modern) or 1 (legacy), as bound",
                         version == want, "Version %u, bound as %u", version, want, 0, 0);
    mm_reset(t); /* waits (bounded) for the status to read 0 */
    uint8_t st = mm_get_status(t);
    virtio_reg_check_add(out, &n, max, "Status reads 0 after a reset", st == 0, "Status 0x%02x", st,
                         0, 0, 0);
    unsigned queues = 0, live = 0;
    for (unsigned q = 0; q < 16; q++) {
        wr(t, R_QUEUE_SEL, q, &t->exits.status);
        if (!rd(t, R_QUEUE_NUM_MAX, &t->exits.status))
            break;
        queues++;
        unsigned reg = want == VERSION_LEGACY ? R_QUEUE_PFN : R_QUEUE_READY;
        live += rd(t, reg, &t->exits.status) != 0;
    }
    virtio_reg_check_add(out, &n, max,
                         want == VERSION_LEGACY ? "QueuePFN reads 0 on every queue after a reset"
                                                : "QueueReady reads 0 on every queue after a reset",
                         live == 0, "%u queues, %u still set up", queues, live, 0, 0);
    return n;
}

static uint8_t mm_peek_isr(struct virtio_transport *t)
{
    return (uint8_t)rd(t, R_INT_STATUS, &t->exits.isr_reads);
}

static const struct virtio_transport_ops modern_ops = {
    .reset = mm_reset,
    .get_status = mm_get_status,
    .set_status = mm_set_status,
    .get_features = m_get_features,
    .set_features = m_set_features,
    .config_read = mm_config_read,
    .config_write = mm_config_write,
    .config_generation = m_config_generation,
    .queue_max_size = mm_queue_max_size,
    .queue_needs_legacy_layout = m_needs_legacy_layout,
    .queue_enable = m_queue_enable,
    .notify = mm_notify,
    .read_isr = mm_read_isr,
    .check_registers = mm_check_registers,
    .peek_isr = mm_peek_isr,
};

/* ---- version 1 (legacy) ---- */

static uint64_t l_get_features(struct virtio_transport *t)
{
    wr(t, R_DEV_FEATURES_SEL, 0, &t->exits.status);
    return rd(t, R_DEV_FEATURES, &t->exits.status);
}

static void l_set_features(struct virtio_transport *t, uint64_t f)
{
    wr(t, R_DRV_FEATURES_SEL, 0, &t->exits.status);
    wr(t, R_DRV_FEATURES, (uint32_t)f, &t->exits.status);
}

static uint32_t l_config_generation(struct virtio_transport *t)
{
    (void)t;
    return 0;
}

static bool l_needs_legacy_layout(struct virtio_transport *t)
{
    (void)t;
    return true;
}

static uint64_t align_up(uint64_t v, uint64_t a)
{
    return (v + a - 1) & ~(a - 1);
}

static int l_queue_enable(struct virtio_transport *t, unsigned index, uint16_t size,
                          const struct vq_addrs *a)
{
    /* The device finds the avail and used rings from QueuePFN alone (legacy layout, 2.7 with
     * QueueAlign): refuse rings placed anywhere else, and a PFN the register cannot hold. */
    uint64_t avail = a->desc + 16ull * size;
    uint64_t used = align_up(avail + 6 + 2ull * size, LEGACY_ALIGN);
    if (a->desc % LEGACY_PAGE_SIZE || a->desc / LEGACY_PAGE_SIZE > 0xffffffffu ||
        a->desc / LEGACY_PAGE_SIZE == 0 || a->avail != avail || a->used != used) {
        platform_log("virtio-mmio: queue %u: rings at 0x%llx/0x%llx/0x%llx do not fit the legacy "
                     "layout",
                     index, (unsigned long long)a->desc, (unsigned long long)a->avail,
                     (unsigned long long)a->used);
        return -1;
    }
    if (!select_idle_queue(t, index, size, R_QUEUE_PFN))
        return -1;
    wr(t, R_QUEUE_ALIGN, LEGACY_ALIGN, &t->exits.status);
    wr(t, R_QUEUE_PFN, (uint32_t)(a->desc / LEGACY_PAGE_SIZE), &t->exits.status);
    return 0;
}

static const struct virtio_transport_ops legacy_ops = {
    .reset = mm_reset,
    .get_status = mm_get_status,
    .set_status = mm_set_status,
    .get_features = l_get_features,
    .set_features = l_set_features,
    .config_read = mm_config_read,
    .config_write = mm_config_write,
    .config_generation = l_config_generation,
    .queue_max_size = mm_queue_max_size,
    .queue_needs_legacy_layout = l_needs_legacy_layout,
    .queue_enable = l_queue_enable,
    .notify = mm_notify,
    .read_isr = mm_read_isr,
    .check_registers = mm_check_registers,
    .peek_isr = mm_peek_isr,
};

/* ---- binding ---- */

enum virtio_mmio_result virtio_mmio_bind(const struct virtio_mmio_device *dev, uint16_t device_id,
                                         enum virtio_mmio_versions versions, struct virtio_mmio *vm,
                                         struct virtio_transport *t)
{
    *vm = (struct virtio_mmio){.dev = *dev};
    unsigned long long base = dev->base;
    if (dev->size < VIRTIO_MMIO_MIN_SIZE || dev->size > VIRTIO_MMIO_MAX_SIZE || dev->base % 4 ||
        bus_map_mmio(dev->base, dev->size, &vm->regs) != 0) {
        platform_log("virtio-mmio: 0x%llx: cannot map a 0x%llx-byte window there", base,
                     (unsigned long long)dev->size);
        return VIRTIO_MMIO_MAP_FAILED;
    }
    /* Identification reads are not counted: t is not ours until the device is accepted. */
    /* No magic or device id 0 (QEMU's empty transport): nothing there. Not logged here: a probe
     * meets many such slots; the caller says what it expected. */
    if (bus_read32(&vm->regs, R_MAGIC) != VIRTIO_MMIO_MAGIC)
        return VIRTIO_MMIO_EMPTY;
    uint32_t version = bus_read32(&vm->regs, R_VERSION);
    uint32_t id = bus_read32(&vm->regs, R_DEVICE_ID);
    if (id == 0)
        return VIRTIO_MMIO_EMPTY;
    if (version != VERSION_LEGACY && version != VERSION_MODERN) {
        platform_log("virtio-mmio: 0x%llx: device type %u has version %u; only 1 (legacy) and 2 "
                     "exist",
                     base, id, version);
        return VIRTIO_MMIO_UNSUPPORTED;
    }
    if (id != device_id) {
        platform_log("virtio-mmio: 0x%llx: device type %u, not %u", base, id, device_id);
        return VIRTIO_MMIO_OTHER_TYPE;
    }
    if ((versions == VIRTIO_MMIO_V2_ONLY && version != VERSION_MODERN) ||
        (versions == VIRTIO_MMIO_V1_ONLY && version != VERSION_LEGACY)) {
        platform_log("virtio-mmio: 0x%llx: version %u, but blimp.virtio asks for %s", base, version,
                     versions == VIRTIO_MMIO_V2_ONLY ? "modern (2)" : "legacy (1)");
        return VIRTIO_MMIO_UNSUPPORTED;
    }
    vm->version = version;
    bool legacy = version == VERSION_LEGACY;
    *t = (struct virtio_transport){
        .ops = legacy ? &legacy_ops : &modern_ops,
        .name = legacy ? "virtio-mmio-legacy" : "virtio-mmio-modern",
        .legacy = legacy,
        .device_id = device_id,
        .config_size = (unsigned)(dev->size - VIRTIO_MMIO_CONFIG),
        .irq = dev->irq,
        .priv = vm,
    };
    if (dev->irq.kind == VIRTIO_IRQ_GSI)
        platform_log("virtio-mmio: 0x%llx: virtio type %u, version %u, vendor 0x%08x, gsi %u", base,
                     id, version, bus_read32(&vm->regs, R_VENDOR_ID), dev->irq.gsi);
    else
        platform_log("virtio-mmio: 0x%llx: virtio type %u, version %u, vendor 0x%08x, interrupt "
                     "line unknown",
                     base, id, version, bus_read32(&vm->regs, R_VENDOR_ID));
    if (legacy)
        wr(t, R_GUEST_PAGE_SIZE, LEGACY_PAGE_SIZE, &t->exits.status);
    return VIRTIO_MMIO_BOUND;
}

/* ---- virtio_mmio.device= ---- */

/* Copies the field of s up to the first of stop (or the end) into buf; returns the rest. */
static const char *field(const char *s, char stop, char *buf, unsigned size, bool *ok)
{
    unsigned n = 0;
    while (s[n] && s[n] != stop)
        n++;
    *ok = n > 0 && n < size;
    if (*ok) {
        memcpy(buf, s, n);
        buf[n] = '\0';
    }
    return s + n;
}

bool virtio_mmio_parse_device(const char *s, struct virtio_mmio_device *out, const char **why)
{
    char size_s[24], base_s[24], irq_s[12], id_s[12];
    uint64_t size, base, irq, id = 0;
    bool ok;
    const char *p = field(s, '@', size_s, sizeof(size_s), &ok);
    *why = "expected <size>@<base>:<irq>[:<id>]";
    if (!ok || *p != '@')
        return false;
    p = field(p + 1, ':', base_s, sizeof(base_s), &ok);
    if (!ok || *p != ':')
        return false;
    p = field(p + 1, ':', irq_s, sizeof(irq_s), &ok);
    if (!ok)
        return false;
    bool has_id = *p == ':';
    if (has_id) {
        p = field(p + 1, '\0', id_s, sizeof(id_s), &ok);
        if (!ok)
            return false;
    }
    if (!parse_number(size_s, PARSE_HEX | PARSE_SUFFIX, UINT64_MAX, &size)) {
        *why = "the size is not a number (decimal or 0x hex, optional K/M/G)";
        return false;
    }
    /* The base takes no suffix: Linux reads it with %lli. */
    if (!parse_number(base_s, PARSE_HEX, UINT64_MAX, &base)) {
        *why = "the base is not a number (decimal or 0x hex)";
        return false;
    }
    if (!parse_number(irq_s, 0, UINT32_MAX, &irq)) {
        *why = "the irq is not a decimal number";
        return false;
    }
    if (has_id && !parse_number(id_s, 0, INT32_MAX, &id)) {
        *why = "the id is not a decimal number";
        return false;
    }
    if (size < VIRTIO_MMIO_MIN_SIZE) {
        *why = "the window is smaller than 0x108 bytes (registers + balloon config)";
        return false;
    }
    if (size > VIRTIO_MMIO_MAX_SIZE) {
        *why = "the window is larger than 64 KiB";
        return false;
    }
    if (base % 4) {
        *why = "the base is not 4-byte aligned";
        return false;
    }
    if (base >= VIRTIO_MMIO_ADDR_LIMIT || size > VIRTIO_MMIO_ADDR_LIMIT - base) {
        *why = "the window ends beyond the 52-bit physical address space";
        return false;
    }
    *out = (struct virtio_mmio_device){
        .base = base,
        .size = size,
        .irq = {.kind = VIRTIO_IRQ_GSI, .gsi = (unsigned)irq, .level = true},
        .id = has_id ? (int)id : -1,
    };
    *why = NULL;
    return true;
}

bool virtio_mmio_overlap(const struct virtio_mmio_device *a, const struct virtio_mmio_device *b)
{
    return a->base < b->base + b->size && b->base < a->base + a->size;
}

unsigned virtio_mmio_probe_microvm(struct virtio_mmio_device out[MICROVM_MMIO_MAX_SLOTS])
{
    struct bus_region win;
    if (bus_map_mmio(MICROVM_MMIO_BASE, MICROVM_MMIO_SLOT * MICROVM_MMIO_MAX_SLOTS, &win) != 0)
        return 0;
    unsigned n = 0;
    for (unsigned i = 0; i < MICROVM_MMIO_MAX_SLOTS; i++) {
        if (bus_read32(&win, (uint64_t)i * MICROVM_MMIO_SLOT + R_MAGIC) != VIRTIO_MMIO_MAGIC)
            continue;
        out[n++] = (struct virtio_mmio_device){
            .base = MICROVM_MMIO_BASE + (uint64_t)i * MICROVM_MMIO_SLOT,
            .size = MICROVM_MMIO_SLOT,
            .id = -1,
        };
    }
    /* Only the full set of 24 says which IOAPIC block the lines are on. */
    for (unsigned k = 0; k < n; k++) {
        unsigned slot = (unsigned)((out[k].base - MICROVM_MMIO_BASE) / MICROVM_MMIO_SLOT);
        if (n == MICROVM_MMIO_MAX_SLOTS)
            out[k].irq = (struct virtio_irq){
                .kind = VIRTIO_IRQ_GSI, .gsi = MICROVM_IOAPIC2_GSI + slot, .level = true};
    }
    return n;
}
