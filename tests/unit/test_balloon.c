/*
 * Unit tests for virtio/balloon.c against the balloon device model in fake_balloon.c, over a
 * buddy allocator that manages 64 MiB of fake RAM. The model checks the driver's side of the
 * protocol as it goes (PFNs inside RAM, no double inflate, deflate only of ballooned pages,
 * canaries in ballooned pages, one stats buffer at a time); the tests assert the driver's state
 * and the allocator's accounting against what the device saw.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "virtio/balloon.h"
#include "mm/buddy.h"
#include "tests/unit/fake_balloon.h"
#include "tests/unit/fake_platform.h"
#include "tests/unit/fake_transport.h"
#include "include/platform.h"

#define RAM_BASE  0x100000ULL /* 1 MiB: PFN 256 */
#define RAM_BYTES (64ULL << 20)
#define RAM_PFN   (RAM_BASE >> PAGE_SHIFT)
#define RAM_PAGES (RAM_BYTES >> PAGE_SHIFT)
#define QSIZE     128

#define F(bit) (1ULL << (bit))

/* What the driver may accept (with cfg.deflate_on_oom). */
#define WANTED                                                                                     \
    (F(VIRTIO_BALLOON_F_MUST_TELL_HOST) | F(VIRTIO_BALLOON_F_STATS_VQ) |                           \
     F(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) | F(VIRTIO_BALLOON_F_FREE_PAGE_HINT) |                     \
     F(VIRTIO_F_VERSION_1) | F(VIRTIO_F_EVENT_IDX))

/* What the driver accepts in addition with cfg.reporting when the device offers reporting. */
#define REPORTING_WANTED (F(VIRTIO_BALLOON_F_PAGE_REPORTING) | F(VIRTIO_F_INDIRECT_DESC))

/* A modern device offering everything the driver uses. */
#define MODERN                                                                                     \
    (F(VIRTIO_F_VERSION_1) | F(VIRTIO_BALLOON_F_STATS_VQ) | F(VIRTIO_BALLOON_F_MUST_TELL_HOST) |   \
     F(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) | F(VIRTIO_F_EVENT_IDX))

/* QEMU 7.2's default virtio-balloon-pci (balloon-protocol.md 1.2). */
#define QEMU72                                                                                     \
    (F(VIRTIO_BALLOON_F_STATS_VQ) | F(VIRTIO_BALLOON_F_PAGE_POISON) |                              \
     F(VIRTIO_F_NOTIFY_ON_EMPTY) | F(VIRTIO_F_ANY_LAYOUT) | F(VIRTIO_F_INDIRECT_DESC) |            \
     F(VIRTIO_F_EVENT_IDX) | F(VIRTIO_F_QEMU_BAD) | F(VIRTIO_F_VERSION_1) |                        \
     F(VIRTIO_F_RING_RESET))

#define MS (1000ULL * 1000)

/* ---- Fixture -------------------------------------------------------------------------------- */

struct env {
    struct buddy mm;
    void *meta;
    struct fake_transport ft;
    struct fake_balloon fb;
    struct balloon b;
    struct balloon_config cfg;
    uint64_t free_after_init; /* buddy free pages once balloon_init returned */
};

/* Fake RAM, a buddy over all of it, a transport offering `features` and the device model.
 * The driver is not started: adjust e->cfg / the transport, then env_start. */
static struct env *env_new(bool legacy, uint64_t features, uint16_t qsize)
{
    struct env *e = calloc(1, sizeof(*e));
    assert_non_null(e);
    fake_log_echo(false);
    fake_log_reset();
    fake_ram_init(RAM_BASE, RAM_BYTES);
    size_t mb = buddy_meta_bytes(RAM_PAGES);
    assert_true(mb > 0);
    e->meta = aligned_alloc(8, (mb + 7) & ~(size_t)7);
    assert_non_null(e->meta);
    assert_int_equal(buddy_init(&e->mm, e->meta, mb, RAM_PFN, RAM_PAGES), 0);
    buddy_add_range(&e->mm, RAM_PFN, RAM_PAGES);
    assert_int_equal(e->mm.free_pages, RAM_PAGES);
    fake_transport_init(&e->ft, legacy, VIRTIO_ID_BALLOON, features, 16);
    fake_balloon_init(&e->fb, &e->ft, RAM_BASE, RAM_BYTES, qsize);
    e->fb.mm = &e->mm; /* reported blocks must be held out of this allocator */
    balloon_default_config(&e->cfg);
    return e;
}

static int env_start(struct env *e)
{
    int rc = balloon_init(&e->b, &e->ft.t, &e->mm, &e->cfg);
    e->free_after_init = e->mm.free_pages;
    return rc;
}

static struct env *env_up(bool legacy, uint64_t features)
{
    struct env *e = env_new(legacy, features, QSIZE);
    assert_int_equal(env_start(e), 0);
    assert_int_equal(e->b.state, BALLOON_RUNNING);
    return e;
}

static void env_free(struct env *e)
{
    fake_balloon_fini(&e->fb);
    fake_transport_fini(&e->ft);
    free(e->meta);
    fake_ram_fini();
    free(e);
}

static uint64_t free_pages(const struct env *e)
{
    return e->mm.free_pages;
}

static unsigned long notifies(const struct env *e, enum fb_role role)
{
    return e->ft.q[e->fb.qidx[role]].notifies;
}

/* No party saw a protocol error, and the allocator never rejected a free. */
static void assert_clean(const struct env *e)
{
    if (e->fb.errors)
        fail_msg("device model: %s", e->fb.error);
    if (e->ft.driver_errors)
        fail_msg("transport: %s", e->ft.driver_error);
    for (unsigned i = 0; i < FT_MAX_QUEUES; i++)
        if (e->ft.q[i].enabled && e->ft.q[i].vq.errors)
            fail_msg("queue %u: %s", i, e->ft.q[i].vq.error);
    assert_int_equal(e->mm.invalid_frees, 0);
    assert_int_equal(e->fb.canary_errors, 0);
}

/* Poll until the balloon is at its target with nothing in flight; returns the rounds used. */
static unsigned settle(struct env *e)
{
    for (unsigned round = 1; round <= 10000; round++) {
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
        if (e->b.state == BALLOON_BROKEN)
            fail_msg("balloon broke: %s", e->b.violation);
        if (e->b.actual == e->b.target && !e->b.inflight_inflate && !e->b.inflight_deflate)
            return round;
    }
    fail_msg("balloon did not settle: actual %u target %u in flight %u/%u", e->b.actual,
             e->b.target, e->b.inflight_inflate, e->b.inflight_deflate);
    return 0;
}

static unsigned settle_at(struct env *e, uint32_t target)
{
    fake_balloon_set_target(&e->fb, target);
    unsigned rounds = settle(e);
    assert_int_equal(e->b.target, target);
    assert_int_equal(e->b.actual, target);
    return rounds;
}

struct held_check {
    const struct env *e;
    uint8_t *seen; /* per RAM page */
    uint64_t pages;
    unsigned dups, not_ballooned, free_in_buddy, outside;
};

static int held_cb(void *ctx, uint64_t pfn, unsigned order)
{
    struct held_check *h = ctx;
    for (uint64_t p = pfn; p < pfn + (1ULL << order); p++) {
        h->pages++;
        if (p < RAM_PFN || p - RAM_PFN >= RAM_PAGES) {
            h->outside++;
            continue;
        }
        if (h->seen[p - RAM_PFN]++)
            h->dups++;
        if (!fake_balloon_is_ballooned(&h->e->fb, p))
            h->not_ballooned++;
        if (buddy_is_free(&h->e->mm, p))
            h->free_in_buddy++;
    }
    return 0;
}

/*
 * Steady state (nothing in flight): the device's balloon is exactly the set of pages the driver
 * holds, each once; the allocator lost exactly those pages plus the record pages; `actual` on
 * the device is the driver's count; every ballooned page still carries the device's canary.
 */
static void assert_consistent(struct env *e)
{
    struct balloon *b = &e->b;
    assert_clean(e);
    assert_int_equal(b->inflight_inflate, 0);
    assert_int_equal(b->inflight_deflate, 0);
    assert_int_equal(fake_balloon_held(&e->fb, FB_INFLATE), 0);
    assert_int_equal(fake_balloon_held(&e->fb, FB_DEFLATE), 0);
    assert_int_equal(fake_balloon_actual(&e->fb), b->actual);
    assert_int_equal(b->actual_written, b->actual);
    assert_int_equal(e->fb.balloon_pages, b->actual);
    assert_int_equal(b->held.pages, b->actual);
    struct held_check h = {.e = e, .seen = calloc(RAM_PAGES, 1)};
    assert_non_null(h.seen);
    blocklist_for_each(&b->held, held_cb, &h);
    free(h.seen);
    assert_int_equal(h.pages, b->actual);
    assert_int_equal(h.outside, 0);
    assert_int_equal(h.dups, 0);
    assert_int_equal(h.not_ballooned, 0);
    assert_int_equal(h.free_in_buddy, 0);
    assert_int_equal(free_pages(e), e->free_after_init - b->actual - b->held.chunks);
    assert_int_equal(b->held.chunks, (b->held.blocks + 509) / 510); /* no stray record pages */
    assert_int_equal(fake_balloon_check_canaries(&e->fb), 0);
}

static unsigned popcount(uint64_t v)
{
    return (unsigned)__builtin_popcountll(v);
}

