/*
 * Memory conformance mode holds: blocks taken from the allocator, chained through their first
 * words, every page patterned (8 words, every 512 bytes from offset 256) so that a page the host
 * discarded, swapped or left stale is found with its address; and the isolated pages of D4.
 *
 * Wrong-page discards: the balloon is given only isolated pages, every odd page of a large
 * block whose even pages (and all the rest of memory) the guest holds with a pattern. A host
 * that discards PFN^1 or any page but the one it was given destroys a verified neighbour.
 */
#include "kernel/conform/conform_internal.h"
#include "kernel/report.h"
#include "lib/json.h"

#define PATTERN_OFF  256 /* pattern words at 256 + 512k: the first words hold the chain */
#define PATTERN_STEP 512
#define PATTERN_SEED 0x9e3779b97f4a7c15ull

struct held_block {
    uint64_t next_pfn; /* BUDDY_NONE ends the chain */
    uint64_t order;
};

static uint64_t pattern_word(uint64_t addr, uint64_t gen)
{
    return (addr * PATTERN_SEED) ^ (gen << 56) ^ 0x5a5a5a5a00000000ull;
}

static void pattern_page(uint64_t pfn, uint64_t gen)
{
    uint64_t base = pfn << PAGE_SHIFT;
    uint8_t *p = phys_to_virt(base);
    for (unsigned off = PATTERN_OFF; off < PAGE_SIZE; off += PATTERN_STEP)
        *(volatile uint64_t *)(p + off) = pattern_word(base + off, gen);
}

/* 0 when the page holds its pattern, else the address of the first bad word (*found: its
 * value, *expected: what belongs there). */
static uint64_t check_page(uint64_t pfn, uint64_t gen, uint64_t *found, uint64_t *expected)
{
    uint64_t base = pfn << PAGE_SHIFT;
    const uint8_t *p = phys_to_virt(base);
    for (unsigned off = PATTERN_OFF; off < PAGE_SIZE; off += PATTERN_STEP) {
        uint64_t v = *(const volatile uint64_t *)(p + off), want = pattern_word(base + off, gen);
        if (v != want) {
            *found = v;
            *expected = want;
            return base + off;
        }
    }
    return 0;
}

static bool page_zero(uint64_t pfn)
{
    const uint8_t *p = phys_to_virt(pfn << PAGE_SHIFT);
    for (unsigned off = PATTERN_OFF; off < PAGE_SIZE; off += PATTERN_STEP)
        if (*(const volatile uint64_t *)(p + off))
            return false;
    return true;
}

static struct held_block *block_at(uint64_t pfn)
{
    return phys_to_virt(pfn << PAGE_SHIFT);
}

/* Put a block the checks took at the head of the chain. */
static void chain_push(struct chain *c, uint64_t pfn, unsigned order)
{
    struct held_block *h = block_at(pfn);
    h->next_pfn = c->head;
    h->order = order;
    c->head = pfn;
    c->pages += 1ull << order;
}

void take_all(struct chain *c, uint64_t gen)
{
    c->head = BUDDY_NONE;
    c->pages = 0;
    unsigned order;
    uint64_t pfn;
    while ((pfn = buddy_alloc_largest(&kernel_buddy, BUDDY_MAX_ORDER, &order)) != BUDDY_NONE) {
        for (uint64_t i = 0; i < (1ull << order); i++)
            pattern_page(pfn + i, gen);
        chain_push(c, pfn, order);
    }
}

uint64_t take_all_count_zero(struct chain *c)
{
    c->head = BUDDY_NONE;
    c->pages = 0;
    uint64_t zero = 0;
    unsigned order;
    uint64_t pfn;
    while ((pfn = buddy_alloc_largest(&kernel_buddy, BUDDY_MAX_ORDER, &order)) != BUDDY_NONE) {
        for (uint64_t i = 0; i < (1ull << order); i++)
            zero += page_zero(pfn + i);
        chain_push(c, pfn, order);
    }
    return zero;
}

/* The first bad page of the chain (0: all good). */
uint64_t verify_chain(const struct chain *c, uint64_t gen, uint64_t *found, uint64_t *expected,
                      uint64_t *pages_checked)
{
    for (uint64_t pfn = c->head; pfn != BUDDY_NONE; pfn = block_at(pfn)->next_pfn) {
        uint64_t n = 1ull << block_at(pfn)->order;
        for (uint64_t i = 0; i < n; i++) {
            uint64_t bad = check_page(pfn + i, gen, found, expected);
            if (bad)
                return bad;
        }
        *pages_checked += n;
    }
    return 0;
}

void free_chain(struct chain *c)
{
    uint64_t pfn = c->head;
    while (pfn != BUDDY_NONE) {
        struct held_block h = *block_at(pfn);
        buddy_free(&kernel_buddy, pfn, (unsigned)h.order);
        pfn = h.next_pfn;
    }
    c->head = BUDDY_NONE;
    c->pages = 0;
}

