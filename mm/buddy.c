/* Buddy page allocator; see buddy.h for the design. */
#include "mm/buddy.h"

#include "include/platform.h"

/* 52-bit physical addresses: 2^40 page frames. A bitmap of 2^40 bits needs 7 levels of 64-bit
 * words, so every bitmap fits in BUDDY_BM_LEVELS (8). */
#define PFN_LIMIT (1ULL << 40)

#define HOT         static inline __attribute__((always_inline))
#define LIKELY(x)   __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)

/* ---- Bitmaps with summary levels ---------------------------------------------------------- */

HOT bool bm_test(const struct buddy_bitmap *m, uint64_t i)
{
    return (m->lv[0][i >> 6] >> (i & 63)) & 1;
}

/*
 * Summary bits are exact except along one "pending" path per bitmap: when a clear empties a word,
 * the summary bits above it are left set and only cleared (flushed) when another word empties.
 * Alternating set/clear in one area, the common pattern, then costs one or two word updates
 * instead of a walk to the top. Invariants: a non-zero word always has its summary bit set (so
 * set can stop at the first word that was non-zero); a set summary bit over a zero word exists
 * only on the pending path (so a search meets at most one such dead end per level).
 *
 * lv[nlv] points at a sentinel word that is never zero, so the loops stop there without checking
 * the level count: the top level's index is always 0, so only the sentinel's bit 0 moves.
 */
HOT void bm_set(struct buddy_bitmap *m, uint64_t i)
{
    if (i < m->hint)
        m->hint = i;
    uint64_t *const *lv = m->lv;
    for (;;) {
        uint64_t *w = &(*lv++)[i >> 6];
        uint64_t old = *w;
        *w = old | (1ULL << (i & 63));
        if (old) /* the summary above already has this word's bit */
            return;
        i >>= 6;
    }
}

/* Clear the summary bits above the pending path's words that are (still) empty. */
static void bm_flush(struct buddy_bitmap *m)
{
    uint64_t i = m->pend;
    uint64_t *const *lv = m->lv;
    while (!(*lv)[i >> 6]) {
        i >>= 6;
        (*++lv)[i >> 6] &= ~(1ULL << (i & 63));
    }
}

HOT void bm_clear(struct buddy_bitmap *m, uint64_t i)
{
    uint64_t *w = &m->lv[0][i >> 6];
    uint64_t now = *w & ~(1ULL << (i & 63));
    *w = now;
    if (now)
        return;
    if ((m->pend ^ i) >> 6) /* another word than the pending one: settle that first */
        bm_flush(m);
    m->pend = i;
}

/*
 * Lowest set bit whose ancestor at level l has index >= i, or BUDDY_NONE: climb while the rest of
 * a word is empty, then descend with one ctz per level. A summary bit over an empty word (the
 * pending path) sends the search on from the next bit at that level.
 */
static uint64_t bm_next_at(const struct buddy_bitmap *m, unsigned l, uint64_t i)
{
    for (;;) {
        for (;;) {
            if (l >= m->nlv || i >= m->nbits[l])
                return BUDDY_NONE;
            uint64_t w = m->lv[l][i >> 6] & (~0ULL << (i & 63));
            if (w) {
                i = (i & ~(uint64_t)63) | (uint64_t)__builtin_ctzll(w);
                break;
            }
            i = (i >> 6) + 1; /* next word of this level = next bit of the level above */
            l++;
        }
        for (;;) {
            if (l == 0)
                return i;
            uint64_t w = m->lv[l - 1][i];
            if (!w) {
                i++; /* dead end on the pending path */
                break;
            }
            i = (i << 6) | (uint64_t)__builtin_ctzll(w);
            l--;
        }
    }
}

static inline uint64_t bm_next(const struct buddy_bitmap *m, uint64_t i)
{
    return bm_next_at(m, 0, i);
}

/* Lowest set bit of a non-empty bitmap; usually one load thanks to the hint. */
HOT uint64_t bm_first(struct buddy_bitmap *m)
{
    uint64_t i = m->hint;
    uint64_t w = m->lv[0][i >> 6] & (~0ULL << (i & 63));
    if (LIKELY(w))
        i = (i & ~(uint64_t)63) | (uint64_t)__builtin_ctzll(w);
    else
        i = bm_next_at(m, 1, (i >> 6) + 1);
    m->hint = i;
    return i;
}

