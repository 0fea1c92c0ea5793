/*
 * Physical page allocator: a binary buddy system over every usable RAM page, orders 0 (4 KiB)
 * to BUDDY_MAX_ORDER (1 GiB), lowest address first.
 *
 * No metadata lives inside free pages: free pages may be reported to the host, which discards
 * them (they read back as zero), so free-list links stored in them would be destroyed. All state
 * is in one caller-provided buffer:
 *  - per order, two bitmaps with one bit per naturally aligned block of the span: "free and
 *    unreported" and "free and reported" (a free block is in exactly one of them, so the hot
 *    paths touch only the first and finding an unreported block is a plain search). Each has
 *    summary levels (bit i of level L+1 set <=> word i of level L non-zero), so finding the
 *    lowest set bit is one ctz per level (at most 6 levels for 2^30 pages), and set/clear only
 *    walk upward when a word changes between zero and non-zero (clearing lazily, see buddy.c);
 *    a per-bitmap hint usually finds the lowest bit with one load;
 *  - one byte per page: order + ALLOCATED for allocated block heads, UNMANAGED for holes. It lets
 *    buddy_free reject bad arguments instead of corrupting state.
 * About 1.51 bytes of metadata per 4 KiB page (0.037 %).
 *
 * Backed and unbacked free memory. The second free set ("reported", for the free page
 * reporting it started with) holds every free block the host does not back: reported blocks
 * (buddy_free_reported), memory never touched since boot (buddy_add_range_untouched), and what
 * the balloon got back from the host (deflated, or hinted during a migration). Allocating any
 * part of such a block clears the state of the allocated part; splitting keeps the remaining
 * halves in it. Free buddies merge only when both are in the same state: a merged block must
 * neither claim backing it lacks nor hide backing it has (two reported halves make a reported
 * block, not reported again). A backed and an unbacked buddy stay apart until an allocation
 * needs the larger block (buddy_coalesce_mixed).
 * Allocation takes backed blocks first (no host fault on first touch, and unbacked memory stays
 * unbacked); buddy_alloc_largest, which inflate uses, too: ballooning backed memory is what gives
 * the host memory back.
 *
 * Not thread-safe: the caller serialises all calls.
 */
#ifndef BLIMP_MM_BUDDY_H
#define BLIMP_MM_BUDDY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define BUDDY_MAX_ORDER 18
#define BUDDY_NONE      UINT64_MAX /* "no pfn" */

/* Enough summary levels for 64^8 = 2^48 blocks, far beyond the 2^40 pages of 52-bit physical. */
#define BUDDY_BM_LEVELS 8

/* Per-page state byte (exposed for tests and debugging). */
#define BUDDY_PG_ORDER_MASK 0x1f
#define BUDDY_PG_ALLOCATED  0x20 /* head page of an allocated block; order in the low bits */
#define BUDDY_PG_UNMANAGED  0x80 /* not usable RAM: never free, never merged with */

struct buddy_bitmap {
    /* lv[0] is the bitmap, lv[nlv - 1] a single word, lv[nlv] a shared never-zero sentinel. */
    uint64_t *lv[BUDDY_BM_LEVELS + 1];
    uint64_t hint;  /* no bit below it is set: searches start here */
    uint64_t count; /* bits set in lv[0] */
    uint64_t pend;  /* the one path whose summary bits may be stale (see buddy.c) */
    unsigned nlv;
    uint64_t nbits[BUDDY_BM_LEVELS]; /* valid bits per level */
};

struct buddy_order {
    uint64_t bias;              /* bit index of the block at pfn is (pfn >> order) - bias */
    struct buddy_bitmap set[2]; /* [0]: free, backed; [1]: free, not backed (reported, ...) */
};

/*
 * Reclaim hook: called when an allocation finds no block, with the number of pages the request
 * needs; returns the pages it gave back to the allocator (0: none). The balloon registers its
 * deflate-on-OOM here, so every allocation in the kernel (agent memory, record pages, rings,
 * page tables) reaches it. Never re-entered: allocations made inside the hook fail normally.
 */
typedef uint64_t (*buddy_reclaim_fn)(void *ctx, uint64_t pages);
#define BUDDY_RECLAIM_ROUNDS 4 /* reclaim and retry at most this often per allocation */

struct buddy {
    uint64_t base_pfn, end_pfn; /* the span */
    uint32_t mask[2];           /* bit k set <=> ord[k].set[i] is not empty */
    bool poison;
    uint8_t *page;     /* one state byte per page of the span */
    uint64_t sentinel; /* never zero: ends summary updates above each bitmap's top level */
    struct buddy_order ord[BUDDY_MAX_ORDER + 1];

    uint64_t span_pages, total_pages, free_pages, reported_pages;
    uint64_t allocs, frees, failures, invalid_frees;
    size_t meta_bytes;
    uint64_t poison_pattern;
    uint64_t poison_errors;
    uint64_t poison_bad_phys; /* first bad byte of the latest mismatching block, or BUDDY_NONE */
    buddy_reclaim_fn reclaim;
    void *reclaim_ctx;
    bool reclaiming;
    bool reported_keep_content; /* verify reported blocks too (buddy_set_reported_keep_content) */
    uint64_t reclaimed_pages;
};

/* Bytes of metadata needed for a span of span_pages (whatever its base pfn), or 0 if too big. */
size_t buddy_meta_bytes(uint64_t span_pages);

