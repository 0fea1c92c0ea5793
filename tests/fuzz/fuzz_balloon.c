/*
 * libFuzzer target: the balloon driver (virtio/balloon.c, with the virtqueue, the buddy allocator
 * and the block lists) against the unit tests' QEMU-like device model, with the input choosing
 * the features offered, the driver's configuration and every move of a host that may lie: any
 * target, one-shot broken used entries (ids out of range or not in flight, over-long lengths,
 * used.idx jumps), raw used-ring writes, held or answered buffers, stats requests, hinting
 * rounds, NEEDS_RESET, writes anywhere in the config space, time running out, guest memory churn
 * and out-of-memory deflates.
 *
 * What must hold: no crash, hang or sanitizer report; the allocator never sees an invalid free;
 * a broken driver names its violation; and no page is ever both free in the allocator and held
 * by the balloon (in the balloon, waiting to be re-sent after a reset, hinted, or in a report
 * the device holds).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mm/buddy.h"
#include "tests/fuzz/fuzz_input.h"
#include "tests/unit/fake_balloon.h"
#include "tests/unit/fake_device.h"
#include "tests/unit/fake_platform.h"
#include "virtio/balloon.h"

#define RAM_BASE     0x100000ull
#define RAM_BYTES    (4ull << 20)
#define RAM_PFN      (RAM_BASE >> 12)
#define RAM_PAGES    (RAM_BYTES >> 12)
#define F(bit)       (1ull << (bit))
#define MS           (1000ull * 1000)
#define MAX_GUEST    64
#define BACKED_PAGES 256

/* Every feature the driver knows, and a few it must not take. */
static const uint64_t known_features =
    F(VIRTIO_BALLOON_F_MUST_TELL_HOST) | F(VIRTIO_BALLOON_F_STATS_VQ) |
    F(VIRTIO_BALLOON_F_DEFLATE_ON_OOM) | F(VIRTIO_BALLOON_F_FREE_PAGE_HINT) |
    F(VIRTIO_BALLOON_F_PAGE_POISON) | F(VIRTIO_BALLOON_F_PAGE_REPORTING) |
    F(VIRTIO_BALLOON_F_X_CHUNKS) | F(VIRTIO_F_INDIRECT_DESC) | F(VIRTIO_F_EVENT_IDX) |
    F(VIRTIO_F_QEMU_BAD) | F(VIRTIO_F_VERSION_1) | F(VIRTIO_F_RING_PACKED) |
    F(VIRTIO_F_ACCESS_PLATFORM);

static void check(bool ok, const char *what)
{
    if (!ok) {
        fprintf(stderr, "fuzz_balloon: invariant broken: %s\n", what);
        abort();
    }
}

static struct buddy *owner_mm;
static bool trace;

static int not_free(void *ctx, uint64_t pfn, unsigned order)
{
    (void)ctx;
    /* First, middle and last page: a block shared with the allocator shows at one of them, and
     * checking every page would take most of the run time. */
    uint64_t n = 1ull << order;
    uint64_t probe[3] = {pfn, pfn + n / 2, pfn + n - 1};
    for (unsigned i = 0; i < 3; i++)
        check(!buddy_is_free(owner_mm, probe[i]), "a page both free and held by the balloon");
    return 0;
}

