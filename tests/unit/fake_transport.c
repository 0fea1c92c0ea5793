/* In-memory virtio transport for host unit tests: see fake_transport.h. */
#include "tests/unit/fake_transport.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

static struct fake_transport *ft_of(struct virtio_transport *t)
{
    return t->priv;
}

static void drv_error(struct fake_transport *ft, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void drv_error(struct fake_transport *ft, const char *fmt, ...)
{
    if (ft->driver_errors++ == 0) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(ft->driver_error, sizeof(ft->driver_error), fmt, ap);
        va_end(ap);
        fprintf(stderr, "[fake transport] driver error: %s\n", ft->driver_error);
    }
}

static void disable_queues(struct fake_transport *ft)
{
    for (unsigned i = 0; i < FT_MAX_QUEUES; i++) {
        if (ft->q[i].enabled)
            fake_vq_detach(&ft->q[i].vq);
        ft->q[i].enabled = false;
        ft->q[i].size = 0;
        memset(&ft->q[i].addrs, 0, sizeof(ft->q[i].addrs));
    }
}

static void do_reset(struct fake_transport *ft)
{
    ft->status = 0;
    ft->driver_features = 0;
    ft->isr = 0;
    disable_queues(ft);
    ft->resets++;
    if (ft->on_reset)
        ft->on_reset(ft, ft->hook_arg);
}

static int ft_reset(struct virtio_transport *t)
{
    struct fake_transport *ft = ft_of(t);
    if (ft->reset_fails)
        return -1;
    do_reset(ft);
    return 0;
}

static uint8_t ft_get_status(struct virtio_transport *t)
{
    return ft_of(t)->status;
}

static void ft_set_status(struct virtio_transport *t, uint8_t status)
{
    struct fake_transport *ft = ft_of(t);
    uint8_t old = ft->status;
    ft->status_writes++;
    if (status == 0) {
        do_reset(ft);
    } else {
        /* NEEDS_RESET is the device's bit; the driver only writes the others. */
        uint8_t keep = old & VIRTIO_STATUS_NEEDS_RESET;
        if ((old & ~VIRTIO_STATUS_NEEDS_RESET) & ~status)
            drv_error(ft, "status 0x%02x clears bits of 0x%02x without a reset", status, old);
        uint8_t added = (uint8_t)(status & ~old);
        if ((added & VIRTIO_STATUS_FEATURES_OK) && ft->t.legacy)
            drv_error(ft, "FEATURES_OK written on a legacy interface");
        if ((added & VIRTIO_STATUS_FEATURES_OK) && !ft->t.legacy) {
            bool ok = !(ft->driver_features & ~ft->device_features);
            if (ok && ft->require_version_1 &&
                !(ft->driver_features & (1ULL << VIRTIO_F_VERSION_1)))
                ok = false;
            if (ok && ft->accept_features)
                ok = ft->accept_features(ft, ft->driver_features, ft->hook_arg);
            if (!ok) /* the device refuses: FEATURES_OK reads back clear */
                status &= (uint8_t)~VIRTIO_STATUS_FEATURES_OK;
        }
        if ((added & VIRTIO_STATUS_DRIVER_OK) && !ft->t.legacy &&
            !(status & VIRTIO_STATUS_FEATURES_OK))
            drv_error(ft, "DRIVER_OK without FEATURES_OK");
        ft->status = (uint8_t)(status | keep);
    }
    if (ft->on_status)
        ft->on_status(ft, old, ft->status, ft->hook_arg);
}

static uint64_t ft_get_features(struct virtio_transport *t)
{
    struct fake_transport *ft = ft_of(t);
    return ft->t.legacy ? (ft->device_features & 0xffffffffULL) : ft->device_features;
}

