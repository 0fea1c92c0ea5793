/*
 * The virtio memory balloon driver (device type 5), portable: it reaches the device only through
 * struct virtio_transport and takes memory only from the buddy allocator, so the same code runs
 * against QEMU and against the device model in tests/unit. It is a non-blocking state machine:
 * balloon_poll() does one round of work and returns, and every wait has a deadline.
 * Protocol reference: the virtio spec 5.5 and ../shared/docs/balloon-protocol.md; design notes
 * in docs/design.md.
 */
#ifndef VIRTIO_BALLOON_H
#define VIRTIO_BALLOON_H

#include "virtio/transport.h"
#include "virtio/virtqueue.h"
#include "mm/blocklist.h"

#define VIRTIO_ID_BALLOON 5

#define VIRTIO_BALLOON_F_MUST_TELL_HOST 0
#define VIRTIO_BALLOON_F_STATS_VQ       1
#define VIRTIO_BALLOON_F_DEFLATE_ON_OOM 2
#define VIRTIO_BALLOON_F_FREE_PAGE_HINT 3
#define VIRTIO_BALLOON_F_PAGE_POISON    4
#define VIRTIO_BALLOON_F_PAGE_REPORTING 5
/* blimp's experimental chunked inflate/deflate: buffers carry {le64 addr, le64 len} ranges
 * instead of PFN arrays (docs/chunked-inflate.md). */
#define VIRTIO_BALLOON_F_X_CHUNKS 23

/* Device config offsets (spec 5.5.4); always little-endian, also on legacy. */
#define BALLOON_CFG_NUM_PAGES 0
#define BALLOON_CFG_ACTUAL    4
#define BALLOON_CFG_HINT_CMD  8  /* free_page_hint_cmd_id (FREE_PAGE_HINT) */
#define BALLOON_CFG_POISON    12 /* poison_val (PAGE_POISON) */

/* free_page_hint_cmd_id values (spec 5.5.6.5); any other value names a hinting round. */
#define BALLOON_HINT_CMD_STOP 0
#define BALLOON_HINT_CMD_DONE 1
#define BALLOON_HINT_ID_SLOTS 8 /* start/stop ids that can be in flight at once */

#define BALLOON_MAX_BUFFERS     64
#define BALLOON_MAX_CHUNKS      256 /* per buffer: the most a chunked device must accept */
#define BALLOON_NUM_STATS       10
#define BALLOON_STATS_PROBE_TAG 0x7fff /* stats_probe: a tag no spec version defines */
/* stats_probe also puts this many more unknown tags (0x7f00, 0x7f01, ...), two after each known
 * entry: 31 entries in all, more than any device knows (kvmtool copies the guest's buffer into
 * a 10-entry array with the guest's length). */
#define BALLOON_STATS_PROBE_EXTRA    (2 * BALLOON_NUM_STATS)
#define BALLOON_STATS_PROBE_TAG_BASE 0x7f00

/* Free page reporting: blocks per report chain (Linux's PAGE_REPORTING_CAPACITY; QEMU's
 * reporting queue has 32 entries) and report chains in flight at once. */
#define BALLOON_REPORT_CAPACITY 32
#define BALLOON_REPORT_CHAINS   32

/* Damage sent on purpose, once, so a test can prove the host rejects it
 * (docs/chunked-inflate.md section 4); blimp.balloon.inject. */
enum balloon_inject {
    BALLOON_INJECT_NONE,
    BALLOON_INJECT_CHUNK_ALIGN,    /* the first chunk's address 8 bytes off */
    BALLOON_INJECT_CHUNK_OVERLAP,  /* the first chunk sent twice in one buffer */
    BALLOON_INJECT_CHUNK_OUTSIDE,  /* a chunk at 64 TiB, far outside guest RAM */
    BALLOON_INJECT_CHUNK_WRITABLE, /* the chunk array as a device-writable buffer */
    /* The first inflate buffer's descriptor has NEXT set and next = queue size: a malformed
     * chain (QEMU: "Desc next is N", the device needs a reset). PFN arrays or chunks. */
    BALLOON_INJECT_BAD_NEXT,
};