static int cmp_u32(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

/*
 * Inflate buffers logged from index `from`: at most pfns_per_buffer PFNs, none twice, and (memory
 * not being fragmented in these tests) made of no more contiguous runs than the binary
 * decomposition of their size needs, i.e. the driver took the largest blocks it could. Counts
 * the buffers checked in *nbuf; returns how many of them were not in ascending PFN order.
 */
static unsigned check_inflate_buffers(const struct env *e, unsigned from, unsigned *nbuf)
{
    unsigned unsorted = 0;
    *nbuf = 0;
    for (unsigned i = from; i < e->fb.nlog; i++) {
        const struct fb_buffer *buf = &e->fb.log[i];
        if (buf->role != FB_INFLATE)
            continue;
        (*nbuf)++;
        assert_true(buf->n >= 1);
        assert_true(buf->n <= e->cfg.pfns_per_buffer);
        uint32_t *s = malloc(buf->n * sizeof(uint32_t));
        assert_non_null(s);
        memcpy(s, buf->pfns, buf->n * sizeof(uint32_t));
        qsort(s, buf->n, sizeof(uint32_t), cmp_u32);
        unsorted += memcmp(s, buf->pfns, buf->n * sizeof(uint32_t)) != 0;
        unsigned runs = 1;
        for (unsigned k = 1; k < buf->n; k++) {
            assert_int_not_equal(s[k], s[k - 1]);
            runs += s[k] != s[k - 1] + 1;
        }
        free(s);
        if (runs > popcount(buf->n))
            fail_msg("inflate buffer %u: %u PFNs in %u runs (at most %u expected)", i, buf->n, runs,
                     popcount(buf->n));
    }
    return unsorted;
}

/* The first inflate buffer (from `from`) whose PFNs are not ascending, or -1. */
static int first_unsorted(const struct env *e, unsigned from)
{
    for (unsigned i = from; i < e->fb.nlog; i++) {
        const struct fb_buffer *buf = &e->fb.log[i];
        for (unsigned k = 1; buf->role == FB_INFLATE && k < buf->n; k++)
            if (buf->pfns[k] <= buf->pfns[k - 1])
                return (int)i;
    }
    return -1;
}

/* Deflate buffers from `from`: bounded, no PFN twice, each a union of ascending runs. */
static unsigned check_deflate_buffers(const struct env *e, unsigned from)
{
    unsigned nbuf = 0;
    for (unsigned i = from; i < e->fb.nlog; i++) {
        const struct fb_buffer *buf = &e->fb.log[i];
        if (buf->role != FB_DEFLATE)
            continue;
        nbuf++;
        assert_true(buf->n >= 1);
        assert_true(buf->n <= e->cfg.pfns_per_buffer);
        for (unsigned k = 0; k < buf->n; k++)
            for (unsigned j = k + 1; j < buf->n; j++)
                assert_int_not_equal(buf->pfns[k], buf->pfns[j]);
    }
    return nbuf;
}

static uint64_t log_pages(const struct env *e, enum fb_role role, unsigned from)
{
    uint64_t n = 0;
    for (unsigned i = from; i < e->fb.nlog; i++)
        if (e->fb.log[i].role == role)
            n += e->fb.log[i].n;
    return n;
}

/* ---- Init ----------------------------------------------------------------------------------- */

/* What the transport saw during init, recorded by hooks. */
static struct {
    uint8_t status[16];
    unsigned nstatus;
    unsigned resets_at_first_status;
    bool saw_driver_ok;
    unsigned long stats_notifies_at_driver_ok;
    uint16_t stats_avail_at_driver_ok;
    unsigned stats_received_at_driver_ok;
    unsigned notifies_without_driver_ok;
    unsigned notifies;
    bool features_ok_ever;
    void (*device_notify)(struct fake_transport *, unsigned, void *);
} rec;

static void rec_status(struct fake_transport *ft, uint8_t old, uint8_t new_status, void *arg)
{
    struct fake_balloon *fb = arg;
    if (rec.nstatus == 0)
        rec.resets_at_first_status = ft->resets;
    if (rec.nstatus < 16)
        rec.status[rec.nstatus] = new_status;
    rec.nstatus++;
    if (new_status & VIRTIO_STATUS_FEATURES_OK)
        rec.features_ok_ever = true;
    if ((new_status & VIRTIO_STATUS_DRIVER_OK) && !(old & VIRTIO_STATUS_DRIVER_OK)) {
        rec.saw_driver_ok = true;
        if (fb->qidx[FB_STATS] != FB_NO_QUEUE) {
            struct fake_vq *d = fake_transport_vq(ft, fb->qidx[FB_STATS]);
            rec.stats_notifies_at_driver_ok = ft->q[fb->qidx[FB_STATS]].notifies;
            rec.stats_avail_at_driver_ok = d ? d->avail->idx : 0xffff;
            rec.stats_received_at_driver_ok = fb->stats_buffers;
        }
    }
}

static void rec_notify(struct fake_transport *ft, unsigned index, void *arg)
{
    rec.notifies++;
    if (!(ft->status & VIRTIO_STATUS_DRIVER_OK))
        rec.notifies_without_driver_ok++;
    rec.device_notify(ft, index, arg);
}

static void rec_install(struct env *e)
{
    memset(&rec, 0, sizeof(rec));
    e->ft.on_status = rec_status;
    rec.device_notify = e->ft.on_notify;
    e->ft.on_notify = rec_notify;
}

static void test_init_spec_order(void **state)
{
    (void)state;
    struct env *e = env_new(false, MODERN, QSIZE);
    rec_install(e);
    assert_int_equal(env_start(e), 0);
    assert_clean(e);
    /* Reset first, then ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK, never clearing a bit. */
    assert_int_equal(e->ft.resets, 1);
    assert_int_equal(rec.resets_at_first_status, 1);
    const uint8_t want[] = {
        VIRTIO_STATUS_ACKNOWLEDGE,
        VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER,
        VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK,
        VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK |
            VIRTIO_STATUS_DRIVER_OK,
    };
    assert_int_equal(rec.nstatus, sizeof(want));
    assert_memory_equal(rec.status, want, sizeof(want));
    /* The stats buffer was on the ring (primed) but not kicked when DRIVER_OK was set... */
    assert_true(rec.saw_driver_ok);
    assert_int_equal(rec.stats_avail_at_driver_ok, 1);
    assert_int_equal(rec.stats_notifies_at_driver_ok, 0);
    assert_int_equal(rec.stats_received_at_driver_ok, 0);
    /* ...and kicked right after; nothing was ever notified before DRIVER_OK. */
    assert_int_equal(notifies(e, FB_STATS), 1);
    assert_int_equal(rec.notifies_without_driver_ok, 0);
    assert_int_equal(e->fb.stats_buffers, 1);
    assert_true(e->fb.stats_held);
    /* All three queues are live at the sizes offered; nothing to inflate yet. */
    for (unsigned i = 0; i < 3; i++) {
        assert_true(e->ft.q[i].enabled);
        assert_int_equal(e->ft.q[i].size, QSIZE);
    }
    assert_int_equal(notifies(e, FB_INFLATE), 0);
    assert_int_equal(notifies(e, FB_DEFLATE), 0);
    assert_int_equal(e->b.actual, 0);
    assert_int_equal(e->b.target, 0);
    env_free(e);
}

static void check_features(uint64_t offered, bool oom_cfg, bool reporting_cfg, uint64_t expected)
{
    struct env *e = env_new(false, offered, QSIZE);
    e->cfg.deflate_on_oom = oom_cfg;
    e->cfg.reporting = reporting_cfg;
    assert_int_equal(env_start(e), 0);
    assert_clean(e);
    assert_int_equal(e->b.offered, offered);
    assert_int_equal(e->ft.driver_features, expected);
    assert_int_equal(e->b.features, expected);
    assert_true(e->ft.status & VIRTIO_STATUS_DRIVER_OK);
    assert_false(e->ft.status & VIRTIO_STATUS_FAILED);
    static const unsigned never[] = {
        VIRTIO_F_QEMU_BAD,        VIRTIO_BALLOON_F_PAGE_POISON, VIRTIO_BALLOON_F_PAGE_REPORTING,
        VIRTIO_F_INDIRECT_DESC,   VIRTIO_F_NOTIFY_ON_EMPTY,     VIRTIO_F_ANY_LAYOUT,
        VIRTIO_F_ACCESS_PLATFORM, VIRTIO_F_RING_PACKED,         VIRTIO_F_RING_RESET};
    for (unsigned i = 0; i < sizeof(never) / sizeof(never[0]); i++)
        if (!((expected >> never[i]) & 1)) /* reporting brings INDIRECT_DESC with it */
            assert_false(fake_transport_negotiated(&e->ft, never[i]));
    for (unsigned bit = 0; bit < 64; bit++)
        assert_int_equal(balloon_negotiated(&e->b, bit), (expected >> bit) & 1);
    env_free(e);
}

static void test_init_feature_subset(void **state)
{
    (void)state;
    uint64_t all = 0;
    for (unsigned bit = 0; bit <= 5; bit++)
        all |= F(bit);
    all |= F(VIRTIO_F_NOTIFY_ON_EMPTY) | F(VIRTIO_F_ANY_LAYOUT) | F(VIRTIO_F_INDIRECT_DESC) |
           F(VIRTIO_F_EVENT_IDX) | F(VIRTIO_F_QEMU_BAD) | F(VIRTIO_F_VERSION_1) |
           F(VIRTIO_F_ACCESS_PLATFORM) | F(VIRTIO_F_RING_PACKED) | F(VIRTIO_F_RING_RESET);
    /* With FREE_PAGE_HINT accepted, EVENT_IDX is declined (see balloon_init). */
    const uint64_t no_ev = ~F(VIRTIO_F_EVENT_IDX);
    check_features(all, true, true, (WANTED | REPORTING_WANTED) & no_ev);
    assert_int_equal(all & WANTED, WANTED);
    check_features(all, true, false, WANTED & no_ev);
    check_features(all, false, true,
                   (WANTED | REPORTING_WANTED) & ~F(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) & no_ev);
    check_features(all & ~F(VIRTIO_BALLOON_F_FREE_PAGE_HINT), true, false,
                   WANTED & ~F(VIRTIO_BALLOON_F_FREE_PAGE_HINT));
    check_features(QEMU72, true, true,
                   F(VIRTIO_BALLOON_F_STATS_VQ) | F(VIRTIO_F_EVENT_IDX) | F(VIRTIO_F_VERSION_1));
    check_features(QEMU72 | F(VIRTIO_BALLOON_F_PAGE_REPORTING), true, true,
                   F(VIRTIO_BALLOON_F_STATS_VQ) | F(VIRTIO_F_EVENT_IDX) | F(VIRTIO_F_VERSION_1) |
                       REPORTING_WANTED);
    /* Reporting without INDIRECT_DESC offered: reporting alone, with direct chains. */
    check_features(MODERN | F(VIRTIO_BALLOON_F_PAGE_REPORTING), true, true,
                   MODERN | F(VIRTIO_BALLOON_F_PAGE_REPORTING));
    check_features(F(VIRTIO_F_VERSION_1), true, true, F(VIRTIO_F_VERSION_1));
    check_features(MODERN, true, true, MODERN);
}

static void test_init_queue_indices_compacted(void **state)
{
    (void)state;
    /* No STATS_VQ but PAGE_REPORTING, reporting off: queue 2 is the reporting queue, which
     * must be left alone (tests/unit/test_balloon.c's reporting tests cover it switched on). */
    struct env *e =
        env_new(false, F(VIRTIO_F_VERSION_1) | F(VIRTIO_BALLOON_F_PAGE_REPORTING), QSIZE);
    e->cfg.reporting = false;
    assert_int_equal(e->ft.q[2].max_size, 32);
    assert_int_equal(env_start(e), 0);
    assert_clean(e);
    assert_false(e->b.has_stats);
    assert_true(e->ft.q[0].enabled);
    assert_true(e->ft.q[1].enabled);
    assert_false(e->ft.q[2].enabled);
    assert_int_equal(e->ft.q[2].notifies, 0);
    settle_at(e, 300);
    assert_consistent(e);
    env_free(e);

    /* STATS_VQ, FREE_PAGE_HINT, PAGE_REPORTING, reporting off: stats at 2, free page hints at
     * 3; 4 is not
     * ours. */
    e = env_new(false,
                MODERN | F(VIRTIO_BALLOON_F_FREE_PAGE_HINT) | F(VIRTIO_BALLOON_F_PAGE_REPORTING),
                QSIZE);
    e->cfg.reporting = false;
    assert_int_equal(e->ft.q[3].max_size, 1024);
    assert_int_equal(e->ft.q[4].max_size, 32);
    assert_int_equal(env_start(e), 0);
    assert_clean(e);
    assert_true(e->b.has_stats);
    for (unsigned i = 0; i < 4; i++)
        assert_true(e->ft.q[i].enabled);
    assert_false(e->ft.q[4].enabled);
    assert_int_equal(e->b.stats_vq.index, 2);
    assert_int_equal(e->b.hint_vq.index, 3);
    assert_int_equal(e->fb.stats_buffers, 1);
    env_free(e);

    /* A modern device offering big queues: the driver shrinks them to what it needs. */
    e = env_new(false, MODERN, 1024);
    assert_int_equal(env_start(e), 0);
    assert_clean(e);
    for (unsigned i = 0; i < 3; i++)
        assert_int_equal(e->ft.q[i].size, 256);
    settle_at(e, 100);
    assert_consistent(e);
    env_free(e);
}

static void test_init_modern_without_version_1(void **state)
{
    (void)state;
    struct env *e = env_new(false, MODERN & ~F(VIRTIO_F_VERSION_1), QSIZE);
    assert_int_equal(env_start(e), -1);
    assert_true(e->ft.status & VIRTIO_STATUS_FAILED);
    assert_false(e->ft.status & VIRTIO_STATUS_DRIVER_OK);
    assert_false(e->ft.status & VIRTIO_STATUS_FEATURES_OK);
    assert_non_null(strstr(e->b.violation, "VERSION_1"));
    for (unsigned i = 0; i < 3; i++)
        assert_false(e->ft.q[i].enabled);
    /* Giving up sets FAILED without clearing the bits already set (spec 2.1.1). */
    if (e->ft.driver_errors)
        fail_msg("transport: %s", e->ft.driver_error);
    env_free(e);
}

static bool refuse_features(struct fake_transport *ft, uint64_t features, void *arg)
{
    (void)ft;
    (void)features;
    (void)arg;
    return false;
}

static void test_init_features_refused(void **state)
{
    (void)state;
    struct env *e = env_new(false, MODERN, QSIZE);
    e->ft.accept_features = refuse_features;
    assert_int_equal(env_start(e), -1);
    assert_true(e->ft.status & VIRTIO_STATUS_FAILED);
    assert_false(e->ft.status & VIRTIO_STATUS_FEATURES_OK);
    assert_false(e->ft.status & VIRTIO_STATUS_DRIVER_OK);
    for (unsigned i = 0; i < 3; i++) {
        assert_false(e->ft.q[i].enabled);
        assert_int_equal(e->ft.q[i].notifies, 0);
    }
    assert_true(fake_log_contains("refused"));
    if (e->ft.driver_errors)
        fail_msg("transport: %s", e->ft.driver_error);
    env_free(e);
}

static void missing_queue(unsigned index, uint16_t size, const char *name)
{
    struct env *e = env_new(false, MODERN, QSIZE);
    fake_transport_add_queue(&e->ft, index, size);
    assert_int_equal(env_start(e), -1);
    assert_int_equal(e->b.state, BALLOON_BROKEN);
    assert_true(e->b.violation[0] != '\0');
    assert_true(e->ft.status & VIRTIO_STATUS_FAILED);
    assert_false(e->ft.status & VIRTIO_STATUS_DRIVER_OK);
    assert_false(e->ft.q[index].enabled);
    char want[64];
    snprintf(want, sizeof(want), "queue %u (%s) has size %u", index, name, size);
    assert_true(fake_log_contains(want));
    assert_true(fake_log_contains("protocol violation"));
    for (unsigned i = 0; i < 3; i++)
        assert_int_equal(e->ft.q[i].notifies, 0);
    if (e->ft.driver_errors)
        fail_msg("transport: %s", e->ft.driver_error);
    env_free(e);
}

static void test_init_implied_queue_missing(void **state)
{
    (void)state;
    missing_queue(2, 0, "statsq");     /* STATS_VQ offered, no queue 2 */
    missing_queue(0, 0, "inflateq");   /* no inflate queue at all */
    missing_queue(1, 100, "deflateq"); /* not a power of two */
}

static void test_init_starts_toward_preset_target(void **state)
{
    (void)state;
    /* A target set before the driver came up is acted on during init (spec 5.5.5 step 10). */
    struct env *e = env_new(false, MODERN, QSIZE);
    fake_balloon_set_target(&e->fb, 300);
    assert_int_equal(env_start(e), 0);
    assert_int_equal(e->b.target, 300);
    assert_int_equal(notifies(e, FB_INFLATE), 1);
    assert_int_equal(e->b.inflight_inflate, 300);
    settle(e);
    assert_int_equal(e->b.actual, 300);
    /* free_after_init was taken with the first buffers in flight: compare from scratch. */
    e->free_after_init += 300 + e->b.held.chunks;
    assert_consistent(e);
    env_free(e);
}

static void test_unseen_events(void **state)
{
    (void)state;
    /* What a loop asks when no interrupt came: does the device hold work the driver has not
     * seen? A target the driver has not read, then used buffers it has not collected. */
    struct env *e = env_up(false, MODERN);
    assert_int_equal(balloon_unseen_events(&e->b), 0);
    fake_balloon_set_target(&e->fb, 300);
    assert_int_equal(balloon_unseen_events(&e->b), BALLOON_EV_CONFIG);
    e->fb.hold[FB_INFLATE] = true;
    balloon_poll(&e->b, BALLOON_EV_CONFIG); /* reads the target, sends buffers the device holds */
    assert_int_equal(balloon_unseen_events(&e->b), 0);
    assert_true(fake_balloon_answer(&e->fb, FB_INFLATE, 1) == 1);
    assert_int_equal(balloon_unseen_events(&e->b), BALLOON_EV_QUEUE);
    fake_balloon_set_target(&e->fb, 200);
    assert_int_equal(balloon_unseen_events(&e->b), BALLOON_EV_QUEUE | BALLOON_EV_CONFIG);
    e->fb.hold[FB_INFLATE] = false;
    fake_balloon_answer(&e->fb, FB_INFLATE, 1000);
    settle(e);
    assert_int_equal(balloon_unseen_events(&e->b), 0);
    assert_int_equal(e->b.actual, 200);
    assert_clean(e);
    env_free(e);
}

/* ---- Inflate / deflate ---------------------------------------------------------------------- */

static void round_trip(struct env *e)
{
    uint64_t base = e->free_after_init;
    unsigned log0 = e->fb.nlog;
    uint64_t inflated0 = e->fb.inflated_pages, deflated0 = e->fb.deflated_pages;
    uint64_t bufs0 = e->b.inflate_buffers;
    settle_at(e, 1000);
    assert_consistent(e);
    assert_int_equal(free_pages(e), base - 1000 - e->b.held.chunks);
    assert_int_equal(e->b.held.chunks, 1);
    assert_int_equal(e->fb.inflated_pages - inflated0, 1000);
    assert_int_equal(log_pages(e, FB_INFLATE, log0), 1000);
    unsigned nin;
    check_inflate_buffers(e, log0, &nin); /* order: test_inflate_buffers_sorted */
    unsigned per = e->cfg.pfns_per_buffer;
    assert_int_equal(nin, (1000 + per - 1) / per);
    assert_int_equal(e->b.inflate_buffers - bufs0, nin);
    assert_int_equal(fake_balloon_actual(&e->fb), 1000);
    assert_true(fake_log_contains("balloon_reached"));

    unsigned log1 = e->fb.nlog;
    settle_at(e, 400);
    assert_consistent(e);
    assert_int_equal(e->fb.deflated_pages - deflated0, 600);
    assert_int_equal(log_pages(e, FB_DEFLATE, log1), 600);
    assert_int_equal(check_deflate_buffers(e, log1), (600 + per - 1) / per);
    assert_int_equal(fake_balloon_actual(&e->fb), 400);

    settle_at(e, 0);
    assert_consistent(e);
    assert_int_equal(e->fb.deflated_pages - deflated0, 1000);
    assert_int_equal(e->fb.balloon_pages, 0);
    assert_int_equal(e->b.held.chunks, 0);
    assert_int_equal(free_pages(e), base);
    assert_int_equal(fake_balloon_actual(&e->fb), 0);
    assert_int_equal(e->b.state, BALLOON_RUNNING);
    /* `actual` was written after each phase (and never with a partial access). */
    assert_true(e->fb.actual_writes >= 3);
}

static void test_inflate_deflate_round_trip(void **state)
{
    (void)state;
    struct env *e = env_up(false, MODERN);
    round_trip(e);
    /* And once more: the allocator's state after a full cycle is as good as new. */
    round_trip(e);
    assert_int_equal(e->fb.inflated_pages, 2000);
    env_free(e);
}

static void test_round_trip_qemu72_small_buffers(void **state)
{
    (void)state;
    /* QEMU's default feature set, 100-PFN buffers, 2 in flight, no EVENT_IDX. */
    struct env *e = env_new(false, QEMU72 & ~F(VIRTIO_F_EVENT_IDX), QSIZE);
    e->cfg.pfns_per_buffer = 100;
    e->cfg.buffers = 2;
    assert_int_equal(env_start(e), 0);
    round_trip(e);
    /* Without EVENT_IDX every batch is one notify; two buffers per batch: 10 buffers, 5 kicks. */
    assert_int_equal(e->b.inflate_buffers, 10);
    assert_int_equal(notifies(e, FB_INFLATE), 5);
    assert_int_equal(e->fb.max_pfns, 100);
    env_free(e);
}

/* Found by tests/fuzz/fuzz_balloon: with an odd number of 4-byte PFNs per buffer the block list
 * behind each PFN array was misaligned (UBSan: misaligned uint64_t store). */
static void test_odd_pfns_per_buffer_keeps_block_lists_aligned(void **state)
{
    (void)state;
    struct env *e = env_new(false, MODERN, QSIZE);
    e->cfg.pfns_per_buffer = 255;
    e->cfg.buffers = 3;
    assert_int_equal(env_start(e), 0);
    for (unsigned i = 0; i < e->cfg.buffers; i++)
        assert_int_equal((uintptr_t)e->b.bufs[i].blocks % 8, 0);
    round_trip(e);
    assert_clean(e);
    env_free(e);
}

/*
 * The driver promises PFNs "sorted and contiguous" in each inflate buffer (balloon.c, design
 * notes). With the rings and buffers taken from the bottom of RAM, the remainder buffer of a
 * 1000-page inflate is assembled from blocks of decreasing size found at decreasing addresses.
 */
static void test_inflate_buffers_sorted(void **state)
{
    (void)state;
    const unsigned per[] = {256, 100};
    for (unsigned c = 0; c < 2; c++) {
        struct env *e = env_new(false, MODERN, QSIZE);
        e->cfg.pfns_per_buffer = per[c];
        assert_int_equal(env_start(e), 0);
        settle_at(e, 1000);
        settle_at(e, 300);
        settle_at(e, 2500);
        assert_consistent(e);
        unsigned nbuf;
        unsigned unsorted = check_inflate_buffers(e, 0, &nbuf);
        int bad = first_unsorted(e, 0);
        if (bad >= 0) {
            const struct fb_buffer *buf = &e->fb.log[bad];
            char msg[512];
            int len = snprintf(msg, sizeof(msg),
                               "%u of %u inflate buffers (%u PFNs each) not "
                               "ascending; buffer %d runs:",
                               unsorted, nbuf, per[c], bad);
            for (unsigned k = 0; k < buf->n && len < (int)sizeof(msg) - 24; k++)
                if (k == 0 || buf->pfns[k] != buf->pfns[k - 1] + 1)
                    len += snprintf(msg + len, sizeof(msg) - (size_t)len, " 0x%x", buf->pfns[k]);
            env_free(e);
            fail_msg("%s", msg);
        }
        assert_int_equal(unsorted, 0);
        env_free(e);
    }
}

static void test_partial_deflate_splits(void **state)
{
    (void)state;
    struct env *e = env_up(false, MODERN);
    settle_at(e, 1000);
    assert_consistent(e);
    const uint32_t steps[] = {700, 3, 0};
    uint32_t prev = 1000;
    for (unsigned i = 0; i < 3; i++) {
        unsigned log0 = e->fb.nlog;
        uint64_t deflated = e->fb.deflated_pages;
        settle_at(e, steps[i]);
        assert_consistent(e);
        /* Exactly the difference went through the deflate queue: no over-deflate then
         * re-inflate. */
        assert_int_equal(e->fb.deflated_pages - deflated, prev - steps[i]);
        assert_int_equal(log_pages(e, FB_INFLATE, log0), 0);
        check_deflate_buffers(e, log0);
        assert_int_equal(fake_balloon_actual(&e->fb), steps[i]);
        prev = steps[i];
    }
    assert_int_equal(free_pages(e), e->free_after_init);
    env_free(e);
}

static void test_target_exceeds_memory(void **state)
{
    (void)state;
    struct env *e = env_up(false, MODERN);
    uint64_t total = e->mm.total_pages;
    fake_balloon_set_target(&e->fb, 10 * RAM_PAGES);
    unsigned rounds = 0;
    while (rounds++ < 10000 && !(fake_log_contains("balloon_exhausted") && !e->b.inflight_inflate &&
                                 !e->b.inflight_deflate))
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_true(rounds < 10000);
    assert_int_equal(e->b.device_target, 10 * RAM_PAGES);
    assert_int_equal(e->b.target, total); /* clamped */
    assert_true(fake_log_contains("exceeds the guest's"));
    assert_int_equal(e->b.state, BALLOON_RUNNING);
    /* Everything but the reserve went into the balloon (give or take the one page a driver
     * may keep back for its records), and not one page of the reserve. */
    uint64_t left = free_pages(e);
    assert_true(left >= e->cfg.reserve_pages);
    assert_true(left <= e->cfg.reserve_pages + 1);
    assert_int_equal(e->b.actual, e->free_after_init - left - e->b.held.chunks);
    assert_consistent(e);

    /* It stays put: no more buffers, no state change, no more log lines. */
    uint64_t bufs = e->b.inflate_buffers;
    unsigned lines = fake_log_count();
    for (unsigned i = 0; i < 50; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->b.inflate_buffers, bufs);
    assert_int_equal(fake_log_count(), lines);
    assert_int_equal(e->b.state, BALLOON_RUNNING);
    assert_int_equal(free_pages(e), left);

    settle_at(e, 0);
    assert_consistent(e);
    assert_int_equal(free_pages(e), e->free_after_init);
    env_free(e);
}

/*
 * The same with free memory fragmented into single pages, so every ballooned page costs a record
 * (510 per record page). With the reserve placed so that the last page the balloon may take
 * also fills a record page, the next record page must not come out of the reserve either.
 */
static void test_reserve_kept_with_fragmented_memory(void **state)
{
    (void)state;
    struct env *e = env_up(false, MODERN);
    uint64_t n = free_pages(e);
    uint64_t *pg = malloc(n * sizeof(uint64_t));
    assert_non_null(pg);
    for (uint64_t i = 0; i < n; i++)
        assert_int_not_equal(pg[i] = buddy_alloc(&e->mm, 0), BUDDY_NONE);
    for (uint64_t i = 0; i < n; i += 2)
        assert_int_equal(buddy_free(&e->mm, pg[i], 0), 0);
    uint64_t f = free_pages(e);
    /* Record 511 needs the second record page: 1 + 510 + 1 pages gone when it is pushed. */
    e->b.cfg.reserve_pages = f - 512;
    fake_balloon_set_target(&e->fb, 4000);
    for (unsigned i = 0; i < 100; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    bool exhausted = fake_log_contains("balloon_exhausted");
    uint32_t actual = e->b.actual;
    uint64_t left = free_pages(e), reserve = e->b.cfg.reserve_pages;
    settle_at(e, 0);
    assert_clean(e);
    for (uint64_t i = 1; i < n; i += 2)
        assert_int_equal(buddy_free(&e->mm, pg[i], 0), 0);
    free(pg);
    assert_int_equal(free_pages(e), e->free_after_init);
    env_free(e);

    assert_true(exhausted);
    assert_true(actual == 510 || actual == 511); /* everything but the reserve and records */
    if (left < reserve)
        fail_msg("free pages %llu below the reserve of %llu: the balloon's record page came out "
                 "of the reserve",
                 (unsigned long long)left, (unsigned long long)reserve);
}

/*
 * A device with tiny queues: the driver has more buffers than descriptors, so adding a buffer
 * fails with the queue full and the driver must undo what it prepared (give the blocks back to
 * the allocator for inflate, back to the balloon's list for deflate) and retry later.
 */
static void test_queue_smaller_than_buffers(void **state)
{
    (void)state;
    struct env *e = env_new(false, MODERN, 2);
    e->cfg.buffers = 4;
    e->cfg.pfns_per_buffer = 64;
    assert_int_equal(env_start(e), 0);
    for (unsigned i = 0; i < 3; i++)
        assert_int_equal(e->ft.q[i].size, 2);
    settle_at(e, 1000);
    assert_consistent(e);
    unsigned nin;
    check_inflate_buffers(e, 0, &nin);
    assert_int_equal(nin, (1000 + 63) / 64);
    settle_at(e, 333);
    assert_consistent(e);
    settle_at(e, 0);
    assert_consistent(e);
    assert_int_equal(free_pages(e), e->free_after_init);
    env_free(e);
}

static void test_target_lowered_mid_inflate(void **state)
{
    (void)state;
    struct env *e = env_new(false, MODERN, QSIZE);
    e->cfg.buffers = 4; /* 1024 pages in flight at most */
    assert_int_equal(env_start(e), 0);
    e->fb.hold[FB_INFLATE] = true;
    fake_balloon_set_target(&e->fb, 2000);
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    unsigned held = fake_balloon_held(&e->fb, FB_INFLATE);
    assert_int_equal(held, e->cfg.buffers);
    assert_int_equal(e->b.inflight_inflate, e->cfg.buffers * e->cfg.pfns_per_buffer);

    /* The host changes its mind while the inflate buffers are out. */
    fake_balloon_set_target(&e->fb, 300);
    for (unsigned i = 0; i < 5; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->b.target, 300);
    assert_int_equal(e->b.actual, 0);
    /* Nothing can be deflated before its inflate was acknowledged. */
    assert_int_equal(notifies(e, FB_DEFLATE), 0);
    assert_int_equal(e->fb.deflated_pages, 0);

    e->fb.hold[FB_INFLATE] = false;
    assert_int_equal(fake_balloon_answer(&e->fb, FB_INFLATE, ~0u), held);
    settle(e);
    assert_int_equal(e->b.actual, 300);
    assert_int_equal(fake_balloon_actual(&e->fb), 300);
    assert_int_equal(e->fb.inflated_pages, 1024);
    assert_int_equal(e->fb.deflated_pages, 1024 - 300);
    assert_consistent(e);

    /* Again from a full balloon, the new target below what is already acknowledged: the
     * acknowledged pages may only be deflated once the inflation in flight is settled (the
     * newest held blocks are the unacknowledged ones). */
    settle_at(e, 1000);
    e->fb.hold[FB_INFLATE] = true;
    fake_balloon_set_target(&e->fb, 1300); /* two buffers out, two free */
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->b.inflight_inflate, 300);
    assert_int_equal(fake_balloon_held(&e->fb, FB_INFLATE), 2);
    unsigned long kicks = notifies(e, FB_DEFLATE);
    fake_balloon_set_target(&e->fb, 200);
    for (unsigned i = 0; i < 5; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(notifies(e, FB_DEFLATE), kicks);
    assert_int_equal(e->b.actual, 1000);
    e->fb.hold[FB_INFLATE] = false;
    fake_balloon_answer(&e->fb, FB_INFLATE, ~0u);
    settle(e);
    assert_int_equal(e->b.actual, 200);
    assert_consistent(e);

    settle_at(e, 0);
    assert_consistent(e);
    assert_int_equal(free_pages(e), e->free_after_init);
    env_free(e);
}

static void test_stall_and_recovery(void **state)
{
    (void)state;
    struct env *e = env_new(false, MODERN, QSIZE);
    e->cfg.ack_timeout_ns = 20 * MS;
    assert_int_equal(env_start(e), 0);
    e->fb.hold[FB_INFLATE] = true;
    fake_balloon_set_target(&e->fb, 500);
    uint64_t t0 = platform_now_ns();
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->b.inflight_inflate, 500);
    assert_int_equal(e->b.state, BALLOON_RUNNING);

    /* Poll until the driver calls it a stall: many polls return meanwhile (none waits for the
     * device), and the stall is declared no earlier than the timeout. */
    uint64_t t_stalled = 0;
    unsigned polls = 0;
    while (platform_now_ns() - t0 < 2000 * MS) {
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
        polls++;
        if (e->b.state == BALLOON_STALLED) {
            t_stalled = platform_now_ns();
            break;
        }
    }
    assert_int_equal(e->b.state, BALLOON_STALLED);
    assert_true(t_stalled - t0 >= 20 * MS);
    assert_true(polls >= 20);
    assert_true(fake_log_contains("balloon_stalled"));
    assert_true(fake_log_contains("has not used a buffer"));
    for (unsigned i = 0; i < 10; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->b.state, BALLOON_STALLED);
    assert_int_equal(e->b.actual, 0);
    assert_int_equal(fake_balloon_held(&e->fb, FB_INFLATE), 2);

    /* The device answers after all. */
    e->fb.hold[FB_INFLATE] = false;
    assert_int_equal(fake_balloon_answer(&e->fb, FB_INFLATE, ~0u), 2);
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->b.state, BALLOON_RUNNING);
    assert_true(fake_log_contains("balloon_recovered"));
    assert_int_equal(e->b.actual, 500);
    assert_consistent(e);
    settle_at(e, 0);
    assert_consistent(e);
    env_free(e);
}