/* ---- Free block sets ---------------------------------------------------------------------- */

/* Add block i of order k to set rep (0: unreported, 1: reported). Page counters: callers. */
HOT void set_add(struct buddy *b, unsigned k, unsigned rep, uint64_t i)
{
    struct buddy_bitmap *m = &b->ord[k].set[rep];
    if (m->count++ == 0)
        b->mask[rep] |= 1u << k;
    bm_set(m, i);
}

HOT void set_del(struct buddy *b, unsigned k, unsigned rep, uint64_t i)
{
    struct buddy_bitmap *m = &b->ord[k].set[rep];
    if (--m->count == 0)
        b->mask[rep] &= ~(1u << k);
    bm_clear(m, i);
}

HOT uint64_t blk_index(const struct buddy *b, uint64_t pfn, unsigned k)
{
    return (pfn >> k) - b->ord[k].bias;
}

HOT uint64_t blk_pfn(const struct buddy *b, uint64_t i, unsigned k)
{
    return (i + b->ord[k].bias) << k;
}

/* Remove the lowest free block of order k from set r (it has one). */
HOT uint64_t take_lowest(struct buddy *b, unsigned k, unsigned r)
{
    uint64_t i = bm_first(&b->ord[k].set[r]);
    set_del(b, k, r, i);
    return blk_pfn(b, i, k);
}

/* ---- Poisoning (debug; kept out of the hot paths) ----------------------------------------- */

static void poison_fill(const struct buddy *b, uint64_t pfn, unsigned k)
{
    uint64_t pat = b->poison_pattern;
    for (uint64_t p = pfn; p < pfn + (1ULL << k); p++) {
        uint64_t *w = phys_to_virt(p << PAGE_SHIFT);
        for (unsigned i = 0; i < PAGE_SIZE / 8; i++)
            w[i] = pat;
    }
}

static void poison_check(struct buddy *b, uint64_t pfn, unsigned k)
{
    uint64_t pat = b->poison_pattern;
    for (uint64_t p = pfn; p < pfn + (1ULL << k); p++) {
        const uint64_t *w = phys_to_virt(p << PAGE_SHIFT);
        for (unsigned i = 0; i < PAGE_SIZE / 8; i++) {
            if (w[i] == pat)
                continue;
            /* x86 is little-endian: the lowest differing bit is in the first differing byte. */
            uint64_t phys =
                (p << PAGE_SHIFT) + i * 8 + ((unsigned)__builtin_ctzll(w[i] ^ pat) >> 3);
            platform_log("poison mismatch at 0x%llx: expected 0x%016llx found 0x%016llx",
                         (unsigned long long)phys, (unsigned long long)pat,
                         (unsigned long long)w[i]);
            b->poison_errors++;
            b->poison_bad_phys = phys;
            return; /* once per block */
        }
    }
}

/* ---- Core --------------------------------------------------------------------------------- */

/*
 * Insert a free block, merging with free buddies as far as possible. The caller has accounted
 * its pages in free_pages and, with poisoning on, filled it unless rep. No span check is needed:
 * a free buddy lies inside the span, so the merged block does too, and the guard bits around
 * each bitmap keep the buddy index of an edge block in range.
 */
HOT void insert_block(struct buddy *b, uint64_t pfn, unsigned k, unsigned rep)
{
    for (; k < BUDDY_MAX_ORDER; k++) {
        struct buddy_order *o = &b->ord[k];
        uint64_t i = ((pfn >> k) ^ 1) - o->bias; /* the buddy */
        /* Only with a buddy in the same state: a merged block must not claim backing it lacks
         * (inflate would return less than it takes) nor hide backing it has (reporting would
         * never return it). buddy_coalesce_mixed() merges across states when an allocation needs
         * it. */
        if (!bm_test(&o->set[rep], i))
            break;
        set_del(b, k, rep, i);
        if (rep)
            b->reported_pages -= 1ULL << k;
        pfn &= ~(1ULL << k);
    }
    set_add(b, k, rep, blk_index(b, pfn, k));
    if (rep)
        b->reported_pages += 1ULL << k;
}