/* What to do when the device sets DEVICE_NEEDS_RESET (blimp.balloon.on_reset). */
enum balloon_on_reset {
    BALLOON_ON_RESET_RECOVER, /* reset, re-initialise, re-inflate every held page, go on */
    BALLOON_ON_RESET_STOP,    /* report it and stop (the kernel exits with its own code) */
};

/* How the queues after deflateq are numbered (blimp.balloon.queues; docs/design.md). */
enum balloon_queues {
    BALLOON_QUEUES_AUTO,       /* as the probe of the queue sizes says; negotiated if it can't */
    BALLOON_QUEUES_NEGOTIATED, /* compacted by the features (QEMU, Linux, crosvm since 2025) */
    BALLOON_QUEUES_FIXED,      /* stats 2, hint 3, reporting 4 whatever is offered (old crosvm) */
};

/* Bring-up steps a test can hold open (blimp.test.hold), so that a host's action lands exactly
 * there: features read but FEATURES_OK not yet written; DRIVER_OK set but no interrupt routed;
 * the interrupt routed but the loop not yet started. */
enum balloon_hold { HOLD_NEGOTIATE, HOLD_DRIVER_OK, HOLD_ROUTED, BALLOON_HOLDS };
extern const char *const balloon_hold_names[BALLOON_HOLDS + 1];

struct balloon_config {
    uint32_t pfns_per_buffer; /* PFNs per inflate/deflate buffer (Firecracker/CH accept <= 256) */
    uint32_t buffers;         /* buffers in flight at once (QEMU accepts many) */
    uint64_t ack_timeout_ns;  /* a buffer unanswered this long marks the device stalled */
    uint64_t reserve_pages;   /* free pages never given to the balloon (kernel's own needs) */
    bool stats;               /* accept STATS_VQ when offered */
    /* Conformance checks (kernel/conform.c): stats entries in reverse tag order plus one entry
     * with an unknown tag, which a device must ignore (spec 5.5.6.3.2). */
    bool stats_probe;
    bool deflate_on_oom;        /* accept DEFLATE_ON_OOM when offered */
    bool chunks;                /* accept VIRTIO_BALLOON_F_X_CHUNKS when offered */
    uint32_t chunks_per_buffer; /* chunks per inflate/deflate buffer, 1..BALLOON_MAX_CHUNKS */
    enum balloon_inject inject; /* damage one inflate buffer on purpose (tests only) */
    enum balloon_on_reset on_reset;
    bool strict;                /* used-length deviations are violations too */
    enum balloon_queues queues; /* queue numbering */
    bool hinting;               /* accept FREE_PAGE_HINT when offered */
    /* PAGE_POISON: accepted only when the guest really poisons free pages (the kernel sets
     * this from blimp.poison), with poison_val the 32-bit value its pattern repeats. */
    bool page_poison;
    uint32_t poison_val;
    uint32_t hint_order; /* largest block hinted at once (buddy order) */
    /* Free page reporting (VIRTIO_BALLOON_F_PAGE_REPORTING; docs/design.md "Free page
     * reporting"). */
    bool reporting;                  /* accept PAGE_REPORTING when offered */
    uint32_t report_order;           /* smallest block reported: 2^order pages */
    uint32_t report_delay_ms;        /* quiet time after a free-memory change before a pass */
    uint64_t report_budget_pages;    /* a pass stops once it reported this much (0: no limit) */
    uint64_t report_threshold_pages; /* start a pass only with this much unreported memory */
    uint32_t hold_ms[BALLOON_HOLDS]; /* tests only: busy-wait this long at each step (0: not) */
};

/* One range of a chunked buffer (docs/chunked-inflate.md); little-endian, as x86 is. */
struct balloon_chunk {
    uint64_t addr, len;
};

struct balloon_buf {
    union {                           /* what the device reads: */
        uint32_t *pfns;               /* a PFN array, or */
        struct balloon_chunk *chunks; /* with X_CHUNKS, a chunk array */
    };
    uint64_t *blocks; /* deflate: the (pfn << 8 | order) blocks this buffer returns */
    unsigned pages, n_blocks;
    bool busy, inflate;
    uint64_t sent_ns;
    uint64_t wire_sum; /* of what the device reads: it must not write there (spec 2.7.5.1) */
    uint32_t wire_len;
};