static void ft_set_features(struct virtio_transport *t, uint64_t features)
{
    struct fake_transport *ft = ft_of(t);
    if (ft->status & VIRTIO_STATUS_FEATURES_OK)
        drv_error(ft, "features written after FEATURES_OK");
    if (ft->status & VIRTIO_STATUS_DRIVER_OK)
        drv_error(ft, "features written after DRIVER_OK");
    if (ft->t.legacy) {
        features &= 0xffffffffULL;
        if (features & ~ft->device_features)
            drv_error(ft, "legacy driver accepted unoffered features 0x%llx",
                      (unsigned long long)(features & ~ft->device_features));
    }
    ft->driver_features = features;
}

static bool config_range_ok(struct fake_transport *ft, unsigned off, unsigned width)
{
    return (width == 1 || width == 2 || width == 4) && off < ft->t.config_size &&
           width <= ft->t.config_size - off;
}

static bool ft_config_read(struct virtio_transport *t, unsigned off, unsigned width, uint32_t *val)
{
    struct fake_transport *ft = ft_of(t);
    ft->config_reads++;
    if (!config_range_ok(ft, off, width))
        return false;
    *val = fake_transport_config_get(ft, off, width);
    return true;
}

static bool ft_config_write(struct virtio_transport *t, unsigned off, unsigned width, uint32_t val)
{
    struct fake_transport *ft = ft_of(t);
    ft->config_writes++;
    if (!config_range_ok(ft, off, width))
        return false;
    for (unsigned i = 0; i < width; i++)
        ft->config[off + i] = (uint8_t)(val >> (8 * i));
    if (ft->on_config_write)
        ft->on_config_write(ft, off, width, val, ft->hook_arg);
    return true;
}

static uint32_t ft_config_generation(struct virtio_transport *t)
{
    struct fake_transport *ft = ft_of(t);
    if (ft->t.legacy)
        return 0;
    if (ft->unstable_generation) {
        ft->unstable_generation--;
        ft->generation++;
    }
    return ft->generation;
}

static uint16_t ft_queue_max_size(struct virtio_transport *t, unsigned index)
{
    struct fake_transport *ft = ft_of(t);
    return index < FT_MAX_QUEUES ? ft->q[index].max_size : 0;
}

static bool ft_queue_needs_legacy_layout(struct virtio_transport *t)
{
    return t->legacy;
}

static void queue_irq(void *arg)
{
    struct fake_transport *ft = arg;
    ft->isr |= VIRTIO_ISR_QUEUE;
}

static int ft_queue_enable(struct virtio_transport *t, unsigned index, uint16_t size,
                           const struct vq_addrs *a)
{
    struct fake_transport *ft = ft_of(t);
    if (index >= FT_MAX_QUEUES || !ft->q[index].max_size) {
        drv_error(ft, "queue_enable(%u): no such queue", index);
        return -1;
    }
    struct ft_queue *q = &ft->q[index];
    if (ft->status & VIRTIO_STATUS_DRIVER_OK) {
        drv_error(ft, "queue %u enabled after DRIVER_OK", index);
        return -1;
    }
    if (q->enabled) {
        drv_error(ft, "queue %u enabled twice without a reset", index);
        return -1;
    }
    if (!size || (size & (size - 1)) || size > q->max_size ||
        (ft->t.legacy && size != q->max_size)) {
        drv_error(ft, "queue %u: size %u not allowed (max %u%s)", index, size, q->max_size,
                  ft->t.legacy ? ", legacy: fixed" : "");
        return -1;
    }
    if (ft->t.legacy) {
        /* Legacy devices only get a PFN and derive the rest. */
        uint64_t used = (a->desc + 16ULL * size + 6 + 2ULL * size + 4095) & ~4095ULL;
        if ((a->desc & 4095) || a->avail != a->desc + 16ULL * size || a->used != used) {
            drv_error(ft, "queue %u: addresses do not follow the legacy layout", index);
            return -1;
        }
    } else if ((a->desc & 15) || (a->avail & 1) || (a->used & 3)) {
        drv_error(ft, "queue %u: misaligned ring addresses", index);
        return -1;
    }
    q->size = size;
    q->addrs = *a;
    q->enabled = true;
    fake_vq_attach(&q->vq, a, size, fake_transport_negotiated(ft, VIRTIO_F_EVENT_IDX));
    q->vq.on_irq = queue_irq;
    q->vq.irq_arg = ft;
    return 0;
}