static uint64_t gen_of(uint64_t pfn)
{
    return pfn & 1; /* two generations: the pattern differs between neighbours too */
}

static void split_all(uint64_t pfn, unsigned order)
{
    if (order == 0)
        return;
    buddy_split(&kernel_buddy, pfn, order);
    split_all(pfn, order - 1);
    split_all(pfn + (1ull << (order - 1)), order - 1);
}

/* The page a host that computes a guest address from a PFN in 32 bits would discard instead
 * of pfn: (pfn << 12) & 0xffffffff. */
static uint64_t alias32(uint64_t pfn)
{
    return pfn & (PFN_4G - 1);
}

/* The held block of the chain that contains pfn (BUDDY_NONE: none); *prev its predecessor. */
static uint64_t chain_find(const struct chain *c, uint64_t pfn, uint64_t *prev)
{
    *prev = BUDDY_NONE;
    for (uint64_t b = c->head; b != BUDDY_NONE; *prev = b, b = block_at(b)->next_pfn)
        if (pfn >= b && pfn < b + (1ull << block_at(b)->order))
            return b;
    return BUDDY_NONE;
}

/* Whether [pfn, pfn + n) lies inside one held block of the chain. */
static bool chain_holds(const struct chain *c, uint64_t pfn, uint64_t n)
{
    uint64_t prev, b = chain_find(c, pfn, &prev);
    return b != BUDDY_NONE && pfn + n <= b + (1ull << block_at(b)->order);
}

/* Take the naturally aligned 2^order block at pfn out of the held block b of the chain (prev:
 * its predecessor): b is split down to it, the other halves stay held (still patterned). */
static void chain_carve(struct chain *c, uint64_t b, uint64_t prev, uint64_t pfn, unsigned order)
{
    struct held_block h = *block_at(b);
    if (prev == BUDDY_NONE)
        c->head = h.next_pfn;
    else
        block_at(prev)->next_pfn = h.next_pfn;
    c->pages -= 1ull << h.order;
    for (unsigned o = (unsigned)h.order; o > order; o--) {
        buddy_split(&kernel_buddy, b, o);
        uint64_t half = 1ull << (o - 1);
        if (pfn < b + half) {
            chain_push(c, b + half, o - 1);
        } else {
            chain_push(c, b, o - 1);
            b += half;
        }
    }
}

/* A block above 4 GiB for isolated pages, taken out of the held memory, whose 32-bit alias
 * (every page's alias32) is held memory too: a host that truncates PFN << 12 to 32 bits then
 * destroys pages the guest watches, not its code, page tables or structures. BUDDY_NONE: RAM
 * does not extend above 4 GiB (or no such block). */
static uint64_t carve_high_area(unsigned order)
{
    uint64_t n = 1ull << order;
    for (uint64_t b = conform.fill.head, prev = BUDDY_NONE; b != BUDDY_NONE;
         prev = b, b = block_at(b)->next_pfn) {
        uint64_t end = b + (1ull << block_at(b)->order);
        if (b < PFN_4G || end - b < n)
            continue;
        for (uint64_t p = b; p + n <= end; p += n) {
            if (alias32(p) + n > PFN_4G || !chain_holds(&conform.fill, alias32(p), n))
                continue;
            chain_carve(&conform.fill, b, prev, p, order);
            return p;
        }
    }
    return BUDDY_NONE;
}

/* Pattern an area (each page with its own generation) and free its odd pages. */
static uint64_t isolate(const struct area *a)
{
    uint64_t n = 1ull << a->order;
    split_all(a->pfn, a->order);
    for (uint64_t i = 1; i < n; i += 2)
        buddy_free(&kernel_buddy, a->pfn + i, 0);
    return n / 2;
}

static void pattern_area(const struct area *a)
{
    for (uint64_t i = 0; i < (1ull << a->order); i++)
        pattern_page(a->pfn + i, gen_of(a->pfn + i));
}

static void emit_layout(void)
{
    struct json j;
    event_begin(&j, "conform_layout");
    json_u64(&j, "isolated", conform.isolated);
    json_u64(&j, "target", conform.target);
    json_u64(&j, "held", conform.fill.pages);
    json_open_array(&j, "areas");
    for (unsigned i = 0; i < conform.n_areas; i++) {
        const struct area *a = &conform.areas[i];
        json_open_object(&j, NULL);
        json_u64(&j, "base", a->pfn << PAGE_SHIFT);
        json_u64(&j, "pages", 1ull << a->order);
        if (a->pfn >= PFN_4G)
            json_u64(&j, "alias32", alias32(a->pfn) << PAGE_SHIFT);
        json_close(&j);
    }
    json_close(&j);
    event_emit(&j);
}