/* One report: device-writable blocks (pfn << 8 | order) the device may discard. */
struct balloon_report {
    uint64_t blocks[BALLOON_REPORT_CAPACITY];
    unsigned n_blocks;
    uint64_t pages;
    bool busy;
    uint64_t sent_ns;
};

/*
 * Per-buffer latency: from the moment a buffer is made available (sent_ns, just before the kick)
 * to the moment the driver collects it from the used ring, for every inflate, deflate and report
 * buffer the device used (not those a device reset took back). Log2 buckets in microseconds:
 * bucket 0 is [0, 2) us, bucket i is [2^i, 2^(i+1)) us, the last one is open-ended (from 2^32 us,
 * about 72 minutes: an hour still lands in a bounded bucket). docs/design.md, "Latency".
 */
#define BALLOON_LAT_BUCKETS 33
enum balloon_lat_kind { BLAT_INFLATE, BLAT_DEFLATE, BLAT_REPORT, BLAT_KINDS };

struct balloon_latency {
    uint64_t count, sum_ns, min_ns, max_ns; /* min_ns/max_ns: 0 while count is 0 */
    uint64_t buckets[BALLOON_LAT_BUCKETS];
};

/* "inflate", "deflate", "report". */
const char *balloon_latency_kind_name(enum balloon_lat_kind k);
/* The bucket a latency of ns falls in, and the lower bound of bucket i in microseconds. */
unsigned balloon_latency_bucket(uint64_t ns);
uint64_t balloon_latency_bucket_lo_us(unsigned i);
void balloon_latency_record(struct balloon_latency *l, uint64_t ns);
/* The pct-th percentile (1..100) in microseconds: the upper bound of the bucket holding that
 * rank, but never more than max (so p50 <= p90 <= p99 <= max); 0 when nothing was recorded. */
uint64_t balloon_latency_percentile_us(const struct balloon_latency *l, unsigned pct);

/* NEEDS_RESET: the device asked for a reset and on_reset=stop (with recover the driver resets
 * it at once and is RUNNING again). */
enum balloon_state { BALLOON_RUNNING, BALLOON_STALLED, BALLOON_BROKEN, BALLOON_NEEDS_RESET };

/* The queues whose used lengths are judged (status and events). */
enum balloon_q { BQ_INFLATE, BQ_DEFLATE, BQ_STATS, BQ_HINT, BQ_REPORT, BQ_COUNT };

/* One queue's used-length verdict. */
struct balloon_queue_status {
    const char *name;    /* "inflateq", ... */
    bool present;        /* set up by the driver */
    unsigned index;      /* on the device */
    const char *verdict; /* "conforms", "deviates", "violated" */
    uint64_t deviations; /* used lengths on read-only buffers, all device sessions */
};

/* What the rest of the kernel may know of the driver: a copy, taken by balloon_get_status. */
struct balloon_status {
    enum balloon_state state;
    const char *state_name; /* "running", "stalled", "broken" */
    const char *violation;  /* the protocol violation that broke it, or "" */
    const char *transport;  /* the transport's name */
    uint64_t offered, features;
    uint32_t device_target; /* num_pages exactly as the device said */
    uint32_t target;        /* what the driver aims at (clamped to what it can give) */
    uint32_t actual;        /* pages the device acknowledged */
    uint64_t held_pages;    /* pages in the balloon, acknowledged or in flight */
    uint32_t inflight_inflate, inflight_deflate;
    uint64_t inflate_buffers, deflate_buffers, stats_updates, oom_deflated_pages;
    uint64_t hinted_pages, hint_rounds, hint_released_pages;
    bool hinting;                           /* a hinting round runs (or its STOP is still owed) */
    uint64_t inflight_report;               /* pages held out of the allocator for reports */
    uint64_t reported_pages, report_chains; /* acknowledged by the device, all passes */
    uint64_t report_passes;
    uint64_t resets;            /* DEVICE_NEEDS_RESET recoveries */
    uint64_t reinflate_pending; /* held pages not yet told to the device since the last reset */
    uint64_t record_pages;      /* pages holding the driver's block records (mm/blocklist.h) */
    uint64_t readonly_checked;  /* used inflate/deflate buffers found as the driver wrote them */
    const char *numbering;      /* the host's, per the probe: negotiated|fixed|ambiguous|unknown */
    const char *numbering_used; /* negotiated | fixed */
    struct balloon_queue_status queues[BQ_COUNT];
};

