/* Unit tests for mm/buddy.c, checked against a per-page reference model. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mm/buddy.h"
#include "tests/unit/fake_platform.h"
#include "include/platform.h"

/* ---- Fixture ------------------------------------------------------------------------------- */

struct env {
    struct buddy b;
    void *meta;
    uint64_t base, span;
    /* Reference model, one entry per page of the span: UNMANAGED, FREE or an allocation id. */
    int32_t *owner;
    struct blk {
        uint64_t pfn;
        unsigned order;
    } * live; /* allocated blocks, unordered */
    size_t nlive, cap;
    int32_t next_id;
};

#define M_UNMANAGED (-1)
#define M_FREE      0

static struct env *env_new(uint64_t base, uint64_t span)
{
    struct env *e = calloc(1, sizeof(*e));
    assert_non_null(e);
    size_t mb = buddy_meta_bytes(span);
    assert_true(mb > 0);
    e->meta = aligned_alloc(8, (mb + 7) & ~(size_t)7);
    assert_non_null(e->meta);
    assert_int_equal(buddy_init(&e->b, e->meta, mb, base, span), 0);
    e->base = base;
    e->span = span;
    e->owner = malloc(span * sizeof(*e->owner));
    assert_non_null(e->owner);
    for (uint64_t i = 0; i < span; i++)
        e->owner[i] = M_UNMANAGED;
    e->next_id = 1;
    return e;
}

static void env_free(struct env *e)
{
    free(e->meta);
    free(e->owner);
    free(e->live);
    free(e);
}

/* Add a range to the allocator and to the model (same clipping rules). */
static void env_add(struct env *e, uint64_t pfn, uint64_t count)
{
    buddy_add_range(&e->b, pfn, count);
    for (uint64_t p = pfn; p < pfn + count; p++)
        if (p >= e->base && p < e->base + e->span && e->owner[p - e->base] == M_UNMANAGED)
            e->owner[p - e->base] = M_FREE;
}

static uint64_t model_count(const struct env *e, int32_t what)
{
    uint64_t n = 0;
    for (uint64_t i = 0; i < e->span; i++)
        n += e->owner[i] == what;
    return n;
}

/* Check a block the allocator handed out and record it in the model. */
static void model_alloc(struct env *e, uint64_t pfn, unsigned order)
{
    assert_true(order <= BUDDY_MAX_ORDER);
    assert_int_equal(pfn & ((1ULL << order) - 1), 0); /* naturally aligned */
    assert_true(pfn >= e->base && pfn + (1ULL << order) <= e->base + e->span);
    int32_t id = e->next_id++;
    for (uint64_t p = pfn; p < pfn + (1ULL << order); p++) {
        /* Not a hole and not overlapping another allocation. */
        assert_int_equal(e->owner[p - e->base], M_FREE);
        e->owner[p - e->base] = id;
    }
    if (e->nlive == e->cap) {
        e->cap = e->cap ? 2 * e->cap : 64;
        e->live = realloc(e->live, e->cap * sizeof(*e->live));
        assert_non_null(e->live);
    }
    e->live[e->nlive++] = (struct blk){pfn, order};
}

/* Free live block i through the allocator and the model. */
static void model_free(struct env *e, size_t i, bool reported)
{
    struct blk k = e->live[i];
    e->live[i] = e->live[--e->nlive];
    int rc =
        reported ? buddy_free_reported(&e->b, k.pfn, k.order) : buddy_free(&e->b, k.pfn, k.order);
    assert_int_equal(rc, 0);
    for (uint64_t p = k.pfn; p < k.pfn + (1ULL << k.order); p++)
        e->owner[p - e->base] = M_FREE;
}

/* ---- Walk capture -------------------------------------------------------------------------- */

struct wblk {
    uint64_t pfn;
    unsigned order;
    bool reported;
};

struct walk {
    struct wblk *v;
    size_t n, cap;
    size_t stop_after; /* 0: never stop */
};

static int walk_cb(void *ctx, uint64_t pfn, unsigned order, bool reported)
{
    struct walk *w = ctx;
    if (w->n == w->cap) {
        w->cap = w->cap ? 2 * w->cap : 256;
        w->v = realloc(w->v, w->cap * sizeof(*w->v));
        assert_non_null(w->v);
    }
    w->v[w->n++] = (struct wblk){pfn, order, reported};
    return w->stop_after && w->n >= w->stop_after;
}

static struct walk walk_all(const struct buddy *b, unsigned min_order)
{
    struct walk w = {0};
    buddy_walk_free(b, min_order, walk_cb, &w);
    return w;
}

/* Same blocks (pfn and order; reported flags ignored) in the same order. */
static void assert_same_layout(const struct walk *a, const struct walk *b)
{
    assert_int_equal(a->n, b->n);
    for (size_t i = 0; i < a->n; i++) {
        assert_int_equal(a->v[i].pfn, b->v[i].pfn);
        assert_int_equal(a->v[i].order, b->v[i].order);
    }
}

/*
 * The bitmaps' internal invariants (white box): counts match, no bit outside the bitmap or on a
 * guard, a non-zero word always has its summary bit, a summary bit over an empty word only on the
 * pending path, and the hint is at or below the lowest set bit.
 */
static void check_summaries(const struct buddy *b)
{
    for (unsigned k = 0; k <= BUDDY_MAX_ORDER; k++) {
        for (unsigned r = 0; r < 2; r++) {
            const struct buddy_bitmap *m = &b->ord[k].set[r];
            uint64_t n = 0, lowest = UINT64_MAX;
            for (uint64_t i = 0; i < m->nbits[0]; i++) {
                if (!((m->lv[0][i >> 6] >> (i & 63)) & 1))
                    continue;
                n++;
                if (lowest == UINT64_MAX)
                    lowest = i;
                uint64_t pfn = (i + b->ord[k].bias) << k; /* a real block, inside the span */
                assert_true(pfn >= b->base_pfn && pfn + (1ULL << k) <= b->end_pfn);
            }
            assert_int_equal(n, m->count);
            assert_int_equal(((b->mask[r] >> k) & 1), n != 0);
            if (n)
                assert_true(m->hint <= lowest);
            for (unsigned l = 0; l < m->nlv; l++) {
                uint64_t words = (m->nbits[l] + 63) >> 6;
                /* Bits past the end of a level stay clear. */
                if (m->nbits[l] & 63)
                    assert_int_equal(m->lv[l][words - 1] >> (m->nbits[l] & 63), 0);
                if (l + 1 == m->nlv)
                    break;
                for (uint64_t j = 0; j < words; j++) {
                    bool sum = (m->lv[l + 1][j >> 6] >> (j & 63)) & 1;
                    if (m->lv[l][j])
                        assert_true(sum);
                    else if (sum) /* stale: only on the pending path */
                        assert_int_equal(j, m->pend >> (6 * (l + 1)));
                }
            }
            assert_int_not_equal(*m->lv[m->nlv], 0); /* the sentinel */
        }
    }
}

