/*
 * Conformance mode: the host's balloon device against the device requirements of virtio 1.2/1.3
 * (../shared/docs/balloon-protocol.md section 5.2 numbers them D1-D24; docs/conformance.md).
 *
 * Two stages. Before the driver brings the device up (balloon mode's `prepare` hook) the checks
 * drive the transport and one raw queue directly: registers after a reset, feature subsets,
 * the config before FEATURES_OK, a buffer kicked before DRIVER_OK, interrupt suppression and
 * the ISR. Then, inside balloon mode's loop (the `step` hook), the checks use the real driver
 * and, when blimp.conform.host=1, ask a host runner for what only the host can do (a target, a
 * sample of its RSS, stats polling, a live migration) by printing `conform_request` events and
 * waiting for `ack` on the agent channel.
 *
 * Wrong-page discards: the balloon is given only isolated pages, every odd page of a large
 * block whose even pages (and all the rest of memory) the guest holds with a pattern. A host
 * that discards PFN^1 or any page but the one it was given destroys a verified neighbour.
 *
 * Every result is kept until the end, then printed in a fixed order: one TAP point per check
 * with a YAML block carrying the verdict, and one conform_check event.
 */
#include "kernel/conform.h"
#include "arch/x86/exit.h"
#include "kernel/agent.h"
#include "kernel/balloon_mode.h"
#include "kernel/mem.h"
#include "kernel/report.h"
#include "lib/json.h"
#include "lib/parse.h"
#include "lib/printf.h"
#include "lib/string.h"

enum check {
    D1,
    D2,
    D3,
    D4,
    D5,
    D6,
    D7,
    D8,
    D9,
    D10,
    D11,
    D12,
    D13,
    D14,
    D15,
    D16,
    D17,
    D18,
    D19,
    D20,
    D21,
    D22,
    D23,
    D24,
    B1,
    N_CHECKS,
};

static const struct {
    const char *id, *section, *title;
} checks[N_CHECKS] = {
    [D1] = {"D1", "5.5.3.2", "FEATURES_OK is answered when MUST_TELL_HOST is declined"},
    [D2] = {"D2", "5.5.3.2", "legacy interface: the device works without MUST_TELL_HOST"},
    [D3] = {"D3", "5.5.4", "num_pages reads exactly the target the host set (little-endian)"},
    [D4] = {"D4", "5.5.6.2", "the device changes no page outside the balloon"},
    [D5] = {"D5", "5.5.6.2.1", "legacy: actual is not used before its last byte is written"},
    [D6] = {"D6", "5.5.6.3.2", "the device ignores an unknown stats tag"},
    [D7] = {"D7", "5.5.6.3.2", "the device accepts stats entries in any order"},
    [D8] = {"D8", "5.5.6.3.3", "legacy: the values of the first stats buffer are ignored"},
    [D9] = {"D9", "2.1.2", "the device uses no buffer before DRIVER_OK"},
    [D10] = {"D10", "5.5.6.5.2", "free_page_hint_cmd_id reads STOP or DONE outside migration"},
    [D11] = {"D11", "5.5.6.5.2", "a hint command id is not reused"},
    [D12] = {"D12", "5.5.6.5.2", "hints tagged with a stale id are ignored"},
    [D13] = {"D13", "5.5.6.5.2", "pages written after DONE arrive intact after a migration"},
    [D14] = {"D14", "5.5.6.5.2", "the cmd id becomes DONE once the migration needs no hints"},
    [D15] = {"D15", "5.5.6.7.2", "without PAGE_POISON only reported pages may change"},
    [D16] = {"D16", "5.5.6.7.2", "with PAGE_POISON reported pages keep poison_val"},
    [D17] = {"D17", "2.2.2", "FEATURES_OK sticks for valid subsets of the offered features"},
    [D18] = {"D18", "2.4.1", "after a reset status reads 0 and no queue moves"},
    [D19] = {"D19", "2.5.2", "the config (offered features' fields too) reads before FEATURES_OK"},
    [D20] = {"D20", "2.7.5.1", "no write to device-readable buffers; used len 0 on them"},
    [D21] = {"D21", "2.7.7.2", "used flags 0 or 1; VRING_AVAIL_F_NO_INTERRUPT is honoured"},
    [D22] = {"D22", "4.1.4.3.1", "PCI registers after a reset; config_generation moves"},
    [D23] = {"D23", "4.1.4.5.1", "PCI ISR: a bit is set before the interrupt, reading clears it"},
    [D24] = {"D24", "4.2.2.1", "MMIO: magic, version, registers after a reset, ISR until ACK"},
    [B1] = {"B1", "blimp", "inflated pages go back to the host (its RSS falls)"},
};

enum verdict {
    V_NONE,
    V_CONFORMS,
    /* skips */
    V_NOT_OFFERED,
    V_DECLINED,
    V_NOT_APPLICABLE,
    V_NOT_OBSERVABLE,
    V_NEEDS_RUNNER,
    V_NOT_EXERCISED,
    /* failures */
    V_ACKED_NOT_DISCARDED,
    V_WRONG_PAGE,
    V_VIOLATION,
    V_NEEDS_RESET,
    V_TIMEOUT,
    N_VERDICTS,
};

static const char *const verdict_names[N_VERDICTS] = {
    [V_NONE] = "none",
    [V_CONFORMS] = "conforms",
    [V_NOT_OFFERED] = "not-offered",
    [V_DECLINED] = "declined",
    [V_NOT_APPLICABLE] = "not-applicable",
    [V_NOT_OBSERVABLE] = "not-observable",
    [V_NEEDS_RUNNER] = "needs-runner",
    [V_NOT_EXERCISED] = "not-exercised",
    [V_ACKED_NOT_DISCARDED] = "acked-not-discarded",
    [V_WRONG_PAGE] = "wrong-page-discarded",
    [V_VIOLATION] = "protocol-violation",
    [V_NEEDS_RESET] = "needs-reset",
    [V_TIMEOUT] = "timeout",
};

static bool failing(enum verdict v)
{
    return v >= V_ACKED_NOT_DISCARDED;
}

static struct {
    enum verdict v;
    char detail[200];
} res[N_CHECKS];

/* A failure sticks (the first one is reported); a pass replaces a skip or an earlier pass (the
 * later check saw more); a skip never replaces anything. */