static void test_must_tell_host_before_reuse(void **state)
{
    (void)state;
    struct env *e = env_up(false, MODERN);
    assert_true(balloon_negotiated(&e->b, VIRTIO_BALLOON_F_MUST_TELL_HOST));
    settle_at(e, 600);
    assert_consistent(e);
    uint64_t before = free_pages(e), chunks = e->b.held.chunks;

    e->fb.hold[FB_DEFLATE] = true;
    fake_balloon_set_target(&e->fb, 100);
    for (unsigned i = 0; i < 5; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    struct fake_vq *d = fake_transport_vq(&e->ft, 1);
    assert_int_equal(d->npending, 2);
    assert_int_equal(e->b.inflight_deflate, 500);
    /* None of the pages the device holds for deflation is back in the allocator. */
    uint64_t seen = 0;
    for (unsigned k = 0; k < d->npending; k++) {
        uint32_t pfns[256];
        size_t n = fake_chain_read(&d->pending[k], pfns, sizeof(pfns)) / 4;
        for (size_t i = 0; i < n; i++) {
            assert_true(fake_balloon_is_ballooned(&e->fb, pfns[i]));
            assert_false(buddy_is_free(&e->mm, pfns[i]));
        }
        seen += n;
    }
    assert_int_equal(seen, 500);
    assert_int_equal(free_pages(e), before + (chunks - e->b.held.chunks));
    assert_int_equal(e->b.actual, 600);
    assert_int_equal(fake_balloon_actual(&e->fb), 600);

    /* The device acknowledges one buffer: exactly its pages come back. */
    uint32_t first[256];
    size_t n0 = fake_chain_read(&d->pending[0], first, sizeof(first)) / 4;
    assert_int_equal(fake_balloon_answer(&e->fb, FB_DEFLATE, 1), 1);
    assert_int_equal(free_pages(e), before + (chunks - e->b.held.chunks)); /* not yet collected */
    balloon_poll(&e->b, 0);
    assert_int_equal(free_pages(e), before + (chunks - e->b.held.chunks) + n0);
    for (size_t i = 0; i < n0; i++)
        assert_true(buddy_is_free(&e->mm, first[i]));
    assert_int_equal(e->b.actual, 600 - n0);
    assert_int_equal(fake_balloon_actual(&e->fb), 600 - n0);

    e->fb.hold[FB_DEFLATE] = false;
    fake_balloon_answer(&e->fb, FB_DEFLATE, ~0u);
    settle(e);
    assert_int_equal(e->b.actual, 100);
    assert_consistent(e);
    env_free(e);
}

static void test_legacy_round_trip(void **state)
{
    (void)state;
    uint64_t offered = F(VIRTIO_BALLOON_F_STATS_VQ) | F(VIRTIO_BALLOON_F_MUST_TELL_HOST) |
                       F(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) | F(VIRTIO_F_NOTIFY_ON_EMPTY) |
                       F(VIRTIO_F_ANY_LAYOUT) | F(VIRTIO_F_INDIRECT_DESC) | F(VIRTIO_F_EVENT_IDX) |
                       F(VIRTIO_F_QEMU_BAD);
    struct env *e = env_new(true, offered, QSIZE);
    rec_install(e);
    assert_int_equal(env_start(e), 0);
    assert_clean(e);
    assert_false(rec.features_ok_ever);
    assert_true(e->ft.status & VIRTIO_STATUS_DRIVER_OK);
    assert_int_equal(e->ft.driver_features, offered & WANTED);
    assert_true(e->b.inflate_vq.legacy_layout);
    for (unsigned i = 0; i < 3; i++)
        assert_int_equal(e->ft.q[i].size, QSIZE);
    assert_int_equal(e->fb.stats_buffers, 1);
    round_trip(e);
    env_free(e);
}

/* ---- A misbehaving device ------------------------------------------------------------------- */

struct frozen {
    unsigned config_reads, config_writes, isr_reads, status_writes;
    unsigned long notifies[3];
    uint64_t free, allocs, frees, invalid_frees;
    uint32_t actual, inflight_inflate, inflight_deflate;
    uint64_t inflated, deflated;
};

static void freeze(const struct env *e, struct frozen *f)
{
    memset(f, 0, sizeof(*f)); /* compared with memcmp: padding too */
    f->config_reads = e->ft.config_reads;
    f->config_writes = e->ft.config_writes;
    f->isr_reads = e->ft.isr_reads;
    f->status_writes = e->ft.status_writes;
    f->free = e->mm.free_pages;
    f->allocs = e->mm.allocs;
    f->frees = e->mm.frees;
    f->invalid_frees = e->mm.invalid_frees;
    f->actual = e->b.actual;
    f->inflight_inflate = e->b.inflight_inflate;
    f->inflight_deflate = e->b.inflight_deflate;
    f->inflated = e->fb.inflated_pages;
    f->deflated = e->fb.deflated_pages;
    for (unsigned i = 0; i < 3; i++)
        f->notifies[i] = e->ft.q[i].notifies;
}

/*
 * The device breaks the used ring of one queue. The driver must stop (BROKEN, the violation names
 * the queue), free nothing on the device's word (no double free, no page of a broken deflate
 * buffer back in the allocator), and from then on balloon_poll does nothing at all.
 */
static void violation_case_cfg(enum fb_role role, enum fb_misbehave how, const char *qname,
                               const char *what, bool strict)
{
    struct env *e = env_new(false, MODERN, QSIZE);
    e->cfg.strict = strict;
    assert_int_equal(env_start(e), 0);
    uint64_t free0 = 0, chunks0 = 0;
    if (role == FB_DEFLATE) {
        settle_at(e, 600);
        assert_consistent(e);
        free0 = free_pages(e);
        chunks0 = e->b.held.chunks;
    }
    e->fb.misbehave[role] = how;
    if (role == FB_INFLATE)
        fake_balloon_set_target(&e->fb, 600);
    else if (role == FB_DEFLATE)
        fake_balloon_set_target(&e->fb, 100);
    else
        assert_true(fake_balloon_request_stats(&e->fb));
    for (unsigned i = 0; i < 10 && e->b.state != BALLOON_BROKEN; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);

    assert_int_equal(e->b.state, BALLOON_BROKEN);
    char q[32];
    snprintf(q, sizeof(q), "virtqueue %s[", qname);
    if (!strstr(e->b.violation, q) || !strstr(e->b.violation, what))
        fail_msg("violation \"%s\" should name %s and say \"%s\"", e->b.violation, q, what);
    assert_true(fake_log_contains("protocol violation"));
    assert_true(fake_log_contains("\"event\":\"violation\""));
    assert_int_equal(e->mm.invalid_frees, 0);
    assert_int_equal(e->fb.errors, 0);
    assert_int_equal(e->ft.driver_errors, 0);
    if (role == FB_DEFLATE) {
        /* The deflate buffers were never collected: none of their pages is back. */
        assert_int_equal(free_pages(e), free0 + (chunks0 - e->b.held.chunks));
        assert_int_equal(e->b.actual, 600);
    }
    if (role == FB_INFLATE)
        assert_int_equal(e->b.actual, 0);

    /* From now on, nothing: no device access, no allocator call, no count change. */
    struct frozen f0, f1;
    freeze(e, &f0);
    for (unsigned i = 0; i < 20; i++)
        balloon_poll(&e->b, (i & 1) ? BALLOON_EV_CONFIG : 0);
    fake_balloon_set_target(&e->fb, 0);
    for (unsigned i = 0; i < 20; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(balloon_release_for_oom(&e->b, 256, 10 * MS), 0);
    freeze(e, &f1);
    assert_memory_equal(&f0, &f1, sizeof(f0));
    assert_int_equal(e->b.state, BALLOON_BROKEN);
    env_free(e);
}

static void violation_case(enum fb_role role, enum fb_misbehave how, const char *qname,
                           const char *what)
{
    violation_case_cfg(role, how, qname, what, false);
}

static void test_violation_inflate_bad_id(void **state)
{
    (void)state;
    violation_case(FB_INFLATE, FB_BAD_ID_RANGE, "inflateq", "out of range");
}

static void test_violation_inflate_id_not_in_flight(void **state)
{
    (void)state;
    violation_case(FB_INFLATE, FB_BAD_ID_FREE, "inflateq", "not in flight");
}

static void test_violation_deflate_id_not_in_flight(void **state)
{
    (void)state;
    violation_case(FB_DEFLATE, FB_BAD_ID_FREE, "deflateq", "not in flight");
}

static void test_violation_inflate_len(void **state)
{
    (void)state;
    /* Inflate buffers have no device-writable byte: a used len > 0 is a deviation, a violation
     * only in strict mode (blimp.balloon.strict=1). */
    violation_case_cfg(FB_INFLATE, FB_LEN_TOO_LARGE, "inflateq", "no device-writable bytes", true);
}

static void test_violation_deflate_len(void **state)
{
    (void)state;
    violation_case_cfg(FB_DEFLATE, FB_LEN_TOO_LARGE, "deflateq", "no device-writable bytes", true);
}

static void test_violation_inflate_idx_jump(void **state)
{
    (void)state;
    violation_case(FB_INFLATE, FB_IDX_JUMP, "inflateq", "jumped");
}

static void test_violation_deflate_bad_id(void **state)
{
    (void)state;
    violation_case(FB_DEFLATE, FB_BAD_ID_RANGE, "deflateq", "out of range");
}

static void test_violation_stats_idx_jump(void **state)
{
    (void)state;
    violation_case(FB_STATS, FB_IDX_JUMP, "statsq", "jumped");
}

/* QEMU before 7.0 reported the bytes it read as the used length of inflate, deflate and stats
 * buffers. On either interface that is a deviation: counted per queue, reported once per queue,
 * and the balloon goes on. */
static void test_used_len_deviation(void **state)
{
    (void)state;
    for (int legacy = 0; legacy <= 1; legacy++) {
        struct env *e = env_new(legacy, legacy ? F(VIRTIO_BALLOON_F_STATS_VQ) : MODERN, QSIZE);
        e->fb.used_len_bytes_read = true;
        fake_log_watch("\"event\":\"device_deviation\"");
        assert_int_equal(env_start(e), 0);
        settle_at(e, 700);
        assert_true(fake_balloon_request_stats(&e->fb));
        settle_at(e, 0);
        assert_true(fake_balloon_request_stats(&e->fb));
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
        assert_int_equal(e->b.state, BALLOON_RUNNING);
        assert_consistent(e);
        assert_int_equal(free_pages(e), e->free_after_init);
        struct balloon_status st;
        balloon_get_status(&e->b, &st);
        for (unsigned q = BQ_INFLATE; q <= BQ_STATS; q++) {
            assert_true(st.queues[q].present);
            assert_string_equal(st.queues[q].verdict, "deviates");
        }
        assert_true(st.queues[BQ_INFLATE].deviations >= 3); /* 700 pages: 3 buffers of 256 */
        assert_true(st.queues[BQ_DEFLATE].deviations >= 3);
        assert_int_equal(st.queues[BQ_STATS].deviations, 2);
        assert_false(st.queues[BQ_HINT].present);
        assert_int_equal(fake_log_watched(), 3); /* once per queue */
        env_free(e);
    }
    /* A conforming device: every verdict says so, no event. */
    struct env *e = env_up(false, MODERN);
    settle_at(e, 300);
    struct balloon_status st;
    balloon_get_status(&e->b, &st);
    for (unsigned q = BQ_INFLATE; q <= BQ_STATS; q++)
        assert_string_equal(st.queues[q].verdict, "conforms");
    assert_false(fake_log_contains("device_deviation"));
    env_free(e);
    fake_log_watch("");
}

/* A used length past a writable buffer's bytes stays fatal (a report chain), strict or not. */
static void test_used_len_past_writable_is_fatal(void **state)
{
    (void)state;
    struct env *e = env_new(false, MODERN | F(VIRTIO_BALLOON_F_PAGE_REPORTING), QSIZE);
    e->cfg.report_delay_ms = 0;
    assert_int_equal(env_start(e), 0);
    e->fb.misbehave[FB_REPORT] = FB_LEN_TOO_LARGE;
    for (unsigned i = 0; i < 50 && e->b.state != BALLOON_BROKEN; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->b.state, BALLOON_BROKEN);
    assert_non_null(strstr(e->b.violation, "reportingq"));
    assert_non_null(strstr(e->b.violation, "device-writable bytes"));
    struct balloon_status st;
    balloon_get_status(&e->b, &st);
    assert_string_equal(st.queues[BQ_REPORT].verdict, "violated");
    env_free(e);
}

/* ---- DEVICE_NEEDS_RESET -----------------------------------------------------------------------
 */

/* Pages the driver holds: acknowledged, in flight, or waiting to be re-inflated after a reset,
 * plus those in deflate buffers the device has not used yet (still the balloon's until then). */
static uint64_t balloon_pages_held(const struct env *e)
{
    return e->b.held.pages + e->b.resend.pages + e->b.inflight_deflate;
}

/*
 * The device breaks (NEEDS_RESET, nothing answered any more) with buffers of `role` in flight.
 * The driver must report it, reset the device, take back every buffer in flight exactly once,
 * tell the fresh device about every page it holds, and reach the target again, with the
 * allocator's accounting exact and the device's balloon equal to the driver's.
 */
static void reset_case(enum fb_role role, bool chunked)
{
    uint64_t features = MODERN | (chunked ? F(VIRTIO_BALLOON_F_X_CHUNKS) : 0);
    struct env *e = env_up(false, features);
    settle_at(e, 1000);
    assert_consistent(e);
    e->fb.hold[role] = true;
    fake_balloon_set_target(&e->fb, role == FB_INFLATE ? 1700 : 300);
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    unsigned held_bufs = fake_balloon_held(&e->fb, role);
    assert_true(held_bufs >= 1);
    if (role == FB_INFLATE)
        assert_int_equal(e->b.inflight_inflate, 700);
    else
        assert_int_equal(e->b.inflight_deflate, 700);
    uint64_t held_before = balloon_pages_held(e);
    assert_int_equal(held_before, role == FB_INFLATE ? 1700 : 1000);

    fake_log_watch("\"event\":\"device_needs_reset\"");
    fake_balloon_break(&e->fb);
    unsigned resets0 = e->ft.resets;
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(fake_log_watched(), 1);
    assert_true(fake_log_contains("\"detected_by\":\"config\""));
    assert_true(fake_log_contains("\"event\":\"balloon_reset\""));
    assert_true(e->ft.resets > resets0);
    assert_int_equal(e->b.resets, 1);
    assert_int_equal(e->b.state, BALLOON_RUNNING);
    assert_false(e->fb.broken);
    /* Nothing lost, nothing doubled: every page the balloon had is still the balloon's. */
    assert_int_equal(balloon_pages_held(e), held_before);
    assert_int_equal(e->b.held.pages + e->b.resend.pages, held_before);
    assert_int_equal(e->fb.forgotten_pages, 1000);

    e->fb.hold[role] = false;
    fake_balloon_answer(&e->fb, FB_INFLATE, ~0u); /* re-inflated while the device held them */
    settle(e);
    assert_true(fake_log_contains("\"event\":\"balloon_reinflated\""));
    assert_int_equal(e->b.actual, role == FB_INFLATE ? 1700 : 300);
    assert_int_equal(e->b.resend.pages, 0);
    assert_false(e->b.reinflating);
    /* The fresh device was told about every page (re-inflated), then the driver went on. */
    assert_true(e->fb.inflated_pages >= 1000 + held_before);
    assert_consistent(e);
    settle_at(e, 0);
    assert_consistent(e);
    assert_int_equal(free_pages(e), e->free_after_init);
    fake_log_watch("");
    env_free(e);
}

static void test_needs_reset_recover_inflate_in_flight(void **state)
{
    (void)state;
    reset_case(FB_INFLATE, false);
    reset_case(FB_INFLATE, true);
}

static void test_needs_reset_recover_deflate_in_flight(void **state)
{
    (void)state;
    reset_case(FB_DEFLATE, false);
    reset_case(FB_DEFLATE, true);
}

/*
 * Interrupt-driven, the driver is polled only when the device uses a buffer or its next deadline
 * comes. After a reset, the round that finishes the re-inflation must go on to a target beyond
 * what was held (or ask to be woken): found end to end, where the guest stopped at the
 * re-inflated 16 MiB of a 256 MiB target.
 */
static void test_reset_then_target_without_config_events(void **state)
{
    (void)state;
    struct env *e = env_new(false, MODERN, QSIZE);
    e->cfg.buffers = 2;
    assert_int_equal(env_start(e), 0);
    e->fb.hold[FB_INFLATE] = true;
    fake_balloon_set_target(&e->fb, 5000);
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->b.inflight_inflate, 512);
    fake_balloon_break(&e->fb);
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->b.resets, 1);
    e->fb.hold[FB_INFLATE] = false;
    fake_balloon_answer(&e->fb, FB_INFLATE, ~0u);
    for (unsigned round = 0; round < 5000; round++) {
        balloon_poll(&e->b, BALLOON_EV_QUEUE);
        if (e->b.actual == 5000 && !e->b.inflight_inflate)
            break;
        if (e->b.inflight_inflate || e->b.inflight_deflate)
            continue; /* the device answered on the kick: its interrupt wakes the driver */
        uint64_t due = balloon_next_deadline_ns(&e->b), now = platform_now_ns();
        if (due == UINT64_MAX)
            fail_msg("the driver would sleep for good at %u of %u pages (resend %lu)", e->b.actual,
                     e->b.target, (unsigned long)e->b.resend.pages);
        if (due > now)
            fake_clock_skip(due - now);
    }
    assert_int_equal(e->b.actual, 5000);
    assert_false(e->b.reinflating);
    assert_consistent(e);
    env_free(e);
}