/* Mark a block just removed from the free sets as allocated. */
HOT uint64_t finish_take(struct buddy *b, uint64_t pfn, unsigned k, unsigned rep)
{
    b->page[pfn - b->base_pfn] = (uint8_t)(BUDDY_PG_ALLOCATED | k);
    b->free_pages -= 1ULL << k;
    if (rep)
        b->reported_pages -= 1ULL << k;
    if (UNLIKELY(b->poison) && (!rep || b->reported_keep_content))
        poison_check(b, pfn, k);
    return pfn;
}

/* Ask the reclaim hook for pages; false when there is none, it is already running (the hook's own
 * allocations draw on what is left), or it gave nothing back. */
static bool __attribute__((noinline)) try_reclaim(struct buddy *b, uint64_t pages)
{
    if (!b->reclaim || b->reclaiming)
        return false;
    b->reclaiming = true;
    uint64_t got = b->reclaim(b->reclaim_ctx, pages);
    b->reclaiming = false;
    b->reclaimed_pages += got;
    return got > 0;
}

void buddy_set_reclaim(struct buddy *b, buddy_reclaim_fn fn, void *ctx)
{
    b->reclaim = fn;
    b->reclaim_ctx = ctx;
}

/* Backed blocks first (memory the host already provides: no fault on first touch, and what is
 * not backed stays so); within a set the smallest order that fits, lowest address. */
HOT uint64_t alloc_exact(struct buddy *b, unsigned order)
{
    unsigned rep = 0;
    uint32_t avail = b->mask[0] >> order;
    if (UNLIKELY(!avail)) {
        rep = 1;
        avail = b->mask[1] >> order;
        if (UNLIKELY(!avail))
            return BUDDY_NONE;
    }
    unsigned k = order + (unsigned)__builtin_ctz(avail);
    uint64_t pfn = take_lowest(b, k, rep);
    /* Keep the lower half each time; upper halves keep the reported state of the whole. */
    while (k > order) {
        k--;
        set_add(b, k, rep, blk_index(b, pfn, k) + 1);
    }
    b->allocs++;
    return finish_take(b, pfn, order, rep);
}

/*
 * The slow path of an allocation that found no block: merge free buddies that differ only in
 * backing (each pair into a backed block, the unbacked half filled with poison when poisoning),
 * lowest orders first so merges cascade. Returns whether anything merged.
 */
bool buddy_coalesce_mixed(struct buddy *b)
{
    bool merged = false;
    for (unsigned k = 0; k < BUDDY_MAX_ORDER; k++) {
        struct buddy_order *o = &b->ord[k];
        for (uint64_t i = bm_next(&o->set[1], 0); i != BUDDY_NONE; i = bm_next(&o->set[1], i + 1)) {
            uint64_t pfn = blk_pfn(b, i, k);
            uint64_t bud = ((pfn >> k) ^ 1) - o->bias;
            if (!bm_test(&o->set[0], bud))
                continue;
            set_del(b, k, 1, i);
            set_del(b, k, 0, bud);
            b->reported_pages -= 1ULL << k;
            if (b->poison)
                poison_fill(b, pfn, k);
            insert_block(b, pfn & ~(1ULL << k), k + 1, 0);
            merged = true;
        }
    }
    return merged;
}

uint64_t buddy_alloc(struct buddy *b, unsigned order)
{
    if (UNLIKELY(order > BUDDY_MAX_ORDER)) {
        b->failures++;
        return BUDDY_NONE;
    }
    uint64_t pfn = alloc_exact(b, order);
    if (UNLIKELY(pfn == BUDDY_NONE) && order > 0 && b->free_pages >= 1ull << order &&
        buddy_coalesce_mixed(b))
        pfn = alloc_exact(b, order);
    for (unsigned round = 0; UNLIKELY(pfn == BUDDY_NONE); round++) {
        if (round == BUDDY_RECLAIM_ROUNDS || !try_reclaim(b, 1ull << order)) {
            b->failures++;
            return BUDDY_NONE;
        }
        pfn = alloc_exact(b, order);
    }
    return pfn;
}

