/*
 * The guest side of stress mode, without the kernel around it: a seeded sequence of operations
 * on memory taken from a buddy allocator (allocate a block of random order and pattern it, free
 * one, re-verify one, rewrite one with a new generation, and every so often verify everything
 * held). Every page held carries a pattern derived from (seed, page address, generation), so a
 * host that loses, discards, swaps or corrupts a guest page is caught page by page.
 *
 * Determinism: each operation draws exactly three numbers from the seeded stream (kind, slot,
 * order), whatever happens, so the sequence of operations depends on the seed alone, never on
 * timing, on where the allocator puts a block or on the balloon. Blocks live in numbered slots
 * (an operation names a slot, not "the n-th held block"), so even an allocation that fails
 * because the balloon holds the memory leaves later operations naming the same slots.
 *
 * Portable (mm/, lib/ and include/platform.h only): the kernel runs it from kernel/stress.c and
 * the host unit tests on a simulated arena (tests/unit/test_stress.c).
 */
#ifndef KERNEL_STRESS_ENGINE_H
#define KERNEL_STRESS_ENGINE_H

#include <stdbool.h>
#include <stdint.h>

#include "lib/prng.h"
#include "mm/buddy.h"

#define STRESS_MAX_SLOTS      1024
#define STRESS_MAX_ORDER      10 /* 4 MiB blocks at most */
#define STRESS_WORDS_PER_PAGE 512

/* The operation kinds and their share of the draws (out of 100). */
enum stress_kind {
    STRESS_ALLOC,   /* 40: (verify and free what the slot holds, then) allocate and pattern */
    STRESS_FREE,    /* 25: verify and free what the slot holds */
    STRESS_VERIFY,  /* 25: verify what the slot holds */
    STRESS_REWRITE, /* 10: verify, then pattern it again with a new generation */
    STRESS_KINDS,
    STRESS_FULL_VERIFY = STRESS_KINDS, /* not drawn: every verify_every ops, and at the end */
    STRESS_FINAL_FREE,                 /* not drawn: the last release */
};

struct stress_config {
    uint64_t seed;
    uint32_t slots;        /* 1..STRESS_MAX_SLOTS */
    uint32_t max_order;    /* 0..STRESS_MAX_ORDER */
    uint32_t verify_every; /* ops between full verifies, 0: never (only at the end) */
};

struct stress_slot {
    uint64_t pfn, gen;
    uint8_t order;
    bool used;
};

/* The first mismatch found; the run stops there. */
struct stress_failure {
    uint64_t op; /* operation index (from 0) during which it was found */
    enum stress_kind during;
    unsigned slot;
    uint64_t page;     /* physical address of the page */
    uint64_t addr;     /* physical address of the first bad word */
    uint64_t expected; /* the pattern there */
    uint64_t found;    /* what memory held */
    uint64_t gen;      /* the generation it was written with */
};

struct stress {
    struct buddy *mm;
    struct stress_config cfg;
    struct prng rng;
    uint64_t ops;      /* operations done */
    uint64_t sequence; /* checksum of the drawn operations (kind, slot, order): seed only */
    uint64_t outcomes; /* ... and of what each did (slot held, allocation succeeded): equal for
                          equal seeds unless an allocation failed */
    uint64_t held_pages, held_blocks;
    uint64_t allocs, frees, alloc_failures, rewrites, block_verifies, full_verifies;
    uint64_t pages_verified, pages_written;
    bool failed;
    struct stress_failure failure;
    struct stress_slot slot[STRESS_MAX_SLOTS];
};

/* The 64-bit key of a page written in generation gen; word i of the page holds
 * stress_word(key, page + 8 * i). Different seeds, pages and generations give unrelated keys,
 * so a page that comes back zeroed, stale (an earlier generation) or moved (another page's
 * contents) does not verify. */
static inline uint64_t stress_page_key(uint64_t seed, uint64_t page, uint64_t gen)
{
    return mix64(seed ^ mix64(page ^ mix64(gen + PRNG_GOLDEN)));
}

static inline uint64_t stress_word(uint64_t key, uint64_t addr)
{
    return key ^ (addr * PRNG_GOLDEN);
}

const char *stress_kind_name(enum stress_kind k);

void stress_init(struct stress *s, struct buddy *mm, const struct stress_config *cfg);
/* Operation number s->ops (then s->ops + 1), and a full verify when verify_every says so.
 * Returns false once a verify failed (s->failure says where; do not call again). */
bool stress_op(struct stress *s);
/* Verify every held block; false on the first mismatch. */
bool stress_verify_all(struct stress *s);
/* Verify and free every held block; false on the first mismatch (that block stays held). */
bool stress_free_all(struct stress *s);
/* Damage one word of one held page on purpose (blimp.inject=stress_corrupt): the block, page
 * and word come from a stream of their own, derived from the seed, so the operation sequence is
 * unchanged. Returns false when nothing is held. */
bool stress_corrupt(struct stress *s, uint64_t *addr, uint64_t *was, uint64_t *now);

#endif