static void check_ownership(struct balloon *b, struct buddy *mm)
{
    owner_mm = mm;
    blocklist_for_each(&b->held, not_free, NULL);
    blocklist_for_each(&b->resend, not_free, NULL); /* held, waiting to be re-sent after a reset */
    blocklist_for_each(&b->hinted, not_free, NULL);
    for (unsigned i = 0; i < BALLOON_REPORT_CHAINS; i++)
        if (b->reports[i].busy)
            for (unsigned k = 0; k < b->reports[i].n_blocks; k++)
                not_free(NULL, b->reports[i].blocks[k] >> 8,
                         (unsigned)(b->reports[i].blocks[k] & 0xff));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct fz f = {data, size};
    static void *meta;
    static size_t meta_bytes;
    if (!meta) {
        /* FUZZ_TRACE=1 when replaying one input: the driver's log and every step. */
        trace = getenv("FUZZ_TRACE") != NULL;
        fake_log_echo(trace);
        fake_ram_init(RAM_BASE, RAM_BYTES);
        meta_bytes = (buddy_meta_bytes(RAM_PAGES) + 7) & ~(size_t)7;
        meta = aligned_alloc(8, meta_bytes);
        check(meta != NULL, "no memory for the allocator");
    }
    fake_log_reset();
    fake_clock_virtual(1000 * 1000); /* 1 ms a reading: deadlines pass in steps, not waits */

    static struct buddy mm;
    static struct fake_transport ft;
    static struct fake_balloon fb;
    static struct balloon b;
    check(buddy_init(&mm, meta, meta_bytes, RAM_PFN, RAM_PAGES) == 0, "buddy_init failed");
    /* Like the kernel: a little memory touched since boot, the rest untouched (so not backed,
     * nothing to report until the guest has used it). */
    buddy_add_range(&mm, RAM_PFN, BACKED_PAGES);
    buddy_add_range_untouched(&mm, RAM_PFN + BACKED_PAGES, RAM_PAGES - BACKED_PAGES);

    bool legacy = fz_bool(&f);
    uint64_t features = fz_u64(&f) & known_features;
    if (!legacy)
        features |= fz_bool(&f) ? F(VIRTIO_F_VERSION_1) : 0;
    uint16_t qsize = (uint16_t)(1u << fz_below(&f, 9)); /* 1..256 */
    fake_transport_init(&ft, legacy, VIRTIO_ID_BALLOON, features, 16);
    fake_balloon_init(&fb, &ft, RAM_BASE, RAM_BYTES, qsize);
    fb.mm = &mm;
    /* The model writes no guest memory here (no zeroed deflated or reported pages). Once the
     * input forges a used entry (op 4), the driver has rightly taken back pages the model still
     * thinks it holds, and the model's later "discard" would overwrite memory the guest reuses:
     * a host writing guest memory it does not own, which no driver can defend against (found
     * as a corrupted block list: tests/fuzz/regressions/balloon/forged-deflate-then-zeroed). */
    fb.zero_on_deflate = false;
    fb.discard_reports = false;

    struct balloon_config cfg;
    balloon_default_config(&cfg);
    cfg.buffers = 1 + fz_below(&f, 8);
    cfg.pfns_per_buffer = 1 + fz_below(&f, 256);
    cfg.chunks_per_buffer = 1 + fz_below(&f, BALLOON_MAX_CHUNKS);
    uint8_t opts = fz_u8(&f);
    cfg.deflate_on_oom = opts & 1;
    cfg.chunks = opts & 2;
    cfg.hinting = opts & 4;
    cfg.reporting = opts & 8;
    cfg.page_poison = opts & 16;
    cfg.poison_val = 0xaa55aa55;
    cfg.report_order = fz_below(&f, 10);
    cfg.hint_order = fz_below(&f, BUDDY_MAX_ORDER + 1);
    cfg.report_delay_ms = fz_below(&f, 4);
    cfg.report_threshold_pages = fz_below(&f, 1024);
    cfg.reserve_pages = 64;
    cfg.ack_timeout_ns = 50 * MS; /* the loop moves the clock on itself: no real waiting */

    uint64_t guest[MAX_GUEST];
    unsigned guest_order[MAX_GUEST], n_guest = 0;

    if (balloon_init(&b, &ft.t, &mm, &cfg) == 0) {
        for (unsigned step = 0; step < 2048 && fz_more(&f); step++) {
            unsigned q = fz_below(&f, FT_MAX_QUEUES);
            struct fake_vq *dvq = fake_transport_vq(&ft, q);
            unsigned op = fz_below(&f, 16);
            if (trace)
                fprintf(stderr, "step %u: op %u (queue %u), actual %u target %u, free %lu\n", step,
                        op, q, b.actual, b.target, (unsigned long)mm.free_pages);
            switch (op) {
            case 0:
                fake_balloon_set_target(&fb, fz_len(&f, (uint32_t)RAM_PAGES / 2));
                break;
            case 1:
                fb.hold[fz_u8(&f) & 1] = fz_bool(&f);
                fb.hold_reports = fz_bool(&f);
                break;
            case 2: {
                /* (FB_BAD_ID_FREE needs a free descriptor to name, which the model cannot
                 * always find: raw pushes of any id cover that class.) */
                static const enum fb_misbehave kinds[] = {FB_OK, FB_BAD_ID_RANGE, FB_LEN_TOO_LARGE,
                                                          FB_IDX_JUMP};
                fb.misbehave[fz_below(&f, FB_ROLES)] = kinds[fz_below(&f, 4)];
                break;
            }
            case 3: {
                enum fb_role role = (enum fb_role)(fz_u8(&f) & 1);
                fake_balloon_pop(&fb, role);
                fake_balloon_answer(&fb, role, fz_below(&f, 8));
                break;
            }
            case 4:
                if (dvq)
                    fake_vq_push_raw(dvq, fz_len(&f, dvq->size), fz_len(&f, 4096));
                break;
            case 5:
                if (dvq)
                    fake_vq_set_used_idx_raw(dvq, (uint16_t)(dvq->used_idx + fz_u16(&f)));
                break;
            case 6:
                fake_balloon_request_stats(&fb);
                break;
            case 7:
                switch (fz_below(&f, 3)) {
                case 0:
                    fake_balloon_hint_request(&fb);
                    break;
                case 1:
                    fake_balloon_hint_stop(&fb);
                    break;
                default:
                    fake_balloon_hint_done(&fb);
                }
                break;
            case 8:
                fake_clock_skip((uint64_t)fz_u8(&f) * MS);
                break;
            case 9:
                if (fz_below(&f, 8) == 0)
                    fake_transport_needs_reset(&ft);
                break;
            case 10: {
                unsigned width = 1u << fz_below(&f, 3);
                unsigned off = fz_below(&f, 16 / width) * width;
                fake_transport_config_set(&ft, off, width, fz_u32(&f));
                break;
            }
            case 11:
                balloon_release_for_oom(&b, fz_below(&f, 512), fz_below(&f, 3) * MS);
                break;
            case 12: /* the guest allocates or frees: what reporting and OOM react to */
                if (n_guest < MAX_GUEST && fz_bool(&f)) {
                    unsigned order = fz_below(&f, 6);
                    uint64_t pfn = buddy_alloc(&mm, order);
                    if (trace)
                        fprintf(stderr, "guest allocates order %u: 0x%lx\n", order,
                                (unsigned long)pfn);
                    if (pfn != BUDDY_NONE) {
                        guest[n_guest] = pfn;
                        guest_order[n_guest++] = order;
                    }
                } else if (n_guest) {
                    unsigned i = fz_below(&f, n_guest);
                    if (trace)
                        fprintf(stderr, "guest frees 0x%lx order %u\n", (unsigned long)guest[i],
                                guest_order[i]);
                    check(buddy_free(&mm, guest[i], guest_order[i]) == 0, "guest free refused");
                    guest[i] = guest[--n_guest];
                    guest_order[i] = guest_order[n_guest];
                }
                break;
            default:
                balloon_poll(&b, fz_u8(&f) & (BALLOON_EV_CONFIG | BALLOON_EV_QUEUE));
            }
            check(mm.invalid_frees == 0, "the allocator saw an invalid free");
            if (b.state == BALLOON_BROKEN)
                check(b.violation[0] != 0, "broken without naming the violation");
        }
        check_ownership(&b, &mm);
    }
    fake_balloon_fini(&fb);
    fake_transport_fini(&ft);
    return 0;
}
