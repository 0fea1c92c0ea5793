/* Host implementation of include/bus.h as virtio-mmio devices: see fake_mmio.h. */
#include "tests/unit/fake_mmio.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/unit/fake_platform.h"
#include "virtio/transport.h"

#define QEMU_VENDOR   0x554d4551u
#define RESET_STEP_NS (50ull * 1000 * 1000) /* clock skipped per status read while resetting */

static struct fake_mmio slots[FAKE_MMIO_MAX_SLOTS];
static unsigned nslots, bus_errors, unassigned_reads, maps, accesses;
static char first_bus_error[256];

static void bus_error(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void bus_error(const char *fmt, ...)
{
    if (bus_errors++ == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(first_bus_error, sizeof(first_bus_error), fmt, ap);
        va_end(ap);
    }
}

static void drv_error(struct fake_mmio *m, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void drv_error(struct fake_mmio *m, const char *fmt, ...)
{
    if (m->driver_errors++ == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(m->driver_error, sizeof(m->driver_error), fmt, ap);
        va_end(ap);
        fprintf(stderr, "[fake mmio] driver error: %s\n", m->driver_error);
    }
}

static void detach_queues(struct fake_mmio *m)
{
    for (unsigned i = 0; i < FAKE_MMIO_MAX_QUEUES; i++) {
        struct fake_mmio_queue *q = &m->q[i];
        if (q->live)
            fake_vq_detach(&q->vq);
        q->live = false;
        q->num = q->align = q->pfn = q->ready = 0;
        q->desc = q->driver = q->device = 0;
    }
}

void fake_mmio_clear(void)
{
    for (unsigned i = 0; i < nslots; i++)
        detach_queues(&slots[i]);
    memset(slots, 0, sizeof(slots));
    nslots = bus_errors = unassigned_reads = maps = accesses = 0;
    first_bus_error[0] = '\0';
}

struct fake_mmio *fake_mmio_add(uint64_t base, uint64_t size, uint32_t version, uint32_t device_id)
{
    if (nslots == FAKE_MMIO_MAX_SLOTS) {
        fprintf(stderr, "fake_mmio: too many slots\n");
        abort();
    }
    struct fake_mmio *m = &slots[nslots++];
    *m = (struct fake_mmio){.base = base,
                            .size = size,
                            .magic = 0x74726976u,
                            .version = version,
                            .device_id = device_id,
                            .vendor = QEMU_VENDOR};
    return m;
}

void fake_mmio_add_queue(struct fake_mmio *m, unsigned index, uint32_t max)
{
    if (index >= FAKE_MMIO_MAX_QUEUES)
        abort();
    m->q[index].max = max;
}

unsigned fake_mmio_bus_errors(void)
{
    return bus_errors;
}

const char *fake_mmio_first_bus_error(void)
{
    return first_bus_error;
}

unsigned fake_mmio_unassigned_reads(void)
{
    return unassigned_reads;
}

unsigned fake_mmio_maps(void)
{
    return maps;
}

unsigned fake_mmio_accesses(void)
{
    return accesses;
}

/* ---- the device ---- */

static void device_reset(struct fake_mmio *m)
{
    m->status = 0;
    m->driver_features = 0;
    m->isr = 0;
    m->dev_sel = m->drv_sel = m->queue_sel = 0;
    if (!m->reset_keeps_queues)
        detach_queues(m);
    m->resets++;
}

static struct fake_mmio_queue *selected(struct fake_mmio *m)
{
    static struct fake_mmio_queue none;
    none = (struct fake_mmio_queue){0};
    return m->queue_sel < FAKE_MMIO_MAX_QUEUES ? &m->q[m->queue_sel] : &none;
}

static bool pow2(uint32_t v)
{
    return v && !(v & (v - 1));
}

static void attach(struct fake_mmio *m, struct fake_mmio_queue *q, const struct vq_addrs *a)
{
    if (!pow2(q->num) || q->num > q->max) {
        drv_error(m, "queue %u enabled with size %u (max %u)", m->queue_sel, q->num, q->max);
        return;
    }
    q->addrs = *a;
    fake_vq_attach(&q->vq, a, (uint16_t)q->num, m->driver_features & (1ull << VIRTIO_F_EVENT_IDX));
    q->live = true;
}

/* Which version a register belongs to: 0 both, else the only one that has it. */
static unsigned reg_version(uint64_t off)
{
    switch (off) {
    case 0x028:
    case 0x03c:
    case 0x040:
        return 1;
    case 0x044:
    case 0x080:
    case 0x084:
    case 0x090:
    case 0x094:
    case 0x0a0:
    case 0x0a4:
    case 0x0fc:
        return 2;
    default:
        return 0;
    }
}

static bool check_reg(struct fake_mmio *m, uint64_t off)
{
    unsigned v = reg_version(off);
    if (v && v != m->version) {
        drv_error(m, "register 0x%03llx used on a version %u device", (unsigned long long)off,
                  m->version);
        return false;
    }
    return true;
}

static uint32_t reg_read(struct fake_mmio *m, uint64_t off)
{
    if (!check_reg(m, off))
        return 0;
    struct fake_mmio_queue *q = selected(m);
    switch (off) {
    case 0x000:
        return m->magic;
    case 0x004:
        return m->version;
    case 0x008:
        return m->device_id;
    case 0x00c:
        return m->vendor;
    case 0x010:
        if (m->dev_sel > 1 || (m->version == 1 && m->dev_sel))
            return 0;
        return (uint32_t)(m->device_features >> (32 * m->dev_sel));
    case 0x034:
        return q->max;
    case 0x040:
        return q->pfn;
    case 0x044:
        return q->ready;
    case 0x060:
        return m->isr;
    case 0x070:
        m->status_reads++;
        if (m->never_resets || m->reset_pending)
            fake_clock_skip(RESET_STEP_NS);
        if (m->reset_pending && m->reset_countdown-- == 0) {
            m->reset_pending = false;
            device_reset(m);
        }
        return m->status;
    case 0x0fc:
        return m->generation;
    default:
        drv_error(m, "read of write-only or absent register 0x%03llx", (unsigned long long)off);
        return 0;
    }
}

static void set_status(struct fake_mmio *m, uint32_t v)
{
    if (v == 0) {
        if (m->never_resets)
            return;
        if (m->reset_delay) {
            m->reset_pending = true;
            m->reset_countdown = m->reset_delay;
            return;
        }
        device_reset(m);
        return;
    }
    uint8_t s = (uint8_t)v;
    if (m->status & ~s)
        drv_error(m, "status 0x%02x clears bits of 0x%02x without a reset", s, m->status);
    if ((s & ~m->status & VIRTIO_STATUS_FEATURES_OK)) {
        if (m->version == 1) {
            drv_error(m, "FEATURES_OK written on a version 1 device");
        } else if ((m->driver_features & ~m->device_features) ||
                   !(m->driver_features & (1ull << VIRTIO_F_VERSION_1))) {
            s &= (uint8_t)~VIRTIO_STATUS_FEATURES_OK; /* refused: reads back clear */
        }
    }
    m->status = s;
}

static void set_driver_features(struct fake_mmio *m, uint32_t v)
{
    m->features_writes++;
    if (m->status & (VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK))
        drv_error(m, "features written after FEATURES_OK/DRIVER_OK");
    if (m->drv_sel > 1 || (m->version == 1 && m->drv_sel)) {
        drv_error(m, "driver features window %u written on a version %u device", m->drv_sel,
                  m->version);
        return;
    }
    unsigned sh = 32 * m->drv_sel;
    m->driver_features = (m->driver_features & ~(0xffffffffull << sh)) | (uint64_t)v << sh;
}

static bool queue_idle(struct fake_mmio *m, struct fake_mmio_queue *q)
{
    if (q->live || q->ready || q->pfn) {
        drv_error(m, "queue %u set up while live", m->queue_sel);
        return false;
    }
    return true;
}

static void set_lo(uint64_t *v, uint32_t x)
{
    *v = (*v & ~0xffffffffull) | x;
}

static void set_hi(uint64_t *v, uint32_t x)
{
    *v = (*v & 0xffffffffull) | (uint64_t)x << 32;
}

static void reg_write(struct fake_mmio *m, uint64_t off, uint32_t v)
{
    if (!check_reg(m, off))
        return;
    struct fake_mmio_queue *q = selected(m);
    switch (off) {
    case 0x014:
        m->dev_sel = v;
        break;
    case 0x020:
        set_driver_features(m, v);
        break;
    case 0x024:
        m->drv_sel = v;
        break;
    case 0x028:
        m->page_size = v;
        break;
    case 0x030:
        m->queue_sel = v;
        break;
    case 0x038:
        if (queue_idle(m, q))
            q->num = v;
        break;
    case 0x03c:
        if (queue_idle(m, q))
            q->align = v;
        break;
    case 0x040: {
        if (!queue_idle(m, q))
            break;
        if (v == 0)
            break;
        if (m->page_size != 4096 || !pow2(q->align)) {
            drv_error(m, "QueuePFN with GuestPageSize %u and QueueAlign %u", m->page_size,
                      q->align);
            break;
        }
        /* The legacy layout, as the device derives it (spec 2.7.2 with QueueAlign). */
        q->pfn = v;
        uint64_t desc = (uint64_t)v * m->page_size;
        uint64_t avail = desc + 16ull * q->num;
        uint64_t used = (avail + 6 + 2ull * q->num + q->align - 1) & ~((uint64_t)q->align - 1);
        attach(m, q, &(struct vq_addrs){desc, avail, used});
        break;
    }
    case 0x044:
        if (v == 1 && queue_idle(m, q)) {
            q->ready = 1;
            attach(m, q, &(struct vq_addrs){q->desc, q->driver, q->device});
        } else if (v == 0) {
            q->ready = 0;
        }
        break;
    case 0x050:
        if (!(m->status & VIRTIO_STATUS_DRIVER_OK))
            drv_error(m, "notify of queue %u before DRIVER_OK", v);
        if (v < FAKE_MMIO_MAX_QUEUES)
            m->q[v].notifies++;
        else
            drv_error(m, "notify of queue %u", v);
        break;
    case 0x064:
        m->acks++;
        m->last_ack = v;
        m->isr &= ~v;
        break;
    case 0x070:
        set_status(m, v);
        break;
    case 0x080:
    case 0x084:
    case 0x090:
    case 0x094:
    case 0x0a0:
    case 0x0a4:
        if (!queue_idle(m, q))
            break;
        if (off == 0x080)
            set_lo(&q->desc, v);
        else if (off == 0x084)
            set_hi(&q->desc, v);
        else if (off == 0x090)
            set_lo(&q->driver, v);
        else if (off == 0x094)
            set_hi(&q->driver, v);
        else if (off == 0x0a0)
            set_lo(&q->device, v);
        else
            set_hi(&q->device, v);
        break;
    default:
        drv_error(m, "write of read-only or absent register 0x%03llx", (unsigned long long)off);
    }
}

/* ---- include/bus.h ---- */

/* The slot at bus address addr (with width bytes inside it), or NULL. */
static struct fake_mmio *slot_at(uint64_t addr, unsigned width)
{
    for (unsigned i = 0; i < nslots; i++)
        if (addr >= slots[i].base && addr - slots[i].base + width <= slots[i].size)
            return &slots[i];
    return NULL;
}

/* Resolves an access: the slot and offset in it, or NULL (an error recorded, or no slot). */
static struct fake_mmio *resolve(const struct bus_region *r, uint64_t off, unsigned width,
                                 uint64_t *at)
{
    accesses++;
    if (r->port_io || off >= r->size || width > r->size - off) {
        bus_error("%u-byte access at +0x%llx outside a 0x%llx-byte region", width,
                  (unsigned long long)off, (unsigned long long)r->size);
        return NULL;
    }
    uint64_t addr = r->base + off;
    if (addr % width) {
        bus_error("misaligned %u-byte access at 0x%llx", width, (unsigned long long)addr);
        return NULL;
    }
    struct fake_mmio *m = slot_at(addr, width);
    if (!m)
        return NULL;
    *at = addr - m->base;
    if (*at < 0x100 && width != 4) {
        bus_error("%u-byte access to register 0x%03llx", width, (unsigned long long)*at);
        return NULL;
    }
    if (*at >= 0x100 && *at - 0x100 + width > FAKE_MMIO_CONFIG_MAX) {
        bus_error("config access beyond the model at 0x%llx", (unsigned long long)*at);
        return NULL;
    }
    return m;
}

static uint32_t bus_read(const struct bus_region *r, uint64_t off, unsigned width)
{
    uint64_t at;
    unsigned before = bus_errors;
    struct fake_mmio *m = resolve(r, off, width, &at);
    if (!m) {
        if (bus_errors == before)
            unassigned_reads++;
        return before == bus_errors ? 0 : 0xffffffffu >> (32 - 8 * width);
    }
    if (at < 0x100)
        return reg_read(m, at);
    uint32_t v = 0;
    memcpy(&v, &m->config[at - 0x100], width);
    return v;
}

static void bus_write(const struct bus_region *r, uint64_t off, unsigned width, uint32_t v)
{
    uint64_t at;
    unsigned before = bus_errors;
    struct fake_mmio *m = resolve(r, off, width, &at);
    if (!m) {
        if (bus_errors == before)
            bus_error("%u-byte write at 0x%llx hits no device", width,
                      (unsigned long long)(r->base + off));
        return;
    }
    if (at < 0x100)
        reg_write(m, at, v);
    else
        memcpy(&m->config[at - 0x100], &v, width);
}

uint8_t bus_read8(const struct bus_region *r, uint64_t off)
{
    return (uint8_t)bus_read(r, off, 1);
}

uint16_t bus_read16(const struct bus_region *r, uint64_t off)
{
    return (uint16_t)bus_read(r, off, 2);
}

uint32_t bus_read32(const struct bus_region *r, uint64_t off)
{
    return bus_read(r, off, 4);
}

void bus_write8(const struct bus_region *r, uint64_t off, uint8_t v)
{
    bus_write(r, off, 1, v);
}

void bus_write16(const struct bus_region *r, uint64_t off, uint16_t v)
{
    bus_write(r, off, 2, v);
}

void bus_write32(const struct bus_region *r, uint64_t off, uint32_t v)
{
    bus_write(r, off, 4, v);
}

int bus_map_mmio(uint64_t phys, uint64_t size, struct bus_region *out)
{
    *out = (struct bus_region){0};
    if (size == 0 || phys + size < phys)
        return -1;
    maps++;
    *out = (struct bus_region){.base = phys, .size = size};
    return 0;
}
