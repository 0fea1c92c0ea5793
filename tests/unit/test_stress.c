/* Unit tests for lib/prng.h and kernel/stress_engine.c on a simulated arena. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "include/platform.h"
#include "kernel/stress_engine.h"
#include "lib/prng.h"
#include "mm/buddy.h"
#include "tests/unit/fake_platform.h"

#define RAM_BASE (16ull << 20)
#define RAM_PFN  (RAM_BASE >> PAGE_SHIFT)

struct env {
    struct buddy mm;
    void *meta;
    uint64_t pages;
    struct stress s;
};

static struct env *env_new(uint64_t bytes)
{
    struct env *e = calloc(1, sizeof(*e));
    assert_non_null(e);
    e->pages = bytes >> PAGE_SHIFT;
    fake_ram_init(RAM_BASE, bytes);
    size_t mb = buddy_meta_bytes(e->pages);
    e->meta = aligned_alloc(8, (mb + 7) & ~(size_t)7);
    assert_non_null(e->meta);
    assert_int_equal(buddy_init(&e->mm, e->meta, mb, RAM_PFN, e->pages), 0);
    buddy_add_range(&e->mm, RAM_PFN, e->pages);
    return e;
}

static void env_free(struct env *e)
{
    fake_ram_fini();
    free(e->meta);
    free(e);
}

static const struct stress_config CFG = {
    .seed = 1, .slots = 64, .max_order = 5, .verify_every = 100};

static void run_ops(struct stress *s, uint64_t n)
{
    for (uint64_t i = 0; i < n; i++)
        assert_true(stress_op(s));
}

/* splitmix64's published output for seed 0, so the stream is the same on every build. */
static void test_prng_known_values(void **state)
{
    (void)state;
    struct prng r;
    prng_seed(&r, 0);
    assert_true(prng_next(&r) == 0xe220a8397b1dcdafull);
    assert_true(prng_next(&r) == 0x6e789e6aa1b965f4ull);
    assert_true(prng_next(&r) == 0x06c45d188009454full);
    prng_seed(&r, 42);
    for (int i = 0; i < 1000; i++)
        assert_true(prng_below(&r, 7) < 7);
}

static void test_pattern_depends_on_seed_page_and_generation(void **state)
{
    (void)state;
    uint64_t k = stress_page_key(1, 0x100000, 5);
    assert_true(k != stress_page_key(2, 0x100000, 5));
    assert_true(k != stress_page_key(1, 0x101000, 5));
    assert_true(k != stress_page_key(1, 0x100000, 6));
    assert_true(k == stress_page_key(1, 0x100000, 5));
    /* every word of a page differs from its neighbours and from zero (a discarded page) */
    for (uint64_t i = 0; i < STRESS_WORDS_PER_PAGE; i++) {
        uint64_t w = stress_word(k, 0x100000 + 8 * i);
        assert_true(w != 0);
        if (i)
            assert_true(w != stress_word(k, 0x100000 + 8 * (i - 1)));
    }
}

static void test_run_verifies_and_frees_everything(void **state)
{
    (void)state;
    struct env *e = env_new(32ull << 20);
    uint64_t free0 = e->mm.free_pages;
    stress_init(&e->s, &e->mm, &CFG);
    run_ops(&e->s, 5000);
    assert_int_equal(e->s.ops, 5000);
    assert_int_equal(e->s.alloc_failures, 0);
    assert_true(e->s.allocs > 1000 && e->s.frees > 500 && e->s.rewrites > 100);
    assert_int_equal(e->s.full_verifies, 50);
    assert_true(e->s.held_pages > 0);
    assert_int_equal(e->mm.free_pages, free0 - e->s.held_pages);
    assert_true(stress_verify_all(&e->s));
    assert_true(stress_free_all(&e->s));
    assert_int_equal(e->s.held_pages, 0);
    assert_int_equal(e->s.held_blocks, 0);
    assert_int_equal(e->mm.free_pages, free0);
    assert_false(e->s.failed);
    env_free(e);
}

struct result {
    uint64_t sequence, outcomes, allocs, frees, pages_verified, alloc_failures;
};

/* A run of n ops on a fresh arena of `bytes`; `fragment` first takes every other page of
 * the first MiB, so the allocator hands out different addresses. */
static struct result one_run(uint64_t seed, uint64_t bytes, bool fragment, uint64_t n)
{
    struct env *e = env_new(bytes);
    if (fragment)
        for (int i = 0; i < 512; i++)
            if (buddy_alloc(&e->mm, 0) != BUDDY_NONE && (i & 1))
                buddy_free(&e->mm, RAM_PFN + (uint64_t)i - 1, 0);
    struct stress_config c = CFG;
    c.seed = seed;
    stress_init(&e->s, &e->mm, &c);
    run_ops(&e->s, n);
    struct result r = {e->s.sequence, e->s.outcomes,       e->s.allocs,
                       e->s.frees,    e->s.pages_verified, e->s.alloc_failures};
    assert_true(stress_free_all(&e->s));
    env_free(e);
    return r;
}

