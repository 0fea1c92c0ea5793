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

/* The balloon can only take the odd pages of the area: the guest holds everything else. */
bool build_layout(void)
{
    conform.area = BUDDY_NONE;
    for (unsigned o = AREA_ORDER; o >= 8 && conform.area == BUDDY_NONE; o--) {
        conform.area = buddy_alloc(&kernel_buddy, o);
        conform.area_order = o;
    }
    if (conform.area == BUDDY_NONE)
        return false;
    uint64_t n = 1ull << conform.area_order;
    for (uint64_t i = 0; i < n; i++)
        pattern_page(conform.area + i, gen_of(conform.area + i));
    take_all(&conform.fill, 2);
    split_all(conform.area, conform.area_order);
    for (uint64_t i = 1; i < n; i += 2)
        buddy_free(&kernel_buddy, conform.area + i, 0);
    conform.isolated = n / 2;
    conform.target = (uint32_t)(conform.isolated - RECORD_SLACK);
    report_info("layout: %lu isolated pages at 0x%lx between held neighbours, %lu more pages "
                "held; the balloon may take %u",
                conform.isolated, conform.area << PAGE_SHIFT, conform.fill.pages, conform.target);
    return true;
}

/* The even pages of the area and the rest of memory: still as the guest wrote them? */
void verify_neighbours(const char *when)
{
    uint64_t found = 0, expected = 0, checked = 0;
    for (uint64_t i = 0; i < (1ull << conform.area_order); i += 2) {
        uint64_t pfn = conform.area + i;
        uint64_t bad = check_page(pfn, gen_of(pfn), &found, &expected);
        if (bad) {
            verdict(D4, V_WRONG_PAGE,
                    "%s: page 0x%lx, next to ballooned page 0x%lx, reads 0x%lx at 0x%lx "
                    "(expected 0x%lx)",
                    when, pfn << PAGE_SHIFT, (pfn + 1) << PAGE_SHIFT, found, bad, expected);
            return;
        }
        checked++;
    }
    uint64_t bad = verify_chain(&conform.fill, 2, &found, &expected, &checked);
    if (bad) {
        verdict(D4, V_WRONG_PAGE,
                "%s: page 0x%lx (not near the balloon) reads 0x%lx at 0x%lx "
                "(expected 0x%lx)",
                when, bad & ~(uint64_t)(PAGE_SIZE - 1), found, bad, expected);
        return;
    }
    report_info("D4 holds %s: %lu pages around and away from the balloon verified", when, checked);
    verdict(D4, V_CONFORMS,
            "%u isolated pages inflated and deflated; every neighbour and the "
            "rest of memory verified after each",
            conform.target);
}

void release_layout(void)
{
    free_chain(&conform.fill);
    if (conform.area == BUDDY_NONE)
        return;
    for (uint64_t i = 0; i < (1ull << conform.area_order); i += 2)
        buddy_free(&kernel_buddy, conform.area + i, 0);
    conform.area = BUDDY_NONE;
}