struct balloon {
    struct virtio_transport *t;
    struct buddy *mm;
    struct balloon_config cfg;
    uint64_t offered, features;
    struct virtqueue inflate_vq, deflate_vq, stats_vq, report_vq;
    bool has_stats;
    bool has_reporting;         /* PAGE_REPORTING negotiated and its queue set up */
    unsigned report_max_blocks; /* blocks per report chain: min(capacity, direct room) */
    bool chunked;               /* X_CHUNKS negotiated */
    unsigned max_blocks;        /* buddy blocks per buffer: PFNs, or chunks when chunked */
    struct balloon_buf bufs[BALLOON_MAX_BUFFERS];
    struct blocklist held; /* every block given to the balloon (acked or in flight) */
    /* After a device reset: held blocks the fresh device has not been told about yet. They are
     * re-inflated (moved back to `held` as they go out) before anything else happens. */
    struct blocklist resend;
    bool reinflating; /* a re-inflation after a reset runs */
    uint64_t reinflate_start_ns, reinflate_total;
    uint64_t resets;
    /* Queue numbering: what the probe saw, what is used, and the indices. */
    const char *numbering, *numbering_used;
    unsigned hint_index, report_index;
    unsigned dev_reported;   /* queues whose used-length deviations were reported (bit per
                                enum balloon_q); counts survive resets (setup_queue) */
    uint32_t target;         /* num_pages as last read, clamped to what we can give */
    uint32_t device_target;  /* num_pages exactly as the device said */
    uint32_t actual;         /* pages the device has acknowledged as ballooned */
    uint32_t actual_written; /* last value written to the config's `actual` */
    uint32_t inflight_inflate, inflight_deflate; /* pages in buffers not yet used */
    enum balloon_state state;
    uint8_t *stats_buf;
    uint64_t target_changed_ns; /* when the current target was first seen */
    bool reached_logged, exhausted_logged;
    bool in_driver; /* inside balloon_poll/release: the reclaim hook must not re-enter */
    bool injected;  /* cfg.inject has been done */

    /* Free page hinting (spec 5.5.6.5): hinted blocks are the driver's until the host says DONE
     * (or memory runs short); their contents are then uninitialised. */
    bool has_hint_vq;
    struct virtqueue hint_vq;
    struct blocklist hinted;
    uint32_t *hint_ids;                       /* id slots the device reads (one page) */
    bool hint_id_busy[BALLOON_HINT_ID_SLOTS]; /* slot in flight */
    uint32_t hint_cmd_seen;                   /* free_page_hint_cmd_id as last read */
    uint32_t hint_active;                     /* the round being hinted, 0 when none */
    bool hint_stop_owed;                      /* a STOP id still has to go out */
    uint64_t hint_rounds, hint_released_pages, hint_round_pages;
    char violation[160];
    /* Free page reporting. */
    struct balloon_report reports[BALLOON_REPORT_CHAINS];
    uint64_t inflight_report;    /* pages in report chains the device has not used yet */
    uint64_t mm_activity;        /* allocs + frees of the allocator when last looked at */
    uint64_t mm_changed_ns;      /* when that count last moved */
    bool unsettled;              /* free memory changed since the last pass started */
    uint64_t unsettled_since_ns; /* the first such change */
    bool pass_active;            /* a pass is sending chains or waiting for them */
    bool pass_cut_short;         /* it stopped for the budget or an inflate, not for lack of
                                    blocks: another pass follows after the delay */
    uint64_t pass_start_ns, pass_pages, pass_chains;
    /* counters */
    uint64_t inflate_buffers, deflate_buffers, stats_updates, oom_deflated_pages;
    uint64_t reported_pages, report_chains, report_passes;
    uint64_t readonly_checked; /* used inflate/deflate buffers whose wire array was re-checked */
    /* Per-buffer latency by enum balloon_lat_kind; kept across device resets. */
    struct balloon_latency latency[BLAT_KINDS];
};

void balloon_default_config(struct balloon_config *cfg);
/* Negotiates features, sets up the queues, primes the stats buffer and sets DRIVER_OK.
 * Returns 0, or -1 (the reason is logged; b->violation is set for a protocol violation). */