/* The device breaks again while the driver re-inflates after a first reset: the pages still
 * waiting and those already re-sent all go to the third device session. */
static void test_needs_reset_during_reinflate(void **state)
{
    (void)state;
    struct env *e = env_new(false, MODERN, QSIZE);
    e->cfg.buffers = 2; /* 512 pages in flight at most: the re-inflation takes several rounds */
    assert_int_equal(env_start(e), 0);
    settle_at(e, 3000);
    fake_balloon_break(&e->fb);
    e->fb.hold[FB_INFLATE] = true;
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->b.resets, 1);
    assert_true(e->b.reinflating);
    assert_int_equal(e->b.inflight_inflate, 512);
    assert_int_equal(e->b.resend.pages, 3000 - 512);
    fake_balloon_break(&e->fb);
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->b.resets, 2);
    assert_int_equal(e->b.held.pages + e->b.resend.pages, 3000);
    e->fb.hold[FB_INFLATE] = false;
    fake_balloon_answer(&e->fb, FB_INFLATE, ~0u);
    settle(e);
    assert_int_equal(e->b.actual, 3000);
    assert_consistent(e);
    settle_at(e, 0);
    assert_consistent(e);
    assert_int_equal(free_pages(e), e->free_after_init);
    env_free(e);
}

/* With stats, reporting and hinting running too: every kind of buffer in flight comes back. */
static void test_needs_reset_recover_all_queues(void **state)
{
    (void)state;
    struct env *e = env_new(
        false, MODERN | F(VIRTIO_BALLOON_F_PAGE_REPORTING) | F(VIRTIO_BALLOON_F_FREE_PAGE_HINT),
        QSIZE);
    assert_int_equal(env_start(e), 0);
    e->b.cfg.report_delay_ms = 0; /* after init: free_after_init counts no report in flight */
    e->b.cfg.report_threshold_pages = 0;
    settle_at(e, 2000);
    e->fb.hold_reports = true;
    uint64_t pfn = buddy_alloc(&e->mm, 10); /* touched and freed: unreported, a pass follows */
    assert_true(pfn != BUDDY_NONE);
    buddy_free(&e->mm, pfn, 10);
    for (unsigned i = 0; i < 20 && !e->b.inflight_report; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_true(e->b.inflight_report > 0);
    fake_balloon_hint_request(&e->fb);
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_true(e->b.hinted.pages > 0);
    uint64_t held_before = balloon_pages_held(e);
    fake_balloon_break(&e->fb);
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->b.resets, 1);
    /* Report chains of the old session came back; a new pass may have started since. */
    assert_int_equal(e->fb.report_pages_held, e->b.inflight_report);
    assert_int_equal(e->b.hinted.pages, 0);
    assert_int_equal(balloon_pages_held(e), held_before);
    e->fb.hold_reports = false;
    fake_balloon_answer(&e->fb, FB_REPORT, ~0u);
    settle_at(e, 500);
    for (unsigned i = 0; i < 5; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->b.inflight_report, 0);
    assert_consistent(e);
    assert_int_equal(e->fb.stats_buffers >= 2, true); /* a stats buffer again after the reset */
    settle_at(e, 0);
    for (unsigned i = 0; i < 5; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_consistent(e);
    env_free(e);
}

/*
 * balloon_reset_device (the agent's reset-device): the guest resets a healthy device with a
 * non-zero target and inflate buffers in flight. Every held page is told to the fresh device
 * again, the target is reached again, nothing is lost; a broken driver refuses.
 */
static void test_guest_reset_device(void **state)
{
    (void)state;
    struct env *e = env_up(false, MODERN);
    settle_at(e, 1000);
    e->fb.hold[FB_INFLATE] = true;
    fake_balloon_set_target(&e->fb, 1500);
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->b.inflight_inflate, 500);
    uint64_t held_before = balloon_pages_held(e);
    assert_int_equal(held_before, 1500);
    unsigned resets0 = e->ft.resets;
    fake_log_watch("\"cause\":\"guest\"");
    assert_int_equal(balloon_reset_device(&e->b), 0);
    assert_int_equal(fake_log_watched(), 1);
    assert_false(fake_log_contains("\"event\":\"device_needs_reset\""));
    assert_true(e->ft.resets > resets0);
    assert_int_equal(e->b.resets, 1);
    assert_int_equal(e->b.state, BALLOON_RUNNING);
    assert_int_equal(e->b.actual, 0);
    assert_int_equal(balloon_pages_held(e), held_before);
    assert_int_equal(e->b.held.pages + e->b.resend.pages, held_before);
    assert_int_equal(e->fb.forgotten_pages, 1000);
    e->fb.hold[FB_INFLATE] = false;
    fake_balloon_answer(&e->fb, FB_INFLATE, ~0u);
    settle(e);
    assert_true(fake_log_contains("\"event\":\"balloon_reinflated\""));
    assert_int_equal(e->b.actual, 1500);
    assert_int_equal(e->fb.balloon_pages, 1500);
    assert_false(e->b.reinflating);
    assert_true(e->fb.inflated_pages >= 1000 + held_before);
    assert_consistent(e);
    /* and again, at rest */
    assert_int_equal(balloon_reset_device(&e->b), 0);
    settle(e);
    assert_int_equal(e->b.resets, 2);
    assert_int_equal(e->b.actual, 1500);
    assert_consistent(e);
    settle_at(e, 0);
    assert_consistent(e);
    assert_int_equal(free_pages(e), e->free_after_init);
    /* A broken driver does not touch the device. */
    e->b.state = BALLOON_BROKEN;
    resets0 = e->ft.resets;
    assert_int_equal(balloon_reset_device(&e->b), -1);
    assert_int_equal(e->ft.resets, resets0);
    fake_log_watch("");
    env_free(e);
}

/* on_reset=stop: reported, state needs_reset, the device is left alone, polls do nothing. */
static void test_needs_reset_stop(void **state)
{
    (void)state;
    struct env *e = env_new(false, MODERN, QSIZE);
    e->cfg.on_reset = BALLOON_ON_RESET_STOP;
    assert_int_equal(env_start(e), 0);
    settle_at(e, 400);
    unsigned resets0 = e->ft.resets;
    fake_balloon_break(&e->fb);
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->b.state, BALLOON_NEEDS_RESET);
    struct balloon_status st;
    balloon_get_status(&e->b, &st);
    assert_string_equal(st.state_name, "needs_reset");
    assert_true(fake_log_contains("\"action\":\"stop\""));
    fake_balloon_set_target(&e->fb, 0);
    for (unsigned i = 0; i < 10; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->ft.resets, resets0);
    assert_int_equal(e->b.resets, 0);
    assert_int_equal(e->b.actual, 400);
    assert_int_equal(e->b.held.pages, 400);
    env_free(e);
}

/* No config interrupt (or a poller that missed it): a buffer that times out makes the driver
 * look at the status, and NEEDS_RESET is told apart from a stall. */
static void test_needs_reset_found_on_timeout(void **state)
{
    (void)state;
    struct env *e = env_new(false, MODERN, QSIZE);
    e->cfg.ack_timeout_ns = 20 * MS;
    assert_int_equal(env_start(e), 0);
    e->fb.hold[FB_INFLATE] = true;
    fake_balloon_set_target(&e->fb, 500);
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    e->ft.status |= VIRTIO_STATUS_NEEDS_RESET; /* the bit only: no interrupt */
    e->fb.broken = true;
    uint64_t t0 = platform_now_ns();
    while (e->b.resets == 0 && platform_now_ns() - t0 < 2000 * MS)
        balloon_poll(&e->b, 0);
    assert_int_equal(e->b.resets, 1);
    assert_true(fake_log_contains("\"detected_by\":\"timeout\""));
    assert_false(fake_log_contains("balloon_stalled"));
    e->fb.hold[FB_INFLATE] = false;
    settle(e);
    assert_consistent(e);
    env_free(e);
}

/* Legacy devices have no NEEDS_RESET (QEMU sets it for VERSION_1 only): a broken legacy device
 * is a stall. */
static void test_needs_reset_legacy_is_a_stall(void **state)
{
    (void)state;
    struct env *e = env_new(true, F(VIRTIO_BALLOON_F_STATS_VQ), QSIZE);
    e->cfg.ack_timeout_ns = 20 * MS;
    assert_int_equal(env_start(e), 0);
    fake_balloon_break(&e->fb);
    assert_false(e->ft.status & VIRTIO_STATUS_NEEDS_RESET);
    fake_balloon_set_target(&e->fb, 500);
    uint64_t t0 = platform_now_ns();
    while (e->b.state == BALLOON_RUNNING && platform_now_ns() - t0 < 2000 * MS)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->b.state, BALLOON_STALLED);
    assert_int_equal(e->b.resets, 0);
    env_free(e);
}

/* blimp.balloon.inject=bad_next: the device model finds the malformed chain as QEMU does, breaks
 * and asks for a reset; the driver recovers and reaches the target. */
static void test_inject_bad_next_recovers(void **state)
{
    (void)state;
    for (int chunked = 0; chunked <= 1; chunked++) {
        struct env *e =
            env_new(false, MODERN | (chunked ? F(VIRTIO_BALLOON_F_X_CHUNKS) : 0), QSIZE);
        e->cfg.inject = BALLOON_INJECT_BAD_NEXT;
        assert_int_equal(env_start(e), 0);
        settle_at(e, 900);
        assert_true(e->b.injected);
        if (e->fb.errors != 1 || !strstr(e->fb.error, "out of range"))
            fail_msg("device saw %u errors, \"%s\"; expected the malformed chain", e->fb.errors,
                     e->fb.error);
        e->fb.errors = 0;
        assert_int_equal(e->fb.breaks, 1);
        assert_int_equal(e->b.resets, 1);
        assert_true(fake_log_contains("\"what\":\"bad_next\""));
        assert_consistent(e);
        settle_at(e, 0);
        assert_consistent(e);
        assert_int_equal(free_pages(e), e->free_after_init);
        env_free(e);
    }
}

/* ---- Queue numbering ------------------------------------------------------------------------ */

