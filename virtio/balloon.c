/*
 * virtio-balloon driver. Init follows the spec's order (3.1.1, 5.5.5): reset, ACKNOWLEDGE,
 * DRIVER, features, FEATURES_OK (re-read), queues, stats buffer, DRIVER_OK, then the first kick.
 * Queue indices are compacted by the *offered* features, as QEMU numbers them; we accept
 * STATS_VQ whenever it is offered so Linux-style numbering by negotiated features agrees.
 *
 * Inflate takes buddy blocks no larger than what is still needed (so it never over-takes), sends
 * their 4 KiB PFNs sorted and contiguous, and counts pages as ballooned only when the device has
 * used the buffer. Deflate always tells the host first and frees the pages only after the
 * device used the buffer (what MUST_TELL_HOST requires, and harmless without it). Pages in the
 * balloon are never read or written: the records live in separate pages (mm/blocklist.c).
 *
 * Free page reporting (PAGE_REPORTING): once free memory has been quiet for report_delay_ms, a
 * pass takes free unreported buddy blocks of at least report_order, sends them as chains of
 * device-writable descriptors, and gives them back marked reported when the device has used
 * the chain (the host may have discarded them: without PAGE_POISON they read back as zero).
 */
#include "virtio/balloon.h"
#include "include/platform.h"
#include "lib/json.h"

#define MAX_QUEUE_SIZE   256
#define STATS_ENTRY_SIZE 10
/* Memory that never stays quiet for report_delay_ms is reported anyway after this many delays. */
#define REPORT_MAX_DEFER 10

/* Stats tags (spec 5.5.6.3). */
enum {
    S_SWAP_IN = 0,
    S_SWAP_OUT = 1,
    S_MAJFLT = 2,
    S_MINFLT = 3,
    S_MEMFREE = 4,
    S_MEMTOT = 5,
    S_AVAIL = 6,
    S_CACHES = 7,
    S_HTLB_PGALLOC = 8,
    S_HTLB_PGFAIL = 9,
};

void balloon_default_config(struct balloon_config *cfg)
{
    *cfg = (struct balloon_config){
        .pfns_per_buffer = 256,
        .buffers = 16, /* bench/balloon_bench.py: 16 beats 1 and 4 at 256 PFNs */
        .ack_timeout_ns = 5000ull * 1000 * 1000,
        .reserve_pages = 512,
        .stats = true,
        .deflate_on_oom = true,
        .chunks = true,
        .chunks_per_buffer = BALLOON_MAX_CHUNKS,
        .hinting = true,
        /* QEMU takes a hint of any length with one call: the largest blocks mean the fewest
         * descriptors (the driver gives any of them back early when memory runs short). */
        .hint_order = BUDDY_MAX_ORDER,
        .reporting = true,
        .report_order = 9, /* 2 MiB: x86-64's huge page, Linux's pageblock_order */
        /* Long enough to batch a burst of frees and skip memory freed only to be reallocated
         * at once; short next to the 0.5 s in which 2 GiB should be back on the host. */
        .report_delay_ms = 20,
        .report_budget_pages = 0,      /* no limit: the delay paces passes */
        .report_threshold_pages = 512, /* one 2 MiB block is worth a notification */
    };
}

const char *const balloon_hold_names[BALLOON_HOLDS + 1] = {
    [HOLD_NEGOTIATE] = "negotiate",
    [HOLD_DRIVER_OK] = "driver_ok",
    [HOLD_ROUTED] = "routed",
    NULL,
};

void balloon_hold(const struct balloon_config *cfg, enum balloon_hold step)
{
    uint32_t ms = cfg->hold_ms[step];
    if (!ms)
        return;
    platform_log("balloon: holding step %s for %u ms (blimp.test.hold)", balloon_hold_names[step],
                 ms);
    struct json j;
    event_begin(&j, "hold");
    json_str(&j, "step", balloon_hold_names[step]);
    json_u64(&j, "ms", ms);
    event_emit(&j);
    uint64_t until = platform_now_ns() + (uint64_t)ms * 1000000;
    while (platform_now_ns() < until)
        barrier(); /* a busy wait: nothing to do but look at the clock */
}

bool balloon_negotiated(const struct balloon *b, unsigned bit)
{
    return (b->features >> bit) & 1;
}

const char *balloon_state_name(enum balloon_state s)
{
    switch (s) {
    case BALLOON_RUNNING:
        return "running";
    case BALLOON_STALLED:
        return "stalled";
    case BALLOON_BROKEN:
        return "broken";
    case BALLOON_NEEDS_RESET:
        return "needs_reset";
    }
    return "unknown";
}

static struct virtqueue *queue_of(struct balloon *b, enum balloon_q q, bool *present)
{
    struct virtqueue *vqs[BQ_COUNT] = {&b->inflate_vq, &b->deflate_vq, &b->stats_vq, &b->hint_vq,
                                       &b->report_vq};
    bool have[BQ_COUNT] = {true, true, b->has_stats, b->has_hint_vq, b->has_reporting};
    *present = have[q] && vqs[q]->size;
    return vqs[q];
}

static const char *const queue_names[BQ_COUNT] = {"inflateq", "deflateq", "statsq", "free_page_vq",
                                                  "reportingq"};

void balloon_get_status(const struct balloon *b, struct balloon_status *out)
{
    *out = (struct balloon_status){
        .state = b->state,
        .state_name = balloon_state_name(b->state),
        .violation = b->violation,
        .transport = b->t && b->t->name ? b->t->name : "",
        .offered = b->offered,
        .features = b->features,
        .device_target = b->device_target,
        .target = b->target,
        .actual = b->actual,
        .held_pages = b->held.pages + b->resend.pages,
        .inflight_inflate = b->inflight_inflate,
        .inflight_deflate = b->inflight_deflate,
        .inflate_buffers = b->inflate_buffers,
        .deflate_buffers = b->deflate_buffers,
        .stats_updates = b->stats_updates,
        .readonly_checked = b->readonly_checked,
        .oom_deflated_pages = b->oom_deflated_pages,
        .hinted_pages = b->hinted.pages,
        .hint_rounds = b->hint_rounds,
        .hinting = b->hint_active || b->hint_stop_owed,
        .hint_released_pages = b->hint_released_pages,
        .inflight_report = b->inflight_report,
        .reported_pages = b->reported_pages,
        .report_chains = b->report_chains,
        .report_passes = b->report_passes,
        .resets = b->resets,
        .reinflate_pending = b->resend.pages,
        .record_pages = b->held.chunks + b->resend.chunks + b->hinted.chunks,
        .numbering = b->numbering ? b->numbering : "",
        .numbering_used = b->numbering_used ? b->numbering_used : "",
    };
    for (unsigned q = 0; q < BQ_COUNT; q++) {
        bool present;
        const struct virtqueue *vq = queue_of((struct balloon *)b, q, &present);
        out->queues[q] = (struct balloon_queue_status){
            .name = queue_names[q],
            .present = present,
            .index = present ? vq->index : 0,
            .verdict = present ? vq_len_verdict(vq) : "",
            .deviations = present ? vq->len_deviations : 0,
        };
    }
}

static void collect_reports(struct balloon *b);
static void hint_end_round(struct balloon *b, const char *reason);
static uint64_t hint_release(struct balloon *b, uint64_t pages);
static bool device_needs_reset(struct balloon *b, uint8_t *status);
static void needs_reset(struct balloon *b, uint8_t status, const char *how);
static void reset_and_recover(struct balloon *b, const char *cause);

/* Wait (at most ack_timeout) until the device has used report chains holding `pages` pages, or
 * all of them; returns the pages given back to the allocator. */
static uint64_t wait_reports(struct balloon *b, uint64_t pages)
{
    uint64_t before = b->inflight_report;
    uint64_t deadline = platform_now_ns() + b->cfg.ack_timeout_ns;
    bool was = b->in_driver;
    b->in_driver = true;
    while (b->inflight_report && before - b->inflight_report < pages &&
           !vq_is_broken(&b->report_vq) && platform_now_ns() < deadline)
        collect_reports(b);
    b->in_driver = was;
    return before - b->inflight_report;
}

/* The allocator's reclaim hook (mm/buddy.h): memory out for reporting, then deflate on guest
 * OOM, for any allocation. */
static uint64_t reclaim_for_allocator(void *ctx, uint64_t pages)
{
    struct balloon *b = ctx;
    /* The driver's own allocations (record pages while inflating) draw on the reserve it keeps;
     * deflating from inside them would undo the very work in progress. */
    if (b->in_driver)
        return 0;
    /* Reported blocks come back as soon as the device answers (QEMU: milliseconds), so an
     * allocation racing a pass waits for them rather than failing or deflating. A stalled
     * device is not waited for again. */
    uint64_t got = 0;
    if (b->inflight_report && b->state == BALLOON_RUNNING)
        got = wait_reports(b, pages);
    /* Hinted blocks next: they only speed up a migration (spec: MAY release them early). */
    if (got < pages && b->hinted.pages) {
        hint_end_round(b, "pressure");
        got += hint_release(b, pages - got + b->cfg.reserve_pages);
    }
    if (got >= pages || !balloon_negotiated(b, VIRTIO_BALLOON_F_DEFLATE_ON_OOM))
        return got;
    /* Enough to restore the kernel's reserve too, and at least 1 MiB at a time, as Linux does. */
    uint64_t want = pages + b->cfg.reserve_pages;
    if (want < 256)
        want = 256;
    return got + balloon_release_for_oom(b, want, b->cfg.ack_timeout_ns);
}

static void violation(struct balloon *b, const char *what)
{
    if (b->state == BALLOON_BROKEN)
        return;
    b->state = BALLOON_BROKEN;
    unsigned n = 0;
    for (; what[n] && n + 1 < sizeof(b->violation); n++)
        b->violation[n] = what[n];
    b->violation[n] = '\0';
    platform_log("balloon: protocol violation: %s", b->violation);
    struct json j;
    event_begin(&j, "violation");
    json_str(&j, "device", "balloon");
    json_str(&j, "message", b->violation);
    event_emit(&j);
}

/*
 * Give the allocator a block the host does not back (deflated: QEMU's MADV_WILLNEED populates
 * nothing; hinted: not migrated), so that inflate and allocation prefer backed memory. With
 * poisoning the block is filled now, as page poison requires of deflated pages, and so backed.
 */
static void free_unbacked(struct balloon *b, uint64_t pfn, unsigned order)
{
    if (b->mm->poison)
        buddy_free(b->mm, pfn, order);
    else
        buddy_free_reported(b->mm, pfn, order);
}

