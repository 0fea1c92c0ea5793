/*
 * Stage 1 of conformance mode: before the driver brings the device up (balloon mode's `prepare`
 * hook) the checks drive the transport and one raw queue directly: registers after a reset,
 * feature subsets, the config before FEATURES_OK, a buffer kicked before DRIVER_OK, interrupt
 * suppression and the ISR. The device is left reset for the driver.
 */
#include "kernel/conform/conform_internal.h"
#include "kernel/report.h"
#include "lib/printf.h"
#include "lib/string.h"

#define RAW_WAIT_NS (20ull * 1000 * 1000)   /* long enough for any device to act on a kick */
#define RAW_USED_NS (1000ull * 1000 * 1000) /* for a buffer the device should use */

bool is_pci(const struct virtio_transport *t)
{
    return !strncmp(t->name, "virtio-pci", 10);
}

bool is_mmio(const struct virtio_transport *t)
{
    return !strncmp(t->name, "virtio-mmio", 11);
}

static void busy_wait(uint64_t ns)
{
    uint64_t end = platform_now_ns() + ns;
    while (platform_now_ns() < end)
        ;
}

static void raw_registers(struct virtio_transport *t)
{
    enum check own = is_pci(t) ? D22 : D24, other = is_pci(t) ? D24 : D22;
    verdict(other, V_NOT_APPLICABLE, "not applicable: the device is on %s", t->name);
    if (!is_pci(t) && !is_mmio(t)) {
        verdict(own, V_NOT_APPLICABLE, "not applicable: %s", t->name);
        return;
    }
    struct virtio_reg_check rc[VIRTIO_REG_CHECKS_MAX];
    unsigned n =
        t->ops->check_registers ? t->ops->check_registers(t, rc, VIRTIO_REG_CHECKS_MAX) : 0;
    for (unsigned i = 0; i < n; i++) {
        char what[96];
        ksnprintf(what, sizeof(what), rc[i].fmt, rc[i].v[0], rc[i].v[1], rc[i].v[2], rc[i].v[3]);
        report_info("%s %s: %s (%s)", check_id(own), rc[i].ok ? "holds" : "FAILS", rc[i].what,
                    what);
        if (!rc[i].ok)
            verdict(own, V_VIOLATION, "%s: read %s", rc[i].what, what);
    }
    if (n == 0)
        verdict(own, V_NOT_EXERCISED, "not exercised: the transport has no register checks");
    else
        verdict(own, V_CONFORMS, "%u register checks held after a reset", n);
}

