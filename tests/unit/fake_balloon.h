/*
 * A virtio memory balloon device model (device type 5) on top of fake_transport, for host unit
 * tests of virtio/balloon.c. It plays QEMU's part of the protocol (docs: balloon-protocol.md
 * sections 2-4) and checks the driver's part while doing so:
 *
 *  - inflateq / deflateq: on notify it pops every available buffer, copies its PFN array (le32
 *    each) -- or, with VIRTIO_BALLOON_F_X_CHUNKS negotiated, its chunk array, checked against
 *    every rule of docs/chunked-inflate.md and expanded to the pages it names -- and, unless told
 * to hold the buffers, completes them at once with used len 0. On completion it validates every PFN
 * (inside the guest's RAM; not already in the balloon for inflate; in the balloon for deflate),
 * keeps a per-page bitmap of ballooned pages and a log of every buffer it processed. A page handed
 * over for inflation is filled with a canary when the device pops its buffer (the device owns it
 * from then on); when the page is deflated (at the deflate buffer's completion) the canary must
 * still be there, so a driver that touched a ballooned page is caught. Deflated pages then read
 * back as zero (as after QEMU's discard).
 *  - reporting_vq (VIRTIO_BALLOON_F_PAGE_REPORTING): on pop it checks every descriptor of a chain
 *    (device-writable, non-empty, 4 KiB-aligned, inside RAM, not in the balloon, not overlapping
 *    any block the device holds for another report or this one, and -- with fb->mm set -- not
 *    free in the driver's allocator: the driver promised to hold it out of the allocator) and
 *    fills the pages with the canary; on completion the canary must be intact and the pages
 *    still held out of the allocator (the driver must not reuse a block before the device used
 *    the chain), then they are discarded -- zeroed, as QEMU does with poison_val 0 -- and the
 *    chain completes with used len 0. hold_reports keeps chains unanswered.
 *  - statsq: the device keeps the one buffer the driver gives it and parses its 10-byte entries;
 *    fake_balloon_request_stats() returns it (used len 0) so the driver refreshes it.
 *  - config: num_pages (offset 0) set by the test, actual (offset 4) written by the driver.
 *  - misbehaviour knobs: hold buffers (answer later with fake_balloon_answer, or never), and a
 *    one-shot broken used-ring entry per queue.
 *
 * Driver mistakes the model sees are counted in `errors` (first message kept); protocol-level
 * ring mistakes are in the fake_vq's own `errors`, transport-level ones in ft->driver_errors.
 */
#ifndef BLIMP_FAKE_BALLOON_H
#define BLIMP_FAKE_BALLOON_H

#include <stdbool.h>
#include <stdint.h>

#include "tests/unit/fake_transport.h"

struct buddy;

/* Queue roles (the index on the device is fb->qidx[role]). */
enum fb_role {
    FB_INFLATE = 0,
    FB_DEFLATE = 1,
    FB_STATS = 2,
    FB_HINT = 3,
    FB_REPORT = 4,
    FB_ROLES = 5
};

/* Free page hinting, as QEMU's device runs it (balloon-protocol.md 4.6). */
enum fb_hint_status { FB_HINT_STOP, FB_HINT_REQUESTED, FB_HINT_START, FB_HINT_DONE };

/* One-shot broken used-ring entries, applied at the next completion on a queue. */
enum fb_misbehave {
    FB_OK = 0,
    FB_BAD_ID_RANGE,  /* used id >= queue size; the buffer stays held */
    FB_BAD_ID_FREE,   /* used id of a descriptor that is not in flight; the buffer stays held */
    FB_LEN_TOO_LARGE, /* processes the buffer but reports used len = bytes read (old QEMU) */
    FB_IDX_JUMP,      /* used.idx jumps by more than the queue size; the buffer stays held */
};

#define FB_MAX_STATS  64
#define FB_NO_QUEUE   0xffffffffu
#define FB_CANARY_KEY 0xba110011ca9a7e00ULL