uint64_t buddy_alloc_largest(struct buddy *b, unsigned max_order, unsigned *order_out)
{
    if (max_order > BUDDY_MAX_ORDER)
        max_order = BUDDY_MAX_ORDER;
    /* Backed memory first (inflating it is what gives the host memory back), largest first. */
    for (unsigned r = 0; r < 2; r++) {
        if (b->mask[r] >> max_order) {
            /* At least as big as max_order: split it down like a plain allocation. */
            if (order_out)
                *order_out = max_order;
            return alloc_exact(b, max_order);
        }
        if (b->mask[r]) {
            unsigned k = 31 - (unsigned)__builtin_clz(b->mask[r]);
            uint64_t pfn = take_lowest(b, k, r);
            b->allocs++;
            if (order_out)
                *order_out = k;
            return finish_take(b, pfn, k, r);
        }
    }
    /* Nothing at all: any block will do, so one page is what must come back. */
    if (!try_reclaim(b, 1ull << max_order) || !(b->mask[0] | b->mask[1])) {
        b->failures++;
        return BUDDY_NONE;
    }
    return buddy_alloc_largest(b, max_order, order_out);
}

uint64_t buddy_take_unreported(struct buddy *b, unsigned min_order, unsigned *order_out)
{
    if (min_order > BUDDY_MAX_ORDER)
        return BUDDY_NONE;
    uint32_t avail = b->mask[0] >> min_order << min_order;
    if (!avail)
        return BUDDY_NONE;
    unsigned k = 31 - (unsigned)__builtin_clz(avail);
    uint64_t i = bm_first(&b->ord[k].set[0]);
    set_del(b, k, 0, i);
    if (order_out)
        *order_out = k;
    return finish_take(b, blk_pfn(b, i, k), k, 0);
}

uint64_t buddy_unreported_pages(const struct buddy *b, unsigned min_order)
{
    uint64_t pages = 0;
    for (unsigned k = min_order; k <= BUDDY_MAX_ORDER; k++)
        pages += b->ord[k].set[0].count << k;
    return pages;
}

int buddy_next_unreported_order(const struct buddy *b, unsigned min_order)
{
    if (min_order > BUDDY_MAX_ORDER)
        return -1;
    uint32_t avail = b->mask[0] >> min_order << min_order;
    return avail ? 31 - __builtin_clz(avail) : -1;
}

/* Explain and log a rejected free (cold path: the fast check only says "something is wrong"). */
static int __attribute__((noinline))
bad_free(struct buddy *b, uint64_t pfn, unsigned order, const char *who)
{
    const char *why;
    uint64_t off = pfn - b->base_pfn;
    uint8_t st = 0;
    if (order > BUDDY_MAX_ORDER)
        why = "order too large";
    else if (off >= b->span_pages || b->span_pages - off < (1ULL << order))
        why = "outside the RAM span";
    else if (pfn & ((1ULL << order) - 1))
        why = "unaligned for its order";
    else if ((st = b->page[off]) & BUDDY_PG_UNMANAGED)
        why = "not usable RAM";
    else if (!(st & BUDDY_PG_ALLOCATED))
        why = "not allocated (double free?)";
    else
        why = "allocated with another order";
    platform_log("buddy: %s(pfn 0x%llx, order %u) rejected: %s", who, (unsigned long long)pfn,
                 order, why);
    b->invalid_frees++;
    return -1;
}

HOT int free_common(struct buddy *b, uint64_t pfn, unsigned order, unsigned rep, const char *who)
{
    uint64_t off = pfn - b->base_pfn; /* wraps to huge below the span */
    /* The state byte equals ALLOCATED|order only at the head of a live block of that order. */
    if (UNLIKELY(order > BUDDY_MAX_ORDER || off >= b->span_pages || (pfn & ((1ULL << order) - 1)) ||
                 b->page[off] != (uint8_t)(BUDDY_PG_ALLOCATED | order)))
        return bad_free(b, pfn, order, who);
    b->page[off] = 0;
    b->free_pages += 1ULL << order;
    if (UNLIKELY(b->poison) && !rep)
        poison_fill(b, pfn, order);
    insert_block(b, pfn, order, rep);
    return 0;
}

int buddy_free(struct buddy *b, uint64_t pfn, unsigned order)
{
    if (free_common(b, pfn, order, 0, "buddy_free"))
        return -1;
    b->frees++;
    return 0;
}

int buddy_free_reported(struct buddy *b, uint64_t pfn, unsigned order)
{
    return free_common(b, pfn, order, 1, "buddy_free_reported");
}