int balloon_init(struct balloon *b, struct virtio_transport *t, struct buddy *mm,
                 const struct balloon_config *cfg);
/* What the caller learnt about the device since the last balloon_poll (VIRTIO_ISR_* bits: an
 * interrupt handler's ISR value, or a polling loop's own read of it). Used buffers are collected
 * on every call whatever the bits say (that is only memory reads); BALLOON_EV_CONFIG makes the
 * driver read the configuration (num_pages, the hint command id) and the device status. */
#define BALLOON_EV_QUEUE  VIRTIO_ISR_QUEUE
#define BALLOON_EV_CONFIG VIRTIO_ISR_CONFIG
/* One non-blocking round: collect acknowledgements, follow the target, answer stats requests. */
void balloon_poll(struct balloon *b, unsigned events);
/* What the device did that the driver has not seen yet, as BALLOON_EV_* bits: used buffers on a
 * queue that raises interrupts, or num_pages / the hint command id changed since last read (one
 * config read each). For a loop that asks whether an interrupt went missing (MSI-X has no ISR to
 * read); it changes nothing. */
unsigned balloon_unseen_events(struct balloon *b);
/* blimp.test.hold: when cfg holds `step` open, print the hold event and busy-wait (interrupts as
 * they are: off in the kernel) for that many ms. */
void balloon_hold(const struct balloon_config *cfg, enum balloon_hold step);
/* When balloon_poll must run next even if the device says nothing (platform_now_ns time):
 * the earliest ack deadline of a buffer or report in flight (stall detection), the end of
 * the reporting delay, free page hinting in progress (its queue raises no interrupts), or
 * "now" when work is waiting for the next poll. UINT64_MAX: only a device event (or a change
 * the caller makes, such as freeing memory) gives it something to do. */
uint64_t balloon_next_deadline_ns(const struct balloon *b);
/* Deflate-on-OOM: give back at least `pages` to the guest (telling the host first) when
 * DEFLATE_ON_OOM was negotiated. Returns the pages released (0 without the feature). When the
 * feature is negotiated, balloon_init registers this with the allocator as its reclaim hook
 * (buddy_set_reclaim), so every allocation that finds memory exhausted reaches it. */
uint64_t balloon_release_for_oom(struct balloon *b, uint64_t pages, uint64_t timeout_ns);
/* Reset the device now, as the recovery from DEVICE_NEEDS_RESET does (on_reset=recover): take
 * back every buffer in flight, bring the device up again and re-inflate every held page, then
 * follow the target again (event balloon_reset, cause "guest"). 0, or -1 when the driver is not
 * running (broken, or stopped for a reset) or the device did not come up again. */
int balloon_reset_device(struct balloon *b);
bool balloon_negotiated(const struct balloon *b, unsigned bit);
void balloon_get_status(const struct balloon *b, struct balloon_status *out);
const char *balloon_state_name(enum balloon_state s);
/* The latency histograms (a copy), indexed by enum balloon_lat_kind. */
void balloon_get_latency(const struct balloon *b, struct balloon_latency out[BLAT_KINDS]);
struct json;
/* Write "inflate":{...},"deflate":{...},"report":{...} into j's open object: count, min_us,
 * mean_us, p50_us, p90_us, p99_us, max_us and, with buckets, "buckets":[[lo_us,count],...] for
 * the non-empty buckets (docs/serial-output.md, balloon_latency). */
void balloon_latency_json(struct json *j, const struct balloon_latency lat[BLAT_KINDS],
                          bool buckets);
/* The whole balloon_latency event into j, ready for event_emit: with the buckets, or, when the
 * line would not fit JSON_LINE_MAX, without them and with "buckets_omitted":true. */
void balloon_latency_event(struct json *j, const struct balloon_latency lat[BLAT_KINDS]);
/* Print b's balloon_latency event (platform_log): for a mode with its own struct balloon (one
 * on balloon mode's loop calls balloon_mode_emit_latency, kernel/balloon_mode.h). */
void balloon_emit_latency(const struct balloon *b);
/* Fills the 10-byte stats entries; returns the byte count. */
unsigned balloon_fill_stats(const struct balloon *b, uint8_t *out);

#endif
