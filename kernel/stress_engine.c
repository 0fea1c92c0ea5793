#include "kernel/stress_engine.h"
#include "include/platform.h"

static const char *const kind_names[] = {
    [STRESS_ALLOC] = "alloc",
    [STRESS_FREE] = "free",
    [STRESS_VERIFY] = "verify",
    [STRESS_REWRITE] = "rewrite",
    [STRESS_FULL_VERIFY] = "full_verify",
    [STRESS_FINAL_FREE] = "final_free",
};

const char *stress_kind_name(enum stress_kind k)
{
    return (unsigned)k <= STRESS_FINAL_FREE ? kind_names[k] : "?";
}

void stress_init(struct stress *s, struct buddy *mm, const struct stress_config *cfg)
{
    __builtin_memset(s, 0, sizeof(*s));
    s->mm = mm;
    s->cfg = *cfg;
    if (s->cfg.slots == 0 || s->cfg.slots > STRESS_MAX_SLOTS)
        s->cfg.slots = STRESS_MAX_SLOTS;
    if (s->cfg.max_order > STRESS_MAX_ORDER)
        s->cfg.max_order = STRESS_MAX_ORDER;
    prng_seed(&s->rng, cfg->seed);
    s->sequence = s->outcomes = mix64(cfg->seed);
}

static void fill(const struct stress *s, const struct stress_slot *sl)
{
    for (uint64_t pg = 0; pg < (1ull << sl->order); pg++) {
        uint64_t page = (sl->pfn + pg) << PAGE_SHIFT;
        uint64_t key = stress_page_key(s->cfg.seed, page, sl->gen);
        uint64_t *p = phys_to_virt(page);
        for (unsigned i = 0; i < STRESS_WORDS_PER_PAGE; i++)
            p[i] = stress_word(key, page + 8 * i);
    }
}

/* Verify one slot's block; on a mismatch fill in s->failure and return false. */
static bool verify(struct stress *s, unsigned idx, enum stress_kind during)
{
    const struct stress_slot *sl = &s->slot[idx];
    for (uint64_t pg = 0; pg < (1ull << sl->order); pg++) {
        uint64_t page = (sl->pfn + pg) << PAGE_SHIFT;
        uint64_t key = stress_page_key(s->cfg.seed, page, sl->gen);
        const volatile uint64_t *p = phys_to_virt(page);
        for (unsigned i = 0; i < STRESS_WORDS_PER_PAGE; i++) {
            uint64_t want = stress_word(key, page + 8 * i), got = p[i];
            if (got != want) {
                s->failed = true;
                s->failure = (struct stress_failure){
                    .op = s->ops,
                    .during = during,
                    .slot = idx,
                    .page = page,
                    .addr = page + 8 * i,
                    .expected = want,
                    .found = got,
                    .gen = sl->gen,
                };
                return false;
            }
        }
        s->pages_verified++;
    }
    s->block_verifies++;
    return true;
}

static bool release(struct stress *s, unsigned idx, enum stress_kind during)
{
    struct stress_slot *sl = &s->slot[idx];
    if (!verify(s, idx, during))
        return false;
    buddy_free(s->mm, sl->pfn, sl->order);
    s->held_pages -= 1ull << sl->order;
    s->held_blocks--;
    s->frees++;
    sl->used = false;
    return true;
}

bool stress_verify_all(struct stress *s)
{
    for (unsigned i = 0; i < s->cfg.slots; i++)
        if (s->slot[i].used && !verify(s, i, STRESS_FULL_VERIFY))
            return false;
    s->full_verifies++;
    return true;
}

bool stress_free_all(struct stress *s)
{
    for (unsigned i = 0; i < s->cfg.slots; i++)
        if (s->slot[i].used && !release(s, i, STRESS_FINAL_FREE))
            return false;
    return true;
}

static uint64_t fold(uint64_t h, uint64_t v)
{
    return mix64(h ^ v) + PRNG_GOLDEN;
}

bool stress_op(struct stress *s)
{
    /* Always three draws, in this order, whatever the operation turns out to do. */
    uint64_t pick = prng_below(&s->rng, 100);
    unsigned idx = (unsigned)prng_below(&s->rng, s->cfg.slots);
    unsigned order = (unsigned)prng_below(&s->rng, s->cfg.max_order + 1);
    enum stress_kind kind = pick < 40   ? STRESS_ALLOC
                            : pick < 65 ? STRESS_FREE
                            : pick < 90 ? STRESS_VERIFY
                                        : STRESS_REWRITE;
    s->sequence = fold(s->sequence, (uint64_t)kind << 32 | (uint64_t)idx << 8 | order);
    struct stress_slot *sl = &s->slot[idx];
    bool was_used = sl->used, ok = true;
    uint64_t gen = s->ops + 1; /* generation 0 is never written */

    switch (kind) {
    case STRESS_ALLOC: {
        if (sl->used && !release(s, idx, kind))
            return false;
        uint64_t pfn = buddy_alloc(s->mm, order);
        if (pfn == BUDDY_NONE) {
            s->alloc_failures++;
            ok = false;
            break;
        }
        *sl = (struct stress_slot){.pfn = pfn, .gen = gen, .order = (uint8_t)order, .used = true};
        fill(s, sl);
        s->held_pages += 1ull << order;
        s->held_blocks++;
        s->pages_written += 1ull << order;
        s->allocs++;
        break;
    }
    case STRESS_FREE:
        if (sl->used && !release(s, idx, kind))
            return false;
        break;
    case STRESS_VERIFY:
        if (sl->used && !verify(s, idx, kind))
            return false;
        break;
    case STRESS_REWRITE:
        if (sl->used) {
            if (!verify(s, idx, kind))
                return false;
            sl->gen = gen;
            fill(s, sl);
            s->pages_written += 1ull << sl->order;
            s->rewrites++;
        }
        break;
    default:
        break;
    }
    s->outcomes = fold(s->outcomes, (uint64_t)kind << 32 | (uint64_t)idx << 8 | order |
                                        (uint64_t)was_used << 60 | (uint64_t)ok << 61);
    /* A failure in the full verify names this operation: the one after which it ran. */
    if (s->cfg.verify_every && (s->ops + 1) % s->cfg.verify_every == 0 && !stress_verify_all(s))
        return false;
    s->ops++;
    return true;
}

bool stress_corrupt(struct stress *s, uint64_t *addr, uint64_t *was, uint64_t *now)
{
    if (!s->held_blocks)
        return false;
    struct prng r;
    prng_seed(&r, mix64(s->cfg.seed ^ 0x5354524553534352ull)); /* "STRESSCR" */
    unsigned idx = (unsigned)prng_below(&r, s->cfg.slots);
    while (!s->slot[idx].used)
        idx = (idx + 1) % s->cfg.slots;
    const struct stress_slot *sl = &s->slot[idx];
    uint64_t pg = prng_below(&r, 1ull << sl->order);
    uint64_t word = prng_below(&r, STRESS_WORDS_PER_PAGE);
    *addr = ((sl->pfn + pg) << PAGE_SHIFT) + 8 * word;
    volatile uint64_t *p = phys_to_virt(*addr);
    *was = *p;
    *p = ~*was;
    *now = *p;
    return true;
}