static void verdict(enum check c, enum verdict v, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void verdict(enum check c, enum verdict v, const char *fmt, ...)
{
    enum verdict old = res[c].v;
    if (old != V_NONE && (failing(old) || (!failing(v) && v != V_CONFORMS)))
        return;
    res[c].v = v;
    va_list ap;
    va_start(ap, fmt);
    kvsnprintf(res[c].detail, sizeof(res[c].detail), fmt, ap);
    va_end(ap);
    if (failing(v))
        kprintf("conform: %s %s: %s\n", checks[c].id, verdict_names[v], res[c].detail);
}

/* ---- memory the checks hold: blocks chained through their first words, patterned ---------- */

#define AREA_ORDER   12  /* the isolated pages: every odd page of 16 MiB */
#define RECORD_SLACK 64  /* isolated pages left for the driver's block records */
#define PATTERN_OFF  256 /* pattern words at 256 + 512k: the first words hold the chain */
#define PATTERN_STEP 512
#define PATTERN_SEED 0x9e3779b97f4a7c15ull

struct held_block {
    uint64_t next_pfn; /* BUDDY_NONE ends the chain */
    uint64_t order;
};

struct chain {
    uint64_t head, pages;
};

static uint64_t pattern_word(uint64_t addr, uint64_t gen)
{
    return (addr * PATTERN_SEED) ^ (gen << 56) ^ 0x5a5a5a5a00000000ull;
}

static void pattern_page(uint64_t pfn, uint64_t gen)
{
    uint64_t base = pfn << PAGE_SHIFT;
    uint8_t *p = phys_to_virt(base);
    for (unsigned off = PATTERN_OFF; off < PAGE_SIZE; off += PATTERN_STEP)
        *(volatile uint64_t *)(p + off) = pattern_word(base + off, gen);
}

/* 0 when the page holds its pattern, else the address of the first bad word (*found: its
 * value, *expected: what belongs there). */
static uint64_t check_page(uint64_t pfn, uint64_t gen, uint64_t *found, uint64_t *expected)
{
    uint64_t base = pfn << PAGE_SHIFT;
    const uint8_t *p = phys_to_virt(base);
    for (unsigned off = PATTERN_OFF; off < PAGE_SIZE; off += PATTERN_STEP) {
        uint64_t v = *(const volatile uint64_t *)(p + off), want = pattern_word(base + off, gen);
        if (v != want) {
            *found = v;
            *expected = want;
            return base + off;
        }
    }
    return 0;
}

static bool page_zero(uint64_t pfn)
{
    const uint8_t *p = phys_to_virt(pfn << PAGE_SHIFT);
    for (unsigned off = PATTERN_OFF; off < PAGE_SIZE; off += PATTERN_STEP)
        if (*(const volatile uint64_t *)(p + off))
            return false;
    return true;
}

static struct held_block *block_at(uint64_t pfn)
{
    return phys_to_virt(pfn << PAGE_SHIFT);
}

/* Take every free page into the chain, each page patterned with gen. */
static void take_all(struct chain *c, uint64_t gen)
{
    c->head = BUDDY_NONE;
    c->pages = 0;
    unsigned order;
    uint64_t pfn;
    while ((pfn = buddy_alloc_largest(&kernel_buddy, BUDDY_MAX_ORDER, &order)) != BUDDY_NONE) {
        for (uint64_t i = 0; i < (1ull << order); i++)
            pattern_page(pfn + i, gen);
        struct held_block *h = block_at(pfn);
        h->next_pfn = c->head;
        h->order = order;
        c->head = pfn;
        c->pages += 1ull << order;
    }
}

/* The first bad page of the chain (0: all good). */
static uint64_t verify_chain(const struct chain *c, uint64_t gen, uint64_t *found,
                             uint64_t *expected, uint64_t *pages_checked)
{
    for (uint64_t pfn = c->head; pfn != BUDDY_NONE; pfn = block_at(pfn)->next_pfn) {
        uint64_t n = 1ull << block_at(pfn)->order;
        for (uint64_t i = 0; i < n; i++) {
            uint64_t bad = check_page(pfn + i, gen, found, expected);
            if (bad)
                return bad;
        }
        *pages_checked += n;
    }
    return 0;
}

static void free_chain(struct chain *c)
{
    uint64_t pfn = c->head;
    while (pfn != BUDDY_NONE) {
        struct held_block h = *block_at(pfn);
        buddy_free(&kernel_buddy, pfn, (unsigned)h.order);
        pfn = h.next_pfn;
    }
    c->head = BUDDY_NONE;
    c->pages = 0;
}

/* ---- requests to the host runner ---------------------------------------------------------- */

static struct {
    uint64_t seq;
    bool waiting, answered, acked;
    uint64_t deadline;
    char rest[256];
    const char *action;
} req;

static bool on_answer(void *ctx, bool ack, uint64_t seq, const char *rest)
{
    (void)ctx;
    if (!req.waiting || seq != req.seq)
        return false;
    strlcpy(req.rest, rest, sizeof(req.rest));
    req.answered = true;
    req.acked = ack;
    req.waiting = false;
    return true;
}

static uint64_t timeout_ns;

static void request(const char *action, const char *key, uint64_t value)
{
    req.seq++;
    req.waiting = true;
    req.answered = false;
    req.action = action;
    req.rest[0] = '\0';
    uint64_t wait = timeout_ns;
    if (!strcmp(action, "migrate"))
        wait *= 6; /* a live migration of the whole guest under TCG */
    req.deadline = platform_now_ns() + wait;
    kprintf("conform: request %lu: %s\n", req.seq, action);
    struct json j;
    event_begin(&j, "conform_request");
    json_u64(&j, "seq", req.seq);
    json_str(&j, "action", action);
    if (key)
        json_u64(&j, key, value);
    event_emit(&j);
}

enum answer { A_WAITING, A_ACK, A_NACK, A_TIMEOUT };

static enum answer answer(uint64_t now)
{
    if (req.answered)
        return req.acked ? A_ACK : A_NACK;
    if (now > req.deadline) {
        req.waiting = false;
        return A_TIMEOUT;
    }
    return A_WAITING;
}

/* key=value from the last answer (decimal, may be negative). */
static bool answer_value(const char *key, int64_t *out)
{
    size_t kl = strlen(key);
    for (const char *p = req.rest; *p;) {
        while (*p == ' ')
            p++;
        if (!strncmp(p, key, kl) && p[kl] == '=') {
            const char *v = p + kl + 1;
            bool neg = *v == '-';
            char num[24];
            size_t n = 0;
            for (v += neg; *v && *v != ' ' && n + 1 < sizeof(num); v++)
                num[n++] = *v;
            num[n] = '\0';
            uint64_t u;
            if (!parse_u64(num, &u) || u > INT64_MAX)
                return false; /* the runner is untrusted input too */
            *out = neg ? -(int64_t)u : (int64_t)u;
            return true;
        }
        while (*p && *p != ' ')
            p++;
    }
    return false;
}

/* ---- stage 1: the transport and one raw queue, before the driver ------------------------- */

#define DONE_WAIT_NS (2000ull * 1000 * 1000) /* after a migration, for the cmd id to read DONE */
#define RAW_WAIT_NS  (20ull * 1000 * 1000)   /* long enough for any device to act on a kick */
#define RAW_USED_NS  (1000ull * 1000 * 1000) /* for a buffer the device should use */

static bool is_pci(const struct virtio_transport *t)
{
    return !strncmp(t->name, "virtio-pci", 10);
}

static bool is_mmio(const struct virtio_transport *t)
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
        report_info("%s %s: %s (%s)", checks[own].id, rc[i].ok ? "holds" : "FAILS", rc[i].what,
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

static void raw_queue(struct virtio_transport *t, uint64_t offered)
{
    uint64_t feats = t->legacy ? 0 : 1ull << VIRTIO_F_VERSION_1;
    (void)offered;
    begin(t);
    t->ops->set_features(t, feats);
    uint8_t st = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER;
    if (!t->legacy) {
        st |= VIRTIO_STATUS_FEATURES_OK;
        t->ops->set_status(t, st);
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
    uint64_t victims[4];
    for (unsigned i = 0; i < 4; i++)
        victims[i] = alloc_page();
    struct virtqueue vq;
    struct vq_addrs a;
    bool have_victims = true;
    for (unsigned i = 0; i < 4; i++)
        have_victims &= victims[i] != BUDDY_NONE;
    if (ring == BUDDY_NONE || buf == BUDDY_NONE || !have_victims ||
        vq_init(&vq, "conform-inflate", 0, size, phys_to_virt(ring << PAGE_SHIFT), legacy_layout, 0,
                false, false) != VQ_OK ||
        (vq_addrs(&vq, &a), t->ops->queue_enable(t, 0, size, &a) != 0)) {
        const char *why = "the raw inflate queue could not be set up";
        verdict(D9, V_NOT_EXERCISED, "not exercised: %s", why);
        verdict(D21, V_NOT_EXERCISED, "not exercised: %s", why);
        verdict(D18, V_NOT_EXERCISED, "not exercised: %s", why);
        goto out;
    }
    uint32_t *pfns = phys_to_virt(buf << PAGE_SHIFT);

    /* D9: a buffer made available and kicked before DRIVER_OK must not be used. */
    raw_inflate(&vq, pfns, 0, victims[0]);
    raw_kick(t, &vq);
    busy_wait(RAW_WAIT_NS);
    void *tok = vq_get_used(&vq, NULL);
    if (tok)
        verdict(D9, V_VIOLATION,
                "an inflate buffer kicked with status 0x%02x (no DRIVER_OK) was used within 20 ms",
                st);
    else
        verdict(D9, V_CONFORMS, "an inflate buffer kicked before DRIVER_OK stayed unused 20 ms");
    t->ops->set_status(t, st | VIRTIO_STATUS_DRIVER_OK);
    if (!tok) {
        raw_kick(t, &vq); /* now it may be used */
        raw_used(&vq, RAW_USED_NS);
    }
    t->ops->read_isr(t); /* clear (PCI: reading clears; mmio: read_isr acknowledges) */

    /* D21: with VRING_AVAIL_F_NO_INTERRUPT the device must not signal the used buffer. */
    vq_disable_interrupts(&vq);
    raw_inflate(&vq, pfns, 1, victims[1]);
    raw_kick(t, &vq);
    if (!raw_used(&vq, RAW_USED_NS)) {
        verdict(D21, V_TIMEOUT, "an inflate buffer was not used within 1 s");
    } else {
        uint16_t flags = vq.used->flags;
        uint8_t isr = t->ops->peek_isr ? t->ops->peek_isr(t) : t->ops->read_isr(t);
        if (flags > 1)
            verdict(D21, V_VIOLATION, "used ring flags 0x%x (only 0 or 1 allowed)", flags);
        else if (isr & VIRTIO_ISR_QUEUE)
            verdict(D21, V_VIOLATION,
                    "the queue interrupt bit was set (ISR 0x%x) although the driver set "
                    "VRING_AVAIL_F_NO_INTERRUPT",
                    isr);
        else
            verdict(D21, V_CONFORMS, "used flags %u; no queue interrupt with NO_INTERRUPT set",
                    flags);
        t->ops->read_isr(t);
    }

    /* D23 / D24: with interrupts on, the ISR shows the used buffer until read (PCI) or
     * acknowledged (mmio). */
    vq_enable_interrupts(&vq);
    raw_inflate(&vq, pfns, 2, victims[2]);
    raw_kick(t, &vq);
    if (!raw_used(&vq, RAW_USED_NS)) {
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

    /* D20 (first part): the device read the PFNs and wrote nothing back, used len 0. */
    bool intact = true;
    for (unsigned i = 0; i < 3; i++)
        intact &= pfns[i] == (uint32_t)victims[i];
    if (!intact)
        verdict(D20, V_VIOLATION, "the device wrote into a device-readable inflate buffer");
    else if (vq_len_deviations(&vq))
        verdict(D20, V_VIOLATION, "used len %u on a read-only inflate buffer (want 0)",
                vq.first_dev_len);
    else
        verdict(D20, V_CONFORMS, "3 inflate buffers read back as written, used len 0");

    /* D18 (first part): a reset device uses nothing, even when kicked. */
    uint16_t used_before = vq.used->idx;
    int rc = t->ops->reset(t);
    uint8_t after = t->ops->get_status(t);
    raw_inflate(&vq, pfns, 3, victims[3]);
    raw_kick(t, &vq);
    busy_wait(RAW_WAIT_NS);
    if (rc != 0 || after != 0)
        verdict(D18, V_VIOLATION, "status reads 0x%02x after a reset", after);
    else if (vq.used->idx != used_before)
        verdict(D18, V_VIOLATION, "after a reset the used index moved from %u to %u", used_before,
                vq.used->idx);
    else
        verdict(D18, V_CONFORMS, "status 0 after a reset; a kick then moved no used index");
out:
    t->ops->reset(t);
    /* The victims went to the host and the reset forgot them: they are the guest's again. */
    for (unsigned i = 0; i < 4; i++)
        if (victims[i] != BUDDY_NONE)
            buddy_free(&kernel_buddy, victims[i], 0);
    if (buf != BUDDY_NONE)
        buddy_free(&kernel_buddy, buf, 0);
    if (ring != BUDDY_NONE)
        buddy_free(&kernel_buddy, ring, order);
}

/* ---- stage 2: with the driver ------------------------------------------------------------- */

enum phase {
    P_START,
    P_RSS0,
    P_TARGET,
    P_TARGET_WAIT,
    P_RSS1,
    P_DEFLATE,
    P_DEFLATE_WAIT,
    P_STATS_ON,
    P_STATS_WAIT,
    P_STATS_READ,
    P_STATS_OFF,
    P_MIGRATE1,
    P_MIGRATE1_WAIT,
    P_MIGRATE1_CHECK,
    P_MIGRATE2,
    P_MIGRATE2_WAIT,
    P_REPORT,
    P_REPORT_WAIT,
    P_RESET,
    P_RESET_WAIT,
    P_FINISH,
};

static struct {
    const struct options *opts;
    struct virtio_transport *t;
    struct balloon_config *cfg;
    enum phase phase;
    uint64_t phase_ns;
    bool host;
    uint64_t offered;
    /* isolated pages */
    uint64_t area; /* first pfn of the 2^AREA_ORDER block, BUDDY_NONE when none */
    unsigned area_order;
    uint64_t isolated; /* odd pages freed for the balloon */
    uint32_t target;
    struct chain fill; /* everything else, patterned */
    int64_t rss0, rss1;
    uint32_t gen0;
    uint64_t isr0, isr_rep0;
    uint64_t stats0;
    uint64_t resets0;
    /* hinting */
    uint32_t ids[16];
    unsigned n_ids;
    uint32_t last_active;
    uint64_t rounds0;
    /* reporting */
    uint64_t reported0, passes0, report_poison0, quiet_since, last_reported;
    uint16_t used_idx[3];
} run;

static uint64_t gen_of(uint64_t pfn)
{
    return pfn & 1; /* two generations: the pattern differs between neighbours too */
}

static void go(enum phase p)
{
    run.phase = p;
    run.phase_ns = platform_now_ns();
}

static bool phase_timed_out(uint64_t now)
{
    return now - run.phase_ns > timeout_ns;
}

static bool negotiated(const struct balloon_status *st, unsigned bit)
{
    return (st->features >> bit) & 1;
}

/* Skip verdict for a feature that is not there: declined by the guest, or not offered. */
static void feature_skip(enum check c, const struct balloon_status *st, unsigned bit,
                         const char *name)
{
    if ((st->offered >> bit) & 1)
        verdict(c, V_DECLINED, "declined: the guest declined %s", name);
    else
        verdict(c, V_NOT_OFFERED, "not offered: %s", name);
}

static void split_all(uint64_t pfn, unsigned order)
{
    if (order == 0)
        return;
    buddy_split(&kernel_buddy, pfn, order);
    split_all(pfn, order - 1);
    split_all(pfn + (1ull << (order - 1)), order - 1);
}

/* The balloon can only take the odd pages of the area: the guest holds everything else. */
static bool build_layout(void)
{
    run.area = BUDDY_NONE;
    for (unsigned o = AREA_ORDER; o >= 8 && run.area == BUDDY_NONE; o--) {
        run.area = buddy_alloc(&kernel_buddy, o);
        run.area_order = o;
    }
    if (run.area == BUDDY_NONE)
        return false;
    uint64_t n = 1ull << run.area_order;
    for (uint64_t i = 0; i < n; i++)
        pattern_page(run.area + i, gen_of(run.area + i));
    take_all(&run.fill, 2);
    split_all(run.area, run.area_order);
    for (uint64_t i = 1; i < n; i += 2)
        buddy_free(&kernel_buddy, run.area + i, 0);
    run.isolated = n / 2;
    run.target = (uint32_t)(run.isolated - RECORD_SLACK);
    report_info("layout: %lu isolated pages at 0x%lx between held neighbours, %lu more pages "
                "held; the balloon may take %u",
                run.isolated, run.area << PAGE_SHIFT, run.fill.pages, run.target);
    return true;
}

/* The even pages of the area and the rest of memory: still as the guest wrote them? */
static void verify_neighbours(const char *when)
{
    uint64_t found = 0, expected = 0, checked = 0;
    for (uint64_t i = 0; i < (1ull << run.area_order); i += 2) {
        uint64_t pfn = run.area + i;
        uint64_t bad = check_page(pfn, gen_of(pfn), &found, &expected);
        if (bad) {
            verdict(D4, V_WRONG_PAGE,
                    "%s: page 0x%lx, next to ballooned page 0x%lx, reads 0x%lx at 0x%lx "
                    "(expected 0x%lx)",
                    when, pfn << PAGE_SHIFT, (pfn + 1) << PAGE_SHIFT, found, bad, expected);
            return;
        }
        checked++;
    }
    uint64_t bad = verify_chain(&run.fill, 2, &found, &expected, &checked);
    if (bad) {
        verdict(D4, V_WRONG_PAGE,
                "%s: page 0x%lx (not near the balloon) reads 0x%lx at 0x%lx "
                "(expected 0x%lx)",
                when, bad & ~(uint64_t)(PAGE_SIZE - 1), found, bad, expected);
        return;
    }
    report_info("D4 holds %s: %lu pages around and away from the balloon verified", when, checked);
    verdict(D4, V_CONFORMS,
            "%u isolated pages inflated and deflated; every neighbour and the "
            "rest of memory verified after each",
            run.target);
}

static void release_layout(void)
{
    free_chain(&run.fill);
    if (run.area == BUDDY_NONE)
        return;
    for (uint64_t i = 0; i < (1ull << run.area_order); i += 2)
        buddy_free(&kernel_buddy, run.area + i, 0);
    run.area = BUDDY_NONE;
}

/* Every round id the driver saw (it may start and end a round within one poll: the last id
 * seen, STOP and DONE included, is what persists). */
static void track_hint_ids(void)
{
    struct balloon *b = balloon_mode_balloon();
    uint32_t id = b->hint_cmd_seen;
    if (id == run.last_active)
        return;
    run.last_active = id;
    if (id == BALLOON_HINT_CMD_STOP || id == BALLOON_HINT_CMD_DONE)
        return;
    /* A repeat is allowed once the device has used the driver's STOP for it. */
    bool stop_pending = b->hint_stop_owed || vq_in_flight(&b->hint_vq);
    for (unsigned i = 0; i < run.n_ids; i++)
        if (run.ids[i] == id && stop_pending)
            verdict(D11, V_VIOLATION,
                    "hint command id 0x%x reused before the device took the driver's STOP", id);
    if (run.n_ids < sizeof(run.ids) / sizeof(run.ids[0]))
        run.ids[run.n_ids++] = id;
}

static uint32_t read_cmd_id(void)
{
    uint32_t v = 0;
    run.t->ops->config_read(run.t, BALLOON_CFG_HINT_CMD, 4, &v);
    return v;
}

static __attribute__((noreturn)) void finish(void);

static void no_host(const struct balloon_status *st)
{
    const char *why = "needs the host runner (./blimp conform, blimp.conform.host=1)";
    enum check host_checks[] = {D3, D4, D6, D7, D11, D13, D14, B1};
    for (unsigned i = 0; i < sizeof(host_checks) / sizeof(host_checks[0]); i++)
        verdict(host_checks[i], V_NEEDS_RUNNER, "%s", why);
    if (run.t->legacy)
        verdict(D2, V_NEEDS_RUNNER, "%s", why);
    (void)st;
}

static void start(const struct balloon_status *st)
{
    run.offered = st->offered;
    run.resets0 = st->resets;
    verdict(D5, V_NOT_OBSERVABLE,
            "not observable: only the host sees when it uses actual (needs host-side tracing)");
    verdict(D8, V_NOT_OBSERVABLE, "not observable: host-side only");
    verdict(D12, V_NOT_OBSERVABLE,
            "not observable: which hints the host ignores is internal "
            "to its migration");
    if (!run.t->legacy)
        verdict(D2, V_NOT_APPLICABLE, "not applicable: the modern interface is in use");
    else if (negotiated(st, VIRTIO_BALLOON_F_MUST_TELL_HOST))
        verdict(D2, V_NOT_APPLICABLE, "not applicable: MUST_TELL_HOST was negotiated");
    if (negotiated(st, VIRTIO_BALLOON_F_FREE_PAGE_HINT)) {
        uint32_t id = read_cmd_id();
        if (id == BALLOON_HINT_CMD_STOP || id == BALLOON_HINT_CMD_DONE)
            verdict(D10, V_CONFORMS, "free_page_hint_cmd_id reads %u outside migration", id);
        else
            verdict(D10, V_VIOLATION, "free_page_hint_cmd_id reads 0x%x with no migration", id);
    } else {
        feature_skip(D10, st, VIRTIO_BALLOON_F_FREE_PAGE_HINT, "FREE_PAGE_HINT");
        feature_skip(D11, st, VIRTIO_BALLOON_F_FREE_PAGE_HINT, "FREE_PAGE_HINT");
        feature_skip(D13, st, VIRTIO_BALLOON_F_FREE_PAGE_HINT, "FREE_PAGE_HINT");
        feature_skip(D14, st, VIRTIO_BALLOON_F_FREE_PAGE_HINT, "FREE_PAGE_HINT");
    }
    if (!negotiated(st, VIRTIO_BALLOON_F_STATS_VQ)) {
        feature_skip(D6, st, VIRTIO_BALLOON_F_STATS_VQ, "STATS_VQ");
        feature_skip(D7, st, VIRTIO_BALLOON_F_STATS_VQ, "STATS_VQ");
    }
    if (!negotiated(st, VIRTIO_BALLOON_F_PAGE_REPORTING)) {
        feature_skip(D15, st, VIRTIO_BALLOON_F_PAGE_REPORTING, "PAGE_REPORTING");
        feature_skip(D16, st, VIRTIO_BALLOON_F_PAGE_REPORTING, "PAGE_REPORTING");
    } else if (negotiated(st, VIRTIO_BALLOON_F_PAGE_POISON)) {
        verdict(D15, V_NOT_APPLICABLE, "not applicable: PAGE_POISON was negotiated (D16)");
    } else {
        feature_skip(D16, st, VIRTIO_BALLOON_F_PAGE_POISON,
                     "PAGE_POISON (accepted only with blimp.poison=1)");
    }
    if (!run.host) {
        no_host(st);
        go(P_REPORT);
        return;
    }
    if (!build_layout()) {
        verdict(D4, V_NOT_EXERCISED, "not exercised: no free block for the isolated pages");
        verdict(B1, V_NOT_EXERCISED, "not exercised: no free block for the isolated pages");
        go(P_STATS_ON);
        return;
    }
    go(P_RSS0);
}

/* A request answered: true once acked; a nack or timeout sets `fail` for check c. */
static bool answered(uint64_t now, enum check c, enum phase on_fail, bool *failed)
{
    *failed = false;
    enum answer a = answer(now);
    if (a == A_WAITING)
        return false;
    if (a == A_ACK)
        return true;
    if (a == A_NACK)
        verdict(c, V_NOT_EXERCISED, "not exercised: the host runner could not %s: %s", req.action,
                req.rest);
    else
        verdict(c, V_TIMEOUT, "the host runner did not answer '%s' (request %lu) in time",
                req.action, req.seq);
    *failed = true;
    go(on_fail);
    return false;
}

static bool quiet(const struct balloon_status *st)
{
    return st->inflight_inflate == 0 && st->inflight_deflate == 0;
}

static uint64_t step(void *ctx, const struct balloon_status *st)
{
    (void)ctx;
    uint64_t now = platform_now_ns();
    bool failed;
    if (st->state == BALLOON_BROKEN) {
        enum check c = run.phase <= P_DEFLATE_WAIT ? D4 : D20;
        verdict(c, V_VIOLATION, "%s", st->violation);
        verdict(D20, V_VIOLATION, "%s", st->violation);
        finish();
    }
    if (st->resets != run.resets0) {
        run.resets0 = st->resets;
        verdict(run.phase <= P_DEFLATE_WAIT ? D4 : D20, V_NEEDS_RESET,
                "the device set DEVICE_NEEDS_RESET (the driver reset it and went on)");
    }
    track_hint_ids();
    struct wait_stats ws;
    switch (run.phase) {
    case P_START:
        start(st);
        break;
    case P_RSS0:
        request("rss", NULL, 0);
        go(P_TARGET);
        break;
    case P_TARGET:
        if (!answered(now, B1, P_TARGET, &failed)) {
            if (!failed)
                break;
            run.rss0 = -1;
        } else if (!answer_value("kib", &run.rss0)) {
            run.rss0 = -1;
        }
        run.gen0 = run.t->ops->config_generation(run.t);
        balloon_mode_wait_stats(&ws);
        run.isr0 = ws.isr_config;
        run.isr_rep0 = ws.isr_config_repeat;
        request("target", "pages", run.target);
        go(P_TARGET_WAIT);
        break;
    case P_TARGET_WAIT:
        if (req.waiting && !answered(now, D3, P_DEFLATE, &failed))
            break;
        if (st->device_target == run.target && st->actual == run.target && quiet(st)) {
            verdict(D3, V_CONFORMS, "num_pages read 0x%08x = %u, as the host set it",
                    st->device_target, st->device_target);
            uint32_t gen = run.t->ops->config_generation(run.t);
            if (is_pci(run.t) && !run.t->legacy) {
                if (gen == run.gen0)
                    verdict(D22, V_VIOLATION,
                            "config_generation stayed %u across a change of num_pages", gen);
                else
                    verdict(D22, V_CONFORMS,
                            "registers after a reset as required; config_generation %u -> %u "
                            "when num_pages changed",
                            run.gen0, gen);
            } else if (is_pci(run.t)) {
                verdict(D22, V_CONFORMS, "legacy registers after a reset as required");
            }
            balloon_mode_wait_stats(&ws);
            if (is_pci(run.t)) {
                if (ws.isr_config == run.isr0)
                    verdict(D23, V_VIOLATION,
                            "no ISR read showed the configuration-change bit after num_pages "
                            "changed");
                else if (ws.isr_config_repeat != run.isr_rep0)
                    verdict(D23, V_VIOLATION,
                            "the configuration-change bit was still set on "
                            "the read after the one that saw it");
                else
                    verdict(D23, V_CONFORMS,
                            "queue and configuration bits set before being read, cleared by "
                            "the read");
            } else if (is_mmio(run.t)) {
                verdict(D24, V_CONFORMS,
                        "magic, version, Status/QueueReady after a reset; InterruptStatus held "
                        "until InterruptACK; config generation %u -> %u",
                        run.gen0, gen);
            }
            verify_neighbours("after inflating");
            request("rss", NULL, 0);
            go(P_RSS1);
        } else if (phase_timed_out(now)) {
            if (st->device_target != run.target && st->device_target != 0)
                verdict(D3, V_VIOLATION, "num_pages reads 0x%08x, the host set 0x%08x",
                        st->device_target, run.target);
            else
                verdict(D3, V_TIMEOUT, "the balloon reached %u of %u pages (num_pages %u)",
                        st->actual, run.target, st->device_target);
            verdict(B1, V_NOT_EXERCISED, "not exercised: the balloon did not fill");
            go(P_DEFLATE);
        }
        break;
    case P_RSS1:
        if (!answered(now, B1, P_DEFLATE, &failed))
            break;
        if (answer_value("kib", &run.rss1) && run.rss0 >= 0) {
            int64_t drop = run.rss0 - run.rss1, want = (int64_t)run.target * 4;
            if (drop * 2 >= want)
                verdict(B1, V_CONFORMS, "host RSS fell by %ld KiB for %ld KiB inflated", drop,
                        want);
            else
                verdict(B1, V_ACKED_NOT_DISCARDED,
                        "the host acknowledged %ld KiB but its RSS fell by %ld KiB (%ld -> %ld)",
                        want, drop, run.rss0, run.rss1);
        } else {
            verdict(B1, V_NOT_EXERCISED, "not exercised: the runner gave no RSS");
        }
        go(P_DEFLATE);
        break;
    case P_DEFLATE:
        request("target", "pages", 0);
        go(P_DEFLATE_WAIT);
        break;
    case P_DEFLATE_WAIT:
        if (req.waiting && !answered(now, D4, P_STATS_ON, &failed))
            break;
        if (st->device_target == 0 && st->actual == 0 && quiet(st)) {
            verify_neighbours("after deflating");
            if (run.t->legacy && !negotiated(st, VIRTIO_BALLOON_F_MUST_TELL_HOST))
                verdict(D2, V_CONFORMS,
                        "legacy interface without MUST_TELL_HOST: %u pages "
                        "inflated and deflated",
                        run.target);
            go(P_STATS_ON);
        } else if (phase_timed_out(now)) {
            verdict(D4, V_TIMEOUT, "the balloon still held %u pages after num_pages went to 0",
                    st->actual);
            go(P_STATS_ON);
        }
        break;
    case P_STATS_ON:
        if (!negotiated(st, VIRTIO_BALLOON_F_STATS_VQ)) {
            go(P_MIGRATE1);
            break;
        }
        run.stats0 = st->stats_updates;
        request("stats_interval", "seconds", 1);
        go(P_STATS_WAIT);
        break;
    case P_STATS_WAIT:
        if (req.waiting && !answered(now, D6, P_MIGRATE1, &failed))
            break;
        if (st->stats_updates >= run.stats0 + 2) {
            verdict(D6, V_CONFORMS,
                    "the device kept polling stats (%lu updates) with an entry "
                    "of unknown tag 0x%x in every buffer",
                    st->stats_updates - run.stats0, BALLOON_STATS_PROBE_TAG);
            request("stats_read", NULL, 0);
            go(P_STATS_READ);
        } else if (phase_timed_out(now)) {
            verdict(D6, V_TIMEOUT, "%lu stats updates in %lu ms at a 1 s interval",
                    st->stats_updates - run.stats0, timeout_ns / 1000000);
            verdict(D7, V_NOT_EXERCISED, "not exercised: the host did not poll stats");
            go(P_STATS_OFF);
        }
        break;
    case P_STATS_READ: {
        if (!answered(now, D7, P_STATS_OFF, &failed))
            break;
        struct buddy_stats bs;
        buddy_get_stats(&kernel_buddy, &bs);
        int64_t total, freev;
        /* The last buffer the host read: the same numbers balloon_fill_stats writes now, as
         * nothing has allocated or freed since (the guest holds its memory still). */
        if (!answer_value("total_memory", &total) || !answer_value("free_memory", &freev))
            verdict(D7, V_VIOLATION, "the host reports no total/free memory: %s", req.rest);
        else if ((uint64_t)total != bs.total_pages * PAGE_SIZE ||
                 (uint64_t)freev != bs.free_pages * PAGE_SIZE)
            verdict(D7, V_VIOLATION,
                    "entries sent in reverse order: the host reports total %ld free %ld, the "
                    "guest sent %lu and %lu",
                    total, freev, (uint64_t)(bs.total_pages * PAGE_SIZE),
                    (uint64_t)(bs.free_pages * PAGE_SIZE));
        else
            verdict(D7, V_CONFORMS,
                    "entries sent in reverse tag order read back as sent "
                    "(total %ld, free %ld bytes)",
                    total, freev);
        go(P_STATS_OFF);
        break;
    }
    case P_STATS_OFF:
        request("stats_interval", "seconds", 0);
        go(P_MIGRATE1);
        break;
    case P_MIGRATE1:
        if (req.waiting && answer(now) == A_WAITING)
            break; /* the stats_interval 0 answer (its outcome does not matter) */
        release_layout();
        if (!run.host || !negotiated(st, VIRTIO_BALLOON_F_FREE_PAGE_HINT)) {
            go(P_REPORT);
            break;
        }
        run.rounds0 = st->hint_rounds;
        request("migrate", NULL, 0);
        go(P_MIGRATE1_WAIT);
        break;
    case P_MIGRATE1_WAIT: {
        if (!answered(now, D13, P_REPORT, &failed)) {
            if (failed) {
                verdict(D11, V_NOT_EXERCISED, "not exercised: no migration");
                verdict(D14, V_NOT_EXERCISED, "not exercised: no migration");
            }
            break;
        }
        go(P_MIGRATE1_CHECK);
        break;
    }
    case P_MIGRATE1_CHECK: {
        uint32_t id = read_cmd_id();
        if (st->hint_rounds == run.rounds0) {
            verdict(D14, V_NOT_EXERCISED,
                    "not exercised: the host started no hinting round "
                    "during the migration");
        } else if (id == BALLOON_HINT_CMD_DONE) {
            verdict(D14, V_CONFORMS, "after the migration the cmd id reads DONE (%lu round(s))",
                    st->hint_rounds - run.rounds0);
        } else if (now - run.phase_ns > DONE_WAIT_NS) {
            verdict(D14, V_VIOLATION, "the cmd id reads 0x%x 2 s after the migration completed",
                    id);
        } else {
            break; /* it may still be on its way to DONE */
        }
        if (id != BALLOON_HINT_CMD_STOP && id != BALLOON_HINT_CMD_DONE)
            verdict(D10, V_VIOLATION, "free_page_hint_cmd_id reads 0x%x after the migration", id);
        /* Everything free now (hinted pages included, back after DONE) is written, then a
         * second migration must carry it. */
        take_all(&run.fill, 3);
        go(P_MIGRATE2);
        break;
    }
    case P_MIGRATE2:
        if (st->hinted_pages) {
            if (phase_timed_out(now)) {
                verdict(D14, V_VIOLATION, "%lu pages still hinted after the migration",
                        st->hinted_pages);
                go(P_REPORT);
            }
            break;
        }
        request("migrate", NULL, 0);
        go(P_MIGRATE2_WAIT);
        break;
    case P_MIGRATE2_WAIT: {
        if (!answered(now, D13, P_REPORT, &failed)) {
            if (failed)
                free_chain(&run.fill);
            break;
        }
        uint64_t found = 0, expected = 0, checked = 0;
        uint64_t bad = verify_chain(&run.fill, 3, &found, &expected, &checked);
        if (bad)
            verdict(D13, V_WRONG_PAGE,
                    "page 0x%lx, written after the hinting round's DONE, reads 0x%lx at 0x%lx "
                    "after the next migration (expected 0x%lx)",
                    bad & ~(uint64_t)(PAGE_SIZE - 1), found, bad, expected);
        else if (st->hint_rounds == run.rounds0)
            verdict(D13, V_NOT_EXERCISED, "not exercised: no hinting round");
        else
            verdict(D13, V_CONFORMS,
                    "%lu pages written after DONE verified after a second "
                    "migration",
                    checked);
        if (run.n_ids >= 2)
            verdict(D11, V_CONFORMS, "%u rounds over two migrations, each with its own id",
                    run.n_ids);
        else
            verdict(D11, V_NOT_EXERCISED, "not exercised: %u hinting round(s) seen", run.n_ids);
        free_chain(&run.fill);
        go(P_REPORT);
        break;
    }
    case P_REPORT:
        if (!negotiated(st, VIRTIO_BALLOON_F_PAGE_REPORTING)) {
            go(P_RESET);
            break;
        }
        /* Pattern all free memory, give it back: the driver reports it after its delay. */
        take_all(&run.fill, 4);
        free_chain(&run.fill);
        run.reported0 = st->reported_pages;
        run.last_reported = st->reported_pages;
        run.quiet_since = now;
        go(P_REPORT_WAIT);
        break;
    case P_REPORT_WAIT: {
        if (st->reported_pages != run.last_reported || st->inflight_report) {
            run.last_reported = st->reported_pages;
            run.quiet_since = now;
        }
        bool settled = st->reported_pages > run.reported0 && !st->inflight_report &&
                       now - run.quiet_since > 300ull * 1000 * 1000;
        if (!settled && !phase_timed_out(now))
            break;
        enum check c = negotiated(st, VIRTIO_BALLOON_F_PAGE_POISON) ? D16 : D15;
        if (!settled) {
            verdict(c, st->reported_pages > run.reported0 ? V_TIMEOUT : V_NOT_EXERCISED,
                    "reporting did not settle: %lu pages reported, %lu in flight",
                    st->reported_pages - run.reported0, st->inflight_report);
            go(P_RESET);
            break;
        }
        uint64_t reported = st->reported_pages - run.reported0;
        struct buddy_stats before, after;
        buddy_get_stats(&kernel_buddy, &before);
        struct chain all = {BUDDY_NONE, 0};
        uint64_t zero = 0;
        /* Take everything back (the allocator verifies poison as it goes) and look. */
        unsigned order;
        uint64_t pfn;
        while ((pfn = buddy_alloc_largest(&kernel_buddy, BUDDY_MAX_ORDER, &order)) != BUDDY_NONE) {
            for (uint64_t i = 0; i < (1ull << order); i++)
                zero += page_zero(pfn + i);
            struct held_block *h = block_at(pfn);
            h->next_pfn = all.head;
            h->order = order;
            all.head = pfn;
            all.pages += 1ull << order;
        }
        buddy_get_stats(&kernel_buddy, &after);
        if (c == D16) {
            uint64_t errs = after.poison_errors - before.poison_errors;
            if (errs)
                verdict(D16, V_VIOLATION,
                        "%lu reported blocks did not hold poison_val 0x%x (first bad byte at "
                        "0x%lx)",
                        errs, run.cfg->poison_val, kernel_buddy.poison_bad_phys);
            else
                verdict(D16, V_CONFORMS,
                        "%lu pages reported; all free memory read back as "
                        "poison_val 0x%x",
                        reported, run.cfg->poison_val);
        } else if (zero > reported) {
            verdict(D15, V_WRONG_PAGE,
                    "%lu free pages read back as zero but only %lu were "
                    "reported",
                    zero, reported);
        } else {
            verdict(D15, V_CONFORMS,
                    "%lu pages reported; %lu read back as zero (discarded), "
                    "every other free page as written",
                    reported, zero);
        }
        free_chain(&all);
        go(P_RESET);
        break;
    }
    case P_RESET: {
        struct balloon *b = balloon_mode_balloon();
        int rc = run.t->ops->reset(run.t);
        uint8_t s = run.t->ops->get_status(run.t);
        run.used_idx[0] = b->inflate_vq.used->idx;
        run.used_idx[1] = b->deflate_vq.used->idx;
        run.used_idx[2] = b->has_stats ? b->stats_vq.used->idx : 0;
        if (rc != 0 || s != 0)
            verdict(D18, V_VIOLATION, "status reads 0x%02x after a reset of the running device", s);
        go(P_RESET_WAIT);
        break;
    }
    case P_RESET_WAIT: {
        if (now - run.phase_ns < 50ull * 1000 * 1000)
            break;
        struct balloon *b = balloon_mode_balloon();
        uint16_t now_idx[3] = {b->inflate_vq.used->idx, b->deflate_vq.used->idx,
                               b->has_stats ? b->stats_vq.used->idx : 0};
        if (now_idx[0] != run.used_idx[0] || now_idx[1] != run.used_idx[1] ||
            now_idx[2] != run.used_idx[2])
            verdict(D18, V_VIOLATION,
                    "used indices moved after the reset (inflate %u->%u, "
                    "deflate %u->%u, stats %u->%u)",
                    run.used_idx[0], now_idx[0], run.used_idx[1], now_idx[1], run.used_idx[2],
                    now_idx[2]);
        else
            verdict(D18, V_CONFORMS,
                    "status 0 after resets of a fresh and of the running "
                    "device; no used index moved after either");
        finish();
    }
    case P_FINISH:
        finish();
    }
    return now;
}

static void prepare(void *ctx, struct virtio_transport *t, struct balloon_config *cfg)
{
    (void)ctx;
    run.t = t;
    run.cfg = cfg;
    report_info("conform: %s, blimp.conform.host=%u", t->name, run.host);
    raw_registers(t);
    begin(t);
    uint64_t offered = t->ops->get_features(t);
    raw_config(t, offered);
    t->ops->reset(t);
    raw_features(t, offered);
    raw_queue(t, offered);
    /* The driver: no reserve (the checks decide what is free), stats with the probe entry. */
    cfg->reserve_pages = 0;
    cfg->stats_probe = true;
}

static void emit_check(unsigned i)
{
    enum verdict v = res[i].v == V_NONE ? V_NOT_EXERCISED : res[i].v;
    if (res[i].v == V_NONE)
        strlcpy(res[i].detail, "not exercised: this configuration never reached the check",
                sizeof(res[i].detail));
    char title[160];
    ksnprintf(title, sizeof(title), "%s \xc2\xa7%s %s", checks[i].id, checks[i].section,
              checks[i].title);
    enum report_kind kind = failing(v) ? REPORT_FAIL : v == V_CONFORMS ? REPORT_PASS : REPORT_SKIP;
    for (char *p = res[i].detail; *p; p++)
        if (*p == '"' || *p == '\\')
            *p = '\'';
    report_point(kind, res[i].detail, title);
    kprintf("  ---\n  verdict: %s\n  detail: \"%s\"\n  ...\n", verdict_names[v], res[i].detail);
    struct json j;
    event_begin(&j, "conform_check");
    json_u64(&j, "n", report_count());
    json_str(&j, "id", checks[i].id);
    json_str(&j, "section", checks[i].section);
    json_str(&j, "title", checks[i].title);
    json_str(&j, "verdict", verdict_names[v]);
    json_str(&j, "detail", res[i].detail);
    event_emit(&j);
}

static __attribute__((noreturn)) void finish(void)
{
    struct balloon_status st;
    balloon_get_status(balloon_mode_balloon(), &st);
    /* D20 over the whole session: every used inflate/deflate buffer was re-checked, and every
     * queue's used lengths conformed. */
    if (st.state == BALLOON_BROKEN) {
        verdict(D20, V_VIOLATION, "%s", st.violation);
    } else {
        for (unsigned q = 0; q < BQ_COUNT; q++)
            if (st.queues[q].present && strcmp(st.queues[q].verdict, "conforms"))
                verdict(D20, V_VIOLATION, "%s: used lengths %s (%lu on read-only buffers)",
                        st.queues[q].name, st.queues[q].verdict, st.queues[q].deviations);
        if (st.readonly_checked)
            verdict(D20, V_CONFORMS,
                    "%lu used inflate/deflate buffers read back as written; "
                    "used len 0 on every read-only buffer",
                    st.readonly_checked);
        else
            verdict(D20, V_NOT_EXERCISED, "not exercised: no inflate or deflate buffer used");
    }
    balloon_emit_latency(balloon_mode_balloon()); /* per-buffer timing of this host */
    unsigned counts[N_VERDICTS] = {0};
    for (unsigned i = 0; i < N_CHECKS; i++) {
        emit_check(i);
        counts[res[i].v == V_NONE ? V_NOT_EXERCISED : res[i].v]++;
    }
    int code = report_summary();
    struct json j;
    event_begin(&j, "conform_summary");
    json_u64(&j, "tests", N_CHECKS);
    unsigned failed = 0, skipped = 0;
    for (unsigned v = V_CONFORMS; v < N_VERDICTS; v++) {
        failed += failing((enum verdict)v) ? counts[v] : 0;
        skipped += !failing((enum verdict)v) && v != V_CONFORMS ? counts[v] : 0;
    }
    json_u64(&j, "failed", failed);
    json_u64(&j, "skipped", skipped);
    json_str(&j, "transport", run.t->name);
    struct wait_stats w;
    balloon_mode_wait_stats(&w);
    json_str(&j, "irq_mode", w.mode);
    json_u64(&j, "irq_missed", w.missed);
    json_u64(&j, "offered", st.offered);
    json_u64(&j, "features", st.features);
    json_open_object(&j, "verdicts");
    for (unsigned v = V_CONFORMS; v < N_VERDICTS; v++)
        if (counts[v])
            json_u64(&j, verdict_names[v], counts[v]);
    json_close(&j);
    event_emit(&j);
    machine_exit((enum exit_code)code, failed ? "conformance failures" : "conformance checks done");
}

void conform_mode_run(const struct options *opts, uint64_t rsdp_phys)
{
    run.opts = opts;
    run.host = opts->conform.host;
    run.area = BUDDY_NONE;
    run.fill.head = BUDDY_NONE;
    timeout_ns = opts->conform.timeout_ns;
    agent_set_answer_handler(on_answer, NULL);
    static const struct balloon_mode_hook hook = {
        .step = step,
        .ctx = NULL,
        .prepare = prepare,
        .poll_only = true,
    };
    balloon_mode_run(opts, rsdp_phys, &hook);
}