static void numbering_case(uint64_t features, bool fixed_host, bool placeholder,
                           enum balloon_queues mode, const char *seen, int report_index)
{
    struct env *e = env_new(false, features, QSIZE);
    if (fixed_host)
        fake_balloon_number_fixed(&e->fb, placeholder);
    e->cfg.queues = mode;
    int rc = env_start(e);
    char want[64];
    snprintf(want, sizeof(want), "\"numbering\":\"%s\"", seen);
    if (!fake_log_contains(want))
        fail_msg("expected %s", want);
    if (report_index < 0) {
        assert_int_not_equal(rc, 0); /* told the wrong numbering: the queue is missing */
        env_free(e);
        return;
    }
    assert_int_equal(rc, 0);
    assert_int_equal(e->b.report_vq.index, (unsigned)report_index);
    e->b.cfg.report_delay_ms = 0;
    e->b.cfg.report_threshold_pages = 0;
    settle_at(e, 300);
    for (unsigned i = 0; i < 10; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_true(e->b.reported_pages > 0);
    assert_consistent(e);
    env_free(e);
}

static void test_queue_numbering(void **state)
{
    (void)state;
    uint64_t rep = MODERN | F(VIRTIO_BALLOON_F_PAGE_REPORTING);
    uint64_t rep_nostats = F(VIRTIO_F_VERSION_1) | F(VIRTIO_BALLOON_F_PAGE_REPORTING);
    /* QEMU, Linux: compacted; told apart because queue 4 does not exist. */
    numbering_case(rep, false, false, BALLOON_QUEUES_AUTO, "negotiated", 3);
    numbering_case(rep_nostats, false, false, BALLOON_QUEUES_AUTO, "negotiated", 2);
    /* Old crosvm: reporting at 4, with or without a queue at 3. */
    numbering_case(rep, true, false, BALLOON_QUEUES_AUTO, "fixed", 4);
    numbering_case(rep, true, true, BALLOON_QUEUES_AUTO, "fixed", 4);
    numbering_case(rep_nostats, true, true, BALLOON_QUEUES_AUTO, "fixed", 4);
    /* Forced: fixed on a fixed host works; negotiated on it finds no queue 3. */
    numbering_case(rep, true, false, BALLOON_QUEUES_FIXED, "fixed", 4);
    numbering_case(rep, true, false, BALLOON_QUEUES_NEGOTIATED, "fixed", -1);
    numbering_case(rep, false, false, BALLOON_QUEUES_FIXED, "negotiated", -1);

    /* Nothing after stats, or hinting and reporting both: the numberings agree. */
    struct env *e = env_up(false, MODERN);
    assert_true(fake_log_contains("\"numbering\":\"ambiguous\""));
    env_free(e);
    e = env_new(false,
                MODERN | F(VIRTIO_BALLOON_F_PAGE_REPORTING) | F(VIRTIO_BALLOON_F_FREE_PAGE_HINT),
                QSIZE);
    fake_balloon_number_fixed(&e->fb, false);
    assert_int_equal(env_start(e), 0);
    assert_true(fake_log_contains("\"numbering\":\"ambiguous\""));
    assert_int_equal(e->b.report_vq.index, 4);
    env_free(e);
    /* Sizes that fit neither (queue 5 beyond everything is ignored; a queue 4 with reporting
     * at 3 missing is neither): unknown. */
    e = env_new(false, rep, QSIZE);
    fake_transport_add_queue(&e->ft, 3, 0);
    fake_transport_add_queue(&e->ft, 2, 0);
    assert_int_not_equal(env_start(e), 0);
    assert_true(fake_log_contains("\"numbering\":\"unknown\""));
    env_free(e);
}

/* ---- Config --------------------------------------------------------------------------------- */

static void test_config_generation_unstable(void **state)
{
    (void)state;
    struct env *e = env_up(false, MODERN);
    fake_balloon_set_target(&e->fb, 300);
    /* A device whose generation never settles cannot hold the driver: bounded retries. */
    e->ft.unstable_generation = 1000000;
    unsigned r0 = e->ft.config_reads;
    uint64_t t0 = platform_now_ns();
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_true(platform_now_ns() - t0 < 100 * MS);
    unsigned reads = e->ft.config_reads - r0;
    assert_true(reads >= 2);
    assert_true(reads <= 16);
    for (unsigned i = 0; i < 20; i++) {
        r0 = e->ft.config_reads;
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
        assert_true(e->ft.config_reads - r0 <= 16);
    }
    assert_int_equal(e->b.state, BALLOON_RUNNING);

    /* One generation change during a read: exactly one re-read, then the value stands. */
    e->ft.unstable_generation = 2;
    fake_balloon_set_target(&e->fb, 500);
    r0 = e->ft.config_reads;
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->ft.config_reads - r0, 2);
    assert_int_equal(e->ft.unstable_generation, 0);
    assert_int_equal(e->b.target, 500);
    settle(e);
    assert_int_equal(e->b.actual, 500);
    assert_consistent(e);
    env_free(e);
}

/* ---- Conformance-mode hooks ----------------------------------------------------------------- */

/* blimp.balloon.stats=0: STATS_VQ declined, no stats queue; the queues after it keep the
 * indices the host's numbering gives them. */
static void test_stats_declined(void **state)
{
    (void)state;
    struct env *e = env_new(false, MODERN | F(VIRTIO_BALLOON_F_FREE_PAGE_HINT), QSIZE);
    e->cfg.stats = false;
    assert_int_equal(env_start(e), 0);
    assert_false(balloon_negotiated(&e->b, VIRTIO_BALLOON_F_STATS_VQ));
    assert_true(balloon_negotiated(&e->b, VIRTIO_BALLOON_F_FREE_PAGE_HINT));
    assert_false(e->b.has_stats);
    assert_int_equal(e->fb.stats_buffers, 0);
    assert_int_equal(e->b.hint_index, 3); /* statsq keeps index 2 on the device */
    settle_at(e, 500);
    assert_int_equal(e->b.state, BALLOON_RUNNING);
    env_free(e);
}

/* The stats probe: entries in reverse tag order, unknown tags first and among them, more entries
 * than any device knows, the same every time. */
static void test_stats_probe_order_and_unknown_tag(void **state)
{
    (void)state;
    struct env *e = env_new(false, MODERN, QSIZE);
    e->cfg.stats_probe = true;
    assert_int_equal(env_start(e), 0);
    unsigned total = 1 + BALLOON_NUM_STATS + BALLOON_STATS_PROBE_EXTRA;
    assert_int_equal(e->fb.n_stats, total);
    assert_int_equal(e->fb.stat_tag[0], BALLOON_STATS_PROBE_TAG);
    for (unsigned i = 0; i < BALLOON_NUM_STATS; i++) { /* known, reversed, 2 unknown after each */
        assert_int_equal(e->fb.stat_tag[1 + 3 * i], BALLOON_NUM_STATS - 1 - i);
        assert_int_equal(e->fb.stat_tag[2 + 3 * i], BALLOON_STATS_PROBE_TAG_BASE + 2 * i);
        assert_int_equal(e->fb.stat_tag[3 + 3 * i], BALLOON_STATS_PROBE_TAG_BASE + 2 * i + 1);
    }
    uint64_t v;
    assert_true(fake_balloon_stat(&e->fb, 5, &v)); /* MEMTOT, as without the probe */
    assert_int_equal(v, e->mm.total_pages * PAGE_SIZE);
    assert_true(fake_balloon_request_stats(&e->fb));
    balloon_poll(&e->b, 0);
    assert_int_equal(e->b.stats_updates, 1);
    assert_int_equal(e->fb.n_stats, total); /* the model checks the same set */
    assert_clean(e);
    env_free(e);
}

/* A device that writes into a device-readable PFN array breaks the driver, naming it. */
static void readonly_case(bool deflate)
{
    struct env *e = env_up(false, MODERN);
    if (deflate)
        settle_at(e, 600);
    e->fb.hold[deflate ? 1 : 0] = true;
    fake_balloon_set_target(&e->fb, deflate ? 100 : 600);
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    fake_balloon_pop(&e->fb, deflate ? FB_DEFLATE : FB_INFLATE);
    assert_true(fake_balloon_held(&e->fb, deflate ? FB_DEFLATE : FB_INFLATE) > 0);
    /* the device scribbles on the first buffer it holds */
    struct balloon_buf *victim = NULL;
    for (unsigned i = 0; i < e->b.cfg.buffers && !victim; i++)
        if (e->b.bufs[i].busy && e->b.bufs[i].inflate == !deflate)
            victim = &e->b.bufs[i];
    assert_non_null(victim);
    victim->pfns[0] ^= 1;
    fake_balloon_answer(&e->fb, deflate ? FB_DEFLATE : FB_INFLATE, 64);
    balloon_poll(&e->b, 0);
    assert_int_equal(e->b.state, BALLOON_BROKEN);
    assert_non_null(strstr(e->b.violation, deflate ? "device-readable deflate buffer"
                                                   : "device-readable inflate buffer"));
    env_free(e);
}

static void test_device_writes_readable_inflate_buffer(void **state)
{
    (void)state;
    readonly_case(false);
}

static void test_device_writes_readable_deflate_buffer(void **state)
{
    (void)state;
    readonly_case(true);
}

static void test_readonly_buffers_checked(void **state)
{
    (void)state;
    struct env *e = env_up(false, MODERN);
    round_trip(e);
    struct balloon_status st;
    balloon_get_status(&e->b, &st);
    assert_true(st.readonly_checked > 0);
    assert_int_equal(st.readonly_checked, e->b.inflate_buffers + e->b.deflate_buffers);
    env_free(e);
}

/* ---- Stats ---------------------------------------------------------------------------------- */

static void assert_stats_now(const struct env *e)
{
    assert_int_equal(e->fb.n_stats, BALLOON_NUM_STATS);
    bool seen[BALLOON_NUM_STATS] = {false};
    for (unsigned i = 0; i < e->fb.n_stats; i++) {
        assert_true(e->fb.stat_tag[i] < BALLOON_NUM_STATS);
        assert_false(seen[e->fb.stat_tag[i]]);
        seen[e->fb.stat_tag[i]] = true;
    }
    uint64_t v;
    assert_true(fake_balloon_stat(&e->fb, 5, &v)); /* MEMTOT */
    assert_int_equal(v, e->mm.total_pages * PAGE_SIZE);
    assert_true(fake_balloon_stat(&e->fb, 4, &v)); /* MEMFREE */
    assert_int_equal(v, e->mm.free_pages * PAGE_SIZE);
    assert_true(fake_balloon_stat(&e->fb, 6, &v)); /* AVAIL */
    assert_int_equal(v, e->mm.free_pages * PAGE_SIZE);
    static const uint16_t zero[] = {0, 1, 2, 3, 7, 8, 9};
    for (unsigned i = 0; i < sizeof(zero) / sizeof(zero[0]); i++) {
        assert_true(fake_balloon_stat(&e->fb, zero[i], &v));
        assert_int_equal(v, 0);
    }
}

static void test_stats(void **state)
{
    (void)state;
    struct env *e = env_up(false, MODERN);
    assert_true(e->fb.stats_held);
    assert_int_equal(e->fb.stats_buffers, 1);
    assert_int_equal(e->b.stats_updates, 0);
    assert_stats_now(e);
    uint64_t memfree0;
    assert_true(fake_balloon_stat(&e->fb, 4, &memfree0));
    assert_int_equal(memfree0, e->free_after_init * PAGE_SIZE);

    settle_at(e, 1000);
    /* The device still has the old numbers until it asks. */
    uint64_t v;
    assert_true(fake_balloon_stat(&e->fb, 4, &v));
    assert_int_equal(v, memfree0);
    assert_true(fake_balloon_request_stats(&e->fb));
    assert_false(e->fb.stats_held);
    balloon_poll(&e->b, 0);
    assert_true(e->fb.stats_held);
    assert_int_equal(e->fb.stats_buffers, 2);
    assert_int_equal(e->b.stats_updates, 1);
    assert_stats_now(e);
    assert_true(fake_balloon_stat(&e->fb, 4, &v));
    assert_int_equal(memfree0 - v, (1000 + e->b.held.chunks) * PAGE_SIZE);

    /* Requests keep being answered, one buffer at a time, with the same tags. */
    for (unsigned i = 0; i < 5; i++) {
        assert_true(fake_balloon_request_stats(&e->fb));
        balloon_poll(&e->b, (i & 1) ? BALLOON_EV_CONFIG : 0);
    }
    assert_int_equal(e->b.stats_updates, 6);
    assert_int_equal(e->fb.stats_buffers, 7);
    assert_int_equal(notifies(e, FB_STATS), 7);
    settle_at(e, 0);
    assert_true(fake_balloon_request_stats(&e->fb));
    balloon_poll(&e->b, 0);
    assert_stats_now(e);
    assert_true(fake_balloon_stat(&e->fb, 4, &v));
    assert_int_equal(v, memfree0);
    assert_consistent(e);
    env_free(e);
}

static void test_no_stats_queue(void **state)
{
    (void)state;
    struct env *e = env_up(false, MODERN & ~F(VIRTIO_BALLOON_F_STATS_VQ));
    assert_false(e->b.has_stats);
    assert_int_equal(e->fb.qidx[FB_STATS], FB_NO_QUEUE);
    assert_false(e->ft.q[2].enabled);
    settle_at(e, 800);
    assert_consistent(e);
    settle_at(e, 0);
    assert_consistent(e);
    assert_int_equal(e->b.stats_updates, 0);
    env_free(e);
}

/* ---- Chunked inflate / deflate (docs/chunked-inflate.md) ------------------------------------- */

#define CHUNKED (MODERN | F(VIRTIO_BALLOON_F_X_CHUNKS))

/* Every chunked buffer logged from `from`: ascending, and every chunk maximal (two chunks of a
 * buffer never touch: the driver merged neighbours). Returns the chunked buffers seen. */
static unsigned check_chunk_log(const struct env *e, unsigned from)
{
    unsigned seen = 0;
    for (unsigned i = from; i < e->fb.nlog; i++) {
        const struct fb_buffer *l = &e->fb.log[i];
        if (l->role == FB_STATS)
            continue;
        if (!l->nchunks)
            fail_msg("buffer %u of a chunked device is a PFN array", i);
        unsigned runs = l->n ? 1 : 0;
        for (unsigned k = 1; k < l->n; k++) {
            if (l->pfns[k] <= l->pfns[k - 1])
                fail_msg("buffer %u is not ascending at page %u", i, k);
            runs += l->pfns[k] != l->pfns[k - 1] + 1;
        }
        assert_int_equal(runs, l->nchunks); /* one chunk per contiguous run, no more */
        assert_true(l->nchunks <= e->cfg.chunks_per_buffer);
        seen++;
    }
    return seen;
}

static void test_chunks_inflate_and_deflate(void **state)
{
    (void)state;
    for (int legacy = 0; legacy <= 1; legacy++) {
        uint64_t offered = legacy ? (CHUNKED & ~F(VIRTIO_F_VERSION_1)) : CHUNKED;
        struct env *e = env_up(legacy, offered);
        assert_true(balloon_negotiated(&e->b, VIRTIO_BALLOON_F_X_CHUNKS));
        settle_at(e, 5000);
        assert_consistent(e);
        /* 5000 pages of unfragmented RAM are a handful of blocks: one buffer, few chunks. */
        assert_int_equal(check_chunk_log(e, 0), e->fb.nlog);
        assert_int_equal(e->fb.inflated_pages, 5000);
        assert_true(e->fb.max_chunks <= 4);
        assert_true(e->b.inflate_buffers <= 2);
        unsigned from = e->fb.nlog;
        settle_at(e, 1234);
        assert_consistent(e);
        settle_at(e, 0);
        assert_consistent(e);
        assert_int_equal(check_chunk_log(e, from), e->fb.nlog - from);
        assert_int_equal(e->fb.deflated_pages, 5000);
        assert_int_equal(free_pages(e), e->free_after_init);
        env_free(e);
    }
}

static void test_chunks_declined_or_not_offered(void **state)
{
    (void)state;
    struct env *e = env_new(false, CHUNKED, QSIZE);
    e->cfg.chunks = false; /* blimp.balloon.chunks=0 */
    assert_int_equal(env_start(e), 0);
    assert_false(balloon_negotiated(&e->b, VIRTIO_BALLOON_F_X_CHUNKS));
    settle_at(e, 700);
    assert_consistent(e);
    assert_int_equal(e->fb.chunk_buffers, 0);
    assert_true(e->fb.max_pfns <= e->cfg.pfns_per_buffer);
    env_free(e);

    e = env_up(false, MODERN); /* a stock host: PFN arrays, the bit never accepted */
    assert_false(e->ft.driver_features & F(VIRTIO_BALLOON_F_X_CHUNKS));
    settle_at(e, 700);
    assert_consistent(e);
    assert_int_equal(e->fb.chunk_buffers, 0);
    env_free(e);
}