/* Free [s, e) (all managed, accounted) as the largest naturally aligned blocks. */
static void free_run(struct buddy *b, uint64_t s, uint64_t e, unsigned rep)
{
    while (s < e) {
        unsigned k = s ? (unsigned)__builtin_ctzll(s) : BUDDY_MAX_ORDER;
        if (k > BUDDY_MAX_ORDER)
            k = BUDDY_MAX_ORDER;
        while ((1ULL << k) > e - s)
            k--;
        if (b->poison)
            poison_fill(b, s, k);
        insert_block(b, s, k, b->poison ? 0 : rep); /* poisoned pages are backed */
        s += 1ULL << k;
    }
}

static void add_range(struct buddy *b, uint64_t pfn, uint64_t count, unsigned rep);

void buddy_add_range(struct buddy *b, uint64_t pfn, uint64_t count)
{
    add_range(b, pfn, count, 0);
}

void buddy_add_range_untouched(struct buddy *b, uint64_t pfn, uint64_t count)
{
    add_range(b, pfn, count, 1);
}

static void add_range(struct buddy *b, uint64_t pfn, uint64_t count, unsigned rep)
{
    uint64_t lo = b->base_pfn, hi = b->end_pfn;
    uint64_t end = count > UINT64_MAX - pfn ? UINT64_MAX : pfn + count;
    if (pfn < lo)
        pfn = lo;
    if (end > hi)
        end = hi;
    while (pfn < end) {
        if (!(b->page[pfn - lo] & BUDDY_PG_UNMANAGED)) {
            pfn++; /* already managed: adding it twice would double-free it */
            continue;
        }
        uint64_t run = pfn;
        while (run < end && (b->page[run - lo] & BUDDY_PG_UNMANAGED))
            b->page[run++ - lo] = 0;
        b->total_pages += run - pfn;
        b->free_pages += run - pfn;
        free_run(b, pfn, run, rep);
        pfn = run;
    }
}

bool buddy_is_free(const struct buddy *b, uint64_t pfn)
{
    if (pfn < b->base_pfn || pfn >= b->end_pfn)
        return false;
    for (unsigned k = 0; k <= BUDDY_MAX_ORDER; k++) {
        /* Blocks reaching outside the span are never free, and have (guard) bits. */
        uint64_t i = blk_index(b, pfn, k);
        if (bm_test(&b->ord[k].set[0], i) || bm_test(&b->ord[k].set[1], i))
            return true;
    }
    return false;
}

void buddy_walk_free(const struct buddy *b, unsigned min_order, buddy_walk_fn fn, void *ctx)
{
    for (unsigned k = BUDDY_MAX_ORDER + 1; k-- > min_order;) {
        if (!(((b->mask[0] | b->mask[1]) >> k) & 1))
            continue;
        const struct buddy_bitmap *u = &b->ord[k].set[0], *r = &b->ord[k].set[1];
        uint64_t iu = bm_next(u, 0), ir = bm_next(r, 0);
        while (iu != BUDDY_NONE || ir != BUDDY_NONE) {
            bool rep = ir < iu;
            if (fn(ctx, blk_pfn(b, rep ? ir : iu, k), k, rep))
                return;
            if (rep)
                ir = bm_next(r, ir + 1);
            else
                iu = bm_next(u, iu + 1);
        }
    }
}

void buddy_get_stats(const struct buddy *b, struct buddy_stats *out)
{
    out->total_pages = b->total_pages;
    out->free_pages = b->free_pages;
    out->reported_pages = b->reported_pages;
    out->meta_bytes = b->meta_bytes;
    for (unsigned k = 0; k <= BUDDY_MAX_ORDER; k++)
        out->free_blocks[k] = b->ord[k].set[0].count + b->ord[k].set[1].count;
    out->allocs = b->allocs;
    out->frees = b->frees;
    out->failures = b->failures;
    out->poison_errors = b->poison_errors;
}

void buddy_set_reported_keep_content(struct buddy *b, bool keep)
{
    b->reported_keep_content = keep;
}