static void ft_notify(struct virtio_transport *t, unsigned index)
{
    struct fake_transport *ft = ft_of(t);
    if (index >= FT_MAX_QUEUES || !ft->q[index].enabled) {
        drv_error(ft, "notify(%u): queue not enabled", index);
        return;
    }
    if (!(ft->status & VIRTIO_STATUS_DRIVER_OK))
        drv_error(ft, "notify(%u) before DRIVER_OK", index);
    ft->q[index].notifies++;
    if (ft->on_notify)
        ft->on_notify(ft, index, ft->hook_arg);
}

static uint8_t ft_read_isr(struct virtio_transport *t)
{
    struct fake_transport *ft = ft_of(t);
    uint8_t v = ft->isr;
    ft->isr = 0;
    ft->isr_reads++;
    return v;
}

static const struct virtio_transport_ops fake_ops = {
    .reset = ft_reset,
    .get_status = ft_get_status,
    .set_status = ft_set_status,
    .get_features = ft_get_features,
    .set_features = ft_set_features,
    .config_read = ft_config_read,
    .config_write = ft_config_write,
    .config_generation = ft_config_generation,
    .queue_max_size = ft_queue_max_size,
    .queue_needs_legacy_layout = ft_queue_needs_legacy_layout,
    .queue_enable = ft_queue_enable,
    .notify = ft_notify,
    .read_isr = ft_read_isr,
};

void fake_transport_init(struct fake_transport *ft, bool legacy, uint16_t device_id,
                         uint64_t device_features, unsigned config_size)
{
    memset(ft, 0, sizeof(*ft));
    ft->t.ops = &fake_ops;
    ft->t.name = legacy ? "fake-legacy" : "fake-modern";
    ft->t.legacy = legacy;
    ft->t.device_id = device_id;
    ft->t.config_size = config_size < FT_CONFIG_MAX ? config_size : FT_CONFIG_MAX;
    ft->t.priv = ft;
    ft->device_features = device_features;
    ft->require_version_1 = !legacy;
}

void fake_transport_fini(struct fake_transport *ft)
{
    disable_queues(ft);
}

void fake_transport_add_queue(struct fake_transport *ft, unsigned index, uint16_t max_size)
{
    if (index < FT_MAX_QUEUES)
        ft->q[index].max_size = max_size;
}

struct fake_vq *fake_transport_vq(struct fake_transport *ft, unsigned index)
{
    return index < FT_MAX_QUEUES && ft->q[index].enabled ? &ft->q[index].vq : NULL;
}

bool fake_transport_negotiated(const struct fake_transport *ft, unsigned bit)
{
    return bit < 64 && (ft->driver_features & (1ULL << bit));
}

void fake_transport_config_set(struct fake_transport *ft, unsigned off, unsigned width,
                               uint32_t val)
{
    if (off + width > FT_CONFIG_MAX)
        return;
    for (unsigned i = 0; i < width; i++)
        ft->config[off + i] = (uint8_t)(val >> (8 * i));
    ft->generation++;
    ft->isr |= VIRTIO_ISR_CONFIG;
}

uint32_t fake_transport_config_get(const struct fake_transport *ft, unsigned off, unsigned width)
{
    uint32_t v = 0;
    for (unsigned i = 0; i < width && off + i < FT_CONFIG_MAX; i++)
        v |= (uint32_t)ft->config[off + i] << (8 * i);
    return v;
}

void fake_transport_needs_reset(struct fake_transport *ft)
{
    ft->status |= VIRTIO_STATUS_NEEDS_RESET;
    ft->isr |= VIRTIO_ISR_CONFIG;
}