static void test_chunks_bad_arrays_rejected(void **state)
{
    (void)state;
    struct env *e = env_new(false, CHUNKED, QSIZE);
    char why[160];
    const uint64_t base = RAM_BASE, end = RAM_BASE + RAM_BYTES;
    struct {
        const char *rule;
        unsigned n;
        struct balloon_chunk c[3];
    } bad[] = {
        {"empty or not 4 KiB-aligned", 1, {{base + 8, 4096}}},
        {"empty or not 4 KiB-aligned", 1, {{base, 100}}},
        {"empty or not 4 KiB-aligned", 1, {{base, 0}}},
        {"wraps around", 1, {{0xfffffffffffff000ULL, 0x2000}}},
        {"overlaps or precedes", 2, {{base, 0x3000}, {base + 0x2000, 0x1000}}},
        {"overlaps or precedes", 2, {{base + 0x5000, 0x1000}, {base, 0x1000}}},
        {"not inside guest RAM", 1, {{base - 0x1000, 0x1000}}},
        {"not inside guest RAM", 1, {{end - 0x1000, 0x2000}}},
        {"not inside guest RAM", 2, {{base, 0x1000}, {end, 0x1000}}},
    };
    for (unsigned i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        why[0] = '\0';
        assert_int_equal(
            fake_balloon_check_chunks(&e->fb, bad[i].c, bad[i].n * 16, why, sizeof(why)), -1);
        if (!strstr(why, bad[i].rule))
            fail_msg("case %u: \"%s\" should say \"%s\"", i, why, bad[i].rule);
    }
    struct balloon_chunk ok[2] = {{base, 0x2000}, {base + 0x2000, 0x1000}}; /* touching is fine */
    assert_int_equal(fake_balloon_check_chunks(&e->fb, ok, sizeof(ok), why, sizeof(why)), 3);
    assert_int_equal(fake_balloon_check_chunks(&e->fb, ok, 0, why, sizeof(why)), -1);
    assert_int_equal(fake_balloon_check_chunks(&e->fb, ok, 24, why, sizeof(why)), -1);
    static struct balloon_chunk many[BALLOON_MAX_CHUNKS + 1];
    for (unsigned i = 0; i <= BALLOON_MAX_CHUNKS; i++)
        many[i] = (struct balloon_chunk){base + i * 0x2000, 0x1000};
    assert_int_equal(
        fake_balloon_check_chunks(&e->fb, many, BALLOON_MAX_CHUNKS * 16, why, sizeof(why)),
        BALLOON_MAX_CHUNKS);
    assert_int_equal(fake_balloon_check_chunks(&e->fb, many, sizeof(many), why, sizeof(why)), -1);
    env_free(e);
}

/* blimp.balloon.inject: each bad chunk goes out once, and a checking device sees exactly the
 * rule it breaks. */
static void test_chunks_inject_bad_chunk(void **state)
{
    (void)state;
    const struct {
        enum balloon_inject what;
        const char *rule;
    } cases[] = {
        {BALLOON_INJECT_CHUNK_ALIGN, "not 4 KiB-aligned"},
        {BALLOON_INJECT_CHUNK_OVERLAP, "overlaps or precedes"},
        {BALLOON_INJECT_CHUNK_OUTSIDE, "not inside guest RAM"},
        {BALLOON_INJECT_CHUNK_WRITABLE, "device-writable"},
    };
    for (unsigned i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        struct env *e = env_new(false, CHUNKED, QSIZE);
        e->cfg.inject = cases[i].what;
        assert_int_equal(env_start(e), 0);
        fake_balloon_set_target(&e->fb, 300);
        for (unsigned k = 0; k < 5; k++)
            balloon_poll(&e->b, BALLOON_EV_CONFIG);
        assert_true(e->b.injected);
        if (e->fb.errors != 1 || !strstr(e->fb.error, cases[i].rule))
            fail_msg("inject %u: device saw %u errors, \"%s\"; expected one saying \"%s\"",
                     cases[i].what, e->fb.errors, e->fb.error, cases[i].rule);
        assert_true(fake_log_contains("\"event\":\"inject\""));
        env_free(e);
    }
    /* Without the extension there is nothing to inject into: PFN arrays go out intact. */
    struct env *e = env_new(false, MODERN, QSIZE);
    e->cfg.inject = BALLOON_INJECT_CHUNK_ALIGN;
    assert_int_equal(env_start(e), 0);
    settle_at(e, 300);
    assert_consistent(e);
    assert_false(e->b.injected);
    env_free(e);
}

/* Property: over random allocator states (memory fragmented by blocks the "kernel" holds) and
 * random targets, the driver never sends a chunk the device would reject, always merges
 * neighbours, respects its chunk cap, and gets every page back. */
static void test_chunks_random_allocator_states(void **state)
{
    (void)state;
    uint64_t seed = 0x5eed;
    for (unsigned round = 0; round < 12; round++) {
        struct env *e =
            env_new(round & 1, (round & 1) ? (CHUNKED & ~F(VIRTIO_F_VERSION_1)) : CHUNKED, QSIZE);
        seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        e->cfg.chunks_per_buffer = 1 + (unsigned)(seed >> 33) % (round < 6 ? 4 : 256);
        e->cfg.buffers = 1 + (unsigned)(seed >> 40) % 8;
        assert_int_equal(env_start(e), 0);
        /* Fragment: take many random-order blocks, give back a random half of them. */
        enum { HOLD = 2000 };
        uint64_t held[HOLD];
        unsigned nheld = 0;
        for (unsigned i = 0; i < HOLD; i++) {
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            uint64_t pfn = buddy_alloc(&e->mm, (unsigned)(seed >> 60) % 4);
            assert_int_not_equal(pfn, BUDDY_NONE);
            if ((seed >> 20) & 1)
                held[nheld++] = pfn << 8 | (seed >> 60) % 4;
            else
                buddy_free(&e->mm, pfn, (unsigned)(seed >> 60) % 4);
        }
        uint64_t free_fragmented = free_pages(e);
        e->free_after_init = free_fragmented;
        unsigned from = e->fb.nlog;
        for (unsigned step = 0; step < 8; step++) {
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
            settle_at(e, (uint32_t)((seed >> 33) % (free_fragmented - 1024)));
            assert_consistent(e);
        }
        settle_at(e, 0);
        assert_consistent(e);
        assert_int_equal(e->fb.errors, 0);
        assert_int_equal(check_chunk_log(e, from), e->fb.nlog - from);
        assert_int_equal(free_pages(e), free_fragmented);
        for (unsigned i = 0; i < nheld; i++)
            assert_int_equal(buddy_free(&e->mm, held[i] >> 8, held[i] & 0xff), 0);
        env_free(e);
    }
}

/* ---- Free page hinting (spec 5.5.6.5) ------------------------------------------------------- */

#define HINTING (MODERN | F(VIRTIO_BALLOON_F_FREE_PAGE_HINT))

static uint64_t exhaust(struct env *e, uint64_t **out);
static void give_back(struct env *e, uint64_t *pfns, uint64_t n);

static void poll_n(struct env *e, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
}

/* Every page the device counts as hinted is the driver's (not free in the allocator), and the
 * driver's count agrees. */
static void assert_hinted_owned(struct env *e)
{
    uint64_t n = 0;
    for (uint64_t pfn = RAM_PFN; pfn < RAM_PFN + RAM_PAGES; pfn++) {
        if (!fake_balloon_is_hinted(&e->fb, pfn))
            continue;
        if (buddy_is_free(&e->mm, pfn))
            fail_msg("hinted page 0x%llx is free in the allocator", (unsigned long long)pfn);
        n++;
    }
    assert_int_equal(n, e->b.hinted.pages);
    assert_int_equal(n, e->fb.hinted_pages);
}

static void test_hint_round_and_done(void **state)
{
    (void)state;
    struct env *e = env_up(false, HINTING);
    assert_true(e->b.has_hint_vq);
    assert_int_equal(e->b.hint_vq.index, 3);
    settle_at(e, 1000); /* ballooned pages are never hinted */
    uint64_t free0 = free_pages(e);

    uint32_t id = fake_balloon_hint_request(&e->fb);
    poll_n(e, 50);
    /* The round started with the host's id, took every free block but the reserve, and ended
     * with STOP because there was nothing more to give. */
    assert_int_equal(e->fb.hint_starts, 1);
    assert_int_equal(e->fb.hint_stops, 1);
    assert_int_equal(e->fb.hint_status, FB_HINT_STOP);
    assert_int_equal(e->b.hint_active, 0);
    assert_int_equal(e->b.hint_rounds, 1);
    assert_true(fake_log_contains("\"event\":\"balloon_hint_start\""));
    assert_true(fake_log_contains("\"reason\":\"exhausted\""));
    assert_true(free_pages(e) <= e->cfg.reserve_pages + 1);
    assert_true(e->b.hinted.pages + e->b.hinted.chunks >= free0 - e->cfg.reserve_pages - 1);
    assert_hinted_owned(e);
    (void)id;
    /* The free page queue never asks the device for a notification (QEMU would raise it from
     * an iothread), and EVENT_IDX, which cannot suppress the first one, is not negotiated. */
    assert_false(balloon_negotiated(&e->b, VIRTIO_F_EVENT_IDX));
    assert_int_equal(fake_transport_vq(&e->ft, 3)->irqs, 0);
    assert_true(e->fb.hint_buffers > 2);

    /* The balloon still follows the host, and ballooning wins over hints. */
    settle_at(e, 1500);
    assert_int_equal(e->b.actual, 1500);
    assert_int_equal(e->fb.errors, 0);

    /* DONE: every hinted block goes back. */
    fake_balloon_hint_done(&e->fb);
    poll_n(e, 3);
    assert_int_equal(e->b.hinted.pages, 0);
    assert_int_equal(e->b.hinted.chunks, 0);
    assert_true(fake_log_contains("\"event\":\"balloon_hint_done\""));
    settle_at(e, 0);
    assert_consistent(e);
    assert_int_equal(free_pages(e), e->free_after_init);
    assert_clean(e);
    env_free(e);
}

static void test_hint_stop_new_round_and_pressure(void **state)
{
    (void)state;
    struct env *e = env_new(false, HINTING, QSIZE);
    e->cfg.hint_order = 0; /* one page per hint: a round spans many polls */
    assert_int_equal(env_start(e), 0);

    fake_balloon_hint_request(&e->fb);
    poll_n(e, 2);
    assert_int_equal(e->fb.hint_starts, 1);
    uint64_t mid = e->b.hinted.pages;
    assert_true(mid > 0 && e->b.hint_active);

    /* The host stops the round: the driver sends STOP and keeps what it hinted. */
    fake_balloon_hint_stop(&e->fb);
    poll_n(e, 2);
    assert_int_equal(e->b.hint_active, 0);
    assert_int_equal(e->fb.hint_stops, 1);
    assert_true(fake_log_contains("\"reason\":\"host\""));
    uint64_t kept = e->b.hinted.pages;
    assert_true(kept >= mid);
    poll_n(e, 5);
    assert_int_equal(e->b.hinted.pages, kept); /* no hinting without a round */

    /* A new round; then the host moves on to another id before it ends. */
    uint32_t id2 = fake_balloon_hint_request(&e->fb);
    poll_n(e, 1);
    uint32_t id3 = fake_balloon_hint_request(&e->fb);
    poll_n(e, 1);
    assert_int_not_equal(id2, id3);
    assert_int_equal(e->b.hint_active, id3);
    assert_int_equal(e->b.hint_rounds, 3);
    assert_hinted_owned(e);

    /* Memory pressure: any allocation gets hinted blocks back before it fails. */
    uint64_t *pfns;
    uint64_t got = exhaust(e, &pfns);
    assert_true(got > e->cfg.reserve_pages);
    assert_int_equal(e->b.hinted.pages, 0);
    assert_true(e->b.hint_released_pages > 0);
    assert_true(fake_log_contains("\"reason\":\"pressure\""));
    give_back(e, pfns, got);
    assert_clean(e);
    env_free(e);
}

/* A device that offers FREE_PAGE_HINT must have the config field that drives it. */
static void test_hint_config_too_small(void **state)
{
    (void)state;
    struct env *e = env_new(false, HINTING, QSIZE);
    e->ft.t.config_size = 8; /* num_pages and actual only */
    assert_int_equal(env_start(e), -1);
    assert_int_equal(e->b.state, BALLOON_BROKEN);
    assert_non_null(strstr(e->b.violation, "free_page_hint_cmd_id"));
    assert_true(e->ft.status & VIRTIO_STATUS_FAILED);
    assert_false(e->ft.status & VIRTIO_STATUS_DRIVER_OK);
    env_free(e);
}

static void test_hint_declined(void **state)
{
    (void)state;
    struct env *e = env_new(false, HINTING, QSIZE);
    e->cfg.hinting = false;
    assert_int_equal(env_start(e), 0);
    assert_false(e->b.has_hint_vq);
    assert_false(e->ft.q[3].enabled);
    fake_balloon_hint_request(&e->fb);
    poll_n(e, 5);
    assert_int_equal(e->fb.hint_buffers, 0);
    settle_at(e, 300);
    assert_consistent(e);
    env_free(e);
}

/* ---- Page poison (spec 5.5.6.6) ---------------------------------------------------------------
 */

static void test_page_poison_negotiation(void **state)
{
    (void)state;
    const uint64_t offered = MODERN | F(VIRTIO_BALLOON_F_PAGE_POISON);
    /* Accepted only when the guest poisons; poison_val written once, before DRIVER_OK. */
    for (unsigned val = 0; val < 2; val++) {
        struct env *e = env_new(false, offered, QSIZE);
        e->cfg.page_poison = true;
        e->cfg.poison_val = val ? 0xaaaaaaaau : 0;
        assert_int_equal(env_start(e), 0);
        assert_true(balloon_negotiated(&e->b, VIRTIO_BALLOON_F_PAGE_POISON));
        assert_int_equal(e->fb.poison_val_writes, 1);
        assert_int_equal(e->fb.poison_val, e->cfg.poison_val);
        /* A non-zero value means the host keeps reported pages: the allocator checks them. */
        assert_int_equal(e->mm.reported_keep_content, val != 0);
        settle_at(e, 500);
        settle_at(e, 0);
        assert_int_equal(e->fb.poison_val_writes, 1);
        assert_clean(e);
        env_free(e);
    }
    struct env *e = env_up(false, offered); /* the guest does not poison: declined */
    assert_false(balloon_negotiated(&e->b, VIRTIO_BALLOON_F_PAGE_POISON));
    assert_int_equal(e->fb.poison_val_writes, 0);
    assert_false(e->mm.reported_keep_content);
    env_free(e);
}

/* ---- Deflate on OOM ------------------------------------------------------------------------- */

static void test_oom_deflate(void **state)
{
    (void)state;
    struct env *e = env_up(false, MODERN);
    assert_true(balloon_negotiated(&e->b, VIRTIO_BALLOON_F_DEFLATE_ON_OOM));
    settle_at(e, 1000);
    assert_consistent(e);
    uint64_t free0 = free_pages(e), chunks0 = e->b.held.chunks;
    uint64_t defl0 = e->fb.deflated_pages;
    unsigned long kicks0 = notifies(e, FB_DEFLATE);

    uint64_t got = balloon_release_for_oom(&e->b, 256, 1000 * MS);
    assert_true(got >= 256);
    assert_int_equal(got, 256);
    assert_int_equal(e->fb.deflated_pages - defl0, got); /* the host was told */
    assert_true(notifies(e, FB_DEFLATE) > kicks0);
    assert_int_equal(e->b.actual, 1000 - got);
    assert_int_equal(fake_balloon_actual(&e->fb), 1000 - got);
    assert_int_equal(free_pages(e), free0 + got + (chunks0 - e->b.held.chunks));
    assert_int_equal(e->b.oom_deflated_pages, got);
    assert_true(fake_log_contains("balloon_oom_deflate"));
    /* The host's wish stands. */
    assert_int_equal(e->b.target, 1000);
    assert_consistent(e);

    /* More than the balloon holds: everything comes back. */
    settle(e);
    assert_int_equal(e->b.actual, 1000);
    got = balloon_release_for_oom(&e->b, 5000, 1000 * MS);
    assert_int_equal(got, 1000);
    assert_int_equal(e->b.actual, 0);
    assert_int_equal(fake_balloon_actual(&e->fb), 0);
    assert_int_equal(e->fb.balloon_pages, 0);
    assert_int_equal(e->b.oom_deflated_pages, 1256);
    assert_int_equal(free_pages(e), e->free_after_init);
    assert_clean(e);
    env_free(e);
}

/* Take every page the allocator will give (order-0, as record pages and rings are taken);
 * returns how many, recording them in a malloc'd array for give_back. */
static uint64_t exhaust(struct env *e, uint64_t **out)
{
    uint64_t n = 0, cap = RAM_PAGES, pfn;
    uint64_t *pfns = malloc(cap * sizeof(*pfns));
    assert_non_null(pfns);
    while ((pfn = buddy_alloc(&e->mm, 0)) != BUDDY_NONE) {
        assert_true(n < cap);
        pfns[n++] = pfn;
    }
    *out = pfns;
    return n;
}

static void give_back(struct env *e, uint64_t *pfns, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        assert_int_equal(buddy_free(&e->mm, pfns[i], 0), 0);
    free(pfns);
}

/* Any allocation in the guest, not only the agent's, reaches deflate-on-OOM through the
 * allocator's reclaim hook, and the host hears of every page before the guest reuses it. */
static void test_oom_reclaim_from_any_allocation(void **state)
{
    (void)state;
    struct env *e = env_up(false, MODERN);
    settle_at(e, 1000);
    assert_consistent(e);
    uint64_t free0 = free_pages(e), chunks0 = e->b.held.chunks;

    uint64_t *pfns;
    uint64_t n = exhaust(e, &pfns);
    /* Everything free, plus all 1000 ballooned pages and their freed record pages. */
    assert_int_equal(n, free0 + 1000 + chunks0);
    assert_int_equal(e->b.actual, 0);
    assert_int_equal(e->fb.deflated_pages, 1000);
    assert_int_equal(fake_balloon_actual(&e->fb), 0);
    assert_int_equal(e->b.oom_deflated_pages, 1000);
    assert_int_equal(e->mm.reclaimed_pages, 1000); /* what the hook reports giving back */
    assert_true(fake_log_contains("balloon_oom_deflate"));
    /* The host's wish stands: memory back, the balloon follows the target again. */
    give_back(e, pfns, n);
    settle(e);
    assert_int_equal(e->b.actual, 1000);
    assert_clean(e);
    env_free(e);
}

static void test_oom_reclaim_needs_the_feature(void **state)
{
    (void)state;
    struct env *e = env_new(false, MODERN & ~F(VIRTIO_BALLOON_F_DEFLATE_ON_OOM), QSIZE);
    assert_int_equal(env_start(e), 0);
    settle_at(e, 1000);
    uint64_t free0 = free_pages(e);
    uint64_t *pfns;
    uint64_t n = exhaust(e, &pfns);
    assert_int_equal(n, free0); /* nothing came out of the balloon */
    assert_int_equal(e->b.actual, 1000);
    assert_int_equal(e->fb.deflated_pages, 0);
    assert_int_equal(e->mm.reclaimed_pages, 0);
    give_back(e, pfns, n);
    assert_clean(e);
    env_free(e);
}