static void begin(struct virtio_transport *t)
{
    t->ops->reset(t);
    t->ops->set_status(t, VIRTIO_STATUS_ACKNOWLEDGE);
    t->ops->set_status(t, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
}

/* Whether FEATURES_OK stays set with these features (modern only); leaves the device reset. */
static bool features_stick(struct virtio_transport *t, uint64_t features)
{
    begin(t);
    t->ops->set_features(t, features);
    t->ops->set_status(t, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
                              VIRTIO_STATUS_FEATURES_OK);
    bool ok = t->ops->get_status(t) & VIRTIO_STATUS_FEATURES_OK;
    t->ops->reset(t);
    return ok;
}

static void raw_features(struct virtio_transport *t, uint64_t offered)
{
    if (t->legacy) {
        verdict(D1, V_NOT_APPLICABLE, "not applicable: the legacy interface has no FEATURES_OK");
        verdict(D17, V_NOT_APPLICABLE, "not applicable: the legacy interface has no FEATURES_OK");
        return;
    }
    uint64_t base = 1ull << VIRTIO_F_VERSION_1;
    uint64_t all = offered & ~(1ull << VIRTIO_F_QEMU_BAD);
    unsigned tried = 0, refused = 0;
    uint64_t first_refused = 0;
    uint64_t sets[66];
    unsigned n = 0;
    sets[n++] = base;
    for (unsigned bit = 0; bit < 64; bit++)
        if (((all >> bit) & 1) && bit != VIRTIO_F_VERSION_1)
            sets[n++] = base | 1ull << bit;
    sets[n++] = all;
    for (unsigned i = 0; i < n; i++) {
        tried++;
        if (!features_stick(t, sets[i]) && !refused++)
            first_refused = sets[i];
    }
    if (refused)
        verdict(D17, V_VIOLATION, "FEATURES_OK refused for %u of %u valid subsets, first 0x%lx",
                refused, tried, first_refused);
    else
        verdict(D17, V_CONFORMS, "FEATURES_OK stuck for %u subsets of 0x%lx (none, each, all)",
                tried, all);
    if (!((offered >> VIRTIO_BALLOON_F_MUST_TELL_HOST) & 1)) {
        verdict(D1, V_NOT_OFFERED, "not offered: MUST_TELL_HOST");
        return;
    }
    bool ok = features_stick(t, all & ~(1ull << VIRTIO_BALLOON_F_MUST_TELL_HOST));
    verdict(D1, V_CONFORMS, "without MUST_TELL_HOST the device %s FEATURES_OK (both allowed)",
            ok ? "accepted" : "refused");
}

static void raw_config(struct virtio_transport *t, uint64_t offered)
{
    /* Called between DRIVER and FEATURES_OK. */
    uint32_t np = 0, act = 0, cmd = 0, poison = 0;
    bool hint = (offered >> VIRTIO_BALLOON_F_FREE_PAGE_HINT) & 1;
    bool pois = (offered >> VIRTIO_BALLOON_F_PAGE_POISON) & 1;
    bool ok = t->ops->config_read(t, BALLOON_CFG_NUM_PAGES, 4, &np) &&
              t->ops->config_read(t, BALLOON_CFG_ACTUAL, 4, &act);
    if (!ok) {
        verdict(D19, V_VIOLATION,
                "num_pages/actual unreadable before FEATURES_OK (config %u "
                "bytes)",
                t->config_size);
        return;
    }
    if (hint && !t->ops->config_read(t, BALLOON_CFG_HINT_CMD, 4, &cmd)) {
        verdict(D19, V_VIOLATION,
                "FREE_PAGE_HINT offered but free_page_hint_cmd_id is outside the %u-byte config",
                t->config_size);
        return;
    }
    if (pois && !t->ops->config_read(t, BALLOON_CFG_POISON, 4, &poison)) {
        verdict(D19, V_VIOLATION,
                "PAGE_POISON offered but poison_val is outside the %u-byte config", t->config_size);
        return;
    }
    verdict(D19, V_CONFORMS, "before FEATURES_OK: num_pages %u, actual %u%s%s (config %u bytes)",
            np, act, hint ? ", free_page_hint_cmd_id read" : "", pois ? ", poison_val read" : "",
            t->config_size);
}

static uint64_t alloc_page(void)
{
    return buddy_alloc(&kernel_buddy, 0);
}

static bool raw_used(struct virtqueue *vq, uint64_t ns)
{
    void *tok;
    return vq_wait_used(vq, ns, &tok, NULL) == VQ_OK;
}

static void raw_kick(struct virtio_transport *t, struct virtqueue *vq)
{
    (void)vq_kick_prepare(vq);
    t->ops->notify(t, vq->index); /* unconditionally: the point is to poke the device */
}

/* One inflate buffer with one page (a page the guest gives up: its contents go). */
static bool raw_inflate(struct virtqueue *vq, uint32_t *pfnbuf, unsigned slot, uint64_t victim)
{
    pfnbuf[slot] = (uint32_t)victim;
    struct vq_seg seg = {virt_to_phys(&pfnbuf[slot]), 4};
    return vq_add(vq, &seg, 1, 0, &pfnbuf[slot]) == VQ_OK;
}

/* The raw inflate queue of stage 1 and what its checks share. */
struct raw {
    struct virtio_transport *t;
    struct virtqueue vq;
    uint8_t status; /* the status the device has while the D9 buffer is kicked */
    uint32_t *pfns;
    uint64_t victims[4]; /* one page per buffer (pages the guest gives up) */
};

/* D9: a buffer made available and kicked before DRIVER_OK must not be used. */
static void raw_before_driver_ok(struct raw *r)
{
    raw_inflate(&r->vq, r->pfns, 0, r->victims[0]);
    raw_kick(r->t, &r->vq);
    busy_wait(RAW_WAIT_NS);
    void *tok = vq_get_used(&r->vq, NULL);
    if (tok)
        verdict(D9, V_VIOLATION,
                "an inflate buffer kicked with status 0x%02x (no DRIVER_OK) was used within 20 ms",
                r->status);
    else
        verdict(D9, V_CONFORMS, "an inflate buffer kicked before DRIVER_OK stayed unused 20 ms");
    r->t->ops->set_status(r->t, r->status | VIRTIO_STATUS_DRIVER_OK);
    if (!tok) {
        raw_kick(r->t, &r->vq); /* now it may be used */
        raw_used(&r->vq, RAW_USED_NS);
    }
    r->t->ops->read_isr(r->t); /* clear (PCI: reading clears; mmio: read_isr acknowledges) */
}

/* D21: with VRING_AVAIL_F_NO_INTERRUPT the device must not signal the used buffer. */
static void raw_no_interrupt(struct raw *r)
{
    struct virtio_transport *t = r->t;
    vq_disable_interrupts(&r->vq);
    raw_inflate(&r->vq, r->pfns, 1, r->victims[1]);
    raw_kick(t, &r->vq);
    if (!raw_used(&r->vq, RAW_USED_NS)) {
        verdict(D21, V_TIMEOUT, "an inflate buffer was not used within 1 s");
        return;
    }
    uint16_t flags = r->vq.used->flags;
    uint8_t isr = t->ops->peek_isr ? t->ops->peek_isr(t) : t->ops->read_isr(t);
    if (flags > 1)
        verdict(D21, V_VIOLATION, "used ring flags 0x%x (only 0 or 1 allowed)", flags);
    else if (isr & VIRTIO_ISR_QUEUE)
        verdict(D21, V_VIOLATION,
                "the queue interrupt bit was set (ISR 0x%x) although the driver set "
                "VRING_AVAIL_F_NO_INTERRUPT",
                isr);
    else
        verdict(D21, V_CONFORMS, "used flags %u; no queue interrupt with NO_INTERRUPT set", flags);
    t->ops->read_isr(t);
}

/* D23 / D24: with interrupts on, the ISR shows the used buffer until read (PCI) or
 * acknowledged (mmio). */
static void raw_isr(struct raw *r)
{
    struct virtio_transport *t = r->t;
    vq_enable_interrupts(&r->vq);
    raw_inflate(&r->vq, r->pfns, 2, r->victims[2]);
    raw_kick(t, &r->vq);
    if (!raw_used(&r->vq, RAW_USED_NS)) {
        verdict(is_mmio(t) ? D24 : D23, V_TIMEOUT, "an inflate buffer was not used within 1 s");
    } else if (is_mmio(t)) {
        uint8_t a1 = t->ops->peek_isr(t), a2 = t->ops->peek_isr(t);
        t->ops->read_isr(t);
        uint8_t a3 = t->ops->peek_isr(t);
        if (!(a1 & VIRTIO_ISR_QUEUE) || !(a2 & VIRTIO_ISR_QUEUE) || (a3 & VIRTIO_ISR_QUEUE))
            verdict(D24, V_VIOLATION,
                    "InterruptStatus read 0x%x, 0x%x, then 0x%x after InterruptACK (want the "
                    "used-buffer bit set, set, clear)",
                    a1, a2, a3);
        else
            verdict(D24, V_CONFORMS,
                    "registers after a reset; InterruptStatus 0x%x, 0x%x, then "
                    "0x%x after InterruptACK",
                    a1, a2, a3);
        verdict(D23, V_NOT_APPLICABLE, "not applicable: virtio-mmio has no ISR register");
    } else {
        uint8_t a1 = t->ops->read_isr(t), a2 = t->ops->read_isr(t);
        if (!(a1 & VIRTIO_ISR_QUEUE) || (a2 & VIRTIO_ISR_QUEUE))
            verdict(D23, V_VIOLATION,
                    "ISR read 0x%x then 0x%x (want the queue bit set, then cleared by the read)",
                    a1, a2);
        else
            verdict(D23, V_CONFORMS, "ISR 0x%x after a used buffer, 0x%x when read again", a1, a2);
    }
}

/* D20 (first part): the device read the PFNs and wrote nothing back, used len 0. */
static void raw_readonly(struct raw *r)
{
    bool intact = true;
    for (unsigned i = 0; i < 3; i++)
        intact &= r->pfns[i] == (uint32_t)r->victims[i];
    if (!intact)
        verdict(D20, V_VIOLATION, "the device wrote into a device-readable inflate buffer");
    else if (vq_len_deviations(&r->vq))
        verdict(D20, V_VIOLATION, "used len %u on a read-only %u-byte inflate buffer: %s (want 0)",
                r->vq.first_dev_len, r->vq.first_dev_out_len,
                vq_len_observed(r->vq.first_dev_len, r->vq.first_dev_out_len));
    else
        verdict(D20, V_CONFORMS, "3 inflate buffers read back as written, used len 0");
}

/* D18 (first part): a reset device uses nothing, even when kicked. */
static void raw_reset(struct raw *r)
{
    struct virtio_transport *t = r->t;
    uint16_t used_before = r->vq.used->idx;
    int rc = t->ops->reset(t);
    uint8_t after = t->ops->get_status(t);
    raw_inflate(&r->vq, r->pfns, 3, r->victims[3]);
    raw_kick(t, &r->vq);
    busy_wait(RAW_WAIT_NS);
    if (rc != 0 || after != 0)
        verdict(D18, V_VIOLATION, "status reads 0x%02x after a reset", after);
    else if (r->vq.used->idx != used_before)
        verdict(D18, V_VIOLATION, "after a reset the used index moved from %u to %u", used_before,
                r->vq.used->idx);
    else
        verdict(D18, V_CONFORMS, "status 0 after a reset; a kick then moved no used index");
}

/* Bring the device to FEATURES_OK (modern) with one inflate queue of up to 64 entries; false
 * when it could not be set up. */
static bool raw_setup(struct raw *r, uint64_t ring, uint16_t size, bool legacy_layout)
{
    struct virtio_transport *t = r->t;
    for (unsigned i = 0; i < 4; i++)
        if (r->victims[i] == BUDDY_NONE)
            return false;
    if (ring == BUDDY_NONE || !r->pfns ||
        vq_init(&r->vq, "conform-inflate", 0, size, phys_to_virt(ring << PAGE_SHIFT), legacy_layout,
                0, false, false) != VQ_OK)
        return false;
    struct vq_addrs a;
    vq_addrs(&r->vq, &a);
    return t->ops->queue_enable(t, 0, size, &a) == 0;
}

static void raw_queue(struct virtio_transport *t)
{
    struct raw r = {.t = t};
    begin(t);
    t->ops->set_features(t, t->legacy ? 0 : 1ull << VIRTIO_F_VERSION_1);
    r.status = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER;
    if (!t->legacy) {
        r.status |= VIRTIO_STATUS_FEATURES_OK;
        t->ops->set_status(t, r.status);
    }
    uint16_t max = t->ops->queue_max_size(t, 0);
    bool legacy_layout = t->ops->queue_needs_legacy_layout(t);
    uint16_t size = legacy_layout ? max : (max < 64 ? max : 64);
    size_t bytes = size ? vq_mem_bytes(size, legacy_layout, 0) : 0;
    unsigned order = 0;
    while ((PAGE_SIZE << order) < bytes)
        order++;
    uint64_t ring = bytes ? buddy_alloc(&kernel_buddy, order) : BUDDY_NONE;
    uint64_t buf = alloc_page();
    for (unsigned i = 0; i < 4; i++)
        r.victims[i] = alloc_page();
    r.pfns = buf != BUDDY_NONE ? phys_to_virt(buf << PAGE_SHIFT) : NULL;
    if (raw_setup(&r, ring, size, legacy_layout)) {
        raw_before_driver_ok(&r);
        raw_no_interrupt(&r);
        raw_isr(&r);
        raw_readonly(&r);
        raw_reset(&r);
    } else {
        const char *why = "the raw inflate queue could not be set up";
        verdict(D9, V_NOT_EXERCISED, "not exercised: %s", why);
        verdict(D21, V_NOT_EXERCISED, "not exercised: %s", why);
        verdict(D18, V_NOT_EXERCISED, "not exercised: %s", why);
    }
    t->ops->reset(t);
    /* The victims went to the host and the reset forgot them: they are the guest's again. */
    for (unsigned i = 0; i < 4; i++)
        if (r.victims[i] != BUDDY_NONE)
            buddy_free(&kernel_buddy, r.victims[i], 0);
    if (buf != BUDDY_NONE)
        buddy_free(&kernel_buddy, buf, 0);
    if (ring != BUDDY_NONE)
        buddy_free(&kernel_buddy, ring, order);
}

void conform_prepare(void *ctx, struct virtio_transport *t, struct balloon_config *cfg)
{
    (void)ctx;
    conform.t = t;
    conform.cfg = cfg;
    report_info("conform: %s, blimp.conform.host=%u", t->name, conform.host);
    raw_registers(t);
    begin(t);
    uint64_t offered = t->ops->get_features(t);
    raw_config(t, offered);
    t->ops->reset(t);
    raw_features(t, offered);
    raw_queue(t);
    /* The driver: no reserve (the checks decide what is free), stats with the probe entry. */
    cfg->reserve_pages = 0;
    cfg->stats_probe = true;
}