/* An inflate/deflate buffer the device processed, as it read it. */
struct fb_buffer {
    enum fb_role role;
    unsigned n;       /* pages */
    uint32_t *pfns;   /* the pages, in the order the buffer named them */
    unsigned nchunks; /* chunked buffers: how many chunks named them (0: a PFN array) */
};

/* One block of a report chain the device completed. */
struct fb_report_block {
    uint64_t addr, len;
    unsigned chain; /* index of its chain among all completed chains */
};

/* What the device read from a buffer when it popped it (indexed by head descriptor). */
struct fb_snapshot {
    bool valid;
    unsigned n;
    uint32_t *pfns;
    unsigned nchunks;
    uint8_t *raw; /* the bytes as read, to see the driver change them while the device holds them */
    size_t raw_len;
};

struct fake_balloon {
    struct fake_transport *ft;
    uint64_t ram_pfn, ram_pages; /* the guest's RAM, in 4 KiB frames */
    uint8_t *ballooned;          /* per RAM page: in the balloon */
    uint64_t balloon_pages;      /* pages in the balloon now */
    unsigned qidx[FB_ROLES];     /* device queue index per role (FB_NO_QUEUE: absent) */

    /* Knobs. */
    bool hold[2];                          /* inflate/deflate: keep popped buffers unanswered */
    enum fb_misbehave misbehave[FB_ROLES]; /* one-shot, cleared when applied */
    bool zero_on_deflate;                  /* deflated pages read back zero (default true) */
    bool hold_reports;                     /* keep popped report chains unanswered */
    bool discard_reports;                  /* reported pages read back zero (default true) */
    const struct buddy *mm; /* the driver's allocator: reported blocks must not be free in it */
    /* QEMU before 7.0: the used length of inflate, deflate and stats buffers is the number of
     * bytes read (x-used-len-bytes-read on the reference host). */
    bool used_len_bytes_read;

    /* Broken, as QEMU's virtio_error leaves a device (a malformed ring, or fake_balloon_break):
     * nothing is popped or answered until the driver resets it; on the modern interface the
     * device also set DEVICE_NEEDS_RESET and raised a config interrupt. */
    bool broken;
    unsigned breaks, resets;  /* times broken; driver resets seen */
    uint64_t forgotten_pages; /* ballooned pages resets made the device forget */

    /* What the device saw. */
    struct fb_buffer *log; /* every processed inflate/deflate buffer, oldest first */
    unsigned nlog, caplog;
    struct fb_snapshot *snap[2]; /* per role, per head */
    uint16_t snap_size[2];
    uint64_t inflated_pages, deflated_pages; /* totals over all processed buffers */
    unsigned max_pfns;                       /* largest buffer seen */
    unsigned chunk_buffers, max_chunks;      /* chunked buffers seen, most chunks in one */
    unsigned actual_writes;                  /* driver writes of `actual` */
    uint32_t poison_val;                     /* as the driver wrote it (PAGE_POISON) */
    unsigned poison_val_writes;
    unsigned canary_errors;

    /* Free page reporting. */
    uint8_t *reporting;              /* per RAM page: in a report chain the device holds */
    struct fb_report_block *reports; /* every block of every completed chain, in order */
    unsigned nreports, capreports;
    unsigned report_chains;          /* chains completed */
    unsigned indirect_report_chains; /* of which came through an indirect table */
    unsigned max_report_blocks;      /* most blocks in one chain */
    uint64_t reported_pages;         /* pages in completed chains */
    uint64_t report_pages_held;      /* pages in chains the device holds now */

    /* Stats. */
    bool stats_held;
    unsigned stats_buffers; /* stats buffers received */
    unsigned stats_requests;
    unsigned n_stats;
    uint16_t stat_tag[FB_MAX_STATS];
    uint64_t stat_val[FB_MAX_STATS];

    /* Free page hinting: the device's status and id, and which pages were hinted since the
     * last DONE (a page hinted twice in one round is a driver error). */
    enum fb_hint_status hint_status;
    uint32_t hint_cmd_id;
    uint8_t *hinted; /* per RAM page */
    uint64_t hinted_pages, hint_buffers;
    unsigned hint_starts;    /* rounds the driver started with the host's id */
    unsigned hint_stops;     /* STOP ids the driver sent */
    unsigned hint_stale_ids; /* ids that did not fit the device's state (ignored) */