/* The balloon can only take the odd pages of the areas: the guest holds everything else. */
bool build_layout(void)
{
    struct area *low = &conform.areas[0];
    low->pfn = BUDDY_NONE;
    for (unsigned o = AREA_ORDER; o >= 8 && low->pfn == BUDDY_NONE; o--) {
        low->pfn = buddy_alloc(&kernel_buddy, o);
        low->order = o;
    }
    if (low->pfn == BUDDY_NONE)
        return false;
    conform.n_areas = 1;
    pattern_area(low);
    take_all(&conform.fill, 2);
    uint64_t high = low->pfn < PFN_4G ? carve_high_area(low->order) : BUDDY_NONE;
    if (high != BUDDY_NONE) {
        conform.areas[conform.n_areas++] = (struct area){high, low->order};
        pattern_area(&conform.areas[1]);
    }
    conform.isolated = 0;
    for (unsigned i = 0; i < conform.n_areas; i++)
        conform.isolated += isolate(&conform.areas[i]);
    conform.target = (uint32_t)(conform.isolated - RECORD_SLACK);
    for (unsigned i = 0; i < conform.n_areas; i++)
        report_info("layout: %lu isolated pages at 0x%lx between held neighbours, %lu more pages "
                    "held; the balloon may take %u",
                    (uint64_t)1 << conform.areas[i].order >> 1, conform.areas[i].pfn << PAGE_SHIFT,
                    conform.fill.pages, conform.target);
    emit_layout();
    return true;
}

/* A page of held memory that went bad: which ballooned page's 32-bit alias it is, if any. */
static uint64_t aliased_by(uint64_t pfn)
{
    for (unsigned i = 1; i < conform.n_areas; i++) {
        const struct area *a = &conform.areas[i];
        if (pfn >= alias32(a->pfn) && pfn < alias32(a->pfn) + (1ull << a->order))
            return a->pfn + (pfn - alias32(a->pfn));
    }
    return BUDDY_NONE;
}

/* The even pages of an area: still as the guest wrote them? */
static bool verify_area(const struct area *a, const char *when, uint64_t *checked)
{
    uint64_t found = 0, expected = 0;
    for (uint64_t i = 0; i < (1ull << a->order); i += 2) {
        uint64_t pfn = a->pfn + i;
        uint64_t bad = check_page(pfn, gen_of(pfn), &found, &expected);
        if (bad) {
            verdict(D4, V_WRONG_PAGE,
                    "%s: page 0x%lx, next to ballooned page 0x%lx, reads 0x%lx at 0x%lx "
                    "(expected 0x%lx)",
                    when, pfn << PAGE_SHIFT, (pfn + 1) << PAGE_SHIFT, found, bad, expected);
            return false;
        }
        (*checked)++;
    }
    return true;
}

/* The even pages of the areas and the rest of memory: still as the guest wrote them? */
void verify_neighbours(const char *when)
{
    uint64_t found = 0, expected = 0, checked = 0;
    for (unsigned i = 0; i < conform.n_areas; i++)
        if (!verify_area(&conform.areas[i], when, &checked))
            return;
    uint64_t bad = verify_chain(&conform.fill, 2, &found, &expected, &checked);
    uint64_t page = bad & ~(uint64_t)(PAGE_SIZE - 1);
    uint64_t of = bad ? aliased_by(page >> PAGE_SHIFT) : BUDDY_NONE;
    if (of != BUDDY_NONE && !((of - conform.areas[1].pfn) & 1)) /* an even page: not given */
        of = BUDDY_NONE;
    if (of != BUDDY_NONE) {
        verdict(D4, V_WRONG_PAGE,
                "%s: page 0x%lx, the 32-bit alias of ballooned page 0x%lx (PFN << 12 "
                "truncated), reads 0x%lx at 0x%lx (expected 0x%lx)",
                when, page, of << PAGE_SHIFT, found, bad, expected);
        return;
    }
    if (bad) {
        verdict(D4, V_WRONG_PAGE,
                "%s: page 0x%lx (not near the balloon) reads 0x%lx at 0x%lx "
                "(expected 0x%lx)",
                when, page, found, bad, expected);
        return;
    }
    report_info("D4 holds %s: %lu pages around and away from the balloon verified", when, checked);
    if (conform.n_areas > 1)
        verdict(D4, V_CONFORMS,
                "%u isolated pages at 0x%lx and 0x%lx (above 4 GiB) inflated and deflated; "
                "every neighbour, the 32-bit aliases and the rest of memory verified after each",
                conform.target, conform.areas[0].pfn << PAGE_SHIFT,
                conform.areas[1].pfn << PAGE_SHIFT);
    else
        verdict(D4, V_CONFORMS,
                "%u isolated pages inflated and deflated; every neighbour and the "
                "rest of memory verified after each",
                conform.target);
}

void release_layout(void)
{
    free_chain(&conform.fill);
    for (unsigned i = 0; i < conform.n_areas; i++) {
        const struct area *a = &conform.areas[i];
        for (uint64_t p = 0; p < (1ull << a->order); p += 2)
            buddy_free(&kernel_buddy, a->pfn + p, 0);
    }
    conform.n_areas = 0;
}