/*
 * Full consistency check of the allocator against the model: free blocks are aligned, inside
 * managed free pages, disjoint and cover exactly the model's free pages; no two free buddies
 * coexist (full coalescing); counters and buddy_is_free agree.
 */
/* The reported state of the free block whose head is pfn in a walk (it is there). */
static bool buddy_walk_state(struct walk w, uint64_t pfn)
{
    for (size_t i = 0; i < w.n; i++)
        if (w.v[i].pfn == pfn)
            return w.v[i].reported;
    return false;
}

static void check_all(struct env *e)
{
    struct buddy *b = &e->b;
    check_summaries(b);
    struct walk w = walk_all(b, 0);
    uint8_t *cover = calloc(e->span, 1);
    assert_non_null(cover);
    uint64_t blocks[BUDDY_MAX_ORDER + 1] = {0}, free_pages = 0, rep_pages = 0;
    unsigned prev_order = BUDDY_MAX_ORDER + 1;
    uint64_t prev_pfn = 0;
    for (size_t i = 0; i < w.n; i++) {
        struct wblk k = w.v[i];
        assert_true(k.order <= BUDDY_MAX_ORDER);
        /* Orders descend; addresses ascend within an order. */
        assert_true(k.order <= prev_order);
        if (k.order == prev_order)
            assert_true(k.pfn > prev_pfn);
        prev_order = k.order;
        prev_pfn = k.pfn;
        assert_int_equal(k.pfn & ((1ULL << k.order) - 1), 0);
        assert_true(k.pfn >= e->base && k.pfn + (1ULL << k.order) <= e->base + e->span);
        for (uint64_t p = k.pfn; p < k.pfn + (1ULL << k.order); p++) {
            assert_int_equal(e->owner[p - e->base], M_FREE); /* never a hole or allocated */
            assert_int_equal(cover[p - e->base], 0);         /* no overlap */
            cover[p - e->base] = 1;
        }
        cover[k.pfn - e->base] = (uint8_t)(k.order + 2); /* marks a block head and its order */
        blocks[k.order]++;
        free_pages += 1ULL << k.order;
        if (k.reported)
            rep_pages += 1ULL << k.order;
    }
    /* Coalescing: a free block's buddy is never free at the same order in the same state
     * (backed or not: blocks of different states stay apart, mm/buddy.h). */
    for (size_t i = 0; i < w.n; i++) {
        struct wblk k = w.v[i];
        uint64_t bud = k.pfn ^ (1ULL << k.order);
        if (k.order < BUDDY_MAX_ORDER && bud >= e->base && bud < e->base + e->span &&
            cover[bud - e->base] == k.order + 2 && buddy_walk_state(w, bud) == k.reported)
            fail_msg("free buddies 0x%llx and 0x%llx at order %u not merged",
                     (unsigned long long)k.pfn, (unsigned long long)bud, k.order);
    }
    uint64_t allocated = 0;
    for (uint64_t i = 0; i < e->span; i++) {
        if (e->owner[i] == M_FREE)
            assert_true(cover[i] != 0); /* every free page is in some free block */
        if (e->owner[i] > 0)
            allocated++;
        assert_int_equal(buddy_is_free(b, e->base + i), cover[i] != 0);
    }
    struct buddy_stats st;
    buddy_get_stats(b, &st);
    assert_int_equal(st.free_pages, free_pages);
    assert_int_equal(st.reported_pages, rep_pages);
    assert_int_equal(st.free_pages + allocated, st.total_pages);
    assert_int_equal(st.total_pages, e->span - model_count(e, M_UNMANAGED));
    for (unsigned k = 0; k <= BUDDY_MAX_ORDER; k++)
        assert_int_equal(st.free_blocks[k], blocks[k]);
    free(cover);
    free(w.v);
}