/* Physically contiguous zeroed memory from the allocator for rings and buffers. */
static void *alloc_zeroed(struct buddy *mm, uint64_t bytes)
{
    unsigned order = 0;
    while ((PAGE_SIZE << order) < bytes)
        order++;
    uint64_t pfn = buddy_alloc(mm, order);
    if (pfn == BUDDY_NONE)
        return NULL;
    void *p = phys_to_virt(pfn << PAGE_SHIFT);
    __builtin_memset(p, 0, PAGE_SIZE << order);
    return p;
}

static uint32_t read_config32(struct balloon *b, unsigned off)
{
    /* A generation-stable read (spec 2.5.1); bounded so a device that keeps bumping the
     * generation cannot hold us. */
    uint32_t v = 0;
    for (int tries = 0; tries < 16; tries++) {
        uint32_t g = b->t->ops->config_generation(b->t);
        b->t->ops->config_read(b->t, off, 4, &v);
        if (b->t->ops->config_generation(b->t) == g)
            break;
    }
    return v;
}

static uint32_t read_num_pages(struct balloon *b)
{
    return read_config32(b, BALLOON_CFG_NUM_PAGES);
}

static void write_actual(struct balloon *b)
{
    if (b->actual_written == b->actual)
        return;
    b->t->ops->config_write(b->t, BALLOON_CFG_ACTUAL, 4, b->actual);
    b->actual_written = b->actual;
}

/* max_indirect: descriptors per indirect table (0: none; used only with INDIRECT_DESC). again
 * (after a device reset): the queue is set up anew over the memory it had, with the size it had,
 * keeping its used-length deviation count. */
static int setup_queue(struct balloon *b, struct virtqueue *vq, const char *name, unsigned index,
                       unsigned max_indirect, bool again)
{
    struct virtio_transport *t = b->t;
    uint16_t max = t->ops->queue_max_size(t, index);
    if (max == 0 || (max & (max - 1)) || max > 32768) {
        /* The device offered the feature that creates this queue, so it must exist. */
        platform_log("balloon: queue %u (%s) has size %u: absent or not a power of two", index,
                     name, max);
        violation(b, "a queue the offered features imply is absent or has an invalid size");
        return -1;
    }
    bool legacy = t->ops->queue_needs_legacy_layout(t);
    uint16_t size = legacy || max <= MAX_QUEUE_SIZE ? max : MAX_QUEUE_SIZE;
    bool indirect = balloon_negotiated(b, VIRTIO_F_INDIRECT_DESC);
    bool event_idx = balloon_negotiated(b, VIRTIO_F_EVENT_IDX);
    if (!indirect || max_indirect > size)
        max_indirect = indirect ? size : 0;
    void *mem;
    uint32_t deviations = 0, first_len = 0, first_id = 0, first_out = 0;
    if (again) {
        if (size != vq->size) {
            platform_log("balloon: queue %u (%s) has size %u after the reset, %u before", index,
                         name, max, vq->size);
            violation(b, "a queue changed its size across a reset");
            return -1;
        }
        mem = vq->desc; /* the area starts with the descriptor table */
        deviations = vq->len_deviations;
        first_len = vq->first_dev_len;
        first_id = vq->first_dev_id;
        first_out = vq->first_dev_out_len;
    } else {
        mem = alloc_zeroed(b->mm, vq_mem_bytes(size, legacy, max_indirect));
        if (!mem) {
            platform_log("balloon: no memory for queue %s", name);
            return -1;
        }
    }
    if (vq_init(vq, name, index, size, mem, legacy, max_indirect, indirect, event_idx) != 0)
        return -1;
    vq->len_deviations = deviations;
    vq->first_dev_len = first_len;
    vq->first_dev_id = first_id;
    vq->first_dev_out_len = first_out;
    vq_set_strict_len(vq, b->cfg.strict);
    struct vq_addrs a;
    vq_addrs(vq, &a);
    if (t->ops->queue_enable(t, index, size, &a) != 0) {
        platform_log("balloon: the transport refused queue %u (%s)", index, name);
        return -1;
    }
    return 0;
}

static void put_stat(uint8_t *out, unsigned i, uint16_t tag, uint64_t val)
{
    uint8_t *e = out + i * STATS_ENTRY_SIZE;
    e[0] = (uint8_t)tag;
    e[1] = (uint8_t)(tag >> 8);
    for (unsigned k = 0; k < 8; k++)
        e[2 + k] = (uint8_t)(val >> (8 * k));
}

unsigned balloon_fill_stats(const struct balloon *b, uint8_t *out)
{
    struct buddy_stats st;
    buddy_get_stats(b->mm, &st);
    /* Every tag we can state truthfully, the same set each time (spec 5.5.6.3.1): blimp has no
     * swap, page faults, page cache or huge pages, so those are truly zero. */
    const struct {
        uint16_t tag;
        uint64_t val;
    } s[BALLOON_NUM_STATS] = {
        {S_SWAP_IN, 0},
        {S_SWAP_OUT, 0},
        {S_MAJFLT, 0},
        {S_MINFLT, 0},
        {S_MEMFREE, st.free_pages * PAGE_SIZE},
        {S_MEMTOT, st.total_pages * PAGE_SIZE},
        {S_AVAIL, st.free_pages * PAGE_SIZE},
        {S_CACHES, 0},
        {S_HTLB_PGALLOC, 0},
        {S_HTLB_PGFAIL, 0},
    };
    unsigned n = 0;
    if (b->cfg.stats_probe)
        put_stat(out, n++, BALLOON_STATS_PROBE_TAG, 0x0123456789abcdefull);
    for (unsigned i = 0; i < BALLOON_NUM_STATS; i++) {
        unsigned k = b->cfg.stats_probe ? BALLOON_NUM_STATS - 1 - i : i;
        put_stat(out, n++, s[k].tag, s[k].val);
        for (unsigned x = 0; b->cfg.stats_probe && x < 2; x++) /* unknown tags among known */
            put_stat(out, n++, (uint16_t)(BALLOON_STATS_PROBE_TAG_BASE + 2 * i + x),
                     0xfedcba9876543210ull ^ (2 * i + x));
    }
    return n * STATS_ENTRY_SIZE;
}

static int post_stats(struct balloon *b)
{
    unsigned len = balloon_fill_stats(b, b->stats_buf);
    struct vq_seg seg = {virt_to_phys(b->stats_buf), len};
    return vq_add(&b->stats_vq, &seg, 1, 0, b->stats_buf);
}

static void kick(struct balloon *b, struct virtqueue *vq)
{
    if (vq_kick_prepare(vq))
        b->t->ops->notify(b->t, vq->index);
}

static unsigned floor_log2(uint64_t v)
{
    return 63 - (unsigned)__builtin_clzll(v);
}

/* The features the driver wants of what is offered (the same on every device session). */
static uint64_t wanted_features(const struct balloon *b)
{
    const struct balloon_config *cfg = &b->cfg;
    uint64_t wanted = 1ull << VIRTIO_BALLOON_F_MUST_TELL_HOST | 1ull << VIRTIO_F_VERSION_1 |
                      1ull << VIRTIO_F_EVENT_IDX;
    if (cfg->stats)
        wanted |= 1ull << VIRTIO_BALLOON_F_STATS_VQ;
    if (cfg->deflate_on_oom)
        wanted |= 1ull << VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
    if (cfg->chunks)
        wanted |= 1ull << VIRTIO_BALLOON_F_X_CHUNKS;
    if (cfg->hinting)
        wanted |= 1ull << VIRTIO_BALLOON_F_FREE_PAGE_HINT;
    if (cfg->page_poison)
        wanted |= 1ull << VIRTIO_BALLOON_F_PAGE_POISON;
    /* Reporting, with indirect descriptors for it when offered: a 32-block report then takes
     * one slot of the 32-entry queue instead of all of them, so chains overlap. */
    if (cfg->reporting)
        wanted |= 1ull << VIRTIO_BALLOON_F_PAGE_REPORTING;
    if (cfg->reporting && (b->offered >> VIRTIO_BALLOON_F_PAGE_REPORTING) & 1)
        wanted |= 1ull << VIRTIO_F_INDIRECT_DESC;
    /* Never accepted: QEMU's bit-30 sentinel. */
    uint64_t features = b->offered & wanted;
    /* With EVENT_IDX a device's first notification on a queue cannot be suppressed (QEMU:
     * signalled_used_valid), and QEMU 7.2 notifies the free page queue from its iothread without
     * the big lock, which aborts QEMU under TCG when the interrupt is INTx. Without EVENT_IDX,
     * VRING_AVAIL_F_NO_INTERRUPT keeps it quiet (Linux avoids it by giving that queue no MSI-X
     * vector). */
    if ((features >> VIRTIO_BALLOON_F_FREE_PAGE_HINT) & 1)
        features &= ~(1ull << VIRTIO_F_EVENT_IDX);
    return features;
}

/* Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (re-read). `again` (after DEVICE_NEEDS_RESET):
 * the device must offer what it offered before, so the driver's state carries over. Returns 0 or
 * -1 (logged; a violation sets b->violation). */