/*
 * base_pfn..base_pfn+span_pages covers all RAM (holes included); meta must be buddy_meta_bytes()
 * long and 8-byte aligned. All pages start unmanaged. Returns 0, or -1 if meta is too small or
 * misaligned, or the span is empty or too large.
 */
int buddy_init(struct buddy *b, void *meta, size_t meta_bytes, uint64_t base_pfn,
               uint64_t span_pages);

/*
 * Declare [pfn, pfn+count) usable and free it as the largest naturally aligned blocks (merging
 * with adjacent free blocks). Clips to the span; pages that are already managed are skipped.
 */
void buddy_add_range(struct buddy *b, uint64_t pfn, uint64_t count);

/* Register (fn) or remove (NULL) the reclaim hook. */
void buddy_set_reclaim(struct buddy *b, buddy_reclaim_fn fn, void *ctx);

/* Like buddy_add_range, for memory nobody has written since boot (the host does not back it). */
void buddy_add_range_untouched(struct buddy *b, uint64_t pfn, uint64_t count);

/*
 * Free buddies in different states (one backed, one not) stay apart. An allocation that finds
 * no block calls this before giving up: it merges every such pair into a backed block (filling
 * the unbacked half when poisoning), cascading upward. Returns whether anything merged.
 */
bool buddy_coalesce_mixed(struct buddy *b);

/* Allocate a naturally aligned block of 2^order pages: its first pfn, or BUDDY_NONE (after
 * the reclaim hook, if any, could not help). */
uint64_t buddy_alloc(struct buddy *b, unsigned order);

/*
 * Allocate the largest free block of order <= max_order, backed blocks first: a block of
 * max_order (split from a larger one if needed) when there is one, else the lowest block of the
 * largest free order below it; only then the same among unbacked blocks. *order_out gets its
 * order. For balloon inflate. BUDDY_NONE if nothing is free.
 */
uint64_t buddy_alloc_largest(struct buddy *b, unsigned max_order, unsigned *order_out);

/*
 * Free a block returned by an allocation function with the same order. Returns 0, or -1 (logged,
 * state unchanged) on a pfn that is out of the span, unaligned, unmanaged, not an allocated block
 * head (double free) or allocated with another order.
 */
int buddy_free(struct buddy *b, uint64_t pfn, unsigned order);

/*
 * Walk free blocks of order >= min_order: orders from the largest down, ascending address within
 * an order; stop when fn returns non-zero. The callback must not modify the allocator.
 */
typedef int (*buddy_walk_fn)(void *ctx, uint64_t pfn, unsigned order, bool reported);
void buddy_walk_free(const struct buddy *b, unsigned min_order, buddy_walk_fn fn, void *ctx);

/*
 * Take (allocate, without splitting) one free unreported block of order >= min_order, largest
 * order first, lowest address within it; BUDDY_NONE if none. Used by free page reporting: take,
 * report to the host, then give back with buddy_free_reported(). Not counted in allocs/frees.
 */
uint64_t buddy_take_unreported(struct buddy *b, unsigned min_order, unsigned *order_out);

/* Pages in free unreported blocks of order >= min_order (what a reporting pass could take). */
uint64_t buddy_unreported_pages(const struct buddy *b, unsigned min_order);

/* Order of the block buddy_take_unreported(b, min_order, ...) would take next, or -1. */
int buddy_next_unreported_order(const struct buddy *b, unsigned min_order);

/*
 * Free a block and mark it reported. If it merges with a free buddy the result is not reported
 * (the merge rule wins). Same validation as buddy_free. Poisoning does not fill it (that would
 * make the host populate the discarded pages again), unless it merges.
 */
int buddy_free_reported(struct buddy *b, uint64_t pfn, unsigned order);

/* Split an allocated block of the given order into two allocated blocks of order - 1, so
 * that its halves can be freed separately (the balloon returns part of a block). 0 or -1. */
int buddy_split(struct buddy *b, uint64_t pfn, unsigned order);

/* Is this page inside some free block? */
bool buddy_is_free(const struct buddy *b, uint64_t pfn);

struct buddy_stats {
    uint64_t total_pages, free_pages, reported_pages, meta_bytes;
    uint64_t free_blocks[BUDDY_MAX_ORDER + 1];
    uint64_t allocs, frees, failures, poison_errors;
};
/* failures counts allocations that returned BUDDY_NONE (invalid frees: b->invalid_frees). */
void buddy_get_stats(const struct buddy *b, struct buddy_stats *out);

/*
 * Poisoning (debug): when on, every freed block is filled with the 64-bit pattern and every
 * allocated (or taken) unreported block is verified; a mismatch logs "poison mismatch at
 * 0x<phys>: expected 0x.. found 0x.." once per block, where phys is the first differing byte and
 * the values are the 64-bit words at it, and counts poison_errors. Reported blocks are NOT
 * verified: the host may have discarded them, so they read back as zero. When a reported block
 * merges into an unreported one it is filled again. Turning poisoning on fills all free pages.
 */
void buddy_set_poison(struct buddy *b, bool on, uint64_t pattern);

/* Whether the host keeps the contents of reported blocks (PAGE_POISON with a non-zero
 * poison_val): with poisoning on they are then verified on allocation too, so a host that
 * discards them anyway is caught with the address. */
void buddy_set_reported_keep_content(struct buddy *b, bool keep);

#endif