    /* Driver mistakes (first message kept). */
    unsigned errors;
    char error[256];

    void *user; /* for tests that chain their own hooks (hook_arg is the model) */
};

/*
 * Attach the model to ft (already fake_transport_init'ed with the features to offer): installs
 * on_notify and on_config_write, and declares the queues the offered features create, numbered
 * compactly as QEMU does (0 inflateq, 1 deflateq, then statsq, free_page_vq, reporting_vq by the
 * offered STATS_VQ, FREE_PAGE_HINT, PAGE_REPORTING), each with max size queue_size (free page
 * vq: 1024, reporting vq: 32, like QEMU). RAM is [ram_base_phys, ram_base_phys + ram_bytes).
 */
void fake_balloon_init(struct fake_balloon *fb, struct fake_transport *ft, uint64_t ram_base_phys,
                       uint64_t ram_bytes, uint16_t queue_size);
/* Renumber the queues after deflateq as crosvm did until 2025: statsq 2, free_page_vq 3,
 * reporting_vq 4, whatever is offered. With placeholder, a queue 3 of size 128 exists even when
 * hinting is not offered (as on the reference host's x-fixed-queue-index); a buffer there is a
 * driver error. Call right after fake_balloon_init. */
void fake_balloon_number_fixed(struct fake_balloon *fb, bool placeholder);
/* The device breaks as after QEMU's virtio_error: see `broken`. */
void fake_balloon_break(struct fake_balloon *fb);
void fake_balloon_fini(struct fake_balloon *fb); /* frees the model's memory (not ft's) */

/* The host sets num_pages (bumps the config generation, raises a config interrupt). */
void fake_balloon_set_target(struct fake_balloon *fb, uint32_t pages);
/* The `actual` field as the driver last wrote it. */
uint32_t fake_balloon_actual(const struct fake_balloon *fb);

/* Pop what the driver published on a role's queue (what a notify does); returns the count. */
unsigned fake_balloon_pop(struct fake_balloon *fb, enum fb_role role);
/* Buffers the device holds unanswered on an inflate/deflate queue. */
unsigned fake_balloon_held(struct fake_balloon *fb, enum fb_role role);
/* Complete up to max held buffers of an inflate/deflate queue, oldest first; returns the count. */
unsigned fake_balloon_answer(struct fake_balloon *fb, enum fb_role role, unsigned max);
/* Return the held stats buffer (used len 0): false if the device holds none. */
bool fake_balloon_request_stats(struct fake_balloon *fb);

bool fake_balloon_is_ballooned(const struct fake_balloon *fb, uint64_t pfn);

/* The host's side of a hinting round: request one (a new id >= 0x80000001 in
 * free_page_hint_cmd_id, config interrupt), STOP it, or say DONE (hinted pages are the
 * driver's again). Each returns the id written. */
uint32_t fake_balloon_hint_request(struct fake_balloon *fb);
uint32_t fake_balloon_hint_stop(struct fake_balloon *fb);
uint32_t fake_balloon_hint_done(struct fake_balloon *fb);
bool fake_balloon_is_hinted(const struct fake_balloon *fb, uint64_t pfn);

/*
 * The device's check of a chunk array (docs/chunked-inflate.md section 4): length a non-zero
 * multiple of 16, at most BALLOON_MAX_CHUNKS chunks, each non-empty, 4 KiB-aligned, not
 * wrapping, after the previous one without overlap, and inside the guest's RAM. Returns the
 * number of pages named, or -1 with the broken rule in why.
 */
int64_t fake_balloon_check_chunks(const struct fake_balloon *fb, const void *raw, size_t len,
                                  char *why, size_t why_size);
/* Value of a stat tag in the latest stats buffer; false if absent. */
bool fake_balloon_stat(const struct fake_balloon *fb, uint16_t tag, uint64_t *val);
/* Check the canary of every page now in the balloon; returns the number of bad pages. */
unsigned fake_balloon_check_canaries(struct fake_balloon *fb);

#endif