static int negotiate(struct balloon *b, bool again)
{
    struct virtio_transport *t = b->t;
    if (t->ops->reset(t) != 0) {
        violation(b, "device status did not read 0 after reset");
        return -1;
    }
    t->ops->set_status(t, VIRTIO_STATUS_ACKNOWLEDGE);
    t->ops->set_status(t, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    uint64_t offered = t->ops->get_features(t);
    if (again && offered != b->offered) {
        platform_log("balloon: after the reset the device offers 0x%lx, before 0x%lx",
                     (unsigned long)offered, (unsigned long)b->offered);
        violation(b, "the device offered other features after a reset");
        t->ops->set_status(t, t->ops->get_status(t) | VIRTIO_STATUS_FAILED);
        return -1;
    }
    b->offered = offered;
    if (!again)
        balloon_hold(&b->cfg, HOLD_NEGOTIATE);
    b->features = wanted_features(b);
    if (!t->legacy && !balloon_negotiated(b, VIRTIO_F_VERSION_1)) {
        violation(b, "modern interface without VIRTIO_F_VERSION_1");
        t->ops->set_status(t, t->ops->get_status(t) | VIRTIO_STATUS_FAILED);
        return -1;
    }
    t->ops->set_features(t, b->features);
    if (!t->legacy) {
        t->ops->set_status(t, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
                                  VIRTIO_STATUS_FEATURES_OK);
        if (!(t->ops->get_status(t) & VIRTIO_STATUS_FEATURES_OK)) {
            platform_log("balloon: device refused our features 0x%lx (offered 0x%lx)",
                         (unsigned long)b->features, (unsigned long)b->offered);
            t->ops->set_status(t, t->ops->get_status(t) | VIRTIO_STATUS_FAILED);
            return -1;
        }
    }
    return 0;
}

/*
 * Which numbering does the host use for the queues after deflateq? Compacted by the features
 * (QEMU numbers by the offered ones, Linux by the negotiated ones: the same for blimp, which
 * accepts STATS_VQ whenever offered and keeps a declined hinting queue's index), or fixed (stats
 * 2, hint 3, reporting 4: crosvm until 2025). The sizes of queues 0-4 tell them apart when the
 * two disagree (reporting offered without hinting, or stats not offered): each numbering names
 * the queues that must exist and the last one; more queues past it contradict it.
 */
static void probe_numbering(struct balloon *b)
{
    struct virtio_transport *t = b->t;
    bool stats = (b->offered >> VIRTIO_BALLOON_F_STATS_VQ) & 1;
    bool hint = (b->offered >> VIRTIO_BALLOON_F_FREE_PAGE_HINT) & 1;
    bool report = (b->offered >> VIRTIO_BALLOON_F_PAGE_REPORTING) & 1;
    unsigned need_c = 3u | (unsigned)stats << 2, need_f = need_c, next = 2 + stats;
    if (hint) {
        need_c |= 1u << next++;
        need_f |= 1u << 3;
    }
    if (report) {
        need_c |= 1u << next++;
        need_f |= 1u << 4;
    }
    unsigned present = 0;
    uint16_t sizes[5];
    for (unsigned i = 0; i < 5; i++) {
        sizes[i] = t->ops->queue_max_size(t, i);
        if (sizes[i])
            present |= 1u << i;
    }
    /* A numbering fits when its queues exist and none follows its last one. */
    unsigned beyond_c = 0x1fu & ~((2u << floor_log2(need_c)) - 1);
    unsigned beyond_f = 0x1fu & ~((2u << floor_log2(need_f)) - 1);
    bool fits_c = (present & need_c) == need_c && !(present & beyond_c);
    bool fits_f = (present & need_f) == need_f && !(present & beyond_f);
    bool seen_fixed = need_c != need_f && fits_f && !fits_c;
    if (need_c == need_f)
        b->numbering = "ambiguous"; /* both numberings name the same queues */
    else if (fits_c != fits_f)
        b->numbering = fits_c ? "negotiated" : "fixed";
    else
        b->numbering = "unknown";
    bool fixed = b->cfg.queues == BALLOON_QUEUES_FIXED ||
                 (b->cfg.queues == BALLOON_QUEUES_AUTO && seen_fixed);
    b->numbering_used = fixed ? "fixed" : "negotiated";
    b->hint_index = fixed ? 3 : 2 + stats;
    b->report_index = fixed ? 4 : 2 + stats + hint;
    platform_log("balloon: queue numbering: host %s, using %s (queue sizes %u %u %u %u %u)",
                 b->numbering, b->numbering_used, sizes[0], sizes[1], sizes[2], sizes[3], sizes[4]);
    struct json j;
    event_begin(&j, "balloon_queues");
    json_str(&j, "numbering", b->numbering);
    json_str(&j, "used", b->numbering_used);
    json_u64(&j, "present", present);
    if (stats)
        json_u64(&j, "stats_index", 2);
    if (hint)
        json_u64(&j, "hint_index", b->hint_index);
    if (report)
        json_u64(&j, "report_index", b->report_index);
    event_emit(&j);
}

static int setup_all_queues(struct balloon *b, bool again)
{
    return setup_queue(b, &b->inflate_vq, "inflateq", 0, 0, again) != 0 ||
                   setup_queue(b, &b->deflate_vq, "deflateq", 1, 0, again) != 0 ||
                   (b->has_stats && setup_queue(b, &b->stats_vq, "statsq", 2, 0, again) != 0) ||
                   (b->has_hint_vq &&
                    setup_queue(b, &b->hint_vq, "free_page_vq", b->hint_index, 0, again) != 0) ||
                   (b->has_reporting && setup_queue(b, &b->report_vq, "reportingq", b->report_index,
                                                    BALLOON_REPORT_CAPACITY, again) != 0)
               ? -1
               : 0;
}

/* Last steps of bringing the device up: stats buffer, poison_val, DRIVER_OK, the first kick. */
static void start_device(struct balloon *b)
{
    struct virtio_transport *t = b->t;
    if (b->has_hint_vq)
        /* No used-buffer notifications on the free page queue (we poll it, as Linux, whose
         * queue has no callback, does): QEMU 7.2 uses hints in an iothread, and a notification
         * raised from there without the big lock aborts QEMU under TCG. */
        vq_disable_interrupts(&b->hint_vq);
    if (b->has_stats)
        post_stats(b); /* primed with real values; kicked only after DRIVER_OK */
    if (balloon_negotiated(b, VIRTIO_BALLOON_F_PAGE_POISON)) {
        /* Before DRIVER_OK, and never changed afterwards (spec 5.5.6.6). With a non-zero value
         * the host keeps reported pages (QEMU skips discarding them), so the allocator checks
         * their poison when it hands them out again. */
        t->ops->config_write(t, BALLOON_CFG_POISON, 4, b->cfg.poison_val);
        buddy_set_reported_keep_content(b->mm, b->cfg.poison_val != 0);
    }
    uint8_t status = VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_DRIVER_OK;
    if (!t->legacy)
        status |= VIRTIO_STATUS_FEATURES_OK;
    t->ops->set_status(t, status);
    if (b->has_stats)
        kick(b, &b->stats_vq);
}

int balloon_init(struct balloon *b, struct virtio_transport *t, struct buddy *mm,
                 const struct balloon_config *cfg)
{
    __builtin_memset(b, 0, sizeof(*b));
    b->t = t;
    b->mm = mm;
    b->cfg = *cfg;
    if (b->cfg.buffers == 0 || b->cfg.buffers > BALLOON_MAX_BUFFERS ||
        b->cfg.pfns_per_buffer == 0 || b->cfg.chunks_per_buffer == 0 ||
        b->cfg.chunks_per_buffer > BALLOON_MAX_CHUNKS || b->cfg.report_order > BUDDY_MAX_ORDER)
        return -1;
    blocklist_init(&b->held, mm);
    blocklist_init(&b->resend, mm);
    blocklist_init(&b->hinted, mm);

    if (negotiate(b, false) != 0)
        return -1;
    platform_log("balloon: %s, features offered 0x%lx, accepted 0x%lx", t->name,
                 (unsigned long)b->offered, (unsigned long)b->features);
    struct json j;
    event_begin(&j, "balloon_features");
    json_str(&j, "transport", t->name);
    json_u64(&j, "offered", b->offered);
    json_u64(&j, "accepted", b->features);
    event_emit(&j);

    /* Indices: see probe_numbering. An offered FREE_PAGE_HINT keeps its queue's index even
     * though we decline it and never set that queue up. */
    b->has_stats = balloon_negotiated(b, VIRTIO_BALLOON_F_STATS_VQ);
    b->has_hint_vq = balloon_negotiated(b, VIRTIO_BALLOON_F_FREE_PAGE_HINT);
    if (b->has_hint_vq && t->config_size && t->config_size < BALLOON_CFG_HINT_CMD + 4) {
        violation(b, "FREE_PAGE_HINT offered but the config has no free_page_hint_cmd_id");
        t->ops->set_status(t, t->ops->get_status(t) | VIRTIO_STATUS_FAILED);
        return -1;
    }
    b->has_reporting = balloon_negotiated(b, VIRTIO_BALLOON_F_PAGE_REPORTING);
    probe_numbering(b);
    if (setup_all_queues(b, false) != 0) {
        t->ops->set_status(t, t->ops->get_status(t) | VIRTIO_STATUS_FAILED);
        return -1;
    }

    /* PFN (or chunk) arrays and block lists for the buffers, one contiguous area. */
    b->chunked = balloon_negotiated(b, VIRTIO_BALLOON_F_X_CHUNKS);
    b->max_blocks = b->chunked ? b->cfg.chunks_per_buffer : b->cfg.pfns_per_buffer;
    unsigned wire = b->chunked ? sizeof(struct balloon_chunk) : 4;
    /* The block list follows the wire array: keep it 8-byte aligned (an odd count of 4-byte
     * PFNs would not; found by tests/fuzz/fuzz_balloon). */
    uint64_t wire_bytes = ((uint64_t)b->max_blocks * wire + 7) & ~7ull;
    uint64_t per = wire_bytes + (uint64_t)b->max_blocks * 8;
    uint8_t *area = alloc_zeroed(mm, per * b->cfg.buffers);
    if (b->has_stats)
        b->stats_buf = alloc_zeroed(mm, PAGE_SIZE);
    if (b->has_hint_vq)
        b->hint_ids = alloc_zeroed(mm, PAGE_SIZE);
    if (!area || (b->has_stats && !b->stats_buf) || (b->has_hint_vq && !b->hint_ids)) {
        platform_log("balloon: no memory for buffers");
        t->ops->set_status(t, t->ops->get_status(t) | VIRTIO_STATUS_FAILED);
        return -1;
    }
    for (unsigned i = 0; i < b->cfg.buffers; i++) {
        b->bufs[i].pfns = (uint32_t *)(area + i * per);
        b->bufs[i].blocks = (uint64_t *)(area + i * per + wire_bytes);
    }
    start_device(b);
    b->state = BALLOON_RUNNING;
    if (b->has_reporting) {
        b->report_max_blocks = b->report_vq.size < BALLOON_REPORT_CAPACITY
                                   ? b->report_vq.size
                                   : BALLOON_REPORT_CAPACITY;
        /* Free memory at boot is unreported: the first pass follows after the delay. */
        b->mm_activity = mm->allocs + mm->frees;
        b->mm_changed_ns = b->unsettled_since_ns = platform_now_ns();
        b->unsettled = true;
    }
    /* Memory the driver can give back to an allocation that finds none: reports in flight,
     * hinted blocks, the balloon (DEFLATE_ON_OOM). */
    if (balloon_negotiated(b, VIRTIO_BALLOON_F_DEFLATE_ON_OOM) || b->has_reporting ||
        b->has_hint_vq)
        buddy_set_reclaim(mm, reclaim_for_allocator, b);
    balloon_poll(b, BALLOON_EV_CONFIG);
    return 0;
}

static struct balloon_buf *free_buf(struct balloon *b)
{
    for (unsigned i = 0; i < b->cfg.buffers; i++)
        if (!b->bufs[i].busy)
            return &b->bufs[i];
    return NULL;
}

/* Sort (pfn << 8 | order) blocks by address: heapsort, O(n log n) whatever the input order (a
 * deflate pops the newest blocks first, which is usually descending). */
static void sort_blocks(uint64_t *a, unsigned n)
{
    for (unsigned end = n, start = n / 2;;) {
        unsigned root;
        if (start > 0) {
            root = --start;
        } else {
            if (end <= 1)
                return;
            uint64_t t = a[--end];
            a[end] = a[0];
            a[0] = t;
            root = 0;
        }
        for (unsigned child; (child = 2 * root + 1) < end; root = child) {
            if (child + 1 < end && a[child] < a[child + 1])
                child++;
            if (a[root] >= a[child])
                break;
            uint64_t t = a[root];
            a[root] = a[child];
            a[child] = t;
        }
    }
}

static uint64_t block_pages(uint64_t block)
{
    return 1ull << (block & 0xff);
}

/* Write what the device reads for buf->blocks[0..nb) (sorted): the PFN array, or the chunk
 * array with neighbouring blocks merged. Returns its size in bytes. */
static uint64_t fill_wire(const struct balloon *b, struct balloon_buf *buf, unsigned nb)
{
    unsigned n = 0;
    for (unsigned i = 0; i < nb; i++) {
        uint64_t pfn = buf->blocks[i] >> 8, pages = block_pages(buf->blocks[i]);
        if (!b->chunked) {
            for (uint64_t k = 0; k < pages; k++)
                buf->pfns[n++] = (uint32_t)(pfn + k);
        } else if (n && buf->chunks[n - 1].addr + buf->chunks[n - 1].len == pfn << PAGE_SHIFT) {
            buf->chunks[n - 1].len += pages << PAGE_SHIFT;
        } else {
            buf->chunks[n++] = (struct balloon_chunk){pfn << PAGE_SHIFT, pages << PAGE_SHIFT};
        }
    }
    return (uint64_t)n * (b->chunked ? sizeof(struct balloon_chunk) : 4);
}

/* blimp.balloon.inject: break one rule of the chunk format in this buffer, once; returns whether
 * the buffer goes out device-writable. The pages stay accounted as sent: a host that rejects
 * the buffer never uses it, and the driver reports a stall. */
static bool inject_bad_chunk(struct balloon *b, struct balloon_buf *buf, struct vq_seg *seg)
{
    static const char *const names[] = {"none",          "chunk_align",    "chunk_overlap",
                                        "chunk_outside", "chunk_writable", "bad_next"};
    struct balloon_chunk *c = buf->chunks;
    bool writable = false;
    switch (b->cfg.inject) {
    case BALLOON_INJECT_NONE:
    case BALLOON_INJECT_BAD_NEXT:
        return false;
    case BALLOON_INJECT_CHUNK_ALIGN:
        c[0].addr += 8;
        break;
    case BALLOON_INJECT_CHUNK_OVERLAP:
        if (seg->len / sizeof(*c) < b->max_blocks)
            seg->len += sizeof(*c);
        c[seg->len / sizeof(*c) - 1] = c[0];
        break;
    case BALLOON_INJECT_CHUNK_OUTSIDE:
        c[0].addr = 1ull << 46;
        break;
    case BALLOON_INJECT_CHUNK_WRITABLE:
        writable = true;
        break;
    }
    b->injected = true;
    platform_log("balloon: injected a bad chunk (%s): addr 0x%lx len 0x%lx", names[b->cfg.inject],
                 (unsigned long)c[0].addr, (unsigned long)c[0].len);
    struct json j;
    event_begin(&j, "inject");
    json_str(&j, "what", names[b->cfg.inject]);
    json_u64(&j, "addr", c[0].addr);
    json_u64(&j, "len", c[0].len);
    json_u64(&j, "chunks", seg->len / sizeof(*c));
    event_emit(&j);
    return writable;
}

/* blimp.balloon.inject=bad_next: the next inflate buffer goes out as a malformed chain (see
 * vq_inject_bad_next). Its pages stay held and in flight: the device never uses the buffer, and
 * the reset that follows takes it back with every other buffer in flight. */
static void inject_bad_next(struct balloon *b)
{
    vq_inject_bad_next(&b->inflate_vq);
    b->injected = true;
    platform_log("balloon: injected a malformed chain on %s[%u]: next = %u, the queue size",
                 b->inflate_vq.name, b->inflate_vq.index, b->inflate_vq.size);
    struct json j;
    event_begin(&j, "inject");
    json_str(&j, "what", "bad_next");
    json_u64(&j, "queue", b->inflate_vq.index);
    json_u64(&j, "next", b->inflate_vq.size);
    event_emit(&j);
}

/* Publish buf (`pages` pages in nb blocks, sorted) on the inflate or deflate queue; 0 or the
 * vq_add error, in which case nothing changed. */
/* FNV-1a over a buffer the device may only read. */
static uint64_t wire_sum(const void *p, uint32_t len)
{
    const uint8_t *c = p;
    uint64_t h = 0xcbf29ce484222325ull;
    for (uint32_t i = 0; i < len; i++)
        h = (h ^ c[i]) * 0x100000001b3ull;
    return h;
}

/* A used inflate/deflate buffer must hold what the driver wrote: the device MUST NOT write to a
 * device-readable buffer (spec 2.7.5.1). */
static void check_readonly(struct balloon *b, const struct balloon_buf *buf)
{
    if (buf->wire_sum == 0)
        return; /* an injected device-writable buffer */
    if (wire_sum(buf->pfns, buf->wire_len) != buf->wire_sum) {
        violation(b, buf->inflate ? "the device wrote into a device-readable inflate buffer"
                                  : "the device wrote into a device-readable deflate buffer");
        return;
    }
    b->readonly_checked++;
}

static int send_buf(struct balloon *b, struct balloon_buf *buf, unsigned pages, unsigned nb,
                    bool inflate)
{
    struct vq_seg seg = {virt_to_phys(buf->pfns), (uint32_t)fill_wire(b, buf, nb)};
    bool writable = false;
    if (inflate && !b->injected && b->cfg.inject == BALLOON_INJECT_BAD_NEXT)
        inject_bad_next(b);
    else if (inflate && b->chunked && !b->injected)
        writable = inject_bad_chunk(b, buf, &seg);
    int rc = vq_add(inflate ? &b->inflate_vq : &b->deflate_vq, &seg, writable ? 0 : 1,
                    writable ? 1 : 0, buf);
    if (rc != 0)
        return rc;
    buf->busy = true;
    buf->inflate = inflate;
    buf->pages = pages;
    buf->n_blocks = nb;
    buf->sent_ns = platform_now_ns();
    buf->wire_len = seg.len;
    buf->wire_sum = writable ? 0 : wire_sum(buf->pfns, seg.len);
    if (inflate) {
        b->inflight_inflate += pages;
        b->inflate_buffers++;
    } else {
        b->inflight_deflate += pages;
        b->deflate_buffers++;
    }
    return 0;
}

static void inflate_step(struct balloon *b)
{
    bool added = false;
    struct balloon_buf *buf;
    while (b->actual + b->inflight_inflate < b->target && (buf = free_buf(b))) {
        uint64_t want = b->target - b->actual - b->inflight_inflate;
        if (!b->chunked && want > b->cfg.pfns_per_buffer)
            want = b->cfg.pfns_per_buffer;
        unsigned n = 0, pushed = 0;
        while (n < want && pushed < b->max_blocks) {
            uint64_t free = b->mm->free_pages, room = want - n;
            /* Keep one page beyond the reserve for the record page the push may need. */
            if (free <= b->cfg.reserve_pages + 1)
                break;
            if (room > free - b->cfg.reserve_pages - 1)
                room = free - b->cfg.reserve_pages - 1;
            unsigned max_order = floor_log2(room);
            if (max_order > BUDDY_MAX_ORDER)
                max_order = BUDDY_MAX_ORDER;
            unsigned order;
            uint64_t pfn = buddy_alloc_largest(b->mm, max_order, &order);
            if (pfn == BUDDY_NONE)
                break;
            /* PFNs are 32-bit on the wire (chunks carry 64-bit addresses). */
            bool unsendable = !b->chunked && pfn + (1ull << order) > 0x100000000ull;
            if (unsendable || blocklist_push(&b->held, pfn, order)) {
                buddy_free(b->mm, pfn, order);
                break;
            }
            buf->blocks[pushed++] = pfn << 8 | order; /* scratch until the buffer is sent */
            n += 1u << order;
        }
        /* The allocator hands out blocks at any address: send them in ascending order (chunk
         * arrays must be; PFN arrays are kinder to the host so). */
        sort_blocks(buf->blocks, pushed);
        if (n == 0 && b->hinted.pages) {
            /* Hinted blocks are only lent to a migration: ballooning comes first. */
            hint_end_round(b, "inflate");
            if (hint_release(b, want) > 0)
                continue;
        }
        if (n == 0) {
            /* Blocks out for reporting come back when the device answers: wait for them. */
            if (b->inflight_report)
                break;
            if (!b->exhausted_logged) {
                platform_log("balloon: cannot inflate further: guest memory exhausted "
                             "(actual %u of target %u pages)",
                             b->actual, b->target);
                struct json j;
                event_begin(&j, "balloon_exhausted");
                json_u64(&j, "actual_pages", b->actual);
                json_u64(&j, "inflight_pages", b->inflight_inflate);
                json_u64(&j, "target_pages", b->target);
                event_emit(&j);
                b->exhausted_logged = true;
            }
            break;
        }
        if (send_buf(b, buf, n, pushed, true) != 0) {
            /* Undo: the blocks just recorded are on top of the list. */
            for (unsigned i = 0; i < pushed; i++) {
                uint64_t pfn;
                unsigned order;
                blocklist_pop(&b->held, &pfn, &order);
                buddy_free(b->mm, pfn, order);
            }
            break;
        }
        added = true;
    }
    if (added)
        kick(b, &b->inflate_vq);
}

static void deflate_step(struct balloon *b)
{
    bool added = false;
    struct balloon_buf *buf;
    while (b->actual > b->target + b->inflight_deflate && (buf = free_buf(b))) {
        uint64_t want = b->actual - b->inflight_deflate - b->target;
        if (!b->chunked && want > b->cfg.pfns_per_buffer)
            want = b->cfg.pfns_per_buffer;
        unsigned n = 0, nb = 0;
        uint64_t pfn;
        unsigned order;
        while (n < want && nb < b->max_blocks && blocklist_pop(&b->held, &pfn, &order)) {
            /* Too big: keep the lower half in the balloon, continue with the upper half. */
            while ((1ull << order) > want - n) {
                buddy_split(b->mm, pfn, order);
                order--;
                /* Cannot fail: the pop just made room (or freed the record page it needs). */
                blocklist_push(&b->held, pfn, order);
                pfn += 1ull << order;
            }
            buf->blocks[nb++] = pfn << 8 | order;
            n += 1u << order;
        }
        if (n == 0)
            break;
        sort_blocks(buf->blocks, nb);
        if (send_buf(b, buf, n, nb, false) != 0) {
            for (unsigned i = nb; i-- > 0;)
                blocklist_push(&b->held, buf->blocks[i] >> 8, buf->blocks[i] & 0xff);
            break;
        }
        added = true;
    }
    if (added)
        kick(b, &b->deflate_vq);
}

/* ---- Per-buffer latency ---------------------------------------------------------------------- */

const char *balloon_latency_kind_name(enum balloon_lat_kind k)
{
    static const char *const names[BLAT_KINDS] = {"inflate", "deflate", "report"};
    return k < BLAT_KINDS ? names[k] : "unknown";
}

unsigned balloon_latency_bucket(uint64_t ns)
{
    uint64_t us = ns / 1000;
    if (us < 2)
        return 0;
    unsigned i = floor_log2(us);
    return i < BALLOON_LAT_BUCKETS ? i : BALLOON_LAT_BUCKETS - 1;
}

uint64_t balloon_latency_bucket_lo_us(unsigned i)
{
    return i == 0 ? 0 : 1ull << i;
}

void balloon_latency_record(struct balloon_latency *l, uint64_t ns)
{
    if (l->count == 0 || ns < l->min_ns)
        l->min_ns = ns;
    if (ns > l->max_ns)
        l->max_ns = ns;
    l->count++;
    l->sum_ns += ns;
    l->buckets[balloon_latency_bucket(ns)]++;
}

uint64_t balloon_latency_percentile_us(const struct balloon_latency *l, unsigned pct)
{
    if (l->count == 0)
        return 0;
    if (pct > 100)
        pct = 100;
    /* ceil(count * pct / 100), without overflowing */
    uint64_t rank = l->count / 100 * pct + ((l->count % 100) * pct + 99) / 100;
    uint64_t seen = 0, max_us = l->max_ns / 1000;
    if (rank == 0)
        rank = 1;
    for (unsigned i = 0; i < BALLOON_LAT_BUCKETS; i++) {
        seen += l->buckets[i];
        if (seen < rank)
            continue;
        /* The bucket's upper bound (the last one has none: the maximum). */
        uint64_t hi = i + 1 < BALLOON_LAT_BUCKETS ? 2ull << i : max_us;
        return hi < max_us ? hi : max_us;
    }
    return max_us;
}

void balloon_get_latency(const struct balloon *b, struct balloon_latency out[BLAT_KINDS])
{
    for (unsigned k = 0; k < BLAT_KINDS; k++)
        out[k] = b->latency[k];
}

void balloon_latency_json(struct json *j, const struct balloon_latency lat[BLAT_KINDS],
                          bool buckets)
{
    for (unsigned k = 0; k < BLAT_KINDS; k++) {
        const struct balloon_latency *l = &lat[k];
        json_open_object(j, balloon_latency_kind_name(k));
        json_u64(j, "count", l->count);
        json_u64(j, "min_us", l->min_ns / 1000);
        json_u64(j, "mean_us", l->count ? l->sum_ns / l->count / 1000 : 0);
        json_u64(j, "p50_us", balloon_latency_percentile_us(l, 50));
        json_u64(j, "p90_us", balloon_latency_percentile_us(l, 90));
        json_u64(j, "p99_us", balloon_latency_percentile_us(l, 99));
        json_u64(j, "max_us", l->max_ns / 1000);
        if (buckets) {
            json_open_array(j, "buckets");
            for (unsigned i = 0; i < BALLOON_LAT_BUCKETS; i++) {
                if (!l->buckets[i])
                    continue;
                json_open_array(j, NULL);
                json_u64(j, NULL, balloon_latency_bucket_lo_us(i));
                json_u64(j, NULL, l->buckets[i]);
                json_close(j);
            }
            json_close(j);
        }
        json_close(j);
    }
}

void balloon_latency_event(struct json *j, const struct balloon_latency lat[BLAT_KINDS])
{
    event_begin(j, "balloon_latency");
    balloon_latency_json(j, lat, true);
    /* Room for the closing brackets too: json_finish would turn the line into "truncated". */
    if (!j->overflow && j->len + j->depth < JSON_LINE_MAX)
        return;
    event_begin(j, "balloon_latency");
    balloon_latency_json(j, lat, false);
    json_bool(j, "buckets_omitted", true);
}

void balloon_emit_latency(const struct balloon *b)
{
    struct json j;
    balloon_latency_event(&j, b->latency);
    event_emit(&j);
}

/* A buffer of kind k sent at sent_ns was just taken from the used ring. */
static void record_latency(struct balloon *b, enum balloon_lat_kind k, uint64_t sent_ns)
{
    uint64_t now = platform_now_ns();
    balloon_latency_record(&b->latency[k], now > sent_ns ? now - sent_ns : 0);
}

/* Collect used buffers; returns whether `actual` changed. */
static bool collect(struct balloon *b)
{
    bool changed = false;
    uint32_t len;
    struct balloon_buf *buf;
    while ((buf = vq_get_used(&b->inflate_vq, &len))) {
        check_readonly(b, buf);
        record_latency(b, BLAT_INFLATE, buf->sent_ns);
        b->inflight_inflate -= buf->pages;
        b->actual += buf->pages;
        buf->busy = false;
        changed = true;
    }
    while ((buf = vq_get_used(&b->deflate_vq, &len))) {
        check_readonly(b, buf);
        record_latency(b, BLAT_DEFLATE, buf->sent_ns);
        /* Only now, after the host has seen the PFNs, do the pages return to the guest. */
        for (unsigned i = 0; i < buf->n_blocks; i++)
            free_unbacked(b, buf->blocks[i] >> 8, buf->blocks[i] & 0xff);
        b->inflight_deflate -= buf->pages;
        b->actual -= buf->pages;
        buf->busy = false;
        changed = true;
    }
    if (b->has_stats && vq_get_used(&b->stats_vq, &len)) {
        /* The host asks for fresh numbers by returning the buffer (spec 5.5.6.3). */
        b->stats_updates++;
        if (post_stats(b) == 0)
            kick(b, &b->stats_vq);
    }
    return changed;
}

static void check_queues(struct balloon *b)
{
    struct virtqueue *q[4] = {&b->inflate_vq, &b->deflate_vq, &b->stats_vq, &b->report_vq};
    bool used[4] = {true, true, b->has_stats, b->has_reporting};
    for (unsigned i = 0; i < 4; i++)
        if (used[i] && vq_is_broken(q[i]))
            violation(b, vq_violation(q[i]));
    if (b->has_hint_vq && vq_is_broken(&b->hint_vq))
        violation(b, vq_violation(&b->hint_vq));
}

/* ---- Free page hinting (spec 5.5.6.5) ------------------------------------------------------ */

/* Put a command id (start or STOP) on the free page queue; false when no slot or descriptor is
 * free (the caller tries again at the next poll). */
static bool hint_send_id(struct balloon *b, uint32_t id)
{
    for (unsigned i = 0; i < BALLOON_HINT_ID_SLOTS; i++) {
        if (b->hint_id_busy[i])
            continue;
        b->hint_ids[i] = id; /* le32: x86 is little-endian */
        struct vq_seg seg = {virt_to_phys(&b->hint_ids[i]), 4};
        if (vq_add(&b->hint_vq, &seg, 1, 0, &b->hint_ids[i]) != 0)
            return false;
        b->hint_id_busy[i] = true;
        kick(b, &b->hint_vq);
        return true;
    }
    return false;
}

static void hint_end_round(struct balloon *b, const char *reason)
{
    if (!b->hint_active)
        return;
    platform_log("balloon: hinting round 0x%x ended (%s): %lu pages hinted", b->hint_active, reason,
                 (unsigned long)b->hint_round_pages);
    struct json j;
    event_begin(&j, "balloon_hint_stop");
    json_u64(&j, "cmd_id", b->hint_active);
    json_u64(&j, "pages", b->hint_round_pages);
    json_str(&j, "reason", reason);
    event_emit(&j);
    b->hint_active = 0;
    b->hint_stop_owed = true; /* every round the driver started ends with its STOP id */
    if (hint_send_id(b, BALLOON_HINT_CMD_STOP))
        b->hint_stop_owed = false;
}

/* Give hinted blocks back to the allocator (their contents are uninitialised now): all of them
 * on DONE, or at least `pages` when memory runs short. Returns the pages released. */
static uint64_t hint_release(struct balloon *b, uint64_t pages)
{
    uint64_t released = 0, pfn;
    unsigned order;
    while (released < pages && blocklist_pop(&b->hinted, &pfn, &order)) {
        free_unbacked(b, pfn, order);
        released += 1ull << order;
    }
    b->hint_released_pages += released;
    return released;
}

static void hint_start_round(struct balloon *b, uint32_t id)
{
    if (!hint_send_id(b, id))
        return; /* the queue is full of ids: hint_cmd_seen stays stale, so we retry */
    b->hint_cmd_seen = id;
    b->hint_active = id;
    b->hint_rounds++;
    b->hint_round_pages = 0;
    platform_log("balloon: hinting round 0x%x started", id);
    struct json j;
    event_begin(&j, "balloon_hint_start");
    json_u64(&j, "cmd_id", id);
    event_emit(&j);
}

/* Follow free_page_hint_cmd_id: a new id starts a round, STOP ends it, DONE also releases every
 * hinted block. */
static void hint_check_cmd(struct balloon *b)
{
    uint32_t id = read_config32(b, BALLOON_CFG_HINT_CMD);
    if (id == b->hint_cmd_seen)
        return;
    if (id == BALLOON_HINT_CMD_STOP || id == BALLOON_HINT_CMD_DONE) {
        b->hint_cmd_seen = id;
        hint_end_round(b, "host");
        if (id == BALLOON_HINT_CMD_DONE) {
            uint64_t released = hint_release(b, UINT64_MAX);
            platform_log("balloon: hinting done: %lu pages back to the allocator",
                         (unsigned long)released);
            struct json j;
            event_begin(&j, "balloon_hint_done");
            json_u64(&j, "released_pages", released);
            event_emit(&j);
        }
        return;
    }
    hint_end_round(b, "host"); /* a new id while a round runs: the old round is over */
    hint_start_round(b, id);
}

/* Hint more free blocks while a round runs: each a device-writable buffer naming the block,
 * which stays the driver's until DONE. The reserve is kept, and one descriptor for STOP. */
static void hint_step(struct balloon *b)
{
    unsigned added = 0;
    while (b->hint_active && added < 64 && vq_num_free(&b->hint_vq) > 1) {
        uint64_t free = b->mm->free_pages;
        if (free <= b->cfg.reserve_pages + 1) {
            hint_end_round(b, "exhausted");
            break;
        }
        unsigned max_order = floor_log2(free - b->cfg.reserve_pages - 1);
        if (max_order > b->cfg.hint_order)
            max_order = b->cfg.hint_order;
        unsigned order;
        uint64_t pfn = buddy_alloc_largest(b->mm, max_order, &order);
        if (pfn == BUDDY_NONE || blocklist_push(&b->hinted, pfn, order) != 0) {
            if (pfn != BUDDY_NONE)
                buddy_free(b->mm, pfn, order);
            hint_end_round(b, "exhausted");
            break;
        }
        struct vq_seg seg = {pfn << PAGE_SHIFT, (uint32_t)(PAGE_SIZE << order)};
        if (vq_add(&b->hint_vq, &seg, 0, 1, &b->hinted) != 0) {
            blocklist_pop(&b->hinted, &pfn, &order);
            buddy_free(b->mm, pfn, order);
            break;
        }
        b->hint_round_pages += 1ull << order;
        added++;
    }
    if (added)
        kick(b, &b->hint_vq);
}

static void hint_poll(struct balloon *b, bool config)
{
    uint32_t len;
    void *token;
    while ((token = vq_get_used(&b->hint_vq, &len)))
        if (token != &b->hinted)
            b->hint_id_busy[(uint32_t *)token - b->hint_ids] = false;
    if (b->hint_stop_owed && hint_send_id(b, BALLOON_HINT_CMD_STOP))
        b->hint_stop_owed = false;
    if (config)
        hint_check_cmd(b);
    if (b->hint_active)
        hint_step(b);
}

static void check_stall(struct balloon *b)
{
    uint64_t now = platform_now_ns(), oldest = now;
    for (unsigned i = 0; i < b->cfg.buffers; i++)
        if (b->bufs[i].busy && b->bufs[i].sent_ns < oldest)
            oldest = b->bufs[i].sent_ns;
    for (unsigned i = 0; i < BALLOON_REPORT_CHAINS; i++)
        if (b->reports[i].busy && b->reports[i].sent_ns < oldest)
            oldest = b->reports[i].sent_ns;
    if (now - oldest > b->cfg.ack_timeout_ns && b->state == BALLOON_RUNNING) {
        /* Silent device: broken and waiting for a reset, or just slow? */
        uint8_t status;
        if (device_needs_reset(b, &status)) {
            needs_reset(b, status, "timeout");
            return;
        }
        b->state = BALLOON_STALLED;
        platform_log("balloon: device has not used a buffer for %lu ms (inflate %u, deflate %u, "
                     "report %lu pages in flight); waiting",
                     (unsigned long)((now - oldest) / 1000000), b->inflight_inflate,
                     b->inflight_deflate, (unsigned long)b->inflight_report);
        struct json j;
        event_begin(&j, "balloon_stalled");
        json_u64(&j, "inflight_inflate", b->inflight_inflate);
        json_u64(&j, "inflight_deflate", b->inflight_deflate);
        json_u64(&j, "inflight_report", b->inflight_report);
        event_emit(&j);
    } else if (b->state == BALLOON_STALLED && now - oldest <= b->cfg.ack_timeout_ns) {
        b->state = BALLOON_RUNNING;
        platform_log("balloon: device is answering again");
        struct json j;
        event_begin(&j, "balloon_recovered");
        event_emit(&j);
    }
}

/* ---- Free page reporting --------------------------------------------------------------------- */

static bool inflate_wanted(const struct balloon *b)
{
    return b->actual + b->inflight_inflate < b->target;
}

/* Give the blocks of every used report chain back to the allocator, marked reported. */
static void collect_reports(struct balloon *b)
{
    struct balloon_report *r;
    uint32_t len; /* what the device wrote (QEMU: 0); it may have discarded every page */
    while (b->has_reporting && (r = vq_get_used(&b->report_vq, &len))) {
        record_latency(b, BLAT_REPORT, r->sent_ns);
        for (unsigned i = 0; i < r->n_blocks; i++)
            buddy_free_reported(b->mm, r->blocks[i] >> 8, r->blocks[i] & 0xff);
        b->inflight_report -= r->pages;
        b->reported_pages += r->pages;
        b->report_chains++;
        b->pass_chains++;
        r->busy = false;
    }
}

static struct balloon_report *free_report(struct balloon *b)
{
    for (unsigned i = 0; i < BALLOON_REPORT_CHAINS; i++)
        if (!b->reports[i].busy)
            return &b->reports[i];
    return NULL;
}

static bool within_budget(const struct balloon *b, uint64_t pages)
{
    return b->cfg.report_budget_pages == 0 || pages < b->cfg.report_budget_pages;
}

/* Take up to `room` blocks into r without going below the reserve; returns the count. */
static unsigned take_report_blocks(struct balloon *b, struct balloon_report *r, unsigned room)
{
    unsigned n = 0;
    uint64_t pages = 0;
    while (n < room && within_budget(b, b->pass_pages + pages)) {
        int k = buddy_next_unreported_order(b->mm, b->cfg.report_order);
        if (k < 0 || b->mm->free_pages < b->cfg.reserve_pages + (1ull << k) ||
            pages + (1ull << k) > UINT32_MAX >> PAGE_SHIFT) /* a chain's bytes fit 32 bits */
            break;
        unsigned order;
        uint64_t pfn = buddy_take_unreported(b->mm, b->cfg.report_order, &order);
        if (pfn == BUDDY_NONE)
            break;
        r->blocks[n++] = pfn << 8 | order;
        pages += 1ull << order;
    }
    r->n_blocks = n;
    r->pages = pages;
    return n;
}

/* Send report chains while there are blocks, room on the queue and budget; returns whether
 * the pass has more to send later (it stopped for the budget or an inflate). */
static bool send_reports(struct balloon *b)
{
    bool added = false, more = false;
    struct balloon_report *r;
    struct vq_seg segs[BALLOON_REPORT_CAPACITY];
    while ((r = free_report(b))) {
        if (inflate_wanted(b) || !within_budget(b, b->pass_pages)) {
            more = true;
            break;
        }
        /* A direct chain needs a descriptor per block; an indirect one needs a single slot. */
        unsigned room = b->report_max_blocks;
        if (!b->report_vq.use_indirect && vq_num_free(&b->report_vq) < room)
            room = vq_num_free(&b->report_vq);
        if (room == 0 || vq_num_free(&b->report_vq) == 0 || take_report_blocks(b, r, room) == 0)
            break;
        for (unsigned i = 0; i < r->n_blocks; i++)
            segs[i] = (struct vq_seg){(r->blocks[i] >> 8) << PAGE_SHIFT,
                                      (uint32_t)(PAGE_SIZE << (r->blocks[i] & 0xff))};
        if (vq_add(&b->report_vq, segs, 0, r->n_blocks, r) != 0) {
            /* Only a broken queue gets here (room was checked): the blocks are free again. */
            for (unsigned i = 0; i < r->n_blocks; i++)
                buddy_free(b->mm, r->blocks[i] >> 8, r->blocks[i] & 0xff);
            break;
        }
        r->busy = true;
        r->sent_ns = platform_now_ns();
        b->inflight_report += r->pages;
        b->pass_pages += r->pages;
        added = true;
    }
    if (added)
        kick(b, &b->report_vq);
    return more;
}

/* Is a pass due? Free memory changed, has been quiet for the delay (or kept changing for
 * REPORT_MAX_DEFER delays), no inflate needs memory, and the device answers. */
static bool pass_due(struct balloon *b, uint64_t now)
{
    uint64_t activity = b->mm->allocs + b->mm->frees; /* reporting itself counts in neither */
    if (activity != b->mm_activity) {
        b->mm_activity = activity;
        b->mm_changed_ns = now;
        if (!b->unsettled)
            b->unsettled_since_ns = now;
        b->unsettled = true;
    }
    uint64_t delay = (uint64_t)b->cfg.report_delay_ms * 1000000;
    return b->unsettled && b->state == BALLOON_RUNNING && !inflate_wanted(b) &&
           (now - b->mm_changed_ns >= delay ||
            now - b->unsettled_since_ns >= REPORT_MAX_DEFER * delay);
}

static void end_pass(struct balloon *b, uint64_t now)
{
    b->pass_active = false;
    if (b->pass_cut_short) {
        /* Budget or inflate: the rest follows after another delay. */
        b->unsettled = true;
        b->mm_changed_ns = b->unsettled_since_ns = now;
    }
    if (!b->pass_chains)
        return;
    b->report_passes++;
    uint64_t ms = (now - b->pass_start_ns) / 1000000;
    platform_log("balloon: reported %lu pages (%lu MiB) in %lu chains, %lu ms",
                 (unsigned long)b->pass_pages, (unsigned long)(b->pass_pages >> 8),
                 (unsigned long)b->pass_chains, (unsigned long)ms);
    struct json j;
    event_begin(&j, "balloon_reported");
    json_u64(&j, "pages", b->pass_pages);
    json_u64(&j, "chains", b->pass_chains);
    json_u64(&j, "ms", ms);
    json_u64(&j, "reported_pages", b->reported_pages);
    event_emit(&j);
}

static void report_step(struct balloon *b)
{
    uint64_t now = platform_now_ns();
    if (!b->pass_active) {
        if (!pass_due(b, now))
            return;
        b->unsettled = false;
        uint64_t unreported = buddy_unreported_pages(b->mm, b->cfg.report_order);
        if (unreported == 0 || unreported < b->cfg.report_threshold_pages)
            return;
        b->pass_active = true;
        b->pass_cut_short = false;
        b->pass_start_ns = now;
        b->pass_pages = b->pass_chains = 0;
    }
    if (b->state == BALLOON_RUNNING && send_reports(b))
        b->pass_cut_short = true;
    if (b->inflight_report == 0)
        end_pass(b, now);
}

/* ---- Used-length deviations ------------------------------------------------------------------ */

/* Report each queue's first used-length deviation once (the virtqueue counts them all). */
static void report_deviations(struct balloon *b)
{
    for (unsigned q = 0; q < BQ_COUNT; q++) {
        bool present;
        struct virtqueue *vq = queue_of(b, q, &present);
        if (!present || !vq->len_deviations || (b->dev_reported & 1u << q))
            continue;
        b->dev_reported |= 1u << q;
        const char *observed = vq_len_observed(vq->first_dev_len, vq->first_dev_out_len);
        platform_log("balloon: %s[%u] deviates: used len %u on a %u-byte buffer the device only "
                     "reads: %s; counted, not fatal (blimp.balloon.strict=1 makes it fatal)",
                     vq->name, vq->index, vq->first_dev_len, vq->first_dev_out_len, observed);
        struct json j;
        event_begin(&j, "device_deviation");
        json_str(&j, "queue", vq->name);
        json_u64(&j, "index", vq->index);
        json_str(&j, "what", "used_len_on_read_only_buffer");
        json_u64(&j, "len", vq->first_dev_len);
        json_u64(&j, "buffer_bytes", vq->first_dev_out_len);
        json_str(&j, "observed", observed);
        json_u64(&j, "count", vq->len_deviations);
        event_emit(&j);
    }
}

/* ---- DEVICE_NEEDS_RESET (spec 2.1.1) ----------------------------------------------------------
 */

/*
 * Take back every buffer still in flight after the device was reset, each exactly once
 * (vq_detach_unused hands out each token once): inflate buffers' pages are already in `held`;
 * deflate buffers' blocks go back into `held` (the device may or may not have acted on them:
 * they will be re-inflated, so either way the fresh device learns they are ballooned); report
 * chains' blocks return to the allocator; hint ids and the stats buffer are simply free again.
 * Returns the buffers reclaimed.
 */
static unsigned reclaim_in_flight(struct balloon *b, uint64_t *returned_deflate)
{
    unsigned n = 0;
    void *tok;
    while ((tok = vq_detach_unused(&b->inflate_vq))) {
        struct balloon_buf *buf = tok;
        buf->busy = false;
        n++;
    }
    while ((tok = vq_detach_unused(&b->deflate_vq))) {
        struct balloon_buf *buf = tok;
        for (unsigned i = 0; i < buf->n_blocks; i++) {
            uint64_t pfn = buf->blocks[i] >> 8;
            unsigned order = buf->blocks[i] & 0xff;
            if (blocklist_push(&b->held, pfn, order) == 0) {
                *returned_deflate += 1ull << order;
            } else {
                /* No page for a record: the block goes to the guest instead. The fresh
                 * device never hears of it, which is just as consistent. */
                free_unbacked(b, pfn, order);
            }
        }
        buf->busy = false;
        n++;
    }
    while (b->has_stats && vq_detach_unused(&b->stats_vq))
        n++;
    while (b->has_hint_vq && (tok = vq_detach_unused(&b->hint_vq))) {
        if (tok != &b->hinted)
            b->hint_id_busy[(uint32_t *)tok - b->hint_ids] = false;
        n++;
    }
    while (b->has_reporting && (tok = vq_detach_unused(&b->report_vq))) {
        struct balloon_report *r = tok;
        for (unsigned i = 0; i < r->n_blocks; i++)
            buddy_free(b->mm, r->blocks[i] >> 8, r->blocks[i] & 0xff);
        r->busy = false;
        n++;
    }
    b->inflight_inflate = b->inflight_deflate = 0;
    b->inflight_report = 0;
    return n;
}

/*
 * The device set DEVICE_NEEDS_RESET (found through `how`: "config" when a config change
 * interrupt came, "timeout" when a buffer went unanswered). Report it; with on_reset=stop that is
 * all. With recover: collect what the device used before it broke, reset it, take back every
 * buffer still in flight, bring it up again with the same features and queues, and re-inflate
 * every page the balloon holds (re-inflate_step) before following the target again: the fresh
 * device knows of no ballooned page, and `actual` starts from 0.
 */
static void needs_reset(struct balloon *b, uint8_t status, const char *how)
{
    bool stop = b->cfg.on_reset == BALLOON_ON_RESET_STOP;
    platform_log("balloon: the device needs a reset (status 0x%x, seen on %s): held %lu pages, "
                 "in flight inflate %u deflate %u report %lu; %s",
                 status, how, (unsigned long)(b->held.pages + b->resend.pages), b->inflight_inflate,
                 b->inflight_deflate, (unsigned long)b->inflight_report,
                 stop ? "stopping (blimp.balloon.on_reset=stop)" : "resetting it");
    struct json j;
    event_begin(&j, "device_needs_reset");
    json_u64(&j, "status", status);
    json_str(&j, "detected_by", how);
    json_str(&j, "action", stop ? "stop" : "recover");
    json_u64(&j, "held_pages", b->held.pages + b->resend.pages);
    json_u64(&j, "actual_pages", b->actual);
    json_u64(&j, "inflight_inflate", b->inflight_inflate);
    json_u64(&j, "inflight_deflate", b->inflight_deflate);
    json_u64(&j, "inflight_report", b->inflight_report);
    json_u64(&j, "resets", b->resets);
    event_emit(&j);
    if (stop) {
        b->state = BALLOON_NEEDS_RESET;
        return;
    }
    reset_and_recover(b, "device");
}

/*
 * The recovery: collect what the device used, reset it, take back every buffer still in
 * flight, bring it up again with the same features and queues, and re-inflate every held page
 * (reinflate_step). `cause`: "device" (it set DEVICE_NEEDS_RESET) or "guest" (asked for by
 * balloon_reset_device).
 */
static void reset_and_recover(struct balloon *b, const char *cause)
{
    struct json j;
    /* What the device used before it broke was done: take it as usual. */
    collect(b);
    collect_reports(b);
    if (b->has_hint_vq)
        while (vq_get_used(&b->hint_vq, NULL))
            ; /* hint ids and blocks are reclaimed below either way */
    struct virtqueue *qs[BQ_COUNT] = {&b->inflate_vq, &b->deflate_vq, &b->stats_vq, &b->hint_vq,
                                      &b->report_vq};
    for (unsigned q = 0; q < BQ_COUNT; q++) {
        bool present;
        queue_of(b, q, &present);
        if (present && vq_is_broken(qs[q])) {
            violation(b, vq_violation(qs[q]));
            return;
        }
    }
    uint64_t held_before = b->held.pages + b->inflight_deflate;

    /* Reset: from here on the device no longer touches the rings. */
    if (b->t->ops->reset(b->t) != 0) {
        violation(b, "device status did not read 0 after a reset for DEVICE_NEEDS_RESET");
        return;
    }
    uint64_t returned = 0;
    unsigned reclaimed = reclaim_in_flight(b, &returned);
    for (unsigned i = 0; i < b->cfg.buffers; i++)
        b->bufs[i].busy = false; /* all detached above; never leave one marked */
    for (unsigned i = 0; i < BALLOON_REPORT_CHAINS; i++)
        b->reports[i].busy = false;
    /* Hinting: the round is over, hinted blocks are the guest's again. */
    b->hint_active = 0;
    b->hint_stop_owed = false;
    hint_release(b, UINT64_MAX);
    b->pass_active = false;

    /* Every held page is to be told to the fresh device again. A reset during a re-inflation
     * finds the rest of the previous one still on `resend`: both go. */
    if (b->resend.blocks == 0) {
        struct blocklist tmp = b->resend;
        b->resend = b->held;
        b->held = tmp;
    } else {
        uint64_t pfn;
        unsigned order;
        while (blocklist_pop(&b->held, &pfn, &order))
            if (blocklist_push(&b->resend, pfn, order) != 0)
                free_unbacked(b, pfn, order); /* no record page: the guest's again */
    }
    b->actual = 0;

    if (negotiate(b, true) != 0 || setup_all_queues(b, true) != 0) {
        if (b->state != BALLOON_BROKEN)
            violation(b, "the device could not be brought up again after a reset");
        return;
    }
    start_device(b);
    b->actual_written = UINT32_MAX; /* the fresh device hears actual = 0 now */
    write_actual(b);
    b->resets++;
    b->state = BALLOON_RUNNING;
    b->reinflating = true;
    b->reinflate_start_ns = platform_now_ns();
    b->reinflate_total = b->resend.pages;
    b->reached_logged = false;
    b->exhausted_logged = false;
    b->target_changed_ns = platform_now_ns();
    platform_log("balloon: device reset #%lu done: %u buffers taken back, %lu pages to re-inflate "
                 "(%lu of them from deflates in flight)",
                 (unsigned long)b->resets, reclaimed, (unsigned long)b->resend.pages,
                 (unsigned long)returned);
    event_begin(&j, "balloon_reset");
    json_str(&j, "cause", cause);
    json_u64(&j, "resets", b->resets);
    json_u64(&j, "reclaimed_buffers", reclaimed);
    json_u64(&j, "held_pages_before", held_before);
    json_u64(&j, "reinflate_pages", b->resend.pages);
    json_u64(&j, "returned_deflate_pages", returned);
    event_emit(&j);
}

/* After a reset: send the held pages to the fresh device as inflate buffers, whatever the
 * target; blocks move from `resend` back to `held` as they go out. */
static void reinflate_step(struct balloon *b)
{
    bool added = false;
    struct balloon_buf *buf;
    uint64_t cap = b->chunked ? UINT64_MAX : b->cfg.pfns_per_buffer;
    while (b->resend.pages && (buf = free_buf(b))) {
        unsigned n = 0, nb = 0;
        uint64_t pfn;
        unsigned order;
        while (n < cap && nb < b->max_blocks && blocklist_pop(&b->resend, &pfn, &order)) {
            /* Too big for what is left of the buffer: the upper half waits for the next. */
            while ((1ull << order) > cap - n) {
                buddy_split(b->mm, pfn, order);
                order--;
                blocklist_push(&b->resend, pfn + (1ull << order), order); /* the pop made room */
            }
            if (blocklist_push(&b->held, pfn, order) != 0) {
                blocklist_push(&b->resend, pfn, order);
                break;
            }
            buf->blocks[nb++] = pfn << 8 | order;
            n += 1u << order;
        }
        if (nb == 0)
            break;
        sort_blocks(buf->blocks, nb);
        if (send_buf(b, buf, n, nb, true) != 0) {
            for (unsigned i = 0; i < nb; i++) {
                blocklist_pop(&b->held, &pfn, &order);
                blocklist_push(&b->resend, pfn, order);
            }
            break;
        }
        added = true;
    }
    if (added)
        kick(b, &b->inflate_vq);
    if (b->reinflating && !b->resend.pages && !b->inflight_inflate) {
        b->reinflating = false;
        uint64_t ms = (platform_now_ns() - b->reinflate_start_ns) / 1000000;
        platform_log("balloon: re-inflated %lu pages after the reset in %lu ms",
                     (unsigned long)b->reinflate_total, (unsigned long)ms);
        struct json j;
        event_begin(&j, "balloon_reinflated");
        json_u64(&j, "pages", b->reinflate_total);
        json_u64(&j, "actual_pages", b->actual);
        json_u64(&j, "ms", ms);
        event_emit(&j);
    }
}

int balloon_reset_device(struct balloon *b)
{
    if (b->state != BALLOON_RUNNING && b->state != BALLOON_STALLED)
        return -1;
    platform_log("balloon: resetting the device as asked (held %lu pages, actual %u)",
                 (unsigned long)(b->held.pages + b->resend.pages), b->actual);
    bool was = b->in_driver;
    b->in_driver = true; /* the reclaim hook must not run inside the reset */
    reset_and_recover(b, "guest");
    b->in_driver = was;
    return b->state == BALLOON_RUNNING ? 0 : -1;
}

/* Does the device status say NEEDS_RESET? (A status of 0xff is a device gone, not a request.) */
static bool device_needs_reset(struct balloon *b, uint8_t *status)
{
    *status = b->t->ops->get_status(b->t);
    return *status != 0xff && (*status & VIRTIO_STATUS_NEEDS_RESET);
}

/* ---- Target ---------------------------------------------------------------------------------- */

static void update_target(struct balloon *b)
{
    uint32_t dev = read_num_pages(b);
    if (dev == b->device_target && b->target_changed_ns)
        return;
    b->device_target = dev;
    struct buddy_stats st;
    buddy_get_stats(b->mm, &st);
    uint64_t can = st.total_pages; /* an upper bound on what the balloon could ever hold */
    b->target = dev > can ? (uint32_t)can : dev;
    b->target_changed_ns = platform_now_ns();
    b->reached_logged = false;
    b->exhausted_logged = false;
    platform_log("balloon: target %u pages (%u MiB), actual %u", dev, dev >> 8, b->actual);
    /* The pages in flight say whether the previous target was still being worked on. */
    struct json j;
    event_begin(&j, "balloon_target");
    json_u64(&j, "target_pages", dev);
    json_u64(&j, "actual_pages", b->actual);
    json_u64(&j, "inflight_inflate", b->inflight_inflate);
    json_u64(&j, "inflight_deflate", b->inflight_deflate);
    event_emit(&j);
    if (dev != b->target)
        platform_log("balloon: target exceeds the guest's %lu managed pages; aiming at %u",
                     (unsigned long)can, b->target);
}

static void poll_once(struct balloon *b, unsigned events);

unsigned balloon_unseen_events(struct balloon *b)
{
    if (b->state != BALLOON_RUNNING && b->state != BALLOON_STALLED)
        return 0;
    unsigned ev = 0;
    /* The free page queue is left out: it raises no interrupts (see setup), it is polled. */
    if (vq_has_used(&b->inflate_vq) || vq_has_used(&b->deflate_vq) ||
        (b->has_stats && vq_has_used(&b->stats_vq)) ||
        (b->has_reporting && vq_has_used(&b->report_vq)))
        ev |= BALLOON_EV_QUEUE;
    if (read_num_pages(b) != b->device_target ||
        (b->has_hint_vq && read_config32(b, BALLOON_CFG_HINT_CMD) != b->hint_cmd_seen))
        ev |= BALLOON_EV_CONFIG;
    return ev;
}

void balloon_poll(struct balloon *b, unsigned events)
{
    bool was = b->in_driver;
    b->in_driver = true;
    poll_once(b, events);
    b->in_driver = was;
}

static void poll_once(struct balloon *b, unsigned events)
{
    bool config = events & BALLOON_EV_CONFIG;
    if (b->state == BALLOON_BROKEN || b->state == BALLOON_NEEDS_RESET)
        return;
    uint8_t status;
    if (config && device_needs_reset(b, &status)) {
        needs_reset(b, status, "config");
        if (b->state != BALLOON_RUNNING)
            return;
    }
    if (config)
        update_target(b);
    if (collect(b))
        write_actual(b);
    collect_reports(b);
    check_queues(b);
    if (b->state == BALLOON_BROKEN)
        return;
    report_deviations(b);
    if (b->has_hint_vq)
        hint_poll(b, config);
    if (b->reinflating)
        reinflate_step(b); /* every held page goes to the fresh device before anything else */
    /* Not `else`: the round that finishes the re-inflation goes on to the target at once (with
     * interrupts nothing else would wake the driver for it). */
    if (!b->reinflating) {
        if (b->inflight_deflate == 0 && b->actual + b->inflight_inflate < b->target)
            inflate_step(b);
        else if (b->inflight_inflate == 0 && b->actual > b->target + b->inflight_deflate)
            deflate_step(b);
    }
    if (b->has_reporting)
        report_step(b);
    check_queues(b);
    if (b->state == BALLOON_BROKEN)
        return;
    check_stall(b);
    if (b->state != BALLOON_RUNNING && b->state != BALLOON_STALLED)
        return;
    if (!b->reached_logged && !b->reinflating && b->actual == b->target && !b->inflight_inflate &&
        !b->inflight_deflate) {
        uint64_t ms = (platform_now_ns() - b->target_changed_ns) / 1000000;
        platform_log("balloon: reached %u pages (%u MiB) in %lu ms", b->actual, b->actual >> 8,
                     (unsigned long)ms);
        struct json j;
        event_begin(&j, "balloon_reached");
        json_u64(&j, "actual_pages", b->actual);
        json_u64(&j, "ms", ms);
        event_emit(&j);
        b->reached_logged = true;
    }
}

/* How often a running hinting round is looked at: its queue has interrupts off (see init). */
#define HINT_POLL_NS (1000ull * 1000)
/* Retry time for work towards the target that nothing in flight will wake (below). */
#define IDLE_RETRY_NS (10ull * 1000 * 1000)

static uint64_t earliest(uint64_t a, uint64_t b)
{
    return a < b ? a : b;
}

uint64_t balloon_next_deadline_ns(const struct balloon *b)
{
    if (b->state == BALLOON_BROKEN)
        return UINT64_MAX;
    uint64_t now = platform_now_ns(), next = UINT64_MAX;
    /* check_stall: the oldest buffer or report in flight times out (only a running device can
     * stall; a stalled one recovers when it uses a buffer, which is an interrupt). */
    if (b->state == BALLOON_RUNNING) {
        for (unsigned i = 0; i < b->cfg.buffers; i++)
            if (b->bufs[i].busy)
                next = earliest(next, b->bufs[i].sent_ns + b->cfg.ack_timeout_ns + 1);
        for (unsigned i = 0; i < BALLOON_REPORT_CHAINS; i++)
            if (b->reports[i].busy)
                next = earliest(next, b->reports[i].sent_ns + b->cfg.ack_timeout_ns + 1);
    }
    /* Hinting: more blocks to hint (hint_step stops after 64 a poll), descriptors the device
     * frees without telling us, or a STOP still owed. */
    if (b->has_hint_vq && (b->hint_active || b->hint_stop_owed)) {
        bool more = b->hint_active && vq_num_free(&b->hint_vq) > 1 &&
                    b->mm->free_pages > b->cfg.reserve_pages + 1;
        next = earliest(next, more ? now : now + HINT_POLL_NS);
    }
    /* Work towards the target with nothing in flight to wake us (the allocator was short, or a
     * step stopped early): look again soon rather than never. */
    if (b->state == BALLOON_RUNNING && !b->inflight_inflate && !b->inflight_deflate &&
        (b->reinflating || b->actual != b->target))
        next = earliest(next, now + IDLE_RETRY_NS);
    if (b->has_reporting && b->state == BALLOON_RUNNING && !inflate_wanted(b)) {
        /* pass_due notices allocator activity only when it looks: let it look now. */
        if (b->mm->allocs + b->mm->frees != b->mm_activity)
            next = now;
        else if (b->unsettled && !b->pass_active) {
            uint64_t delay = (uint64_t)b->cfg.report_delay_ms * 1000000;
            next = earliest(next, earliest(b->mm_changed_ns + delay,
                                           b->unsettled_since_ns + REPORT_MAX_DEFER * delay));
        }
        /* A pass that is waiting only for its last chains ends when they come back (an
         * interrupt); one cut short by budget starts again after the delay (unsettled). */
    }
    return next;
}

uint64_t balloon_release_for_oom(struct balloon *b, uint64_t pages, uint64_t timeout_ns)
{
    if (!balloon_negotiated(b, VIRTIO_BALLOON_F_DEFLATE_ON_OOM) || b->state != BALLOON_RUNNING)
        return 0;
    bool was = b->in_driver;
    b->in_driver = true;
    uint64_t deadline = platform_now_ns() + timeout_ns;
    /* Let inflation in flight finish first: deflating needs acknowledged pages. */
    while (b->inflight_inflate && platform_now_ns() < deadline && b->state == BALLOON_RUNNING) {
        if (collect(b)) /* collect only: polling would send more inflate buffers */
            write_actual(b);
        check_queues(b);
    }
    uint32_t before = b->actual;
    uint32_t saved = b->target;
    b->target = b->actual > pages ? (uint32_t)(b->actual - pages) : 0;
    while ((b->actual > b->target || b->inflight_deflate) && platform_now_ns() < deadline &&
           b->state == BALLOON_RUNNING) {
        if (collect(b))
            write_actual(b);
        check_queues(b);
        if (!b->inflight_deflate)
            deflate_step(b);
    }
    b->target = saved; /* the host's wish stands; we re-inflate when memory allows */
    uint64_t released = before - b->actual;
    b->oom_deflated_pages += released;
    b->reached_logged = false;
    b->target_changed_ns = platform_now_ns(); /* "reached" times count from here now */
    platform_log("balloon: deflated %lu pages on guest OOM (actual now %u, target %u)",
                 (unsigned long)released, b->actual, b->target);
    struct json j;
    event_begin(&j, "balloon_oom_deflate");
    json_u64(&j, "pages", released);
    json_u64(&j, "actual_pages", b->actual);
    event_emit(&j);
    b->in_driver = was;
    return released;
}