void buddy_set_poison(struct buddy *b, bool on, uint64_t pattern)
{
    b->poison = on;
    b->poison_pattern = pattern;
    if (!on)
        return;
    for (unsigned k = 0; k <= BUDDY_MAX_ORDER; k++) {
        for (unsigned r = 0; r < 2; r++) {
            struct buddy_bitmap *m = &b->ord[k].set[r];
            for (uint64_t i = bm_next(m, 0); i != BUDDY_NONE; i = bm_next(m, i + 1)) {
                poison_fill(b, blk_pfn(b, i, k), k);
                if (r) {
                    /* Written now, so backed: it moves to the backed set (and is verified). */
                    set_del(b, k, 1, i);
                    set_add(b, k, 0, i);
                    b->reported_pages -= 1ULL << k;
                }
            }
        }
    }
}

/* ---- Setup -------------------------------------------------------------------------------- */

/*
 * Lay out the bitmaps for a span (b == NULL: only measure). Bit 0 and the last bits of each
 * bitmap are guards for the buddies of edge blocks: (span >> k) + 2 blocks of order k can overlap
 * the span, plus one guard each side, so the size depends on the span alone. Bitmaps come first
 * (8-byte words), then the per-page bytes.
 */
static size_t layout(struct buddy *b, uint64_t span, uint64_t *words_base)
{
    uint64_t words = 0;
    for (unsigned k = 0; k <= BUDDY_MAX_ORDER; k++) {
        for (unsigned r = 0; r < 2; r++) {
            struct buddy_bitmap *m = b ? &b->ord[k].set[r] : NULL;
            uint64_t n = (span >> k) + 4;
            unsigned l = 0;
            for (;;) {
                uint64_t w = (n + 63) >> 6;
                if (m) {
                    m->lv[l] = words_base + words;
                    m->nbits[l] = n;
                }
                words += w;
                l++;
                if (w == 1)
                    break;
                n = w;
            }
            if (m) {
                m->nlv = l;
                m->lv[l] = &b->sentinel;
                m->hint = UINT64_MAX;
                m->pend = 0; /* any path will do: flushing only clears bits over empty words */
            }
        }
    }
    return (size_t)(words * 8 + span);
}

size_t buddy_meta_bytes(uint64_t span_pages)
{
    if (span_pages == 0 || span_pages > PFN_LIMIT)
        return 0;
    return layout(NULL, span_pages, NULL);
}

int buddy_init(struct buddy *b, void *meta, size_t meta_bytes, uint64_t base_pfn,
               uint64_t span_pages)
{
    size_t need = buddy_meta_bytes(span_pages);
    if (!need || base_pfn > PFN_LIMIT - span_pages || meta_bytes < need || ((uintptr_t)meta & 7))
        return -1;
    __builtin_memset(b, 0, sizeof(*b));
    b->base_pfn = base_pfn;
    b->end_pfn = base_pfn + span_pages;
    b->span_pages = span_pages;
    b->meta_bytes = need;
    b->poison_bad_phys = BUDDY_NONE;
    b->sentinel = ~0ULL;
    /* Block index 0 is the guard below the first block overlapping the span (wraps if 0). */
    for (unsigned k = 0; k <= BUDDY_MAX_ORDER; k++)
        b->ord[k].bias = (base_pfn >> k) - 1;
    size_t bm_bytes = layout(b, span_pages, meta) - span_pages;
    __builtin_memset(meta, 0, bm_bytes);
    b->page = (uint8_t *)meta + bm_bytes;
    __builtin_memset(b->page, BUDDY_PG_UNMANAGED, span_pages);
    return 0;
}

int buddy_split(struct buddy *b, uint64_t pfn, unsigned order)
{
    uint64_t off = pfn - b->base_pfn;
    if (order == 0 || order > BUDDY_MAX_ORDER || off >= b->span_pages ||
        (pfn & ((1ULL << order) - 1)) || b->page[off] != (uint8_t)(BUDDY_PG_ALLOCATED | order)) {
        platform_log("buddy: buddy_split(pfn 0x%llx, order %u) rejected: not an allocated block "
                     "of that order",
                     (unsigned long long)pfn, order);
        return -1;
    }
    /* Only the head bytes change: both halves become allocated blocks of order - 1. */
    b->page[off] = (uint8_t)(BUDDY_PG_ALLOCATED | (order - 1));
    b->page[off + (1ULL << (order - 1))] = (uint8_t)(BUDDY_PG_ALLOCATED | (order - 1));
    return 0;
}