/* xorshift64*: deterministic across platforms. */
static uint64_t rng_state;
static uint64_t rng(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

static int setup(void **state)
{
    (void)state;
    fake_log_echo(false);
    fake_log_reset();
    return 0;
}

/* ---- Tests --------------------------------------------------------------------------------- */

static void test_meta_size(void **state)
{
    (void)state;
    uint64_t spans[] = {1ULL << 20 /* 4 GiB */, 1ULL << 28 /* 1 TiB */};
    for (unsigned i = 0; i < 2; i++) {
        size_t mb = buddy_meta_bytes(spans[i]);
        /* <= 0.1 % of the RAM it manages, and the ~1.5 bytes per page the design aims for. */
        assert_true(mb * 1000 <= spans[i] * PAGE_SIZE);
        assert_true(mb * 100 <= spans[i] * 155);
    }
    assert_int_equal(buddy_meta_bytes(0), 0);
}

static void test_init_rejects(void **state)
{
    (void)state;
    struct buddy b;
    size_t mb = buddy_meta_bytes(1000);
    uint64_t *meta = malloc(mb + 8);
    assert_int_equal(buddy_init(&b, meta, mb - 1, 0, 1000), -1);
    assert_int_equal(buddy_init(&b, (uint8_t *)meta + 4, mb, 0, 1000), -1);
    assert_int_equal(buddy_init(&b, meta, mb, 0, 0), -1);
    assert_int_equal(buddy_init(&b, meta, mb, UINT64_MAX - 10, 1000), -1);
    assert_int_equal(buddy_init(&b, meta, mb, 7, 1000), 0);
    /* Everything starts unmanaged. */
    struct buddy_stats st;
    buddy_get_stats(&b, &st);
    assert_int_equal(st.total_pages, 0);
    assert_int_equal(st.free_pages, 0);
    assert_int_equal(st.meta_bytes, mb);
    assert_int_equal(buddy_alloc(&b, 0), BUDDY_NONE);
    assert_false(buddy_is_free(&b, 7));
    assert_int_equal(buddy_free(&b, 8, 0), -1);
    free(meta);
}

static void test_aligned_span_layout(void **state)
{
    (void)state;
    struct env *e = env_new(0, 1ULL << 19);
    env_add(e, 0, 1ULL << 19);
    struct walk w = walk_all(&e->b, 0);
    assert_int_equal(w.n, 2);
    assert_int_equal(w.v[0].pfn, 0);
    assert_int_equal(w.v[0].order, 18);
    assert_int_equal(w.v[1].pfn, 1ULL << 18);
    assert_int_equal(w.v[1].order, 18);
    assert_false(w.v[0].reported);
    free(w.v);
    check_all(e);
    /* A 1 GiB allocation is 1 GiB aligned. */
    assert_int_equal(buddy_alloc(&e->b, 18), 0);
    assert_int_equal(buddy_alloc(&e->b, 18), 1ULL << 18);
    assert_int_equal(buddy_alloc(&e->b, 18), BUDDY_NONE);
    env_free(e);
}

/* The free layout of a range must be its greedy decomposition into largest aligned blocks. */
static void test_add_range_decomposition(void **state)
{
    (void)state;
    struct env *e = env_new(1, 3000); /* base pfn 1, span not a power of two */
    env_add(e, 1, 2999);              /* [1, 3000) */
    struct walk w = walk_all(&e->b, 0);
    /* 1 | 2-3 | 4-7 | ... | 1024-2047 | 2048-2559 | 2560-2815 | 2816-2943 | 2944-2975 | ... */
    uint64_t expect_pages = 0;
    for (size_t i = 0; i < w.n; i++)
        expect_pages += 1ULL << w.v[i].order;
    assert_int_equal(expect_pages, 2999);
    assert_int_equal(w.v[0].pfn, 1024);
    assert_int_equal(w.v[0].order, 10);
    assert_int_equal(w.v[w.n - 1].pfn, 1);
    assert_int_equal(w.v[w.n - 1].order, 0);
    free(w.v);
    check_all(e);
    env_free(e);
}

static void test_holes_and_odd_alignment(void **state)
{
    (void)state;
    struct env *e = env_new(1, 100003); /* span [1, 100004) */
    env_add(e, 0, 5000);                /* starts before the span: clipped to 1 */
    env_add(e, 5003, 35000 - 5003);     /* hole [5000, 5003) */
    env_add(e, 40001, 1000000);         /* hole [35000, 40001); runs past the span: clipped */
    env_add(e, 4990, 12);               /* overlaps managed pages; shrinks the hole to 5002 */
    env_add(e, 200000, 5);              /* entirely outside: ignored */
    check_all(e);
    for (uint64_t p = 5002; p < 5003; p++)
        assert_false(buddy_is_free(&e->b, p));
    for (uint64_t p = 35000; p < 40001; p++)
        assert_false(buddy_is_free(&e->b, p));
    assert_false(buddy_is_free(&e->b, 0));
    assert_false(buddy_is_free(&e->b, 100004));
    assert_true(buddy_is_free(&e->b, 100003));
    struct buddy_stats st;
    buddy_get_stats(&e->b, &st);
    assert_int_equal(st.total_pages, (5002 - 1) + (35000 - 5003) + (100004 - 40001));

    /* Exhaust at order 0 and verify each page against the model (holes never handed out). */
    uint64_t n = 0, pfn;
    while ((pfn = buddy_alloc(&e->b, 0)) != BUDDY_NONE) {
        model_alloc(e, pfn, 0);
        n++;
    }
    assert_int_equal(n, st.total_pages);
    check_all(e);
    env_free(e);
}

static void random_run(uint64_t seed, uint64_t base, uint64_t span, const uint64_t (*ranges)[2],
                       unsigned nranges, unsigned ops)
{
    struct env *e = env_new(base, span);
    for (unsigned i = 0; i < nranges; i++)
        env_add(e, ranges[i][0], ranges[i][1]);
    check_all(e);
    struct walk initial = walk_all(&e->b, 0);
    rng_state = seed * 0x9E3779B97F4A7C15ULL + 1;
    uint64_t fails = 0;
    for (unsigned op = 0; op < ops; op++) {
        uint64_t r = rng() % 100;
        if (r < 50 || e->nlive == 0) {
            /* Mostly small orders, sometimes large ones. */
            unsigned order = (rng() % 4) ? (unsigned)(rng() % 4) : (unsigned)(rng() % 13);
            uint64_t pfn;
            unsigned got = order;
            if (r < 45)
                pfn = buddy_alloc(&e->b, order);
            else
                pfn = buddy_alloc_largest(&e->b, order, &got);
            if (pfn == BUDDY_NONE)
                fails++;
            else
                model_alloc(e, pfn, got);
        } else if (r < 90) {
            model_free(e, rng() % e->nlive, false);
        } else if (r < 95) {
            /* A reporting round trip: take the largest unreported block and give it back. */
            unsigned order;
            uint64_t pfn = buddy_take_unreported(&e->b, (unsigned)(rng() % 6), &order);
            if (pfn != BUDDY_NONE) {
                model_alloc(e, pfn, order);
                model_free(e, e->nlive - 1, true);
            }
        } else {
            model_free(e, rng() % e->nlive, true);
        }
        if (op % 250 == 0)
            check_all(e);
    }
    check_all(e);
    struct buddy_stats st;
    buddy_get_stats(&e->b, &st);
    assert_int_equal(st.failures, fails);
    while (e->nlive)
        model_free(e, e->nlive - 1, false);
    check_all(e);
    buddy_coalesce_mixed(&e->b); /* reported and unreported buddies stay apart until now */
    check_all(e);
    struct walk final = walk_all(&e->b, 0);
    assert_same_layout(&initial, &final);
    free(initial.v);
    free(final.v);
    env_free(e);
}

static void test_random_holes(void **state)
{
    (void)state;
    static const uint64_t ranges[][2] = {{3, 20000 - 3}, {20011, 33333 - 20011}, {33400, 40000}};
    for (uint64_t seed = 1; seed <= 6; seed++)
        random_run(seed, 3, 70001, ranges, 3, 4000);
}

static void test_random_aligned(void **state)
{
    (void)state;
    /* Small enough that high orders run out and allocations fail. */
    static const uint64_t ranges[][2] = {{0, 4096}, {4096 + 512, 4096}};
    for (uint64_t seed = 100; seed < 104; seed++)
        random_run(seed, 0, 8192 + 512, ranges, 2, 6000);
}

/* A 4 GiB span: four summary levels at order 0, sparse bitmaps, long pending paths. */
static void test_random_large(void **state)
{
    (void)state;
    static const uint64_t ranges[][2] = {{1, (1ULL << 20) - 1000}};
    random_run(7, 1, 1ULL << 20, ranges, 1, 3000);
}

static void test_exhaustion_order0(void **state)
{
    (void)state;
    struct env *e = env_new(5, 9000);
    env_add(e, 5, 9000);
    struct walk initial = walk_all(&e->b, 0);
    struct buddy_stats st;
    buddy_get_stats(&e->b, &st);
    /* Lowest block of the smallest order that has one; free: 5 o0, 6 o1, .., 9000 o2, 9004 o0. */
    static const uint64_t first[] = {5, 9004, 6, 7, 9000, 9001, 9002, 9003, 8};
    uint64_t n = 0, pfn;
    while ((pfn = buddy_alloc(&e->b, 0)) != BUDDY_NONE) {
        if (n < 9)
            assert_int_equal(pfn, first[n]);
        model_alloc(e, pfn, 0);
        n++;
    }
    assert_int_equal(n, st.free_pages);
    assert_int_equal(buddy_alloc(&e->b, 0), BUDDY_NONE);
    assert_int_equal(buddy_alloc(&e->b, 7), BUDDY_NONE);
    struct buddy_stats after;
    buddy_get_stats(&e->b, &after);
    assert_int_equal(after.failures, 3);
    assert_int_equal(after.allocs, n);
    assert_int_equal(after.free_pages, 0);
    check_all(e);
    while (e->nlive)
        model_free(e, 0, false);
    struct walk final = walk_all(&e->b, 0);
    assert_same_layout(&initial, &final);
    buddy_get_stats(&e->b, &after);
    assert_int_equal(after.frees, n);
    free(initial.v);
    free(final.v);
    env_free(e);
}

static void test_exhaustion_high_order(void **state)
{
    (void)state;
    struct env *e = env_new(1, 10000);
    env_add(e, 1, 10000);
    /* How many naturally aligned order-9 blocks fit in the free blocks. */
    struct walk w = walk_all(&e->b, 9);
    uint64_t expect = 0;
    for (size_t i = 0; i < w.n; i++)
        expect += 1ULL << (w.v[i].order - 9);
    free(w.v);
    assert_true(expect > 0);
    uint64_t n = 0, pfn;
    while ((pfn = buddy_alloc(&e->b, 9)) != BUDDY_NONE) {
        model_alloc(e, pfn, 9);
        n++;
    }
    assert_int_equal(n, expect);
    assert_int_equal(buddy_alloc(&e->b, 18), BUDDY_NONE);
    struct buddy_stats st;
    buddy_get_stats(&e->b, &st);
    assert_int_equal(st.failures, 2);
    assert_int_equal(st.free_blocks[9], 0);
    check_all(e);
    /* Smaller orders still come out of the remainder. */
    assert_int_not_equal(buddy_alloc(&e->b, 8), BUDDY_NONE);
    env_free(e);
}

/* Snapshot of the externally visible state, to check that rejected frees change nothing. */
struct snap {
    struct buddy_stats st;
    struct walk w;
};

static struct snap snap_take(const struct buddy *b)
{
    struct snap s;
    buddy_get_stats(b, &s.st);
    s.w = walk_all(b, 0);
    return s;
}

static void snap_same(struct snap *a, const struct buddy *b)
{
    struct snap now = snap_take(b);
    assert_memory_equal(&a->st, &now.st, sizeof(now.st));
    assert_int_equal(a->w.n, now.w.n);
    assert_memory_equal(a->w.v, now.w.v, now.w.n * sizeof(*now.w.v));
    free(now.w.v);
}

static void expect_reject(struct env *e, uint64_t pfn, unsigned order, const char *why)
{
    struct snap s = snap_take(&e->b);
    fake_log_reset();
    uint64_t bad = e->b.invalid_frees;
    assert_int_equal(buddy_free(&e->b, pfn, order), -1);
    assert_int_equal(e->b.invalid_frees, bad + 1);
    assert_int_equal(fake_log_count(), 1);
    if (!strstr(fake_log_last(), why))
        fail_msg("log line \"%s\" lacks \"%s\"", fake_log_last(), why);
    snap_same(&s, &e->b);
    free(s.w.v);
}

static void test_invalid_frees(void **state)
{
    (void)state;
    struct env *e = env_new(16, 4096);
    env_add(e, 16, 1000);
    env_add(e, 2048, 2064); /* hole [1016, 2048) */
    uint64_t a = buddy_alloc(&e->b, 2);
    uint64_t c = buddy_alloc(&e->b, 0);
    assert_int_not_equal(a, BUDDY_NONE);
    assert_int_not_equal(c, BUDDY_NONE);
    model_alloc(e, a, 2);
    model_alloc(e, c, 0);

    expect_reject(e, a, 1, "another order");     /* wrong order */
    expect_reject(e, a, 5, "unaligned");         /* a = 1008 is 16-aligned only */
    expect_reject(e, a + 1, 0, "not allocated"); /* inside a block, not its head */
    expect_reject(e, a + 2, 1, "not allocated");
    expect_reject(e, c + 1, 0, "not allocated"); /* a free page */
    expect_reject(e, 1500, 0, "not usable RAM"); /* hole */
    expect_reject(e, 3, 0, "outside");           /* below the span */
    expect_reject(e, 16 + 4096, 0, "outside");   /* above the span */
    expect_reject(e, 4096, 5, "outside");        /* runs past the end */
    expect_reject(e, a, 40, "order too large");
    expect_reject(e, a + 1, 1, "unaligned");

    assert_int_equal(buddy_free(&e->b, a, 2), 0);
    for (size_t i = 0; i < e->nlive; i++)
        if (e->live[i].pfn == a)
            e->live[i] = e->live[--e->nlive];
    for (uint64_t p = a; p < a + 4; p++)
        e->owner[p - e->base] = M_FREE;
    expect_reject(e, a, 2, "double free");
    expect_reject(e, a, 0, "double free");
    check_all(e);
    env_free(e);
}

static void test_reported_state(void **state)
{
    (void)state;
    struct env *e = env_new(0, 2048);
    env_add(e, 0, 1024 + 64 + 1); /* blocks: 0 (order 10), 1024 (order 6), 1088 (order 0) */
    struct buddy *b = &e->b;
    unsigned order;

    /* What a reporting pass could take, and the order it would take first. */
    assert_int_equal(buddy_unreported_pages(b, 0), 1024 + 64 + 1);
    assert_int_equal(buddy_unreported_pages(b, 6), 1024 + 64);
    assert_int_equal(buddy_unreported_pages(b, 11), 0);
    assert_int_equal(buddy_next_unreported_order(b, 0), 10);
    assert_int_equal(buddy_next_unreported_order(b, 11), -1);
    assert_int_equal(buddy_next_unreported_order(b, BUDDY_MAX_ORDER + 1), -1);

    /* Largest first, then smaller; none below min_order. */
    uint64_t p1 = buddy_take_unreported(b, 0, &order);
    assert_int_equal(p1, 0);
    assert_int_equal(order, 10);
    assert_int_equal(buddy_free_reported(b, p1, 10), 0);
    struct buddy_stats st;
    buddy_get_stats(b, &st);
    assert_int_equal(st.reported_pages, 1024);
    assert_int_equal(st.allocs, 0); /* reporting round trips are not allocations */
    assert_int_equal(st.frees, 0);
    assert_int_equal(buddy_unreported_pages(b, 0), 64 + 1); /* the reported block is not */
    assert_int_equal(buddy_next_unreported_order(b, 0), 6);
    assert_int_equal(buddy_next_unreported_order(b, 7), -1);

    /* Already reported blocks are not taken again. */
    uint64_t p2 = buddy_take_unreported(b, 1, &order);
    assert_int_equal(p2, 1024);
    assert_int_equal(order, 6);
    assert_int_equal(buddy_take_unreported(b, 1, &order), BUDDY_NONE);
    assert_int_equal(buddy_free_reported(b, p2, 6), 0);
    assert_int_equal(buddy_take_unreported(b, 7, &order), BUDDY_NONE);
    uint64_t p3 = buddy_take_unreported(b, 0, &order);
    assert_int_equal(p3, 1088);
    assert_int_equal(order, 0);
    assert_int_equal(buddy_free_reported(b, p3, 0), 0);
    assert_int_equal(buddy_take_unreported(b, 0, &order), BUDDY_NONE);

    struct walk w = walk_all(b, 0);
    assert_int_equal(w.n, 3);
    for (size_t i = 0; i < w.n; i++)
        assert_true(w.v[i].reported);
    free(w.v);
    check_all(e);

    /* Allocating order 3 splits the order-6 block: the page loses the state, halves keep it. */
    uint64_t pg = buddy_alloc(b, 3);
    assert_int_equal(pg, 1024);
    model_alloc(e, pg, 3);
    buddy_get_stats(b, &st);
    assert_int_equal(st.reported_pages, 1024 + 64 + 1 - 8);
    w = walk_all(b, 0);
    for (size_t i = 0; i < w.n; i++)
        assert_true(w.v[i].reported);
    free(w.v);
    check_all(e);

    /* Freed as backed, it stays apart from its reported buddies: merging would either claim
     * backing the block lacks or hide backing it has. */
    model_free(e, 0, false);
    buddy_get_stats(b, &st);
    assert_int_equal(st.reported_pages, 1024 + 64 + 1 - 8);
    w = walk_all(b, 0);
    bool found = false;
    for (size_t i = 0; i < w.n; i++)
        if (w.v[i].pfn == 1024) {
            assert_int_equal(w.v[i].order, 3);
            assert_false(w.v[i].reported);
            found = true;
        }
    assert_true(found);
    free(w.v);
    check_all(e);

    /* Reported too, it merges with them: two reported halves make a reported block, which is
     * not offered to the host again. */
    uint64_t p4 = buddy_take_unreported(b, 0, &order);
    assert_int_equal(p4, 1024);
    assert_int_equal(order, 3);
    model_alloc(e, p4, 3);
    model_free(e, e->nlive - 1, true);
    buddy_get_stats(b, &st);
    assert_int_equal(st.reported_pages, 1024 + 64 + 1);
    w = walk_all(b, 6);
    assert_int_equal(w.n, 2);
    assert_int_equal(w.v[1].pfn, 1024);
    assert_int_equal(w.v[1].order, 6);
    assert_true(w.v[1].reported);
    free(w.v);
    assert_int_equal(buddy_take_unreported(b, 0, &order), BUDDY_NONE);
    check_all(e);
    env_free(e);
}

/* Buddies in different states merge only when an allocation needs the larger block. */
static void test_coalesce_on_demand(void **state)
{
    (void)state;
    struct env *e = env_new(0, 64);
    env_add(e, 0, 2);
    assert_int_equal(buddy_alloc(&e->b, 0), 0);
    assert_int_equal(buddy_alloc(&e->b, 0), 1);
    assert_int_equal(buddy_free(&e->b, 0, 0), 0);
    assert_int_equal(buddy_free_reported(&e->b, 1, 0), 0);
    struct walk w = walk_all(&e->b, 0);
    assert_int_equal(w.n, 2); /* apart */
    free(w.v);
    assert_int_equal(buddy_alloc(&e->b, 1), 0); /* merged on demand */
    struct buddy_stats st;
    buddy_get_stats(&e->b, &st);
    assert_int_equal(st.reported_pages, 0);
    assert_int_equal(st.failures, 0);
    assert_int_equal(buddy_free(&e->b, 0, 1), 0);
    assert_false(buddy_coalesce_mixed(&e->b)); /* nothing left to merge */
    env_free(e);
}

/* Backed blocks first, whatever their address and size; unbacked ones only when no backed one
 * fits. Memory added untouched is unbacked; poisoning writes it, so it becomes backed. */
static void test_backed_first(void **state)
{
    (void)state;
    struct env *e = env_new(0, 64);
    buddy_add_range_untouched(&e->b, 0, 64);
    struct buddy_stats st;
    buddy_get_stats(&e->b, &st);
    assert_int_equal(st.reported_pages, 64);
    assert_int_equal(buddy_take_unreported(&e->b, 0, NULL), BUDDY_NONE); /* nothing to report */
    for (uint64_t p = 0; p < 4; p++)
        assert_int_equal(buddy_alloc(&e->b, 0), p);
    /* Page 2 comes back written (backed), page 0 reported (unbacked); 4..63 never touched. */
    assert_int_equal(buddy_free(&e->b, 2, 0), 0);
    assert_int_equal(buddy_free_reported(&e->b, 0, 0), 0);
    assert_int_equal(buddy_alloc(&e->b, 0), 2);
    assert_int_equal(buddy_alloc(&e->b, 0), 0);
    assert_int_equal(buddy_free(&e->b, 2, 0), 0);
    /* Inflate's allocation too: the lone backed page before a 32-page unbacked block. */
    unsigned order = 99;
    assert_int_equal(buddy_alloc_largest(&e->b, 5, &order), 2);
    assert_int_equal(order, 0);
    assert_int_equal(buddy_alloc_largest(&e->b, 5, &order), 32);
    assert_int_equal(order, 5);
    assert_int_equal(buddy_free(&e->b, 32, 5), 0);
    assert_int_equal(buddy_free(&e->b, 2, 0), 0);
    assert_int_equal(buddy_free_reported(&e->b, 0, 0), 0);
    /* Poisoning writes every free page: all of it is backed now. */
    fake_ram_init(0, 64 * PAGE_SIZE);
    buddy_set_poison(&e->b, true, 0x5a5a5a5a5a5a5a5aULL);
    buddy_get_stats(&e->b, &st);
    assert_int_equal(st.reported_pages, 0);
    struct walk w = walk_all(&e->b, 0);
    for (size_t i = 0; i < w.n; i++)
        assert_false(w.v[i].reported);
    free(w.v);
    fake_ram_fini();
    env_free(e);
}

static void test_alloc_largest(void **state)
{
    (void)state;
    struct env *e = env_new(0, 1ULL << 20);
    /* Blocks: 2^18 @ 2^18, 2^12 @ 2^19, 2^4 @ 2^19 + 2^12, 2^0 @ 2^19 + 2^12 + 16. */
    env_add(e, 1ULL << 18, (1ULL << 18) + (1ULL << 12) + 17);
    unsigned order;
    uint64_t pfn = buddy_alloc_largest(&e->b, BUDDY_MAX_ORDER, &order);
    assert_int_equal(pfn, 1ULL << 18);
    assert_int_equal(order, 18);
    model_alloc(e, pfn, order);
    pfn = buddy_alloc_largest(&e->b, 40, &order); /* clamped */
    assert_int_equal(pfn, 1ULL << 19);
    assert_int_equal(order, 12);
    model_alloc(e, pfn, order);
    pfn = buddy_alloc_largest(&e->b, 3, &order); /* splits the order-4 block */
    assert_int_equal(pfn, (1ULL << 19) + (1ULL << 12));
    assert_int_equal(order, 3);
    model_alloc(e, pfn, order);
    pfn = buddy_alloc_largest(&e->b, 18, &order);
    assert_int_equal(order, 3);
    model_alloc(e, pfn, order);
    pfn = buddy_alloc_largest(&e->b, 18, &order);
    assert_int_equal(order, 0);
    model_alloc(e, pfn, order);
    check_all(e);
    assert_int_equal(buddy_alloc_largest(&e->b, 18, &order), BUDDY_NONE);
    struct buddy_stats st;
    buddy_get_stats(&e->b, &st);
    assert_int_equal(st.failures, 1);
    assert_int_equal(st.allocs, 5);
    env_free(e);
}

/* A reclaim hook standing in for the balloon: it holds some blocks back and frees them on
 * request; it may try to allocate itself, which must fail without re-entering it. */
struct reclaimer {
    struct buddy *b;
    uint64_t held[8];
    unsigned nheld;
    unsigned calls, max_depth, depth;
    uint64_t asked;
    bool allocate_inside;
    uint64_t inner_result;
};

static uint64_t reclaim_hook(void *ctx, uint64_t pages)
{
    struct reclaimer *r = ctx;
    r->calls++;
    r->asked = pages;
    if (++r->depth > r->max_depth)
        r->max_depth = r->depth;
    if (r->allocate_inside)
        r->inner_result = buddy_alloc(r->b, 0); /* nothing free: must fail, not recurse */
    uint64_t freed = 0;
    if (r->nheld) {
        assert_int_equal(buddy_free(r->b, r->held[--r->nheld], 0), 0);
        freed = 1;
    }
    r->depth--;
    return freed;
}

static void test_reclaim_hook(void **state)
{
    (void)state;
    struct env *e = env_new(0, 64);
    env_add(e, 0, 8);
    struct reclaimer r = {.b = &e->b};
    /* Take all 8 pages; the reclaimer "balloons" 3 of them. */
    uint64_t pfns[8];
    for (unsigned i = 0; i < 8; i++)
        assert_int_not_equal(pfns[i] = buddy_alloc(&e->b, 0), BUDDY_NONE);
    for (unsigned i = 0; i < 3; i++)
        r.held[r.nheld++] = pfns[5 + i];

    /* Without a hook an exhausted allocator just fails. */
    assert_int_equal(buddy_alloc(&e->b, 0), BUDDY_NONE);
    buddy_set_reclaim(&e->b, reclaim_hook, &r);

    /* With it: the failing allocation asks the hook (for 1 page), which frees one, and the
     * retry succeeds with exactly that page. */
    r.allocate_inside = true;
    uint64_t got = buddy_alloc(&e->b, 0);
    assert_int_equal(got, pfns[7]);
    assert_int_equal(r.calls, 1);
    assert_int_equal(r.asked, 1);
    assert_int_equal(r.max_depth, 1);             /* never re-entered ... */
    assert_int_equal(r.inner_result, BUDDY_NONE); /* ... its own allocation failed plainly */
    assert_int_equal(e->b.reclaimed_pages, 1);

    /* alloc_largest reaches it too. */
    unsigned order = 99;
    assert_int_equal(buddy_alloc_largest(&e->b, 3, &order), pfns[6]);
    assert_int_equal(order, 0);
    assert_int_equal(r.calls, 2);
    assert_int_equal(r.asked, 8);

    /* An order-1 request: freed single pages (pfns[5] and a non-buddy) cannot form the block,
     * so the hook is asked a bounded number of times and the allocation fails. */
    assert_int_equal(buddy_free(&e->b, pfns[0], 0), 0);
    unsigned calls0 = r.calls;
    assert_int_equal(buddy_alloc(&e->b, 1), BUDDY_NONE);
    assert_true(r.calls - calls0 >= 1 && r.calls - calls0 <= BUDDY_RECLAIM_ROUNDS);
    /* The hook ran dry: the next failure asks once more, gets nothing, and fails (counted once). */
    r.allocate_inside = false;
    calls0 = r.calls;
    struct buddy_stats st0, st1;
    buddy_get_stats(&e->b, &st0);
    assert_int_equal(buddy_alloc(&e->b, 2), BUDDY_NONE);
    buddy_get_stats(&e->b, &st1);
    assert_int_equal(r.calls - calls0, 1);
    assert_int_equal(st1.failures, st0.failures + 1);

    /* Removing the hook: no more calls. */
    buddy_set_reclaim(&e->b, NULL, NULL);
    calls0 = r.calls;
    assert_int_equal(buddy_alloc(&e->b, 3), BUDDY_NONE);
    assert_int_equal(r.calls, calls0);
    env_free(e);
}

/* buddy_split turns one allocated block into two that are freed separately (partial deflate). */
static void test_split(void **state)
{
    (void)state;
    struct env *e = env_new(0, 256);
    env_add(e, 0, 256);
    struct walk initial = walk_all(&e->b, 0);
    uint64_t a = buddy_alloc(&e->b, 3);
    assert_int_equal(a, 0);
    fake_log_reset();
    assert_int_equal(buddy_split(&e->b, a, 2), -1); /* wrong order */
    assert_int_equal(buddy_split(&e->b, a + 4, 3), -1);
    assert_int_equal(buddy_split(&e->b, 100, 1), -1); /* free */
    assert_int_equal(buddy_split(&e->b, a, 0), -1);
    assert_int_equal(fake_log_count(), 4);
    assert_int_equal(buddy_split(&e->b, a, 3), 0);
    assert_int_equal(buddy_split(&e->b, a + 4, 2), 0); /* halves split further */
    /* Now allocated: 0 (order 2), 4 and 6 (order 1). The old order no longer frees. */
    assert_int_equal(buddy_free(&e->b, a, 3), -1);
    model_alloc(e, 0, 2);
    model_alloc(e, 4, 1);
    model_alloc(e, 6, 1);
    check_all(e);
    model_free(e, 2, false); /* 6 */
    check_all(e);
    assert_true(buddy_is_free(&e->b, 7));
    assert_false(buddy_is_free(&e->b, 5));
    model_free(e, 0, false); /* 0 */
    model_free(e, 0, false); /* 4: everything merges back */
    check_all(e);
    struct walk final = walk_all(&e->b, 0);
    assert_same_layout(&initial, &final);
    free(initial.v);
    free(final.v);
    env_free(e);
}

static void test_walk_stop_and_min_order(void **state)
{
    (void)state;
    struct env *e = env_new(0, 4096);
    env_add(e, 0, 4096 - 1); /* orders 11..0, one block each */
    struct walk w = {0};
    w.stop_after = 3;
    buddy_walk_free(&e->b, 0, walk_cb, &w);
    assert_int_equal(w.n, 3);
    assert_int_equal(w.v[0].order, 11);
    assert_int_equal(w.v[2].order, 9);
    free(w.v);
    w = walk_all(&e->b, 10);
    assert_int_equal(w.n, 2);
    free(w.v);
    w = walk_all(&e->b, BUDDY_MAX_ORDER + 1);
    assert_int_equal(w.n, 0);
    free(w.v);
    env_free(e);
}

/* Fixture for poisoning tests: 512 pages at pfn 0x200 backed by the fake RAM arena. */
#define P_BASE  0x200ULL
#define P_SPAN  512ULL
#define PATTERN 0xdeadbeefcafef00dULL

static bool page_has_pattern(uint64_t pfn, uint64_t pattern)
{
    const uint64_t *w = phys_to_virt(pfn << PAGE_SHIFT);
    for (unsigned i = 0; i < PAGE_SIZE / 8; i++)
        if (w[i] != pattern)
            return false;
    return true;
}

static void test_poison(void **state)
{
    (void)state;
    fake_ram_init(P_BASE << PAGE_SHIFT, P_SPAN * PAGE_SIZE);
    struct env *e = env_new(P_BASE, P_SPAN);
    struct buddy *b = &e->b;
    env_add(e, P_BASE, P_SPAN);
    buddy_set_poison(b, true, PATTERN);
    for (uint64_t p = P_BASE; p < P_BASE + P_SPAN; p++)
        assert_true(page_has_pattern(p, PATTERN));

    /* A clean allocation verifies silently; freeing refills what the user scribbled. */
    uint64_t a = buddy_alloc(b, 1);
    assert_int_equal(a, P_BASE);
    memset(phys_to_virt(a << PAGE_SHIFT), 0x5a, 2 * PAGE_SIZE);
    assert_int_equal(buddy_free(b, a, 1), 0);
    assert_true(page_has_pattern(a, PATTERN));
    assert_true(page_has_pattern(a + 1, PATTERN));
    assert_int_equal(b->poison_errors, 0);

    /* Corrupt one byte of a free page: the allocation that covers it reports its address. */
    uint64_t victim = P_BASE + 5;
    uint64_t bad = (victim << PAGE_SHIFT) + 1234;
    *(uint8_t *)phys_to_virt(bad) ^= 0x10;
    fake_log_reset();
    uint64_t c = buddy_alloc(b, 3); /* pages P_BASE..P_BASE+7 */
    assert_int_equal(c, P_BASE);
    struct buddy_stats st;
    buddy_get_stats(b, &st);
    assert_int_equal(st.poison_errors, 1);
    assert_int_equal(b->poison_bad_phys, bad);
    assert_int_equal(fake_log_count(), 1);
    char expect[96];
    snprintf(expect, sizeof(expect), "poison mismatch at 0x%llx:", (unsigned long long)bad);
    if (!strstr(fake_log_last(), expect))
        fail_msg("log line \"%s\" lacks \"%s\"", fake_log_last(), expect);
    assert_non_null(strstr(fake_log_last(), "expected 0xdeadbeefcafef00d"));

    /* Two bad bytes in one block: still one error for that block. */
    assert_int_equal(buddy_free(b, c, 3), 0);
    *(uint8_t *)phys_to_virt((P_BASE + 1) << PAGE_SHIFT) = 0;
    *(uint8_t *)phys_to_virt((P_BASE + 2) << PAGE_SHIFT) = 0;
    c = buddy_alloc(b, 2);
    buddy_get_stats(b, &st);
    assert_int_equal(st.poison_errors, 2);
    assert_int_equal(b->poison_bad_phys, (P_BASE + 1) << PAGE_SHIFT);
    assert_int_equal(buddy_free(b, c, 2), 0);

    /* Reported blocks are not verified: the host may have zeroed them. */
    unsigned order;
    uint64_t r = buddy_take_unreported(b, 0, &order);
    assert_int_equal(r, P_BASE);
    assert_int_equal(order, 9);
    memset(phys_to_virt(r << PAGE_SHIFT), 0, P_SPAN * PAGE_SIZE); /* "discarded" */
    assert_int_equal(buddy_free_reported(b, r, 9), 0);
    assert_true(page_has_pattern(r, 0)); /* not refilled: that would undo the report */
    uint64_t d = buddy_alloc(b, 0);
    assert_int_equal(d, P_BASE);
    buddy_get_stats(b, &st);
    assert_int_equal(st.poison_errors, 2);

    /* Freed, it stays apart from its reported buddies (not refilled); an allocation that needs
     * the whole block merges them, refilling the reported parts, so it verifies. */
    assert_int_equal(buddy_free(b, d, 0), 0);
    assert_true(page_has_pattern(P_BASE + 1, 0));
    d = buddy_alloc(b, 9);
    for (uint64_t p = P_BASE; p < P_BASE + P_SPAN; p++)
        assert_true(page_has_pattern(p, PATTERN));
    buddy_get_stats(b, &st);
    assert_int_equal(st.poison_errors, 2);
    assert_int_equal(buddy_free(b, d, 9), 0);

    /* A reported free next to a backed buddy is refilled when they merge. */
    uint64_t x = buddy_alloc(b, 0), y = buddy_alloc(b, 0);
    *(uint64_t *)phys_to_virt(y << PAGE_SHIFT) = 0;
    assert_int_equal(buddy_free(b, x, 0), 0);
    assert_int_equal(buddy_free_reported(b, y, 0), 0);
    d = buddy_alloc(b, 9);
    assert_true(page_has_pattern(y, PATTERN));
    buddy_get_stats(b, &st);
    assert_int_equal(st.poison_errors, 2);
    assert_int_equal(buddy_free(b, d, 9), 0);

    /* Switching patterns refills the free pages; off stops checking. */
    buddy_set_poison(b, true, 0x1111111111111111ULL);
    assert_true(page_has_pattern(P_BASE + 100, 0x1111111111111111ULL));
    buddy_set_poison(b, false, 0);
    memset(phys_to_virt((P_BASE + 3) << PAGE_SHIFT), 0x77, PAGE_SIZE);
    d = buddy_alloc(b, 9);
    buddy_get_stats(b, &st);
    assert_int_equal(st.poison_errors, 2);
    env_free(e);
    fake_ram_fini();
}

/* PAGE_POISON with a non-zero poison_val: the host promised to keep reported pages, so their
 * poison is checked on allocation and a host that discarded one anyway is caught. */
static void test_poison_kept_by_host(void **state)
{
    (void)state;
    for (int keep = 0; keep <= 1; keep++) {
        fake_ram_init(P_BASE << PAGE_SHIFT, P_SPAN * PAGE_SIZE);
        struct env *e = env_new(P_BASE, P_SPAN);
        struct buddy *b = &e->b;
        env_add(e, P_BASE, P_SPAN);
        buddy_set_poison(b, true, PATTERN);
        buddy_set_reported_keep_content(b, keep);
        unsigned order;
        uint64_t r = buddy_take_unreported(b, 0, &order);
        assert_int_equal(buddy_free_reported(b, r, order), 0); /* kept: still poisoned */
        uint64_t a = buddy_alloc(b, order);
        struct buddy_stats st;
        buddy_get_stats(b, &st);
        assert_int_equal(st.poison_errors, 0);
        assert_int_equal(buddy_free(b, a, order), 0);
        r = buddy_take_unreported(b, 0, &order);
        memset(phys_to_virt((r + 3) << PAGE_SHIFT), 0, PAGE_SIZE); /* discarded after all */
        assert_int_equal(buddy_free_reported(b, r, order), 0);
        a = buddy_alloc(b, order);
        buddy_get_stats(b, &st);
        assert_int_equal(st.poison_errors, keep ? 1 : 0);
        if (keep)
            assert_int_equal(b->poison_bad_phys, (r + 3) << PAGE_SHIFT);
        env_free(e);
        fake_ram_fini();
    }
}

/* Without poisoning the allocator must never touch page contents (phys_to_virt would abort). */
static void test_no_page_access(void **state)
{
    (void)state;
    fake_ram_init(0, 0);
    struct env *e = env_new(0, 1ULL << 16);
    env_add(e, 0, 1ULL << 16);
    unsigned order;
    uint64_t a = buddy_alloc(&e->b, 0);
    uint64_t r = buddy_take_unreported(&e->b, 0, &order);
    assert_int_equal(buddy_free_reported(&e->b, r, order), 0);
    assert_int_equal(buddy_free(&e->b, a, 0), 0);
    env_free(e);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup(test_meta_size, setup),
        cmocka_unit_test_setup(test_init_rejects, setup),
        cmocka_unit_test_setup(test_aligned_span_layout, setup),
        cmocka_unit_test_setup(test_add_range_decomposition, setup),
        cmocka_unit_test_setup(test_holes_and_odd_alignment, setup),
        cmocka_unit_test_setup(test_random_holes, setup),
        cmocka_unit_test_setup(test_random_aligned, setup),
        cmocka_unit_test_setup(test_random_large, setup),
        cmocka_unit_test_setup(test_exhaustion_order0, setup),
        cmocka_unit_test_setup(test_exhaustion_high_order, setup),
        cmocka_unit_test_setup(test_invalid_frees, setup),
        cmocka_unit_test_setup(test_reported_state, setup),
        cmocka_unit_test_setup(test_reclaim_hook, setup),
        cmocka_unit_test_setup(test_coalesce_on_demand, setup),
        cmocka_unit_test_setup(test_poison_kept_by_host, setup),
        cmocka_unit_test_setup(test_backed_first, setup),
        cmocka_unit_test_setup(test_alloc_largest, setup),
        cmocka_unit_test_setup(test_split, setup),
        cmocka_unit_test_setup(test_walk_stop_and_min_order, setup),
        cmocka_unit_test_setup(test_poison, setup),
        cmocka_unit_test_setup(test_no_page_access, setup),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