static void oom_refused(uint64_t offered, bool cfg_oom)
{
    struct env *e = env_new(false, offered, QSIZE);
    e->cfg.deflate_on_oom = cfg_oom;
    assert_int_equal(env_start(e), 0);
    assert_false(balloon_negotiated(&e->b, VIRTIO_BALLOON_F_DEFLATE_ON_OOM));
    settle_at(e, 1000);
    uint64_t free0 = free_pages(e);
    unsigned long kicks0 = notifies(e, FB_DEFLATE);
    assert_int_equal(balloon_release_for_oom(&e->b, 256, 100 * MS), 0);
    assert_int_equal(e->b.actual, 1000);
    assert_int_equal(fake_balloon_actual(&e->fb), 1000);
    assert_int_equal(e->fb.deflated_pages, 0);
    assert_int_equal(notifies(e, FB_DEFLATE), kicks0);
    assert_int_equal(free_pages(e), free0);
    assert_int_equal(e->b.oom_deflated_pages, 0);
    assert_consistent(e);
    env_free(e);
}

static void test_oom_without_feature(void **state)
{
    (void)state;
    oom_refused(MODERN & ~F(VIRTIO_BALLOON_F_DEFLATE_ON_OOM), true); /* not offered */
    oom_refused(MODERN, false);                                      /* not wanted */
}

/* ---- Free page reporting -------------------------------------------------------------------- */

/* A device that offers reporting (and indirect descriptors, as QEMU does). */
#define REPORTING (MODERN | F(VIRTIO_BALLOON_F_PAGE_REPORTING) | F(VIRTIO_F_INDIRECT_DESC))

/* A reporting env whose passes start without delay (tests of the delay set their own). */
static struct env *env_reporting(uint64_t features)
{
    struct env *e = env_new(false, features, QSIZE);
    e->cfg.report_delay_ms = 0;
    assert_int_equal(env_start(e), 0);
    assert_true(e->b.has_reporting);
    return e;
}

/* Poll until no pass is active and none is due; returns the rounds used. */
static unsigned report_settle(struct env *e)
{
    for (unsigned round = 1; round <= 10000; round++) {
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
        if (e->b.state == BALLOON_BROKEN)
            fail_msg("balloon broke: %s", e->b.violation);
        if (!e->b.pass_active && !e->b.unsettled && !e->b.inflight_report)
            return round;
    }
    fail_msg("reporting did not settle: %lu pages in flight", (unsigned long)e->b.inflight_report);
    return 0;
}

struct free_map {
    uint8_t *state; /* per RAM page: 0 not free, 1 free unreported, 2 free reported */
};

static int free_map_cb(void *ctx, uint64_t pfn, unsigned order, bool reported)
{
    struct free_map *m = ctx;
    for (uint64_t p = pfn; p < pfn + (1ull << order); p++)
        m->state[p - RAM_PFN] = reported ? 2 : 1;
    return 0;
}

static uint8_t *free_state(const struct env *e)
{
    struct free_map m = {calloc(RAM_PAGES, 1)};
    assert_non_null(m.state);
    buddy_walk_free(&e->mm, 0, free_map_cb, &m);
    return m.state;
}

/*
 * Blocks the device completed from log index `from`: each at least 2^report_order pages, a
 * power of two aligned to its size, no page twice; with `now_reported`, each is now free and
 * marked reported in the allocator and reads back as zero (the device discarded it). Returns
 * the pages named.
 */
static uint64_t check_reports(const struct env *e, unsigned from, bool now_reported)
{
    uint8_t *st = free_state(e);
    uint8_t *seen = calloc(RAM_PAGES, 1);
    assert_non_null(seen);
    uint64_t pages = 0, min_len = PAGE_SIZE << e->b.cfg.report_order;
    for (unsigned i = from; i < e->fb.nreports; i++) {
        const struct fb_report_block *r = &e->fb.reports[i];
        if (r->len < min_len || (r->len & (r->len - 1)) || (r->addr & (r->len - 1)))
            fail_msg("reported block %u (addr 0x%llx len 0x%llx): not an aligned power of two "
                     ">= 0x%llx",
                     i, (unsigned long long)r->addr, (unsigned long long)r->len,
                     (unsigned long long)min_len);
        for (uint64_t p = r->addr >> PAGE_SHIFT; p < (r->addr + r->len) >> PAGE_SHIFT; p++) {
            assert_int_equal(seen[p - RAM_PFN]++, 0);
            if (now_reported) {
                assert_int_equal(st[p - RAM_PFN], 2);
                const uint64_t *w = phys_to_virt(p << PAGE_SHIFT);
                assert_int_equal(w[0] | w[PAGE_SIZE / 8 - 1], 0);
            }
        }
        pages += r->len >> PAGE_SHIFT;
    }
    free(seen);
    free(st);
    return pages;
}

static void test_report_negotiation_and_queue_index(void **state)
{
    (void)state;
    /* The reporting queue follows the offered queues: 2, +1 with STATS_VQ, +1 with
     * FREE_PAGE_HINT (whose queue comes before it). */
    for (unsigned stats = 0; stats <= 1; stats++) {
        for (unsigned hint = 0; hint <= 1; hint++) {
            uint64_t offered = F(VIRTIO_F_VERSION_1) | F(VIRTIO_BALLOON_F_PAGE_REPORTING) |
                               F(VIRTIO_F_INDIRECT_DESC) |
                               (stats ? F(VIRTIO_BALLOON_F_STATS_VQ) : 0) |
                               (hint ? F(VIRTIO_BALLOON_F_FREE_PAGE_HINT) : 0);
            struct env *e = env_reporting(offered);
            unsigned want = 2 + stats + hint;
            assert_int_equal(e->fb.qidx[FB_REPORT], want);
            assert_int_equal(e->b.report_vq.index, want);
            assert_true(e->ft.q[want].enabled);
            assert_int_equal(e->ft.q[want].size, 32);
            if (hint)
                assert_true(e->ft.q[2 + stats].enabled);
            assert_int_equal(fake_transport_negotiated(&e->ft, VIRTIO_BALLOON_F_FREE_PAGE_HINT),
                             hint);
            assert_true(fake_transport_negotiated(&e->ft, VIRTIO_BALLOON_F_PAGE_REPORTING));
            assert_true(fake_transport_negotiated(&e->ft, VIRTIO_F_INDIRECT_DESC));
            report_settle(e);
            /* The device saw the boot-time free memory on that queue (a notify on any other
             * queue index is an error of the model). */
            assert_true(e->fb.report_chains >= 1);
            assert_true(notifies(e, FB_REPORT) >= 1);
            assert_clean(e);
            env_free(e);
        }
    }
    /* Declined by configuration, or not offered: no queue, no reports, no reclaim hook. */
    for (unsigned offered = 0; offered <= 1; offered++) {
        struct env *e = env_new(false, offered ? REPORTING : MODERN, QSIZE);
        e->cfg.report_delay_ms = 0;
        e->cfg.reporting = !offered;
        e->cfg.deflate_on_oom = false;
        assert_int_equal(env_start(e), 0);
        assert_false(e->b.has_reporting);
        assert_false(fake_transport_negotiated(&e->ft, VIRTIO_BALLOON_F_PAGE_REPORTING));
        for (unsigned i = 0; i < 50; i++)
            balloon_poll(&e->b, BALLOON_EV_CONFIG);
        assert_int_equal(e->fb.report_chains, 0);
        assert_int_equal(e->b.reported_pages, 0);
        assert_null(e->mm.reclaim);
        if (offered)
            assert_false(e->ft.q[3].enabled);
        assert_clean(e);
        env_free(e);
    }
}

/* Every order-9 block of free memory allocated, then those whose buddy stays allocated freed:
 * scattered 2 MiB blocks that cannot merge. Returns the allocated ones kept (in kept[]). */
static unsigned fragment_2m(struct env *e, uint64_t *kept, unsigned max, uint64_t *freed,
                            unsigned *nfreed)
{
    unsigned nk = 0, nf = 0;
    uint64_t pfn;
    uint64_t all[64];
    unsigned n = 0;
    while (n < 64 && (pfn = buddy_alloc(&e->mm, 9)) != BUDDY_NONE)
        all[n++] = pfn;
    for (unsigned i = 0; i < n; i++) {
        if ((all[i] >> 9) & 1) {
            assert_true(nk < max);
            kept[nk++] = all[i];
        } else {
            assert_int_equal(buddy_free(&e->mm, all[i], 9), 0);
            freed[nf++] = all[i];
        }
    }
    *nfreed = nf;
    return nk;
}

static void test_report_blocks_and_chains(void **state)
{
    (void)state;
    /* Indirect (32 blocks per chain, chains overlap) and direct (a chain fills the queue). */
    for (int indirect = 1; indirect >= 0; indirect--) {
        struct env *e =
            env_reporting(indirect ? REPORTING : REPORTING & ~F(VIRTIO_F_INDIRECT_DESC));
        report_settle(e);
        uint64_t base = e->mm.free_pages;
        /* Boot-time free memory: every block of >= 2 MiB went out once, and the allocator has
         * them back, marked reported. */
        uint64_t first = check_reports(e, 0, true);
        assert_true(first >= RAM_PAGES / 2);
        assert_int_equal(first, e->fb.reported_pages);
        assert_int_equal(e->b.reported_pages, first);
        assert_int_equal(e->mm.reported_pages, first);
        assert_int_equal(buddy_unreported_pages(&e->mm, 9), 0);
        assert_true(fake_log_contains("balloon_reported"));

        /* 64 KiB blocks scattered over all RAM: hundreds of them, so many chains. */
        e->b.cfg.report_order = 4;
        uint64_t *pg = malloc(RAM_PAGES * sizeof(uint64_t));
        assert_non_null(pg);
        unsigned n = 0;
        uint64_t pfn;
        while ((pfn = buddy_alloc(&e->mm, 4)) != BUDDY_NONE)
            pg[n++] = pfn;
        unsigned nfree = 0;
        for (unsigned i = 0; i < n; i++)
            if (!((pg[i] >> 4) & 1)) {
                assert_int_equal(buddy_free(&e->mm, pg[i], 4), 0);
                nfree++;
            }
        assert_true(nfree > 300);
        unsigned from = e->fb.nreports, chains0 = e->fb.report_chains;
        unsigned indirect0 = e->fb.indirect_report_chains;
        report_settle(e);
        assert_clean(e);
        assert_int_equal(check_reports(e, from, true), (uint64_t)nfree * 16);
        assert_int_equal(e->fb.nreports - from, nfree);
        assert_true(e->fb.max_report_blocks <= BALLOON_REPORT_CAPACITY);
        assert_int_equal(e->fb.report_chains - chains0,
                         (nfree + BALLOON_REPORT_CAPACITY - 1) / BALLOON_REPORT_CAPACITY);
        /* Many blocks per chain: through an indirect table exactly when negotiated. */
        assert_int_equal(e->fb.indirect_report_chains - indirect0,
                         indirect ? e->fb.report_chains - chains0 : 0);
        assert_int_equal(e->b.report_chains, e->fb.report_chains);
        for (unsigned i = 0; i < n; i++)
            if ((pg[i] >> 4) & 1)
                assert_int_equal(buddy_free(&e->mm, pg[i], 4), 0);
        free(pg);
        assert_int_equal(e->mm.free_pages, base);
        assert_clean(e);
        env_free(e);
    }
}

static void test_report_holds_blocks_in_flight(void **state)
{
    (void)state;
    struct env *e = env_new(false, REPORTING, QSIZE);
    e->cfg.report_delay_ms = 0;
    e->fb.hold_reports = true;
    uint64_t before = e->mm.free_pages;
    assert_int_equal(env_start(e), 0);
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    /* Every >= 2 MiB block is with the device: out of the allocator, none of it free. */
    uint64_t held = e->b.inflight_report;
    assert_true(held >= RAM_PAGES / 2);
    assert_int_equal(e->fb.report_pages_held, held);
    assert_true(fake_balloon_held(&e->fb, FB_REPORT) >= 1);
    assert_int_equal(e->fb.report_chains, 0);
    assert_true(e->mm.free_pages < before - held + 1);
    /* All but what would cut into the reserve. */
    int next = buddy_next_unreported_order(&e->mm, 9);
    assert_true(next < 0 || e->mm.free_pages < e->cfg.reserve_pages + (1ull << next));
    assert_true(e->mm.free_pages >= e->cfg.reserve_pages);
    uint64_t free_in_flight = 0;
    for (uint64_t i = 0; i < RAM_PAGES; i++)
        if (e->fb.reporting[i] && buddy_is_free(&e->mm, RAM_PFN + i))
            free_in_flight++;
    assert_int_equal(free_in_flight, 0);
    struct balloon_status st;
    balloon_get_status(&e->b, &st);
    assert_int_equal(st.inflight_report, held);
    assert_int_equal(st.reported_pages, 0);
    /* Polling does not give them back before the device answers. */
    for (unsigned i = 0; i < 20; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->b.inflight_report, held);

    uint64_t free_held = e->mm.free_pages;
    assert_true(fake_balloon_answer(&e->fb, FB_REPORT, ~0u) >= 1);
    e->fb.hold_reports = false;
    report_settle(e);
    assert_int_equal(e->mm.free_pages, free_held + held);
    /* The block the reserve kept back went out once the others were back. */
    assert_int_equal(check_reports(e, 0, true), e->b.reported_pages);
    assert_true(e->b.reported_pages >= held);
    assert_int_equal(e->mm.reported_pages, e->b.reported_pages);
    balloon_get_status(&e->b, &st);
    assert_int_equal(st.inflight_report, 0);
    assert_int_equal(st.reported_pages, e->b.reported_pages);
    assert_int_equal(st.report_chains, e->fb.report_chains);
    assert_int_equal(st.report_passes, 1);
    assert_clean(e);
    env_free(e);
}

/* A reporting guest whose first pass is done, then fragmented by fragment_2m: 2 MiB blocks
 * the "kernel" keeps and freed ones between them (tests give the kept ones back at the end
 * with free_kept). */
struct frag {
    uint64_t kept[64], freed[64];
    unsigned nkept, nfreed;
};

static struct env *env_fragmented(struct frag *f)
{
    struct env *e = env_reporting(REPORTING);
    report_settle(e);
    f->nkept = fragment_2m(e, f->kept, 64, f->freed, &f->nfreed);
    return e;
}

static void free_kept(struct env *e, const uint64_t *kept, unsigned from, unsigned n)
{
    for (unsigned i = from; i < n; i++)
        assert_int_equal(buddy_free(&e->mm, kept[i], 9), 0);
}