static void test_same_seed_same_sequence(void **state)
{
    (void)state;
    struct result a = one_run(7, 32ull << 20, false, 3000);
    struct result b = one_run(7, 32ull << 20, false, 3000);
    assert_memory_equal(&a, &b, sizeof(a));
    /* other addresses (a fragmented allocator): the same operations and outcomes */
    struct result c = one_run(7, 32ull << 20, true, 3000);
    assert_true(c.sequence == a.sequence && c.outcomes == a.outcomes);
    assert_true(c.pages_verified == a.pages_verified);
    struct result d = one_run(8, 32ull << 20, false, 3000);
    assert_true(d.sequence != a.sequence && d.outcomes != a.outcomes);
}

/* Allocations that fail (the balloon holds the memory) change what happened, never which
 * operations are drawn. */
static void test_sequence_survives_allocation_failures(void **state)
{
    (void)state;
    struct result big = one_run(3, 32ull << 20, false, 3000);
    struct result tiny = one_run(3, 256ull << 10, false, 3000);
    assert_int_equal(big.alloc_failures, 0);
    assert_true(tiny.alloc_failures > 0);
    assert_true(tiny.sequence == big.sequence);
    assert_true(tiny.outcomes != big.outcomes);
}

static void test_corruption_is_caught_with_its_address(void **state)
{
    (void)state;
    struct env *e = env_new(32ull << 20);
    stress_init(&e->s, &e->mm, &CFG);
    run_ops(&e->s, 777);
    uint64_t addr, was, now;
    assert_true(stress_corrupt(&e->s, &addr, &was, &now));
    assert_true(now == ~was && addr % 8 == 0);
    /* the operations go on until a verify meets the damaged block (at the latest the full
     * verify every 100 ops) */
    bool ok = true;
    for (int i = 0; i < 100 && ok; i++)
        ok = stress_op(&e->s);
    assert_false(ok);
    assert_true(e->s.failed);
    const struct stress_failure *f = &e->s.failure;
    assert_true(f->addr == addr);
    assert_true(f->page == (addr & ~(PAGE_SIZE - 1)));
    assert_true(f->found == now && f->expected == was);
    assert_true(f->op >= 777 && f->op < 877);
    env_free(e);
}

/* A page the host discarded (reads back as zeroes) or swapped with another is caught. */
static void test_lost_and_swapped_pages_are_caught(void **state)
{
    (void)state;
    struct env *e = env_new(32ull << 20);
    stress_init(&e->s, &e->mm, &CFG);
    run_ops(&e->s, 500);
    unsigned a = 0, b;
    while (!e->s.slot[a].used)
        a++;
    b = a + 1;
    while (!e->s.slot[b].used)
        b++;
    uint64_t pa = e->s.slot[a].pfn << PAGE_SHIFT, pb = e->s.slot[b].pfn << PAGE_SHIFT;
    /* swap the first pages of two blocks: both hold valid patterns, of the wrong page */
    uint8_t tmp[PAGE_SIZE];
    memcpy(tmp, phys_to_virt(pa), PAGE_SIZE);
    memcpy(phys_to_virt(pa), phys_to_virt(pb), PAGE_SIZE);
    memcpy(phys_to_virt(pb), tmp, PAGE_SIZE);
    assert_false(stress_verify_all(&e->s));
    assert_true(e->s.failure.page == pa && e->s.failure.addr == pa);
    /* put them back, then zero a page in the middle of block b */
    memcpy(phys_to_virt(pb), phys_to_virt(pa), PAGE_SIZE);
    memcpy(phys_to_virt(pa), tmp, PAGE_SIZE);
    e->s.failed = false;
    assert_true(stress_verify_all(&e->s));
    uint64_t mid = pb + ((1ull << e->s.slot[b].order) / 2) * PAGE_SIZE;
    memset(phys_to_virt(mid), 0, PAGE_SIZE);
    assert_false(stress_verify_all(&e->s));
    assert_true(e->s.failure.addr == mid && e->s.failure.found == 0);
    env_free(e);
}

int main(void)
{
    fake_log_echo(false);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_prng_known_values),
        cmocka_unit_test(test_pattern_depends_on_seed_page_and_generation),
        cmocka_unit_test(test_run_verifies_and_frees_everything),
        cmocka_unit_test(test_same_seed_same_sequence),
        cmocka_unit_test(test_sequence_survives_allocation_failures),
        cmocka_unit_test(test_corruption_is_caught_with_its_address),
        cmocka_unit_test(test_lost_and_swapped_pages_are_caught),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