static void test_report_once_until_reused_or_merged(void **state)
{
    (void)state;
    struct frag f;
    struct env *e = env_fragmented(&f);
    uint64_t *kept = f.kept, *freed = f.freed;
    unsigned nkept = f.nkept, nfreed = f.nfreed;
    (void)freed, (void)nfreed; /* not every test looks at the freed blocks */
    assert_true(nkept >= 8 && nfreed >= 8);
    unsigned from = e->fb.nreports;
    report_settle(e);
    assert_int_equal(e->fb.nreports - from, nfreed);
    assert_int_equal(check_reports(e, from, true), (uint64_t)nfreed * 512);

    /* Nothing changes: nothing is reported again, however long we poll. */
    unsigned chains = e->fb.report_chains;
    fake_clock_skip(5000 * MS);
    for (unsigned i = 0; i < 100; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(e->fb.report_chains, chains);

    /* Allocated and freed: the block is unreported again, and reported once more. */
    uint64_t r = buddy_alloc(&e->mm, 9);
    assert_int_not_equal(r, BUDDY_NONE);
    assert_int_equal(buddy_free(&e->mm, r, 9), 0);
    from = e->fb.nreports;
    report_settle(e);
    assert_int_equal(e->fb.nreports - from, 1);
    assert_int_equal(e->fb.reports[from].addr, r << PAGE_SHIFT);
    assert_int_equal(e->fb.reports[from].len, 2u << 20);

    /* A freed block next to a reported buddy stays apart from it (mm/buddy.h: a merged block
     * would hide the backing of its freed half): it goes out alone, as its 2 MiB. Once both
     * are reported they merge, and the 4 MiB block is not reported again. */
    unsigned k = 0;
    while (k < nkept && !buddy_is_free(&e->mm, kept[k] ^ 512))
        k++;
    assert_true(k < nkept);
    uint64_t u = kept[k];
    kept[k] = kept[0];
    assert_int_equal(buddy_free(&e->mm, u, 9), 0);
    from = e->fb.nreports;
    report_settle(e);
    assert_int_equal(e->fb.nreports - from, 1);
    assert_int_equal(e->fb.reports[from].addr, u << PAGE_SHIFT);
    assert_int_equal(e->fb.reports[from].len, 2u << 20);
    check_reports(e, from, true);
    chains = e->fb.report_chains;
    fake_clock_skip(5000 * MS);
    report_settle(e);
    assert_int_equal(e->fb.report_chains, chains);
    free_kept(e, kept, 1, nkept);
    assert_clean(e);
    env_free(e);
}

static void test_report_threshold(void **state)
{
    (void)state;
    struct frag f;
    struct env *e = env_fragmented(&f);
    uint64_t *kept = f.kept, *freed = f.freed;
    unsigned nkept = f.nkept, nfreed = f.nfreed;
    (void)freed, (void)nfreed; /* not every test looks at the freed blocks */
    report_settle(e);
    unsigned chains = e->fb.report_chains;
    /* At least 8 MiB unreported before a pass. */
    e->b.cfg.report_threshold_pages = 4 * 512;
    /* Allocate three reported blocks and free them again: 6 MiB unreported, below 8 MiB. */
    uint64_t r[4];
    for (unsigned i = 0; i < 4; i++)
        assert_int_not_equal(r[i] = buddy_alloc(&e->mm, 9), BUDDY_NONE);
    for (unsigned i = 0; i < 3; i++)
        assert_int_equal(buddy_free(&e->mm, r[i], 9), 0);
    assert_int_equal(buddy_unreported_pages(&e->mm, 9), 3 * 512);
    report_settle(e);
    fake_clock_skip(1000 * MS);
    report_settle(e);
    assert_int_equal(e->fb.report_chains, chains);
    assert_int_equal(buddy_unreported_pages(&e->mm, 9), 3 * 512);
    /* The fourth reaches the threshold: all four go out. */
    assert_int_equal(buddy_free(&e->mm, r[3], 9), 0);
    unsigned from = e->fb.nreports;
    report_settle(e);
    assert_int_equal(e->fb.nreports - from, 4);
    assert_int_equal(buddy_unreported_pages(&e->mm, 9), 0);
    free_kept(e, kept, 0, nkept);
    assert_clean(e);
    env_free(e);
}

static void test_report_budget_and_delay(void **state)
{
    (void)state;
    struct frag f;
    struct env *e = env_fragmented(&f);
    uint64_t *kept = f.kept, *freed = f.freed;
    unsigned nkept = f.nkept, nfreed = f.nfreed;
    (void)freed, (void)nfreed; /* not every test looks at the freed blocks */
    assert_true(nfreed >= 8);
    /* 2 blocks (1024 pages) per pass, passes 1 s after the last change. */
    e->b.cfg.report_budget_pages = 1024;
    e->b.cfg.report_delay_ms = 1000;
    unsigned passes = 0, chains = e->fb.report_chains;
    uint64_t reported = e->fb.reported_pages;
    while (buddy_unreported_pages(&e->mm, 9) && passes < 64) {
        /* Not before the delay: polls for a while (well under 1 s) send nothing. */
        for (unsigned i = 0; i < 50; i++)
            balloon_poll(&e->b, BALLOON_EV_CONFIG);
        assert_int_equal(e->fb.reported_pages, reported);
        assert_false(e->b.pass_active);
        fake_clock_skip(1000 * MS);
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
        passes++;
        uint64_t now = e->fb.reported_pages - reported;
        assert_true(now == 1024 || (now == 512 && !buddy_unreported_pages(&e->mm, 9)));
        reported = e->fb.reported_pages;
    }
    assert_int_equal(passes, (nfreed + 1) / 2);
    assert_int_equal(e->fb.report_chains - chains, passes);
    assert_int_equal(e->b.report_passes, 1 + passes);
    free_kept(e, kept, 0, nkept);
    assert_clean(e);
    env_free(e);
}

/* balloon_next_deadline_ns: what an interrupt-driven loop sleeps until. Nothing to do: never;
 * buffers in flight: their ack timeout (the stall is declared right after it); allocator
 * activity not yet seen: now; a reporting delay running: its end. */
static void test_next_deadline(void **state)
{
    (void)state;
    struct env *e = env_new(false, MODERN, QSIZE);
    e->cfg.ack_timeout_ns = 20 * MS;
    assert_int_equal(env_start(e), 0);
    assert_int_equal(balloon_next_deadline_ns(&e->b), UINT64_MAX);
    e->fb.hold[FB_INFLATE] = true;
    fake_balloon_set_target(&e->fb, 500);
    uint64_t t0 = platform_now_ns();
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    uint64_t t1 = platform_now_ns();
    uint64_t d = balloon_next_deadline_ns(&e->b);
    assert_true(d >= t0 + 20 * MS && d <= t1 + 20 * MS + 1);
    /* Polls before it change nothing; one after it declares the stall. */
    balloon_poll(&e->b, 0);
    assert_int_equal(e->b.state, BALLOON_RUNNING);
    fake_clock_skip(d - platform_now_ns());
    balloon_poll(&e->b, 0);
    assert_int_equal(e->b.state, BALLOON_STALLED);
    /* Stalled: only the device using a buffer (an interrupt) changes that. */
    assert_int_equal(balloon_next_deadline_ns(&e->b), UINT64_MAX);
    e->fb.hold[FB_INFLATE] = false;
    fake_balloon_answer(&e->fb, FB_INFLATE, ~0u);
    balloon_poll(&e->b, BALLOON_EV_QUEUE);
    assert_int_equal(e->b.state, BALLOON_RUNNING);
    assert_int_equal(e->b.actual, 500);
    assert_int_equal(balloon_next_deadline_ns(&e->b), UINT64_MAX);
    env_free(e);

    /* Reporting with a 1 s delay. */
    struct frag f;
    e = env_fragmented(&f);
    report_settle(e);
    e->b.cfg.report_delay_ms = 1000;
    assert_int_equal(balloon_next_deadline_ns(&e->b), UINT64_MAX);
    free_kept(e, f.kept, 0, 4);
    assert_true(balloon_next_deadline_ns(&e->b) <= platform_now_ns()); /* activity: look now */
    balloon_poll(&e->b, 0);
    uint64_t seen = platform_now_ns();
    d = balloon_next_deadline_ns(&e->b);
    assert_true(d > seen && d <= seen + 1000 * MS);
    uint64_t reported = e->fb.reported_pages;
    fake_clock_skip(d - platform_now_ns());
    balloon_poll(&e->b, 0);
    balloon_poll(&e->b, 0);
    assert_true(e->fb.reported_pages > reported); /* the pass came at the deadline */
    fake_clock_skip(1000 * MS);
    report_settle(e);
    assert_int_equal(balloon_next_deadline_ns(&e->b), UINT64_MAX);
    free_kept(e, f.kept, 4, f.nkept);
    e->b.cfg.report_delay_ms = 0;
    report_settle(e);
    assert_clean(e);
    env_free(e);
}

static void test_report_and_inflate(void **state)
{
    (void)state;
    struct env *e = env_new(false, REPORTING, QSIZE);
    e->cfg.report_delay_ms = 0;
    e->fb.hold_reports = true;
    assert_int_equal(env_start(e), 0);
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    uint64_t held = e->b.inflight_report;
    assert_true(held >= RAM_PAGES / 2);
    /* A target set while nearly all memory is out for reporting: inflate takes what is free,
     * waits for the rest (no "exhausted"), and starts no new pass meanwhile. */
    uint64_t target = 8192; /* 32 MiB */
    fake_balloon_set_target(&e->fb, (uint32_t)target);
    for (unsigned i = 0; i < 100; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_true(e->b.actual < target);
    assert_false(fake_log_contains("balloon_exhausted"));
    assert_int_equal(e->b.state, BALLOON_RUNNING);
    assert_int_equal(e->b.inflight_report, held);
    assert_true(e->mm.free_pages <= e->cfg.reserve_pages + 1);
    /* The device answers the reports: the balloon reaches its target. */
    e->fb.hold_reports = false;
    fake_balloon_answer(&e->fb, FB_REPORT, ~0u);
    settle(e);
    assert_int_equal(e->b.actual, target);
    report_settle(e);
    assert_clean(e);
    /* Ballooned pages were never reported (the model checks each block), and what is free
     * now is all reported again after the pass that followed. */
    assert_int_equal(buddy_unreported_pages(&e->mm, 9), 0);
    settle_at(e, 0);
    report_settle(e);
    assert_int_equal(e->fb.balloon_pages, 0);
    assert_clean(e);
    env_free(e);
}

static void test_report_stall(void **state)
{
    (void)state;
    struct env *e = env_new(false, REPORTING, QSIZE);
    e->cfg.report_delay_ms = 0;
    e->cfg.ack_timeout_ns = 200 * MS; /* well beyond init, even on a loaded machine */
    e->fb.hold_reports = true;
    uint64_t t0 = platform_now_ns(); /* the first chains go out during init */
    assert_int_equal(env_start(e), 0);
    unsigned polls = 0;
    while (e->b.state != BALLOON_STALLED && platform_now_ns() - t0 < 2000 * MS) {
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
        polls++;
    }
    assert_int_equal(e->b.state, BALLOON_STALLED);
    assert_true(platform_now_ns() - t0 >= 200 * MS);
    assert_true(polls >= 10); /* every poll returned while the device kept silent */
    assert_true(fake_log_contains("balloon_stalled"));
    assert_true(fake_log_contains("report"));
    uint64_t held = e->b.inflight_report;
    assert_true(held > 0);
    /* No more chains while stalled. */
    unsigned long kicks = notifies(e, FB_REPORT);
    for (unsigned i = 0; i < 20; i++)
        balloon_poll(&e->b, BALLOON_EV_CONFIG);
    assert_int_equal(notifies(e, FB_REPORT), kicks);
    /* The device answers after all. */
    e->fb.hold_reports = false;
    fake_balloon_answer(&e->fb, FB_REPORT, ~0u);
    report_settle(e);
    assert_int_equal(e->b.state, BALLOON_RUNNING);
    assert_true(fake_log_contains("balloon_recovered"));
    assert_int_equal(e->b.reported_pages, held);
    assert_clean(e);
    env_free(e);
}

static int find_unreported(void *ctx, uint64_t pfn, unsigned order, bool reported)
{
    (void)order;
    if (reported)
        return 0;
    *(uint64_t *)ctx = pfn;
    return 1;
}

/* With the allocator's poisoning on, reported pages the host discarded (zero) are not mistaken
 * for corruption, while a zeroed page that was never reported still is. */
static void test_report_with_poison(void **state)
{
    (void)state;
    const uint64_t pattern = 0xaaaaaaaaaaaaaaaaull;
    struct env *e = env_new(false, REPORTING, QSIZE);
    e->cfg.report_delay_ms = 0;
    buddy_set_poison(&e->mm, true, pattern);
    assert_int_equal(env_start(e), 0);
    report_settle(e);
    uint64_t kept[64], freed[64];
    unsigned nfreed;
    unsigned nkept = fragment_2m(e, kept, 64, freed, &nfreed);
    report_settle(e);
    assert_true(e->fb.reported_pages >= RAM_PAGES / 2);
    assert_int_equal(e->mm.poison_errors, 0);
    /* The discard happened: a reported page reads zero, not the pattern. */
    const uint64_t *w = phys_to_virt(freed[0] << PAGE_SHIFT);
    assert_int_equal(w[0], 0);
    /* Damage one word of an unreported free page (below 2 MiB, never reported). */
    uint64_t victim = BUDDY_NONE;
    buddy_walk_free(&e->mm, 0, find_unreported, &victim);
    assert_int_not_equal(victim, BUDDY_NONE);
    uint64_t *v = phys_to_virt(victim << PAGE_SHIFT);
    v[7] = 0;
    /* Allocate every free page: exactly the damaged one is reported as a mismatch. */
    unsigned long n = 0;
    while (buddy_alloc(&e->mm, 0) != BUDDY_NONE)
        n++;
    assert_true(n > RAM_PAGES / 4);
    assert_int_equal(e->mm.poison_errors, 1);
    assert_int_equal(e->mm.poison_bad_phys, (victim << PAGE_SHIFT) + 7 * 8);
    (void)nkept;
    env_free(e);
}

static void test_report_reclaim_waits_for_reports(void **state)
{
    (void)state;
    struct env *e = env_new(false, REPORTING & ~F(VIRTIO_BALLOON_F_DEFLATE_ON_OOM), QSIZE);
    e->cfg.report_delay_ms = 0;
    e->cfg.ack_timeout_ns = 30 * MS;
    e->fb.hold_reports = true;
    assert_int_equal(env_start(e), 0);
    /* The timeout counts from when the reports went out (taken before the poll: a loaded
     * machine may spend a while between the poll and the allocation). */
    uint64_t t0 = platform_now_ns();
    balloon_poll(&e->b, BALLOON_EV_CONFIG);
    uint64_t held = e->b.inflight_report;
    assert_true(held >= RAM_PAGES / 2);
    assert_true(e->mm.reclaim != NULL); /* reporting alone registers the hook */
    /* The device never answers: an allocation that needs reported memory fails after the
     * timeout, it does not hang. */
    assert_int_equal(buddy_alloc(&e->mm, 12), BUDDY_NONE);
    assert_true(platform_now_ns() - t0 >= 30 * MS);
    assert_int_equal(e->b.inflight_report, held);
    /* The device has answered but the driver has not polled yet: the allocation collects the
     * chains and succeeds, without deflating anything. */
    fake_balloon_answer(&e->fb, FB_REPORT, ~0u);
    uint64_t pfn = buddy_alloc(&e->mm, 12);
    assert_int_not_equal(pfn, BUDDY_NONE);
    assert_true(e->mm.reclaimed_pages >= 4096);
    assert_int_equal(e->b.oom_deflated_pages, 0);
    assert_int_equal(buddy_free(&e->mm, pfn, 12), 0);
    e->fb.hold_reports = false;
    report_settle(e);
    assert_clean(e);
    env_free(e);
}

int main(void)
{
    /* BLIMP_TEST_FILTER=pattern runs only the matching tests (cmocka's * and ? wildcards). */
    if (getenv("BLIMP_TEST_FILTER"))
        cmocka_set_test_filter(getenv("BLIMP_TEST_FILTER"));
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_init_spec_order),
        cmocka_unit_test(test_init_feature_subset),
        cmocka_unit_test(test_init_queue_indices_compacted),
        cmocka_unit_test(test_init_modern_without_version_1),
        cmocka_unit_test(test_init_features_refused),
        cmocka_unit_test(test_init_implied_queue_missing),
        cmocka_unit_test(test_init_starts_toward_preset_target),
        cmocka_unit_test(test_unseen_events),
        cmocka_unit_test(test_inflate_deflate_round_trip),
        cmocka_unit_test(test_round_trip_qemu72_small_buffers),
        cmocka_unit_test(test_odd_pfns_per_buffer_keeps_block_lists_aligned),
        cmocka_unit_test(test_inflate_buffers_sorted),
        cmocka_unit_test(test_partial_deflate_splits),
        cmocka_unit_test(test_target_exceeds_memory),
        cmocka_unit_test(test_reserve_kept_with_fragmented_memory),
        cmocka_unit_test(test_queue_smaller_than_buffers),
        cmocka_unit_test(test_target_lowered_mid_inflate),
        cmocka_unit_test(test_stall_and_recovery),
        cmocka_unit_test(test_next_deadline),
        cmocka_unit_test(test_must_tell_host_before_reuse),
        cmocka_unit_test(test_legacy_round_trip),
        cmocka_unit_test(test_violation_inflate_bad_id),
        cmocka_unit_test(test_violation_inflate_id_not_in_flight),
        cmocka_unit_test(test_violation_deflate_id_not_in_flight),
        cmocka_unit_test(test_violation_deflate_bad_id),
        cmocka_unit_test(test_violation_inflate_len),
        cmocka_unit_test(test_violation_deflate_len),
        cmocka_unit_test(test_violation_inflate_idx_jump),
        cmocka_unit_test(test_violation_stats_idx_jump),
        cmocka_unit_test(test_used_len_deviation),
        cmocka_unit_test(test_used_len_past_writable_is_fatal),
        cmocka_unit_test(test_needs_reset_recover_inflate_in_flight),
        cmocka_unit_test(test_needs_reset_recover_deflate_in_flight),
        cmocka_unit_test(test_needs_reset_recover_all_queues),
        cmocka_unit_test(test_needs_reset_during_reinflate),
        cmocka_unit_test(test_reset_then_target_without_config_events),
        cmocka_unit_test(test_needs_reset_stop),
        cmocka_unit_test(test_needs_reset_found_on_timeout),
        cmocka_unit_test(test_needs_reset_legacy_is_a_stall),
        cmocka_unit_test(test_inject_bad_next_recovers),
        cmocka_unit_test(test_guest_reset_device),
        cmocka_unit_test(test_queue_numbering),
        cmocka_unit_test(test_config_generation_unstable),
        cmocka_unit_test(test_stats),
        cmocka_unit_test(test_stats_declined),
        cmocka_unit_test(test_stats_probe_order_and_unknown_tag),
        cmocka_unit_test(test_device_writes_readable_inflate_buffer),
        cmocka_unit_test(test_device_writes_readable_deflate_buffer),
        cmocka_unit_test(test_readonly_buffers_checked),
        cmocka_unit_test(test_no_stats_queue),
        cmocka_unit_test(test_oom_deflate),
        cmocka_unit_test(test_oom_without_feature),
        cmocka_unit_test(test_oom_reclaim_from_any_allocation),
        cmocka_unit_test(test_chunks_inflate_and_deflate),
        cmocka_unit_test(test_chunks_declined_or_not_offered),
        cmocka_unit_test(test_chunks_bad_arrays_rejected),
        cmocka_unit_test(test_chunks_random_allocator_states),
        cmocka_unit_test(test_hint_round_and_done),
        cmocka_unit_test(test_hint_stop_new_round_and_pressure),
        cmocka_unit_test(test_hint_declined),
        cmocka_unit_test(test_hint_config_too_small),
        cmocka_unit_test(test_page_poison_negotiation),
        cmocka_unit_test(test_chunks_inject_bad_chunk),
        cmocka_unit_test(test_oom_reclaim_needs_the_feature),
        cmocka_unit_test(test_report_negotiation_and_queue_index),
        cmocka_unit_test(test_report_blocks_and_chains),
        cmocka_unit_test(test_report_holds_blocks_in_flight),
        cmocka_unit_test(test_report_once_until_reused_or_merged),
        cmocka_unit_test(test_report_threshold),
        cmocka_unit_test(test_report_budget_and_delay),
        cmocka_unit_test(test_report_and_inflate),
        cmocka_unit_test(test_report_stall),
        cmocka_unit_test(test_report_with_poison),
        cmocka_unit_test(test_report_reclaim_waits_for_reports),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
